//! Sync logs as tables in the destination: a successful, a failed and a partly rejected run,
//! the rejections table over time, the change log, and a log that cannot be written.

use pgdelta::audit::{AuditSettings, Changes};
use pgdelta::sync::RunOptions;

use crate::support::Env;

fn opts(changes: Changes) -> RunOptions {
    RunOptions {
        audit: Some(AuditSettings {
            schema: "pgdelta_audit".into(),
            changes,
        }),
        ..Default::default()
    }
}

async fn runs(
    env: &Env,
) -> Vec<(
    String,
    Option<String>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
)> {
    env.dst
        .query(
            "SELECT status, error_kind, written, planned_changed, failed_changed \
             FROM pgdelta_audit.sync_runs ORDER BY run_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect()
}

async fn rejected(env: &Env) -> Vec<(String, Option<String>, i32)> {
    env.dst
        .query(
            "SELECT key::text, sqlstate, attempts FROM pgdelta_audit.sync_rejections ORDER BY key->>'id'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_rejections_and_changes_are_logged_in_the_destination() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, qty int);
             INSERT INTO t SELECT i, i FROM generate_series(1, 100) i;",
        )
        .await
        .unwrap();
    env.dst
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY, qty int CHECK (qty >= 0))")
        .await
        .unwrap();
    let mut spec = env.spec("t", &["id"]);
    spec.delete = true;

    // 1. Succeeded, every row logged as an insert.
    let s = env.sync_opts(&spec, &opts(Changes::All)).await.unwrap();
    assert_eq!(s.written, 100);
    assert_eq!(
        runs(&env).await,
        vec![("succeeded".into(), None, Some(100), Some(0), Some(0))]
    );
    let logged: i64 = env
        .dst
        .query_one("SELECT count(*) FROM pgdelta_audit.sync_changes WHERE operation = 'insert' AND status = 'ok'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 100);

    // 2. Partly rejected: two changed rows break the target's CHECK; one row is deleted.
    env.src
        .batch_execute("UPDATE t SET qty = -1 WHERE id IN (3, 4); UPDATE t SET qty = 0 WHERE id = 5; DELETE FROM t WHERE id = 6")
        .await
        .unwrap();
    let s = env.sync_opts(&spec, &opts(Changes::All)).await.unwrap();
    assert_eq!(
        (s.rejected, s.rejected_changed, s.written, s.deleted),
        (2, 2, 1, 1)
    );
    assert_eq!(
        runs(&env).await[1],
        ("partly_rejected".into(), None, Some(1), Some(3), Some(2))
    );
    let changes: Vec<(String, String, String)> = env
        .dst
        .query(
            "SELECT key::text, operation, status FROM pgdelta_audit.sync_changes \
             WHERE run_id = (SELECT max(run_id) FROM pgdelta_audit.sync_runs) ORDER BY key->>'id', operation",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let want =
        |k: i32, op: &str, st: &str| (format!("{{\"id\": {k}}}"), op.to_string(), st.to_string());
    assert_eq!(
        changes,
        vec![
            want(3, "update", "rejected"),
            want(4, "update", "rejected"),
            want(5, "update", "ok"),
            want(6, "delete", "ok"),
        ]
    );
    assert_eq!(
        rejected(&env).await,
        vec![
            ("{\"id\": 3}".into(), Some("23514".into()), 1),
            ("{\"id\": 4}".into(), Some("23514".into()), 1)
        ]
    );

    // 3. Retried next run: one still fails (attempts 2), the other was fixed at the source.
    env.src
        .batch_execute("UPDATE t SET qty = 4 WHERE id = 4")
        .await
        .unwrap();
    env.sync_opts(&spec, &opts(Changes::None)).await.unwrap();
    assert_eq!(
        rejected(&env).await,
        vec![("{\"id\": 3}".into(), Some("23514".into()), 2)]
    );

    // 4. Failed: the model stops planning; the failure is logged with its kind.
    env.src
        .batch_execute("ALTER TABLE t ADD COLUMN extra int")
        .await
        .unwrap();
    let e = env
        .sync_opts(&spec, &opts(Changes::None))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("extra"), "{e}");
    let last = runs(&env).await.pop().unwrap();
    assert_eq!(
        (last.0.as_str(), last.1.as_deref()),
        ("failed", Some("plan"))
    );
    let message: String = env
        .dst
        .query_one(
            "SELECT error_message FROM pgdelta_audit.sync_runs ORDER BY run_id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(message.contains("extra"), "{message}");

    // 5. Failed part way: the first rejection is one too many. The counts say how far it got.
    env.src
        .batch_execute("ALTER TABLE t DROP COLUMN extra")
        .await
        .unwrap();
    let mut strict = spec.clone();
    strict.max_rejected = 0;
    // A full read, so the counts of a run that failed part way are those of the whole model.
    strict.full_read_every = pgdelta::spec::FullReadEvery::Always;
    let e = env
        .sync_opts(&strict, &opts(Changes::None))
        .await
        .unwrap_err();
    assert!(matches!(e, pgdelta::Error::TooManyRejected { .. }), "{e}");
    let row = env
        .dst
        .query_one(
            "SELECT status, error_kind, rows_read, failed_changed, planned_changed \
             FROM pgdelta_audit.sync_runs ORDER BY run_id DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (status, kind, read, failed, planned): (String, String, i64, i64, Option<i64>) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        (status.as_str(), kind.as_str()),
        ("failed", "too_many_rejected")
    );
    assert_eq!((read, failed, planned), (99, 1, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_written_never_fails_the_sync() {
    let env = Env::new().await;
    env.both("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await;
    env.src
        .batch_execute("INSERT INTO t SELECT i, 'v' FROM generate_series(1, 10) i")
        .await
        .unwrap();
    // pg_catalog refuses new tables, superusers included: the log cannot be created there.
    let mut o = opts(Changes::All);
    o.audit.as_mut().unwrap().schema = "pg_catalog".into();
    let s = env.sync_opts(&env.spec("t", &["id"]), &o).await.unwrap();
    assert_eq!(s.written, 10, "the sync went on without its audit log");
    let snap = pgdelta::snapshot::Snapshot::open(&env.state(), 1 << 20).unwrap();
    let logged: Vec<(u64, pgdelta::sync::RunRecord)> = snap.runs(10).unwrap();
    assert_eq!(logged.len(), 1, "the state file keeps the run");
}
