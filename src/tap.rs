//! Source sessions whose COPY rows are taken off the socket in chunks, past tokio-postgres'
//! per-message path.
//!
//! Binary `COPY ... TO STDOUT` sends one `CopyData` message per row, and tokio-postgres hands
//! them over one at a time: for each row a message parse, a reference-counted buffer split, and
//! a trip through the connection task's channel. In a profile of a 10M-row full read that was
//! 13-18% of pgdelta's samples (docs/performance.md, "Rows off the socket in chunks"), on
//! the cores the source server needs too.
//!
//! A tapped session's socket sits under tokio-postgres ([`Tapped`]). It follows the message
//! boundaries of what the server sends (a 5-byte header each, nothing decoded). While a COPY
//! that the reader armed ([`Tap::arm`]) is running, the `CopyData` messages go, in chunks of
//! whatever one socket read returned (many rows each), to the reader over a bounded channel;
//! every other message (the COPY's start and end, errors, notices) passes through, so
//! tokio-postgres sees a COPY without rows and reports its end or its error as usual. A full
//! channel stops the tap reading the socket: backpressure reaches the server as before.
//!
//! A session is tapped only when pgdelta opens its socket itself (one host, see
//! [`crate::conn::ConnInfo::connect_reader`]); TLS runs under the tap, so the tap sees the
//! plain protocol.

use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures_channel::mpsc;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, TlsConnect, TlsStream};
use tokio_postgres::Client;

use crate::conn::{Canceller, Reached};
use crate::copy::FrameError;

/// How much one read of the socket asks for.
const READ_BYTES: usize = 128 << 10;
/// Chunks waiting for the reader before the tap stops reading the socket.
const QUEUED_CHUNKS: usize = 8;
/// While a COPY's rows flow over TCP, the socket wakes the tap only once this much waits
/// (`SO_RCVLOWAT`): the server sends 8 KiB at a time, and a tap woken for each paid a
/// wake-up of the runtime per 8-11 KiB read (docs/performance.md, "Taps on TCP sessions,
/// and fewer wake-ups").
const LOW_WATER: libc::c_int = 64 << 10;
/// A read at the mark that waits this long lowers it to one byte (the COPY's end, a server
/// that sends little: a delta read's rows come far apart), until the next read returns.
const LOW_WATER_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

/// A source session, and its tap when pgdelta opened its socket.
pub(crate) struct Session {
    client: Client,
    tap: Option<Tap>,
    /// The host pgdelta opened the socket to (none when tokio-postgres opened it).
    reached: Option<Reached>,
}

impl Session {
    pub(crate) fn new(client: Client, tap: Option<Tap>, reached: Reached) -> Session {
        Session {
            client,
            tap,
            reached: Some(reached),
        }
    }

    /// A session tokio-postgres opened, without a tap: its COPY rows come through
    /// tokio-postgres.
    pub(crate) fn plain(client: Client) -> Session {
        Session {
            client,
            tap: None,
            reached: None,
        }
    }

    /// What cancels the statement the session runs ([`crate::conn::ConnInfo::cancel`]).
    pub(crate) fn canceller(&self) -> Canceller {
        Canceller {
            token: self.client.cancel_token(),
            reached: self.reached.clone(),
        }
    }

    /// The tap, when the session's socket has one (TLS the server refused leaves none).
    pub(crate) fn tap(&self) -> Option<&Tap> {
        self.tap.as_ref().filter(|t| t.lock().attached)
    }
}

impl Deref for Session {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

/// The reader's handle on a session's socket.
#[derive(Clone, Default)]
pub(crate) struct Tap(Arc<Mutex<TapState>>);

#[derive(Default)]
struct TapState {
    /// A [`Tapped`] socket carries this tap.
    attached: bool,
    /// Where the rows of the session's next COPY go.
    armed: Option<mpsc::Sender<Bytes>>,
}

impl Tap {
    fn lock(&self) -> std::sync::MutexGuard<'_, TapState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the rows of the session's next COPY OUT to the returned receiver, as raw
    /// `CopyData` messages cut anywhere (read them with [`Payloads`]). The receiver ends when
    /// the COPY ends, fails or the connection closes; the COPY's outcome is then tokio-postgres'
    /// to report. Arm only when no other COPY OUT can start first on the session.
    pub(crate) fn arm(&self) -> mpsc::Receiver<Bytes> {
        let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
        self.lock().armed = Some(tx);
        rx
    }

