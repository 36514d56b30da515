//! Test helpers: one throwaway PostgreSQL cluster per test binary (or the server named by
//! `PGDELTA_TEST_DATABASE_URL`), a fresh source and destination database per test, a scratch
//! directory for the state file, and assertions on table contents.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use pgdelta::conn::ConnInfo;
use pgdelta::snapshot::Snapshot;
use pgdelta::spec::{Model, SyncSpec};
use pgdelta::sync::{RunOptions, Summary};
use pgdelta::tools::pgserver::{Durability, TempPostgres};
use tokio_postgres::Client;

/// A throwaway OpenSSH server, for the tunnel tests.
pub(crate) mod sshd;

enum Server {
    Local(TempPostgres),
    External(String),
}

static SERVER: OnceLock<Server> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn server() -> &'static Server {
    SERVER.get_or_init(|| match std::env::var("PGDELTA_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Server::External(url),
        _ => Server::Local(
            TempPostgres::start(Durability::Fast)
                .unwrap_or_else(|e| panic!("cannot start the test PostgreSQL: {e}")),
        ),
    })
}

/// The URL of database `db` on the test server.
pub(crate) fn url_for(db: &str) -> String {
    match server() {
        Server::Local(pg) => pg.url(db),
        Server::External(url) => {
            let (base, query) = match url.split_once('?') {
                Some((b, q)) => (b, format!("?{q}")),
                None => (url.as_str(), String::new()),
            };
            let cut = base
                .rfind('/')
                .filter(|&i| i > "postgres://".len())
                .unwrap_or(base.len());
            format!("{}/{db}{query}", &base[..cut])
        }
    }
}

/// The Unix socket directory of the test server, when it is the local throwaway one.
pub(crate) fn socket_dir() -> Option<PathBuf> {
    match server() {
        Server::Local(pg) => Some(pg.socket_dir().to_path_buf()),
        Server::External(_) => None,
    }
}

/// A test session, named `pgdelta-test` so fault injection aimed at pgdelta's own sessions
/// (`application_name = 'pgdelta'`) leaves it alone.
pub(crate) async fn connect(url: &str) -> Client {
    let mut config: tokio_postgres::Config = url.parse().unwrap();
    config.application_name("pgdelta-test");
    let (client, conn) = config
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
}

/// The built binary with `args`, run in `dir` with a clean environment (PATH only), so no
/// PG* or PGDELTA_* variable of the developer's shell leaks into a CLI test.
pub(crate) fn pgdelta_command(dir: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pgdelta"));
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    cmd
}

/// `pgdelta sync` of table `t` into `t` on `env`'s databases, key `id`, state `state`, with
/// `extra` flags, in a clean environment (see [`pgdelta_command`]).
pub(crate) fn sync_t(env: &Env, state: &std::path::Path, extra: &[&str]) -> std::process::Command {
    sync_t_between(env.dir.path(), &env.src_url, &env.dst_url, state, extra)
}

/// [`sync_t`] between any two connection strings, run in `dir`.
pub(crate) fn sync_t_between(
    dir: &std::path::Path,
    src: &str,
    dst: &str,
    state: &std::path::Path,
    extra: &[&str],
) -> std::process::Command {
    t_between("sync", dir, src, dst, state, extra)
}

/// `pgdelta <command>` (`sync`, `check`) of table `t` into `t` between any two connection
/// strings, key `id`, state `state`, run in `dir`.
pub(crate) fn t_between(
    command: &str,
    dir: &std::path::Path,
    src: &str,
    dst: &str,
    state: &std::path::Path,
    extra: &[&str],
) -> std::process::Command {
    let mut args = vec![
        command,
        "--source",
        src,
        "--destination",
        dst,
        "--table",
        "t",
        "--target",
        "t",
        "--key",
        "id",
        "--state",
        state.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    pgdelta_command(dir, &args)
}

/// Databases `src` and `dst` on a test's own server.
pub(crate) async fn create_src_dst(pg: &pgdelta::tools::pgserver::TempPostgres) {
    let admin = connect(&pg.url("postgres")).await;
    for db in ["src", "dst"] {
        admin
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .await
            .unwrap();
    }
}

/// `t (id, v)` in `src` and `dst` of a test's own server, `rows` rows in `src` (v = id).
pub(crate) async fn t_on(
    pg: &pgdelta::tools::pgserver::TempPostgres,
    rows: i32,
) -> (Client, Client) {
    let src = connect(&pg.url("src")).await;
    let dst = connect(&pg.url("dst")).await;
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v int)";
    src.batch_execute(ddl).await.unwrap();
    dst.batch_execute(ddl).await.unwrap();
    src.batch_execute(&format!(
        "INSERT INTO t SELECT i, i FROM generate_series(1, {rows}) i"
    ))
    .await
    .unwrap();
    // In the statistics before a first run records them (a delta read judges the share of
    // rows written since by them).
    flush_stats(&src).await;
    (src, dst)
}

