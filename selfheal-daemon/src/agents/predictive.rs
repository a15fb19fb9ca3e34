//! Predictive: warns before the target's memory reaches its limit.
//!
//! A least-squares line through the recent memory samples gives the growth rate; when the
//! line crosses the memory threshold within the horizon, a `Prediction` is published (at most
//! once per cooldown).

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use super::{AgentContext, AgentError};
use crate::bus::Event;

const WINDOW: usize = 30;
const HORIZON: Duration = Duration::from_hours(1);
const COOLDOWN: Duration = Duration::from_mins(5);
const MIB: f64 = 1024.0 * 1024.0;

/// Seconds until `points` (t seconds, value) reach `limit`, when they are rising.
pub(super) fn eta_seconds(points: &VecDeque<(f64, f64)>, limit: f64) -> Option<f64> {
    if points.len() < 5 {
        return None;
    }
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx).powi(2))
    });
    if den <= 0.0 {
        return None;
    }
    let slope = num / den;
    let (last_x, last_y) = *points.back()?;
    if slope <= 0.0 || last_y >= limit {
        return None;
    }
    let fitted_now = my + slope * (last_x - mx);
    Some(((limit - fitted_now) / slope).max(0.0))
}

pub(super) async fn run(mut ctx: AgentContext) -> Result<(), AgentError> {
    let start = Instant::now();
    let threshold = ctx.config.monitor.memory_threshold_percent / 100.0;
    let mut points = VecDeque::with_capacity(WINDOW);
    let mut host_memory = 0u64;
    let mut cooldown = super::Cooldown::new(COOLDOWN);
    loop {
        match ctx.next().await? {
            Event::HostSample(sample) => host_memory = sample.memory_total_bytes,
            Event::TargetStarted { .. } => points.clear(),
            Event::ProcessSample(sample) => {
                let used = sample.cgroup_memory_bytes.unwrap_or(sample.rss_bytes) as f64;
                let limit =
                    sample.cgroup_memory_limit_bytes.unwrap_or(host_memory) as f64 * threshold;
                if points.len() == WINDOW {
                    points.pop_front();
                }
                points.push_back((start.elapsed().as_secs_f64(), used));
                let Some(eta) = eta_seconds(&points, limit) else {
                    continue;
                };
                if eta < HORIZON.as_secs_f64() && cooldown.pass() {
                    ctx.publish(Event::Prediction {
                        resource: "memory".to_owned(),
                        threshold: limit,
                        eta_seconds: eta,
                        detail: format!(
                            "memory grows by {:.2} MiB/s and reaches {:.0} MiB ({:.0} % of its limit) in {eta:.0} s",
                            {
                                let (first, last) = (points.front().map_or(0.0, |p| p.1), points.back().map_or(0.0, |p| p.1));
                                let span = points.back().map_or(0.0, |p| p.0) - points.front().map_or(0.0, |p| p.0);
                                if span > 0.0 { (last - first) / span / MIB } else { 0.0 }
                            },
                            limit / MIB,
                            threshold * 100.0
                        ),
                    });
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_steady_rise_has_an_eta() {
        let points: VecDeque<_> = (0..10)
            .map(|i| (f64::from(i), 100.0 + 10.0 * f64::from(i)))
            .collect();
        let eta = eta_seconds(&points, 290.0).expect("rising");
        // 190 now, rising 10 a second: 290 in 10 s.
        assert!((eta - 10.0).abs() < 1e-6, "{eta}");
        let flat: VecDeque<_> = (0..10).map(|i| (f64::from(i), 100.0)).collect();
        assert_eq!(eta_seconds(&flat, 290.0), None);
    }
}
