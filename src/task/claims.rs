//! The task token: a JWT-SVID (any SPIFFE library validates it with the
//! normal bundle) with claims named after the standards that define them.
//!
//! | claim | meaning | from |
//! | --- | --- | --- |
//! | `iss` | the `[oidc] issuer` when configured (`https://oidc.example.org`), else the trust domain (`spiffe://example.org`); always the trust domain with `act` | RFC 7519 |
//! | `sub` | the owning workload's SPIFFE ID, unchanged by exchange | JWT-SVID |
//! | `aud` | exactly one audience (a string, never an array) | JWT-SVID, RFC 8707 |
//! | `exp`, `iat`, `nbf` | validity; `exp` never past the task deadline | RFC 7519 |
//! | `jti` | unique per token | RFC 7519 |
//! | `txn` | the task id, the same in every token of the task | Transaction Tokens |
//! | `scope` | the allowed tools, space-separated; only ever narrows | RFC 8693 |
//! | `tctx` | the task context fixed at begin: `ver`, `intent`, `tools`, `deadline` | Transaction Tokens |
//! | `rctx` | the attested requester: `authn`, `pid`, `pid_start`, `uid`, `exe_sha256` | Transaction Tokens |
//! | `act` | after an exchange, the actor chain, newest actor outermost | RFC 8693 |
//! | `cnf` | `{"x5t#S256": ...}` when bound to an X.509-SVID | RFC 7800, RFC 8705 |

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// Version of the `tctx` schema this build writes and understands.
pub const TCTX_VERSION: u32 = 1;
/// Deepest actor chain accepted (each exchange adds one).
pub const MAX_ACTOR_DEPTH: usize = 8;

/// Every claim of a task token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskClaims {
    /// The issuing trust domain, as a SPIFFE ID.
    pub iss: String,
    /// The owning workload.
    pub sub: String,
    /// The one audience.
    pub aud: String,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
    /// Issue time.
    pub iat: u64,
    /// Not before.
    pub nbf: u64,
    /// Unique token id.
    pub jti: String,
    /// The task id.
    pub txn: String,
    /// Allowed tools, space-separated.
    pub scope: String,
    /// Task context, fixed at begin.
    pub tctx: TaskContext,
    /// The attested requester.
    pub rctx: RequesterContext,
    /// The actor chain (after an exchange).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// Key binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// `tctx`: what the task was begun for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskContext {
    /// Schema version ([`TCTX_VERSION`]).
    pub ver: u32,
    /// The stated intent.
    pub intent: String,
    /// The tools granted at begin.
    pub tools: Vec<String>,
    /// The task deadline (seconds since the epoch).
    pub deadline: u64,
}

/// `rctx`: who asked, from kernel facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequesterContext {
    /// How the requester was authenticated.
    pub authn: String,
    /// Its pid.
    pub pid: i32,
    /// Its start time (clock ticks since boot): pid + start time name one process.
    pub pid_start: u64,
    /// Its uid.
    pub uid: u32,
    /// SHA-256 of its executable, when attested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe_sha256: Option<String>,
}

/// `act`: one actor, and the one before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's SPIFFE ID.
    pub sub: String,
    /// The previous actor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

/// `cnf`: the key the token is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// base64url SHA-256 of the DER certificate (RFC 8705).
    #[serde(rename = "x5t#S256")]
    pub x5t_s256: String,
}

// === impl TaskClaims ===

impl TaskClaims {
    /// The tools in `scope`.
    pub fn tools(&self) -> impl Iterator<Item = &str> {
        self.scope.split(' ').filter(|t| !t.is_empty())
    }

    /// True when `tool` is allowed.
    pub fn allows(&self, tool: &str) -> bool {
        self.tools().any(|t| t == tool)
    }

    /// The actor chain, newest first.
    pub fn actors(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut next = self.act.as_ref();
        while let Some(actor) = next {
            out.push(actor.sub.clone());
            next = actor.act.as_deref();
        }
        out
    }
}

/// The `x5t#S256` thumbprint of a DER certificate.
pub fn thumbprint(cert_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(digest::digest(&digest::SHA256, cert_der))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TaskClaims {
        TaskClaims {
            iss: "spiffe://example.org".into(),
            sub: "spiffe://example.org/agent".into(),
            aud: "spiffe://example.org/mcp/jira".into(),
            exp: 2,
            iat: 1,
            nbf: 1,
            jti: "j".into(),
            txn: "t".into(),
            scope: "jira.search jira.read".into(),
            tctx: TaskContext {
                ver: TCTX_VERSION,
                intent: "summarise".into(),
                tools: vec!["jira.search".into(), "jira.read".into()],
                deadline: 3,
            },
            rctx: RequesterContext {
                authn: "unix-peercred".into(),
                pid: 1,
                pid_start: 2,
                uid: 3,
                exe_sha256: None,
            },
            act: Some(Actor {
                sub: "spiffe://example.org/mcp/jira".into(),
                act: Some(Box::new(Actor {
                    sub: "spiffe://example.org/first".into(),
                    act: None,
                })),
            }),
            cnf: Some(Confirmation {
                x5t_s256: thumbprint(b"cert"),
            }),
        }
    }

    #[test]
    fn claims_use_the_standard_names() {
        let json = serde_json::to_value(claims()).unwrap();
        for name in [
            "iss", "sub", "aud", "exp", "iat", "nbf", "jti", "txn", "scope", "tctx", "rctx", "act",
            "cnf",
        ] {
            assert!(json.get(name).is_some(), "{name}");
        }
        assert!(json["aud"].is_string(), "exactly one audience, as a string");
        assert!(json["cnf"].get("x5t#S256").is_some());
        assert_eq!(json["act"]["act"]["sub"], "spiffe://example.org/first");
        let back: TaskClaims = serde_json::from_value(json).unwrap();
        assert_eq!(back, claims());
    }

    #[test]
    fn scope_and_actors() {
        let c = claims();
        assert!(c.allows("jira.read"));
        assert!(!c.allows("jira"));
        assert_eq!(
            c.actors(),
            [
                "spiffe://example.org/mcp/jira",
                "spiffe://example.org/first"
            ]
        );
    }
}
