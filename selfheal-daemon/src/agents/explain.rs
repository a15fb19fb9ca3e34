//! The optional LLM summary of a diagnosis, from Anthropic's Messages API
//! (`POST {anthropic_base_url}/v1/messages`). Asked in the background after the diagnosis is
//! published: the repair never waits for it, and a failure (no answer in time, a refusal) is
//! recorded beside the diagnosis instead of the summary.

use std::time::Duration;

use serde::Deserialize;

use crate::{bus::Diagnosis, config::DiagnosticConfig};

/// What the model is asked to do.
const SYSTEM: &str = "You are the diagnostic assistant of selfheal, a daemon that keeps a \
backend service and its PostgreSQL database healthy. Given a rule-based diagnosis and its \
evidence, explain to an on-call engineer in at most three short sentences what most likely \
happened and what to check next. Do not repeat the input verbatim.";

/// A client for the summaries; `None` from [`Explainer::new`] when no key is set.
#[derive(Clone)]
pub(super) struct Explainer {
    client: reqwest::Client,
    url: String,
    key: String,
    model: String,
}

#[derive(Deserialize)]
struct Answer {
    content: Vec<Block>,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Deserialize)]
struct Refusal {
    error: RefusalDetail,
}

#[derive(Deserialize)]
struct RefusalDetail {
    message: String,
}

impl Explainer {
    pub(super) fn new(config: &DiagnosticConfig) -> Option<Self> {
        let key = config.anthropic_api_key.as_ref()?.expose().to_owned();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.llm_timeout_ms))
            .user_agent(concat!("selfheal/", env!("CARGO_PKG_VERSION")))
            .build()
            .ok()?;
        Some(Self {
            client,
            url: format!(
                "{}/v1/messages",
                config.anthropic_base_url.trim_end_matches('/')
            ),
            key,
            model: config.model.clone(),
        })
    }

    /// The summary of `diagnosis`, or why there is none (never the key).
    pub(super) async fn explain(&self, diagnosis: &Diagnosis) -> Result<String, String> {
        let prompt = format!(
            "Alert: {rule} {labels:?}\nSignature: {signature} (confidence {confidence:.2})\n\
             Diagnosis: {summary}\nEvidence:\n{evidence}\nCandidate repairs: {actions}\n\
             Dependency down: {dependency}",
            rule = diagnosis.rule,
            labels = diagnosis.labels,
            signature = diagnosis.signature,
            confidence = diagnosis.confidence,
            summary = diagnosis.summary,
            evidence = diagnosis
                .evidence
                .iter()
                .map(|e| format!("- {e}"))
                .collect::<Vec<_>>()
                .join("\n"),
            actions = if diagnosis.actions.is_empty() {
                "none (alert only)".to_owned()
            } else {
                diagnosis.actions.join(", ")
            },
            dependency = diagnosis.dependency_down.as_deref().unwrap_or("none"),
        );
        let body = serde_json::json!({
            "model": self.model,
            "max_tokens": 300,
            "system": SYSTEM,
            "messages": [{"role": "user", "content": prompt}],
        });
        let response = self
            .client
            .post(&self.url)
            .header("x-api-key", &self.key)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .map_err(|err| format!("the Messages API did not answer: {}", without_url(err)))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|err| format!("reading the answer: {}", without_url(err)))?;
        if !status.is_success() {
            let why = serde_json::from_str::<Refusal>(&text)
                .map_or_else(|_| text.chars().take(200).collect(), |r| r.error.message);
            return Err(format!("the Messages API answered {status}: {why}"));
        }
        let answer: Answer = serde_json::from_str(&text)
            .map_err(|err| format!("the Messages API answered something unexpected: {err}"))?;
        let summary: String = answer
            .content
            .into_iter()
            .filter(|b| b.kind == "text")
            .map(|b| b.text)
            .collect::<Vec<_>>()
            .join("\n");
        let summary = summary.trim();
        if summary.is_empty() {
            return Err("the Messages API answered no text".to_owned());
        }
        Ok(summary.to_owned())
    }
}

