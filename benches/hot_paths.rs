//! Criterion benches for the hot paths, on fixed-seed synthetic rows shaped like the benchmark
//! model (bigint key, ints, text, numeric, bool, text[], jsonb, timestamptz; ~200 bytes a row).
//! Throughput is set per row, so reports read in rows/s (and bytes/s for framing).
//!
//!     cargo bench --bench hot_paths

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pgdelta::batch::BatchBuilder;
use pgdelta::copy::{encode, frame_all, Framer};
use pgdelta::hash::row_hash;

const ROWS: usize = 100_000;

/// A deterministic generator (no RNG dependency): a 64-bit LCG.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
}

/// A binary COPY stream of `n` rows with 10 columns, key first.
fn stream(n: usize, seed: u64) -> Vec<u8> {
    let mut rng = Lcg(seed);
    let rows: Vec<Vec<Vec<u8>>> = (0..n)
        .map(|i| {
            let text_len = 20 + (rng.next() % 60) as usize;
            vec![
                (i as i64 + 1).to_be_bytes().to_vec(),
                (rng.next() as i32).to_be_bytes().to_vec(),
                b"shipped".to_vec(),
                vec![0, 2, 0, 0, 0, 0, 0, 2, 0x04, 0xd2, 0x16, 0x2e],
                vec![(rng.next() % 2) as u8],
                vec![0u8; 40],
                format!("{{\"score\": {}, \"source\": \"web\"}}", rng.next() % 100).into_bytes(),
                (0..text_len)
                    .map(|j| b'a' + ((j as u64 + rng.next()) % 26) as u8)
                    .collect(),
                (rng.next() as i64).to_be_bytes().to_vec(),
                (rng.next() as i64).to_be_bytes().to_vec(),
            ]
        })
        .collect();
    encode(
        rows.iter()
            .map(|r| r.iter().map(|f| Some(f.as_slice())).collect()),
    )
}

fn framing(c: &mut Criterion) {
    let s = stream(ROWS, 42);
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Bytes(s.len() as u64));
    // As the reader sees it: one chunk per CopyData message (one row each).
    let block = frame_all(&s, 10, 1).unwrap();
    let mut chunks = vec![&s[..19]];
    chunks.extend(
        block
            .rows
            .iter()
            .map(|r| &s[19 + r.start as usize..19 + r.end as usize]),
    );
    chunks.push(&s[s.len() - 2..]);
    g.bench_function("per_row_chunks_into_512k_blocks", |b| {
        b.iter(|| {
            let mut f = Framer::new(10, 1, 512 << 10);
            let mut n = 0;
            for ch in &chunks {
                f.push(ch).unwrap();
                while let Some(b) = f.take_block() {
                    n += b.rows.len();
                }
            }
            n += f.finish().unwrap().rows.len();
            black_box(n)
        })
    });
    g.finish();
}

fn hashing(c: &mut Criterion) {
    let s = stream(ROWS, 7);
    let block = frame_all(&s, 10, 1).unwrap();
    let mut g = c.benchmark_group("hashing");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("xxh3_128_per_row_one_call", |b| {
        b.iter(|| {
            let mut acc = 0u8;
            for r in &block.rows {
                acc ^= row_hash(r.value(&block.data))[0];
            }
            black_box(acc)
        })
    });
    g.finish();
}

