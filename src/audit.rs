//! Sync logs as tables in the destination (`--audit-schema NAME`, `[audit] schema`).
//!
//! Created on first use, in the named schema of the destination database:
//! - `sync_runs`: one row per run, written when the run starts (`status = 'running'`) and
//!   updated when it ends: `succeeded`, `partly_rejected` or `failed`, with the error's kind and
//!   message, the read strategy, and the counts of the run (planned, written, failed);
//! - `sync_rejections`: the rows currently rejected, per sync: key (JSON), SQLSTATE, message,
//!   first and last seen, attempts; a row leaves the table once a run writes it;
//! - `sync_changes` (with `changes = "all"`): one row per row written, deleted or rejected, per
//!   run: run id, key (JSON), operation, status.
//!
//! Writing the log never fails a sync: every audit error is a warning, and the state file keeps
//! the run (`pgdelta log`). The log has its own session, so it never shares a transaction with
//! the data. Dry runs write nothing, the log included.

use std::ops::Range;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::batch::{KeyBatch, WriteBatch};
use crate::conn::ConnInfo;
use crate::copy::encode;
use crate::error::{pg_message, Error};
use crate::plan::{quote_ident, Plan};
use crate::sink::RowClass;
use crate::spec::SyncSpec;
use crate::sync::{Progress, Summary};

/// Where the log goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// The destination schema holding the log tables; created if missing.
    pub schema: String,
    /// `all`: log every row written, deleted or rejected in `sync_changes`; `none` (default).
    #[serde(default)]
    pub changes: Changes,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Changes {
    #[default]
    None,
    All,
}

impl std::str::FromStr for Changes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Changes::None),
            "all" => Ok(Changes::All),
            _ => Err(format!("unknown audit changes '{s}': use none or all")),
        }
    }
}

/// The tables, created on first use under an advisory lock (two runs starting at once must not
/// race on `CREATE ... IF NOT EXISTS`).
fn ddl(schema: &str) -> String {
    let s = quote_ident(schema);
    format!(
        "SELECT pg_advisory_xact_lock(hashtext('pgdelta audit ' || {lit}));
         CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.sync_runs (
             run_id bigserial PRIMARY KEY,
             sync text NOT NULL,
             target text NOT NULL,
             started_at timestamptz NOT NULL DEFAULT now(),
             finished_at timestamptz,
             status text NOT NULL,
             error_kind text,
             error_message text,
             read_strategy text,
             rows_read bigint,
             bytes_read bigint,
             planned_added bigint,
             planned_changed bigint,
             planned_removed bigint,
             written bigint,
             deleted bigint,
             succeeded_added bigint,
             succeeded_changed bigint,
             succeeded_removed bigint,
             failed_added bigint,
             failed_changed bigint,
             failed_removed bigint,
             batches bigint,
             timeouts bigint,
             retries bigint,
             peak_rss_bytes bigint,
             duration_s double precision);
         CREATE INDEX IF NOT EXISTS sync_runs_by_sync ON {s}.sync_runs (sync, started_at);
         CREATE TABLE IF NOT EXISTS {s}.sync_rejections (
             sync text NOT NULL,
             key jsonb NOT NULL,
             operation text NOT NULL,
             sqlstate text,
             message text,
             first_seen timestamptz NOT NULL DEFAULT now(),
             last_seen timestamptz NOT NULL DEFAULT now(),
             attempts integer NOT NULL DEFAULT 1,
             PRIMARY KEY (sync, key));
         CREATE TABLE IF NOT EXISTS {s}.sync_changes (
             run_id bigint NOT NULL REFERENCES {s}.sync_runs ON DELETE CASCADE,
             key jsonb NOT NULL,
             operation text NOT NULL,
             status text NOT NULL);
         CREATE INDEX IF NOT EXISTS sync_changes_by_run ON {s}.sync_changes (run_id);",
        lit = literal(schema)
    )
}

fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// One run's log.
pub(crate) struct Audit {
    client: Client,
    schema: String,
    run_id: i64,
    sync: String,
    changes: Option<(ChangeLog, tokio::task::JoinHandle<()>)>,
}

fn audit_err(what: &str, e: &tokio_postgres::Error) -> Error {
    Error::Server(format!("audit log: {what}: {}", pg_message(e)))
}