/// The summary (`data` of the last JSON line) of a finished `pgdelta sync --json`, which must
/// have exited 0.
pub(crate) fn summary(out: std::process::Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    last["data"].clone()
}

/// Compares two row lists and reports the first difference (never the whole lists).
pub(crate) fn assert_rows_equal(a: &[String], b: &[String]) {
    let first = a.iter().zip(b.iter()).position(|(x, y)| x != y);
    if let Some(i) = first {
        panic!(
            "row {i} differs: source {} vs destination {} ({} vs {} rows)",
            a[i],
            b[i],
            a.len(),
            b.len()
        );
    }
    if a.len() != b.len() {
        let (longer, which) = if a.len() > b.len() {
            (a, "source")
        } else {
            (b, "destination")
        };
        let extra = &longer[a.len().min(b.len())..];
        panic!(
            "row counts differ: source {} vs destination {}; first extra {which} rows: {:?}",
            a.len(),
            b.len(),
            &extra[..extra.len().min(5)]
        );
    }
}

/// Sends `client`'s pending table statistics to the server now (see [`Env::flush_stats`]).
pub(crate) async fn flush_stats(client: &Client) {
    let _ = client
        .batch_execute("SELECT pg_stat_force_next_flush()")
        .await;
}

/// A source and a destination database of its own for one test.
pub(crate) struct Env {
    pub src: Client,
    pub dst: Client,
    pub src_url: String,
    pub dst_url: String,
    /// Scratch directory (state files, configs), removed on drop.
    pub dir: tempfile::TempDir,
    names: (String, String),
}

impl Env {
    pub(crate) async fn new() -> Env {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let names = (
            format!("t{}_{n}_src", std::process::id()),
            format!("t{}_{n}_dst", std::process::id()),
        );
        let admin_url = url_for("postgres");
        let admin = connect(&admin_url).await;
        for db in [&names.0, &names.1] {
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
                .await
                .unwrap();
            admin
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await
                .unwrap();
        }
        let src_url = url_for(&names.0);
        let dst_url = url_for(&names.1);
        Env {
            src: connect(&src_url).await,
            dst: connect(&dst_url).await,
            src_url,
            dst_url,
            dir: tempfile::tempdir().unwrap(),
            names,
        }
    }

    pub(crate) fn state(&self) -> PathBuf {
        self.dir.path().join("state.redb")
    }

