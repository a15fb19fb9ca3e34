//! Load shedding of the payload capture: how many of the target's connections the kernel
//! programs capture (one in `1 << level`, see `selfheal_ebpf::sampled_in`).
//!
//! Two things make the daemon shed: its decoders falling behind (their ring filling up), and
//! the host running out of idle CPU (the share of all CPUs' time that was idle, from
//! `/proc/stat`). While a CPU sits idle the capture's work costs the target next to nothing;
//! on a saturated host every microsecond the capture spends is one the target does not get,
//! and a shed connection costs the target only the kernel's sampling test. Shedding is by
//! whole connection, so what is kept is decoded exactly (a connection's parsers
//! resynchronise when it comes back), and it is exported (`selfheal_capture_sampling_ratio`,
//! `selfheal_ebpf_ringbuf_drops_total{reason="shed"}`). Requests that started before the
//! shedding ended are not reported as waiting for an answer (`Metrics::set_capture_shedding`):
//! theirs may have been shed.
//!
//! The target's own CPU pressure (PSI) was measured as the signal first and does not tell a
//! saturated host from a half-loaded one: its threads queue behind each other at every
//! request (BENCHMARKS.md, ninth measurement).
//!
//! Must not: shed while the host has CPU to spare, or come back all at once (one step at a
//! time, each after a calm second, on either side).

use std::time::{Duration, Instant};

/// At most one connection in `1 << MAX_LEVEL` is kept.
pub const MAX_LEVEL: u32 = 4;

/// How long the host must stay calm (see [`calm_above`]), or the ring under half full,
/// before a step back to more connections.
const CALM: Duration = Duration::from_secs(1);

/// Readings closer together than this are merged into the next (`/proc/stat` counts in
/// 10 ms ticks: over 250 ms of two CPUs, a tick is 2 %).
const MIN_READING: Duration = Duration::from_millis(250);

/// The ring's share of the level: keep every connection while the decoders' ring is at
/// least half free, then fewer and fewer.
pub fn queue_level(free: f64) -> u32 {
    match free {
        f if f >= 0.5 => 0,
        f if f >= 0.25 => 1,
        f if f >= 0.1 => 2,
        _ => MAX_LEVEL,
    }
}

/// The decoders' side of the shedding: up at once to what their ring's fill asks, back one
/// step per [`CALM`] second (shedding empties the ring fast; coming back all at once would
/// fill it again).
#[derive(Debug, Default)]
pub struct QueueSide {
    level: u32,
    changed: Option<Instant>,
}

impl QueueSide {
    /// The level for a ring with `free` (0–1) of its room free.
    pub fn observe(&mut self, now: Instant, free: f64) -> u32 {
        let wanted = queue_level(free);
        if wanted > self.level {
            self.level = wanted;
            self.changed = Some(now);
        } else if wanted < self.level
            && self.changed.is_none_or(|at| now.duration_since(at) >= CALM)
        {
            self.level -= 1;
            self.changed = Some(now);
        }
        self.level
    }
}

/// The idle share (%) over which the host counts as calm, for a threshold: twice it, at most
/// halfway from it to 100 (a threshold of 50 or more still comes back; 100 never does).
fn calm_above(threshold: f64) -> f64 {
    (threshold * 2.0).min(f64::midpoint(threshold, 100.0))
}

/// The next level after a reading of `idle_percent`: one step up while the host is idle less
/// than `threshold` % of the time, one step down once it has been calm (see [`calm_above`])
/// for [`CALM`] (`calm_for`). A threshold of 0 never sheds.
pub fn next_level(level: u32, idle_percent: f64, threshold: f64, calm_for: Duration) -> u32 {
    if threshold <= 0.0 {
        0
    } else if idle_percent < threshold {
        (level + 1).min(MAX_LEVEL)
    } else if idle_percent > calm_above(threshold) && calm_for >= CALM {
        level.saturating_sub(1)
    } else {
        level
    }
}

