//! libpq's defaults for what a connection string leaves out: the connection service file
//! (`service=NAME` or `PGSERVICE`), the environment (`PGHOST`, `PGPORT`, `PGUSER`,
//! `PGDATABASE`, `PGPASSWORD`, `PGSSLMODE`, `PGSSLROOTCERT`, `PGCONNECT_TIMEOUT`, `PGPASSFILE`)
//! and the password file (`passfile=`, `PGPASSFILE`, `~/.pgpass`), in libpq's
//! order: the string wins, then the service, then the environment, then the built-in defaults.
//!
//! Everything here reads its environment through [`Lookup`], so it is tested without touching
//! the process's own.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::Error;

/// Reads an environment variable (empty counts as unset, as in libpq).
pub(crate) type Lookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process's environment.
pub(crate) fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The environment variables libpq reads for each setting pgdelta honours.
pub(crate) const ENV: &[(&str, &str)] = &[
    ("host", "PGHOST"),
    ("port", "PGPORT"),
    ("user", "PGUSER"),
    ("dbname", "PGDATABASE"),
    ("password", "PGPASSWORD"),
    ("sslmode", "PGSSLMODE"),
    ("sslrootcert", "PGSSLROOTCERT"),
    ("connect_timeout", "PGCONNECT_TIMEOUT"),
    ("passfile", "PGPASSFILE"),
    ("target_session_attrs", "PGTARGETSESSIONATTRS"),
];

/// The settings a service file may give (the rest of libpq's are refused by name, so a typo
/// or an unsupported setting is never silently ignored).
const SERVICE_KEYS: &[&str] = &[
    "host",
    "port",
    "user",
    "dbname",
    "password",
    "sslmode",
    "sslrootcert",
    "connect_timeout",
    "passfile",
    "options",
    "target_session_attrs",
];

fn home(env: Lookup<'_>) -> Option<PathBuf> {
    env("HOME").map(PathBuf::from)
}

/// The service files searched, in libpq's order: the user's (`PGSERVICEFILE`, else
/// `~/.pg_service.conf`), then the system's (`PGSYSCONFDIR/pg_service.conf`, else Debian's
/// `/etc/postgresql-common/pg_service.conf`).
fn service_files(env: Lookup<'_>) -> Vec<PathBuf> {
    let user = env("PGSERVICEFILE")
        .map(PathBuf::from)
        .or_else(|| home(env).map(|h| h.join(".pg_service.conf")));
    let system = env("PGSYSCONFDIR")
        .map(|d| PathBuf::from(d).join("pg_service.conf"))
        .unwrap_or_else(|| PathBuf::from("/etc/postgresql-common/pg_service.conf"));
    user.into_iter().chain([system]).collect()
}

/// The settings of service `name`, from the first service file that defines it.
pub(crate) fn service(name: &str, env: Lookup<'_>) -> Result<BTreeMap<String, String>, Error> {
    let files = service_files(env);
    for file in &files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        if let Some(settings) = parse_service(&text, name, file)? {
            return Ok(settings);
        }
    }
    let looked: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    Err(Error::Config(format!(
        "connection service '{name}' is not defined (looked in {}); fix the name, or set PGSERVICEFILE to the file that defines it",
        looked.join(", ")
    )))
}

/// Section `name` of a service file (`[name]`, then `key=value` lines; `#` comments).
fn parse_service(
    text: &str,
    name: &str,
    file: &Path,
) -> Result<Option<BTreeMap<String, String>>, Error> {
    let mut section: Option<BTreeMap<String, String>> = None;
    let mut inside = false;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix('[') {
            if inside {
                break;
            }
            inside = rest.strip_suffix(']').map(str::trim) == Some(name);
            if inside {
                section = Some(BTreeMap::new());
            }
            continue;
        }
        let Some(settings) = section.as_mut().filter(|_| inside) else {
            continue;
        };
        let bad = |why: String| {
            Error::Config(format!(
                "{} line {}: {why} (service '{name}')",
                file.display(),
                i + 1
            ))
        };
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| bad("expected key=value".into()))?;
        let key = key.trim();
        if key == "service" {
            return Err(bad("a service cannot name another service".into()));
        }
        if !SERVICE_KEYS.contains(&key) {
            return Err(bad(format!(
                "'{key}' is not a setting pgdelta supports in a service (it supports {})",
                SERVICE_KEYS.join(", ")
            )));
        }
        settings.insert(key.to_string(), value.trim().to_string());
    }
    Ok(section)
}

