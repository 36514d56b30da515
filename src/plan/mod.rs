//! The plan: everything decided from both databases before any row moves.
//!
//! [`plan`] describes the source model (prepare, no rows read), reads the target's catalog,
//! maps columns, checks that every column's type matches (adding a lossless cast such as
//! `int4 -> int8` to the generated query where it can, and stopping with the cast to write where
//! it cannot), checks that the key is a PRIMARY KEY or UNIQUE constraint of the target (record
//! matching), checks write privileges, and generates the source query: key columns first, then
//! the other mapped columns, so that a tuple's key and hashed part are contiguous byte ranges and
//! the tuple can be sent to the destination's binary COPY unchanged.
//!
//! - [`catalog`]: the catalog queries.
//! - [`types`]: which types fit, which casts are added, how keys are shown.

mod catalog;
mod types;

use std::collections::HashSet;

use tokio_postgres::types::Type;
use tokio_postgres::Client;

use crate::copy::fields;
use crate::error::{pg_message, Error};
use crate::hash::fingerprint;
use crate::spec::{Mode, Model, SyncSpec};
use catalog::{DestColumn, Relation};
use types::json_value;
use types::{binary_compatible, embeds_oids, lossless_cast, FIRST_USER_OID};
pub(crate) use types::{hex, quote_ident, render_value};

/// A synced column, in stream order.
#[derive(Debug, Clone)]
pub(crate) struct Column {
    pub(crate) dest: String,
    pub(crate) source: String,
    /// The target column's type as `format_type` renders it (e.g. `character varying(20)`).
    pub(crate) dest_type: String,
    pub(crate) dest_oid: u32,
}

/// A model that is one table (or partitioned table, or materialized view) of the source, as
/// change-aware reads need it.
#[derive(Debug, Clone)]
pub(crate) struct SourceTable {
    pub(crate) oid: u32,
    /// Quoted and schema-qualified.
    pub(crate) quoted: String,
    /// `pg_class.relkind`: `r`, `p`, `m` have row versions with `xmin`; a view (`v`) does not.
    pub(crate) kind: String,
    /// The generated select list (key expressions first).
    pub(crate) exprs: Vec<String>,
    /// The user's `where` condition, if any.
    pub(crate) filter: Option<String>,
    /// The key's source columns are unique and NOT NULL in the source (a unique index), so a
    /// row count is a count of distinct keys.
    pub(crate) unique_key: bool,
}

impl SourceTable {
    /// Tables, partitioned tables and materialized views have row versions with an `xmin`;
    /// a view does not.
    pub(crate) fn has_row_versions(&self) -> bool {
        matches!(self.kind.as_str(), "r" | "p" | "m")
    }

    /// `SELECT <list> FROM <table> AS src WHERE <filter> [AND <extra>]`.
    pub(crate) fn select(&self, list: &str, extra: Option<&str>) -> String {
        self.select_part(list, extra, None)
    }

    /// [`Self::select`] of one part of a split read: a leaf relation and its `ctid` range.
    pub(crate) fn select_part(
        &self,
        list: &str,
        extra: Option<&str>,
        part: Option<&crate::split::Part>,
    ) -> String {
        let from = part.map_or(self.quoted.as_str(), |p| p.from.as_str());
        let range = part.and_then(|p| p.range.as_deref());
        let conds: Vec<String> = self
            .filter
            .iter()
            .map(|f| format!("({f})"))
            .chain(extra.map(|e| format!("({e})")))
            .chain(range.map(String::from))
            .collect();
        format!("SELECT {list} FROM {from} AS src{}", where_clause(&conds))
    }

    /// The select list of the synced columns.
    pub(crate) fn list(&self) -> String {
        self.exprs.join(", ")
    }
}

