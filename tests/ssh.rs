use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use crate::support::sshd::{keygen, TempSshd};
use crate::support::{socket_dir, summary, sync_t, Env};

/// `t (id, v text)` on both sides, `rows` rows in the source.
async fn t_with_rows(env: &Env, rows: i32) {
    env.both("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await;
    env.src
        .batch_execute(&format!(
            "INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, {rows}) i"
        ))
        .await
        .unwrap();
}

/// The port of a test database URL (`postgres://user@host:PORT/db`).
fn port_of(url: &str) -> u16 {
    let host_port = url.rsplit('@').next().unwrap().split('/').next().unwrap();
    host_port.rsplit(':').next().unwrap().parse().unwrap()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Both databases through `sshd`, with this key and known_hosts file.
fn tunnel_flags(sshd: &TempSshd, key: &Path, known_hosts: &Path) -> Vec<String> {
    let to = sshd.destination();
    let (key, known_hosts) = (key.display(), known_hosts.display());
    format!(
        "--source-ssh {to} --destination-ssh {to} --ssh-key {key} --ssh-known-hosts {known_hosts}"
    )
    .split(' ')
    .map(String::from)
    .collect()
}

async fn assert_t_same(env: &Env) {
    env.assert_same("SELECT * FROM t ORDER BY id", "SELECT * FROM t ORDER BY id")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syncs_through_ssh_bastions_from_flags_and_config() {
    let mut sshd = TempSshd::start();
    let env = Env::new().await;
    t_with_rows(&env, 20_000).await;
    let (key, known_hosts) = (sshd.key(), sshd.known_hosts());
    let mut args = tunnel_flags(&sshd, &key, &known_hosts);
    args.extend(["--read-sessions", "2", "--delete", "--json"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = summary(sync_t(&env, &env.state(), &args).output().unwrap());
    assert_eq!(
        (s["rows_read"].as_i64(), s["written"].as_i64()),
        (Some(20_000), Some(20_000))
    );
    assert_t_same(&env).await;
    // Every session went through the bastion: the plan, two readers, the writers.
    let pg = format!("target 127.0.0.1 port {}", port_of(&env.src_url));
    assert!(sshd.forwards_to(&pg) >= 4, "{}", sshd.log());

    // The same bastion from the config file, a relative key path beside it.
    std::fs::copy(&key, env.dir.path().join("id_test")).unwrap();
    let ssh_table = format!(
        "host = \"127.0.0.1\"\nport = {}\nuser = \"{}\"\nkey = \"id_test\"\nknown_hosts = \"{}\"\n",
        sshd.port,
        sshd.user,
        known_hosts.display()
    );
    std::fs::write(
        env.dir.path().join("sync.toml"),
        format!(
            "state = \"state.redb\"\n[source]\nurl = \"{}\"\n[source.ssh]\n{ssh_table}[destination]\nurl = \"{}\"\n[destination.ssh]\n{ssh_table}\n\
             [[sync]]\nname = \"t\"\ntable = \"t\"\ntarget = \"t\"\nkey = [\"id\"]\ndelete = true\n",
            env.src_url, env.dst_url
        ),
    )
    .unwrap();
    env.src
        .batch_execute(
            "UPDATE t SET v = 'x' WHERE id <= 100; DELETE FROM t WHERE id > 19990; \
             INSERT INTO t SELECT i, 'new' FROM generate_series(30001, 30005) i",
        )
        .await
        .unwrap();
    let before = sshd.forwards_to(&pg);
    let run = || {
        crate::support::pgdelta_command(env.dir.path(), &["sync", "-c", "sync.toml", "--json"])
            .output()
            .unwrap()
    };
    let s = summary(run());
    assert_eq!(
        (
            s["changed"].as_i64(),
            s["removed"].as_i64(),
            s["added"].as_i64()
        ),
        (Some(100), Some(10), Some(5)),
        "{s}"
    );
    assert_t_same(&env).await;
    assert!(sshd.forwards_to(&pg) > before);

    // Without the bastion there is no way to the databases: a connect error that names it.
    sshd.stop();
    let o = run();
    assert_eq!(o.status.code(), Some(1), "{}", err(&o));
    let e = err(&o);
    assert!(
        e.contains(&format!("via ssh {}", sshd.destination())) && e.contains("cannot connect"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_keys_and_client_keys_are_checked() {
    let sshd = TempSshd::start();
    let env = Env::new().await;
    t_with_rows(&env, 100).await;
    let dir = env.dir.path();
    let sync = |key: &Path, known_hosts: &Path, passphrase: Option<&str>| {
        let args = tunnel_flags(&sshd, key, known_hosts);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = sync_t(&env, &env.state(), &args);
        if let Some(p) = passphrase {
            cmd.env("PGDELTA_SSH_KEY_PASSPHRASE", p);
        }
        cmd.output().unwrap()
    };
    let refused = |o: &Output, says: &[&str]| {
        let e = err(o);
        assert_eq!(o.status.code(), Some(2), "{e}");
        for s in says {
            assert!(e.contains(s), "missing {s:?} in: {e}");
        }
    };

    // An unknown host: the fingerprint, and how to add it.
    let empty = dir.join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let o = sync(&sshd.key(), &empty, None);
    refused(
        &o,
        &[
            "is not in",
            "SHA256:",
            &format!("ssh-keyscan -p {} 127.0.0.1", sshd.port),
        ],
    );
    // Another key on record for the host: refused loudly.
    keygen(&dir.join("impostor"));
    let impostor = std::fs::read_to_string(dir.join("impostor.pub")).unwrap();
    let wrong = dir.join("wrong_known_hosts");
    std::fs::write(&wrong, format!("[127.0.0.1]:{} {impostor}", sshd.port)).unwrap();
    refused(
        &sync(&sshd.key(), &wrong, None),
        &["HOST KEY HAS CHANGED", "line 1"],
    );
    // A client key the server does not accept.
    let known = sshd.known_hosts();
    refused(
        &sync(&dir.join("impostor"), &known, None),
        &["refused", "authorized_keys"],
    );
    // An encrypted key: refused without its passphrase, used with it.
    let locked = dir.join("locked");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "open sesame", "-f"])
        .arg(&locked)
        .output()
        .unwrap();
    assert!(out.status.success());
    sshd.authorize(&dir.join("locked.pub"));
    refused(
        &sync(&locked, &known, None),
        &["encrypted", "PGDELTA_SSH_KEY_PASSPHRASE"],
    );
    assert_eq!(Env::count(&env.dst, "t").await, 0, "nothing written before");
    let o = sync(&locked, &known, Some("open sesame"));
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_t_same(&env).await;
}

/// Kills the agent on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keys_and_the_servers_unix_socket() {
    let sshd = TempSshd::start();
    let env = Env::new().await;
    t_with_rows(&env, 1_000).await;
    let dir = env.dir.path();
    let sock = dir.join("agent.sock");
    let agent = Agent(
        Command::new("ssh-agent")
            .args(["-D", "-a"])
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("ssh-agent (Debian: openssh-client)"),
    );
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "ssh-agent did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let added = Command::new("ssh-add")
        .arg(sshd.key())
        .env("SSH_AUTH_SOCK", &sock)
        .output()
        .unwrap();
    assert!(added.status.success(), "{}", err(&added));

    // The source by its Unix socket on the bastion's side (direct-streamlocal), when the test
    // server is the local one; the destination over TCP.
    let src_db = env.src_url.rsplit('/').next().unwrap().to_string();
    let source = match socket_dir() {
        Some(d) => format!(
            "host={} port={} user=postgres dbname={src_db}",
            d.display(),
            port_of(&env.src_url)
        ),
        None => env.src_url.clone(),
    };
    let to = sshd.destination();
    let known = sshd.known_hosts();
    let o = crate::support::sync_t_between(
        dir,
        &source,
        &env.dst_url,
        &env.state(),
        &[
            "--source-ssh",
            &to,
            "--destination-ssh",
            &to,
            "--ssh-known-hosts",
            known.to_str().unwrap(),
        ],
    )
    // No key file: the agent's key. HOME has no ~/.ssh keys to fall back on.
    .env("SSH_AUTH_SOCK", &sock)
    .env("HOME", dir)
    .output()
    .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", err(&o));
    assert_t_same(&env).await;
    if socket_dir().is_some() {
        assert!(sshd.forwards_to(".s.PGSQL.") >= 1, "{}", sshd.log());
    }
    drop(agent);
}
