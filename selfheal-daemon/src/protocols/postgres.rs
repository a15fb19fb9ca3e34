//! PostgreSQL v3 on the client side: the target sends frontend messages and receives backend
//! ones.
//!
//! Owns: [`PgParser`], one per connection, which reads the startup (SSL/GSS negotiation,
//! `StartupMessage`, the authentication outcome), simple and extended queries (pipelined:
//! several `Execute`s before one `Sync`), prepared statements by name (bounded), and the
//! responses that complete them, and reports [`PgEvent`]s. COPY data, `CancelRequest`,
//! notices, parameter statuses, key data and notifications are recognised and skipped.
//!
//! Must not: keep more than a bounded prefix of any message ([`MAX_BODY_PREFIX`]), more than
//! [`MAX_STATEMENTS`] statements, or more than [`MAX_PENDING_OPS`] unanswered messages; or
//! allocate what a length field claims.
//!
//! # When a query ends
//!
//! - Extended protocol: a query is one `Execute`. It starts with the syscall that sent the
//!   `Execute` and ends with the syscall that received its `CommandComplete`,
//!   `EmptyQueryResponse`, `PortalSuspended` or `ErrorResponse`. An error on `Parse`, `Bind` or
//!   `Describe` ends a query too (the statement failed before running), and the messages up
//!   to `Sync` that the server then skips report nothing. An error raised at `Sync` (a
//!   deferred constraint at the implicit commit) is attached to the batch's last query.
//! - Simple protocol: a query is one `Query` message, however many statements it holds; it
//!   ends with its `ReadyForQuery` (which the server sends right after the last statement's
//!   result). Rows are summed over its statements; the command is the last one's.
//! - Either way the event is *reported* at the next `ReadyForQuery`, which carries the
//!   transaction status after it; so a pipeline's queries keep their own end times and all
//!   get the status after the batch. More than [`MAX_AWAITING_READY`] completed queries
//!   without a `ReadyForQuery` are reported without a status.
//!
//! # Gaps and resynchronisation
//!
//! Every message carries its length, so a gap inside a message body is skipped and the
//! message is read from its captured prefix (a `Parse` keeps its name and the start of its
//! SQL, marked [`Statement::truncated`]; a command tag cut short is not read). A gap past a
//! message's end, an impossible length or type, or an implausible message loses a
//! direction's framing ([`PgStats::desyncs`]); it skips whole syscalls
//! ([`PgStats::skipped_bytes`]) until one starts with a plausible chain of messages (types,
//! lengths and, where the capture holds them, bodies check out, as far as they go).
//!
//! - Frontend bytes that could not be read (after a loss) become one *unseen* batch that
//!   absorbs the backend's answers up to the next `ReadyForQuery`, reporting a query for each
//!   completion it sees, with the statement last named in that syscall (if any).
//! - Backend bytes that could not be read (a large result read past the capture, the usual
//!   case) hide how far the answers got. The client tells where to look again: the server
//!   sends nothing unasked, so an answer starts a read, the first after the client sent what
//!   it answers. A client reads an answer at least up to its completion before it sends
//!   again (libpq all of it; tokio-postgres may leave the `ReadyForQuery`, or its last bytes,
//!   for the next read, which recognises them), though it may send messages whose answers it
//!   does not wait for (tokio-postgres closes statements so). Reads too short to tell are
//!   kept (up to 16 bytes) and joined to the next.
//! - Resynchronising, the parser decides which waiting messages the unread bytes answered.
//!   Every batch sent after them is answered in full from here on; of the earlier (*stale*)
//!   ones, it takes all as answered (the client read them before sending again) unless the
//!   read's messages cannot start the next batch's answer, and then the read goes on with
//!   the latest stale message it can answer. The read's message types are checked against
//!   the waiting messages (a `CloseComplete` answers a `Close`, a simple query answers with a
//!   completion before its `ReadyForQuery`, rows follow a description...); a read that fits
//!   none is no place to resynchronise. Queries answered in the unread bytes are reported
//!   with [`Completion::Inferred`], ending at the last backend syscall before the client
//!   moved on, without transaction status unless their `ReadyForQuery` is read. So a
//!   captured `ErrorResponse` is reported with its query whatever was lost before it; only
//!   one whose header fell in a gap is lost.
//! - A response that fits no waiting message ([`PgStats::unmatched`]) drops the current
//!   batch and skips responses up to the next `ReadyForQuery`.

use std::{
    borrow::Cow,
    collections::{hash_map::DefaultHasher, HashMap, VecDeque},
    hash::BuildHasherDefault,
    sync::Arc,
};

use super::{find_byte, fingerprint::fingerprint, gap_after, text_capped, Direction};

/// The longest SQL text kept for a statement; longer ones are cut and marked truncated.
pub const MAX_SQL_BYTES: usize = 1024;
/// Named prepared statements remembered per connection; the oldest is forgotten first.
pub const MAX_STATEMENTS: usize = 128;
/// Named portals remembered per connection.
pub const MAX_PORTALS: usize = 16;
/// Frontend messages waiting for their answers; beyond this the batch is dropped.
pub const MAX_PENDING_OPS: usize = 256;
/// Completed queries waiting for a `ReadyForQuery` to learn the transaction status.
pub const MAX_AWAITING_READY: usize = 64;
/// The most of one message body kept when it spans syscalls.
pub const MAX_BODY_PREFIX: usize = MAX_SQL_BYTES + 2 * MAX_NAME_BYTES + 64;
/// Statement and portal names longer than this are cut (PostgreSQL's own limit is 63).
const MAX_NAME_BYTES: usize = 64;
const MAX_ERROR_MESSAGE_BYTES: usize = 512;
const MAX_STARTUP_VALUE_BYTES: usize = 64;
const MAX_COMMAND_BYTES: usize = 64;
/// The largest message the server accepts or sends is 1 GB plus a little.
const MAX_MESSAGE_LEN: u32 = (1 << 30) + 1024;
/// The server's limit for startup packets.
const MAX_STARTUP_LEN: u32 = 10_000;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;

/// A statement's SQL and its fingerprint, shared by the events that ran it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    /// The SQL text, at most [`MAX_SQL_BYTES`].
    pub sql: Box<str>,
    /// [`fingerprint`] of `sql`.
    pub fingerprint: Box<str>,
    /// The SQL was cut, by [`MAX_SQL_BYTES`] or by the capture.
    pub truncated: bool,
}

/// The transaction status a `ReadyForQuery` reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block (queries are refused until it ends).
    Failed,
}

impl TxStatus {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'I' => Some(Self::Idle),
            b'T' => Some(Self::InTransaction),
            b'E' => Some(Self::Failed),
            _ => None,
        }
    }
}

/// The fields of an `ErrorResponse` worth keeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// `ERROR`, `FATAL` or `PANIC` (the non-localised field when the server sends it).
    pub severity: String,
    /// The SQLSTATE code, e.g. `28P01` (bad password), `57014` (cancelled), `40P01` (deadlock).
    pub sqlstate: String,
    /// The primary message, at most 512 bytes.
    pub message: String,
}

/// How a query's end was known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Completion {
    /// `CommandComplete`.
    Command,
    /// `EmptyQueryResponse`.
    EmptyQuery,
    /// `PortalSuspended`: an `Execute` with a row limit returned its rows; the portal stays.
    Suspended,
    /// `ErrorResponse`; see [`PgQuery::error`].
    Error,
    /// The answer was not captured; the end is the last backend syscall before the client
    /// moved on (see the module documentation).
    Inferred,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueryProtocol {
    Simple,
    Extended,
    /// Sent in bytes that could not be read.
    Unknown,
}

/// One completed query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgQuery {
    /// `None` when the statement was prepared before the parser saw the connection, was
    /// forgotten, or was sent in bytes that could not be read.
    pub statement: Option<Arc<Statement>>,
    pub protocol: QueryProtocol,
    /// When the syscall that sent the query happened.
    pub start_ns: u64,
    /// When the syscall that received its completion happened.
    pub end_ns: u64,
    /// The row count of the command tag (`SELECT 5`, `UPDATE 3`, `COPY 10`), or the data rows
    /// counted when the tag has none.
    pub rows: u64,
    /// The command tag without counts: `SELECT`, `INSERT`, `CREATE TABLE`.
    pub command: Option<Cow<'static, str>>,
    pub completion: Completion,
    pub error: Option<PgError>,
    /// The status of the `ReadyForQuery` that followed; `None` when it was not seen.
    pub tx_status: Option<TxStatus>,
}

impl PgQuery {
    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

/// What the `StartupMessage` said (values at most 64 bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartupInfo {
    pub user: Option<String>,
    pub database: Option<String>,
    pub application_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgEvent {
    Query(PgQuery),
    /// `AuthenticationOk`.
    Authenticated {
        ts_ns: u64,
        startup: StartupInfo,
    },
    /// An `ErrorResponse` before the first `ReadyForQuery`: SQLSTATE `28P01` is a bad
    /// password, `28000` a refused login, `3D000` an unknown database, `53300` too many
    /// connections.
    AuthFailed {
        ts_ns: u64,
        startup: StartupInfo,
        error: PgError,
    },
    /// The server accepted SSL or GSS encryption (or the client started TLS directly): the
    /// rest of the connection is not readable and is not parsed.
    Encrypted {
        ts_ns: u64,
    },
    /// The connection carried a `CancelRequest` for another session's query.
    Cancel {
        ts_ns: u64,
    },
}

/// Counters of one connection (add them up across connections for metrics).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PgStats {
    /// Query events reported.
    pub queries: u64,
    /// Of those, ended by inference.
    pub inferred: u64,
    /// Times a direction lost its framing.
    pub desyncs: u64,
    /// Bytes skipped while out of sync.
    pub skipped_bytes: u64,
    /// Backend responses that fit no waiting frontend message.
    pub unmatched: u64,
    /// Queries dropped without an event: the pending queue overflowed, or the connection
    /// closed before their answer.
    pub dropped: u64,
}

