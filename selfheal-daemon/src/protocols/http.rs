//! HTTP/1.x on the server side: the target receives requests and sends responses.
//!
//! Owns: [`HttpParser`], one per connection, which pairs requests with responses in order
//! (keep-alive and pipelining), frames bodies by `Content-Length` and `chunked` (bodies are
//! skipped, never stored), knows which responses have no body (to `HEAD`, 1xx, 204, 304), reads
//! a body without a length until the connection closes, and stops at an upgrade (101, or a
//! 2xx to `CONNECT`) or at TLS.
//!
//! Must not: store more than a head line at a time ([`MAX_LINE_BYTES`]), keep more than
//! [`MAX_PIPELINE`] requests waiting for their responses, or trust a length to allocate.
//!
//! # Gaps and resynchronisation
//!
//! A gap inside a body with a length, or inside chunk data, is skipped. A gap inside a head
//! loses the rest of that head: when the start line was captured the exchange is still
//! reported, marked [`HttpExchange::truncated`] (latency and status are right; the host may be
//! missing and byte counts include the gap, whatever it held), otherwise it is counted in
//! [`HttpStats::unparsed`]. A stream whose framing is lost (a gap past the end of a body, in
//! chunk framing or in a head, or a malformed head) skips whole syscalls, counted in
//! [`HttpStats::skipped_bytes`], until one starts with a request line (received side) or a
//! status line (sent side). A response pairs with the oldest waiting request that started no
//! later than the response; a request lost in a gap leaves a placeholder so its response does
//! not pair with the next request. After a response-side desync with several pipelined
//! requests waiting, pairing assumes the oldest is answered first.

use std::collections::VecDeque;

use super::{find_byte, gap_after, text_capped, Direction};

/// The longest path kept (the query string is never kept).
pub const MAX_PATH_BYTES: usize = 256;
/// The longest `Host` value kept.
pub const MAX_HOST_BYTES: usize = 128;
/// Requests waiting for a response; a client pipelining deeper loses the oldest, counted in
/// [`HttpStats::unanswered`].
pub const MAX_PIPELINE: usize = 16;
/// The longest head line assembled across syscalls; the rest of a longer line is skipped.
pub const MAX_LINE_BYTES: usize = 2048;
/// An upper bound of [`HttpParser::heap_bytes`] (about 20 KiB).
pub const MAX_HEAP_BYTES: usize = 2 * 2 * MAX_LINE_BYTES
    + 2 * MAX_PIPELINE * std::mem::size_of::<Pending>()
    + (MAX_PIPELINE + 3) * (MAX_PATH_BYTES + MAX_HOST_BYTES);
/// A head longer than this is malformed.
const MAX_HEAD_BYTES: u64 = 64 * 1024;
/// A head with more lines than this is malformed.
const MAX_HEAD_LINES: u32 = 256;

/// The request method; an unknown token is `Other`, so labels stay bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Delete,
    Patch,
    Options,
    Connect,
    Trace,
    Other,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Head => "HEAD",
            Self::Post => "POST",
            Self::Put => "PUT",
            Self::Delete => "DELETE",
            Self::Patch => "PATCH",
            Self::Options => "OPTIONS",
            Self::Connect => "CONNECT",
            Self::Trace => "TRACE",
            Self::Other => "OTHER",
        }
    }

    /// A method token: a known method, or 1 to 20 upper-case letters, `-` or `_`.
    fn parse(token: &[u8]) -> Option<Self> {
        Some(match token {
            b"GET" => Self::Get,
            b"HEAD" => Self::Head,
            b"POST" => Self::Post,
            b"PUT" => Self::Put,
            b"DELETE" => Self::Delete,
            b"PATCH" => Self::Patch,
            b"OPTIONS" => Self::Options,
            b"CONNECT" => Self::Connect,
            b"TRACE" => Self::Trace,
            _ if (1..=20).contains(&token.len())
                && token
                    .iter()
                    .all(|b| b.is_ascii_uppercase() || *b == b'-' || *b == b'_') =>
            {
                Self::Other
            }
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    fn parse(token: &[u8]) -> Option<Self> {
        match token {
            b"HTTP/1.1" => Some(Self::Http11),
            b"HTTP/1.0" => Some(Self::Http10),
            _ => None,
        }
    }
}

/// A request whose head was read: waiting for its response, or part of an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: Method,
    /// The path without query string or fragment, at most [`MAX_PATH_BYTES`]; `*` for
    /// `OPTIONS *`. Unbounded in cardinality: label with [`super::route::route_template`].
    pub path: String,
    /// HTTP/1.1 when the version was not captured.
    pub version: Version,
    /// The `Host` header, lower case, port included, at most [`MAX_HOST_BYTES`].
    pub host: Option<String>,
    /// When the syscall carrying the request's first byte happened.
    pub start_ns: u64,
    /// Bytes of head and body so far.
    pub bytes: u64,
    /// The head was cut by a capture gap: `host` may be missing.
    pub truncated: bool,
}

/// A request and its final response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpExchange {
    pub request: HttpRequest,
    pub status: u16,
    /// When the syscall carrying the final response's first byte happened (an interim
    /// `100 Continue` does not count).
    pub response_start_ns: u64,
    /// Bytes of the response, interim responses included.
    pub response_bytes: u64,
    /// A head was cut by a capture gap or the response's framing was lost: status and
    /// latency are right, byte counts are not exact.
    pub truncated: bool,
}

