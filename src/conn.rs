//! Connection strings, sessions and their settings.
//!
//! [`ConnInfo`] wraps a libpq-style connection string (URL or `key=value`) and is the only type
//! that holds a password: its `Display` and `Debug` show `user@host:port/db` and nothing else.
//! Session settings are sent as startup options (`options=-c name=value`), because a role- or
//! database-level setting would silently override a `SET` issued after connecting; startup
//! options take precedence over both.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{pg_message, Error};

/// A connection string with its secret kept out of every rendering.
#[derive(Clone)]
pub struct ConnInfo {
    config: Config,
    /// None: `sslmode=disable`.
    tls: Option<rustls::ClientConfig>,
    shown: String,
}

impl ConnInfo {
    /// Parses a URL or `key=value` string. A missing password is taken from `PGPASSWORD`, a
    /// missing user from `PGUSER` or `USER`, a missing host from `PGHOST` (else `localhost`).
    pub fn parse(s: &str) -> Result<Self, Error> {
        let (rest, tls) = crate::tls::split_settings(s)?;
        let mut config = Config::from_str(&rest).map_err(|e| {
            // tokio-postgres parse errors quote the offending key, never the password value.
            Error::Config(format!(
                "invalid connection string: {e}; expected postgres://user@host:port/db or 'host=... dbname=...'"
            ))
        })?;
        if config.get_password().is_none() {
            if let Ok(pw) = std::env::var("PGPASSWORD") {
                config.password(pw);
            }
        }
        if config.get_user().is_none() {
            let user = std::env::var("PGUSER")
                .or_else(|_| std::env::var("USER"))
                .unwrap_or_else(|_| "postgres".into());
            config.user(user);
        }
        if config.get_hosts().is_empty() {
            config.host(std::env::var("PGHOST").as_deref().unwrap_or("localhost"));
        }
        if config.get_dbname().is_none() {
            if let Ok(db) = std::env::var("PGDATABASE") {
                config.dbname(db);
            }
        }
        config.connect_timeout(Duration::from_secs(10));
        config.keepalives_idle(Duration::from_secs(30));
        config.ssl_mode(tls.mode.negotiation());
        let shown = describe(&config);
        Ok(ConnInfo {
            config,
            tls: crate::tls::client_config(&tls)?,
            shown,
        })
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
        let client = match &self.tls {
            None => {
                let (client, connection) = config.connect(NoTls).await.map_err(connect_err)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!("connection closed: {e}");
                    }
                });
                client
            }
            Some(tls) => {
                let (client, connection) = config
                    .connect(MakeRustlsConnect::new(tls.clone()))
                    .await
                    .map_err(connect_err)?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!("connection closed: {e}");
                    }
                });
                client
            }
        };
        Ok(client)
    }

    /// Cancels the statement running on the session `token` belongs to, over the same TLS
    /// settings the session uses.
    pub async fn cancel(
        &self,
        token: &tokio_postgres::CancelToken,
    ) -> Result<(), tokio_postgres::Error> {
        match &self.tls {
            None => token.cancel_query(NoTls).await,
            Some(tls) => {
                token
                    .cancel_query(MakeRustlsConnect::new(tls.clone()))
                    .await
            }
        }
    }
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

    #[test]
    fn option_escaping() {
        assert_eq!(escape_option("a b\\c"), "a\\ b\\\\c");
    }
}
