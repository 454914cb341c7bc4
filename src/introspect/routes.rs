//! `POST /introspect` on the HTTP kit ([`crate::web`]): the caller from its
//! verified client certificate, its rate, the form, the backend, the
//! audit record and the answer.
//!
//! Statuses: 404 for another path, 405 (with `Allow: POST`) for another
//! method, 401 without a client SPIFFE ID (the listener requires a client
//! certificate, so only a certificate without one gets here), 429 (with
//! `Retry-After`) over the caller's rate, 415 for another media type, 400
//! (`invalid_request`, RFC 6749 section 5.2) for a bad form, 413 (the kit)
//! for a body over its limit, else 200 with the answer. Every answer is
//! `Cache-Control: no-store`.

use http::header::{ALLOW, CACHE_CONTROL, HeaderValue, PRAGMA, RETRY_AFTER};
use http::{Method, StatusCode};
use serde_json::json;
use spiffe::SpiffeId;

use super::form::{self, FormError};
use super::rate::{self, CallerRates};
use super::{Inactive, IntrospectionConfig, Introspector, ValidClaims, answer_json};
use crate::audit::{AuditEvent, AuditLog, EventKind, Outcome};
use crate::error::Chain;
use crate::mtls;
use crate::web::{self, WebRequest, WebResponse};

/// The endpoint's one path.
pub const INTROSPECT_PATH: &str = "/introspect";

/// The introspection endpoint over a backend `I`.
#[derive(Debug)]
pub struct IntrospectionRoutes<I> {
    backend: I,
    rates: CallerRates,
    audit: AuditLog,
}

// === impl IntrospectionRoutes ===

impl<I: Introspector> IntrospectionRoutes<I> {
    /// The endpoint deciding with `backend`, each caller bounded as
    /// `config` says, recording to `audit`.
    pub fn new(backend: I, config: &IntrospectionConfig, audit: AuditLog) -> Self {
        Self {
            backend,
            rates: CallerRates::new(config.requests_per_second, config.burst),
            audit,
        }
    }

    /// Introspects for `caller` and records it.
    async fn introspect(&self, caller: &SpiffeId, token: &str) -> WebResponse {
        let outcome = self.backend.introspect(token, caller).await;
        crate::telemetry::metrics().validated("introspection", outcome.is_ok());
        self.record(caller, &outcome);
        no_store(web::json(StatusCode::OK, &answer_json(&outcome)))
    }

    /// One `validate` record: the caller (as the audience asked for), the
    /// token's `sub`, `jti` and `txn` when it was active (or the task when
    /// a verified task token was not), and why it was not.
    fn record(&self, caller: &SpiffeId, outcome: &Result<ValidClaims, Inactive>) {
        let mut event = AuditEvent {
            audience: Some(caller.to_string()),
            reason: Some("introspection".into()),
            ..AuditEvent::new(EventKind::Validate, Outcome::Allow)
        };
        match outcome {
            Ok(valid) => {
                event.spiffe_id = Some(valid.subject.to_string());
                event.token_id = valid.jti().map(str::to_owned);
                event.task_id = valid.txn().map(str::to_owned);
            }
            Err(inactive) => {
                event.decision = Outcome::Deny;
                event.reason = Some(format!("introspection: {}", inactive.reason));
                event.task_id.clone_from(&inactive.task_id);
            }
        }
        if let Err(error) = self.audit.record(event) {
            tracing::warn!(error = %Chain(&error), "could not record an introspection");
        }
    }
}

impl<I: Introspector> web::Routes for IntrospectionRoutes<I> {
    async fn answer(&self, request: WebRequest) -> WebResponse {
        if request.path != INTROSPECT_PATH {
            return web::text(StatusCode::NOT_FOUND, "not found\n");
        }
        if request.method != Method::POST {
            let mut response = web::text(
                StatusCode::METHOD_NOT_ALLOWED,
                "introspection is POST only\n",
            );
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("POST"));
            return response;
        }
        let caller = match mtls::leaf_spiffe_id(&request.peer_certificates) {
            Ok(caller) => caller,
            Err(error) => {
                tracing::debug!(error = %Chain(&error), peer = %request.remote_addr, "introspection without a client SPIFFE ID");
                return error_answer(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "a client certificate with a SPIFFE ID is required",
                );
            }
        };
        if let Err(wait) = self
            .rates
            .admit(&caller.to_string(), tokio::time::Instant::now())
        {
            let mut response = error_answer(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many introspections from this client; retry later",
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(rate::retry_after_secs(wait)));
            return response;
        }
        if let Err(error) = form::check_media_type(&request.headers) {
            return error_answer(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request",
                &error.to_string(),
            );
        }
        match form::parse(&request.body) {
            Ok(asked) => self.introspect(&caller, &asked.token).await,
            Err(error) => bad_form(&error),
        }
    }
}

fn bad_form(error: &FormError) -> WebResponse {
    error_answer(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        &error.to_string(),
    )
}

/// An OAuth error answer (`error`, `error_description`).
fn error_answer(status: StatusCode, error: &str, description: &str) -> WebResponse {
    no_store(web::json(
        status,
        &json!({ "error": error, "error_description": description }),
    ))
}

/// Marks `response` as not to be cached (RFC 7662 answers describe a
/// token now).
fn no_store(mut response: WebResponse) -> WebResponse {
    let headers = response.headers_mut();
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(PRAGMA, HeaderValue::from_static("no-cache"));
    response
}
