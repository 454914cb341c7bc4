//! The request body (RFC 7662 section 2.1): an
//! `application/x-www-form-urlencoded` form with `token` (required) and
//! `token_type_hint` (optional, ignored: the server finds the kind on its
//! own, as the RFC allows). Other parameters are ignored (extensions), but
//! none may appear twice (RFC 6749 section 3.1).

use http::HeaderMap;
use http::header::CONTENT_TYPE;

use crate::svid::jwt::MAX_TOKEN_LEN;

/// The one media type the endpoint reads.
pub const FORM_MEDIA_TYPE: &str = "application/x-www-form-urlencoded";
/// Most parameters read from one body.
const MAX_PARAMETERS: usize = 16;

/// What the caller asked about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntrospectionRequest {
    /// The token, as sent (at most [`MAX_TOKEN_LEN`] bytes).
    pub token: String,
}

/// Why a request's body was refused. The messages are safe to return.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    /// No `Content-Type`, or another one.
    #[error("the body must be {FORM_MEDIA_TYPE}")]
    MediaType,
    /// No `token`, or an empty one.
    #[error("token is required")]
    MissingToken,
    /// A parameter appears twice.
    #[error("parameter {0:?} appears more than once")]
    Repeated(&'static str),
    /// More parameters than a form may have (16).
    #[error("more than {MAX_PARAMETERS} parameters")]
    TooManyParameters,
    /// The token is longer than [`MAX_TOKEN_LEN`].
    #[error("token is {0} bytes; the limit is {MAX_TOKEN_LEN}")]
    TokenTooLong(usize),
}

/// Checks that `headers` declare a form body (parameters such as
/// `charset` are allowed; the type is compared without case).
pub fn check_media_type(headers: &HeaderMap) -> Result<(), FormError> {
    let value = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .ok_or(FormError::MediaType)?;
    let essence = value.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case(FORM_MEDIA_TYPE) {
        Ok(())
    } else {
        Err(FormError::MediaType)
    }
}

/// Parses a form `body` (already bounded by the listener) into the request.
pub fn parse(body: &[u8]) -> Result<IntrospectionRequest, FormError> {
    let mut token = None;
    let mut hint_seen = false;
    for (count, (name, value)) in form_urlencoded::parse(body).enumerate() {
        if count >= MAX_PARAMETERS {
            return Err(FormError::TooManyParameters);
        }
        match name.as_ref() {
            "token" => {
                if token.is_some() {
                    return Err(FormError::Repeated("token"));
                }
                token = Some(value.into_owned());
            }
            "token_type_hint" => {
                if hint_seen {
                    return Err(FormError::Repeated("token_type_hint"));
                }
                hint_seen = true;
            }
            _ => {}
        }
    }
    let token = token
        .filter(|t| !t.is_empty())
        .ok_or(FormError::MissingToken)?;
    if token.len() > MAX_TOKEN_LEN {
        return Err(FormError::TokenTooLong(token.len()));
    }
    Ok(IntrospectionRequest { token })
}
