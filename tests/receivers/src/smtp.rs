//! The SMTP recorder: a minimal, real SMTP server (RFC 5321 without TLS) that records each
//! message's envelope and data.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use base64::{engine::general_purpose::STANDARD, Engine as _};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpStream,
};

use crate::log::{Background, Log, WaitTimeout};

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

struct Shared {
    mails: Log<Mail>,
    auths: Log<Credentials>,
    /// Every MAIL FROM, refused or not: how many deliveries were tried.
    transactions: Log<String>,
    settings: Mutex<Settings>,
}

/// A minimal SMTP server on `127.0.0.1:0`: greeting, EHLO/HELO, AUTH PLAIN and AUTH LOGIN
/// (advertised and accepted unless told otherwise), MAIL FROM, RCPT TO, DATA (dot-unstuffed),
/// RSET, NOOP, QUIT. No TLS: the notifier under test uses `smtp_tls = "none"`. Stops when
/// dropped.
pub struct SmtpRecorder {
    shared: Arc<Shared>,
    address: SocketAddr,
    _server: Background,
}

impl SmtpRecorder {
    pub fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            mails: Log::new("messages"),
            auths: Log::new("authentications"),
            transactions: Log::new("transactions"),
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
            // A client that goes away mid-session is the client's business.
            let _ = Session::new(stream, shared).run().await;
        });
    }
}

struct Session {
    reader: BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
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
    fn new(stream: TcpStream, shared: Arc<Shared>) -> Self {
        let (read, write) = stream.into_split();
        Self {
            reader: BufReader::new(read),
            writer: write,
            shared,
            helo: None,
            auth: None,
            from: None,
            to: Vec::new(),
        }
    }

    async fn reply(&mut self, text: &str) -> std::io::Result<()> {
        self.writer.write_all(text.as_bytes()).await?;
        self.writer.write_all(b"\r\n").await
    }

    /// One line without its CRLF (or LF); `None` at the end of the stream or past the limit.
    async fn line(&mut self, limit: u64) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
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
                "STARTTLS" => self.reply("454 4.7.0 TLS not available").await?,
                _ => self.reply("502 5.5.2 command not recognized").await?,
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.from = None;
        self.to.clear();
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
        c.send("QUIT", "221");
        let mails = recorder
            .wait_for_messages_blocking(1, Duration::from_secs(5))
            .expect("one");
        let mail = &mails[0];
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
}
