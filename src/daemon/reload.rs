//! Config reload: SIGHUP or `tether reload` re-reads the config file and
//! applies what can change at runtime (entries and federation). Anything
//! else, or a file that does not validate, is refused with the reason and
//! the running configuration stays.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::admin_api::{ReloadOutcome, ReloadRequest};
use crate::config::{Config, ConfigSource, ProcessEnv};
use crate::federation::Federation;
use crate::registration::Registry;

/// Owns reloads: one at a time, in arrival order.
#[derive(Debug)]
pub(super) struct Reloader {
    /// The configuration in force.
    pub running: Config,
    pub registry: Registry,
    pub federation: Federation,
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
