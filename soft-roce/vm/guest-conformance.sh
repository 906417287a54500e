#!/bin/sh
# Runs inside the Soft-RoCE VM (see build-initramfs.sh): shows the device, then runs the verbs
# conformance suite on rxe0 one case at a time. Its exit status is the VM's.
echo "== devices"
ibv_devinfo -v -d rxe0 2>/dev/null | grep -E "hca_id|max_qp_wr|max_sge|max_cqe|max_qp_rd_atom|state|active_mtu|max_msg_sz|link_layer" || true
rdma link show
echo "== rmem devices"
rmem-devices 2>/dev/null || true
echo "== conformance (verbs on rxe0)"
export RMEM_VERBS_DEVICE=rxe0 RMEM_VERBS_IP=10.0.2.15
# shellcheck disable=SC2086 # RMEM_TEST_ARGS holds several arguments
/bin/conformance_verbs --test-threads=1 $RMEM_TEST_ARGS