    /// Takes back an arming whose COPY did not start (it failed before its first row).
    pub(crate) fn disarm(&self) {
        self.lock().armed = None;
    }
}

/// Where the bytes of the message being read go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// To tokio-postgres.
    Pass,
    /// To the reader: a row of an armed COPY.
    Divert,
    /// Nowhere: a row of a COPY whose reader is gone.
    Drop,
}

/// What a [`Tapped`] does with the bytes it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Follows the server's messages: the tap's work.
    Messages,
    /// The server's one-byte answer to the SSLRequest comes first: `S` (TLS follows, and a
    /// tap above it takes the messages) makes this one [`Mode::Transparent`]; a refusal, under
    /// `sslmode=prefer`, leaves a plain session, whose messages this one follows.
    SslAnswer,
    /// Passes every byte: TLS records, under a tap above them.
    Transparent,
}

/// A socket (or TLS stream) with a [`Tap`]: what tokio-postgres reads and writes.
pub(crate) struct Tapped<S> {
    inner: S,
    tap: Tap,
    mode: Mode,
    /// Bytes read from `inner` and not yet routed.
    buf: BytesMut,
    /// Bytes of the current message still to route (0: the next byte starts a message).
    left: usize,
    route: Route,
    /// The armed COPY's reader, while its rows flow.
    rows: Option<mpsc::Sender<Bytes>>,
    /// The reader went away during the COPY: its remaining rows are dropped.
    dropping: bool,
    /// A chunk of rows waiting for room in the reader's queue.
    held: Option<Bytes>,
    /// The TCP socket's low-water mark, raised while a COPY's rows flow.
    low: Option<LowWater>,
}

/// The receive low-water mark of a TCP socket under a [`Tapped`] (its descriptor: the socket
/// lives as long as the stream the tap wraps).
pub(crate) struct LowWater {
    fd: std::os::fd::RawFd,
    /// The mark now (the kernel's default: 1).
    at: libc::c_int,
    /// Fires [`LOW_WATER_WAIT`] after a read at the mark began to wait.
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
    /// The wait fired: the mark stays at 1 until a read returns.
    lowered: bool,
}

impl LowWater {
    pub(crate) fn of(socket: &impl std::os::fd::AsRawFd) -> LowWater {
        LowWater {
            fd: socket.as_raw_fd(),
            at: 1,
            wait: None,
            waiting: false,
            lowered: false,
        }
    }

    /// Sets the mark (the kernel signals a waiting reader at once if that much is queued).
    /// A socket that refuses keeps its mark: reads then wake as they always did.
    fn set(&mut self, at: libc::c_int) {
        if self.at == at {
            return;
        }
        // SAFETY: a socket this stream owns, an int option and its size.
        let done = unsafe {
            libc::setsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&at as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if done == 0 {
            self.at = at;
        }
    }

    /// Before a read: the mark, high while rows flow unless the wait lowered it.
    fn before_read(&mut self, rows: bool) {
        self.set(match rows && !self.lowered {
            true => LOW_WATER,
            false => 1,
        });
    }

    /// After a read: one that returned lets the next wait at the mark again; one that waits
    /// at a raised mark arms the wait, and lowers the mark once the wait fired.
    fn after_read(&mut self, returned: bool, cx: &mut Context<'_>) {
        if returned {
            self.waiting = false;
            self.lowered = false;
            return;
        }
        if self.at == 1 {
            return;
        }
        let wait = self
            .wait
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(LOW_WATER_WAIT)));
        if !self.waiting {
            wait.as_mut()
                .reset(tokio::time::Instant::now() + LOW_WATER_WAIT);
            self.waiting = true;
        }
        if std::future::Future::poll(wait.as_mut(), cx).is_ready() {
            self.waiting = false;
            self.lowered = true;
            self.set(1);
        }
    }
}

