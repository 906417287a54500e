#!/bin/sh
# Runs inside the Soft-RoCE VM (see build-initramfs.sh): shows the device, then runs the verbs
# conformance suite on rxe0 one case at a time. Its exit status is the VM's.
# shellcheck source=SCRIPTDIR/guest-lib.sh
. "$(dirname "$0")/guest-lib.sh"
echo "== devices"
ibv_devinfo -v -d rxe0 2>/dev/null | grep -E "hca_id|max_qp_wr|max_sge|max_cqe|max_qp_rd_atom|state|active_mtu|max_msg_sz|link_layer" || true
rdma link show
echo "== soft-roce/rxe.sh: remove, add and check rxe0 the way a real host does"
# busybox has no /usr/bin/env: run the script with bash explicitly.
rxe() { bash /bin/rxe.sh "$@"; }
rxe remove rxe0 && rxe add eth0 rxe0 || exit 91
rxe add no-such-netdev && { echo "rxe.sh accepted a missing netdev"; exit 92; }
gid_back() { grep -qx "0000:0000:0000:0000:0000:ffff:0a00:020f" /sys/class/infiniband/rxe0/ports/1/gids/* 2>/dev/null; }
wait_for "the RoCE v2 GID of 10.0.2.15 on rxe0 after rxe.sh add" 10 gid_back || exit 93
echo "== rmem devices"
rmem devices || exit 94
echo "== conformance (verbs on rxe0)"
export RMEM_VERBS_DEVICE=rxe0 RMEM_VERBS_IP=10.0.2.15
# shellcheck disable=SC2086 # RMEM_TEST_ARGS holds several arguments
/bin/conformance_verbs --test-threads=1 $RMEM_TEST_ARGS
