//! The command line: `selfheal run --config FILE`, `selfheal check-config FILE`.
//!
//! Usage errors and bad configs exit with 64 (`EX_USAGE`), every problem listed.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Exit status for bad usage or a bad config (`EX_USAGE` of sysexits.h).
pub const EXIT_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "selfheal",
    version,
    about = "Self-healing sidecar for a backend service and its PostgreSQL"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file (with the environment applied) and list every problem.
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
    },
}
