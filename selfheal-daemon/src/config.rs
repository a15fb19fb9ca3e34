//! The configuration: a TOML file, overridden by the environment variables the seeds name,
//! then validated as a whole.
//!
//! Owns: the schema (`Config` and its sections, each with its defaults), the one place the
//! process environment is read ([`Env::from_process`]), and validation that reports every
//! problem with its key path. Must not: perform I/O beyond reading the file, or be read by
//! components through a global: each component gets its own section.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{
    actuators::gate::{ActionKind, Mode},
    store::StoreConfig,
};

/// Every problem found in a config, each with the key path it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path in the file (`target.pid`, `platforms[1].hosts`) or `env NAME` for the
    /// environment.
    pub path: String,
    pub message: String,
}

impl Problem {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{count} problem(s) in config {path}", count = problems.len())]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

/// A secret value (URL with a password, API key). Never printed: `Debug` and `Display` show
/// `***`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The process environment, captured once at startup. Nothing else reads `std::env`.
#[derive(Debug, Clone, Default)]
pub struct Env(BTreeMap<String, String>);

impl Env {
    pub fn from_process() -> Self {
        Self(std::env::vars().collect())
    }

    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub target: TargetConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub probes: ProbesConfig,
    #[serde(default)]
    pub monitor: MonitorConfig,
    #[serde(default)]
    pub agents: AgentsConfig,
    #[serde(default)]
    pub repair: RepairConfig,
    #[serde(default)]
    pub database: DatabaseConfig,
    #[serde(default)]
    pub redis: RedisConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub notifications: NotificationsConfig,
    #[serde(default)]
    pub diagnostic: DiagnosticConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub traffic: TrafficConfig,
    #[serde(default)]
    pub platforms: Vec<PlatformConfig>,
    #[serde(default)]
    pub checks: Vec<CheckConfig>,
}

/// Which process is the target. Exactly one selector must be set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub pid: Option<u32>,
    pub pidfile: Option<PathBuf>,
    /// A substring of the process's command line (arguments joined by spaces).
    pub command: Option<String>,
    /// A cgroup directory (v1 or v2) whose processes are the target.
    pub cgroup: Option<PathBuf>,
    pub systemd_unit: Option<String>,
    /// Container name or id, resolved through the Docker Engine API.
    pub container: Option<String>,
    /// The bus of `systemd_unit`: `system`, `user`, or a D-Bus address (`unix:path=...`).
    #[serde(default = "defaults::systemd_bus")]
    pub systemd_bus: String,
    /// The Docker Engine API socket of `container`.
    #[serde(default = "defaults::docker_socket")]
    pub docker_socket: PathBuf,
    /// How often the target is resolved again (to follow restarts) while it is down, and
    /// checked while it is up (a running unit or container from its cgroup; systemd or the
    /// engine is asked again when its processes change, and every 10 s).
    #[serde(default = "defaults::target_poll_interval_ms")]
    pub poll_interval_ms: u64,
}

/// A validated target selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetSelector {
    Pid(u32),
    PidFile(PathBuf),
    Command(String),
    Cgroup(PathBuf),
    SystemdUnit { unit: String, bus: String },
    Container { name: String, socket: PathBuf },
}

impl fmt::Display for TargetSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pid(pid) => write!(f, "pid {pid}"),
            Self::PidFile(path) => write!(f, "pidfile {}", path.display()),
            Self::Command(command) => write!(f, "command {command:?}"),
            Self::Cgroup(path) => write!(f, "cgroup {}", path.display()),
            Self::SystemdUnit { unit, .. } => write!(f, "systemd unit {unit}"),
            Self::Container { name, .. } => write!(f, "container {name}"),
        }
    }
}

impl TargetConfig {
    /// The selector, when exactly one is set (validation reports the other cases).
    pub fn selector(&self) -> Option<TargetSelector> {
        let mut selectors = Vec::new();
        if let Some(pid) = self.pid {
            selectors.push(TargetSelector::Pid(pid));
        }
        if let Some(path) = &self.pidfile {
            selectors.push(TargetSelector::PidFile(path.clone()));
        }
        if let Some(command) = &self.command {
            selectors.push(TargetSelector::Command(command.clone()));
        }
        if let Some(path) = &self.cgroup {
            selectors.push(TargetSelector::Cgroup(path.clone()));
        }
        if let Some(unit) = &self.systemd_unit {
            selectors.push(TargetSelector::SystemdUnit {
                unit: unit.clone(),
                bus: self.systemd_bus.clone(),
            });
        }
        if let Some(name) = &self.container {
            selectors.push(TargetSelector::Container {
                name: name.clone(),
                socket: self.docker_socket.clone(),
            });
        }
        match selectors.len() {
            1 => selectors.pop(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin API, `/metrics` and (later) the dashboard. Loopback by default.
    pub listen: String,
    /// File holding the bearer token for the protected endpoints (readable by the daemon's
    /// user only). Without it and without `SELFHEAL_ADMIN_TOKEN`, the daemon creates
    /// `admin.token` in `state.dir` on first start.
    pub token_file: Option<PathBuf>,
    /// `SELFHEAL_ADMIN_TOKEN`: the bearer token itself (environment only).
    #[serde(skip)]
    pub token: Option<Secret>,
    /// Refuse every endpoint that changes something (acknowledge, resolve, silences, agent
    /// restarts, check runs, circuit resets) with 403: a view-only daemon.
    pub read_only: bool,
    /// Also serve the API on this unix socket (created mode 0600, replaced at start, removed
    /// at exit); the bearer token is still required on it.
    pub socket: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9797".to_owned(),
            token_file: None,
            token: None,
            read_only: false,
            socket: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// Directory of the state database and metric snapshots.
    pub dir: PathBuf,
    /// The state database (SQLite); `dir/state.db` when unset.
    pub db_path: Option<PathBuf>,
    /// Resolved alerts, their history and notifications, audit rows and ended silences older
    /// than this are deleted by the daily cleanup.
    pub retention_days: u32,
    /// How long a write waits for a lock held by another process (a backup, the `sqlite3`
    /// shell) before failing.
    pub busy_timeout_ms: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/selfheal"),
            db_path: None,
            retention_days: 90,
            busy_timeout_ms: 5000,
        }
    }
}

impl StateConfig {
    /// Where the state database is.
    pub fn db_path(&self) -> PathBuf {
        crate::state::db_path(&self.dir, self.db_path.as_deref())
    }
}

/// The alert manager: throttling and grouping of notifications.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// At most one trigger notification per alert key (rule + labels) in this many seconds;
    /// 0 notifies every firing.
    pub notify_interval_secs: u64,
    /// An alert that fires within this many seconds of an active alert of the same group
    /// (platform, else the rule's first part) joins its group.
    pub group_window_secs: u64,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            notify_interval_secs: 3600,
            group_window_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// Load the eBPF probes. When false, or when they cannot load, procfs polling is used.
    pub ebpf: bool,
    /// Size of each kernel → daemon ring buffer (a power of two, at least one page): the one
    /// of exits and TCP events, and with payload capture on the one of captures, which the
    /// decoders read; a full ring drops records in the kernel and counts them, and the
    /// captures' ring filling up makes the capture shed connections.
    pub ring_buffer_bytes: u32,
    /// Payload bytes captured from each socket read or write of the target (at most 512;
    /// 256 by default: a request line with its first headers, a query's first ~250 bytes);
    /// 0 turns payload capture off. With the default `capture = "cgroup"` no other process
    /// runs a capture program; the target's own cost is in BENCHMARKS.md.
    pub payload_bytes: u32,
    /// Where payloads are captured (see [`CaptureMode`]).
    pub capture: CaptureMode,
    /// With `capture = "cgroup"`: how the target's unix-socket connections to PostgreSQL,
    /// which the cgroup programs cannot see, are captured (see [`UnixSockets`]).
    pub unix_sockets: UnixSockets,
    /// How often the decoders drain captures from their ring buffer (with payload capture
    /// on), and the sampling is set. Captures do not wake them (that would cost the target a
    /// wake-up per socket operation) unless a quarter of the ring is full. Longer: fewer
    /// wake-ups and larger drains (10 → 100 ms cut the daemon's CPU per request by 40 %).
    pub flush_interval_ms: u64,
    /// Whether the thread that decodes captured traffic parses under `SCHED_IDLE` (see
    /// `sched.rs`): any thread of the target, PostgreSQL or anything else that wakes up takes
    /// its CPU at once, and the scheduler counts a CPU that runs only it as idle when it places
    /// a wake-up (recording into the store and the tables the API reads runs at normal
    /// priority). It lowered the capture's cost to the target's p99 under a fixed load
    /// (BENCHMARKS.md). Counts stay exact while the host has idle time; on busy CPUs the
    /// decoder gets only what woken threads leave it (beside busy processes of its own
    /// cgroup, next to nothing), falls behind, and the capture sheds connections (see
    /// `shed_below_idle_percent`) instead of taking CPU from the target. Needs
    /// `CAP_SYS_NICE` (to come back to normal priority); without it the decoder runs at
    /// normal priority and the log says so (`selfheal_capture_decoder_idle` 0). Unset, it is
    /// on unless exact counts are asked for (`shed_below_idle_percent = 0`, which needs a
    /// decoder that keeps up) or `decode_nice` is not 0: see [`ProbesConfig::decoder_idle`].
    /// Exits, TCP events and the API keep normal priority either way.
    pub decode_idle: Option<bool>,
    /// With the decoder not under `SCHED_IDLE`: its nice value (0–19); above 0 the target's
    /// threads preempt it more readily than at 0.
    pub decode_nice: i32,
    /// Idle share of the host's CPUs (in %) under which the capture sheds connections: while
    /// less of all CPUs' time than this is idle, the kernel programs capture one connection in
    /// 2, then 4, 8 and 16, and come back a step per second once more than twice it (at most
    /// halfway to 100) is idle. A saturated host then keeps its CPU for the target, and counts
    /// are of the connections kept (`selfheal_capture_sampling_ratio`). 0 turns this off:
    /// counts stay exact however busy the host is, at the capture's full cost to the target,
    /// unless the decoders fall behind (their ring over half full), which sheds either way;
    /// the decoder then runs at normal priority unless `decode_idle = true`.
    pub shed_below_idle_percent: f64,
    /// No longer used (the decoders read the kernel's ring buffer, sized by
    /// `ring_buffer_bytes`): accepted so that older config files still load, with a warning.
    pub payload_queue: Option<u64>,
}

/// Where the target's socket payloads are captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CaptureMode {
    /// On the target's own cgroup2 (`cgroup_skb` programs: per TCP packet of the target's
    /// sockets only; no other process runs them). Needs the target in a cgroup of its own —
    /// a systemd unit, a container, or a process started in one. Unix sockets are not
    /// packets: PostgreSQL over one is captured as [`ProbesConfig::unix_sockets`] says. While
    /// the target shares its cgroup, nothing is captured and the reason is logged and
    /// exported.
    Cgroup,
    /// On the socket syscalls of every process (BTF tracepoints, filtered to the target in
    /// the kernel): sees unix sockets and a target in any cgroup, but every process on the
    /// host pays for the filter on each socket operation (see BENCHMARKS.md).
    Syscalls,
}