impl Audit {
    /// Creates the tables if needed and the run's `sync_runs` row.
    pub(crate) async fn start(
        dest: &ConnInfo,
        settings: &AuditSettings,
        spec: &SyncSpec,
    ) -> Result<Audit, Error> {
        let mut client = dest.connect("destination", &[]).await?;
        let tx = client
            .transaction()
            .await
            .map_err(|e| audit_err("begin", &e))?;
        tx.batch_execute(&ddl(&settings.schema))
            .await
            .map_err(|e| audit_err("creating the tables", &e))?;
        crate::conn::commit(tx)
            .await
            .map_err(|e| audit_err("commit", &e))?;
        let schema = quote_ident(&settings.schema);
        let run_id: i64 = client
            .query_one(
                &format!(
                    "INSERT INTO {schema}.sync_runs (sync, target, status, read_strategy) \
                     VALUES ($1, $2, 'running', 'full') RETURNING run_id"
                ),
                &[&spec.name, &spec.target],
            )
            .await
            .map_err(|e| audit_err("recording the run", &e))?
            .get(0);
        let changes = match settings.changes {
            Changes::None => None,
            Changes::All => {
                let conn = dest.connect("destination", &[]).await?;
                Some(ChangeLog::start(conn, schema.clone(), run_id))
            }
        };
        Ok(Audit {
            client,
            schema,
            run_id,
            sync: spec.name.clone(),
            changes,
        })
    }

    /// The change log the writers feed, when `changes = "all"`.
    pub(crate) fn change_log(&self) -> Option<ChangeLog> {
        self.changes.as_ref().map(|(log, _)| log.clone())
    }

    /// Records how the run ended. Never fails: problems are warnings.
    pub(crate) async fn finish(self, result: &Result<Summary, Error>, progress: &Progress) {
        let sync = self.sync.clone();
        if let Err(e) = self.finish_inner(result, progress).await {
            tracing::warn!("sync '{sync}': the audit log was not fully written ({e}); the run itself is unaffected and is recorded in the state file");
        }
    }

    async fn finish_inner(
        mut self,
        result: &Result<Summary, Error>,
        progress: &Progress,
    ) -> Result<(), Error> {
        if let Some((log, task)) = self.changes.take() {
            drop(log);
            let _ = task.await;
        }
        let s = &self.schema;
        match result {
            Ok(sum) => {
                let status = if sum.rejected > 0 {
                    "partly_rejected"
                } else {
                    "succeeded"
                };
                // Insert mode never writes changed rows: none of them succeeded.
                let changed_ok = match sum.mode.as_str() {
                    "insert" => 0,
                    _ => sum.changed.saturating_sub(sum.rejected_changed),
                };
                let succeeded = [
                    sum.added.saturating_sub(sum.rejected_added) as i64,
                    changed_ok as i64,
                    sum.deleted as i64,
                ];
                let n = |v: u64| v as i64;
                self.client
                    .execute(
                        &format!(
                            "UPDATE {s}.sync_runs SET finished_at = now(), status = $2, rows_read = $3, bytes_read = $4, \
                             planned_added = $5, planned_changed = $6, planned_removed = $7, written = $8, deleted = $9, \
                             failed_added = $10, failed_changed = $11, failed_removed = $12, batches = $13, timeouts = $14, \
                             retries = $15, peak_rss_bytes = $16, duration_s = $17, succeeded_added = $18, \
                             succeeded_changed = $19, succeeded_removed = $20 WHERE run_id = $1"
                        ),
                        &[
                            &self.run_id, &status, &n(sum.rows_read), &n(sum.bytes_read),
                            &n(sum.added), &n(sum.changed), &n(sum.removed), &n(sum.written),
                            &n(sum.deleted), &n(sum.rejected_added), &n(sum.rejected_changed),
                            &n(sum.rejected_removed), &n(sum.batches), &n(sum.timeouts),
                            &n(sum.retries), &n(sum.peak_rss_bytes), &sum.duration_s,
                            &succeeded[0], &succeeded[1], &succeeded[2],
                        ],
                    )
                    .await
                    .map_err(|e| audit_err("recording the outcome", &e))?;
                self.rejections(sum).await?;
            }
            Err(e) => {
                // How far it got: the plan's counts are unknown, what was done is not.
                let g = |v: &std::sync::atomic::AtomicU64| Progress::get(v) as i64;
                self.client
                    .execute(
                        &format!(
                            "UPDATE {s}.sync_runs SET finished_at = now(), status = 'failed', error_kind = $2, \
                             error_message = $3, duration_s = extract(epoch FROM now() - started_at), \
                             rows_read = $4, written = $5, deleted = $6, failed_added = $7, failed_changed = $8, \
                             failed_removed = $9, peak_rss_bytes = $10 WHERE run_id = $1"
                        ),
                        &[
                            &self.run_id, &e.kind(), &e.to_string(), &g(&progress.rows_read),
                            &g(&progress.written), &g(&progress.deleted),
                            &g(&progress.rejected_added), &g(&progress.rejected_changed),
                            &g(&progress.rejected_removed), &(crate::sync::peak_rss_bytes() as i64),
                        ],
                    )
                    .await
                    .map_err(|e| audit_err("recording the failure", &e))?;
            }
        }
        Ok(())
    }

