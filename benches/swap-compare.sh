#!/usr/bin/env bash
# Swap backends side by side in one QEMU VM (soft-roce/vm/run.sh swap-compare): the same
# `rmem memcheck` workload in a 64 MiB memory cgroup with rmem swap over tcp, rmem swap over
# verbs on Soft-RoCE (rxe0), zram, and a swap file on ext4 on a virtio disk as the guest's only
# swap. Prints one table. Under TCG the figures compare backends with each other; they are not
# the speed of any of them on real hardware.
#
#   benches/swap-compare.sh [seq=SIZE random=SIZE limit=SIZE]   (a smaller workload: a quick check)
#   Environment: RMEM_VM_KERNEL, RMEM_VM_DISK_DIR, RMEM_VM_TIMEOUT...: see soft-roce/vm/run.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rc=0
RMEM_VM_LOG=$log soft-roce/vm/run.sh swap-compare "$@" || rc=$?
echo
tr -d '\r' < "$log" | grep '^== swap backends' || true
tr -d '\r' < "$log" | sed -n '/^=== BEGIN swap-compare table/,/^=== END swap-compare table/p' | sed '1d;$d'
exit "$rc"
