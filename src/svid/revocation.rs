//! Revocation of process-bound X.509-SVIDs, published as CRLs.
//!
//! An entry with `process_bound = true` gives each process its own key and
//! certificate. When that process exits (its pidfd says so, event-driven),
//! the certificate's serial is revoked: stored first, so a restart keeps it,
//! then listed in a CRL signed by the CA that issued it. The CRLs ride in
//! the Workload API's `crl` fields, so TLS peers that check CRLs refuse the
//! dead process's certificate. A revocation is kept until the certificate
//! would have expired anyway.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::SvidIssuer;
use crate::attestation::Caller;
use crate::attestation::ProcessKey;
use crate::authority::CrlRequest;
use crate::store::RevokedX509;

/// CRLs are re-signed at least this often, and valid for twice as long.
const RESIGN_EVERY: Duration = Duration::from_secs(30 * 60);

/// The revocation state shared by the issuer and its loop.
#[derive(Debug)]
pub struct Revocations {
    watch_tx: mpsc::UnboundedSender<(ProcessKey, Caller)>,
    watched: Mutex<HashSet<ProcessKey>>,
    crls: watch::Sender<Arc<Vec<Vec<u8>>>>,
}

/// Processes to watch, waiting for the revocation loop.
#[derive(Debug)]
pub struct RevocationInbox(mpsc::UnboundedReceiver<(ProcessKey, Caller)>);

impl Revocations {
    /// The shared state, and the inbox its loop takes.
    pub(super) fn new() -> (Self, RevocationInbox) {
        let (watch_tx, watch_rx) = mpsc::unbounded_channel();
        let revocations = Self {
            watch_tx,
            watched: Mutex::default(),
            crls: watch::channel(Arc::new(Vec::new())).0,
        };
        (revocations, RevocationInbox(watch_rx))
    }

    fn watched(&self) -> MutexGuard<'_, HashSet<ProcessKey>> {
        self.watched.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Watches `process` for exit (once per process).
    pub fn watch(&self, process: ProcessKey, caller: &Caller) {
        if self.watched().insert(process) {
            let _ = self.watch_tx.send((process, caller.clone()));
        }
    }

    /// The CRLs in force.
    pub fn crls(&self) -> Arc<Vec<Vec<u8>>> {
        self.crls.borrow().clone()
    }
}

impl SvidIssuer {
    /// The revocation loop: revokes a process-bound SVID when its process
    /// exits, and keeps the CRLs signed and current.
    pub async fn run_revocations(self, inbox: RevocationInbox, cancel: CancellationToken) {
        let RevocationInbox(mut watches) = inbox;
        self.republish().await;
        let mut exits = FuturesUnordered::new();
        let mut resign = tokio::time::interval(RESIGN_EVERY);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                Some((process, caller)) = watches.recv() => {
                    exits.push(async move {
                        caller.exited().await;
                        process
                    });
                }
                Some(process) = exits.next() => {
                    self.revocations.watched().remove(&process);
                    self.revoke_process(process).await;
                }
                _ = resign.tick() => {
                    let store = self.store.clone();
                    let before = SystemTime::now();
                    let _ = tokio::task::spawn_blocking(move || store.prune_revoked_x509(before)).await;
                    self.republish().await;
                }
            }
        }
    }

    async fn revoke_process(&self, process: ProcessKey) {
        let svids = self.x509.take_process(process);
        if svids.is_empty() {
            return;
        }
        let now = SystemTime::now();
        for svid in &svids {
            let record = RevokedX509 {
                serial: svid.serial.clone(),
                ca_id: svid.ca_id.clone(),
                revoked_at: now,
                not_after: svid.not_after,
                reason: "process exited".into(),
            };
            let store = self.store.clone();
            match tokio::task::spawn_blocking(move || store.revoke_x509(&record)).await {
                Ok(Ok(_)) => {
                    crate::telemetry::metrics()
                        .revocations
                        .get_or_create(&crate::telemetry::metrics::Kind { kind: "x509" })
                        .inc();
                    tracing::info!(
                        serial = %svid.serial,
                        spiffe_id = %svid.spiffe_id,
                        pid = process.pid(),
                        "revoked the X.509-SVID of an exited process"
                    );
                }
                Ok(Err(error)) => {
                    tracing::error!(serial = %svid.serial, error = %crate::error::Chain(&error), "could not store a revocation")
                }
                Err(error) => {
                    tracing::error!(serial = %svid.serial, error = %crate::error::Chain(&error), "revocation job failed")
                }
            }
        }
        self.republish().await;
    }

    /// Signs one CRL per CA from the stored revocations and publishes them.
    async fn republish(&self) {
        let store = self.store.clone();
        let now = SystemTime::now();
        let revoked = match tokio::task::spawn_blocking(move || store.revoked_x509(now)).await {
            Ok(Ok(revoked)) => revoked,
            Ok(Err(error)) => {
                tracing::error!(error = %crate::error::Chain(&error), "could not read revocations; CRLs not updated");
                return;
            }
            Err(_) => return,
        };
        let mut by_ca: BTreeMap<String, Vec<(Vec<u8>, SystemTime)>> = BTreeMap::new();
        for r in revoked {
            if let Some(serial) = hex_bytes(&r.serial) {
                by_ca
                    .entry(r.ca_id)
                    .or_default()
                    .push((serial, r.revoked_at));
            }
        }
        let number = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut crls = Vec::with_capacity(by_ca.len());
        for (ca_id, revoked) in by_ca {
            let request = CrlRequest {
                ca_id,
                revoked,
                crl_number: number,
                next_update: now + 2 * RESIGN_EVERY,
            };
            let ca_id = request.ca_id.clone();
            match self.authority().sign_crl(request).await {
                Ok(Some(der)) => crls.push(der),
                Ok(None) => {}
                Err(error) => {
                    tracing::error!(%ca_id, error = %crate::error::Chain(&error), "could not sign a CRL")
                }
            }
        }
        self.revocations.crls.send_replace(Arc::new(crls));
        self.x509.touch();
    }
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}