/// How the cgroup capture treats the target's unix-socket connections to PostgreSQL
/// (`/run/postgresql/.s.PGSQL.5432`): they are not packets, so no cgroup program sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnixSockets {
    /// Found once per report interval; while the target has one, the socket-operation hooks
    /// of the `syscalls` capture are attached, filtered in the kernel to the target's unix
    /// sockets connected to a `.s.PGSQL.<port>` socket (its other unix sockets, a journald
    /// stdout, are left alone). Every process's socket operations pay their filter during
    /// that time (0.15–0.27 µs each here, BENCHMARKS.md: this kernel has no hook that runs for
    /// unix sockets only). A connection is captured from the interval
    /// (`monitor.interval_ms`) after it opened: its startup (and a refused login) can be
    /// missed, its queries from then on are not.
    Auto,
    /// The same hooks for as long as the daemon runs: every connection of a process the daemon
    /// knows from its first byte, startup included, at the filter's cost to every process all
    /// the time.
    Always,
    /// The default: not captured, so that no other process pays for the capture; counted in
    /// `selfheal_capture_unseen_postgres_connections`, and the log says how to have them seen.
    Off,
}

impl ProbesConfig {
    /// Whether the decoder parses under `SCHED_IDLE`: `decode_idle` when set, else unless
    /// `shed_below_idle_percent = 0` or a `decode_nice` other than 0 asks for something else.
    pub fn decoder_idle(&self) -> bool {
        self.decode_idle
            .unwrap_or(self.decode_nice == 0 && self.shed_below_idle_percent > 0.0)
    }
}

impl Default for ProbesConfig {
    fn default() -> Self {
        Self {
            ebpf: true,
            ring_buffer_bytes: 4 << 20,
            payload_bytes: 256,
            capture: CaptureMode::Cgroup,
            unix_sockets: UnixSockets::Off,
            flush_interval_ms: 100,
            decode_idle: None,
            decode_nice: 0,
            payload_queue: None,
            shed_below_idle_percent: 15.0,
        }
    }
}

/// Thresholds and cadence of the monitor agent (and of the OS samplers that feed it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// `MONITOR_INTERVAL_MS`: how often OS metrics are sampled and rules evaluated.
    pub interval_ms: u64,
    /// `API_RESPONSE_THRESHOLD_MS`: API p95 above this is slow.
    pub api_response_threshold_ms: u64,
    /// `DB_QUERY_THRESHOLD_MS`: query p95 above this is slow.
    pub db_query_threshold_ms: u64,
    /// `MEMORY_THRESHOLD_PERCENT`: target memory above this share of its limit (or of host
    /// memory when it has none).
    pub memory_threshold_percent: f64,
    /// `CPU_THRESHOLD_PERCENT`: target CPU above this (100 = one core).
    pub cpu_threshold_percent: f64,
    /// Samples in a row over a threshold before an alert fires (and under it before it clears).
    pub consecutive_samples: u32,
    /// Share of 5xx answers (percent) over the window above which a platform's error-rate
    /// alert is a warning ...
    pub error_rate_warning_percent: f64,
    /// ... and above which it is critical.
    pub error_rate_critical_percent: f64,
    /// The trailing window the request and query rules read, every `interval_ms`.
    pub traffic_window_secs: u64,
    /// Fewer requests (or queries) than this in the window say nothing about latency or
    /// errors: the rules count such a sample as healthy.
    pub min_requests: u64,
    /// A request waiting this long with no response of any kind sent since it arrived means
    /// the target is not answering.
    pub not_answering_secs: u64,
    /// A session of a PostgreSQL check's server idle in a transaction for longer than this
    /// raises `db.idle_in_transaction`; `terminate_idle_in_transaction` ends such sessions.
    pub idle_in_transaction_secs: u64,
    /// The target's open file descriptors above this share of its `RLIMIT_NOFILE` raise
    /// `target.fds_high` (a descriptor leak runs into "too many open files").
    pub fd_threshold_percent: f64,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            interval_ms: 5000,
            api_response_threshold_ms: 500,
            db_query_threshold_ms: 100,
            memory_threshold_percent: 85.0,
            cpu_threshold_percent: 80.0,
            consecutive_samples: 3,
            error_rate_warning_percent: 1.0,
            error_rate_critical_percent: 5.0,
            traffic_window_secs: 60,
            min_requests: 20,
            not_answering_secs: 30,
            idle_in_transaction_secs: 60,
            fd_threshold_percent: 90.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentToggle {
    pub enabled: bool,
}

impl Default for AgentToggle {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// `[agents.<name>] enabled = bool`, overridden by `AGENT_<NAME>_ENABLED`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    pub monitor: AgentToggle,
    pub security: AgentToggle,
    pub diagnostic: AgentToggle,
    pub repair: AgentToggle,
    pub learning: AgentToggle,
    pub predictive: AgentToggle,
    pub performance: AgentToggle,
}

impl AgentsConfig {
    pub fn toggle_mut(&mut self, name: &str) -> Option<&mut AgentToggle> {
        Some(match name {
            "monitor" => &mut self.monitor,
            "security" => &mut self.security,
            "diagnostic" => &mut self.diagnostic,
            "repair" => &mut self.repair,
            "learning" => &mut self.learning,
            "predictive" => &mut self.predictive,
            "performance" => &mut self.performance,
            _ => return None,
        })
    }

    pub fn enabled(&self, name: &str) -> bool {
        let toggle = match name {
            "monitor" => &self.monitor,
            "security" => &self.security,
            "diagnostic" => &self.diagnostic,
            "repair" => &self.repair,
            "learning" => &self.learning,
            "predictive" => &self.predictive,
            "performance" => &self.performance,
            _ => return false,
        };
        toggle.enabled
    }
}

/// The repair agent, its safety gate and its playbooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepairConfig {
    /// `ENABLE_SELF_HEALING`: let the repair agent act. Off by default: every decision is a
    /// dry run (recorded as what would have run; nothing runs).
    pub self_healing: bool,
    /// With self-healing on: `auto` (act), `dry-run` or `off` (decide nothing).
    pub mode: Mode,
    /// Per action kind (`restart`, `resize`, `cancel_query`, `terminate_session`, …); the
    /// stricter of this and `mode` applies.
    pub modes: HashMap<ActionKind, Mode>,
    /// After an action, how long before the same kind may run again on the target.
    pub cooldown_secs: u64,
    /// At most this many actions of one kind per `window_secs`; the one past it opens the
    /// circuit for the signature and escalates to a human.
    pub budget: u32,
    pub window_secs: u64,
    /// An open circuit closes by itself after this long.
    pub circuit_reset_secs: u64,
    /// How long an action has to show the recovery (its alert clears, the target's health
    /// checks pass) before it counts as failed and the next candidate is tried.
    pub verify_timeout_secs: u64,
    /// How long a restart may take to show a new running process.
    pub restart_timeout_secs: u64,
    /// How long a stopping target gets after SIGTERM before SIGKILL (and a container's engine
    /// before it kills).
    pub stop_timeout_secs: u64,
    /// How a target chosen by `command` or `pidfile` is started again (program and
    /// arguments). Its output goes to `target-restart.log` in the state directory.
    pub start_command: Vec<String>,
    /// A memory limit is raised by this share of itself.
    pub memory_step_percent: u64,
    /// Candidate actions per signature, replacing the built-in playbook of that signature
    /// (an empty list: do nothing but alert).
    pub playbooks: BTreeMap<String, Vec<String>>,
    /// How much the learned order explores actions tried less often (0: always the best so
    /// far).
    pub exploration: f64,
    /// Which of the database's sessions are the target's, and which of them the session
    /// actions pick.
    pub sessions: SessionRules,
    /// `[[repair.hooks]]`: what only the operator knows how to do (clear a cache, fail over to
    /// another provider), named in playbooks as `hook:<name>`.
    pub hooks: Vec<HookConfig>,
}

/// `[[repair.hooks]]`: a command to run or a URL to POST to, as a playbook action.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    /// Named in playbooks as `hook:<name>`: letters, digits, `_`, `-`, `.`.
    pub name: String,
    /// Program and arguments, run without a shell; the diagnosis comes in its environment
    /// (`SELFHEAL_HOOK`, `SELFHEAL_TARGET`, `SELFHEAL_SIGNATURE`, `SELFHEAL_RULE`,
    /// `SELFHEAL_SUMMARY`, `SELFHEAL_DEPENDENCY`, `SELFHEAL_DIAGNOSIS_ID`). It worked when it
    /// exits 0 within the timeout.
    #[serde(default)]
    pub command: Vec<String>,
    /// An `http://` URL the diagnosis is posted to as JSON; it worked when it answers 2xx
    /// within the timeout. One of `command` and `url`.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default = "default_hook_timeout_ms")]
    pub timeout_ms: u64,
    /// Signatures whose playbook ends with this hook (after its built-in or configured
    /// actions), e.g. `["dependency.down"]` for a provider failover.
    #[serde(default)]
    pub on: Vec<String>,
}

fn default_hook_timeout_ms() -> u64 {
    10_000
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            self_healing: false,
            mode: Mode::Auto,
            modes: HashMap::new(),
            cooldown_secs: 60,
            budget: 3,
            window_secs: 900,
            circuit_reset_secs: 3600,
            verify_timeout_secs: 30,
            restart_timeout_secs: 30,
            stop_timeout_secs: 10,
            start_command: Vec::new(),
            memory_step_percent: 50,
            playbooks: BTreeMap::new(),
            exploration: 0.5,
            sessions: SessionRules::default(),
            hooks: Vec::new(),
        }
    }
}

impl RepairConfig {
    /// The gate's mode: a dry run unless self-healing is on.
    pub fn effective_mode(&self) -> Mode {
        if self.self_healing {
            self.mode
        } else {
            self.mode.max(Mode::DryRun)
        }
    }
}

