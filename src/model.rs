//! The sync definition and the plan derived from both databases before any row moves.
//!
//! [`plan`] describes the source model (prepare, no rows read), reads the target's catalog,
//! maps columns, checks that every column's type matches (adding a lossless cast such as
//! `int4 -> int8` to the generated query where it can, and stopping with the cast to write where
//! it cannot), checks that the key is a PRIMARY KEY or UNIQUE constraint of the target (record
//! matching), checks write privileges, and generates the source query: key columns first, then
//! the other mapped columns, so that a tuple's key and hashed part are contiguous byte ranges and
//! the tuple can be sent to the destination's binary COPY unchanged.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio_postgres::types::{Kind, Type};
use tokio_postgres::Client;

use crate::batch::BatchSettings;
use crate::copy::fields;
use crate::error::{pg_message, Error};
use crate::hash::fingerprint;

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
    pub retry: crate::retry::RetryPolicy,
}

/// A synced column, in stream order.
#[derive(Debug, Clone)]
pub struct Column {
    pub dest: String,
    pub source: String,
    /// The target column's type as `format_type` renders it (e.g. `character varying(20)`).
    pub dest_type: String,
    pub dest_oid: u32,
    /// A cast to the target type was added to the generated query.
    pub cast: bool,
}

#[derive(Debug, Clone)]
pub struct Plan {
    /// The generated SELECT (key columns first).
    pub select: String,
    pub columns: Vec<Column>,
    pub nkey: usize,
    /// The target as a quoted, schema-qualified name.
    pub target: String,
    /// The target is empty right now (first-load fast path).
    pub target_empty: bool,
    pub key_fp: String,
    pub row_fp: String,
    /// What the planner did that the user should know (casts added).
    pub notes: Vec<String>,
}

