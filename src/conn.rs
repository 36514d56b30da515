//! Connection strings, sessions and their settings.
//!
//! [`ConnInfo`] wraps a libpq-style connection string (URL or `key=value`) and is the only type
//! that holds a password: its `Display` and `Debug` show `user@host:port/db` and nothing else.
//! Session settings are sent as startup options (`options=-c name=value`), because a role- or
//! database-level setting would silently override a `SET` issued after connecting; startup
//! options take precedence over both.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Connection, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{pg_message, Error};
use crate::ssh::{Forward, SshSettings, Tunnel, TunnelError, TunnelStream};

/// A connection string with its secret kept out of every rendering.
#[derive(Clone)]
pub struct ConnInfo {
    config: Config,
    /// None: `sslmode=disable`.
    tls: Option<rustls::ClientConfig>,
    /// Sessions go through this SSH bastion.
    tunnel: Option<Arc<Tunnel>>,
    shown: String,
}

impl ConnInfo {
    /// Parses a URL or `key=value` string, filling what it leaves out as libpq does (see
    /// [`crate::libpq`]): from the connection service, the environment and the password file.
    pub fn parse(s: &str) -> Result<Self, Error> {
        Self::parse_with(s, &crate::libpq::process_env)
    }

    /// [`ConnInfo::parse`] with the environment read through `env`.
    pub(crate) fn parse_with(s: &str, env: crate::libpq::Lookup<'_>) -> Result<Self, Error> {
        let (rest, mut libpq) = crate::tls::split_settings(s)?;
        let mut config = Config::from_str(&rest).map_err(|e| {
            // tokio-postgres parse errors quote the offending key, never the password value.
            Error::Config(format!(
                "invalid connection string: {e}; expected postgres://user@host:port/db or 'host=... dbname=...'"
            ))
        })?;
        // The service's settings, then the environment's, for what the string left unset.
        let service = match libpq.remove("service").or_else(|| env("PGSERVICE")) {
            Some(name) => crate::libpq::service(&name, env)?,
            None => Default::default(),
        };
        let from_env = crate::libpq::ENV
            .iter()
            .filter_map(|(key, var)| Some((key.to_string(), env(var)?)));
        for (key, value) in service.into_iter().chain(from_env) {
            default_setting(&mut config, &mut libpq, &key, &value)?;
        }
        if config.get_user().is_none() {
            config.user(env("USER").as_deref().unwrap_or("postgres"));
        }
        if config.get_hosts().is_empty() {
            config.host("localhost");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_password().is_none() {
            let file = crate::libpq::passfile(libpq.get("passfile").map(String::as_str), env);
            let host = match config.get_hosts().first() {
                Some(Host::Tcp(h)) => h.clone(),
                Some(Host::Unix(p)) => p.display().to_string(),
                None => "localhost".into(),
            };
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let user = config.get_user().unwrap_or_default().to_string();
            let db = config.get_dbname().unwrap_or(&user).to_string();
            if let Some(pw) =
                file.and_then(|f| crate::libpq::password_from(&f, &host, port, &db, &user))
            {
                config.password(pw);
            }
        }
        config.keepalives_idle(Duration::from_secs(30));
        let tls = crate::tls::TlsSettings::from_settings(&libpq)?;
        config.ssl_mode(tls.mode.negotiation());
        let shown = describe(&config);
        Ok(ConnInfo {
            config,
            tls: crate::tls::client_config(&tls)?,
            tunnel: None,
            shown,
        })
    }

    /// The same database, reached through an SSH bastion (see [`crate::ssh`]).
    pub fn via_ssh(mut self, ssh: &SshSettings) -> Result<Self, Error> {
        let tunnel = Tunnel::new(ssh, &crate::libpq::process_env)?;
        self.shown = format!("{} via ssh {tunnel}", describe(&self.config));
        self.tunnel = Some(Arc::new(tunnel));
        Ok(self)
    }

    /// Opens a session with `settings` applied as startup options, and spawns its connection task.
    pub async fn connect(
        &self,
        role: &'static str,
        settings: &[(&str, String)],
    ) -> Result<Client, Error> {
        let mut config = self.config.clone();
        let mut options = config.get_options().unwrap_or("").to_string();
        for (name, value) in settings {
            options.push_str(&format!(" -c {name}={}", escape_option(value)));
        }
        config.options(options.trim());
        config.application_name("pgdelta");
        let connect_err = |e: tokio_postgres::Error| Error::Connect {
            role,
            target: self.shown.clone(),
            message: pg_message(&e),
        };
        if let Some(tunnel) = &self.tunnel {
            return self.connect_through(tunnel, &config, role).await;
        }
        let client = match &self.tls {
            None => {
                let (client, connection) = config.connect(NoTls).await.map_err(connect_err)?;
                spawn(connection);
                client
            }
            Some(tls) => {
                let (client, connection) = config
                    .connect(MakeRustlsConnect::new(tls.clone()))
                    .await
                    .map_err(connect_err)?;
                spawn(connection);
                client
            }
        };
        Ok(client)
    }

    /// Tries each host of the connection string through `tunnel`, within the connect timeout.
    async fn connect_through(
        &self,
        tunnel: &Tunnel,
        config: &Config,
        role: &'static str,
    ) -> Result<Client, Error> {
        let mut last = None;
        for (host, port) in hosts(config) {
            let attempt = self.session_through(tunnel, config, &host, port);
            let result = match config.get_connect_timeout() {
                Some(t) => tokio::time::timeout(*t, attempt).await.unwrap_or_else(|_| {
                    Err(TunnelError {
                        message: format!("timed out after {} s", t.as_secs()),
                        config: false,
                    })
                }),
                None => attempt.await,
            };
            match result {
                Ok(client) => return Ok(client),
                Err(e) if e.config => {
                    return Err(Error::Config(format!(
                        "cannot connect to the {role} database {}: {}",
                        self.shown, e.message
                    )))
                }
                Err(e) => last = Some(e.message),
            }
        }
        Err(Error::Connect {
            role,
            target: self.shown.clone(),
            message: last.unwrap_or_else(|| "no host".into()),
        })
    }

    /// One session to `host`:`port` over a new channel through `tunnel`; TLS inside the
    /// channel names the database's host, so `verify-full` checks it.
    async fn session_through(
        &self,
        tunnel: &Tunnel,
        config: &Config,
        host: &Host,
        port: u16,
    ) -> Result<Client, TunnelError> {
        let pg_err = |e: tokio_postgres::Error| TunnelError {
            message: pg_message(&e),
            config: false,
        };
        let stream = tunnel.open(forward(host, port)).await?;
        match (&self.tls, host) {
            (Some(tls), Host::Tcp(name)) => {
                let connector = tls_for(tls, name)?;
                let (client, connection) = config
                    .connect_raw(stream, connector)
                    .await
                    .map_err(pg_err)?;
                spawn(connection);
                Ok(client)
            }
            _ => {
                // libpq never uses TLS over a Unix socket.
                let mut config = config.clone();
                if matches!(host, Host::Unix(_)) {
                    config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                }
                let (client, connection) =
                    config.connect_raw(stream, NoTls).await.map_err(pg_err)?;
                spawn(connection);
                Ok(client)
            }
        }
    }

    /// Cancels the statement running on the session `token` belongs to, over the same TLS
    /// settings (and SSH bastion) the session uses.
    pub async fn cancel(&self, token: &tokio_postgres::CancelToken) -> Result<(), Error> {
        let failed = |message: String| Error::Connect {
            role: "cancel",
            target: self.shown.clone(),
            message,
        };
        let pg = |e: tokio_postgres::Error| failed(pg_message(&e));
        match (&self.tunnel, &self.tls) {
            (None, None) => token.cancel_query(NoTls).await.map_err(pg),
            (None, Some(tls)) => token
                .cancel_query(MakeRustlsConnect::new(tls.clone()))
                .await
                .map_err(pg),
            (Some(tunnel), tls) => {
                let (host, port) = hosts(&self.config)
                    .into_iter()
                    .next()
                    .ok_or_else(|| failed("no host".into()))?;
                let stream = tunnel
                    .open(forward(&host, port))
                    .await
                    .map_err(|e| failed(e.message))?;
                match (tls, &host) {
                    (Some(tls), Host::Tcp(name)) => {
                        let connector = tls_for(tls, name).map_err(|e| failed(e.message))?;
                        token.cancel_query_raw(stream, connector).await.map_err(pg)
                    }
                    _ => token.cancel_query_raw(stream, NoTls).await.map_err(pg),
                }
            }
        }
    }
}

/// The hosts of a connection string with their ports (one port for all, or one each).
fn hosts(config: &Config) -> Vec<(Host, u16)> {
    let ports = config.get_ports();
    config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            (h.clone(), port)
        })
        .collect()
}