/// ` WHERE a AND b` for the given conditions, or nothing when there are none.
pub(crate) fn where_clause<S: AsRef<str>>(conds: impl IntoIterator<Item = S>) -> String {
    let conds: Vec<S> = conds.into_iter().collect();
    match conds.is_empty() {
        true => String::new(),
        false => {
            let conds: Vec<&str> = conds.iter().map(AsRef::as_ref).collect();
            format!(" WHERE {}", conds.join(" AND "))
        }
    }
}

/// A query model's generated select, in pieces, so a split read can add a range condition.
#[derive(Debug, Clone)]
pub(crate) struct QuerySelect {
    /// The select list (key expressions first).
    list: String,
    /// The user's query in parentheses.
    from: String,
    /// The shard condition, if any.
    shard: Option<String>,
    /// `split_by`, resolved.
    pub(crate) split_by: Option<SplitBy>,
}

impl QuerySelect {
    /// `SELECT <list> FROM (<query>) AS src [WHERE <shard> AND <extra>]`.
    pub(crate) fn select(&self, extra: Option<&str>) -> String {
        format!(
            "SELECT {} FROM {} AS src{}",
            self.list,
            self.from,
            where_clause(self.shard.as_deref().into_iter().chain(extra))
        )
    }
}

/// The query model's output column a read splits by: where its values come from (a table
/// column, whose statistics give the ranges) and its type.
#[derive(Debug, Clone)]
pub(crate) struct SplitBy {
    /// As the user named it.
    pub(crate) column: String,
    /// `src."column"`.
    pub(crate) expr: String,
    pub(crate) table_oid: u32,
    pub(crate) attnum: i16,
    /// The SQL type name, for literals (`'5'::bigint`).
    pub(crate) type_name: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// The model when it is one table (change-aware reads), `None` for a query.
    pub(crate) table: Option<SourceTable>,
    /// The model when it is a query.
    pub(crate) query: Option<QuerySelect>,
    /// The generated SELECT (key columns first).
    pub(crate) select: String,
    /// The rows of the target this sync owns, when it is one shard of the model.
    pub(crate) target_filter: Option<String>,
    pub(crate) columns: Vec<Column>,
    pub(crate) nkey: usize,
    /// The target as a quoted, schema-qualified name.
    pub(crate) target: String,
    /// The target is empty right now (first-load fast path).
    pub(crate) target_empty: bool,
    /// The destination session is read-only (a hot standby, `default_transaction_read_only`):
    /// nothing can be written there ([`Plan::writable`]).
    pub(crate) target_read_only: bool,
    pub(crate) key_fp: String,
    pub(crate) row_fp: String,
    /// What the planner did that the user should know (casts added).
    pub(crate) notes: Vec<String>,
}

impl Plan {
    /// Fails when the destination takes no writes: said before the read, not at the first
    /// batch. (A dry run writes nothing, and may plan against a read-only replica.)
    pub(crate) fn writable(&self, sync: &str) -> Result<(), Error> {
        match self.target_read_only {
            false => Ok(()),
            true => Err(Error::Plan {
                sync: sync.to_string(),
                message: format!(
                    "the destination session is read-only (the server is a hot standby, or default_transaction_read_only is on), so nothing can be written to {}: point the destination at the primary; to follow failovers, list every host of the cluster with target_session_attrs=primary",
                    self.target
                ),
            }),
        }
    }

    /// Reads the target's synced columns in the order, and with the types, of the generated
    /// source query: equal values give equal bytes, so equal rows hash alike.
    pub(crate) fn target_copy_sql(&self) -> String {
        format!(
            "COPY (SELECT {} FROM {}{}) TO STDOUT (FORMAT binary)",
            self.column_list(),
            self.target,
            where_clause(&self.target_filter)
        )
    }

