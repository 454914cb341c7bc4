//! The answer's JSON (RFC 7662 section 2.2).
//!
//! Inactive: `{"active": false}` and nothing else. Active: `active`,
//! `token_type` (`Bearer`: both kinds are presented as bearer tokens; a
//! bound one is checked by the relying party against `cnf`, RFC 8705),
//! `token_kind` (`jwt-svid` or `task`, tether's own member), and the
//! token's `sub`, `aud` (always an array), `exp`, `iat`, `nbf`, `iss`,
//! `jti` when present; for a task token also `txn`, `scope` (the tools,
//! space separated), `act` (the actor chain), `cnf` (the bound
//! certificate's `x5t#S256`) and `tctx` (intent, tools and deadline fixed
//! at begin). The requester context (`rctx`: pid, uid, executable hash on
//! the owner's node) is left out: it describes the owner's host, not the
//! grant.

use serde_json::{Map, Value};

use super::{Inactive, TokenKind, ValidClaims};

/// `token_type` of every active answer.
pub const TOKEN_TYPE: &str = "Bearer";

/// Claims of every token copied into an active answer.
const COMMON_CLAIMS: [&str; 7] = ["sub", "aud", "exp", "iat", "nbf", "iss", "jti"];
/// Claims of task tokens copied besides.
const TASK_CLAIMS: [&str; 5] = ["txn", "scope", "act", "cnf", "tctx"];

/// The answer for `outcome`.
pub fn answer_json(outcome: &Result<ValidClaims, Inactive>) -> Value {
    let mut out = Map::new();
    let Ok(valid) = outcome else {
        out.insert("active".into(), false.into());
        return Value::Object(out);
    };
    out.insert("active".into(), true.into());
    out.insert("token_type".into(), TOKEN_TYPE.into());
    out.insert("token_kind".into(), valid.kind.as_str().into());
    let task = match valid.kind {
        TokenKind::Task => &TASK_CLAIMS[..],
        TokenKind::JwtSvid => &[],
    };
    for name in COMMON_CLAIMS.iter().chain(task) {
        if let Some(value) = valid.claims.get(*name) {
            let value = match (*name, value) {
                ("aud", Value::String(one)) => Value::Array(vec![one.clone().into()]),
                _ => value.clone(),
            };
            out.insert((*name).into(), value);
        }
    }
    Value::Object(out)
}