/// What the bastion connects to for a host: TCP, or the server's socket file in a directory.
fn forward(host: &Host, port: u16) -> Forward<'_> {
    match host {
        Host::Tcp(name) => Forward::Tcp(name, port),
        Host::Unix(dir) => Forward::Socket(format!("{}/.s.PGSQL.{port}", dir.display())),
    }
}

fn tls_for(
    tls: &rustls::ClientConfig,
    name: &str,
) -> Result<<MakeRustlsConnect as MakeTlsConnect<TunnelStream>>::TlsConnect, TunnelError> {
    let mut make = MakeRustlsConnect::new(tls.clone());
    MakeTlsConnect::<TunnelStream>::make_tls_connect(&mut make, name).map_err(|e| TunnelError {
        message: format!("TLS setup for {name}: {e}"),
        config: true,
    })
}

/// Drives a session's connection on the runtime until it closes.
fn spawn<S, T>(connection: Connection<S, T>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("connection closed: {e}");
        }
    });
}

/// Applies a setting from the service file or the environment unless the connection string
/// (or an earlier source) set it.
fn default_setting(
    config: &mut Config,
    libpq: &mut std::collections::BTreeMap<String, String>,
    key: &str,
    value: &str,
) -> Result<(), Error> {
    let bad = |what: &str| Error::Config(format!("invalid {key} '{value}': {what}"));
    match key {
        "host" if config.get_hosts().is_empty() => {
            for h in value.split(',') {
                config.host(h.trim());
            }
        }
        "port" if config.get_ports().is_empty() => {
            for p in value.split(',') {
                config.port(
                    p.trim()
                        .parse()
                        .map_err(|_| bad("expected a port number"))?,
                );
            }
        }
        "user" if config.get_user().is_none() => {
            config.user(value);
        }
        "dbname" if config.get_dbname().is_none() => {
            config.dbname(value);
        }
        "password" if config.get_password().is_none() => {
            // Never quoted back: the value is a secret.
            config.password(value);
        }
        "connect_timeout" if config.get_connect_timeout().is_none() => {
            let secs: u64 = value
                .trim()
                .parse()
                .map_err(|_| bad("expected whole seconds"))?;
            // libpq: 0 waits forever, and less than 2 s means 2 s.
            if secs > 0 {
                config.connect_timeout(Duration::from_secs(secs.max(2)));
            }
        }
        "options" if config.get_options().is_none() => {
            config.options(value);
        }
        "sslmode" | "sslrootcert" | "passfile" => {
            libpq
                .entry(key.to_string())
                .or_insert_with(|| value.to_string());
        }
        _ => {}
    }
    Ok(())
}