impl RepairConfig {
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, path: String, message: &str| {
            if !ok {
                problems.push(Problem::new(path, message));
            }
        };
        for (key, value, min, max) in [
            ("cooldown_secs", self.cooldown_secs, 0, 86_400),
            ("budget", u64::from(self.budget), 1, 1000),
            ("window_secs", self.window_secs, 1, 604_800),
            ("circuit_reset_secs", self.circuit_reset_secs, 1, 604_800),
            ("verify_timeout_secs", self.verify_timeout_secs, 1, 3600),
            ("restart_timeout_secs", self.restart_timeout_secs, 1, 3600),
            ("stop_timeout_secs", self.stop_timeout_secs, 1, 3600),
            ("memory_step_percent", self.memory_step_percent, 1, 1000),
            (
                "sessions.running_secs",
                self.sessions.running_secs,
                1,
                86_400,
            ),
        ] {
            check(
                (min..=max).contains(&value),
                format!("repair.{key}"),
                &format!("must be between {min} and {max}"),
            );
        }
        check(
            self.start_command
                .first()
                .is_none_or(|p| !p.trim().is_empty()),
            "repair.start_command".to_owned(),
            "the program (first element) must not be empty",
        );
        check(
            self.exploration.is_finite() && (0.0..=10.0).contains(&self.exploration),
            "repair.exploration".to_owned(),
            "must be between 0 and 10",
        );
        let known_signatures = || {
            format!(
                "unknown signature; known: {}",
                crate::repairs::playbook::SIGNATURES
                    .iter()
                    .map(|(s, _)| *s)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        for (signature, actions) in &self.playbooks {
            check(
                crate::repairs::playbook::is_signature(signature),
                format!("repair.playbooks.{signature}"),
                &known_signatures(),
            );
            for (i, action) in actions.iter().enumerate() {
                let known = match crate::actuators::action::Step::parse(action) {
                    Some(crate::actuators::action::Step::Hook(name)) => {
                        self.hooks.iter().any(|h| h.name == name)
                    }
                    Some(crate::actuators::action::Step::Action(_)) => true,
                    None => false,
                };
                check(
                    known,
                    format!("repair.playbooks.{signature}[{i}]"),
                    &format!(
                        "unknown action {action:?}; known: {}",
                        crate::actuators::action::Action::ALL
                            .iter()
                            .map(|a| a.as_str().to_owned())
                            .chain(self.hooks.iter().map(|h| format!(
                                "{}{}",
                                crate::actuators::action::HOOK_PREFIX,
                                h.name
                            )))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
        }
        for (i, hook) in self.hooks.iter().enumerate() {
            let path = |key: &str| format!("repair.hooks[{i}].{key}");
            check(
                !hook.name.is_empty()
                    && hook
                        .name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')),
                path("name"),
                "must be letters, digits, `_`, `-` or `.` (playbooks name it as hook:<name>)",
            );
            check(
                !self.hooks[..i].iter().any(|h| h.name == hook.name),
                path("name"),
                &format!("a hook named {:?} is already defined", hook.name),
            );
            check(
                hook.command.is_empty() != hook.url.is_none(),
                format!("repair.hooks[{i}]"),
                "set exactly one of `command` (program and arguments) and `url`",
            );
            check(
                hook.command.first().is_none_or(|p| !p.trim().is_empty()),
                path("command"),
                "the program (first element) must not be empty",
            );
            if let Some(url) = &hook.url {
                let parsed = url.parse::<http::Uri>();
                check(
                    parsed.as_ref().is_ok_and(|u| {
                        u.scheme_str() == Some("http") && u.authority().is_some()
                    }),
                    path("url"),
                    "must be an http:// URL with a host (hooks call the backend's own endpoints beside it)",
                );
            }
            check(
                (1..=600_000).contains(&hook.timeout_ms),
                path("timeout_ms"),
                "must be between 1 and 600000",
            );
            for (j, signature) in hook.on.iter().enumerate() {
                check(
                    crate::repairs::playbook::is_signature(signature),
                    format!("repair.hooks[{i}].on[{j}]"),
                    &known_signatures(),
                );
            }
        }
        problems
    }
}

/// `[repair.sessions]`: the target's sessions in `pg_stat_activity` (at least one of
/// `application_name`, `user`, `client_addr` must be set for the session actions to run;
/// superuser and replication sessions are never touched).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionRules {
    pub application_name: Option<String>,
    pub user: Option<String>,
    pub client_addr: Option<String>,
    /// `cancel_slow_queries` cancels statements running longer than this.
    pub running_secs: u64,
}

impl Default for SessionRules {
    fn default() -> Self {
        Self {
            application_name: None,
            user: None,
            client_addr: None,
            running_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `DATABASE_URL`: the target's `PostgreSQL`, for checks and session repairs. Its
    /// `sslmode` (`disable`, `prefer` by default, `require`) decides whether TLS is used.
    pub url: Option<Secret>,
    /// A PEM bundle of certificates trusted for the database server in addition to the web PKI
    /// roots, for the `database` check and the session actuator; absolute. Read at each
    /// connection.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `REDIS_URL`.
    pub url: Option<Secret>,
}

/// The notification channels and their delivery. A channel is on when its key is set
/// (`slack_webhook_url`, `pagerduty_routing_key`, `email_to`, `webhook_url`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    /// `SLACK_WEBHOOK_URL`: a Slack incoming webhook.
    pub slack_webhook_url: Option<Secret>,
    /// `PAGERDUTY_API_KEY`: the Events API v2 routing key.
    pub pagerduty_routing_key: Option<Secret>,
    /// Where PagerDuty events are posted.
    pub pagerduty_url: String,
    /// `ALERT_EMAIL_TO` (comma-separated in the environment): the recipients.
    pub email_to: Vec<String>,
    /// The sender of the emails (`selfheal@example.com` or `selfheal <selfheal@example.com>`).
    pub email_from: Option<String>,
    /// The SMTP relay.
    pub smtp_host: Option<String>,
    pub smtp_port: u16,
    /// `none`, `starttls` (required, not opportunistic) or `tls` (implicit TLS, port 465).
    pub smtp_tls: SmtpTls,
    /// A PEM bundle of certificates trusted for the relay in addition to the web PKI roots (an
    /// internal relay with a private CA); only with `smtp_tls` `starttls` or `tls`. Read when
    /// the email channel is set up.
    pub smtp_ca_file: Option<PathBuf>,
    pub smtp_username: Option<String>,
    /// `SMTP_PASSWORD`.
    pub smtp_password: Option<Secret>,
    /// `ALERT_WEBHOOK_URL`: a generic JSON webhook that receives the stored payload as is.
    pub webhook_url: Option<Secret>,
    /// Headers added to each webhook request (an `Authorization` token, say); the values are
    /// secrets.
    pub webhook_headers: BTreeMap<String, Secret>,
    /// Each delivery attempt (one HTTP request, one SMTP transaction) ends by this.
    pub timeout_ms: u64,
    /// A notification still failing this long after it was enqueued is given up (`failed`).
    pub give_up_after_secs: u64,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self {
            slack_webhook_url: None,
            pagerduty_routing_key: None,
            pagerduty_url: "https://events.pagerduty.com/v2/enqueue".to_owned(),
            email_to: Vec::new(),
            email_from: None,
            smtp_host: None,
            smtp_port: 587,
            smtp_tls: SmtpTls::Starttls,
            smtp_ca_file: None,
            smtp_username: None,
            smtp_password: None,
            webhook_url: None,
            webhook_headers: BTreeMap::new(),
            timeout_ms: 10_000,
            give_up_after_secs: 86_400,
        }
    }
}

/// How the email notifier secures its SMTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Plain text: only for a relay on this host.
    None,
    /// STARTTLS, required: a relay that does not offer it is an error.
    Starttls,
    /// TLS from the first byte (SMTPS).
    Tls,
}

/// The diagnostic agent's optional LLM summary (the rule-based diagnosis stands without it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiagnosticConfig {
    /// `ANTHROPIC_API_KEY`: enables the optional LLM summary of a diagnosis.
    pub anthropic_api_key: Option<Secret>,
    /// Where the Messages API is (`/v1/messages` is appended).
    pub anthropic_base_url: String,
    pub model: String,
    /// Each summary request ends by this; the repair never waits for it.
    pub llm_timeout_ms: u64,
}

impl Default for DiagnosticConfig {
    fn default() -> Self {
        Self {
            anthropic_api_key: None,
            anthropic_base_url: "https://api.anthropic.com".to_owned(),
            model: "claude-sonnet-4-5".to_owned(),
            llm_timeout_ms: 20_000,
        }
    }
}

/// How decoded traffic is labelled: the bounds that keep labels and memory finite.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrafficConfig {
    /// Distinct (platform, method, route template) kept as labels; later ones are counted
    /// under route `other`.
    pub max_routes: usize,
    /// Distinct query fingerprints kept as labels and in the queries view; later ones are
    /// counted under `other`.
    pub max_queries: usize,
    /// Slowest recent requests kept for `GET /api/v1/system/traces`.
    pub slowest_requests: usize,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        Self {
            max_routes: 200,
            max_queries: 100,
            slowest_requests: 20,
        }
    }
}

/// A product platform served by the target, told apart by Host header or path prefix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformConfig {
    pub name: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub path_prefixes: Vec<String>,
    /// Checked like an `http` check named `<name> health` (unless a configured http check
    /// already has this URL).
    pub health_url: Option<String>,
    #[serde(default = "defaults::check_interval_ms")]
    pub health_interval_ms: u64,
    #[serde(default = "defaults::check_timeout_ms")]
    pub health_timeout_ms: u64,
    /// This platform's `monitor.api_response_threshold_ms`, when it differs.
    pub api_response_threshold_ms: Option<u64>,
    /// This platform's `monitor.error_rate_warning_percent`, when it differs.
    pub error_rate_warning_percent: Option<f64>,
    /// This platform's `monitor.error_rate_critical_percent`, when it differs.
    pub error_rate_critical_percent: Option<f64>,
}

impl PlatformConfig {
    /// A platform told apart by `hosts` and `path_prefixes`, every other setting as a config
    /// file that leaves it out would have it.
    pub fn new(name: &str, hosts: &[&str], path_prefixes: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            path_prefixes: path_prefixes.iter().map(|p| (*p).to_owned()).collect(),
            health_url: None,
            health_interval_ms: defaults::check_interval_ms(),
            health_timeout_ms: defaults::check_timeout_ms(),
            api_response_threshold_ms: None,
            error_rate_warning_percent: None,
            error_rate_critical_percent: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Http,
    Tcp,
    Postgres,
    Redis,
}

/// An active integration check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    pub name: String,
    pub kind: CheckKind,
    /// For `http`, `postgres` and `redis`.
    pub url: Option<Secret>,
    /// `host:port`, for `tcp`.
    pub address: Option<String>,
    #[serde(default = "defaults::check_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "defaults::check_timeout_ms")]
    pub timeout_ms: u64,
    pub platform: Option<String>,
    #[serde(default = "defaults::enabled")]
    pub enabled: bool,
    /// A run that succeeds slower than this is `degraded` (default: half of `timeout_ms`).
    pub slow_ms: Option<u64>,
    /// Failed runs in a row before the check's alert fires.
    #[serde(default = "defaults::alert_after_failures")]
    pub alert_after_failures: u32,
    /// `http`: the status expected (default: any 2xx).
    pub expect_status: Option<u16>,
    /// `http`: text the body must contain.
    pub body_contains: Option<String>,
    /// `http`: a field of the JSON body (dotted path, `checks.db`) that must be present and
    /// neither `false` nor `null`, or equal `json_value` when that is set.
    pub json_field: Option<String>,
    pub json_value: Option<String>,
    /// `http`: request headers; a value `env:NAME` is read from the environment at start
    /// (a provider's API key), and a check whose variable is unset is `unknown`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The headers with `env:` values resolved (`None`: the variable is unset).
    #[serde(skip)]
    pub resolved_headers: BTreeMap<String, Option<Secret>>,
    /// `postgres`: connections in use above this share of `max_connections` make the check
    /// `degraded`.
    #[serde(default = "defaults::max_connections_percent")]
    pub max_connections_percent: f64,
    /// `postgres`: a PEM bundle of certificates trusted for the server in addition to the web
    /// PKI roots (a private CA, a self-signed server); absolute. Read at each connection: a file
    /// that cannot be used makes the run `down`, saying why.
    pub ca_file: Option<PathBuf>,
}

