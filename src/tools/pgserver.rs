//! A throwaway PostgreSQL cluster for `demo`, `bench` and the tests.
//!
//! `initdb` + `pg_ctl` in a fresh temp directory, listening on 127.0.0.1 at a free port (and on a
//! unix socket inside that directory). `initdb` refuses to run as root, so when pgdelta runs as
//! root the cluster belongs to the unprivileged `postgres` system user. The cluster is stopped
//! and its directory removed on drop; a small watchdog process does the same if the owning
//! process dies without dropping it (a panic in a static, SIGKILL), so no server outlives us.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::Error;

/// How the throwaway server trades durability for speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// `fsync=off`, `synchronous_commit=off`: tests and the demo.
    Fast,
    /// Server defaults: benchmarks, where commit cost is part of what is measured.
    Default,
}

pub struct TempPostgres {
    root: PathBuf,
    data: PathBuf,
    bindir: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    watchdog: Option<std::process::Child>,
    stopped: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TempPostgres {
    /// Initialises and starts a cluster. Fails with the package to install when the server
    /// binaries are missing.
    pub fn start(durability: Durability) -> Result<TempPostgres, Error> {
        let mut pg = TempPostgres::new_root()?;
        pg.run(
            "initdb",
            &[
                "-D",
                path_str(&pg.data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ],
        )?;
        let mut settings = vec![
            "listen_addresses='127.0.0.1'".to_string(),
            format!("unix_socket_directories='{}'", path_str(&pg.root)),
            "max_connections=200".into(),
            "shared_buffers=256MB".into(),
            "max_wal_size=4GB".into(),
            "log_min_messages=warning".into(),
        ];
        if durability == Durability::Fast {
            settings.extend([
                "fsync=off".into(),
                "synchronous_commit=off".into(),
                "full_page_writes=off".into(),
            ]);
        }
        pg.configure(&settings)?;
        pg.launch()?;
        Ok(pg)
    }

    /// Starts the server on a free port. A free port can be taken between our probe and the
    /// server's bind: tries a few.
    fn launch(&mut self) -> Result<(), Error> {
        let mut last = String::new();
        for _ in 0..5 {
            self.port = free_port()?;
            let log = self.root.join("server.log");
            let port_opt = format!("-p {}", self.port);
            match self.run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&self.data),
                    "-l",
                    path_str(&log),
                    "-o",
                    &port_opt,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            ) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    last = format!("{e}; server log: {}", tail(&log));
                }
            }
        }
        Err(Error::Server(format!(
            "the throwaway PostgreSQL did not start: {last}"
        )))
    }

    /// A fresh directory for a cluster, owned by the server's user, with its watchdog.
    fn new_root() -> Result<TempPostgres, Error> {
        let bindir = find_bindir()?;
        let run_as = unprivileged_user()?;
        let root = std::env::temp_dir().join(format!(
            "pgdelta-pg-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).map_err(|e| server_err(&root, "create", e))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                .map_err(|e| server_err(&root, "chown", e))?;
        }
        let data = root.join("data");
        let mut pg = TempPostgres {
            root,
            data,
            bindir,
            port: 0,
            run_as,
            watchdog: None,
            stopped: false,
        };
        pg.spawn_watchdog();
        Ok(pg)
    }

    /// Appends settings to the cluster's postgresql.conf.
    fn configure(&self, settings: &[String]) -> Result<(), Error> {
        let conf = self.data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(|e| server_err(&conf, "read", e))?;
        text.push_str("\n# pgdelta throwaway cluster\n");
        for s in settings {
            text.push_str(s);
            text.push('\n');
        }
        fs::write(&conf, text).map_err(|e| server_err(&conf, "write", e))
    }

    /// A hot standby of `primary`, streaming from it (`pg_basebackup -R`), started on its own
    /// port with `settings` added (e.g. `max_standby_streaming_delay = 0`).
    pub fn standby_of(primary: &TempPostgres, settings: &[&str]) -> Result<TempPostgres, Error> {
        let mut pg = TempPostgres::new_root()?;
        let port = primary.port.to_string();
        pg.run(
            "pg_basebackup",
            &[
                "-D",
                path_str(&pg.data),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
            ],
        )?;
        let mut all = vec![
            format!("unix_socket_directories='{}'", path_str(&pg.root)),
            "hot_standby=on".into(),
        ];
        all.extend(settings.iter().map(|s| s.to_string()));
        pg.configure(&all)?;
        pg.launch()?;
        Ok(pg)
    }

    /// Freezes every database, stops the server, sets its next transaction id with
    /// `pg_resetwal -x` (creating the commit log segment that id needs), and starts it again:
    /// wraparound tests start close to 2^32 instead of consuming four billion ids. (Without the
    /// freeze, rows written by ids that now lie "in the future" would vanish, the databases'
    /// own catalog rows first.)
    pub fn set_next_xid(&mut self, xid: u32) -> Result<(), Error> {
        let port = self.port.to_string();
        self.run(
            "vacuumdb",
            &[
                "--all",
                "--freeze",
                "--quiet",
                "-h",
                path_str(&self.root),
                "-p",
                &port,
                "-U",
                "postgres",
            ],
        )?;
        self.run(
            "pg_ctl",
            &["-D", path_str(&self.data), "-m", "fast", "-w", "stop"],
        )?;
        // pg_xact: 2 bits per transaction, 8 KiB pages, 32 pages per segment file.
        let segment = self
            .data
            .join("pg_xact")
            .join(format!("{:04X}", xid / (8192 * 4 * 32)));
        if !segment.exists() {
            fs::write(&segment, vec![0u8; 8192 * 32])
                .map_err(|e| server_err(&segment, "write", e))?;
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&segment, Some(uid), Some(gid))
                    .map_err(|e| server_err(&segment, "chown", e))?;
            }
        }
        let xid = xid.to_string();
        self.run("pg_resetwal", &["-x", &xid, "-D", path_str(&self.data)])?;
        self.launch()
    }

    /// Promotes a standby to a primary (a failover), waiting until it accepts writes.
    pub fn promote(&self) -> Result<(), Error> {
        self.run("pg_ctl", &["-D", path_str(&self.data), "-w", "promote"])
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the server's Unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// A URL for database `db` as the `postgres` superuser, over TCP on 127.0.0.1.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{}", self.port, db)
    }

    /// Stops the server (fast shutdown) and removes its directory.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let _ = self.run(
            "pg_ctl",
            &["-D", path_str(&self.data), "-m", "fast", "-w", "stop"],
        );
        let _ = fs::remove_dir_all(&self.root);
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }

    /// Makes every role but `postgres` log in over TCP with a password (SCRAM), then reloads
    /// (the postmaster rereads pg_hba.conf asynchronously: callers wait for it to bite). Tests
    /// of password files and services need a server that asks for one.
    pub fn require_passwords(&self) -> Result<(), Error> {
        let hba = self.data.join("pg_hba.conf");
        let text = "local all all trust\n\
                    host all postgres 127.0.0.1/32 trust\n\
                    host all all 127.0.0.1/32 scram-sha-256\n";
        fs::write(&hba, text).map_err(|e| server_err(&hba, "write", e))?;
        self.run("pg_ctl", &["-D", path_str(&self.data), "reload"])
    }

    /// Restarts the server in place (fault-injection tests: a failover or a restart mid-run).
    pub fn restart(&self, mode: &str) -> Result<(), Error> {
        let port_opt = format!("-p {}", self.port);
        let log = self.root.join("server.log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data),
                "-l",
                path_str(&log),
                "-o",
                &port_opt,
                "-m",
                mode,
                "-w",
                "restart",
            ],
        )
    }

    /// Turns TLS on with the given PEM certificate and key, then restarts the server. Sessions
    /// over TCP may then use TLS or not (the default pg_hba.conf allows both).
    pub fn enable_tls(&self, cert: &Path, key: &Path) -> Result<(), Error> {
        for (from, name) in [(cert, "server.crt"), (key, "server.key")] {
            let to = self.data.join(name);
            fs::copy(from, &to).map_err(|e| server_err(&to, "write", e))?;
            if let Some((uid, gid)) = self.run_as {
                std::os::unix::fs::chown(&to, Some(uid), Some(gid))
                    .map_err(|e| server_err(&to, "chown", e))?;
            }
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&to, fs::Permissions::from_mode(0o600))
                .map_err(|e| server_err(&to, "chmod", e))?;
        }
        let conf = self.data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(|e| server_err(&conf, "read", e))?;
        text.push_str("ssl = on\n");
        fs::write(&conf, text).map_err(|e| server_err(&conf, "write", e))?;
        self.restart("fast")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<(), Error> {
        let mut cmd = Command::new(self.bindir.join(tool));
        cmd.args(args)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        let out = cmd
            .output()
            .map_err(|e| Error::Server(format!("cannot run {tool}: {e}")))?;
        if !out.status.success() {
            return Err(Error::Server(format!(
                "{tool} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            )));
        }
        Ok(())
    }

    /// A detached shell that waits for this process to exit, then kills the postmaster
    /// (immediate shutdown) and removes the directory. Covers the exits that skip `Drop`.
    fn spawn_watchdog(&mut self) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             if [ -f '{dir}/data/postmaster.pid' ]; then kill -QUIT $(head -n 1 '{dir}/data/postmaster.pid') 2>/dev/null; sleep 2; fi; \
             rm -rf '{dir}'",
            pid = std::process::id(),
            dir = path_str(&self.root)
        );
        self.watchdog = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .ok();
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn server_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    Error::Server(format!("cannot {what} {}: {e}", path.display()))
}

/// A TCP port on 127.0.0.1 nothing listens on right now.
pub fn free_port() -> Result<u16, Error> {
    let l = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Server(format!("cannot find a free port: {e}")))?;
    Ok(l.local_addr().map(|a| a.port()).unwrap_or(0))
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// The PostgreSQL server binaries: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`. `PGDELTA_PG_BINDIR` overrides both.
pub fn find_bindir() -> Result<PathBuf, Error> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Ok(d) = std::env::var("PGDELTA_PG_BINDIR") {
        let d = PathBuf::from(d);
        if has_server(&d) {
            return Ok(d);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has_server(&d) {
            return Ok(d);
        }
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_server(&bin).then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, d)| d).ok_or_else(|| {
        Error::Server(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install them \
             (Debian/Ubuntu: apt-get install -y postgresql), or set PGDELTA_PG_BINDIR"
                .into(),
        )
    })
}

/// When running as root, the uid/gid of the `postgres` system user (initdb refuses root).
pub fn unprivileged_user() -> Result<Option<(u32, u32)>, Error> {
    let euid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    if euid != 0 {
        return Ok(None);
    }
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3 && f[0] == "postgres" {
            if let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) {
                return Ok(Some((uid, gid)));
            }
        }
    }
    Err(Error::Server(
        "running as root, and initdb refuses root, but there is no 'postgres' system user to run \
         the throwaway cluster as: install the postgresql package (it creates one) or run as a \
         normal user"
            .into(),
    ))
}
