//! Buffers reused from one block (or batch) to the next.
//!
//! A framed block (512 KiB) and a write batch (up to 8 MiB) are each one allocation above
//! glibc's mmap threshold, which `tune_allocator` pins at 256 KiB to keep freed memory from
//! staying resident. Such an allocation is mapped fresh, faulted in and zeroed by the kernel a
//! page at a time as it fills, and unmapped when freed: in a 2M-row initial load that was about
//! 0.35 s of pgdelta's 2.5 s of CPU (docs/performance.md, "Cheaper loads"). A
//! [`BufPool`] hands out buffers and takes them back when the last [`Bytes`] made from one is
//! dropped, keeping at most `keep` of them; a buffer exists only while in use or kept, so peak
//! memory is that of the buffers in flight at once, as without the pool, plus the kept ones.

use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;

/// Buffers of one kind (blocks of a read, batches of a diff), reused.
#[derive(Debug)]
pub(crate) struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// The capacity of a new buffer; a returned buffer is kept only when its capacity is at
    /// least this and at most twice it (one grown for a huge row is freed).
    capacity: usize,
    keep: usize,
}

impl BufPool {
    pub(crate) fn new(capacity: usize, keep: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            free: Mutex::new(Vec::with_capacity(keep)),
            capacity,
            keep,
        })
    }

    /// An empty buffer with room for at least `capacity` bytes: a returned one if any.
    pub(crate) fn take(&self) -> Vec<u8> {
        let kept = self.lock().pop();
        kept.unwrap_or_else(|| Vec::with_capacity(self.capacity))
    }

    /// `buf` as shared bytes; the buffer comes back to the pool when the last of them (and of
    /// their slices) is dropped.
    pub(crate) fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: self.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Vec<u8>>> {
        // A panic while holding the lock leaves a valid list of buffers.
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        if buf.capacity() < self.capacity || buf.capacity() > 2 * self.capacity {
            return;
        }
        buf.clear();
        let mut free = self.lock();
        if free.len() < self.keep {
            free.push(buf);
        }
    }

    #[cfg(test)]
    fn kept(&self) -> usize {
        self.lock().len()
    }
}

/// The owner behind a pooled [`Bytes`].
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_comes_back_when_its_last_bytes_go() {
        let pool = BufPool::new(64, 2);
        let mut a = pool.take();
        let ptr = a.as_ptr();
        a.extend_from_slice(b"hello, world");
        let bytes = pool.freeze(a);
        let slice = bytes.slice(7..);
        drop(bytes);
        assert_eq!(pool.kept(), 0, "a slice still holds it");
        assert_eq!(&slice[..], b"world");
        drop(slice);
        assert_eq!(pool.kept(), 1);
        let b = pool.take();
        assert_eq!(b.as_ptr(), ptr, "the same allocation, reused");
        assert!(b.is_empty() && b.capacity() >= 64);
    }

    #[test]
    fn keeps_at_most_keep_and_frees_odd_sizes() {
        let pool = BufPool::new(64, 2);
        let held: Vec<Bytes> = (0..3).map(|_| pool.freeze(pool.take())).collect();
        drop(held);
        assert_eq!(pool.kept(), 2);
        let _ = pool.take();
        let _ = pool.take();
        drop(pool.freeze(Vec::with_capacity(1024)));
        drop(pool.freeze(Vec::with_capacity(8)));
        assert_eq!(pool.kept(), 0, "too large and too small buffers are freed");
    }
}