impl HttpExchange {
    /// Request first byte to response first byte.
    pub fn latency_ns(&self) -> u64 {
        self.response_start_ns.saturating_sub(self.request.start_ns)
    }
}

/// Counters of one connection (add them up across connections for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HttpStats {
    /// Exchanges reported, truncated ones included.
    pub exchanges: u64,
    /// Exchanges reported with [`HttpExchange::truncated`] set.
    pub truncated: u64,
    /// Exchanges lost: a request whose start line was not captured or was malformed, or a
    /// response whose status line was not captured or was malformed.
    pub unparsed: u64,
    /// Responses with no request to pair with (the connection was seen mid-way, or its
    /// request was skipped while out of sync).
    pub unmatched_responses: u64,
    /// Requests dropped unanswered: beyond [`MAX_PIPELINE`], or still waiting at close.
    pub unanswered: u64,
    /// Times a stream lost its framing.
    pub desyncs: u64,
    /// Bytes skipped while out of sync.
    pub skipped_bytes: u64,
}

impl std::ops::AddAssign for HttpStats {
    fn add_assign(&mut self, other: Self) {
        self.exchanges += other.exchanges;
        self.truncated += other.truncated;
        self.unparsed += other.unparsed;
        self.unmatched_responses += other.unmatched_responses;
        self.unanswered += other.unanswered;
        self.desyncs += other.desyncs;
        self.skipped_bytes += other.skipped_bytes;
    }
}

/// Why the parser stopped reading a connection as HTTP/1.x.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotHttp {
    /// The first bytes were a TLS record.
    Encrypted,
    /// A 101 Switching Protocols, or a tunnel opened by `CONNECT`.
    Upgraded,
}

/// The HTTP/1.x state of one connection. See the module documentation.
#[derive(Debug, Default)]
pub struct HttpParser {
    req: Stream,
    resp: Stream,
    pending: VecDeque<Pending>,
    next_seq: u64,
    /// The response being read, once its head is done.
    current: Option<Current>,
    /// Bytes of interim (1xx) responses, added to the final one.
    interim_bytes: u64,
    not_http: Option<NotHttp>,
    seen_received: bool,
    stats: HttpStats,
}

/// A request waiting for its response; `request` is `None` for a placeholder of one lost in a
/// gap.
#[derive(Debug)]
struct Pending {
    seq: u64,
    start_ns: u64,
    request: Option<HttpRequest>,
}

#[derive(Debug)]
struct Current {
    /// `None` when the response answers a lost request or none.
    request: Option<HttpRequest>,
    status: u16,
    start_ns: u64,
    bytes: u64,
    truncated: bool,
}

/// One direction of the connection.
#[derive(Debug, Default)]
struct Stream {
    state: State,
    head: Head,
    line: LineBuf,
    /// The sequence number of the request whose body is being read (received side).
    seq: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a message boundary or inside a head.
    #[default]
    Head,
    Body(Body),
    /// Lost framing: waiting for a syscall that starts with a start line.
    Lost,
}

/// What the lines of a head said so far.
#[derive(Debug, Default)]
struct Head {
    started: bool,
    start_ns: u64,
    bytes: u64,
    lines: u32,
    request_line: Option<RequestLine>,
    status: Option<u16>,
    content_length: Option<u64>,
    transfer: Transfer,
    /// An unparsable or conflicting `Content-Length`.
    bad_length: bool,
    host: Option<String>,
}

