//! The source stage: one session streams the generated query with binary
//! `COPY (...) TO STDOUT`, framed into blocks of whole tuples (never decoded) and sent to the
//! diff over a bounded channel. The same stage reads the target's synced columns when the
//! snapshot is rebuilt from the destination ([`ReadOf::Target`]). A full channel stops this task, which stops reading the
//! socket: the source server then waits on TCP (backpressure).
//!
//! Guarantee: a read is [`ReadEnd::Complete`] only when the stream ended with its trailer, and
//! only a complete read may produce deletes. On a stop the query is cancelled on the server.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::conn::ConnInfo;
use crate::copy::{Block, Framer};
use crate::error::{pg_message, Error};
use crate::plan::Plan;
use crate::pool::BufPool;
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

impl ReadStats {
    /// Nothing read yet, nothing gone wrong.
    const START: ReadStats = ReadStats {
        rows: 0,
        bytes: 0,
        end: ReadEnd::Complete,
    };
}

/// Which database a read streams from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReadOf {
    /// The model on the source: the sync's read.
    Source,
    /// The target's synced columns: rebuilding the snapshot from the destination.
    Target,
    /// The target's synced columns, read by `verify`.
    TargetCheck,
}

/// What to read: the sessions, the COPY statements, and which side it reads.
pub(crate) struct Read {
    /// The sessions' connection (to cancel their queries on a stop).
    pub(crate) conn: ConnInfo,
    /// The sessions that read the parts, the run's own first. Shared: a source read's
    /// transaction goes on after the COPY (a count, a key read).
    pub(crate) clients: Vec<Arc<tokio_postgres::Client>>,
    /// Rows read before the COPY (rejected rows re-read by key), sent first.
    pub(crate) prelude: Vec<Block>,
    /// `COPY (...) TO STDOUT (FORMAT binary)` statements, columns in the plan's order: the
    /// parts of the read, taken by whichever session is free; none when the prelude is the
    /// whole read (a delta that counted no written row).
    pub(crate) copies: Vec<String>,
    pub(crate) of: ReadOf,
}

/// The read: its sessions, where blocks go, and when to stop.
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

/// Runs `read` with its blocks going, over a queue of `queue` blocks, to `consume` on a
/// blocking thread (lookups in the snapshot are blocking work); waits for both. Returns the
/// read's outcome and what `consume` returned; an error only when a task panicked. A consumer
/// that returns early closes the queue, which ends the read (`ReadEnd::DiffGone`).
pub(crate) async fn read_into<T: Send + 'static>(
    read: Read,
    plan: Arc<Plan>,
    (queue, block_bytes): (usize, usize),
    sync: String,
    stop: Stop,
    consume: impl FnOnce(mpsc::Receiver<Block>) -> T + Send + 'static,
) -> Result<(Result<ReadStats, Error>, T), Error> {
    let (out, blocks) = mpsc::channel::<Block>(queue);
    let read_task = tokio::spawn(
        SourceRead {
            read,
            plan,
            out,
            progress: Default::default(),
            block_bytes,
            sync,
            stop,
        }
        .run(),
    );
    let consumed = tokio::task::spawn_blocking(move || consume(blocks));
    let stats = read_task.await.map_err(crate::error::join_err)?;
    let consumed = consumed.await.map_err(crate::error::join_err)?;
    Ok((stats, consumed))
}

