//! The placement service on HTTP/JSON: the router, the handlers, and the signing and
//! refusal rules every `POST` goes through (see [`crate::service`] for what each request does).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::registry::{Heartbeat, Registry};
use crate::service::{
    Capacity, Fingerprint, PlaceRequest, RankRequest, Refusal, Register, ReserveRequest, Service,
    Traffic,
};

/// Donors as `GET /donors` lists them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DonorView {
    pub id: String,
    pub addr: String,
    pub domain: String,
    pub free_slabs: u32,
    pub total_slabs: u32,
    pub pending_slabs: u32,
    pub slab_bytes: u64,
    pub seq: u64,
    pub lease_ms: u64,
    pub link_load: f32,
    pub labels: std::collections::BTreeMap<String, String>,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "malformed", e))
}

/// The router over a service.
pub fn router<R: Registry>(svc: Arc<Service<R>>) -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { Json(serde_json::json!({ "ok": true })) }),
        )
        .route("/donors", get(donors::<R>))
        .route("/links", get(links::<R>))
        .route("/metrics", get(metrics::<R>))
        .route("/register", post(register::<R>))
        .route("/heartbeat", post(heartbeat::<R>))
        .route("/traffic", post(traffic::<R>))
        .route("/place", post(place::<R>))
        .route("/fingerprint", post(fingerprint::<R>))
        .route("/rank", post(rank::<R>))
        .route("/reserve", post(reserve::<R>))
        .route("/capacity", post(capacity::<R>))
        .layer(axum::extract::DefaultBodyLimit::max(4 << 20))
        .layer(axum::middleware::from_fn_with_state(
            Bounds::of(&svc),
            bounded,
        ))
        .with_state(svc)
}

/// What one client can hold: a slot among `max_in_flight`, for at most `timeout`.
#[derive(Clone)]
struct Bounds {
    slots: Arc<tokio::sync::Semaphore>,
    timeout: Duration,
}

impl Bounds {
    fn of<R: Registry>(svc: &Service<R>) -> Bounds {
        let c = svc.config();
        Bounds {
            slots: Arc::new(tokio::sync::Semaphore::new(c.max_in_flight.max(1))),
            timeout: Duration::from_millis(c.request_timeout_ms.max(1)),
        }
    }
}

/// Refuses a request beyond the in-flight bound and ends one that takes too long (a client
/// that sends its body slowly or not at all), so no client holds a slot or a task for ever.
async fn bounded(
    State(b): State<Bounds>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Ok(_slot) = b.slots.try_acquire() else {
        return Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many requests in flight; try again",
        )
        .into_response();
    };
    match tokio::time::timeout(b.timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => Refusal::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request took over {} ms", b.timeout.as_millis()),
        )
        .into_response(),
    }
}

/// Serves until the listener fails, sweeping lapsed leases four times a second (a lapsed donor
/// is already out of every decision; the sweep keeps `/donors` and the gauges true).
pub async fn serve<R: Registry>(
    listener: tokio::net::TcpListener,
    svc: Arc<Service<R>>,
) -> std::io::Result<()> {
    let sweeper = svc.clone();
    let sweep = tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_millis(250));
        loop {
            t.tick().await;
            sweeper.sweep();
        }
    });
    let r = rmem_wire::http::serve(listener, router(svc)).await;
    sweep.abort();
    r
}

type Answer = Result<Response, Refusal>;

async fn donors<R: Registry>(State(s): State<Arc<Service<R>>>) -> Answer {
    // The candidate set exactly: a lapsed donor leaves it (and this list) at the next sweep.
    let t = s.registry.table()?;
    let v: Vec<DonorView> = t
        .donors()
        .map(|e| DonorView {
            id: e.report.id.clone(),
            addr: e.report.addr.clone(),
            domain: e.report.domain.clone(),
            free_slabs: e.report.free_slabs.saturating_sub(e.pending),
            total_slabs: e.report.total_slabs,
            pending_slabs: e.pending,
            slab_bytes: e.report.slab_bytes,
            seq: e.seq,
            lease_ms: e.lease_ms,
            link_load: t
                .index_of(&e.report.id)
                .and_then(|i| t.pool_slot(i))
                .map_or(0.0, |s| s.load),
            labels: e.report.labels.clone(),
        })
        .collect();
    Ok(Json(serde_json::json!({ "stale": s.registry.stale(), "donors": v })).into_response())
}

