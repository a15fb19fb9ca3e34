//! `demo-backend`: the backend that selfheal's demo and end-to-end tests watch.
//!
//! An ordinary HTTP/1.1 JSON API on Postgres (plain TCP) serving five product platforms told
//! apart by the `Host` header, with fault switches under `/__fault` that make it crash, hang,
//! leak, spin, or misuse its database. It knows nothing of selfheal: the daemon observes it
//! from outside.

mod api;
mod db;
mod faults;
mod platform;

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

use crate::api::AppState;
use crate::faults::Faults;

/// After SIGTERM/SIGINT, requests still running after this long are abandoned.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Demo backend for selfheal: a multi-platform JSON API on Postgres with fault switches.
#[derive(Debug, Parser)]
#[command(name = "demo-backend", version)]
struct Cli {
    /// Address to listen on (port 0 picks a free port; the banner shows the real one).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    #[arg(
        long,
        help = "Postgres URL, e.g. postgres://user:pw@127.0.0.1:5432/db (plain TCP, no TLS)",
        env = "DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        value_parser = db::parse_database_url
    )]
    database_url: tokio_postgres::Config,

    /// Size of the request connection pool.
    #[arg(long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pool_size: u16,

    /// How long to keep retrying while Postgres is not reachable at start-up.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    connect_timeout_secs: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("demo-backend: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let target = db::describe(&cli.database_url);
    tracing::info!(listen = %cli.listen, database = %target, pool_size = cli.pool_size, "starting");

    // Install the handlers first, so a signal during start-up is not lost.
    let sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let mut setup_client = db::connect_with_retry(
        &cli.database_url,
        Duration::from_secs(cli.connect_timeout_secs),
    )
    .await?;
    db::setup(&mut setup_client).await?;
    drop(setup_client);

    let pool = db::build_pool(cli.database_url.clone(), usize::from(cli.pool_size))?;
    let faults = Faults::new(cli.database_url.clone());
    let app = api::router(AppState {
        pool,
        faults: faults.clone(),
    });

    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "demo-backend listening on http://{addr}").context("writing to stdout")?;
        stdout.flush().context("flushing stdout")?;
    }
    tracing::info!(%addr, "listening");

    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal(sigterm, sigint, faults))
        .await
        .context("serving HTTP")?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT, after turning every fault off (so hung requests finish and
/// held database sessions close). A watchdog ends the process if requests still hang after
/// [`SHUTDOWN_GRACE`].
async fn shutdown_signal(
    mut sigterm: tokio::signal::unix::Signal,
    mut sigint: tokio::signal::unix::Signal,
    faults: std::sync::Arc<Faults>,
) {
    let name = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
    };
    tracing::info!("{name} received, shutting down");
    faults.clear();
    let watchdog = std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(|| {
            std::thread::sleep(SHUTDOWN_GRACE);
            tracing::warn!(
                "requests still running {SHUTDOWN_GRACE:?} after the signal; exiting anyway"
            );
            std::process::exit(0);
        });
    if let Err(e) = watchdog {
        tracing::warn!(error = %e, "cannot start the shutdown watchdog");
    }
}
