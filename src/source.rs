//! The source stage: one session streams the generated query with binary
//! `COPY (...) TO STDOUT`, framed into blocks of whole tuples (never decoded) and sent to the
//! diff over a bounded channel. The same stage reads the target's synced columns when the
//! snapshot is rebuilt from the destination ([`ReadOf::Target`]). A full channel stops this task, which stops reading the
//! socket: the source server then waits on TCP (backpressure).
//!
//! Guarantee: a read is [`ReadEnd::Complete`] only when the stream ended with its trailer, and
//! only a complete read may produce deletes. On a stop the query is cancelled on the server.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::CopyOutStream;

use crate::conn::ConnInfo;
use crate::copy::{Block, FrameError, Framer};
use crate::error::{pg_message, Error};
use crate::plan::Plan;
use crate::pool::BufPool;
use crate::sync::stop::Stop;
use crate::sync::Progress;
use crate::tap::{Payloads, Session};

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
    pub(crate) clients: Vec<Arc<Session>>,
    /// Rows read before the COPY (rejected rows re-read by key), sent first.
    pub(crate) prelude: Vec<Block>,
    /// `COPY (...) TO STDOUT (FORMAT binary)` statements, columns in the plan's order: the
    /// parts of the read, taken by whichever session is free; none when the prelude is the
    /// whole read (a delta that counted no written row).
    pub(crate) copies: Vec<String>,
    /// The last of `copies` reads the end of a table's heap (a `ctid` range open at its top):
    /// it is taken second, right after the first part, instead of last. PostgreSQL writes new
    /// row versions (inserts, updates that leave their page) where its free space map finds
    /// room, which on a table without free space is the end of the heap, so that part holds
    /// most of a run's changed rows; read early, their writes overlap the rest of the read
    /// instead of following it. Its rows are sent only once the first part has sent its first
    /// block (or ended), so the diff still judges the read's key order from the start of the
    /// heap, as before (`diff::sort`).
    pub(crate) newest_last: bool,
    pub(crate) of: ReadOf,
}

/// Whether the first part of a read has sent its first block (or ended): the part that reads
/// the end of the heap sends nothing before that ([`Read::newest_last`]).
struct FirstPart {
    sent: tokio::sync::watch::Sender<bool>,
}

impl FirstPart {
    /// Not sent yet.
    fn new() -> FirstPart {
        FirstPart {
            sent: tokio::sync::watch::channel(false).0,
        }
    }

