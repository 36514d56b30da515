use pgdelta::snapshot::{Snapshot, SnapshotError};
use pgdelta::spec::Model;
use pgdelta::Error;

use crate::support::Env;

async fn env_with(ddl_src: &str, ddl_dst: &str) -> Env {
    let env = Env::new().await;
    env.src.batch_execute(ddl_src).await.unwrap();
    env.dst.batch_execute(ddl_dst).await.unwrap();
    env
}

fn plan_message(r: Result<pgdelta::sync::Summary, Error>) -> String {
    match r {
        Err(e @ Error::Plan { .. }) => {
            assert_eq!(e.exit_code(), 2);
            e.to_string()
        }
        other => panic!("expected a plan error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_that_is_not_unique_on_the_target() {
    let env = env_with(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a')",
        "CREATE TABLE t (id int, v text)",
    )
    .await;
    let m = plan_message(env.sync(&env.spec("t", &["id"])).await);
    assert!(m.contains("sync 't'"), "{m}");
    assert!(m.contains("not a PRIMARY KEY or UNIQUE"), "{m}");
    assert!(
        m.contains("ALTER TABLE public.t ADD UNIQUE (\"id\")"),
        "{m}"
    );
    assert_eq!(Env::count(&env.dst, "t").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrowing_type_mismatch_names_column_and_cast() {
    let env = env_with(
        "CREATE TABLE t (id int PRIMARY KEY, v bigint)",
        "CREATE TABLE t (id int PRIMARY KEY, v int)",
    )
    .await;
    let m = plan_message(env.sync(&env.spec("t", &["id"])).await);
    assert!(
        m.contains("column \"v\" is int8 in the source but integer in the target"),
        "{m}"
    );
    assert!(m.contains("\"v\"::integer"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_target_and_missing_columns() {
    let env = env_with(
        "CREATE TABLE t (id int PRIMARY KEY, extra text)",
        "CREATE TABLE t (id int PRIMARY KEY)",
    )
    .await;
    let m = plan_message(env.sync(&env.spec("t", &["id"])).await);
    assert!(m.contains("source column(s) extra have no column"), "{m}");
    let mut spec = env.spec("t", &["id"]);
    spec.target = "nope".into();
    let m = plan_message(env.sync(&spec).await);
    assert!(m.contains("target table nope does not exist"), "{m}");
    let mut spec = env.spec("t", &["id"]);
    spec.model = Model::Query("SELEC oops".into());
    let m = plan_message(env.sync(&spec).await);
    assert!(m.contains("source model does not run"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_in_a_query_model_are_named() {
    let env = env_with(
        "CREATE TABLE a (id int, v text); INSERT INTO a SELECT i, 'v' || i FROM generate_series(1, 100) i; INSERT INTO a VALUES (7, 'again'), (42, 'again')",
        "CREATE TABLE a (id int PRIMARY KEY, v text)",
    )
    .await;
    let mut spec = env.spec("a", &["id"]);
    spec.model = Model::Query("SELECT * FROM a ORDER BY id, v".into());
    spec.batch.fixed_rows = Some(1000);
    let e = env.sync(&spec).await.unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, Error::Model { .. }), "{m}");
    assert_eq!(e.exit_code(), 1);
    assert!(m.contains("id=7") && m.contains("id=42"), "{m}");
    assert!(m.contains("appear more than once"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_keys_found_against_the_snapshot() {
    let env = env_with(
        "CREATE TABLE a (id int, v text); INSERT INTO a SELECT i, 'v' || i FROM generate_series(1, 100) i",
        "CREATE TABLE a (id int PRIMARY KEY, v text)",
    )
    .await;
    let mut spec = env.spec("a", &["id"]);
    spec.model = Model::Query("SELECT * FROM a".into());
    spec.delete = true;
    env.sync(&spec).await.unwrap();
    env.src
        .batch_execute("INSERT INTO a VALUES (9, 'twin'); DELETE FROM a WHERE id = 1")
        .await
        .unwrap();
    let m = env.sync(&spec).await.unwrap_err().to_string();
    assert!(m.contains("id=9"), "{m}");
    // No deletes in a run with model errors.
    assert_eq!(Env::count(&env.dst, "a WHERE id = 1").await, 1);
    // Once the model is fixed the run is clean and the key converges.
    env.src
        .batch_execute("DELETE FROM a WHERE v = 'twin'")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.deleted, 1);
    env.assert_same("SELECT * FROM a ORDER BY id", "SELECT * FROM a ORDER BY id")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_key_is_a_model_error() {
    let env = env_with(
        "CREATE TABLE a (id int, v text); INSERT INTO a VALUES (1, 'x'), (NULL, 'y')",
        "CREATE TABLE a (id int PRIMARY KEY, v text)",
    )
    .await;
    let mut spec = env.spec("a", &["id"]);
    spec.model = Model::Query("SELECT * FROM a".into());
    let m = env.sync(&spec).await.unwrap_err().to_string();
    assert!(m.contains("NULL key (id=NULL)"), "{m}");
    assert_eq!(Env::count(&env.dst, "a").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_guard_refuses_to_empty_the_destination() {
    let env = env_with(
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100)",
        "CREATE TABLE t (id int PRIMARY KEY)",
    )
    .await;
    let mut spec = env.spec("t", &["id"]);
    spec.delete = true;
    env.sync(&spec).await.unwrap();
    env.src
        .batch_execute("DELETE FROM t WHERE id > 40")
        .await
        .unwrap();
    let e = env.sync(&spec).await.unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, Error::DeleteGuard { .. }), "{m}");
    assert!(
        m.contains("would delete 60 of 100") && m.contains("--max-delete-ratio"),
        "{m}"
    );
    assert_eq!(Env::count(&env.dst, "t").await, 100);
    spec.max_delete_ratio = 0.7;
    assert_eq!(env.sync(&spec).await.unwrap().deleted, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_run_on_the_same_state_file_is_refused() {
    let env = env_with(
        "CREATE TABLE t (id int PRIMARY KEY)",
        "CREATE TABLE t (id int PRIMARY KEY)",
    )
    .await;
    let held = Snapshot::open(&env.state(), 1 << 20).unwrap();
    let e = env.sync(&env.spec("t", &["id"])).await.unwrap_err();
    assert!(
        matches!(e, Error::Snapshot(SnapshotError::Locked { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("in use by another pgdelta run"));
    drop(held);
    env.sync(&env.spec("t", &["id"])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enum_arrays_are_refused_with_a_way_out() {
    let env = Env::new().await;
    env.both("CREATE TYPE e AS ENUM ('a'); CREATE TABLE t (id int PRIMARY KEY, es e[])")
        .await;
    let m = plan_message(env.sync(&env.spec("t", &["id"])).await);
    assert!(m.contains("embeds type OIDs"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_new_keys_in_different_batches_are_found_by_the_recorder() {
    let env = env_with(
        "CREATE TABLE a (id int, v text); INSERT INTO a SELECT i, 'v' || i FROM generate_series(1, 30) i; INSERT INTO a VALUES (7, 'again')",
        "CREATE TABLE a (id int PRIMARY KEY, v text)",
    )
    .await;
    let mut spec = env.spec("a", &["id"]);
    spec.model = Model::Query("SELECT * FROM a ORDER BY id, v".into());
    spec.batch.fixed_rows = Some(1);
    spec.batch.writers = 2;
    let m = env.sync(&spec).await.unwrap_err().to_string();
    assert!(
        m.contains("1 key(s) appear more than once") && m.contains("id=7"),
        "{m}"
    );
    // The key was left out of the snapshot: once the model is fixed, it is written again.
    env.src
        .batch_execute("DELETE FROM a WHERE v = 'again'")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.added, s.unchanged), (1, 29));
    env.assert_same("SELECT * FROM a ORDER BY id", "SELECT * FROM a ORDER BY id")
        .await;
}

/// A source error after many rows (the read's rows come off the socket in chunks, past
/// tokio-postgres): the run fails with the server's message, deletes nothing, and a fixed
/// model then syncs every row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_error_in_the_middle_of_the_read_fails_the_run_and_deletes_nothing() {
    let env = env_with(
        "CREATE TABLE big (id int PRIMARY KEY, v text); INSERT INTO big SELECT i, md5(i::text) FROM generate_series(1, 200000) i",
        "CREATE TABLE big (id int PRIMARY KEY, v text); INSERT INTO big VALUES (-1, 'only here')",
    )
    .await;
    let mut spec = env.spec("big", &["id"]);
    spec.delete = true;
    spec.model = Model::Query(
        "SELECT id, CASE WHEN id = 150000 THEN (1 / (id - 150000))::text ELSE v END AS v FROM big ORDER BY id"
            .into(),
    );
    let e = env.sync(&spec).await.unwrap_err();
    let m = e.to_string();
    assert!(matches!(e, Error::SourceRead { .. }), "{e:?}");
    assert!(
        m.contains("sync 'big'") && m.contains("division by zero"),
        "{m}"
    );
    assert_eq!(
        Env::count(&env.dst, "big WHERE id = -1").await,
        1,
        "a failed read deletes nothing"
    );
    spec.model = Model::Query("SELECT id, v FROM big".into());
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.removed, 1);
    env.assert_same(
        "SELECT * FROM big ORDER BY id",
        "SELECT * FROM big ORDER BY id",
    )
    .await;
}

/// The permission check, before anything is read or written: a destination role that may not
/// UPDATE the target (upsert mode) or SELECT it (every run reads it) is refused with one GRANT
/// that fixes all it lacks, and the target is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_privileges_are_checked_before_anything_is_written() {
    let env = env_with(
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a'), (2, 'b')",
        "CREATE TABLE t (id int PRIMARY KEY, v text)",
    )
    .await;
    let role = format!("pgdelta_w{}", std::process::id());
    env.dst
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role}; GRANT INSERT ON t TO {role}"
        ))
        .await
        .unwrap();
    // The destination session runs as the role (startup options; the test user is a member).
    let sep = if env.dst_url.contains('?') { '&' } else { '?' };
    let dst = format!("{}{sep}options=-c%20role%3D{role}", env.dst_url);
    let opts = pgdelta::sync::RunOptions::default();
    let run = |spec| env.sync_between(&env.src_url, &dst, spec, &opts);
    let spec = env.spec("t", &["id"]);
    let msg = plan_message(run(&spec).await);
    assert!(
        msg.contains("may not SELECT or UPDATE") && msg.contains("GRANT SELECT, UPDATE ON"),
        "{msg}"
    );
    env.dst
        .batch_execute(&format!("GRANT UPDATE ON t TO {role}"))
        .await
        .unwrap();
    let msg = plan_message(run(&spec).await);
    assert!(
        msg.contains("may not SELECT") && msg.contains("GRANT SELECT ON"),
        "{msg}"
    );
    assert_eq!(Env::count(&env.dst, "t").await, 0);
    // Granted: the same run writes both rows.
    env.dst
        .batch_execute(&format!("GRANT SELECT ON t TO {role}"))
        .await
        .unwrap();
    let s = run(&spec).await.unwrap();
    assert_eq!((s.added, s.written), (2, 2));
    assert_eq!(Env::count(&env.dst, "t").await, 2);
    env.dst
        .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
        .await
        .unwrap();
}
