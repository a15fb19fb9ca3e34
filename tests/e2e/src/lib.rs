//! The harness of the end-to-end tests, shared with `cargo xtask demo`: a throwaway
//! PostgreSQL cluster (optionally with `pg_stat_statements`, a password-checked role, and TLS
//! required over TCP), the
//! demo backend, the `selfheal` daemon and its admin API, a load generator ([`load`]), a reader
//! of `/metrics` ([`openmetrics`]), and helpers to wait for conditions with a deadline. Every process is owned by a guard that stops it on drop, so a
//! failing test leaves nothing running.
//!
//! These tests need root (eBPF, tracefs); [`require_root`] says so loudly when run without.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use selfheal_receivers::TestPki;

pub mod docker;
pub mod healing;
pub mod load;
pub mod openmetrics;
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

/// Polls `read` every 50 ms until its value has stayed the same for `quiet` and satisfies
/// `ready`, or `timeout` passes; the value then. For "the daemon has caught up": the daemon
/// processes captured traffic asynchronously, and the only sign it is done is that its
/// numbers stop moving. A failing `read` counts as a change.
pub fn wait_stable<T: PartialEq + std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    quiet: Duration,
    mut read: impl FnMut() -> Result<T>,
    ready: impl Fn(&T) -> bool,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last: Option<(T, Instant)> = None;
    loop {
        let now = Instant::now();
        match read() {
            Ok(value) => match &last {
                Some((previous, since)) if *previous == value => {
                    if now.duration_since(*since) >= quiet && ready(&value) {
                        return Ok(value);
                    }
                }
                _ => last = Some((value, now)),
            },
            Err(_) => last = None,
        }
        if now >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what} to settle; last seen: {:?}",
                last.map(|(value, _)| value)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
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

/// What a [`PgCluster`] has beyond a bare `initdb`.
#[derive(Debug, Clone, Copy, Default)]
pub struct PgOptions {
    /// Load `pg_stat_statements` (`shared_preload_libraries`) and create the extension in the
    /// `postgres` database, so tests can read what the server itself counted.
    pub pg_stat_statements: bool,
    /// Create the role [`PG_ROLE`] (password [`PG_ROLE_PASSWORD`]) owning a database of the
    /// same name, which must log in with a password (SCRAM-SHA-256) over TCP, so a wrong
    /// password is refused with SQLSTATE 28P01. `postgres` stays trusted everywhere, so
    /// [`PgCluster::url`] and [`PgCluster::psql`] work as without it.
    pub password_role: bool,
    /// Serve TLS with a certificate for `localhost` and `127.0.0.1` signed by a CA made for
    /// the cluster ([`PgCluster::ca_file`]), and refuse every TCP connection without it
    /// (`hostssl` lines only, `hostnossl ... reject`); the Unix socket stays plain and trusted.
    /// [`PgCluster::psql`] still works: libpq's default `sslmode=prefer` encrypts without
    /// verifying.
    pub tls: bool,
}

/// The role (and database) of [`PgOptions::password_role`].
pub const PG_ROLE: &str = "demo";
/// Its password. Not a secret: the cluster is throwaway and listens on loopback only.
pub const PG_ROLE_PASSWORD: &str = "demo-password-e2e";

/// A throwaway PostgreSQL cluster, run as the unprivileged `postgres` user on a free port,
/// stopped and deleted on drop.
pub struct PgCluster {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    user: User,
    options: PgOptions,
    /// The CA and the server's certificate, with [`PgOptions::tls`].
    pki: Option<TestPki>,
}

impl PgCluster {
    /// A bare cluster: `postgres` trusted, nothing preloaded.
    pub fn start() -> Result<Self> {
        Self::start_with(PgOptions::default())
    }

