//! Configuration, along one path: the TOML file's `[[sync]]` entries, or one entry built from
//! flags, take the flag overrides ([`Overrides`]), then go through the same validation and
//! defaults ([`SyncEntry::to_spec`]). The file holds one `[source]`, one `[destination]`, the
//! state path and any number of `[[sync]]` entries; unknown keys are errors, reported with line
//! and column.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::audit::{AuditSettings, Changes};
use crate::conn::ConnInfo;
use crate::error::Error;
use crate::spec::{
    Mode, Model, ReadSessions, Shard, SyncSpec, DEFAULT_MAX_DELETE_RATIO, DEFAULT_MAX_REJECTED,
};
use crate::ssh::SshSettings;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The snapshot file; relative paths are relative to the config file.
    pub state: Option<PathBuf>,
    pub source: Option<Endpoint>,
    pub destination: Option<Endpoint>,
    #[serde(default, rename = "sync")]
    pub syncs: Vec<SyncEntry>,
    /// Sync logs as tables in the destination.
    pub audit: Option<AuditSettings>,
    pub metrics: Option<MetricsSettings>,
    /// Syncs run at once (in dependency order), default 1.
    pub jobs: Option<usize>,
}

/// `[metrics]`: Prometheus metrics.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Written atomically after each run; relative paths are relative to the config file.
    pub file: Option<PathBuf>,
    /// Schedule mode: serve `/metrics` on this `HOST:PORT`.
    pub addr: Option<String>,
}

/// A database: a connection string inline, or the name of an environment variable holding one
/// (keeps passwords out of the file).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub url: Option<String>,
    pub url_env: Option<String>,
    /// Reach the database through this SSH bastion.
    pub ssh: Option<SshSettings>,
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

#[derive(Debug, Deserialize, Clone, Default)]
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
    /// Table models: only rows matching this SQL condition (`where = "tenant_id = 7"`).
    #[serde(rename = "where")]
    pub filter: Option<String>,
    /// Table models: how often to read in full rather than only the changed rows: a duration
    /// (`"7d"`), a run count (`"24 runs"`), `"always"` or `"never"`. Default `"7d"`.
    pub full_read_every: Option<String>,
    /// Table models: read in full when more than this share of the rows changed (default 0.5).
    pub delta_max_share: Option<f64>,
    /// Table models: source sessions reading the table at once: a number or `"auto"` (default).
    pub read_sessions: Option<ReadSessions>,
    /// Sync only shard I of N (`"0/4"`): the rows whose key hashes to I.
    pub shard: Option<String>,
    /// Query models: split the read by value ranges of this output column.
    pub split_by: Option<String>,
    /// Syncs of this config that must finish before this one starts.
    #[serde(default)]
    pub after: Vec<String>,
    /// Schedule mode: run every DURATION (`15m`), from the start.
    pub every: Option<String>,
    /// Schedule mode: run on a five-field cron schedule, in UTC.
    pub schedule: Option<String>,
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

impl Default for OneOrMany {
    fn default() -> Self {
        OneOrMany::Many(Vec::new())
    }
}

impl SyncEntry {
    /// Applies the flag overrides to this entry.
    pub fn apply(&mut self, o: &Overrides) {
        fn set<T: Clone>(field: &mut Option<T>, flag: &Option<T>) {
            if flag.is_some() {
                field.clone_from(flag);
            }
        }
        set(&mut self.mode, &o.mode);
        if o.delete {
            self.delete = Some(true);
        }
        set(&mut self.batch_size, &o.batch_size);
        set(&mut self.sleep_ms, &o.sleep_ms);
        set(&mut self.writers, &o.writers);
        set(&mut self.max_delete_ratio, &o.max_delete_ratio);
        set(&mut self.read_timeout_ms, &o.read_timeout_ms);
        set(&mut self.max_rejected, &o.max_rejected);
        set(&mut self.max_retries, &o.max_retries);
        set(&mut self.retry_timeout_s, &o.retry_timeout_s);
        set(&mut self.filter, &o.filter);
        set(&mut self.full_read_every, &o.full_read_every);
        set(&mut self.read_sessions, &o.read_sessions);
        set(&mut self.shard, &o.shard);
        set(&mut self.split_by, &o.split_by);
        if o.every.is_some() || o.schedule.is_some() {
            self.every.clone_from(&o.every);
            self.schedule.clone_from(&o.schedule);
        }
    }

