//! `GET /api/v1/system/events`: the bus as server-sent events, for live views.
//!
//! Each bus event is one SSE message: `event:` its kind (`alert`, `alert_changed`, `repair`,
//! `prediction`, …), `id:` a number counting up from 1 on this stream, `data:` the event as
//! JSON with `at_unix_ms`, when it was published on the bus. The first message is `hello`.
//! `?types=a,b` keeps only those kinds. A client that reads too slowly loses the oldest events
//! (the bus counts them) and is told with a `lagged` message; at most [`MAX_STREAMS`] streams are open at once (503 past
//! that), so live views cannot take the daemon's memory.

use std::{
    collections::BTreeSet,
    convert::Infallible,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use axum::{
    extract::{rejection::QueryRejection, Query, State},
    http::StatusCode,
    response::{
        sse::{Event as SseEvent, KeepAlive, Sse},
        IntoResponse, Response,
    },
};

use super::{error, ApiState};
use crate::bus::Event;

/// Open streams at most.
pub(super) const MAX_STREAMS: usize = 32;

/// Every kind a stream can carry, as `?types=` names them.
pub(super) const KINDS: [&str; 15] = [
    "target_started",
    "target_exited",
    "process_sample",
    "host_sample",
    "tcp_summary",
    "check",
    "health",
    "alert",
    "alert_changed",
    "diagnosis",
    "repair",
    "prediction",
    "security",
    "optimization",
    "agent_crashed",
];

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    types: Option<String>,
}

/// Releases a stream's slot when the client goes away.
struct Slot(Arc<ApiState>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::SeqCst);
    }
}

fn parse_types(text: Option<&str>) -> Result<Option<BTreeSet<&'static str>>, String> {
    let Some(text) = text else { return Ok(None) };
    let mut kinds = BTreeSet::new();
    for name in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some(kind) = KINDS.iter().find(|k| **k == name) else {
            return Err(format!(
                "unknown event type {name:?}; the types are {}",
                KINDS.join(", ")
            ));
        };
        kinds.insert(*kind);
    }
    if kinds.is_empty() {
        return Err("types is empty".to_owned());
    }
    Ok(Some(kinds))
}

fn message(id: u64, at_unix_ms: i64, event: &Event) -> SseEvent {
    let mut data = serde_json::to_value(event).unwrap_or_default();
    if let Some(object) = data.as_object_mut() {
        object.insert("at_unix_ms".to_owned(), at_unix_ms.into());
    }
    SseEvent::default()
        .event(event.kind())
        .id(id.to_string())
        .data(data.to_string())
}

pub(super) async fn events(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, rejection.body_text()),
    };
    let kinds = match parse_types(query.types.as_deref()) {
        Ok(kinds) => kinds,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    if state.streams.fetch_add(1, Ordering::SeqCst) >= MAX_STREAMS {
        state.streams.fetch_sub(1, Ordering::SeqCst);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_STREAMS} event streams are open already; close one"),
        );
    }
    let slot = Slot(state.clone());
    let events = state.bus.subscribe_raw();
    let hello = SseEvent::default().event("hello").data(
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "types": kinds.as_ref().map_or_else(|| KINDS.to_vec(), |k| k.iter().copied().collect()),
        })
        .to_string(),
    );
    let stream = futures_util::stream::unfold(
        (Some(hello), events, kinds, slot, 0u64),
        |(mut first, mut events, kinds, slot, mut id)| async move {
            if let Some(hello) = first.take() {
                return Some((Ok::<_, Infallible>(hello), (first, events, kinds, slot, id)));
            }
            loop {
                let received = tokio::select! {
                    () = slot.0.shutdown.cancelled() => return None,
                    received = events.recv() => received,
                };
                match received {
                    Ok((at, event)) => {
                        if kinds.as_ref().is_some_and(|k| !k.contains(event.kind())) {
                            continue;
                        }
                        id += 1;
                        let message = message(id, at, &event);
                        return Some((Ok(message), (first, events, kinds, slot, id)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(lost)) => {
                        slot.0.metrics.bus_lagged.inc_by(lost);
                        let message = SseEvent::default()
                            .event("lagged")
                            .data(serde_json::json!({ "lost": lost }).to_string());
                        return Some((Ok(message), (first, events, kinds, slot, id)));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_are_checked() {
        assert_eq!(parse_types(None), Ok(None));
        let kinds = parse_types(Some("alert, repair"))
            .expect("known")
            .expect("some");
        assert_eq!(kinds.into_iter().collect::<Vec<_>>(), ["alert", "repair"]);
        assert!(parse_types(Some("alerts"))
            .expect_err("unknown")
            .contains("unknown event type \"alerts\""));
        assert!(parse_types(Some(",")).is_err());
    }

    #[test]
    fn every_event_kind_is_listed() {
        // `Event::kind` is the source of the names; a new variant must be streamable by name.
        let sample = Event::Security {
            kind: "x".into(),
            detail: "y".into(),
        };
        assert!(KINDS.contains(&sample.kind()));
        let source = include_str!("../bus.rs");
        let start = source.find("pub fn kind(&self)").expect("Event::kind");
        let body = &source[start..];
        let body = &body[..body.find("\n    }\n").expect("its end")];
        assert_eq!(
            body.matches("=> \"").count(),
            KINDS.len(),
            "every kind Event::kind names is streamable by name"
        );
        for kind in KINDS {
            assert!(source.contains(&format!("=> \"{kind}\"")), "{kind}");
        }
    }
}
