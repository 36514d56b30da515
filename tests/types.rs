use crate::support::Env;

const ALL_TYPES: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE alltypes (
  id int PRIMARY KEY,
  i2 smallint, i4 int, i8 bigint, num numeric, num_p numeric(20,5), f4 real, f8 double precision,
  b bool, t text, vc varchar(20), ch char(5), by bytea,
  d date, tm time, tmtz timetz, ts timestamp, tstz timestamptz, iv interval,
  u uuid, j json, jb jsonb, ia int[], ta text[], ia2 int[], jba jsonb[],
  ip inet, cid cidr, mac macaddr, r int4range, tsr tstzrange, nr numrange, m mood,
  bits varbit, pt point, money_ money, xid8_ text
)";

const ROWS: &str = r#"
INSERT INTO alltypes VALUES
 (1, 32767, 2147483647, 9223372036854775807, 'NaN', 12345.67891, 'Infinity', '-Infinity',
  true, '日本語 🎉 ''quoted'' \ backslash', 'short', 'ab', '\x00ff10',
  '-infinity', '23:59:59.999999', '12:00+05:30', 'infinity', '-infinity', '1 year 2 mons 3 days 04:05:06.789',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"b": 1,   "a": [1, 2], "a": "dup"}', '{"z": {"y": [1, null, "x"]}, "a": 1.50}',
  ARRAY[1, NULL, 3], ARRAY['x', NULL, '', 'with "quotes"'], '{{1,2},{3,4}}', ARRAY['{"k": 1}'::jsonb, NULL, '[]'::jsonb],
  '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', '[1,10)', '[2024-01-01 00:00+00, infinity)', '(,5.5]', 'happy',
  B'10101', '(1.5,-2)', 12.34, 'x'),
 (2, -32768, -2147483648, -9223372036854775808, '-0.000000000000000000001', -0.00001, 'NaN', 5e-324,
  false, '', '', '', '',
  '4713-01-01 BC', '00:00', '00:00-12', '1999-12-31 23:59:59.123456', '2000-01-01 00:00:00+00', '-178000000 years',
  '00000000-0000-0000-0000-000000000000', '[]', 'null', '{}', '{}', '{}', '{}',
  '::1', '2001:db8::/32', '00:00:00:00:00:00', 'empty', 'empty', '[-1e20,1e20)', 'sad',
  B'', '(0,0)', -0.01, ''),
 (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (4, 0, 0, 0, 1e-1000, 0, 3.4e38, 1.7976931348623157e308, true, repeat('long text ', 10000), 'vc', 'abcde', decode(repeat('ab', 5000), 'hex'),
  '2024-02-29', '12:34:56', '12:34:56+00', '2024-02-29 12:34:56', '2024-02-29 12:34:56.5+01', '-1 day +02:00',
  gen_random_uuid(), '"just a string"', '"\u00e9"', ARRAY[]::int[], ARRAY['{}'], '{{{1}},{{2}}}', ARRAY[]::jsonb[],
  '0.0.0.0/0', '0.0.0.0/0', 'ff:ff:ff:ff:ff:ff', '(,)', '(,)', 'empty', 'ok',
  B'1', '(1e300,-1e300)', 0, NULL)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_standard_type_round_trips_exactly() {
    let env = Env::new().await;
    env.both(ALL_TYPES).await;
    // Make the enum's OID differ between the databases, as it would in real life.
    env.dst.batch_execute("CREATE TYPE unused AS ENUM ('x'); DROP TYPE mood CASCADE; CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy'); ALTER TABLE alltypes ADD COLUMN m2 int; ALTER TABLE alltypes DROP COLUMN m2; ALTER TABLE alltypes ADD COLUMN m mood").await.unwrap();
    env.src.batch_execute(ROWS).await.unwrap();
    let spec = env.spec("alltypes", &["id"]);
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.written, 4);
    let cols = "id, i2, i4, i8, num, num_p, f4, f8, b, t, vc, ch, by, d, tm, tmtz, ts, tstz, iv, u, j, jb, ia, ta, ia2, jba, ip, cid, mac, r, tsr, nr, m, bits, pt, money_, xid8_";
    env.assert_same(
        &format!("SELECT {cols} FROM alltypes ORDER BY id"),
        &format!("SELECT {cols} FROM alltypes ORDER BY id"),
    )
    .await;
    // json is byte-exact (whitespace and duplicate keys kept).
    let j: String = env
        .dst
        .query_one("SELECT j::text FROM alltypes WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(j, r#"{"b": 1,   "a": [1, 2], "a": "dup"}"#);

    // A no-change run writes nothing; a change in any one type is found.
    assert_eq!(env.sync(&spec).await.unwrap().written, 0);
    env.src.batch_execute("UPDATE alltypes SET jba = ARRAY['{\"k\": 2}'::jsonb] WHERE id = 1; UPDATE alltypes SET f8 = 'NaN' WHERE id = 3").await.unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.changed, s.written), (2, 2));
    env.assert_same(
        &format!("SELECT {cols} FROM alltypes ORDER BY id"),
        &format!("SELECT {cols} FROM alltypes ORDER BY id"),
    )
    .await;

    // Every type's binary form read back from the target equals the source's: a snapshot
    // rebuilt from the target finds every row unchanged.
    std::fs::remove_file(env.state()).unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.rebuilt_from_target, s.unchanged, s.written), (4, 4, 0));
}