    /// Validates the entry and fills in every default.
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
        let bad = |what: &str| Error::Config(format!("sync '{name}': {what}"));
        let key = self.key.clone().into_vec();
        if key.is_empty() {
            return Err(bad(
                "give the key: --key COL[,COL...] or key = [...], the target's PRIMARY KEY or UNIQUE columns",
            ));
        }
        let key: Vec<&str> = key.iter().map(String::as_str).collect();
        let mut spec = SyncSpec::new(&name, model, &self.target, &key);
        spec.columns = self.columns.clone();
        spec.mode = self.mode.unwrap_or(spec.mode);
        spec.delete = self.delete.unwrap_or(spec.delete);
        if self.batch_size == Some(0) {
            return Err(bad("batch_size (--batch-size) must be at least 1"));
        }
        spec.batch.fixed_rows = self.batch_size;
        spec.batch.sleep = Duration::from_millis(self.sleep_ms.unwrap_or(0));
        match self.writers {
            Some(0) => return Err(bad("writers (--writers) must be at least 1")),
            Some(w) => spec.batch.writers = w,
            None => {}
        }
        if let Some(ms) = self.target_latency_ms {
            spec.batch.target_latency = Duration::from_millis(ms.max(1));
        }
        spec.max_delete_ratio = self.max_delete_ratio.unwrap_or(DEFAULT_MAX_DELETE_RATIO);
        if !(0.0..=1.0).contains(&spec.max_delete_ratio) {
            return Err(bad(
                "max_delete_ratio (--max-delete-ratio) must be between 0 and 1",
            ));
        }
        spec.read_timeout = self.read_timeout_ms.map(Duration::from_millis);
        spec.max_rejected = self.max_rejected.unwrap_or(DEFAULT_MAX_REJECTED);
        if let Some(r) = self.max_retries {
            spec.retry.max_attempts = r + 1;
        }
        if let Some(s) = self.retry_timeout_s {
            spec.retry.max_elapsed = Duration::from_secs(s);
        }
        if let Some(f) = &self.filter {
            if self.query.is_some() {
                return Err(bad(
                    "where (--where) filters a table model; with a query, put the condition in the query",
                ));
            }
            if f.trim().is_empty() {
                return Err(bad("where (--where) is empty"));
            }
            spec.filter = Some(f.trim().to_string());
        }
        if let Some(e) = &self.full_read_every {
            spec.full_read_every = e
                .parse()
                .map_err(|m| bad(&format!("full_read_every (--full-read-every) {m}")))?;
        }
        if let Some(s) = self.delta_max_share {
            if !(0.0..=1.0).contains(&s) {
                return Err(bad("delta_max_share must be between 0 and 1"));
            }
            spec.delta_max_share = s;
        }
        spec.read_sessions = self.read_sessions.unwrap_or_default();
        if let Some(sh) = &self.shard {
            let shard: Shard = sh
                .parse()
                .map_err(|m| bad(&format!("shard (--shard) {m}")))?;
            if shard.count > 1 {
                spec.name = shard.name(&spec.name);
                spec.shard = Some(shard);
            }
        }
        if let Some(col) = &self.split_by {
            if self.query.is_none() {
                return Err(bad(
                    "split_by (--split-by) splits a query model's read; a table model's read splits by ctid ranges without it (read_sessions)",
                ));
            }
            if col.trim().is_empty() {
                return Err(bad("split_by (--split-by) is empty"));
            }
            spec.split_by = Some(col.trim().to_string());
        }
        spec.after.clone_from(&self.after);
        spec.schedule = crate::schedule::parse(self.every.as_deref(), self.schedule.as_deref())
            .map_err(|m| bad(&m))?;
        Ok(spec)
    }
}

/// A sync described on the command line, without a config file.
#[derive(Debug, Clone, Default)]
pub struct FlagModel {
    pub table: Option<String>,
    pub query: Option<String>,
    pub target: Option<String>,
    /// Comma-separated key columns.
    pub key: Option<String>,
    pub name: Option<String>,
    /// `TARGET=SOURCE` pairs.
    pub map: Vec<String>,
}

impl FlagModel {
    /// Whether any flag describes a model (then the flags define the one sync to run).
    pub fn given(&self) -> bool {
        self.table.is_some() || self.query.is_some() || self.target.is_some() || self.key.is_some()
    }

