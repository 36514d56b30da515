use std::process::{Command, Stdio};
use std::time::Duration;

use pgdelta::spec::{Mode, Model};
use pgdelta::tools::pgserver::{Durability, TempPostgres};
use pgdelta::Error;

use crate::support::{connect, Env};

const T: &str = "CREATE TABLE t (id int PRIMARY KEY, qty int, note text)";

async fn seeded(rows: i64) -> Env {
    let env = Env::new().await;
    env.both(T).await;
    env.src
        .batch_execute(&format!(
            "INSERT INTO t SELECT i, i % 100, 'note ' || i FROM generate_series(1, {rows}) i"
        ))
        .await
        .unwrap();
    env
}

fn dbname(url: &str) -> &str {
    &url[url.rfind('/').unwrap() + 1..]
}

/// Terminates pgdelta's sessions on `db` that match `filter` (at most `limit` of them);
/// returns how many.
async fn terminate(admin: &tokio_postgres::Client, db: &str, filter: &str, limit: u32) -> u64 {
    let n: i64 = admin
        .query_one(
            &format!("SELECT count(pg_terminate_backend(pid)) FROM (SELECT pid FROM pg_stat_activity WHERE datname = $1::text AND application_name = 'pgdelta' AND pid <> pg_backend_pid() AND {filter} LIMIT {limit}) s"),
            &[&db],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or_else(|e| panic!("terminator: {e}"));
    n as u64
}

/// Terminates pgdelta's sessions on `db` (writers or the reader) every `every` until stopped.
fn terminator(
    url: String,
    db: String,
    filter: &'static str,
    every: Duration,
    times: usize,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let admin = connect(&url).await;
        let mut killed = 0u64;
        for _ in 0..times {
            tokio::time::sleep(every).await;
            killed += terminate(&admin, &db, filter, u32::MAX).await;
        }
        killed
    })
}

/// Terminates the first of pgdelta's sessions on `db` that matches `filter`, polling for up to
/// 20 s; returns how many it terminated (0 or 1).
fn terminate_first(url: String, db: String, filter: &'static str) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let admin = connect(&url).await;
        for _ in 0..1000 {
            let n = terminate(&admin, &db, filter, 1).await;
            if n > 0 {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        0
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_shrinks_batches_and_the_run_finishes() {
    let env = seeded(3000).await;
    env.dst
        .batch_execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.0005); RETURN NEW; END $$;
             CREATE TRIGGER slow BEFORE INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION slow();",
        )
        .await
        .unwrap();
    let db = dbname(&env.dst_url).to_string();
    env.dst
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET statement_timeout = '200ms'"
        ))
        .await
        .unwrap();
    let s = env.sync(&env.spec("t", &["id"])).await.unwrap();
    assert!(s.timeouts > 0, "{s:?}");
    assert_eq!(s.destination_statement_timeout_ms, Some(200));
    assert_eq!((s.written, s.rejected), (3000, 0));
    assert!(s.max_batch < 3000 && s.min_batch >= 1, "{s:?}");
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
}

