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
# shellcheck source=benches/vm-table.sh
. benches/vm-table.sh
# The table's rows as bars for --svg (see vm_compare).
bars_py=$(cat <<'PY'
short = lambda n: n.split(" (")[0]
groups = [dict(measure=head[i].replace(" IOPS", "").replace(" MiB/s", ""),
               unit="MiB/s" if "MiB/s" in head[i] else "IOPS",
               bars=[[short(r[0]), float(r[i])] for r in body]) for i in (1, 2, 3, 4)]
json.dump(dict(title="Block devices in one VM (TCG): rmem vs ublk null, nbdkit and virtio", groups=groups),
          open(sys.argv[2], "w"))
PY
)
vm_compare fio-compare '^== fio on block devices' "$bars_py" "$@"
