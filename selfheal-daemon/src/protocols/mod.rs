//! Protocols: HTTP/1.x (the target as a server) and PostgreSQL v3 (the target as a client),
//! decoded from the bytes the eBPF probes capture at the target's socket syscalls.
//!
//! Owns: one parser object per connection ([`http::HttpParser`], [`postgres::PgParser`]) that
//! turns syscall payloads into completed exchanges and query events, and the bounded label
//! makers [`route::route_template`] and [`fingerprint::fingerprint`]; and
//! [`tcp::Reassembler`], which turns captured TCP segments (a packet-level capture point)
//! into this input model.
//!
//! Must not: do I/O, read a clock or keep globals (time comes in with every chunk); panic on
//! any input; allocate in proportion to a length the peer claims; keep unbounded state per
//! connection (every buffer and table has a constant cap, which `heap_bytes` reports and the
//! property tests check). Bodies, row data and COPY data are skipped by length, never stored.
//!
//! # Input model
//!
//! Each call to `feed` is one syscall on one connection, in the order the syscalls happened:
//! `captured` is the prefix of the data the kernel copied, `total_len` is what the syscall
//! really moved. The `total_len - captured.len()` bytes after the prefix are a *gap*: a
//! parser skips a gap by length where the framing allows (HTTP bodies with a length, chunk
//! data, Postgres message bodies) and otherwise loses sync, counts it, and waits for a later
//! syscall that starts at a message boundary. Splitting one syscall's bytes over several
//! feeds with the same timestamp yields the same events as feeding it whole.

pub mod fingerprint;
pub mod http;
pub mod postgres;
pub mod route;
pub mod tcp;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod testing;

/// Which way the bytes of a syscall went, seen from the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Bytes the target read from the socket (HTTP requests; Postgres backend messages).
    Received,
    /// Bytes the target wrote to the socket (HTTP responses; Postgres frontend messages).
    Sent,
}

/// The gap after the captured prefix; a `total_len` shorter than the prefix is read as no gap.
fn gap_after(captured: &[u8], total_len: usize) -> u64 {
    total_len.saturating_sub(captured.len()) as u64
}

/// `bytes` as text, invalid UTF-8 replaced, cut to at most `max` bytes on a character boundary.
fn text_capped(bytes: &[u8], max: usize) -> String {
    let bytes = &bytes[..bytes.len().min(max)];
    match String::from_utf8_lossy(bytes) {
        std::borrow::Cow::Borrowed(text) => text.to_owned(),
        std::borrow::Cow::Owned(mut text) => {
            // A replacement character is three bytes for one: the text can outgrow `max`.
            let cut = text.floor_char_boundary(max);
            text.truncate(cut);
            text.shrink_to_fit();
            text
        }
    }
}

/// The position of the first `needle` in `haystack`.
fn find_byte(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_capped_respects_char_boundaries_and_the_cap() {
        assert_eq!(text_capped(b"hello", 3), "hel");
        assert_eq!(text_capped("héllo".as_bytes(), 2), "h");
        assert_eq!(text_capped(&[0xff, 0xff, 0xff], 3), "\u{fffd}");
        assert!(text_capped(&[0xff; 10], 10).len() <= 10);
    }

    #[test]
    fn gap_is_never_negative() {
        assert_eq!(gap_after(b"abc", 10), 7);
        assert_eq!(gap_after(b"abc", 1), 0);
    }
}