/// What `Transfer-Encoding` says about framing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Transfer {
    #[default]
    Identity,
    Chunked,
    /// A last coding other than `chunked`.
    Other,
}

#[derive(Debug)]
struct RequestLine {
    method: Method,
    path: String,
    version: Version,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked(Chunk),
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    Trailers,
}

/// A body's framing is broken (a bad chunk size line).
#[derive(Debug)]
struct Malformed;

enum HeadStep {
    NeedMore,
    Done,
    Malformed,
}

enum GapEnd {
    Inside,
    Ended,
    /// The body ended inside the gap and this many bytes of the next message followed.
    EndedWithRest(u64),
    Lost,
}

impl HttpParser {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one syscall's data. See the module documentation for `captured` and `total_len`.
    pub fn feed(
        &mut self,
        direction: Direction,
        captured: &[u8],
        total_len: usize,
        ts_ns: u64,
        out: &mut Vec<HttpExchange>,
    ) {
        let gap = gap_after(captured, total_len);
        if direction == Direction::Received && !self.seen_received {
            self.seen_received = !captured.is_empty();
            if captured.first() == Some(&0x16) {
                self.not_http = Some(NotHttp::Encrypted);
            }
        }
        if self.not_http.is_some() {
            return;
        }
        match direction {
            Direction::Received => self.feed_request(captured, gap, ts_ns),
            Direction::Sent => self.feed_response(captured, gap, ts_ns, out),
        }
    }

    /// The connection closed: a response read until close is complete, one cut short is
    /// reported truncated, and requests still waiting are counted unanswered. The parser can
    /// be reused for a new connection.
    pub fn close(&mut self, out: &mut Vec<HttpExchange>) {
        if let Some(mut current) = self.current.take() {
            current.truncated |= !matches!(self.resp.state, State::Body(Body::UntilClose));
            self.emit(current, out);
        }
        self.stats.unanswered += self.pending.iter().filter(|p| p.request.is_some()).count() as u64;
        *self = Self {
            stats: self.stats,
            ..Self::default()
        };
    }