    fn open(&self) {
        self.sent.send_replace(true);
    }
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
        let queue = std::sync::Mutex::new(part_order(copies, self.read.newest_last));
        let first = FirstPart::new();
        // The blocks' buffers, reused by every part and session: as many as the queue to the
        // diff holds, and a few being framed or diffed.
        let blocks = Framer::pool(self.block_bytes, self.out.max_capacity() + 4);
        let reads = self.read.clients[..sessions]
            .iter()
            .map(|client| self.session(client, &queue, &blocks, &first));
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
            let _ = self.read.conn.cancel(&client.canceller()).await;
        }
    }

    /// One session's share of the read: parts from the queue until it is empty.
    async fn session(
        &self,
        client: &Session,
        queue: &std::sync::Mutex<VecDeque<(Turn, String)>>,
        blocks: &Arc<BufPool>,
        first: &FirstPart,
    ) -> Result<ReadStats, Error> {
        let mut stats = ReadStats::START;
        loop {
            let next = queue.lock().expect("not poisoned").pop_front();
            let Some((turn, sql)) = next else {
                return Ok(stats);
            };
            let result = self
                .part(client, &sql, blocks, (turn, first), &mut stats)
                .await;
            if turn == Turn::First {
                first.open();
            }
            result?;
            if stats.end != ReadEnd::Complete {
                return Ok(stats);
            }
        }
    }

    /// Streams one COPY statement into framed blocks until its trailer, a stop, or an error.
    async fn part(
        &self,
        session: &Session,
        sql: &str,
        blocks: &Arc<BufPool>,
        (turn, first): (Turn, &FirstPart),
        stats: &mut ReadStats,
    ) -> Result<(), Error> {
        let mut turn = InTurn {
            gate: (turn == Turn::Newest).then(|| first.sent.subscribe()),
            opens: (turn == Turn::First).then_some(first),
        };
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
        let mut rows = CopyRows::start(session, sql).await.map_err(read_err)?;
        let ncols = self.plan.columns.len() as u16;
        let nkey = self.plan.nkey as u16;
        let mut framer = Framer::with_pool(ncols, nkey, self.block_bytes, blocks.clone());
        // One stop future for the whole part, polled only while the rows wait: the rows
        // branch comes first (`biased`), and a chunk of rows is usually ready. Polling a
        // cancellation future takes a mutex; doing it for every chunk cost CPU the source
        // backend needs on 2 cores. Rows that never wait are still checked every 4096 chunks.
        let stopped = self.stop.stopped();
        tokio::pin!(stopped);
        let mut chunks = 0u64;
        loop {
            chunks += 1;
            // Cheap test first: `is_stopped` takes the token's mutex.
            let stop_now = chunks % 4096 == 0 && self.stop.is_stopped();
            let next = match stop_now {
                true => None,
                false => tokio::select! {
                    biased;
                    n = rows.next() => n,
                    _ = &mut stopped => None,
                },
            };
            if stop_now || (next.is_none() && self.stop.is_stopped()) {
                stats.end = ReadEnd::Stopped;
                return Ok(());
            }
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(read_err)?;
            stats.bytes += rows.frame(&chunk, &mut framer).map_err(frame_err)?;
            while let Some(block) = framer.take_block() {
                if !self
                    .send_in_turn(block, stats, &mut turn, &mut stopped)
                    .await
                {
                    return Ok(());
                }
            }
        }
        rows.finish().map_err(frame_err)?;
        let last = framer.finish().map_err(frame_err)?;
        if !last.rows.is_empty() {
            self.send_in_turn(last, stats, &mut turn, &mut stopped)
                .await;
        }
        Ok(())
    }

    /// Sends a block of a part in its turn ([`InTurn`]); false when the run stopped while the
    /// block waited (`Stopped`) or the diff is gone (`DiffGone`).
    async fn send_in_turn(
        &self,
        block: Block,
        stats: &mut ReadStats,
        turn: &mut InTurn<'_>,
        stopped: &mut Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> bool {
        if !opened(&mut turn.gate, stopped).await {
            stats.end = ReadEnd::Stopped;
            return false;
        }
        if !self.send(block, stats).await {
            return false;
        }
        if let Some(first) = turn.opens.take() {
            first.open();
        }
        true
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

/// Waits, once, until the first part has sent its first block (`gate`, taken); false when
/// the run stopped first.
async fn opened(
    gate: &mut Option<tokio::sync::watch::Receiver<bool>>,
    stopped: &mut Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    let Some(mut gate) = gate.take() else {
        return true;
    };
    tokio::select! {
        sent = gate.wait_for(|sent| *sent) => sent.is_ok(),
        _ = stopped => false,
    }
}

/// What a part's blocks do for the order of the read ([`Read::newest_last`]): the end of the
/// heap's first block waits for the first part's first block (`gate`), which opens that wait
/// (`opens`); each is used once.
struct InTurn<'a> {
    gate: Option<tokio::sync::watch::Receiver<bool>>,
    opens: Option<&'a FirstPart>,
}

/// A part's place in the order of a read ([`Read::newest_last`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    /// The first part: the start of the heap.
    First,
    /// The last part, the end of the heap, taken second.
    Newest,
    Other,
}

/// The order the sessions take the parts in: as given, or, when the last reads the end of the
/// heap, that one second.
fn part_order(copies: Vec<String>, newest_last: bool) -> VecDeque<(Turn, String)> {
    let n = copies.len();
    let mut order: VecDeque<(Turn, String)> = copies
        .into_iter()
        .enumerate()
        .map(|(i, sql)| match i {
            0 => (Turn::First, sql),
            i if newest_last && i + 1 == n && n > 2 => (Turn::Newest, sql),
            _ => (Turn::Other, sql),
        })
        .collect();
    if order.back().is_some_and(|(t, _)| *t == Turn::Newest) {
        let newest = order.pop_back().expect("not empty");
        order.insert(1, newest);
    }
    order
}

/// A COPY's rows as they arrive: one `CopyData` payload at a time from tokio-postgres, or
/// chunks of raw `CopyData` messages from the session's tap ([`crate::tap`]).
enum CopyRows {
    Plain(Pin<Box<CopyOutStream>>),
    Tapped {
        chunks: futures_channel::mpsc::Receiver<Bytes>,
        /// tokio-postgres' side of the COPY: no rows, then its end or its error.
        end: Pin<Box<CopyOutStream>>,
        payloads: Payloads,
        /// tokio-postgres got a row: the tap lost track of the messages.
        stray: bool,
    },
}