    pub fn start_with(options: PgOptions) -> Result<Self> {
        let bin = postgres_bin_dir()?;
        let user = User::from_name("postgres")?
            .ok_or_else(|| anyhow!("no `postgres` user; run `cargo xtask setup`"))?;
        let dir = tempfile::Builder::new().prefix("selfheal-pg-").tempdir()?;
        nix::unistd::chown(dir.path(), Some(user.uid), Some(user.gid))?;
        let port = free_port()?;
        let mut cluster = Self {
            port,
            dir,
            bin,
            user,
            options,
            pki: None,
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
        if options.tls {
            cluster.pki = Some(cluster.write_tls()?);
        }
        if options.password_role || options.tls {
            // The first matching line wins: the role must give its password over TCP; every
            // other login, and everything on the Unix socket, stays trusted. With TLS, a TCP
            // line matches TLS connections only, and a plain one is rejected outright.
            let host = if options.tls { "hostssl" } else { "host" };
            let mut lines = vec!["local all all trust".to_owned()];
            if options.password_role {
                lines.push(format!("{host} all {PG_ROLE} 127.0.0.1/32 scram-sha-256"));
            }
            lines.push(format!("{host} all all 127.0.0.1/32 trust"));
            if options.tls {
                lines.push("hostnossl all all all reject".to_owned());
            }
            let hba = lines.join("\n") + "\n";
            let path = Path::new(&cluster.data()).join("pg_hba.conf");
            std::fs::write(&path, hba).with_context(|| format!("writing {}", path.display()))?;
        }
        cluster.start_server()?;
        if options.pg_stat_statements {
            cluster.psql("CREATE EXTENSION pg_stat_statements")?;
        }
        if options.password_role {
            // password_encryption defaults to scram-sha-256 (PostgreSQL 14 and later).
            cluster.psql(&format!(
                "CREATE ROLE {PG_ROLE} LOGIN PASSWORD '{PG_ROLE_PASSWORD}'"
            ))?;
            cluster.psql(&format!("CREATE DATABASE {PG_ROLE} OWNER {PG_ROLE}"))?;
        }
        Ok(cluster)
    }

    /// A new test PKI: the server's certificate and key in the data directory (the key owned by
    /// `postgres`, mode 0600, as the server demands), `ssl = on` in `postgresql.conf`, and the
    /// CA's certificate as `ca.pem` beside the data directory, for the clients.
    fn write_tls(&self) -> Result<TestPki> {
        use std::{
            io::Write as _,
            os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
        };

        let pki = TestPki::localhost().context("making the test PKI")?;
        let data = PathBuf::from(self.data());
        for (name, pem, mode) in [
            ("server.crt", &pki.cert_pem, 0o644),
            ("server.key", &pki.key_pem, 0o600),
        ] {
            let path = data.join(name);
            // Created with its mode: the key is never readable by others, even for a moment.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&path)
                .and_then(|mut file| file.write_all(pem.as_bytes()))
                .with_context(|| format!("writing {}", path.display()))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
            nix::unistd::chown(&path, Some(self.user.uid), Some(self.user.gid))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        let conf = data.join("postgresql.conf");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut file| {
                file.write_all(
                    b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
                )
            })
            .with_context(|| format!("writing {}", conf.display()))?;
        let ca = self.dir.path().join("ca.pem");
        std::fs::write(&ca, &pki.ca_pem).with_context(|| format!("writing {}", ca.display()))?;
        Ok(pki)
    }

    /// The CA certificate (PEM) a client must trust to verify the server, with
    /// [`PgOptions::tls`].
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.pki.as_ref().map(|_| self.dir.path().join("ca.pem"))
    }

