//! Email: one plain-text message per notification to every `notifications.email_to`, from
//! `email_from`, through the SMTP relay `smtp_host:smtp_port` (lettre's tokio transport over
//! rustls with ring: `smtp_tls` is `starttls` (required: a relay that does not offer it gets
//! nothing, not even the AUTH), `tls` (implicit) or `none`; AUTH with `smtp_username` /
//! `smtp_password` when set). The relay's certificate must chain to a web PKI root
//! (webpki-roots) or to a certificate of `smtp_ca_file`, and name `smtp_host`; a certificate
//! that does not is a failed attempt, retried like an unreachable relay. A new connection per
//! message: notifications are rare, and a pooled connection the relay closed meanwhile would
//! only fail the next one. A permanent SMTP answer (5xx: a refused sender or recipient, bad
//! credentials) fails the row at once; anything else (4xx, unreachable, timed out, TLS) is
//! retried.

use std::{fmt::Write as _, time::Duration};

use lettre::{
    message::{header::ContentType, Mailbox},
    transport::smtp::{
        authentication::Credentials,
        client::{Certificate, Tls, TlsParameters},
        extension::ClientId,
    },
    AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor,
};

use super::{
    payload::{rfc3339, Kind, Payload},
    Failure, NotifyError,
};
use crate::{
    config::{NotificationsConfig, SmtpTls},
    tls::read_ca_file,
};

pub(crate) struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    to: Vec<Mailbox>,
    /// This machine's name, for the sign-off.
    source: String,
}

impl Mailer {
    pub(crate) fn new(
        config: &NotificationsConfig,
        timeout: Duration,
        source: &str,
    ) -> Result<Self, NotifyError> {
        // Validation requires both when email_to is set; these defaults are never used.
        let host = config.smtp_host.clone().unwrap_or_default();
        let from = config
            .email_from
            .as_deref()
            .unwrap_or_default()
            .parse::<Mailbox>()
            .map_err(|source| NotifyError::Address {
                key: "email_from",
                source,
            })?;
        let to = config
            .email_to
            .iter()
            .map(|to| to.parse::<Mailbox>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| NotifyError::Address {
                key: "email_to",
                source,
            })?;
        // Trusted in addition to the web PKI roots; read only when TLS will use them.
        let ca_file = config
            .smtp_ca_file
            .as_deref()
            .filter(|_| config.smtp_tls != SmtpTls::None);
        let roots = match ca_file {
            Some(path) => read_ca_file(path).map_err(|source| NotifyError::SmtpCaFile {
                path: path.to_owned(),
                source,
            })?,
            None => Vec::new(),
        };
        // The file's certificates passed the check rustls makes of a root: what fails from here
        // on is the TLS setup itself, not the file.
        let smtp_tls = |source| NotifyError::SmtpTls {
            host: host.clone(),
            source,
        };
        let roots = roots
            .into_iter()
            .map(|der| Certificate::from_der(der.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(smtp_tls)?;
        let tls = |host: &str| {
            let mut parameters = TlsParameters::builder(host.to_owned());
            for root in &roots {
                parameters = parameters.add_root_certificate(root.clone());
            }
            // rustls explicitly, whatever other backend a feature might bring in.
            parameters.build_rustls().map_err(smtp_tls)
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.as_str())
            .port(config.smtp_port)
            .timeout(Some(timeout))
            .hello_name(ClientId::Domain(source.to_owned()));
        builder = match config.smtp_tls {
            SmtpTls::None => builder.tls(Tls::None),
            SmtpTls::Starttls => builder.tls(Tls::Required(tls(&host)?)),
            SmtpTls::Tls => builder.tls(Tls::Wrapper(tls(&host)?)),
        };
        if let (Some(username), Some(password)) = (&config.smtp_username, &config.smtp_password) {
            builder = builder.credentials(Credentials::new(
                username.clone(),
                password.expose().to_owned(),
            ));
        }
        Ok(Self {
            transport: builder.build(),
            from,
            to,
            source: source.to_owned(),
        })
    }

    /// `[selfheal] CRITICAL target.exited firing`.
    pub(crate) fn subject(payload: &Payload, kind: Kind) -> String {
        format!("[selfheal] {}", payload.headline(kind))
    }

    /// The plain-text body.
    pub(crate) fn body(&self, payload: &Payload, kind: Kind) -> String {
        let alert = &payload.alert;
        let mut body = String::new();
        let _ = writeln!(body, "{}", payload.headline(kind));
        if let Some(action) = payload.action_text(kind) {
            let _ = writeln!(body, "{action}");
        }
        let _ = writeln!(body);
        let message = if alert.message.is_empty() {
            "(no message)"
        } else {
            alert.message.as_str()
        };
        let _ = writeln!(body, "Message:    {message}");
        let _ = writeln!(body, "Severity:   {}", alert.severity);
        let _ = writeln!(body, "Rule:       {}", alert.rule);
        let _ = writeln!(body, "Labels:     {}", payload.labels_text());
        let _ = writeln!(body, "Count:      {}", alert.count);
        let _ = writeln!(body, "First seen: {}", rfc3339(alert.first_seen_unix_ms));
        let _ = writeln!(body, "Last seen:  {}", rfc3339(alert.last_seen_unix_ms));
        let _ = writeln!(body, "Alert:      #{} ({})", alert.id, alert.key);
        let members = payload.group_lines();
        if !members.is_empty() {
            let _ = writeln!(body);
            let _ = writeln!(
                body,
                "Group {} ({} active):",
                alert.group_key,
                members.len()
            );
            for member in members {
                let _ = writeln!(body, "  {member}");
            }
        }
        let _ = writeln!(body);
        let _ = writeln!(
            body,
            "-- \nselfheal on {}, {}",
            self.source,
            rfc3339(payload.at_unix_ms)
        );
        body
    }

    pub(crate) async fn send(&self, payload: &Payload, kind: Kind) -> Result<(), Failure> {
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(Self::subject(payload, kind))
            .header(ContentType::TEXT_PLAIN);
        for to in &self.to {
            builder = builder.to(to.clone());
        }
        let message = builder
            .body(self.body(payload, kind))
            .map_err(|e| Failure::Permanent(format!("cannot build the email: {e}")))?;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(error) => {
                let text = super::describe(&error);
                if error.is_permanent() {
                    Err(Failure::Permanent(format!("SMTP: {text}")))
                } else {
                    Err(Failure::Retry(format!("SMTP: {text}")))
                }
            }
        }
    }
}