impl std::ops::AddAssign for PgStats {
    fn add_assign(&mut self, other: Self) {
        self.queries += other.queries;
        self.inferred += other.inferred;
        self.desyncs += other.desyncs;
        self.skipped_bytes += other.skipped_bytes;
        self.unmatched += other.unmatched;
        self.dropped += other.dropped;
    }
}

/// The connection sits in an open transaction with nothing running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleInTransaction {
    /// When the `ReadyForQuery` that said so was received.
    pub since_ns: u64,
    pub status: TxStatus,
}

/// A query sent and not answered yet.
#[derive(Debug, Clone, Copy)]
pub struct InFlightQuery<'a> {
    pub statement: Option<&'a Statement>,
    pub start_ns: u64,
}

/// Why the parser stopped reading a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Encrypted,
    Cancel,
}

/// The PostgreSQL state of one connection. See the module documentation.
#[derive(Debug)]
pub struct PgParser {
    /// Frontend messages (the target sends them).
    front: Framer,
    /// Backend messages (the target receives them).
    back: Framer,
    /// Short backend reads kept while its framing is lost.
    carry: Carry,
    session: Session,
}

impl Default for PgParser {
    fn default() -> Self {
        Self::new()
    }
}

impl PgParser {
    pub fn new() -> Self {
        Self {
            front: Framer {
                // A connection starts with an untyped startup packet (unless the parser joins
                // mid-way, which the first byte tells).
                untyped: true,
                ..Framer::default()
            },
            back: Framer::default(),
            carry: Carry::default(),
            session: Session::default(),
        }
    }

    /// Feeds one syscall's data. See the module documentation of [`super`].
    pub fn feed(
        &mut self,
        direction: Direction,
        captured: &[u8],
        total_len: usize,
        ts_ns: u64,
        out: &mut Vec<PgEvent>,
    ) {
        if self.session.stopped.is_some() {
            return;
        }
        let gap = gap_after(captured, total_len);
        match direction {
            Direction::Sent => self.feed_frontend(captured, gap, ts_ns, out),
            Direction::Received => self.feed_backend(captured, gap, ts_ns, out),
        }
    }

    /// The connection closed. Queries waiting for an answer that was not captured are
    /// reported as inferred; a simple query whose results completed but whose
    /// `ReadyForQuery` did not come is reported as it stands; the others never got an
    /// answer and are dropped (counted). The parser can be reused.
    pub fn close(&mut self, out: &mut Vec<PgEvent>) {
        if self.back.lost {
            self.session.infer_completed(out);
        } else {
            self.session.finish_answered(out);
        }
        self.session.flush_awaiting(None, out);
        let stats = self.session.stats;
        *self = Self::new();
        self.session.stats = stats;
    }

    pub fn stats(&self) -> PgStats {
        self.session.stats
    }

    /// The last transaction status a `ReadyForQuery` reported, and when.
    pub fn transaction_status(&self) -> Option<(TxStatus, u64)> {
        self.session.ready
    }

    /// The connection is idle inside a transaction: the last `ReadyForQuery` said `T` or `E`
    /// and nothing was sent since.
    pub fn idle_in_transaction(&self) -> Option<IdleInTransaction> {
        let (status, since_ns) = self.session.ready?;
        (status != TxStatus::Idle && self.session.ops.is_empty() && self.session.stopped.is_none())
            .then_some(IdleInTransaction { since_ns, status })
    }

    /// Queries sent and not answered, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = InFlightQuery<'_>> {
        self.session
            .ops
            .iter()
            // An op with an end hint was answered in bytes that could not be read.
            .filter(|op| op.kind.is_query() && !op.produced && op.end_hint.is_none())
            .map(|op| InFlightQuery {
                statement: op.statement.as_deref(),
                start_ns: op.start_ns,
            })
    }

    pub fn startup(&self) -> &StartupInfo {
        &self.session.startup
    }

    /// Why the connection is no longer parsed, if it is not.
    pub fn stopped(&self) -> Option<Stopped> {
        self.session.stopped
    }

    /// Heap bytes this parser holds (shared statements counted once per holder, so this
    /// over-counts); never more than [`MAX_HEAP_BYTES`], whatever the input.
    pub fn heap_bytes(&self) -> usize {
        let statement = |s: &Arc<Statement>| {
            std::mem::size_of::<Statement>() + s.sql.len() + s.fingerprint.len()
        };
        let maybe_statement = |s: &Option<Arc<Statement>>| s.as_ref().map_or(0, statement);
        let extras = |statement_: &Option<Arc<Statement>>,
                      error: &Option<PgError>,
                      command: &Option<Cow<'static, str>>| {
            maybe_statement(statement_)
                + error.as_ref().map_or(0, |e| {
                    e.severity.capacity() + e.sqlstate.capacity() + e.message.capacity()
                })
                + match command {
                    Some(Cow::Owned(command)) => command.capacity(),
                    _ => 0,
                }
        };
        let s = &self.session;
        let framers = self.front.buf.capacity() + self.back.buf.capacity();
        let statements = s.statements.map.capacity()
            * (std::mem::size_of::<(Box<str>, Arc<Statement>)>() + 1)
            + s.statements
                .map
                .iter()
                .map(|(name, st)| name.len() + statement(st))
                .sum::<usize>()
            + s.statements.order.capacity() * std::mem::size_of::<Box<str>>()
            + s.statements.order.iter().map(|n| n.len()).sum::<usize>();
        let portals = s.portals.capacity()
            * std::mem::size_of::<(Box<str>, Option<Arc<Statement>>)>()
            + s.portals
                .iter()
                .map(|(n, st)| n.len() + maybe_statement(st))
                .sum::<usize>()
            + maybe_statement(&s.unnamed_statement)
            + maybe_statement(&s.unnamed_portal)
            + maybe_statement(&s.feed_statement)
            + s.recent.slots.iter().map(maybe_statement).sum::<usize>();
        let ops = s.ops.capacity() * std::mem::size_of::<Op>()
            + s.ops
                .iter()
                .map(|op| extras(&op.statement, &op.error, &op.command))
                .sum::<usize>();
        let awaiting = s.awaiting.capacity() * std::mem::size_of::<PgQuery>()
            + s.awaiting
                .iter()
                .map(|q| extras(&q.statement, &q.error, &q.command))
                .sum::<usize>();
        let startup = [
            &s.startup.user,
            &s.startup.database,
            &s.startup.application_name,
        ]
        .iter()
        .map(|v| v.as_ref().map_or(0, String::capacity))
        .sum::<usize>();
        framers + statements + portals + ops + awaiting + startup
    }

    fn feed_frontend(&mut self, data: &[u8], gap: u64, ts: u64, out: &mut Vec<PgEvent>) {
        self.session.feed_statement = None;
        let mut pos = 0;
        if self.front.lost {
            if plausible(data, Side::Frontend) {
                self.front.resync();
            } else {
                self.session.stats.skipped_bytes += data.len() as u64 + gap;
                return;
            }
        }
        loop {
            if self.front.untyped && self.front.at_boundary() && pos < data.len() {
                match data[pos] {
                    0 => {}
                    // A TLS record: the client negotiates TLS directly (PostgreSQL 17).
                    0x16 => {
                        self.session.stop(Stopped::Encrypted, ts, out);
                        return;
                    }
                    // Typed messages: the parser joined an established connection.
                    _ => self.front.untyped = false,
                }
            }
            match self.front.next(data, &mut pos, ts, Side::Frontend) {
                Step::Frame(frame) => {
                    self.session.on_frontend(&frame, out);
                    self.front.untyped = self.session.phase == Phase::Negotiating;
                    if self.session.stopped.is_some() {
                        return;
                    }
                }
                Step::NeedMore => break,
                Step::Corrupt => {
                    self.session.stats.skipped_bytes += (data.len() - pos) as u64 + gap;
                    self.lose_frontend(ts, false, out);
                    return;
                }
            }
        }
        let (frame, lost) = self.front.skip(gap);
        if let Some(frame) = frame {
            self.session.on_frontend(&frame, out);
            self.front.untyped = self.session.phase == Phase::Negotiating;
        }
        if lost && self.session.stopped.is_none() {
            self.lose_frontend(ts, true, out);
        }
    }

    /// Frontend framing is lost. When a gap hid whole messages (`unseen`), they are taken as
    /// one batch whose answers are reported; bytes that made no sense (a corrupt length, the
    /// middle of a message when joining) are not assumed to hold anything.
    fn lose_frontend(&mut self, ts: u64, unseen: bool, out: &mut Vec<PgEvent>) {
        self.session.stats.desyncs += 1;
        self.front.lose();
        let statement = self.session.feed_statement.take();
        // During COPY FROM STDIN the lost bytes are copy data, not a batch.
        if unseen && !self.session.copy_in {
            self.session.push_op(OpKind::Unknown, ts, statement, out);
        }
    }

    fn feed_backend(&mut self, data: &[u8], gap: u64, ts: u64, out: &mut Vec<PgEvent>) {
        self.session.last_backend_ns = ts;
        let mut pos = 0;
        if std::mem::take(&mut self.session.awaiting_tls_answer) {
            match data.first() {
                Some(b'S' | b'G') => {
                    self.session.stop(Stopped::Encrypted, ts, out);
                    return;
                }
                Some(b'N') => pos = 1,
                // The answer was not captured; the client's next bytes tell (TLS or not).
                None if gap <= 1 => return,
                // An old server answers with an ErrorResponse, framed as usual.
                _ => {}
            }
        }
        if self.back.lost {
            self.resync_backend(&data[pos..], gap, ts, out);
            return;
        }
        self.read_backend(data, pos, gap, ts, out);
    }

    /// Backend framing is lost: looks for a message start at the start of the reads kept in
    /// `carry`, oldest first, joined to this one, then of this one alone; goes on reading from
    /// there, or skips the read (and keeps it, if short and whole).
    fn resync_backend(&mut self, data: &[u8], gap: u64, ts: u64, out: &mut Vec<PgEvent>) {
        for read in 0..self.carry.count {
            let from = self.carry.reads[read].0;
            let mut joined = Vec::with_capacity(self.carry.len - from + data.len());
            joined.extend_from_slice(&self.carry.bytes[from..self.carry.len]);
            joined.extend_from_slice(data);
            let Some((start, first)) = self.session.resync_point(&joined) else {
                continue;
            };
            let carry = std::mem::take(&mut self.carry);
            let begin = from + start;
            // The kept reads before this one stay unread.
            self.session.lost_until_ns = match read.checked_sub(1) {
                Some(previous) => carry.reads[previous].1,
                None => carry.lost_before_ns,
            };
            // A tail's last byte, the transaction status, is the one before `begin`.
            let tail_ts = if begin > carry.len {
                ts
            } else {
                carry.ts_at(begin.saturating_sub(1))
            };
            self.back.resync();
            self.session.realign(&joined, start, first, tail_ts, out);
            let reread = carry.len.saturating_sub(begin);
            self.session.stats.skipped_bytes = self
                .session
                .stats
                .skipped_bytes
                .saturating_sub(reread as u64);
            for (bytes, at) in carry.reads_from(begin) {
                self.feed_backend(bytes, 0, at, out);
            }
            self.feed_backend(&data[begin.saturating_sub(carry.len)..], gap, ts, out);
            return;
        }
        if let Some((start, first)) = self.session.resync_point(data) {
            self.carry = Carry::default();
            self.back.resync();
            self.session.realign(data, start, first, ts, out);
            self.read_backend(data, start, gap, ts, out);
            return;
        }
        self.session.stats.skipped_bytes += data.len() as u64 + gap;
        if gap == 0 {
            self.carry.keep(data, ts, self.session.lost_until_ns);
        } else {
            self.carry = Carry::default();
        }
        self.session.lost_until_ns = ts;
    }

    /// Reads backend messages from `data[pos..]`, then skips `gap`.
    fn read_backend(
        &mut self,
        data: &[u8],
        mut pos: usize,
        gap: u64,
        ts: u64,
        out: &mut Vec<PgEvent>,
    ) {
        loop {
            match self.back.next(data, &mut pos, ts, Side::Backend) {
                Step::Frame(frame) => {
                    self.session.on_backend(&frame, ts, out);
                    if self.session.stopped.is_some() {
                        return;
                    }
                }
                Step::NeedMore => break,
                Step::Corrupt => {
                    self.session.stats.skipped_bytes += (data.len() - pos) as u64 + gap;
                    self.lose_backend(ts);
                    return;
                }
            }
        }
        let (frame, lost) = self.back.skip(gap);
        if let Some(frame) = frame {
            self.session.on_backend(&frame, ts, out);
        }
        if lost && self.session.stopped.is_none() {
            self.lose_backend(ts);
        }
    }

    /// Backend framing is lost in the read at `ts`.
    fn lose_backend(&mut self, ts: u64) {
        self.session.stats.desyncs += 1;
        self.back.lose();
        self.session.backend_lost = true;
        self.session.lost_until_ns = ts;
        // What was being skipped up to a ReadyForQuery is unknowable now.
        self.session.skipping = None;
    }
}