    pub(crate) fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| quote_ident(&c.dest))
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub(crate) fn key_columns(&self) -> &[Column] {
        &self.columns[..self.nkey]
    }

    /// Renders raw key bytes for messages: `id=42`, `code='ab', day=\x0000...`.
    pub(crate) fn describe_key(&self, key: &[u8]) -> String {
        self.key_columns()
            .iter()
            .zip(fields(key))
            .map(|(c, f)| format!("{}={}", c.dest, render_value(c.dest_oid, f)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Raw key bytes as a JSON object: `{"id": 42}`, `{"code": "ab", "day": "\\x0000..."}`.
    pub(crate) fn key_json(&self, key: &[u8]) -> serde_json::Value {
        let map = self
            .key_columns()
            .iter()
            .zip(fields(key))
            .map(|(c, f)| (c.dest.clone(), json_value(c.dest_oid, f)))
            .collect();
        serde_json::Value::Object(map)
    }

    /// A plan over `t` with columns given as `name:type` (bigint, int, text), the first `nkey`
    /// of them the key: for unit tests of the stages.
    #[cfg(test)]
    pub(crate) fn for_tests(columns: &[&str], nkey: usize) -> Plan {
        let columns = columns
            .iter()
            .map(|c| {
                let (name, ty) = c.split_once(':').expect("name:type");
                let oid = match ty {
                    "bigint" => 20,
                    "int" => 23,
                    _ => 25,
                };
                Column {
                    dest: name.into(),
                    source: name.into(),
                    dest_type: ty.into(),
                    dest_oid: oid,
                }
            })
            .collect();
        Plan {
            table: None,
            query: None,
            target_filter: None,
            select: "SELECT * FROM t".into(),
            columns,
            nkey,
            target: "\"public\".\"t\"".into(),
            target_empty: false,
            target_read_only: false,
            key_fp: String::new(),
            row_fp: String::new(),
            notes: Vec::new(),
        }
    }
}

/// The sync's name on every planning error.
struct Fail<'a>(&'a str);

impl Fail<'_> {
    fn msg(&self, message: String) -> Error {
        Error::Plan {
            sync: self.0.to_string(),
            message,
        }
    }
    fn pg(&self, what: &str, e: tokio_postgres::Error) -> Error {
        self.msg(format!("{what}: {}", pg_message(&e)))
    }
}