impl<S> Tapped<S> {
    pub(crate) fn new(inner: S, tap: Tap) -> Tapped<S> {
        tap.lock().attached = true;
        Tapped {
            inner,
            tap,
            mode: Mode::Messages,
            buf: BytesMut::new(),
            left: 0,
            route: Route::Pass,
            rows: None,
            dropping: false,
            held: None,
            low: None,
        }
    }

    /// A tap under a TLS connector, on the socket itself: it takes the messages when the
    /// server refuses TLS (`sslmode=prefer`, the default, against a server without TLS), and
    /// passes the bytes through when TLS goes on (`TapTls` taps above it) or starts at once
    /// (`direct`: no answer comes first).
    pub(crate) fn under_tls(inner: S, tap: Tap, direct: bool) -> Tapped<S> {
        let mut tapped = Tapped::new(inner, tap);
        tapped.mode = match direct {
            true => Mode::Transparent,
            false => Mode::SslAnswer,
        };
        tapped
    }

    /// Raises the TCP socket's low-water mark while a COPY's rows flow ([`LowWater`]).
    pub(crate) fn with_low_water(mut self, low: Option<LowWater>) -> Tapped<S> {
        self.low = low;
        self
    }

    /// Reads the header of the message at the front of `buf` (5 bytes there) and decides
    /// where the message goes.
    fn start_message(&mut self) -> io::Result<()> {
        let tag = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len < 4 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the server sent a message with an invalid length",
            ));
        }
        self.left = 1 + len;
        self.route = match tag {
            b'd' if self.rows.is_some() => Route::Divert,
            b'd' if self.dropping => Route::Drop,
            // CopyOutResponse: the armed reader's COPY starts.
            b'H' => {
                if let Some(tx) = self.tap.lock().armed.take() {
                    self.rows = Some(tx);
                    self.dropping = false;
                }
                Route::Pass
            }
            // CopyDone or an error: the COPY is over (an error before it began ends the arming).
            b'c' | b'E' => {
                self.rows = None;
                self.dropping = false;
                if tag == b'E' {
                    self.tap.disarm();
                }
                Route::Pass
            }
            _ => Route::Pass,
        };
        Ok(())
    }

    /// Cuts the row message at the front of `buf`, and every row message right behind it,
    /// into one chunk for the reader.
    fn cut_rows(&mut self) -> Bytes {
        let buf = &self.buf;
        let mut end = self.left.min(buf.len());
        let mut left = self.left - end;
        while left == 0 && buf.len() - end >= 5 && buf[end] == b'd' {
            let len = u32::from_be_bytes([buf[end + 1], buf[end + 2], buf[end + 3], buf[end + 4]]);
            let size = 1 + len as usize;
            let take = size.min(buf.len() - end);
            end += take;
            left = size - take;
        }
        self.left = left;
        self.buf.split_to(end).freeze()
    }
}

