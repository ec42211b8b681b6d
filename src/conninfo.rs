//! Connection parameters parsed from a libpq URI.
//!
//! `postgresql://user:password@host:port/dbname?sslmode=verify-full&sslrootcert=/etc/ca.pem`
//!
//! We parse the URI ourselves rather than handing it to `tokio_postgres::Config`, because that
//! parser rejects `sslmode=verify-ca` and `verify-full`, and because the replication connection
//! (which tokio-postgres cannot open) needs the same parameters. A host starting with `/` (or the
//! `host` query parameter) names a Unix-socket directory, as in libpq.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::percent_decode_str;

use crate::secret::Secret;

/// TCP keepalives on every connection: a peer that vanished without a reset (a black-holed
/// network path) is noticed after idle + interval × retries, about a minute, instead of the
/// kernel's default of over two hours.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);
/// Between keepalive probes.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes before the connection is dropped.
pub const KEEPALIVE_RETRIES: u32 = 3;
/// Data sent and not acknowledged for this long drops the connection (Linux TCP_USER_TIMEOUT).
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(60);

/// How hard to insist on TLS, with libpq's names and meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, without certificate checks; plain otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS required, certificate not checked.
    Require,
    /// TLS required, the server certificate must chain to `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate must name the host we connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self, ConnInfoError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(ConnInfoError::BadSslMode(other.to_string())),
        })
    }

    /// Whether a certificate chain check is asked for.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        })
    }
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address, reached over TCP.
    Tcp(String),
    /// A directory holding the server's Unix socket `.s.PGSQL.<port>`.
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => f.write_str(h),
            Host::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Parsed connection parameters. `Debug` never shows the password.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Server address.
    pub host: Host,
    /// Server port.
    pub port: u16,
    /// Role to log in as.
    pub user: String,
    /// Password, from the URI or filled in later from env, file or credentials.
    pub password: Option<Secret>,
    /// Database name.
    pub dbname: String,
    /// TLS requirement.
    pub sslmode: SslMode,
    /// CA bundle for verify-ca / verify-full; `system` means the platform's store.
    pub sslrootcert: Option<PathBuf>,
    /// Give up a connection attempt after this long.
    pub connect_timeout: Duration,
    /// Reported in `pg_stat_activity`.
    pub application_name: String,
}

/// A URI that cannot be used. Messages never include the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnInfoError {
    /// Not a `postgresql://` or `postgres://` URI.
    #[error("connection URL must start with postgresql:// (libpq URI form)")]
    BadScheme,
    /// The port is not a number in range.
    #[error("invalid port {0:?} in connection URL")]
    BadPort(String),
    /// Unknown sslmode value.
    #[error("invalid sslmode {0:?}: use disable, prefer, require, verify-ca or verify-full")]
    BadSslMode(String),
    /// A query parameter we do not know.
    #[error("unknown connection parameter {0:?} (supported: sslmode, sslrootcert, host, port, user, dbname, connect_timeout, application_name)")]
    UnknownParam(String),
    /// Several hosts (libpq failover lists) are not supported.
    #[error("multiple hosts in one connection URL are not supported")]
    MultipleHosts,
    /// Percent-encoding that is not UTF-8.
    #[error("connection URL component {0} is not valid percent-encoded UTF-8")]
    BadEncoding(&'static str),
    /// connect_timeout not a whole number of seconds.
    #[error("invalid connect_timeout {0:?}: expected whole seconds")]
    BadTimeout(String),
    /// No database named.
    #[error("connection URL names no database (postgresql://user@host:port/DBNAME)")]
    NoDatabase,
}

fn decode(part: &str, what: &'static str) -> Result<String, ConnInfoError> {
    percent_decode_str(part)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ConnInfoError::BadEncoding(what))
}