/// A transaction the server aborted after an error its caller never saw (what a statement
/// timeout firing as a statement ends does): `COMMIT` then answers `ROLLBACK` without an error,
/// so a plain commit reports success for rows that are not there. pgdelta's commit, which the
/// writers and the audit log use, fails instead (SQLSTATE 25P02, retried by the writers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_of_a_transaction_the_server_aborted_fails() {
    let env = seeded(0).await;
    let mut client = connect(&env.dst_url).await;
    // tokio-postgres' own commit: Ok, and the row is not there.
    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (1, 1, 'lost')", &[])
        .await
        .unwrap();
    tx.execute("SELECT 1/0", &[]).await.unwrap_err();
    tx.commit().await.unwrap();
    assert_eq!(Env::count(&env.dst, "t").await, 0);
    // pgdelta's: the error.
    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (1, 1, 'lost')", &[])
        .await
        .unwrap();
    tx.execute("SELECT 1/0", &[]).await.unwrap_err();
    let e = pgdelta::conn::commit(tx).await.unwrap_err();
    assert_eq!(
        e.code(),
        Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION),
        "{e}"
    );
    assert_eq!(Env::count(&env.dst, "t").await, 0);
    // A transaction the server holds open commits, and the session is usable after the failure.
    let tx = client.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (2, 2, 'kept')", &[])
        .await
        .unwrap();
    pgdelta::conn::commit(tx).await.unwrap();
    assert_eq!(Env::count(&env.dst, "t").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rows_are_isolated_reported_and_retried_next_run() {
    let env = seeded(2000).await;
    env.dst
        .batch_execute("ALTER TABLE t ADD CONSTRAINT positive CHECK (qty >= 0)")
        .await
        .unwrap();
    env.src
        .batch_execute("UPDATE t SET qty = -1 WHERE id IN (7, 500, 1999)")
        .await
        .unwrap();
    let spec = env.spec("t", &["id"]);
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.written, s.rejected), (1997, 3));
    let keys: Vec<&str> = s.rejected_rows.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, vec!["id=7", "id=500", "id=1999"]);
    assert!(s
        .rejected_rows
        .iter()
        .all(|r| r.sqlstate == "23514" && r.message.contains("positive")));
    env.assert_same(
        "SELECT * FROM t WHERE qty >= 0 ORDER BY id",
        "SELECT * FROM t ORDER BY id",
    )
    .await;

    // The state file lists them.
    let snap = pgdelta::snapshot::Snapshot::open(&env.state(), 1 << 20).unwrap();
    let listed = snap.rejections::<pgdelta::Rejection>().unwrap();
    assert!(listed[0].1.iter().any(|r| r.key == "id=500"), "{listed:?}");
    drop(snap);

    // A changed row that turns bad is rejected too, and its old version stays.
    env.src
        .batch_execute("UPDATE t SET qty = -5 WHERE id = 10")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.added, s.changed, s.rejected, s.written), (3, 1, 4, 0));
    assert_eq!(
        Env::rows(&env.dst, "SELECT qty FROM t WHERE id = 10").await,
        vec!["(10)"]
    );

    // Once fixed at the source, every rejected row lands.
    env.src
        .batch_execute("UPDATE t SET qty = 1 WHERE qty < 0")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.rejected, s.written), (0, 4));
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
    assert_eq!(env.sync(&spec).await.unwrap().written, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_rejections_fail_the_run() {
    let env = seeded(500).await;
    env.dst
        .batch_execute("ALTER TABLE t ADD CONSTRAINT small CHECK (qty < 90)")
        .await
        .unwrap();
    let mut spec = env.spec("t", &["id"]);
    spec.max_rejected = 2;
    let e = env.sync(&spec).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::TooManyRejected {
                rejected: 3,
                max: 2,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("--max-rejected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writer_sessions_killed_mid_run_reconnect_and_finish() {
    let env = seeded(20_000).await;
    let mut spec = env.spec("t", &["id"]);
    spec.batch.fixed_rows = Some(400);
    spec.batch.sleep = Duration::from_millis(15);
    let killer = terminator(
        env.dst_url.clone(),
        dbname(&env.dst_url).into(),
        "true",
        Duration::from_millis(150),
        4,
    );
    let s = env.sync_small_buffers(&spec).await.unwrap();
    let killed = killer.await.unwrap();
    assert!(killed > 0, "the test killed no session");
    assert!(s.reconnects > 0 && s.retries > 0, "{s:?}");
    assert_eq!((s.written, s.rejected), (20_000, 0), "{s:?}");
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
    assert_eq!(env.sync(&spec).await.unwrap().written, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_read_cut_off_never_deletes() {
    let env = seeded(20_000).await;
    let mut spec = env.spec("t", &["id"]);
    spec.delete = true;
    env.sync(&spec).await.unwrap();
    // Many large changes (more than socket buffers hold, and throttled writes hold the reader
    // back) and some deletions.
    env.src
        .batch_execute(
            "UPDATE t SET note = repeat(md5(id::text), 250); DELETE FROM t WHERE id <= 100",
        )
        .await
        .unwrap();
    spec.batch.fixed_rows = Some(200);
    spec.batch.sleep = Duration::from_millis(20);
    // The reader's COPY is killed as soon as it is seen (a fixed delay missed it when a loaded
    // machine started the run late).
    let killer = terminate_first(
        env.src_url.clone(),
        dbname(&env.src_url).into(),
        "query LIKE 'COPY%'",
    );
    let e = env.sync_small_buffers(&spec).await.unwrap_err();
    assert!(killer.await.unwrap() > 0, "the test killed no reader");
    assert!(matches!(e, Error::SourceRead { .. }), "{e}");
    assert!(e.to_string().contains("nothing was deleted"), "{e}");
    assert_eq!(Env::count(&env.dst, "t WHERE id <= 100").await, 100);
    // The next run completes, applies the deletes and converges.
    spec.batch.sleep = Duration::ZERO;
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.deleted, 100);
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_cluster_restart_mid_run() {
    let env = seeded(20_000).await;
    let dst_pg = tokio::task::spawn_blocking(|| TempPostgres::start(Durability::Fast))
        .await
        .unwrap()
        .unwrap();
    let admin = connect(&dst_pg.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE d").await.unwrap();
    let dst_url = dst_pg.url("d");
    connect(&dst_url).await.batch_execute(T).await.unwrap();
    let mut spec = env.spec("t", &["id"]);
    spec.batch.fixed_rows = Some(250);
    spec.batch.sleep = Duration::from_millis(20);
    let snap = pgdelta::snapshot::Snapshot::open(&env.state(), 1 << 20).unwrap();
    let src = pgdelta::conn::ConnInfo::parse(&env.src_url).unwrap();
    let dst = pgdelta::conn::ConnInfo::parse(&dst_url).unwrap();
    let opts = pgdelta::sync::RunOptions::default();
    let run = pgdelta::sync::run(&src, &dst, &spec, &opts, &snap);
    let restart = async {
        // Restart once the first batches landed, with most of the run still ahead.
        let watch = connect(&dst_url).await;
        loop {
            let n: i64 = watch
                .query_one("SELECT count(*) FROM t", &[])
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                assert!(n < 20_000, "the run finished before the restart");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(watch);
        let pg = &dst_pg;
        tokio::task::block_in_place(|| pg.restart("fast")).unwrap();
    };
    let (s, ()) = tokio::join!(run, restart);
    let s = s.unwrap();
    assert!(s.reconnects > 0, "{s:?}");
    let dst_client = connect(&dst_url).await;
    let a = Env::rows(&env.src, "SELECT * FROM t ORDER BY id").await;
    let b = Env::rows(&dst_client, "SELECT * FROM t ORDER BY id").await;
    crate::support::assert_rows_equal(&a, &b);
}

fn spawn_sync(env: &Env, extra: &[&str]) -> std::process::Child {
    spawn(env, "sync", extra)
}

/// `pgdelta <command>` (`sync` or `check`) of table t, with the flags every test here uses.
fn spawn(env: &Env, command: &str, extra: &[&str]) -> std::process::Child {
    let state = env.state();
    let mut args = vec![
        command,
        "--source",
        &env.src_url,
        "--destination",
        &env.dst_url,
        "--table",
        "t",
        "--target",
        "t",
        "--key",
        "id",
        "--delete",
        "--batch-size",
        "300",
        "--state",
        state.to_str().unwrap(),
    ];
    if !extra.contains(&"--sleep-ms") {
        args.extend(["--sleep-ms", "15"]);
    }
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_pgdelta"))
        .args(&args)
        .current_dir(env.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

async fn wait_for_rows(env: &Env) {
    for _ in 0..500 {
        if Env::count(&env.dst, "t").await > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("pgdelta wrote nothing");
}

async fn sigkill_then_rerun(mode: &str) {
    let env = seeded(30_000).await;
    let mut child = spawn_sync(&env, &["--mode", mode]);
    wait_for_rows(&env).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = Env::count(&env.dst, "t").await;
    assert!(
        partial > 0 && partial < 30_000,
        "killed too late to test anything: {partial}"
    );
    run_ok(&env, &["--mode", mode, "--json", "--sleep-ms", "0"]);
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
}

/// Runs a sync to its end and checks it exited 0.
fn run_ok(env: &Env, flags: &[&str]) -> std::process::Output {
    let out = spawn_sync(env, flags).wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The last JSON line of a run's stdout.
fn last_json(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_default()
}

/// A run reading with three source sessions, killed while it writes: the killed run applied
/// no delete (its removals come after its writes), and the re-run, split again, converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_split_read_then_rerun_converges() {
    let env = seeded(30_000).await;
    let flags = ["--read-sessions", "3"];
    // A first sync, then a change of every kind at the source.
    let first = run_ok(&env, &["--json", "--sleep-ms", "0", "--read-sessions", "3"]);
    assert_eq!(last_json(&first)["data"]["read_sessions"], 3);
    env.src
        .batch_execute(
            "UPDATE t SET qty = qty + 1000 WHERE id % 2 = 0;
             DELETE FROM t WHERE id % 97 = 0;
             INSERT INTO t SELECT i, 1, 'new' FROM generate_series(30001, 31000) i;",
        )
        .await
        .unwrap();
    let deleted: i64 = env
        .src
        .query_one(
            "SELECT count(*) FROM generate_series(1, 30000) i WHERE i % 97 = 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let changed = || async {
        env.dst
            .query_one("SELECT count(*) FROM t WHERE qty >= 1000", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let mut child = spawn_sync(&env, &flags);
    for _ in 0..500 {
        if changed().await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let changed = changed().await;
    assert!(
        changed > 0 && changed < 15_000,
        "killed too early or too late to test anything: {changed} rows updated"
    );
    // No row was deleted by the killed run.
    let gone: i64 = env
        .dst
        .query_one(
            "SELECT count(*) FROM t WHERE id <= 30000 AND id % 97 = 0",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, deleted, "the killed run deleted rows");
    let out = run_ok(&env, &["--json", "--sleep-ms", "0", "--read-sessions", "3"]);
    let data = &last_json(&out)["data"];
    assert_eq!(data["read_sessions"], 3, "{data}");
    assert_eq!(data["removed"].as_i64(), Some(deleted), "{data}");
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_rerun_converges_upsert() {
    sigkill_then_rerun("upsert").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_then_rerun_converges_insert() {
    sigkill_then_rerun("insert").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_the_next_run_resumes() {
    sigterm_then_resume(&[]).await;
}

/// The same with the read split across three source sessions: every session's COPY stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_split_read_cleanly_and_the_next_run_resumes() {
    sigterm_then_resume(&["--read-sessions", "3"]).await;
}

async fn sigterm_then_resume(flags: &[&str]) {
    let env = seeded(30_000).await;
    let child = spawn_sync(&env, flags);
    wait_for_rows(&env).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("interrupted") && err.contains("the next run resumes"),
        "{err}"
    );
    let partial = Env::count(&env.dst, "t").await;
    assert!(partial < 30_000, "stopped too late to test anything");
    // No source session is left reading.
    let reading: i64 = env
        .src
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgdelta' AND query LIKE 'COPY%' AND state = 'active' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reading, 0, "a source session still reads after the stop");
    // What landed was recorded: the next run does not rewrite it.
    let mut again = flags.to_vec();
    again.extend(["--json", "--sleep-ms", "0"]);
    let out = run_ok(&env, &again);
    let last = last_json(&out);
    let sessions = if flags.is_empty() { 1 } else { 3 };
    assert_eq!(last["data"]["read_sessions"], sessions, "{last}");
    assert_eq!(last["data"]["unchanged"].as_i64().unwrap(), partial);
    assert_eq!(last["data"]["written"].as_i64().unwrap(), 30_000 - partial);
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptied_source_does_not_empty_the_destination() {
    let env = seeded(1000).await;
    let mut spec = env.spec("t", &["id"]);
    spec.delete = true;
    spec.model = Model::Query("SELECT * FROM t WHERE qty >= 0".into());
    spec.mode = Mode::Upsert;
    env.sync(&spec).await.unwrap();
    env.src.batch_execute("TRUNCATE t").await.unwrap();
    let e = env.sync(&spec).await.unwrap_err();
    assert!(matches!(e, Error::DeleteGuard { .. }), "{e}");
    assert!(e.to_string().contains("would delete 1000 of 1000"), "{e}");
    assert_eq!(Env::count(&env.dst, "t").await, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_state_file_is_refused_at_once() {
    let env = seeded(30_000).await;
    let first = spawn_sync(&env, &[]);
    wait_for_rows(&env).await;
    let t0 = std::time::Instant::now();
    let out = spawn_sync(&env, &["--json"]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another pgdelta run"), "{err}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "refused only after {:?}",
        t0.elapsed()
    );
    let first = first.wait_with_output().unwrap();
    assert_eq!(
        first.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
}

/// An exception raised by a trigger on the target (SQLSTATE class P0) is a row error, like a
/// constraint violation: the batch is bisected, the good rows land, the bad ones are rejected.
/// It used to fail the whole run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_exceptions_on_the_target_reject_rows_not_the_run() {
    let env = seeded(1000).await;
    env.dst
        .batch_execute(
            "CREATE FUNCTION refuse_odd() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF NEW.note = 'forbidden' THEN RAISE EXCEPTION 'note % is forbidden', NEW.id; END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION refuse_odd();",
        )
        .await
        .unwrap();
    env.src
        .batch_execute("UPDATE t SET note = 'forbidden' WHERE id IN (10, 600)")
        .await
        .unwrap();
    let spec = env.spec("t", &["id"]);
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.written, s.rejected), (998, 2));
    assert!(s
        .rejected_rows
        .iter()
        .all(|r| r.sqlstate == "P0001" && r.message.contains("is forbidden")));
    let keys: Vec<&str> = s.rejected_rows.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["id=10", "id=600"]);
    env.assert_same(
        "SELECT * FROM t WHERE note <> 'forbidden' ORDER BY id",
        "SELECT * FROM t ORDER BY id",
    )
    .await;
}

/// A run killed after the destination committed rows but before the state file made their
/// entries durable, and then the source undoes what that run wrote: the new rows are deleted and
/// the changed ones changed back. The next run must not trust entries that miss the killed run's
/// writes (a new row it finds in neither the snapshot nor the source would stay in the target,
/// and a row changed back to its recorded hash would look unchanged): the target ends equal to
/// the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_writes_then_the_source_undoes_them_converges() {
    let env = seeded(30_000).await;
    let held = sync_then_sigkill_mid_write(&env, 2).await;
    // The source undoes everything the killed run may have written.
    env.src
        .batch_execute(
            "UPDATE t SET qty = qty - 1000 WHERE id % 2 = 0;
             DELETE FROM t WHERE id > 30000;",
        )
        .await
        .unwrap();
    // A dry run says what the next run does, and leaves the writing mark where it is.
    let before = env.state_contents();
    assert!(before.0.iter().all(|(_, m, _)| m.writing), "{before:?}");
    let out = run_ok(&env, &["--json", "--dry-run"]);
    let reason = last_json(&out)["data"]["read_strategy_reason"].to_string();
    assert!(reason.contains("rebuilt from the target"), "{reason}");
    assert_eq!(env.state_contents(), before, "a dry run writes nothing");
    let out = run_ok(&env, &["--json", "--sleep-ms", "0"]);
    let data = &last_json(&out)["data"];
    assert_eq!(data["rebuilt_from_target"].as_i64(), Some(held), "{data}");
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
}

/// Syncs t (30,000 rows), inserts 600 rows and updates every `nth` row at the source, then
/// SIGKILLs a sync of those changes after its first rows reached the target; returns the
/// target's row count then. The killed run leaves its writing mark in the state file. It reads
/// in full when the changes are more than half the rows (every 2nd row), else only the changes.
async fn sync_then_sigkill_mid_write(env: &Env, nth: i64) -> i64 {
    // The seeding's statistics must be in before the first run records them: a backend flushes
    // its own only now and then, and the delta read judges the changes' share by them.
    env.flush_stats().await;
    run_ok(env, &["--sleep-ms", "0"]);
    env.src
        .batch_execute(&format!(
            "INSERT INTO t SELECT i, 1, 'new' FROM generate_series(30001, 30600) i;
             UPDATE t SET qty = qty + 1000 WHERE id % {nth} = 0 AND id <= 30000;"
        ))
        .await
        .unwrap();
    env.flush_stats().await;
    let written = || async {
        env.dst
            .query_one(
                "SELECT count(*) FILTER (WHERE qty >= 1000) + count(*) FILTER (WHERE id > 30000) FROM t",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let mut child = spawn_sync(env, &[]);
    for _ in 0..500 {
        if written().await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let n = written().await;
    assert!(
        n > 0 && n < 600 + 30_000 / nth,
        "killed too early or too late to test anything: {n} rows written"
    );
    // The new rows come first in the heap, so some of them are in the target.
    let held = Env::count(&env.dst, "t").await;
    assert!(held > 30_000, "{held}");
    held
}

/// After a killed delta run, an emptied target: `check` predicts a full read (the run clears
/// the entries the writing mark put in doubt, and there is nothing to rebuild them from; the
/// delta run kept its recorded read), and the run reads in full and writes every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_writes_then_an_emptied_target_is_read_in_full() {
    let env = seeded(30_000).await;
    sync_then_sigkill_mid_write(&env, 3).await;
    env.dst.batch_execute("TRUNCATE t").await.unwrap();
    let out = spawn(&env, "check", &[]).wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let said = "the next run reads full: ";
    let predicted = err
        .lines()
        .find_map(|l| Some(&l[l.find(said)? + said.len()..]))
        .unwrap_or_else(|| panic!("no full read predicted: {err}"));
    let out = run_ok(&env, &["--json", "--sleep-ms", "0"]);
    let data = &last_json(&out)["data"];
    assert_eq!(data["read_strategy"], "full", "{data}");
    // The prediction gives the run's own reason (and then how many sessions read it).
    let reason = data["read_strategy_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("the snapshot has no entries"), "{data}");
    assert!(predicted.starts_with(reason), "{predicted} / {reason}");
    assert_eq!(data["written"].as_i64(), Some(30_600), "{data}");
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
}