    /// Makes `sync_rejections` hold this run's rejected rows: new ones added, known ones seen
    /// again (attempts + 1), the rest of the sync's rows removed (they landed or left).
    async fn rejections(&mut self, sum: &Summary) -> Result<(), Error> {
        let s = self.schema.clone();
        let keys: Vec<String> = sum
            .rejected_rows
            .iter()
            .map(|r| r.key_json.to_string())
            .collect();
        let ops: Vec<String> = sum
            .rejected_rows
            .iter()
            .map(|r| r.operation.to_string())
            .collect();
        let states: Vec<&str> = sum
            .rejected_rows
            .iter()
            .map(|r| r.sqlstate.as_str())
            .collect();
        let messages: Vec<&str> = sum
            .rejected_rows
            .iter()
            .map(|r| r.message.as_str())
            .collect();
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| audit_err("begin", &e))?;
        tx.execute(
            &format!(
                "DELETE FROM {s}.sync_rejections WHERE sync = $1 \
                 AND key NOT IN (SELECT k::jsonb FROM unnest($2::text[]) AS k)"
            ),
            &[&self.sync, &keys],
        )
        .await
        .map_err(|e| audit_err("clearing rows that landed", &e))?;
        tx.execute(
            &format!(
                "INSERT INTO {s}.sync_rejections AS r (sync, key, operation, sqlstate, message) \
                 SELECT $1, k::jsonb, o, st, m FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS u(k, o, st, m) \
                 ON CONFLICT (sync, key) DO UPDATE SET operation = EXCLUDED.operation, sqlstate = EXCLUDED.sqlstate, \
                 message = EXCLUDED.message, last_seen = now(), attempts = r.attempts + 1"
            ),
            &[&self.sync, &keys, &ops, &states, &messages],
        )
        .await
        .map_err(|e| audit_err("recording rejected rows", &e))?;
        crate::conn::commit(tx)
            .await
            .map_err(|e| audit_err("commit", &e))
    }
}

/// What `pgdelta check` says about the audit schema: Ok with what was checked, or the fix.
pub async fn check_privileges(client: &Client, settings: &AuditSettings) -> Result<String, String> {
    let q = |e: tokio_postgres::Error| pg_message(&e);
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&settings.schema],
        )
        .await
        .map_err(q)?
        .get(0);
    let schema = quote_ident(&settings.schema);
    if !exists {
        let ok: bool = client
            .query_one(
                "SELECT has_database_privilege(current_database(), 'CREATE')",
                &[],
            )
            .await
            .map_err(q)?
            .get(0);
        return match ok {
            true => Ok(format!("audit schema {schema} will be created on first use")),
            false => Err(format!(
                "the audit schema {schema} does not exist and the destination user may not create it: CREATE SCHEMA {schema} AUTHORIZATION <user>, or GRANT CREATE ON DATABASE <db> TO <user>"
            )),
        };
    }
    let row = client
        .query_one(
            "SELECT has_schema_privilege($1, 'USAGE'), has_schema_privilege($1, 'CREATE'), \
                    coalesce(bool_and(has_table_privilege(c.oid, 'INSERT') AND has_table_privilege(c.oid, 'UPDATE') \
                                      AND has_table_privilege(c.oid, 'DELETE') AND has_table_privilege(c.oid, 'SELECT')), true), \
                    count(c.oid) \
             FROM pg_namespace n LEFT JOIN pg_class c ON c.relnamespace = n.oid AND c.relkind = 'r' \
                  AND c.relname IN ('sync_runs', 'sync_rejections', 'sync_changes') \
             WHERE n.nspname = $1",
            &[&settings.schema],
        )
        .await
        .map_err(q)?;
    let (usage, create, tables_ok, tables): (bool, bool, bool, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    if !usage || !tables_ok || (tables < 3 && !create) {
        return Err(format!(
            "the destination user needs USAGE and CREATE on schema {schema} and SELECT, INSERT, UPDATE, DELETE on its sync_* tables: GRANT USAGE, CREATE ON SCHEMA {schema} TO <user>; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO <user>"
        ));
    }
    Ok(format!("audit schema {schema} is writable"))
}

