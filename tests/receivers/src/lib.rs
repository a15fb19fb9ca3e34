//! Loopback receivers for selfheal's notifiers: real protocol servers on `127.0.0.1:0` that
//! record what they are sent, so tests check a notification as the other end got it.
//!
//! - [`HttpRecorder`]: an HTTP/1.1 server (hyper) recording each request's method, path,
//!   headers and body, answering a status the test chooses (e.g. 500 until told otherwise),
//!   or holding its answers back to catch a client between sending and hearing back.
//!   Stands in for a Slack incoming webhook, the PagerDuty Events API or a generic webhook.
//! - [`SmtpRecorder`]: a minimal SMTP server (greeting, EHLO/HELO, AUTH PLAIN and LOGIN,
//!   MAIL, RCPT, DATA with dot-unstuffing, RSET, NOOP, QUIT) recording each message's
//!   envelope, data, the credentials it was sent with and whether it came over TLS; it can
//!   answer 451 to MAIL or DATA. Plain text, or with a certificate: STARTTLS (advertised,
//!   then the session starts over on TLS) or TLS from the first byte.
//! - [`TestPki`]: a CA and a `localhost`/`127.0.0.1` certificate it signed, generated at test
//!   time (rcgen), for the TLS receivers and the clients that must trust them.
//!
//! Each receiver runs on a thread of its own with its own tokio runtime, so it works the same
//! from `#[tokio::test]` (whatever the test's runtime flavor) and from synchronous code such
//! as the end-to-end tests; it stops when dropped. Waiting for what a receiver got has an
//! async form (`wait_for_*`, for async tests, never blocking the caller's runtime) and a
//! blocking one (`*_blocking`), both with a deadline.
//!
//! Owns: nothing of the daemon (it depends on no selfheal crate). Must not: reach beyond the
//! loopback interface, or need privileges.

mod http;
mod log;
mod smtp;
mod tls;

pub use http::{HttpRecorder, Request};
pub use log::WaitTimeout;
pub use smtp::{Credentials, Mail, SmtpFailure, SmtpRecorder};
pub use tls::TestPki;
