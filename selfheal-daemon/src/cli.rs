//! The command line: `selfheal run --config FILE`, `selfheal check-config FILE`, and the
//! clients of the admin API: `selfheal status`, `selfheal alerts`, `selfheal ack ID`,
//! `selfheal resolve ID`, `selfheal repairs`, `selfheal queries`.
//!
//! Usage errors and bad configs exit with 64 (`EX_USAGE`), every problem listed. The API
//! clients exit 0 when the daemon did what was asked, 1 when it refused (the reason is
//! printed), and 69 (`EX_UNAVAILABLE`) when it cannot be reached; `status` exits 0 when the
//! daemon reports healthy and 1 when it reports degraded or critical.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Env};

/// Exit status for bad usage or a bad config (`EX_USAGE` of sysexits.h).
pub const EXIT_USAGE: u8 = 64;
/// Exit status when the daemon answered with a refusal (unknown id, transition not allowed).
pub const EXIT_REFUSED: u8 = 1;
/// Exit status when the daemon's admin API cannot be reached (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// Where the API clients look for the config when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/selfheal/selfheal.toml";

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
    /// A summary of the daemon like `systemctl status`: target, health, agents, platforms,
    /// active alerts, last repairs. Exits 0 when healthy, 1 when degraded or critical.
    Status {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List alerts (the active ones unless told otherwise).
    Alerts {
        /// firing, acknowledged, resolved, active or all.
        #[arg(long)]
        state: Option<String>,
        /// critical, warning or info.
        #[arg(long)]
        severity: Option<String>,
        #[arg(long)]
        platform: Option<String>,
        /// Every alert kept, resolved ones included, newest first.
        #[arg(long)]
        history: bool,
        #[arg(long)]
        limit: Option<u32>,
        #[arg(long)]
        offset: Option<u32>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Acknowledge an alert: someone is on it (its notifications stop repeating).
    Ack {
        id: String,
        #[command(flatten)]
        change: ChangeArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Resolve an alert by hand.
    Resolve {
        id: String,
        #[command(flatten)]
        change: ChangeArgs,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The repair decisions, newest first: what ran (or would have), and how it ended.
    Repairs {
        /// How many (1 to 1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        /// Only this cause (`target.crashed`, `db.slow_query`, …).
        #[arg(long)]
        signature: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// The target's PostgreSQL queries per fingerprint, slowest in total first.
    Queries {
        /// How many (at least 1).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// How the API clients find the daemon.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// The daemon's config, for `admin.listen`, `admin.token_file` and `state.dir`
    /// [default: /etc/selfheal/selfheal.toml when it exists].
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// The admin API's address, such as 127.0.0.1:9797 [default: admin.listen].
    #[arg(long, conflicts_with = "socket")]
    pub addr: Option<String>,
    /// The admin API's unix socket (`admin.socket`) instead of its address.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// A file holding the bearer token [default: `SELFHEAL_ADMIN_TOKEN`, else
    /// `admin.token_file`, else `state.dir/admin.token`].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON `data` instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Who acknowledges or resolves, and why: recorded in the audit.
#[derive(Debug, Clone, Args)]
pub struct ChangeArgs {
    /// Recorded as the actor [default: cli:<your user name>].
    #[arg(long)]
    pub by: Option<String>,
    /// A note for the audit.
    #[arg(long)]
    pub note: Option<String>,
}

/// Where and how to reach the API.
struct Client {
    /// `http://<address>`, or `unix:<path>` with `socket` set.
    base: String,
    socket: Option<PathBuf>,
    /// `None` only for `status` without a readable token: it falls back to the open health.
    token: Option<String>,
    json: bool,
    agent: ureq::Agent,
}

/// A failure of a client command, with its exit status.
#[derive(Debug)]
struct Failure {
    status: u8,
    message: String,
}

impl Failure {
    fn usage(message: impl Into<String>) -> Self {
        Self {
            status: EXIT_USAGE,
            message: message.into(),
        }
    }
}

/// Runs an API client command; its exit status. `run` and `check-config` are not clients.
pub fn run_client(command: Command, env: &Env) -> u8 {
    let outcome = match command {
        Command::Alerts {
            state,
            severity,
            platform,
            history,
            limit,
            offset,
            api,
        } => Client::new(&api, env).and_then(|client| {
            let mut query: Vec<(&str, String)> = Vec::new();
            let mut add = |name, value: Option<String>| {
                if let Some(value) = value {
                    query.push((name, value));
                }
            };
            add("state", state);
            add("severity", severity);
            add("platform", platform);
            add("history", history.then(|| "true".to_owned()));
            add("limit", limit.map(|n| n.to_string()));
            add("offset", offset.map(|n| n.to_string()));
            let data = client.get("/api/v1/system/alerts", &query)?;
            client.print(&data, print_alerts);
            Ok(())
        }),
        Command::Status { api } => return status(&api, env),
        Command::Repairs {
            limit,
            signature,
            api,
        } => Client::new(&api, env).and_then(|client| {
            let mut query = vec![("limit", limit.to_string())];
            if let Some(signature) = signature {
                query.push(("signature", signature));
            }
            let data = client.get("/api/v1/system/repairs", &query)?;
            client.print(&data, print_repairs);
            Ok(())
        }),
        Command::Queries { limit, api } => Client::new(&api, env).and_then(|client| {
            let data = client.get("/api/v1/system/queries", &[])?;
            client.print(&data, |data| {
                print_queries(data, usize::try_from(limit).unwrap_or(usize::MAX));
            });
            Ok(())
        }),
        Command::Ack { id, change, api } => change_alert(&api, env, &id, "acknowledge", &change),
        Command::Resolve { id, change, api } => change_alert(&api, env, &id, "resolve", &change),
        Command::Run { .. } | Command::CheckConfig { .. } => {
            Err(Failure::usage("not an API client command".to_owned()))
        }
    };
    match outcome {
        Ok(()) => 0,
        Err(failure) => {
            eprintln!("selfheal: {}", failure.message);
            failure.status
        }
    }
}

/// `selfheal status`: 0 healthy, 1 degraded or critical, 69 unreachable. Without a token it
/// can read (or with one the daemon refuses), the summary comes from the open health endpoint.
fn status(api: &ApiArgs, env: &Env) -> u8 {
    let outcome = Client::with_token(api, env, false).and_then(|mut client| {
        if client.token.is_some() {
            match client.get("/api/v1/system/dashboard", &[]) {
                Ok(data) => {
                    client.print(&data, print_status);
                    return Ok(data["system"]["status"] == "healthy");
                }
                Err(failure) if failure.message.contains("(401)") => client.token = None,
                Err(failure) => return Err(failure),
            }
        }
        let data = client.get("/api/v1/system/health", &[])?;
        client.print(&data, print_health);
        Ok(data["status"] == "healthy")
    });
    match outcome {
        Ok(true) => 0,
        Ok(false) => EXIT_REFUSED,
        Err(failure) => {
            eprintln!("selfheal: {}", failure.message);
            failure.status
        }
    }
}

fn change_alert(
    api: &ApiArgs,
    env: &Env,
    id: &str,
    action: &str,
    change: &ChangeArgs,
) -> Result<(), Failure> {
    let client = Client::new(api, env)?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Failure::usage(format!(
            "{id:?} is not an alert id (a number)"
        )));
    }
    let by = change.by.clone().unwrap_or_else(default_actor);
    let body = serde_json::json!({
        "by": by,
        "note": change.note.clone().unwrap_or_default(),
    });
    let data = client.post(&format!("/api/v1/system/alerts/{id}/{action}"), &body)?;
    client.print(&data, |data| {
        let done = if action == "acknowledge" {
            "acknowledged"
        } else {
            "resolved"
        };
        println!(
            "alert {} {done} by {} ({}: {})",
            data["id"],
            by,
            data["rule"].as_str().unwrap_or("?"),
            data["message"].as_str().unwrap_or("")
        );
    });
    Ok(())
}

/// `cli:<user name>`, or `cli` when the user has no name.
fn default_actor() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map_or_else(|| "cli".to_owned(), |user| format!("cli:{}", user.name))
}

impl Client {
    fn new(args: &ApiArgs, env: &Env) -> Result<Self, Failure> {
        Self::with_token(args, env, true)
    }

    /// A client; without `required`, a token that cannot be read leaves it anonymous.
    fn with_token(args: &ApiArgs, env: &Env, required: bool) -> Result<Self, Failure> {
        // The config is read only for what the flags and the environment leave open.
        let needed = (args.addr.is_none() && args.socket.is_none())
            || (args.token_file.is_none() && env.get("SELFHEAL_ADMIN_TOKEN").is_none());
        let config_path = args.config.clone().or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG);
            (needed && default.exists()).then_some(default)
        });
        let config = match &config_path {
            Some(path) => Some(config::load(path, env).map_err(|err| {
                let mut message = err.to_string();
                match &err {
                    config::ConfigError::Invalid { problems, .. } => {
                        for problem in problems {
                            let _ = write!(message, "\n  {problem}");
                        }
                    }
                    config::ConfigError::Read { source, .. } => {
                        let _ = write!(message, "\n  {source}");
                    }
                }
                Failure::usage(message)
            })?),
            None => None,
        };
        let admin = config.as_ref().map(|c| c.admin.clone()).unwrap_or_default();
        let state_dir = config.as_ref().map_or_else(
            || config::StateConfig::default().dir,
            |c| c.state.dir.clone(),
        );
        let addr = args.addr.clone().unwrap_or_else(|| admin.listen.clone());
        let token = if let Some(path) = &args.token_file {
            read_token(path)
        } else if let Some(token) = env.get("SELFHEAL_ADMIN_TOKEN") {
            Ok(token.trim().to_owned())
        } else if let Some(path) = &admin.token_file {
            read_token(path)
        } else {
            read_token(&state_dir.join("admin.token"))
        };
        let token = match token {
            Ok(token) => Some(token),
            Err(failure) if required => return Err(failure),
            Err(_) => None,
        };
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        Ok(Self {
            base: args.socket.as_ref().map_or_else(
                || format!("http://{addr}"),
                |path| format!("unix:{}", path.display()),
            ),
            socket: args.socket.clone(),
            token,
            json: args.json,
            agent,
        })
    }

    fn get(&self, path: &str, query: &[(&str, String)]) -> Result<serde_json::Value, Failure> {
        if let Some(socket) = &self.socket {
            let mut target = path.to_owned();
            for (i, (name, value)) in query.iter().enumerate() {
                target.push(if i == 0 { '?' } else { '&' });
                target.push_str(name);
                target.push('=');
                target.push_str(&percent_encode(value));
            }
            let answer = self.over_socket(socket, http::Method::GET, &target, None);
            return self.answer(path, answer);
        }
        let mut request = self.agent.get(format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        for (name, value) in query {
            request = request.query(*name, value);
        }
        self.answer(path, parts(request.call()))
    }

    fn post(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value, Failure> {
        if let Some(socket) = &self.socket {
            let answer = self.over_socket(
                socket,
                http::Method::POST,
                path,
                Some(body.to_string().into_bytes()),
            );
            return self.answer(path, answer);
        }
        let request = self.agent.post(format!("{}{path}", self.base)).header(
            "Authorization",
            &format!("Bearer {}", self.token.as_deref().unwrap_or_default()),
        );
        self.answer(path, parts(request.send_json(body)))
    }

    /// One request on the daemon's unix socket: the status and the body's text.
    fn over_socket(
        &self,
        socket: &Path,
        method: http::Method,
        target: &str,
        json: Option<Vec<u8>>,
    ) -> Result<(u16, String), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let headers: Vec<_> = self
            .token
            .iter()
            .map(|token| (http::header::AUTHORIZATION, format!("Bearer {token}")))
            .collect();
        let exchange =
            crate::unix_http::request(socket, method, target, "selfheal", &headers, json);
        let (status, body) = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), exchange).await })
            .map_err(|_| "no answer within 10 s".to_owned())??;
        Ok((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
    }

    /// The `data` of a successful answer; a refusal (exit 1) or an unreachable daemon (69).
    fn answer(
        &self,
        path: &str,
        response: Result<(u16, String), String>,
    ) -> Result<serde_json::Value, Failure> {
        let unreachable = |err: &dyn std::fmt::Display| Failure {
            status: EXIT_UNAVAILABLE,
            message: format!(
                "the daemon's admin API at {} cannot be reached: {err}",
                self.base
            ),
        };
        let (status, text) = response.map_err(|err| unreachable(&err))?;
        let body: serde_json::Value = serde_json::from_str(&text).map_err(|_| Failure {
            status: EXIT_REFUSED,
            message: format!("{path} answered {status} with something that is not JSON: {text}"),
        })?;
        if (200..300).contains(&status) && body["success"] == true {
            Ok(body["data"].clone())
        } else {
            Err(Failure {
                status: EXIT_REFUSED,
                message: format!(
                    "the daemon refused ({}): {}",
                    status,
                    body["error"].as_str().unwrap_or(&text)
                ),
            })
        }
    }

    fn print(&self, data: &serde_json::Value, human: impl FnOnce(&serde_json::Value)) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(data).unwrap_or_else(|_| data.to_string())
            );
        } else {
            human(data);
        }
    }
}

