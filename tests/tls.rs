use std::path::Path;
use std::process::Command;

use pgdelta::conn::ConnInfo;
use pgdelta::tools::pgserver::{Durability, TempPostgres};

use crate::support::Env;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed for the TLS tests (Debian: apt-get install -y openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for DNS:localhost only signed by it, and an unrelated CA.
fn make_certs(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=pgdelta test CA",
    ]);
    openssl(dir, &ca);
    let mut other = vec!["req", "-x509"];
    other.extend(ec);
    other.extend([
        "-keyout",
        "other.key",
        "-out",
        "other-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=someone else",
    ]);
    openssl(dir, &other);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
}

async fn ssl_in_use(url: &str) -> Result<bool, pgdelta::Error> {
    ssl_in_use_on(ConnInfo::parse(url)?).await
}

async fn ssl_in_use_on(conn: ConnInfo) -> Result<bool, pgdelta::Error> {
    let c = conn.connect("test", &[]).await?;
    Ok(c.query_one(
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .unwrap()
    .get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_encrypt_and_verify_as_libpq_does() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let pg = tokio::task::spawn_blocking(|| TempPostgres::start(Durability::Fast))
        .await
        .unwrap()
        .unwrap();
    pg.enable_tls(
        &dir.path().join("server.crt"),
        &dir.path().join("server.key"),
    )
    .unwrap();
    let port = pg.port();
    let ca = dir.path().join("ca.pem");
    let other = dir.path().join("other-ca.pem");
    let url = |host: &str, db: &str, q: &str| format!("postgres://postgres@{host}:{port}/{db}?{q}");

    assert!(
        !ssl_in_use(&url("127.0.0.1", "postgres", "sslmode=disable"))
            .await
            .unwrap()
    );
    assert!(
        ssl_in_use(&url("127.0.0.1", "postgres", "")).await.unwrap(),
        "prefer encrypts when offered"
    );
    assert!(ssl_in_use(&url("127.0.0.1", "postgres", "sslmode=require"))
        .await
        .unwrap());
    let verify_full = format!("sslmode=verify-full&sslrootcert={}", ca.display());
    assert!(ssl_in_use(&url("localhost", "postgres", &verify_full))
        .await
        .unwrap());
    // The certificate names localhost only: verify-full refuses the IP, verify-ca accepts it.
    let e = ssl_in_use(&url("127.0.0.1", "postgres", &verify_full))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("cannot connect") && e.to_lowercase().contains("certificate"),
        "{e}"
    );
    let verify_ca = format!("sslmode=verify-ca&sslrootcert={}", ca.display());
    assert!(ssl_in_use(&url("127.0.0.1", "postgres", &verify_ca))
        .await
        .unwrap());
    // A certificate from another CA is refused.
    let wrong = format!("sslmode=verify-ca&sslrootcert={}", other.display());
    let e = ssl_in_use(&url("localhost", "postgres", &wrong))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // A whole sync over verified TLS.
    let admin = ConnInfo::parse(&url("localhost", "postgres", &verify_full))
        .unwrap()
        .connect("test", &[])
        .await
        .unwrap();
    admin.batch_execute("CREATE DATABASE s").await.unwrap();
    admin.batch_execute("CREATE DATABASE d").await.unwrap();
    let (src_url, dst_url) = (
        url("localhost", "s", &verify_full),
        url("localhost", "d", &verify_full),
    );
    let src = ConnInfo::parse(&src_url)
        .unwrap()
        .connect("test", &[])
        .await
        .unwrap();
    let dst = ConnInfo::parse(&dst_url)
        .unwrap()
        .connect("test", &[])
        .await
        .unwrap();
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 5000) i")
        .await
        .unwrap();
    dst.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let mut spec =
        pgdelta::spec::SyncSpec::new("t", pgdelta::spec::Model::Table("t".into()), "t", &["id"]);
    spec.delete = true;
    spec.max_rejected = 0;
    let snap = pgdelta::snapshot::Snapshot::open(&dir.path().join("s.redb"), 1 << 20).unwrap();
    let s = pgdelta::sync::run(
        &ConnInfo::parse(&src_url).unwrap(),
        &ConnInfo::parse(&dst_url).unwrap(),
        &spec,
        &Default::default(),
        &snap,
    )
    .await
    .unwrap();
    assert_eq!(s.written, 5000);
    let a = Env::rows(&src, "SELECT * FROM t ORDER BY id").await;
    let b = Env::rows(&dst, "SELECT * FROM t ORDER BY id").await;
    crate::support::assert_rows_equal(&a, &b);

    // Through an SSH bastion, TLS runs inside the channel and checks the database's own name.
    let sshd = crate::support::sshd::TempSshd::start();
    let through = |u: String| {
        ConnInfo::parse(&u)
            .unwrap()
            .via_ssh(&sshd.settings())
            .unwrap()
    };
    assert!(ssl_in_use_on(through(url("localhost", "d", &verify_full)))
        .await
        .unwrap());
    let e = ssl_in_use_on(through(url("127.0.0.1", "d", &verify_full)))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    assert!(sshd.forwards_to(&format!("target localhost port {port}")) >= 1);
}
