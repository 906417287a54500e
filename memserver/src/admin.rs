//! The donor's HTTP admin endpoint: Prometheus text at `/metrics`, JSON at `/status`, and
//! `POST /shrink` / `POST /grow` to take memory back or lend it again. The POSTs must be signed
//! with the shared secret (`auth::admin_authorization`), and each signed request is carried
//! out once: a replay within its minute of validity gets 409. Reading figures needs no secret.

use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::auth::{AdminNonces, AdminRefusal, ADMIN_NONCES_MAX};
use crate::donor::{Control, Inner};

/// What the signed handlers need besides the donor: the nonces already taken.
pub(crate) struct Signed {
    inner: Arc<Inner>,
    nonces: AdminNonces,
}

pub(crate) async fn serve(listener: tokio::net::TcpListener, inner: Arc<Inner>) {
    let signed = Arc::new(Signed {
        inner: inner.clone(),
        nonces: AdminNonces::new(ADMIN_NONCES_MAX),
    });
    let posts = Router::new()
        .route("/shrink", post(shrink))
        .route("/grow", post(grow))
        .with_state(signed);
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(inner)
        .merge(posts);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "admin endpoint stopped");
    }
}

/// Body of `POST /shrink` and `POST /grow`: an amount in slabs or in bytes (rounded up).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Amount {
    Slabs(u32),
    Bytes(u64),
}

type Refusal = (StatusCode, Json<serde_json::Value>);

fn refuse(code: StatusCode, msg: &str) -> Refusal {
    (code, Json(serde_json::json!({ "error": msg })))
}

/// Checks the signature and that it was not used before, then parses the amount into slabs.
fn authorized(s: &Signed, path: &str, h: &HeaderMap, body: &[u8]) -> Result<u32, Refusal> {
    let inner = &s.inner;
    let auth = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let taken = crate::auth::verify_admin(&inner.secret, "POST", path, body, auth)
        .and_then(|signed| s.nonces.take(&signed));
    if let Err(why) = taken {
        inner.counters.auth_failures.fetch_add(1, Ordering::Relaxed);
        let code = match why {
            AdminRefusal::Replayed => StatusCode::CONFLICT,
            AdminRefusal::Busy => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNAUTHORIZED,
        };
        tracing::warn!(path, reason = %why, "admin request refused");
        return Err(refuse(code, &why.to_string()));
    }
    let amount: Amount = serde_json::from_slice(body).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            &format!("expected {{\"slabs\": N}} or {{\"bytes\": N}}: {e}"),
        )
    })?;
    let slab = inner.cfg.slab_size.0;
    let n = match amount {
        Amount::Slabs(n) => u64::from(n),
        Amount::Bytes(b) => b.div_ceil(slab),
    };
    if n == 0 || n > u64::from(u32::MAX) {
        return Err(refuse(StatusCode::BAD_REQUEST, "amount out of range"));
    }
    Ok(n as u32)
}

async fn shrink(State(s): State<Arc<Signed>>, h: HeaderMap, body: Bytes) -> impl IntoResponse {
    let n = authorized(&s, "/shrink", &h, &body)?;
    let inner = &s.inner;
    let report = Control(inner.clone()).shrink(n);
    Ok::<_, Refusal>(Json(serde_json::json!({
        "report": report,
        "donor": inner.stats(None),
    })))
}

async fn grow(State(s): State<Arc<Signed>>, h: HeaderMap, body: Bytes) -> impl IntoResponse {
    let n = authorized(&s, "/grow", &h, &body)?;
    let inner = &s.inner;
    let grown = Control(inner.clone()).grow(n);
    Ok::<_, Refusal>(Json(serde_json::json!({
        "grown": grown,
        "donor": inner.stats(None),
    })))
}

