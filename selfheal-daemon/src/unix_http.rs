//! One HTTP/1.1 request over a unix socket (hyper): the Docker Engine API and the `selfheal`
//! CLI on the daemon's `admin.socket`.

use std::path::Path;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;

/// Sends `method path` with `Host: host`, `headers` and a JSON body when given; the status
/// and body of the answer.
pub async fn request(
    socket: &Path,
    method: http::Method,
    path: &str,
    host: &str,
    headers: &[(http::header::HeaderName, String)],
    json: Option<Vec<u8>>,
) -> Result<(http::StatusCode, Bytes), String> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host);
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    if json.is_some() {
        builder = builder.header(http::header::CONTENT_TYPE, "application/json");
    }
    let request = builder
        .body(Full::new(Bytes::from(json.unwrap_or_default())))
        .map_err(|e| format!("request: {e}"))?;
    let exchange = async move {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        Ok((status, body))
    };
    // The connection future drives the socket; the exchange ends first unless the server
    // hangs up, and dropping the connection then closes it.
    tokio::select! {
        result = exchange => result,
        result = connection => Err(match result {
            Ok(()) => "the server closed the connection".to_owned(),
            Err(e) => format!("connection: {e}"),
        }),
    }
}