/// Builds the plan, checking everything that can be checked before reading a row.
pub(crate) async fn plan(src: &Client, dst: &Client, spec: &SyncSpec) -> Result<Plan, Error> {
    let fail = Fail(&spec.name);
    if spec.key.is_empty() {
        return Err(fail.msg(
            "no key columns: give --key (the target's PRIMARY KEY or UNIQUE columns)".into(),
        ));
    }
    let target = target(dst, spec, &fail).await?;
    let dest_cols = catalog::columns(dst, target.oid)
        .await
        .map_err(|e| fail.pg("cannot read the target's columns", e))?;
    let (model_sql, relation) = model_sql(src, &spec.model, &fail).await?;
    let described = src
        .prepare(&format!("SELECT * FROM {model_sql} AS src"))
        .await
        .map_err(|e| fail.pg("the source model does not run", e))?;
    let source_cols: Vec<(String, Type)> = described
        .columns()
        .iter()
        .map(|c| (c.name().to_string(), c.type_().clone()))
        .collect();
    let (mapping, generated) = mapping(spec, &source_cols, &dest_cols, &target, &fail)?;
    let TypedColumns {
        columns,
        exprs,
        mut notes,
    } = typed_columns(&mapping, &source_cols, &dest_cols, &target, &fail)?;
    notes.extend(generated.iter().map(|c| format!(
        "target column \"{c}\" is a generated column: the target computes it, so the source column of that name is not synced"
    )));
    let nkey = spec.key.len();
    // One shard of the model: the rows whose key hashes to it, on the source and the target.
    let shard = spec.shard.map(|sh| {
        let dest_keys: Vec<String> = columns[..nkey]
            .iter()
            .map(|c| quote_ident(&c.dest))
            .collect();
        (sh.condition(&exprs[..nkey]), sh.condition(&dest_keys))
    });
    let filter = match (&spec.filter, &shard) {
        (Some(f), Some((c, _))) => Some(format!("({f}) AND {c}")),
        (Some(f), None) => Some(f.clone()),
        (None, Some((c, _))) => Some(c.clone()),
        (None, None) => None,
    };
    let table = match relation {
        Some(rel) => {
            let key_sources: Vec<String> =
                columns[..nkey].iter().map(|c| c.source.clone()).collect();
            let unique_key = catalog::keys_unique_not_null(src, rel.oid, &key_sources)
                .await
                .map_err(|e| fail.pg("cannot read the source table's indexes", e))?;
            Some(SourceTable {
                oid: rel.oid,
                quoted: rel.quoted,
                kind: rel.kind,
                exprs: exprs.clone(),
                filter,
                unique_key,
            })
        }
        None => None,
    };
    let query = match &table {
        Some(_) => None,
        None => Some(QuerySelect {
            list: exprs.join(", "),
            from: model_sql.clone(),
            shard: shard.as_ref().map(|(c, _)| c.clone()),
            split_by: match &spec.split_by {
                Some(col) => Some(split_by(src, col, described.columns(), &fail).await?),
                None => None,
            },
        }),
    };
    let select = match (&table, &query) {
        (Some(t), _) => t.select(&t.list(), None),
        (None, Some(q)) => q.select(None),
        (None, None) => unreachable!("a model is a table or a query"),
    };
    // The generated query must run as written (a cast can fail to resolve on odd types, a
    // `where` condition can be wrong).
    let target_filter = shard.map(|(_, t)| t);
    if let (Some(sh), Some(cond)) = (spec.shard, &target_filter) {
        let needs = "sharding hashes the key with hash_record_extended (PostgreSQL 14 or later, on both servers)";
        let on = |side: &str, e| fail.pg(&format!("--shard {sh}: {needs}; the {side} says"), e);
        src.prepare(&format!("SELECT {}", sh.condition(&["1".into()])))
            .await
            .map_err(|e| on("source", e))?;
        dst.prepare(&format!("SELECT 1 FROM {} WHERE {cond}", target.quoted))
            .await
            .map_err(|e| on("target", e))?;
    }
    src.prepare(&select).await.map_err(|e| match &spec.filter {
        Some(f) => fail.pg(
            &format!("the generated source query (with where = \"{f}\") does not run"),
            e,
        ),
        None => fail.pg("the generated source query does not run", e),
    })?;
    check_target(dst, spec, &target, &dest_cols, &fail).await?;
    let target_read_only = crate::conn::show(dst, "transaction_read_only")
        .await
        .map_err(|e| fail.pg("cannot check whether the destination takes writes", e))?
        == "on";
    // A shard owns its share of the target: empty when that share is.
    let target_empty = catalog::is_empty(dst, &target.quoted, target_filter.as_deref())
        .await
        .map_err(|e| fail.pg("cannot read the target", e))?;
    let (key_fp, row_fp) = fingerprints(&select, &columns, nkey);
    Ok(Plan {
        table,
        query,
        target_filter,
        select,
        columns,
        nkey,
        target: target.quoted,
        target_empty,
        target_read_only,
        key_fp,
        row_fp,
        notes,
    })
}

