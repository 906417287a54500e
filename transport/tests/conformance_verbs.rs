//! The provider conformance suite over libibverbs, on the device named by `RMEM_VERBS_DEVICE`
//! and the address in `RMEM_VERBS_IP` (see `Setup::verbs_from_env`). Built only with the
//! `verbs-hw` feature: it needs an RDMA device (the Soft-RoCE VM in soft-roce/vm/ provides one).

rmem_transport::conformance_tests!(rmem_transport::conformance::Setup::verbs_from_env());