impl SourceRead {
    /// Streams the parts into framed blocks, each session taking the next part when it is
    /// free, until every part's trailer, a stop, or an error. The first error ends the read
    /// (every session's query is cancelled); the read is complete only when every part is.
    pub(crate) async fn run(mut self) -> Result<ReadStats, Error> {
        let mut stats = ReadStats::START;
        for block in std::mem::take(&mut self.read.prelude) {
            if !block.rows.is_empty() && !self.send(block, &mut stats).await {
                return Ok(stats);
            }
        }
        let copies = std::mem::take(&mut self.read.copies);
        let sessions = self.read.clients.len().min(copies.len());
        let queue = std::sync::Mutex::new(VecDeque::from(copies));
        // The blocks' buffers, reused by every part and session: as many as the queue to the
        // diff holds, and a few being framed or diffed.
        let blocks = Framer::pool(self.block_bytes, self.out.max_capacity() + 4);
        let reads = self.read.clients[..sessions]
            .iter()
            .map(|client| self.session(client, &queue, &blocks));
        let ends = match futures_util::future::try_join_all(reads).await {
            Ok(ends) => ends,
            Err(e) => {
                self.cancel_all().await;
                return Err(e);
            }
        };
        for s in ends {
            stats.rows += s.rows;
            stats.bytes += s.bytes;
            if s.end != ReadEnd::Complete {
                stats.end = s.end;
            }
        }
        if stats.end == ReadEnd::Stopped {
            self.cancel_all().await;
        }
        Ok(stats)
    }

    async fn cancel_all(&self) {
        for client in &self.read.clients {
            let _ = self.read.conn.cancel(&client.cancel_token()).await;
        }
    }

    /// One session's share of the read: parts from the queue until it is empty.
    async fn session(
        &self,
        client: &tokio_postgres::Client,
        queue: &std::sync::Mutex<VecDeque<String>>,
        blocks: &Arc<BufPool>,
    ) -> Result<ReadStats, Error> {
        let mut stats = ReadStats::START;
        loop {
            let next = queue.lock().expect("not poisoned").pop_front();
            let Some(sql) = next else {
                return Ok(stats);
            };
            self.part(client, &sql, blocks, &mut stats).await?;
            if stats.end != ReadEnd::Complete {
                return Ok(stats);
            }
        }
    }

    /// Streams one COPY statement into framed blocks until its trailer, a stop, or an error.
    async fn part(
        &self,
        client: &tokio_postgres::Client,
        sql: &str,
        blocks: &Arc<BufPool>,
        stats: &mut ReadStats,
    ) -> Result<(), Error> {
        let read_err = |e: tokio_postgres::Error| match self.read.of {
            ReadOf::Source => Error::source_read(&self.sync, "", &e),
            ReadOf::Target => Error::Rebuild {
                sync: self.sync.clone(),
                table: self.plan.target.clone(),
                message: pg_message(&e),
            },
            ReadOf::TargetCheck => Error::TargetRead {
                sync: self.sync.clone(),
                table: self.plan.target.clone(),
                message: pg_message(&e),
            },
        };
        let frame_err = |e| Error::Frame {
            sync: self.sync.clone(),
            source: e,
        };
        let stream = client.copy_out(sql).await.map_err(read_err)?;
        futures_util::pin_mut!(stream);
        let ncols = self.plan.columns.len() as u16;
        let nkey = self.plan.nkey as u16;
        let mut framer = Framer::with_pool(ncols, nkey, self.block_bytes, blocks.clone());
        // One stop future for the whole part, polled only while the stream waits: the stream
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
                stats.end = ReadEnd::Stopped;
                return Ok(());
            }
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(read_err)?;
            stats.bytes += chunk.len() as u64;
            framer.push(&chunk).map_err(frame_err)?;
            while let Some(block) = framer.take_block() {
                if !self.send(block, stats).await {
                    return Ok(());
                }
            }
        }
        let last = framer.finish().map_err(frame_err)?;
        if !last.rows.is_empty() {
            self.send(last, stats).await;
        }
        Ok(())
    }

    /// Sends a block to the diff; false (and `DiffGone`) when the diff is gone.
    async fn send(&self, block: Block, stats: &mut ReadStats) -> bool {
        let n = block.rows.len() as u64;
        stats.rows += n;
        self.progress.rows_read.fetch_add(n, Ordering::Relaxed);
        if self.out.send(block).await.is_err() {
            stats.end = ReadEnd::DiffGone;
            return false;
        }
        true
    }
}
