//! Who may call the server's admin API: root, the user the server runs as
//! (who can read its data dir anyway) and the uids it is given, decided
//! from the kernel's peer credentials on every call, never from anything
//! the caller sends nor from the socket's file mode alone.

use std::collections::BTreeSet;
use std::sync::Arc;

use tonic::{Request, Status};

use crate::edge::status;
use crate::transport::PeerInfo;

/// The server admin allow-list, as a tonic interceptor.
#[derive(Debug, Clone)]
pub struct ServerAdminAuthz {
    uids: Arc<BTreeSet<u32>>,
}

impl ServerAdminAuthz {
    /// Root, the server's own effective uid, and `uids`.
    pub fn new(uids: &[u32]) -> Self {
        let mut allowed: BTreeSet<u32> = uids.iter().copied().collect();
        allowed.insert(0);
        allowed.insert(nix::unistd::geteuid().as_raw());
        Self {
            uids: Arc::new(allowed),
        }
    }

    fn check(&self, peer: Option<&PeerInfo>) -> Result<(), Status> {
        let Some(PeerInfo {
            caller: Ok(caller), ..
        }) = peer
        else {
            return Err(status::denied(
                "server admin API: the caller could not be identified",
            ));
        };
        if self.uids.contains(&caller.uid()) {
            return Ok(());
        }
        tracing::warn!(
            pid = caller.pid(),
            uid = caller.uid(),
            "server admin API call refused: uid not allowed"
        );
        Err(status::denied(format!(
            "server admin API: uid {} is not allowed (root and the server's user only)",
            caller.uid()
        )))
    }
}

impl tonic::service::Interceptor for ServerAdminAuthz {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.extensions().get::<PeerInfo>())?;
        Ok(request)
    }
}
