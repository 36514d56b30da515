//! Connection strings, sessions and their settings.
//!
//! [`ConnInfo`] wraps a libpq-style connection string (URL or `key=value`) and is the only type
//! that holds a password: its `Display` and `Debug` show `user@host:port/db` and nothing else.
//! Session settings are sent as startup options (`options=-c name=value`), because a role- or
//! database-level setting would silently override a `SET` issued after connecting; startup
//! options take precedence over both.

use std::fmt;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::{Host, SslNegotiation};
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{Client, Config, Connection, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{pg_message, Error};
use crate::ssh::{Forward, SshSettings, Tunnel, TunnelError, TunnelStream};
use crate::tap::{Session, Tap, TapTls, Tapped};

/// A connection string with its secret kept out of every rendering.
#[derive(Clone)]
pub struct ConnInfo {
    config: Config,
    /// None: `sslmode=disable`.
    tls: Option<rustls::ClientConfig>,
    /// Sessions go through this SSH bastion.
    tunnel: Option<Arc<Tunnel>>,
    /// Which of the hosts a session is for.
    attrs: SessionAttrs,
    shown: String,
}

/// Which server of the connection string's hosts a session is for: libpq's
/// `target_session_attrs`. pgdelta tries the hosts in turn and checks each session
/// ([`session_attrs_met`]); tokio-postgres knows only the first three, and checks those itself
/// where it opens the sockets (`hostaddr`, host load balancing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionAttrs {
    Any,
    /// A server that accepts writes (`transaction_read_only` off).
    ReadWrite,
    ReadOnly,
    /// A server not in recovery (`pg_is_in_recovery()` false).
    Primary,
    /// A hot standby.
    Standby,
    /// A hot standby if one of the hosts is, else any server.
    PreferStandby,
}

