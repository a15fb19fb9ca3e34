//! The harness of the end-to-end tests, shared with `cargo xtask demo`: a throwaway
//! PostgreSQL cluster, the demo backend, the `selfheal` daemon, and helpers to wait for
//! conditions with a deadline. Every process is owned by a guard that stops it on drop, so a
//! failing test leaves nothing running.
//!
//! These tests need root (eBPF, tracefs); [`require_root`] says so loudly when run without.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

pub mod docker;
pub mod systemd;
use nix::{
    sys::signal::{killpg, Signal},
    unistd::{Pid, Uid, User},
};

/// Fails the test with a clear message when not run as root.
pub fn require_root() {
    assert!(
        Uid::effective().is_root(),
        "this end-to-end test needs root (eBPF programs, tracefs): run it through `cargo xtask test` as root"
    );
}

/// The workspace's `target/` directory (`CARGO_TARGET_DIR` when set).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"),
        PathBuf::from,
    )
}

static PROFILE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Makes [`bin`] pick the binaries of a cargo profile (`release` for benchmarks) instead of
/// `debug`. Call it once, before starting anything.
pub fn use_profile(profile: &'static str) {
    let _ = PROFILE.set(profile);
}

/// A binary of the workspace: `$<NAME>_BIN` when set (the xtask sets it for the tests), else
/// `target/<profile>/<name>`.
pub fn bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_ascii_uppercase().replace('-', "_"));
    std::env::var_os(&var).map_or_else(
        || {
            target_dir()
                .join(PROFILE.get().copied().unwrap_or("debug"))
                .join(name)
        },
        PathBuf::from,
    )
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `check` every 10 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock the daemon reports exit times on.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    u64::try_from(ts.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(ts.tv_nsec()).unwrap_or(0)
}

/// A child process in its own process group, stopped (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    /// Where its stderr goes; printed when the owning test fails.
    log: Option<PathBuf>,
}

impl Proc {
    /// Spawns `command` in a new process group, so a terminal's Ctrl-C reaches only the
    /// harness, which then stops its children in order.
    pub fn spawn(name: &str, mut command: Command) -> Result<Self> {
        use std::os::unix::process::CommandExt as _;
        command.process_group(0);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: None,
        })
    }

    /// Like [`Proc::spawn`], with stderr written to `log` (printed if the test fails).
    pub fn spawn_logged(name: &str, mut command: Command, log: &Path) -> Result<Self> {
        command.stderr(std::fs::File::create(log)?);
        let mut proc = Self::spawn(name, command)?;
        proc.log = Some(log.to_owned());
        Ok(proc)
    }

    /// The exit status, if the process has ended.
    pub fn try_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The log file, when stderr goes to one.
    pub fn log(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process (not its group).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        nix::sys::signal::kill(Pid::from_raw(self.pid() as i32), signal)?;
        Ok(())
    }

    /// Waits for the process to end, up to `timeout`; its exit status.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let name = self.name.clone();
        wait_for(&format!("{name} to exit"), timeout, || {
            self.child.try_wait().ok().flatten()
        })
    }

    /// Stops the process group: SIGTERM, up to 5 s, then SIGKILL.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let group = Pid::from_raw(self.pid() as i32);
        let _ = killpg(group, Signal::SIGTERM);
        if self.wait_timeout(Duration::from_secs(5)).is_err() {
            let _ = killpg(group, Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            if let Some(text) = self
                .log
                .as_ref()
                .and_then(|log| std::fs::read_to_string(log).ok())
            {
                eprintln!(
                    "----- log of {} -----\n{text}----- end of log of {} -----",
                    self.name, self.name
                );
            }
        }
    }
}

/// The newest PostgreSQL server binaries on the machine.
pub fn postgres_bin_dir() -> Result<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (no /usr/lib/postgresql); run `cargo xtask setup`")?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop()
        .map(|(_, dir)| dir)
        .ok_or_else(|| anyhow!("no PostgreSQL server binaries under /usr/lib/postgresql"))
}

/// A throwaway PostgreSQL cluster, run as the unprivileged `postgres` user on a free port,
/// stopped and deleted on drop.
pub struct PgCluster {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: User,
}

