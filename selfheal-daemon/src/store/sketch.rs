//! The distribution sketch: log-linear bins over the whole positive `f64` range, stored per
//! bucket as a fixed window of [`WINDOW`] bins that collapses its lowest bins.
//!
//! Owns: the value → bin mapping, the per-bucket window (insert, collapse) and the merged
//! sketch that queries build from many windows. Must not: allocate on the write path.
//!
//! # The mapping (HDR-lite)
//!
//! Each power of two `[2^e, 2^(e+1))` is split into [`SUB_BUCKETS`] bins of equal width,
//! read straight from the top mantissa bits of the `f64`, so a write costs no logarithm. A
//! bin `[L, L + w)` is reported as the value `2L(L + w) / (2L + w)`, whose distance to any
//! value of the bin is at most `w / (2L + w) ≤ 1 / (2·SUB_BUCKETS + 1)`: that is
//! [`RELATIVE_ERROR`] (1/17 ≈ 5.9 %). Values `≤ 0` (and subnormals) count as the smallest
//! positive value; they are not expected for latencies.
//!
//! # The window
//!
//! A bucket keeps only the [`WINDOW`] bins ending at the highest bin it has seen
//! (`WINDOW / SUB_BUCKETS` = 8 powers of two, a 256× spread). Lower values are added to the
//! window's lowest bin, as in `DDSketch`'s collapsing-lowest store: p95 and p99, which alerts
//! use, keep the stated error; a quantile more than 256× below the bucket's maximum is
//! reported as that floor. The window is a function of the bucket's samples only (its top is
//! their maximum), so merging windows and then collapsing gives exactly the window of the
//! union: a coarser tier is the exact aggregate of a finer one.

/// Bins per power of two, as a shift.
pub(crate) const SUB_BUCKET_BITS: u32 = 3;
/// Bins per power of two.
pub const SUB_BUCKETS: u32 = 1 << SUB_BUCKET_BITS;
/// Bins kept per bucket.
pub const WINDOW: usize = 64;
/// The largest relative error of a quantile whose value lies within the window of every
/// bucket merged into it: `1 / (2·SUB_BUCKETS + 1)`.
pub const RELATIVE_ERROR: f64 = 1.0 / (2.0 * SUB_BUCKETS as f64 + 1.0);
/// How many times smaller than its bucket's largest value a value may be and still be
/// kept at full resolution: `2^(WINDOW / SUB_BUCKETS)`.
pub const WINDOW_SPREAD: f64 = 256.0;

/// The `top` of a bucket that holds nothing.
pub(crate) const EMPTY_TOP: i16 = i16::MIN;

const _: () = assert!((WINDOW as u32).is_multiple_of(SUB_BUCKETS));
const _: () = assert!((1u64 << (WINDOW as u32 / SUB_BUCKETS)) as f64 == WINDOW_SPREAD);

/// The bin of a finite value. Bins run from -8176 (`f64::MIN_POSITIVE` and below) to 8191
/// (`f64::MAX`), so they fit an `i16` with room for [`EMPTY_TOP`].
pub(crate) fn bin_index(value: f64) -> i16 {
    let value = if value < f64::MIN_POSITIVE {
        f64::MIN_POSITIVE
    } else {
        value
    };
    let bits = value.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32 - 1023;
    let sub = ((bits >> (52 - SUB_BUCKET_BITS)) & u64::from(SUB_BUCKETS - 1)) as i32;
    // exponent ∈ [-1022, 1023], so the index ∈ [-8176, 8191].
    (exponent * SUB_BUCKETS as i32 + sub) as i16
}

/// The value that stands for every value of a bin (see the module docs).
pub(crate) fn bin_value(index: i16) -> f64 {
    let index = i32::from(index);
    let exponent = index.div_euclid(SUB_BUCKETS as i32);
    let sub = f64::from(index.rem_euclid(SUB_BUCKETS as i32));
    let width = 1.0 / f64::from(SUB_BUCKETS);
    let low = 1.0 + sub * width;
    let within_octave = 2.0 * low * (low + width) / (2.0 * low + width);
    within_octave * 2f64.powi(exponent)
}