async fn metrics(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    let st = inner.stats(None);
    let t = inner.ctx.stats();
    let c = &inner.counters;
    let mut s = String::new();
    let mut m = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    };
    m(
        "rmem_donor_slab_bytes",
        "gauge",
        "Size of one slab.",
        st.slab_size,
    );
    m(
        "rmem_donor_slabs",
        "gauge",
        "Slabs in the pool.",
        u64::from(st.slabs_total),
    );
    m(
        "rmem_donor_slabs_free",
        "gauge",
        "Slabs free to lend.",
        u64::from(st.slabs_free),
    );
    m(
        "rmem_donor_clients",
        "gauge",
        "Authenticated client sessions.",
        u64::from(st.clients),
    );
    m(
        "rmem_donor_bytes_lent",
        "gauge",
        "Bytes lent to clients and NBD exports.",
        u64::from(st.slabs_total - st.slabs_free - st.slabs_retired) * st.slab_size,
    );
    m(
        "rmem_donor_slabs_retired",
        "gauge",
        "Slabs taken back from lending (memory returned to the host).",
        u64::from(st.slabs_retired),
    );
    m(
        "rmem_donor_slabs_reclaiming",
        "gauge",
        "Lent slabs asked back and not yet returned.",
        u64::from(st.slabs_reclaiming),
    );
    m(
        "rmem_donor_slabs_reclaimed_total",
        "counter",
        "Slabs taken from clients at a reclaim deadline.",
        c.slabs_reclaimed.load(Ordering::Relaxed),
    );
    m(
        "rmem_donor_auth_failures_total",
        "counter",
        "Failed authentications.",
        c.auth_failures.load(Ordering::Relaxed),
    );
    m(
        "rmem_donor_connections_refused_total",
        "counter",
        "Control connections closed at once for being over a limit.",
        c.connections_refused.load(Ordering::Relaxed),
    );
    let nbd = &inner.nbd_stats;
    m(
        "rmem_donor_nbd_connections",
        "gauge",
        "NBD connections being served.",
        nbd.connections.load(Ordering::Relaxed) as u64,
    );
    m(
        "rmem_donor_nbd_refused_total",
        "counter",
        "NBD connections closed at once for being over a limit.",
        nbd.refused.load(Ordering::Relaxed),
    );
    m(
        "rmem_donor_nbd_handshake_timeouts_total",
        "counter",
        "NBD connections closed for not finishing the handshake in time.",
        nbd.handshake_timeouts.load(Ordering::Relaxed),
    );
    m(
        "rmem_donor_bad_requests_total",
        "counter",
        "Malformed or refused requests.",
        c.bad_requests.load(Ordering::Relaxed),
    );
    m(
        "rmem_donor_slabs_allocated_total",
        "counter",
        "Slabs lent.",
        c.slabs_allocated.load(Ordering::Relaxed),
    );
    m(
        "rmem_donor_slabs_freed_total",
        "counter",
        "Slabs taken back and zeroed.",
        c.slabs_freed.load(Ordering::Relaxed),
    );
    m(
        "rmem_donor_leases_expired_total",
        "counter",
        "Sessions ended by lease expiry.",
        c.leases_expired.load(Ordering::Relaxed),
    );
    m(
        "rmem_target_requests_total",
        "counter",
        "One-sided requests served (tcp provider).",
        t.requests,
    );
    m(
        "rmem_target_bytes_read_total",
        "counter",
        "Bytes READ by peers (tcp provider).",
        t.bytes_read,
    );
    m(
        "rmem_target_bytes_written_total",
        "counter",
        "Bytes written by peers (tcp provider).",
        t.bytes_written,
    );
    m(
        "rmem_target_access_errors_total",
        "counter",
        "Requests refused for key, bounds or rights.",
        t.access_errors,
    );
    m(
        "rmem_target_protocol_errors_total",
        "counter",
        "Malformed or truncated transport frames.",
        t.protocol_errors,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s)
}

#[derive(Serialize)]
struct SessionStatus {
    session: u64,
    client: String,
    slabs: usize,
    lease_remaining_ms: u64,
}

#[derive(Serialize)]
struct Status {
    #[serde(flatten)]
    donor: crate::DonorStats,
    provider: String,
    sessions: Vec<SessionStatus>,
    /// Data-connection tokens issued and not yet used or expired.
    data_tokens: usize,
    transport: rmem_transport::TargetStats,
}

async fn status(State(inner): State<Arc<Inner>>) -> Json<impl Serialize> {
    let now = Instant::now();
    let mut sessions: Vec<SessionStatus> = inner
        .sessions_snapshot()
        .into_iter()
        .map(|s| SessionStatus {
            session: s.0,
            client: s.1,
            slabs: s.2,
            lease_remaining_ms: s.3.saturating_duration_since(now).as_millis() as u64,
        })
        .collect();
    sessions.sort_by_key(|s| s.session);
    Json(Status {
        donor: inner.stats(None),
        provider: inner.ctx.provider().to_string(),
        sessions,
        data_tokens: inner.data_tokens(),
        transport: inner.ctx.stats(),
    })
}