    /// Requests whose head was read and whose response has not started, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = &HttpRequest> {
        self.pending.iter().filter_map(|p| p.request.as_ref())
    }

    pub fn stats(&self) -> HttpStats {
        self.stats
    }

    /// Why the connection is no longer parsed, if it is not.
    pub fn not_http(&self) -> Option<NotHttp> {
        self.not_http
    }

    /// Heap bytes this parser holds; bounded by its constants whatever the input.
    pub fn heap_bytes(&self) -> usize {
        let request_bytes =
            |r: &HttpRequest| r.path.capacity() + r.host.as_ref().map_or(0, String::capacity);
        self.req.line.buf.capacity()
            + self.resp.line.buf.capacity()
            + self.pending.capacity() * std::mem::size_of::<Pending>()
            + self
                .pending
                .iter()
                .filter_map(|p| p.request.as_ref())
                .map(request_bytes)
                .sum::<usize>()
            + self
                .current
                .as_ref()
                .and_then(|c| c.request.as_ref())
                .map_or(0, request_bytes)
            + [&self.req.head, &self.resp.head]
                .iter()
                .map(|h| {
                    h.host.as_ref().map_or(0, String::capacity)
                        + h.request_line.as_ref().map_or(0, |l| l.path.capacity())
                })
                .sum::<usize>()
    }

    fn feed_request(&mut self, data: &[u8], gap: u64, ts: u64) {
        if self.req.state == State::Lost {
            if looks_like_request(data) {
                self.req.reset(State::Head);
            } else {
                self.stats.skipped_bytes += data.len() as u64 + gap;
                return;
            }
        }
        let mut pos = 0;
        while pos < data.len() {
            match self.req.state {
                State::Head => match self.req.head_step(data, &mut pos, ts, false) {
                    HeadStep::NeedMore => break,
                    HeadStep::Done => self.request_head_done(),
                    HeadStep::Malformed => {
                        self.stats.unparsed += 1;
                        let start_ns = self.req.head.start_ns;
                        self.push_pending(start_ns, None);
                        self.lose_request((data.len() - pos) as u64 + gap);
                        return;
                    }
                },
                State::Body(mut body) => {
                    let before = pos;
                    let ended = advance_body(&mut body, &mut self.req.line, data, &mut pos);
                    self.add_request_bytes((pos - before) as u64);
                    match ended {
                        Ok(true) => self.req.reset(State::Head),
                        Ok(false) => self.req.state = State::Body(body),
                        Err(Malformed) => {
                            self.lose_request((data.len() - pos) as u64 + gap);
                            return;
                        }
                    }
                }
                State::Lost => {
                    self.stats.skipped_bytes += (data.len() - pos) as u64;
                    break;
                }
            }
        }
        if gap > 0 {
            self.request_gap(gap, ts);
        }
    }

    fn request_head_done(&mut self) {
        let head = std::mem::take(&mut self.req.head);
        let Some(line) = head.request_line else {
            // `head_step` ends a head only after a request line; keep going if not.
            self.req.reset(State::Head);
            return;
        };
        let request = HttpRequest {
            method: line.method,
            path: line.path,
            version: line.version,
            host: head.host,
            start_ns: head.start_ns,
            bytes: head.bytes,
            truncated: false,
        };
        let seq = self.push_pending(head.start_ns, Some(request));
        let body = if head.bad_length || head.transfer == Transfer::Other {
            // RFC 9112 §6.3: the server cannot frame this request and closes the connection.
            self.lose_request(0);
            return;
        } else if head.transfer == Transfer::Chunked {
            Some(Body::Chunked(Chunk::Size))
        } else {
            head.content_length
                .filter(|length| *length > 0)
                .map(Body::Length)
        };
        self.req.reset(body.map_or(State::Head, State::Body));
        self.req.seq = seq;
    }

    fn request_gap(&mut self, gap: u64, ts: u64) {
        match self.req.state {
            State::Head => {
                let head = std::mem::take(&mut self.req.head);
                let line = head
                    .request_line
                    .or_else(|| parse_request_line(self.req.line.pending(), true));
                match line {
                    Some(line) if head.started => {
                        let request = HttpRequest {
                            method: line.method,
                            path: line.path,
                            version: line.version,
                            host: head.host,
                            start_ns: head.start_ns,
                            bytes: head.bytes + gap,
                            truncated: true,
                        };
                        self.push_pending(head.start_ns, Some(request));
                    }
                    _ => {
                        // A request head began in the gap, or its start line was cut too
                        // short to read.
                        self.stats.unparsed += 1;
                        let start_ns = if head.started { head.start_ns } else { ts };
                        self.push_pending(start_ns, None);
                    }
                }
                self.lose_request(0);
            }
            State::Body(mut body) => match skip_body_gap(&mut body, gap) {
                GapEnd::Inside => {
                    self.add_request_bytes(gap);
                    self.req.state = State::Body(body);
                }
                GapEnd::Ended => {
                    self.add_request_bytes(gap);
                    self.req.reset(State::Head);
                }
                GapEnd::EndedWithRest(rest) => {
                    self.add_request_bytes(gap - rest);
                    self.stats.unparsed += 1;
                    self.push_pending(ts, None);
                    self.lose_request(0);
                }
                GapEnd::Lost => {
                    self.add_request_bytes(gap);
                    self.lose_request(0);
                }
            },
            State::Lost => self.stats.skipped_bytes += gap,
        }
    }

    fn lose_request(&mut self, skipped: u64) {
        self.stats.desyncs += 1;
        self.stats.skipped_bytes += skipped;
        self.req.reset(State::Lost);
    }

    /// Queues a request (or a placeholder) for the response side; returns its sequence number.
    fn push_pending(&mut self, start_ns: u64, request: Option<HttpRequest>) -> u64 {
        if self.pending.len() == MAX_PIPELINE {
            if let Some(dropped) = self.pending.pop_front() {
                self.stats.unanswered += u64::from(dropped.request.is_some());
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.push_back(Pending {
            seq,
            start_ns,
            request,
        });
        seq
    }

    fn add_request_bytes(&mut self, bytes: u64) {
        let seq = self.req.seq;
        if let Some(request) = self
            .pending
            .iter_mut()
            .rev()
            .find(|p| p.seq == seq)
            .and_then(|p| p.request.as_mut())
        {
            request.bytes += bytes;
        }
    }

    fn feed_response(&mut self, data: &[u8], gap: u64, ts: u64, out: &mut Vec<HttpExchange>) {
        if self.resp.state == State::Lost {
            if looks_like_response(data) {
                self.resp.reset(State::Head);
            } else {
                self.stats.skipped_bytes += data.len() as u64 + gap;
                return;
            }
        }
        let mut pos = 0;
        while pos < data.len() && self.not_http.is_none() {
            match self.resp.state {
                State::Head => match self.resp.head_step(data, &mut pos, ts, true) {
                    HeadStep::NeedMore => break,
                    HeadStep::Done => {
                        let head = std::mem::take(&mut self.resp.head);
                        self.response_head_done(&head, false, out);
                    }
                    HeadStep::Malformed => {
                        let start_ns = self.resp.head.start_ns;
                        self.drop_answered(start_ns);
                        self.lose_response((data.len() - pos) as u64 + gap);
                        return;
                    }
                },
                State::Body(mut body) => {
                    let before = pos;
                    let ended = advance_body(&mut body, &mut self.resp.line, data, &mut pos);
                    if let Some(current) = &mut self.current {
                        current.bytes += (pos - before) as u64;
                    }
                    match ended {
                        Ok(true) => {
                            self.finish_response(false, out);
                            self.resp.reset(State::Head);
                        }
                        Ok(false) => self.resp.state = State::Body(body),
                        Err(Malformed) => {
                            self.finish_response(true, out);
                            self.lose_response((data.len() - pos) as u64 + gap);
                            return;
                        }
                    }
                }
                State::Lost => {
                    self.stats.skipped_bytes += (data.len() - pos) as u64;
                    break;
                }
            }
        }
        if gap > 0 && self.not_http.is_none() {
            self.response_gap(gap, ts, out);
        }
    }

    /// Pairs a response head with its request and sets up its body.
    fn response_head_done(&mut self, head: &Head, truncated: bool, out: &mut Vec<HttpExchange>) {
        let status = head.status.unwrap_or(0);
        if (100..200).contains(&status) && status != 101 && !truncated {
            self.interim_bytes += head.bytes;
            self.resp.reset(State::Head);
            return;
        }
        let request = match self.pending.front() {
            Some(front) if front.start_ns <= head.start_ns => {
                self.pending.pop_front().and_then(|p| p.request)
            }
            _ => {
                self.stats.unmatched_responses += 1;
                None
            }
        };
        let method = request.as_ref().map(|r| r.method);
        self.current = Some(Current {
            request,
            status,
            start_ns: head.start_ns,
            bytes: head.bytes + std::mem::take(&mut self.interim_bytes),
            truncated,
        });
        let upgraded =
            status == 101 || (method == Some(Method::Connect) && (200..300).contains(&status));
        let no_body = upgraded
            || method == Some(Method::Head)
            || status == 204
            || status == 304
            || (100..200).contains(&status);
        if truncated {
            self.finish_response(true, out);
            return;
        }
        if upgraded {
            self.finish_response(false, out);
            self.not_http = Some(NotHttp::Upgraded);
            return;
        }
        let body = if no_body {
            None
        } else if head.bad_length {
            // Unframeable: report what we know and resynchronise.
            self.finish_response(true, out);
            self.lose_response(0);
            return;
        } else if head.transfer == Transfer::Chunked {
            Some(Body::Chunked(Chunk::Size))
        } else if head.transfer == Transfer::Other {
            Some(Body::UntilClose)
        } else {
            match head.content_length {
                Some(0) => None,
                Some(length) => Some(Body::Length(length)),
                None => Some(Body::UntilClose),
            }
        };
        if let Some(body) = body {
            self.resp.reset(State::Body(body));
        } else {
            self.finish_response(false, out);
            self.resp.reset(State::Head);
        }
    }

    fn response_gap(&mut self, gap: u64, ts: u64, out: &mut Vec<HttpExchange>) {
        match self.resp.state {
            State::Head => {
                let mut head = std::mem::take(&mut self.resp.head);
                if head.status.is_none() {
                    head.status = parse_status_line(self.resp.line.pending());
                }
                if head.started && head.status.is_some() {
                    head.bytes += gap;
                    self.response_head_done(&head, true, out);
                } else {
                    self.drop_answered(if head.started { head.start_ns } else { ts });
                }
                self.lose_response(0);
            }
            State::Body(mut body) => {
                let end = skip_body_gap(&mut body, gap);
                let rest = match end {
                    GapEnd::EndedWithRest(rest) => rest,
                    _ => 0,
                };
                if let Some(current) = &mut self.current {
                    current.bytes += gap - rest;
                }
                match end {
                    GapEnd::Inside => self.resp.state = State::Body(body),
                    GapEnd::Ended => {
                        self.finish_response(false, out);
                        self.resp.reset(State::Head);
                    }
                    GapEnd::EndedWithRest(_) => {
                        self.finish_response(false, out);
                        self.drop_answered(ts);
                        self.lose_response(0);
                    }
                    GapEnd::Lost => {
                        self.finish_response(true, out);
                        self.lose_response(0);
                    }
                }
            }
            State::Lost => self.stats.skipped_bytes += gap,
        }
    }

    /// A response that could not be read answered the oldest waiting request: that exchange
    /// is lost.
    fn drop_answered(&mut self, response_start_ns: u64) {
        match self.pending.front() {
            Some(front) if front.start_ns <= response_start_ns => {
                if self
                    .pending
                    .pop_front()
                    .is_some_and(|p| p.request.is_some())
                {
                    self.stats.unparsed += 1;
                }
            }
            _ => self.stats.unmatched_responses += 1,
        }
    }

    fn finish_response(&mut self, truncated: bool, out: &mut Vec<HttpExchange>) {
        if let Some(mut current) = self.current.take() {
            current.truncated |= truncated;
            self.emit(current, out);
        }
    }

    fn emit(&mut self, current: Current, out: &mut Vec<HttpExchange>) {
        let Some(request) = current.request else {
            return;
        };
        let truncated = current.truncated || request.truncated;
        self.stats.exchanges += 1;
        self.stats.truncated += u64::from(truncated);
        out.push(HttpExchange {
            request,
            status: current.status,
            response_start_ns: current.start_ns,
            response_bytes: current.bytes,
            truncated,
        });
    }

    fn lose_response(&mut self, skipped: u64) {
        self.stats.desyncs += 1;
        self.stats.skipped_bytes += skipped;
        self.interim_bytes = 0;
        self.resp.reset(State::Lost);
    }
}

impl Stream {
    fn reset(&mut self, state: State) {
        self.state = state;
        self.head = Head::default();
        self.line.reset();
    }

    /// Reads head lines from `data[*pos..]` into `self.head`.
    fn head_step(&mut self, data: &[u8], pos: &mut usize, ts: u64, response: bool) -> HeadStep {
        let head = &mut self.head;
        loop {
            if !head.started {
                // Empty lines before a start line are ignored (RFC 9112 §2.2).
                while *pos < data.len()
                    && matches!(data[*pos], b'\r' | b'\n')
                    && self.line.pending().is_empty()
                {
                    *pos += 1;
                }
                if *pos == data.len() {
                    return HeadStep::NeedMore;
                }
                head.started = true;
                head.start_ns = ts;
            }
            let before = *pos;
            let line = self.line.next(data, pos);
            head.bytes += (*pos - before) as u64;
            if head.bytes > MAX_HEAD_BYTES {
                return HeadStep::Malformed;
            }
            let Some((line, overflow)) = line else {
                // Junk (joining mid-body) shows in its first bytes; do not wait for a line end.
                if head.lines == 0 && !start_line_prefix_ok(self.line.pending(), response) {
                    return HeadStep::Malformed;
                }
                return HeadStep::NeedMore;
            };
            head.lines += 1;
            if head.lines > MAX_HEAD_LINES {
                return HeadStep::Malformed;
            }
            if head.lines == 1 {
                if response {
                    match parse_status_line(line) {
                        Some(status) => head.status = Some(status),
                        None => return HeadStep::Malformed,
                    }
                } else {
                    match parse_request_line(line, overflow) {
                        Some(request_line) => head.request_line = Some(request_line),
                        None => return HeadStep::Malformed,
                    }
                }
            } else if line.is_empty() {
                return HeadStep::Done;
            } else {
                header(head, line);
            }
        }
    }
}

/// Applies one header line to the head.
fn header(head: &mut Head, line: &[u8]) {
    let Some(colon) = find_byte(b':', line) else {
        // Not a header (an obsolete line folding, or junk): ignored as servers do.
        return;
    };
    let name = line[..colon].trim_ascii();
    let value = line[colon + 1..].trim_ascii();
    if name.eq_ignore_ascii_case(b"content-length") {
        // `Content-Length: 5, 5` is allowed when every value is the same.
        for item in value.split(|b| *b == b',') {
            match parse_decimal(item.trim_ascii()) {
                Some(length) if head.content_length.is_none_or(|l| l == length) => {
                    head.content_length = Some(length);
                }
                _ => head.bad_length = true,
            }
        }
    } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
        let last = value
            .rsplit(|b| *b == b',')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        head.transfer = if last.eq_ignore_ascii_case(b"chunked") {
            Transfer::Chunked
        } else {
            Transfer::Other
        };
    } else if name.eq_ignore_ascii_case(b"host") && head.host.is_none() {
        let mut host = text_capped(value, MAX_HOST_BYTES);
        host.make_ascii_lowercase();
        head.host = Some(host);
    }
}

