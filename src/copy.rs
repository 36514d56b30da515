//! The binary COPY codec: bytes in, tuples and field spans out, and the framing to send tuples back.
//!
//! No I/O lives here, so the codec can be fuzzed and benchmarked without a database. Values are
//! never decoded: a tuple is kept as the bytes Postgres sent (field count, then each field's
//! length and bytes), and a [`RowSpan`] records where it starts, where its key fields end and where
//! it ends inside a [`Block`]. Because pgdelta generates the source query with the key columns
//! first, the key is the contiguous slice `start + 2 .. key_end` and the hashed part of the row is
//! `key_end .. end`.
//!
//! Guarantees: a malformed or truncated stream yields a [`FrameError`], never a panic; a stream is
//! complete only when its trailer was seen ([`Framer::finish`]).

use std::sync::Arc;

use bytes::Bytes;

use crate::pool::BufPool;

/// The 11-byte signature that opens every binary COPY stream.
pub const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";
/// Signature, flags (0) and header-extension length (0): what pgdelta sends before tuples.
pub const HEADER: &[u8; 19] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The file trailer: a field count of -1.
pub const TRAILER: &[u8; 2] = b"\xff\xff";

/// Where one tuple lies inside its [`Block`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowSpan {
    /// Offset of the tuple's 16-bit field count.
    pub start: u32,
    /// Offset just past the last key field.
    pub key_end: u32,
    /// Offset just past the last field.
    pub end: u32,
}

impl RowSpan {
    /// The key fields, each with its 4-byte length prefix.
    #[inline]
    pub fn key<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        &data[self.start as usize + 2..self.key_end as usize]
    }
    /// The non-key fields, each with its length prefix: what the row hash covers.
    #[inline]
    pub fn value<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        &data[self.key_end as usize..self.end as usize]
    }
    /// The whole tuple as it goes back into a binary COPY.
    #[inline]
    pub fn tuple<'a>(&self, data: &'a [u8]) -> &'a [u8] {
        &data[self.start as usize..self.end as usize]
    }
}

/// A run of whole tuples sharing one buffer.
#[derive(Debug, Clone, Default)]
pub struct Block {
    pub data: Bytes,
    pub rows: Vec<RowSpan>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("the COPY stream does not start with the binary COPY signature")]
    BadSignature,
    #[error("the COPY stream sets flags {0:#x} that pgdelta does not understand (OIDs are not supported)")]
    UnsupportedFlags(u32),
    #[error("a tuple has {found} fields where the query has {expected} columns")]
    FieldCount { expected: u16, found: i16 },
    #[error("a field has the invalid length {0}")]
    BadLength(i32),
    #[error("a tuple is larger than 4 GiB")]
    TooLarge,
    #[error("data follows the end-of-data trailer")]
    AfterTrailer,
    #[error("the COPY stream ended before its trailer (truncated read)")]
    Truncated,
    #[error("the source sent a message other than CopyData among the COPY's rows")]
    NotCopyData,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Header,
    Rows,
    Done,
}

/// Splits a binary COPY byte stream, delivered in chunks of any size, into [`Block`]s of whole
/// tuples. Every byte is copied once, into the block under construction; nothing is decoded.
/// Block buffers come from a [`BufPool`] and go back to it once every user of the block is done.
pub struct Framer {
    ncols: u16,
    nkey: u16,
    block_bytes: usize,
    state: State,
    buf: Vec<u8>,
    pool: Arc<BufPool>,
    /// Offset in `buf` where the next unparsed tuple starts.
    pos: usize,
    rows: Vec<RowSpan>,
}

impl Framer {
    /// `ncols` fields per tuple, of which the first `nkey` are the key; blocks are cut once they
    /// hold at least `block_bytes` bytes.
    pub fn new(ncols: u16, nkey: u16, block_bytes: usize) -> Self {
        Self::with_pool(ncols, nkey, block_bytes, Self::pool(block_bytes, 2))
    }

    /// A pool of `keep` block buffers for framers cutting blocks at `block_bytes` (one per
    /// read, shared by its parts and sessions).
    pub(crate) fn pool(block_bytes: usize, keep: usize) -> Arc<BufPool> {
        // Room for a block and the tuple that crosses its end.
        let capacity = block_bytes.clamp(1, 8 << 20) + (64 << 10);
        BufPool::new(capacity, keep)
    }

    /// A framer as [`Self::new`], whose blocks are the buffers of `pool` (made by [`Self::pool`]
    /// for the same `block_bytes`).
    pub(crate) fn with_pool(ncols: u16, nkey: u16, block_bytes: usize, pool: Arc<BufPool>) -> Self {
        assert!(nkey <= ncols, "key columns are a prefix of the columns");
        Framer {
            ncols,
            nkey,
            block_bytes: block_bytes.max(1),
            state: State::Header,
            buf: pool.take(),
            pool,
            pos: 0,
            rows: Vec::new(),
        }
    }