impl SessionAttrs {
    /// Each setting by its name in a connection string.
    const NAMED: [(&'static str, SessionAttrs); 6] = [
        ("any", SessionAttrs::Any),
        ("read-write", SessionAttrs::ReadWrite),
        ("read-only", SessionAttrs::ReadOnly),
        ("primary", SessionAttrs::Primary),
        ("standby", SessionAttrs::Standby),
        ("prefer-standby", SessionAttrs::PreferStandby),
    ];

    fn parse(v: &str) -> Result<SessionAttrs, Error> {
        let v = v.trim();
        let found = Self::NAMED.iter().find(|(name, _)| *name == v);
        found.map(|&(_, a)| a).ok_or_else(|| {
            Error::Config(format!(
                "invalid target_session_attrs '{v}': expected any, read-write, read-only, primary, standby or prefer-standby"
            ))
        })
    }

    /// The same setting for tokio-postgres, when it has one.
    fn tokio(self) -> Option<tokio_postgres::config::TargetSessionAttrs> {
        use tokio_postgres::config::TargetSessionAttrs as T;
        match self {
            SessionAttrs::Any => Some(T::Any),
            SessionAttrs::ReadWrite => Some(T::ReadWrite),
            SessionAttrs::ReadOnly => Some(T::ReadOnly),
            _ => None,
        }
    }

    /// The setting's name in a connection string.
    fn name(self) -> &'static str {
        let found = Self::NAMED.iter().find(|&&(_, a)| a == self);
        found.map_or("any", |&(name, _)| name)
    }
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
        let mut config = Config::from_str(&rest).map_err(|e| Error::Config(parse_failed(&e)))?;
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
        let attrs = match libpq.get("target_session_attrs") {
            Some(v) => SessionAttrs::parse(v)?,
            None => SessionAttrs::Any,
        };
        if let Some(t) = attrs.tokio() {
            config.target_session_attrs(t);
        }
        let shown = describe(&config);
        let info = ConnInfo {
            config,
            tls: crate::tls::client_config(&tls)?,
            tunnel: None,
            attrs,
            shown,
        };
        if attrs.tokio().is_none() && !info.opens_sockets() {
            return Err(Error::Config(format!(
                "target_session_attrs={} needs the hosts named with host (no hostaddr) and load_balance_hosts=disable: pgdelta tries them in turn itself and checks each server",
                attrs.name()
            )));
        }
        Ok(info)
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
        let config = self.session_config(settings);
        let connect_err = |e: tokio_postgres::Error| Error::Connect {
            role,
            target: self.shown.clone(),
            message: pg_message(&e),
        };
        // tokio-postgres tries the hosts itself only for the settings it knows.
        if self.tunnel.is_some() || self.attrs.tokio().is_none() {
            return Ok(self.connect_each(&config, role, None).await?.0);
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

    /// A source session for reads whose COPY rows reach the reader in chunks, past
    /// tokio-postgres' per-message path (see [`crate::tap`]): pgdelta opens its socket (or its
    /// channel through the bastion) and puts a tap on it. A connection string with `hostaddr`
    /// or host load balancing gets an untapped session from [`Self::connect`], which handles
    /// those.
    pub(crate) async fn connect_reader(
        &self,
        role: &'static str,
        settings: &[(&str, String)],
    ) -> Result<Session, Error> {
        if !self.opens_sockets() {
            return Ok(Session::plain(self.connect(role, settings).await?));
        }
        let config = self.session_config(settings);
        let tap = Tap::default();
        let (client, reached) = self.connect_each(&config, role, Some(&tap)).await?;
        Ok(Session::new(client, Some(tap), reached))
    }

    /// Whether pgdelta opens the sessions' sockets itself (so a reader's socket can carry a
    /// tap): through a bastion always; else when the hosts are reached as written, one after
    /// the other (no `hostaddr`, no host load balancing). tokio-postgres opens the others.
    fn opens_sockets(&self) -> bool {
        use tokio_postgres::config::LoadBalanceHosts;
        let c = &self.config;
        self.tunnel.is_some()
            || (!c.get_hosts().is_empty()
                && c.get_hostaddrs().is_empty()
                && c.get_load_balance_hosts() == LoadBalanceHosts::Disable)
    }

    /// The connection string with the session's startup options.
    fn session_config(&self, settings: &[(&str, String)]) -> Config {
        let mut config = self.config.clone();
        let mut options = config.get_options().unwrap_or("").to_string();
        for (name, value) in settings {
            options.push_str(&format!(" -c {name}={}", escape_option(value)));
        }
        config.options(options.trim());
        config.application_name("pgdelta");
        config
    }

    /// Tries each host of the connection string, over a socket (or bastion channel) pgdelta
    /// opens, each address and the session's start within the connect timeout (as libpq); the
    /// session's socket carries `tap` when given.
    async fn connect_each(
        &self,
        config: &Config,
        role: &'static str,
        tap: Option<&Tap>,
    ) -> Result<(Client, Reached), Error> {
        let mut last = None;
        // Each address of a host has the timeout to itself (see `open_wire`), and the
        // session's start (TLS, authentication, `target_session_attrs`) has it again.
        let timeout = config.get_connect_timeout().copied();
        // prefer-standby: a standby among the hosts, else (libpq's second pass) any of them.
        let passes: &[SessionAttrs] = match self.attrs {
            SessionAttrs::PreferStandby => &[SessionAttrs::Standby, SessionAttrs::Any],
            _ => std::slice::from_ref(&self.attrs),
        };
        for &want in passes {
            for (host, port) in hosts(config) {
                let result = async {
                    let wire = self.open_wire(config, &host, port).await?;
                    within(timeout, async {
                        let client = self.session_on(wire, config, &host, tap.cloned()).await?;
                        session_attrs_met(&client, want).await?;
                        Ok(client)
                    })
                    .await
                }
                .await;
                match result {
                    Ok(client) => return Ok((client, Reached { host, port })),
                    Err(e) if e.config => {
                        return Err(Error::Config(format!(
                            "cannot connect to the {role} database {}: {}",
                            self.shown, e.message
                        )))
                    }
                    Err(e) => last = Some(e.message),
                }
            }
        }
        Err(Error::Connect {
            role,
            target: self.shown.clone(),
            message: last.unwrap_or_else(|| "no host".into()),
        })
    }

    /// A byte stream to `host`:`port`: through the bastion, or a socket as tokio-postgres
    /// opens one (TCP without delay, with the connection string's keepalives).
    async fn open_wire(
        &self,
        config: &Config,
        host: &Host,
        port: u16,
    ) -> Result<Wire, TunnelError> {
        let timeout = config.get_connect_timeout().copied();
        if let Some(tunnel) = &self.tunnel {
            let channel = async { Ok(Wire::Tunnel(tunnel.open(forward(host, port)).await?)) };
            return within(timeout, channel).await;
        }
        let failed = |e: std::io::Error| TunnelError {
            message: format!("error connecting to server: {e}"),
            config: false,
        };
        match host {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let socket = async { UnixStream::connect(path).await.map_err(failed) };
                Ok(Wire::Unix(within(timeout, socket).await?))
            }
            Host::Tcp(name) => {
                let addrs = async {
                    tokio::net::lookup_host((name.as_str(), port))
                        .await
                        .map_err(failed)
                };
                let stream = connect_any(within(timeout, addrs).await?, timeout)
                    .await
                    .map_err(failed)?;
                tcp_options(&stream, config).map_err(failed)?;
                Ok(Wire::Tcp(stream))
            }
        }
    }