/// `METHOD SP target SP HTTP/1.x`; with `cut` (the line was cut short), the version may be
/// missing and is taken as HTTP/1.1.
fn parse_request_line(line: &[u8], cut: bool) -> Option<RequestLine> {
    let space = find_byte(b' ', line)?;
    let method = Method::parse(&line[..space])?;
    let rest = &line[space + 1..];
    let (target, version) = match rest.iter().rposition(|b| *b == b' ') {
        Some(at) => match Version::parse(&rest[at + 1..]) {
            Some(version) => (&rest[..at], version),
            None if cut => (&rest[..at], Version::Http11),
            None => return None,
        },
        None if cut => (rest, Version::Http11),
        None => return None,
    };
    Some(RequestLine {
        method,
        path: path_of(target)?,
        version,
    })
}

/// The path of a request target: origin form (`/a?b`), asterisk form, or absolute form
/// (`http://host/a`).
fn path_of(target: &[u8]) -> Option<String> {
    let path = match target.first()? {
        b'/' | b'*' => target,
        _ => {
            let scheme_end = target.windows(3).position(|w| w == b"://")?;
            let after = &target[scheme_end + 3..];
            match find_byte(b'/', after) {
                Some(slash) => &after[slash..],
                None => b"/",
            }
        }
    };
    let end = path
        .iter()
        .position(|b| matches!(b, b'?' | b'#'))
        .unwrap_or(path.len());
    Some(text_capped(&path[..end], MAX_PATH_BYTES))
}

