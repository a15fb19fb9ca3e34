//! Wiring: builds every component from its config section and runs them until shutdown.
//!
//! Every component is a future that ends when the cancellation token fires; nothing is
//! detached. A component that cannot start (an eBPF probe refused by the kernel) degrades the
//! daemon rather than stopping it; only a port that cannot be bound is fatal.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    activity, actuators, agents,
    alerts::{self, AlertManager},
    api,
    bus::Bus,
    checks::{self, Checks},
    config::Config,
    notify::{self, Notifier},
    probes::{capture, ebpf, os},
    repairs::RepairLog,
    state::{self, DbOptions, StateError},
    store::{self, LoadOutcome, StoreHandle},
    target::{self, Tracker},
    telemetry::Metrics,
    traffic::{Platforms, Recorder, TrafficView},
};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("the config has no valid target selector")]
    NoTarget,
    #[error("cannot listen on {address}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin server failed")]
    Serve(#[source] std::io::Error),
    #[error("cannot listen on the unix socket {path}")]
    Socket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no admin token")]
    Token(#[from] api::TokenError),
    #[error("the metrics store config is invalid")]
    Store(#[from] store::StoreConfigError),
    #[error("the state database cannot be used")]
    State(#[from] StateError),
}

/// Creates the state directory (mode 0700) if it is missing.
fn create_state_dir(path: &std::path::Path) -> Result<(), AppError> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|source| AppError::StateDir {
            path: path.to_owned(),
            source,
        })
}

/// Opens the metrics store from its snapshot, saying what was found.
fn open_store(config: &Config) -> Result<(StoreHandle, std::path::PathBuf), AppError> {
    let path = config.state.dir.join(store::SNAPSHOT_FILE);
    let (handle, outcome) = StoreHandle::open(config.store.clone(), &path)?;
    match outcome {
        LoadOutcome::Loaded(report) => tracing::info!(
            path = %path.display(),
            series = report.series_loaded,
            skipped = report.series_skipped,
            saved_at_unix_ms = report.saved_at_ms,
            "metrics history loaded"
        ),
        LoadOutcome::Missing => {
            tracing::info!(path = %path.display(), "no metrics snapshot yet; history starts now");
        }
        LoadOutcome::Failed(error) => tracing::warn!(
            path = %path.display(),
            error = %error_chain(&error),
            "the metrics snapshot cannot be used; history starts now (the file is replaced at the next snapshot)"
        ),
    }
    Ok((handle, path))
}

/// Runs the daemon until `cancel` fires.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), AppError> {
    let config = Arc::new(config);
    if config.probes.payload_queue.is_some() {
        tracing::warn!(
            "probes.payload_queue is no longer used: the decoders read the capture's own ring \
             buffer (probes.ring_buffer_bytes); remove it from the config file"
        );
    }
    let selector = config.target.selector().ok_or(AppError::NoTarget)?;
    let metrics = Metrics::new();
    let bus = Bus::new(metrics.clone());
    let target_status = target::new_status(&selector);

    let address = config.admin_listen();
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| AppError::Bind { address, source })?;
    let address = listener.local_addr().unwrap_or(address);
    create_state_dir(&config.state.dir)?;
    let (token, token_source) = api::resolve_token(&config.admin, &config.state.dir)?;
    match &token_source {
        api::TokenSource::Environment => {
            tracing::info!("admin token from SELFHEAL_ADMIN_TOKEN");
        }
        api::TokenSource::File(path) | api::TokenSource::Generated(path) => {
            tracing::info!(path = %path.display(), "admin token file");
        }
    }
    let socket = match &config.admin.socket {
        Some(path) => Some((
            api::bind_socket(path).map_err(|source| AppError::Socket {
                path: path.clone(),
                source,
            })?,
            path.clone(),
        )),
        None => None,
    };
    let (db, db_thread, opened) = state::open(
        &DbOptions {
            path: config.state.db_path(),
            busy_timeout: Duration::from_millis(config.state.busy_timeout_ms),
        },
        metrics.clone(),
    )?;
    tracing::info!(
        path = %config.state.db_path().display(),
        schema_version = opened.version,
        previous_version = opened.from_version,
        "state database open"
    );
    let alert_manager = AlertManager::start(
        db.clone(),
        alerts::Settings::from_config(&config.alerts, &config.notifications),
        alerts::system_clock(),
        metrics.clone(),
    )
    .await?;
    alert_manager.announce_on(bus.clone());
    let (checks, checks_runner) =
        Checks::new(checks::specs(&config), db.clone(), alerts::system_clock());
    tracing::info!(checks = checks.len(), "integration checks configured");
    for signal in checks.orphaned(&alert_manager.active()) {
        tracing::info!(rule = %signal.rule, labels = ?signal.labels, "resolving the alert of a check that no longer runs");
        alert_manager.signal(signal).await;
    }
    // Delivery degrades rather than stops the daemon: without it, notifications wait in the
    // outbox for a restart that can send them.
    let notifier = match Notifier::new(
        &config.notifications,
        notify::Settings::from_config(&config.notifications),
        db.clone(),
        alerts::system_clock(),
        metrics.clone(),
    ) {
        Ok(notifier) => Some(notifier),
        Err(err) => {
            tracing::error!(error = %error_chain(&err), "notification delivery cannot start; notifications stay in the outbox");
            None
        }
    };
    let delivery = {
        let enqueued = alert_manager.enqueued();
        let cancel = cancel.clone();
        async move {
            if let Some(notifier) = notifier {
                notify::run(notifier, enqueued, cancel).await;
            }
        }
    };
    let (store, snapshot_path) = open_store(&config)?;
    let traffic_view = TrafficView::new(
        store.clone(),
        Platforms::new(&config.platforms),
        config.traffic.slowest_requests,
    );
    let recorder = Recorder::new(traffic_view.clone(), &config.traffic, metrics.clone());

    let (exits_tx, exits_rx) = mpsc::channel(64);
    let (members_tx, members_rx) = watch::channel(Vec::new());
    let traffic_members = members_rx.clone();
    let interval = Duration::from_millis(config.monitor.interval_ms);

    let (mut loaded, ebpf_state) = if config.probes.ebpf {
        match ebpf::load(&config.probes, &metrics) {
            Ok(loaded) => (Some(loaded), "attached".to_owned()),
            Err(err) => {
                let reason = error_chain(&err);
                tracing::warn!(error = %reason, "eBPF probes unavailable; using procfs and pidfd only");
                (None, format!("unavailable: {reason}"))
            }
        }
    } else {
        (None, "disabled by probes.ebpf = false".to_owned())
    };

    // The capture's records, read by the decoders' thread itself.
    let capture_feed = loaded.as_mut().and_then(ebpf::Loaded::take_capture_feed);
    let tracker = Tracker {
        selector,
        poll_interval: Duration::from_millis(config.target.poll_interval_ms),
        bus: bus.clone(),
        metrics: metrics.clone(),
        status: target_status.clone(),
        kernel_exits: exits_rx,
        members: members_tx,
    };
    let repairs = RepairLog::new(db.clone());
    let gate = actuators::gate::shared(actuators::gate::GateConfig::from_config(&config.repair));
    let handles = agents::handles(&config);
    let activity = activity::Activity::new();
    let api_state = Arc::new(api::ApiState {
        started: Instant::now(),
        target: target_status.clone(),
        agents: handles.clone(),
        metrics: metrics.clone(),
        alerts: alert_manager.clone(),
        ebpf: ebpf_state,
        token,
        traffic: traffic_view.clone(),
        checks: checks.clone(),
        repairs: repairs.clone(),
        gate: gate.clone(),
        repair_config: config.repair.clone(),
        activity: activity.clone(),
        bus: bus.clone(),
        read_only: config.admin.read_only,
        streams: std::sync::atomic::AtomicUsize::new(0),
        shutdown: cancel.clone(),
    });
    let socket_served = {
        let state = api_state.clone();
        let cancel = cancel.clone();
        async move {
            match socket {
                Some((listener, path)) => {
                    tracing::info!(path = %path.display(), "admin API listening on a unix socket");
                    api::serve_socket(listener, path, state, cancel).await
                }
                None => Ok(()),
            }
        }
    };
    let shared = agents::Shared {
        config: config.clone(),
        target: target_status.clone(),
        traffic: traffic_view.clone(),
        checks,
        repairs,
        gate,
        bus: bus.clone(),
        metrics: metrics.clone(),
    };

    let probe = async {
        if let Some(loaded) = loaded {
            let result = ebpf::run(
                loaded,
                ebpf::Links {
                    members: members_rx,
                    exits: exits_tx,
                },
                interval,
                (config.probes.payload_bytes > 0).then(|| ebpf::Draining {
                    interval: Duration::from_millis(config.probes.flush_interval_ms),
                    shed_below_idle_percent: config.probes.shed_below_idle_percent,
                }),
                bus.clone(),
                metrics.clone(),
                cancel.clone(),
            )
            .await;
            if let Err(err) = result {
                tracing::error!(error = %error_chain(&err), "eBPF reader stopped; procfs and pidfd continue");
            }
        }
    };
    tracing::info!(%address, "admin API listening");
    let (served, socket_served, (), (), (), (), (), (), (), (), (), (), ()) = tokio::join!(
        api::serve(listener, api_state, cancel.clone()),
        socket_served,
        activity::run(activity, store.clone(), bus.clone(), cancel.clone()),
        alerts::run(alert_manager, bus.clone(), cancel.clone()),
        delivery,
        state::retention::run(db, config.state.retention_days, cancel.clone()),
        checks_runner.run(bus.clone(), metrics.clone(), cancel.clone()),
        tracker.run(cancel.clone()),
        os::run(
            interval,
            config.state.dir.clone(),
            target_status,
            bus.clone(),
            metrics.clone(),
            cancel.clone()
        ),
        agents::run_all(handles, shared, cancel.clone()),
        decode(
            capture_feed,
            Duration::from_millis(config.probes.flush_interval_ms),
            traffic_members,
            recorder,
            metrics.clone(),
            crate::sched::DecodePriority {
                nice: config.probes.decode_nice,
                idle: config.probes.decoder_idle(),
            },
            cancel.clone()
        ),
        store::persist::run(
            store,
            snapshot_path,
            Duration::from_secs(config.store.snapshot_interval_secs),
            metrics.clone(),
            cancel.clone()
        ),
        probe,
    );
    // Every handle to the database went with the tasks above; its thread ends after the
    // operation in hand (each is committed on its own, so waiting is tidiness, not safety).
    if tokio::time::timeout(Duration::from_secs(5), db_thread.finished())
        .await
        .is_err()
    {
        tracing::warn!("the state database thread did not finish within 5 s");
    }
    if let Err(err) = socket_served {
        tracing::error!(error = %err, "the admin API's unix socket failed");
    }
    served.map_err(AppError::Serve)
}

