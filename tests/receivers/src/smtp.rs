//! The SMTP recorder: a minimal, real SMTP server (RFC 5321; optionally with STARTTLS, RFC
//! 3207, or implicit TLS, RFC 8314) that records each message's envelope and data, and
//! whether it arrived over TLS.

use std::{
    io::Cursor,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, BufReader,
};
use tokio_rustls::TlsAcceptor;

use crate::{
    log::{Background, Log, WaitTimeout},
    tls,
};

/// A command line longer than this ends the session (RFC 5321 allows 512 octets).
const MAX_LINE: u64 = 4096;
/// A message larger than this is refused (552) and the session ends.
const MAX_DATA: usize = 10 << 20;

/// Credentials a client authenticated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `PLAIN` or `LOGIN`.
    pub mechanism: String,
    pub username: String,
    pub password: String,
    /// False when the recorder required other credentials and answered 535.
    pub accepted: bool,
    /// The exchange ran inside TLS (implicit, or after STARTTLS).
    pub tls: bool,
}

/// One message as accepted after DATA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    /// The name the client gave in EHLO or HELO.
    pub helo: String,
    /// The reverse path of MAIL FROM, without the angle brackets.
    pub from: String,
    /// The forward paths of RCPT TO, in order.
    pub to: Vec<String>,
    /// The message as sent after DATA, dot-unstuffed, without the final `.` line.
    pub data: Vec<u8>,
    /// The credentials the session authenticated with, if any.
    pub auth: Option<Credentials>,
    /// The message came over TLS (implicit, or after STARTTLS and a new EHLO).
    pub tls: bool,
}

impl Mail {
    /// The data as text (lossily decoded).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    /// The header section's field `name` (any case), unfolded; the first if repeated.
    pub fn header(&self, name: &str) -> Option<String> {
        let text = self.text();
        let head = text.split("\r\n\r\n").next().unwrap_or_default();
        let mut found: Option<String> = None;
        for line in head.split("\r\n") {
            if line.starts_with([' ', '\t']) {
                if let Some(value) = found.as_mut() {
                    value.push(' ');
                    value.push_str(line.trim());
                }
                continue;
            }
            if found.is_some() {
                break;
            }
            if let Some((field, value)) = line.split_once(':') {
                if field.trim().eq_ignore_ascii_case(name) {
                    found = Some(value.trim().to_owned());
                }
            }
        }
        found
    }

    /// What follows the header section.
    pub fn body(&self) -> String {
        let text = self.text();
        text.split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default()
    }
}

/// Which command the recorder refuses with `451` while a failure is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpFailure {
    Mail,
    Data,
}

struct Settings {
    failure: Option<SmtpFailure>,
    mechanisms: Vec<String>,
    required: Option<(String, String)>,
}

/// How a session's connection is secured.
enum Security {
    /// Plain text throughout; STARTTLS is not advertised and answered 454.
    Plain,
    /// Plain text until the client sends STARTTLS (advertised in EHLO).
    StartTls(TlsAcceptor),
    /// TLS from the first byte.
    Implicit(TlsAcceptor),
}

struct Shared {
    mails: Log<Mail>,
    auths: Log<Credentials>,
    /// Every MAIL FROM, refused or not: how many deliveries were tried.
    transactions: Log<String>,
    /// Why each TLS handshake that did not complete failed, as the server saw it.
    tls_failures: Log<String>,
    security: Security,
    settings: Mutex<Settings>,
}

/// A minimal SMTP server on `127.0.0.1:0`: greeting, EHLO/HELO, AUTH PLAIN and AUTH LOGIN
/// (advertised and accepted unless told otherwise), MAIL FROM, RCPT TO, DATA (dot-unstuffed),
/// RSET, NOOP, QUIT; with [`SmtpRecorder::start_starttls`] also STARTTLS, and with
/// [`SmtpRecorder::start_implicit_tls`] TLS from the first byte. Stops when dropped.
pub struct SmtpRecorder {
    shared: Arc<Shared>,
    address: SocketAddr,
    _server: Background,
}