mod defaults {
    use std::path::PathBuf;

    pub(super) fn systemd_bus() -> String {
        "system".to_owned()
    }
    pub(super) fn docker_socket() -> PathBuf {
        PathBuf::from("/var/run/docker.sock")
    }
    pub(super) const fn target_poll_interval_ms() -> u64 {
        500
    }
    pub(super) const fn check_interval_ms() -> u64 {
        30_000
    }
    pub(super) const fn check_timeout_ms() -> u64 {
        5_000
    }
    pub(super) const fn enabled() -> bool {
        true
    }
    pub(super) const fn alert_after_failures() -> u32 {
        3
    }
    pub(super) const fn max_connections_percent() -> f64 {
        80.0
    }
}

/// The agents, by config name. Order is the order of the status listings.
pub const AGENT_NAMES: [&str; 7] = [
    "monitor",
    "security",
    "diagnostic",
    "repair",
    "learning",
    "predictive",
    "performance",
];

/// Reads and validates a config file, applying the environment.
pub fn load(path: &Path, env: &Env) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text, env).map_err(|problems| ConfigError::Invalid {
        path: path.to_owned(),
        problems,
    })
}

/// Parses TOML text, applies the environment and validates; returns every problem found.
pub fn parse(text: &str, env: &Env) -> Result<Config, Vec<Problem>> {
    let mut table: toml::Table = match text.parse() {
        Ok(table) => table,
        Err(err) => return Err(vec![syntax_problem(text, &err)]),
    };
    let mut problems = Vec::new();
    let mut removed = HashSet::new();
    // Array elements dropped for a missing required key: the original index of each element
    // left, per array, so later paths (`checks[1]` of what is left) name the file's element.
    let mut kept: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    // Top-level sections that were missing (and are parsed as empty to find the rest).
    let mut missing_sections = Vec::new();
    // Serde stops at the first error. To list them all, drop each offending key (or the array
    // element missing a required key) and try again; the loop ends when the rest parses or an
    // error cannot be pinned to a key.
    let config = loop {
        match serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(table.clone())) {
            Ok(config) => break Some(config),
            Err(err) => {
                let path = err.path().to_string();
                let message = clean_message(&err.inner().to_string());
                if let Some(field) = missing_field(&message) {
                    let full = original_path(&kept, &join_path(&path, field));
                    // The key was dropped because it was bad: that problem is listed already.
                    if !removed.contains(&full) {
                        problems.push(Problem::new(full, "required key is missing"));
                    }
                    if path.is_empty() || path == "." {
                        // A missing section: parse the rest with it empty.
                        if missing_sections.contains(&field.to_owned()) || table.contains_key(field)
                        {
                            break None;
                        }
                        missing_sections.push(field.to_owned());
                        table.insert(field.to_owned(), toml::Value::Table(toml::Table::new()));
                        continue;
                    }
                    if !drop_element(&mut table, &mut kept, &path) || problems.len() > 100 {
                        break None;
                    }
                    continue;
                }
                // For an unknown key the path already ends with the key itself.
                let key_path = path;
                problems.push(Problem::new(original_path(&kept, &key_path), message));
                if key_path == "." || !remove_path(&mut table, &key_path) || problems.len() > 100 {
                    break None;
                }
                removed.insert(original_path(&kept, &key_path));
            }
        }
    };
    let Some(mut config) = config else {
        return Err(problems);
    };
    let found: Vec<Problem> = config
        .apply_env(env)
        .into_iter()
        .chain(config.validate())
        .map(|problem| Problem {
            path: original_path(&kept, &problem.path),
            ..problem
        })
        // A missing section's own problems are the missing section.
        .filter(|problem| {
            !missing_sections
                .iter()
                .any(|section| problem.path.split(['.', '[']).next() == Some(section.as_str()))
        })
        .collect();
    problems.extend(found);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// Drops the array element at `path` (`checks[2]`, as the current table numbers it) and
/// notes which original elements are left; false when `path` is not an array element.
fn drop_element(
    table: &mut toml::Table,
    kept: &mut BTreeMap<String, Vec<usize>>,
    path: &str,
) -> bool {
    if path.contains('.') {
        return false;
    }
    let (key, Some(index)) = split_index(path) else {
        return false;
    };
    let Some(toml::Value::Array(items)) = table.get_mut(key) else {
        return false;
    };
    if index >= items.len() {
        return false;
    }
    let originals = kept
        .entry(key.to_owned())
        .or_insert_with(|| (0..items.len()).collect());
    items.remove(index);
    originals.remove(index);
    true
}

/// `path` with the index of each array whose elements were dropped turned back into the
/// index of the element in the file.
fn original_path(kept: &BTreeMap<String, Vec<usize>>, path: &str) -> String {
    let Some((head, rest)) = path.split_once('[') else {
        return path.to_owned();
    };
    let Some(originals) = kept.get(head) else {
        return path.to_owned();
    };
    let Some((index, tail)) = rest.split_once(']') else {
        return path.to_owned();
    };
    match index.parse::<usize>().ok().and_then(|i| originals.get(i)) {
        Some(original) => format!("{head}[{original}]{tail}"),
        None => path.to_owned(),
    }
}

fn syntax_problem(text: &str, err: &toml::de::Error) -> Problem {
    let location = err.span().map_or_else(String::new, |span| {
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, str::len) + 1;
        format!(" (line {line}, column {column})")
    });
    Problem::new("(syntax)", format!("{}{location}", err.message().trim()))
}

fn clean_message(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_owned()
}

fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