impl<S: AsyncRead + Unpin> Tapped<S> {
    /// Reads in [`Mode::SslAnswer`] and [`Mode::Transparent`]: the bytes as they come.
    fn poll_unrouted(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            if self.mode == Mode::Transparent {
                return Pin::new(&mut self.inner).poll_read(cx, out);
            }
            self.buf.reserve(READ_BYTES);
            if ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.inner),
                cx,
                &mut self.buf
            ))? == 0
            {
                return Poll::Ready(Ok(()));
            }
        }
        if self.mode == Mode::SslAnswer {
            // tokio-postgres reads the answer alone; what follows a refusal is the session's.
            self.mode = match self.buf[0] {
                b'S' => Mode::Transparent,
                _ => Mode::Messages,
            };
            out.put_slice(&self.buf[..1]);
            self.buf.advance(1);
            return Poll::Ready(Ok(()));
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tapped<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.mode != Mode::Messages {
            return this.poll_unrouted(cx, out);
        }
        let before = out.filled().len();
        loop {
            // A chunk of rows goes before anything behind it.
            if let Some(chunk) = this.held.take() {
                if let Some(tx) = this.rows.as_mut() {
                    match tx.poll_ready(cx) {
                        Poll::Ready(Ok(())) => {
                            let _ = tx.start_send(chunk);
                        }
                        Poll::Ready(Err(_)) => {
                            this.rows = None;
                            this.dropping = true;
                        }
                        Poll::Pending => {
                            this.held = Some(chunk);
                            return match out.filled().len() > before {
                                true => Poll::Ready(Ok(())),
                                false => Poll::Pending,
                            };
                        }
                    }
                }
            }
            let need_more = match this.left {
                0 => this.buf.len() < 5,
                _ => this.buf.is_empty(),
            };
            if need_more {
                if out.filled().len() > before {
                    return Poll::Ready(Ok(()));
                }
                if this.buf.capacity() - this.buf.len() < READ_BYTES / 4 {
                    this.buf.reserve(READ_BYTES);
                }
                if let Some(low) = this.low.as_mut() {
                    low.before_read(this.rows.is_some());
                }
                let read =
                    tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf);
                if let Some(low) = this.low.as_mut() {
                    low.after_read(read.is_ready(), cx);
                }
                let n = ready!(read)?;
                if n == 0 {
                    // End of the connection: the reader's queue ends; what is left (a cut
                    // header) goes to tokio-postgres, which reports the connection's end.
                    this.rows = None;
                    let n = this.buf.len().min(out.remaining());
                    out.put_slice(&this.buf[..n]);
                    this.buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if this.left == 0 {
                this.start_message()?;
            }
            match this.route {
                Route::Divert => this.held = Some(this.cut_rows()),
                Route::Drop => {
                    let n = this.left.min(this.buf.len());
                    this.buf.advance(n);
                    this.left -= n;
                }
                Route::Pass => {
                    let n = this.left.min(this.buf.len()).min(out.remaining());
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                    out.put_slice(&this.buf[..n]);
                    this.buf.advance(n);
                    this.left -= n;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tapped<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: TlsStream + Unpin> TlsStream for Tapped<S> {
    fn channel_binding(&self) -> ChannelBinding {
        self.inner.channel_binding()
    }
}

/// A TLS connector whose stream gets a [`Tap`] above the TLS layer.
pub(crate) struct TapTls<T> {
    pub(crate) inner: T,
    pub(crate) tap: Tap,
    pub(crate) low: Option<LowWater>,
}

impl<S, T> TlsConnect<S> for TapTls<T>
where
    T: TlsConnect<S>,
    T::Future: Send + 'static,
    T::Stream: Send + 'static,
{
    type Stream = Tapped<T::Stream>;
    type Error = T::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Tapped<T::Stream>, T::Error>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let (tap, low) = (self.tap, self.low);
        let tls = self.inner.connect(stream);
        Box::pin(async move { Ok(Tapped::new(tls.await?, tap).with_low_water(low)) })
    }
}

/// Takes the payloads (binary COPY bytes) out of raw `CopyData` messages cut at any point.
#[derive(Debug, Default)]
pub(crate) struct Payloads {
    head: [u8; 5],
    /// Bytes of a cut header gathered so far.
    have: usize,
    /// Payload bytes of the current message still to come.
    left: usize,
}

impl Payloads {
    /// Calls `each` with every payload piece in `data`, in order.
    pub(crate) fn feed(
        &mut self,
        mut data: &[u8],
        mut each: impl FnMut(&[u8]) -> Result<(), FrameError>,
    ) -> Result<(), FrameError> {
        while !data.is_empty() {
            if self.left == 0 {
                if self.have == 0 && data.len() >= 5 {
                    self.head.copy_from_slice(&data[..5]);
                    data = &data[5..];
                } else {
                    let n = (5 - self.have).min(data.len());
                    self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
                    self.have += n;
                    data = &data[n..];
                    if self.have < 5 {
                        return Ok(());
                    }
                }
                self.have = 0;
                let len =
                    u32::from_be_bytes([self.head[1], self.head[2], self.head[3], self.head[4]]);
                if self.head[0] != b'd' || len < 4 {
                    return Err(FrameError::NotCopyData);
                }
                self.left = len as usize - 4;
                continue;
            }
            let n = self.left.min(data.len());
            each(&data[..n])?;
            self.left -= n;
            data = &data[n..];
        }
        Ok(())
    }

    /// Checks that the messages ended whole.
    pub(crate) fn finish(&self) -> Result<(), FrameError> {
        match self.have == 0 && self.left == 0 {
            true => Ok(()),
            false => Err(FrameError::Truncated),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// What the server sends for a COPY of `rows`, then the messages that end it.
    fn copy_reply(rows: &[&[u8]], end: &[u8]) -> Vec<u8> {
        let mut all = msg(b'2', b"");
        all.extend(msg(b'H', &[1, 0, 0]));
        for r in rows {
            all.extend(msg(b'd', r));
        }
        all.extend_from_slice(end);
        all
    }

    /// Adds the payloads of the raw `CopyData` messages in `chunk` to `got`.
    fn take_payloads(payloads: &mut Payloads, chunk: &[u8], got: &mut Vec<u8>) {
        payloads
            .feed(chunk, |p| {
                got.extend_from_slice(p);
                Ok(())
            })
            .unwrap();
    }

    /// Feeds `wire` through a tapped socket in pieces of `piece` bytes; returns what
    /// tokio-postgres would read and the payloads the reader got.
    async fn through(wire: Vec<u8>, piece: usize, arm: bool) -> (Vec<u8>, Vec<u8>) {
        through_as(wire, piece, arm, Tapped::new).await
    }

    /// [`through`], the tap made by `make`.
    async fn through_as(
        wire: Vec<u8>,
        piece: usize,
        arm: bool,
        make: impl FnOnce(tokio::io::DuplexStream, Tap) -> Tapped<tokio::io::DuplexStream>,
    ) -> (Vec<u8>, Vec<u8>) {
        let (mut server, client) = tokio::io::duplex(64);
        let tap = Tap::default();
        let rows = arm.then(|| tap.arm());
        let mut tapped = make(client, tap);
        let feed = tokio::spawn(async move {
            for p in wire.chunks(piece) {
                server.write_all(p).await.unwrap();
            }
        });
        let reader = tokio::spawn(async move {
            let mut payloads = Payloads::default();
            let mut got = Vec::new();
            if let Some(mut rows) = rows {
                while let Some(chunk) = rows.next().await {
                    take_payloads(&mut payloads, &chunk, &mut got);
                }
            }
            payloads.finish().unwrap();
            got
        });
        let mut passed = Vec::new();
        tapped.read_to_end(&mut passed).await.unwrap();
        feed.await.unwrap();
        drop(tapped);
        (passed, reader.await.unwrap())
    }

    #[tokio::test]
    async fn an_armed_copy_sends_its_rows_to_the_reader_and_the_rest_through() {
        let rows: [&[u8]; 3] = [b"row one", b"", b"a third row, longer than the others"];
        let end = [msg(b'c', b""), msg(b'C', b"COPY 3\0"), msg(b'Z', b"T")].concat();
        let wire = copy_reply(&rows, &end);
        let without_rows = copy_reply(&[], &end);
        for piece in [1, 3, 5, 7, 64, 4096] {
            let (passed, got) = through(wire.clone(), piece, true).await;
            assert_eq!(passed, without_rows, "pieces of {piece}");
            assert_eq!(got, rows.concat(), "pieces of {piece}");
        }
    }

    /// Under a TLS connector, the tap on the socket takes the rows of a session whose server
    /// refused TLS (its answer passes first, alone), and passes every byte when the server
    /// took TLS or TLS starts at once: those bytes are TLS records, whatever they look like.
    #[tokio::test]
    async fn a_tap_under_tls_takes_the_rows_only_when_the_server_refused_it() {
        let rows: [&[u8]; 2] = [b"row one", b"row two"];
        let end = [msg(b'c', b""), msg(b'C', b"COPY 2\0"), msg(b'Z', b"I")].concat();
        let wire = copy_reply(&rows, &end);
        for piece in [1, 3, 4096] {
            let refused = [b"N".as_slice(), &wire].concat();
            let under = |c, t| Tapped::under_tls(c, t, false);
            let (passed, got) = through_as(refused, piece, true, under).await;
            let plain = [b"N".as_slice(), &copy_reply(&[], &end)].concat();
            assert_eq!(passed, plain, "pieces of {piece}");
            assert_eq!(got, rows.concat(), "pieces of {piece}");

            let taken = [b"S".as_slice(), &wire].concat();
            let (passed, got) = through_as(taken.clone(), piece, true, under).await;
            assert_eq!((passed, got), (taken, Vec::new()), "pieces of {piece}");

            let direct = |c, t| Tapped::under_tls(c, t, true);
            let (passed, got) = through_as(wire.clone(), piece, true, direct).await;
            assert_eq!(
                (passed, got),
                (wire.clone(), Vec::new()),
                "pieces of {piece}"
            );
        }
    }

    /// Over TCP, the mark raised while rows flow does not hold back a COPY that sends less
    /// than it and then waits (its end, here with the connection left open): the wait lowers
    /// the mark, and every message arrives.
    #[tokio::test]
    async fn a_raised_low_water_mark_never_holds_back_a_short_copy() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rows: [&[u8]; 3] = [b"a", b"bb", b"ccc"];
        let end = [msg(b'c', b""), msg(b'C', b"COPY 3\0"), msg(b'Z', b"I")].concat();
        let (wire, without_rows) = (copy_reply(&rows, &end), copy_reply(&[], &end));
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            // The COPY's start first, its rows a little later (after the tap raised the
            // mark), then the end; the connection stays open, as a session's does.
            let start = 1 + 4 + 1 + 4 + 3;
            socket.write_all(&wire[..start]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            socket.write_all(&wire[start..]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
        });
        let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let tap = Tap::default();
        let mut chunks = tap.arm();
        let low = LowWater::of(&socket);
        let mut tapped = Tapped::new(socket, tap).with_low_water(Some(low));
        let mut passed = vec![0; without_rows.len()];
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tapped.read_exact(&mut passed),
        );
        read.await.expect("the messages arrive").unwrap();
        assert_eq!(passed, without_rows);
        let mut got = Vec::new();
        let mut payloads = Payloads::default();
        while let Ok(chunk) = chunks.try_recv() {
            take_payloads(&mut payloads, &chunk, &mut got);
        }
        assert_eq!(got, rows.concat());
        // The COPY is over: the mark is back at one byte.
        assert_eq!(tapped.low.as_ref().map(|l| l.at), Some(1));
        server.abort();
    }

    #[tokio::test]
    async fn an_unarmed_copy_passes_every_byte_through() {
        let rows: [&[u8]; 2] = [b"x", b"yz"];
        let end = [msg(b'c', b""), msg(b'C', b"COPY 2\0"), msg(b'Z', b"I")].concat();
        let wire = copy_reply(&rows, &end);
        for piece in [1, 6, 1000] {
            let (passed, got) = through(wire.clone(), piece, false).await;
            assert_eq!(passed, wire);
            assert!(got.is_empty());
        }
    }

    #[tokio::test]
    async fn an_error_ends_the_rows_and_reaches_tokio_postgres() {
        let rows: [&[u8]; 1] = [b"first"];
        let error = msg(b'E', b"SERROR\0C57014\0Mcanceled\0\0");
        let end = [error.clone(), msg(b'Z', b"E")].concat();
        let (passed, got) = through(copy_reply(&rows, &end), 4, true).await;
        assert_eq!(passed, copy_reply(&[], &end));
        assert_eq!(got, b"first");
    }

    #[tokio::test]
    async fn rows_behind_a_gone_reader_are_dropped_not_passed() {
        let (mut server, client) = tokio::io::duplex(1 << 16);
        let tap = Tap::default();
        drop(tap.arm());
        let mut tapped = Tapped::new(client, tap);
        let end = [msg(b'c', b""), msg(b'Z', b"I")].concat();
        server
            .write_all(&copy_reply(&[b"a", b"b"], &end))
            .await
            .unwrap();
        drop(server);
        let mut passed = Vec::new();
        tapped.read_to_end(&mut passed).await.unwrap();
        assert_eq!(passed, copy_reply(&[], &end));
    }

    #[test]
    fn payloads_reject_other_messages_and_cut_ends() {
        let mut p = Payloads::default();
        assert_eq!(
            p.feed(&msg(b'C', b"x"), |_| Ok(())),
            Err(FrameError::NotCopyData)
        );
        let mut p = Payloads::default();
        p.feed(&msg(b'd', b"abc")[..6], |_| Ok(())).unwrap();
        assert_eq!(p.finish(), Err(FrameError::Truncated));
    }
}
