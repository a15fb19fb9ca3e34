//! The `selfheal` binary: parse the command line, load the config (or exit 64 with every
//! problem), run the daemon until SIGTERM or SIGINT, then drain; or run one of the admin API's
//! client commands (`alerts`, `ack`, `resolve`, in `cli`).

use std::process::ExitCode;

use clap::Parser as _;
use selfheal_daemon::{
    app,
    cli::{Cli, Command, EXIT_USAGE},
    config::{self, ConfigError, Env},
};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return if err.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let env = Env::from_process();
    match cli.command {
        Command::CheckConfig { file } => match config::load(&file, &env) {
            Ok(config) => {
                let target = config
                    .target
                    .selector()
                    .map_or_else(String::new, |s| s.to_string());
                println!("{}: ok (target: {target})", file.display());
                ExitCode::SUCCESS
            }
            Err(err) => report_config_error(&err),
        },
        Command::Run { config } => {
            let mut filter = tracing_subscriber::EnvFilter::try_from_env("SELFHEAL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            // reqwest logs each new connection's whole URL at debug level, and a webhook's URL
            // is its secret: that module stays at info whatever SELFHEAL_LOG asks.
            if let Ok(cap) = "reqwest::connect=info".parse() {
                filter = filter.add_directive(cap);
            }
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                // Colours for a terminal only: journald and log files get plain text.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let config = match config::load(&config, &env) {
                Ok(config) => config,
                Err(err) => return report_config_error(&err),
            };
            run(config)
        }
        command @ (Command::Status { .. }
        | Command::Alerts { .. }
        | Command::Ack { .. }
        | Command::Resolve { .. }
        | Command::Repairs { .. }
        | Command::Queries { .. }) => {
            ExitCode::from(selfheal_daemon::cli::run_client(command, &env))
        }
    }
}

fn report_config_error(err: &ConfigError) -> ExitCode {
    eprintln!("selfheal: {err}");
    match err {
        ConfigError::Invalid { problems, .. } => {
            for problem in problems {
                eprintln!("  {problem}");
            }
        }
        ConfigError::Read { source, .. } => eprintln!("  {source}"),
    }
    ExitCode::from(EXIT_USAGE)
}

fn run(config: config::Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("selfheal: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let cancel = CancellationToken::new();
        let daemon = tokio::spawn(app::run(config, cancel.clone()));
        let signal = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = term.recv() => Ok::<_, std::io::Error>("SIGTERM"),
                result = tokio::signal::ctrl_c() => result.map(|()| "SIGINT"),
            }
        };
        tokio::pin!(daemon);
        let outcome = tokio::select! {
            signal = signal => {
                match signal {
                    Ok(name) => tracing::info!(signal = name, "shutting down"),
                    Err(err) => tracing::error!(error = %err, "cannot wait for signals; shutting down"),
                }
                cancel.cancel();
                daemon.await
            }
            outcome = &mut daemon => outcome,
        };
        match outcome {
            Ok(Ok(())) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Ok(Err(err)) => {
                tracing::error!(error = %app::error_chain(&err), "daemon failed");
                ExitCode::FAILURE
            }
            Err(err) => {
                tracing::error!(error = %err, "daemon task failed");
                ExitCode::FAILURE
            }
        }
    })
}
