#!/usr/bin/env bash
# Block devices side by side in one QEMU VM (soft-roce/vm/run.sh fio-compare): the same fio
# jobs (4 KiB random read and write at iodepth 16, 1 MiB sequential read and write) on the rmem
# device over tcp and over verbs on Soft-RoCE, on rublk's ublk null target (the ublk path's own
# floor; 6.12 only), on the kernel's NBD client to nbdkit's memory plugin, and on the guest's
# virtio disk. Prints one table. Under TCG the figures compare devices with each other; they are
# not the speed of any of them on real hardware. The rmem device is ublk on 6.12
# (RMEM_VM_KERNEL=backports) and NBD on 6.1 (the default).
#
#   benches/fio-compare.sh [--svg FILE] [runtime=SECONDS]
#   Environment: RMEM_VM_KERNEL, RMEM_VM_DISK_DIR, RMEM_RUBLK_ROOT...: see soft-roce/vm/run.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
svg_out=""
if [[ "${1:-}" == "--svg" ]]; then svg_out=${2:?--svg needs a file}; shift 2; fi
# shellcheck source=benches/vm-table.sh
. benches/vm-table.sh
table=""
trap 'rm -f "$table" "$table.bars"' EXIT
vm_table fio-compare '^== fio on block devices' "$@"
if [[ -n $svg_out && -s $table ]]; then
  python3 - "$table" "$table.bars" <<'PY'
import json, sys
rows = [[c.strip() for c in l.strip().strip("|").split("|")] for l in open(sys.argv[1]) if l.startswith("|")]
head, body = rows[0], [r for r in rows[2:] if len(r) == len(rows[0])]
short = lambda n: n.split(" (")[0]
groups = [dict(measure=head[i].replace(" IOPS", "").replace(" MiB/s", ""),
               unit="MiB/s" if "MiB/s" in head[i] else "IOPS",
               bars=[[short(r[0]), float(r[i])] for r in body]) for i in (1, 2, 3, 4)]
json.dump(dict(title="Block devices in one VM (TCG): rmem vs ublk null, nbdkit and virtio", groups=groups),
          open(sys.argv[2], "w"))
PY
  target/release/rmem perf plot --bars "$table.bars" --out "$svg_out"
fi
exit "$vm_rc"