/// `HTTP/1.x SP 3DIGIT [SP reason]`: the status.
fn parse_status_line(line: &[u8]) -> Option<u16> {
    if line.len() < 12 || Version::parse(&line[..8]).is_none() || line[8] != b' ' {
        return None;
    }
    let digits = &line[9..12];
    if !digits.iter().all(u8::is_ascii_digit) || line.get(12).is_some_and(|b| *b != b' ') {
        return None;
    }
    digits
        .iter()
        .try_fold(0u16, |n, d| Some(n * 10 + u16::from(d - b'0')))
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// The size on a chunk-size line (`1a;ext=1`).
fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line[..find_byte(b';', line).unwrap_or(line.len())].trim_ascii();
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        let value = char::from(*d).to_digit(16)?;
        Some(n * 16 + u64::from(value))
    })
}

/// Whether the first bytes of a start line could begin a valid one.
fn start_line_prefix_ok(prefix: &[u8], response: bool) -> bool {
    if response {
        const VERSION: &[u8] = b"HTTP/1.";
        let n = prefix.len().min(VERSION.len());
        return prefix[..n] == VERSION[..n];
    }
    let token_end = find_byte(b' ', prefix).unwrap_or(prefix.len());
    let token_ok = token_end <= 20
        && prefix[..token_end]
            .iter()
            .all(|b| b.is_ascii_uppercase() || *b == b'-' || *b == b'_');
    token_ok
        && prefix
            .get(token_end + 1)
            .is_none_or(|b| matches!(b, b'/' | b'*' | b'h'))
}

