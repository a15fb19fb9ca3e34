//! selfheal's protocol parsers under libFuzzer, and the decoding of fuzz input into syscalls.
//!
//! The crate compiles the daemon's `protocols` module from its source file instead of
//! depending on `selfheal-daemon`: the module is pure and self-contained (see its Architecture
//! Invariant in ARCHITECTURE.md), and the daemon's dependency tree and eBPF build script have no
//! business under sanitizer flags. Run the targets with `cargo xtask fuzz --seconds N`.

#[path = "../../src/protocols/mod.rs"]
pub mod protocols;

use protocols::Direction;

/// One syscall decoded from fuzz input.
#[derive(Debug, Clone, Copy)]
pub struct Syscall<'a> {
    pub direction: Direction,
    pub captured: &'a [u8],
    pub total_len: usize,
    pub ts_ns: u64,
}

/// Decodes fuzz input as records: a control byte, a length byte, then up to that many payload
/// bytes (the captured prefix).
///
/// Control byte: bit 0 is the direction (0 received, 1 sent); bits 1–2 the gap after the
/// payload (0 or 1: none; 2: bits 3–7 bytes; 3: (bits 3–7 + 1) × 4 KiB); bits 5–7 move the
/// clock by −2 to +5 (so timestamps repeat and sometimes go backwards).
pub fn syscalls(data: &[u8]) -> Syscalls<'_> {
    Syscalls { data, ts_ns: 1_000 }
}

pub struct Syscalls<'a> {
    data: &'a [u8],
    ts_ns: u64,
}

impl<'a> Iterator for Syscalls<'a> {
    type Item = Syscall<'a>;

    fn next(&mut self) -> Option<Syscall<'a>> {
        let (&control, rest) = self.data.split_first()?;
        let (&len, rest) = rest.split_first().unwrap_or((&0, rest));
        let (captured, rest) = rest.split_at(usize::from(len).min(rest.len()));
        self.data = rest;
        let high = usize::from(control >> 3);
        let gap = match (control >> 1) & 0b11 {
            2 => high,
            3 => (high + 1) << 12,
            _ => 0,
        };
        self.ts_ns = self
            .ts_ns
            .saturating_add_signed(i64::from(control >> 5) - 2);
        Some(Syscall {
            direction: if control & 1 == 0 {
                Direction::Received
            } else {
                Direction::Sent
            },
            captured,
            total_len: captured.len() + gap,
            ts_ns: self.ts_ns,
        })
    }
}
