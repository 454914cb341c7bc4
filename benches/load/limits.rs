//! The limits of this machine, measured in-process on all cores in the same
//! run as the load: ES256 sign and verify, P-256 key generation plus X.509
//! signing. Each operation's throughput is read against the one it is
//! bound by.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::AUDIENCE;

/// Operations per second the machine manages in-process, on all cores.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) sign: f64,
    pub(crate) verify: f64,
    pub(crate) keygen_x509: f64,
}

pub(crate) fn measure_limits(threads: usize, each: Duration) -> Limits {
    let key = rcgen::KeyPair::generate().unwrap();
    let encoding = jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der());
    let decoding = jsonwebtoken::DecodingKey::from_ec_der(key.public_key_raw());
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    let claims = serde_json::json!({
        "sub": "spiffe://bench.local/agent", "aud": AUDIENCE, "exp": 4_102_444_800u64,
        "iat": 1_700_000_000u64, "jti": "0123456789abcdef",
    });
    let token = jsonwebtoken::encode(&header, &claims, &encoding).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&[AUDIENCE]);

    let sign = per_second(threads, each, || {
        jsonwebtoken::encode(&header, &claims, &encoding).unwrap();
    });
    let verify = per_second(threads, each, || {
        jsonwebtoken::decode::<serde_json::Value>(&token, &decoding, &validation).unwrap();
    });
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = Arc::new(rcgen::Issuer::new(ca_params, ca_key));
    let keygen_x509 = per_second(threads, each, || {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://bench.local/agent".try_into().unwrap(),
        )];
        params.signed_by(&key, &issuer).unwrap();
    });
    Limits {
        sign,
        verify,
        keygen_x509,
    }
}

/// How many times per second `threads` threads run `f`, together.
pub(crate) fn per_second(threads: usize, each: Duration, f: impl Fn() + Sync) -> f64 {
    let started = Instant::now();
    let total: u64 = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut n = 0u64;
                    while started.elapsed() < each {
                        f();
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    total as f64 / started.elapsed().as_secs_f64()
}