impl SmtpRecorder {
    /// Plain text only: STARTTLS is neither advertised nor accepted.
    pub fn start() -> std::io::Result<Self> {
        Self::start_with(Security::Plain)
    }

    /// Advertises STARTTLS in EHLO and, after `220 Ready to start TLS`, continues the session
    /// over TLS with `cert_pem` (the chain, leaf first) and `key_pem` (see
    /// [`crate::TestPki`]); the client must then say EHLO again. Mail is accepted without TLS
    /// too: the client decides, and [`Mail::tls`] records what it did.
    pub fn start_starttls(cert_pem: &str, key_pem: &str) -> std::io::Result<Self> {
        Self::start_with(Security::StartTls(tls::acceptor(cert_pem, key_pem)?))
    }

    /// TLS from the first byte (SMTPS, "implicit TLS"), with `cert_pem` and `key_pem`.
    pub fn start_implicit_tls(cert_pem: &str, key_pem: &str) -> std::io::Result<Self> {
        Self::start_with(Security::Implicit(tls::acceptor(cert_pem, key_pem)?))
    }

    fn start_with(security: Security) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            mails: Log::new("messages"),
            auths: Log::new("authentications"),
            transactions: Log::new("transactions"),
            tls_failures: Log::new("failed TLS handshakes"),
            security,
            settings: Mutex::new(Settings {
                failure: None,
                mechanisms: vec!["PLAIN".to_owned(), "LOGIN".to_owned()],
                required: None,
            }),
        });
        let serving = shared.clone();
        let (server, address) =
            Background::start("smtp-recorder", move |listener| accept(listener, serving))?;
        Ok(Self {
            shared,
            address,
            _server: server,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// Answers 451 to MAIL or DATA from now on (`None`: accept again).
    pub fn fail(&self, failure: Option<SmtpFailure>) {
        self.settings().failure = failure;
    }

    /// The AUTH mechanisms advertised in EHLO (`PLAIN`, `LOGIN`; empty: no AUTH).
    pub fn advertise_auth(&self, mechanisms: &[&str]) {
        self.settings().mechanisms = mechanisms.iter().map(|m| (*m).to_owned()).collect();
    }

    /// Accepts only these credentials (535 otherwise); `None` accepts any.
    pub fn require_credentials(&self, credentials: Option<(&str, &str)>) {
        self.settings().required = credentials.map(|(u, p)| (u.to_owned(), p.to_owned()));
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.shared
            .settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Messages accepted so far, in order.
    pub fn messages(&self) -> Vec<Mail> {
        self.shared.mails.snapshot()
    }

    /// Every AUTH exchange completed so far, accepted or not.
    pub fn authentications(&self) -> Vec<Credentials> {
        self.shared.auths.snapshot()
    }

    /// How many MAIL FROM commands arrived, refused ones included.
    pub fn transactions(&self) -> usize {
        self.shared.transactions.len()
    }

    /// Why each TLS handshake that did not complete failed (a client that does not trust the
    /// certificate aborts it), in order.
    pub fn tls_failures(&self) -> Vec<String> {
        self.shared.tls_failures.snapshot()
    }

    /// Waits until at least `n` TLS handshakes failed; all their errors.
    pub async fn wait_for_tls_failures(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<String>, WaitTimeout> {
        self.shared.tls_failures.wait_for(n, timeout).await
    }

    /// Waits until at least `n` messages were accepted; all of them.
    pub async fn wait_for_messages(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Mail>, WaitTimeout> {
        self.shared.mails.wait_for(n, timeout).await
    }

    /// [`SmtpRecorder::wait_for_messages`] for synchronous callers.
    pub fn wait_for_messages_blocking(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Mail>, WaitTimeout> {
        self.shared.mails.wait_for_blocking(n, timeout)
    }

    /// Waits until at least `n` MAIL FROM commands arrived, refused ones included.
    pub async fn wait_for_transactions(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<usize, WaitTimeout> {
        Ok(self.shared.transactions.wait_for(n, timeout).await?.len())
    }
}

async fn accept(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let session = if let Security::Implicit(acceptor) = &shared.security {
                match acceptor.accept(stream).await {
                    Ok(stream) => Session::new(Box::new(stream), true, shared.clone()),
                    Err(error) => {
                        shared.tls_failures.push(error.to_string());
                        return;
                    }
                }
            } else {
                Session::new(Box::new(stream), false, shared.clone())
            };
            // A client that goes away mid-session is the client's business.
            let _ = session.run().await;
        });
    }
}

/// A session's connection: TCP, or TLS over it.
trait Connection: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Connection for T {}

struct Session {
    /// Reads through the buffer; writes go straight to the connection.
    stream: BufReader<Box<dyn Connection>>,
    /// The connection is TLS.
    tls: bool,
    shared: Arc<Shared>,
    helo: Option<String>,
    auth: Option<Credentials>,
    from: Option<String>,
    to: Vec<String>,
}

/// The address inside `<...>` after `FROM:` or `TO:` (case-insensitive), parameters dropped.
fn path_argument(argument: &str, prefix: &str) -> Option<String> {
    let head = argument.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = argument[prefix.len()..].trim_start();
    let inner = rest.strip_prefix('<')?;
    let end = inner.find('>')?;
    Some(inner[..end].to_owned())
}

fn decode(text: &str) -> Option<String> {
    let bytes = STANDARD.decode(text.trim()).ok()?;
    String::from_utf8(bytes).ok()
}

impl Session {
    fn new(stream: Box<dyn Connection>, tls: bool, shared: Arc<Shared>) -> Self {
        Self {
            stream: BufReader::new(stream),
            tls,
            shared,
            helo: None,
            auth: None,
            from: None,
            to: Vec::new(),
        }
    }

    async fn reply(&mut self, text: &str) -> std::io::Result<()> {
        self.stream.write_all(text.as_bytes()).await?;
        self.stream.write_all(b"\r\n").await?;
        // TLS holds records back until flushed.
        self.stream.flush().await
    }

    /// One line without its CRLF (or LF); `None` at the end of the stream or past the limit.
    async fn line(&mut self, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        let n = (&mut self.stream)
            .take(limit)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 || !line.ends_with(b"\n") {
            return Ok(None);
        }
        line.pop();
        if line.ends_with(b"\r") {
            line.pop();
        }
        Ok(Some(line))
    }

    async fn text_line(&mut self) -> std::io::Result<Option<String>> {
        Ok(self
            .line(MAX_LINE)
            .await?
            .map(|l| String::from_utf8_lossy(&l).into_owned()))
    }

    fn settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.shared
            .settings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn run(mut self) -> std::io::Result<()> {
        self.reply("220 selfheal-receivers ESMTP ready").await?;
        while let Some(line) = self.text_line().await? {
            let (verb, argument) = line.split_once(' ').unwrap_or((line.as_str(), ""));
            let verb = verb.to_ascii_uppercase();
            match verb.as_str() {
                "EHLO" => {
                    self.reset();
                    self.helo = Some(argument.trim().to_owned());
                    let mechanisms = self.settings().mechanisms.join(" ");
                    self.reply("250-selfheal-receivers greets you").await?;
                    self.reply("250-8BITMIME").await?;
                    if self.starttls_offered() {
                        self.reply("250-STARTTLS").await?;
                    }
                    if !mechanisms.is_empty() {
                        self.reply(&format!("250-AUTH {mechanisms}")).await?;
                    }
                    self.reply("250 SMTPUTF8").await?;
                }
                "HELO" => {
                    self.reset();
                    self.helo = Some(argument.trim().to_owned());
                    self.reply("250 selfheal-receivers").await?;
                }
                "AUTH" => self.authenticate(argument).await?,
                "MAIL" => {
                    self.shared.transactions.push(argument.to_owned());
                    if self.helo.is_none() {
                        self.reply("503 5.5.1 EHLO or HELO first").await?;
                    } else if self.from.is_some() {
                        self.reply("503 5.5.1 nested MAIL command").await?;
                    } else if self.settings().failure == Some(SmtpFailure::Mail) {
                        self.reply("451 4.3.0 temporarily refusing mail (recorder switch)")
                            .await?;
                    } else if let Some(from) = path_argument(argument, "FROM:") {
                        self.from = Some(from);
                        self.reply("250 2.1.0 Ok").await?;
                    } else {
                        self.reply("501 5.5.4 syntax: MAIL FROM:<address>").await?;
                    }
                }
                "RCPT" => {
                    if self.from.is_none() {
                        self.reply("503 5.5.1 MAIL first").await?;
                    } else if let Some(to) = path_argument(argument, "TO:") {
                        self.to.push(to);
                        self.reply("250 2.1.5 Ok").await?;
                    } else {
                        self.reply("501 5.5.4 syntax: RCPT TO:<address>").await?;
                    }
                }
                "DATA" => {
                    if self.to.is_empty() {
                        self.reply("503 5.5.1 RCPT first").await?;
                    } else if self.settings().failure == Some(SmtpFailure::Data) {
                        self.reply("451 4.3.0 temporarily refusing data (recorder switch)")
                            .await?;
                    } else if !self.data().await? {
                        return Ok(());
                    }
                }
                "RSET" => {
                    self.reset();
                    self.reply("250 2.0.0 Ok").await?;
                }
                "NOOP" => self.reply("250 2.0.0 Ok").await?,
                "QUIT" => {
                    self.reply("221 2.0.0 Bye").await?;
                    return Ok(());
                }
                "STARTTLS" => {
                    if !argument.trim().is_empty() {
                        self.reply("501 5.5.4 syntax: STARTTLS").await?;
                    } else if self.tls {
                        self.reply("503 5.5.1 TLS already active").await?;
                    } else if !self.starttls_offered() {
                        self.reply("454 4.7.0 TLS not available").await?;
                    } else if !self.starttls().await? {
                        return Ok(());
                    }
                }
                _ => self.reply("502 5.5.2 command not recognized").await?,
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.from = None;
        self.to.clear();
    }

    fn starttls_offered(&self) -> bool {
        !self.tls && matches!(self.shared.security, Security::StartTls(_))
    }

    /// Answers STARTTLS and upgrades the connection; false when the handshake failed and the
    /// session must end. As RFC 3207 requires, the session starts over: no EHLO, no AUTH.
    async fn starttls(&mut self) -> std::io::Result<bool> {
        let Security::StartTls(acceptor) = &self.shared.security else {
            return Ok(false);
        };
        let acceptor = acceptor.clone();
        self.reply("220 2.0.0 Ready to start TLS").await?;
        // Whatever the client sent after STARTTLS in plain text is dropped with the buffer:
        // it could have been injected by someone on the path (CVE-2011-0411).
        let plain = std::mem::replace(
            &mut self.stream,
            BufReader::new(Box::new(Cursor::new(Vec::new()))),
        )
        .into_inner();
        match acceptor.accept(plain).await {
            Ok(stream) => {
                self.stream = BufReader::new(Box::new(stream));
                self.tls = true;
                self.helo = None;
                self.auth = None;
                self.reset();
                Ok(true)
            }
            Err(error) => {
                self.shared.tls_failures.push(error.to_string());
                Ok(false)
            }
        }
    }

    /// Reads the message after DATA; false when the session must end.
    async fn data(&mut self) -> std::io::Result<bool> {
        self.reply("354 End data with <CR><LF>.<CR><LF>").await?;
        let mut data = Vec::new();
        loop {
            let Some(line) = self.line(MAX_DATA as u64).await? else {
                return Ok(false);
            };
            if line == b"." {
                break;
            }
            // Dot-unstuffing (RFC 5321 4.5.2): a leading dot was doubled by the client.
            let line = line.strip_prefix(b".").unwrap_or(&line);
            data.extend_from_slice(line);
            data.extend_from_slice(b"\r\n");
            if data.len() > MAX_DATA {
                self.reply("552 5.3.4 message too big").await?;
                return Ok(false);
            }
        }
        let mail = Mail {
            helo: self.helo.clone().unwrap_or_default(),
            from: self.from.take().unwrap_or_default(),
            to: std::mem::take(&mut self.to),
            data,
            auth: self.auth.clone(),
            tls: self.tls,
        };
        self.shared.mails.push(mail);
        self.reply("250 2.0.0 Ok: queued").await?;
        Ok(true)
    }

    /// The client's answer to an AUTH challenge: `initial` when it came with the command,
    /// else the line after `prompt`.
    async fn response(&mut self, prompt: &str, initial: Option<String>) -> std::io::Result<String> {
        if let Some(initial) = initial {
            return Ok(initial);
        }
        self.reply(prompt).await?;
        Ok(self.text_line().await?.unwrap_or_default())
    }

    async fn authenticate(&mut self, argument: &str) -> std::io::Result<()> {
        let (mechanism, initial) = argument
            .split_once(' ')
            .map_or((argument, None), |(m, i)| (m, Some(i.to_owned())));
        let mechanism = mechanism.to_ascii_uppercase();
        if self.helo.is_none() {
            return self.reply("503 5.5.1 EHLO or HELO first").await;
        }
        if self.auth.as_ref().is_some_and(|a| a.accepted) {
            return self.reply("503 5.5.1 already authenticated").await;
        }
        if !self.settings().mechanisms.contains(&mechanism) {
            return self.reply("504 5.5.4 mechanism not supported").await;
        }
        let credentials = if mechanism == "PLAIN" {
            let response = self.response("334 ", initial).await?;
            // authzid NUL authcid NUL passwd
            decode(&response).and_then(|text| {
                let mut parts = text.split('\0');
                let _authzid = parts.next()?;
                Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
            })
        } else {
            // "Username:", then "Password:", in base64.
            let username = self.response("334 VXNlcm5hbWU6", initial).await?;
            let password = self.response("334 UGFzc3dvcmQ6", None).await?;
            decode(&username).zip(decode(&password))
        };
        let Some((username, password)) = credentials else {
            return self.reply("501 5.5.2 cannot decode the response").await;
        };
        let accepted = self
            .settings()
            .required
            .as_ref()
            .is_none_or(|(u, p)| *u == username && *p == password);
        let credentials = Credentials {
            mechanism,
            username,
            password,
            accepted,
            tls: self.tls,
        };
        self.shared.auths.push(credentials.clone());
        if accepted {
            self.auth = Some(credentials);
            self.reply("235 2.7.0 Authentication successful").await
        } else {
            self.reply("535 5.7.8 Authentication credentials invalid")
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead as _, BufReader, Write as _};

    use super::*;
    use crate::TestPki;

    /// A scripted client: sends each line and checks the reply's code.
    struct Client {
        reader: BufReader<std::net::TcpStream>,
        writer: std::net::TcpStream,
    }

    impl Client {
        fn connect(address: SocketAddr) -> Self {
            let stream = std::net::TcpStream::connect(address).expect("connect");
            let mut client = Self {
                reader: BufReader::new(stream.try_clone().expect("clone")),
                writer: stream,
            };
            assert!(client.reply().starts_with("220"));
            client
        }

        /// The last line of a (possibly multi-line) reply.
        fn reply(&mut self) -> String {
            loop {
                let mut line = String::new();
                self.reader.read_line(&mut line).expect("read");
                if line.len() < 4 || line.as_bytes()[3] != b'-' {
                    return line.trim_end().to_owned();
                }
            }
        }

        fn send(&mut self, line: &str, code: &str) -> String {
            write!(self.writer, "{line}\r\n").expect("write");
            let reply = self.reply();
            assert!(reply.starts_with(code), "{line:?} → {reply:?}");
            reply
        }
    }

    #[test]
    fn a_session_records_envelope_data_and_credentials() {
        let recorder = SmtpRecorder::start().expect("start");
        let mut c = Client::connect(recorder.address());
        c.send("EHLO tester", "250");
        let plain = STANDARD.encode("\0ana\0s3cret");
        c.send(&format!("AUTH PLAIN {plain}"), "235");
        c.send("MAIL FROM:<selfheal@x.io> SIZE=10", "250");
        c.send("RCPT TO:<a@x.io>", "250");
        c.send("RCPT TO:<b@x.io>", "250");
        c.send("DATA", "354");
        c.send("Subject: hi\r\n\r\nline one\r\n..dotted\r\n.", "250");
        c.send("NOOP", "250");
        // A plain recorder offers no TLS.
        c.send("STARTTLS", "454");
        c.send("QUIT", "221");
        let mails = recorder
            .wait_for_messages_blocking(1, Duration::from_secs(5))
            .expect("one");
        let mail = &mails[0];
        assert!(!mail.tls);
        assert_eq!(mail.helo, "tester");
        assert_eq!(mail.from, "selfheal@x.io");
        assert_eq!(mail.to, ["a@x.io", "b@x.io"]);
        assert_eq!(mail.header("subject").as_deref(), Some("hi"));
        assert_eq!(mail.body(), "line one\r\n.dotted\r\n");
        let auth = mail.auth.as_ref().expect("auth");
        assert_eq!(
            (
                auth.mechanism.as_str(),
                auth.username.as_str(),
                auth.password.as_str()
            ),
            ("PLAIN", "ana", "s3cret")
        );
    }

    #[test]
    fn auth_login_failures_and_rset() {
        let recorder = SmtpRecorder::start().expect("start");
        recorder.require_credentials(Some(("ana", "right")));
        let mut c = Client::connect(recorder.address());
        c.send("HELO tester", "250");
        c.send("AUTH LOGIN", "334");
        c.send(&STANDARD.encode("ana"), "334");
        c.send(&STANDARD.encode("wrong"), "535");
        c.send("AUTH LOGIN", "334");
        c.send(&STANDARD.encode("ana"), "334");
        c.send(&STANDARD.encode("right"), "235");
        recorder.fail(Some(SmtpFailure::Mail));
        c.send("MAIL FROM:<a@x.io>", "451");
        recorder.fail(Some(SmtpFailure::Data));
        c.send("MAIL FROM:<a@x.io>", "250");
        c.send("RCPT TO:<b@x.io>", "250");
        c.send("DATA", "451");
        c.send("RSET", "250");
        c.send("RCPT TO:<b@x.io>", "503");
        c.send("QUIT", "221");
        assert_eq!(recorder.transactions(), 2);
        assert!(recorder.messages().is_empty());
        let auths = recorder.authentications();
        assert_eq!(auths.len(), 2);
        assert!(!auths[0].accepted);
        assert_eq!(
            (
                auths[1].mechanism.as_str(),
                auths[1].password.as_str(),
                auths[1].accepted
            ),
            ("LOGIN", "right", true)
        );
    }

    /// A scripted client for the TLS tests, on TCP then TLS.
    struct TlsClient {
        stream: tokio::io::BufReader<Box<dyn Connection>>,
    }

    /// A client config trusting `ca_pem` alone.
    fn connector(ca_pem: &str) -> tokio_rustls::TlsConnector {
        use tokio_rustls::rustls::{
            self,
            pki_types::{pem::PemObject as _, CertificateDer},
        };
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).expect("CA PEM"))
            .expect("CA");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    fn localhost() -> tokio_rustls::rustls::pki_types::ServerName<'static> {
        tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name")
    }

    impl TlsClient {
        fn new(stream: Box<dyn Connection>) -> Self {
            Self {
                stream: tokio::io::BufReader::new(stream),
            }
        }

        /// Every line of a (possibly multi-line) reply.
        async fn reply(&mut self) -> Vec<String> {
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                self.stream.read_line(&mut line).await.expect("read");
                let line = line.trim_end().to_owned();
                let last = line.len() < 4 || line.as_bytes()[3] != b'-';
                lines.push(line);
                if last {
                    return lines;
                }
            }
        }

        async fn send(&mut self, line: &str, code: &str) -> Vec<String> {
            self.stream
                .write_all(format!("{line}\r\n").as_bytes())
                .await
                .expect("write");
            self.stream.flush().await.expect("flush");
            let reply = self.reply().await;
            let last = reply.last().cloned().unwrap_or_default();
            assert!(last.starts_with(code), "{line:?} → {reply:?}");
            reply
        }

        /// Hands the connection to TLS (after STARTTLS's 220), trusting `ca_pem`.
        async fn upgrade(self, ca_pem: &str) -> std::io::Result<Self> {
            let stream = connector(ca_pem)
                .connect(localhost(), self.stream.into_inner())
                .await?;
            Ok(Self::new(Box::new(stream)))
        }

        async fn send_mail(&mut self, subject: &str) {
            self.send("MAIL FROM:<selfheal@x.io>", "250").await;
            self.send("RCPT TO:<a@x.io>", "250").await;
            self.send("DATA", "354").await;
            self.send(&format!("Subject: {subject}\r\n\r\nbody\r\n."), "250")
                .await;
        }
    }

    fn has_starttls(reply: &[String]) -> bool {
        reply.iter().any(|l| l.get(4..) == Some("STARTTLS"))
    }

    #[tokio::test]
    async fn starttls_upgrades_the_session_which_starts_over_on_tls() {
        let pki = TestPki::localhost().expect("pki");
        let recorder = SmtpRecorder::start_starttls(&pki.cert_pem, &pki.key_pem).expect("start");
        let tcp = tokio::net::TcpStream::connect(recorder.address())
            .await
            .expect("connect");
        let mut c = TlsClient::new(Box::new(tcp));
        assert!(c.reply().await[0].starts_with("220"));
        let ehlo = c.send("EHLO tester", "250").await;
        assert!(has_starttls(&ehlo), "{ehlo:?}");
        c.send("STARTTLS now", "501").await;
        let ready = c.send("STARTTLS", "220").await;
        assert_eq!(ready, ["220 2.0.0 Ready to start TLS"]);
        let mut c = c.upgrade(&pki.ca_pem).await.expect("handshake");
        // The session starts over: the EHLO before TLS does not count.
        c.send("MAIL FROM:<selfheal@x.io>", "503").await;
        let plain = STANDARD.encode("\0ana\0s3cret");
        c.send(&format!("AUTH PLAIN {plain}"), "503").await;
        let ehlo = c.send("EHLO tester-tls", "250").await;
        assert!(!has_starttls(&ehlo), "{ehlo:?}");
        c.send("STARTTLS", "503").await;
        c.send(&format!("AUTH PLAIN {plain}"), "235").await;
        c.send_mail("over tls").await;
        c.send("QUIT", "221").await;

        // The same recorder takes plain mail too, and says so.
        let tcp = tokio::net::TcpStream::connect(recorder.address())
            .await
            .expect("connect");
        let mut plain_client = TlsClient::new(Box::new(tcp));
        plain_client.reply().await;
        plain_client.send("EHLO tester", "250").await;
        plain_client.send_mail("in clear").await;
        plain_client.send("QUIT", "221").await;

        let mails = recorder
            .wait_for_messages(2, Duration::from_secs(5))
            .await
            .expect("two");
        assert_eq!(mails[0].header("subject").as_deref(), Some("over tls"));
        assert!(mails[0].tls);
        assert_eq!(mails[0].helo, "tester-tls");
        let auth = mails[0].auth.as_ref().expect("auth");
        assert!(auth.tls && auth.accepted, "{auth:?}");
        assert_eq!(
            (auth.username.as_str(), auth.password.as_str()),
            ("ana", "s3cret")
        );
        assert_eq!(mails[1].header("subject").as_deref(), Some("in clear"));
        assert!(!mails[1].tls);
        assert_eq!(mails[1].auth, None);
        assert!(recorder.tls_failures().is_empty());
    }

    #[tokio::test]
    async fn implicit_tls_starts_with_the_handshake() {
        let pki = TestPki::localhost().expect("pki");
        let recorder =
            SmtpRecorder::start_implicit_tls(&pki.cert_pem, &pki.key_pem).expect("start");
        let tcp = tokio::net::TcpStream::connect(recorder.address())
            .await
            .expect("connect");
        let tls = connector(&pki.ca_pem)
            .connect(localhost(), tcp)
            .await
            .expect("handshake");
        let mut c = TlsClient::new(Box::new(tls));
        assert!(c.reply().await[0].starts_with("220"));
        let ehlo = c.send("EHLO tester", "250").await;
        assert!(!has_starttls(&ehlo), "{ehlo:?}");
        c.send("STARTTLS", "503").await;
        c.send_mail("implicit").await;
        c.send("QUIT", "221").await;
        let mails = recorder
            .wait_for_messages(1, Duration::from_secs(5))
            .await
            .expect("one");
        assert!(mails[0].tls);
    }

    #[tokio::test]
    async fn a_client_that_does_not_trust_the_certificate_gets_no_session() {
        let pki = TestPki::localhost().expect("pki");
        let other = TestPki::localhost().expect("another CA");
        let recorder = SmtpRecorder::start_starttls(&pki.cert_pem, &pki.key_pem).expect("start");
        let tcp = tokio::net::TcpStream::connect(recorder.address())
            .await
            .expect("connect");
        let mut c = TlsClient::new(Box::new(tcp));
        c.reply().await;
        c.send("EHLO tester", "250").await;
        c.send("STARTTLS", "220").await;
        let Err(error) = c.upgrade(&other.ca_pem).await else {
            panic!("a certificate from an unknown CA was accepted");
        };
        // Both CAs have the same name: the signature, not the name, gives the other one away.
        assert!(
            error.to_string().contains("invalid peer certificate"),
            "{error}"
        );
        let failures = recorder
            .wait_for_tls_failures(1, Duration::from_secs(5))
            .await
            .expect("the server saw it fail");
        assert_eq!(failures.len(), 1);
        assert_eq!(recorder.transactions(), 0);

        // Implicit TLS: the same, before any SMTP.
        let implicit =
            SmtpRecorder::start_implicit_tls(&pki.cert_pem, &pki.key_pem).expect("start");
        let tcp = tokio::net::TcpStream::connect(implicit.address())
            .await
            .expect("connect");
        assert!(connector(&other.ca_pem)
            .connect(localhost(), tcp)
            .await
            .is_err());
        implicit
            .wait_for_tls_failures(1, Duration::from_secs(5))
            .await
            .expect("the server saw it fail");
    }

    #[test]
    fn a_bad_certificate_or_key_is_an_error_at_start() {
        let pki = TestPki::localhost().expect("pki");
        for (cert, key) in [
            ("", pki.key_pem.as_str()),
            (pki.cert_pem.as_str(), ""),
            (
                pki.cert_pem.as_str(),
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            ),
        ] {
            let error = SmtpRecorder::start_starttls(cert, key)
                .err()
                .expect("refused");
            assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput, "{error}");
        }
    }
}
