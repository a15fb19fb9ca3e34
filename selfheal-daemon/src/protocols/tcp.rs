//! One direction of a TCP connection rebuilt from captured segments, for capture points that
//! see packets rather than syscalls (a `cgroup_skb` program on the target's cgroup sees each
//! segment once per direction, retransmissions and out-of-order arrivals included).
//!
//! [`Reassembler::push`] takes segments in arrival order — their sequence number, their
//! payload length on the wire and the prefix of the payload that was captured — and hands the
//! stream on in order as `(captured, total_len)` pieces, the input model of the parsers (see
//! the module documentation of `protocols`): bytes that were not captured, and holes given up
//! on, are gaps of known length, so the parsers skip them by length where framing allows.
//! Duplicates are dropped, overlaps trimmed, segments past a hole held until it fills (at
//! most [`MAX_HELD`] of them, each holding at most the capture's prefix); when more arrive the
//! oldest hole is given up as a gap. Sequence numbers wrap (RFC 1982 arithmetic). A segment
//! further from the stream's position than any TCP window reaches ([`MAX_WINDOW`]) means the
//! bytes between were never seen — the capture shed the connection for a while, or dropped
//! its records — and the stream starts over at it, after a gap. So does the first segment
//! past a hole after [`Reassembler::resync`] (the caller knows the connection may have been
//! shed meanwhile): nothing is held for bytes that were never captured.

/// Out-of-order segments held while waiting for a hole to fill.
pub const MAX_HELD: usize = 32;

/// The largest TCP window (RFC 7323: 2^30 bytes with window scaling): no retransmission lies
/// further behind the stream's position, no segment in flight further ahead.
pub const MAX_WINDOW: u64 = 1 << 30;

/// One captured segment.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    /// The sequence number of its first payload byte.
    pub seq: u32,
    /// Its payload length on the wire.
    pub len: u32,
    /// The first bytes of its payload that were captured (at most `len`).
    pub captured: &'a [u8],
}

/// What the reassembler saw, for the capture's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReassemblyStats {
    /// Segments entirely before the stream's position (retransmissions).
    pub duplicates: u64,
    /// Segments whose start overlapped what was already passed on, trimmed.
    pub trimmed: u64,
    /// Segments held past a hole.
    pub held: u64,
    /// Holes given up on, and their bytes.
    pub gaps: u64,
    pub gap_bytes: u64,
}

#[derive(Debug)]
struct Held {
    seq: u32,
    len: u32,
    captured: Vec<u8>,
}

/// One direction of one connection.
#[derive(Debug, Default)]
pub struct Reassembler {
    /// The sequence number of the next byte to pass on; `None` until the first segment (or a
    /// known initial sequence number) sets it.
    next: Option<u32>,
    held: Vec<Held>,
    stats: ReassemblyStats,
    /// The next segment past the stream's position starts it over (see [`Self::resync`]).
    resync: bool,
}

/// `seq - base` as a signed distance (RFC 1982: within 2^31 either way).
fn distance(seq: u32, base: u32) -> i64 {
    i64::from(seq.wrapping_sub(base).cast_signed())
}

impl Reassembler {
    /// A stream that starts at the first segment pushed.
    pub fn new() -> Self {
        Self::default()
    }

    /// A stream whose first byte is `seq` (the initial sequence number plus one, from the
    /// handshake), so a first segment that arrives out of order is held rather than taken as
    /// the start.
    pub fn starting_at(seq: u32) -> Self {
        Self {
            next: Some(seq),
            ..Self::default()
        }
    }

    pub fn stats(&self) -> ReassemblyStats {
        self.stats
    }

    /// Bytes held for out-of-order segments.
    pub fn heap_bytes(&self) -> usize {
        self.held.capacity() * std::mem::size_of::<Held>()
            + self
                .held
                .iter()
                .map(|h| h.captured.capacity())
                .sum::<usize>()
    }

    /// The bytes between the stream's position and its next segment may never have been
    /// captured (the capture shed the connection and took it back): if that segment lies
    /// ahead, the stream starts over at it after a gap instead of holding it for a hole no
    /// retransmission will fill. Applies to the next segment with a payload only.
    pub fn resync(&mut self) {
        self.resync = true;
    }

    /// Whether a segment with a payload at `seq` would start the stream over (see
    /// [`Self::resync`] and [`MAX_WINDOW`]): what was in flight before it is lost.
    pub fn starts_over_at(&self, seq: u32) -> bool {
        self.next.is_some_and(|next| {
            let at = distance(seq, next);
            at.unsigned_abs() > MAX_WINDOW || (self.resync && at > 0)
        })
    }