    /// Starts the server (again, after [`Self::stop_server`]) and waits until it accepts
    /// connections.
    pub fn start_server(&self) -> Result<()> {
        let mut options_arg = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        if self.options.pg_stat_statements {
            options_arg.push_str(
                " -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=top",
            );
        }
        let log = self.dir.path().join("postgres.log");
        self.run_as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options_arg,
                "-l",
                &log.display().to_string(),
                "-w",
                "start",
            ],
        )
    }

    /// Stops the server (fast shutdown: sessions are disconnected), keeping the cluster.
    pub fn stop_server(&self) -> Result<()> {
        self.run_as_postgres("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"])
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

    /// A connection URL for [`PG_ROLE`] with its password, over TCP, to its own database.
    /// Fails unless the cluster was started with [`PgOptions::password_role`].
    pub fn role_url(&self) -> Result<String> {
        if !self.options.password_role {
            bail!("this cluster has no password role: start it with PgOptions::password_role");
        }
        Ok(format!(
            "postgres://{PG_ROLE}:{PG_ROLE_PASSWORD}@127.0.0.1:{}/{PG_ROLE}",
            self.port
        ))
    }

    /// The directory of the server's Unix socket (`-h` for libpq clients).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A program of the server's installation (`pgbench`, `psql`).
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// Runs SQL through psql and returns its unaligned output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let output = self.psql_command(sql).output()?;
        if !output.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// Runs a query through psql and returns its rows, each a list of fields as text (a NULL
    /// is empty). Fields and rows are split on ASCII unit and record separators, so a field
    /// may hold newlines or `|`, as query texts do.
    pub fn psql_rows(&self, sql: &str) -> Result<Vec<Vec<String>>> {
        let output = self
            .psql_command(sql)
            .args(["-F", "\u{1f}", "-R", "\u{1e}"])
            .output()?;
        if !output.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(text
            .trim_end_matches('\n')
            .split('\u{1e}')
            .filter(|row| !row.is_empty())
            .map(|row| row.split('\u{1f}').map(str::to_owned).collect())
            .collect())
    }

    fn psql_command(&self, sql: &str) -> Command {
        let mut command = Command::new(self.bin.join("psql"));
        command.args([
            "-X",
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ]);
        command
    }

    /// Takes `LOCK TABLE table IN ACCESS EXCLUSIVE MODE` in an open transaction of a psql
    /// session and returns once it is held; every other session touching the table waits until
    /// [`TableLock::release`] (or the guard's drop).
    pub fn lock_table(&self, table: &str) -> Result<TableLock> {
        let mut command = Command::new(self.bin.join("psql"));
        command
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        let mut proc = Proc::spawn_logged(
            &format!("psql holding a lock on {table}"),
            command,
            &self.dir.path().join(format!("lock-{table}.log")),
        )?;
        let mut stdin = proc
            .child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("psql has no stdin"))?;
        let stdout = proc
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("psql has no stdout"))?;
        {
            use std::io::Write as _;
            writeln!(
                stdin,
                "BEGIN;\nLOCK TABLE {table} IN ACCESS EXCLUSIVE MODE;\nSELECT 'locked';"
            )?;
            stdin.flush()?;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "locked" {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10))
            .with_context(|| format!("psql did not get the lock on {table} within 10 s"))?;
        Ok(TableLock { proc, stdin })
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

/// A throwaway `redis-server` on a free loopback port, with a password, nothing persisted;
/// stopped on drop.
pub struct RedisServer {
    pub port: u16,
    pub password: String,
    proc: Proc,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start(password: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("selfheal-redis-")
            .tempdir()?;
        let port = free_port()?;
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--requirepass",
                password,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            // Redis logs to stdout: into the log file with stderr, not the test's output.
            .stdout(Stdio::null());
        let log = dir.path().join("redis.log");
        let proc = Proc::spawn_logged("redis-server", command, &log)
            .context("cannot start redis-server: run `cargo xtask setup`")?;
        wait_for("redis-server to listen", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })?;
        Ok(Self {
            port,
            password: password.to_owned(),
            proc,
            _dir: dir,
        })
    }

    /// `redis://:password@127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://:{}@127.0.0.1:{}", self.password, self.port)
    }

    /// Stops the server (SIGTERM, then waits).
    pub fn stop(&mut self) {
        self.proc.stop();
    }
}

/// A table lock held by a psql session ([`PgCluster::lock_table`]); dropping it ends the
/// session, which releases the lock too.
pub struct TableLock {
    proc: Proc,
    stdin: std::process::ChildStdin,
}

impl TableLock {
    /// Commits (releasing the lock) and waits for psql to exit.
    pub fn release(mut self) -> Result<()> {
        use std::io::Write as _;
        writeln!(self.stdin, "COMMIT;\n\\q")?;
        self.stdin.flush()?;
        let status = self.proc.wait_timeout(Duration::from_secs(10))?;
        if !status.success() {
            bail!("psql holding the lock exited with {status}");
        }
        Ok(())
    }
}

