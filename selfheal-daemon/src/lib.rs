//! selfheal: a self-healing sidecar daemon for one backend service and its `PostgreSQL`.
//!
//! `main.rs` is thin: it parses the command line, loads the config and calls [`app::run`].
//! See ARCHITECTURE.md for the map of these modules and their invariants.

pub mod activity;
pub mod actuators;
pub mod agents;
pub mod alerts;
pub mod api;
pub mod app;
pub mod bus;
pub mod checks;
pub mod cli;
pub mod config;
pub mod notify;
pub mod probes;
pub mod protocols;
pub mod repairs;
pub mod sched;
pub mod state;
pub mod store;
pub mod target;
pub mod telemetry;
pub mod tls;
pub mod traffic;
pub mod unix_http;