/// The password file to read: `passfile`, else `PGPASSFILE`, else `~/.pgpass`.
pub(crate) fn passfile(explicit: Option<&str>, env: Lookup<'_>) -> Option<PathBuf> {
    explicit
        .map(PathBuf::from)
        .or_else(|| env("PGPASSFILE").map(PathBuf::from))
        .or_else(|| home(env).map(|h| h.join(".pgpass")))
}

/// The password for (host, port, dbname, user) in a password file, as libpq finds it: the first
/// line whose fields all match (`*` matches anything; `\:` and `\\` escape). A file that group
/// or others can read is ignored with a warning, as libpq does; a missing file is no error.
pub(crate) fn password_from(
    file: &Path,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<String> {
    let meta = std::fs::metadata(file).ok()?;
    use std::os::unix::fs::PermissionsExt;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            "password file {} has group or world access; it is ignored (chmod 0600 it)",
            file.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    find_password(&text, host, port, dbname, user)
}

fn find_password(text: &str, host: &str, port: u16, dbname: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    let want = [host, port.as_str(), dbname, user];
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let fields = split_pgpass(line);
            if fields.len() < 5 {
                return None;
            }
            // A Unix socket directory matches `localhost`, as in libpq.
            let matches = fields[..4].iter().zip(want).enumerate().all(|(i, (f, w))| {
                f == "*" || f == w || (i == 0 && w.starts_with('/') && f == "localhost")
            });
            matches.then(|| fields[4].clone())
        })
}

/// Splits a password file line on unescaped colons, unescaping `\:` and `\\`.
fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    fields.last_mut().expect("one field").push(n);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn password_file_lines_match_as_in_libpq() {
        let text = "# comment\n\
                    db.example:5432:sales:etl:first\n\
                    *:*:*:etl:p\\:w\\\\d\n\
                    /run/pg:5433:*:*:sock\n\
                    localhost:5434:*:*:loc:al\n";
        assert_eq!(
            find_password(text, "db.example", 5432, "sales", "etl").as_deref(),
            Some("first")
        );
        assert_eq!(
            find_password(text, "other", 1, "x", "etl").as_deref(),
            Some("p:w\\d")
        );
        assert_eq!(find_password(text, "other", 1, "x", "bob"), None);
        assert_eq!(
            find_password(text, "/run/pg", 5433, "x", "bob").as_deref(),
            Some("sock")
        );
        // A socket directory matches `localhost`; a password may hold unescaped colons.
        assert_eq!(
            find_password(text, "/tmp", 5434, "x", "bob").as_deref(),
            Some("loc:al")
        );
    }

    #[test]
    fn world_readable_password_files_are_ignored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pgpass");
        std::fs::write(&f, "*:*:*:*:pw\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(password_from(&f, "h", 5432, "d", "u"), None);
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            password_from(&f, "h", 5432, "d", "u").as_deref(),
            Some("pw")
        );
        assert_eq!(
            password_from(&dir.path().join("none"), "h", 5432, "d", "u"),
            None
        );
    }

    #[test]
    fn services_come_from_the_first_file_that_defines_them() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("user.conf");
        let sys = dir.path().join("pg_service.conf");
        std::fs::write(
            &user,
            "[wh]\nhost=user-host\n# note\nport = 6000\n\n[other]\nhost=x\n",
        )
        .unwrap();
        std::fs::write(&sys, "[wh]\nhost=sys-host\n[sysonly]\ndbname=d\n").unwrap();
        let e = env(&[
            ("PGSERVICEFILE", user.to_str().unwrap()),
            ("PGSYSCONFDIR", dir.path().to_str().unwrap()),
        ]);
        let wh = service("wh", &e).unwrap();
        assert_eq!(wh["host"], "user-host");
        assert_eq!(wh["port"], "6000");
        assert_eq!(wh.len(), 2);
        assert_eq!(service("sysonly", &e).unwrap()["dbname"], "d");
        let missing = service("nope", &e).unwrap_err().to_string();
        assert!(
            missing.contains("'nope' is not defined") && missing.contains("user.conf"),
            "{missing}"
        );
        std::fs::write(&user, "[wh]\nhostaddr=1.2.3.4\n").unwrap();
        let bad = service("wh", &e).unwrap_err().to_string();
        assert!(
            bad.contains("line 2") && bad.contains("'hostaddr'"),
            "{bad}"
        );
    }

    #[test]
    fn password_file_location() {
        let e = env(&[("HOME", "/home/u")]);
        assert_eq!(passfile(None, &e), Some(PathBuf::from("/home/u/.pgpass")));
        let e = env(&[("HOME", "/home/u"), ("PGPASSFILE", "/etc/pw")]);
        assert_eq!(passfile(None, &e), Some(PathBuf::from("/etc/pw")));
        assert_eq!(passfile(Some("/x"), &e), Some(PathBuf::from("/x")));
    }
}
