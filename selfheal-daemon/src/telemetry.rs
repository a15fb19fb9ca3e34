//! The daemon's own metrics, declared in one place, exported on `/metrics`.
//!
//! Owns: every metric name (`selfheal_<component>_<name>_<unit>[_total]`) and the registry.
//! Must not: take unbounded labels (no pid, path or query text) or be updated per event in a
//! hot loop where a batch update would do. Counters are registered without `_total`:
//! prometheus-client appends it.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    /// A state DB operation (a fixed name per call site: `alerts_signal`, `retention`).
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// A table of the state DB.
    pub table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SeverityLabel {
    /// `critical`, `warning` or `info`.
    pub severity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChannelLabel {
    /// A notification channel: `slack`, `pagerduty`, `email`, `webhook`.
    pub channel: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabel {
    /// A configured check's name (bounded by the config).
    pub check: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckRunLabel {
    pub check: String,
    /// `healthy`, `degraded`, `down` or `unknown`.
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabel {
    /// A notification channel: `slack`, `pagerduty`, `email`, `webhook` (`other` for an
    /// outbox row of a channel this build does not know).
    pub channel: &'static str,
    /// `delivered`, `retry` (failed, tried again later) or `failed` (given up).
    pub result: &'static str,
}

/// The values of `selfheal_capture_mode`'s `mode` label.
pub const CAPTURE_MODES: [&str; 3] = ["cgroup", "syscalls", "none"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabel {
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabel {
    pub probe: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProgramLabel {
    /// An eBPF program of the embedded object (a fixed set).
    pub program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabel {
    pub agent: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HowLabel {
    /// `normal` or `abort` (a reset ended it).
    pub how: &'static str,
    /// `client` (the target connected) or `server` (it accepted).
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaptureLabel {
    /// `recv` or `send`, seen from the target.
    pub direction: &'static str,
    /// `client` or `server`: the target's side of the connection.
    pub role: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpRequestLabel {
    pub platform: Arc<str>,
    pub method: &'static str,
    /// The route template, or `other` past `traffic.max_routes`.
    pub route: Arc<str>,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpDurationLabel {
    pub platform: Arc<str>,
    pub method: &'static str,
    pub route: Arc<str>,
    /// `1xx` … `5xx`.
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabel {
    /// 16 hex digits of a stable hash of the whole fingerprint, or `other`.
    pub query_id: Arc<str>,
    /// The fingerprint, cut to 160 bytes, or `other` past `traffic.max_queries`.
    pub fingerprint: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SqlstateLabel {
    /// The first two characters of the SQLSTATE.
    pub sqlstate_class: Arc<str>,
    pub sqlstate: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabel {
    pub sqlstate: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabel {
    /// `http` or `postgres`.
    pub protocol: &'static str,
    /// What went wrong: `desync`, `unparsed`, `unmatched`, `unanswered`, `dropped`.
    pub problem: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Request latencies: 0.5 ms to 10 s.
fn http_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// Query latencies: 0.1 ms to 10 s.
fn query_histogram() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ])
}

/// Notification deliveries: 10 ms to 60 s (the longest `notifications.timeout_ms` is 120 s).
fn delivery_histogram() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// All metrics. Cheap to clone: every field is a handle to shared state.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub target_up: Gauge,
    pub target_restarts: Counter,
    pub target_process_exits: Family<ReasonLabel, Counter>,
    pub target_cpu_percent: FloatGauge,
    pub target_memory_rss_bytes: Gauge,
    pub target_threads: Gauge,
    pub target_open_fds: Gauge,
    pub target_cgroup_memory_usage_bytes: Gauge,
    pub target_cgroup_memory_limit_bytes: Gauge,
    pub target_cgroup_cpu_throttled_periods: Counter,
    pub host_cpu_percent: FloatGauge,
    pub host_memory_total_bytes: Gauge,
    pub host_memory_used_bytes: Gauge,
    pub host_disk_total_bytes: Gauge,
    pub host_disk_available_bytes: Gauge,
    pub tcp_connect_duration_seconds: Histogram,
    pub tcp_connect_failures: Counter,
    pub tcp_accepts: Counter,
    pub tcp_closes: Family<HowLabel, Counter>,
    pub tcp_resets_received: Counter,
    pub ebpf_probe_attached: Family<ProbeLabel, Gauge>,
    pub ebpf_ringbuf_events: Counter,
    pub ebpf_program_runs: Family<ProgramLabel, Counter>,
    pub ebpf_program_run_seconds: Family<ProgramLabel, Counter<f64, AtomicU64>>,
    pub ebpf_ringbuf_drops: Family<ReasonLabel, Counter>,
    pub capture_events: Family<CaptureLabel, Counter>,
    pub capture_bytes: Family<CaptureLabel, Counter>,
    pub capture_connections: Gauge,
    pub capture_mode: Family<ModeLabel, Gauge>,
    pub capture_unseen_postgres_connections: Gauge,
    pub capture_decode_cpu_seconds: Counter<f64, AtomicU64>,
    pub capture_sampling_ratio: FloatGauge,
    pub capture_decoder_idle: Gauge,
    pub http_requests: Family<HttpRequestLabel, Counter>,
    pub http_request_duration_seconds: HistogramFamily<HttpDurationLabel>,
    pub postgres_query_duration_seconds: HistogramFamily<QueryLabel>,
    pub postgres_query_rows: Family<QueryLabel, Counter>,
    pub postgres_query_errors: Family<SqlstateLabel, Counter>,
    pub postgres_auth_failures: Family<AuthFailureLabel, Counter>,
    pub postgres_logins: Counter,
    pub protocol_problems: Family<ProtocolLabel, Counter>,
    pub store_series: Gauge,
    pub store_memory_bytes: Gauge,
    pub store_memory_budget_bytes: Gauge,
    pub store_samples: Counter,
    pub store_samples_dropped: Family<ReasonLabel, Counter>,
    pub store_series_refused: Family<ReasonLabel, Counter>,
    pub store_snapshots: Counter,
    pub store_snapshot_failures: Counter,
    pub store_snapshot_bytes: Gauge,
    pub store_snapshot_duration_seconds: FloatGauge,
    pub bus_events: Family<KindLabel, Counter>,
    pub bus_lagged: Counter,
    pub agent_up: Family<AgentLabel, Gauge>,
    pub agent_restarts: Family<AgentLabel, Counter>,
    pub state_errors: Family<OpLabel, Counter>,
    pub state_retention_runs: Counter,
    pub state_retention_deleted: Family<TableLabel, Counter>,
    pub check_runs: Family<CheckRunLabel, Counter>,
    pub check_duration_seconds: HistogramFamily<CheckLabel>,
    pub check_up: Family<CheckLabel, Gauge>,
    pub checks_stale: Gauge,
    pub alerts_active: Family<SeverityLabel, Gauge>,
    pub alerts_fired: Family<SeverityLabel, Counter>,
    pub alerts_notifications_enqueued: Family<ChannelLabel, Counter>,
    pub alerts_notifications_suppressed: Family<ReasonLabel, Counter>,
    pub notify_deliveries: Family<DeliveryLabel, Counter>,
    pub notify_pending: Family<ChannelLabel, Gauge>,
    pub notify_delivery_duration_seconds: HistogramFamily<ChannelLabel>,
    pub daemon_cpu_seconds: Counter<f64, AtomicU64>,
    pub daemon_memory_rss_bytes: Gauge,
    daemon_cpu_seen: Arc<AtomicU64>,
    /// Not exported: until when (monotonic ns) the payload capture may have shed connections —
    /// `u64::MAX` while it sheds, the moment it kept every connection again after, 0 if it
    /// never did. A request seen starting before it may have lost its answer to shedding.
    capture_shed_until_ns: Arc<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Sets `selfheal_capture_mode` to 1 for `mode` and 0 for the other modes.
    pub fn set_capture_mode(&self, mode: &'static str) {
        for each in CAPTURE_MODES {
            self.capture_mode
                .get_or_create(&ModeLabel { mode: each })
                .set(i64::from(each == mode));
        }
    }

    pub fn new() -> Self {
        let mut registry = Registry::default();
        let target_up = Gauge::default();
        registry.register(
            "selfheal_target_up",
            "1 while the target process is running",
            target_up.clone(),
        );
        let target_restarts = Counter::default();
        registry.register(
            "selfheal_target_restarts",
            "Times a new target process was found after the previous one ended",
            target_restarts.clone(),
        );
        let target_process_exits = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "selfheal_target_process_exits",
            "Exits of the target's main process, by reason (exited, unknown or the signal name)",
            target_process_exits.clone(),
        );
        let target_cpu_percent = FloatGauge::default();
        registry.register(
            "selfheal_target_cpu_percent",
            "Target CPU use (100 = one core)",
            target_cpu_percent.clone(),
        );
        let target_memory_rss_bytes = Gauge::default();
        registry.register(
            "selfheal_target_memory_rss_bytes",
            "Target resident set size",
            target_memory_rss_bytes.clone(),
        );
        let target_threads = Gauge::default();
        registry.register(
            "selfheal_target_threads",
            "Target thread count",
            target_threads.clone(),
        );
        let target_open_fds = Gauge::default();
        registry.register(
            "selfheal_target_open_fds",
            "Target open file descriptors",
            target_open_fds.clone(),
        );
        let target_cgroup_memory_usage_bytes = Gauge::default();
        registry.register(
            "selfheal_target_cgroup_memory_usage_bytes",
            "Memory charged to the target's cgroup",
            target_cgroup_memory_usage_bytes.clone(),
        );
        let target_cgroup_memory_limit_bytes = Gauge::default();
        registry.register(
            "selfheal_target_cgroup_memory_limit_bytes",
            "Memory limit of the target's cgroup (0 when unlimited)",
            target_cgroup_memory_limit_bytes.clone(),
        );
        let target_cgroup_cpu_throttled_periods = Counter::default();
        registry.register(
            "selfheal_target_cgroup_cpu_throttled_periods",
            "CFS periods in which the target's cgroup was throttled",
            target_cgroup_cpu_throttled_periods.clone(),
        );
        let host_cpu_percent = FloatGauge::default();
        registry.register(
            "selfheal_host_cpu_percent",
            "Host CPU use over all cores (0-100)",
            host_cpu_percent.clone(),
        );
        let host_memory_total_bytes = Gauge::default();
        registry.register(
            "selfheal_host_memory_total_bytes",
            "Host memory",
            host_memory_total_bytes.clone(),
        );
        let host_memory_used_bytes = Gauge::default();
        registry.register(
            "selfheal_host_memory_used_bytes",
            "Host memory in use",
            host_memory_used_bytes.clone(),
        );
        let host_disk_total_bytes = Gauge::default();
        registry.register(
            "selfheal_host_disk_total_bytes",
            "Size of the filesystem holding the state directory",
            host_disk_total_bytes.clone(),
        );
        let host_disk_available_bytes = Gauge::default();
        registry.register(
            "selfheal_host_disk_available_bytes",
            "Free space on the filesystem holding the state directory",
            host_disk_available_bytes.clone(),
        );
        // 50 µs .. ~3.3 s
        let tcp_connect_duration_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 17));
        registry.register(
            "selfheal_tcp_connect_duration_seconds",
            "Outbound TCP connect latency of the target (SYN_SENT to ESTABLISHED), from eBPF",
            tcp_connect_duration_seconds.clone(),
        );
        let tcp_connect_failures = Counter::default();
        registry.register(
            "selfheal_tcp_connect_failures",
            "Outbound TCP connects of the target that failed (SYN_SENT to CLOSE)",
            tcp_connect_failures.clone(),
        );
        let tcp_accepts = Counter::default();
        registry.register(
            "selfheal_tcp_accepts",
            "Inbound TCP connections to the target",
            tcp_accepts.clone(),
        );
        let tcp_closes = Family::<HowLabel, Counter>::default();
        registry.register(
            "selfheal_tcp_closes",
            "Closed TCP connections of the target, by role and how (abort: ended by a reset)",
            tcp_closes.clone(),
        );
        let tcp_resets_received = Counter::default();
        registry.register(
            "selfheal_tcp_resets_received",
            "Resets received on TCP connections of the target",
            tcp_resets_received.clone(),
        );
        let ebpf_probe_attached = Family::<ProbeLabel, Gauge>::default();
        registry.register(
            "selfheal_ebpf_probe_attached",
            "1 when the eBPF probe is attached, else 0 (not attached, or not now: the unix-socket \
             capture is attached only while the target needs it)",
            ebpf_probe_attached.clone(),
        );
        let ebpf_ringbuf_events = Counter::default();
        registry.register(
            "selfheal_ebpf_ringbuf_events",
            "Events written by the eBPF programs to the ring buffer",
            ebpf_ringbuf_events.clone(),
        );
        let ebpf_program_runs = Family::<ProgramLabel, Counter>::default();
        registry.register(
            "selfheal_ebpf_program_runs",
            "Runs of each eBPF program, for every process (counted while sysctl kernel.bpf_stats_enabled=1)",
            ebpf_program_runs.clone(),
        );
        let ebpf_program_run_seconds = Family::<ProgramLabel, Counter<f64, AtomicU64>>::default();
        registry.register(
            "selfheal_ebpf_program_run_seconds",
            "Time spent in each eBPF program, for every process (counted while sysctl kernel.bpf_stats_enabled=1)",
            ebpf_program_run_seconds.clone(),
        );
        let ebpf_ringbuf_drops = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "selfheal_ebpf_ringbuf_drops",
            "Events the eBPF programs or the reader dropped, by reason",
            ebpf_ringbuf_drops.clone(),
        );
        let capture_events = Family::<CaptureLabel, Counter>::default();
        registry.register(
            "selfheal_capture_events",
            "Socket reads and writes of the target captured by eBPF",
            capture_events.clone(),
        );
        let capture_bytes = Family::<CaptureLabel, Counter>::default();
        registry.register(
            "selfheal_capture_bytes",
            "Bytes the target's captured socket reads and writes moved (not only the captured prefix)",
            capture_bytes.clone(),
        );
        let capture_mode = Family::<ModeLabel, Gauge>::default();
        registry.register(
            "selfheal_capture_mode",
            "1 for where payloads are captured now: cgroup (the target's own cgroup2), \
             syscalls (every process's socket syscalls), none (off, or the target shares its \
             cgroup; the log says why)",
            capture_mode.clone(),
        );
        let capture_unseen_postgres_connections = Gauge::default();
        registry.register(
            "selfheal_capture_unseen_postgres_connections",
            "The target's connections to PostgreSQL over a unix socket that nothing captures (the \
             cgroup capture sees TCP only, and the unix-socket capture is off or not attached): \
             their queries are not measured. Counted in cgroup mode only",
            capture_unseen_postgres_connections.clone(),
        );
        let capture_connections = Gauge::default();
        registry.register(
            "selfheal_capture_connections",
            "Connections of the target in the capture table",
            capture_connections.clone(),
        );
        let capture_decode_cpu_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "selfheal_capture_decode_cpu_seconds",
            "CPU time the daemon spent decoding captured traffic (protocols and recording)",
            capture_decode_cpu_seconds.clone(),
        );
        let capture_sampling_ratio = FloatGauge::default();
        registry.register(
            "selfheal_capture_sampling_ratio",
            "Share of the target's connections whose payloads are decoded (1 = all; lower while the decoders are behind)",
            capture_sampling_ratio.clone(),
        );
        let capture_decoder_idle = Gauge::default();
        registry.register(
            "selfheal_capture_decoder_idle",
            "1 while the decoder parses under SCHED_IDLE (probes.decode_idle), 0 at normal priority or a nice value",
            capture_decoder_idle.clone(),
        );
        let http_requests = Family::<HttpRequestLabel, Counter>::default();
        registry.register(
            "selfheal_http_requests",
            "HTTP requests the target answered, by platform, method, route template and status",
            http_requests.clone(),
        );
        let http_request_duration_seconds: HistogramFamily<HttpDurationLabel> =
            Family::new_with_constructor(http_histogram);
        registry.register(
            "selfheal_http_request_duration_seconds",
            "Time from a request's first byte in to its response's first byte out, at the target's sockets",
            http_request_duration_seconds.clone(),
        );
        let postgres_query_duration_seconds: HistogramFamily<QueryLabel> =
            Family::new_with_constructor(query_histogram);
        registry.register(
            "selfheal_postgres_query_duration_seconds",
            "Time from a query sent by the target to its completion received, by fingerprint",
            postgres_query_duration_seconds.clone(),
        );
        let postgres_query_rows = Family::<QueryLabel, Counter>::default();
        registry.register(
            "selfheal_postgres_query_rows",
            "Rows the target's queries returned or changed, by fingerprint",
            postgres_query_rows.clone(),
        );
        let postgres_query_errors = Family::<SqlstateLabel, Counter>::default();
        registry.register(
            "selfheal_postgres_query_errors",
            "Queries of the target that ended in an ErrorResponse, by SQLSTATE",
            postgres_query_errors.clone(),
        );
        let postgres_auth_failures = Family::<AuthFailureLabel, Counter>::default();
        registry.register(
            "selfheal_postgres_auth_failures",
            "Logins of the target to PostgreSQL that were refused, by SQLSTATE (28P01: bad password)",
            postgres_auth_failures.clone(),
        );
        let postgres_logins = Counter::default();
        registry.register(
            "selfheal_postgres_logins",
            "Logins of the target to PostgreSQL that succeeded",
            postgres_logins.clone(),
        );
        let protocol_problems = Family::<ProtocolLabel, Counter>::default();
        registry.register(
            "selfheal_protocol_problems",
            "Messages the decoders could not use, by protocol and problem",
            protocol_problems.clone(),
        );
        let store_series = Gauge::default();
        registry.register(
            "selfheal_store_series",
            "Series in the metrics store",
            store_series.clone(),
        );
        let store_memory_bytes = Gauge::default();
        registry.register(
            "selfheal_store_memory_bytes",
            "Memory the metrics store's series take",
            store_memory_bytes.clone(),
        );
        let store_memory_budget_bytes = Gauge::default();
        registry.register(
            "selfheal_store_memory_budget_bytes",
            "The metrics store's memory budget (store.max_bytes)",
            store_memory_budget_bytes.clone(),
        );
        let store_samples = Counter::default();
        registry.register(
            "selfheal_store_samples",
            "Samples written to the metrics store",
            store_samples.clone(),
        );
        let store_samples_dropped = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "selfheal_store_samples_dropped",
            "Samples the metrics store refused, by reason",
            store_samples_dropped.clone(),
        );
        let store_series_refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "selfheal_store_series_refused",
            "New series the metrics store refused, by reason (series cap, memory budget, bad key)",
            store_series_refused.clone(),
        );
        let store_snapshots = Counter::default();
        registry.register(
            "selfheal_store_snapshots",
            "Snapshots of the metrics store written to disk",
            store_snapshots.clone(),
        );
        let store_snapshot_failures = Counter::default();
        registry.register(
            "selfheal_store_snapshot_failures",
            "Snapshots of the metrics store that could not be written",
            store_snapshot_failures.clone(),
        );
        let store_snapshot_bytes = Gauge::default();
        registry.register(
            "selfheal_store_snapshot_bytes",
            "Size of the last snapshot written",
            store_snapshot_bytes.clone(),
        );
        let store_snapshot_duration_seconds = FloatGauge::default();
        registry.register(
            "selfheal_store_snapshot_duration_seconds",
            "Time the last snapshot took to write",
            store_snapshot_duration_seconds.clone(),
        );
        let bus_events = Family::<KindLabel, Counter>::default();
        registry.register(
            "selfheal_bus_events",
            "Events published on the bus, by kind",
            bus_events.clone(),
        );
        let bus_lagged = Counter::default();
        registry.register(
            "selfheal_bus_lagged_events",
            "Events a slow bus subscriber missed",
            bus_lagged.clone(),
        );
        let agent_up = Family::<AgentLabel, Gauge>::default();
        registry.register(
            "selfheal_agent_up",
            "1 while the agent's task runs",
            agent_up.clone(),
        );
        let agent_restarts = Family::<AgentLabel, Counter>::default();
        registry.register(
            "selfheal_agent_restarts",
            "Times the agent's task was restarted after a crash or on request",
            agent_restarts.clone(),
        );
        let state_errors = Family::<OpLabel, Counter>::default();
        registry.register(
            "selfheal_state_errors",
            "State database operations that failed, by operation (the daemon logs each and carries on)",
            state_errors.clone(),
        );
        let state_retention_runs = Counter::default();
        registry.register(
            "selfheal_state_retention_runs",
            "Retention cleanups of the state database that completed",
            state_retention_runs.clone(),
        );
        let state_retention_deleted = Family::<TableLabel, Counter>::default();
        registry.register(
            "selfheal_state_retention_deleted_rows",
            "Rows the retention cleanup deleted from the state database, by table",
            state_retention_deleted.clone(),
        );
        let check_runs = Family::<CheckRunLabel, Counter>::default();
        registry.register(
            "selfheal_check_runs",
            "Runs of the integration checks, by check and status",
            check_runs.clone(),
        );
        let check_duration_seconds: HistogramFamily<CheckLabel> =
            Family::new_with_constructor(http_histogram);
        registry.register(
            "selfheal_check_duration_seconds",
            "Response time of the integration checks' runs that got an answer, by check",
            check_duration_seconds.clone(),
        );
        let check_up = Family::<CheckLabel, Gauge>::default();
        registry.register(
            "selfheal_check_up",
            "1 when the check's last run worked (healthy or degraded), 0 when it was down",
            check_up.clone(),
        );
        let checks_stale = Gauge::default();
        registry.register(
            "selfheal_checks_stale",
            "Enabled checks that have not run in twice their interval",
            checks_stale.clone(),
        );
        let alerts_active = Family::<SeverityLabel, Gauge>::default();
        registry.register(
            "selfheal_alerts_active",
            "Alerts firing or acknowledged, by severity",
            alerts_active.clone(),
        );
        let alerts_fired = Family::<SeverityLabel, Counter>::default();
        registry.register(
            "selfheal_alerts_fired",
            "New alerts (not counting repeats of an active alert), by severity",
            alerts_fired.clone(),
        );
        let alerts_notifications_enqueued = Family::<ChannelLabel, Counter>::default();
        registry.register(
            "selfheal_alerts_notifications_enqueued",
            "Notifications written to the outbox, by channel",
            alerts_notifications_enqueued.clone(),
        );
        let alerts_notifications_suppressed = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "selfheal_alerts_notifications_suppressed",
            "Trigger notifications not enqueued, by reason (throttled, silenced)",
            alerts_notifications_suppressed.clone(),
        );
        let notify_deliveries = Family::<DeliveryLabel, Counter>::default();
        registry.register(
            "selfheal_notify_deliveries",
            "Notification delivery attempts, by channel and result (delivered, retry, failed)",
            notify_deliveries.clone(),
        );
        let notify_pending = Family::<ChannelLabel, Gauge>::default();
        registry.register(
            "selfheal_notify_pending",
            "Notifications in the outbox waiting for delivery, by channel",
            notify_pending.clone(),
        );
        let notify_delivery_duration_seconds: HistogramFamily<ChannelLabel> =
            Family::new_with_constructor(delivery_histogram);
        registry.register(
            "selfheal_notify_delivery_duration_seconds",
            "Time of one delivery attempt (an HTTP request or an SMTP transaction), by channel",
            notify_delivery_duration_seconds.clone(),
        );
        let daemon_cpu_seconds = Counter::<f64, AtomicU64>::default();
        registry.register(
            "selfheal_daemon_cpu_seconds",
            "CPU time used by the daemon itself (user + system)",
            daemon_cpu_seconds.clone(),
        );
        let daemon_memory_rss_bytes = Gauge::default();
        registry.register(
            "selfheal_daemon_memory_rss_bytes",
            "Resident set size of the daemon itself",
            daemon_memory_rss_bytes.clone(),
        );
        Self {
            registry: Arc::new(registry),
            target_up,
            target_restarts,
            target_process_exits,
            target_cpu_percent,
            target_memory_rss_bytes,
            target_threads,
            target_open_fds,
            target_cgroup_memory_usage_bytes,
            target_cgroup_memory_limit_bytes,
            target_cgroup_cpu_throttled_periods,
            host_cpu_percent,
            host_memory_total_bytes,
            host_memory_used_bytes,
            host_disk_total_bytes,
            host_disk_available_bytes,
            tcp_connect_duration_seconds,
            tcp_connect_failures,
            tcp_accepts,
            tcp_closes,
            tcp_resets_received,
            ebpf_probe_attached,
            ebpf_ringbuf_events,
            ebpf_program_runs,
            ebpf_program_run_seconds,
            ebpf_ringbuf_drops,
            capture_events,
            capture_bytes,
            capture_connections,
            capture_mode,
            capture_unseen_postgres_connections,
            capture_decode_cpu_seconds,
            capture_sampling_ratio,
            capture_decoder_idle,
            http_requests,
            http_request_duration_seconds,
            postgres_query_duration_seconds,
            postgres_query_rows,
            postgres_query_errors,
            postgres_auth_failures,
            postgres_logins,
            protocol_problems,
            store_series,
            store_memory_bytes,
            store_memory_budget_bytes,
            store_samples,
            store_samples_dropped,
            store_series_refused,
            store_snapshots,
            store_snapshot_failures,
            store_snapshot_bytes,
            store_snapshot_duration_seconds,
            bus_events,
            bus_lagged,
            agent_up,
            agent_restarts,
            state_errors,
            state_retention_runs,
            state_retention_deleted,
            check_runs,
            check_duration_seconds,
            check_up,
            checks_stale,
            alerts_active,
            alerts_fired,
            alerts_notifications_enqueued,
            alerts_notifications_suppressed,
            notify_deliveries,
            notify_pending,
            notify_delivery_duration_seconds,
            daemon_cpu_seconds,
            daemon_memory_rss_bytes,
            daemon_cpu_seen: Arc::new(AtomicU64::new(0f64.to_bits())),
            capture_shed_until_ns: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Reads the daemon's own CPU time and RSS; called before each scrape.
    /// Marks the payload capture as shedding connections (`true`) or as keeping every one
    /// again (`false`, from now on).
    pub fn set_capture_shedding(&self, shedding: bool) {
        let until = if shedding {
            u64::MAX
        } else {
            crate::target::monotonic_ns()
        };
        self.capture_shed_until_ns.store(until, Ordering::Relaxed);
    }

    /// Until when the capture may have shed connections (see [`Self::set_capture_shedding`]).
    pub fn capture_shed_until_ns(&self) -> u64 {
        self.capture_shed_until_ns.load(Ordering::Relaxed)
    }

    pub fn refresh_self(&self) {
        let Ok(me) = procfs::process::Process::myself() else {
            return;
        };
        let Ok(stat) = me.stat() else { return };
        let ticks = procfs::ticks_per_second() as f64;
        let cpu = (stat.utime + stat.stime) as f64 / ticks;
        let seen = f64::from_bits(self.daemon_cpu_seen.swap(cpu.to_bits(), Ordering::Relaxed));
        if cpu > seen {
            self.daemon_cpu_seconds.inc_by(cpu - seen);
        }
        let rss = stat.rss * procfs::page_size();
        self.daemon_memory_rss_bytes
            .set(i64::try_from(rss).unwrap_or(i64::MAX));
    }

    /// The `OpenMetrics` text of every metric.
    pub fn encode(&self) -> String {
        self.refresh_self();
        let mut text = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// Saturating conversion for gauges fed from kernel `u64`s.
pub fn gauge_value(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let metrics = Metrics::new();
        metrics
            .target_process_exits
            .get_or_create(&ReasonLabel { reason: "SIGKILL" })
            .inc();
        metrics.tcp_connect_duration_seconds.observe(0.001);
        let text = metrics.encode();
        assert!(
            text.contains("selfheal_target_process_exits_total{reason=\"SIGKILL\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("selfheal_tcp_connect_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("selfheal_daemon_memory_rss_bytes "), "{text}");
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            assert!(line.starts_with("selfheal_"), "{line}");
        }
    }
}