/// A cgroup2 directory of its own for a process the tests start, as a systemd unit or a
/// container would give it: the daemon's segment capture attaches there. Removed on drop
/// (drop it after the processes in it have ended).
pub struct OwnCgroup {
    dir: PathBuf,
    procs: std::fs::File,
}

/// Where the cgroup2 tree is mounted: `/sys/fs/cgroup/unified` on a hybrid host, else
/// `/sys/fs/cgroup`.
pub fn cgroup2_mount() -> &'static Path {
    let hybrid = Path::new("/sys/fs/cgroup/unified");
    if hybrid.join("cgroup.procs").exists() {
        hybrid
    } else {
        Path::new("/sys/fs/cgroup")
    }
}

impl OwnCgroup {
    /// Creates `selfheal-e2e/<name>-<pid>-<n>` under the cgroup2 mount
    /// (`/sys/fs/cgroup/unified` on hybrid hosts, `/sys/fs/cgroup` on unified ones).
    pub fn create(name: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = cgroup2_mount().join("selfheal-e2e").join(format!(
            "{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the cgroup {}", dir.display()))?;
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .with_context(|| format!("cannot open {}/cgroup.procs", dir.display()))?;
        Ok(Self { dir, procs })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes `command`'s process start in this cgroup (it moves itself there between fork
    /// and exec, so everything it creates, its listening socket first, belongs to it).
    pub fn place(&self, command: &mut Command) -> Result<()> {
        use std::os::{fd::AsRawFd as _, unix::process::CommandExt as _};
        let fd = self.procs.try_clone()?;
        // SAFETY: between fork and exec the closure only makes one write(2) on an open fd
        // (no allocation, no lock); "0" moves the writing process.
        unsafe {
            command.pre_exec(move || {
                let written = nix::libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1);
                if written == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Ok(())
    }
}

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        // A process that just ended can take a moment to leave it.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() || !self.dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("cannot remove the test cgroup {}", self.dir.display());
    }
}

/// The demo backend, started against a database and waited for until it listens, in a
/// cgroup2 directory of its own (as a systemd unit or a container would run it).
pub struct DemoBackend {
    pub proc: Proc,
    pub address: SocketAddr,
    /// Dropped after `proc` (fields drop in order), once the backend has ended.
    _cgroup: Option<OwnCgroup>,
    _logs: tempfile::TempDir,
}

impl DemoBackend {
    pub fn start(database_url: &str, port: u16) -> Result<Self> {
        Self::start_with(database_url, port, &[])
    }

    /// Like [`DemoBackend::start`], with more command-line arguments (`--pool-size 4`).
    pub fn start_with(database_url: &str, port: u16, extra_args: &[&str]) -> Result<Self> {
        Self::start_in(database_url, port, extra_args, true)
    }

    /// Like [`DemoBackend::start`], in the harness's own cgroup, shared with other processes
    /// (as a plain process started from a shell would be).
    pub fn start_shared(database_url: &str, port: u16) -> Result<Self> {
        Self::start_in(database_url, port, &[], false)
    }