/// Resolves `split_by`: an output column of the query, read as is from a table column (whose
/// statistics give the ranges), of a type with a meaningful order.
async fn split_by(
    src: &Client,
    column: &str,
    columns: &[tokio_postgres::Column],
    fail: &Fail<'_>,
) -> Result<SplitBy, Error> {
    let names: Vec<&str> = columns.iter().map(|c| c.name()).collect();
    let c = columns.iter().find(|c| c.name() == column).ok_or_else(|| {
        fail.msg(format!(
            "split_by = \"{column}\" is not a column of the query (its columns: {})",
            names.join(", ")
        ))
    })?;
    let ok = matches!(
        c.type_().name(),
        "int2" | "int4" | "int8" | "numeric" | "date" | "timestamp" | "timestamptz" | "uuid"
    );
    if !ok {
        return Err(fail.msg(format!(
            "split_by = \"{column}\" is of type {}: split by an integer, numeric, date, timestamp or uuid column",
            c.type_().name()
        )));
    }
    let (Some(table_oid), Some(attnum)) = (c.table_oid(), c.column_id()) else {
        return Err(fail.msg(format!(
            "split_by = \"{column}\" is computed by the query: split by a column the query selects from a table as it is (its ranges come from that table's statistics)"
        )));
    };
    let type_name: String = src
        .query_one(
            "SELECT format_type($1::int8::oid, NULL)",
            &[&(c.type_().oid() as i64)],
        )
        .await
        .map_err(|e| fail.pg("cannot read the split_by column's type", e))?
        .get(0);
    Ok(SplitBy {
        column: column.to_string(),
        expr: format!("src.{}", quote_ident(column)),
        table_oid,
        attnum,
        type_name,
    })
}

/// The target table, which must exist and be a table.
async fn target(dst: &Client, spec: &SyncSpec, fail: &Fail<'_>) -> Result<Relation, Error> {
    let target = catalog::relation(dst, &spec.target)
        .await
        .map_err(|e| fail.pg("cannot look up the target", e))?
        .ok_or_else(|| {
            fail.msg(format!(
                "the target table {} does not exist in the destination database; create it first (pgdelta does not create tables)",
                spec.target
            ))
        })?;
    if target.kind != "r" && target.kind != "p" {
        return Err(fail.msg(format!("the target {} is not a table", target.quoted)));
    }
    Ok(target)
}

/// The model as a FROM item: the resolved table (and the table), or the query in parentheses.
async fn model_sql(
    src: &Client,
    model: &Model,
    fail: &Fail<'_>,
) -> Result<(String, Option<Relation>), Error> {
    match model {
        Model::Table(t) => {
            let rel = catalog::relation(src, t)
                .await
                .map_err(|e| fail.pg("cannot look up the source table", e))?
                .ok_or_else(|| {
                    fail.msg(format!(
                        "the source table {t} does not exist in the source database"
                    ))
                })?;
            Ok((rel.quoted.clone(), Some(rel)))
        }
        Model::Query(q) => {
            let q = q.trim().trim_end_matches(';').trim();
            if q.is_empty() {
                return Err(fail.msg("the source query is empty".into()));
            }
            Ok((format!("({q})"), None))
        }
    }
}

/// Target column -> source column pairs.
type Mapping = Vec<(String, String)>;

/// Target column -> source column, key columns first (in key order), then the rest in
/// mapping order. Without an explicit mapping, every source column maps by name, except onto a
/// generated target column (it can never be written): those are returned apart, to be said.
fn mapping(
    spec: &SyncSpec,
    source_cols: &[(String, Type)],
    dest_cols: &[DestColumn],
    target: &Relation,
    fail: &Fail<'_>,
) -> Result<(Mapping, Vec<String>), Error> {
    let mut generated = Vec::new();
    let mapping: Vec<(String, String)> = if spec.columns.is_empty() {
        let mut seen = HashSet::new();
        if let Some((n, _)) = source_cols.iter().find(|(n, _)| !seen.insert(n)) {
            return Err(fail.msg(format!(
                "the source model has two columns named \"{n}\"; alias one of them in the query"
            )));
        }
        let missing: Vec<&str> = source_cols
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !dest_cols.iter().any(|d| d.name == *n))
            .collect();
        if !missing.is_empty() {
            return Err(fail.msg(format!(
                "source column(s) {} have no column of the same name in {}; add them to the target, leave them out of the query, or map columns explicitly ([sync.columns] target = \"source\")",
                missing.join(", "),
                target.quoted
            )));
        }
        let is_generated = |n: &str| dest_cols.iter().any(|d| d.name == n && d.generated);
        generated = source_cols
            .iter()
            .filter(|(n, _)| is_generated(n))
            .map(|(n, _)| n.clone())
            .collect();
        source_cols
            .iter()
            .filter(|(n, _)| !is_generated(n))
            .map(|(n, _)| (n.clone(), n.clone()))
            .collect()
    } else {
        spec.columns
            .iter()
            .map(|(d, s)| (d.clone(), s.clone()))
            .collect()
    };
    let mut ordered = Vec::with_capacity(mapping.len());
    for k in &spec.key {
        let m = mapping.iter().find(|(d, _)| d == k).ok_or_else(|| {
            fail.msg(format!(
                "key column \"{k}\" is not among the synced columns; map it or fix --key"
            ))
        })?;
        ordered.push(m.clone());
    }
    ordered.extend(mapping.into_iter().filter(|(d, _)| !spec.key.contains(d)));
    Ok((ordered, generated))
}

