//! Metrics in Prometheus's text format (`--metrics-file`), for node_exporter's textfile
//! collector: written atomically after each run, from the state file's run log, so every sync
//! the state file knows is in the file (not only the ones this invocation ran), and the last
//! success survives between invocations.
//!
//! Per sync (label `sync`): when the last run ended and whether it succeeded, when the last
//! successful run ended, and that run's duration, read strategy and row counts.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use crate::error::Error;
use crate::snapshot::Snapshot;
use crate::sync::{RunRecord, Summary};

/// What the run log says about one sync.
#[derive(Default)]
struct SyncRuns {
    /// The last run: when it ended (unix seconds) and whether it succeeded.
    last: Option<(f64, bool)>,
    /// The last successful run: when it ended, and its summary.
    success: Option<(f64, Box<Summary>)>,
}

/// Renders the metrics of every sync in `snapshot`'s run log.
pub fn render(snapshot: &Snapshot) -> Result<String, Error> {
    let known: Vec<String> = snapshot.syncs()?.into_iter().map(|(n, _, _)| n).collect();
    let mut syncs: BTreeMap<String, SyncRuns> = BTreeMap::new();
    // Newest first, until every sync the file knows has its last success.
    snapshot.runs_back(|id, record: RunRecord| {
        let at = id as f64 / 1e6;
        let s = syncs.entry(record.sync().to_string()).or_default();
        let ok = matches!(record, RunRecord::Finished(_));
        s.last.get_or_insert((at, ok));
        if let (RunRecord::Finished(summary), None) = (record, &s.success) {
            s.success = Some((at, summary));
        }
        !known
            .iter()
            .all(|n| syncs.get(n).is_some_and(|s| s.success.is_some()))
    })?;
    Ok(format_metrics(&syncs))
}