    fn start_in(
        database_url: &str,
        port: u16,
        extra_args: &[&str],
        own_cgroup: bool,
    ) -> Result<Self> {
        let logs = tempfile::Builder::new().prefix("demo-backend-").tempdir()?;
        let mut command = Command::new(bin("demo-backend"));
        command
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--database-url",
                database_url,
            ])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        let log = logs.path().join("demo-backend.log");
        // Without a cgroup of its own (not root, no cgroup2) the backend still runs; only
        // the daemon's segment capture needs it, and says so.
        let cgroup = own_cgroup
            .then(|| {
                OwnCgroup::create("demo-backend")
                    .and_then(|cgroup| cgroup.place(&mut command).map(|()| cgroup))
                    .map_err(|err| {
                        eprintln!("the demo backend runs in the harness's cgroup: {err:#}");
                    })
                    .ok()
            })
            .flatten();
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
            _cgroup: cgroup,
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
        self.fault_answer(switch).map(drop)
    }

    /// Like [`DemoBackend::fault`]; the backend's answer (`{"applied": …, "faults": …}`).
    pub fn fault_answer(&self, switch: &str) -> Result<serde_json::Value> {
        let path = format!("/__fault/{switch}");
        let mut answer = http().post(self.url(&path)).send_empty()?;
        let status = answer.status();
        let text = answer.body_mut().read_to_string()?;
        if !status.is_success() {
            bail!("{path} answered {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("{path} answered {text:?}"))
    }

    /// `GET /__fault`: the state of every fault.
    pub fn faults(&self) -> Result<serde_json::Value> {
        Ok(http()
            .get(self.url("/__fault"))
            .call()?
            .body_mut()
            .read_json()?)
    }
}

/// One HTTP/1.1 keep-alive connection driven by hand, so a test or bench knows exactly which
/// connection each request uses.
pub struct KeepAlive {
    stream: BufReader<std::net::TcpStream>,
}

/// The answer to one [`KeepAlive::send`].
#[derive(Debug, Clone)]
pub struct HttpAnswer {
    pub status: u16,
    /// From just before the request was written to when the answer's first byte could be
    /// read.
    pub first_byte: Duration,
    pub body: Vec<u8>,
}

impl KeepAlive {
    pub fn connect(address: SocketAddr) -> Result<Self> {
        let stream = std::net::TcpStream::connect(address)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_mins(1)))?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// This end's address: what the server sees as its peer.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.get_ref().local_addr()?)
    }

    /// Sends `GET path` with `Host: host` and reads the whole response; its status code.
    pub fn get(&mut self, path: &str, host: &str) -> Result<u16> {
        Ok(self.send("GET", path, host, None)?.status)
    }

    /// Sends one request (with `body` as `application/json` if given) in a single write and
    /// reads the whole answer (a `Content-Length` or chunked body).
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        host: &str,
        body: Option<&[u8]>,
    ) -> Result<HttpAnswer> {
        use std::io::{Read as _, Write as _};
        let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n").into_bytes();
        if let Some(body) = body {
            request.extend_from_slice(
                format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            request.extend_from_slice(body);
        } else {
            request.extend_from_slice(b"\r\n");
        }
        let started = Instant::now();
        self.stream.get_mut().write_all(&request)?;
        if self.stream.fill_buf()?.is_empty() {
            bail!("the server closed the connection instead of answering");
        }
        let first_byte = started.elapsed();
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line)?;
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| anyhow!("not an HTTP status line: {status_line:?}"))?;
        let mut length = 0;
        let mut chunked = false;
        loop {
            let mut line = String::new();
            if self.stream.read_line(&mut line)? == 0 {
                bail!("connection closed in the headers");
            }
            let lower = line.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = value.trim().parse()?;
            }
            if let Some(value) = lower.strip_prefix("transfer-encoding:") {
                chunked = value.contains("chunked");
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size_line = String::new();
                self.stream.read_line(&mut size_line)?;
                let size_text = size_line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size_text, 16)
                    .with_context(|| format!("bad chunk size line {size_line:?}"))?;
                let mut chunk = vec![0; size + 2];
                self.stream.read_exact(&mut chunk)?;
                chunk.truncate(size);
                body.extend_from_slice(&chunk);
                if size == 0 {
                    break;
                }
            }
        } else {
            body.resize(length, 0);
            self.stream.read_exact(&mut body)?;
        }
        Ok(HttpAnswer {
            status,
            first_byte,
            body,
        })
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
    /// The config file it runs with.
    pub config: PathBuf,
    /// The admin API's bearer token, when the harness chose it ([`Daemon::start`] does).
    pub token: Option<String>,
}

