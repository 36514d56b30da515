//! Catalog reads of the plan: relations, the target's columns, unique indexes and privileges.

use tokio_postgres::Client;

/// A table (or view) as the catalog names it.
pub(super) struct Relation {
    pub(super) oid: u32,
    /// Quoted and schema-qualified.
    pub(super) quoted: String,
    /// `pg_class.relkind`.
    pub(super) kind: String,
}

/// Resolves `name` as the server would (search_path included); `None` when it does not exist.
pub(super) async fn relation(
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

/// A column of the target.
pub(super) struct DestColumn {
    pub(super) attnum: i16,
    pub(super) name: String,
    pub(super) oid: u32,
    /// `format_type`, e.g. `character varying(20)`.
    pub(super) format: String,
    pub(super) typname: String,
    pub(super) typschema: String,
    pub(super) generated: bool,
}

pub(super) async fn columns(
    client: &Client,
    table: u32,
) -> Result<Vec<DestColumn>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attnum, a.attname::text, a.atttypid::int8, format_type(a.atttypid, a.atttypmod), \
                    t.typname::text, tn.nspname::text, a.attgenerated <> '' \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             JOIN pg_namespace tn ON tn.oid = t.typnamespace \
             WHERE a.attrelid = $1::int8::oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&(table as i64)],
        )
        .await?;
    Ok(rows
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
        .collect())
}

/// Whether the columns `attnums` are exactly a PRIMARY KEY or UNIQUE constraint (a valid,
/// non-partial unique index on plain columns) of `table`.
pub(super) async fn is_unique(
    client: &Client,
    table: u32,
    attnums: &[i16],
) -> Result<bool, tokio_postgres::Error> {
    let mut want = attnums.to_vec();
    want.sort_unstable();
    let uniques = client
        .query(
            "SELECT i.indkey::int2[] FROM pg_index i \
             WHERE i.indrelid = $1::int8::oid AND i.indisunique AND i.indisvalid \
               AND i.indpred IS NULL AND i.indexprs IS NULL",
            &[&(table as i64)],
        )
        .await?;
    Ok(uniques.iter().any(|r| {
        let mut cols: Vec<i16> = r.get(0);
        cols.sort_unstable();
        cols == want
    }))
}

/// Whether the columns `names` of `table` hold unique, non-null values: a valid, non-partial
/// unique index on some of them (a PRIMARY KEY or UNIQUE constraint), and every one NOT NULL.
/// Then counting the table's rows counts its distinct keys.
pub(super) async fn keys_unique_not_null(
    client: &Client,
    table: u32,
    names: &[String],
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_index i \
                 WHERE i.indrelid = $1::int8::oid AND i.indisunique AND i.indisvalid \
                   AND i.indpred IS NULL AND i.indexprs IS NULL \
                   AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey::int2[]) k \
                       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k \
                       WHERE a.attname::text <> ALL ($2::text[]))) \
             AND (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = $1::int8::oid \
                   AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull \
                   AND a.attname::text = ANY ($2::text[])) = cardinality($2::text[])",
            &[&(table as i64), &names],
        )
        .await?
        .get(0))
}

pub(super) async fn has_privilege(
    client: &Client,
    table: u32,
    privilege: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "SELECT has_table_privilege($1::int8::oid, $2)",
            &[&(table as i64), &privilege],
        )
        .await?
        .get(0))
}

pub(super) async fn is_empty(
    client: &Client,
    quoted: &str,
    filter: Option<&str>,
) -> Result<bool, tokio_postgres::Error> {
    let cond = super::where_clause(filter);
    Ok(client
        .query_one(
            &format!("SELECT NOT EXISTS (SELECT 1 FROM {quoted}{cond})"),
            &[],
        )
        .await?
        .get(0))
}
