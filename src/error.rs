//! Errors: one enum for the library, and the one place that maps SQLSTATE codes to a kind.
//!
//! Every message names what failed and what to do next. Connection strings in messages are the
//! redacted form from [`crate::conn::ConnInfo`]; no message ever carries a password.

use crate::copy::FrameError;
use crate::snapshot::SnapshotError;

/// What a database error means for the run, decided once from its SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PgErrorKind {
    /// The connection broke or the server is going away: reconnect and retry.
    Connection,
    /// Deadlock, serialization failure, lock timeout: retry the same work.
    Transient,
    /// `statement_timeout` cancelled the statement: retry with a smaller batch.
    StatementTimeout,
    /// The statement was too big for the server (program limits, out of memory): split it.
    TooBig,
    /// Classes 22 (data exception), 23 (integrity constraint) and P0 (an exception raised by a
    /// PL/pgSQL trigger on the target, e.g. `RAISE EXCEPTION`): a row is bad.
    Data,
    /// Anything else: permissions, missing objects, syntax. Retrying will not help.
    Fatal,
}

/// Classifies a tokio-postgres error.
pub fn classify(err: &tokio_postgres::Error) -> PgErrorKind {
    if err.is_closed() {
        return PgErrorKind::Connection;
    }
    let Some(code) = err.code() else {
        // No SQLSTATE: an I/O error on the socket.
        return PgErrorKind::Connection;
    };
    classify_sqlstate(code.code())
}

/// Classifies a five-character SQLSTATE.
pub fn classify_sqlstate(code: &str) -> PgErrorKind {
    match code {
        "57014" => PgErrorKind::StatementTimeout,
        // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections
        "57P01" | "57P02" | "57P03" | "53300" => PgErrorKind::Connection,
        // serialization_failure, deadlock_detected, lock_not_available
        "40001" | "40P01" | "55P03" => PgErrorKind::Transient,
        // in_failed_sql_transaction: a write's transaction was aborted by an error raised after
        // its statement completed (see `commit` in sink/postgres.rs); the batch is redone.
        "25P02" => PgErrorKind::Transient,
        c if c.starts_with("08") => PgErrorKind::Connection,
        "53200" => PgErrorKind::TooBig,
        c if c.starts_with("54") => PgErrorKind::TooBig,
        c if c.starts_with("22") || c.starts_with("23") || c.starts_with("P0") => PgErrorKind::Data,
        _ => PgErrorKind::Fatal,
    }
}

/// Renders a tokio-postgres error on one line, with the server's detail and hint when present.
pub fn pg_message(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(": ");
                s.push_str(d);
            }
            if let Some(h) = db.hint() {
                s.push_str("; hint: ");
                s.push_str(h);
            }
            s
        }
        None => {
            let mut s = err.to_string();
            let mut src = std::error::Error::source(err);
            while let Some(e) = src {
                s.push_str(": ");
                s.push_str(&e.to_string());
                src = e.source();
            }
            s
        }
    }
}