fn join_path(parent: &str, key: &str) -> String {
    if parent.is_empty() || parent == "." {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// Removes `a.b[2].c` from a TOML table; false when the path does not lead anywhere.
fn remove_path(table: &mut toml::Table, path: &str) -> bool {
    let segments: Vec<&str> = path.split('.').collect();
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut current = table;
    for segment in parents {
        let (key, index) = split_index(segment);
        let Some(value) = current.get_mut(key) else {
            return false;
        };
        let value = match (index, value) {
            (Some(i), toml::Value::Array(items)) => match items.get_mut(i) {
                Some(item) => item,
                None => return false,
            },
            (None, value) => value,
            (Some(_), _) => return false,
        };
        match value {
            toml::Value::Table(inner) => current = inner,
            _ => return false,
        }
    }
    let (key, index) = split_index(last);
    match index {
        None => current.remove(key).is_some(),
        Some(i) => match current.get_mut(key) {
            Some(toml::Value::Array(items)) if i < items.len() => {
                // Replacing keeps the other indexes (and so their paths) stable.
                items[i] = toml::Value::Table(toml::Table::new());
                true
            }
            _ => false,
        },
    }
}

fn split_index(segment: &str) -> (&str, Option<usize>) {
    match segment.split_once('[') {
        Some((key, rest)) => (key, rest.trim_end_matches(']').parse().ok()),
        None => (segment, None),
    }
}

impl Config {
    /// Applies the seed environment variables over the file's values.
    fn apply_env(&mut self, env: &Env) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut number = |name: &str, slot: &mut u64| {
            if let Some(raw) = env.get(name) {
                match raw.trim().parse() {
                    Ok(value) => *slot = value,
                    Err(_) => problems.push(Problem::new(
                        format!("env {name}"),
                        format!("expected a whole number, got {raw:?}"),
                    )),
                }
            }
        };
        number("MONITOR_INTERVAL_MS", &mut self.monitor.interval_ms);
        number(
            "API_RESPONSE_THRESHOLD_MS",
            &mut self.monitor.api_response_threshold_ms,
        );
        number(
            "DB_QUERY_THRESHOLD_MS",
            &mut self.monitor.db_query_threshold_ms,
        );
        let mut percent = |name: &str, slot: &mut f64| {
            if let Some(raw) = env.get(name) {
                match raw.trim().parse() {
                    Ok(value) => *slot = value,
                    Err(_) => problems.push(Problem::new(
                        format!("env {name}"),
                        format!("expected a number, got {raw:?}"),
                    )),
                }
            }
        };
        percent(
            "MEMORY_THRESHOLD_PERCENT",
            &mut self.monitor.memory_threshold_percent,
        );
        percent(
            "CPU_THRESHOLD_PERCENT",
            &mut self.monitor.cpu_threshold_percent,
        );
        let mut flag = |name: &str, slot: &mut bool| {
            if let Some(raw) = env.get(name) {
                match parse_bool(raw) {
                    Some(value) => *slot = value,
                    None => problems.push(Problem::new(
                        format!("env {name}"),
                        format!("expected true or false, got {raw:?}"),
                    )),
                }
            }
        };
        flag("ENABLE_SELF_HEALING", &mut self.repair.self_healing);
        for agent in AGENT_NAMES {
            let name = format!("AGENT_{}_ENABLED", agent.to_ascii_uppercase());
            if let Some(toggle) = self.agents.toggle_mut(agent) {
                flag(&name, &mut toggle.enabled);
            }
        }
        let secret = |name: &str, slot: &mut Option<Secret>| {
            if let Some(raw) = env.get(name) {
                *slot = Some(Secret::new(raw));
            }
        };
        secret("DATABASE_URL", &mut self.database.url);
        secret("SELFHEAL_ADMIN_TOKEN", &mut self.admin.token);
        secret("REDIS_URL", &mut self.redis.url);
        secret(
            "SLACK_WEBHOOK_URL",
            &mut self.notifications.slack_webhook_url,
        );
        secret(
            "PAGERDUTY_API_KEY",
            &mut self.notifications.pagerduty_routing_key,
        );
        secret("ANTHROPIC_API_KEY", &mut self.diagnostic.anthropic_api_key);
        for check in &mut self.checks {
            check.resolved_headers = check
                .headers
                .iter()
                .map(|(name, value)| {
                    let resolved = match value.strip_prefix("env:") {
                        Some(variable) => env.get(variable.trim()).map(Secret::new),
                        None => Some(Secret::new(value.clone())),
                    };
                    (name.clone(), resolved)
                })
                .collect();
        }
        secret("SMTP_PASSWORD", &mut self.notifications.smtp_password);
        secret("ALERT_WEBHOOK_URL", &mut self.notifications.webhook_url);
        if let Some(raw) = env.get("ALERT_EMAIL_TO") {
            self.notifications.email_to = raw
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
        }
        problems
    }

    /// Checks values that parse but make no sense; returns every problem.
    fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, path: &str, message: &str| {
            if !ok {
                problems.push(Problem::new(path, message));
            }
        };

        let target = &self.target;
        let set = [
            target.pid.is_some(),
            target.pidfile.is_some(),
            target.command.is_some(),
            target.cgroup.is_some(),
            target.systemd_unit.is_some(),
            target.container.is_some(),
        ]
        .iter()
        .filter(|set| **set)
        .count();
        check(
            set == 1,
            "target",
            &format!(
                "exactly one of pid, pidfile, command, cgroup, systemd_unit, container must be \
                 set ({set} are)"
            ),
        );
        check(
            target.pid != Some(0),
            "target.pid",
            "must be a positive process id",
        );
        check(
            target
                .command
                .as_deref()
                .is_none_or(|c| !c.trim().is_empty()),
            "target.command",
            "must not be empty",
        );
        check(
            target
                .cgroup
                .as_deref()
                .is_none_or(|p| p.starts_with("/sys/fs/cgroup")),
            "target.cgroup",
            "must be a directory under /sys/fs/cgroup",
        );
        check(
            target
                .systemd_unit
                .as_deref()
                .is_none_or(|u| u.contains('.') && !u.contains('/')),
            "target.systemd_unit",
            "must be a unit name such as backend.service",
        );
        check(
            target
                .container
                .as_deref()
                .is_none_or(|c| !c.trim().is_empty() && !c.contains('/')),
            "target.container",
            "must be a container name or id",
        );
        check(
            matches!(target.systemd_bus.as_str(), "system" | "user")
                || target.systemd_bus.starts_with("unix:"),
            "target.systemd_bus",
            "must be \"system\", \"user\" or a D-Bus address such as unix:path=/run/bus",
        );
        check(
            (50..=60_000).contains(&target.poll_interval_ms),
            "target.poll_interval_ms",
            "must be between 50 and 60000",
        );

        check(
            self.admin.listen.parse::<SocketAddr>().is_ok(),
            "admin.listen",
            "must be an address such as 127.0.0.1:9797",
        );
        check(
            self.admin
                .token_file
                .as_deref()
                .is_none_or(Path::is_absolute),
            "admin.token_file",
            "must be an absolute path",
        );
        check(
            self.admin.socket.as_deref().is_none_or(|path| {
                path.is_absolute() && path.as_os_str().len() < 108 && path.file_name().is_some()
            }),
            "admin.socket",
            "must be an absolute file path shorter than 108 bytes",
        );
        check(
            self.state.dir.is_absolute(),
            "state.dir",
            "must be an absolute path",
        );
        check(
            self.state.db_path.as_deref().is_none_or(Path::is_absolute),
            "state.db_path",
            "must be an absolute path",
        );
        check(
            (1..=36_500).contains(&self.state.retention_days),
            "state.retention_days",
            "must be between 1 and 36500",
        );
        check(
            (1..=600_000).contains(&self.state.busy_timeout_ms),
            "state.busy_timeout_ms",
            "must be between 1 and 600000",
        );
        check(
            self.alerts.notify_interval_secs <= 30 * 86_400,
            "alerts.notify_interval_secs",
            "must be at most 2592000 (30 days)",
        );
        check(
            self.alerts.group_window_secs <= 86_400,
            "alerts.group_window_secs",
            "must be at most 86400 (a day)",
        );

        let ring = self.probes.ring_buffer_bytes;
        check(
            ring.is_power_of_two() && (4096..=(256 << 20)).contains(&ring),
            "probes.ring_buffer_bytes",
            "must be a power of two between 4096 and 268435456",
        );
        check(
            self.probes.payload_bytes as usize <= selfheal_ebpf::MAX_CAPTURE,
            "probes.payload_bytes",
            "must be at most 512 (0 turns payload capture off)",
        );
        check(
            (1..=1000).contains(&self.probes.flush_interval_ms),
            "probes.flush_interval_ms",
            "must be between 1 and 1000",
        );
        check(
            (0..=19).contains(&self.probes.decode_nice),
            "probes.decode_nice",
            "must be between 0 and 19",
        );
        check(
            self.probes.decode_nice == 0 || self.probes.decode_idle != Some(true),
            "probes.decode_nice",
            "does not apply with probes.decode_idle = true (under SCHED_IDLE the decoder \
             already yields to every other thread): set one of them",
        );
        check(
            (0.0..=100.0).contains(&self.probes.shed_below_idle_percent),
            "probes.shed_below_idle_percent",
            "must be between 0 and 100",
        );

        let monitor = &self.monitor;
        check(
            (100..=3_600_000).contains(&monitor.interval_ms),
            "monitor.interval_ms",
            "must be between 100 and 3600000",
        );
        check(
            monitor.api_response_threshold_ms > 0,
            "monitor.api_response_threshold_ms",
            "must be positive",
        );
        check(
            monitor.db_query_threshold_ms > 0,
            "monitor.db_query_threshold_ms",
            "must be positive",
        );
        check(
            monitor.memory_threshold_percent > 0.0 && monitor.memory_threshold_percent <= 100.0,
            "monitor.memory_threshold_percent",
            "must be in (0, 100]",
        );
        check(
            monitor.cpu_threshold_percent > 0.0 && monitor.cpu_threshold_percent <= 100_000.0,
            "monitor.cpu_threshold_percent",
            "must be positive (100 means one full core)",
        );
        check(
            (1..=1000).contains(&monitor.consecutive_samples),
            "monitor.consecutive_samples",
            "must be between 1 and 1000",
        );
        let percent_ok = |p: f64| p > 0.0 && p <= 100.0;
        check(
            percent_ok(monitor.error_rate_warning_percent),
            "monitor.error_rate_warning_percent",
            "must be in (0, 100]",
        );
        check(
            percent_ok(monitor.error_rate_critical_percent)
                && monitor.error_rate_critical_percent >= monitor.error_rate_warning_percent,
            "monitor.error_rate_critical_percent",
            "must be in (0, 100] and at least error_rate_warning_percent",
        );
        check(
            (1..=86_400).contains(&monitor.not_answering_secs),
            "monitor.not_answering_secs",
            "must be between 1 and 86400",
        );
        check(
            (1..=86_400).contains(&monitor.idle_in_transaction_secs),
            "monitor.idle_in_transaction_secs",
            "must be between 1 and 86400",
        );
        check(
            monitor.fd_threshold_percent > 0.0 && monitor.fd_threshold_percent <= 100.0,
            "monitor.fd_threshold_percent",
            "must be in (0, 100]",
        );
        check(
            (10..=86_400).contains(&monitor.traffic_window_secs),
            "monitor.traffic_window_secs",
            "must be between 10 and 86400",
        );
        for (i, platform) in self.platforms.iter().enumerate() {
            let at = |key: &str| format!("platforms[{i}].{key}");
            if let Some(ms) = platform.api_response_threshold_ms {
                check(ms > 0, &at("api_response_threshold_ms"), "must be positive");
            }
            let warning = platform
                .error_rate_warning_percent
                .unwrap_or(monitor.error_rate_warning_percent);
            let critical = platform
                .error_rate_critical_percent
                .unwrap_or(monitor.error_rate_critical_percent);
            if platform.error_rate_warning_percent.is_some() {
                check(
                    percent_ok(warning),
                    &at("error_rate_warning_percent"),
                    "must be in (0, 100]",
                );
            }
            if platform.error_rate_critical_percent.is_some()
                || platform.error_rate_warning_percent.is_some()
            {
                let inherited = if platform.error_rate_critical_percent.is_none() {
                    " (inherited from monitor.error_rate_critical_percent)"
                } else {
                    ""
                };
                check(
                    percent_ok(critical) && critical >= warning,
                    &at("error_rate_critical_percent"),
                    &format!(
                        "{critical}{inherited} must be in (0, 100] and at least the platform's warning percent {warning}"
                    ),
                );
            }
        }

        for problem in self.store.problems() {
            // Each reads `key: message`.
            let text = problem.to_string();
            let (key, message) = text.split_once(": ").unwrap_or(("", text.as_str()));
            problems.push(Problem::new(format!("store.{key}"), message));
        }
        let mut check = |ok: bool, path: &str, message: &str| {
            if !ok {
                problems.push(Problem::new(path, message));
            }
        };
        check(
            self.store.max_bytes >= 1 << 20,
            "store.max_bytes",
            "must be at least 1048576 (1 MiB)",
        );
        check(
            (1..=1_000_000).contains(&self.store.max_series),
            "store.max_series",
            "must be between 1 and 1000000",
        );
        check(
            (1..=10_000).contains(&self.traffic.max_routes),
            "traffic.max_routes",
            "must be between 1 and 10000",
        );
        check(
            (1..=10_000).contains(&self.traffic.max_queries),
            "traffic.max_queries",
            "must be between 1 and 10000",
        );
        check(
            (1..=1000).contains(&self.traffic.slowest_requests),
            "traffic.slowest_requests",
            "must be between 1 and 1000",
        );
        check(
            self.admin
                .token
                .as_ref()
                .is_none_or(|t| t.expose().trim().len() >= 16),
            "env SELFHEAL_ADMIN_TOKEN",
            "must be at least 16 characters",
        );

        problems.extend(self.notifications.problems());
        let mut check = |ok: bool, path: &str, message: &str| {
            if !ok {
                problems.push(Problem::new(path, message));
            }
        };

        let mut names = HashSet::new();
        for (i, platform) in self.platforms.iter().enumerate() {
            let at = |key: &str| format!("platforms[{i}].{key}");
            check(
                !platform.name.trim().is_empty(),
                &at("name"),
                "must not be empty",
            );
            check(
                is_label_safe(&platform.name),
                &at("name"),
                "must be at most 100 characters without quotes, backslashes or control characters (it is a metric label)",
            );
            check(
                names.insert(platform.name.as_str()),
                &at("name"),
                "duplicate platform name",
            );
            check(
                !platform.hosts.is_empty() || !platform.path_prefixes.is_empty(),
                &at("hosts"),
                "a platform needs hosts or path_prefixes to match requests",
            );
            check(
                platform.path_prefixes.iter().all(|p| p.starts_with('/')),
                &at("path_prefixes"),
                "each prefix must start with /",
            );
            if let Some(url) = &platform.health_url {
                check(
                    is_http_url(url),
                    &at("health_url"),
                    "must be an http:// or https:// URL",
                );
            }
        }

        if let Some(path) = &self.database.ca_file {
            // Without database.url it is unused, like the rest of the section.
            check(
                path.is_absolute(),
                "database.ca_file",
                "must be an absolute path",
            );
        }

        let mut check_names = HashSet::new();
        for (i, c) in self.checks.iter().enumerate() {
            let at = |key: &str| format!("checks[{i}].{key}");
            check(!c.name.trim().is_empty(), &at("name"), "must not be empty");
            check(
                is_label_safe(&c.name),
                &at("name"),
                "must be at most 100 characters without quotes, backslashes or control characters (it is a metric label)",
            );
            check(
                check_names.insert(c.name.as_str()),
                &at("name"),
                "duplicate check name",
            );
            match c.kind {
                CheckKind::Http => check(
                    c.url.as_ref().is_some_and(|u| is_http_url(u.expose())),
                    &at("url"),
                    "an http check needs an http:// or https:// url",
                ),
                CheckKind::Postgres => check(
                    c.url.as_ref().is_some_and(|u| {
                        (u.expose().starts_with("postgres://")
                            || u.expose().starts_with("postgresql://"))
                            && u.expose()
                                .parse::<tokio_postgres::Config>()
                                .is_ok_and(|parsed| !parsed.get_hosts().is_empty())
                    }),
                    &at("url"),
                    "a postgres check needs a valid postgres://user@host:port/database url \
                     (sslmode, when set: disable, prefer or require)",
                ),
                CheckKind::Redis => check(
                    c.url
                        .as_ref()
                        .is_some_and(|u| u.expose().starts_with("redis://")),
                    &at("url"),
                    "a redis check needs a redis:// url",
                ),
                CheckKind::Tcp => check(
                    c.address.as_deref().is_some_and(|a| {
                        a.parse::<SocketAddr>().is_ok()
                            || a.rsplit_once(':').is_some_and(|(host, port)| {
                                port.parse::<u16>().is_ok_and(|p| p > 0)
                                    && !host.is_empty()
                                    && host.chars().all(|ch| {
                                        ch.is_ascii_alphanumeric() || ch == '.' || ch == '-'
                                    })
                            })
                    }),
                    &at("address"),
                    "a tcp check needs an address such as 127.0.0.1:5432",
                ),
            }
            check(
                (1000..=86_400_000).contains(&c.interval_ms),
                &at("interval_ms"),
                "must be between 1000 and 86400000",
            );
            check(
                c.timeout_ms > 0 && c.timeout_ms < c.interval_ms,
                &at("timeout_ms"),
                "must be positive and shorter than interval_ms",
            );
            if let Some(platform) = &c.platform {
                check(
                    self.platforms.iter().any(|p| &p.name == platform),
                    &at("platform"),
                    "names no platform of [[platforms]]",
                );
            }
            if let Some(slow) = c.slow_ms {
                check(
                    slow > 0 && slow <= c.timeout_ms,
                    &at("slow_ms"),
                    "must be positive and at most timeout_ms",
                );
            }
            check(
                (1..=100).contains(&c.alert_after_failures),
                &at("alert_after_failures"),
                "must be between 1 and 100",
            );
            check(
                c.max_connections_percent > 0.0 && c.max_connections_percent <= 100.0,
                &at("max_connections_percent"),
                "must be above 0 and at most 100",
            );
            if let Some(status) = c.expect_status {
                check(
                    (100..=599).contains(&status),
                    &at("expect_status"),
                    "must be an HTTP status (100-599)",
                );
            }
            check(
                c.kind == CheckKind::Tcp || c.address.is_none(),
                &at("address"),
                "applies to tcp checks only",
            );
            check(
                c.kind != CheckKind::Tcp || c.url.is_none(),
                &at("url"),
                "a tcp check takes address, not url",
            );
            check(
                c.kind == CheckKind::Postgres
                    || (c.max_connections_percent - defaults::max_connections_percent()).abs()
                        < f64::EPSILON,
                &at("max_connections_percent"),
                "applies to postgres checks only",
            );
            for (name, value) in &c.headers {
                check(
                    value
                        .strip_prefix("env:")
                        .is_none_or(|variable| !variable.trim().is_empty()),
                    &at(&format!("headers.{name}")),
                    "env: needs a variable name (env:PROVIDER_TOKEN)",
                );
            }
            let http_only = c.expect_status.is_some()
                || c.body_contains.is_some()
                || c.json_field.is_some()
                || c.json_value.is_some()
                || !c.headers.is_empty();
            check(
                c.kind == CheckKind::Http || !http_only,
                &at("kind"),
                "expect_status, body_contains, json_field, json_value and headers apply to http checks only",
            );
            check(
                c.json_value.is_none() || c.json_field.is_some(),
                &at("json_value"),
                "needs json_field",
            );
            if let Some(path) = &c.ca_file {
                check(
                    c.kind == CheckKind::Postgres,
                    &at("ca_file"),
                    "applies to postgres checks only",
                );
                check(
                    path.is_absolute(),
                    &at("ca_file"),
                    "must be an absolute path",
                );
            }
            for (name, value) in &c.headers {
                check(
                    http::HeaderName::from_bytes(name.as_bytes()).is_ok(),
                    &at(&format!("headers.{name}")),
                    "is not a valid header name",
                );
                check(
                    value.starts_with("env:") || http::HeaderValue::from_str(value).is_ok(),
                    &at(&format!("headers.{name}")),
                    "is not a valid header value",
                );
            }
        }
        for (i, platform) in self.platforms.iter().enumerate() {
            let at = |key: &str| format!("platforms[{i}].{key}");
            check(
                (1000..=86_400_000).contains(&platform.health_interval_ms),
                &at("health_interval_ms"),
                "must be between 1000 and 86400000",
            );
            check(
                platform.health_timeout_ms > 0
                    && platform.health_timeout_ms < platform.health_interval_ms,
                &at("health_timeout_ms"),
                "must be positive and shorter than health_interval_ms",
            );
        }
        problems.extend(self.repair.problems());
        let diagnostic = &self.diagnostic;
        if !(diagnostic.anthropic_base_url.starts_with("http://")
            || diagnostic.anthropic_base_url.starts_with("https://"))
        {
            problems.push(Problem::new(
                "diagnostic.anthropic_base_url",
                "must be an http:// or https:// URL",
            ));
        }
        if diagnostic.model.trim().is_empty() {
            problems.push(Problem::new("diagnostic.model", "must not be empty"));
        }
        if !(100..=600_000).contains(&diagnostic.llm_timeout_ms) {
            problems.push(Problem::new(
                "diagnostic.llm_timeout_ms",
                "must be between 100 and 600000",
            ));
        }
        problems
    }

    /// The admin address; valid after validation.
    pub fn admin_listen(&self) -> SocketAddr {
        self.admin
            .listen
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9797)))
    }
}