/// The most heap one statement can hold.
const STATEMENT_BOUND: usize =
    std::mem::size_of::<Statement>() + MAX_SQL_BYTES + super::fingerprint::MAX_FINGERPRINT_BYTES;
/// The most heap the strings of one query event can hold besides its statement.
const QUERY_STRINGS_BOUND: usize = 16 + 5 + MAX_ERROR_MESSAGE_BYTES + MAX_COMMAND_BYTES;

/// An upper bound of [`PgParser::heap_bytes`]: about 1.3 MiB in theory (every slot full of
/// distinct, maximal statements), a few KiB in practice.
pub const MAX_HEAP_BYTES: usize = 2 * 2 * MAX_BODY_PREFIX
    + 2 * MAX_STATEMENTS
        * (std::mem::size_of::<(Box<str>, Arc<Statement>)>() + 1 + std::mem::size_of::<Box<str>>())
    + MAX_STATEMENTS * 2 * MAX_NAME_BYTES
    + 2 * MAX_PORTALS * std::mem::size_of::<(Box<str>, Option<Arc<Statement>>)>()
    + MAX_PORTALS * MAX_NAME_BYTES
    + (MAX_STATEMENTS + MAX_PORTALS + 3 + RECENT_STATEMENTS + MAX_PENDING_OPS + MAX_AWAITING_READY)
        * STATEMENT_BOUND
    + 2 * MAX_PENDING_OPS * std::mem::size_of::<Op>()
    + 2 * MAX_AWAITING_READY * std::mem::size_of::<PgQuery>()
    + (MAX_PENDING_OPS + MAX_AWAITING_READY) * QUERY_STRINGS_BOUND
    + 3 * MAX_STARTUP_VALUE_BYTES;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Frontend,
    Backend,
}

/// One message, or its captured prefix.
struct Frame<'a> {
    /// The type byte; 0 for an untyped startup packet.
    ty: u8,
    /// The body, or the prefix of it that was captured and kept.
    body: &'a [u8],
    /// When the syscall carrying the message's first byte happened.
    start_ns: u64,
}

enum Step<'a> {
    Frame(Frame<'a>),
    NeedMore,
    Corrupt,
}

/// Message framing of one direction.
#[derive(Debug, Default)]
struct Framer {
    header: [u8; 5],
    header_len: usize,
    header_start_ns: u64,
    body: Option<Partial>,
    /// The kept prefix of a body that spans syscalls.
    buf: Vec<u8>,
    /// `buf` holds a frame already returned; cleared on the next call.
    taken: bool,
    lost: bool,
    /// The next message is an untyped startup packet (frontend, before `StartupMessage`).
    untyped: bool,
}

#[derive(Debug)]
struct Partial {
    ty: u8,
    len: u32,
    seen: u32,
    start_ns: u64,
    /// Part of the body fell in a gap: `buf` stops growing.
    gapped: bool,
    keep: bool,
}

impl Framer {
    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body.is_none()
    }

    fn lose(&mut self) {
        self.lost = true;
        self.header_len = 0;
        self.body = None;
        self.buf.clear();
        self.taken = false;
    }

    fn resync(&mut self) {
        self.lose();
        self.lost = false;
        self.untyped = false;
    }

    fn header_size(&self) -> usize {
        if self.untyped {
            4
        } else {
            5
        }
    }

    /// The type and full length of a header, if they are possible on this side.
    fn read_header(&self, header: &[u8], side: Side) -> Option<(u8, u32)> {
        if self.untyped {
            let len = be_u32(header)?;
            (8..=MAX_STARTUP_LEN).contains(&len).then_some((0, len))
        } else {
            let ty = *header.first()?;
            let len = be_u32(header.get(1..)?)?;
            header_ok(side, ty, len).then_some((ty, len))
        }
    }

    /// The next message of `data[*pos..]`, joined to what earlier syscalls left.
    fn next<'a>(&'a mut self, data: &'a [u8], pos: &mut usize, ts: u64, side: Side) -> Step<'a> {
        if self.taken {
            self.buf.clear();
            self.taken = false;
        }
        if self.body.is_none() {
            let wanted = self.header_size();
            let available = data.len() - *pos;
            let (ty, len) = if self.header_len == 0 && available >= wanted {
                let Some((ty, len)) = self.read_header(&data[*pos..*pos + wanted], side) else {
                    return Step::Corrupt;
                };
                let body_len = (len - 4) as usize;
                if available - wanted >= body_len {
                    // The whole message is here: no copy.
                    let start = *pos + wanted;
                    *pos = start + body_len;
                    return Step::Frame(Frame {
                        ty,
                        body: &data[start..start + body_len],
                        start_ns: ts,
                    });
                }
                *pos += wanted;
                self.header_start_ns = ts;
                (ty, len)
            } else {
                if available == 0 {
                    return Step::NeedMore;
                }
                if self.header_len == 0 {
                    self.header_start_ns = ts;
                }
                let n = (wanted - self.header_len).min(available);
                self.header[self.header_len..self.header_len + n]
                    .copy_from_slice(&data[*pos..*pos + n]);
                self.header_len += n;
                *pos += n;
                if self.header_len < wanted {
                    return Step::NeedMore;
                }
                self.header_len = 0;
                match self.read_header(&self.header[..wanted], side) {
                    Some(header) => header,
                    None => return Step::Corrupt,
                }
            };
            self.body = Some(Partial {
                ty,
                len: len - 4,
                seen: 0,
                start_ns: self.header_start_ns,
                gapped: false,
                keep: keeps_body(side, ty),
            });
        }
        let Some(partial) = &mut self.body else {
            return Step::NeedMore;
        };
        let n = ((partial.len - partial.seen) as usize).min(data.len() - *pos);
        if partial.keep && !partial.gapped {
            let room = MAX_BODY_PREFIX.saturating_sub(self.buf.len());
            self.buf.extend_from_slice(&data[*pos..*pos + n.min(room)]);
        }
        partial.seen += n as u32;
        *pos += n;
        if partial.seen < partial.len {
            return Step::NeedMore;
        }
        self.finish()
    }

    /// Skips `gap` bytes: the message the gap completed (its captured prefix), and whether
    /// framing was lost (the gap went past a message end).
    fn skip(&mut self, gap: u64) -> (Option<Frame<'_>>, bool) {
        if self.taken {
            self.buf.clear();
            self.taken = false;
        }
        if gap == 0 {
            return (None, false);
        }
        match &mut self.body {
            Some(partial) => {
                let remaining = u64::from(partial.len - partial.seen);
                if gap < remaining {
                    partial.seen += gap as u32;
                    partial.gapped = true;
                    return (None, false);
                }
                match self.finish() {
                    Step::Frame(frame) => (Some(frame), gap > remaining),
                    _ => (None, true),
                }
            }
            None => (None, true),
        }
    }

    fn finish(&mut self) -> Step<'_> {
        let Some(partial) = self.body.take() else {
            return Step::NeedMore;
        };
        self.taken = true;
        Step::Frame(Frame {
            ty: partial.ty,
            body: &self.buf,
            start_ns: partial.start_ns,
        })
    }
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

