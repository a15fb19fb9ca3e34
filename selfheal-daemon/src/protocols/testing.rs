//! Test helpers shared by the protocol tests: conversations as lists of syscalls, fed whole,
//! split, or cut by a capture bound.

use super::{
    http::{HttpExchange, HttpParser},
    postgres::{PgEvent, PgParser},
    Direction,
};

/// One syscall of a conversation: what moved, which way, when.
#[derive(Debug, Clone)]
pub(super) struct Syscall {
    pub(super) direction: Direction,
    pub(super) data: Vec<u8>,
    pub(super) ts: u64,
}

pub(super) fn sys(direction: Direction, data: impl AsRef<[u8]>, ts: u64) -> Syscall {
    Syscall {
        direction,
        data: data.as_ref().to_vec(),
        ts,
    }
}

/// What the tests need of a parser.
pub(super) trait Parser: Default {
    type Event: std::fmt::Debug + PartialEq;
    fn feed_one(
        &mut self,
        direction: Direction,
        captured: &[u8],
        total_len: usize,
        ts: u64,
        out: &mut Vec<Self::Event>,
    );
    fn heap(&self) -> usize;
}

impl Parser for HttpParser {
    type Event = HttpExchange;
    fn feed_one(
        &mut self,
        direction: Direction,
        captured: &[u8],
        total_len: usize,
        ts: u64,
        out: &mut Vec<HttpExchange>,
    ) {
        self.feed(direction, captured, total_len, ts, out);
    }
    fn heap(&self) -> usize {
        self.heap_bytes()
    }
}

impl Parser for PgParser {
    type Event = PgEvent;
    fn feed_one(
        &mut self,
        direction: Direction,
        captured: &[u8],
        total_len: usize,
        ts: u64,
        out: &mut Vec<PgEvent>,
    ) {
        self.feed(direction, captured, total_len, ts, out);
    }
    fn heap(&self) -> usize {
        self.heap_bytes()
    }
}

/// Feeds every syscall whole; the events.
pub(super) fn feed_whole<P: Parser>(parser: &mut P, syscalls: &[Syscall]) -> Vec<P::Event> {
    let mut out = Vec::new();
    for s in syscalls {
        parser.feed_one(s.direction, &s.data, s.data.len(), s.ts, &mut out);
    }
    out
}

/// Feeds each syscall as pieces cut at `cuts` (taken modulo its length), same timestamp.
pub(super) fn feed_split<P: Parser>(
    parser: &mut P,
    syscalls: &[Syscall],
    cuts: &[usize],
) -> Vec<P::Event> {
    let mut out = Vec::new();
    let mut cuts = cuts.iter().cycle();
    for s in syscalls {
        let mut at = 0;
        while at < s.data.len() {
            let step = cuts.next().map_or(s.data.len(), |c| 1 + c % s.data.len());
            let end = (at + step).min(s.data.len());
            parser.feed_one(s.direction, &s.data[at..end], end - at, s.ts, &mut out);
            at = end;
        }
    }
    out
}

/// Feeds each syscall with only its first `cap` bytes captured.
pub(super) fn feed_capped<P: Parser>(
    parser: &mut P,
    syscalls: &[Syscall],
    cap: usize,
) -> Vec<P::Event> {
    let mut out = Vec::new();
    for s in syscalls {
        let captured = &s.data[..s.data.len().min(cap)];
        parser.feed_one(s.direction, captured, s.data.len(), s.ts, &mut out);
    }
    out
}

/// Asserts that cutting any one syscall at any byte, or feeding everything byte by byte,
/// gives the events of the whole conversation.
pub(super) fn assert_every_split_matches<P: Parser>(syscalls: &[Syscall]) {
    let whole = feed_whole(&mut P::default(), syscalls);
    for (index, syscall) in syscalls.iter().enumerate() {
        for cut in 1..syscall.data.len() {
            let mut parser = P::default();
            let mut out = Vec::new();
            for (i, s) in syscalls.iter().enumerate() {
                if i == index {
                    let (a, b) = s.data.split_at(cut);
                    parser.feed_one(s.direction, a, a.len(), s.ts, &mut out);
                    parser.feed_one(s.direction, b, b.len(), s.ts, &mut out);
                } else {
                    parser.feed_one(s.direction, &s.data, s.data.len(), s.ts, &mut out);
                }
            }
            assert_eq!(out, whole, "syscall {index} cut at {cut}");
        }
    }
    let bytewise = feed_split(&mut P::default(), syscalls, &[0]);
    assert_eq!(bytewise, whole, "byte by byte");
}