impl NotificationsConfig {
    /// The problems of `[notifications]`, each with its key path.
    fn problems(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, path: &str, message: &str| {
            if !ok {
                problems.push(Problem::new(format!("notifications.{path}"), message));
            }
        };
        // URLs are secrets (a Slack webhook's path is its key): messages never repeat them.
        let url_ok = |url: Option<&Secret>| url.is_none_or(|u| is_http_url(u.expose()));
        check(
            url_ok(self.slack_webhook_url.as_ref()),
            "slack_webhook_url",
            "must be an http:// or https:// URL",
        );
        check(
            url_ok(self.webhook_url.as_ref()),
            "webhook_url",
            "must be an http:// or https:// URL",
        );
        check(
            is_http_url(&self.pagerduty_url),
            "pagerduty_url",
            "must be an http:// or https:// URL",
        );
        check(
            self.pagerduty_routing_key
                .as_ref()
                .is_none_or(|k| !k.expose().trim().is_empty()),
            "pagerduty_routing_key",
            "must not be empty",
        );
        for (name, value) in &self.webhook_headers {
            check(
                http::HeaderName::from_bytes(name.as_bytes()).is_ok(),
                &format!("webhook_headers.{name}"),
                "is not a valid HTTP header name",
            );
            check(
                http::HeaderValue::from_str(value.expose()).is_ok(),
                &format!("webhook_headers.{name}"),
                "the value is not a valid HTTP header value",
            );
        }
        if !self.webhook_headers.is_empty() {
            check(
                self.webhook_url.is_some(),
                "webhook_headers",
                "set without webhook_url",
            );
        }
        for (i, to) in self.email_to.iter().enumerate() {
            check(
                to.parse::<lettre::message::Mailbox>().is_ok(),
                &format!("email_to[{i}]"),
                "must be an email address",
            );
        }
        if let Some(from) = &self.email_from {
            check(
                from.parse::<lettre::message::Mailbox>().is_ok(),
                "email_from",
                "must be an email address, optionally with a name: \"selfheal <selfheal@example.com>\"",
            );
        }
        if !self.email_to.is_empty() {
            check(
                self.smtp_host.is_some(),
                "smtp_host",
                "required when email_to is set",
            );
            check(
                self.email_from.is_some(),
                "email_from",
                "required when email_to is set",
            );
        }
        if let Some(host) = &self.smtp_host {
            check(
                !host.trim().is_empty() && !host.contains(['/', ' ', ':']),
                "smtp_host",
                "must be a host name or an IPv4 address (the port is smtp_port)",
            );
        }
        check(self.smtp_port != 0, "smtp_port", "must not be 0");
        if let Some(path) = &self.smtp_ca_file {
            check(
                self.smtp_tls != SmtpTls::None,
                "smtp_ca_file",
                "only used with smtp_tls = \"starttls\" or \"tls\"",
            );
            check(
                path.is_absolute(),
                "smtp_ca_file",
                "must be an absolute path",
            );
        }
        if !self.email_to.is_empty() {
            check(
                self.smtp_username.is_some() == self.smtp_password.is_some(),
                if self.smtp_username.is_some() {
                    "smtp_password"
                } else {
                    "smtp_username"
                },
                "smtp_username and smtp_password (or SMTP_PASSWORD) go together",
            );
            let local = self.smtp_host.as_deref().is_some_and(|h| {
                h == "localhost"
                    || h.parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            });
            check(
                self.smtp_tls != SmtpTls::None || self.smtp_password.is_none() || local,
                "smtp_tls",
                "\"none\" would send the SMTP password in clear text to a remote host; use \"starttls\" or \"tls\"",
            );
        }
        check(
            (100..=120_000).contains(&self.timeout_ms),
            "timeout_ms",
            "must be between 100 and 120000",
        );
        check(
            (60..=30 * 86_400).contains(&self.give_up_after_secs),
            "give_up_after_secs",
            "must be between 60 and 2592000 (30 days)",
        );
        problems
    }
}

fn parse_bool(raw: &str) -> Option<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Usable as a metric label value and in an alert key: no quotes, backslashes or control
/// characters (the OpenMetrics text would need escapes some scrapers get wrong), not too long.
fn is_label_safe(text: &str) -> bool {
    text.chars().count() <= 100
        && !text
            .chars()
            .any(|c| c == '"' || c == '\\' || c.is_control())
}

