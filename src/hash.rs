//! Row and key hashing: xxh3 over raw field bytes, never over decoded values.
//!
//! The row hash is one xxh3-128 call over the tuple's non-key fields as they lie in the COPY
//! stream, length prefixes included, so NULL (length -1) and empty (length 0) differ and a value
//! cannot bleed into its neighbour. Keys are stored as their raw bytes, not hashed; the 64-bit key
//! hash exists only to find duplicate keys among rows the snapshot has never seen.

use xxhash_rust::xxh3::{xxh3_128, xxh3_64_with_seed};

/// The 16-byte fingerprint of a row's non-key fields.
#[inline]
pub fn row_hash(value: &[u8]) -> [u8; 16] {
    xxh3_128(value).to_le_bytes()
}

/// A seeded 64-bit hash of a key. The seed changes every run, so a collision can only ever make
/// one run report a spurious duplicate, never the same one twice.
#[inline]
pub fn key_hash(key: &[u8], seed: u64) -> u64 {
    xxh3_64_with_seed(key, seed)
}

/// A stable hex fingerprint of text (model fingerprints in the snapshot metadata).
pub fn fingerprint(parts: &[&str]) -> String {
    let mut buf = Vec::new();
    for p in parts {
        buf.extend_from_slice(&(p.len() as u64).to_le_bytes());
        buf.extend_from_slice(p.as_bytes());
    }
    format!("{:032x}", xxh3_128(&buf))
}