impl Daemon {
    /// Starts the daemon with `config` (which must not set `[admin]` or `[state]`: the harness
    /// picks a free port and a scratch state dir) and waits for its health endpoint.
    /// Starts the daemon watching `backend` with payload capture on (`payload_bytes`) and
    /// `extra` config appended, and returns once the backend is its target and the payload
    /// probe is attached (fails otherwise), after letting the filter maps settle: the tracker
    /// hands the pid to the probes asynchronously and nothing observable says when.
    pub fn capturing(backend: &DemoBackend, payload_bytes: u32, extra: &str) -> Result<Self> {
        let daemon = Self::start(&format!(
            "[target]\ncommand = \"{}\"\npoll_interval_ms = 100\n\n[probes]\npayload_bytes = {payload_bytes}\n{extra}",
            backend.selector()
        ))?;
        daemon.wait_for_target(backend.proc.pid())?;
        daemon.wait_capturing()?;
        Ok(daemon)
    }

    /// With payload capture configured, waits until it is attached (on the target's cgroup
    /// that happens just after the target is found; traffic before it is not seen), and
    /// fails if it is not within 10 s; without, returns at once.
    pub fn wait_capturing(&self) -> Result<()> {
        let series = "selfheal_ebpf_probe_attached{probe=\"payload_capture\"}";
        if self.metric(series)?.is_none() {
            return Ok(());
        }
        wait_for(
            "the payload capture to attach",
            Duration::from_secs(10),
            || (self.metric(series).ok().flatten() == Some(1.0)).then_some(()),
        )
        .with_context(|| format!("health: {}", self.health().unwrap_or_default()))?;
        // The syscall capture's filter maps are updated asynchronously: let them settle.
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    }

    pub fn start(config: &str) -> Result<Self> {
        Self::start_admin(config, "")
    }

    /// [`Daemon::start`] with more `[admin]` settings (`admin` is TOML lines; `{dir}` in it
    /// stands for the daemon's scratch directory).
    pub fn start_admin(config: &str, admin: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("selfheal-daemon-")
            .tempdir()?;
        let port = free_port()?;
        let admin = admin.replace("{dir}", &dir.path().display().to_string());
        let full = format!(
            "{config}\n[admin]\nlisten = \"127.0.0.1:{port}\"\n{admin}\n\n[state]\ndir = \"{}\"\n",
            dir.path().join("state").display()
        );
        let path = dir.path().join("selfheal.toml");
        std::fs::write(&path, full)?;
        let token = random_token()?;
        Self::spawn(
            &path,
            SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            Some(token),
        )
    }

    /// Starts the daemon on a complete config file whose admin address is `admin`; its log
    /// goes to `dir`. The token is the daemon's own (in `state.dir`, see the config docs), so
    /// [`Daemon::api`] cannot be used.
    pub fn start_with_file(
        config: &Path,
        admin: SocketAddr,
        dir: tempfile::TempDir,
    ) -> Result<Self> {
        Self::spawn(config, admin, dir, None)
    }

    /// Starts `selfheal run`, with `SELFHEAL_ADMIN_TOKEN` set to `token` if given, and waits
    /// for its health endpoint.
    fn spawn(
        config: &Path,
        admin: SocketAddr,
        dir: tempfile::TempDir,
        token: Option<String>,
    ) -> Result<Self> {
        let mut command = Command::new(bin("selfheal"));
        command
            .args(["run", "--config"])
            .arg(config)
            .stdin(Stdio::null());
        if let Some(token) = &token {
            command.env("SELFHEAL_ADMIN_TOKEN", token);
        }
        // A restarted daemon keeps the log of the one before as selfheal.log.1 (.2, ...).
        let log = dir.path().join("selfheal.log");
        if log.exists() {
            let rotated = (1..1000)
                .map(|n| dir.path().join(format!("selfheal.log.{n}")))
                .find(|p| !p.exists())
                .unwrap_or_else(|| dir.path().join("selfheal.log.old"));
            std::fs::rename(&log, rotated)?;
        }
        let proc = Proc::spawn_logged("selfheal", command, &log)?;
        let mut daemon = Self {
            proc,
            admin,
            dir,
            config: config.to_owned(),
            token,
        };
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

    /// Runs the `selfheal` CLI with `args` against this daemon (`--addr`, and its token in
    /// `SELFHEAL_ADMIN_TOKEN`): exit code, stdout, stderr.
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_at(&self.admin.to_string(), args)
    }

