//! `pgdelta verify`: drift between the model and the target, the snapshot against the target,
//! and `--repair`, on a real server, drift made by hand.

use pgdelta::snapshot::Snapshot;
use pgdelta::sync::RunOptions;
use pgdelta::verify::{verify, VerifyReport};

use crate::support::{pgdelta_command, Env};

const ITEMS: &str = "CREATE TABLE items (id bigint PRIMARY KEY, name text, qty int, tags text[])";

async fn synced(rows: i64) -> (Env, pgdelta::spec::SyncSpec) {
    let env = Env::new().await;
    env.both(ITEMS).await;
    env.src
        .batch_execute(&format!(
            "INSERT INTO items SELECT i, 'item ' || i, i % 7, ARRAY['a' || i % 3] FROM generate_series(1, {rows}) i"
        ))
        .await
        .unwrap();
    let mut spec = env.spec("items", &["id"]);
    spec.delete = true;
    env.sync(&spec).await.unwrap();
    (env, spec)
}

async fn run_verify(env: &Env, spec: &pgdelta::spec::SyncSpec, repair: bool) -> VerifyReport {
    run_verify_at(env, spec, &env.state(), repair).await
}

async fn run_verify_at(
    env: &Env,
    spec: &pgdelta::spec::SyncSpec,
    state: &std::path::Path,
    repair: bool,
) -> VerifyReport {
    let snap = Snapshot::open(state, 8 << 20).unwrap();
    let src = pgdelta::conn::ConnInfo::parse(&env.src_url).unwrap();
    let dst = pgdelta::conn::ConnInfo::parse(&env.dst_url).unwrap();
    verify(&src, &dst, spec, &RunOptions::default(), &snap, repair)
        .await
        .unwrap()
}