fn format_metrics(syncs: &BTreeMap<String, SyncRuns>) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    let label = |sync: &str| format!("sync=\"{}\"", escape(sync));
    let per = |f: &dyn Fn(&SyncRuns) -> Option<f64>| -> Vec<(String, f64)> {
        syncs
            .iter()
            .filter_map(|(n, s)| Some((label(n), f(s)?)))
            .collect()
    };
    family(
        "pgdelta_last_run_timestamp_seconds",
        "When the sync's last run ended (unix time), whatever its outcome.",
        per(&|s| s.last.map(|l| l.0)),
    );
    family(
        "pgdelta_last_run_success",
        "1 if the sync's last run completed (rows the destination rejected included), 0 if it failed.",
        per(&|s| s.last.map(|l| f64::from(u8::from(l.1)))),
    );
    family(
        "pgdelta_last_success_timestamp_seconds",
        "When the sync's last completed run ended (unix time).",
        per(&|s| s.success.as_ref().map(|l| l.0)),
    );
    family(
        "pgdelta_last_success_duration_seconds",
        "How long the sync's last completed run took.",
        per(&|s| s.success.as_ref().map(|l| l.1.duration_s)),
    );
    let mut rows = Vec::new();
    let mut strategies = Vec::new();
    for (name, s) in syncs {
        let Some((_, sum)) = &s.success else { continue };
        for (kind, v) in [
            ("read", sum.rows_read),
            ("added", sum.added),
            ("changed", sum.changed),
            ("removed", sum.removed),
            ("written", sum.written),
            ("deleted", sum.deleted),
            ("rejected", sum.rejected),
        ] {
            rows.push((format!("{},kind=\"{kind}\"", label(name)), v as f64));
        }
        strategies.push((
            format!(
                "{},strategy=\"{}\"",
                label(name),
                escape(&sum.read_strategy)
            ),
            1.0,
        ));
    }
    family(
        "pgdelta_last_success_rows",
        "Rows of the sync's last completed run, by kind: read, added, changed, removed, written, deleted, rejected.",
        rows,
    );
    family(
        "pgdelta_last_success_read_strategy",
        "How the sync's last completed run read the source (full or delta): 1 for that strategy.",
        strategies,
    );
    out
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes the metrics of `snapshot` to `path` atomically (a temporary file in the same
/// directory, renamed over it), readable by others (node_exporter runs as its own user).
pub fn write_file(path: &Path, snapshot: &Snapshot) -> Result<(), Error> {
    let text = render(snapshot)?;
    let err = |what: &str, e: std::io::Error| {
        Error::Config(format!(
            "cannot {what} the metrics file {}: {e}; check --metrics-file",
            path.display()
        ))
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".pgdelta-metrics-")
        .tempfile_in(dir)
        .map_err(|e| err("create", e))?;
    tmp.write_all(text.as_bytes())
        .map_err(|e| err("write", e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
        .map_err(|e| err("write", e))?;
    tmp.persist(path).map_err(|e| err("replace", e.error))?;
    Ok(())
}

/// Serves `GET /metrics` on `listener` until the future is dropped (schedule mode's
/// `--metrics-addr`), rendering from the state file's run log at each scrape. One connection
/// at a time, each bounded by a 5 s timeout: a scraper needs no more.
pub async fn serve(listener: tokio::net::TcpListener, snapshot: &Snapshot) {
    use futures_util::StreamExt;
    // Connections are answered side by side, so a client that connects and sends nothing
    // holds up no one (each has 5 s to finish); past MAX_CONNECTIONS, new ones wait.
    const MAX_CONNECTIONS: usize = 16;
    let mut open = futures_util::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            accepted = listener.accept(), if open.len() < MAX_CONNECTIONS => {
                if let Ok((conn, _)) = accepted {
                    open.push(answer(conn, snapshot));
                }
            }
            Some(()) = open.next(), if !open.is_empty() => {}
        }
    }
}

/// Answers one HTTP request: `GET /metrics`, or an error status.
async fn answer(mut conn: tokio::net::TcpStream, snapshot: &Snapshot) {
    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            req.extend_from_slice(&buf[..n]);
        }
        let line = String::from_utf8_lossy(&req);
        let mut parts = line.split_whitespace();
        let (status, body) = match (parts.next(), parts.next()) {
            (Some("GET"), Some("/metrics")) => match render(snapshot) {
                Ok(text) => ("200 OK", text),
                Err(e) => ("500 Internal Server Error", format!("{e}\n")),
            },
            (Some("GET"), _) => ("404 Not Found", "try /metrics\n".to_string()),
            _ => ("405 Method Not Allowed", "GET /metrics\n".to_string()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await?;
        conn.write_all(body.as_bytes()).await?;
        conn.shutdown().await
    })
    .await;
    if let Ok(Err(e)) = answer {
        tracing::debug!("metrics connection: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_last_run_and_the_last_success() {
        let mut syncs = BTreeMap::new();
        let summary = Summary {
            sync: "orders#1/2".into(),
            rows_read: 10,
            written: 3,
            duration_s: 1.5,
            read_strategy: "delta".into(),
            ..Default::default()
        };
        syncs.insert(
            "orders#1/2".to_string(),
            SyncRuns {
                last: Some((200.0, false)),
                success: Some((100.0, Box::new(summary))),
            },
        );
        syncs.insert(
            "we\"ird".to_string(),
            SyncRuns {
                last: Some((50.0, false)),
                success: None,
            },
        );
        let text = format_metrics(&syncs);
        for line in [
            "# TYPE pgdelta_last_run_success gauge",
            "pgdelta_last_run_timestamp_seconds{sync=\"orders#1/2\"} 200",
            "pgdelta_last_run_success{sync=\"orders#1/2\"} 0",
            "pgdelta_last_success_timestamp_seconds{sync=\"orders#1/2\"} 100",
            "pgdelta_last_success_duration_seconds{sync=\"orders#1/2\"} 1.5",
            "pgdelta_last_success_rows{sync=\"orders#1/2\",kind=\"read\"} 10",
            "pgdelta_last_success_rows{sync=\"orders#1/2\",kind=\"written\"} 3",
            "pgdelta_last_success_read_strategy{sync=\"orders#1/2\",strategy=\"delta\"} 1",
            "pgdelta_last_run_success{sync=\"we\\\"ird\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        assert!(!text.contains("pgdelta_last_success_timestamp_seconds{sync=\"we"));
    }
}