fn be_i32(bytes: &[u8]) -> Option<i32> {
    Some(i32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

fn be_i16(bytes: &[u8]) -> Option<i16> {
    Some(i16::from_be_bytes(bytes.get(..2)?.try_into().ok()?))
}

/// Whether a message type and length are possible on a side (lengths include themselves).
fn header_ok(side: Side, ty: u8, len: u32) -> bool {
    if !(4..=MAX_MESSAGE_LEN).contains(&len) {
        return false;
    }
    match side {
        Side::Frontend => match ty {
            b'S' | b'H' | b'X' | b'c' => len == 4,
            b'Q' | b'p' | b'f' => len >= 5,
            b'D' | b'C' => len >= 6,
            b'P' => len >= 8,
            b'E' => len >= 9,
            b'B' => len >= 12,
            b'F' => len >= 14,
            b'd' => true,
            _ => false,
        },
        Side::Backend => match ty {
            b'1' | b'2' | b'3' | b'n' | b'I' | b's' | b'c' => len == 4,
            b'Z' => len == 5,
            b'R' | b'K' | b'v' => len >= 8,
            b'C' | b'E' | b'N' => len >= 5,
            b'S' | b'D' | b'T' | b't' | b'V' => len >= 6,
            b'G' | b'H' | b'W' => len >= 7,
            b'A' => len >= 10,
            b'd' => true,
            _ => false,
        },
    }
}

/// Whether the body of a message is worth keeping when it spans syscalls.
fn keeps_body(side: Side, ty: u8) -> bool {
    match side {
        Side::Frontend => matches!(ty, 0 | b'Q' | b'P' | b'B' | b'E' | b'C'),
        Side::Backend => matches!(ty, b'R' | b'C' | b'E' | b'Z'),
    }
}

/// Whether a syscall starts at a message boundary: every header it holds is possible (and,
/// from the server, of a size the server sends), every body it holds whole checks out, and so
/// does the captured start of a body that goes on past the capture.
fn plausible(data: &[u8], side: Side) -> bool {
    if data.len() < 5 {
        return false;
    }
    // Only at startup (authentication, key data, protocol negotiation) or inside a COPY's
    // data: not where a server's answer starts.
    if side == Side::Backend && matches!(data[0], b'R' | b'K' | b'v' | b'd' | b'c') {
        return false;
    }
    let mut pos = 0;
    while data.len() - pos >= 5 {
        let ty = data[pos];
        let Some(len) = be_u32(&data[pos + 1..]) else {
            return false;
        };
        if !header_ok(side, ty, len) || (side == Side::Backend && len > max_backend_len(ty)) {
            return false;
        }
        let end = pos + 1 + len as usize;
        let Some(body) = data.get(pos + 5..end) else {
            return body_prefix_ok(side, ty, &data[pos + 5..], len - 4);
        };
        if !body_ok(side, ty, body) {
            return false;
        }
        pos = end;
    }
    true
}

/// The longest message of a type that a read resynchronising after a loss may start with. A
/// length read from the middle of other data (the text of a row or a command tag) is most
/// often far larger, so this tells most false message starts apart: command tags are short,
/// and a row, error or description of more than 1 MiB is rare enough that waiting for the
/// next boundary (the start of the next answer) is the better bet.
fn max_backend_len(ty: u8) -> u32 {
    match ty {
        b'C' => 4 + 256,
        // A process id, a channel name and a payload of at most 8000 bytes.
        b'A' => 4 + 4 + 8 * 1024 + 256,
        _ => 1 << 20,
    }
}

/// Where messages may start in `data`, a read while the backend framing is lost: at its
/// start, or after the end of a `ReadyForQuery` that it starts with.
fn message_starts(data: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let at_start = plausible(data, Side::Backend).then_some(0);
    at_start
        .into_iter()
        .chain((1..=5).rev().filter(|&len| ready_tail(data, len)))
}

/// The most bytes of short backend reads kept while the framing is lost (see [`Carry`]).
const CARRY_BYTES: usize = 16;

/// Short, whole backend reads kept while the framing is lost. A client whose read buffer has
/// little room left reads the start of an answer in pieces too short to tell a message start
/// by (the last bytes of a `ReadyForQuery`, the first of a header); joined to the reads that
/// follow, they tell. Fixed size: no heap.
#[derive(Debug, Default)]
struct Carry {
    bytes: [u8; CARRY_BYTES],
    len: usize,
    /// Where each kept read starts in `bytes`, and when it happened, oldest first.
    reads: [(usize, u64); CARRY_BYTES],
    count: usize,
    /// The session's `lost_until_ns` before the oldest kept read.
    lost_before_ns: u64,
}

impl Carry {
    /// Keeps a read, forgetting the oldest ones to make room; a read too long to keep (it was
    /// judged by itself) forgets them all.
    fn keep(&mut self, data: &[u8], ts: u64, lost_until_ns: u64) {
        if data.is_empty() {
            return;
        }
        if data.len() > CARRY_BYTES {
            *self = Self::default();
            return;
        }
        if self.count == 0 {
            self.lost_before_ns = lost_until_ns;
        }
        while self.count > 0 && (self.len + data.len() > CARRY_BYTES || self.count == CARRY_BYTES) {
            let dropped = if self.count > 1 {
                self.reads[1].0
            } else {
                self.len
            };
            self.lost_before_ns = self.reads[0].1;
            self.bytes.copy_within(dropped..self.len, 0);
            self.len -= dropped;
            self.reads.copy_within(1..self.count, 0);
            self.count -= 1;
            for read in &mut self.reads[..self.count] {
                read.0 -= dropped;
            }
        }
        self.bytes[self.len..self.len + data.len()].copy_from_slice(data);
        self.reads[self.count] = (self.len, ts);
        self.len += data.len();
        self.count += 1;
    }

    /// When the read holding byte `at` happened.
    fn ts_at(&self, at: usize) -> u64 {
        self.reads[..self.count]
            .iter()
            .rev()
            .find(|read| read.0 <= at)
            .map_or(0, |read| read.1)
    }

    /// The kept bytes from `begin` on, read by read, with their times.
    fn reads_from(&self, begin: usize) -> impl Iterator<Item = (&[u8], u64)> {
        (0..self.count).filter_map(move |i| {
            let (start, ts) = self.reads[i];
            let end = self
                .reads
                .get(i + 1)
                .filter(|_| i + 1 < self.count)
                .map_or(self.len, |next| next.0);
            let start = start.max(begin);
            (start < end).then(|| (&self.bytes[start..end], ts))
        })
    }
}

/// Whether `data` starts with the last `len` (1 to 5) bytes of a `ReadyForQuery`, then a
/// plausible chain of messages. A client that read an answer up to its completion may send
/// its next query before it reads the rest, so the end of that answer's `ReadyForQuery`
/// starts the next read.
fn ready_tail(data: &[u8], len: usize) -> bool {
    const READY: [u8; 5] = [b'Z', 0, 0, 0, 5];
    (1..=5).contains(&len)
        && data.len() > len
        && data[..len - 1] == READY[6 - len..]
        && TxStatus::from_byte(data[len - 1]).is_some()
        && plausible(&data[len..], Side::Backend)
}

/// Whether the captured start of a body of `body_len` bytes checks out, as far as it goes
/// (all of the body when `prefix.len() == body_len`; [`body_ok`] checks more then).
fn body_prefix_ok(side: Side, ty: u8, prefix: &[u8], body_len: u32) -> bool {
    let body_len = body_len as usize;
    // A count of fields that makes the body exactly `fixed + count * each` bytes.
    let sized = |count: Option<i16>, fixed: usize, each: usize| {
        count.is_none_or(|n| n >= 0 && fixed + n as usize * each == body_len)
    };
    match (side, ty) {
        (Side::Backend, b'D') => data_row_prefix_ok(prefix, body_len),
        (Side::Backend, b'E' | b'N') => fields_prefix_ok(prefix, body_len),
        (Side::Backend, b'S') => parameter_name_ok(prefix),
        (Side::Backend, b'T') => row_description_prefix_ok(prefix, body_len),
        (Side::Backend, b't') => sized(be_i16(prefix), 2, 4),
        // Copy responses: the overall format (0 text, 1 binary), then one per column.
        (Side::Backend, b'G' | b'H' | b'W') => {
            prefix.first().is_none_or(|format| *format <= 1)
                && sized(prefix.get(1..).and_then(be_i16), 3, 2)
        }
        (Side::Backend, b'V') => {
            be_i32(prefix).is_none_or(|n| n >= -1 && 4 + n.max(0) as usize == body_len)
        }
        (Side::Backend, b'R') => be_u32(prefix).is_none_or(|code| code <= 12),
        (Side::Backend, b'Z') => prefix
            .first()
            .is_none_or(|status| TxStatus::from_byte(*status).is_some()),
        _ => true,
    }
}

/// A `ParameterStatus` body starts with a parameter's name: a letter, then letters, digits,
/// `_` or `.` up to its terminator.
fn parameter_name_ok(prefix: &[u8]) -> bool {
    let name = find_byte(0, prefix).map_or(prefix, |end| &prefix[..end]);
    prefix.first().is_none_or(u8::is_ascii_alphabetic)
        && name
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.'))
}

fn body_ok(side: Side, ty: u8, body: &[u8]) -> bool {
    if side == Side::Backend && !body_prefix_ok(side, ty, body, body.len() as u32) {
        return false;
    }
    let nul_terminated = body.last() == Some(&0);
    #[expect(
        clippy::naive_bytecount,
        reason = "a few bytes of one message, once per resync"
    )]
    let nuls = |bytes: &[u8]| bytes.iter().filter(|b| **b == 0).count();
    match (side, ty) {
        (Side::Frontend, b'Q') | (Side::Backend, b'C') => nul_terminated,
        (Side::Frontend, b'P' | b'B') => nuls(body) >= 2,
        (Side::Frontend, b'E') => find_byte(0, body).is_some_and(|at| body.len() == at + 5),
        (Side::Frontend, b'D' | b'C') => {
            matches!(body.first(), Some(b'S' | b'P')) && nul_terminated
        }
        (Side::Backend, b'E' | b'N') => fields_ok(body),
        (Side::Backend, b'S') => nul_terminated && nuls(body) == 2,
        // A process id, then the channel and the payload.
        (Side::Backend, b'A') => {
            nul_terminated && body.get(4..).is_some_and(|strings| nuls(strings) == 2)
        }
        (Side::Backend, b'D') => data_row_ok(body),
        (Side::Backend, b'V') => body.len() >= 4,
        _ => true,
    }
}

