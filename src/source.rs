//! The source stage: one session streams the generated query with binary
//! `COPY (...) TO STDOUT`, framed into blocks of whole tuples (never decoded) and sent to the
//! diff over a bounded channel. The same stage reads the target's synced columns when the
//! snapshot is rebuilt from the destination ([`ReadOf::Target`]). A full channel stops this task, which stops reading the
//! socket: the source server then waits on TCP (backpressure).
//!
//! Guarantee: a read is [`ReadEnd::Complete`] only when the stream ended with its trailer, and
//! only a complete read may produce deletes. On a stop the query is cancelled on the server.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::conn::ConnInfo;
use crate::copy::{Block, Framer};
use crate::error::{pg_message, Error};
use crate::plan::Plan;
use crate::sync::stop::Stop;
use crate::sync::Progress;

/// Session settings of the source read: its own `statement_timeout` (a short role-level one
/// must not kill a long read), and no idle-in-transaction limit.
pub(crate) fn session_settings(
    read_timeout: Option<std::time::Duration>,
) -> Vec<(&'static str, String)> {
    let timeout = match read_timeout {
        Some(d) => format!("{}ms", d.as_millis().max(1)),
        None => "0".into(),
    };
    vec![
        ("statement_timeout", timeout),
        ("idle_in_transaction_session_timeout", "0".into()),
    ]
}

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadEnd {
    /// The trailer was seen: every row of the model was read.
    Complete,
    /// The run was stopped (signal or a failed writer); the query was cancelled.
    Stopped,
    /// The diff stopped taking blocks (it failed, or the writers did).
    DiffGone,
}

/// What the read did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadStats {
    pub(crate) rows: u64,
    pub(crate) bytes: u64,
    pub(crate) end: ReadEnd,
}

/// Which database a read streams from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadOf {
    /// The model on the source: the sync's read.
    Source,
    /// The target's synced columns: rebuilding the snapshot from the destination.
    Target,
}

/// What to read: the session, the COPY statement, and which side it reads.
pub(crate) struct Read {
    /// The session's connection (to cancel the query on a stop).
    pub(crate) conn: ConnInfo,
    /// Shared: a source read's transaction goes on after the COPY (a count, a key read).
    pub(crate) client: Arc<tokio_postgres::Client>,
    /// Rows read before the COPY (rejected rows re-read by key), sent first.
    pub(crate) prelude: Vec<Block>,
    /// `COPY (...) TO STDOUT (FORMAT binary)`, columns in the plan's order; `None` when the
    /// prelude is the whole read (a delta that counted no written row).
    pub(crate) sql: Option<String>,
    pub(crate) of: ReadOf,
}

/// The read: its session, where blocks go, and when to stop.
pub(crate) struct SourceRead {
    pub(crate) read: Read,
    pub(crate) plan: Arc<Plan>,
    pub(crate) out: mpsc::Sender<Block>,
    /// Rows read so far: progress lines, and what a failed run reports.
    pub(crate) progress: Arc<Progress>,
    pub(crate) block_bytes: usize,
    pub(crate) sync: String,
    pub(crate) stop: Stop,
}

impl SourceRead {
    /// Streams the source COPY into framed blocks until the trailer, a stop, or an error.
    pub(crate) async fn run(mut self) -> Result<ReadStats, Error> {
        let read_err = |e: tokio_postgres::Error| match self.read.of {
            ReadOf::Source => Error::SourceRead {
                sync: self.sync.clone(),
                message: pg_message(&e),
            },
            ReadOf::Target => Error::Rebuild {
                sync: self.sync.clone(),
                table: self.plan.target.clone(),
                message: pg_message(&e),
            },
        };
        let frame_err = |e| Error::Frame {
            sync: self.sync.clone(),
            source: e,
        };
        let mut stats = ReadStats {
            rows: 0,
            bytes: 0,
            end: ReadEnd::Complete,
        };
        for block in std::mem::take(&mut self.read.prelude) {
            if !block.rows.is_empty() && !self.send(block, &mut stats).await {
                return Ok(stats);
            }
        }
        let Some(sql) = self.read.sql.take() else {
            return Ok(stats);
        };
        let stream = self.read.client.copy_out(&sql).await.map_err(read_err)?;
        futures_util::pin_mut!(stream);
        let ncols = self.plan.columns.len() as u16;
        let mut framer = Framer::new(ncols, self.plan.nkey as u16, self.block_bytes);
        // One stop future for the whole read, polled only while the stream waits: the stream
        // branch comes first (`biased`), and a CopyData message (one per row) is usually ready.
        // Polling a cancellation future takes a mutex; doing it for every row cost CPU the
        // source backend needs on 2 cores. A stream that never waits is still checked every
        // 4096 messages.
        let stopped = self.stop.stopped();
        tokio::pin!(stopped);
        let mut messages = 0u64;
        loop {
            messages += 1;
            // Cheap test first: `is_stopped` takes the token's mutex.
            let stop_now = messages % 4096 == 0 && self.stop.is_stopped();
            let next = match stop_now {
                true => None,
                false => tokio::select! {
                    biased;
                    n = stream.next() => n,
                    _ = &mut stopped => None,
                },
            };
            if stop_now || (next.is_none() && self.stop.is_stopped()) {
                let token = self.read.client.cancel_token();
                let _ = self.read.conn.cancel(&token).await;
                stats.end = ReadEnd::Stopped;
                return Ok(stats);
            }
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(read_err)?;
            stats.bytes += chunk.len() as u64;
            framer.push(&chunk).map_err(frame_err)?;
            while let Some(block) = framer.take_block() {
                if !self.send(block, &mut stats).await {
                    return Ok(stats);
                }
            }
        }
        let last = framer.finish().map_err(frame_err)?;
        if !last.rows.is_empty() && !self.send(last, &mut stats).await {
            return Ok(stats);
        }
        Ok(stats)
    }

    /// Sends a block to the diff; false (and `DiffGone`) when the diff is gone.
    async fn send(&self, block: Block, stats: &mut ReadStats) -> bool {
        stats.rows += block.rows.len() as u64;
        self.progress.rows_read.store(stats.rows, Ordering::Relaxed);
        if self.out.send(block).await.is_err() {
            stats.end = ReadEnd::DiffGone;
            return false;
        }
        true
    }
}
