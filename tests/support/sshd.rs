//! A throwaway OpenSSH server (Debian's `openssh-server`) on a random loopback port, run as an
//! unprivileged user: as `postgres` when the tests run as root (like the test cluster), else
//! as the current user. It accepts one client key, forwards TCP and Unix sockets, and logs at
//! DEBUG1 so a test can see the forwarded channels.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgdelta::ssh::SshSettings;
use pgdelta::tools::pgserver::{free_port, unprivileged_user};

pub(crate) struct TempSshd {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The user sessions log in as (the one sshd runs as).
    pub user: String,
    child: Option<Child>,
}

/// A new ed25519 key pair at `path` (and `path`.pub).
pub(crate) fn keygen(path: &Path) {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "pgdelta-test", "-f"])
        .arg(path)
        .output()
        .expect(
            "ssh-keygen is needed for the SSH tests (Debian: apt-get install -y openssh-client)",
        );
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TempSshd {
    pub(crate) fn start() -> TempSshd {
        let sshd = Path::new("/usr/sbin/sshd");
        assert!(
            sshd.exists(),
            "the SSH tunnel tests need an OpenSSH server: install it (Debian/Ubuntu: apt-get install -y openssh-server)"
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("client_key"));
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        let port = free_port().unwrap();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nPidFile {dir}/sshd.pid\n\
                 AuthorizedKeysFile {dir}/authorized_keys\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 AllowTcpForwarding yes\nAllowStreamLocalForwarding yes\nLogLevel DEBUG1\n",
                dir = d.display()
            ),
        )
        .unwrap();
        let run_as = unprivileged_user().unwrap();
        if let Some((uid, gid)) = run_as {
            for f in [
                "",
                "host_key",
                "host_key.pub",
                "authorized_keys",
                "sshd_config",
            ] {
                std::os::unix::fs::chown(d.join(f), Some(uid), Some(gid)).unwrap();
            }
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let user = match run_as {
            Some(_) => "postgres".to_string(),
            None => {
                let out = Command::new("id").arg("-un").output().unwrap();
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            }
        };
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(d.join("sshd.log"), Some(uid), Some(gid)).unwrap();
        }
        let mut cmd = Command::new(sshd);
        cmd.args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some((uid, gid)) = run_as {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd.spawn().expect("cannot start sshd");
        let mut s = TempSshd {
            dir,
            port,
            user,
            child: Some(child),
        };
        s.wait_ready();
        s
    }

    /// Waits for the server's SSH banner.
    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            if let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut banner = [0u8; 4];
                if c.read_exact(&mut banner).is_ok() && &banner == b"SSH-" {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("sshd exited ({status}): {}", self.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "sshd did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The client key the server accepts.
    pub(crate) fn key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// A known_hosts file holding the server's host key for `[127.0.0.1]:port`.
    pub(crate) fn known_hosts(&self) -> PathBuf {
        let path = self.dir.path().join("known_hosts");
        let host_key = std::fs::read_to_string(self.dir.path().join("host_key.pub")).unwrap();
        std::fs::write(&path, format!("[127.0.0.1]:{} {host_key}", self.port)).unwrap();
        path
    }

    /// `user@127.0.0.1:port`.
    pub(crate) fn destination(&self) -> String {
        format!("{}@127.0.0.1:{}", self.user, self.port)
    }

    pub(crate) fn settings(&self) -> SshSettings {
        SshSettings {
            host: self.destination(),
            key: Some(self.key()),
            known_hosts: Some(self.known_hosts()),
            ..Default::default()
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Channels the server opened to `what` (a `host:port` or a socket path) so far.
    pub(crate) fn forwards_to(&self, what: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                (l.contains("server_request_direct_tcpip")
                    || l.contains("server_request_direct_streamlocal"))
                    && l.contains(what)
            })
            .count()
    }

    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TempSshd {
    fn drop(&mut self) {
        self.stop();
    }
}

impl TempSshd {
    /// Accepts the public key `pub_path` too.
    pub(crate) fn authorize(&self, pub_path: &Path) {
        use std::io::Write;
        let key = std::fs::read_to_string(pub_path).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("authorized_keys"))
            .unwrap();
        f.write_all(key.as_bytes()).unwrap();
    }
}
