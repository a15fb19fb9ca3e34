//! Wiring: builds every component from its config section and runs them until shutdown.
//!
//! Every component is a future that ends when the cancellation token fires; nothing is
//! detached. A component that cannot start (an eBPF probe refused by the kernel) degrades the
//! daemon rather than stopping it; only a port that cannot be bound is fatal.

use std::{
    net::SocketAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    agents, api,
    bus::Bus,
    config::Config,
    probes::{ebpf, os, traffic},
    target::{self, Tracker},
    telemetry::Metrics,
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
}

/// Runs the daemon until `cancel` fires.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), AppError> {
    let config = Arc::new(config);
    let selector = config.target.selector().ok_or(AppError::NoTarget)?;
    let metrics = Metrics::new();
    let bus = Bus::new(metrics.clone());
    let target_status = target::new_status(&selector);

    let address = config.admin_listen();
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| AppError::Bind { address, source })?;
    let address = listener.local_addr().unwrap_or(address);

    let (exits_tx, exits_rx) = mpsc::channel(64);
    let (captures_tx, captures_rx) =
        mpsc::channel((config.probes.payload_queue / ebpf::CAPTURE_BATCH).max(1));
    let (members_tx, members_rx) = watch::channel(Vec::new());
    let traffic_members = members_rx.clone();
    let interval = Duration::from_millis(config.monitor.interval_ms);

    let (loaded, ebpf_state) = if config.probes.ebpf {
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

    let tracker = Tracker {
        selector,
        poll_interval: Duration::from_millis(config.target.poll_interval_ms),
        bus: bus.clone(),
        metrics: metrics.clone(),
        status: target_status.clone(),
        kernel_exits: exits_rx,
        members: members_tx,
    };
    let handles = agents::handles(&config);
    let alerts: api::FiringAlerts = Arc::new(RwLock::new(std::collections::BTreeMap::new()));
    let api_state = Arc::new(api::ApiState {
        started: Instant::now(),
        target: target_status.clone(),
        agents: handles.clone(),
        metrics: metrics.clone(),
        alerts: alerts.clone(),
        ebpf: ebpf_state,
    });
    let shared = agents::Shared {
        config: config.clone(),
        target: target_status.clone(),
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
                    captures: captures_tx,
                },
                interval,
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
    let (served, (), (), (), (), (), ()) = tokio::join!(
        api::serve(listener, api_state, cancel.clone()),
        api::track_alerts(bus.clone(), alerts, cancel.clone()),
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
        traffic::run(
            captures_rx,
            traffic_members,
            metrics.clone(),
            cancel.clone()
        ),
        probe,
    );
    served.map_err(AppError::Serve)
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