    /// What the state file holds for each sync (metadata, entries), and the names of the other
    /// files beside it (a dry run's scratch files must be gone).
    pub(crate) fn state_contents(
        &self,
    ) -> (Vec<(String, pgdelta::snapshot::SyncMeta, u64)>, Vec<String>) {
        let syncs = Snapshot::open(&self.state(), 1 << 20)
            .unwrap()
            .syncs()
            .unwrap();
        let others = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n != "state.redb")
            .collect();
        (syncs, others)
    }

    /// Runs SQL on both databases.
    pub(crate) async fn both(&self, sql: &str) {
        self.src.batch_execute(sql).await.unwrap();
        self.dst.batch_execute(sql).await.unwrap();
    }

    /// A table `u (id uuid PRIMARY KEY, n int NOT NULL, note text)` keyed by random UUIDs on
    /// both sides, `rows` rows at the source (`n` from 1, `note` 'row n'); returns the spec
    /// that syncs it, deletes included.
    pub(crate) async fn uuid_table(&self, rows: i64) -> SyncSpec {
        self.both("CREATE TABLE u (id uuid PRIMARY KEY, n int NOT NULL, note text)")
            .await;
        self.src
            .batch_execute(&format!(
                "INSERT INTO u SELECT gen_random_uuid(), i, 'row ' || i FROM generate_series(1, {rows}) i"
            ))
            .await
            .unwrap();
        let mut spec = self.spec("u", &["id"]);
        spec.delete = true;
        spec
    }

    /// A table-model spec with sensible defaults.
    pub(crate) fn spec(&self, table: &str, key: &[&str]) -> SyncSpec {
        let mut spec = SyncSpec::new(table, Model::Table(table.into()), table, key);
        // Quick retries: the tests provoke failures on purpose.
        spec.retry.base = std::time::Duration::from_millis(50);
        spec
    }

    /// Runs a sync with small pipeline buffers, so the reader stalls behind slow writers
    /// instead of buffering a small test table whole.
    pub(crate) async fn sync_small_buffers(
        &self,
        spec: &SyncSpec,
    ) -> Result<Summary, pgdelta::Error> {
        let pipe = pgdelta::sync::PipelineSettings {
            block_bytes: 4096,
            block_queue: 1,
            batch_queue: 1,
            ..Default::default()
        };
        self.sync_tuned(spec, None, &pipe).await
    }

    /// Runs a sync whose snapshot thread stages `stage_bytes` of scattered records at a time
    /// (a run's are 16 MiB) and whose key reads look up `key_window` bytes of keys at a time
    /// (4 MiB): a small table then takes the paths of a large one, where stages and windows
    /// wait on disk and are merged.
    pub(crate) async fn sync_small_windows(
        &self,
        spec: &SyncSpec,
        stage_bytes: usize,
        key_window: usize,
    ) -> Result<Summary, pgdelta::Error> {
        let pipe = pgdelta::sync::PipelineSettings {
            key_window_bytes: key_window,
            // Blocks smaller than a window, as a large table's are.
            block_bytes: 4096,
            ..Default::default()
        };
        self.sync_tuned(spec, Some(stage_bytes), &pipe).await
    }

    /// Runs a full read of `spec` whose rows are sorted on disk, in runs of `run_bytes`, when
    /// their keys come scattered and the snapshot holds more than `above` entries (a run's
    /// are 32 MiB and 500,000): a small table then takes a large one's path.
    pub(crate) async fn sync_sorted(
        &self,
        spec: &SyncSpec,
        above: u64,
        run_bytes: usize,
    ) -> Result<Summary, pgdelta::Error> {
        self.sync_sorted_in_blocks(spec, above, run_bytes, 4096)
            .await
    }

    /// [`Env::sync_sorted`] with blocks of `block_bytes` (the read's key order is judged from
    /// its first block, and only from one of 64 rows or more).
    pub(crate) async fn sync_sorted_in_blocks(
        &self,
        spec: &SyncSpec,
        above: u64,
        run_bytes: usize,
        block_bytes: usize,
    ) -> Result<Summary, pgdelta::Error> {
        let pipe = pgdelta::sync::PipelineSettings {
            block_bytes,
            sort_above_entries: above,
            sort_run_bytes: run_bytes,
            ..Default::default()
        };
        let full = RunOptions {
            full_read: true,
            ..Default::default()
        };
        self.sync_tuned_opts(spec, None, &pipe, &full).await
    }

    /// Runs a sync with these pipeline settings and, when given, this staging limit.
    async fn sync_tuned(
        &self,
        spec: &SyncSpec,
        stage_bytes: Option<usize>,
        pipe: &pgdelta::sync::PipelineSettings,
    ) -> Result<Summary, pgdelta::Error> {
        self.sync_tuned_opts(spec, stage_bytes, pipe, &RunOptions::default())
            .await
    }

    async fn sync_tuned_opts(
        &self,
        spec: &SyncSpec,
        stage_bytes: Option<usize>,
        pipe: &pgdelta::sync::PipelineSettings,
        opts: &RunOptions,
    ) -> Result<Summary, pgdelta::Error> {
        self.flush_stats().await;
        let snap = match stage_bytes {
            Some(stage) => Snapshot::open_with_stage(&self.state(), 8 << 20, stage)?,
            None => Snapshot::open(&self.state(), 8 << 20)?,
        };
        pgdelta::sync::run_with(
            &ConnInfo::parse(&self.src_url)?,
            &ConnInfo::parse(&self.dst_url)?,
            spec,
            opts,
            &snap,
            pipe,
        )
        .await
    }

    pub(crate) async fn sync(&self, spec: &SyncSpec) -> Result<Summary, pgdelta::Error> {
        self.sync_opts(spec, &RunOptions::default()).await
    }

    pub(crate) async fn sync_opts(
        &self,
        spec: &SyncSpec,
        opts: &RunOptions,
    ) -> Result<Summary, pgdelta::Error> {
        self.sync_from(&self.src_url, spec, opts).await
    }

    /// A run whose source is `src_url` (the source database reached another way).
    pub(crate) async fn sync_from(
        &self,
        src_url: &str,
        spec: &SyncSpec,
        opts: &RunOptions,
    ) -> Result<Summary, pgdelta::Error> {
        self.sync_between(src_url, &self.dst_url, spec, opts).await
    }

    /// A run between `src_url` and `dst_url` (either database reached another way).
    pub(crate) async fn sync_between(
        &self,
        src_url: &str,
        dst_url: &str,
        spec: &SyncSpec,
        opts: &RunOptions,
    ) -> Result<Summary, pgdelta::Error> {
        self.flush_stats().await;
        let snap = Snapshot::open(&self.state(), 8 << 20)?;
        pgdelta::sync::run(
            &ConnInfo::parse(src_url)?,
            &ConnInfo::parse(dst_url)?,
            spec,
            opts,
            &snap,
        )
        .await
    }

    /// Sends the source test session's pending table statistics to the server. They go at most
    /// once a second otherwise, so a run could read the counters before this session's writes
    /// arrive and the next run count them as written since (a change-aware read's estimate of
    /// a large delta). PostgreSQL 15+; on older servers this does nothing.
    pub(crate) async fn flush_stats(&self) {
        flush_stats(&self.src).await;
    }

    /// Every row of `sql` as text, in order: the strongest type-agnostic equality check.
    pub(crate) async fn rows(client: &Client, sql: &str) -> Vec<String> {
        client
            .query(
                &format!("SELECT pgdelta_row::text FROM ({sql}) pgdelta_row"),
                &[],
            )
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    /// Asserts that `src_sql` on the source returns exactly the rows of `dst_sql` on the
    /// destination (both should ORDER BY the key).
    pub(crate) async fn assert_same(&self, src_sql: &str, dst_sql: &str) {
        let a = Self::rows(&self.src, src_sql).await;
        let b = Self::rows(&self.dst, dst_sql).await;
        assert_eq!(
            a.len(),
            b.len(),
            "row counts differ: source {} vs destination {}",
            a.len(),
            b.len()
        );
        for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
            assert_eq!(x, y, "row {i} differs");
        }
    }

    pub(crate) async fn count(client: &Client, table: &str) -> i64 {
        client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    /// (inserted, updated, deleted) tuple counters of a table in `client`'s database, after
    /// the statistics of finished sessions have been flushed.
    pub(crate) async fn counters(client: &Client, table: &str) -> (i64, i64, i64) {
        let row = client
            .query_one(
                "SELECT n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables WHERE relname = $1",
                &[&table],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1), row.get(2))
    }

    /// [`Env::counters`] of a destination table.
    pub(crate) async fn dst_counters(&self, table: &str) -> (i64, i64, i64) {
        Self::counters(&self.dst, table).await
    }

    /// Polls a destination table's counters until `pred` holds (stats are flushed
    /// asynchronously), at most 15 s.
    pub(crate) async fn wait_counters(
        &self,
        table: &str,
        pred: impl Fn((i64, i64, i64)) -> bool,
    ) -> (i64, i64, i64) {
        Self::wait_counters_on(&self.dst, table, pred).await
    }

    /// Polls the counters of a table in `client`'s database until `pred` holds, at most 15 s.
    pub(crate) async fn wait_counters_on(
        client: &Client,
        table: &str,
        pred: impl Fn((i64, i64, i64)) -> bool,
    ) -> (i64, i64, i64) {
        let what = format!("the counters of {table}");
        poll(&what, || Self::counters(client, table), |&c| pred(c)).await
    }

    /// Polls `sql` (one `int8`) in `client`'s database until `pred` holds, at most 15 s: for
    /// statistics, which finished sessions flush a moment after they end.
    pub(crate) async fn wait_value_on(
        client: &Client,
        sql: &str,
        pred: impl Fn(i64) -> bool,
    ) -> i64 {
        let value = || async { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) };
        poll(sql, value, |&v| pred(v)).await
    }
}

/// Calls `get` every 100 ms until what it returns meets `pred`, at most 15 s; panics naming
/// `what` with the last value otherwise.
pub(crate) async fn poll<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    mut get: impl FnMut() -> F,
    pred: impl Fn(&T) -> bool,
) -> T {
    let mut last = get().await;
    for _ in 0..150 {
        if pred(&last) {
            return last;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        last = get().await;
    }
    panic!("{what} never reached the expected state: {last:?}");
}

impl Drop for Env {
    fn drop(&mut self) {
        // Databases are dropped with the cluster; on an external server drop them now.
        if let Server::External(_) = server() {
            let names = self.names.clone();
            let admin_url = url_for("postgres");
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let admin = connect(&admin_url).await;
                    for db in [names.0, names.1] {
                        let _ = admin
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                            .await;
                    }
                });
            })
            .join()
            .ok();
        }
    }
}