    /// A session over `wire`; TLS inside it names the database's host, so `verify-full`
    /// checks it; the tap, when given, goes above TLS.
    async fn session_on(
        &self,
        wire: Wire,
        config: &Config,
        host: &Host,
        tap: Option<Tap>,
    ) -> Result<Client, TunnelError> {
        let pg_err = |e: tokio_postgres::Error| TunnelError {
            message: pg_message(&e),
            config: false,
        };
        // `self.tls` is set exactly when `sslmode` is not `disable` (`parse`): the session
        // asks for TLS.
        if let (Some(tls), Host::Tcp(name)) = (&self.tls, host) {
            let inner = tls_for(tls, name)?;
            return match tap {
                Some(tap) => {
                    // Tapped twice: above TLS when the server takes it, on the socket when
                    // it refuses (`sslmode=prefer`) and the session goes on in plain text.
                    // The socket's low-water mark, for each of the two taps.
                    let (low, above) = (wire.low_water(), wire.low_water());
                    let direct = config.get_ssl_negotiation() == SslNegotiation::Direct;
                    let under = Tapped::under_tls(wire, tap.clone(), direct).with_low_water(low);
                    over(
                        config,
                        under,
                        TapTls {
                            inner,
                            tap,
                            low: above,
                        },
                    )
                    .await
                }
                None => over(config, wire, inner).await,
            }
            .map_err(pg_err);
        }
        // libpq never uses TLS over a Unix socket.
        let mut config = config.clone();
        if matches!(host, Host::Unix(_)) {
            config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        }
        match tap {
            Some(tap) => {
                let low = wire.low_water();
                over(&config, Tapped::new(wire, tap).with_low_water(low), NoTls).await
            }
            None => over(&config, wire, NoTls).await,
        }
        .map_err(pg_err)
    }

    /// Cancels the statement running on the session `c` belongs to, over the same TLS
    /// settings (and SSH bastion) the session uses, on the host the session reached.
    pub(crate) async fn cancel(&self, c: &Canceller) -> Result<(), Error> {
        let failed = |message: String| Error::Connect {
            role: "cancel",
            target: self.shown.clone(),
            message,
        };
        let pg = |e: tokio_postgres::Error| failed(pg_message(&e));
        let token = &c.token;
        // A session on a socket pgdelta opened carries no socket settings in its token: the
        // cancel goes over a socket opened the same way, to the host the session reached.
        let Some(Reached { host, port }) = &c.reached else {
            return match &self.tls {
                None => token.cancel_query(NoTls).await.map_err(pg),
                Some(tls) => token
                    .cancel_query(MakeRustlsConnect::new(tls.clone()))
                    .await
                    .map_err(pg),
            };
        };
        let wire = self
            .open_wire(&self.config, host, *port)
            .await
            .map_err(|e| failed(e.message))?;
        match (&self.tls, host) {
            (Some(tls), Host::Tcp(name)) => {
                let connector = tls_for(tls, name).map_err(|e| failed(e.message))?;
                token.cancel_query_raw(wire, connector).await.map_err(pg)
            }
            _ => token.cancel_query_raw(wire, NoTls).await.map_err(pg),
        }
    }
}

/// The host of the connection string a session pgdelta opened reached.
#[derive(Debug, Clone)]
pub(crate) struct Reached {
    host: Host,
    port: u16,
}

/// What cancels a session's running statement: its token and, when pgdelta opened the
/// session's socket, the host it reached ([`ConnInfo::cancel`]).
#[derive(Clone)]
pub(crate) struct Canceller {
    pub(crate) token: tokio_postgres::CancelToken,
    pub(crate) reached: Option<Reached>,
}