fn is_http_url(url: &str) -> bool {
    url.parse::<http::Uri>()
        .is_ok_and(|uri| matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        parse(text, &Env::default())
            .err()
            .unwrap_or_default()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn store_and_traffic_bounds_are_checked_with_their_key_paths() {
        let found = problems(
            "[target]\npid = 1\n[store]\nmax_bytes = 1000\nsnapshot_interval_secs = 0\n\
             tiers = [{ resolution_ms = 0, retention_ms = 10 }]\n\
             [traffic]\nmax_routes = 0\nmax_queries = 100000\n",
        );
        for expected in [
            "store.max_bytes: must be at least 1048576 (1 MiB)",
            "store.snapshot_interval_secs: must be between 1 and 86400",
            "store.tiers[0].resolution_ms: must be positive",
            "traffic.max_routes: must be between 1 and 10000",
            "traffic.max_queries: must be between 1 and 10000",
        ] {
            assert!(
                found.iter().any(|p| p == expected),
                "{expected} not in {found:#?}"
            );
        }
        let env = Env::from_pairs([("SELFHEAL_ADMIN_TOKEN", "short")]);
        let found = parse("[target]\npid = 1\n", &env).expect_err("short token");
        assert!(found
            .iter()
            .any(|p| p.to_string() == "env SELFHEAL_ADMIN_TOKEN: must be at least 16 characters"));
    }

    #[test]
    fn a_missing_required_key_does_not_hide_the_other_problems() {
        let found = problems(
            r#"
[monitor]
not_answering_secs = "30"
[notifications]
email_to = "ops@example.com"
[[platforms]]
name = "shop"
hosts = ["shop.example"]
health_interval_ms = -5
[[checks]]
name = "no-kind"
url = "http://127.0.0.1/"
[[checks]]
kind = "tcp"
address = "127.0.0.1:1"
[[checks]]
name = "third"
kind = "tcp"
address = "127.0.0.1:1"
timeout_ms = "5s"
[[checks]]
name = "fourth"
kind = "smtp"
"#,
        );
        let paths: Vec<&str> = found
            .iter()
            .map(|p| p.split(": ").next().unwrap_or_default())
            .collect();
        for expected in [
            "target",
            "monitor.not_answering_secs",
            "notifications.email_to",
            "platforms[0].health_interval_ms",
            "checks[0].kind",
            "checks[1].name",
            // Indexes stay the file's, though the elements before were set aside.
            "checks[2].timeout_ms",
            "checks[3].kind",
        ] {
            assert!(paths.contains(&expected), "{expected} not in {found:#?}");
        }
        // The missing section is one problem, not also "no selector".
        assert_eq!(
            paths.iter().filter(|p| p.starts_with("target")).count(),
            1,
            "{found:#?}"
        );
    }

    #[test]
    fn minimal_config_gets_the_seed_defaults() {
        let config = parse("[target]\npid = 42\n", &Env::default()).expect("valid");
        assert_eq!(config.target.selector(), Some(TargetSelector::Pid(42)));
        assert_eq!(config.admin.listen, "127.0.0.1:9797");
        assert_eq!(config.monitor.interval_ms, 5000);
        assert_eq!(config.monitor.api_response_threshold_ms, 500);
        assert_eq!(config.monitor.db_query_threshold_ms, 100);
        assert!((config.monitor.memory_threshold_percent - 85.0).abs() < f64::EPSILON);
        assert!((config.monitor.cpu_threshold_percent - 80.0).abs() < f64::EPSILON);
        assert!(AGENT_NAMES.iter().all(|a| config.agents.enabled(a)));
        assert!(!config.repair.self_healing);
        assert_eq!(
            config.state.db_path(),
            PathBuf::from("/var/lib/selfheal/state.db")
        );
        assert_eq!(config.state.retention_days, 90);
        assert_eq!(config.alerts.notify_interval_secs, 3600);
    }

    #[test]
    fn state_and_alerts_keys_are_checked_with_their_key_paths() {
        let found = problems(
            "[target]\npid = 1\n[state]\ndb_path = \"relative.db\"\nretention_days = 0\n\
             busy_timeout_ms = 0\nkeep = 1\n[alerts]\nnotify_interval_secs = 99999999\n\
             group_window_secs = 100000\n",
        );
        for expected in [
            "state.keep: unknown field",
            "state.db_path: must be an absolute path",
            "state.retention_days: must be between 1 and 36500",
            "state.busy_timeout_ms: must be between 1 and 600000",
            "alerts.notify_interval_secs: must be at most 2592000 (30 days)",
            "alerts.group_window_secs: must be at most 86400 (a day)",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "{expected} not in {found:#?}"
            );
        }
        let config = parse(
            "[target]\npid = 1\n[state]\ndb_path = \"/data/selfheal.db\"\n",
            &Env::default(),
        )
        .expect("valid");
        assert_eq!(config.state.db_path(), PathBuf::from("/data/selfheal.db"));
    }

    #[test]
    fn every_unknown_key_is_listed_with_its_path() {
        let found = problems(
            "[target]\npidd = 1\ncommand = \"x\"\n[admin]\nlisten = \"127.0.0.1:1\"\nport = 3\n\
             [monitor]\ninterval_ms = \"fast\"\n[[platforms]]\nname = \"a\"\nhosts = [\"a\"]\nhealth = 1\n",
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("target.pidd: unknown field")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("admin.port: unknown field")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("monitor.interval_ms: invalid type")),
            "{found:?}"
        );
        assert!(
            found
                .iter()
                .any(|p| p.starts_with("platforms[0].health: unknown field")),
            "{found:?}"
        );
        assert_eq!(found.len(), 4, "{found:?}");
    }

    #[test]
    fn capture_modes_parse_and_a_wrong_one_is_named() {
        let config = parse(
            "[target]\npid = 1\n[probes]\ncapture = \"cgroup\"\nunix_sockets = \"always\"\n",
            &Env::default(),
        )
        .expect("valid");
        assert_eq!(config.probes.capture, CaptureMode::Cgroup);
        assert_eq!(config.probes.unix_sockets, UnixSockets::Always);
        assert_eq!(
            ProbesConfig::default().unix_sockets,
            UnixSockets::Off,
            "the default: no other process pays for the capture"
        );
        let found = problems("[target]\npid = 1\n[probes]\nunix_sockets = \"sometimes\"\n");
        assert!(
            found.iter().any(|p| p.starts_with(
                "probes.unix_sockets: unknown variant `sometimes`, expected one of `auto`, `always`, `off`"
            )),
            "{found:?}"
        );
    }

    /// The shipped example says what the defaults are: a file without `[probes]` and the
    /// example's `[probes]` give the same capture (on, on the target's cgroup, unix sockets
    /// only counted).
    #[test]
    fn the_example_config_states_the_probes_defaults() {
        let example = parse(include_str!("../../config/selfheal.toml"), &Env::default())
            .expect("the example config is valid");
        let bare = parse("[target]\npid = 1\n", &Env::default()).expect("valid");
        for probes in [&example.probes, &bare.probes] {
            assert_eq!(probes.payload_bytes, 256, "capture on by default");
            assert_eq!(probes.capture, CaptureMode::Cgroup);
            assert_eq!(probes.unix_sockets, UnixSockets::Off);
            assert_eq!(probes.ring_buffer_bytes, 4 << 20);
            assert_eq!(probes.flush_interval_ms, 100);
            assert!((probes.shed_below_idle_percent - 15.0).abs() < f64::EPSILON);
            assert!(probes.decoder_idle());
        }
    }

    #[test]
    fn the_decoder_runs_idle_unless_asked_for_a_nice_value() {
        let probes = |text: &str| {
            parse(
                &format!("[target]\npid = 1\n[probes]\n{text}"),
                &Env::default(),
            )
            .expect("valid")
            .probes
        };
        assert!(probes("").decoder_idle(), "the default");
        // Exact counts need a decoder that keeps up; a nice value says what is wanted.
        assert!(!probes("shed_below_idle_percent = 0\n").decoder_idle());
        let niced = probes("decode_nice = 19\n");
        assert!(!niced.decoder_idle());
        assert_eq!(niced.decode_nice, 19);
        // Said outright, it wins.
        assert!(probes("shed_below_idle_percent = 0\ndecode_idle = true\n").decoder_idle());
        assert!(!probes("decode_idle = false\n").decoder_idle());
        let niced = probes("decode_idle = false\ndecode_nice = 19\n");
        assert!(!niced.decoder_idle());
        assert_eq!(niced.decode_nice, 19);
        let found = problems("[target]\npid = 1\n[probes]\ndecode_idle = true\ndecode_nice = 19\n");
        assert!(
            found.iter().any(|p| p
                .starts_with("probes.decode_nice: does not apply with probes.decode_idle = true")),
            "{found:?}"
        );
    }

    #[test]
    fn an_old_config_with_payload_queue_still_loads() {
        let config = parse(
            "[target]\npid = 1\n[probes]\npayload_queue = 16384\n",
            &Env::default(),
        )
        .expect("payload_queue is accepted (and ignored, with a warning at start)");
        assert_eq!(config.probes.payload_queue, Some(16_384));
    }

    #[test]
    fn semantic_problems_are_all_listed() {
        let found = problems(
            "[target]\npid = 1\ncommand = \"x\"\n[admin]\nlisten = \"nowhere\"\n\
             [monitor]\nmemory_threshold_percent = 150.0\n[probes]\nring_buffer_bytes = 1000\n\
             [[checks]]\nname = \"c\"\nkind = \"http\"\nurl = \"ftp://x\"\nplatform = \"nope\"\n",
        );
        for expected in [
            "target: exactly one of",
            "admin.listen:",
            "monitor.memory_threshold_percent:",
            "probes.ring_buffer_bytes:",
            "checks[0].url:",
            "checks[0].platform:",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "missing {expected}: {found:?}"
            );
        }
    }

    #[test]
    fn a_bad_required_key_is_reported_once() {
        let found = problems("[target]\npid = \"abc\"\n");
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("target.pid: invalid type"),
            "{found:?}"
        );
        assert!(found[1].starts_with("target: exactly one"), "{found:?}");
        let found = problems("[admin]\n");
        assert_eq!(found, vec!["target: required key is missing".to_owned()]);
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let found = problems("[target]\npid = = 3\n");
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("line 2"), "{found:?}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let env = Env::from_pairs([
            ("MONITOR_INTERVAL_MS", "1000"),
            ("CPU_THRESHOLD_PERCENT", "95.5"),
            ("AGENT_SECURITY_ENABLED", "false"),
            ("ENABLE_SELF_HEALING", "true"),
            ("DATABASE_URL", "postgres://u:secret@localhost/db"),
            ("ALERT_EMAIL_TO", "a@x.io, b@x.io"),
        ]);
        // Email needs its relay and sender from the file.
        let config = parse(
            "[target]\npid = 7\n[monitor]\ninterval_ms = 3000\n[notifications]\n\
             smtp_host = \"mail.x.io\"\nemail_from = \"selfheal@x.io\"\n",
            &env,
        )
        .expect("valid");
        assert_eq!(config.monitor.interval_ms, 1000);
        assert!((config.monitor.cpu_threshold_percent - 95.5).abs() < f64::EPSILON);
        assert!(!config.agents.enabled("security"));
        assert!(config.agents.enabled("monitor"));
        assert!(config.repair.self_healing);
        assert_eq!(config.notifications.email_to, ["a@x.io", "b@x.io"]);
        assert!(
            !format!("{config:?}").contains("secret"),
            "secrets must not be printed"
        );
    }

    #[test]
    fn notification_keys_are_checked_with_their_key_paths() {
        let env = Env::from_pairs([
            ("SMTP_PASSWORD", "hunter2"),
            ("ALERT_WEBHOOK_URL", "ftp://hooks.example.com/secret-token"),
        ]);
        let found = parse(
            "[target]\npid = 1\n[notifications]\nemail_to = [\"ops@x.io\", \"not an address\"]\n\
             smtp_host = \"mail.x.io\"\nsmtp_tls = \"none\"\nslack_webhook_url = \"hooks.slack.com/T/B/K\"\n\
             pagerduty_url = \"nowhere\"\ntimeout_ms = 0\ngive_up_after_secs = 1\n\
             webhook_headers = { \"bad header\" = \"x\" }\n",
            &env,
        )
        .expect_err("invalid")
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
        for expected in [
            "notifications.slack_webhook_url: must be an http:// or https:// URL",
            "notifications.webhook_url: must be an http:// or https:// URL",
            "notifications.pagerduty_url: must be an http:// or https:// URL",
            "notifications.webhook_headers.bad header: is not a valid HTTP header name",
            "notifications.email_to[1]: must be an email address",
            "notifications.email_from: required when email_to is set",
            "notifications.smtp_username: smtp_username and smtp_password",
            "notifications.smtp_tls: \"none\" would send the SMTP password in clear text",
            "notifications.timeout_ms: must be between 100 and 120000",
            "notifications.give_up_after_secs: must be between 60",
        ] {
            assert!(
                found.iter().any(|p| p.starts_with(expected)),
                "{expected} not in {found:#?}"
            );
        }
        assert_eq!(found.len(), 10, "{found:#?}");
        let text = format!("{found:?}");
        for secret in ["hunter2", "secret-token", "T/B/K"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }

        let env = Env::from_pairs([
            ("SMTP_PASSWORD", "hunter2"),
            ("ALERT_WEBHOOK_URL", "https://hooks.example.com/x"),
            ("ALERT_EMAIL_TO", "ops@x.io"),
        ]);
        let config = parse(
            "[target]\npid = 1\n[notifications]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = 2525\n\
             smtp_tls = \"none\"\nsmtp_username = \"selfheal\"\n\
             email_from = \"selfheal <selfheal@x.io>\"\n",
            &env,
        )
        .expect("valid");
        let n = &config.notifications;
        assert_eq!(
            n.smtp_password.as_ref().map(Secret::expose),
            Some("hunter2")
        );
        assert_eq!(
            n.webhook_url.as_ref().map(Secret::expose),
            Some("https://hooks.example.com/x")
        );
        assert_eq!(n.pagerduty_url, "https://events.pagerduty.com/v2/enqueue");
        assert_eq!((n.smtp_port, n.smtp_tls), (2525, SmtpTls::None));
        assert_eq!((n.timeout_ms, n.give_up_after_secs), (10_000, 86_400));
        let missing = problems("[target]\npid = 1\n[notifications]\nemail_to = [\"ops@x.io\"]\n");
        assert_eq!(
            missing,
            [
                "notifications.smtp_host: required when email_to is set",
                "notifications.email_from: required when email_to is set"
            ]
        );
    }

    #[test]
    fn smtp_ca_file_needs_tls_and_an_absolute_path() {
        let found = problems(
            "[target]\npid = 1\n[notifications]\nsmtp_tls = \"none\"\n\
             smtp_ca_file = \"relay-ca.pem\"\n",
        );
        assert_eq!(
            found,
            [
                "notifications.smtp_ca_file: only used with smtp_tls = \"starttls\" or \"tls\"",
                "notifications.smtp_ca_file: must be an absolute path",
            ]
        );
        for tls in ["starttls", "tls"] {
            let config = parse(
                &format!(
                    "[target]\npid = 1\n[notifications]\nsmtp_tls = \"{tls}\"\n\
                     smtp_ca_file = \"/etc/selfheal/relay-ca.pem\"\n"
                ),
                &Env::default(),
            )
            .expect(tls);
            // Validation reads no file: this one need not exist (the email channel reads it).
            assert_eq!(
                config.notifications.smtp_ca_file.as_deref(),
                Some(Path::new("/etc/selfheal/relay-ca.pem"))
            );
        }
        let config = parse("[target]\npid = 1\n", &Env::default()).expect("valid");
        assert_eq!(config.notifications.smtp_ca_file, None);
    }

    #[test]
    fn ca_files_are_absolute_and_for_postgres_checks_only() {
        let found = problems(
            "[target]\npid = 1\n[database]\nca_file = \"db-ca.pem\"\n\
             [[checks]]\nname = \"db\"\nkind = \"postgres\"\n\
             url = \"postgres://app@db.internal/app?sslmode=require\"\nca_file = \"db-ca.pem\"\n\
             [[checks]]\nname = \"web\"\nkind = \"http\"\nurl = \"https://x.io/\"\n\
             ca_file = \"/etc/selfheal/web-ca.pem\"\n\
             [[checks]]\nname = \"strict\"\nkind = \"postgres\"\n\
             url = \"postgres://app@db.internal/app?sslmode=verify-full\"\n",
        );
        assert_eq!(
            found,
            [
                "database.ca_file: must be an absolute path",
                "checks[0].ca_file: must be an absolute path",
                "checks[1].ca_file: applies to postgres checks only",
                "checks[2].url: a postgres check needs a valid postgres://user@host:port/database \
                 url (sslmode, when set: disable, prefer or require)",
            ]
        );
        let config = parse(
            "[target]\npid = 1\n[database]\nurl = \"postgres://app@db.internal/app\"\n\
             ca_file = \"/etc/selfheal/db-ca.pem\"\n\
             [[checks]]\nname = \"replica\"\nkind = \"postgres\"\n\
             url = \"postgres://app@replica.internal/app?sslmode=require\"\n\
             ca_file = \"/etc/selfheal/db-ca.pem\"\n",
            &Env::default(),
        )
        .expect("valid");
        // Validation reads no file: this one need not exist (the connection reads it).
        assert_eq!(
            config.database.ca_file.as_deref(),
            Some(Path::new("/etc/selfheal/db-ca.pem"))
        );
        assert_eq!(config.checks[0].ca_file, config.database.ca_file);
    }

    #[test]
    fn bad_environment_values_are_problems() {
        let env = Env::from_pairs([
            ("MONITOR_INTERVAL_MS", "soon"),
            ("AGENT_REPAIR_ENABLED", "maybe"),
        ]);
        let found = parse("[target]\npid = 7\n", &env).expect_err("invalid");
        let paths: Vec<_> = found.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            ["env MONITOR_INTERVAL_MS", "env AGENT_REPAIR_ENABLED"]
        );
    }

    #[test]
    fn every_selector_kind_parses() {
        for (text, expected) in [
            ("pidfile = \"/run/x.pid\"", "pidfile /run/x.pid"),
            (
                "command = \"demo-backend --listen\"",
                "command \"demo-backend --listen\"",
            ),
            (
                "cgroup = \"/sys/fs/cgroup/memory/app\"",
                "cgroup /sys/fs/cgroup/memory/app",
            ),
            (
                "systemd_unit = \"backend.service\"",
                "systemd unit backend.service",
            ),
            ("container = \"backend\"", "container backend"),
        ] {
            let config = parse(&format!("[target]\n{text}\n"), &Env::default()).expect(text);
            assert_eq!(
                config.target.selector().expect("one selector").to_string(),
                expected
            );
        }
    }

    #[test]
    fn repair_settings_are_checked_and_self_healing_off_means_dry_run() {
        let config = parse("[target]\ncommand = \"x\"\n", &Env::default()).expect("valid");
        assert_eq!(config.repair.effective_mode(), Mode::DryRun);
        let on = parse(
            "[target]\ncommand = \"x\"\n[repair]\nself_healing = true\nmodes = { restart = \"off\" }\n\
             start_command = [\"/bin/backend\", \"--port\", \"80\"]\n\
             playbooks = { \"target.memory_leak\" = [\"restart\"], \"db.unreachable\" = [] }\n",
            &Env::default(),
        )
        .expect("valid");
        assert_eq!(on.repair.effective_mode(), Mode::Auto);
        assert_eq!(on.repair.modes[&ActionKind::Restart], Mode::Off);
        let found = parse(
            "[target]\ncommand = \"x\"\n[repair]\nbudget = 0\nexploration = -1.0\nstart_command = [\"\"]\n\
             playbooks = { \"target.crash\" = [\"reboot\"], \"target.hung\" = [\"restart\", \"bogus\"] }\n\
             [diagnostic]\nanthropic_base_url = \"api.anthropic.com\"\n",
            &Env::default(),
        )
        .expect_err("invalid")
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
        for expected in [
            "repair.budget: must be between 1 and 1000",
            "repair.start_command: the program (first element) must not be empty",
            "repair.exploration: must be between 0 and 10",
            "repair.playbooks.target.crash: unknown signature; known: target.crashed,",
            "repair.playbooks.target.crash[0]: unknown action \"reboot\"",
            "repair.playbooks.target.hung[1]: unknown action \"bogus\"",
            "diagnostic.anthropic_base_url: must be an http:// or https:// URL",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(expected)),
                "{expected} not in {found:#?}"
            );
        }
        assert_eq!(found.len(), 7, "{found:#?}");
    }

    #[test]
    fn hooks_are_checked_and_named_in_playbooks() {
        let head = "[target]\ncommand = \"x\"\n";
        let ok = parse(
            &format!(
                "{head}[repair]\nplaybooks = {{ \"http.error_spike\" = [\"hook:flush\", \"restart\"] }}\n\
                 [[repair.hooks]]\nname = \"flush\"\ncommand = [\"/usr/bin/redis-cli\", \"FLUSHALL\"]\n\
                 [[repair.hooks]]\nname = \"failover\"\nurl = \"http://127.0.0.1:8080/admin/failover\"\n\
                 timeout_ms = 2000\non = [\"dependency.down\"]\n"
            ),
            &Env::default(),
        )
        .expect("valid");
        assert_eq!(ok.repair.hooks.len(), 2);
        assert_eq!(ok.repair.hooks[0].timeout_ms, 10_000);
        let found = parse(
            &format!(
                "{head}[repair]\nplaybooks = {{ \"target.hung\" = [\"hook:nope\"] }}\n\
                 [[repair.hooks]]\nname = \"a b\"\ncommand = [\"x\"]\n\
                 [[repair.hooks]]\nname = \"twice\"\ncommand = [\"x\"]\non = [\"db.down\"]\n\
                 [[repair.hooks]]\nname = \"twice\"\ncommand = [\"x\"]\nurl = \"http://h/\"\n\
                 [[repair.hooks]]\nname = \"none\"\n\
                 [[repair.hooks]]\nname = \"tls\"\nurl = \"https://h/x\"\ntimeout_ms = 0\n"
            ),
            &Env::default(),
        )
        .expect_err("invalid")
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
        for expected in [
            "repair.playbooks.target.hung[0]: unknown action \"hook:nope\"; known: restart,",
            "repair.hooks[0].name: must be letters, digits",
            "repair.hooks[1].on[0]: unknown signature",
            "repair.hooks[2].name: a hook named \"twice\" is already defined",
            "repair.hooks[2]: set exactly one of `command`",
            "repair.hooks[3]: set exactly one of `command`",
            "repair.hooks[4].url: must be an http:// URL",
            "repair.hooks[4].timeout_ms: must be between 1 and 600000",
        ] {
            assert!(
                found.iter().any(|f| f.starts_with(expected)),
                "{expected} not in {found:#?}"
            );
        }
        assert!(
            found[0].contains("hook:a b, hook:twice"),
            "the known actions list the hooks: {found:#?}"
        );
        assert_eq!(found.len(), 8, "{found:#?}");
    }
}