/// Adds `count` samples of bin `index` to a bucket's window (`bins` has [`WINDOW`] entries,
/// position `p` holding bin `top - WINDOW + 1 + p`). O(1), or O([`WINDOW`]) when a new
/// maximum moves the window up.
pub(crate) fn window_insert(bins: &mut [u32], top: &mut i16, index: i16, count: u32) {
    debug_assert_eq!(bins.len(), WINDOW);
    if *top == EMPTY_TOP {
        *top = index;
    } else if index > *top {
        let shift = (i32::from(index) - i32::from(*top)) as usize;
        let collapsed = if shift >= WINDOW {
            let all = bins.iter().fold(0u32, |acc, &c| acc.saturating_add(c));
            bins.fill(0);
            all
        } else {
            let low = bins[..=shift]
                .iter()
                .fold(0u32, |acc, &c| acc.saturating_add(c));
            bins.copy_within(shift + 1.., 1);
            bins[WINDOW - shift..].fill(0);
            low
        };
        bins[0] = collapsed;
        *top = index;
    }
    let floor = i32::from(*top) - WINDOW as i32 + 1;
    let position = (i32::from(index) - floor).max(0) as usize;
    bins[position] = bins[position].saturating_add(count);
}

/// A running distribution of fixed size outside the store (one bucket's window: 266 bytes,
/// same error bounds), for tables that keep a distribution per key.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSketch {
    bins: [u32; WINDOW],
    top: i16,
    sum: f64,
}

impl Default for WindowSketch {
    fn default() -> Self {
        Self {
            bins: [0; WINDOW],
            top: EMPTY_TOP,
            sum: 0.0,
        }
    }
}

impl WindowSketch {
    /// Adds one sample; values that are not finite are ignored.
    pub fn insert(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        window_insert(&mut self.bins, &mut self.top, bin_index(value), 1);
        self.sum += value.max(0.0);
    }

    /// The samples as a sketch to read quantiles from.
    pub fn merged(&self) -> MergedSketch {
        let mut merged = MergedSketch::new();
        merged.add_window(&self.bins, self.top, self.sum);
        merged
    }
}