impl CopyRows {
    /// Starts `sql` on `session`, through its tap when it has one.
    async fn start(session: &Session, sql: &str) -> Result<CopyRows, tokio_postgres::Error> {
        let Some(tap) = session.tap() else {
            return Ok(CopyRows::Plain(Box::pin(session.copy_out(sql).await?)));
        };
        let chunks = tap.arm();
        match session.copy_out(sql).await {
            Ok(end) => Ok(CopyRows::Tapped {
                chunks,
                end: Box::pin(end),
                payloads: Payloads::default(),
                stray: false,
            }),
            Err(e) => {
                tap.disarm();
                Err(e)
            }
        }
    }

    /// The next piece of the COPY; `None` at its end.
    async fn next(&mut self) -> Option<Result<Bytes, tokio_postgres::Error>> {
        match self {
            CopyRows::Plain(stream) => stream.next().await,
            CopyRows::Tapped {
                chunks, end, stray, ..
            } => match chunks.next().await {
                Some(chunk) => Some(Ok(chunk)),
                // The tap ends the rows at CopyDone, an error or the connection's end;
                // tokio-postgres reports which. A row reaching tokio-postgres instead would be
                // out of order: `finish` fails the read.
                None => match end.next().await? {
                    Ok(_) => {
                        *stray = true;
                        None
                    }
                    Err(e) => Some(Err(e)),
                },
            },
        }
    }

    /// Frames `chunk`; returns the COPY bytes it held.
    fn frame(&mut self, chunk: &Bytes, framer: &mut Framer) -> Result<u64, FrameError> {
        match self {
            CopyRows::Plain(_) => {
                framer.push(chunk)?;
                Ok(chunk.len() as u64)
            }
            CopyRows::Tapped { payloads, .. } => {
                let mut bytes = 0;
                payloads.feed(chunk, |p| {
                    bytes += p.len() as u64;
                    framer.push(p)
                })?;
                Ok(bytes)
            }
        }
    }

    /// Checks that the tap's messages ended whole.
    fn finish(&self) -> Result<(), FrameError> {
        match self {
            CopyRows::Plain(_) => Ok(()),
            CopyRows::Tapped { stray: true, .. } => Err(FrameError::NotCopyData),
            CopyRows::Tapped { payloads, .. } => payloads.finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(n: usize, newest_last: bool) -> Vec<(Turn, String)> {
        let copies = (0..n).map(|i| format!("p{i}")).collect();
        part_order(copies, newest_last).into()
    }

    #[test]
    fn the_end_of_the_heap_is_read_second_and_the_start_first() {
        let got = order(5, true);
        let names: Vec<&str> = got.iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(names, ["p0", "p4", "p1", "p2", "p3"]);
        assert_eq!(got[0].0, Turn::First);
        assert_eq!(got[1].0, Turn::Newest);
        assert!(got[2..].iter().all(|(t, _)| *t == Turn::Other));
    }

    #[test]
    fn parts_keep_their_order_unless_the_last_is_the_heap_end() {
        // Value ranges of a query (`split_by`) have no end of heap.
        let names: Vec<String> = order(4, false).into_iter().map(|(_, s)| s).collect();
        assert_eq!(names, ["p0", "p1", "p2", "p3"]);
        // Two parts: the second is taken second anyway, and waits for nothing.
        let two = order(2, true);
        assert_eq!(two[1], (Turn::Other, "p1".to_string()));
        assert_eq!(order(1, true), [(Turn::First, "p0".to_string())]);
        assert!(order(0, true).is_empty());
    }

    #[tokio::test]
    async fn the_end_of_the_heap_waits_for_the_first_block_or_a_stop() {
        use crate::sync::stop::{Stop, StopReason};
        use std::time::Duration;
        let token = tokio_util::sync::CancellationToken::new();
        let first = FirstPart::new();
        // Not opened: still waiting after a while.
        let stop = Stop::child_of(&token);
        let stopped = stop.stopped();
        tokio::pin!(stopped);
        let mut gate = Some(first.sent.subscribe());
        let wait = tokio::time::timeout(Duration::from_millis(50), opened(&mut gate, &mut stopped));
        assert!(
            wait.await.is_err(),
            "sent before the first part's first block"
        );
        // Opened: goes on at once, and waits no more after that.
        let mut gate = Some(first.sent.subscribe());
        first.open();
        assert!(opened(&mut gate, &mut stopped).await);
        assert!(gate.is_none());
        assert!(opened(&mut gate, &mut stopped).await);
        // A stop while waiting: false, nothing sent.
        let first = FirstPart::new();
        let mut gate = Some(first.sent.subscribe());
        stop.stop(StopReason::WriterFailed);
        let wait = tokio::time::timeout(Duration::from_secs(5), opened(&mut gate, &mut stopped));
        assert_eq!(wait.await, Ok(false), "a stop must end the wait");
    }
}