async fn links<R: Registry>(State(s): State<Arc<Service<R>>>) -> Answer {
    Ok(Json(s.links()).into_response())
}

async fn metrics<R: Registry>(State(s): State<Arc<Service<R>>>) -> Response {
    match s.metrics_text() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Runs a signed POST: authorization, parsing, the handler, and the refusal counter.
async fn signed<R: Registry, T, F, Fut, O>(
    s: &Arc<Service<R>>,
    path: &str,
    h: &HeaderMap,
    body: &Bytes,
    once: bool,
    f: F,
) -> Answer
where
    T: serde::de::DeserializeOwned,
    F: FnOnce(T) -> Fut,
    Fut: std::future::Future<Output = Result<O, Refusal>>,
    O: Serialize,
{
    let r = async {
        s.authorized(path, h, body, once)?;
        let req: T = parse(body)?;
        f(req).await
    }
    .await;
    match r {
        Ok(o) => Ok(Json(o).into_response()),
        Err(e) => {
            s.refused(&e);
            Err(e)
        }
    }
}

#[derive(Serialize)]
struct Done {
    ok: bool,
}

async fn register<R: Registry>(
    State(s): State<Arc<Service<R>>>,
    h: HeaderMap,
    body: Bytes,
) -> Answer {
    signed(&s, "/register", &h, &body, true, |r: Register| async {
        s.register(r).await.map(|()| Done { ok: true })
    })
    .await
}

async fn heartbeat<R: Registry>(
    State(s): State<Arc<Service<R>>>,
    h: HeaderMap,
    body: Bytes,
) -> Answer {
    signed(&s, "/heartbeat", &h, &body, false, |hb: Heartbeat| async {
        s.heartbeat(hb).await.map(|()| Done { ok: true })
    })
    .await
}

async fn traffic<R: Registry>(
    State(s): State<Arc<Service<R>>>,
    h: HeaderMap,
    body: Bytes,
) -> Answer {
    signed(&s, "/traffic", &h, &body, false, |t: Traffic| async {
        s.traffic(t).map(|()| Done { ok: true })
    })
    .await
}

async fn place<R: Registry>(State(s): State<Arc<Service<R>>>, h: HeaderMap, body: Bytes) -> Answer {
    signed(&s, "/place", &h, &body, true, |r: PlaceRequest| async {
        s.place(r).await
    })
    .await
}

async fn fingerprint<R: Registry>(
    State(s): State<Arc<Service<R>>>,
    h: HeaderMap,
    body: Bytes,
) -> Answer {
    signed(
        &s,
        "/fingerprint",
        &h,
        &body,
        false,
        |f: Fingerprint| async { s.fingerprint(f).map(|()| Done { ok: true }) },
    )
    .await
}

async fn rank<R: Registry>(State(s): State<Arc<Service<R>>>, h: HeaderMap, body: Bytes) -> Answer {
    signed(&s, "/rank", &h, &body, false, |r: RankRequest| async {
        s.rank(r)
    })
    .await
}

async fn capacity<R: Registry>(
    State(s): State<Arc<Service<R>>>,
    h: HeaderMap,
    body: Bytes,
) -> Answer {
    let svc = s.clone();
    signed(
        &s,
        "/capacity",
        &h,
        &body,
        false,
        |c: Capacity| async move {
            let s = svc;
            if !(c.bytes_per_sec.is_finite() && c.bytes_per_sec > 0.0) {
                return Err(Refusal::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid",
                    "bytes_per_sec must be a positive number",
                ));
            }
            s.set_capacity(&c.from, &c.to, c.bytes_per_sec);
            Ok(Done { ok: true })
        },
    )
    .await
}

async fn reserve<R: Registry>(
    State(s): State<Arc<Service<R>>>,
    h: HeaderMap,
    body: Bytes,
) -> Answer {
    signed(&s, "/reserve", &h, &body, true, |r: ReserveRequest| async {
        s.reserve(r)
    })
    .await
}
