//! Scenes for the healing loop, shared by the `healing` tests and `cargo xtask bench healing`:
//! a throwaway PostgreSQL, the demo backend as a plain process watched by its command line,
//! and the daemon with self-healing on, restarting the backend with its own command line
//! (`repair.start_command`). The daemon starts backends itself, so a scene kills whatever
//! backend is left when it is dropped.

use std::{process::Command, time::Duration};

use anyhow::{anyhow, Result};
use serde_json::Value;

use crate::{bin, free_port, http, wait_for, Daemon, DemoBackend, PgCluster, PgOptions, PG_ROLE};

/// Kills every process whose command line has the pattern when dropped: the backends the
/// daemon started.
pub struct Reaper(pub String);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &self.0])
            .status();
    }
}

/// Dropped in this order: the daemon first (so it restarts nothing more), then whatever
/// backend it started, the backend the scene started, and PostgreSQL.
pub struct Scene {
    pub daemon: Daemon,
    _reaper: Reaper,
    pub backend: DemoBackend,
    pub pg: PgCluster,
}

/// What a scene adds to the defaults.
#[derive(Default, Clone, Copy)]
pub struct Setup {
    /// Keys added to `[repair]` and `[monitor]`.
    pub repair: &'static str,
    pub monitor: &'static str,
    /// The backend logs in as the unprivileged role `demo` (session actions never touch a
    /// superuser's sessions) and `[repair.sessions]` picks that user.
    pub role: bool,
}

/// Self-healing on, nothing else changed.
pub const HEALING: Setup = Setup {
    repair: "self_healing = true",
    monitor: "",
    role: false,
};

impl Scene {
    /// The scene of `setup`; `extra` gives more config from the backend's health URL and the
    /// database's (superuser) URL. Returns once the daemon sees the backend.
    pub fn start(setup: &Setup, extra: impl Fn(&str, &str) -> String) -> Result<Self> {
        let pg = PgCluster::start_with(PgOptions {
            password_role: setup.role,
            ..PgOptions::default()
        })?;
        let backend_url = if setup.role { pg.role_url()? } else { pg.url() };
        let backend = DemoBackend::start(&backend_url, free_port()?)?;
        let reaper = Reaper(backend.selector());
        let start_command = [
            bin("demo-backend").display().to_string(),
            "--listen".to_owned(),
            backend.address.to_string(),
            "--database-url".to_owned(),
            backend_url.clone(),
        ];
        let sessions = if setup.role {
            format!("\n[repair.sessions]\nuser = \"{PG_ROLE}\"\n")
        } else {
            String::new()
        };
        // 20 s to verify unless the setup says otherwise.
        let verify = if setup.repair.contains("verify_timeout_secs") {
            ""
        } else {
            "verify_timeout_secs = 20\n"
        };
        let daemon = Daemon::start(&format!(
            "[target]\ncommand = \"{}\"\npoll_interval_ms = 100\n\n\
             [repair]\nstart_command = {}\ncooldown_secs = 0\n{verify}{}\n{sessions}\n\
             [monitor]\ninterval_ms = 500\nnot_answering_secs = 2\n{}\n\n{}",
            backend.selector(),
            serde_json::to_string(&start_command)?,
            setup.repair,
            setup.monitor,
            extra(&backend.url("/health"), &pg.url()),
        ))?;
        daemon.wait_for_target(backend.proc.pid())?;
        daemon.wait_capturing()?;
        Ok(Self {
            daemon,
            _reaper: reaper,
            backend,
            pg,
        })
    }

    /// The repairs log, newest first.
    pub fn repairs(&self) -> Result<Vec<Value>> {
        Ok(
            self.daemon.api("/api/v1/system/repairs?limit=100")?["repairs"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        )
    }

    /// Waits for a repair of `signature` in one of `states`; the repair. The error has the log.
    pub fn wait_repair(&self, signature: &str, states: &[&str], within: Duration) -> Result<Value> {
        wait_for(
            &format!("a repair of {signature} in {states:?}"),
            within,
            || {
                self.repairs().ok()?.into_iter().find(|r| {
                    r["signature"] == signature && states.iter().any(|s| r["state"] == *s)
                })
            },
        )
        .map_err(|err| anyhow!("{err}; the log: {:#?}", self.repairs().unwrap_or_default()))
    }

    /// The pid of the running target, as the daemon sees it.
    pub fn target_pid(&self) -> Option<u64> {
        let health = self.daemon.health().ok()?;
        (health["target"]["state"] == "running")
            .then(|| health["target"]["pid"].as_u64())
            .flatten()
    }

    /// Whether the backend answers `/health` with 200.
    pub fn backend_healthy(&self) -> bool {
        http()
            .get(self.backend.url("/health"))
            .call()
            .is_ok_and(|r| r.status() == 200)
    }
}

/// The backend's own health check and the database's, run every second.
pub fn checks(health_url: &str, pg_url: &str) -> String {
    format!(
        "[[platforms]]\nname = \"leadsite.ai\"\nhosts = [\"leadsite.ai\"]\n\n\
         [[checks]]\nname = \"backend\"\nkind = \"http\"\nurl = \"{health_url}\"\nplatform = \"leadsite.ai\"\n\
         interval_ms = 1000\ntimeout_ms = 900\nalert_after_failures = 2\n\n\
         [[checks]]\nname = \"pg\"\nkind = \"postgres\"\nurl = \"{pg_url}\"\n\
         interval_ms = 1000\ntimeout_ms = 900\nalert_after_failures = 2\n"
    )
}