    /// The config entry these flags describe.
    fn to_entry(&self) -> Result<SyncEntry, Error> {
        if self.table.is_none() && self.query.is_none() {
            return Err(Error::Config(
                "give the model: --table SCHEMA.TABLE or --query SQL".into(),
            ));
        }
        let target = self
            .target
            .clone()
            .ok_or_else(|| Error::Config("give --target SCHEMA.TABLE".into()))?;
        let key = split_list(self.key.as_deref().unwrap_or(""));
        if key.is_empty() {
            return Err(Error::Config(
                "give --key COL[,COL...]: the target's PRIMARY KEY or UNIQUE columns".into(),
            ));
        }
        let mut columns = BTreeMap::new();
        for m in &self.map {
            let (d, s) = m
                .split_once('=')
                .ok_or_else(|| Error::Config(format!("--map takes TARGET=SOURCE, got '{m}'")))?;
            columns.insert(d.trim().to_string(), s.trim().to_string());
        }
        Ok(SyncEntry {
            name: self.name.clone(),
            table: self.table.clone(),
            query: self.query.clone(),
            target,
            key: OneOrMany::Many(key),
            columns,
            ..Default::default()
        })
    }
}

/// Settings given as flags (or their environment variables); they override the config file
/// in every selected sync.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub mode: Option<Mode>,
    /// `--delete` turns deletes on; there is no flag to turn them off.
    pub delete: bool,
    pub batch_size: Option<usize>,
    pub sleep_ms: Option<u64>,
    pub writers: Option<usize>,
    pub max_delete_ratio: Option<f64>,
    pub read_timeout_ms: Option<u64>,
    pub max_rejected: Option<u64>,
    pub max_retries: Option<u32>,
    pub retry_timeout_s: Option<u64>,
    /// `--where`: the table model's filter.
    pub filter: Option<String>,
    /// `--full-read-every`.
    pub full_read_every: Option<String>,
    /// `--read-sessions`.
    pub read_sessions: Option<ReadSessions>,
    /// `--shard I/N`.
    pub shard: Option<String>,
    pub split_by: Option<String>,
    /// `--every` / `--schedule`: one replaces the other given in the file.
    pub every: Option<String>,
    pub schedule: Option<String>,
}

/// What one invocation asks for, before resolution.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub config: Option<PathBuf>,
    /// Run only the named sync of the config file.
    pub only: Option<String>,
    pub source: Option<String>,
    pub destination: Option<String>,
    /// `--source-ssh` / `--destination-ssh`: `user@host[:port]`, over `[*.ssh]`'s bastion.
    pub source_ssh: Option<String>,
    pub destination_ssh: Option<String>,
    /// `--ssh-key` / `--ssh-known-hosts`: over both ssh tables' `key` / `known_hosts`.
    pub ssh_key: Option<PathBuf>,
    pub ssh_known_hosts: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub model: FlagModel,
    pub overrides: Overrides,
    /// `--audit-schema`: overrides `[audit] schema`.
    pub audit_schema: Option<String>,
    /// `--audit-changes`: overrides `[audit] changes`.
    pub audit_changes: Option<Changes>,
    /// `--metrics-file`: overrides `[metrics] file`.
    pub metrics_file: Option<PathBuf>,
    /// `--metrics-addr`: overrides `[metrics] addr`.
    pub metrics_addr: Option<String>,
    /// `--jobs`: overrides `jobs`.
    pub jobs: Option<usize>,
}

/// Everything a sync invocation needs, resolved from the config file, flags and environment.
#[derive(Debug)]
pub struct Invocation {
    pub source: ConnInfo,
    pub destination: ConnInfo,
    pub state: PathBuf,
    pub specs: Vec<SyncSpec>,
    /// Where sync logs go as tables, if anywhere.
    pub audit: Option<AuditSettings>,
    /// Where Prometheus metrics are written after each run, if anywhere.
    pub metrics_file: Option<PathBuf>,
    /// Where schedule mode serves `/metrics`, if anywhere.
    pub metrics_addr: Option<String>,
    /// Syncs run at once, in dependency order (at least 1).
    pub jobs: usize,
}

/// The state file when neither the flags nor the config name one.
pub const DEFAULT_STATE: &str = "pgdelta.redb";