async fn key_round_trip(ddl: &str, seed: &str, churn: &str, key: &[&str], order: &str) {
    let env = Env::new().await;
    env.both(ddl).await;
    env.src.batch_execute(seed).await.unwrap();
    let mut spec = env.spec("k", key);
    spec.delete = true;
    let s = env.sync(&spec).await.unwrap();
    assert!(s.written > 0);
    env.src.batch_execute(churn).await.unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert!(s.changed > 0 && s.deleted > 0 && s.added > 0, "{s:?}");
    let q = format!("SELECT * FROM k ORDER BY {order}");
    env.assert_same(&q, &q).await;
    assert_eq!(env.sync(&spec).await.unwrap().written, 0);
    // Keys read back from the target match the source's bytes (rebuilt snapshot).
    std::fs::remove_file(env.state()).unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert!(s.rebuilt_from_target > 0 && s.written == 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_key_of_text_and_date() {
    key_round_trip(
        "CREATE TABLE k (region text, day date, n int, PRIMARY KEY (region, day))",
        "INSERT INTO k SELECT 'r' || (i % 10), date '2024-01-01' + i / 10, i FROM generate_series(1, 2000) i",
        "UPDATE k SET n = -n WHERE n % 17 = 0; DELETE FROM k WHERE n % 23 = 0; INSERT INTO k VALUES ('new', '2030-01-01', 1), ('Ünïcødé', '1999-01-01', 2)",
        &["region", "day"],
        "region, day",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uuid_key() {
    key_round_trip(
        "CREATE TABLE k (id uuid PRIMARY KEY, v text)",
        "INSERT INTO k SELECT md5(i::text)::uuid, 'v' || i FROM generate_series(1, 2000) i",
        "UPDATE k SET v = 'changed' WHERE v LIKE '%7'; DELETE FROM k WHERE v LIKE '%3'; INSERT INTO k VALUES (gen_random_uuid(), 'new')",
        &["id"],
        "id",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_key_with_unicode_and_a_unique_constraint() {
    key_round_trip(
        "CREATE TABLE k (serial_id serial PRIMARY KEY, code text NOT NULL UNIQUE, v int)",
        "INSERT INTO k (code, v) SELECT 'cöde-' || i || '-🎉', i FROM generate_series(1, 2000) i",
        "UPDATE k SET v = -1 WHERE v % 11 = 0; DELETE FROM k WHERE v % 13 = 0; INSERT INTO k (code, v) VALUES ('', 5)",
        &["code"],
        "code",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enum_and_integer_keys_with_a_lossless_cast() {
    let env = Env::new().await;
    env.both("CREATE TYPE color AS ENUM ('red', 'green')").await;
    env.src
        .batch_execute("CREATE TABLE k (c color, id int, v smallint, PRIMARY KEY (c, id)); INSERT INTO k SELECT (ARRAY['red','green']::color[])[1 + i % 2], i, i FROM generate_series(1, 100) i")
        .await
        .unwrap();
    // The target widens id and v: pgdelta casts in the generated query by itself.
    env.dst
        .batch_execute("CREATE TABLE k (c color, id bigint, v bigint, PRIMARY KEY (c, id))")
        .await
        .unwrap();
    let mut spec = env.spec("k", &["c", "id"]);
    spec.delete = true;
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.written, 100);
    assert!(
        s.notes.iter().any(|n| n.contains("casting")),
        "{:?}",
        s.notes
    );
    env.src
        .batch_execute("DELETE FROM k WHERE id <= 10")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!(s.deleted, 10);
    env.assert_same(
        "SELECT c, id::int8, v::int8 FROM k ORDER BY 1, 2",
        "SELECT * FROM k ORDER BY 1, 2",
    )
    .await;
    // The casts pgdelta adds make the source's bytes equal the target's: a rebuilt snapshot
    // finds nothing to write.
    std::fs::remove_file(env.state()).unwrap();
    let s = env.sync(&spec).await.unwrap();
    assert_eq!((s.rebuilt_from_target, s.written), (90, 0));
}