    /// Takes one segment; passes on whatever is now in order.
    pub fn push(&mut self, segment: Segment<'_>, out: &mut impl FnMut(&[u8], usize)) {
        if segment.len == 0 {
            return;
        }
        let captured = &segment.captured[..segment.captured.len().min(segment.len as usize)];
        let next = *self.next.get_or_insert(segment.seq);
        let at = distance(segment.seq, next);
        let starts_over = self.starts_over_at(segment.seq);
        self.resync = false;
        if starts_over {
            self.start_over(segment.seq, out);
        } else if at > 0 {
            self.hold(segment.seq, segment.len, captured);
            if self.held.len() > MAX_HELD {
                self.give_up_hole(out);
            }
            return;
        }
        if self.emit(segment.seq, segment.len, captured, out) {
            self.drain(out);
        }
    }

    /// Gives up on every hole: each becomes a gap and what was held is passed on (at the end
    /// of the connection, or when the caller stops waiting).
    pub fn flush(&mut self, out: &mut impl FnMut(&[u8], usize)) {
        while !self.held.is_empty() {
            self.give_up_hole(out);
        }
        // Nothing is held now: give the memory back too.
        self.held = Vec::new();
    }

    /// Passes on the part of a segment at or after the stream's position; false when all of
    /// it was before (a duplicate).
    fn emit(
        &mut self,
        seq: u32,
        len: u32,
        captured: &[u8],
        out: &mut impl FnMut(&[u8], usize),
    ) -> bool {
        let next = self.next.unwrap_or(seq);
        let behind = -distance(seq, next);
        debug_assert!(behind >= 0, "emit is called at or before the position");
        if behind >= i64::from(len) {
            self.stats.duplicates += 1;
            return false;
        }
        // `behind` < `len` ≤ u32::MAX.
        let skip = usize::try_from(behind).unwrap_or(0);
        if skip > 0 {
            self.stats.trimmed += 1;
        }
        let remaining = len as usize - skip;
        out(&captured[skip.min(captured.len())..], remaining);
        self.next = Some(next.wrapping_add(len - skip as u32));
        true
    }

    fn hold(&mut self, seq: u32, len: u32, captured: &[u8]) {
        // A retransmission of a held segment replaces nothing: the first copy is as good.
        if self.held.iter().any(|h| h.seq == seq && h.len >= len) {
            self.stats.duplicates += 1;
            return;
        }
        self.stats.held += 1;
        self.held.push(Held {
            seq,
            len,
            captured: captured.to_vec(),
        });
    }

    /// Passes on held segments that the stream has reached, in order.
    fn drain(&mut self, out: &mut impl FnMut(&[u8], usize)) {
        while let Some(next) = self.next {
            let Some(index) = self
                .held
                .iter()
                .enumerate()
                .min_by_key(|(_, h)| distance(h.seq, next))
                .map(|(i, _)| i)
            else {
                return;
            };
            if distance(self.held[index].seq, next) > 0 {
                return;
            }
            let held = self.held.swap_remove(index);
            self.emit(held.seq, held.len, &held.captured, out);
        }
    }

    /// Gives up what is held and the bytes up to `seq` (the forward distance to it, the best
    /// guess of how many were missed) as gaps, and goes on from `seq`.
    fn start_over(&mut self, seq: u32, out: &mut impl FnMut(&[u8], usize)) {
        self.held = Vec::new();
        if let Some(next) = self.next {
            let missed = seq.wrapping_sub(next);
            self.stats.gaps += 1;
            self.stats.gap_bytes += u64::from(missed);
            out(&[], missed as usize);
        }
        self.next = Some(seq);
    }

