//! The HTTP recorder.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::log::{Background, Log, WaitTimeout};

/// One request as the recorder received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    pub query: Option<String>,
    /// Names in lowercase, in the order received; values lossily decoded as UTF-8.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

struct Shared {
    requests: Log<Request>,
    /// The requests answered with a 2xx status: what a sender may count as delivered.
    accepted: Log<Request>,
    answer: Mutex<(u16, String)>,
    /// While true, requests are recorded but not answered.
    held: tokio::sync::watch::Sender<bool>,
}

/// An HTTP/1.1 server on `127.0.0.1:0` that records every request and answers with the
/// status and body set last (200 `ok` unless told otherwise). A request is recorded before it
/// is answered. Stops when dropped.
pub struct HttpRecorder {
    shared: Arc<Shared>,
    address: SocketAddr,
    _server: Background,
}

impl HttpRecorder {
    /// Starts a recorder answering 200 `ok` (what a Slack incoming webhook answers).
    pub fn start() -> std::io::Result<Self> {
        Self::start_answering(200, "ok")
    }

    /// Starts a recorder answering `status` with `body`.
    pub fn start_answering(status: u16, body: &str) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            requests: Log::new("requests"),
            accepted: Log::new("accepted requests"),
            answer: Mutex::new((status, body.to_owned())),
            held: tokio::sync::watch::Sender::new(false),
        });
        let serving = shared.clone();
        let (server, address) =
            Background::start("http-recorder", move |listener| accept(listener, serving))?;
        Ok(Self {
            shared,
            address,
            _server: server,
        })
    }

    /// Answers every following request with `status` and `body`, until told otherwise.
    pub fn answer(&self, status: u16, body: &str) {
        *self
            .shared
            .answer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = (status, body.to_owned());
    }

    /// While `held`, requests are recorded but their answers wait (until released, or until
    /// the client gives up): a delivery caught between sending and hearing back.
    pub fn hold(&self, held: bool) {
        self.shared.held.send_replace(held);
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `http://127.0.0.1:<port><path>`; `path` starts with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.snapshot()
    }

    /// The requests answered with a 2xx status, in the order they were answered.
    pub fn accepted(&self) -> Vec<Request> {
        self.shared.accepted.snapshot()
    }

    /// How many requests arrived (answered or being answered).
    pub fn count(&self) -> usize {
        self.shared.requests.len()
    }

    /// Waits until at least `n` requests arrived; all of them.
    pub async fn wait_for_requests(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Request>, WaitTimeout> {
        self.shared.requests.wait_for(n, timeout).await
    }

    /// [`HttpRecorder::wait_for_requests`] for synchronous callers.
    pub fn wait_for_requests_blocking(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Request>, WaitTimeout> {
        self.shared.requests.wait_for_blocking(n, timeout)
    }
}

async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, say: try again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(shared.clone(), request));
            // A client that goes away mid-request is the client's business.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    shared: Arc<Shared>,
    request: hyper::Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let Ok(body) = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
    else {
        return Ok(status(StatusCode::BAD_REQUEST, "cannot read the body"));
    };
    let request = Request {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: body.to_vec(),
    };
    shared.requests.push(request.clone());
    let mut held = shared.held.subscribe();
    // The sender lives in `shared`, which this task holds: the channel cannot close.
    let _ = held.wait_for(|held| !*held).await;
    let (code, text) = shared
        .answer
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if code.is_success() {
        shared.accepted.push(request);
    }
    Ok(status(code, &text))
}

fn status(code: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = code;
    response
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// A raw HTTP/1.1 exchange, so the recorder is tested without an HTTP client crate.
    fn post(address: SocketAddr, path: &str, body: &str) -> String {
        let mut stream = std::net::TcpStream::connect(address).expect("connect");
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: x\r\nX-Test: yes\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read");
        answer
    }

    #[test]
    fn records_requests_and_answers_what_it_is_told() {
        let recorder = HttpRecorder::start().expect("start");
        let answer = post(recorder.address(), "/hook?a=1", r#"{"x":1}"#);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
        recorder.answer(500, "down");
        let answer = post(recorder.address(), "/hook", "{}");
        assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
        let requests = recorder
            .wait_for_requests_blocking(2, Duration::from_secs(5))
            .expect("two");
        assert_eq!(recorder.count(), 2);
        let first = &requests[0];
        assert_eq!(first.method, "POST");
        assert_eq!(first.path, "/hook");
        assert_eq!(first.query.as_deref(), Some("a=1"));
        assert_eq!(first.header("x-test"), Some("yes"));
        assert_eq!(first.json().expect("json")["x"], 1);
        let err = recorder
            .wait_for_requests_blocking(3, Duration::from_millis(50))
            .expect_err("only two");
        assert_eq!((err.wanted, err.got), (3, 2));
    }

    #[tokio::test]
    async fn async_waits_do_not_block_the_callers_runtime() {
        let recorder = HttpRecorder::start_answering(202, "{}").expect("start");
        let address = recorder.address();
        let client = tokio::task::spawn_blocking(move || post(address, "/v2/enqueue", "{}"));
        let requests = recorder
            .wait_for_requests(1, Duration::from_secs(5))
            .await
            .expect("one");
        assert_eq!(requests[0].path, "/v2/enqueue");
        let answer = client.await.expect("client");
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

        recorder.hold(true);
        let client = tokio::task::spawn_blocking(move || post(address, "/held", "{}"));
        recorder
            .wait_for_requests(2, Duration::from_secs(5))
            .await
            .expect("recorded while held");
        assert!(!client.is_finished(), "answered while held");
        recorder.hold(false);
        let answer = client.await.expect("client");
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    }
}
