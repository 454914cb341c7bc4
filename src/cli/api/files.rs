//! The files `tether api fetch x509 --write DIR` writes (the SVIDs, their
//! keys and the bundles, as PEM), and the one way every CLI command writes
//! a file: atomically, with its mode from creation.

use std::fs::{DirBuilder, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use pem::{EncodeConfig, LineEnding, Pem};
use spiffe::TrustDomain;
use zeroize::Zeroizing;

use super::ApiError;
use super::report::{parse_certificates, trust_domain};
use crate::proto::workload as pb;

/// Writes the files of `--write DIR`, returning their paths in order.
pub(super) fn write_x509_files(
    dir: &Path,
    response: &mut pb::X509svidResponse,
) -> Result<Vec<PathBuf>, ApiError> {
    let write_error = |path: &Path| {
        let path = path.to_owned();
        move |source| ApiError::Write { path, source }
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(write_error(dir))?;
    let mut written = Vec::new();
    let mut write = |name: String, contents: &[u8], mode: u32| -> Result<(), ApiError> {
        let path = dir.join(name);
        write_atomically(&path, contents, mode).map_err(write_error(&path))?;
        written.push(path);
        Ok(())
    };
    for (i, svid) in response.svids.iter_mut().enumerate() {
        if svid.x509_svid_key.is_empty() {
            return Err(ApiError::IncompleteSvid {
                spiffe_id: svid.spiffe_id.clone(),
                missing: "a private key",
            });
        }
        write(
            format!("svid.{i}.pem"),
            certificates_pem(&svid.x509_svid).as_bytes(),
            0o644,
        )?;
        // The key moves into the PEM value and is wiped from there; the
        // base64 text is wiped as well.
        let key = Pem::new("PRIVATE KEY", std::mem::take(&mut svid.x509_svid_key));
        let key_pem = Zeroizing::new(pem::encode_config(&key, pem_config()));
        drop(Zeroizing::new(key.into_contents()));
        write(format!("svid.{i}.key"), key_pem.as_bytes(), 0o600)?;
        write(
            format!("bundle.{i}.pem"),
            certificates_pem(&svid.bundle).as_bytes(),
            0o644,
        )?;
    }
    let mut federated: Vec<(TrustDomain, &Vec<u8>)> = response
        .federated_bundles
        .iter()
        .map(|(key, der)| Ok((trust_domain(key)?, der)))
        .collect::<Result<_, ApiError>>()?;
    federated.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    for (trust_domain, der) in federated {
        // A validated trust domain name is [a-z0-9._-]+: safe as a file name.
        write(
            format!("federated_bundle.{}.pem", trust_domain.as_str()),
            certificates_pem(der).as_bytes(),
            0o644,
        )?;
    }
    Ok(written)
}

/// Concatenated DER certificates as PEM CERTIFICATE blocks, in order.
/// Only called on DER that `parse_certificates` accepted.
fn certificates_pem(der: &[u8]) -> String {
    let blocks: Vec<Pem> = match parse_certificates(der, String::new) {
        Ok(certs) => certs
            .iter()
            .map(|p| Pem::new("CERTIFICATE", p.der))
            .collect(),
        Err(_) => Vec::new(),
    };
    pem::encode_many_config(&blocks, pem_config())
}

fn pem_config() -> EncodeConfig {
    EncodeConfig::new().set_line_ending(LineEnding::LF)
}

/// Writes `contents` to `path` through a temporary file created with
/// `mode` in the same directory, then renamed over `path`: the file never
/// exists half-written, and a key is never readable by others, not even
/// between create and chmod.
pub(crate) fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let open = || {
        // create_new: O_EXCL, so a planted symlink is never followed.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
    };
    let mut file = match open() {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            // Left over from a run of ours that was killed midway.
            std::fs::remove_file(&tmp)?;
            open()?
        }
        other => other?,
    };
    let result = file
        .write_all(contents)
        .and_then(|()| file.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
