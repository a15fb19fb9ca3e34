//! Ring buffers of buckets, one per tier of a series, in struct-of-arrays layout so a
//! bucket costs exactly the bytes its kind needs.
//!
//! A ring remembers its `head`, the newest bucket written (bucket `b` covers
//! `[b·resolution, (b+1)·resolution)` ms since the epoch). Bucket `b` lives in slot
//! `b mod slots` while `head - slots < b ≤ head`. Moving the head forward clears the slots
//! it passes, so the oldest buckets are overwritten and memory never grows.

use super::sketch::{self, EMPTY_TOP, WINDOW};

/// The head of a ring that was never written.
pub(crate) const EMPTY_HEAD: i64 = i64::MIN;

/// The part of a ring every kind shares.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tier<S> {
    pub(crate) head: i64,
    pub(crate) slots: S,
}

/// The bucket arrays of one kind.
pub(crate) trait Slots {
    fn len(&self) -> usize;
    fn clear(&mut self, slot: usize);
    fn clear_all(&mut self);
}

impl<S: Slots> Tier<S> {
    pub(crate) fn new(slots: S) -> Self {
        Self {
            head: EMPTY_HEAD,
            slots,
        }
    }

    /// Oldest bucket held, `None` when never written.
    pub(crate) fn oldest(&self) -> Option<i64> {
        (self.head != EMPTY_HEAD).then(|| self.head - self.slots.len() as i64 + 1)
    }

    /// Whether a write to `bucket` would be accepted.
    pub(crate) fn accepts(&self, bucket: i64) -> bool {
        self.head == EMPTY_HEAD || bucket > self.head - self.slots.len() as i64
    }

    /// The slot to write `bucket` into, moving the head (and clearing what it passes) when
    /// the bucket is newer. `None` when it is older than the ring.
    pub(crate) fn slot_for_write(&mut self, bucket: i64) -> Option<usize> {
        let len = self.slots.len() as i64;
        if self.head == EMPTY_HEAD {
            self.head = bucket;
        } else if bucket > self.head {
            if bucket - self.head >= len {
                self.slots.clear_all();
            } else {
                for passed in self.head + 1..=bucket {
                    self.slots.clear(passed.rem_euclid(len) as usize);
                }
            }
            self.head = bucket;
        } else if bucket <= self.head - len {
            return None;
        }
        Some(bucket.rem_euclid(len) as usize)
    }
}

/// Counter buckets: the sum of the increments.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CounterSlots {
    pub(crate) sums: Box<[f64]>,
}

impl CounterSlots {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            sums: vec![0.0; len].into_boxed_slice(),
        }
    }
}

impl Slots for CounterSlots {
    fn len(&self) -> usize {
        self.sums.len()
    }
    fn clear(&mut self, slot: usize) {
        self.sums[slot] = 0.0;
    }
    fn clear_all(&mut self) {
        self.sums.fill(0.0);
    }
}

/// Gauge buckets. Values are kept as `f32` (7 significant digits); the sum as `f64`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GaugeSlots {
    pub(crate) min: Box<[f32]>,
    pub(crate) max: Box<[f32]>,
    pub(crate) last: Box<[f32]>,
    pub(crate) count: Box<[u32]>,
    pub(crate) sum: Box<[f64]>,
}

/// One gauge bucket, read back.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct GaugeCell {
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) last: f64,
    pub(crate) count: u64,
    pub(crate) sum: f64,
}

impl GaugeSlots {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            min: vec![0.0; len].into_boxed_slice(),
            max: vec![0.0; len].into_boxed_slice(),
            last: vec![0.0; len].into_boxed_slice(),
            count: vec![0; len].into_boxed_slice(),
            sum: vec![0.0; len].into_boxed_slice(),
        }
    }

    /// Adds a sample; `take_last` says whether it becomes the bucket's last value (an empty
    /// bucket always takes it).
    pub(crate) fn record(&mut self, slot: usize, value: f64, take_last: bool) {
        let narrow = value as f32;
        if self.count[slot] == 0 {
            self.min[slot] = narrow;
            self.max[slot] = narrow;
            self.last[slot] = narrow;
            self.count[slot] = 1;
            self.sum[slot] = value;
        } else {
            self.min[slot] = self.min[slot].min(narrow);
            self.max[slot] = self.max[slot].max(narrow);
            if take_last {
                self.last[slot] = narrow;
            }
            self.count[slot] = self.count[slot].saturating_add(1);
            self.sum[slot] += value;
        }
    }

    pub(crate) fn cell(&self, slot: usize) -> Option<GaugeCell> {
        (self.count[slot] > 0).then(|| GaugeCell {
            min: f64::from(self.min[slot]),
            max: f64::from(self.max[slot]),
            last: f64::from(self.last[slot]),
            count: u64::from(self.count[slot]),
            sum: self.sum[slot],
        })
    }
}