/// Checks a new session against the connection string's `target_session_attrs`, as libpq
/// does (`transaction_read_only` for read-write and read-only, `pg_is_in_recovery()` for
/// primary and standby): a session that does not meet it fails, and the next host is tried.
async fn session_attrs_met(client: &Client, want: SessionAttrs) -> Result<(), TunnelError> {
    let failed = |e: tokio_postgres::Error| TunnelError {
        message: pg_message(&e),
        config: false,
    };
    if matches!(want, SessionAttrs::Any | SessionAttrs::PreferStandby) {
        return Ok(());
    }
    let row = client
        .query_one(
            "SELECT current_setting('transaction_read_only') = 'on', pg_is_in_recovery()",
            &[],
        )
        .await
        .map_err(failed)?;
    let (read_only, standby): (bool, bool) = (row.get(0), row.get(1));
    let problem = match want {
        SessionAttrs::ReadWrite if read_only => {
            "the server is read-only (target_session_attrs=read-write)"
        }
        SessionAttrs::ReadOnly if !read_only => {
            "the server accepts writes (target_session_attrs=read-only)"
        }
        SessionAttrs::Primary if standby => {
            "the server is a hot standby (target_session_attrs=primary)"
        }
        SessionAttrs::Standby if !standby => {
            "the server is not a hot standby (target_session_attrs=standby)"
        }
        _ => return Ok(()),
    };
    Err(TunnelError {
        message: problem.to_string(),
        config: false,
    })
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
) -> Result<<MakeRustlsConnect as MakeTlsConnect<Wire>>::TlsConnect, TunnelError> {
    let mut make = MakeRustlsConnect::new(tls.clone());
    MakeTlsConnect::<Wire>::make_tls_connect(&mut make, name).map_err(|e| TunnelError {
        message: format!("TLS setup for {name}: {e}"),
        config: true,
    })
}

/// A session over `stream`, its connection driven on the runtime.
async fn over<S, T>(config: &Config, stream: S, tls: T) -> Result<Client, tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: TlsConnect<S>,
    T::Stream: Send + 'static,
{
    let (client, connection) = config.connect_raw(stream, tls).await?;
    spawn(connection);
    Ok(client)
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

/// `f`, failed with "timed out" when it takes longer than `timeout`.
async fn within<T>(
    timeout: Option<Duration>,
    f: impl std::future::Future<Output = Result<T, TunnelError>>,
) -> Result<T, TunnelError> {
    timed(timeout, f, |message| TunnelError {
        message,
        config: false,
    })
    .await
}

/// `f`, or the error `timed_out` makes of "timed out after N s" when it takes longer than
/// `timeout` (`None`: no limit).
async fn timed<T, E>(
    timeout: Option<Duration>,
    f: impl std::future::Future<Output = Result<T, E>>,
    timed_out: impl FnOnce(String) -> E,
) -> Result<T, E> {
    let Some(t) = timeout else { return f.await };
    tokio::time::timeout(t, f)
        .await
        .unwrap_or_else(|_| Err(timed_out(format!("timed out after {} s", t.as_secs_f64()))))
}

/// A TCP connection to the first of `addrs` that accepts one, each address given `timeout`
/// alone, as libpq's `connect_timeout` is: a host name whose first address is dead (a
/// black-holed IPv6 route, a stopped server still in DNS) costs that address's timeout, not
/// the whole host's. The error is the last address's.
async fn connect_any(
    addrs: impl IntoIterator<Item = std::net::SocketAddr>,
    timeout: Option<Duration>,
) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in addrs {
        let attempt = timed(timeout, TcpStream::connect(addr), |m| {
            std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{addr}: {m}"))
        });
        match attempt.await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the host")
    }))
}

/// TCP without Nagle's delay, and the connection string's keepalives and user timeout, as
/// tokio-postgres sets them on the sockets it opens.
fn tcp_options(stream: &TcpStream, config: &Config) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let sock = socket2::SockRef::from(stream);
    if let Some(t) = config.get_tcp_user_timeout() {
        sock.set_tcp_user_timeout(Some(*t))?;
    }
    if config.get_keepalives() {
        let mut keepalive = socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
        if let Some(interval) = config.get_keepalives_interval() {
            keepalive = keepalive.with_interval(interval);
        }
        if let Some(retries) = config.get_keepalives_retries() {
            keepalive = keepalive.with_retries(retries);
        }
        sock.set_tcp_keepalive(&keepalive)?;
    }
    Ok(())
}