/// A `DataRow` whose column lengths add up to its body.
fn data_row_ok(body: &[u8]) -> bool {
    let Some(columns) = be_i16(body) else {
        return false;
    };
    if columns < 0 {
        return false;
    }
    let mut pos = 2usize;
    for _ in 0..columns {
        let Some(len) = body.get(pos..).and_then(be_i32) else {
            return false;
        };
        pos += 4;
        match len {
            -1 => {}
            len if len >= 0 => pos += len as usize,
            _ => return false,
        }
        if pos > body.len() {
            return false;
        }
    }
    pos == body.len()
}

/// The captured start of a `DataRow` that goes on past the capture: the column lengths it
/// holds fit in the body, and add up to it when all of them were captured.
fn data_row_prefix_ok(prefix: &[u8], body_len: usize) -> bool {
    let Some(columns) = be_i16(prefix) else {
        return true;
    };
    if columns < 0 {
        return false;
    }
    let mut pos = 2usize;
    for _ in 0..columns {
        let Some(len) = prefix.get(pos..).and_then(be_i32) else {
            return true;
        };
        pos += 4;
        match len {
            -1 => {}
            len if len >= 0 => pos += len as usize,
            _ => return false,
        }
        if pos > body_len {
            return false;
        }
    }
    pos == body_len
}

/// The start of a `RowDescription`: a count of fields, each a name then 18 bytes that end
/// with its format (0 text, 1 binary); the fields add up to the body when all were captured.
fn row_description_prefix_ok(prefix: &[u8], body_len: usize) -> bool {
    let Some(count) = be_i16(prefix) else {
        return true;
    };
    if count < 0 || 2 + count as usize * 19 > body_len {
        return false;
    }
    let mut pos = 2usize;
    for _ in 0..count {
        let Some(name) = prefix.get(pos..).and_then(|rest| find_byte(0, rest)) else {
            return true;
        };
        pos += name + 1 + 18;
        if pos > body_len {
            return false;
        }
        match prefix.get(pos - 2..pos) {
            Some([0, 0 | 1]) => {}
            Some(_) => return false,
            None => return true,
        }
    }
    pos == body_len
}

/// The fields of an `ErrorResponse` or `NoticeResponse`: a letter and a string each, then a
/// zero byte that ends the body.
fn fields_ok(body: &[u8]) -> bool {
    let mut pos = 0;
    loop {
        match body.get(pos) {
            Some(0) => return pos + 1 == body.len(),
            Some(code) if code.is_ascii_alphabetic() => match find_byte(0, &body[pos + 1..]) {
                Some(at) => pos += at + 2,
                None => return false,
            },
            _ => return false,
        }
    }
}

/// The captured start of error or notice fields, in a body of `body_len` bytes.
fn fields_prefix_ok(prefix: &[u8], body_len: usize) -> bool {
    let mut pos = 0;
    while let Some(code) = prefix.get(pos) {
        if *code == 0 {
            return pos + 1 == body_len;
        }
        if !code.is_ascii_alphabetic() {
            return false;
        }
        match find_byte(0, &prefix[pos + 1..]) {
            Some(at) => pos += at + 2,
            None => return true,
        }
    }
    true
}

/// The most messages of a resynchronised read that [`fits`] checks.
const MAX_ALIGN_MESSAGES: usize = 64;

/// The types of the messages whose headers `data` holds, in `types` (as many as fit); how
/// many.
fn message_types(data: &[u8], types: &mut [u8]) -> usize {
    let mut count = 0;
    let mut pos = 0usize;
    while count < types.len() && data.len().saturating_sub(pos) >= 5 {
        let Some(len) = be_u32(&data[pos + 1..]) else {
            break;
        };
        types[count] = data[pos];
        count += 1;
        pos = pos.saturating_add(1).saturating_add(len as usize);
    }
    count
}

/// What a backend message does to the waiting message it answers.
enum Fit {
    /// It answers it in part; more follows.
    Stays,
    /// It ends its answer.
    Advances,
    /// An error in the extended protocol: the server skips to the batch's `Sync`.
    Skips,
    /// It cannot answer it.
    No,
}

/// Whether backend messages of `types` can answer the waiting messages from `ops[start]` on,
/// in order: each message answers the first waiting one, as the server answers them. `mid`:
/// the answer to `ops[start]` may have begun in bytes that were not read. Asynchronous
/// messages (notices, parameter statuses, notifications) fit anywhere.
fn fits(ops: &VecDeque<Op>, start: usize, mid: bool, types: &[u8]) -> bool {
    let mut at = start;
    // Of a simple query's current statement: its RowDescription came (rows may follow); a
    // completion came (its ReadyForQuery may follow). Of a query: a COPY started (copy data
    // may follow).
    let (mut described, mut completed, mut copying) = (mid, mid, mid);
    for &ty in types {
        if matches!(ty, b'N' | b'S' | b'A') {
            continue;
        }
        let Some(op) = ops.get(at) else {
            return false;
        };
        let fit = match (op.kind, ty) {
            (
                OpKind::Parse | OpKind::Bind | OpKind::Describe | OpKind::Execute | OpKind::Close,
                b'E',
            ) => Fit::Skips,
            (OpKind::Parse, b'1')
            | (OpKind::Bind, b'2')
            | (OpKind::Close, b'3')
            | (OpKind::Describe, b'T' | b'n')
            | (OpKind::Execute, b'C' | b'I' | b's')
            | (OpKind::Sync | OpKind::Function | OpKind::Unknown, b'Z') => Fit::Advances,
            (OpKind::Simple, b'Z') if completed => Fit::Advances,
            (OpKind::Simple, b'T') => {
                described = true;
                Fit::Stays
            }
            (OpKind::Simple, b'D') if described => Fit::Stays,
            (OpKind::Simple, b'C' | b'I' | b'E') => {
                (described, completed, copying) = (false, true, false);
                Fit::Stays
            }
            (OpKind::Execute | OpKind::Simple, b'G' | b'H' | b'W') => {
                copying = true;
                Fit::Stays
            }
            (OpKind::Execute | OpKind::Simple, b'd' | b'c') if copying => Fit::Stays,
            (OpKind::Describe, b't')
            | (OpKind::Execute, b'D')
            | (OpKind::Sync | OpKind::Function, b'E')
            | (OpKind::Function, b'V')
            | (OpKind::Unknown, _) => Fit::Stays,
            _ => Fit::No,
        };
        match fit {
            Fit::Stays => {}
            Fit::Advances => {
                at += 1;
                (described, completed, copying) = (false, false, false);
            }
            Fit::Skips => {
                at = (at..ops.len())
                    .find(|&i| ops[i].kind.ends_batch())
                    .unwrap_or(ops.len());
            }
            Fit::No => return false,
        }
    }
    true
}

/// A NUL-terminated string at `*pos` (the rest when the terminator is missing).
fn cstr<'a>(body: &'a [u8], pos: &mut usize) -> (&'a [u8], bool) {
    let rest = body.get(*pos..).unwrap_or_default();
    if let Some(end) = find_byte(0, rest) {
        *pos += end + 1;
        (&rest[..end], true)
    } else {
        *pos = body.len();
        (rest, false)
    }
}

fn name_of(bytes: &[u8]) -> Box<str> {
    text_capped(bytes, MAX_NAME_BYTES).into_boxed_str()
}

fn new_statement(sql: &[u8], cut: bool) -> Arc<Statement> {
    let truncated = cut || sql.len() > MAX_SQL_BYTES;
    let sql = text_capped(sql, MAX_SQL_BYTES);
    let fingerprint = fingerprint(&sql).into_boxed_str();
    Arc::new(Statement {
        sql: sql.into_boxed_str(),
        fingerprint,
        truncated,
    })
}

