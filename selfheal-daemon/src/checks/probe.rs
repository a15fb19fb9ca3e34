//! One run of one check: HTTP(S), TCP connect, PostgreSQL (`SELECT 1` and the connection
//! figures, over TLS as the URL's `sslmode` says, with the connector of [`crate::tls`]) and
//! Redis (`PING` over RESP).
//!
//! Errors say what went wrong without the URL: a URL may carry a password or an API key.

use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
};

use super::{PostgresTarget, Spec, Target};
use crate::{
    app::error_chain,
    bus::{CheckStatus, Degraded},
    tls::{connect_postgres, CaFile, PostgresConnectError},
};

/// The most of an HTTP body read to look for `body_contains` or `json_field`.
const MAX_BODY_BYTES: usize = 1 << 20;

/// What one run found.
#[derive(Debug, Clone, PartialEq)]
pub struct Probed {
    pub status: CheckStatus,
    pub degraded: Option<Degraded>,
    /// Until the answer (HTTP: the response head; Postgres: the whole exchange).
    pub response_ms: Option<f64>,
    /// Why it is down or degraded.
    pub message: Option<String>,
    pub postgres: Option<PostgresFigures>,
}

/// A PostgreSQL server's sessions, as `pg_stat_activity` shows them to the check's user.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PostgresFigures {
    pub max_connections: i64,
    /// Client backends, all states.
    pub connections: i64,
    pub active: i64,
    pub idle: i64,
    pub idle_in_transaction: i64,
    pub oldest_idle_in_transaction_seconds: f64,
    /// The longest-running active query but the check's own.
    pub longest_query_seconds: f64,
    pub waiting_on_locks: i64,
}

