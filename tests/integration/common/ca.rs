//! A test CA (rcgen) that issues TLS server certificates: Web PKI ones for
//! `https_web`, or X.509-SVIDs for `https_spiffe` (a SPIFFE ID as the URI
//! SAN), as DER or as PEM files.

use std::path::Path;

/// A self-signed CA, P-256.
pub struct TestCa {
    key: rcgen::KeyPair,
    params: rcgen::CertificateParams,
    /// Its certificate (DER).
    pub der: Vec<u8>,
}

impl TestCa {
    /// A new CA.
    pub fn new() -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let der = params.self_signed(&key).expect("ca").der().to_vec();
        Self { key, params, der }
    }

    /// A server certificate naming `san` and its key (PKCS#8), both DER.
    pub fn server_cert(&self, san: rcgen::SanType) -> (Vec<u8>, Vec<u8>) {
        let (cert, key) = self.leaf(san);
        (cert.der().to_vec(), key.serialize_der())
    }

    /// A server certificate naming `san`, written as PEM
    /// `<name>-cert.pem` and `<name>-key.pem` (PKCS#8, 0600) in `dir`;
    /// returns their paths.
    pub fn write_server_cert(
        &self,
        san: rcgen::SanType,
        dir: &Path,
        name: &str,
    ) -> (String, String) {
        use std::os::unix::fs::PermissionsExt as _;
        let (cert, key) = self.leaf(san);
        let (cert_path, key_path) = (
            dir.join(format!("{name}-cert.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&cert_path, cert.pem()).expect("write the certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write the key");
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        (
            cert_path.display().to_string(),
            key_path.display().to_string(),
        )
    }

    /// The CA key's public point (uncompressed SEC1: `04 || x || y`).
    pub fn public_point(&self) -> Vec<u8> {
        self.key.public_key_raw().to_vec()
    }

    /// The CA certificate as PEM.
    pub fn pem(&self) -> String {
        pem::encode(&pem::Pem::new("CERTIFICATE", self.der.clone()))
    }

    /// The CA certificate as the PEM file `name` in `dir`; returns its path.
    pub fn write_pem(&self, dir: &Path, name: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, self.pem()).expect("write the CA");
        path.display().to_string()
    }

    fn leaf(&self, san: rcgen::SanType) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![san];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).expect("leaf");
        (cert, key)
    }
}

/// A SPIFFE ID as a URI SAN.
pub fn spiffe_san(id: &str) -> rcgen::SanType {
    rcgen::SanType::URI(rcgen::string::Ia5String::try_from(id).expect("an IA5 URI"))
}

/// 127.0.0.1 as an IP SAN.
pub fn loopback_san() -> rcgen::SanType {
    rcgen::SanType::IpAddress([127, 0, 0, 1].into())
}
