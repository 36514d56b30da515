//! Type rules of the plan: which source and target types binary COPY can carry as they are,
//! which casts pgdelta adds by itself, and how raw key values are shown to people.

use tokio_postgres::types::{Kind, Type};

/// OIDs from here on belong to user-defined objects, which differ between databases.
pub(super) const FIRST_USER_OID: u32 = 16384;

/// Types whose binary form is the same bytes (text, varchar, bpchar): no cast needed.
pub(super) fn binary_compatible(a: u32, b: u32) -> bool {
    const TEXTS: [u32; 3] = [25, 1043, 1042];
    TEXTS.contains(&a) && TEXTS.contains(&b)
}

/// Casts that never lose information, which pgdelta adds to the generated query by itself.
pub(super) fn lossless_cast(from: u32, to: u32) -> bool {
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
pub(super) fn embeds_oids(ty: &Type) -> bool {
    match ty.kind() {
        Kind::Array(elem) => elem.oid() >= FIRST_USER_OID || embeds_oids(elem),
        Kind::Composite(_) => true,
        Kind::Domain(base) => embeds_oids(base),
        _ => false,
    }
}

/// Renders a raw binary value of a common type for humans; hex for the rest.
pub(crate) fn render_value(oid: u32, v: Option<&[u8]>) -> String {
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

/// A raw binary value of a common type as JSON: numbers, strings, booleans, null; hex text
/// (`\\x...`) for the rest.
pub(crate) fn json_value(oid: u32, v: Option<&[u8]>) -> serde_json::Value {
    use serde_json::Value;
    let Some(b) = v else {
        return Value::Null;
    };
    let rendered = render_value(oid, Some(b));
    match oid {
        20 | 21 | 23 => rendered
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or(Value::String(rendered)),
        16 => Value::Bool(b.first().is_some_and(|x| *x != 0)),
        25 | 1043 | 1042 | 19 => match std::str::from_utf8(b) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::String(rendered),
        },
        _ => Value::String(rendered),
    }
}

/// Lower-case hex of raw bytes.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Quotes an SQL identifier.
pub(crate) fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
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
    fn keys_as_json() {
        assert_eq!(
            json_value(20, Some(&42i64.to_be_bytes())),
            serde_json::json!(42)
        );
        assert_eq!(json_value(25, Some(b"it's")), serde_json::json!("it's"));
        assert_eq!(json_value(16, Some(&[1])), serde_json::json!(true));
        assert_eq!(json_value(25, None), serde_json::Value::Null);
        assert_eq!(
            json_value(1700, Some(&[1, 2])),
            serde_json::json!("\\x0102")
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
