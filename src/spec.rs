//! What the user asked for: one sync, fully resolved from the config file, flags and
//! environment. [`SyncSpec::new`] gives every setting its default.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::retry::RetryPolicy;
use crate::sink::BatchSettings;

/// Rows the destination may reject before a run fails.
pub const DEFAULT_MAX_REJECTED: u64 = 100;

/// The delete guard's default: refuse to delete more than half of the synced rows.
pub const DEFAULT_MAX_DELETE_RATIO: f64 = 0.5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Insert new rows, update changed ones (`INSERT ... ON CONFLICT DO UPDATE` via staging).
    Upsert,
    /// Insert rows whose key was never synced before; never update.
    Insert,
}

impl Mode {
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Upsert => "upsert",
            Mode::Insert => "insert",
        }
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "upsert" => Ok(Mode::Upsert),
            "insert" => Ok(Mode::Insert),
            _ => Err(format!("unknown mode '{s}': use upsert or insert")),
        }
    }
}

/// What to read from the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Model {
    /// A table or view, as `schema.table` or `table`.
    Table(String),
    /// Any SELECT.
    Query(String),
}

/// One sync, fully resolved from flags and config.
#[derive(Debug, Clone)]
pub struct SyncSpec {
    pub name: String,
    pub model: Model,
    pub target: String,
    /// Key columns, named as in the target.
    pub key: Vec<String>,
    /// Field mapping: target column -> source column. Empty maps every source column to the
    /// target column of the same name.
    pub columns: BTreeMap<String, String>,
    pub mode: Mode,
    pub delete: bool,
    pub batch: BatchSettings,
    /// Refuse a run that would delete more than this share of the synced rows.
    pub max_delete_ratio: f64,
    /// `statement_timeout` for the long source read; `None` disables it for that session.
    pub read_timeout: Option<Duration>,
    /// Fail the run once more rows than this were rejected by the destination.
    pub max_rejected: u64,
    /// Retrying of transient failures.
    pub retry: RetryPolicy,
}

impl SyncSpec {
    /// A sync with every setting at its default: upsert, deletes off, adaptive batches, the
    /// default delete guard, rejection limit and retry policy, no source read timeout.
    pub fn new(name: &str, model: Model, target: &str, key: &[&str]) -> SyncSpec {
        SyncSpec {
            name: name.into(),
            model,
            target: target.into(),
            key: key.iter().map(|k| k.to_string()).collect(),
            columns: BTreeMap::new(),
            mode: Mode::Upsert,
            delete: false,
            batch: BatchSettings::default(),
            max_delete_ratio: DEFAULT_MAX_DELETE_RATIO,
            read_timeout: None,
            max_rejected: DEFAULT_MAX_REJECTED,
            retry: RetryPolicy::default(),
        }
    }
}
