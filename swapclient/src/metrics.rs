//! Prometheus text for `rmem swap up --metrics ADDR`: the device's I/O, the store's replica
//! health and each donor's traffic. A collector reads the device's status at each scrape, so
//! nothing is copied into registered metrics between scrapes. The text is Prometheus' format
//! 0.0.4, whose counter families keep their `_total` name on HELP and TYPE.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::status::DeviceStatus;
use crate::store::DonorStatus;

/// The `Content-Type` of what [`encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A scrape that could not be written out.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode metrics")]
pub struct EncodeError(#[from] fmt::Error);

/// A registry whose one collector calls `read` at each scrape for the device's status.
pub fn registry(read: impl Fn() -> DeviceStatus + Send + Sync + 'static) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(DeviceCollector(Box::new(read))));
    r
}

/// The exposition of everything `registry` holds.
pub fn encode(registry: &Registry) -> Result<String, EncodeError> {
    let mut s = String::new();
    prometheus_text::encode(&mut s, registry)?;
    Ok(s)
}

type ReadStatus = Box<dyn Fn() -> DeviceStatus + Send + Sync>;

struct DeviceCollector(ReadStatus);

impl fmt::Debug for DeviceCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DeviceCollector")
    }
}

/// A per-donor family: name (counters without the `_total` the encoder appends), type, help,
/// and how to read it off a donor.
type DonorFamily = (
    &'static str,
    MetricType,
    &'static str,
    fn(&DonorStatus) -> u64,
);

/// One sample of a family with `labels`; every family here is a counter or a gauge.
fn sample(
    e: &mut MetricEncoder,
    kind: MetricType,
    labels: &impl EncodeLabelSet,
    v: u64,
) -> fmt::Result {
    let m = e.encode_family(labels)?;
    match kind {
        MetricType::Counter => ConstCounter::new(v).encode(m),
        _ => ConstGauge::new(v).encode(m),
    }
}