/// Whether a syscall starts with something a request line could be: a method, a space and the
/// start of a target; the whole line when it was captured.
fn looks_like_request(data: &[u8]) -> bool {
    let line_end = find_byte(b'\n', data);
    let line = &data[..line_end.unwrap_or(data.len())];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line_end.is_some() {
        return parse_request_line(line, false).is_some();
    }
    parse_request_line(line, true).is_some()
}

/// Whether a syscall starts with a status line (as much of it as was captured).
fn looks_like_response(data: &[u8]) -> bool {
    const PREFIX: &[u8] = b"HTTP/1.";
    if data.len() < 12 {
        return data.len() >= PREFIX.len() && data.starts_with(PREFIX);
    }
    let line_end = find_byte(b'\n', data).unwrap_or(data.len());
    let line = &data[..line_end];
    parse_status_line(line.strip_suffix(b"\r").unwrap_or(line)).is_some()
}

/// Advances a body over `data[*pos..]`; `Ok(true)` when it ended.
fn advance_body(
    body: &mut Body,
    line: &mut LineBuf,
    data: &[u8],
    pos: &mut usize,
) -> Result<bool, Malformed> {
    loop {
        let available = (data.len() - *pos) as u64;
        match body {
            Body::UntilClose => {
                *pos = data.len();
                return Ok(false);
            }
            Body::Length(remaining) => {
                let n = available.min(*remaining);
                *pos += n as usize;
                *remaining -= n;
                return Ok(*remaining == 0);
            }
            Body::Chunked(chunk) => match chunk {
                Chunk::Data(remaining) => {
                    let n = available.min(*remaining);
                    *pos += n as usize;
                    *remaining -= n;
                    if *remaining > 0 {
                        return Ok(false);
                    }
                    *chunk = Chunk::DataEnd;
                }
                Chunk::Size => {
                    let Some((size_line, _)) = line.next(data, pos) else {
                        return Ok(false);
                    };
                    *chunk = match parse_chunk_size(size_line).ok_or(Malformed)? {
                        0 => Chunk::Trailers,
                        size => Chunk::Data(size),
                    };
                }
                Chunk::DataEnd => {
                    let Some((end, _)) = line.next(data, pos) else {
                        return Ok(false);
                    };
                    if !end.is_empty() {
                        return Err(Malformed);
                    }
                    *chunk = Chunk::Size;
                }
                Chunk::Trailers => {
                    let Some((trailer, _)) = line.next(data, pos) else {
                        return Ok(false);
                    };
                    if trailer.is_empty() {
                        return Ok(true);
                    }
                }
            },
        }
    }
}