/// The synced columns, their SELECT expressions (with the casts pgdelta adds) and notes about
/// those casts.
struct TypedColumns {
    columns: Vec<Column>,
    exprs: Vec<String>,
    notes: Vec<String>,
}

/// Checks each mapped column's type against the target's.
fn typed_columns(
    mapping: &[(String, String)],
    source_cols: &[(String, Type)],
    dest_cols: &[DestColumn],
    target: &Relation,
    fail: &Fail<'_>,
) -> Result<TypedColumns, Error> {
    let mut columns = Vec::new();
    let mut exprs = Vec::new();
    let mut notes = Vec::new();
    for (dest, source) in mapping {
        let d = dest_cols.iter().find(|c| &c.name == dest).ok_or_else(|| {
            fail.msg(format!(
                "the target {} has no column \"{dest}\"",
                target.quoted
            ))
        })?;
        if d.generated {
            return Err(fail.msg(format!(
                "target column \"{dest}\" is a generated column and cannot be written; leave it out of the explicit mapping"
            )));
        }
        let matches: Vec<&Type> = source_cols
            .iter()
            .filter(|(n, _)| n == source)
            .map(|(_, t)| t)
            .collect();
        let sty = match matches.as_slice() {
            [one] => *one,
            [] => {
                return Err(fail.msg(format!(
                "the source model has no column \"{source}\" (mapped to target column \"{dest}\")"
            )))
            }
            _ => {
                return Err(fail.msg(format!(
                    "the source model has two columns named \"{source}\"; alias one of them"
                )))
            }
        };
        let src_expr = format!("src.{}", quote_ident(source));
        if needs_cast(dest, source, sty, d, target).map_err(|m| fail.msg(m))? {
            notes.push(format!(
                "column \"{dest}\": casting source {} to target {} in the generated query",
                sty.name(),
                d.format
            ));
            exprs.push(format!("{src_expr}::{}", d.format));
        } else {
            exprs.push(src_expr);
        }
        columns.push(Column {
            dest: dest.clone(),
            source: source.clone(),
            dest_type: d.format.clone(),
            dest_oid: d.oid,
        });
    }
    Ok(TypedColumns {
        columns,
        exprs,
        notes,
    })
}

/// Whether source type `sty` needs a cast to reach target column `d` over binary COPY; an
/// error names the cast the user must write when pgdelta cannot add one safely.
fn needs_cast(
    dest: &str,
    source: &str,
    sty: &Type,
    d: &DestColumn,
    target: &Relation,
) -> Result<bool, String> {
    let same_user_type = sty.oid() >= FIRST_USER_OID
        && d.oid >= FIRST_USER_OID
        && sty.name() == d.typname
        && sty.schema() == d.typschema;
    if sty.oid() == d.oid || binary_compatible(sty.oid(), d.oid) {
        Ok(false)
    } else if same_user_type {
        if embeds_oids(sty) {
            return Err(format!(
                "column \"{dest}\": type {}.{} is an array or composite of user-defined types; binary COPY embeds type OIDs, which differ between the two databases. Sync it as text: cast it in a query ({source}::text) into a text column",
                d.typschema, d.typname
            ));
        }
        Ok(false)
    } else if lossless_cast(sty.oid(), d.oid) {
        Ok(true)
    } else {
        Err(format!(
            "column \"{dest}\" is {} in the source but {} in the target {}: binary COPY needs equal types. Cast it in a source query (e.g. --query 'SELECT ..., {}::{} AS {} FROM ...') or change the target column type",
            sty.name(),
            d.format,
            target.quoted,
            quote_ident(source),
            d.format,
            quote_ident(source)
        ))
    }
}

