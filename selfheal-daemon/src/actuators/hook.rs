//! Hooks: what only the operator knows how to do (clear a cache, fail over to another
//! provider), as a command to run or a URL to POST to, each with a timeout. A hook succeeds
//! when the command exits 0 or the URL answers 2xx within the timeout; its output (cut) is
//! the effect read back.

use std::{process::Stdio, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt as _;

use super::{ActionError, Effect};

/// The most output kept in an effect.
const MAX_OUTPUT: usize = 200;

fn cut(text: &str) -> String {
    let text = text.trim();
    match text.char_indices().nth(MAX_OUTPUT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// Runs `argv` (no shell) with `env` added to the daemon's environment, killing it after
/// `timeout`.
pub async fn run_command(
    argv: &[String],
    env: &[(&str, String)],
    timeout: Duration,
) -> Result<Effect, ActionError> {
    let Some((program, arguments)) = argv.split_first() else {
        return Err(ActionError::Unsafe("an empty hook command".to_owned()));
    };
    let subject = argv.join(" ");
    let mut child = tokio::process::Command::new(program)
        .args(arguments)
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ActionError::Io {
            subject: subject.clone(),
            source,
        })?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let run = async {
        let mut out = String::new();
        let mut err = String::new();
        if let Some(stdout) = stdout.as_mut() {
            let _ = stdout.read_to_string(&mut out).await;
        }
        if let Some(stderr) = stderr.as_mut() {
            let _ = stderr.read_to_string(&mut err).await;
        }
        (child.wait().await, out, err)
    };
    let Ok((status, out, err)) = tokio::time::timeout(timeout, run).await else {
        return Err(ActionError::NotApplied {
            subject,
            wanted: "exit 0".to_owned(),
            found: format!("still running after {} ms (killed)", timeout.as_millis()),
        });
    };
    let status = status.map_err(|source| ActionError::Io {
        subject: subject.clone(),
        source,
    })?;
    if !status.success() {
        return Err(ActionError::NotApplied {
            subject,
            wanted: "exit 0".to_owned(),
            found: format!("{status}: {}", cut(&err)),
        });
    }
    Ok(Effect {
        action: "hook.command",
        subject,
        before: String::new(),
        after: format!("exit 0: {}", cut(&out)),
    })
}

/// POSTs `body` (JSON) to `url` (`http://host:port/path`), giving up after `timeout`. Plain
/// HTTP only: hooks are meant for the backend's own admin endpoints beside it.
pub async fn post(url: &str, body: &str, timeout: Duration) -> Result<Effect, ActionError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|err| ActionError::Unsafe(format!("{url:?} is not a URL: {err}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(ActionError::Unsafe(format!(
            "{url:?}: hook URLs must be http:// (the backend's own endpoints)"
        )));
    }
    let Some(authority) = uri.authority().cloned() else {
        return Err(ActionError::Unsafe(format!("{url:?} has no host")));
    };
    let address = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let path = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), ToString::to_string);
    let io = |source: std::io::Error| ActionError::Io {
        subject: url.to_owned(),
        source,
    };
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(&address).await.map_err(io)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| io(std::io::Error::other(e)))?;
        tokio::spawn(connection);
        let request = http::Request::post(path)
            .header(http::header::HOST, authority.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .map_err(|e| io(std::io::Error::other(e)))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| io(std::io::Error::other(e)))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| io(std::io::Error::other(e)))?
            .to_bytes();
        Ok::<_, ActionError>((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    let Ok(answer) = tokio::time::timeout(timeout, exchange).await else {
        return Err(ActionError::NotApplied {
            subject: url.to_owned(),
            wanted: "a 2xx answer".to_owned(),
            found: format!("no answer within {} ms", timeout.as_millis()),
        });
    };
    let (status, text) = answer?;
    if !status.is_success() {
        return Err(ActionError::NotApplied {
            subject: url.to_owned(),
            wanted: "a 2xx answer".to_owned(),
            found: format!("{status}: {}", cut(&text)),
        });
    }
    Ok(Effect {
        action: "hook.post",
        subject: url.to_owned(),
        before: String::new(),
        after: format!("{status}: {}", cut(&text)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[tokio::test]
    async fn a_command_succeeds_fails_or_times_out() {
        let ok = run_command(
            &argv(&["sh", "-c", "echo cleared $SELFHEAL_SIGNATURE"]),
            &[("SELFHEAL_SIGNATURE", "http.error_spike".to_owned())],
            Duration::from_secs(5),
        )
        .await
        .expect("runs");
        assert_eq!(ok.after, "exit 0: cleared http.error_spike");
        let failed = run_command(
            &argv(&["sh", "-c", "echo no cache >&2; exit 3"]),
            &[],
            Duration::from_secs(5),
        )
        .await
        .expect_err("exit 3");
        assert!(failed.to_string().contains("no cache"), "{failed}");
        let slow = run_command(&argv(&["sleep", "10"]), &[], Duration::from_millis(200))
            .await
            .expect_err("times out");
        assert!(
            slow.to_string().contains("still running after 200 ms"),
            "{slow}"
        );
        assert!(matches!(
            run_command(&[], &[], Duration::from_secs(1)).await,
            Err(ActionError::Unsafe(_))
        ));
    }

    /// A one-shot HTTP server on loopback answering `status` and returning the request it got.
    async fn serve_once(status: u16) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!(
            "http://{}/admin/cache/clear",
            listener.local_addr().expect("addr")
        );
        let task = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt as _;
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !String::from_utf8_lossy(&request).contains("{\"why\"") {
                let n = socket.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            let answer = format!(
                "HTTP/1.1 {status} X\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndone"
            );
            socket.write_all(answer.as_bytes()).await.expect("write");
            String::from_utf8_lossy(&request).into_owned()
        });
        (url, task)
    }

    #[tokio::test]
    async fn a_post_hook_reaches_the_server_and_reads_its_answer() {
        let (url, server) = serve_once(200).await;
        let effect = post(&url, "{\"why\":\"test\"}", Duration::from_secs(5))
            .await
            .expect("posted");
        assert_eq!(effect.after, "200 OK: done");
        let request = server.await.expect("server");
        assert!(
            request.starts_with("POST /admin/cache/clear HTTP/1.1"),
            "{request}"
        );
        assert!(request.contains("{\"why\":\"test\"}"), "{request}");

        let (url, server) = serve_once(503).await;
        let err = post(&url, "{\"why\":\"test\"}", Duration::from_secs(5))
            .await
            .expect_err("503");
        assert!(err.to_string().contains("503"), "{err}");
        server.await.expect("server");

        assert!(matches!(
            post("https://example.com/x", "{}", Duration::from_secs(1)).await,
            Err(ActionError::Unsafe(_))
        ));
    }
}
