//! A blocking client of the placement service, for the command line, donors' heartbeats and
//! borrowers. Every POST is signed with the cluster's shared secret.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::http::DonorView;
use crate::registry::{DonorReport, Heartbeat};
use crate::reserve::Grant;
use crate::service::{
    PlaceRequest, Placement, RankRequest, Ranked, Register, ReserveRequest, Traffic,
};

/// Why a call to the service failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The service answered with a refusal (`code` is its stable name, e.g. `full`).
    #[error("{status} {code}: {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
        body: serde_json::Value,
    },
    #[error("placement service at {url} unreachable: {why}")]
    Unreachable { url: String, why: String },
    #[error("unreadable answer from the placement service: {0}")]
    Decode(String),
}

impl ClientError {
    /// The refusal's code, if the service answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// One placement service, one shared secret.
#[derive(Clone)]
pub struct PlaceClient {
    base: String,
    secret: Vec<u8>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for PlaceClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlaceClient")
            .field("base", &self.base)
            .finish()
    }
}

impl PlaceClient {
    /// `url` like `http://10.0.0.5:7460` (a bare `host:port` gets `http://`).
    pub fn new(url: &str, secret: Vec<u8>, timeout: Duration) -> PlaceClient {
        let base = if url.contains("://") {
            url.trim_end_matches('/').to_owned()
        } else {
            format!("http://{}", url.trim_end_matches('/'))
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        PlaceClient {
            base,
            secret,
            agent,
        }
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn answer<O: DeserializeOwned>(
        &self,
        url: &str,
        r: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<O, ClientError> {
        let mut resp = r.map_err(|e| ClientError::Unreachable {
            url: url.to_owned(),
            why: e.to_string(),
        })?;
        let status = resp.status();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Unreachable {
                url: url.to_owned(),
                why: e.to_string(),
            })?;
        if !status.is_success() {
            let body: serde_json::Value =
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text.clone()));
            return Err(ClientError::Refused {
                status: status.as_u16(),
                code: body["code"].as_str().unwrap_or("unknown").to_owned(),
                message: body["message"].as_str().unwrap_or(&text).to_owned(),
                body,
            });
        }
        serde_json::from_str(&text).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// A signed POST of `body` to `path`.
    pub fn post<T: Serialize, O: DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<O, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Decode(e.to_string()))?;
        let auth = rmem_wire::auth::admin_authorization(&self.secret, "POST", path, &body);
        let url = format!("{}{path}", self.base);
        let r = self
            .agent
            .post(&url)
            .header("Authorization", &auth)
            .header("Content-Type", "application/json")
            .send(&body[..]);
        self.answer(&url, r)
    }

    pub fn get<O: DeserializeOwned>(&self, path: &str) -> Result<O, ClientError> {
        let url = format!("{}{path}", self.base);
        let r = self.agent.get(&url).call();
        self.answer(&url, r)
    }

    pub fn register(&self, donor: DonorReport, lease: Duration) -> Result<(), ClientError> {
        let _: serde_json::Value = self.post(
            "/register",
            &Register {
                donor,
                lease_ms: lease.as_millis() as u64,
            },
        )?;
        Ok(())
    }

    pub fn heartbeat(&self, hb: &Heartbeat) -> Result<(), ClientError> {
        let _: serde_json::Value = self.post("/heartbeat", hb)?;
        Ok(())
    }

    pub fn traffic(&self, t: &Traffic) -> Result<(), ClientError> {
        let _: serde_json::Value = self.post("/traffic", t)?;
        Ok(())
    }

    pub fn place(&self, req: &PlaceRequest) -> Result<Placement, ClientError> {
        self.post("/place", req)
    }

    pub fn rank(&self, req: &RankRequest) -> Result<Vec<Ranked>, ClientError> {
        self.post("/rank", req)
    }

    pub fn reserve(&self, req: &ReserveRequest) -> Result<Grant, ClientError> {
        self.post("/reserve", req)
    }

    /// The live donors, and whether the service's view is stale.
    pub fn donors(&self) -> Result<(Vec<DonorView>, bool), ClientError> {
        let v: serde_json::Value = self.get("/donors")?;
        let stale = v["stale"].as_bool().unwrap_or(false);
        let d = serde_json::from_value(v["donors"].clone())
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        Ok((d, stale))
    }
}