/// One logged row: key (JSON), operation, status.
type Change = (serde_json::Value, &'static str, &'static str);

/// The writers' handle on the change log. Sends wait while the log's session is behind.
#[derive(Clone)]
pub(crate) struct ChangeLog {
    tx: mpsc::Sender<Vec<Change>>,
}

impl ChangeLog {
    fn start(
        client: Client,
        schema: String,
        run_id: i64,
    ) -> (ChangeLog, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4);
        let task = tokio::spawn(write_changes(client, schema, run_id, rx));
        (ChangeLog { tx }, task)
    }

    async fn send(&self, rows: Vec<Change>) {
        // A log that stopped (its session failed) drops rows; the warning was given there.
        let _ = self.tx.send(rows).await;
    }

    /// Rows `range` of `batch` were committed.
    pub(crate) async fn written(&self, plan: &Plan, batch: &WriteBatch, range: Range<usize>) {
        let rows = batch.rows[range]
            .iter()
            .map(|r| {
                let op = if r.slot.is_some() { "update" } else { "insert" };
                (plan.key_json(r.key(&batch.data)), op, "ok")
            })
            .collect();
        self.send(rows).await;
    }

    /// Keys `range` of `keys` were deleted.
    pub(crate) async fn deleted(&self, plan: &Plan, keys: &KeyBatch, range: Range<usize>) {
        let rows = range
            .map(|i| (plan.key_json(keys.key(i)), "delete", "ok"))
            .collect();
        self.send(rows).await;
    }

    /// A row was rejected.
    pub(crate) async fn rejected(&self, key: serde_json::Value, class: RowClass) {
        let op = match class {
            RowClass::Added => "insert",
            RowClass::Changed => "update",
            RowClass::Removed => "delete",
        };
        self.send(vec![(key, op, "rejected")]).await;
    }
}

/// Copies logged rows into `sync_changes`, one binary COPY per message. On an error it warns
/// once and keeps draining, so the writers never wait on a dead log.
async fn write_changes(
    client: Client,
    schema: String,
    run_id: i64,
    mut rx: mpsc::Receiver<Vec<Change>>,
) {
    let sql = format!(
        "COPY {schema}.sync_changes (run_id, key, operation, status) FROM STDIN (FORMAT binary)"
    );
    let run = run_id.to_be_bytes();
    let mut broken = false;
    while let Some(rows) = rx.recv().await {
        if broken || rows.is_empty() {
            continue;
        }
        let encoded: Vec<(Vec<u8>, &str, &str)> = rows
            .iter()
            .map(|(k, op, st)| {
                let mut jsonb = vec![1u8];
                jsonb.extend_from_slice(k.to_string().as_bytes());
                (jsonb, *op, *st)
            })
            .collect();
        // A whole binary COPY stream: header, tuples, trailer.
        let stream = Bytes::from(encode(encoded.iter().map(|(k, op, st)| {
            vec![
                Some(&run[..]),
                Some(k.as_slice()),
                Some(op.as_bytes()),
                Some(st.as_bytes()),
            ]
        })));
        let result = async {
            let sink = client.copy_in::<_, Bytes>(&sql).await?;
            futures_util::pin_mut!(sink);
            crate::sink::feed_in_pieces(sink.as_mut(), stream).await?;
            sink.as_mut().finish().await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!("audit log: cannot write sync_changes ({}); the rest of this run's changes are not logged", pg_message(&e));
            broken = true;
        }
    }
}