impl Plan {
    pub fn copy_out_sql(&self) -> String {
        format!("COPY ({}) TO STDOUT (FORMAT binary)", self.select)
    }

    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(&c.dest))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn key_columns(&self) -> &[Column] {
        &self.columns[..self.nkey]
    }

    /// Renders raw key bytes for messages: `id=42`, `code='ab', day=\x0000...`.
    pub fn describe_key(&self, key: &[u8]) -> String {
        self.key_columns()
            .iter()
            .zip(fields(key))
            .map(|(c, f)| format!("{}={}", c.dest, render_value(c.dest_oid, f)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Renders a raw binary value of a common type for humans; hex for the rest.
pub fn render_value(oid: u32, v: Option<&[u8]>) -> String {
    let Some(b) = v else {
        return "NULL".into();
    };
    let int = |b: &[u8]| -> Option<i64> {
        Some(match b.len() {
            2 => i16::from_be_bytes(b.try_into().ok()?) as i64,
            4 => i32::from_be_bytes(b.try_into().ok()?) as i64,
            8 => i64::from_be_bytes(b.try_into().ok()?),
            _ => return None,
        })
    };
    match oid {
        20 | 21 | 23 => int(b).map(|i| i.to_string()),
        25 | 1043 | 1042 | 19 => std::str::from_utf8(b)
            .ok()
            .map(|s| format!("'{}'", s.replace('\'', "''"))),
        16 => b.first().map(|x| (*x != 0).to_string()),
        2950 if b.len() == 16 => Some(format!(
            "{}-{}-{}-{}-{}",
            hex(&b[0..4]),
            hex(&b[4..6]),
            hex(&b[6..8]),
            hex(&b[8..10]),
            hex(&b[10..16])
        )),
        _ => None,
    }
    .unwrap_or_else(|| format!("\\x{}", hex(b)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

const FIRST_USER_OID: u32 = 16384;

/// Types whose binary form is the same bytes (text, varchar, bpchar): no cast needed.
fn binary_compatible(a: u32, b: u32) -> bool {
    const TEXTS: [u32; 3] = [25, 1043, 1042];
    TEXTS.contains(&a) && TEXTS.contains(&b)
}

/// Casts that never lose information, which pgdelta adds to the generated query by itself.
fn lossless_cast(from: u32, to: u32) -> bool {
    matches!(
        (from, to),
        (21, 23)
            | (21, 20)
            | (23, 20)
            | (21 | 23 | 20, 1700)
            | (700, 701)
            | (21 | 23, 701)
            | (114, 3802)
    )
}

/// Binary COPY of arrays and composites embeds element/field type OIDs, which differ between
/// databases for user-defined types.
fn embeds_oids(ty: &Type) -> bool {
    match ty.kind() {
        Kind::Array(elem) => elem.oid() >= FIRST_USER_OID || embeds_oids(elem),
        Kind::Composite(_) => true,
        Kind::Domain(base) => embeds_oids(base),
        _ => false,
    }
}

struct DestColumn {
    attnum: i16,
    name: String,
    oid: u32,
    format: String,
    typname: String,
    typschema: String,
    generated: bool,
}

struct Relation {
    oid: u32,
    quoted: String,
    kind: String,
}

async fn resolve_relation(
    client: &Client,
    name: &str,
) -> Result<Option<Relation>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT c.oid::int8, quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relkind::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.oid = to_regclass($1::text)",
            &[&name],
        )
        .await?;
    Ok(row.map(|r| Relation {
        oid: r.get::<_, i64>(0) as u32,
        quoted: r.get(1),
        kind: r.get(2),
    }))
}

/// Builds the plan, checking everything that can be checked before reading a row.
pub async fn plan(src: &Client, dst: &Client, spec: &SyncSpec) -> Result<Plan, Error> {
    let fail = |message: String| Error::Plan {
        sync: spec.name.clone(),
        message,
    };
    let pg = |what: &str, e: tokio_postgres::Error| fail(format!("{what}: {}", pg_message(&e)));

    if spec.key.is_empty() {
        return Err(fail(
            "no key columns: give --key (the target's PRIMARY KEY or UNIQUE columns)".into(),
        ));
    }

    // --- the target ---
    let target = resolve_relation(dst, &spec.target)
        .await
        .map_err(|e| pg("cannot look up the target", e))?
        .ok_or_else(|| {
            fail(format!(
                "the target table {} does not exist in the destination database; create it first (pgdelta does not create tables)",
                spec.target
            ))
        })?;
    if target.kind != "r" && target.kind != "p" {
        return Err(fail(format!("the target {} is not a table", target.quoted)));
    }
    let dest_cols: Vec<DestColumn> = dst
        .query(
            "SELECT a.attnum, a.attname::text, a.atttypid::int8, format_type(a.atttypid, a.atttypmod), \
                    t.typname::text, tn.nspname::text, a.attgenerated <> '' \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_namespace tn ON tn.oid = t.typnamespace \
             WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&(target.oid as i64)],
        )
        .await
        .map_err(|e| pg("cannot read the target's columns", e))?
        .into_iter()
        .map(|r| DestColumn {
            attnum: r.get(0),
            name: r.get(1),
            oid: r.get::<_, i64>(2) as u32,
            format: r.get(3),
            typname: r.get(4),
            typschema: r.get(5),
            generated: r.get(6),
        })
        .collect();

    // --- the source model ---
    let model_sql = match &spec.model {
        Model::Table(t) => {
            let rel = resolve_relation(src, t)
                .await
                .map_err(|e| pg("cannot look up the source table", e))?
                .ok_or_else(|| {
                    fail(format!(
                        "the source table {t} does not exist in the source database"
                    ))
                })?;
            rel.quoted
        }
        Model::Query(q) => {
            let q = q.trim().trim_end_matches(';').trim();
            if q.is_empty() {
                return Err(fail("the source query is empty".into()));
            }
            format!("({q})")
        }
    };
    let described = src
        .prepare(&format!("SELECT * FROM {model_sql} AS src"))
        .await
        .map_err(|e| pg("the source model does not run", e))?;
    let source_cols: Vec<(String, Type)> = described
        .columns()
        .iter()
        .map(|c| (c.name().to_string(), c.type_().clone()))
        .collect();

    // --- mapping: target column -> source column ---
    let mapping: Vec<(String, String)> = if spec.columns.is_empty() {
        let mut seen = std::collections::HashSet::new();
        for (n, _) in &source_cols {
            if !seen.insert(n) {
                return Err(fail(format!(
                    "the source model has two columns named \"{n}\"; alias one of them in the query"
                )));
            }
        }
        let missing: Vec<&str> = source_cols
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !dest_cols.iter().any(|d| d.name == *n))
            .collect();
        if !missing.is_empty() {
            return Err(fail(format!(
                "source column(s) {} have no column of the same name in {}; add them to the target, leave them out of the query, or map columns explicitly ([sync.columns] target = \"source\")",
                missing.join(", "),
                target.quoted
            )));
        }
        source_cols
            .iter()
            .map(|(n, _)| (n.clone(), n.clone()))
            .collect()
    } else {
        spec.columns
            .iter()
            .map(|(d, s)| (d.clone(), s.clone()))
            .collect()
    };
    for k in &spec.key {
        if !mapping.iter().any(|(d, _)| d == k) {
            return Err(fail(format!(
                "key column \"{k}\" is not among the synced columns; map it or fix --key"
            )));
        }
    }
    // Key columns first, in key order, then the rest in mapping order.
    let mut ordered: Vec<&(String, String)> = spec
        .key
        .iter()
        .map(|k| mapping.iter().find(|(d, _)| d == k).expect("checked above"))
        .collect();
    ordered.extend(mapping.iter().filter(|(d, _)| !spec.key.contains(d)));

    let mut columns = Vec::new();
    let mut exprs = Vec::new();
    let mut notes = Vec::new();
    for (dest, source) in ordered {
        let d = dest_cols.iter().find(|c| &c.name == dest).ok_or_else(|| {
            fail(format!(
                "the target {} has no column \"{dest}\"",
                target.quoted
            ))
        })?;
        if d.generated {
            return Err(fail(format!(
                "target column \"{dest}\" is a generated column and cannot be written; leave it out of the mapping"
            )));
        }
        let matches: Vec<&(String, Type)> =
            source_cols.iter().filter(|(n, _)| n == source).collect();
        let (_, sty) = match matches.as_slice() {
            [one] => *one,
            [] => {
                return Err(fail(format!(
                "the source model has no column \"{source}\" (mapped to target column \"{dest}\")"
            )))
            }
            _ => {
                return Err(fail(format!(
                    "the source model has two columns named \"{source}\"; alias one of them"
                )))
            }
        };
        let src_expr = format!("src.{}", quote_ident(source));
        let same_user_type = sty.oid() >= FIRST_USER_OID
            && d.oid >= FIRST_USER_OID
            && sty.name() == d.typname
            && sty.schema() == d.typschema;
        let cast = if sty.oid() == d.oid || binary_compatible(sty.oid(), d.oid) {
            false
        } else if same_user_type {
            if embeds_oids(sty) {
                return Err(fail(format!(
                    "column \"{dest}\": type {}.{} is an array or composite of user-defined types; binary COPY embeds type OIDs, which differ between the two databases. Sync it as text: cast it in a query ({source}::text) into a text column",
                    d.typschema, d.typname
                )));
            }
            false
        } else if lossless_cast(sty.oid(), d.oid) {
            notes.push(format!(
                "column \"{dest}\": casting source {} to target {} in the generated query",
                sty.name(),
                d.format
            ));
            true
        } else {
            return Err(fail(format!(
                "column \"{dest}\" is {} in the source but {} in the target {}: binary COPY needs equal types. Cast it in a source query (e.g. --query 'SELECT ..., {}::{} AS {} FROM ...') or change the target column type",
                sty.name(),
                d.format,
                target.quoted,
                quote_ident(source),
                d.format,
                quote_ident(source)
            )));
        };
        exprs.push(if cast {
            format!("{src_expr}::{}", d.format)
        } else {
            src_expr
        });
        columns.push(Column {
            dest: dest.clone(),
            source: source.clone(),
            dest_type: d.format.clone(),
            dest_oid: d.oid,
            cast,
        });
    }
    let nkey = spec.key.len();
    let select = format!("SELECT {} FROM {model_sql} AS src", exprs.join(", "));
    // The generated query must run as written (a cast can fail to resolve on odd types).
    src.prepare(&select)
        .await
        .map_err(|e| pg("the generated source query does not run", e))?;

    // --- record matching: the key must be a PRIMARY KEY or UNIQUE constraint of the target ---
    let mut key_attnums: Vec<i16> = spec
        .key
        .iter()
        .map(|k| {
            dest_cols
                .iter()
                .find(|c| &c.name == k)
                .map(|c| c.attnum)
                .unwrap_or(0)
        })
        .collect();
    key_attnums.sort_unstable();
    let uniques = dst
        .query(
            "SELECT i.indkey::int2[] FROM pg_index i \
             WHERE i.indrelid = $1::int8::oid AND i.indisunique AND i.indisvalid \
               AND i.indpred IS NULL AND i.indexprs IS NULL",
            &[&(target.oid as i64)],
        )
        .await
        .map_err(|e| pg("cannot read the target's indexes", e))?;
    let matched = uniques.iter().any(|r| {
        let mut cols: Vec<i16> = r.get(0);
        cols.sort_unstable();
        cols == key_attnums
    });
    if !matched {
        return Err(fail(format!(
            "the key ({}) is not a PRIMARY KEY or UNIQUE constraint of {}: pgdelta matches records on it. Add one: ALTER TABLE {} ADD UNIQUE ({})",
            spec.key.join(", "),
            target.quoted,
            target.quoted,
            spec.key.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ")
        )));
    }

    // --- privileges ---
    let mut privs = vec!["INSERT"];
    if spec.mode == Mode::Upsert {
        privs.push("UPDATE");
    }
    if spec.delete {
        privs.push("DELETE");
    }
    for p in privs {
        let ok: bool = dst
            .query_one(
                "SELECT has_table_privilege($1::int8::oid, $2)",
                &[&(target.oid as i64), &p],
            )
            .await
            .map_err(|e| pg("cannot check privileges", e))?
            .get(0);
        if !ok {
            return Err(fail(format!(
                "the destination user may not {p} on {}: GRANT {p} ON {} TO <user>",
                target.quoted, target.quoted
            )));
        }
    }

    let target_empty: bool = dst
        .query_one(
            &format!("SELECT NOT EXISTS (SELECT 1 FROM {})", target.quoted),
            &[],
        )
        .await
        .map_err(|e| pg("cannot read the target", e))?
        .get(0);

    let key_desc: Vec<String> = columns[..nkey]
        .iter()
        .map(|c| format!("{}:{}", c.dest, c.dest_type))
        .collect();
    let key_fp = fingerprint(&key_desc.iter().map(String::as_str).collect::<Vec<_>>());
    let mut row_parts: Vec<String> = vec![select.clone()];
    row_parts.extend(
        columns
            .iter()
            .map(|c| format!("{}<-{}:{}", c.dest, c.source, c.dest_type)),
    );
    let row_fp = fingerprint(&row_parts.iter().map(String::as_str).collect::<Vec<_>>());

    Ok(Plan {
        select,
        columns,
        nkey,
        target: target.quoted,
        target_empty,
        key_fp,
        row_fp,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_keys() {
        assert_eq!(render_value(20, Some(&42i64.to_be_bytes())), "42");
        assert_eq!(render_value(25, Some(b"it's")), "'it''s'");
        assert_eq!(render_value(25, None), "NULL");
        assert_eq!(render_value(1700, Some(&[1, 2])), "\\x0102");
        assert_eq!(
            render_value(2950, Some(&[0x12; 16])),
            "12121212-1212-1212-1212-121212121212"
        );
    }

    #[test]
    fn casts() {
        assert!(lossless_cast(23, 20));
        assert!(!lossless_cast(20, 23));
        assert!(binary_compatible(25, 1043));
        assert!(!binary_compatible(25, 20));
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
