//! `rmem place serve`: the placement service, its requests and answers; [`crate::http`] puts
//! it on HTTP/JSON (`http::serve`).
//!
//! Reads are open: `GET /donors`, `/links`, `/metrics` (Prometheus), `/health`. Everything that
//! changes state is a signed `POST` (the donor admin endpoint's `rmem-hmac` scheme, with the
//! cluster's shared secret): `/register`, `/heartbeat`, `/traffic`, `/place`, `/rank`,
//! `/fingerprint`, `/reserve`. Requests that hand something out (`/place`, `/reserve`) are also
//! taken once (a replay gets 409); heartbeats are protected by their sequence numbers instead,
//! so a busy cluster's heartbeats do not fill the nonce table. Every refusal is a 4xx or 503
//! with `{code, message}` and changes nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::bloom::{Bloom, BloomError, BloomParams};
use crate::choice::{Chooser, PlaceError, Strategy, MAX_REPLICAS};
use crate::links::{LinkMap, LinkView, Smoothing, TrafficDelta};
use crate::registry::{DonorReport, Heartbeat, Registry, RegistryError};
use crate::reserve::{Grant, ReserveError, Schedule, Want};
use rmem_wire::auth::{verify_admin, AdminNonces, AdminRefusal};

/// How the service decides; every field has a default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// The slab size every donor in the cluster uses.
    pub slab_bytes: u64,
    pub strategy: Strategy,
    pub seed: u64,
    pub smoothing: Smoothing,
    pub bloom: BloomParams,
    /// Signed requests remembered against replay (per minute).
    pub nonces: usize,
    /// The most chunks one `/place` may ask for.
    pub max_chunks: usize,
    /// Link use below which headroom is not scored down (see `Slot::score`).
    pub link_comfort: f32,
    /// Requests served at once; more are refused with 503 rather than queued.
    pub max_in_flight: usize,
    /// How long one request may take, its body included (408 after).
    pub request_timeout_ms: u64,
}

impl Default for ServiceConfig {
    fn default() -> ServiceConfig {
        ServiceConfig {
            slab_bytes: 16 << 20,
            strategy: Strategy::Weighted { d: 2 },
            seed: 0x726d_656d,
            smoothing: Smoothing::default(),
            bloom: BloomParams::default_cluster(),
            nonces: 1 << 18,
            max_chunks: 1 << 16,
            link_comfort: crate::choice::DEFAULT_COMFORT,
            max_in_flight: 1024,
            request_timeout_ms: 10_000,
        }
    }
}

/// Body of `POST /register`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Register {
    pub donor: DonorReport,
    pub lease_ms: u64,
}

/// Body of `POST /traffic`: a borrower's (or any host's) bytes to each peer since its last.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    pub host: String,
    pub deltas: Vec<TrafficDelta>,
}

/// Body of `POST /place`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaceRequest {
    /// The borrowing host (its path to each donor is scored).
    pub client: String,
    pub bytes: u64,
    pub replicas: usize,
}

/// One replica's donor in a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    pub id: String,
    pub addr: String,
    pub domain: String,
}

/// Answer to `POST /place`: `chunks[c][r]` holds replica `r` of chunk `c`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Placement {
    pub slab_bytes: u64,
    pub chunks: Vec<Vec<Replica>>,
    /// The view was older than the backend (etcd unreachable): a retry may differ.
    pub stale: bool,
}

/// Body of `POST /fingerprint`: a host's page filter, hex-encoded little-endian words.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    pub host: String,
    pub params: BloomParams,
    pub filter: String,
}

/// Body of `POST /rank`: a VM's filter; hosts are ranked as destinations for it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankRequest {
    /// The host the VM runs on (left out of the ranking).
    pub source: String,
    pub params: BloomParams,
    pub filter: String,
    /// The VM's memory, bytes: a destination needs this much free.
    pub bytes: u64,
}

/// One candidate destination.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ranked {
    pub host: String,
    /// Estimated pages of the VM the host already holds.
    pub shared_pages: u64,
    pub free_bytes: u64,
    /// Bytes per second the source-to-host path can still carry (0: unknown).
    pub headroom_bps: f64,
    pub score: f64,
}