/// The last few statements built, so a text that repeats (`SELECT 1`, `BEGIN`, a query
/// without inline literals) is not fingerprinted again.
#[derive(Debug, Default)]
struct Recent {
    slots: [Option<Arc<Statement>>; RECENT_STATEMENTS],
    next: usize,
}

const RECENT_STATEMENTS: usize = 4;

impl Recent {
    fn statement(&mut self, sql: &[u8], cut: bool) -> Arc<Statement> {
        if !cut {
            let hit = self
                .slots
                .iter()
                .flatten()
                .find(|s| !s.truncated && s.sql.as_bytes() == sql);
            if let Some(statement) = hit {
                return statement.clone();
            }
        }
        let statement = new_statement(sql, cut);
        self.slots[self.next] = Some(statement.clone());
        self.next = (self.next + 1) % RECENT_STATEMENTS;
        statement
    }
}

fn parse_error(body: &[u8]) -> PgError {
    let mut error = PgError {
        severity: String::new(),
        sqlstate: String::new(),
        message: String::new(),
    };
    let mut localized_severity = String::new();
    let mut pos = 0;
    while let Some(&code) = body.get(pos) {
        if code == 0 {
            break;
        }
        pos += 1;
        let (value, _) = cstr(body, &mut pos);
        match code {
            b'S' => localized_severity = text_capped(value, 16),
            b'V' => error.severity = text_capped(value, 16),
            b'C' => error.sqlstate = text_capped(value, 5),
            b'M' => error.message = text_capped(value, MAX_ERROR_MESSAGE_BYTES),
            _ => {}
        }
    }
    if error.severity.is_empty() {
        error.severity = localized_severity;
    }
    error
}

/// A `CommandComplete` tag: the command without counts, and the row count if it has one.
fn command_tag(tag: &[u8]) -> (Cow<'static, str>, Option<u64>) {
    let tag = tag.strip_suffix(&[0]).unwrap_or(tag);
    let mut words = tag.split(|b| *b == b' ');
    let first = words.next().unwrap_or_default();
    let counted = matches!(
        first,
        b"SELECT" | b"INSERT" | b"UPDATE" | b"DELETE" | b"MERGE" | b"FETCH" | b"MOVE" | b"COPY"
    );
    if counted {
        let rows = tag
            .rsplit(|b| *b == b' ')
            .next()
            .filter(|n| !n.is_empty() && n.len() <= 19 && n.iter().all(u8::is_ascii_digit))
            .map(|n| n.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0')));
        if let Some(command) = interned(first) {
            return (Cow::Borrowed(command), rows);
        }
    }
    match interned(tag) {
        Some(command) => (Cow::Borrowed(command), None),
        None => (Cow::Owned(text_capped(tag, MAX_COMMAND_BYTES)), None),
    }
}

fn interned(command: &[u8]) -> Option<&'static str> {
    const COMMON: &[&str] = &[
        "SELECT",
        "INSERT",
        "UPDATE",
        "DELETE",
        "MERGE",
        "FETCH",
        "MOVE",
        "COPY",
        "BEGIN",
        "COMMIT",
        "ROLLBACK",
        "SET",
        "SHOW",
        "SAVEPOINT",
        "RELEASE",
        "LOCK TABLE",
        "DISCARD ALL",
        "DEALLOCATE",
        "DEALLOCATE ALL",
        "LISTEN",
        "NOTIFY",
        "UNLISTEN",
        "TRUNCATE TABLE",
        "ANALYZE",
        "VACUUM",
        "CREATE TABLE",
        "CREATE INDEX",
        "DROP TABLE",
        "ALTER TABLE",
        "DECLARE CURSOR",
        "CLOSE CURSOR",
        "RESET",
        "PREPARE TRANSACTION",
        "COMMIT PREPARED",
    ];
    COMMON.iter().copied().find(|c| c.as_bytes() == command)
}

/// Why responses are ignored up to the next `ReadyForQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    /// The oldest batch failed (or its answers did not fit): that `ReadyForQuery` ends it.
    Batch,
    /// The answers are to messages the parser never saw: that `ReadyForQuery` is theirs,
    /// and the waiting messages stay.
    Unseen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Phase {
    /// The parser joined an established connection.
    #[default]
    Unknown,
    /// Before `StartupMessage`: SSL/GSS negotiation.
    Negotiating,
    /// `StartupMessage` sent, not authenticated yet.
    Startup,
    /// `AuthenticationOk` received, no `ReadyForQuery` yet.
    Authenticated,
    /// A `ReadyForQuery` was received.
    Ready,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    Parse,
    Bind,
    Describe,
    Close,
    Execute,
    Sync,
    Simple,
    Function,
    /// Frontend bytes that could not be read: assumed to end with a `Sync`.
    Unknown,
}

impl OpKind {
    /// Answered by a `ReadyForQuery`.
    fn ends_batch(self) -> bool {
        matches!(
            self,
            Self::Sync | Self::Simple | Self::Function | Self::Unknown
        )
    }

    /// Reports queries.
    fn is_query(self) -> bool {
        matches!(self, Self::Execute | Self::Simple | Self::Unknown)
    }
}

/// A frontend message waiting for its answer.
#[derive(Debug)]
struct Op {
    kind: OpKind,
    start_ns: u64,
    statement: Option<Arc<Statement>>,
    /// Rows of finished statements (simple protocol).
    rows: u64,
    /// `DataRow`s since the last `CommandComplete`.
    data_rows: u64,
    command: Option<Cow<'static, str>>,
    error: Option<PgError>,
    completion: Option<Completion>,
    /// An unseen batch reported a query already.
    produced: bool,
    /// An unseen batch got a `DataRow`: it held a query (a `RowDescription` may answer a
    /// `Describe`).
    results: bool,
    /// When the last completion of a simple query arrived: its end if the connection closes
    /// before the `ReadyForQuery` does.
    answered_ns: Option<u64>,
    /// The client sent a later batch while the backend bytes could not be read: the last
    /// backend syscall before it, where this op's answer ended if it was in those bytes.
    end_hint: Option<u64>,
}

/// Named statements, bounded, the oldest forgotten first. A fixed hasher keeps the parser
/// free of hidden randomness.
#[derive(Debug, Default)]
struct Statements {
    map: HashMap<Box<str>, Arc<Statement>, BuildHasherDefault<DefaultHasher>>,
    order: VecDeque<Box<str>>,
}

impl Statements {
    fn insert(&mut self, name: Box<str>, statement: Arc<Statement>) {
        if let Some(slot) = self.map.get_mut(&name) {
            *slot = statement;
            return;
        }
        while self.map.len() >= MAX_STATEMENTS {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.map.remove(&oldest);
                }
                None => self.map.clear(),
            }
        }
        self.order.push_back(name.clone());
        self.map.insert(name, statement);
    }

    fn remove(&mut self, name: &str) {
        if self.map.remove(name).is_some() {
            self.order.retain(|n| &**n != name);
        }
    }
}

#[derive(Debug, Default)]
struct Session {
    phase: Phase,
    startup: StartupInfo,
    stopped: Option<Stopped>,
    awaiting_tls_answer: bool,
    statements: Statements,
    unnamed_statement: Option<Arc<Statement>>,
    portals: Vec<(Box<str>, Option<Arc<Statement>>)>,
    unnamed_portal: Option<Arc<Statement>>,
    ops: VecDeque<Op>,
    /// Completed queries waiting for a `ReadyForQuery`.
    awaiting: Vec<PgQuery>,
    /// Ignore responses up to the next `ReadyForQuery`, and why.
    skipping: Option<Skip>,
    /// The last `ReadyForQuery`: status and when.
    ready: Option<(TxStatus, u64)>,
    last_backend_ns: u64,
    /// Backend framing was lost and no message has been read since.
    backend_lost: bool,
    /// The last backend syscall whose bytes could not be read (framing lost in it, or
    /// skipped while lost): messages sent after it have their whole answer ahead.
    lost_until_ns: u64,
    /// The statement last named (by `Parse` or `Bind`) in the current frontend syscall.
    feed_statement: Option<Arc<Statement>>,
    /// Between a `CopyInResponse` and the end of the copy: the client sends data.
    copy_in: bool,
    recent: Recent,
    stats: PgStats,
}

impl Session {
    fn stop(&mut self, why: Stopped, ts_ns: u64, out: &mut Vec<PgEvent>) {
        self.stopped = Some(why);
        out.push(match why {
            Stopped::Encrypted => PgEvent::Encrypted { ts_ns },
            Stopped::Cancel => PgEvent::Cancel { ts_ns },
        });
    }

