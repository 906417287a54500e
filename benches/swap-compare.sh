#!/usr/bin/env bash
# Swap backends side by side in one QEMU VM (soft-roce/vm/run.sh swap-compare): the same
# `rmem memcheck` workload in a 64 MiB memory cgroup with rmem swap over tcp, rmem swap over
# verbs on Soft-RoCE (rxe0), zram, and a swap file on ext4 on a virtio disk as the guest's only
# swap. Prints one table. Under TCG the figures compare backends with each other; they are not
# the speed of any of them on real hardware.
#
#   benches/swap-compare.sh [--svg FILE] [seq=SIZE random=SIZE limit=SIZE]
#     (a smaller workload: a quick check; --svg: the table drawn as bars)
#   Environment: RMEM_VM_KERNEL, RMEM_VM_DISK_DIR, RMEM_VM_TIMEOUT...: see soft-roce/vm/run.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=benches/vm-table.sh
. benches/vm-table.sh
# The table's rows as bars for --svg (see vm_compare).
bars_py=$(cat <<'PY'
# Short names, so each fits under its bar.
short = lambda n: (n.replace("rmem swap, ", "rmem ").replace(" (rxe0)", "")
                   .replace("swap file, ext4, virtio", "swap file"))
groups = [dict(measure=head[i].rsplit(" ", 1)[0], unit=head[i].rsplit(" ", 1)[1],
               bars=[[short(r[0]), float(r[i])] for r in body]) for i in (1, 2, 3)]
json.dump(dict(title="Swap backends in one VM (TCG): rmem swap vs zram and a swap file", groups=groups),
          open(sys.argv[2], "w"))
PY
)
vm_compare swap-compare '^== swap backends' "$bars_py" "$@"