fn snapshot_diff(c: &mut Criterion) {
    use pgdelta::snapshot::Snapshot;
    let s = stream(ROWS, 9);
    let block = frame_all(&s, 10, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snap = Snapshot::open(&dir.path().join("b.redb"), 32 << 20).unwrap();
    // Record every row once, as a first sync would.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut batch = BatchBuilder::with_capacity(s.len());
    for r in &block.rows {
        batch.push(&block, r, row_hash(r.value(&block.data)), None);
    }
    let batch = batch.take();
    rt.block_on(pgdelta::snapshot::seed_for_bench(
        &snap,
        "b",
        &batch,
        batch.len(),
    ))
    .unwrap();
    let reader = snap.reader("b").unwrap();
    let mut g = c.benchmark_group("snapshot_diff");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("hash_and_lookup_in_key_order", |b| {
        b.iter(|| {
            let mut unchanged = 0;
            for r in &block.rows {
                let h = row_hash(r.value(&block.data));
                if reader
                    .get(r.key(&block.data))
                    .unwrap()
                    .is_some_and(|e| e.hash == h)
                {
                    unchanged += 1;
                }
            }
            assert_eq!(unchanged, ROWS);
            black_box(unchanged)
        })
    });
    g.finish();
    drop(reader);
    drop(snap);
}

/// A first load's records through the snapshot thread, 10k rows per record as the writers
/// hand them over: keys in order (a bigint read in heap order) against random 16-byte keys (a
/// uuid), whose stages wait on disk and are merged in (docs/performance.md, "A load of random
/// keys in O(N)"). Stages of 1 MiB (a run's are 16 MiB): 1M keys then take as many stages, and
/// make as many passes over the tree if they are applied one by one, as 16M keys would in a run.
/// Each iteration records into a fresh state file.
fn snapshot_record(c: &mut Criterion) {
    use pgdelta::snapshot::{seed_for_bench, Snapshot};
    const LOAD: usize = 1_000_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut rng = Lcg(13);
    let batch = |key: &mut dyn FnMut(usize) -> Vec<u8>| {
        let keys: Vec<Vec<u8>> = (0..LOAD).map(key).collect();
        let s = encode(
            keys.iter()
                .map(|k| vec![Some(k.as_slice()), Some(&b"a row"[..])]),
        );
        let block = frame_all(&s, 2, 1).unwrap();
        let mut b = BatchBuilder::with_capacity(s.len());
        for r in &block.rows {
            b.push(&block, r, row_hash(r.value(&block.data)), None);
        }
        b.take()
    };
    let ordered = batch(&mut |i| (i as u64).to_be_bytes().to_vec());
    let scattered = batch(&mut |_| {
        let mut k = rng.next().to_be_bytes().to_vec();
        k.extend_from_slice(&rng.next().to_be_bytes());
        k
    });
    let mut g = c.benchmark_group("snapshot_record");
    g.sample_size(10);
    g.throughput(Throughput::Elements(LOAD as u64));
    for (name, rows) in [
        ("first_load_1m_keys_in_order", &ordered),
        ("first_load_1m_random_16_byte_keys", &scattered),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().unwrap();
                    let path = dir.path().join("r.redb");
                    let snap = Snapshot::open_with_stage(&path, 32 << 20, 1 << 20).unwrap();
                    (dir, snap)
                },
                |(dir, snap)| {
                    rt.block_on(seed_for_bench(&snap, "r", rows, 10_000))
                        .unwrap();
                    (dir, snap)
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// A full read of random keys sorted on disk before its lookups (docs/performance.md, "A full
/// read of random keys, sorted on disk"): 1M rows of about 100 bytes with random 16-byte keys,
/// in blocks of 512 KiB as the framer cuts them, gathered into runs of 8 MiB (a run's are
/// 32 MiB, so 1M rows take as many runs as 4M would), sorted and written by the sort thread,
/// then merged back in key order. The file sits in the system's temporary directory.
fn diff_sort(c: &mut Criterion) {
    const LOAD: usize = 1_000_000;
    let mut rng = Lcg(29);
    let keys: Vec<[u8; 16]> = (0..LOAD)
        .map(|_| {
            let mut k = [0u8; 16];
            k[..8].copy_from_slice(&rng.next().to_be_bytes());
            k[8..].copy_from_slice(&rng.next().to_be_bytes());
            k
        })
        .collect();
    let value = [b'v'; 72];
    let s = encode(keys.iter().map(|k| vec![Some(&k[..]), Some(&value[..])]));
    let whole = frame_all(&s, 2, 1).unwrap();
    // Blocks of about 512 KiB, each over bytes of its own, as the framer hands them on.
    let mut blocks = Vec::new();
    let mut first = 0;
    while first < whole.rows.len() {
        let start = whole.rows[first].start;
        let mut last = first;
        while last < whole.rows.len() && whole.rows[last].end - start < 512 << 10 {
            last += 1;
        }
        let end = whole.rows[last - 1].end;
        let rows = whole.rows[first..last]
            .iter()
            .map(|r| pgdelta::copy::RowSpan {
                start: r.start - start,
                key_end: r.key_end - start,
                end: r.end - start,
            })
            .collect();
        let data = whole.data.slice(start as usize..end as usize);
        blocks.push(pgdelta::copy::Block { data, rows });
        first = last;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut g = c.benchmark_group("diff_sort");
    g.sample_size(10);
    g.throughput(Throughput::Elements(LOAD as u64));
    g.bench_function("1m_rows_random_16_byte_keys_runs_of_8m_on_disk", |b| {
        b.iter_batched(
            || blocks.clone(),
            |blocks| {
                let n = pgdelta::sort_for_bench(blocks, dir.path(), 8 << 20);
                assert_eq!(n, LOAD as u64);
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn copy_encoder(c: &mut Criterion) {
    let s = stream(ROWS, 11);
    let block = frame_all(&s, 10, 1).unwrap();
    let mut g = c.benchmark_group("copy_encoder");
    g.throughput(Throughput::Elements(ROWS as u64));
    g.bench_function("batch_builder_tuples_as_received", |b| {
        b.iter_batched(
            || BatchBuilder::with_capacity(8 << 20),
            |mut builder| {
                for r in &block.rows {
                    builder.push(&block, r, [0; 16], None);
                }
                black_box(builder.take())
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = framing, hashing, snapshot_diff, snapshot_record, diff_sort, copy_encoder
}
criterion_main!(benches);