    /// Feeds the next chunk of the stream. Complete blocks are then ready via [`Self::take_block`].
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), FrameError> {
        if self.state == State::Done {
            return if chunk.is_empty() {
                Ok(())
            } else {
                Err(FrameError::AfterTrailer)
            };
        }
        self.buf.extend_from_slice(chunk);
        if self.state == State::Header && !self.parse_header()? {
            return Ok(());
        }
        self.parse_tuples()
    }

    /// A block of whole tuples, once at least `block_bytes` have been framed.
    pub fn take_block(&mut self) -> Option<Block> {
        if self.pos >= self.block_bytes {
            Some(self.cut(self.rows.len() + self.rows.len() / 8))
        } else {
            None
        }
    }

    /// Ends the stream: the remaining tuples, or an error when the trailer was never seen.
    pub fn finish(mut self) -> Result<Block, FrameError> {
        if self.state != State::Done {
            return Err(FrameError::Truncated);
        }
        Ok(self.cut(0))
    }

    /// The block framed so far; the next one's spans start with room for `next_rows`.
    fn cut(&mut self, next_rows: usize) -> Block {
        // The bytes past the last whole tuple start the next buffer.
        let mut next = self.pool.take();
        next.extend_from_slice(&self.buf[self.pos..]);
        let mut data = std::mem::replace(&mut self.buf, next);
        data.truncate(self.pos);
        self.pos = 0;
        Block {
            data: self.pool.freeze(data),
            // The next block's spans start at about this block's count (blocks of one read
            // hold similar rows) rather than doubling from none: a block of keys alone holds
            // some 37,000 spans, and doubling left up to twice that allocated, per block.
            rows: std::mem::replace(&mut self.rows, Vec::with_capacity(next_rows)),
        }
    }

    fn parse_header(&mut self) -> Result<bool, FrameError> {
        let b = &self.buf[..];
        if b.len() < 19 {
            if !SIGNATURE.starts_with(&b[..b.len().min(11)]) {
                return Err(FrameError::BadSignature);
            }
            return Ok(false);
        }
        if &b[..11] != SIGNATURE {
            return Err(FrameError::BadSignature);
        }
        let flags = u32::from_be_bytes([b[11], b[12], b[13], b[14]]);
        // Bit 16 is "OIDs included"; bits 0-15 are reserved-critical. Both mean a format we
        // cannot frame correctly.
        if flags & 0x0001_ffff != 0 {
            return Err(FrameError::UnsupportedFlags(flags));
        }
        let ext = u32::from_be_bytes([b[15], b[16], b[17], b[18]]) as usize;
        if b.len() < 19 + ext {
            return Ok(false);
        }
        self.buf.drain(..19 + ext);
        self.state = State::Rows;
        Ok(true)
    }

    fn parse_tuples(&mut self) -> Result<(), FrameError> {
        let buf = &self.buf[..];
        let mut pos = self.pos;
        loop {
            match frame_tuple(buf, pos, self.ncols, self.nkey)? {
                Framed::Row(span) => {
                    pos = span.end as usize;
                    self.rows.push(span);
                }
                Framed::Trailer => {
                    if buf.len() > pos + 2 {
                        return Err(FrameError::AfterTrailer);
                    }
                    self.state = State::Done;
                    // Drop the trailer bytes from the buffer; `pos` stays at the last tuple's end.
                    self.buf.truncate(pos);
                    self.pos = pos;
                    return Ok(());
                }
                Framed::Incomplete => {
                    self.pos = pos;
                    return Ok(());
                }
            }
        }
    }
}

enum Framed {
    Row(RowSpan),
    Trailer,
    Incomplete,
}

