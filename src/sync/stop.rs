//! One way to stop a run, whatever the reason: a cancellation token every stage watches, and
//! the first reason anyone gave.
//!
//! The invocation owns the root token (SIGINT/SIGTERM cancel it); each run gets a child, so a
//! run that fails stops its own stages and nothing else, while a signal stops every run.

use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

/// Why a run stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// SIGINT/SIGTERM (or the caller's token): finish what is in flight, record it, stop.
    Interrupted,
    /// A writer failed for good (its error is the one to report); the other stages stop.
    WriterFailed,
}

/// A run's stop token. Clones share it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Stop {
    token: CancellationToken,
    reason: Arc<OnceLock<StopReason>>,
}

impl Stop {
    /// A token that also stops when `parent` is cancelled (then the reason is `Interrupted`).
    pub(crate) fn child_of(parent: &CancellationToken) -> Stop {
        Stop {
            token: parent.child_token(),
            reason: Arc::default(),
        }
    }

    /// Stops the run; the first reason given is the one kept.
    pub(crate) fn stop(&self, reason: StopReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Why the run stopped; `None` while it has not.
    pub(crate) fn reason(&self) -> Option<StopReason> {
        match self.reason.get() {
            Some(r) => Some(*r),
            None => self.is_stopped().then_some(StopReason::Interrupted),
        }
    }

    /// Resolves once the run is stopped.
    pub(crate) async fn stopped(&self) {
        self.token.cancelled().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_parents_interrupt() {
        let root = CancellationToken::new();
        let a = Stop::child_of(&root);
        let b = Stop::child_of(&root);
        assert_eq!(a.reason(), None);
        a.stop(StopReason::WriterFailed);
        a.stop(StopReason::Interrupted);
        assert_eq!(a.reason(), Some(StopReason::WriterFailed));
        assert!(!b.is_stopped(), "a failed run stops only itself");
        root.cancel();
        assert_eq!(b.reason(), Some(StopReason::Interrupted));
    }
}
