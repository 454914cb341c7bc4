//! Why the link to the server could not be made, or a call failed.

use std::time::Duration;

use crate::authority::key_store::KeyStoreError;
use crate::bundle::BundleError;
use crate::mtls::MtlsError;

/// Why the link could not be made.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The bootstrap bundle could not be read.
    #[error("reading the bootstrap bundle {path}")]
    BootstrapRead {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: KeyStoreError,
    },
    /// A bundle (the bootstrap file's, or the server's) does not parse.
    #[error("the {what} is not a SPIFFE bundle of the trust domain")]
    Bundle {
        /// Which bundle.
        what: &'static str,
        /// The cause.
        #[source]
        source: BundleError,
    },
    /// The node's files in the data dir.
    #[error("the node's files in the data dir")]
    Files(#[from] KeyStoreError),
    /// The node must attest and has no token to do it with.
    #[error(
        "this node has no valid node SVID and no join token: create one on the server \
         (tether server token create --node NAME) and set server.join_token or TETHER_JOIN_TOKEN"
    )]
    NoJoinToken,
    /// The projected service account token could not be read.
    #[error("reading the service account token {path} (server.psat_path)")]
    Psat {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Making the node's key failed.
    #[error("making the node's key")]
    Key(#[source] rcgen::Error),
    /// A blocking job did not complete.
    #[error("a blocking job did not complete")]
    Job(#[from] tokio::task::JoinError),
    /// The server could not be reached.
    #[error("connecting to the tether server ({addresses})")]
    Connect {
        /// The addresses tried.
        addresses: String,
        /// The cause.
        #[source]
        source: MtlsError,
    },
    /// The server refused or failed a call.
    #[error("the tether server refused {what}")]
    Refused {
        /// What was asked.
        what: &'static str,
        /// Its answer.
        #[source]
        source: tonic::Status,
    },
    /// The server's answer is not what the protocol says.
    #[error("the tether server's answer to {what} is malformed: {detail}")]
    BadReply {
        /// What was asked.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The server's SVID or the node's could not be used for TLS.
    #[error("the node SVID cannot be used")]
    Identity(#[source] MtlsError),
    /// The first snapshot did not come in time.
    #[error("the tether server sent no entries within {0:?}")]
    NoSnapshot(Duration),
}