impl Request {
    /// The source's and the destination's SSH bastions: the config file's tables, with the
    /// flags over them. Relative key and known_hosts paths in the file are relative to it.
    fn tunnels(
        &self,
        file: Option<&(ConfigFile, PathBuf)>,
    ) -> Result<(Option<SshSettings>, Option<SshSettings>), Error> {
        let one = |flag: &Option<String>, which: &str| -> Option<SshSettings> {
            let from_file = file.and_then(|(f, path)| {
                let e = match which {
                    "source" => f.source.as_ref(),
                    _ => f.destination.as_ref(),
                }?;
                let mut ssh = e.ssh.clone()?;
                let dir = path.parent().unwrap_or(Path::new("."));
                for p in [&mut ssh.key, &mut ssh.known_hosts].into_iter().flatten() {
                    if p.is_relative() && !p.starts_with("~") {
                        *p = dir.join(&*p);
                    }
                }
                Some(ssh)
            });
            let mut ssh = match (flag, from_file) {
                (Some(dest), file) => SshSettings {
                    host: dest.clone(),
                    port: None,
                    user: None,
                    ..file.unwrap_or_default()
                },
                (None, file) => file?,
            };
            if let Some(k) = &self.ssh_key {
                ssh.key = Some(k.clone());
            }
            if let Some(k) = &self.ssh_known_hosts {
                ssh.known_hosts = Some(k.clone());
            }
            Some(ssh)
        };
        let source = one(&self.source_ssh, "source");
        let destination = one(&self.destination_ssh, "destination");
        if source.is_none()
            && destination.is_none()
            && (self.ssh_key.is_some() || self.ssh_known_hosts.is_some())
        {
            return Err(Error::Config(
                "--ssh-key and --ssh-known-hosts need a tunnel: give --source-ssh or --destination-ssh USER@HOST[:PORT] (or [source.ssh] / [destination.ssh] in the config)".into(),
            ));
        }
        Ok((source, destination))
    }
}

