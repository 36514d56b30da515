//! A source that is a hot standby (made with `pg_basebackup -R` from a primary the test
//! starts): a read cancelled by a recovery conflict is retried, and the sync converges.

use std::time::Duration;

use pgdelta::tools::pgserver::{Durability, TempPostgres};

use crate::support::{
    assert_rows_equal, connect, create_src_dst, summary, sync_t_between, t_between, t_on, Env,
};

/// Waits until the standby's `count` query returns `want` (replay is asynchronous).
async fn replayed(replica: &tokio_postgres::Client, count: &str, want: i64) {
    for _ in 0..400 {
        let n: i64 = replica
            .query_one(count, &[])
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if n == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the standby never replayed: {count} != {want}");
}

/// A primary with databases `src` and `dst` and table `t` of `rows` rows in `src` (see
/// [`t_on`]), and a standby of it once it has replayed them: the servers, then sessions on the
/// primary's `src` and `dst` and on the standby's `src`.
async fn with_standby(
    rows: i32,
) -> (
    TempPostgres,
    TempPostgres,
    (tokio_postgres::Client, tokio_postgres::Client),
    tokio_postgres::Client,
) {
    let primary = TempPostgres::start(Durability::Fast).unwrap();
    create_src_dst(&primary).await;
    let clients = t_on(&primary, rows).await;
    let standby = TempPostgres::standby_of(&primary, &[]).unwrap();
    let replica = connect(&standby.url("src")).await;
    replayed(&replica, "SELECT count(*) FROM t", i64::from(rows)).await;
    (primary, standby, clients, replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_cancelled_by_a_recovery_conflict_is_retried() {
    let primary = TempPostgres::start(Durability::Fast).unwrap();
    create_src_dst(&primary).await;
    let src = connect(&primary.url("src")).await;
    let dst = connect(&primary.url("dst")).await;
    let ddl = "CREATE TABLE t (id int PRIMARY KEY, v int, note text)";
    src.batch_execute(ddl).await.unwrap();
    dst.batch_execute(ddl).await.unwrap();
    src.batch_execute(
        "INSERT INTO t SELECT i, i, repeat(md5(i::text), 3) FROM generate_series(1, 200000) i",
    )
    .await
    .unwrap();
    // A standby that cancels conflicting queries at once.
    let standby = TempPostgres::standby_of(
        &primary,
        &[
            "max_standby_streaming_delay = 0",
            "hot_standby_feedback = off",
        ],
    )
    .unwrap();
    let replica = connect(&standby.url("src")).await;
    replayed(&replica, "SELECT count(*) FROM t", 200_000).await;
    let in_recovery: bool = replica
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "the source must be a standby");

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.redb");
    let src_url = standby.url("src");
    let dst_url = primary.url("dst");
    // Small paced batches keep the source's COPY open (the bounded queues hold it back).
    let child = sync_t_between(
        dir.path(),
        &src_url,
        &dst_url,
        &state,
        &[
            "--delete",
            "--writers",
            "1",
            "--batch-size",
            "500",
            "--sleep-ms",
            "20",
            "--json",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    for _ in 0..400 {
        if Env::count(&dst, "t").await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // On the primary: new row versions, and a VACUUM that removes the old ones, which the
    // standby's read still needs: replaying it cancels the read.
    src.batch_execute("UPDATE t SET v = -v WHERE id % 10 = 0")
        .await
        .unwrap();
    src.batch_execute("VACUUM t").await.unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("conflict with recovery") && stderr.contains("max_standby_streaming_delay"),
        "no recovery conflict was met: {stderr}"
    );
    assert!(stderr.contains("retry 1 of 5"), "{stderr}");
    // The retried run read a consistent state of the standby: every row of it.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(last["data"]["rows_read"], 200_000, "{last}");
    assert_eq!(last["data"]["removed"], 0, "{last}");
    // Once the standby replayed everything, the destination equals the primary's table.
    replayed(&replica, "SELECT count(*) FROM t WHERE v < 0", 20_000).await;
    let a = Env::rows(&replica, "SELECT * FROM t ORDER BY id").await;
    let b = Env::rows(&dst, "SELECT * FROM t ORDER BY id").await;
    assert_rows_equal(&a, &b);
    drop(standby);
    drop(primary);
}

/// Delta reads across a standby and a failover: a standby is read in full (a failover could
/// reuse transaction ids), and after the standby is promoted the changed server identity forces
/// a full read that converges; the next run is a delta again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_and_a_failover_are_read_in_full_then_deltas_resume() {
    let primary = TempPostgres::start(Durability::Fast).unwrap();
    create_src_dst(&primary).await;
    let (src, dst) = t_on(&primary, 1000).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.redb");
    let run = |source: &str| {
        let out = sync_t_between(
            dir.path(),
            source,
            &primary.url("dst"),
            &state,
            &["--delete", "--json"],
        )
        .output()
        .unwrap();
        summary(out)
    };
    let s = run(&primary.url("src"));
    assert_eq!(s["read_strategy"], "full", "{s}");
    src.batch_execute("UPDATE t SET v = -v WHERE id <= 10")
        .await
        .unwrap();
    let s = run(&primary.url("src"));
    assert_eq!(
        (s["read_strategy"].as_str(), s["written"].as_i64()),
        (Some("delta"), Some(10)),
        "{s}"
    );

    // The standby: read in full, with the reason.
    let standby = TempPostgres::standby_of(&primary, &[]).unwrap();
    let replica = connect(&standby.url("src")).await;
    replayed(&replica, "SELECT count(*) FROM t WHERE v < 0", 10).await;
    let s = run(&standby.url("src"));
    assert_eq!(s["read_strategy"], "full", "{s}");
    assert!(
        s["read_strategy_reason"]
            .as_str()
            .unwrap()
            .contains("hot standby"),
        "{s}"
    );
    assert_eq!(s["written"], 0, "{s}");

    // Failover: the standby becomes the primary and takes writes.
    standby.promote().unwrap();
    let promoted = connect(&standby.url("src")).await;
    promoted
        .batch_execute(
            "UPDATE t SET v = 0 WHERE id BETWEEN 100 AND 104; DELETE FROM t WHERE id > 997;",
        )
        .await
        .unwrap();
    let s = run(&standby.url("src"));
    assert_eq!(s["read_strategy"], "full", "{s}");
    assert_eq!(
        (s["written"].as_i64(), s["deleted"].as_i64()),
        (Some(5), Some(3)),
        "{s}"
    );
    let a = Env::rows(&promoted, "SELECT * FROM t ORDER BY id").await;
    let b = Env::rows(&dst, "SELECT * FROM t ORDER BY id").await;
    assert_rows_equal(&a, &b);
    // The new primary's reads are deltas again.
    promoted
        .batch_execute("UPDATE t SET v = 7 WHERE id = 500")
        .await
        .unwrap();
    let s = run(&standby.url("src"));
    assert_eq!(
        (s["read_strategy"].as_str(), s["written"].as_i64()),
        (Some("delta"), Some(1)),
        "{s}"
    );
    let a = Env::rows(&promoted, "SELECT * FROM t ORDER BY id").await;
    let b = Env::rows(&dst, "SELECT * FROM t ORDER BY id").await;
    assert_rows_equal(&a, &b);
}

/// A standby's read splits too: its helpers import the run's snapshot, exported on the standby.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_read_splits_under_one_snapshot() {
    let (primary, standby, (src, dst), replica) = with_standby(20_000).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.redb");
    let run = || {
        let out = sync_t_between(
            dir.path(),
            &standby.url("src"),
            &primary.url("dst"),
            &state,
            &["--delete", "--json", "--read-sessions", "3"],
        )
        .output()
        .unwrap();
        summary(out)
    };
    let s = run();
    assert_eq!(
        (s["read_sessions"].as_i64(), s["written"].as_i64()),
        (Some(3), Some(20_000)),
        "{s}"
    );
    src.batch_execute("UPDATE t SET v = 0 WHERE id % 100 = 0; DELETE FROM t WHERE id > 19990")
        .await
        .unwrap();
    replayed(&replica, "SELECT count(*) FROM t", 19_990).await;
    let s = run();
    assert_eq!(
        (
            s["read_sessions"].as_i64(),
            s["written"].as_i64(),
            s["deleted"].as_i64()
        ),
        (Some(3), Some(199), Some(10)),
        "{s}"
    );
    let a = Env::rows(&replica, "SELECT * FROM t ORDER BY id").await;
    let b = Env::rows(&dst, "SELECT * FROM t ORDER BY id").await;
    assert_rows_equal(&a, &b);
}

/// libpq's `target_session_attrs` picks the server among a connection string's hosts, a
/// primary and its standby here: `primary` writes to the primary listed after the standby
/// (`any` takes the standby and fails), `standby` and `prefer-standby` read the standby
/// listed after the primary (read in full, as a standby is), `prefer-standby` with no standby
/// listed takes the primary, and `standby` with none fails and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_session_attrs_picks_the_primary_or_the_standby_among_the_hosts() {
    let (primary, standby, (src, dst), replica) = with_standby(1000).await;
    let both = |first: &TempPostgres, second: &TempPostgres, db: &str, attrs: &str| {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs={attrs}",
            first.port(),
            second.port()
        )
    };
    let only = |db: &str, attrs: &str| format!("{}?target_session_attrs={attrs}", primary.url(db));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.redb");
    let run = |source: &str, dest: &str| {
        sync_t_between(dir.path(), source, dest, &state, &["--delete", "--json"])
            .output()
            .unwrap()
    };
    let same = || async {
        let a = Env::rows(&src, "SELECT * FROM t ORDER BY id").await;
        let b = Env::rows(&dst, "SELECT * FROM t ORDER BY id").await;
        assert_rows_equal(&a, &b);
    };

    // The standby first: `any` takes it, and the run stops before reading, saying why.
    let out = run(&primary.url("src"), &both(&standby, &primary, "dst", "any"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("sync 't': the destination session is read-only")
            && stderr.contains("target_session_attrs=primary"),
        "{stderr}"
    );
    assert_eq!(Env::count(&dst, "t").await, 0);
    // `check` says so too; a dry run, which writes nothing, may plan against the standby.
    let check = t_between(
        "check",
        dir.path(),
        &primary.url("src"),
        &standby.url("dst"),
        &state,
        &[],
    )
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_ne!(check.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("the destination session is read-only"),
        "{stderr}"
    );
    let dry = summary(
        sync_t_between(
            dir.path(),
            &primary.url("src"),
            &standby.url("dst"),
            &state,
            &["--dry-run", "--json"],
        )
        .output()
        .unwrap(),
    );
    assert_eq!(dry["added"], 1000, "{dry}");
    // `primary` passes over it.
    let s = summary(run(
        &primary.url("src"),
        &both(&standby, &primary, "dst", "primary"),
    ));
    assert_eq!(s["written"], 1000, "{s}");
    same().await;

    // The source's standby, listed second, is the one read.
    src.batch_execute("UPDATE t SET v = -v WHERE id <= 10")
        .await
        .unwrap();
    replayed(&replica, "SELECT count(*) FROM t WHERE v < 0", 10).await;
    let on_standby = |s: &serde_json::Value| {
        s["read_strategy_reason"]
            .as_str()
            .unwrap()
            .contains("hot standby")
    };
    for attrs in ["standby", "prefer-standby"] {
        let s = summary(run(
            &both(&primary, &standby, "src", attrs),
            &primary.url("dst"),
        ));
        assert!(on_standby(&s), "{attrs}: {s}");
        assert_eq!(s["read_strategy"], "full", "{attrs}: {s}");
        same().await;
    }
    // No standby listed: `prefer-standby` takes the primary, `standby` refuses it.
    let s = summary(run(&only("src", "prefer-standby"), &primary.url("dst")));
    assert!(!on_standby(&s), "{s}");
    let out = run(&only("src", "standby"), &primary.url("dst"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("the server is not a hot standby (target_session_attrs=standby)"),
        "{stderr}"
    );
    drop(standby);
    drop(primary);
}