/// A byte stream to a server that pgdelta opened: TCP, the server's socket file, or a channel
/// through the SSH bastion.
pub(crate) enum Wire {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tunnel(TunnelStream),
}

impl Wire {
    /// A TCP socket's low-water mark, for a tap to raise while rows flow (set on TCP only:
    /// a Unix socket's readiness is not known to consider it, a tunnel has no socket).
    fn low_water(&self) -> Option<crate::tap::LowWater> {
        match self {
            Wire::Tcp(s) => Some(crate::tap::LowWater::of(s)),
            Wire::Unix(_) | Wire::Tunnel(_) => None,
        }
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Wire::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Wire::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Wire::Tunnel(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Wire::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Wire::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Wire::Tunnel(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Wire::Tcp(s) => Pin::new(s).poll_flush(cx),
            Wire::Unix(s) => Pin::new(s).poll_flush(cx),
            Wire::Tunnel(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Wire::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Wire::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Wire::Tunnel(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
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
        "sslmode" | "sslrootcert" | "passfile" | "target_session_attrs" => {
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

/// Commits `tx` only if the server still holds it open, and fails otherwise.
///
/// tokio-postgres returns from COPY and `execute` at CommandComplete; an error the server
/// raises after it (a statement timeout that fired as the statement ended) aborts the
/// transaction unseen, and `COMMIT` of an aborted transaction answers `ROLLBACK` without an
/// error: what the transaction wrote would be counted and recorded but not there
/// (`tests/resilience.rs::statement_timeout_*` lost 188 of 3,000 rows under load before this
/// check; the cause is inferred from that and from the check ending it, not observed on the
/// wire). The statement sent first fails in an aborted transaction (SQLSTATE 25P02, which
/// [`crate::error::classify_sqlstate`] takes as transient: the write is retried).
pub async fn commit(tx: tokio_postgres::Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute("SELECT").await?;
    tx.commit().await
}

/// What a connection string tokio-postgres could not parse gets as its error: what was wrong
/// (the option, or where the string broke off), never a value from it.
fn parse_failed(e: &tokio_postgres::Error) -> String {
    // tokio-postgres' message is only "invalid connection string"; the why is its source. The
    // parser quotes the character it met where it expected another, which may be a password's.
    let why = std::error::Error::source(e).map_or_else(
        || e.to_string(),
        |c| {
            let c = c.to_string();
            match c.split_once(" but got ") {
                Some((head, _)) => head.to_string(),
                None => c,
            }
        },
    );
    format!(
        "invalid connection string: {why}; expected postgres://user@host:port/db or 'host=... dbname=...'"
    )
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

    /// A local address whose connects hang, as a black-holed route's do: a listener that never
    /// accepts, its accept queue full (Linux then drops further SYNs). Keep the values alive.
    async fn black_hole() -> (
        std::net::SocketAddr,
        tokio::net::TcpListener,
        Vec<TcpStream>,
    ) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        loop {
            let attempt =
                tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr));
            match attempt.await {
                Ok(Ok(s)) if queued.len() < 16 => queued.push(s),
                Ok(r) => panic!("the accept queue never filled: {r:?}"),
                Err(_) => return (addr, listener, queued),
            }
        }
    }

    #[test]
    fn pgdelta_opens_the_sockets_of_hosts_it_tries_in_turn() {
        let opens = |s: &str| ConnInfo::parse(s).unwrap().opens_sockets();
        assert!(opens("host=/run/pg port=5432 dbname=d user=u"));
        assert!(opens("host=a,b,c port=5432 dbname=d user=u"));
        assert!(opens(
            "postgres://u@a:5432,b:5433/d?target_session_attrs=read-write"
        ));
        assert!(opens(
            "host=a,b dbname=d user=u target_session_attrs=read-only"
        ));
        // tokio-postgres opens the sockets where it picks the address or the host itself.
        assert!(!opens("host=a hostaddr=10.0.0.1 dbname=d user=u"));
        assert!(!opens("host=a,b dbname=d user=u load_balance_hosts=random"));
    }

    /// libpq's six `target_session_attrs`, from the string or the environment; the three
    /// tokio-postgres does not know need the hosts pgdelta tries itself.
    #[test]
    fn every_target_session_attrs_of_libpq_is_taken() {
        let attrs =
            |s: &str, vars: &[(&str, &str)]| ConnInfo::parse_with(s, &env(vars)).map(|c| c.attrs);
        // The names as libpq spells them, each to its own setting.
        let names: Vec<&str> = SessionAttrs::NAMED.iter().map(|(n, _)| *n).collect();
        let libpq = [
            "any",
            "read-write",
            "read-only",
            "primary",
            "standby",
            "prefer-standby",
        ];
        assert_eq!(names, libpq);
        assert_eq!(
            SessionAttrs::parse("read-only").unwrap(),
            SessionAttrs::ReadOnly
        );
        assert_eq!(
            SessionAttrs::parse(" standby").unwrap(),
            SessionAttrs::Standby
        );
        let prefer = SessionAttrs::parse("prefer-standby").unwrap();
        assert_eq!(prefer, SessionAttrs::PreferStandby);
        for (v, want) in SessionAttrs::NAMED {
            let url = format!("postgres://u@a:5432,b:5433/d?target_session_attrs={v}");
            assert_eq!(attrs(&url, &[]).unwrap(), want, "{v}");
            let kv = format!("host=a,b dbname=d user=u target_session_attrs={v}");
            assert_eq!(attrs(&kv, &[]).unwrap(), want, "{v}");
            assert_eq!(
                attrs("host=a dbname=d user=u", &[("PGTARGETSESSIONATTRS", v)]).unwrap(),
                want,
                "{v}"
            );
            assert_eq!(want.name(), v);
        }
        // The string's setting wins over the environment's.
        let s = "host=a dbname=d user=u target_session_attrs=primary";
        let got = attrs(s, &[("PGTARGETSESSIONATTRS", "standby")]).unwrap();
        assert_eq!(got, SessionAttrs::Primary);
        assert_eq!(
            attrs("host=a dbname=d user=u", &[]).unwrap(),
            SessionAttrs::Any
        );
        // tokio-postgres' own check is kept for its three, where it opens the sockets.
        let c = ConnInfo::parse(
            "host=a hostaddr=10.0.0.1 dbname=d user=u target_session_attrs=read-write",
        )
        .unwrap();
        assert_eq!(
            c.config.get_target_session_attrs(),
            tokio_postgres::config::TargetSessionAttrs::ReadWrite
        );
        for s in [
            "host=a hostaddr=10.0.0.1 dbname=d user=u target_session_attrs=primary",
            "host=a,b dbname=d user=u load_balance_hosts=random target_session_attrs=prefer-standby",
        ] {
            let Err(Error::Config(m)) = ConnInfo::parse(s) else {
                panic!("{s} was taken")
            };
            assert!(m.contains("needs the hosts named with host"), "{m}");
        }
    }

    #[tokio::test]
    async fn each_address_has_the_connect_timeout_to_itself() {
        let (dead, _l, _q) = black_hole().await;
        let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let live_addr = live.local_addr().unwrap();
        let t = Some(Duration::from_millis(300));
        // A dead first address costs its own timeout; the next address is tried.
        let started = std::time::Instant::now();
        let stream = connect_any([dead, live_addr], t).await.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), live_addr);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        // Every address dead: the last one's timeout is the error.
        let e = connect_any([dead, dead], t).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains(&dead.to_string()), "{e}");
        let e = connect_any([], t).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
    }

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

    /// A string tokio-postgres cannot parse is refused with what was wrong in it (its own
    /// message names no option), and nothing of its values.
    #[test]
    fn unparsable_strings_say_why_and_quote_no_value() {
        let err = |s: &str| match ConnInfo::parse_with(s, &env(&[])) {
            Err(Error::Config(m)) => m,
            other => panic!("{s}: {:?}", other.map(|c| c.to_string())),
        };
        let m = err("postgres://u:s3cret@h/d?target_session_attrs=master");
        assert!(
            m.contains("invalid target_session_attrs 'master'")
                && m.contains("read-only, primary, standby or prefer-standby"),
            "{m}"
        );
        assert!(!m.contains("s3cret"), "{m}");
        let m = err("host=h password=s3cret port=x");
        assert!(m.contains("invalid value for option `port`"), "{m}");
        assert!(!m.contains("s3cret"), "{m}");
        // The parser quotes the character it met: here the first of a password.
        let m = err("host=h password Zecret");
        assert!(m.contains("unexpected character at byte"), "{m}");
        assert!(!m.contains('Z'), "{m}");
        let m = err("host=h password='s3cret");
        assert!(m.contains("unterminated quoted"), "{m}");
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
