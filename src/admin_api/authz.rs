//! Who may use the admin API: root, the user the agent runs as (who can
//! read its data dir anyway) and the configured uids, decided from the
//! kernel's peer credentials on every call (never from anything the caller
//! sends, and never from the socket's file mode alone). The fleet's server
//! guards its own admin socket with the same interceptor
//! ([`AdminAuthz::named`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use tonic::{Request, Status};

use crate::edge::status;
use crate::transport::PeerInfo;

/// The admin allow-list, as a tonic interceptor.
#[derive(Debug, Clone)]
pub struct AdminAuthz {
    uids: Arc<BTreeSet<u32>>,
    /// The API's name in refusals and logs.
    api: &'static str,
    /// Who is allowed, in words, for a refusal.
    allowed: &'static str,
}

impl AdminAuthz {
    /// Root, the agent's own effective uid, and `uids`.
    pub fn new(uids: &[u32]) -> Self {
        Self::named(
            uids,
            "admin API",
            "root, the agent's user and admin_uids only",
        )
    }

    /// Root, this process's effective uid and `uids`, for the API called
    /// `api`; a refusal says who is `allowed`.
    pub fn named(uids: &[u32], api: &'static str, allowed: &'static str) -> Self {
        let mut set: BTreeSet<u32> = uids.iter().copied().collect();
        set.insert(0);
        set.insert(nix::unistd::geteuid().as_raw());
        Self {
            uids: Arc::new(set),
            api,
            allowed,
        }
    }

    fn check(&self, peer: Option<&PeerInfo>) -> Result<(), Status> {
        let Some(PeerInfo {
            caller: Ok(caller), ..
        }) = peer
        else {
            return Err(status::denied(format!(
                "{}: the caller could not be identified",
                self.api
            )));
        };
        if self.uids.contains(&caller.uid()) {
            Ok(())
        } else {
            tracing::warn!(
                pid = caller.pid(),
                uid = caller.uid(),
                api = self.api,
                "admin call refused: uid not allowed"
            );
            Err(status::denied(format!(
                "{}: uid {} is not allowed ({})",
                self.api,
                caller.uid(),
                self.allowed
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
