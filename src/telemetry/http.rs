//! The HTTP endpoint for probes and scraping (`[http] listen`; off unless
//! configured): `GET /healthz` (the process answers), `GET /readyz` (200
//! when the agent is serving, 503 with the problems otherwise), `GET
//! /metrics` (OpenMetrics text). HTTP/1.1 only, GET only, no request body
//! read; loopback unless configured otherwise.
//!
//! What "serving" means is the daemon's to say: it hands in a [`Readiness`]
//! function (the same one the admin API's Health uses).

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::metrics::metrics;
use crate::web::{self, Limits, Routes, Tls, WebRequest, WebResponse};

/// `[http]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where to listen (`127.0.0.1:8080`); none: no HTTP endpoint.
    pub listen: Option<SocketAddr>,
}

/// The agent's problems right now (empty when it is serving), as the
/// daemon defines them. Cheap to clone.
#[derive(Clone)]
pub struct Readiness(Arc<dyn Fn() -> Vec<String> + Send + Sync>);

impl Readiness {
    /// Readiness as `check` computes it.
    pub fn new(check: impl Fn() -> Vec<String> + Send + Sync + 'static) -> Self {
        Self(Arc::new(check))
    }

    /// Why the agent is not serving; empty when it is.
    pub fn problems(&self) -> Vec<String> {
        (self.0)()
    }
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").finish_non_exhaustive()
    }
}

/// Serves until `cancel`. Each connection runs on `tracker`.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    tracker: TaskTracker,
    cancel: CancellationToken,
) {
    let limits = Limits {
        // GET only: no body is ever read.
        max_body: 0,
        ..Limits::default()
    };
    let routes = Arc::new(Probes { readiness });
    web::serve(listener, Tls::Plain, routes, limits, tracker, cancel).await;
}

/// The probe and metrics routes.
struct Probes {
    readiness: Readiness,
}

impl Routes for Probes {
    async fn answer(&self, request: WebRequest) -> WebResponse {
        // Readiness takes the store's lock: off the async workers.
        let problems = if request.path == "/readyz" {
            let readiness = self.readiness.clone();
            tokio::task::spawn_blocking(move || readiness.problems())
                .await
                .unwrap_or_else(|e| vec![format!("the readiness check failed: {e}")])
        } else {
            Vec::new()
        };
        answer(&request.method, &request.path, &problems)
    }
}

/// The answer to `method` on `path`; `problems` is readiness (computed for
/// `/readyz` only).
fn answer(method: &Method, path: &str, problems: &[String]) -> WebResponse {
    if method != Method::GET && method != Method::HEAD {
        return web::text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
    }
    match path {
        "/healthz" => web::text(StatusCode::OK, "ok\n"),
        "/readyz" if problems.is_empty() => web::text(StatusCode::OK, "ready\n"),
        "/readyz" => web::text(
            StatusCode::SERVICE_UNAVAILABLE,
            problems
                .iter()
                .map(|p| format!("{p}\n"))
                .collect::<String>(),
        ),
        "/metrics" => web::reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics().encode(),
        ),
        _ => web::text(
            StatusCode::NOT_FOUND,
            "not found: /healthz, /readyz, /metrics\n",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readyz_says_why_the_agent_is_not_serving() {
        let failing = vec!["the audit trail is failing".to_owned()];
        let response = answer(&Method::GET, "/readyz", &failing);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = format!("{:?}", response.body());
        assert!(body.contains("the audit trail is failing"), "{body}");
        // Liveness does not depend on readiness.
        assert_eq!(
            answer(&Method::GET, "/healthz", &failing).status(),
            StatusCode::OK
        );
    }
}
