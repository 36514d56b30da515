use std::process::{Command, Output};

use crate::support::{pgdelta_command, sync_t, sync_t_between, Env};

fn pgdelta(dir: &std::path::Path, args: &[&str]) -> Output {
    pgdelta_command(dir, args).output().expect("run pgdelta")
}

/// A table `t (id, v)` on both sides, `rows` rows at the source.
async fn seeded_t(rows: i32) -> Env {
    let env = Env::new().await;
    env.both("CREATE TABLE t (id int PRIMARY KEY, v int)").await;
    env.src
        .batch_execute(&format!(
            "INSERT INTO t SELECT i, i FROM generate_series(1, {rows}) i"
        ))
        .await
        .unwrap();
    env
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_flags_json_summary_and_log() {
    let env = Env::new().await;
    env.both("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await;
    env.src
        .batch_execute("INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 300) i")
        .await
        .unwrap();
    let state = env.state();
    let args = [
        "sync",
        "--source",
        &env.src_url,
        "--destination",
        &env.dst_url,
        "--table",
        "public.t",
        "--target",
        "public.t",
        "--key",
        "id",
        "--delete",
        "--state",
        state.to_str().unwrap(),
        "--json",
    ];
    let o = pgdelta(env.dir.path(), &args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "summary");
    assert_eq!(last["data"]["sync"], "t");
    assert_eq!(last["data"]["written"], 300);
    assert_eq!(last["data"]["rows_read"], 300);
    assert!(err.contains("sync 't' -> public.t"), "{err}");
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;

    env.src
        .batch_execute("DELETE FROM t WHERE id = 1")
        .await
        .unwrap();
    let o = pgdelta(env.dir.path(), &args);
    let last: serde_json::Value = serde_json::from_str(text(&o).0.lines().last().unwrap()).unwrap();
    assert_eq!(
        (
            last["data"]["removed"].as_u64(),
            last["data"]["deleted"].as_u64()
        ),
        (Some(1), Some(1))
    );

    let o = pgdelta(
        env.dir.path(),
        &["log", "--state", state.to_str().unwrap(), "--json"],
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let runs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[1]["data"]["summary"]["deleted"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_runs_named_syncs_and_rejects_unknown_keys() {
    let env = Env::new().await;
    env.both(
        "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (k text PRIMARY KEY, n int)",
    )
    .await;
    env.src
        .batch_execute("INSERT INTO a VALUES (1, 'x'), (2, 'y'); INSERT INTO b VALUES ('k1', 1)")
        .await
        .unwrap();
    let cfg = env.dir.path().join("pgdelta.toml");
    std::fs::write(
        &cfg,
        format!(
            "state = \"state.redb\"\n[source]\nurl_env = \"SRC\"\n[destination]\nurl = \"{}\"\n\n[[sync]]\nname = \"first\"\ntable = \"a\"\ntarget = \"a\"\nkey = \"id\"\n\n[[sync]]\nquery = \"SELECT k, n * 10 AS n FROM b\"\ntarget = \"public.b\"\nkey = [\"k\"]\nbatch_size = 10\nsleep_ms = 5\n",
            env.dst_url
        ),
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_pgdelta"))
        .args(["sync", "--config", cfg.to_str().unwrap(), "--json"])
        .current_dir(env.dir.path())
        .env("SRC", &env.src_url)
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let names: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["data"]["sync"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(names, vec!["first", "b"]);
    assert!(env.dir.path().join("state.redb").exists());
    assert_eq!(Env::rows(&env.dst, "SELECT n FROM b").await, vec!["(10)"]);

    std::fs::write(
        &cfg,
        "[[sync]]\ntarget = \"a\"\nkey = \"id\"\ntable = \"a\"\nbatchsize = 5\n",
    )
    .unwrap();
    let o = pgdelta(env.dir.path(), &["sync", "--config", cfg.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("line 5, column 1") && err.contains("unknown field `batchsize`"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2_and_secrets_never_show() {
    let env = Env::new().await;
    let dir = env.dir.path();
    let o = pgdelta(
        dir,
        &[
            "sync",
            "--source",
            "postgres://a@h/db",
            "--destination",
            "postgres://a@h/db",
            "--table",
            "t",
            "--target",
            "t",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("--key"));

    // A password in a URL never reaches the output, even when the connection fails.
    let bad = env
        .src_url
        .replace("postgres@", "postgres:Sup3rS3cret@")
        .replace(
            &env.src_url[env.src_url.rfind('/').unwrap()..],
            "/no_such_db",
        );
    let o = pgdelta(
        dir,
        &[
            "sync",
            "--source",
            &bad,
            "--destination",
            &bad,
            "--table",
            "t",
            "--target",
            "t",
            "--key",
            "id",
            "--json",
        ],
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot connect to the source database"),
        "{err}"
    );
    assert!(
        !out.contains("Sup3rS3cret") && !err.contains("Sup3rS3cret"),
        "{out}{err}"
    );
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["type"], "error");
    assert_eq!(last["data"]["kind"], "connect", "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_ends_its_json_with_the_error_kind_and_the_counts_so_far() {
    let env = seeded_t(100).await;
    env.dst
        .batch_execute("ALTER TABLE t ADD CONSTRAINT no_50_60 CHECK (v <> 50 AND v <> 60)")
        .await
        .unwrap();
    let o = sync_t(&env, &env.state(), &["--max-rejected", "1", "--json"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let data = &last["data"];
    assert_eq!(
        (last["type"].as_str(), data["kind"].as_str()),
        (Some("error"), Some("too_many_rejected")),
        "{last}"
    );
    let landed: i64 = env
        .dst
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(data["rows_read"], 100, "{last}");
    assert_eq!(data["written"], landed, "{last}");
    assert_eq!(data["rejected"], 2, "{last}");
    assert_eq!(data["deleted"], 0, "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_check_and_the_fix() {
    let env = Env::new().await;
    env.both("CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE u (id int, v text)")
        .await;
    let state = env.state();
    let base = [
        "check",
        "--source",
        &env.src_url,
        "--destination",
        &env.dst_url,
        "--state",
        state.to_str().unwrap(),
    ];
    let mut ok = base.to_vec();
    ok.extend(["--table", "t", "--target", "t", "--key", "id"]);
    let o = pgdelta(env.dir.path(), &ok);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("ok")).count(),
        5,
        "{err}"
    );
    assert!(
        err.contains("the next run reads full: no completed read"),
        "{err}"
    );
    // A check creates no state file: it says the first sync will.
    assert!(
        err.contains("does not exist yet; the first sync creates it"),
        "{err}"
    );
    assert!(!state.exists(), "check created the state file");
    // After a sync, check says the next run reads only the changes.
    env.src
        .batch_execute("INSERT INTO t VALUES (1, 'a')")
        .await
        .unwrap();
    // Counted in the statistics the sync records (else the check would count it as written
    // since: all of a one-row table, a full read).
    env.flush_stats().await;
    let mut sync = ok.clone();
    sync[0] = "sync";
    let o = pgdelta(env.dir.path(), &sync);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let o = pgdelta(env.dir.path(), &ok);
    let (_, err) = text(&o);
    assert!(
        err.contains("the next run reads delta: only rows written since"),
        "{err}"
    );
    // ... and how many sessions read it (a small table: one).
    assert!(
        err.contains("public.t is read by one session: the table is under 256 MiB"),
        "{err}"
    );

    let mut bad = base.to_vec();
    bad.extend(["--table", "u", "--target", "u", "--key", "id"]);
    let o = pgdelta(env.dir.path(), &bad);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("FAIL") && err.contains("ADD UNIQUE"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_on_given_databases_stays_in_its_schema_and_cleans_up() {
    let env = Env::new().await;
    // Something of the user's, which the bench must not touch.
    env.both("CREATE TABLE orders (id int PRIMARY KEY); INSERT INTO orders VALUES (1)")
        .await;
    let json = env.dir.path().join("bench.json");
    let report = env.dir.path().join("bench.html");
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--source",
            &env.src_url,
            "--destination",
            &env.dst_url,
            "--rows",
            "3000",
            "--reps",
            "1",
        ];
        args.extend_from_slice(extra);
        pgdelta(env.dir.path(), &args)
    };
    let o = bench(&[
        "--scenarios",
        "initial,nochange,churn",
        "--json",
        json.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("| nochange |"), "{out}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let scenarios = r["scenarios"].as_array().unwrap();
    assert_eq!(scenarios.len(), 3);
    assert!(scenarios.iter().all(|s| s["ratio"].as_f64().unwrap() > 0.0));
    assert_eq!(scenarios[0]["reps"][0]["written"], 3000);
    assert!(std::fs::read_to_string(&report).unwrap().contains("<svg"));
    // Its schema is gone, the user's table untouched.
    for c in [&env.src, &env.dst] {
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgdelta_bench'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
        assert_eq!(Env::count(c, "public.orders").await, 1);
    }

    // The regression gate: against itself it passes; against a much better baseline it fails.
    let o = bench(&[
        "--scenarios",
        "nochange",
        "--baseline",
        json.to_str().unwrap(),
        "--max-regression",
        "1000",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let mut better = r.clone();
    for s in better["scenarios"].as_array_mut().unwrap() {
        s["ratio"] = serde_json::json!(0.01);
        // The confirmation holds the best repetition to the baseline's best too.
        for rep in s["reps"].as_array_mut().unwrap() {
            rep["ratio"] = serde_json::json!(0.01);
        }
    }
    std::fs::write(&json, serde_json::to_string(&better).unwrap()).unwrap();
    let o = bench(&[
        "--scenarios",
        "nochange",
        "--baseline",
        json.to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("REGRESSION: nochange"), "{err}");

    // A uuid key (keys in no order): the churn is written and deleted; a baseline of the bigint
    // key is refused for it before anything is measured.
    let uuid = env.dir.path().join("uuid.json");
    let o = bench(&[
        "--key-type",
        "uuid",
        "--scenarios",
        "nochange,churn,delta-churn",
        "--json",
        uuid.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(out.contains("3000 rows (uuid key"), "{out}");
    let u: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&uuid).unwrap()).unwrap();
    assert_eq!(u["key_type"], "uuid");
    let rep = |i: usize, what: &str| u["scenarios"][i]["reps"][0][what].as_u64().unwrap();
    assert_eq!((rep(0, "written"), rep(0, "deleted")), (0, 0), "{u}");
    // The churn's picks are a hash of the row number and the round: at 3,000 rows the first
    // round deletes none of them, the second three.
    assert!(rep(1, "written") > 0, "{u}");
    assert!(rep(2, "written") > 0 && rep(2, "deleted") > 0, "{u}");
    let o = bench(&[
        "--key-type",
        "uuid",
        "--scenarios",
        "nochange",
        "--baseline",
        json.to_str().unwrap(),
    ]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("measured with --key-type bigint"), "{err}");
}

/// Regression: a failed sync whose stdout is a closed pipe (piped into `head`) exited 0, because
/// printing its JSON error line hit the broken pipe and the program exited quietly with success.
#[test]
fn a_failure_never_exits_0_when_stdout_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "sync",
        "--source",
        "postgres://nobody@127.0.0.1:1/x?sslmode=disable",
        "--destination",
        "postgres://nobody@127.0.0.1:1/y?sslmode=disable",
        "--table",
        "t",
        "--target",
        "t",
        "--key",
        "id",
        "--json",
    ];
    let mut child = pgdelta_command(dir.path(), &args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The reader goes away before pgdelta writes anything.
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "cannot connect: exit 1, reader or not"
    );
}

/// `--metrics-file`: Prometheus text after each run, from the state file's run log; a failed run
/// flips the last run's status and keeps the last success's time and counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_file_after_each_run() {
    let env = seeded_t(100).await;
    let state = env.state();
    let metrics = env.dir.path().join("textfile").join("pgdelta.prom");
    std::fs::create_dir_all(metrics.parent().unwrap()).unwrap();
    let run = || {
        sync_t(&env, &state, &["--metrics-file", metrics.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let value = |text: &str, series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
    };
    let o = run();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    let first = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(value(&first, "pgdelta_last_run_success{sync=\"t\"}"), 1.0);
    assert_eq!(
        value(
            &first,
            "pgdelta_last_success_rows{sync=\"t\",kind=\"written\"}"
        ),
        100.0
    );
    assert_eq!(
        value(
            &first,
            "pgdelta_last_success_read_strategy{sync=\"t\",strategy=\"full\"}"
        ),
        1.0
    );
    let ok_at = value(&first, "pgdelta_last_success_timestamp_seconds{sync=\"t\"}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - ok_at).abs() < 60.0, "{ok_at} vs {now}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&metrics).unwrap().permissions().mode();
    assert_eq!(mode & 0o044, 0o044, "readable by node_exporter: {mode:o}");

    // A failing run (the target is away).
    env.dst
        .batch_execute("ALTER TABLE t RENAME TO away")
        .await
        .unwrap();
    let o = run();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o).1);
    let second = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(value(&second, "pgdelta_last_run_success{sync=\"t\"}"), 0.0);
    assert!(value(&second, "pgdelta_last_run_timestamp_seconds{sync=\"t\"}") > ok_at);
    assert_eq!(
        value(
            &second,
            "pgdelta_last_success_timestamp_seconds{sync=\"t\"}"
        ),
        ok_at
    );
    assert_eq!(
        value(
            &second,
            "pgdelta_last_success_rows{sync=\"t\",kind=\"written\"}"
        ),
        100.0
    );
    // Nothing else left in the directory (the temporary file was renamed).
    assert_eq!(
        std::fs::read_dir(metrics.parent().unwrap())
            .unwrap()
            .count(),
        1
    );
}

/// Schedule mode: `--every` keeps the process running and syncing; a failing run does not
/// stop the schedule; SIGTERM stops it cleanly (exit 0); a run longer than the interval skips
/// the occurrences it overran, with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_keeps_syncing_through_failures_until_sigterm() {
    let env = seeded_t(200).await;
    let state = env.state();
    let spawn = |state: &std::path::Path, extra: &[&str]| {
        let mut extra = extra.to_vec();
        extra.push("--json");
        sync_t(&env, state, &extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let dst_count = |sql: &'static str| {
        let dst = &env.dst;
        async move {
            dst.query_one(sql, &[])
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(-1)
        }
    };
    let wait_for = |sql: &'static str, want: i64| async move {
        for _ in 0..200 {
            if dst_count(sql).await == want {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("{sql} never reached {want}");
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let child = spawn(&state, &["--every", "1s", "--metrics-addr", &addr]);
    wait_for("SELECT count(*) FROM t", 200).await;
    // The metrics, served while it runs.
    // A client that connects and sends nothing holds up no one.
    let _idle = std::net::TcpStream::connect(&addr).unwrap();
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        write!(c, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    };
    let mut scraped = String::new();
    for _ in 0..100 {
        scraped = get("/metrics");
        if scraped.contains("pgdelta_last_run_success{sync=\"t\"} 1") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(scraped.starts_with("HTTP/1.1 200 OK"), "{scraped}");
    // (The first run wrote 200 rows; a later one, already done by now, may have written none.)
    assert!(
        scraped.contains("pgdelta_last_success_rows{sync=\"t\",kind=\"written\"} ")
            && scraped.contains("pgdelta_last_success_timestamp_seconds{sync=\"t\"} "),
        "{scraped}"
    );
    assert!(get("/").starts_with("HTTP/1.1 404"));
    env.src
        .batch_execute("UPDATE t SET v = -1 WHERE id <= 10")
        .await
        .unwrap();
    wait_for("SELECT count(*) FROM t WHERE v = -1", 10).await;
    // Runs fail while the target is away; the schedule goes on.
    env.dst
        .batch_execute("ALTER TABLE t RENAME TO away")
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    env.dst
        .batch_execute("ALTER TABLE away RENAME TO t")
        .await
        .unwrap();
    env.src
        .batch_execute("UPDATE t SET v = -2 WHERE id <= 20")
        .await
        .unwrap();
    wait_for("SELECT count(*) FROM t WHERE v = -2", 20).await;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("runs every 1s"), "{stderr}");
    assert!(stderr.contains("stopped"), "{stderr}");
    let kinds: Vec<String> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["type"].as_str().map(String::from))
        .collect();
    let summaries = kinds.iter().filter(|k| *k == "summary").count();
    let errors = kinds.iter().filter(|k| *k == "error").count();
    assert!(summaries >= 3 && errors >= 1, "{kinds:?}");

    // A run longer than the interval: 400 rows in batches of 20, 200 ms apart, every 1 s.
    env.src
        .batch_execute("INSERT INTO t SELECT i, i FROM generate_series(201, 600) i")
        .await
        .unwrap();
    let slow = spawn(
        &state,
        &["--every", "1s", "--batch-size", "20", "--sleep-ms", "200"],
    );
    wait_for("SELECT count(*) FROM t", 600).await;
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // SAFETY: as above.
    unsafe { libc::kill(slow.id() as i32, libc::SIGTERM) };
    let out = slow.wait_with_output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("skipped them"), "{stderr}");
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
}

#[test]
fn schedule_flags_are_checked_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.redb");
    for (extra, want) in [
        (["--every", "soon"], "not a duration"),
        (["--schedule", "0 25 * * *"], "hour: 25 is outside 0-23"),
        (
            ["--metrics-addr", "127.0.0.1:9187"],
            "use it with --every or --schedule",
        ),
    ] {
        let o = sync_t_between(
            dir.path(),
            "postgres://u@127.0.0.1:1/s",
            "postgres://u@127.0.0.1:1/d",
            &state,
            &extra,
        )
        .output()
        .unwrap();
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "{err}");
    }
}

/// A runtime size that is not a number of threads stops pgdelta before it connects; a valid
/// one runs (here to the connection's refusal, exit 1).
#[test]
fn worker_threads_from_the_environment_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.redb");
    for (value, code) in [("many", 2), ("0", 2), ("3", 1)] {
        let o = sync_t_between(
            dir.path(),
            "postgres://u@127.0.0.1:1/s",
            "postgres://u@127.0.0.1:1/d",
            &state,
            &[],
        )
        .env("PGDELTA_WORKER_THREADS", value)
        .output()
        .unwrap();
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(code), "{value}: {err}");
        assert_eq!(
            err.contains(&format!("PGDELTA_WORKER_THREADS={value} is not a number")),
            code == 2,
            "{value}: {err}"
        );
    }
}

/// `--jobs`: syncs of a config run at once in dependency order. The child table (with a foreign
/// key to the parent) is listed first; it still starts only after the parent's writes, and the
/// parent's deletes wait for the child's, so no row is ever rejected. A cycle is a config error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_syncs_in_foreign_key_order() {
    let env = Env::new().await;
    env.src
        .batch_execute(
            "CREATE TABLE customers (id int PRIMARY KEY, name text);
             CREATE TABLE orders (id int PRIMARY KEY, customer int, amount int);
             INSERT INTO customers SELECT i, 'c' || i FROM generate_series(1, 100) i;
             INSERT INTO orders SELECT i, 1 + i % 100, i FROM generate_series(1, 3000) i;",
        )
        .await
        .unwrap();
    env.dst
        .batch_execute(
            "CREATE TABLE customers (id int PRIMARY KEY, name text);
             CREATE TABLE orders (id int PRIMARY KEY, customer int REFERENCES customers (id), amount int);",
        )
        .await
        .unwrap();
    let cfg = env.dir.path().join("pgdelta.toml");
    let write_cfg = |customers_after: &str| {
        std::fs::write(
            &cfg,
            format!(
                "state = \"state.redb\"\njobs = 2\n[source]\nurl_env = \"SRC\"\n[destination]\nurl = \"{}\"\n\n\
                 [[sync]]\ntable = \"orders\"\ntarget = \"orders\"\nkey = \"id\"\ndelete = true\nbatch_size = 500\n\n\
                 [[sync]]\ntable = \"customers\"\ntarget = \"customers\"\nkey = \"id\"\ndelete = true\n{customers_after}",
                env.dst_url
            ),
        )
        .unwrap()
    };
    let run = |extra: &[&str]| {
        let mut args = vec!["sync", "--config", cfg.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_pgdelta"))
            .args(&args)
            .current_dir(env.dir.path())
            .env("SRC", &env.src_url)
            .output()
            .unwrap()
    };
    let same = || async {
        for t in ["customers", "orders"] {
            let sql = format!("SELECT * FROM {t} ORDER BY id");
            env.assert_same(&sql, &sql).await;
        }
    };
    let rejected = |o: &Output| -> i64 {
        text(o)
            .0
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["data"]["rejected"].as_i64().unwrap_or(0))
            .sum()
    };
    write_cfg("");
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    assert_eq!(rejected(&o), 0);
    same().await;

    // A customer leaves with their orders; a new one arrives with new orders.
    env.src
        .batch_execute(
            "DELETE FROM orders WHERE customer = 5; DELETE FROM customers WHERE id = 5;
             INSERT INTO customers VALUES (101, 'new');
             INSERT INTO orders SELECT i, 101, i FROM generate_series(3001, 3100) i;",
        )
        .await
        .unwrap();
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    assert_eq!(rejected(&o), 0, "{}", text(&o).0);
    same().await;

    // One at a time: the parent gives up its slot while it waits for the child.
    env.src
        .batch_execute(
            "DELETE FROM orders WHERE customer = 6; DELETE FROM customers WHERE id = 6;
             INSERT INTO customers VALUES (102, 'newer'); INSERT INTO orders VALUES (4000, 102, 1);",
        )
        .await
        .unwrap();
    let o = run(&["--jobs", "1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    assert_eq!(rejected(&o), 0, "{}", text(&o).0);
    same().await;

    // Schedule mode: syncs due together run as one batch, in the same order.
    env.src
        .batch_execute(
            "INSERT INTO customers VALUES (103, 'scheduled'); INSERT INTO orders VALUES (5000, 103, 1);",
        )
        .await
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pgdelta"));
    let scheduled = cmd
        .args([
            "sync",
            "--config",
            cfg.to_str().unwrap(),
            "--json",
            "--every",
            "1h",
        ])
        .current_dir(env.dir.path())
        .env("SRC", &env.src_url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut landed = false;
    for _ in 0..200 {
        let n: i64 = env
            .dst
            .query_one("SELECT count(*) FROM orders WHERE id = 5000", &[])
            .await
            .unwrap()
            .get(0);
        if n == 1 {
            landed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Both runs are reported before the process waits for the next hour.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    unsafe { libc::kill(scheduled.id() as i32, libc::SIGTERM) };
    let o = scheduled.wait_with_output().unwrap();
    assert!(landed, "{}", text(&o).1);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o).1);
    assert_eq!(rejected(&o), 0, "{}", text(&o).0);
    same().await;

    // customers after orders, while orders waits for customers' writes: a cycle.
    write_cfg("after = [\"orders\"]\n");
    let o = run(&[]);
    let err = text(&o).1;
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("cycle: orders -> customers -> orders")
            || err.contains("cycle: customers -> orders -> customers"),
        "{err}"
    );
}

/// Commands that write nothing leave no state file where there was none: a dry run (which still
/// plans the rebuild a real run would do), `verify` without `--repair`, and `log`, which says
/// that nothing is recorded there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_commands_create_no_state_file() {
    let env = seeded_t(50).await;
    env.dst
        .batch_execute("INSERT INTO t SELECT i, i FROM generate_series(1, 40) i")
        .await
        .unwrap();
    let state = env.dir.path().join("never/state.redb");
    let args = |cmd: &'static str| -> Vec<String> {
        [
            cmd,
            "--source",
            &env.src_url,
            "--destination",
            &env.dst_url,
            "--table",
            "t",
            "--target",
            "t",
            "--key",
            "id",
            "--state",
            state.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let run = |a: &[String], extra: &[&str]| {
        let mut all: Vec<&str> = a.iter().map(String::as_str).collect();
        all.extend_from_slice(extra);
        pgdelta(env.dir.path(), &all)
    };
    let o = run(&args("sync"), &["--dry-run", "--json"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let data = &last["data"];
    // The real run would rebuild the 40 target rows, then add the other 10.
    assert_eq!(
        (
            &data["rebuilt_from_target"],
            &data["added"],
            &data["written"]
        ),
        (&40.into(), &10.into(), &0.into()),
        "{last}"
    );
    assert!(
        !state.exists() && !state.parent().unwrap().exists(),
        "a dry run created {state:?}"
    );

    let o = run(&args("verify"), &[]);
    let (_, err) = text(&o);
    assert_eq!(
        o.status.code(),
        Some(4),
        "verify finds the 10 missing rows: {err}"
    );
    assert!(
        !state.parent().unwrap().exists(),
        "verify created {state:?}"
    );

    let o = pgdelta(env.dir.path(), &["log", "--state", state.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("no state file at") && err.contains("--state"),
        "{err}"
    );
    assert!(!state.parent().unwrap().exists(), "log created {state:?}");

    // The first real run creates it, and writes only what the dry run planned.
    let o = run(&args("sync"), &["--json"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["data"]["written"], 10, "{last}");
    assert!(state.exists());
    let n: i64 = env
        .dst
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 50);
}

/// `pgdelta compact` shrinks the state file a load of random keys left, keeps every entry (the
/// next sync writes only what changed), refuses a file a run holds, and names the fix for a
/// path with no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_shrinks_the_state_file_and_keeps_its_entries() {
    let env = Env::new().await;
    let spec = env.uuid_table(60_000).await;
    assert_eq!(env.sync(&spec).await.unwrap().written, 60_000);
    let state = env.state();
    // Runs `compact` on a file it must refuse; its stderr.
    let refused = |path: &std::path::Path| {
        let o = pgdelta(
            env.dir.path(),
            &["compact", "--state", path.to_str().unwrap()],
        );
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{err}");
        err
    };

    let held = pgdelta::snapshot::Snapshot::open(&state, 1 << 20).unwrap();
    let err = refused(&state);
    assert!(err.contains("in use by another pgdelta run"), "{err}");
    drop(held);
    let before = std::fs::metadata(&state).unwrap().len();

    let o = pgdelta(
        env.dir.path(),
        &["compact", "--state", state.to_str().unwrap(), "--json"],
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let line: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let after = std::fs::metadata(&state).unwrap().len();
    assert_eq!(line["data"]["bytes_before"], before, "{line}");
    assert_eq!(line["data"]["bytes_after"], after, "{line}");
    assert!(after < before, "{before} -> {after} bytes");

    env.src
        .batch_execute("UPDATE u SET n = -n WHERE n % 100 = 0; DELETE FROM u WHERE n % 777 = 0")
        .await
        .unwrap();
    let s = env.sync(&spec).await.unwrap();
    // 600 updated and 77 deleted, none of them both (n % 77700 = 0 is past 60,000).
    assert_eq!(
        (s.changed, s.added, s.removed, s.written, s.deleted),
        (600, 0, 77, 600, 77),
        "{}",
        s.read_strategy_reason
    );
    env.assert_same("SELECT * FROM u ORDER BY id", "SELECT * FROM u ORDER BY id")
        .await;

    let missing = env.dir.path().join("none.redb");
    let err = refused(&missing);
    assert!(err.contains("no state file there"), "{err}");
    assert!(!missing.exists());
}