/// Runs the traffic decoders until `cancel`, on a thread of their own at `priority`, reading
/// the capture's ring buffer every `flush`: decoding is the daemon's only work that grows
/// with the target's traffic, so it must neither delay the exit and TCP events (which the
/// main runtime reads from a ring of their own) nor compete with the target for CPU on equal
/// terms. Without the capture (`feed` is `None`) there is nothing to decode and no thread.
async fn decode(
    feed: Option<ebpf::CaptureFeed>,
    flush: Duration,
    members: watch::Receiver<Vec<u32>>,
    recorder: Recorder,
    metrics: Metrics,
    priority: crate::sched::DecodePriority,
    cancel: CancellationToken,
) {
    let Some(feed) = feed else {
        return;
    };
    let thread_cancel = cancel.clone();
    let spawned = std::thread::Builder::new()
        .name("selfheal-decode".to_owned())
        .spawn(move || {
            let idle = priority.apply();
            metrics.capture_decoder_idle.set(i64::from(idle));
            match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .enable_io()
                .build()
            {
                Ok(runtime) => {
                    runtime.block_on(capture::run(
                        feed,
                        flush,
                        members,
                        recorder,
                        metrics,
                        thread_cancel,
                    ));
                    // A procfs scan still running on its blocking thread is not waited for.
                    runtime.shutdown_timeout(Duration::from_secs(1));
                }
                Err(err) => {
                    tracing::error!(error = %err, "cannot start the decoder thread's runtime; captured traffic is not decoded");
                }
            }
        });
    match spawned {
        Ok(thread) => {
            cancel.cancelled().await;
            // It ends after the section in hand, which on CPUs other processes keep busy can
            // take a while under SCHED_IDLE; it holds nothing that must be saved.
            let joined = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::task::spawn_blocking(move || thread.join()),
            )
            .await;
            match joined {
                Ok(Ok(Err(_))) => tracing::error!(
                    "the decoder thread had panicked: captured traffic was not decoded after that"
                ),
                Err(_) => tracing::warn!("the decoder thread did not end within 5 s"),
                Ok(_) => {}
            }
        }
        Err(err) => {
            tracing::error!(error = %err, "cannot start the decoder thread; captured traffic is not decoded");
        }
    }
}

/// An error and its sources on one line: `a: b: c`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
