//! The swap daemon's `/metrics` for a known device status, against the exposition recorded in
//! `fixtures/swap_metrics.prom` from the hand-written renderer: every family keeps its HELP
//! and TYPE, every sample its name, labels (per device, per donor) and value. The swap guest
//! script greps these lines, so any difference fails here first.

use rmem_swapclient::metrics;
use rmem_swapclient::status::DeviceStatus;
use rmem_swapclient::store::{DonorStatus, StoreStatus};

// The donor's metrics test reads its scrapes with the same reader; one copy keeps them alike.
#[path = "../../memserver/tests/support/exposition.rs"]
mod exposition;

use exposition::{assert_same, Exposition};

fn donor(addr: &str, domain: &str, healthy: bool, slabs: usize, base: u64) -> DonorStatus {
    DonorStatus {
        addr: addr.into(),
        domain: domain.into(),
        healthy,
        slabs,
        bytes_read: base + 1,
        bytes_written: base + 2,
        errors: base + 3,
    }
}

/// Every figure distinct, and label values that need escaping (quote, backslash, newline).
fn device() -> DeviceStatus {
    DeviceStatus {
        device: "/dev/ublkb0".into(),
        backend: "ublk",
        pid: 1,
        swapon: true,
        reads: 11,
        writes: 12,
        bytes_in: 13,
        bytes_out: 14,
        io_errors: 2,
        peak_in_flight: 17,
        store: StoreStatus {
            size: 1 << 30,
            chunk_size: 1 << 24,
            replicas: 2,
            chunks: 64,
            degraded: 5,
            lost: 1,
            rebuilt: 7,
            moved: 8,
            copied_bytes: 4096,
            readahead_fetched_bytes: 0,
            readahead_served_bytes: 0,
            donors: vec![
                donor("10.0.0.2:7470", "rack\"1", true, 3, 100),
                donor("10.0.0.3:7470", "row\\2\nb", false, 4, 200),
            ],
        },
    }
}

#[test]
fn exposition_matches_the_recorded_one() {
    let text = metrics::encode(&metrics::registry(device)).unwrap();
    let recorded = Exposition::parse(include_str!("fixtures/swap_metrics.prom"));
    assert_same(&recorded, &Exposition::parse(&text));
}
