//! What the user asked for: one sync, fully resolved from the config file, flags and
//! environment. [`SyncSpec::new`] gives every setting its default.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::retry::RetryPolicy;
use crate::sink::BatchSettings;
pub use crate::split::ReadSessions;

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

/// How often a table model that could be read as a delta is read in full anyway: the full
/// read verifies what the delta reads inferred, and repairs what they could not see (rows
/// written to the target by hand, a `where` filter on something other than the row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FullReadEvery {
    /// Every run reads in full (delta reads off).
    Always,
    /// When this long has passed since the last full read.
    Elapsed(Duration),
    /// After this many delta runs in a row.
    Runs(u32),
    /// Only when a delta cannot be proven complete.
    Never,
}

/// The default period of full reads: a week.
pub const DEFAULT_FULL_READ_EVERY: FullReadEvery =
    FullReadEvery::Elapsed(Duration::from_secs(7 * 24 * 3600));

/// The delta read gives way to the full read when more than this share of the model's rows
/// changed since the last run (the full read is then as fast, and reads in one pass).
pub const DEFAULT_DELTA_MAX_SHARE: f64 = 0.5;

impl std::str::FromStr for FullReadEvery {
    type Err = String;
    /// `always`, `never`, a duration (`7d`, `12h`) or a run count (`24 runs`).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "always" => return Ok(FullReadEvery::Always),
            "never" => return Ok(FullReadEvery::Never),
            _ => {}
        }
        if let Some(n) = s.strip_suffix("runs").or_else(|| s.strip_suffix("run")) {
            return match n.trim().parse::<u32>() {
                Ok(n) if n > 0 => Ok(FullReadEvery::Runs(n)),
                _ => Err(format!(
                    "'{s}': a run count is a positive number, as in \"24 runs\""
                )),
            };
        }
        humantime::parse_duration(s)
            .map(FullReadEvery::Elapsed)
            .map_err(|e| format!("'{s}': {e}; use a duration (\"7d\", \"12h\"), a run count (\"24 runs\"), \"always\" or \"never\""))
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
    /// Table models: only rows matching this SQL condition on the table's columns.
    pub filter: Option<String>,
    /// Table models: how often the read is full rather than a delta.
    pub full_read_every: FullReadEvery,
    /// Table models: a delta of more than this share of the rows is read in full instead.
    pub delta_max_share: f64,
    /// Table models: how many source sessions read the table at once.
    pub read_sessions: ReadSessions,
    /// This run syncs one shard of the model: the rows whose key hashes to it.
    pub shard: Option<Shard>,
    /// Query models: the output column whose value ranges (from the table's statistics) split
    /// the read across sessions.
    pub split_by: Option<String>,
    /// Syncs of the same invocation this one starts after (`after = [...]`).
    pub after: Vec<String>,
    /// Schedule mode: when the sync runs (`every` / `schedule`); `None` runs it once.
    pub schedule: Option<crate::schedule::Schedule>,
}

/// One of `count` processes that sync a model together (`--shard I/N`): this one handles the
/// rows whose key hashes (`hash_record_extended` of the key columns, the same on source and
/// target) to `index`, with its own snapshot and its own deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl std::str::FromStr for Shard {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("takes I/N with 0 <= I < N (e.g. 0/4, the first of four), got '{s}'");
        let (i, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse::<u32>().map_err(|_| bad())?,
            n.trim().parse::<u32>().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The sync's name in the state file and in messages: `name#I/N`, so a snapshot belongs to
    /// one shard of one shard count.
    pub fn name(&self, sync: &str) -> String {
        format!("{sync}#{self}")
    }

    /// The SQL condition that keeps this shard's rows, over the key expressions.
    pub(crate) fn condition(&self, keys: &[String]) -> String {
        format!(
            "(hash_record_extended(ROW({}), 0) % {n} + {n}) % {n} = {}",
            keys.join(", "),
            self.index,
            n = self.count
        )
    }
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
            filter: None,
            full_read_every: DEFAULT_FULL_READ_EVERY,
            delta_max_share: DEFAULT_DELTA_MAX_SHARE,
            read_sessions: ReadSessions::Auto,
            shard: None,
            split_by: None,
            after: Vec::new(),
            schedule: None,
        }
    }
}