    /// The hole before the nearest held segment becomes a gap; what follows is passed on.
    fn give_up_hole(&mut self, out: &mut impl FnMut(&[u8], usize)) {
        let Some(next) = self.next else { return };
        let Some(nearest) = self.held.iter().map(|h| distance(h.seq, next)).min() else {
            return;
        };
        if nearest > 0 {
            // Within 2^31: fits a u32 and a usize.
            let hole = u32::try_from(nearest).unwrap_or(u32::MAX);
            self.stats.gaps += 1;
            self.stats.gap_bytes += u64::from(hole);
            out(&[], hole as usize);
            self.next = Some(next.wrapping_add(hole));
        }
        self.drain(out);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// What a reassembler passed on: the bytes captured at their stream offsets, and the
    /// total length.
    #[derive(Default)]
    struct Rebuilt {
        known: Vec<Option<u8>>,
    }

    impl Rebuilt {
        fn take(&mut self, captured: &[u8], total: usize) {
            assert!(
                captured.len() <= total,
                "a piece captures more than it holds"
            );
            self.known.extend(captured.iter().map(|b| Some(*b)));
            self.known
                .extend(std::iter::repeat_n(None, total - captured.len()));
        }
    }

    #[test]
    fn after_a_resync_a_segment_past_the_position_starts_the_stream_over_at_once() {
        let mut reassembler = Reassembler::starting_at(1000);
        let pieces: std::cell::RefCell<Vec<(Vec<u8>, usize)>> = std::cell::RefCell::default();
        let mut out = |c: &[u8], t: usize| pieces.borrow_mut().push((c.to_vec(), t));
        let at = |seq: u32, captured: &'static [u8]| Segment {
            seq,
            len: captured.len() as u32,
            captured,
        };
        reassembler.push(at(1000, b"GET "), &mut out);
        // Without a resync a segment past the position waits for the hole.
        reassembler.push(at(1010, b"HEAD"), &mut out);
        assert_eq!(pieces.borrow().len(), 1, "held: {pieces:?}");
        // Taken back after shedding: the next segment ahead is where the stream goes on.
        reassembler.resync();
        assert!(!reassembler.starts_over_at(1004), "in order");
        assert!(reassembler.starts_over_at(5000));
        reassembler.push(at(5000, b"POST"), &mut out);
        assert_eq!(
            *pieces.borrow(),
            vec![
                (b"GET ".to_vec(), 4),
                (Vec::new(), 3996),
                (b"POST".to_vec(), 4)
            ]
        );
        assert_eq!(
            reassembler.heap_bytes(),
            0,
            "the old hole's segment is let go"
        );
        // Once only: a later hole waits again, and an in-order segment consumes a resync.
        reassembler.push(at(5010, b"PUT "), &mut out);
        assert_eq!(pieces.borrow().len(), 3);
        reassembler.resync();
        reassembler.push(at(5004, b"more"), &mut out);
        assert_eq!(pieces.borrow().len(), 4, "in order");
    }

    #[test]
    fn a_segment_beyond_any_window_starts_the_stream_over_after_a_gap() {
        let mut reassembler = Reassembler::starting_at(1000);
        let mut pieces: Vec<(Vec<u8>, usize)> = Vec::new();
        let mut out = |c: &[u8], t: usize| pieces.push((c.to_vec(), t));
        reassembler.push(
            Segment {
                seq: 1000,
                len: 4,
                captured: b"GET ",
            },
            &mut out,
        );
        // Held past a hole, then the connection is shed for 2.5 GiB: it comes back 1.5 GiB
        // "behind" in RFC 1982 terms, which would otherwise be dropped as a retransmission.
        reassembler.push(
            Segment {
                seq: 1104,
                len: 2,
                captured: b"xx",
            },
            &mut out,
        );
        let resumed = 1004u32.wrapping_add(0xa000_0000);
        reassembler.push(
            Segment {
                seq: resumed,
                len: 5,
                captured: b"HTTP/",
            },
            &mut out,
        );
        // And a segment just after it follows in order.
        reassembler.push(
            Segment {
                seq: resumed.wrapping_add(5),
                len: 3,
                captured: b"1.1",
            },
            &mut out,
        );
        assert_eq!(
            pieces,
            vec![
                (b"GET ".to_vec(), 4),
                (Vec::new(), 0xa000_0000),
                (b"HTTP/".to_vec(), 5),
                (b"1.1".to_vec(), 3),
            ]
        );
        let stats = reassembler.stats();
        assert_eq!((stats.gaps, stats.duplicates), (1, 0));
        assert!(reassembler.heap_bytes() < 1024, "nothing held any more");
    }

    fn run(
        start: u32,
        segments: &[(u32, usize, usize)],
        data: &[u8],
        flush: bool,
    ) -> (Rebuilt, ReassemblyStats) {
        let mut reassembler = Reassembler::starting_at(start);
        let mut rebuilt = Rebuilt::default();
        for &(offset, len, cap) in segments {
            let offset = offset as usize;
            reassembler.push(
                Segment {
                    seq: start.wrapping_add(offset as u32),
                    len: len as u32,
                    captured: &data[offset..offset + cap.min(len)],
                },
                &mut |c, t| rebuilt.take(c, t),
            );
        }
        if flush {
            reassembler.flush(&mut |c, t| rebuilt.take(c, t));
        }
        assert!(reassembler.held.len() <= MAX_HELD + 1);
        (rebuilt, reassembler.stats())
    }

    #[test]
    fn in_order_segments_pass_through_and_partial_captures_are_gaps() {
        let data = b"GET / HTTP/1.1\r\n\r\nHTTP/1.1 200 OK";
        let (rebuilt, stats) = run(
            u32::MAX - 3,
            &[(0, 10, 10), (10, 8, 4), (18, 15, 15)],
            data,
            false,
        );
        assert_eq!(
            rebuilt.known.len(),
            data.len(),
            "across the wrap of the sequence space"
        );
        assert_eq!(
            rebuilt.known[..10],
            data[..10].iter().map(|b| Some(*b)).collect::<Vec<_>>()
        );
        assert_eq!(rebuilt.known[14..18], [None; 4]);
        assert_eq!(stats, ReassemblyStats::default());
    }

