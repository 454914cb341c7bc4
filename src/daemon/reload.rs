//! Config reload: SIGHUP or `tether reload` re-reads the config file and
//! the policy directory and applies what can change at runtime (entries,
//! federation, policies), all or nothing: everything is read and validated
//! first (the file, the policy files, the federated bundles, the entries),
//! and only then applied, so a refused reload changes nothing and says
//! why. Keys that only a restart applies (`Config::needs_restart`) are not
//! applied and are named in the answer; the configuration in force keeps
//! their running values.
//!
//! Policies also reload by themselves when their files change (the
//! watcher); both paths record a `policy-reload` audit event.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin_api::{ReloadOutcome, ReloadRequest};
use crate::audit::{AuditEvent, AuditLog, EventKind, Outcome};
use crate::config::{Config, ConfigSource, ProcessEnv};
use crate::error::{Chain, chain};
use crate::federation::Federation;
use crate::policy::{Policy, PolicySummary};
use crate::registration::{Registry, check_config_duplicates};

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
                tracing::warn!(error = %Chain(&error), "cannot listen for SIGHUP; reload only through `tether reload`");
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
                    needs_restart = ?o.needs_restart,
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
                .map_err(|e| format!("reading the config: {}", Chain(&e)))?
                .map_err(|e| chain(&e))?
        };
        let needs_restart = self.running.needs_restart(&next);

        // Everything read and checked before anything is applied.
        let prepared_policies = {
            let policy = self.policy.clone();
            tokio::task::spawn_blocking(move || policy.prepare())
                .await
                .map_err(|e| format!("reloading policies: {}", Chain(&e)))?
        };
        let prepared_policies = match prepared_policies {
            Ok(prepared) => prepared,
            Err(error) => {
                record_policy_reload(&self.audit, Err(chain(&error)));
                return Err(format!("policies: {}", Chain(&error)));
            }
        };
        let prepared_federation = self
            .federation
            .prepare(next.federation.clone())
            .map_err(|e| chain(&e))?;
        check_config_duplicates(&next.entries).map_err(|e| chain(&e))?;

        // Applied: the entries first, the one step that can still refuse
        // (their changes must be recorded); then what cannot fail.
        self.registry
            .replace_config(next.entries.clone(), prepared_federation.trust_domains())
            .await
            .map_err(|e| chain(&e))?;
        self.federation.apply(prepared_federation);
        let summary = self.policy.install_prepared(prepared_policies);
        record_policy_reload(&self.audit, Ok(summary));
        if !needs_restart.is_empty() {
            tracing::warn!(
                keys = ?needs_restart,
                "changed in the config file, not applied: they need a restart"
            );
        }
        let outcome = ReloadOutcome {
            config_entries: next.entries.len(),
            federations: next.federation.len(),
            needs_restart: needs_restart.iter().map(|k| (*k).to_owned()).collect(),
        };
        self.running = self.running.reloaded(&next);
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
            ..AuditEvent::new(EventKind::PolicyReload, Outcome::Info)
        },
        Err(reason) => AuditEvent {
            reason: Some(format!("refused; the policies in force stay: {reason}")),
            ..AuditEvent::new(EventKind::PolicyReload, Outcome::Deny)
        },
    };
    if let Err(error) = audit.record(event) {
        tracing::error!(error = %Chain(&error), "the policy reload could not be audited");
    }
}
