//! The provider conformance suite over the software `tcp` provider on loopback.

rmem_transport::conformance_tests!(rmem_transport::conformance::Setup::tcp());