/// A ureq answer as its status and text, or why there is none.
fn parts(
    response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
) -> Result<(u16, String), String> {
    let mut response = response.map_err(|err| err.to_string())?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|err| err.to_string())?;
    Ok((status, text))
}

/// A query value with everything but unreserved characters percent-encoded (RFC 3986).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

fn read_token(path: &Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        Failure::usage(format!(
            "cannot read the admin token from {}: {err} (run as the daemon's user, or pass \
             --token-file or SELFHEAL_ADMIN_TOKEN)",
            path.display()
        ))
    })?;
    Ok(text.trim().to_owned())
}

/// `5s`, `3m`, `2h`, `4d`: how long ago `at_ms` was.
fn ago(now_ms: i64, at_ms: i64) -> String {
    let secs = (now_ms - at_ms).max(0) / 1000;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Prints rows under a header, columns padded to their widest cell (the last one is not).
fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ", width = widths[i]);
            }
        }
        println!("{}", out.trim_end());
    };
    line(&header.map(str::to_owned));
    for row in rows {
        line(row);
    }
}

/// A JSON value as a table cell: strings without their control characters (alert messages
/// and query text come from the traffic), `-` for null.
fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn millis(value: &serde_json::Value) -> String {
    value
        .as_f64()
        .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"))
}

fn print_status(data: &serde_json::Value) {
    let now = crate::state::now_ms();
    let system = &data["system"];
    let target = &system["target"];
    let symbol = match system["status"].as_str() {
        Some("healthy") => "●",
        Some("degraded") => "◐",
        _ => "○",
    };
    println!(
        "{symbol} selfheal {} - {} (up {})",
        text(&system["version"]),
        text(&system["status"]),
        ago(
            now,
            now - system["uptime_seconds"].as_i64().unwrap_or(0) * 1000
        )
    );
    let pid = target["pid"]
        .as_u64()
        .map_or_else(String::new, |pid| format!(" pid {pid}"));
    let since = target["running_since_unix_ms"]
        .as_i64()
        .map_or_else(String::new, |at| format!(", for {}", ago(now, at)));
    println!(
        "     Target: {} {}{pid}{since}, {} restart(s)",
        text(&target["selector"]),
        text(&target["state"]),
        target["restarts"]
    );
    if let Some(error) = target["last_error"].as_str() {
        println!("             {error}");
    }
    let healing = &system["self_healing"];
    let circuits: Vec<String> = healing["open_circuits"]
        .as_array()
        .map(|list| list.iter().map(text).collect())
        .unwrap_or_default();
    println!(
        "  Self-heal: {}{}",
        if healing["enabled"] == true {
            text(&healing["mode"])
        } else {
            "off".to_owned()
        },
        if circuits.is_empty() {
            String::new()
        } else {
            format!(", circuits open: {}", circuits.join(", "))
        }
    );
    let agents = data["agents"].as_array().map_or(&[][..], Vec::as_slice);
    let running = agents.iter().filter(|a| a["state"] == "running").count();
    let others: Vec<String> = agents
        .iter()
        .filter(|a| a["state"] != "running")
        .map(|a| format!("{} {}", text(&a["name"]), text(&a["state"])))
        .collect();
    println!(
        "     Agents: {running} of {} running{}",
        agents.len(),
        if others.is_empty() {
            String::new()
        } else {
            format!(" ({})", others.join(", "))
        }
    );
    for platform in data["platforms"].as_array().map_or(&[][..], Vec::as_slice) {
        let traffic = &platform["traffic"];
        let figures = if traffic.is_null() {
            "no traffic in 5 min".to_owned()
        } else {
            format!(
                "{:.2} req/s, p95 {}, {:.1} % errors",
                traffic["rate_per_second"].as_f64().unwrap_or(0.0),
                millis(&traffic["p95_ms"]),
                traffic["error_rate"].as_f64().unwrap_or(0.0) * 100.0
            )
        };
        println!(
            "   Platform: {} {} ({figures})",
            text(&platform["name"]),
            text(&platform["status"])
        );
        for reason in platform["reasons"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
        {
            println!("             {}", text(reason));
        }
    }
    let alerts = &data["alerts"];
    println!(
        "     Alerts: {} active ({} critical, {} warning), {} in all, {} auto-resolved",
        alerts["active"],
        alerts["critical"],
        alerts["warning"],
        alerts["total"],
        alerts["auto_resolved"]
    );
    let repairs = &data["repairs"];
    let rate = repairs["success_rate"].as_f64().map_or_else(
        || "none verified yet".to_owned(),
        |r| format!("{:.0} % succeeded", r * 100.0),
    );
    println!(
        "    Repairs: {} decision(s), {rate}, {} active",
        repairs["total"], repairs["active"]
    );
    for repair in repairs["last"].as_array().map_or(&[][..], Vec::as_slice) {
        println!(
            "             {} ago  {} -> {}: {}",
            ago(now, repair["at_ms"].as_i64().unwrap_or(now)),
            text(&repair["signature"]),
            text(&repair["action"]),
            text(&repair["state"])
        );
    }
}

/// `status` from the open health endpoint (no token): health, target, agents, alerts.
fn print_health(data: &serde_json::Value) {
    let now = crate::state::now_ms();
    let target = &data["target"];
    println!(
        "selfheal {} - {} (up {}); no readable admin token: the summary from /health only",
        text(&data["version"]),
        text(&data["status"]),
        ago(
            now,
            now - data["uptime_seconds"].as_i64().unwrap_or(0) * 1000
        )
    );
    println!(
        "     Target: {} {} {}, {} restart(s)",
        text(&target["selector"]),
        text(&target["state"]),
        target["pid"]
            .as_u64()
            .map_or_else(String::new, |pid| format!("pid {pid}")),
        target["restarts"]
    );
    let agents = data["agents"].as_array().map_or(&[][..], Vec::as_slice);
    let running = agents.iter().filter(|a| a["state"] == "running").count();
    println!("     Agents: {running} of {} running", agents.len());
    let alerts = data["alerts"].as_array().map_or(&[][..], Vec::as_slice);
    println!("     Alerts: {} active", alerts.len());
    for alert in alerts {
        println!(
            "             #{} {} {}: {}",
            alert["id"],
            text(&alert["severity"]),
            text(&alert["rule"]),
            text(&alert["message"])
        );
    }
}

fn print_repairs(data: &serde_json::Value) {
    let repairs = data["repairs"].as_array().map_or(&[][..], Vec::as_slice);
    println!(
        "mode {}{}",
        text(&data["mode"]),
        data["open_circuits"]
            .as_array()
            .filter(|c| !c.is_empty())
            .map_or_else(String::new, |c| format!(
                ", circuits open: {}",
                c.iter().map(text).collect::<Vec<_>>().join(", ")
            ))
    );
    if repairs.is_empty() {
        println!("no repairs yet");
        return;
    }
    let now = crate::state::now_ms();
    let rows: Vec<[String; 6]> = repairs
        .iter()
        .map(|r| {
            [
                text(&r["id"]),
                ago(now, r["at_ms"].as_i64().unwrap_or(now)),
                text(&r["signature"]),
                text(&r["action"]),
                text(&r["state"]),
                r["error"]
                    .as_str()
                    .map_or_else(|| text(&r["summary"]), ToOwned::to_owned),
            ]
        })
        .collect();
    print_table(["ID", "AGE", "CAUSE", "ACTION", "STATE", "DETAIL"], &rows);
}

fn print_queries(data: &serde_json::Value, limit: usize) {
    let queries = data["queries"].as_array().map_or(&[][..], Vec::as_slice);
    if queries.is_empty() {
        println!(
            "no queries seen: the capture needs probes.ebpf and probes.payload_bytes > 0, and \
             with capture = \"cgroup\" (the default) the target in a cgroup of its own and \
             PostgreSQL over TCP (or probes.unix_sockets = \"auto\"); selfheal_capture_mode \
             and selfheal_capture_unseen_postgres_connections in /metrics, and the daemon's \
             log, say which"
        );
        return;
    }
    let rows: Vec<[String; 6]> = queries
        .iter()
        .take(limit)
        .map(|q| {
            [
                text(&q["count"]),
                millis(&q["mean_ms"]),
                millis(&q["p95_ms"]),
                format!("{:.0} ms", q["total_ms"].as_f64().unwrap_or(0.0)),
                text(&q["errors"]),
                text(&q["fingerprint"]),
            ]
        })
        .collect();
    print_table(["COUNT", "MEAN", "P95", "TOTAL", "ERRORS", "QUERY"], &rows);
    println!("{} of {} fingerprint(s)", rows.len(), queries.len());
}

fn print_alerts(data: &serde_json::Value) {
    let alerts = data["alerts"].as_array().map_or(&[][..], Vec::as_slice);
    if alerts.is_empty() {
        println!("no alerts match (total {})", data["total"]);
        return;
    }
    let now = crate::state::now_ms();
    let rows: Vec<[String; 8]> = alerts
        .iter()
        .map(|a| {
            [
                a["id"].to_string(),
                text(&a["state"]),
                text(&a["severity"]),
                text(&a["key"]),
                text(&a["platform"]),
                a["count"].to_string(),
                ago(now, a["first_seen_unix_ms"].as_i64().unwrap_or(now)),
                text(&a["message"]),
            ]
        })
        .collect();
    print_table(
        [
            "ID", "STATE", "SEVERITY", "KEY", "PLATFORM", "COUNT", "AGE", "MESSAGE",
        ],
        &rows,
    );
    println!(
        "{} of {} alert(s), from offset {}",
        rows.len(),
        data["total"],
        data["offset"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(percent_encode("tackle.io"), "tackle.io");
        assert_eq!(percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }

    #[test]
    fn ages_read_short() {
        assert_eq!(ago(10_000, 5_000), "5s");
        assert_eq!(ago(600_000, 0), "10m");
        assert_eq!(ago(3 * 3_600_000, 0), "3h");
        assert_eq!(ago(5 * 86_400_000, 0), "5d");
        assert_eq!(ago(0, 5_000), "0s");
    }

    #[test]
    fn the_client_commands_parse() {
        let cli = Cli::try_parse_from([
            "selfheal",
            "ack",
            "12",
            "--by",
            "me",
            "--note",
            "on it",
            "--addr",
            "127.0.0.1:1",
            "--json",
        ])
        .expect("parses");
        let Command::Ack { id, change, api } = cli.command else {
            panic!("ack")
        };
        assert_eq!(id, "12");
        assert_eq!(change.by.as_deref(), Some("me"));
        assert_eq!(change.note.as_deref(), Some("on it"));
        assert_eq!(api.addr.as_deref(), Some("127.0.0.1:1"));
        assert!(api.json);
        let cli = Cli::try_parse_from(["selfheal", "alerts", "--history", "--limit", "5"])
            .expect("parses");
        assert!(matches!(
            cli.command,
            Command::Alerts {
                history: true,
                limit: Some(5),
                ..
            }
        ));
        assert!(Cli::try_parse_from(["selfheal", "resolve"]).is_err());
    }

    #[test]
    fn an_unreachable_daemon_exits_69_and_a_bad_id_64() {
        let dir = tempfile::tempdir().expect("dir");
        let token = dir.path().join("token");
        std::fs::write(&token, "0123456789abcdef0123").expect("token");
        // A port nothing listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let api = ApiArgs {
            config: None,
            socket: None,
            addr: Some(format!("127.0.0.1:{port}")),
            token_file: Some(token),
            json: false,
        };
        let change = ChangeArgs {
            by: None,
            note: None,
        };
        let env = Env::default();
        assert_eq!(
            run_client(
                Command::Ack {
                    id: "3".into(),
                    change: change.clone(),
                    api: api.clone()
                },
                &env
            ),
            EXIT_UNAVAILABLE
        );
        assert_eq!(
            run_client(
                Command::Resolve {
                    id: "x1".into(),
                    change,
                    api
                },
                &env
            ),
            EXIT_USAGE
        );
    }
}