    /// [`Daemon::cli`] with another `--addr` (an address nothing listens on, say).
    pub fn cli_at(&self, addr: &str, args: &[&str]) -> (i32, String, String) {
        let output = Command::new(bin("selfheal"))
            .args(args)
            .args(["--addr", addr])
            .env(
                "SELFHEAL_ADMIN_TOKEN",
                self.token.as_deref().unwrap_or_default(),
            )
            .output()
            .expect("run the selfheal CLI");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// Kills the daemon with SIGKILL, as a crash or the OOM killer would (no shutdown of its
    /// own), and waits until it is gone.
    pub fn kill(&mut self) -> Result<()> {
        self.proc.signal(Signal::SIGKILL)?;
        let status = self.proc.wait_timeout(Duration::from_secs(10))?;
        if status.code().is_some() {
            bail!("the daemon exited by itself ({status}) before the SIGKILL");
        }
        Ok(())
    }

    /// Starts `selfheal run` again on the same config, state directory, admin address and
    /// token (a running daemon is stopped first), and waits for its health endpoint.
    pub fn restart(self) -> Result<Self> {
        let Self {
            mut proc,
            admin,
            dir,
            config,
            token,
        } = self;
        proc.stop();
        proc.log = None;
        drop(proc);
        Self::spawn(&config, admin, dir, token)
    }

    /// The status and the whole JSON body of an authenticated `POST path` with a JSON
    /// `body`, whatever the status.
    pub fn api_post(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(u16, serde_json::Value)> {
        let token = self.token.as_deref().ok_or_else(|| {
            anyhow!("this daemon was started without a harness token (use Daemon::start)")
        })?;
        let mut response = http()
            .post(format!("http://{}{path}", self.admin))
            .header("Authorization", &format!("Bearer {token}"))
            .send_json(body)
            .with_context(|| format!("POST {path}"))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        let body = serde_json::from_str(&text)
            .with_context(|| format!("POST {path} answered something not JSON: {text}"))?;
        Ok((status, body))
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

    /// `data` of an authenticated `GET path` on the admin API (`path` from the root:
    /// `/api/v1/system/queries`). Fails with the body on a non-2xx answer or a `success` that
    /// is not `true`.
    pub fn api(&self, path: &str) -> Result<serde_json::Value> {
        let token = self.token.as_deref().ok_or_else(|| {
            anyhow!("this daemon was started without a harness token (use Daemon::start)")
        })?;
        let mut response = http()
            .get(format!("http://{}{path}", self.admin))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .with_context(|| format!("GET {path}"))?;
        let status = response.status();
        let text = response.body_mut().read_to_string()?;
        if !status.is_success() {
            bail!("GET {path} answered {status}: {text}");
        }
        let body: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("GET {path} answered something not JSON: {text}"))?;
        if body["success"] != true {
            bail!("GET {path} answered {status} without success: {text}");
        }
        Ok(body["data"].clone())
    }

    /// The status and the whole JSON body of an authenticated `GET path` on the admin API,
    /// whatever the status: for tests of refusals.
    pub fn api_answer(&self, path: &str) -> Result<(u16, serde_json::Value)> {
        let token = self.token.as_deref().ok_or_else(|| {
            anyhow!("this daemon was started without a harness token (use Daemon::start)")
        })?;
        let mut response = http()
            .get(format!("http://{}{path}", self.admin))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .with_context(|| format!("GET {path}"))?;
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string()?;
        let body = serde_json::from_str(&text)
            .with_context(|| format!("GET {path} answered something not JSON: {text}"))?;
        Ok((status, body))
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        Ok(http()
            .get(format!("http://{}/metrics", self.admin))
            .call()?
            .body_mut()
            .read_to_string()?)
    }

    /// The daemon's nonzero drop and decode-problem counters (`selfheal_ebpf_ringbuf_drops_total`,
    /// `selfheal_protocol_problems_total`), one per line: what explains a count that falls
    /// short, for failure messages.
    pub fn losses(&self) -> String {
        use std::fmt::Write as _;
        let text = self.metrics().unwrap_or_default();
        let mut out = String::new();
        for s in openmetrics::parse(&text) {
            if (s.name == "selfheal_ebpf_ringbuf_drops_total"
                || s.name == "selfheal_protocol_problems_total")
                && s.value > 0.0
            {
                let labels: Vec<String> =
                    s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
                let _ = writeln!(out, "{}{{{}}} {}", s.name, labels.join(","), s.value);
            }
        }
        if out.is_empty() {
            out.push_str("(none)\n");
        }
        out
    }

    /// The value of one sample line of `/metrics` (`name{labels}` exactly as exposed).
    pub fn metric(&self, series: &str) -> Result<Option<f64>> {
        Ok(sample(&self.metrics()?, series))
    }
}

/// 32 hex digits from the kernel's random source.
fn random_token() -> Result<String> {
    use std::fmt::Write as _;
    use std::io::Read as _;
    let mut bytes = [0_u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    }))
}