/// How a recovery conflict on a hot standby is explained, wherever it is reported.
pub(crate) const RECOVERY_CONFLICT_HINT: &str = "the source is a hot standby that cancelled the read to replay changes from its primary: on the standby, raise max_standby_streaming_delay (or max_standby_archive_delay) above the read's duration, or turn on hot_standby_feedback";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad flags, bad config file, bad model definition: exit code 2.
    #[error("{0}")]
    Config(String),

    #[error("cannot connect to the {role} database {target}: {message}")]
    Connect {
        role: &'static str,
        target: String,
        message: String,
    },

    /// The model and the target do not fit together (types, keys, columns): exit code 2.
    #[error("sync '{sync}': {message}")]
    Plan { sync: String, message: String },

    #[error("sync '{sync}': reading the source failed: {message}; nothing was deleted, and the next run picks up where this one stopped")]
    SourceRead {
        sync: String,
        message: String,
        /// A hot standby cancelled the read for a recovery conflict (SQLSTATE 40001 or 40P01
        /// on a standby): the run is retried.
        conflict: bool,
    },

    #[error("sync '{sync}': rebuilding the snapshot from the target {table} failed: {message}; nothing was written, and the next run tries again")]
    Rebuild {
        sync: String,
        table: String,
        message: String,
    },

    #[error(
        "sync '{sync}': verify could not read the target {table}: {message}; nothing was written"
    )]
    TargetRead {
        sync: String,
        table: String,
        message: String,
    },

    #[error("sync '{sync}': the source COPY stream is malformed: {source}")]
    Frame {
        sync: String,
        #[source]
        source: FrameError,
    },

    #[error("sync '{sync}': writing to {table} failed: {message}")]
    Write {
        sync: String,
        table: String,
        message: String,
        kind: PgErrorKind,
    },

    #[error("sync '{sync}': {message}")]
    Model { sync: String, message: String },

    #[error("sync '{sync}': {message}")]
    DeleteGuard { sync: String, message: String },

    #[error(transparent)]
    Snapshot(#[from] SnapshotError),

    #[error("{0}")]
    Server(String),

    #[error("sync '{sync}' was interrupted: {message}")]
    Interrupted { sync: String, message: String },

    #[error("sync '{sync}': {rejected} rows were rejected by {table}, more than --max-rejected {max}; the run stopped. Rows written so far are recorded; fix the rows or the target's constraints (the rejected rows are listed above and in the state file: pgdelta log --rejected)")]
    TooManyRejected {
        sync: String,
        table: String,
        rejected: u64,
        max: u64,
    },

    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// A failed statement of the source read: `what` was being done. A recovery conflict on a
    /// hot standby (SQLSTATE 40001 or 40P01: a read-only transaction meets neither on a primary)
    /// is marked for a retry and explained.
    pub(crate) fn source_read(sync: &str, what: &str, e: &tokio_postgres::Error) -> Error {
        use tokio_postgres::error::SqlState;
        let conflict = matches!(
            e.code(),
            Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
        );
        let mut message = match what {
            "" => pg_message(e),
            w => format!("{w}: {}", pg_message(e)),
        };
        if conflict {
            message = format!("{message} ({RECOVERY_CONFLICT_HINT})");
        }
        Error::SourceRead {
            sync: sync.into(),
            message,
            conflict,
        }
    }

    /// A recovery conflict on a hot standby source: worth retrying the run.
    pub fn is_recovery_conflict(&self) -> bool {
        matches!(self, Error::SourceRead { conflict: true, .. })
    }

    /// A stable name for the kind of failure, for logs a program reads (the audit table's
    /// `error_kind`): a scheduler can tell a timeout from a bad config without parsing text.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Connect { .. } => "connect",
            Error::Plan { .. } => "plan",
            Error::SourceRead { .. } => "source_read",
            Error::Rebuild { .. } => "rebuild",
            Error::TargetRead { .. } => "target_read",
            Error::Frame { .. } => "frame",
            Error::Write { kind, .. } => match kind {
                PgErrorKind::Connection => "write_connection",
                PgErrorKind::Transient => "write_transient",
                PgErrorKind::StatementTimeout => "write_timeout",
                PgErrorKind::TooBig => "write_too_big",
                PgErrorKind::Data => "write_data",
                PgErrorKind::Fatal => "write",
            },
            Error::Model { .. } => "model",
            Error::DeleteGuard { .. } => "delete_guard",
            Error::Snapshot(SnapshotError::Locked { .. }) => "state_locked",
            Error::Snapshot(_) => "state",
            Error::Server(_) => "server",
            Error::Interrupted { .. } => "interrupted",
            Error::TooManyRejected { .. } => "too_many_rejected",
            Error::Internal(_) => "internal",
        }
    }

    /// The process exit code for this error: 2 for usage and configuration, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Plan { .. } => 2,
            Error::Snapshot(SnapshotError::Locked { .. }) => 1,
            _ => 1,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A pipeline task that panicked or was cancelled.
pub(crate) fn join_err(e: tokio::task::JoinError) -> Error {
    Error::Internal(format!("a pipeline task failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_classes() {
        assert_eq!(classify_sqlstate("57014"), PgErrorKind::StatementTimeout);
        assert_eq!(classify_sqlstate("25P02"), PgErrorKind::Transient);
        assert_eq!(classify_sqlstate("23505"), PgErrorKind::Data);
        assert_eq!(classify_sqlstate("22P02"), PgErrorKind::Data);
        assert_eq!(classify_sqlstate("40P01"), PgErrorKind::Transient);
        assert_eq!(classify_sqlstate("57P01"), PgErrorKind::Connection);
        assert_eq!(classify_sqlstate("08006"), PgErrorKind::Connection);
        assert_eq!(classify_sqlstate("42501"), PgErrorKind::Fatal);
        assert_eq!(classify_sqlstate("54000"), PgErrorKind::TooBig);
        assert_eq!(classify_sqlstate("23514"), PgErrorKind::Data);
        // A trigger's RAISE EXCEPTION, and its ASSERT: row errors too.
        assert_eq!(classify_sqlstate("P0001"), PgErrorKind::Data);
        assert_eq!(classify_sqlstate("P0004"), PgErrorKind::Data);
    }
}
