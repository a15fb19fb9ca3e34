//! The generic webhook: the stored payload, as is, posted as JSON to
//! `notifications.webhook_url` with the configured `webhook_headers` and an
//! `Idempotency-Key` naming the notification (`selfheal-<outbox id>`), so a receiver can drop
//! the copy a restart may send again. Any 2xx is delivered.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};

use super::{judge, outbox::Row, request_failure, Failure, NotifyError};
use crate::config::Secret;

pub(crate) struct Webhook {
    url: Secret,
    headers: HeaderMap,
}

impl Webhook {
    pub(crate) fn new(
        url: Secret,
        headers: &BTreeMap<String, Secret>,
    ) -> Result<Self, NotifyError> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let header = || NotifyError::Header { name: name.clone() };
            let key = HeaderName::from_bytes(name.as_bytes()).map_err(|_| header())?;
            let mut value = HeaderValue::from_str(value.expose()).map_err(|_| header())?;
            // Keeps it out of any debug output of the request.
            value.set_sensitive(true);
            map.append(key, value);
        }
        Ok(Self { url, headers: map })
    }

    pub(crate) async fn send(&self, http: &reqwest::Client, row: &Row) -> Result<(), Failure> {
        let response = http
            .post(self.url.expose())
            .headers(self.headers.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("idempotency-key", format!("selfheal-{}", row.id))
            .body(row.payload.clone())
            .send()
            .await
            .map_err(request_failure)?;
        judge(response).await
    }
}
