//! What the store's test binaries share.

use std::net::SocketAddr;
use std::time::Duration;

use rmem_swapclient::{DonorSpec, StoreConfig};
use rmem_transport::Provider;

/// A store over the tcp provider on `donors` (each its own failure domain), with the test
/// donors' secret and a 2 s operation timeout.
pub fn store_config(
    name: &str,
    size: u64,
    replicas: usize,
    lanes: usize,
    donors: &[SocketAddr],
    secret: &[u8],
) -> StoreConfig {
    StoreConfig {
        size,
        replicas,
        donors: donors
            .iter()
            .enumerate()
            .map(|(i, &addr)| DonorSpec {
                addr,
                domain: format!("d{i}"),
            })
            .collect(),
        secret: secret.to_vec(),
        provider: Provider::Tcp,
        device: None,
        name: name.into(),
        op_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(10),
        lanes,
        bounce: 1 << 20,
        plan: None,
        readahead: true,
    }
}
