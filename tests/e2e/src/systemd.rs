//! A private systemd user manager for tests, as ../shared/ENVIRONMENT.md describes: PID 1 is
//! not systemd here, so `systemd --user` runs in its own mount namespace where a tmpfs on
//! `/run/systemd` makes only that namespace look booted. It loads units from a scratch
//! directory only (`SYSTEMD_UNIT_PATH`), never the machine's, and serves a D-Bus session bus
//! at `$XDG_RUNTIME_DIR/bus`. Dropping it kills everything in its cgroups and removes them.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{bail, Context as _, Result};

use crate::{wait_for, Proc};

/// The minimal unit set a user manager needs to start services and socket-activate D-Bus.
const BASE_UNITS: &[(&str, &str)] = &[
    ("default.target", "[Unit]\nDescription=test default\nWants=dbus.socket\n"),
    ("basic.target", "[Unit]\nDescription=basic\n"),
    ("sockets.target", "[Unit]\nDescription=sockets\n"),
    ("paths.target", "[Unit]\nDescription=paths\n"),
    ("timers.target", "[Unit]\nDescription=timers\n"),
    ("shutdown.target", "[Unit]\nDescription=shutdown\n"),
    ("exit.target", "[Unit]\nDescription=exit\n"),
    ("dbus.socket", "[Socket]\nListenStream=%t/bus\n"),
    (
        "dbus.service",
        "[Service]\nExecStart=/usr/bin/dbus-daemon --session --address=systemd: --nofork --nopidfile \
         --systemd-activation --syslog-only\n",
    ),
];

const START: &str = r#"set -e
mount -t tmpfs tmpfs /run/systemd
mkdir -p /run/systemd/system
mount --bind "$DIR/console" /dev/console
for h in /sys/fs/cgroup/*/; do
  case "$h" in */cpuset/) continue;; esac
  mkdir -p "$h$GROUP"
  echo $$ > "$h$GROUP/cgroup.procs"
done
export HOME="$DIR" XDG_RUNTIME_DIR="$DIR/run" XDG_CONFIG_HOME="$DIR/config" SYSTEMD_UNIT_PATH="$DIR/units"
exec /lib/systemd/systemd --user
"#;

pub struct SystemdUser {
    dir: tempfile::TempDir,
    group: String,
    manager: Option<Proc>,
}

impl SystemdUser {
    /// Starts the manager with `units` (file name, content) beside the base set, and waits
    /// for its bus.
    pub fn start(units: &[(&str, &str)]) -> Result<Self> {
        if !Path::new("/lib/systemd/systemd").exists() {
            bail!("systemd is not installed (/lib/systemd/systemd); run `cargo xtask setup`");
        }
        let dir = tempfile::Builder::new()
            .prefix("selfheal-systemd-")
            .tempdir()?;
        for sub in ["run", "units", "config"] {
            std::fs::create_dir_all(dir.path().join(sub))?;
        }
        std::fs::write(dir.path().join("console"), "")?;
        for (name, content) in BASE_UNITS.iter().chain(units) {
            std::fs::write(dir.path().join("units").join(name), content)?;
        }
        let group = format!("selfheal-test-systemd-{}", std::process::id());
        let mut command = Command::new("unshare");
        command
            .args(["--mount", "--propagation", "private", "bash", "-c", START])
            .env("DIR", dir.path())
            .env("GROUP", &group);
        let manager =
            Proc::spawn_logged("systemd --user", command, &dir.path().join("manager.log"))?;
        let mut this = Self {
            dir,
            group,
            manager: Some(manager),
        };
        let address = this.bus_address();
        wait_for("the user manager's D-Bus", Duration::from_secs(10), || {
            this.busctl(&[
                "call",
                "org.freedesktop.systemd1",
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
                "GetUnit",
                "s",
                "default.target",
            ])
            .ok()
        })
        .with_context(|| format!("bus {address}"))?;
        if let Some(status) = this.manager.as_mut().and_then(Proc::try_status) {
            bail!("systemd --user exited early ({status})");
        }
        Ok(this)
    }

    /// The D-Bus address of the session bus the manager serves.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.dir.path().join("run/bus").display())
    }

    /// Runs `busctl --user ARGS` against this manager's bus; its stdout.
    pub fn busctl(&self, args: &[&str]) -> Result<String> {
        let output = Command::new("busctl")
            .arg("--user")
            .args(args)
            .env("DBUS_SESSION_BUS_ADDRESS", self.bus_address())
            .output()?;
        if !output.status.success() {
            bail!(
                "busctl {args:?}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Calls a method of `org.freedesktop.systemd1.Manager` with `(unit, mode)` arguments:
    /// `StartUnit`, `RestartUnit`, `StopUnit`.
    pub fn unit_job(&self, method: &str, unit: &str) -> Result<String> {
        self.busctl(&[
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            method,
            "ss",
            unit,
            "replace",
        ])
    }

    /// `KillUnit(unit, "main", signal)`.
    pub fn kill_unit(&self, unit: &str, signal: i32) -> Result<()> {
        self.busctl(&[
            "call",
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "KillUnit",
            "ssi",
            unit,
            "main",
            &signal.to_string(),
        ])
        .map(|_| ())
    }

    /// The unit's `MainPID` (0 when it has none).
    pub fn main_pid(&self, unit: &str) -> Result<u32> {
        let path = format!("/org/freedesktop/systemd1/unit/{}", escape(unit));
        let out = self.busctl(&[
            "get-property",
            "org.freedesktop.systemd1",
            &path,
            "org.freedesktop.systemd1.Service",
            "MainPID",
        ])?;
        out.strip_prefix("u ")
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("MainPID answer {out:?}"))
    }
}

/// systemd's object-path escaping of a unit name (`backend.service` → `backend_2eservice`).
fn escape(unit: &str) -> String {
    unit.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("_{b:02x}")
            }
        })
        .collect()
}

impl Drop for SystemdUser {
    fn drop(&mut self) {
        // Services outlive their manager, so everything in the test's cgroups is killed.
        crate::kill_cgroup(&self.group);
        if let Some(mut manager) = self.manager.take() {
            manager.stop();
        }
        crate::remove_cgroup(&self.group);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unit_names_escape_like_systemd() {
        assert_eq!(super::escape("backend.service"), "backend_2eservice");
        assert_eq!(super::escape("my-app@1.service"), "my_2dapp_401_2eservice");
    }
}