/// Backslash-escapes spaces and backslashes, as the server's option parser expects.
fn escape_option(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        if c == ' ' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn describe(c: &Config) -> String {
    let host = match c.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{}@{}:{}/{}",
        c.get_user().unwrap_or(""),
        host,
        port,
        c.get_dbname().unwrap_or("")
    )
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ConnInfo({})", self.shown)
    }
}

/// Reads a setting's effective value in a session (e.g. `statement_timeout`).
pub async fn show(client: &Client, name: &str) -> Result<String, tokio_postgres::Error> {
    let row = client
        .query_one("SELECT current_setting($1)", &[&name])
        .await?;
    Ok(row.get(0))
}

/// Parses a duration setting as `SHOW`/`current_setting` renders it (`0`, `250ms`, `30s`, `5min`,
/// `1h`, `1d`); `None` for zero (disabled) or an unknown form.
pub fn parse_pg_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit.trim() {
        "" | "ms" => n,
        "s" => n * 1000,
        "min" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => return None,
    };
    (ms > 0).then(|| Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_never_shown() {
        let c = ConnInfo::parse("postgres://alice:s3cr3t@db.example:6543/sales?sslmode=disable")
            .unwrap();
        let shown = format!("{c} {c:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert_eq!(c.to_string(), "postgres://alice@db.example:6543/sales");
        let kv = ConnInfo::parse("host=h port=1 user=u password=hunter2 dbname=d").unwrap();
        assert!(!format!("{kv}{kv:?}").contains("hunter2"));
    }

    #[test]
    fn bad_string_is_a_config_error_without_secret() {
        let e = ConnInfo::parse("postgres://u:topsecret@h:notaport/db").unwrap_err();
        assert!(matches!(e, Error::Config(_)));
        assert!(!e.to_string().contains("topsecret"));
    }

    #[test]
    fn pg_durations() {
        assert_eq!(parse_pg_duration("0"), None);
        assert_eq!(parse_pg_duration("50ms"), Some(Duration::from_millis(50)));
        assert_eq!(parse_pg_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_pg_duration("5min"), Some(Duration::from_secs(300)));
        assert_eq!(parse_pg_duration("1h"), Some(Duration::from_secs(3600)));
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_string_then_the_service_then_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let services = dir.path().join("services.conf");
        std::fs::write(
            &services,
            "[wh]\nhost=svc-host\nport=6001\ndbname=svc_db\nsslmode=disable\nconnect_timeout=7\n",
        )
        .unwrap();
        let e = env(&[
            ("PGHOST", "env-host"),
            ("PGPORT", "6002"),
            ("PGUSER", "env_user"),
            ("PGDATABASE", "env_db"),
            ("PGSSLMODE", "require"),
            ("PGSERVICEFILE", services.to_str().unwrap()),
            ("HOME", "/nonexistent"),
        ]);
        // The environment alone.
        let c = ConnInfo::parse_with("", &e).unwrap();
        assert_eq!(c.to_string(), "postgres://env_user@env-host:6002/env_db");
        assert!(c.tls.is_some(), "PGSSLMODE=require");
        // The service over the environment; the string over both.
        let c = ConnInfo::parse_with("service=wh", &e).unwrap();
        assert_eq!(c.to_string(), "postgres://env_user@svc-host:6001/svc_db");
        assert!(c.tls.is_none(), "the service's sslmode=disable");
        assert_eq!(
            c.config.get_connect_timeout(),
            Some(&Duration::from_secs(7))
        );
        let c = ConnInfo::parse_with("postgres://u@h:1/d?service=wh&sslmode=require", &e).unwrap();
        assert_eq!(c.to_string(), "postgres://u@h:1/d");
        assert!(c.tls.is_some());
        // PGSERVICE names the service when the string does not.
        let e2 = env(&[
            ("PGSERVICE", "wh"),
            ("PGSERVICEFILE", services.to_str().unwrap()),
        ]);
        let c = ConnInfo::parse_with("user=u", &e2).unwrap();
        assert_eq!(c.to_string(), "postgres://u@svc-host:6001/svc_db");
        let e = ConnInfo::parse_with("service=nope", &e2).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e}");
        // Defaults: a 10 s connect timeout unless one is given.
        let c = ConnInfo::parse_with("host=h", &env(&[])).unwrap();
        assert_eq!(
            c.config.get_connect_timeout(),
            Some(&Duration::from_secs(10))
        );
        let c = ConnInfo::parse_with("host=h", &env(&[("PGCONNECT_TIMEOUT", "3")])).unwrap();
        assert_eq!(
            c.config.get_connect_timeout(),
            Some(&Duration::from_secs(3))
        );
        assert!(ConnInfo::parse_with("host=h", &env(&[("PGPORT", "x")])).is_err());
    }

    #[test]
    fn passwords_from_the_password_file_never_over_a_given_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pgpass");
        std::fs::write(
            &f,
            "db.example:5432:sales:etl:from-file\n*:*:*:*:wildcard\n",
        )
        .unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = env(&[("PGPASSFILE", f.to_str().unwrap())]);
        let pw = |s: &str, e: &dyn Fn(&str) -> Option<String>| {
            ConnInfo::parse_with(s, e)
                .unwrap()
                .config
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
        };
        assert_eq!(
            pw("postgres://etl@db.example/sales", &e).as_deref(),
            Some("from-file")
        );
        assert_eq!(
            pw("postgres://bob@db.example/other", &e).as_deref(),
            Some("wildcard")
        );
        assert_eq!(
            pw("postgres://etl:given@db.example/sales", &e).as_deref(),
            Some("given")
        );
        let with_env = env(&[("PGPASSFILE", f.to_str().unwrap()), ("PGPASSWORD", "env")]);
        assert_eq!(
            pw("postgres://etl@db.example/sales", &with_env).as_deref(),
            Some("env")
        );
        // passfile= in the string names another file.
        let other = dir.path().join("other");
        std::fs::write(&other, "*:*:*:*:other-file\n").unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = format!(
            "host=db.example user=etl dbname=sales passfile={}",
            other.display()
        );
        assert_eq!(pw(&s, &e).as_deref(), Some("other-file"));
        // The password is never shown.
        let c = ConnInfo::parse_with("postgres://etl@db.example/sales", &e).unwrap();
        assert!(!format!("{c} {c:?}").contains("from-file"));
    }

    #[test]
    fn option_escaping() {
        assert_eq!(escape_option("a b\\c"), "a\\ b\\\\c");
    }
}
