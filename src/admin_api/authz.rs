//! Who may use the admin API: root, the user the agent runs as (who can
//! read its data dir anyway) and the configured uids, decided from the
//! kernel's peer credentials on every call (never from anything the caller
//! sends, and never from the socket's file mode alone).

use std::collections::BTreeSet;
use std::sync::Arc;

use tonic::{Request, Status};

use crate::edge::status;
use crate::transport::PeerInfo;

/// The admin allow-list, as a tonic interceptor.
#[derive(Debug, Clone)]
pub struct AdminAuthz {
    uids: Arc<BTreeSet<u32>>,
}

impl AdminAuthz {
    /// Root, the agent's own effective uid, and `uids`.
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
                "admin API: the caller could not be identified",
            ));
        };
        if self.uids.contains(&caller.uid()) {
            Ok(())
        } else {
            tracing::warn!(
                pid = caller.pid(),
                uid = caller.uid(),
                "admin API call refused: uid not in admin_uids"
            );
            Err(status::denied(format!(
                "admin API: uid {} is not allowed (root, the agent's user and admin_uids only)",
                caller.uid()
            )))
        }
    }
}

impl tonic::service::Interceptor for AdminAuthz {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.check(request.extensions().get::<PeerInfo>())?;
        Ok(request)
    }
}