/// Body of `POST /capacity`: a measured capacity for a path (`rmem place probe`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    pub from: String,
    pub to: String,
    pub bytes_per_sec: f64,
}

/// Body of `POST /reserve`: `bytes` from `from` to `to`, times in Unix milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    pub from: String,
    pub to: String,
    pub bytes: u64,
    #[serde(default)]
    pub earliest_ms: u64,
    pub deadline_ms: u64,
}

/// A refusal: the HTTP status and `{code, message}`.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub extra: Option<serde_json::Value>,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl ToString) -> Refusal {
        Refusal {
            status,
            code,
            message: message.to_string(),
            extra: None,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut v = serde_json::json!({ "code": self.code, "message": self.message });
        if let (Some(serde_json::Value::Object(m)), Some(o)) = (self.extra, v.as_object_mut()) {
            o.extend(m);
        }
        (self.status, Json(v)).into_response()
    }
}

impl From<RegistryError> for Refusal {
    fn from(e: RegistryError) -> Refusal {
        let status = match e {
            RegistryError::Unknown(_) => StatusCode::NOT_FOUND,
            RegistryError::SeqBack { .. } | RegistryError::Insufficient { .. } => {
                StatusCode::CONFLICT
            }
            RegistryError::Expired(_) => StatusCode::GONE,
            RegistryError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        Refusal::new(status, e.code(), e)
    }
}

impl From<PlaceError> for Refusal {
    fn from(e: PlaceError) -> Refusal {
        let (status, code) = match e {
            PlaceError::Full { .. } | PlaceError::NoDonor { .. } => {
                (StatusCode::INSUFFICIENT_STORAGE, "full")
            }
            PlaceError::TooFewDomains { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "domains"),
            PlaceError::Replicas { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
        };
        Refusal::new(status, code, e)
    }
}

impl From<ReserveError> for Refusal {
    fn from(e: ReserveError) -> Refusal {
        let mut r = Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, e.code(), &e);
        if let ReserveError::NoFit {
            earliest_deadline_ms,
        } = e
        {
            r.status = StatusCode::CONFLICT;
            r.extra = Some(serde_json::json!({ "earliest_deadline_ms": earliest_deadline_ms }));
        }
        r
    }
}

impl From<BloomError> for Refusal {
    fn from(e: BloomError) -> Refusal {
        Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, "filter", e)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

/// What `/metrics` exposes.
struct Metrics {
    registry: prometheus_client::registry::Registry,
    decisions: Family<ResultLabel, Counter>,
    latency: Histogram,
    donors: Gauge,
    expiries: Counter,
    admits: Counter,
    refusals: Family<ResultLabel, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = prometheus_client::registry::Registry::with_prefix("rmem_place");
        let decisions = Family::<ResultLabel, Counter>::default();
        let latency = Histogram::new([
            1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1,
        ]);
        let donors = Gauge::default();
        let expiries = Counter::default();
        let admits = Counter::default();
        let refusals = Family::<ResultLabel, Counter>::default();
        registry.register(
            "decisions",
            "Placement decisions, by result",
            decisions.clone(),
        );
        registry.register(
            "decision_seconds",
            "Time to decide one placement request (the decision core, not HTTP)",
            latency.clone(),
        );
        registry.register("donors", "Donors with a live lease", donors.clone());
        registry.register(
            "lease_expiries",
            "Donors dropped because their lease lapsed",
            expiries.clone(),
        );
        registry.register(
            "reservations_admitted",
            "Reservations admitted",
            admits.clone(),
        );
        registry.register(
            "refusals",
            "Requests refused, by error code",
            refusals.clone(),
        );
        Metrics {
            registry,
            decisions,
            latency,
            donors,
            expiries,
            admits,
            refusals,
        }
    }
}

/// The service's state, generic over the registry backend.
pub struct Service<R: Registry> {
    pub registry: R,
    cfg: ServiceConfig,
    secret: Vec<u8>,
    nonces: AdminNonces,
    chooser: Mutex<Chooser>,
    links: Mutex<LinkMap>,
    /// When each host last reported traffic (for its deltas' interval).
    reported: Mutex<HashMap<String, Instant>>,
    schedules: Mutex<HashMap<(String, String), Schedule>>,
    fingerprints: Mutex<HashMap<String, Bloom>>,
    metrics: Metrics,
    expired_seen: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<R: Registry> Service<R> {
    pub fn new(registry: R, secret: Vec<u8>, cfg: ServiceConfig) -> Service<R> {
        if let Ok(mut t) = registry.table() {
            t.pool().set_comfort(cfg.link_comfort);
        }
        Service {
            registry,
            chooser: Mutex::new(Chooser::new(cfg.strategy, cfg.seed)),
            links: Mutex::new(LinkMap::new(cfg.smoothing)),
            nonces: AdminNonces::new(cfg.nonces),
            cfg,
            secret,
            reported: Mutex::default(),
            schedules: Mutex::default(),
            fingerprints: Mutex::default(),
            metrics: Metrics::new(),
            expired_seen: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.cfg
    }

    /// Registers a donor (its port rate goes into the link map).
    pub async fn register(&self, r: Register) -> Result<(), Refusal> {
        let lease = Duration::from_millis(r.lease_ms);
        let (id, bps) = (r.donor.id.clone(), r.donor.link_bps);
        self.registry.register(r.donor, lease).await?;
        lock(&self.links).set_port(&id, bps);
        // Its first heartbeat's traffic counts from here.
        lock(&self.reported).insert(id, Instant::now());
        self.refresh_gauges();
        Ok(())
    }

    /// Renews a lease with a donor's figures and its traffic since the last heartbeat.
    pub async fn heartbeat(&self, hb: Heartbeat) -> Result<(), Refusal> {
        let (id, deltas) = (hb.id.clone(), hb.traffic.clone());
        self.registry.heartbeat(hb).await?;
        self.traffic(Traffic { host: id, deltas })?;
        Ok(())
    }

    /// Folds in a host's traffic report and rescores the donors it touched.
    pub fn traffic(&self, t: Traffic) -> Result<(), Refusal> {
        if t.deltas.len() > 4096 {
            return Err(Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "at most 4096 peers a report",
            ));
        }
        let now = Instant::now();
        let dt = lock(&self.reported)
            .insert(t.host.clone(), now)
            .map(|t0| now - t0);
        // A first report has no interval: it only starts the clock.
        let Some(dt) = dt else { return Ok(()) };
        let mut links = lock(&self.links);
        links.report(&t.host, &t.deltas, dt);
        let touched: Vec<&str> = std::iter::once(t.host.as_str())
            .chain(t.deltas.iter().map(|d| d.peer.as_str()))
            .collect();
        let loads: Vec<(&str, f32)> = touched.iter().map(|h| (*h, links.port_load(h))).collect();
        drop(links);
        let mut table = self.registry.table()?;
        for (h, load) in loads {
            table.set_load(h, load);
        }
        Ok(())
    }

    /// Chooses donors for `bytes` in slabs, `replicas` copies each, and grants them.
    pub async fn place(&self, req: PlaceRequest) -> Result<Placement, Refusal> {
        let started = Instant::now();
        let result = self.place_inner(req).await;
        self.metrics
            .latency
            .observe(started.elapsed().as_secs_f64());
        let label = match &result {
            Ok(_) => "placed",
            Err(_) => "refused",
        };
        self.metrics
            .decisions
            .get_or_create(&ResultLabel { result: label })
            .inc();
        result
    }

    async fn place_inner(&self, req: PlaceRequest) -> Result<Placement, Refusal> {
        if req.bytes == 0 {
            return Err(Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "bytes must be more than 0",
            ));
        }
        if req.replicas == 0 || req.replicas > MAX_REPLICAS {
            return Err(PlaceError::Replicas {
                replicas: req.replicas,
                max: MAX_REPLICAS,
            }
            .into());
        }
        let chunks = req.bytes.div_ceil(self.cfg.slab_bytes);
        if chunks > self.cfg.max_chunks as u64 {
            return Err(Refusal::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!(
                    "{chunks} chunks asked for; at most {} a request",
                    self.cfg.max_chunks
                ),
            ));
        }
        let stale = self.registry.stale();
        // Decide and charge the view under one lock, then commit each donor's share.
        let (plan, ids, chunks_out) = {
            let mut table = self.registry.table()?;
            let pool = table.pool();
            let plan = lock(&self.chooser).place(pool, chunks as usize, req.replicas)?;
            let mut per: HashMap<u32, u32> = HashMap::new();
            for &i in &plan.donors {
                *per.entry(i).or_default() += 1;
            }
            let ids: Vec<(String, u32)> = per
                .into_iter()
                .filter_map(|(i, n)| table.entry_at(i as usize).map(|e| (e.report.id.clone(), n)))
                .collect();
            let chunks_out: Vec<Vec<Replica>> = (0..plan.chunks())
                .map(|c| {
                    plan.chunk(c)
                        .iter()
                        .filter_map(|&i| table.entry_at(i as usize))
                        .map(|e| Replica {
                            id: e.report.id.clone(),
                            addr: e.report.addr.clone(),
                            domain: e.report.domain.clone(),
                        })
                        .collect()
                })
                .collect();
            (plan, ids, chunks_out)
        };
        let mut granted: Vec<&(String, u32)> = Vec::new();
        for g in &ids {
            if let Err(e) = self.registry.grant(&g.0, g.1).await {
                // Another placement took them first: this answer is void; what it did take goes
                // back, and the view resyncs from the backend.
                tracing::info!(donor = %g.0, error = %e, "grant lost; the request is refused");
                for (id, n) in granted {
                    if let Err(e) = self.registry.release(id, *n).await {
                        tracing::warn!(donor = %id, error = %e, "could not give a grant back");
                    }
                }
                return Err(e.into());
            }
            granted.push(g);
        }
        tracing::debug!(chunks = plan.chunks(), replicas = plan.replicas, client = %req.client, "placed");
        Ok(Placement {
            slab_bytes: self.cfg.slab_bytes,
            chunks: chunks_out,
            stale,
        })
    }

