//! The Docker Engine API over its unix socket: a container's main process.

use std::path::Path;

use bytes::Bytes;
use serde::Deserialize;

use super::TargetError;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Inspect {
    state: State,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct State {
    running: bool,
    pid: u32,
}

/// One GET against the Engine API; returns the status and body.
pub(crate) async fn get(socket: &Path, path: &str) -> Result<(http::StatusCode, Bytes), String> {
    request(socket, http::Method::GET, path, None).await
}

/// One request against the Engine API (a JSON body when given); returns the status and body.
pub(crate) async fn request(
    socket: &Path,
    method: http::Method,
    path: &str,
    json: Option<Vec<u8>>,
) -> Result<(http::StatusCode, Bytes), String> {
    crate::unix_http::request(socket, method, path, "docker", &[], json).await
}

pub(super) async fn main_pid(name: &str, socket: &Path) -> Result<u32, TargetError> {
    let fail = |reason: String| TargetError::Docker {
        name: name.to_owned(),
        socket: socket.to_owned(),
        reason,
    };
    let (status, body) = get(socket, &format!("/containers/{name}/json"))
        .await
        .map_err(fail)?;
    if status == http::StatusCode::NOT_FOUND {
        return Err(TargetError::NoSuchContainer {
            name: name.to_owned(),
        });
    }
    if !status.is_success() {
        return Err(fail(format!(
            "inspect answered {status}: {}",
            String::from_utf8_lossy(&body).trim()
        )));
    }
    let inspect: Inspect =
        serde_json::from_slice(&body).map_err(|e| fail(format!("inspect response: {e}")))?;
    if !inspect.state.running || inspect.state.pid == 0 {
        return Err(TargetError::ContainerNotRunning {
            name: name.to_owned(),
        });
    }
    Ok(inspect.state.pid)
}