    fn on_frontend(&mut self, frame: &Frame<'_>, out: &mut Vec<PgEvent>) {
        let ts = frame.start_ns;
        let body = frame.body;
        let mut pos = 0;
        match frame.ty {
            0 => self.on_startup_packet(frame, out),
            b'Q' => {
                let (sql, terminated) = cstr(body, &mut pos);
                let statement = self.recent.statement(sql, !terminated);
                self.push_op(OpKind::Simple, ts, Some(statement), out);
            }
            b'P' => {
                let (name, _) = cstr(body, &mut pos);
                let name = name_of(name);
                let (sql, terminated) = cstr(body, &mut pos);
                let statement = self.recent.statement(sql, !terminated);
                if name.is_empty() {
                    self.unnamed_statement = Some(statement.clone());
                } else {
                    self.statements.insert(name, statement.clone());
                }
                self.feed_statement = Some(statement.clone());
                self.push_op(OpKind::Parse, ts, Some(statement), out);
            }
            b'B' => {
                let (portal, _) = cstr(body, &mut pos);
                let portal = name_of(portal);
                let (name, _) = cstr(body, &mut pos);
                let statement = if name.is_empty() {
                    self.unnamed_statement.clone()
                } else {
                    self.statements.map.get(&*name_of(name)).cloned()
                };
                if portal.is_empty() {
                    self.unnamed_portal.clone_from(&statement);
                } else {
                    self.portals.retain(|(n, _)| *n != portal);
                    if self.portals.len() >= MAX_PORTALS {
                        self.portals.remove(0);
                    }
                    self.portals.push((portal, statement.clone()));
                }
                if statement.is_some() {
                    self.feed_statement.clone_from(&statement);
                }
                self.push_op(OpKind::Bind, ts, statement, out);
            }
            b'E' => {
                let (portal, _) = cstr(body, &mut pos);
                let statement = if portal.is_empty() {
                    self.unnamed_portal.clone()
                } else {
                    let portal = name_of(portal);
                    self.portals
                        .iter()
                        .find(|(n, _)| *n == portal)
                        .and_then(|(_, s)| s.clone())
                };
                self.push_op(OpKind::Execute, ts, statement, out);
            }
            b'D' => self.push_op(OpKind::Describe, ts, None, out),
            b'C' => {
                let kind = body.first().copied();
                pos = 1;
                let (name, _) = cstr(body, &mut pos);
                match (kind, name.is_empty()) {
                    (Some(b'S'), true) => self.unnamed_statement = None,
                    (Some(b'S'), false) => self.statements.remove(&name_of(name)),
                    (Some(b'P'), true) => self.unnamed_portal = None,
                    (Some(b'P'), false) => {
                        let name = name_of(name);
                        self.portals.retain(|(n, _)| *n != name);
                    }
                    _ => {}
                }
                self.push_op(OpKind::Close, ts, None, out);
            }
            b'S' => self.push_op(OpKind::Sync, ts, None, out),
            b'F' => self.push_op(OpKind::Function, ts, None, out),
            b'c' | b'f' => self.copy_in = false,
            // Flush, Terminate, COPY data/done/fail, password and SASL messages.
            _ => {}
        }
    }

    fn on_startup_packet(&mut self, frame: &Frame<'_>, out: &mut Vec<PgEvent>) {
        let code = be_u32(frame.body).unwrap_or(0);
        match code {
            SSL_REQUEST | GSSENC_REQUEST => {
                self.phase = Phase::Negotiating;
                self.awaiting_tls_answer = true;
            }
            CANCEL_REQUEST => self.stop(Stopped::Cancel, frame.start_ns, out),
            code if code >> 16 == 3 => {
                self.phase = Phase::Startup;
                let mut pos = 4;
                loop {
                    let (key, _) = cstr(frame.body, &mut pos);
                    if key.is_empty() {
                        break;
                    }
                    let (value, _) = cstr(frame.body, &mut pos);
                    let value = Some(text_capped(value, MAX_STARTUP_VALUE_BYTES));
                    match key {
                        b"user" => self.startup.user = value,
                        b"database" => self.startup.database = value,
                        b"application_name" => self.startup.application_name = value,
                        _ => {}
                    }
                }
            }
            // Not a startup packet after all: typed messages of a connection joined mid-way.
            _ => self.phase = Phase::Unknown,
        }
    }

    fn push_op(
        &mut self,
        kind: OpKind,
        start_ns: u64,
        statement: Option<Arc<Statement>>,
        out: &mut Vec<PgEvent>,
    ) {
        if self.backend_lost && self.ops.back().is_none_or(|op| op.kind.ends_batch()) {
            // A new batch while the answers to the earlier ones were not readable: a client
            // that does not pipeline has read them. Whether it did is settled when the backend
            // resynchronises (see `realign`); until then, remember where they would have ended.
            let end_ns = self.last_backend_ns;
            for op in self
                .ops
                .iter_mut()
                .rev()
                .take_while(|op| op.end_hint.is_none())
            {
                op.end_hint = Some(end_ns);
            }
        }
        if self.ops.len() >= MAX_PENDING_OPS && self.backend_lost {
            // The answers stay unreadable: report what waits as answered in them.
            self.infer_completed(out);
        }
        if self.ops.len() >= MAX_PENDING_OPS {
            let dropped = self
                .ops
                .iter()
                .filter(|op| op.kind.is_query() && !op.produced)
                .count();
            self.stats.dropped += dropped as u64;
            self.ops.clear();
            self.skipping = Some(Skip::Unseen);
        }
        self.ops.push_back(Op {
            kind,
            start_ns,
            statement,
            rows: 0,
            data_rows: 0,
            command: None,
            error: None,
            completion: None,
            produced: false,
            results: false,
            answered_ns: None,
            end_hint: None,
        });
    }

    /// Reports every waiting query as answered in bytes that could not be read, ending where
    /// the client moved on, else at the last backend syscall.
    fn infer_completed(&mut self, out: &mut Vec<PgEvent>) {
        self.infer_prefix(self.ops.len(), self.last_backend_ns, out);
        self.flush_awaiting(None, out);
        self.ready = None;
        self.skipping = None;
    }

    /// Reports the first `count` waiting messages as answered in bytes that could not be
    /// read: their queries end at their end hint, else at `default_end_ns`, and each batch end
    /// among them flushes the queries waiting for its (unread) `ReadyForQuery`.
    fn infer_prefix(&mut self, count: usize, default_end_ns: u64, out: &mut Vec<PgEvent>) {
        for _ in 0..count {
            let Some(op) = self.ops.pop_front() else {
                break;
            };
            let ends_batch = op.kind.ends_batch();
            // An unseen batch is a query only if its answers showed one.
            let query =
                op.kind.is_query() && !op.produced && (op.kind != OpKind::Unknown || op.results);
            if query {
                let completion = op.completion.unwrap_or(Completion::Inferred);
                if completion == Completion::Inferred {
                    self.stats.inferred += 1;
                }
                let end_ns = op.end_hint.unwrap_or(default_end_ns);
                let query = query_of(op, end_ns, completion);
                self.complete(query, out);
            }
            if ends_batch {
                self.flush_awaiting(None, out);
            }
        }
    }

    /// The connection closed with the backend in sync: a simple query whose last statement
    /// completed is reported (ended there, without status); a query with no answer at all is
    /// dropped, counted.
    fn finish_answered(&mut self, out: &mut Vec<PgEvent>) {
        while let Some(op) = self.ops.pop_front() {
            match (op.kind, op.answered_ns, op.completion) {
                (OpKind::Simple, Some(end_ns), Some(completion)) => {
                    let query = query_of(op, end_ns, completion);
                    self.complete(query, out);
                }
                // An unseen batch held a query only if its answers showed one.
                (kind, ..)
                    if kind.is_query()
                        && !op.produced
                        && (kind != OpKind::Unknown || op.results) =>
                {
                    self.stats.dropped += 1;
                }
                _ => {}
            }
        }
    }

    /// Where the backend can resynchronise in `data`, a read after a loss: the offset of the
    /// first message (after the end of a `ReadyForQuery`, or 0), and the index of the first
    /// waiting message that the read answers (see [`Session::alignment`]). `None` when the
    /// read does not start at a message, or its messages fit no waiting ones: the client's
    /// next message will give a better start.
    fn resync_point(&self, data: &[u8]) -> Option<(usize, usize)> {
        message_starts(data).find_map(|tail| {
            let mut types = [0u8; MAX_ALIGN_MESSAGES];
            let mut count = 0;
            if tail > 0 {
                types[0] = b'Z';
                count = 1;
            }
            count += message_types(&data[tail..], &mut types[count..]);
            self.alignment(&types[..count]).map(|first| (tail, first))
        })
    }

    /// The backend resynchronises on the read `data` after a loss, after the `tail` last bytes
    /// of a `ReadyForQuery` (or at its start), the read answering `ops[first]` first: reports
    /// the waiting messages before it as answered in the unread bytes (see the module
    /// documentation).
    fn realign(&mut self, data: &[u8], tail: usize, first: usize, ts: u64, out: &mut Vec<PgEvent>) {
        self.infer_prefix(first, self.lost_until_ns, out);
        if self.ops.is_empty() {
            self.flush_awaiting(None, out);
        }
        if first > 0 {
            self.ready = None;
        }
        self.skipping = None;
        if tail > 0 {
            // The tail's last byte is the transaction status.
            let frame = Frame {
                ty: b'Z',
                body: &data[tail - 1..tail],
                start_ns: ts,
            };
            self.on_backend(&frame, ts, out);
        }
    }

    /// The index of the first waiting message that a resynchronised read answering `types`
    /// starts on (see the module documentation). Every batch sent after the last unread
    /// backend bytes is answered whole ahead; the earlier (*stale*) ones may have been
    /// answered in those bytes, entirely or in part. Preferred, in order: the read starts
    /// the first later batch's answer (the stale ones were all answered, as when a client
    /// reads every answer before sending again); else it goes on with the latest stale
    /// message it fits. `None` when nothing fits.
    fn alignment(&self, types: &[u8]) -> Option<usize> {
        let fresh = self
            .ops
            .iter()
            .position(|op| op.start_ns > self.lost_until_ns)
            .unwrap_or(self.ops.len());
        // The first fresh batch starts at `fresh` only if a stale batch ended just before.
        let first_fresh = (fresh..=self.ops.len())
            .find(|&at| at == 0 || self.ops[at - 1].kind.ends_batch())
            .unwrap_or(self.ops.len());
        if fits(&self.ops, first_fresh, false, types) {
            return Some(first_fresh);
        }
        (0..first_fresh)
            .rev()
            .find(|&at| fits(&self.ops, at, true, types))
    }