    /// Stores a host's page filter.
    pub fn fingerprint(&self, f: Fingerprint) -> Result<(), Refusal> {
        let bytes = hex::decode(&f.filter)
            .map_err(|e| Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, "filter", e))?;
        let b = Bloom::from_bytes(f.params, self.cfg.bloom, &bytes)?;
        lock(&self.fingerprints).insert(f.host, b);
        Ok(())
    }

    /// Ranks destinations for a VM: by estimated shared pages, then free memory and headroom.
    pub fn rank(&self, r: RankRequest) -> Result<Vec<Ranked>, Refusal> {
        let bytes = hex::decode(&r.filter)
            .map_err(|e| Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, "filter", e))?;
        let vm = Bloom::from_bytes(r.params, self.cfg.bloom, &bytes)?;
        let vm_pages = vm.estimate().max(1.0);
        let free: HashMap<String, u64> = {
            let t = self.registry.table()?;
            t.donors()
                .map(|e| {
                    (
                        e.report.id.clone(),
                        u64::from(e.report.free_slabs.saturating_sub(e.pending))
                            * e.report.slab_bytes,
                    )
                })
                .collect()
        };
        let links = lock(&self.links);
        let mut out: Vec<Ranked> = lock(&self.fingerprints)
            .iter()
            .filter(|(h, _)| **h != r.source)
            .filter_map(|(h, b)| {
                let shared = vm.shared(b).ok()?;
                let free_bytes = free.get(h).copied().unwrap_or(0);
                let headroom = links.headroom(&r.source, h, 0.0);
                let cap = links.capacity(&r.source, h);
                let fits = free_bytes >= r.bytes;
                // Shared pages lead; free memory and headroom (each 0-1) break near-ties, and a
                // host that cannot hold the VM ranks after every one that can.
                let score = (shared / vm_pages).min(1.0)
                    + 0.1 * (free_bytes as f64 / r.bytes.max(1) as f64).min(1.0)
                    + 0.1 * if cap > 0.0 { headroom / cap } else { 0.5 }
                    - if fits { 0.0 } else { 10.0 };
                Some(Ranked {
                    host: h.clone(),
                    shared_pages: shared.round() as u64,
                    free_bytes,
                    headroom_bps: headroom * 8.0,
                    score,
                })
            })
            .collect();
        out.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.host.cmp(&b.host)));
        Ok(out)
    }

    /// Admits a transfer on a path, or says when it could finish.
    pub fn reserve(&self, r: ReserveRequest) -> Result<Grant, Refusal> {
        let links = lock(&self.links);
        let cap = links.capacity(&r.from, &r.to);
        let used = links.used(&r.from, &r.to);
        drop(links);
        if cap <= 0.0 {
            return Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "unknown_path",
                format!(
                    "no capacity known from {:?} to {:?}: neither end reported a link rate",
                    r.from, r.to
                ),
            ));
        }
        let mut schedules = lock(&self.schedules);
        let s = schedules
            .entry((r.from.clone(), r.to.clone()))
            .or_insert_with(|| Schedule::new(cap));
        // Measured traffic that is not a reservation still takes its share.
        s.capacity = (cap - used).max(0.0);
        let g = s.admit(
            Want {
                bytes: r.bytes,
                earliest_ms: r.earliest_ms,
                deadline_ms: r.deadline_ms,
            },
            unix_ms(),
        );
        match &g {
            Ok(_) => {
                self.metrics.admits.inc();
            }
            Err(e) => {
                tracing::debug!(from = %r.from, to = %r.to, error = %e, "reservation refused");
            }
        }
        Ok(g?)
    }

    /// Sets a measured capacity for a path (bytes per second).
    pub fn set_capacity(&self, from: &str, to: &str, bytes_per_sec: f64) {
        lock(&self.links).set_capacity(from, to, bytes_per_sec);
    }

    pub fn links(&self) -> Vec<LinkView> {
        lock(&self.links).view()
    }

    /// Drops lapsed donors and updates the gauges.
    pub fn sweep(&self) -> usize {
        let gone = self.registry.sweep();
        if gone > 0 {
            self.metrics.expiries.inc_by(gone as u64);
            self.expired_seen.fetch_add(gone as u64, Ordering::Relaxed);
            tracing::info!(gone, "donor leases lapsed");
        }
        self.refresh_gauges();
        gone
    }

    /// The Prometheus text of `/metrics`, gauges refreshed first.
    pub(crate) fn metrics_text(&self) -> Result<String, std::fmt::Error> {
        self.refresh_gauges();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.metrics.registry)?;
        Ok(text)
    }

    fn refresh_gauges(&self) {
        if let Ok(t) = self.registry.table() {
            self.metrics.donors.set(t.len() as i64);
        }
    }

    pub(crate) fn refused(&self, r: &Refusal) {
        self.metrics
            .refusals
            .get_or_create(&ResultLabel { result: r.code })
            .inc();
    }

    /// Checks a POST's signature; `once` also refuses a replay.
    pub(crate) fn authorized(
        &self,
        path: &str,
        h: &HeaderMap,
        body: &[u8],
        once: bool,
    ) -> Result<(), Refusal> {
        let auth = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let checked = verify_admin(&self.secret, "POST", path, body, auth).and_then(|s| {
            if once {
                self.nonces.take(&s)
            } else {
                Ok(())
            }
        });
        checked.map_err(|why| {
            let (status, code) = match why {
                AdminRefusal::Replayed => (StatusCode::CONFLICT, "replayed"),
                AdminRefusal::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
                _ => (StatusCode::UNAUTHORIZED, "unauthorized"),
            };
            tracing::warn!(path, reason = %why, "request refused");
            Refusal::new(status, code, why)
        })
    }
}
