//! Domain values to Workload API messages.

use std::collections::HashMap;

use crate::bundle::TrustBundle;
use crate::proto::workload as pb;
use crate::svid::{JwtSvid, X509Svid};

/// One X.509-SVID message; `bundle` is the SVID's own trust domain's
/// X.509 bundle (concatenated DER).
pub fn x509_svid(svid: &X509Svid, hint: Option<&str>, bundle: &[u8]) -> pb::X509svid {
    pb::X509svid {
        spiffe_id: svid.spiffe_id.to_string(),
        x509_svid: svid.chain_der(),
        x509_svid_key: svid.key_pkcs8().to_vec(),
        bundle: bundle.to_vec(),
        hint: hint.unwrap_or_default().to_owned(),
    }
}

/// The serial numbers (lowercase hex) of the leaf certificates in a
/// response, in order; a leaf that does not parse is left out.
pub fn serials(response: &pb::X509svidResponse) -> Vec<String> {
    response
        .svids
        .iter()
        .filter_map(|svid| x509_parser::parse_x509_certificate(&svid.x509_svid).ok())
        .map(|(_, cert)| {
            cert.raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
        .collect()
}

/// One JWT-SVID message.
pub fn jwt_svid(svid: &JwtSvid) -> pb::Jwtsvid {
    pb::Jwtsvid {
        spiffe_id: svid.spiffe_id.to_string(),
        svid: svid.token.clone(),
        hint: svid.hint.clone().unwrap_or_default(),
    }
}

/// Bundles keyed by the SPIFFE ID of their trust domain, X.509 form.
pub fn x509_bundles<'a>(
    bundles: impl IntoIterator<Item = &'a TrustBundle>,
) -> HashMap<String, Vec<u8>> {
    bundles
        .into_iter()
        .map(|b| (b.trust_domain().id_string(), b.x509_der()))
        .collect()
}

/// Bundles keyed by the SPIFFE ID of their trust domain, JWKS form.
pub fn jwt_bundles<'a>(
    bundles: impl IntoIterator<Item = &'a TrustBundle>,
) -> HashMap<String, Vec<u8>> {
    bundles
        .into_iter()
        .map(|b| (b.trust_domain().id_string(), b.jwks_json()))
        .collect()
}
