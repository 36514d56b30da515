//! The batch-size controller shared by the diff (which reads the size when cutting batches)
//! and the writers (which report commit latency and statement timeouts): additive increase,
//! multiplicative decrease on observed latency, halving on a statement timeout, or a pinned size
//! when the user asks for one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Batch settings, as given by the user or defaulted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchSettings {
    /// Pin the batch size (rows); `None` adapts it.
    pub fixed_rows: Option<usize>,
    /// Pause between batches on each writer.
    pub sleep: Duration,
    /// The commit latency the adaptive controller aims under.
    pub target_latency: Duration,
    /// Lower and upper bounds for the adaptive size.
    pub min_rows: usize,
    pub max_rows: usize,
    /// A batch is cut at this many bytes whatever its row count (memory bound).
    pub max_bytes: usize,
    /// Destination sessions writing batches concurrently.
    pub writers: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            fixed_rows: None,
            sleep: Duration::ZERO,
            target_latency: Duration::from_secs(2),
            min_rows: 1,
            max_rows: 500_000,
            max_bytes: 8 << 20,
            writers: 2,
        }
    }
}

/// The batch-size controller shared by the batch builder (which reads the size) and the
/// writers (which report latency and timeouts).
pub(crate) struct Sizer {
    settings: BatchSettings,
    started: std::time::Instant,
    /// Every committed batch: (seconds since start, rows, latency ms). Bounded by the number of
    /// batches, which the byte cap keeps to thousands even for very large runs.
    log: Mutex<Vec<(f32, u32, f32)>>,
    current: AtomicUsize,
    /// The destination's effective statement_timeout in ms (0: none).
    timeout_ms: std::sync::atomic::AtomicU64,
    stats: Mutex<SizerStats>,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub(crate) struct SizerStats {
    pub batches: u64,
    pub min_batch: usize,
    pub max_batch: usize,
    pub timeouts: u64,
}

/// The first adaptive batch: small enough to commit quickly on a slow destination.
const START_ROWS: usize = 10_000;

impl Sizer {
    pub(crate) fn new(settings: BatchSettings) -> Sizer {
        let start = settings
            .fixed_rows
            .unwrap_or(START_ROWS.clamp(settings.min_rows, settings.max_rows));
        Sizer {
            settings,
            started: std::time::Instant::now(),
            log: Mutex::new(Vec::new()),
            current: AtomicUsize::new(start.max(1)),
            timeout_ms: std::sync::atomic::AtomicU64::new(0),
            stats: Mutex::new(SizerStats::default()),
        }
    }

    pub(crate) fn settings(&self) -> &BatchSettings {
        &self.settings
    }

    /// Rows per batch right now.
    pub(crate) fn rows(&self) -> usize {
        self.current.load(Ordering::Relaxed)
    }

    /// A batch of `rows` committed after `latency`: grow while comfortably under the target,
    /// back off when over it.
    pub(crate) fn committed(&self, rows: usize, latency: Duration) {
        self.log.lock().unwrap().push((
            self.started.elapsed().as_secs_f32(),
            rows as u32,
            latency.as_secs_f32() * 1000.0,
        ));
        {
            let mut s = self.stats.lock().unwrap();
            s.batches += 1;
            s.min_batch = if s.batches == 1 {
                rows
            } else {
                s.min_batch.min(rows)
            };
            s.max_batch = s.max_batch.max(rows);
        }
        if self.settings.fixed_rows.is_some() {
            return;
        }
        let cur = self.rows();
        // Only a batch that was actually full says anything about the size limit.
        if rows < cur / 2 {
            return;
        }
        let target = self.target_latency();
        let next = if latency > target {
            cur * 3 / 4
        } else if latency < target / 2 {
            cur * 2
        } else {
            cur + cur / 8
        };
        self.set(next);
    }

