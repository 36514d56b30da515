//! The TOML config file: one `[source]`, one `[destination]`, the state path and any number of
//! `[[sync]]` entries. Unknown keys are errors, reported with line and column. Flags and
//! environment variables override the file (see `main.rs`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::batch::BatchSettings;
use crate::error::Error;
use crate::model::{Mode, Model, SyncSpec};
use crate::retry::RetryPolicy;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The snapshot file; relative paths are relative to the config file.
    pub state: Option<PathBuf>,
    pub source: Option<Endpoint>,
    pub destination: Option<Endpoint>,
    #[serde(default, rename = "sync")]
    pub syncs: Vec<SyncEntry>,
}

/// A database: a connection string inline, or the name of an environment variable holding one
/// (keeps passwords out of the file).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub url: Option<String>,
    pub url_env: Option<String>,
}

impl Endpoint {
    pub fn resolve(&self, which: &str) -> Result<Option<String>, Error> {
        match (&self.url, &self.url_env) {
            (Some(_), Some(_)) => Err(Error::Config(format!(
                "[{which}] has both url and url_env; keep one"
            ))),
            (Some(u), None) => Ok(Some(u.clone())),
            (None, Some(var)) => std::env::var(var).map(Some).map_err(|_| {
                Error::Config(format!(
                    "[{which}] url_env names the environment variable {var}, which is not set"
                ))
            }),
            (None, None) => Ok(None),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => split_list(&s),
            OneOrMany::Many(v) => v,
        }
    }
}

/// Splits `a, b,c` into column names.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SyncEntry {
    /// Defaults to the target table name.
    pub name: Option<String>,
    pub table: Option<String>,
    pub query: Option<String>,
    pub target: String,
    pub key: OneOrMany,
    pub mode: Option<Mode>,
    /// Propagate removed rows as deletes (default false: keep them).
    pub delete: Option<bool>,
    /// Pin the batch size (rows); default adapts to latency.
    pub batch_size: Option<usize>,
    /// Pause between batches, in milliseconds.
    pub sleep_ms: Option<u64>,
    /// The commit latency the adaptive batch size aims under, in milliseconds.
    pub target_latency_ms: Option<u64>,
    pub max_delete_ratio: Option<f64>,
    /// Destination sessions writing concurrently (default 2).
    pub writers: Option<usize>,
    /// Fail the run once more rows than this were rejected (default 100).
    pub max_rejected: Option<u64>,
    /// Retries of a failed write on connection loss, deadlocks, lock timeouts (default 9).
    pub max_retries: Option<u32>,
    /// Stop retrying a write after this many seconds (default 300).
    pub retry_timeout_s: Option<u64>,
    /// statement_timeout of the source read in milliseconds (default: none).
    pub read_timeout_ms: Option<u64>,
    /// Field mapping: target column = "source column".
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Config(format!("cannot read config file {}: {e}", path.display()))
        })?;
        Self::parse(&text).map_err(|e| match e {
            Error::Config(m) => Error::Config(format!("config file {}: {m}", path.display())),
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<ConfigFile, Error> {
        toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!("line {line}, column {column}: ")
                })
                .unwrap_or_default();
            Error::Config(format!("{at}{}", e.message().trim_end()))
        })
    }
}

impl SyncEntry {
    pub fn to_spec(&self) -> Result<SyncSpec, Error> {
        let model = match (&self.table, &self.query) {
            (Some(t), None) => Model::Table(t.clone()),
            (None, Some(q)) => Model::Query(q.clone()),
            _ => {
                return Err(Error::Config(format!(
                    "sync for target {}: give exactly one of table or query",
                    self.target
                )))
            }
        };
        let name = self
            .name
            .clone()
            .unwrap_or_else(|| default_name(&self.target));
        let key = self.key.clone().into_vec();
        let mut batch = BatchSettings {
            fixed_rows: self.batch_size,
            sleep: Duration::from_millis(self.sleep_ms.unwrap_or(0)),
            ..Default::default()
        };
        if let Some(w) = self.writers {
            if w == 0 {
                return Err(Error::Config(format!(
                    "sync '{name}': writers must be at least 1"
                )));
            }
            batch.writers = w;
        }
        if let Some(ms) = self.target_latency_ms {
            batch.target_latency = Duration::from_millis(ms.max(1));
        }
        if self.batch_size == Some(0) {
            return Err(Error::Config(format!(
                "sync '{name}': batch_size must be at least 1"
            )));
        }
        let ratio = self.max_delete_ratio.unwrap_or(DEFAULT_MAX_DELETE_RATIO);
        if !(0.0..=1.0).contains(&ratio) {
            return Err(Error::Config(format!(
                "sync '{name}': max_delete_ratio must be between 0 and 1"
            )));
        }
        Ok(SyncSpec {
            name,
            model,
            target: self.target.clone(),
            key,
            columns: self.columns.clone(),
            mode: self.mode.unwrap_or(Mode::Upsert),
            delete: self.delete.unwrap_or(false),
            batch,
            max_delete_ratio: ratio,
            read_timeout: self.read_timeout_ms.map(Duration::from_millis),
            max_rejected: self.max_rejected.unwrap_or(DEFAULT_MAX_REJECTED),
            retry: RetryPolicy {
                max_attempts: self
                    .max_retries
                    .map(|r| r + 1)
                    .unwrap_or(RetryPolicy::default().max_attempts),
                max_elapsed: self
                    .retry_timeout_s
                    .map(Duration::from_secs)
                    .unwrap_or(RetryPolicy::default().max_elapsed),
                ..RetryPolicy::default()
            },
        })
    }
}

/// Rows the destination may reject before a run fails.
pub const DEFAULT_MAX_REJECTED: u64 = 100;

/// The delete guard's default: refuse to delete more than half of the synced rows.
pub const DEFAULT_MAX_DELETE_RATIO: f64 = 0.5;

/// A sync's default name: the target table without quotes or schema.
pub fn default_name(target: &str) -> String {
    target
        .rsplit('.')
        .next()
        .unwrap_or(target)
        .trim_matches('"')
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_config() {
        let c = ConfigFile::parse(
            r#"
state = "s.redb"
[source]
url = "postgres://a@h/db"
[destination]
url_env = "DEST"
[[sync]]
name = "orders"
query = "SELECT * FROM orders"
target = "public.orders_copy"
key = ["id", "region"]
mode = "insert"
delete = true
batch_size = 1000
sleep_ms = 100
[sync.columns]
id = "id"
region = "region_code"
"#,
        )
        .unwrap();
        let s = c.syncs[0].to_spec().unwrap();
        assert_eq!(s.key, vec!["id", "region"]);
        assert_eq!(s.mode, Mode::Insert);
        assert_eq!(s.batch.fixed_rows, Some(1000));
        assert_eq!(s.columns["region"], "region_code");
    }

    #[test]
    fn unknown_key_names_line_and_column() {
        let e = ConfigFile::parse("[[sync]]\ntarget = \"t\"\nkey = \"id\"\nbatchsize = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 4, column 1"), "{e}");
        assert!(e.contains("batchsize"), "{e}");
    }

    #[test]
    fn names_and_lists() {
        assert_eq!(default_name("public.\"Orders\""), "Orders");
        assert_eq!(split_list("a, b,,c"), vec!["a", "b", "c"]);
    }
}