/// The idle and total ticks of all CPUs, from the first line of `/proc/stat` (idle and
/// iowait count as idle).
pub fn parse_cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal guest guest_nice: guest time is already
    // in user and nice.
    let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
    let total = fields.iter().take(8).sum();
    Some((idle, total))
}

/// The host side of the shedding: its idle CPU share, read on the drain timer.
pub struct Shedding {
    /// Idle share (%) under which to shed; 0: never for the host's load.
    threshold: f64,
    stat: std::path::PathBuf,
    last: Option<(Instant, u64, u64)>,
    /// Since when the host has been idle more than twice the threshold.
    calm_since: Option<Instant>,
    level: u32,
    /// The last idle share read, in %.
    idle_percent: f64,
    /// Whether `stat` could not be read (warned once).
    unreadable: bool,
}

impl Shedding {
    pub fn new(threshold: f64) -> Self {
        Self {
            threshold,
            stat: "/proc/stat".into(),
            last: None,
            calm_since: None,
            level: 0,
            idle_percent: 100.0,
            unreadable: false,
        }
    }

    /// Reads the host's idle share since the last reading and returns the level.
    pub fn observe(&mut self, now: Instant) -> u32 {
        if self.threshold <= 0.0 {
            return 0;
        }
        if self
            .last
            .is_some_and(|(at, _, _)| now.duration_since(at) < MIN_READING)
        {
            return self.level;
        }
        let Some((idle, total)) = std::fs::read_to_string(&self.stat)
            .ok()
            .as_deref()
            .and_then(parse_cpu_ticks)
        else {
            // Unreadable: no host side.
            if !self.unreadable {
                tracing::warn!(path = %self.stat.display(), "cannot read the host's CPU time: the payload capture sheds only when its decoders fall behind");
                self.unreadable = true;
            }
            self.last = None;
            self.level = 0;
            return 0;
        };
        if let Some((_, idle_before, total_before)) = self.last {
            let ticks = total.saturating_sub(total_before);
            if ticks == 0 {
                return self.level;
            }
            self.idle_percent = idle.saturating_sub(idle_before) as f64 * 100.0 / ticks as f64;
            if self.idle_percent > calm_above(self.threshold) {
                self.calm_since.get_or_insert(now);
            } else {
                self.calm_since = None;
            }
            let calm_for = self.calm_since.map_or(Duration::ZERO, |since| now - since);
            let level = next_level(self.level, self.idle_percent, self.threshold, calm_for);
            if level < self.level {
                // Each step back waits its own calm second.
                self.calm_since = Some(now);
            }
            self.level = level;
        }
        self.last = Some((now, idle, total));
        self.level
    }

    /// The last idle share read, in %.
    pub fn idle_percent(&self) -> f64 {
        self.idle_percent
    }

    /// Forgets the readings (nothing is captured: the next capture starts unshed).
    pub fn reset(&mut self) {
        self.last = None;
        self.calm_since = None;
        self.level = 0;
        self.idle_percent = 100.0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_host_sheds_step_by_step_and_comes_back_after_calm_seconds() {
        let calm = Duration::ZERO;
        // Idle over the threshold: nothing shed; under it, one step per reading to the cap.
        assert_eq!(next_level(0, 10.1, 10.0, calm), 0);
        let mut level = 0;
        for _ in 0..10 {
            level = next_level(level, 3.0, 10.0, calm);
        }
        assert_eq!(level, MAX_LEVEL);
        // Between the threshold and twice it, the level holds however long it lasts.
        assert_eq!(
            next_level(level, 15.0, 10.0, Duration::from_mins(1)),
            MAX_LEVEL
        );
        // Over twice, one step back only after a calm second.
        assert_eq!(
            next_level(level, 50.0, 10.0, Duration::from_millis(900)),
            MAX_LEVEL
        );
        assert_eq!(next_level(level, 50.0, 10.0, CALM), MAX_LEVEL - 1);
        // A threshold of 0 turns the host side off.
        assert_eq!(next_level(3, 0.0, 0.0, calm), 0);
        // A high threshold still comes back, halfway to 100; 100 never does.
        assert_eq!(next_level(2, 81.0, 60.0, CALM), 1);
        assert_eq!(next_level(2, 79.0, 60.0, CALM), 2);
        assert_eq!(next_level(2, 100.0, 100.0, CALM), 2);
    }

    #[test]
    fn the_queue_side_sheds_at_once_and_comes_back_a_step_per_calm_second() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut queue = QueueSide::default();
        assert_eq!(queue.observe(at(0), 1.0), 0);
        assert_eq!(queue.observe(at(100), 0.05), MAX_LEVEL);
        // Emptied at once by the shedding: back one step per second, not all the way.
        assert_eq!(queue.observe(at(200), 1.0), MAX_LEVEL);
        assert_eq!(queue.observe(at(1100), 1.0), MAX_LEVEL - 1);
        assert_eq!(queue.observe(at(1500), 1.0), MAX_LEVEL - 1);
        assert_eq!(queue.observe(at(2100), 1.0), MAX_LEVEL - 2);
        // Filling again: up at once.
        assert_eq!(queue.observe(at(2200), 0.3), MAX_LEVEL - 2);
        assert_eq!(queue.observe(at(2300), 0.0), MAX_LEVEL);
    }