impl PgCluster {
    pub fn start() -> Result<Self> {
        let bin = postgres_bin_dir()?;
        let user = User::from_name("postgres")?
            .ok_or_else(|| anyhow!("no `postgres` user; run `cargo xtask setup`"))?;
        let dir = tempfile::Builder::new().prefix("selfheal-pg-").tempdir()?;
        nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid))?;
        let port = free_port()?;
        let cluster = Self {
            port,
            dir,
            bin,
            user,
        };
        cluster.run_as_postgres(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            cluster.dir.path().display()
        );
        let log = cluster.dir.path().join("postgres.log");
        cluster.run_as_postgres(
            "pg_ctl",
            &[
                "-D",
                &cluster.data(),
                "-o",
                &options,
                "-l",
                &log.display().to_string(),
                "-w",
                "start",
            ],
        )?;
        Ok(cluster)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn run_as_postgres(&self, program: &str, args: &[&str]) -> Result<()> {
        let output = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {program} as {}", self.user.name))?;
        if !output.status.success() {
            bail!(
                "{program} failed ({}): {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// A connection URL for the `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs SQL through psql and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-At",
                "-c",
                sql,
            ])
            .output()?;
        if !output.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.run_as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

/// The demo backend, started against a database and waited for until it listens.
pub struct DemoBackend {
    pub proc: Proc,
    pub address: SocketAddr,
    _logs: tempfile::TempDir,
}

impl DemoBackend {
    pub fn start(database_url: &str, port: u16) -> Result<Self> {
        let logs = tempfile::Builder::new().prefix("demo-backend-").tempdir()?;
        let mut command = Command::new(bin("demo-backend"));
        command
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database-url",
                database_url,
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let log = logs.path().join("demo-backend.log");
        let mut proc = Proc::spawn_logged("demo-backend", command, &log)?;
        let stdout = proc
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(line);
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .context("the demo backend did not say it is listening within 30 s")?;
        Ok(Self {
            proc,
            address: SocketAddr::from(([127, 0, 0, 1], port)),
            _logs: logs,
        })
    }

    /// The command-line pattern that selects this backend and no other.
    pub fn selector(&self) -> String {
        format!("demo-backend --listen {}", self.address)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Flips a fault switch: `fault("idle_tx?n=3")` posts `/__fault/idle_tx?n=3`; `"clear"`
    /// turns every fault off. Fails unless the backend accepts it.
    pub fn fault(&self, switch: &str) -> Result<()> {
        let path = format!("/__fault/{switch}");
        let answer = http().post(self.url(&path)).send_empty()?;
        if !answer.status().is_success() {
            bail!("{path} answered {}", answer.status());
        }
        Ok(())
    }
}

/// One HTTP/1.1 keep-alive connection driven by hand, so a test or bench knows exactly which
/// connection each request uses.
pub struct KeepAlive {
    stream: BufReader<std::net::TcpStream>,
}

impl KeepAlive {
    pub fn connect(address: SocketAddr) -> Result<Self> {
        let stream = std::net::TcpStream::connect(address)?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// Sends `GET path` with `Host: host` and reads the whole response; its status code.
    pub fn get(&mut self, path: &str, host: &str) -> Result<u16> {
        use std::io::{Read as _, Write as _};
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
        self.stream.get_mut().write_all(request.as_bytes())?;
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow!("not an HTTP status line: {status_line:?}"))?;
        let mut length = 0;
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line)? == 0 {
                bail!("connection closed in the headers");
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse()?;
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body)?;
        Ok(status)
    }
}

/// An HTTP client that returns 4xx/5xx responses instead of errors.
pub fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

/// A running `selfheal run`, with its config in a temporary directory.
pub struct Daemon {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Daemon {
    /// Starts the daemon with `config` (which must not set `[admin]` or `[state]`: the harness
    /// picks a free port and a scratch state dir) and waits for its health endpoint.
    pub fn start(config: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("selfheal-daemon-")
            .tempdir()?;
        let port = free_port()?;
        let full = format!(
            "{config}\n[admin]\nlisten = \"127.0.0.1:{port}\"\n\n[state]\ndir = \"{}\"\n",
            dir.path().join("state").display()
        );
        let path = dir.path().join("selfheal.toml");
        std::fs::write(&path, full)?;
        Self::start_with_file(&path, SocketAddr::from(([127, 0, 0, 1], port)), dir)
    }

    /// Starts the daemon on a complete config file whose admin address is `admin`; its log
    /// goes to `dir`.
    pub fn start_with_file(
        config: &Path,
        admin: SocketAddr,
        dir: tempfile::TempDir,
    ) -> Result<Self> {
        let mut command = Command::new(bin("selfheal"));
        command
            .args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null());
        let proc = Proc::spawn_logged("selfheal", command, &dir.path().join("selfheal.log"))?;
        let mut daemon = Self { proc, admin, dir };
        let outcome = wait_for(
            "the daemon's health endpoint",
            Duration::from_secs(30),
            || {
                // A daemon that exited (a bad config, a busy port) will never answer.
                match daemon.health() {
                    Ok(_) => Some(Ok(())),
                    Err(_) => daemon.proc.child.try_wait().ok().flatten().map(Err),
                }
            },
        )?;
        if let Err(status) = outcome {
            let log = daemon
                .proc
                .log()
                .and_then(|l| std::fs::read_to_string(l).ok())
                .unwrap_or_default();
            bail!("selfheal exited ({status}) before answering:\n{log}");
        }
        Ok(daemon)
    }

    /// `data` of `GET /api/v1/system/health`.
    pub fn health(&self) -> Result<serde_json::Value> {
        let mut response = http()
            .get(format!("http://{}/api/v1/system/health", self.admin))
            .call()?;
        let body: serde_json::Value = response.body_mut().read_json()?;
        if body["success"] != true {
            bail!("health answered {body}");
        }
        Ok(body["data"].clone())
    }

    /// Waits until the daemon reports `pid` as the running target; the health data then.
    pub fn wait_for_target(&self, pid: u32) -> Result<serde_json::Value> {
        wait_for(
            &format!("the daemon to see process {pid} as the target"),
            Duration::from_secs(10),
            || {
                let health = self.health().ok()?;
                (health["target"]["pid"] == pid && health["target"]["state"] == "running")
                    .then_some(health)
            },
        )
    }

    /// Waits until the daemon reports the exit of `pid`; the `last_exit` object.
    pub fn wait_for_exit(&self, pid: u32) -> Result<serde_json::Value> {
        wait_for(
            &format!("the daemon to report the exit of {pid}"),
            Duration::from_secs(10),
            || {
                let exit = self.health().ok()?["target"]["last_exit"].clone();
                (exit["pid"] == pid).then_some(exit)
            },
        )
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        Ok(http()
            .get(format!("http://{}/metrics", self.admin))
            .call()?
            .body_mut()
            .read_to_string()?)
    }

    /// The value of one sample line of `/metrics` (`name{labels}` exactly as exposed).
    pub fn metric(&self, series: &str) -> Result<Option<f64>> {
        Ok(sample(&self.metrics()?, series))
    }
}

/// Finds `series` (name with labels, as written in the exposition) in `/metrics` text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}

/// The directories of cgroup `group` (a name directly under each hierarchy's root).
fn cgroup_dirs(group: &str) -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .map(|dirs| {
            dirs.flatten()
                .map(|d| d.path().join(group))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

fn pids_below(dir: &Path) -> Vec<i32> {
    let mut pids = Vec::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten().filter(|e| e.path().is_dir()) {
            pids.extend(pids_below(&entry.path()));
        }
    }
    pids
}

/// SIGKILLs every process in cgroup `group` and below, in every hierarchy, until none is left.
pub fn kill_cgroup(group: &str) {
    for _ in 0..100 {
        let pids: Vec<i32> = cgroup_dirs(group)
            .iter()
            .flat_map(|d| pids_below(d))
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten().filter(|e| e.path().is_dir()) {
            remove_tree(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Removes cgroup `group` and its children from every hierarchy (they must be empty).
pub fn remove_cgroup(group: &str) {
    for dir in cgroup_dirs(group) {
        remove_tree(&dir);
    }
}