    /// Aims batch latency at no more than half of the destination's `statement_timeout`, so
    /// the size settles below the timeout instead of oscillating across it.
    pub(crate) fn limit_latency(&self, statement_timeout: Duration) {
        let ms = statement_timeout.as_millis().max(1) as u64;
        self.timeout_ms.fetch_min(ms, Ordering::Relaxed);
        // fetch_min on 0 ("none yet") keeps 0; store explicitly the first time.
        let _ = self
            .timeout_ms
            .compare_exchange(0, ms, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// The latency the controller aims under.
    pub(crate) fn target_latency(&self) -> Duration {
        let t = self.settings.target_latency;
        match self.timeout_ms.load(Ordering::Relaxed) {
            0 => t,
            ms => t.min(Duration::from_millis(ms / 2)),
        }
    }

    /// A statement timeout on a batch of `rows`: halve below it.
    pub(crate) fn timed_out(&self, rows: usize) {
        self.stats.lock().unwrap().timeouts += 1;
        self.set(rows / 2);
    }

    fn set(&self, rows: usize) {
        let s = &self.settings;
        let v = rows.clamp(s.min_rows.max(1), s.max_rows.max(1));
        self.current.store(v, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> SizerStats {
        *self.stats.lock().unwrap()
    }

    /// Every committed batch: (seconds since start, rows, latency in ms).
    pub(crate) fn log(&self) -> Vec<(f32, u32, f32)> {
        self.log.lock().unwrap().clone()
    }

    /// Batch latency percentiles in ms (p50, p95, p99); zeros without batches.
    pub(crate) fn latency_percentiles(&self) -> [f32; 3] {
        let mut l: Vec<f32> = self.log.lock().unwrap().iter().map(|e| e.2).collect();
        if l.is_empty() {
            return [0.0; 3];
        }
        l.sort_by(|a, b| a.total_cmp(b));
        let at = |p: f64| l[((l.len() - 1) as f64 * p).round() as usize];
        [at(0.50), at(0.95), at(0.99)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_when_fast_and_shrinks_when_slow() {
        let s = Sizer::new(BatchSettings::default());
        let start = s.rows();
        s.committed(start, Duration::from_millis(10));
        assert_eq!(s.rows(), start * 2);
        let big = s.rows();
        s.committed(big, Duration::from_secs(10));
        assert_eq!(s.rows(), big * 3 / 4);
        s.timed_out(s.rows());
        assert_eq!(s.rows(), big * 3 / 8);
        // A short (last) batch does not move the size.
        let now = s.rows();
        s.committed(1, Duration::from_millis(1));
        assert_eq!(s.rows(), now);
        assert_eq!(s.stats().batches, 3);
        assert_eq!(s.stats().timeouts, 1);
    }

    /// A simulated destination: latency = rows * cost; a batch over `timeout` times out.
    /// The controller must converge under the timeout, recover after a slow spell, and keep
    /// the share of timed-out batches small.
    #[test]
    fn simulation_converges_and_recovers() {
        let s = Sizer::new(BatchSettings::default());
        let timeout = Duration::from_millis(500);
        s.limit_latency(timeout);
        let run = |cost_us: u64, steps: usize| -> (usize, u64) {
            let mut timeouts = 0;
            for _ in 0..steps {
                let rows = s.rows();
                let latency = Duration::from_micros(rows as u64 * cost_us);
                if latency > timeout {
                    s.timed_out(rows);
                    timeouts += 1;
                } else {
                    s.committed(rows, latency);
                }
            }
            (s.rows(), timeouts)
        };
        // 10 us/row: at most 50k rows fit under 500 ms; the aim is about 250 ms.
        let (rows, t1) = run(10, 200);
        assert!((12_000..50_000).contains(&rows), "settled at {rows}");
        let (_, t_late) = run(10, 100);
        assert_eq!(t_late, 0, "no timeouts once settled");
        // The destination slows down 10x: the size drops below the new limit.
        let (rows, t2) = run(100, 100);
        assert!(rows < 5_000, "after slowdown {rows}");
        assert!(t2 <= 5, "{t2} timeouts while adapting");
        // And recovers when it is fast again.
        let (rows, _) = run(10, 100);
        assert!(rows >= 6_000, "recovered to {rows}");
        assert!(t1 <= 5, "{t1} timeouts while converging");
    }

    #[test]
    fn pinned_size_never_moves() {
        let s = Sizer::new(BatchSettings {
            fixed_rows: Some(1000),
            ..Default::default()
        });
        s.committed(1000, Duration::from_millis(1));
        assert_eq!(s.rows(), 1000);
    }
}