    #[test]
    fn a_filling_queue_sheds_more_and_more() {
        assert_eq!(queue_level(1.0), 0);
        assert_eq!(queue_level(0.5), 0);
        assert_eq!(queue_level(0.3), 1);
        assert_eq!(queue_level(0.1), 2);
        assert_eq!(queue_level(0.0), MAX_LEVEL);
    }

    #[test]
    fn proc_stat_parses() {
        let stat = "cpu  100 5 50 800 20 3 2 10 7 0\ncpu0 50 2 25 400 10 1 1 5 3 0\n";
        assert_eq!(parse_cpu_ticks(stat), Some((820, 990)));
        // Old kernels have fewer columns.
        assert_eq!(parse_cpu_ticks("cpu  1 2 3 4\n"), Some((4, 10)));
        assert_eq!(parse_cpu_ticks("cpu0 1 2 3 4\n"), None);
        assert_eq!(parse_cpu_ticks("cpu  1 x 3 4\n"), None);
        assert_eq!(parse_cpu_ticks("cpu  1 2\n"), None);
        assert_eq!(parse_cpu_ticks(""), None);
    }

    #[test]
    fn the_idle_share_is_read_from_proc_stat_between_readings() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stat");
        let mut shedding = Shedding::new(10.0);
        shedding.stat = file.clone();
        // `busy` and `idle` ticks so far.
        let write = |busy: u64, idle: u64| {
            std::fs::write(&file, format!("cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\n")).unwrap();
        };
        let ms = |n: u64| Duration::from_millis(n);
        let start = Instant::now();
        write(1000, 1000);
        assert_eq!(
            shedding.observe(start),
            0,
            "a first reading has nothing to compare"
        );
        // 50 ticks, 2 of them idle: 4 %.
        write(1048, 1002);
        assert_eq!(shedding.observe(start + ms(250)), 1);
        assert!((shedding.idle_percent() - 4.0).abs() < 1e-9);
        // A reading too soon after is merged into the next.
        assert_eq!(shedding.observe(start + ms(300)), 1);
        // (at ms, busy ticks, idle ticks so far, level)
        let readings = [
            (500, 1096, 1004, 2),
            // Calm (60 % idle) from 750 ms on: a step back a second later, another after that.
            (750, 1116, 1034, 2),
            (1750, 1196, 1154, 1),
            (2000, 1216, 1184, 1),
            (2750, 1296, 1304, 0),
            // Busy again.
            (3000, 1346, 1304, 1),
        ];
        for (at, busy, idle, level) in readings {
            write(busy, idle);
            assert_eq!(shedding.observe(start + ms(at)), level, "at {at} ms");
        }
        // The file gone: no host side.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(shedding.observe(start + ms(3250)), 0);
    }
}