/// reqwest's error text without the URL (the base URL is config, not a secret, but keeping
/// errors short helps the API view).
fn without_url(err: reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    format!("{kind} ({})", crate::app::error_chain(&err.without_url()))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::{extract::State, http::HeaderMap, routing::post, Json, Router};

    use super::*;

    type Seen = Arc<Mutex<Vec<(HeaderMap, serde_json::Value)>>>;

    /// A local server speaking the Messages API: answers `status` with `answer`.
    async fn server(status: u16, answer: serde_json::Value) -> (String, Seen) {
        let seen: Seen = Arc::default();
        let app = Router::new()
            .route(
                "/v1/messages",
                post(
                    move |State(seen): State<Seen>,
                          headers: HeaderMap,
                          Json(body): Json<serde_json::Value>| {
                        let answer = answer.clone();
                        async move {
                            seen.lock().expect("lock").push((headers, body));
                            (
                                axum::http::StatusCode::from_u16(status).expect("status"),
                                Json(answer),
                            )
                        }
                    },
                ),
            )
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{address}"), seen)
    }

    fn config(base: &str, timeout_ms: u64) -> DiagnosticConfig {
        DiagnosticConfig {
            anthropic_api_key: Some(crate::config::Secret::new("sk-test-key".to_owned())),
            anthropic_base_url: base.to_owned(),
            llm_timeout_ms: timeout_ms,
            ..DiagnosticConfig::default()
        }
    }

    fn diagnosis() -> Diagnosis {
        Diagnosis {
            id: Some(1),
            rule: "check.down".to_owned(),
            labels: [("check".to_owned(), "backend".to_owned())].into(),
            signature: "db.unreachable".to_owned(),
            summary: "the target's health check backend fails because the database is down"
                .to_owned(),
            confidence: 0.85,
            evidence: vec!["check pg (postgres) is down".to_owned()],
            actions: Vec::new(),
            dependency_down: Some("pg".to_owned()),
            tables: Vec::new(),
        }
    }

    #[tokio::test]
    async fn the_summary_comes_from_the_messages_api() {
        let (base, seen) = server(
            200,
            serde_json::json!({
                "id": "msg_1", "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": "PostgreSQL is down; the app is fine."}],
                "stop_reason": "end_turn"
            }),
        )
        .await;
        let explainer = Explainer::new(&config(&base, 5000)).expect("a key is set");
        let summary = explainer.explain(&diagnosis()).await.expect("summary");
        assert_eq!(summary, "PostgreSQL is down; the app is fine.");
        let seen = seen.lock().expect("lock");
        let (headers, body) = &seen[0];
        assert_eq!(headers["x-api-key"], "sk-test-key");
        assert_eq!(headers["anthropic-version"], "2023-06-01");
        assert_eq!(body["model"], "claude-sonnet-4-5");
        let prompt = body["messages"][0]["content"].as_str().expect("prompt");
        assert!(
            prompt.contains("db.unreachable") && prompt.contains("check pg"),
            "{prompt}"
        );
    }

    #[tokio::test]
    async fn a_refusal_or_no_answer_is_a_reason_not_a_summary() {
        let (base, _) = server(
            401,
            serde_json::json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
        )
        .await;
        let explainer = Explainer::new(&config(&base, 5000)).expect("a key is set");
        let err = explainer.explain(&diagnosis()).await.expect_err("refused");
        assert!(
            err.contains("401") && err.contains("invalid x-api-key"),
            "{err}"
        );
        assert!(!err.contains("sk-test-key"), "{err}");

        // Nothing listens: an error, quickly.
        let explainer = Explainer::new(&config("http://127.0.0.1:9", 2000)).expect("a key is set");
        let err = explainer
            .explain(&diagnosis())
            .await
            .expect_err("no server");
        assert!(err.contains("did not answer"), "{err}");

        assert!(
            Explainer::new(&DiagnosticConfig::default()).is_none(),
            "no key, no client"
        );
    }
}