impl Collector for DeviceCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let st = (self.0)();
        let dev = [("device", st.device.as_str()), ("backend", st.backend)];
        let mut one = |name: &str, kind: MetricType, help: &str, v: u64| {
            sample(
                &mut e.encode_descriptor(name, help, None, kind)?,
                kind,
                &dev,
                v,
            )
        };
        let (c, g) = (MetricType::Counter, MetricType::Gauge);
        one(
            "rmem_swap_reads",
            c,
            "Read requests served (swap-in).",
            st.reads,
        )?;
        one(
            "rmem_swap_writes",
            c,
            "Write requests served (swap-out).",
            st.writes,
        )?;
        one(
            "rmem_swap_read_bytes",
            c,
            "Bytes paged in from donors.",
            st.bytes_in,
        )?;
        one(
            "rmem_swap_written_bytes",
            c,
            "Bytes paged out to donors.",
            st.bytes_out,
        )?;
        one(
            "rmem_swap_io_errors",
            c,
            "Requests failed back to the kernel.",
            st.io_errors,
        )?;
        one(
            "rmem_swap_peak_in_flight",
            g,
            "The most requests in flight at once since start.",
            st.peak_in_flight,
        )?;
        let store = &st.store;
        one("rmem_swap_size_bytes", g, "Device size.", store.size)?;
        one(
            "rmem_swap_replicas",
            g,
            "Copies kept of every chunk.",
            store.replicas as u64,
        )?;
        one(
            "rmem_swap_chunks",
            g,
            "Chunks (one slab each).",
            store.chunks as u64,
        )?;
        one(
            "rmem_swap_chunks_degraded",
            g,
            "Chunks with fewer live copies than asked for.",
            store.degraded as u64,
        )?;
        one(
            "rmem_swap_chunks_lost",
            g,
            "Chunks with no live copy (their blocks give I/O errors).",
            store.lost as u64,
        )?;
        one(
            "rmem_swap_chunks_rebuilt",
            c,
            "Chunk copies rebuilt on another donor.",
            store.rebuilt,
        )?;
        one(
            "rmem_swap_chunks_moved",
            c,
            "Chunks moved off a reclaiming donor.",
            store.moved,
        )?;
        one(
            "rmem_swap_copied_bytes",
            c,
            "Bytes copied by rebuilds and moves (parts never written are not copied).",
            store.copied_bytes,
        )?;
        one(
            "rmem_swap_readahead_fetched_bytes",
            c,
            "Bytes read from donors ahead of a stream of reads.",
            store.readahead_fetched_bytes,
        )?;
        one(
            "rmem_swap_readahead_served_bytes",
            c,
            "Bytes of reads served from what was read ahead (no round trip to a donor).",
            store.readahead_served_bytes,
        )?;
        let donors: [DonorFamily; 5] = [
            (
                "rmem_swap_donor_up",
                g,
                "1 while the donor is healthy.",
                |d| u64::from(d.healthy),
            ),
            (
                "rmem_swap_donor_slabs",
                g,
                "Slabs held on the donor.",
                |d| d.slabs as u64,
            ),
            (
                "rmem_swap_donor_read_bytes",
                c,
                "Bytes read from the donor.",
                |d| d.bytes_read,
            ),
            (
                "rmem_swap_donor_written_bytes",
                c,
                "Bytes written to the donor.",
                |d| d.bytes_written,
            ),
            (
                "rmem_swap_donor_errors",
                c,
                "Failed operations on the donor.",
                |d| d.errors,
            ),
        ];
        for (name, kind, help, f) in donors {
            let mut m = e.encode_descriptor(name, help, None, kind)?;
            for d in &store.donors {
                let labels = [
                    dev[0],
                    dev[1],
                    ("donor", d.addr.as_str()),
                    ("domain", d.domain.as_str()),
                ];
                sample(&mut m, kind, &labels, f(d))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreStatus;

    fn donor(addr: &str, healthy: bool, errors: u64) -> DonorStatus {
        DonorStatus {
            addr: addr.into(),
            domain: "rack\"1".into(),
            healthy,
            slabs: 3,
            bytes_read: 4096,
            bytes_written: 8192,
            errors,
        }
    }

    #[test]
    fn every_figure_is_exposed_with_its_labels() {
        let st = DeviceStatus {
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
                copied_bytes: 3 << 20,
                readahead_fetched_bytes: 5 << 20,
                readahead_served_bytes: 4 << 20,
                donors: vec![
                    donor("10.0.0.2:7470", true, 0),
                    donor("10.0.0.3:7470", false, 9),
                ],
            },
        };
        let text = encode(&registry(move || st.clone())).unwrap();
        let dev = r#"device="/dev/ublkb0",backend="ublk""#;
        for line in [
            format!("rmem_swap_reads_total{{{dev}}} 11"),
            format!("rmem_swap_written_bytes_total{{{dev}}} 14"),
            format!("rmem_swap_io_errors_total{{{dev}}} 2"),
            format!("rmem_swap_peak_in_flight{{{dev}}} 17"),
            format!("rmem_swap_chunks_degraded{{{dev}}} 5"),
            format!("rmem_swap_chunks_lost{{{dev}}} 1"),
            format!("rmem_swap_copied_bytes_total{{{dev}}} 3145728"),
            format!("rmem_swap_readahead_served_bytes_total{{{dev}}} 4194304"),
            format!(r#"rmem_swap_donor_up{{{dev},donor="10.0.0.2:7470",domain="rack\"1"}} 1"#),
            format!(r#"rmem_swap_donor_up{{{dev},donor="10.0.0.3:7470",domain="rack\"1"}} 0"#),
            format!(
                r#"rmem_swap_donor_errors_total{{{dev},donor="10.0.0.3:7470",domain="rack\"1"}} 9"#
            ),
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        // One HELP and TYPE per family, every sample line parses as name{labels} value.
        assert_eq!(text.matches("# TYPE rmem_swap_donor_up ").count(), 1);
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            v.parse::<u64>().unwrap();
        }
    }
}
