//! The HTTP endpoint for probes and scraping (`[http] listen`; off unless
//! configured): `GET /healthz` (the process answers), `GET /readyz` (200
//! when the agent is serving, 503 with the problems otherwise), `GET
//! /metrics` (OpenMetrics text). HTTP/1.1 only, GET only, no request body
//! read; loopback unless configured otherwise.
//!
//! What "serving" means is the daemon's to say: it hands in a [`Readiness`]
//! function (the same one the admin API's Health uses).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::metrics::metrics;

/// Bound on reading a request's headers: a slow client cannot hold a
/// connection open for free.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a whole connection (one request: no keep-alive), so a client
/// that never reads its answer cannot hold a slot either.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// The wait after a failed accept (out of file descriptors, say), instead
/// of spinning.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;

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
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            () = cancel.cancelled() => return,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
        };
        let (tcp, _) = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %crate::error::Chain(&error), "accepting an HTTP connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let readiness = readiness.clone();
        let cancel = cancel.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let service = service_fn(move |request| {
                let readiness = readiness.clone();
                async move {
                    // Readiness takes the store's lock: off the async workers.
                    let problems = if request.uri().path() == "/readyz" {
                        let readiness = readiness.clone();
                        tokio::task::spawn_blocking(move || readiness.problems())
                            .await
                            .unwrap_or_else(|e| vec![format!("the readiness check failed: {e}")])
                    } else {
                        Vec::new()
                    };
                    Ok::<_, Infallible>(answer(&request, &problems))
                }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false);
            let connection = builder.serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = &mut connection => {}
                () = tokio::time::sleep(CONNECTION_TIMEOUT) => {}
                () = cancel.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_TIMEOUT, connection).await;
                }
            }
        });
    }
}

/// The answer to `request`; `problems` is readiness (computed for
/// `/readyz` only).
fn answer<B>(request: &Request<B>, problems: &[String]) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = http::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, value);
        }
        response
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET only\n".into(),
        );
    }
    match request.uri().path() {
        "/healthz" => reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
        "/readyz" => {
            if problems.is_empty() {
                reply(
                    StatusCode::OK,
                    "text/plain; charset=utf-8",
                    "ready\n".into(),
                )
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    problems.iter().map(|p| format!("{p}\n")).collect(),
                )
            }
        }
        "/metrics" => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics().encode(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: /healthz, /readyz, /metrics\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn readyz_says_why_the_agent_is_not_serving() {
        let failing = vec!["the audit trail is failing".to_owned()];
        let response = answer(&get("/readyz"), &failing);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = format!("{:?}", response.body());
        assert!(body.contains("the audit trail is failing"), "{body}");
        // Liveness does not depend on readiness.
        assert_eq!(answer(&get("/healthz"), &failing).status(), StatusCode::OK);
    }
}