    #[test]
    fn reordered_duplicated_and_overlapping_segments_come_out_once_in_order() {
        let data: Vec<u8> = (0..40).collect();
        let (rebuilt, stats) = run(
            1000,
            &[
                (10, 10, 10),
                (0, 10, 10),
                (0, 10, 10),
                (15, 15, 15),
                (30, 10, 10),
            ],
            &data,
            false,
        );
        assert_eq!(
            rebuilt.known,
            data.iter().map(|b| Some(*b)).collect::<Vec<_>>()
        );
        assert_eq!(stats.held, 1);
        assert_eq!(stats.duplicates, 1);
        assert_eq!(stats.trimmed, 1);
    }

    #[test]
    fn a_lost_segment_becomes_a_gap_when_too_much_waits_behind_it() {
        let data: Vec<u8> = (0..=255).cycle().take(10 * (MAX_HELD + 3)).collect();
        // Segment 0 arrives, segment 1 never does, the rest do.
        let segments: Vec<_> = std::iter::once((0, 10, 10))
            .chain((2..MAX_HELD as u32 + 3).map(|k| (k * 10, 10, 10)))
            .collect();
        let (rebuilt, stats) = run(7, &segments, &data, false);
        assert_eq!(stats.gaps, 1);
        assert_eq!(stats.gap_bytes, 10);
        assert_eq!(rebuilt.known.len(), data.len());
        assert_eq!(rebuilt.known[10..20], [None; 10]);
        assert_eq!(rebuilt.known[20], Some(data[20]));
    }

    proptest! {
        /// Any segments at all: no panic, bounded state, pieces never capture more than they
        /// hold.
        #[test]
        fn arbitrary_segments_are_safe(
            segments in proptest::collection::vec(
                (any::<u32>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64)),
                0..200,
            ),
        ) {
            let mut reassembler = Reassembler::new();
            let mut check = |captured: &[u8], total: usize| assert!(captured.len() <= total);
            for (seq, len, captured) in &segments {
                reassembler.push(Segment { seq: *seq, len: *len, captured }, &mut check);
                prop_assert!(reassembler.held.len() <= MAX_HELD);
                prop_assert!(reassembler.heap_bytes() <= (MAX_HELD + 1) * (64 + 64));
            }
            reassembler.flush(&mut check);
            prop_assert!(reassembler.held.is_empty());
        }

        /// Whatever the order, duplication and capture sizes, and whichever segments are lost:
        /// after a flush the pieces add up to the stream up to the last segment that arrived,
        /// and every captured byte is the stream's byte at its offset.
        #[test]
        fn pieces_rebuild_the_stream(
            start in any::<u32>(),
            sizes in proptest::collection::vec(1usize..200, 1..40),
            caps in proptest::collection::vec(0usize..200, 40),
            order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..60),
            lost in proptest::collection::vec(any::<bool>(), 40),
            overlaps in proptest::collection::vec(0usize..50, 40),
        ) {
            let total: usize = sizes.iter().sum();
            let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
            let mut offsets = Vec::new();
            let mut at = 0;
            for (k, size) in sizes.iter().enumerate() {
                // Some segments also resend the end of the one before (an overlap).
                let back = overlaps[k].min(at);
                offsets.push(((at - back) as u32, size + back, caps[k]));
                at += size;
            }
            // Arrival: mostly in order, some swapped, some sent twice, some lost.
            let mut arrivals: Vec<_> = offsets.clone();
            for index in &order {
                let i = index.index(arrivals.len());
                let j = (i + 1).min(arrivals.len() - 1);
                if i % 3 == 0 {
                    arrivals.push(arrivals[i]);
                } else {
                    arrivals.swap(i, j);
                }
            }
            let first = offsets[0];
            let kept: Vec<_> = arrivals
                .into_iter()
                .filter(|s| *s == first || !lost[offsets.iter().position(|o| o == s).unwrap_or(0)])
                .collect();
            let end = kept.iter().map(|&(o, l, _)| o as usize + l).max().unwrap_or(0);
            let (rebuilt, _) = run(start, &kept, &data, true);
            prop_assert_eq!(rebuilt.known.len(), end);
            for (i, byte) in rebuilt.known.iter().enumerate() {
                if let Some(byte) = byte {
                    prop_assert_eq!(*byte, data[i], "offset {}", i);
                }
            }
        }
    }
}
