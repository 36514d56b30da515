//! The seam between the writer stage and the database it writes to.
//!
//! A [`Destination`] applies one range of a batch and commits it, or fails with a
//! [`WriteFailure`] that already says what kind of failure it is; what to do about it (retry,
//! split, bisect, stop) is decided by [`super::apply`] and [`crate::retry`], never here.
//!
//! Contract: when `write` or `delete` returns `Ok`, the rows are committed in the destination.
//! When it returns `Err`, they may or may not be (a lost acknowledgement): the caller may apply
//! the same rows again, so every implementation must tolerate duplicate writes (at-least-once).
//!
//! Implementations: [`PgDestination`](super::postgres::PgDestination) (the real one),
//! [`NullDestination`] (dry runs: accepts everything, writes nothing), and in tests a scripted
//! fake.

use std::future::Future;
use std::ops::Range;
use std::time::Duration;

use crate::batch::{KeyBatch, WriteBatch};
use crate::error::{classify, pg_message, Error, PgErrorKind};

use super::postgres::PgDestination;

/// What one committed write did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Written {
    /// Rows inserted or updated.
    pub(crate) rows: u64,
    /// Insert mode: rows skipped because their key was already in the target.
    pub(crate) already_present: u64,
}

/// A failed write, classified where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct WriteFailure {
    pub(crate) kind: PgErrorKind,
    /// The server's SQLSTATE, when the server answered.
    pub(crate) sqlstate: Option<String>,
    /// One line: the server's message, detail and hint.
    pub(crate) message: String,
    /// The session is gone: reconnect before retrying.
    pub(crate) closed: bool,
}

impl WriteFailure {
    pub(crate) fn from_pg(e: &tokio_postgres::Error) -> WriteFailure {
        WriteFailure {
            kind: classify(e),
            sqlstate: e.code().map(|c| c.code().to_string()),
            message: pg_message(e),
            closed: e.is_closed(),
        }
    }
}

/// A destination session.
pub(crate) trait Destination: Send {
    /// Writes rows `rows` of `batch`; committed when this returns `Ok`.
    fn write(
        &mut self,
        batch: &WriteBatch,
        rows: Range<usize>,
    ) -> impl Future<Output = Result<Written, WriteFailure>> + Send;

    /// Deletes keys `rows` of `keys`; returns how many rows were deleted. Committed on `Ok`.
    fn delete(
        &mut self,
        keys: &KeyBatch,
        rows: Range<usize>,
    ) -> impl Future<Output = Result<u64, WriteFailure>> + Send;

    /// Replaces a broken session with a new one.
    fn reconnect(&mut self) -> impl Future<Output = Result<(), Error>> + Send;

    /// The session's effective `statement_timeout`, if any.
    fn statement_timeout(&self) -> Option<Duration>;

    /// The session is known to be gone.
    fn is_closed(&self) -> bool;
}

/// Accepts everything and writes nothing: dry runs.
#[derive(Debug, Default)]
pub(crate) struct NullDestination;

impl Destination for NullDestination {
    async fn write(&mut self, _: &WriteBatch, rows: Range<usize>) -> Result<Written, WriteFailure> {
        Ok(Written {
            rows: rows.len() as u64,
            already_present: 0,
        })
    }
    async fn delete(&mut self, _: &KeyBatch, rows: Range<usize>) -> Result<u64, WriteFailure> {
        Ok(rows.len() as u64)
    }
    async fn reconnect(&mut self) -> Result<(), Error> {
        Ok(())
    }
    fn statement_timeout(&self) -> Option<Duration> {
        None
    }
    fn is_closed(&self) -> bool {
        false
    }
}

/// The destinations a run can have, without boxing futures.
pub(crate) enum AnyDestination {
    Postgres(Box<PgDestination>),
    Null(NullDestination),
}

impl Destination for AnyDestination {
    async fn write(
        &mut self,
        batch: &WriteBatch,
        rows: Range<usize>,
    ) -> Result<Written, WriteFailure> {
        match self {
            AnyDestination::Postgres(d) => d.write(batch, rows).await,
            AnyDestination::Null(d) => d.write(batch, rows).await,
        }
    }
    async fn delete(&mut self, keys: &KeyBatch, rows: Range<usize>) -> Result<u64, WriteFailure> {
        match self {
            AnyDestination::Postgres(d) => d.delete(keys, rows).await,
            AnyDestination::Null(d) => d.delete(keys, rows).await,
        }
    }
    async fn reconnect(&mut self) -> Result<(), Error> {
        match self {
            AnyDestination::Postgres(d) => d.reconnect().await,
            AnyDestination::Null(d) => d.reconnect().await,
        }
    }
    fn statement_timeout(&self) -> Option<Duration> {
        match self {
            AnyDestination::Postgres(d) => d.statement_timeout(),
            AnyDestination::Null(d) => d.statement_timeout(),
        }
    }
    fn is_closed(&self) -> bool {
        match self {
            AnyDestination::Postgres(d) => d.is_closed(),
            AnyDestination::Null(d) => d.is_closed(),
        }
    }
}
