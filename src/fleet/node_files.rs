//! The node's own files in `data_dir/node/` (0700): its SVID chain
//! (`svid.der`, the DER certificates each behind a 4-byte length), its key
//! (`key.der`, PKCS#8, 0600) and the last bundle the server sent
//! (`bundle.json`). A restart reuses them: no new join token, and the
//! server is verified with the bundle it last sent. None of these keys is
//! in the trust bundle: the node key is certified, not trusted.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::authority::key_store::{self, KeyStoreError};

/// Most certificates in a stored chain, and the largest one.
const MAX_CHAIN: usize = 8;
const MAX_CERT_LEN: usize = 16 * 1024;

/// The node's files.
#[derive(Debug, Clone)]
pub(super) struct NodeFiles {
    dir: PathBuf,
}

/// A stored node SVID.
pub(super) struct StoredSvid {
    pub(super) chain: Vec<Vec<u8>>,
    pub(super) key: Zeroizing<Vec<u8>>,
}

impl NodeFiles {
    pub(super) fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("node"),
        }
    }

    /// The stored SVID, if any; a damaged chain file is an error.
    pub(super) fn load_svid(&self) -> Result<Option<StoredSvid>, KeyStoreError> {
        key_store::ensure_private_dir(&self.dir)?;
        let Some(bytes) = key_store::read_public(&self.dir.join("svid.der"))? else {
            return Ok(None);
        };
        let chain = decode_chain(&bytes).ok_or_else(|| KeyStoreError::Io {
            path: self.dir.join("svid.der"),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "damaged chain file"),
        })?;
        let key = key_store::read_secret(&self.dir.join("key.der"))?;
        Ok(Some(StoredSvid { chain, key }))
    }

    /// Stores a new SVID: the key first, then the chain (a crash between
    /// leaves a chain that does not match the key: refused at the next
    /// start's handshake, and the node attests again).
    pub(super) fn save_svid(&self, chain: &[Vec<u8>], key: &[u8]) -> Result<(), KeyStoreError> {
        key_store::ensure_private_dir(&self.dir)?;
        key_store::write_secret(&self.dir.join("key.der"), key)?;
        key_store::write_public(&self.dir.join("svid.der"), &encode_chain(chain))
    }

    /// The last bundle the server sent (SPIFFE JSON), if any.
    pub(super) fn load_bundle(&self) -> Result<Option<Vec<u8>>, KeyStoreError> {
        key_store::read_public(&self.dir.join("bundle.json"))
    }

    /// Keeps the bundle the server sent.
    pub(super) fn save_bundle(&self, json: &str) -> Result<(), KeyStoreError> {
        key_store::ensure_private_dir(&self.dir)?;
        key_store::write_public(&self.dir.join("bundle.json"), json.as_bytes())
    }
}

fn encode_chain(chain: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for cert in chain {
        out.extend_from_slice(&u32::try_from(cert.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(cert);
    }
    out
}

fn decode_chain(mut bytes: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut chain = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if len == 0 || len > MAX_CERT_LEN || chain.len() == MAX_CHAIN {
            return None;
        }
        let (cert, rest) = rest.split_at_checked(len)?;
        chain.push(cert.to_vec());
        bytes = rest;
    }
    (!chain.is_empty()).then_some(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_reads_back_and_a_damaged_one_is_refused() {
        let chain = vec![vec![1u8; 300], vec![2u8; 10]];
        let bytes = encode_chain(&chain);
        assert_eq!(decode_chain(&bytes), Some(chain));
        assert_eq!(decode_chain(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode_chain(&[]), None);
        assert_eq!(decode_chain(&[0, 0, 0, 0]), None);
    }
}
