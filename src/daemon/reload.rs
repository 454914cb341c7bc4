//! Config reload: SIGHUP or `tether reload` re-reads the config file and
//! the policy directory and applies what can change at runtime (entries,
//! federation, policies). Anything else, or a file that does not validate,
//! is refused with the reason and the running configuration stays.
//!
//! Policies also reload by themselves when their files change (the
//! watcher); both paths record a `policy-reload` audit event.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin_api::{ReloadOutcome, ReloadRequest};
use crate::audit::{AuditEvent, AuditLog, Decision, EventKind};
use crate::config::{Config, ConfigSource, ProcessEnv};
use crate::federation::Federation;
use crate::policy::{Policy, PolicySummary};
use crate::registration::Registry;

/// Owns reloads: one at a time, in arrival order.
#[derive(Debug)]
pub(super) struct Reloader {
    /// The configuration in force.
    pub running: Config,
    pub registry: Registry,
    pub federation: Federation,
    pub policy: Policy,
    pub audit: AuditLog,
}

impl Reloader {
    /// Serves reload requests from the admin API and SIGHUP until `cancel`.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<ReloadRequest>,
        cancel: CancellationToken,
    ) {
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP; reload only through `tether reload`");
                None
            }
        };
        loop {
            let reply = tokio::select! {
                () = cancel.cancelled() => return,
                Some(reply) = requests.recv() => Some(reply),
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    None
                }
            };
            let outcome = self.reload().await;
            match &outcome {
                Ok(o) => tracing::info!(
                    config_entries = o.config_entries,
                    federations = o.federations,
                    "configuration reloaded"
                ),
                Err(reason) => {
                    tracing::warn!(%reason, "reload refused; the running configuration stays")
                }
            }
            if let Some(reply) = reply {
                let _ = reply.send(outcome);
            }
        }
    }

    async fn reload(&mut self) -> Result<ReloadOutcome, String> {
        let path = match &self.running.source {
            ConfigSource::File(path) => Some(path.clone()),
            ConfigSource::Embedded => None,
        };
        let next = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || Config::load(path.as_deref(), &ProcessEnv))
                .await
                .map_err(|e| format!("reading the config: {e}"))?
                .map_err(|e| e.to_string())?
        };
        let unchanged = |what: &str, same: bool| {
            if same {
                Ok(())
            } else {
                Err(format!("{what} changed; that needs a restart"))
            }
        };
        unchanged(
            "trust_domain",
            next.trust_domain == self.running.trust_domain,
        )?;
        unchanged("socket_path", next.socket_path == self.running.socket_path)?;
        unchanged("data_dir", next.data_dir == self.running.data_dir)?;
        unchanged(
            "admin_socket_path",
            next.admin.socket_path == self.running.admin.socket_path,
        )?;
        unchanged("[audit]", next.audit == self.running.audit)?;

        if next.policy.dir != self.running.policy.dir {
            return Err("policy_dir changed; that needs a restart".into());
        }
        let policies = {
            let policy = self.policy.clone();
            tokio::task::spawn_blocking(move || policy.reload())
                .await
                .map_err(|e| format!("reloading policies: {e}"))?
                .map_err(|e| e.to_string())
        };
        record_policy_reload(&self.audit, policies.clone());
        policies.map_err(|e| format!("policies: {e}"))?;

        self.federation
            .replace(next.federation.clone())
            .map_err(|e| e.to_string())?;
        self.registry
            .replace_config(next.entries.clone(), self.federation.trust_domains())
            .await
            .map_err(|e| e.to_string())?;
        let outcome = ReloadOutcome {
            config_entries: next.entries.len(),
            federations: next.federation.len(),
        };
        self.running = next;
        Ok(outcome)
    }
}

/// Records a policy (re)load attempt: what is now in force, or why the
/// new files were refused. A record that cannot be written is logged; the
/// reload itself has already happened (or not) and cannot be undone.
pub(super) fn record_policy_reload(audit: &AuditLog, outcome: Result<PolicySummary, String>) {
    let event = match outcome {
        Ok(summary) => AuditEvent {
            reason: Some(format!(
                "{} policies from {} files in force",
                summary.policies, summary.files
            )),
            policy_ids: summary.ids,
            ..AuditEvent::new(EventKind::PolicyReload, Decision::Info)
        },
        Err(reason) => AuditEvent {
            reason: Some(format!("refused; the policies in force stay: {reason}")),
            ..AuditEvent::new(EventKind::PolicyReload, Decision::Deny)
        },
    };
    if let Err(error) = audit.record(event) {
        tracing::error!(%error, "the policy reload could not be audited");
    }
}