/// Many windows merged, for a query: no collapse, so the result is as exact as its parts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergedSketch {
    /// Bin of `counts[0]`.
    low: i16,
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl MergedSketch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Samples merged in.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the samples' values (exact, not from the bins).
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Mean of the samples, `None` when empty.
    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The `q`-quantile (`0 ≤ q ≤ 1`) by nearest rank: the value of the sample at rank
    /// `⌈q·n⌉` (at least 1), within [`RELATIVE_ERROR`] (see the module docs for values far
    /// below a bucket's maximum). `None` when empty or `q` is out of range.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (offset, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bin_value(self.low + offset as i16));
            }
        }
        // Unreachable while `count` is the sum of `counts`; report the top bin rather than
        // panic.
        self.counts
            .len()
            .checked_sub(1)
            .map(|last| bin_value(self.low + last as i16))
    }

    /// Makes `counts` cover bins `low..=high`.
    fn reserve(&mut self, low: i16, high: i16) {
        if self.counts.is_empty() {
            self.low = low;
            self.counts
                .resize((i32::from(high) - i32::from(low)) as usize + 1, 0);
            return;
        }
        if low < self.low {
            let grow = (i32::from(self.low) - i32::from(low)) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.low = low;
        }
        let needed = (i32::from(high) - i32::from(self.low)) as usize + 1;
        if needed > self.counts.len() {
            self.counts.resize(needed, 0);
        }
    }

    /// Adds `count` samples of one bin.
    fn add_bin(&mut self, index: i16, count: u64) {
        if count == 0 {
            return;
        }
        self.reserve(index, index);
        let position = (i32::from(index) - i32::from(self.low)) as usize;
        self.counts[position] += count;
        self.count += count;
    }

    /// Merges one bucket's window.
    pub(crate) fn add_window(&mut self, bins: &[u32], top: i16, sum: f64) {
        if top == EMPTY_TOP {
            return;
        }
        let floor = i32::from(top) - WINDOW as i32 + 1;
        if let Some(first) = bins.iter().position(|&c| c > 0) {
            // One reservation for the whole window, so the adds below do not reallocate.
            self.reserve((floor + first as i32) as i16, top);
        }
        for (position, &c) in bins.iter().enumerate() {
            if c > 0 {
                self.add_bin((floor + position as i32) as i16, u64::from(c));
            }
        }
        self.sum += sum;
    }

    /// Merges another merged sketch.
    pub fn merge(&mut self, other: &MergedSketch) {
        for (offset, &c) in other.counts.iter().enumerate() {
            self.add_bin(other.low + offset as i16, c);
        }
        self.sum += other.sum;
    }

    /// The window a single bucket holding exactly these samples would have: its top and
    /// its [`WINDOW`] bins (saturating at `u32::MAX`). `None` when empty.
    pub fn collapsed(&self) -> Option<(i16, [u32; WINDOW])> {
        let top_offset = self.counts.iter().rposition(|&c| c > 0)?;
        let top = self.low + top_offset as i16;
        let floor = i32::from(top) - WINDOW as i32 + 1;
        let mut bins = [0u32; WINDOW];
        for (offset, &c) in self.counts.iter().enumerate() {
            let index = i32::from(self.low) + offset as i32;
            let position = (index - floor).max(0) as usize;
            let c = u32::try_from(c).unwrap_or(u32::MAX);
            bins[position] = bins[position].saturating_add(c);
        }
        Some((top, bins))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn within(estimate: f64, exact: f64) -> bool {
        (estimate - exact).abs() <= RELATIVE_ERROR * exact.abs() * (1.0 + 1e-12)
    }

    #[test]
    fn bin_value_is_within_the_stated_error_of_every_value_of_its_bin() {
        for value in [
            1e-9,
            0.001,
            0.0123,
            1.0,
            1.124_999,
            1.125,
            1.999_999,
            2.0,
            3.7,
            250.0,
            1e6,
            f64::MAX / 4.0,
        ] {
            let estimate = bin_value(bin_index(value));
            assert!(within(estimate, value), "{value} -> {estimate}");
        }
    }

    #[test]
    fn bins_are_ordered_and_cover_the_extremes() {
        assert_eq!(bin_index(0.0), bin_index(f64::MIN_POSITIVE));
        assert_eq!(bin_index(-5.0), -8176);
        assert_eq!(bin_index(f64::MAX), 8191);
        assert!(bin_value(8191).is_finite());
        assert!(bin_index(1.0) < bin_index(1.2));
        assert!(bin_index(1.9) < bin_index(2.0));
    }

    #[test]
    fn window_collapses_values_far_below_the_maximum() {
        let mut bins = [0u32; WINDOW];
        let mut top = EMPTY_TOP;
        window_insert(&mut bins, &mut top, bin_index(1.0), 3);
        window_insert(&mut bins, &mut top, bin_index(1000.0), 1);
        // 1.0 is more than 256× below 1000: it now sits in the lowest bin.
        assert_eq!(top, bin_index(1000.0));
        assert_eq!(bins[0], 3);
        assert_eq!(bins[WINDOW - 1], 1);
        window_insert(&mut bins, &mut top, bin_index(0.5), 2);
        assert_eq!(bins[0], 5);
        let mut merged = MergedSketch::new();
        merged.add_window(&bins, top, 0.0);
        assert_eq!(merged.count(), 6);
        let floor = bin_value(bin_index(1000.0) - WINDOW as i16 + 1);
        assert_eq!(merged.quantile(0.5), Some(floor));
        assert!(within(merged.quantile(1.0).unwrap_or_default(), 1000.0));
    }

    proptest! {
        #[test]
        fn bin_value_within_error(value in 1e-300f64..1e300) {
            prop_assert!(within(bin_value(bin_index(value)), value));
        }

        #[test]
        fn collapse_of_merge_equals_window_of_union(
            parts in prop::collection::vec(prop::collection::vec(1e-3f64..1e4, 0..40), 1..6),
        ) {
            let mut union_bins = [0u32; WINDOW];
            let mut union_top = EMPTY_TOP;
            let mut merged = MergedSketch::new();
            for part in &parts {
                let mut bins = [0u32; WINDOW];
                let mut top = EMPTY_TOP;
                for &v in part {
                    window_insert(&mut bins, &mut top, bin_index(v), 1);
                    window_insert(&mut union_bins, &mut union_top, bin_index(v), 1);
                }
                merged.add_window(&bins, top, 0.0);
            }
            match merged.collapsed() {
                None => prop_assert_eq!(union_top, EMPTY_TOP),
                Some((top, bins)) => {
                    prop_assert_eq!(top, union_top);
                    prop_assert_eq!(bins, union_bins);
                }
            }
        }

        #[test]
        fn quantiles_within_error_when_spread_fits_the_window(
            mut values in prop::collection::vec(0.5f64..100.0, 1..500),
            q in 0.0f64..=1.0,
        ) {
            let mut bins = [0u32; WINDOW];
            let mut top = EMPTY_TOP;
            for &v in &values {
                window_insert(&mut bins, &mut top, bin_index(v), 1);
            }
            let mut merged = MergedSketch::new();
            merged.add_window(&bins, top, values.iter().sum());
            values.sort_by(f64::total_cmp);
            let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
            let exact = values[rank - 1];
            let estimate = merged.quantile(q).unwrap_or(f64::NAN);
            prop_assert!(within(estimate, exact), "q={} exact={} estimate={}", q, exact, estimate);
        }
    }
}