impl Request {
    pub fn resolve(&self) -> Result<Invocation, Error> {
        let file = match &self.config {
            Some(p) => Some((ConfigFile::load(p)?, p.clone())),
            None => None,
        };
        let endpoint = |flag: &Option<String>, which: &str, env: &str| -> Result<String, Error> {
            if let Some(u) = flag {
                return Ok(u.clone());
            }
            let from_file = file.as_ref().and_then(|(f, _)| match which {
                "source" => f.source.as_ref(),
                _ => f.destination.as_ref(),
            });
            match from_file {
                Some(e) => e.resolve(which)?,
                None => None,
            }
            .ok_or_else(|| {
                Error::Config(format!(
                    "no {which}: give --{which} URL, {env}, or [{which}] in the config"
                ))
            })
        };
        let source = endpoint(&self.source, "source", "PGDELTA_SOURCE_URL")?;
        let destination = endpoint(&self.destination, "destination", "PGDELTA_DESTINATION_URL")?;
        // A path in the config file is relative to the file.
        let in_file = |get: &dyn Fn(&ConfigFile) -> Option<&PathBuf>| {
            let (f, p) = file.as_ref()?;
            let dir = p.parent().unwrap_or(Path::new("."));
            get(f).map(|s| dir.join(s))
        };
        let state = self
            .state
            .clone()
            .or_else(|| in_file(&|f| f.state.as_ref()))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE));
        let metrics_file = self
            .metrics_file
            .clone()
            .or_else(|| in_file(&|f| f.metrics.as_ref().and_then(|m| m.file.as_ref())));
        let entries = match &file {
            Some((f, path)) if !self.model.given() => self.file_entries(f, path)?,
            _ => vec![self.model.to_entry()?],
        };
        let specs = entries
            .into_iter()
            .map(|mut e| {
                e.apply(&self.overrides);
                e.to_spec()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut audit = file.as_ref().and_then(|(f, _)| f.audit.clone());
        if let Some(schema) = &self.audit_schema {
            let changes = audit.as_ref().map(|a| a.changes).unwrap_or_default();
            audit = Some(AuditSettings {
                schema: schema.clone(),
                changes,
            });
        }
        match (&mut audit, self.audit_changes) {
            (Some(a), Some(c)) => a.changes = c,
            (None, Some(_)) => {
                return Err(Error::Config(
                    "--audit-changes needs an audit schema: give --audit-schema NAME or [audit] schema in the config".into(),
                ))
            }
            _ => {}
        }
        if audit.as_ref().is_some_and(|a| a.schema.trim().is_empty()) {
            return Err(Error::Config("the audit schema name is empty".into()));
        }
        let (source_ssh, destination_ssh) = self.tunnels(file.as_ref())?;
        let reach = |url: &str, ssh: Option<SshSettings>| -> Result<ConnInfo, Error> {
            let conn = ConnInfo::parse(url)?;
            match ssh {
                Some(ssh) => conn.via_ssh(&ssh),
                None => Ok(conn),
            }
        };
        Ok(Invocation {
            source: reach(&source, source_ssh)?,
            destination: reach(&destination, destination_ssh)?,
            state,
            specs,
            audit,
            metrics_file,
            jobs: match self
                .jobs
                .or_else(|| file.as_ref().and_then(|(f, _)| f.jobs))
            {
                Some(0) => return Err(Error::Config("jobs must be at least 1".into())),
                Some(n) => n,
                None => 1,
            },
            metrics_addr: self.metrics_addr.clone().or_else(|| {
                let (f, _) = file.as_ref()?;
                f.metrics.as_ref()?.addr.clone()
            }),
        })
    }

    /// The file's entries, checked for unique names, narrowed to `--sync` when given.
    fn file_entries(&self, f: &ConfigFile, path: &Path) -> Result<Vec<SyncEntry>, Error> {
        if f.syncs.is_empty() {
            return Err(Error::Config(format!(
                "config file {} has no [[sync]] entries",
                path.display()
            )));
        }
        let name = |e: &SyncEntry| e.name.clone().unwrap_or_else(|| default_name(&e.target));
        let mut names = std::collections::HashSet::new();
        for e in &f.syncs {
            if !names.insert(name(e)) {
                return Err(Error::Config(format!(
                    "two syncs are named '{}'; give each a unique name",
                    name(e)
                )));
            }
        }
        let entries: Vec<SyncEntry> = f
            .syncs
            .iter()
            .filter(|e| self.only.as_ref().is_none_or(|o| *o == name(e)))
            .cloned()
            .collect();
        if let (Some(only), true) = (&self.only, entries.is_empty()) {
            return Err(Error::Config(format!(
                "no sync named '{only}' in {}",
                path.display()
            )));
        }
        Ok(entries)
    }
}

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

    /// Flags and the file go through one path: the same overrides, validation and defaults.
    #[test]
    fn flags_override_the_file_through_one_path() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("p.toml");
        std::fs::write(
            &cfg,
            "state = \"s.redb\"\n[source]\nurl = \"postgres://a@h/src\"\n[destination]\nurl = \"postgres://a@h/dst\"\n\
             [metrics]\nfile = \"m/pgdelta.prom\"\n\
             [[sync]]\nname = \"a\"\ntable = \"t\"\ntarget = \"t\"\nkey = \"id\"\nbatch_size = 10\n\
             [[sync]]\nname = \"b\"\ntable = \"u\"\ntarget = \"u\"\nkey = \"id\"\nmax_retries = 2\n",
        )
        .unwrap();
        let mut req = Request {
            config: Some(cfg.clone()),
            overrides: Overrides {
                batch_size: Some(99),
                delete: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let inv = req.resolve().unwrap();
        assert_eq!(inv.state, dir.path().join("s.redb"));
        assert_eq!(inv.metrics_file, Some(dir.path().join("m/pgdelta.prom")));
        assert_eq!(inv.specs.len(), 2);
        assert!(inv
            .specs
            .iter()
            .all(|s| s.batch.fixed_rows == Some(99) && s.delete));
        assert_eq!(inv.specs[1].retry.max_attempts, 3);
        req.only = Some("b".into());
        assert_eq!(req.resolve().unwrap().specs[0].name, "b");
        req.only = Some("c".into());
        assert!(req
            .resolve()
            .unwrap_err()
            .to_string()
            .contains("no sync named 'c'"));

        // Flags alone: the same validation and defaults as a file entry.
        let flags = Request {
            source: Some("postgres://a@h/src".into()),
            destination: Some("postgres://a@h/dst".into()),
            model: FlagModel {
                table: Some("public.orders".into()),
                target: Some("public.orders".into()),
                key: Some("id".into()),
                ..Default::default()
            },
            overrides: Overrides {
                max_delete_ratio: Some(1.5),
                ..Default::default()
            },
            ..Default::default()
        };
        let e = flags.resolve().unwrap_err().to_string();
        assert!(e.contains("sync 'orders': max_delete_ratio"), "{e}");
        let ok = Request {
            overrides: Overrides::default(),
            ..flags
        };
        let spec = &ok.resolve().unwrap().specs[0];
        let defaults = SyncSpec::new(
            "orders",
            Model::Table("public.orders".into()),
            "public.orders",
            &["id"],
        );
        assert_eq!(format!("{spec:?}"), format!("{defaults:?}"));
    }

    #[test]
    fn ssh_tables_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("p.toml");
        std::fs::write(
            &cfg,
            "[source]\nurl = \"postgres://a@db.internal/src\"\n[source.ssh]\nhost = \"bastion\"\nport = 2222\nuser = \"etl\"\nknown_hosts = \"kh\"\n\
             [destination]\nurl = \"postgres://a@h/dst\"\n\
             [[sync]]\nname = \"a\"\ntable = \"t\"\ntarget = \"t\"\nkey = \"id\"\n",
        )
        .unwrap();
        let mut req = Request {
            config: Some(cfg.clone()),
            ..Default::default()
        };
        let inv = req.resolve().unwrap();
        assert_eq!(
            inv.source.to_string(),
            "postgres://a@db.internal:5432/src via ssh etl@bastion:2222"
        );
        assert_eq!(inv.destination.to_string(), "postgres://a@h:5432/dst");
        let (source, _) = req
            .tunnels(Some(&(ConfigFile::load(&cfg).unwrap(), cfg.clone())))
            .unwrap();
        assert_eq!(source.unwrap().known_hosts, Some(dir.path().join("kh")));
        // A flag replaces the file's bastion, user and port; key flags apply to both.
        req.source_ssh = Some("ops@jump".into());
        req.destination_ssh = Some("jump:2200".into());
        req.ssh_known_hosts = Some("/k".into());
        let (source, destination) = req
            .tunnels(Some(&(ConfigFile::load(&cfg).unwrap(), cfg.clone())))
            .unwrap();
        let (source, destination) = (source.unwrap(), destination.unwrap());
        assert_eq!(
            (source.host.as_str(), source.port, source.user),
            ("ops@jump", None, None)
        );
        assert_eq!(source.known_hosts, Some("/k".into()));
        assert_eq!(destination.host, "jump:2200");
        // Key flags without a bastion are a mistake.
        let lone = Request {
            ssh_key: Some("/id".into()),
            ..Default::default()
        };
        let e = lone.tunnels(None).unwrap_err().to_string();
        assert!(e.contains("need a tunnel"), "{e}");
        std::fs::write(&cfg, "[source]\nurl = \"x\"\n[source.ssh]\nhots = \"b\"\n").unwrap();
        assert!(
            ConfigFile::load(&cfg).is_err(),
            "unknown keys in [source.ssh]"
        );
    }

    #[test]
    fn read_sessions_and_shards() {
        let spec = |extra: &str| {
            let text = format!(
                "[[sync]]\nname = \"o\"\ntable = \"t\"\ntarget = \"t\"\nkey = \"id\"\n{extra}"
            );
            ConfigFile::parse(&text).and_then(|c| c.syncs[0].to_spec())
        };
        assert_eq!(spec("").unwrap().read_sessions, ReadSessions::Auto);
        assert_eq!(
            spec("read_sessions = \"auto\"").unwrap().read_sessions,
            ReadSessions::Auto
        );
        assert_eq!(
            spec("read_sessions = 3").unwrap().read_sessions,
            ReadSessions::Fixed(3)
        );
        for bad in [
            "read_sessions = 0",
            "read_sessions = \"many\"",
            "read_sessions = 65",
        ] {
            let e = spec(bad).unwrap_err().to_string();
            assert!(
                e.contains("must be \"auto\" or a number from 1 to 64"),
                "{bad}: {e}"
            );
        }
        let s = spec("shard = \"1/4\"").unwrap();
        assert_eq!(
            (s.name.as_str(), s.shard),
            ("o#1/4", Some(Shard { index: 1, count: 4 }))
        );
        // One shard of one is the whole model, under its own name.
        let s = spec("shard = \"0/1\"").unwrap();
        assert_eq!((s.name.as_str(), s.shard), ("o", None));
        for bad in ["4/4", "1", "-1/2", "a/b"] {
            let e = spec(&format!("shard = \"{bad}\"")).unwrap_err().to_string();
            assert!(
                e.contains("sync 'o': shard (--shard) takes I/N"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn names_and_lists() {
        assert_eq!(default_name("public.\"Orders\""), "Orders");
        assert_eq!(split_list("a, b,,c"), vec!["a", "b", "c"]);
    }
}