#[inline]
fn read_i32(buf: &[u8], at: usize) -> Option<i32> {
    buf.get(at..at + 4)
        .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

#[inline]
fn frame_tuple(buf: &[u8], start: usize, ncols: u16, nkey: u16) -> Result<Framed, FrameError> {
    let Some(c) = buf.get(start..start + 2) else {
        return Ok(Framed::Incomplete);
    };
    let count = i16::from_be_bytes([c[0], c[1]]);
    if count == -1 {
        return Ok(Framed::Trailer);
    }
    if count != ncols as i16 {
        return Err(FrameError::FieldCount {
            expected: ncols,
            found: count,
        });
    }
    let mut at = start + 2;
    let mut key_end = at;
    for i in 0..ncols {
        if i == nkey {
            key_end = at;
        }
        let Some(len) = read_i32(buf, at) else {
            return Ok(Framed::Incomplete);
        };
        at += 4;
        if len >= 0 {
            at += len as usize;
        } else if len != -1 {
            return Err(FrameError::BadLength(len));
        }
    }
    if nkey == ncols {
        key_end = at;
    }
    if at > buf.len() {
        return Ok(Framed::Incomplete);
    }
    if at > u32::MAX as usize {
        return Err(FrameError::TooLarge);
    }
    Ok(Framed::Row(RowSpan {
        start: start as u32,
        key_end: key_end as u32,
        end: at as u32,
    }))
}

/// Iterates over length-prefixed fields (`i32` length, -1 for NULL, then the bytes), as found in
/// a key or a tuple body. Stops at the first malformed field.
pub fn fields(mut bytes: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
    std::iter::from_fn(move || {
        let len = read_i32(bytes, 0)?;
        bytes = &bytes[4..];
        if len < 0 {
            return Some(None);
        }
        let len = len as usize;
        if len > bytes.len() {
            bytes = &[];
            return None;
        }
        let (field, rest) = bytes.split_at(len);
        bytes = rest;
        Some(Some(field))
    })
}

/// True when any field in `key` is NULL.
pub fn has_null(key: &[u8]) -> bool {
    fields(key).any(|f| f.is_none())
}

/// Frames a whole in-memory stream in one go (fuzzing, tests and benches).
pub fn frame_all(stream: &[u8], ncols: u16, nkey: u16) -> Result<Block, FrameError> {
    let mut framer = Framer::new(ncols, nkey, usize::MAX);
    framer.push(stream)?;
    framer.finish()
}

/// Encodes tuples of `Option<&[u8]>` fields as a complete binary COPY stream (tests, benches).
pub fn encode<'a>(rows: impl IntoIterator<Item = Vec<Option<&'a [u8]>>>) -> Vec<u8> {
    let mut out = HEADER.to_vec();
    for row in rows {
        out.extend_from_slice(&(row.len() as i16).to_be_bytes());
        for f in row {
            match f {
                Some(b) => {
                    out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                    out.extend_from_slice(b);
                }
                None => out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
    }
    out.extend_from_slice(TRAILER);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        encode(vec![
            vec![Some(&1i64.to_be_bytes()[..]), Some(b"hello"), None],
            vec![Some(&2i64.to_be_bytes()[..]), Some(b""), Some(b"x")],
        ])
    }

    #[test]
    fn frames_whole_stream() {
        let s = sample();
        let b = frame_all(&s, 3, 1).unwrap();
        assert_eq!(b.rows.len(), 2);
        let r = b.rows[0];
        assert_eq!(r.key(&b.data), &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        let vals: Vec<_> = fields(r.value(&b.data)).collect();
        assert_eq!(vals, vec![Some(&b"hello"[..]), None]);
        // NULL and empty hash differently because lengths are part of the bytes.
        assert_ne!(b.rows[0].value(&b.data), b.rows[1].value(&b.data));
    }

    #[test]
    fn frames_byte_by_byte() {
        let s = sample();
        let mut f = Framer::new(3, 1, 1);
        let mut rows = 0;
        for byte in &s {
            f.push(std::slice::from_ref(byte)).unwrap();
            while let Some(b) = f.take_block() {
                rows += b.rows.len();
            }
        }
        rows += f.finish().unwrap().rows.len();
        assert_eq!(rows, 2);
    }

    #[test]
    fn truncated_is_an_error() {
        let s = sample();
        for cut in 0..s.len() - 1 {
            let mut f = Framer::new(3, 1, 1 << 20);
            let r = f.push(&s[..cut]).and_then(|_| f.finish().map(|_| ()));
            assert!(r.is_err(), "cut at {cut} accepted");
        }
    }

    proptest::proptest! {
        /// The fuzz target's checks, on random bytes and on random valid streams cut at random
        /// points, in every `cargo test` run.
        #[test]
        fn framing_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            crate::fuzzing::frame(&bytes);
        }

        #[test]
        fn valid_streams_frame_alike_in_any_chunking(
            rows in proptest::collection::vec(
                proptest::collection::vec(proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..20)), 3),
                0..20),
            step in 1u8..64,
            cut in proptest::option::of(0usize..400),
        ) {
            let rows2: Vec<Vec<Option<&[u8]>>> = rows.iter().map(|r| r.iter().map(|f| f.as_deref()).collect()).collect();
            let mut stream = vec![2u8, 0, step];
            stream.extend(encode(rows2));
            if let Some(c) = cut {
                stream.truncate(c.min(stream.len()));
            }
            crate::fuzzing::frame(&stream);
            if cut.is_none() {
                let b = frame_all(&stream[3..], 3, 1).unwrap();
                proptest::prop_assert_eq!(b.rows.len(), rows.len());
            }
        }
    }

    #[test]
    fn wrong_field_count_and_garbage() {
        let s = sample();
        assert!(matches!(
            frame_all(&s, 2, 1),
            Err(FrameError::FieldCount { .. })
        ));
        assert_eq!(
            frame_all(b"PGCOPY\nxx", 3, 1).unwrap_err(),
            FrameError::BadSignature
        );
        let mut bad = s.clone();
        bad.push(0);
        assert_eq!(frame_all(&bad, 3, 1).unwrap_err(), FrameError::AfterTrailer);
    }
}
