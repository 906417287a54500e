//! The donor's HTTP admin endpoint: Prometheus text at `/metrics`, JSON at `/status`, and
//! `POST /shrink` / `POST /grow` to take memory back or lend it again. The POSTs must be signed
//! with the shared secret (`auth::admin_authorization`), and each signed request is carried
//! out once: a replay within its minute of validity gets 409. Reading figures needs no secret.

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
    let registry = Arc::new(crate::metrics::registry(inner.clone()));
    let app = Router::new()
        .route("/metrics", get(crate::metrics::scrape).with_state(registry))
        .route("/status", get(status))
        .with_state(inner)
        .merge(posts);
    if let Err(e) = rmem_wire::http::serve(listener, app).await {
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
