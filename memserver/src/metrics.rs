//! The donor's Prometheus exposition at `/metrics`: one collector reads the pool, the counters,
//! the NBD figures and the transport's target figures at each scrape, so nothing is copied into
//! registered metrics between scrapes and nothing can drift from `/status`.
//!
//! The text is Prometheus' format 0.0.4 (what this endpoint always served): its counter
//! families keep their `_total` name on HELP and TYPE, where OpenMetrics would drop it.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::donor::Inner;

/// A scrape that could not be written out.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode metrics")]
pub(crate) struct EncodeError(#[from] fmt::Error);

/// The registry `/metrics` encodes: the donor's collector and nothing else.
pub(crate) fn registry(inner: Arc<Inner>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(DonorCollector(inner)));
    r
}

pub(crate) fn encode(registry: &Registry) -> Result<String, EncodeError> {
    let mut s = String::new();
    prometheus_text::encode(&mut s, registry)?;
    Ok(s)
}

/// `GET /metrics`.
pub(crate) async fn scrape(State(registry): State<Arc<Registry>>) -> Response {
    match encode(&registry) {
        Ok(text) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "metrics scrape failed");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

struct DonorCollector(Arc<Inner>);

impl fmt::Debug for DonorCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DonorCollector")
    }
}

/// One unlabelled gauge family.
fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// One unlabelled counter family; `name` is without the `_total` the encoder appends.
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for DonorCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        let inner = &self.0;
        let st = inner.stats(None);
        let t = inner.ctx.stats();
        let c = &inner.counters;
        let nbd = &inner.nbd_stats;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let e = &mut e;
        gauge(
            e,
            "rmem_donor_slab_bytes",
            "Size of one slab.",
            st.slab_size,
        )?;
        gauge(
            e,
            "rmem_donor_slabs",
            "Slabs in the pool.",
            st.slabs_total.into(),
        )?;
        gauge(
            e,
            "rmem_donor_slabs_free",
            "Slabs free to lend.",
            st.slabs_free.into(),
        )?;
        gauge(
            e,
            "rmem_donor_clients",
            "Authenticated client sessions.",
            st.clients.into(),
        )?;
        gauge(
            e,
            "rmem_donor_bytes_lent",
            "Bytes lent to clients and NBD exports.",
            u64::from(st.slabs_total - st.slabs_free - st.slabs_retired) * st.slab_size,
        )?;
        gauge(
            e,
            "rmem_donor_slabs_retired",
            "Slabs taken back from lending (memory returned to the host).",
            st.slabs_retired.into(),
        )?;
        gauge(
            e,
            "rmem_donor_slabs_reclaiming",
            "Lent slabs asked back and not yet returned.",
            st.slabs_reclaiming.into(),
        )?;
        counter(
            e,
            "rmem_donor_slabs_reclaimed",
            "Slabs taken from clients at a reclaim deadline.",
            n(&c.slabs_reclaimed),
        )?;
        counter(
            e,
            "rmem_donor_auth_failures",
            "Failed authentications.",
            n(&c.auth_failures),
        )?;
        counter(
            e,
            "rmem_donor_connections_refused",
            "Control connections closed at once for being over a limit.",
            n(&c.connections_refused),
        )?;
        gauge(
            e,
            "rmem_donor_nbd_connections",
            "NBD connections being served.",
            nbd.connections.load(Ordering::Relaxed) as u64,
        )?;
        counter(
            e,
            "rmem_donor_nbd_refused",
            "NBD connections closed at once for being over a limit.",
            n(&nbd.refused),
        )?;
        counter(
            e,
            "rmem_donor_nbd_handshake_timeouts",
            "NBD connections closed for not finishing the handshake in time.",
            n(&nbd.handshake_timeouts),
        )?;
        counter(
            e,
            "rmem_donor_bad_requests",
            "Malformed or refused requests.",
            n(&c.bad_requests),
        )?;
        counter(
            e,
            "rmem_donor_slabs_allocated",
            "Slabs lent.",
            n(&c.slabs_allocated),
        )?;
        counter(
            e,
            "rmem_donor_slabs_freed",
            "Slabs taken back and zeroed.",
            n(&c.slabs_freed),
        )?;
        counter(
            e,
            "rmem_donor_leases_expired",
            "Sessions ended by lease expiry.",
            n(&c.leases_expired),
        )?;
        counter(
            e,
            "rmem_target_requests",
            "One-sided requests served (tcp provider).",
            t.requests,
        )?;
        counter(
            e,
            "rmem_target_bytes_read",
            "Bytes READ by peers (tcp provider).",
            t.bytes_read,
        )?;
        counter(
            e,
            "rmem_target_bytes_written",
            "Bytes written by peers (tcp provider).",
            t.bytes_written,
        )?;
        counter(
            e,
            "rmem_target_access_errors",
            "Requests refused for key, bounds or rights.",
            t.access_errors,
        )?;
        counter(
            e,
            "rmem_target_protocol_errors",
            "Malformed or truncated transport frames.",
            t.protocol_errors,
        )
    }
}