/// The snapshot check's counts: (entries, matching, differing, gone from the target, unknown
/// to the snapshot).
fn snapshot_counts(s: &pgdelta::verify::SnapshotCheck) -> (u64, u64, u64, u64, u64) {
    (
        s.entries,
        s.matching,
        s.differing,
        s.gone_from_target,
        s.unknown_to_snapshot,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_made_by_hand_is_found_and_repaired() {
    let (env, spec) = synced(2000).await;
    let r = run_verify(&env, &spec, false).await;
    assert!(r.equal, "{r:?}");
    assert_eq!((r.source_rows, r.target_rows), (2000, 2000));
    assert_eq!((r.snapshot.entries, r.snapshot.matching), (2000, 2000));

    // Someone writes in the target.
    env.dst
        .batch_execute(
            "UPDATE items SET qty = -1 WHERE id IN (10, 20, 30);
             DELETE FROM items WHERE id IN (40, 50);
             INSERT INTO items VALUES (9999, 'extra', 0, NULL);",
        )
        .await
        .unwrap();
    let r = run_verify(&env, &spec, false).await;
    assert_eq!(r.compared_by, "snapshot", "{r:?}");
    assert!(!r.equal);
    assert_eq!((r.missing, r.different, r.extra), (2, 3, 1), "{r:?}");
    assert_eq!(r.sample_missing, ["id=40", "id=50"]);
    assert_eq!(r.sample_different, ["id=10", "id=20", "id=30"]);
    assert_eq!(r.sample_extra, ["id=9999"]);
    let s = &r.snapshot;
    assert_eq!(snapshot_counts(s), (2000, 1995, 3, 2, 1), "{s:?}");
    assert_eq!(s.sample_unknown, ["id=9999"]);
    assert_eq!(
        Env::count(&env.dst, "items").await,
        1999,
        "verify writes nothing"
    );
    // A normal sync cannot see what was written in the target.
    assert_eq!(env.sync(&spec).await.unwrap().written, 0);

    let r = run_verify(&env, &spec, true).await;
    let fix = r.repair.as_ref().expect("repaired");
    assert_eq!((fix.written, fix.deleted, fix.rejected), (5, 1, 0));
    env.assert_same(
        "SELECT * FROM items ORDER BY id",
        "SELECT * FROM items ORDER BY id",
    )
    .await;
    let r = run_verify(&env, &spec, false).await;
    assert!(r.equal, "after the repair: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsynced_source_changes_are_drift_but_the_snapshot_agrees() {
    let (env, spec) = synced(500).await;
    env.src
        .batch_execute(
            "UPDATE items SET name = 'renamed' WHERE id = 7; DELETE FROM items WHERE id = 8",
        )
        .await
        .unwrap();
    let r = run_verify(&env, &spec, false).await;
    assert_eq!((r.missing, r.different, r.extra), (0, 1, 1));
    assert!(r.snapshot.agrees(), "{:?}", r.snapshot);
    assert!(!r.equal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_cli_exit_codes_and_json() {
    let (env, _) = synced(300).await;
    let state = env.state();
    let run = |extra: &[&str]| {
        let mut args = vec![
            "verify",
            "--source",
            &env.src_url,
            "--destination",
            &env.dst_url,
            "--table",
            "public.items",
            "--target",
            "public.items",
            "--key",
            "id",
            "--state",
            state.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        pgdelta_command(env.dir.path(), &args).output().unwrap()
    };
    let last = |o: &std::process::Output| -> serde_json::Value {
        let out = String::from_utf8_lossy(&o.stdout);
        serde_json::from_str(out.lines().last().unwrap()).unwrap()
    };
    let o = run(&[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(last(&o)["type"], "verify");
    assert_eq!(last(&o)["data"]["equal"], true);

    env.dst
        .batch_execute("DELETE FROM items WHERE id = 5")
        .await
        .unwrap();
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(4), "drift exits 4");
    assert_eq!(last(&o)["data"]["missing"], 1);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("--repair"), "{err}");

    let o = run(&["--repair"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(last(&o)["data"]["repair"]["written"], 1);
    assert_eq!(run(&[]).status.code(), Some(0));
}

/// Drift on both sides at once (the source changed since the last sync, and someone wrote in the
/// target, sometimes the same change): the comparison by the snapshot finds exactly what the
/// comparison by a rebuild finds, and equal changes on both sides are not drift.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_the_snapshot_and_by_a_rebuild_verify_agree() {
    let (env, spec) = synced(3000).await;
    env.src
        .batch_execute(
            "UPDATE items SET name = 's' WHERE id IN (1, 2, 3, 4, 5);
             DELETE FROM items WHERE id IN (6, 7, 8);
             INSERT INTO items VALUES (5001, 'new', 1, '{x}'), (5002, 'new', 2, NULL), (5003, 'new', 3, NULL);",
        )
        .await
        .unwrap();
    env.dst
        .batch_execute(
            "UPDATE items SET name = 's' WHERE id IN (3, 4);
             UPDATE items SET qty = -1 WHERE id = 9;
             DELETE FROM items WHERE id IN (6, 10);
             INSERT INTO items VALUES (5001, 'new', 1, '{x}'), (5002, 'other', 2, NULL), (6000, 'extra', 0, NULL);",
        )
        .await
        .unwrap();
    let fast = run_verify(&env, &spec, false).await;
    assert_eq!(fast.compared_by, "snapshot", "{fast:?}");
    assert_eq!((fast.source_rows, fast.target_rows), (3000, 3001));
    assert_eq!(
        (fast.missing, fast.different, fast.extra),
        (2, 5, 3),
        "{fast:?}"
    );
    assert_eq!(fast.sample_missing, ["id=10", "id=5003"]);
    assert_eq!(
        fast.sample_different,
        ["id=1", "id=2", "id=5", "id=9", "id=5002"]
    );
    assert_eq!(fast.sample_extra, ["id=7", "id=8", "id=6000"]);
    let s = &fast.snapshot;
    assert_eq!(snapshot_counts(s), (3000, 2995, 3, 2, 3), "{s:?}");
    assert_eq!(s.sample_differing, ["id=3", "id=4", "id=9"]);
    assert_eq!(s.sample_gone, ["id=6", "id=10"]);

    // The same question with no snapshot to lean on: a rebuild from the target.
    let empty = env.dir.path().join("empty.redb");
    let slow = run_verify_at(&env, &spec, &empty, false).await;
    assert_eq!(slow.compared_by, "rebuild");
    // Its scratch state file was beside the state file, and is gone.
    assert_eq!(env.state_contents().1, ["empty.redb"]);
    assert_eq!(
        slow.note.as_deref(),
        Some("the state file has no snapshot of this sync")
    );
    assert_eq!(
        (
            slow.source_rows,
            slow.target_rows,
            slow.missing,
            slow.different,
            slow.extra
        ),
        (
            fast.source_rows,
            fast.target_rows,
            fast.missing,
            fast.different,
            fast.extra
        )
    );
    // The rebuild samples in the source's stream order, the snapshot in key order.
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    assert_eq!(sorted(&slow.sample_missing), sorted(&fast.sample_missing));
    assert_eq!(
        sorted(&slow.sample_different),
        sorted(&fast.sample_different)
    );
    assert_eq!(sorted(&slow.sample_extra), sorted(&fast.sample_extra));
    assert_eq!(
        Env::count(&env.dst, "items").await,
        3001,
        "verify writes nothing"
    );
}

/// A table keyed by random UUIDs: verify's lookups gather the scattered keys into the diff's
/// windows and still match every row to its own entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_in_a_uuid_table_is_found_and_repaired() {
    let env = Env::new().await;
    let spec = env.uuid_table(20_000).await;
    env.sync(&spec).await.unwrap();
    // 200 rows changed, 60 deleted (none of them among the changed), 7 added in the target.
    env.dst
        .batch_execute(
            "UPDATE u SET note = 'drift' WHERE n % 100 = 0;
             DELETE FROM u WHERE n % 333 = 0;
             INSERT INTO u SELECT gen_random_uuid(), -i, 'extra' FROM generate_series(1, 7) i;",
        )
        .await
        .unwrap();
    let r = run_verify(&env, &spec, false).await;
    assert_eq!(r.compared_by, "snapshot", "{r:?}");
    assert_eq!((r.source_rows, r.target_rows), (20_000, 19_947));
    assert_eq!((r.missing, r.different, r.extra), (60, 200, 7), "{r:?}");
    let s = &r.snapshot;
    assert_eq!(snapshot_counts(s), (20_000, 19_740, 200, 60, 7), "{s:?}");
    let r = run_verify(&env, &spec, true).await;
    let fix = r.repair.as_ref().expect("repaired");
    assert_eq!((fix.written, fix.deleted, fix.rejected), (260, 7, 0));
    env.assert_same("SELECT * FROM u ORDER BY id", "SELECT * FROM u ORDER BY id")
        .await;
    assert!(run_verify(&env, &spec, false).await.equal);
}