/// Skips `gap` bytes of a body.
fn skip_body_gap(body: &mut Body, gap: u64) -> GapEnd {
    match body {
        Body::UntilClose => GapEnd::Inside,
        Body::Length(remaining) => match gap.cmp(remaining) {
            std::cmp::Ordering::Less => {
                *remaining -= gap;
                GapEnd::Inside
            }
            std::cmp::Ordering::Equal => GapEnd::Ended,
            std::cmp::Ordering::Greater => GapEnd::EndedWithRest(gap - *remaining),
        },
        Body::Chunked(Chunk::Data(remaining)) if gap <= *remaining => {
            *remaining -= gap;
            if *remaining == 0 {
                *body = Body::Chunked(Chunk::DataEnd);
            }
            GapEnd::Inside
        }
        Body::Chunked(_) => GapEnd::Lost,
    }
}

/// A head line assembled across syscalls: its first [`MAX_LINE_BYTES`] bytes.
#[derive(Debug, Default)]
struct LineBuf {
    buf: Vec<u8>,
    /// The line was longer than the buffer.
    overflow: bool,
    /// `buf` holds a line already returned; cleared on the next call.
    taken: bool,
}

impl LineBuf {
    fn reset(&mut self) {
        self.buf.clear();
        self.overflow = false;
        self.taken = false;
    }

    /// The next complete line of `data[*pos..]` joined to what earlier syscalls left, without
    /// its CR LF, and whether it was cut; `None` when the data ends first (the piece is kept).
    fn next<'a>(&'a mut self, data: &'a [u8], pos: &mut usize) -> Option<(&'a [u8], bool)> {
        if self.taken {
            self.reset();
        }
        let rest = &data[*pos..];
        if let Some(end) = find_byte(b'\n', rest) {
            *pos += end + 1;
            if self.buf.is_empty() && !self.overflow {
                return Some((strip_cr(&rest[..end]), false));
            }
            self.append(&rest[..end]);
            self.taken = true;
            return Some((strip_cr(&self.buf), self.overflow));
        }
        self.append(rest);
        *pos = data.len();
        None
    }

    /// The incomplete line kept so far.
    fn pending(&self) -> &[u8] {
        if self.taken {
            &[]
        } else {
            &self.buf
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        let room = MAX_LINE_BYTES - self.buf.len();
        if bytes.len() > room {
            self.overflow = true;
        }
        self.buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

#[cfg(test)]
pub(super) mod tests;