impl ConnInfo {
    /// Parses a libpq URI.
    pub fn parse(url: &str) -> Result<Self, ConnInfoError> {
        let rest = url
            .strip_prefix("postgresql://")
            .or_else(|| url.strip_prefix("postgres://"))
            .ok_or(ConnInfoError::BadScheme)?;
        let (before_query, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.split_once('/') {
            Some((a, p)) => (a, p),
            None => (before_query, ""),
        };
        // The password may contain '@' when percent-encoded only; split at the last '@'.
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let mut user = String::new();
        let mut password = None;
        if let Some(u) = userinfo {
            match u.split_once(':') {
                Some((name, pw)) => {
                    user = decode(name, "user")?;
                    password = Some(Secret::new(decode(pw, "password")?));
                }
                None => user = decode(u, "user")?,
            }
        }
        if hostport.contains(',') {
            return Err(ConnInfoError::MultipleHosts);
        }
        let (host_part, port_part) = if let Some(stripped) = hostport.strip_prefix('[') {
            // IPv6 literal: [::1]:5432
            match stripped.split_once(']') {
                Some((h, rest)) => (h.to_string(), rest.strip_prefix(':').map(str::to_string)),
                None => (hostport.to_string(), None),
            }
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p.to_string())),
                None => (hostport.to_string(), None),
            }
        };
        let mut host_str = decode(&host_part, "host")?;
        let mut port: u16 = 5432;
        if let Some(p) = port_part.filter(|p| !p.is_empty()) {
            port = p.parse().map_err(|_| ConnInfoError::BadPort(p.clone()))?;
        }
        let mut dbname = decode(path, "dbname")?;
        let mut sslmode = SslMode::default();
        let mut sslrootcert = None;
        let mut connect_timeout = Duration::from_secs(10);
        let mut application_name = "pgcarve".to_string();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v, "query parameter")?;
            match k {
                "sslmode" => sslmode = SslMode::parse(&v)?,
                "sslrootcert" => sslrootcert = Some(PathBuf::from(v)),
                "host" => host_str = v,
                "port" => port = v.parse().map_err(|_| ConnInfoError::BadPort(v.clone()))?,
                "user" => user = v,
                "dbname" => dbname = v,
                "password" => password = Some(Secret::new(v)),
                "application_name" => application_name = v,
                "connect_timeout" => {
                    let secs: u64 = v
                        .parse()
                        .map_err(|_| ConnInfoError::BadTimeout(v.clone()))?;
                    connect_timeout = Duration::from_secs(secs.max(1));
                }
                other => return Err(ConnInfoError::UnknownParam(other.to_string())),
            }
        }
        if dbname.is_empty() {
            return Err(ConnInfoError::NoDatabase);
        }
        if user.is_empty() {
            user = std::env::var("USER").unwrap_or_else(|_| "postgres".into());
        }
        let host = if host_str.is_empty() {
            Host::Unix(PathBuf::from("/var/run/postgresql"))
        } else if host_str.starts_with('/') {
            Host::Unix(PathBuf::from(host_str))
        } else {
            Host::Tcp(host_str)
        };
        Ok(ConnInfo {
            host,
            port,
            user,
            password,
            dbname,
            sslmode,
            sslrootcert,
            connect_timeout,
            application_name,
        })
    }

    /// `host:port/dbname`, safe to log (no user, no password).
    pub fn display_target(&self) -> String {
        format!("{}:{}/{}", self.host, self.port, self.dbname)
    }

    /// The equivalent `tokio_postgres::Config` for normal (non-replication) connections. TLS
    /// verification is done by our connector, so verify modes become `require` here.
    pub fn to_tokio_config(&self) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        match &self.host {
            Host::Tcp(h) => c.host(h),
            Host::Unix(p) => c.host_path(p),
        };
        c.port(self.port)
            .user(&self.user)
            .dbname(&self.dbname)
            .application_name(&self.application_name)
            .connect_timeout(self.connect_timeout)
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(KEEPALIVE_RETRIES)
            .tcp_user_timeout(TCP_USER_TIMEOUT);
        if let Some(pw) = &self.password {
            c.password(pw.expose());
        }
        c.ssl_mode(match (self.sslmode, &self.host) {
            (_, Host::Unix(_)) | (SslMode::Disable, _) => tokio_postgres::config::SslMode::Disable,
            (SslMode::Prefer, _) => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_uri() {
        let c = ConnInfo::parse(
            "postgresql://carve:s%40cret@db.example:6543/monolith?sslmode=verify-full&sslrootcert=/etc/ca.pem",
        )
        .unwrap();
        assert_eq!(c.host, Host::Tcp("db.example".into()));
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "carve");
        assert_eq!(c.password.as_ref().unwrap().expose(), "s@cret");
        assert_eq!(c.dbname, "monolith");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
    }

    #[test]
    fn unix_socket_directory() {
        let c = ConnInfo::parse("postgresql://postgres@%2Ftmp%2Fpg:5999/db").unwrap();
        assert_eq!(c.host, Host::Unix("/tmp/pg".into()));
        let c = ConnInfo::parse("postgresql:///db?host=/run/pg&port=5433&user=u").unwrap();
        assert_eq!(c.host, Host::Unix("/run/pg".into()));
        assert_eq!(c.port, 5433);
        assert_eq!(c.user, "u");
    }

    #[test]
    fn ipv6_and_defaults() {
        let c = ConnInfo::parse("postgres://u@[::1]/d").unwrap();
        assert_eq!(c.host, Host::Tcp("::1".into()));
        assert_eq!(c.port, 5432);
        assert_eq!(c.sslmode, SslMode::Prefer);
    }

    #[test]
    fn rejects_bad_input_with_named_problem() {
        assert_eq!(
            ConnInfo::parse("mysql://x/y").unwrap_err(),
            ConnInfoError::BadScheme
        );
        assert!(matches!(
            ConnInfo::parse("postgresql://u@h:99999/d").unwrap_err(),
            ConnInfoError::BadPort(_)
        ));
        assert!(matches!(
            ConnInfo::parse("postgresql://u@h/d?sslmode=sometimes").unwrap_err(),
            ConnInfoError::BadSslMode(_)
        ));
        assert!(matches!(
            ConnInfo::parse("postgresql://u@h/d?sslcompression=1").unwrap_err(),
            ConnInfoError::UnknownParam(_)
        ));
        assert_eq!(
            ConnInfo::parse("postgresql://u@h").unwrap_err(),
            ConnInfoError::NoDatabase
        );
        assert_eq!(
            ConnInfo::parse("postgresql://u@h1,h2/d").unwrap_err(),
            ConnInfoError::MultipleHosts
        );
    }

    #[test]
    fn debug_hides_password() {
        let c = ConnInfo::parse("postgresql://u:hunter2@h/d").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!c.display_target().contains("hunter2"));
    }
}
