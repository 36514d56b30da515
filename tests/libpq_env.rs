//! Connection settings as libpq finds them: the password file, the connection service file and
//! the PG* environment, against a server that demands a password (SCRAM).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use pgdelta::tools::pgserver::{Durability, TempPostgres};

use pgdelta::sync::RunOptions;

use crate::support::{connect, sync_t_between, Env};

/// Runs `pgdelta sync` of `t` between the two connection strings with `env`; returns the exit
/// code, stdout's last line and stderr.
fn sync(
    dir: &std::path::Path,
    src: &str,
    dst: &str,
    env: &[(&str, String)],
) -> (Option<i32>, String, String) {
    let state = dir.join("state.redb");
    let mut cmd = sync_t_between(dir, src, dst, &state, &["--json"]);
    cmd.env("HOME", dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    (
        out.status.code(),
        stdout.lines().last().unwrap_or("").to_string(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn private_file(path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_files_services_and_the_environment_as_libpq() {
    let mut pg = TempPostgres::start(Durability::Fast).unwrap();
    let port = pg.port();
    let admin = connect(&pg.url("postgres")).await;
    for sql in [
        "CREATE ROLE etl LOGIN PASSWORD 'p:ss w\\rd'",
        "CREATE DATABASE src OWNER etl",
        "CREATE DATABASE dst OWNER etl",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    for db in ["src", "dst"] {
        let c = connect(&pg.url(db)).await;
        c.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); ALTER TABLE t OWNER TO etl;")
            .await
            .unwrap();
    }
    let src = connect(&pg.url("src")).await;
    src.batch_execute("INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 100) i")
        .await
        .unwrap();
    pg.require_passwords().unwrap();
    let url = |db: &str| format!("postgres://etl@127.0.0.1:{port}/{db}");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // Without a password the server refuses, and pgdelta says so (wait for the reload to bite).
    let mut refused = String::new();
    for _ in 0..100 {
        let (code, _, err) = sync(d, &url("src"), &url("dst"), &[]);
        if code != Some(0) {
            refused = err;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        refused.contains("cannot connect") && refused.contains("password"),
        "{refused}"
    );
    assert!(!refused.contains("p:ss"), "{refused}");

    // ~/.pgpass (HOME is the test directory), escapes as libpq reads them.
    let pgpass = d.join(".pgpass");
    private_file(&pgpass, &format!("127.0.0.1:{port}:*:etl:p\\:ss w\\\\rd\n"));
    let (code, last, err) = sync(d, &url("src"), &url("dst"), &[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(last.contains("\"written\":100"), "{last}");

    // A password file others can read is ignored, as libpq does.
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = sync(d, &url("src"), &url("dst"), &[]);
    assert_ne!(code, Some(0));
    assert!(err.contains("group or world access"), "{err}");
    std::fs::remove_file(&pgpass).unwrap();

    // Services from PGSERVICEFILE, the password from PGPASSFILE.
    let services = d.join("services.conf");
    std::fs::write(
        &services,
        format!(
            "[src]\nhost=127.0.0.1\nport={port}\nuser=etl\ndbname=src\n\n[dst]\nhost=127.0.0.1\nport={port}\nuser=etl\ndbname=dst\n"
        ),
    )
    .unwrap();
    let passfile = d.join("passwords");
    private_file(&passfile, "*:*:*:etl:p\\:ss w\\\\rd\n");
    src.batch_execute("UPDATE t SET v = 'changed' WHERE id <= 10")
        .await
        .unwrap();
    let env = [
        ("PGSERVICEFILE", services.display().to_string()),
        ("PGPASSFILE", passfile.display().to_string()),
    ];
    let (code, last, err) = sync(d, "service=src", "service=dst", &env);
    assert_eq!(code, Some(0), "{err}");
    assert!(last.contains("\"written\":10"), "{last}");

    // The environment alone: PGHOST, PGPORT, PGUSER, PGDATABASE, PGPASSWORD.
    src.batch_execute("UPDATE t SET v = 'again' WHERE id <= 5")
        .await
        .unwrap();
    let env = [
        ("PGHOST", "127.0.0.1".to_string()),
        ("PGPORT", port.to_string()),
        ("PGUSER", "etl".to_string()),
        ("PGDATABASE", "src".to_string()),
        ("PGPASSWORD", "p:ss w\\rd".to_string()),
    ];
    let (code, last, err) = sync(d, "", "dbname=dst", &env);
    assert_eq!(code, Some(0), "{err}");
    assert!(last.contains("\"written\":5"), "{last}");
    let dst = connect(&pg.url("dst")).await;
    let changed: i64 = dst
        .query_one(
            "SELECT count(*) FROM t WHERE v IN ('changed', 'again')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(changed, 10);
    pg.stop();
}

/// `url`'s server as a key-value connection string whose first host is a dead one (a Unix
/// socket directory that does not exist), then the server itself, with `extra` settings.
fn behind_a_dead_host(url: &str, extra: &str) -> String {
    use tokio_postgres::config::Host;
    let c: tokio_postgres::Config = url.parse().unwrap();
    let host = match &c.get_hosts()[0] {
        Host::Tcp(h) => h.clone(),
        Host::Unix(p) => p.display().to_string(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let mut s = format!(
        "host=/nonexistent-pgdelta-host,{host} port={port},{port} dbname={} user={} {extra}",
        c.get_dbname().unwrap(),
        c.get_user().unwrap(),
    );
    if let Some(p) = c.get_password() {
        s.push_str(&format!(
            " password='{}'",
            String::from_utf8_lossy(p)
                .replace('\\', "\\\\")
                .replace('\'', "\\'")
        ));
    }
    s
}

/// A connection string of several hosts: the hosts are tried in turn (the first is dead), the
/// sessions' sockets are pgdelta's own (so its reads are tapped and its cancels reach the host
/// each session reached), and `target_session_attrs` is checked on each host, as libpq does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_hosts_are_tried_in_turn_and_their_session_attrs_checked() {
    let env = Env::new().await;
    env.both("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await;
    env.src
        .batch_execute("INSERT INTO t SELECT i, 'v' || i FROM generate_series(1, 5000) i")
        .await
        .unwrap();
    let spec = env.spec("t", &["id"]);
    let run = |extra: &'static str| {
        let src = behind_a_dead_host(&env.src_url, extra);
        let (env, spec) = (&env, &spec);
        async move { env.sync_from(&src, spec, &RunOptions::default()).await }
    };
    let s = run("").await.unwrap();
    assert_eq!((s.written, s.rows_read), (5000, 5000), "{s:?}");
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
    // The source is a primary: a read-only session is found on no host, and the error says
    // why; a read-write one is.
    let e = run("target_session_attrs=read-only").await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("the server accepts writes (target_session_attrs=read-only)"),
        "{msg}"
    );
    env.src
        .batch_execute("UPDATE t SET v = 'changed' WHERE id <= 10")
        .await
        .unwrap();
    let s = run("target_session_attrs=read-write").await.unwrap();
    assert_eq!((s.written, s.changed), (10, 10), "{s:?}");
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
}
