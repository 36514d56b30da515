//! The retry policy: which failures are retried, how long to wait, and when to give up.
//!
//! One place decides, from the [`PgErrorKind`] of a failed write, what the writer does next;
//! the writer only carries it out. Backoff is exponential with full jitter, so writers that
//! lost their connections together do not reconnect in lockstep.

use std::time::Duration;

use crate::error::PgErrorKind;

/// What to do after a failed attempt on a range of rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Wait, reconnect (the session may be gone), and retry the same rows.
    Reconnect,
    /// Wait and retry the same rows on the same session.
    Retry,
    /// Retry the rows as two halves (statement timeout, statement too big).
    Split,
    /// Halve until the bad rows stand alone, write the rest, reject those.
    Bisect,
    /// Stop the run.
    Fail,
}

/// What a failure of `kind` calls for.
pub fn action(kind: PgErrorKind) -> Action {
    match kind {
        PgErrorKind::Connection => Action::Reconnect,
        PgErrorKind::Transient => Action::Retry,
        PgErrorKind::StatementTimeout | PgErrorKind::TooBig => Action::Split,
        PgErrorKind::Data => Action::Bisect,
        PgErrorKind::Fatal => Action::Fail,
    }
}

/// A one-line hint for the operator, per kind.
pub fn hint(kind: PgErrorKind) -> &'static str {
    match kind {
        PgErrorKind::Connection => "the destination was unreachable for longer than the retry budget; check the server and the network, then re-run (the next run resumes)",
        PgErrorKind::Transient => "lock conflicts persisted past the retry budget; find the competing sessions (pg_stat_activity, pg_locks) or run at a quieter time",
        PgErrorKind::StatementTimeout => "a single row exceeded statement_timeout; raise statement_timeout for pgdelta's role, or look for slow triggers on the target",
        PgErrorKind::TooBig => "a single row is too large for the server",
        PgErrorKind::Data => "fix the row in the source, or the target's constraint or trigger",
        PgErrorKind::Fatal => "this error does not go away by retrying; see the message",
    }
}

/// Bounds on retrying one piece of work.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts per piece of work, the first included.
    pub max_attempts: u32,
    /// Give up once this much time passed since the first failure.
    pub max_elapsed: Duration,
    /// First backoff; doubles per attempt up to `cap`.
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            max_elapsed: Duration::from_secs(300),
            base: Duration::from_millis(200),
            cap: Duration::from_secs(15),
        }
    }
}

impl RetryPolicy {
    /// The wait before attempt `attempt` (1 = the first retry): uniform in [d/2, d] where
    /// d = min(cap, base * 2^(attempt-1)).
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let d = exp.min(self.cap);
        d.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// Whether another attempt is allowed after `attempts` failed ones, `elapsed` after the
    /// first failure.
    pub fn allows(&self, attempts: u32, elapsed: Duration) -> bool {
        attempts < self.max_attempts && elapsed < self.max_elapsed
    }
}

/// A cheap jitter source in [0, 1) (no RNG dependency; quality is irrelevant here).
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, RandomState};
    let x = RandomState::new().hash_one(std::time::Instant::now());
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay(1, 1.0), Duration::from_millis(200));
        assert_eq!(p.delay(3, 1.0), Duration::from_millis(800));
        assert_eq!(p.delay(30, 1.0), Duration::from_secs(15));
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(100));
        assert!(p.allows(9, Duration::from_secs(1)));
        assert!(!p.allows(10, Duration::from_secs(1)));
        assert!(!p.allows(1, Duration::from_secs(301)));
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }

    #[test]
    fn each_kind_has_one_action() {
        assert_eq!(action(PgErrorKind::StatementTimeout), Action::Split);
        assert_eq!(action(PgErrorKind::Data), Action::Bisect);
        assert_eq!(action(PgErrorKind::Connection), Action::Reconnect);
        assert_eq!(action(PgErrorKind::Fatal), Action::Fail);
    }
}
