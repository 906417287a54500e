//! Prometheus text for `rmem swap up --metrics ADDR`: the device's I/O, the store's replica
//! health and each donor's traffic.

use std::fmt::Write;

use crate::status::DeviceStatus;
use crate::store::DonorStatus;

/// A per-donor family: name, type, help, and how to read it off a donor.
type DonorFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&DonorStatus) -> u64,
);

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition of one device's status.
pub fn render(st: &DeviceStatus) -> String {
    let mut s = String::new();
    let dev = format!(
        "device=\"{}\",backend=\"{}\"",
        label(&st.device),
        st.backend
    );
    let mut m = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(
            s,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{dev}}} {v}"
        );
    };
    let c = "counter";
    m(
        "rmem_swap_reads_total",
        c,
        "Read requests served (swap-in).",
        st.reads,
    );
    m(
        "rmem_swap_writes_total",
        c,
        "Write requests served (swap-out).",
        st.writes,
    );
    m(
        "rmem_swap_read_bytes_total",
        c,
        "Bytes paged in from donors.",
        st.bytes_in,
    );
    m(
        "rmem_swap_written_bytes_total",
        c,
        "Bytes paged out to donors.",
        st.bytes_out,
    );
    m(
        "rmem_swap_io_errors_total",
        c,
        "Requests failed back to the kernel.",
        st.io_errors,
    );
    let g = "gauge";
    let store = &st.store;
    m("rmem_swap_size_bytes", g, "Device size.", store.size);
    m(
        "rmem_swap_replicas",
        g,
        "Copies kept of every chunk.",
        store.replicas as u64,
    );
    m(
        "rmem_swap_chunks",
        g,
        "Chunks (one slab each).",
        store.chunks as u64,
    );
    m(
        "rmem_swap_chunks_degraded",
        g,
        "Chunks with fewer live copies than asked for.",
        store.degraded as u64,
    );
    m(
        "rmem_swap_chunks_lost",
        g,
        "Chunks with no live copy (their blocks give I/O errors).",
        store.lost as u64,
    );
    m(
        "rmem_swap_chunks_rebuilt_total",
        c,
        "Chunk copies rebuilt on another donor.",
        store.rebuilt,
    );
    m(
        "rmem_swap_chunks_moved_total",
        c,
        "Chunks moved off a reclaiming donor.",
        store.moved,
    );
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
            "rmem_swap_donor_read_bytes_total",
            c,
            "Bytes read from the donor.",
            |d| d.bytes_read,
        ),
        (
            "rmem_swap_donor_written_bytes_total",
            c,
            "Bytes written to the donor.",
            |d| d.bytes_written,
        ),
        (
            "rmem_swap_donor_errors_total",
            c,
            "Failed operations on the donor.",
            |d| d.errors,
        ),
    ];
    for (name, kind, help, f) in donors {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for d in &store.donors {
            let _ = writeln!(
                s,
                "{name}{{{dev},donor=\"{}\",domain=\"{}\"}} {}",
                label(&d.addr),
                label(&d.domain),
                f(d)
            );
        }
    }
    s
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
            store: StoreStatus {
                size: 1 << 30,
                chunk_size: 1 << 24,
                replicas: 2,
                chunks: 64,
                degraded: 5,
                lost: 1,
                rebuilt: 7,
                moved: 8,
                donors: vec![
                    donor("10.0.0.2:7470", true, 0),
                    donor("10.0.0.3:7470", false, 9),
                ],
            },
        };
        let text = render(&st);
        let dev = r#"device="/dev/ublkb0",backend="ublk""#;
        for line in [
            format!("rmem_swap_reads_total{{{dev}}} 11"),
            format!("rmem_swap_written_bytes_total{{{dev}}} 14"),
            format!("rmem_swap_io_errors_total{{{dev}}} 2"),
            format!("rmem_swap_chunks_degraded{{{dev}}} 5"),
            format!("rmem_swap_chunks_lost{{{dev}}} 1"),
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