impl PostgresFigures {
    pub fn used_percent(&self) -> f64 {
        if self.max_connections > 0 {
            self.connections as f64 * 100.0 / self.max_connections as f64
        } else {
            0.0
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ProbeError {
    #[error("no answer within {0} ms")]
    Timeout(u128),
    #[error("{0}")]
    Http(String),
    #[error("answered {status} (expected {expected})")]
    Status { status: String, expected: String },
    #[error("the body does not contain {0:?}")]
    BodyMissing(String),
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("the JSON body has no field {0}")]
    FieldMissing(String),
    #[error("JSON field {field} is {found} (expected {expected})")]
    FieldValue {
        field: String,
        found: String,
        expected: String,
    },
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The TLS side of the connection cannot be set up (a bad `ca_file`): the error chain.
    #[error("{0}")]
    TlsSetup(String),
    #[error("{0}")]
    Postgres(String),
    #[error("{0}")]
    Redis(String),
    #[error("the URL cannot be used: {0}")]
    BadUrl(String),
}

/// Runs `spec` once, within its timeout.
pub async fn run(spec: &Spec, client: &reqwest::Client) -> Probed {
    let started = Instant::now();
    let answered = tokio::time::timeout(spec.timeout, attempt(spec, client, started)).await;
    let result = answered.unwrap_or(Err(ProbeError::Timeout(spec.timeout.as_millis())));
    match result {
        Ok(answer) => {
            let response_ms = answer.elapsed.as_secs_f64() * 1000.0;
            let crowded = answer
                .postgres
                .filter(|figures| figures.used_percent() > spec.max_connections_percent);
            let (degraded, message) = if let Some(figures) = crowded {
                (
                    Some(Degraded::Connections),
                    Some(format!(
                        "{} of {} connections in use ({:.0}%, over {}%)",
                        figures.connections,
                        figures.max_connections,
                        figures.used_percent(),
                        spec.max_connections_percent
                    )),
                )
            } else if answer.elapsed > spec.slow {
                (
                    Some(Degraded::Slow),
                    Some(format!(
                        "answered in {response_ms:.0} ms, over {} ms",
                        spec.slow.as_millis()
                    )),
                )
            } else {
                (None, None)
            };
            Probed {
                status: if degraded.is_some() {
                    CheckStatus::Degraded
                } else {
                    CheckStatus::Healthy
                },
                degraded,
                response_ms: Some(response_ms),
                message,
                postgres: answer.postgres,
            }
        }
        Err(error) => Probed {
            status: CheckStatus::Down,
            degraded: None,
            // A wrong answer still took this long; a refused or timed-out one has no time.
            response_ms: match error {
                ProbeError::Status { .. }
                | ProbeError::BodyMissing(_)
                | ProbeError::NotJson(_)
                | ProbeError::FieldMissing(_)
                | ProbeError::FieldValue { .. } => Some(started.elapsed().as_secs_f64() * 1000.0),
                _ => None,
            },
            message: Some(error.to_string()),
            postgres: None,
        },
    }
}

struct Answer {
    elapsed: Duration,
    postgres: Option<PostgresFigures>,
}

async fn attempt(
    spec: &Spec,
    client: &reqwest::Client,
    started: Instant,
) -> Result<Answer, ProbeError> {
    match &spec.target {
        Target::Http(http) => {
            // The run's timeout covers the whole exchange, body included.
            let mut request = client.get(http.url.expose());
            for (name, value) in &http.headers {
                request = request.header(name.as_str(), value.expose());
            }
            let mut response = request.send().await.map_err(|e| {
                let connect = e.is_connect();
                let text = error_chain(&e.without_url());
                if connect {
                    ProbeError::Connect(text)
                } else {
                    ProbeError::Http(text)
                }
            })?;
            let elapsed = started.elapsed();
            let status = response.status();
            let expected_ok = match http.expect_status {
                Some(expected) => status.as_u16() == expected,
                None => status.is_success(),
            };
            if !expected_ok {
                return Err(ProbeError::Status {
                    status: status.to_string(),
                    expected: http
                        .expect_status
                        .map_or_else(|| "2xx".to_owned(), |s| s.to_string()),
                });
            }
            if http.body_contains.is_some() || http.json_field.is_some() {
                let mut body = Vec::new();
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|e| ProbeError::Http(error_chain(&e.without_url())))?
                {
                    let room = MAX_BODY_BYTES.saturating_sub(body.len());
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if body.len() >= MAX_BODY_BYTES {
                        break;
                    }
                }
                let text = String::from_utf8_lossy(&body);
                if let Some(needle) = &http.body_contains {
                    if !text.contains(needle.as_str()) {
                        return Err(ProbeError::BodyMissing(needle.clone()));
                    }
                }
                if let Some(field) = &http.json_field {
                    check_json(&text, field, http.json_value.as_deref())?;
                }
            }
            Ok(Answer {
                elapsed,
                postgres: None,
            })
        }
        Target::Tcp(address) => {
            TcpStream::connect(address.as_str())
                .await
                .map_err(|e| ProbeError::Connect(e.to_string()))?;
            Ok(Answer {
                elapsed: started.elapsed(),
                postgres: None,
            })
        }
        Target::Postgres(PostgresTarget { url, ca_file }) => {
            let figures = postgres(url.expose(), ca_file.as_ref()).await?;
            Ok(Answer {
                elapsed: started.elapsed(),
                postgres: Some(figures),
            })
        }
        Target::Redis(url) => {
            redis(url.expose()).await?;
            Ok(Answer {
                elapsed: started.elapsed(),
                postgres: None,
            })
        }
    }
}

/// Looks up a dotted path (`checks.db`, `items.0.state`) in a JSON text.
fn check_json(text: &str, field: &str, expected: Option<&str>) -> Result<(), ProbeError> {
    let document: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ProbeError::NotJson(e.to_string()))?;
    let mut value = &document;
    for part in field.split('.') {
        value = match value {
            serde_json::Value::Object(map) => map.get(part),
            serde_json::Value::Array(items) => {
                part.parse::<usize>().ok().and_then(|i| items.get(i))
            }
            _ => None,
        }
        .ok_or_else(|| ProbeError::FieldMissing(field.to_owned()))?;
    }
    let found = match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let ok = match expected {
        Some(expected) => found == expected,
        None => !matches!(
            value,
            serde_json::Value::Null | serde_json::Value::Bool(false)
        ),
    };
    if ok {
        Ok(())
    } else {
        // The body's value, bounded: it goes into alerts, logs and the health log.
        let mut found: String = value.to_string().chars().take(100).collect();
        if found.len() < value.to_string().len() {
            found.push('…');
        }
        Err(ProbeError::FieldValue {
            field: field.to_owned(),
            found,
            expected: expected.map_or_else(
                || "present, not false or null".to_owned(),
                |e| format!("{e:?}"),
            ),
        })
    }
}

const POSTGRES_FIGURES: &str = "\
SELECT
  (SELECT setting::bigint FROM pg_settings WHERE name = 'max_connections'),
  count(*) FILTER (WHERE backend_type = 'client backend'),
  count(*) FILTER (WHERE backend_type = 'client backend' AND state = 'active'),
  count(*) FILTER (WHERE backend_type = 'client backend' AND state = 'idle'),
  count(*) FILTER (WHERE state LIKE 'idle in transaction%'),
  COALESCE(EXTRACT(EPOCH FROM max(now() - state_change)
           FILTER (WHERE state LIKE 'idle in transaction%')), 0)::float8,
  COALESCE(EXTRACT(EPOCH FROM max(now() - query_start)
           FILTER (WHERE state = 'active' AND pid <> pg_backend_pid()
                   AND backend_type = 'client backend')), 0)::float8,
  count(*) FILTER (WHERE wait_event_type = 'Lock')
FROM pg_stat_activity";