    fn flush_awaiting(&mut self, tx_status: Option<TxStatus>, out: &mut Vec<PgEvent>) {
        for mut query in self.awaiting.drain(..) {
            query.tx_status = tx_status;
            self.stats.queries += 1;
            out.push(PgEvent::Query(query));
        }
    }

    fn complete(&mut self, query: PgQuery, out: &mut Vec<PgEvent>) {
        if self.awaiting.len() >= MAX_AWAITING_READY {
            self.flush_awaiting(None, out);
        }
        self.awaiting.push(query);
    }

    fn on_backend(&mut self, frame: &Frame<'_>, ts: u64, out: &mut Vec<PgEvent>) {
        self.backend_lost = false;
        let body = frame.body;
        match frame.ty {
            b'R' if be_u32(body) == Some(0) => {
                if matches!(self.phase, Phase::Startup | Phase::Negotiating) {
                    self.phase = Phase::Authenticated;
                }
                out.push(PgEvent::Authenticated {
                    ts_ns: ts,
                    startup: self.startup.clone(),
                });
            }
            b'E' if matches!(
                self.phase,
                Phase::Startup | Phase::Authenticated | Phase::Negotiating
            ) =>
            {
                out.push(PgEvent::AuthFailed {
                    ts_ns: ts,
                    startup: self.startup.clone(),
                    error: parse_error(body),
                });
            }
            b'Z' => {
                self.copy_in = false;
                self.on_ready(body.first().copied().and_then(TxStatus::from_byte), ts, out);
            }
            b'G' => self.copy_in = true,
            b'1' | b'2' | b'3' | b't' | b'n' | b'T' | b'D' | b'C' | b'I' | b's' | b'E' => {
                self.on_response(frame.ty, body, ts, out);
            }
            // COPY responses and data, function results, notices, parameter statuses, key
            // data, notifications, protocol negotiation.
            _ => {}
        }
    }

    /// A response that answers the oldest waiting frontend message.
    fn on_response(&mut self, ty: u8, body: &[u8], ts: u64, out: &mut Vec<PgEvent>) {
        if matches!(ty, b'C' | b'E') {
            self.copy_in = false;
        }
        if self.skipping.is_some() {
            return;
        }
        if self.ops.front().is_none_or(|op| op.start_ns > ts) {
            // Nothing waits, or what waits was sent after this answer began: it answers
            // messages the parser did not see.
            self.stats.unmatched += 1;
            self.skipping = Some(Skip::Unseen);
            return;
        }
        match ty {
            b'E' => self.on_error(parse_error(body), ts, out),
            b'C' => {
                // A tag cut by the capture (no terminator) is not read: neither its command
                // nor its count would be right.
                let (command, rows) = if body.last() == Some(&0) {
                    let (command, rows) = command_tag(body);
                    (Some(command), rows)
                } else {
                    (None, None)
                };
                self.on_completion(Completion::Command, command, rows, ts, out);
            }
            b'I' => self.on_completion(Completion::EmptyQuery, None, None, ts, out),
            b's' => self.on_completion(Completion::Suspended, None, None, ts, out),
            b'D' => match self.ops.front_mut() {
                Some(op) if op.kind.is_query() => {
                    op.data_rows += 1;
                    op.results = true;
                }
                _ => self.mismatch(),
            },
            b'1' => self.expect(OpKind::Parse, true),
            b'2' => self.expect(OpKind::Bind, true),
            b'3' => self.expect(OpKind::Close, true),
            b't' => self.expect(OpKind::Describe, false),
            b'n' => self.expect(OpKind::Describe, true),
            _ => match self.ops.front_mut() {
                // RowDescription: ends a Describe, or starts a simple query's result.
                Some(op) if op.kind == OpKind::Describe => {
                    self.ops.pop_front();
                }
                Some(op) if op.kind.is_query() => {}
                _ => self.mismatch(),
            },
        }
    }

    /// An answer to `kind`: pops it (when `pops`), or is absorbed by an unseen batch.
    fn expect(&mut self, kind: OpKind, pops: bool) {
        match self.ops.front() {
            Some(op) if op.kind == kind => {
                if pops {
                    self.ops.pop_front();
                }
            }
            Some(op) if op.kind == OpKind::Unknown => {}
            _ => self.mismatch(),
        }
    }

    /// A response that fits no waiting message: drop the batch, skip to `ReadyForQuery`.
    fn mismatch(&mut self) {
        self.stats.unmatched += 1;
        self.drop_batch();
        self.skipping = Some(Skip::Batch);
    }

    /// Drops the messages of the current batch before the one `ReadyForQuery` answers.
    fn drop_batch(&mut self) {
        while self.ops.front().is_some_and(|op| !op.kind.ends_batch()) {
            self.ops.pop_front();
        }
    }

    fn on_completion(
        &mut self,
        completion: Completion,
        command: Option<Cow<'static, str>>,
        tag_rows: Option<u64>,
        ts: u64,
        out: &mut Vec<PgEvent>,
    ) {
        let Some(op) = self.ops.front_mut() else {
            self.mismatch();
            return;
        };
        let rows = tag_rows.unwrap_or(op.data_rows);
        match op.kind {
            OpKind::Simple => {
                op.rows += rows;
                op.data_rows = 0;
                op.command = command.or(op.command.take());
                if op.completion != Some(Completion::Error) {
                    op.completion = Some(completion);
                }
                op.answered_ns = Some(ts);
            }
            OpKind::Execute => {
                if let Some(mut op) = self.ops.pop_front() {
                    op.rows = rows;
                    op.command = command;
                    let query = query_of(op, ts, completion);
                    self.complete(query, out);
                }
            }
            OpKind::Unknown => {
                let query = unknown_query(op, ts, rows, command, completion, None);
                op.data_rows = 0;
                op.produced = true;
                self.complete(query, out);
            }
            _ => self.mismatch(),
        }
    }

    fn on_error(&mut self, error: PgError, ts: u64, out: &mut Vec<PgEvent>) {
        let Some(op) = self.ops.front_mut() else {
            self.stats.unmatched += 1;
            return;
        };
        match op.kind {
            OpKind::Simple => {
                op.error = Some(error);
                op.completion = Some(Completion::Error);
                op.answered_ns = Some(ts);
            }
            OpKind::Unknown => {
                let rows = op.data_rows;
                let query = unknown_query(op, ts, rows, None, Completion::Error, Some(error));
                op.produced = true;
                self.complete(query, out);
                self.skipping = Some(Skip::Batch);
            }
            OpKind::Parse | OpKind::Bind | OpKind::Describe | OpKind::Execute | OpKind::Close => {
                if let Some(mut op) = self.ops.pop_front() {
                    op.rows = op.data_rows;
                    op.error = Some(error);
                    let query = query_of(op, ts, Completion::Error);
                    self.complete(query, out);
                }
                // The server skips everything up to Sync.
                self.drop_batch();
                self.skipping = Some(Skip::Batch);
            }
            OpKind::Sync => match self.awaiting.last_mut() {
                // Raised at the implicit commit: the batch's last query failed after all.
                Some(last) if last.error.is_none() => {
                    last.error = Some(error);
                    last.completion = Completion::Error;
                }
                _ => self.stats.unmatched += 1,
            },
            OpKind::Function => {}
        }
    }

    fn on_ready(&mut self, status: Option<TxStatus>, ts: u64, out: &mut Vec<PgEvent>) {
        let answers_unseen = self.skipping.take() == Some(Skip::Unseen)
            || self.ops.front().is_some_and(|op| op.start_ns > ts);
        if !answers_unseen {
            while let Some(op) = self.ops.pop_front() {
                match op.kind {
                    OpKind::Simple => {
                        let completion = op.completion.unwrap_or(Completion::Command);
                        let query = query_of(op, ts, completion);
                        self.complete(query, out);
                        break;
                    }
                    kind if kind.ends_batch() => break,
                    // Unanswered messages before the batch end: the answers were not seen.
                    _ => {}
                }
            }
        }
        self.flush_awaiting(status, out);
        self.phase = Phase::Ready;
        self.ready = status.map(|status| (status, ts));
    }
}

/// A query answered on a batch whose frontend bytes were not seen (`OpKind::Unknown`); the op
/// stays queued, so it is borrowed rather than consumed as in [`query_of`].
fn unknown_query(
    op: &Op,
    end_ns: u64,
    rows: u64,
    command: Option<Cow<'static, str>>,
    completion: Completion,
    error: Option<PgError>,
) -> PgQuery {
    PgQuery {
        statement: op.statement.clone(),
        protocol: QueryProtocol::Unknown,
        start_ns: op.start_ns,
        end_ns: end_ns.max(op.start_ns),
        rows,
        command,
        completion,
        error,
        tx_status: None,
    }
}

fn query_of(op: Op, end_ns: u64, completion: Completion) -> PgQuery {
    let protocol = match op.kind {
        OpKind::Simple => QueryProtocol::Simple,
        OpKind::Unknown => QueryProtocol::Unknown,
        _ => QueryProtocol::Extended,
    };
    let rows = if op.kind == OpKind::Simple {
        op.rows + op.data_rows
    } else {
        op.rows.max(if completion == Completion::Inferred {
            op.data_rows
        } else {
            0
        })
    };
    PgQuery {
        statement: op.statement,
        protocol,
        start_ns: op.start_ns,
        end_ns: end_ns.max(op.start_ns),
        rows,
        command: op.command,
        completion,
        error: op.error,
        tx_status: None,
    }
}

#[cfg(test)]
pub(super) mod tests;