/// The five platforms of `config/demo.toml`, as `[[platforms]]` entries, without the
/// `health_url` there: the daemon's own health checks would add requests of their own to the
/// backend's traffic, and accuracy tests count every request.
pub const DEMO_PLATFORMS: &str = r#"
[[platforms]]
name = "leadsite.ai"
hosts = ["leadsite.ai", "api.leadsite.ai"]

[[platforms]]
name = "leadsite.io"
hosts = ["leadsite.io", "api.leadsite.io"]

[[platforms]]
name = "clientcontact.io"
hosts = ["clientcontact.io", "api.clientcontact.io"]
path_prefixes = ["/api/v1/conversations"]

[[platforms]]
name = "videosite.io"
hosts = ["videosite.io", "api.videosite.io"]
path_prefixes = ["/api/v1/videos"]

[[platforms]]
name = "tackle.io"
hosts = ["tackle.io", "api.tackle.io"]
path_prefixes = ["/api/v1/tackle"]
"#;

/// `selfheal_http_requests_total` in `/metrics` text, by label set.
pub fn http_request_counts(metrics: &str) -> BTreeMap<load::Key, u64> {
    openmetrics::samples(metrics, "selfheal_http_requests_total")
        .into_iter()
        .filter_map(|s| {
            let key = load::Key {
                platform: s.label("platform")?.to_owned(),
                method: s.label("method")?.to_owned(),
                route: s.label("route")?.to_owned(),
                status: s.label("status")?.parse().ok()?,
            };
            Some((key, s.value.round() as u64))
        })
        .collect()
}

/// A number in a JSON answer, or a panic naming `what` and showing the value.
pub fn json_f64(value: &serde_json::Value, what: &str) -> f64 {
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"))
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

/// A v1 `memory` + `cpu` cgroup pair (this machine's layout) named `selfheal-test-<label>-<pid>`
/// holding one process; its processes are killed and the pair removed on drop.
pub struct V1Cgroup {
    pub name: String,
}

impl V1Cgroup {
    /// Creates the pair and moves `pid` into both. Fails (saying so) on a host without the v1
    /// memory controller.
    pub fn create(label: &str, pid: u32) -> Result<Self> {
        let this = Self {
            name: format!("selfheal-test-{label}-{}", std::process::id()),
        };
        let memory = this.dir("memory");
        if !memory
            .parent()
            .is_some_and(|p| p.join("memory.limit_in_bytes").exists())
        {
            bail!("this test needs the cgroup v1 memory controller at /sys/fs/cgroup/memory");
        }
        for controller in ["memory", "cpu"] {
            let dir = this.dir(controller);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            std::fs::write(dir.join("cgroup.procs"), pid.to_string())
                .with_context(|| format!("moving {pid} into {}", dir.display()))?;
        }
        Ok(this)
    }

    /// The pair's directory of `controller` (`memory` or `cpu`).
    pub fn dir(&self, controller: &str) -> PathBuf {
        PathBuf::from("/sys/fs/cgroup")
            .join(controller)
            .join(&self.name)
    }
}

impl Drop for V1Cgroup {
    fn drop(&mut self) {
        kill_cgroup(&self.name);
        remove_cgroup(&self.name);
    }
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