/// Record matching (the key is a PRIMARY KEY or UNIQUE constraint of the target) and the
/// privileges the run needs.
async fn check_target(
    dst: &Client,
    spec: &SyncSpec,
    target: &Relation,
    dest_cols: &[DestColumn],
    fail: &Fail<'_>,
) -> Result<(), Error> {
    let key_attnums: Vec<i16> = spec
        .key
        .iter()
        .map(|k| {
            dest_cols
                .iter()
                .find(|c| &c.name == k)
                .map_or(0, |c| c.attnum)
        })
        .collect();
    let unique = catalog::is_unique(dst, target.oid, &key_attnums)
        .await
        .map_err(|e| fail.pg("cannot read the target's indexes", e))?;
    if !unique {
        return Err(fail.msg(format!(
            "the key ({}) is not a PRIMARY KEY or UNIQUE constraint of {}: pgdelta matches records on it. Add one: ALTER TABLE {} ADD UNIQUE ({})",
            spec.key.join(", "),
            target.quoted,
            target.quoted,
            spec.key.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ")
        )));
    }
    // Every run reads the target (whether it is empty; `ON CONFLICT` and deletes read its key).
    let mut privs = vec!["SELECT", "INSERT"];
    if spec.mode == Mode::Upsert {
        privs.push("UPDATE");
    }
    if spec.delete {
        privs.push("DELETE");
    }
    let mut missing = Vec::new();
    for p in privs {
        let ok = catalog::has_privilege(dst, target.oid, p)
            .await
            .map_err(|e| fail.pg("cannot check privileges", e))?;
        if !ok {
            missing.push(p);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(fail.msg(format!(
        "the destination user may not {} on {}: GRANT {} ON {} TO <user>",
        missing.join(" or "),
        target.quoted,
        missing.join(", "),
        target.quoted
    )))
}

/// The key fingerprint (key columns and types: a change invalidates stored keys) and the model
/// fingerprint (generated query, columns, types, mapping: a change rewrites every row).
fn fingerprints(select: &str, columns: &[Column], nkey: usize) -> (String, String) {
    let key_desc: Vec<String> = columns[..nkey]
        .iter()
        .map(|c| format!("{}:{}", c.dest, c.dest_type))
        .collect();
    let key_fp = fingerprint(&key_desc.iter().map(String::as_str).collect::<Vec<_>>());
    let mut row_parts: Vec<String> = vec![select.to_string()];
    row_parts.extend(
        columns
            .iter()
            .map(|c| format!("{}<-{}:{}", c.dest, c.source, c.dest_type)),
    );
    let row_fp = fingerprint(&row_parts.iter().map(String::as_str).collect::<Vec<_>>());
    (key_fp, row_fp)
}

/// What `pgdelta check` reports of a sync's plan.
#[derive(Debug, Clone)]
pub struct PlanCheck {
    /// The target, quoted and schema-qualified.
    pub target: String,
    /// Columns synced.
    pub columns: usize,
    /// What the planner did that the user should know (casts added).
    pub notes: Vec<String>,
}

/// Plans `spec` against both databases without reading a row or writing anything.
pub async fn check_plan(src: &Client, dst: &Client, spec: &SyncSpec) -> Result<PlanCheck, Error> {
    let p = plan(src, dst, spec).await?;
    p.writable(&spec.name)?;
    Ok(PlanCheck {
        target: p.target,
        columns: p.columns.len(),
        notes: p.notes,
    })
}
