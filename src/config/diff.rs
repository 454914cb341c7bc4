//! What a reload may change while the agent runs, and what only a restart
//! applies: [`Config::needs_restart`] compares two configurations field by
//! field. It destructures [`Config`] whole, so a field added to it does
//! not compile until someone decides which kind it is.

use super::Config;

impl Config {
    /// The keys (as written in the config file) whose values differ
    /// between `self` (in force) and `next` and that only a restart
    /// applies. What a reload applies at once is not listed: `[[entries]]`,
    /// `[[federation]]` and the policy files (the directory's contents).
    pub fn needs_restart(&self, next: &Config) -> Vec<&'static str> {
        let Config {
            // Where a config came from is not a setting.
            source: _,
            trust_domain,
            socket_path,
            data_dir,
            admin,
            svid,
            authority,
            attestor,
            workload_api,
            tasks,
            policy,
            audit,
            log,
            http,
            oidc,
            bundle_endpoint,
            fleet,
            introspection,
            // Applied by a reload.
            entries: _,
            federation: _,
        } = next;
        let mut keys = Vec::new();
        let mut differs = |key, changed: bool| {
            if changed {
                keys.push(key);
            }
        };
        differs("trust_domain", *trust_domain != self.trust_domain);
        differs("socket_path", *socket_path != self.socket_path);
        differs("data_dir", *data_dir != self.data_dir);
        differs(
            "admin_socket_path",
            admin.socket_path != self.admin.socket_path,
        );
        differs("admin_uids", admin.uids != self.admin.uids);
        differs("admin_group", admin.gid != self.admin.gid);
        differs(
            "x509_svid_ttl",
            svid.x509_svid_ttl != self.svid.x509_svid_ttl,
        );
        differs("jwt_svid_ttl", svid.jwt_svid_ttl != self.svid.jwt_svid_ttl);
        // `authority.issuer` is `[oidc] issuer`, listed as `[oidc]`.
        let keys_of = |a: &crate::authority::AuthorityConfig| crate::authority::AuthorityConfig {
            issuer: None,
            ..a.clone()
        };
        differs(
            "[authority]",
            keys_of(authority) != keys_of(&self.authority),
        );
        differs("[attestor]", *attestor != self.attestor);
        differs("[server]", *fleet != self.fleet);
        differs(
            "allow_unauthenticated_verifiers",
            workload_api.allow_unauthenticated_verifiers
                != self.workload_api.allow_unauthenticated_verifiers,
        );
        differs("[limits]", workload_api.limits != self.workload_api.limits);
        differs("[tasks]", *tasks != self.tasks);
        differs("policy_dir", policy.dir != self.policy.dir);
        differs(
            "policy_poll_interval",
            policy.poll_interval != self.policy.poll_interval,
        );
        differs("[audit]", *audit != self.audit);
        differs("[log]", *log != self.log);
        differs("[http]", *http != self.http);
        // The issuer is in every token signed from now on and in the
        // listener's routes: a restart applies it (tokens signed under the
        // old one still validate and exchange: neither compares `iss`).
        differs("[oidc]", *oidc != self.oidc);
        differs("[introspection]", *introspection != self.introspection);
        differs(
            "[bundle_endpoint]",
            *bundle_endpoint != self.bundle_endpoint,
        );
        keys
    }

    /// `self` with what a reload applies taken from `next`: the
    /// configuration in force once `next` is reloaded (the keys of
    /// [`Self::needs_restart`] keep their running values).
    #[must_use]
    pub fn reloaded(&self, next: &Config) -> Config {
        Config {
            source: next.source.clone(),
            entries: next.entries.clone(),
            federation: next.federation.clone(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, MapEnv};

    fn config(extra: &str) -> Config {
        Config::from_toml(
            &format!(
                "trust_domain = \"example.org\"\nsocket_path = \"/run/t/agent.sock\"\n\
                 data_dir = \"/var/lib/t\"\n{extra}"
            ),
            &MapEnv::default(),
        )
        .unwrap()
    }

    #[test]
    fn only_what_a_reload_cannot_apply_is_listed() {
        let running = config("");
        assert!(running.needs_restart(&running).is_empty());
        let entries = config(
            "[[entries]]\nspiffe_id = \"spiffe://example.org/a\"\nselectors = [\"unix:uid:1\"]\n",
        );
        assert!(running.needs_restart(&entries).is_empty());

        for (extra, key) in [
            ("x509_svid_ttl = \"5m\"", "x509_svid_ttl"),
            ("admin_uids = [1000]", "admin_uids"),
            (
                "allow_unauthenticated_verifiers = true",
                "allow_unauthenticated_verifiers",
            ),
            ("[tasks]\nmax_ttl = \"5m\"", "[tasks]"),
            ("[authority]\nca_ttl = \"48h\"", "[authority]"),
            ("[limits]\nmax_audiences = 3", "[limits]"),
            ("[audit]\nqueue = 10", "[audit]"),
            ("[log]\nlevel = \"debug\"", "[log]"),
            ("policy_poll_interval = \"10s\"", "policy_poll_interval"),
            (
                "[oidc]\nlisten = \"127.0.0.1:0\"\nissuer = \"https://o.example\"",
                "[oidc]",
            ),
        ] {
            assert_eq!(running.needs_restart(&config(extra)), [key], "{extra}");
        }
    }

    #[test]
    fn the_config_in_force_after_a_reload_keeps_what_needs_a_restart() {
        let running = config("");
        let next = config(
            "x509_svid_ttl = \"5m\"\n[[entries]]\nspiffe_id = \"spiffe://example.org/a\"\n\
             selectors = [\"unix:uid:1\"]\n",
        );
        let in_force = running.reloaded(&next);
        assert_eq!(in_force.entries.len(), 1);
        assert_eq!(in_force.svid, running.svid);
        assert_eq!(in_force.needs_restart(&next), ["x509_svid_ttl"]);
    }
}