impl Slots for GaugeSlots {
    fn len(&self) -> usize {
        self.count.len()
    }
    fn clear(&mut self, slot: usize) {
        // A bucket with no samples is empty whatever its other fields hold; they are reset
        // anyway so snapshots of equal stores are equal.
        self.min[slot] = 0.0;
        self.max[slot] = 0.0;
        self.last[slot] = 0.0;
        self.count[slot] = 0;
        self.sum[slot] = 0.0;
    }
    fn clear_all(&mut self) {
        self.min.fill(0.0);
        self.max.fill(0.0);
        self.last.fill(0.0);
        self.count.fill(0);
        self.sum.fill(0.0);
    }
}

/// Distribution buckets: a sketch window each (see [`sketch`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct DistributionSlots {
    pub(crate) top: Box<[i16]>,
    pub(crate) sum: Box<[f64]>,
    /// `WINDOW` counts per slot.
    pub(crate) bins: Box<[u32]>,
}

impl DistributionSlots {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            top: vec![EMPTY_TOP; len].into_boxed_slice(),
            sum: vec![0.0; len].into_boxed_slice(),
            bins: vec![0; len * WINDOW].into_boxed_slice(),
        }
    }

    pub(crate) fn record(&mut self, slot: usize, index: i16, value: f64) {
        let bins = &mut self.bins[slot * WINDOW..(slot + 1) * WINDOW];
        sketch::window_insert(bins, &mut self.top[slot], index, 1);
        self.sum[slot] += value;
    }

    /// The window of a slot: its top, bins and sum; `None` when empty.
    pub(crate) fn window(&self, slot: usize) -> Option<(i16, &[u32], f64)> {
        let top = self.top[slot];
        (top != EMPTY_TOP).then(|| {
            (
                top,
                &self.bins[slot * WINDOW..(slot + 1) * WINDOW],
                self.sum[slot],
            )
        })
    }
}

impl Slots for DistributionSlots {
    fn len(&self) -> usize {
        self.top.len()
    }
    fn clear(&mut self, slot: usize) {
        self.top[slot] = EMPTY_TOP;
        self.sum[slot] = 0.0;
        self.bins[slot * WINDOW..(slot + 1) * WINDOW].fill(0);
    }
    fn clear_all(&mut self) {
        self.top.fill(EMPTY_TOP);
        self.sum.fill(0.0);
        self.bins.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[expect(clippy::float_cmp, reason = "sums of small integers are exact")]
    fn ring_overwrites_the_oldest_and_refuses_older() {
        let mut tier = Tier::new(CounterSlots::new(4));
        assert_eq!(tier.oldest(), None);
        for bucket in 10..14 {
            let slot = tier.slot_for_write(bucket).expect("in range");
            tier.slots.sums[slot] += bucket as f64;
        }
        assert_eq!(tier.oldest(), Some(10));
        // Bucket 14 overwrites bucket 10's slot.
        let slot = tier.slot_for_write(14).expect("newer");
        assert_eq!(tier.slots.sums[slot], 0.0);
        tier.slots.sums[slot] = 14.0;
        assert_eq!(tier.oldest(), Some(11));
        assert_eq!(tier.slot_for_write(10), None);
        assert!(!tier.accepts(10));
        assert!(tier.accepts(11));
        // Out of order inside the ring is fine.
        assert_eq!(tier.slot_for_write(12), Some(0));
        // A jump past the whole ring clears it.
        tier.slot_for_write(100).expect("newer");
        assert!(tier.slots.sums.iter().all(|&s| s == 0.0));
        assert_eq!(tier.oldest(), Some(97));
    }
}