/// Connects (reading `ca_file` first), runs `SELECT 1`, reads the session figures,
/// disconnects.
async fn postgres(url: &str, ca_file: Option<&CaFile>) -> Result<PostgresFigures, ProbeError> {
    let (client, connection) = connect_postgres(url, ca_file).await.map_err(|e| match e {
        PostgresConnectError::Tls(e) => ProbeError::TlsSetup(error_chain(&e)),
        PostgresConnectError::Connect(e) => ProbeError::Connect(postgres_error(&e)),
    })?;
    let work = async move {
        let one: i32 = client
            .query_one("SELECT 1", &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| ProbeError::Postgres(postgres_error(&e)))?;
        if one != 1 {
            return Err(ProbeError::Postgres(format!("SELECT 1 returned {one}")));
        }
        let row = client
            .query_one(POSTGRES_FIGURES, &[])
            .await
            .map_err(|e| ProbeError::Postgres(postgres_error(&e)))?;
        let get = |i: usize| row.try_get::<_, i64>(i);
        let getf = |i: usize| row.try_get::<_, f64>(i);
        let figures = (|| {
            Ok::<_, tokio_postgres::Error>(PostgresFigures {
                max_connections: get(0)?,
                connections: get(1)?,
                active: get(2)?,
                idle: get(3)?,
                idle_in_transaction: get(4)?,
                oldest_idle_in_transaction_seconds: getf(5)?,
                longest_query_seconds: getf(6)?,
                waiting_on_locks: get(7)?,
            })
        })()
        .map_err(|e| ProbeError::Postgres(postgres_error(&e)))?;
        Ok(figures)
    };
    // The connection future ends when the client is dropped at the end of `work`: nothing is
    // left running after the check.
    let (result, _) = tokio::join!(work, connection);
    result
}

/// A PostgreSQL error with its SQLSTATE and the server's message, or the I/O cause.
fn postgres_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error_chain(error),
    }
}

/// `AUTH` when the URL has a password, then `PING`, expecting `+PONG`.
async fn redis(url: &str) -> Result<(), ProbeError> {
    let parsed = reqwest::Url::parse(url).map_err(|e| ProbeError::BadUrl(e.to_string()))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| ProbeError::BadUrl("no host".to_owned()))?;
    let port = parsed.port().unwrap_or(6379);
    let stream = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| ProbeError::Connect(e.to_string()))?;
    let mut stream = BufReader::new(stream);
    if let Some(password) = parsed.password() {
        let password = percent_decode(password);
        let user = percent_decode(parsed.username());
        let command: Vec<&[u8]> = if user.is_empty() {
            vec![b"AUTH", password.as_bytes()]
        } else {
            vec![b"AUTH", user.as_bytes(), password.as_bytes()]
        };
        let reply = redis_command(&mut stream, &command).await?;
        if reply != "+OK" {
            return Err(ProbeError::Redis(format!(
                "AUTH refused: {}",
                redis_reply(&reply)
            )));
        }
    }
    let reply = redis_command(&mut stream, &[b"PING"]).await?;
    if reply == "+PONG" {
        Ok(())
    } else {
        Err(ProbeError::Redis(format!(
            "PING answered {}",
            redis_reply(&reply)
        )))
    }
}

/// Sends one RESP command and reads the first line of the reply.
async fn redis_command(
    stream: &mut BufReader<TcpStream>,
    parts: &[&[u8]],
) -> Result<String, ProbeError> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    let io = |e: std::io::Error| ProbeError::Redis(e.to_string());
    stream.get_mut().write_all(&out).await.map_err(io)?;
    let mut line = Vec::new();
    let mut limited = (&mut *stream).take(4096);
    limited.read_until(b'\n', &mut line).await.map_err(io)?;
    if line.is_empty() {
        return Err(ProbeError::Redis(
            "the server closed the connection".to_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_owned())
}

/// A reply line for an error message, bounded.
fn redis_reply(reply: &str) -> String {
    let mut text: String = reply.chars().take(200).collect();
    if text.is_empty() {
        text.push_str("nothing");
    }
    format!("{text:?}")
}

/// `%XX` sequences decoded (a URL's user and password); anything else kept.
pub(crate) fn percent_decode(text: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                // Two hex digits make at most 0xff.
                out.push(u8::try_from(high * 16 + low).unwrap_or(b'?'));
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_fields_are_found_by_dotted_path() {
        let body =
            r#"{"status":"ok","checks":{"db":true,"cache":false},"items":[{"state":"up"}],"n":3}"#;
        assert!(check_json(body, "status", Some("ok")).is_ok());
        assert!(check_json(body, "checks.db", None).is_ok());
        assert!(check_json(body, "items.0.state", Some("up")).is_ok());
        assert!(check_json(body, "n", Some("3")).is_ok());
        let err = check_json(body, "checks.cache", None).expect_err("false");
        assert_eq!(
            err.to_string(),
            "JSON field checks.cache is false (expected present, not false or null)"
        );
        let err = check_json(body, "status", Some("up")).expect_err("value");
        assert_eq!(
            err.to_string(),
            r#"JSON field status is "ok" (expected "up")"#
        );
        assert!(matches!(
            check_json(body, "checks.redis", None),
            Err(ProbeError::FieldMissing(_))
        ));
        assert!(matches!(
            check_json("<html>", "status", None),
            Err(ProbeError::NotJson(_))
        ));
    }

    #[test]
    fn percent_decoding_of_credentials() {
        assert_eq!(percent_decode("p%40ss%3Aword"), "p@ss:word");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("bad%zz%4"), "bad%zz%4");
        assert_eq!(percent_decode("%é%"), "%é%");
    }
}
