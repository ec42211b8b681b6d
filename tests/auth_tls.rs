//! Authentication methods and TLS modes against a real server, for both the replication
//! connection and normal tokio-postgres connections.
//!
//! One extra cluster for this module runs with `ssl = on`, a test CA's server certificate
//! (`CN=localhost`, `subjectAltName=DNS:localhost`, no IP SAN) and per-user `pg_hba.conf` rules,
//! so every method and mode is tried on one server:
//!
//! | role         | pg_hba (TCP)                                   |
//! |--------------|------------------------------------------------|
//! | tls_user     | hostssl scram-sha-256, plain TCP rejected      |
//! | scram_user   | scram-sha-256                                  |
//! | md5_user     | md5 (password stored as md5)                   |
//! | pw_user      | password (cleartext)                           |
//! | special_user | scram-sha-256, password full of URI delimiters |
//! | others       | trust                                          |

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use pgcarve::conninfo::{ConnInfo, SslMode};
use pgcarve::localpg::{Cluster, ClusterOptions};
use pgcarve::source::conn::{ConnError, ReplicationConn};
use pgcarve::tls::{TlsConnector, TlsError};

use crate::common::{clusters, connect, start_on_keeper_thread};

/// Database every role connects to.
const DB: &str = "authdb";
/// Every role's password. Distinctive, so a leak into an error message is easy to spot.
const PASSWORD: &str = "sekret-Qx7Lm2";
/// A wrong password, equally distinctive.
const WRONG: &str = "wrongpw-Zr4Tk9";
/// `special_user`'s password: URI delimiters, `%`, and a non-ASCII letter (SASLprep).
const SPECIAL: &str = "p@ss:w/rd?&=%#\u{e9}";

/// The TLS cluster; the client-side CA files live in `<cluster dir>/client`, so they go away
/// with the cluster's directory (statics are never dropped; `reap_stale_dirs` removes both).
struct TlsCluster {
    cluster: Cluster,
}

impl TlsCluster {
    /// The CA that signed the server certificate.
    fn ca(&self) -> PathBuf {
        self.client_dir().join("ca.crt")
    }

    /// An unrelated CA.
    fn other_ca(&self) -> PathBuf {
        self.client_dir().join("other-ca.crt")
    }

    /// A PEM file holding no certificate.
    fn no_cert(&self) -> PathBuf {
        self.client_dir().join("no-cert.pem")
    }

    fn client_dir(&self) -> PathBuf {
        self.cluster.dir().join("client")
    }

    /// `postgresql://user[:password]@host:port/authdb?params`.
    fn url(&self, user: &str, password: Option<&str>, host: &str, params: &str) -> String {
        let auth = match password {
            Some(pw) => format!("{user}:{pw}"),
            None => user.to_string(),
        };
        format!(
            "postgresql://{auth}@{host}:{}/{DB}?{params}",
            self.cluster.port
        )
    }
}

static TLS_CLUSTER: OnceLock<TlsCluster> = OnceLock::new();

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl (is the openssl CLI installed?)");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA `<name>.crt` / `<name>.key` in `dir`.
fn make_ca(dir: &Path, name: &str) {
    let (crt, key) = (format!("{name}.crt"), format!("{name}.key"));
    let subj = format!("/CN=pgcarve test {name}");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &crt,
            "-days",
            "3650",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

/// CA, server certificate for `localhost` signed by it (DNS SAN only), and an unrelated CA.
fn make_certs() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("pgcarve-certs-")
        .tempdir()
        .expect("cert tempdir");
    let d = dir.path();
    make_ca(d, "ca");
    make_ca(d, "other-ca");
    openssl(
        d,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=DNS:localhost\n\
         basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\n\
         extendedKeyUsage=serverAuth\n",
    )
    .expect("write server.ext");
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-set_serial",
            "0x5eed1234",
            "-days",
            "3650",
            "-extfile",
            "server.ext",
            "-out",
            "server.crt",
        ],
    );
    dir
}

fn hba_lines() -> String {
    let mut hba = String::new();
    for net in ["127.0.0.1/32", "::1/128"] {
        for (kind, user, method) in [
            ("hostssl", "tls_user", "scram-sha-256"),
            ("host", "tls_user", "reject"),
            ("host", "scram_user", "scram-sha-256"),
            ("host", "md5_user", "md5"),
            ("host", "pw_user", "password"),
            ("host", "special_user", "scram-sha-256"),
        ] {
            hba.push_str(&format!("{kind} all {user} {net} {method}\n"));
        }
    }
    // Trust last: `postgres` and anyone else.
    for net in ["127.0.0.1/32", "::1/128"] {
        hba.push_str(&format!("host all all {net} trust\n"));
    }
    hba
}

async fn create_roles(cluster: &Cluster) {
    let admin = connect(&cluster.socket_url("postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .await
        .expect("create database");
    admin
        .batch_execute(&format!(
            "CREATE ROLE scram_user LOGIN REPLICATION PASSWORD '{PASSWORD}';
             CREATE ROLE tls_user LOGIN REPLICATION PASSWORD '{PASSWORD}';
             CREATE ROLE pw_user LOGIN REPLICATION PASSWORD '{PASSWORD}';
             CREATE ROLE special_user LOGIN REPLICATION PASSWORD '{SPECIAL}';
             SET password_encryption = 'md5';
             CREATE ROLE md5_user LOGIN REPLICATION PASSWORD '{PASSWORD}';
             RESET password_encryption;
             REVOKE CONNECT ON DATABASE {DB} FROM PUBLIC;
             GRANT CONNECT ON DATABASE {DB} TO scram_user, tls_user, pw_user, md5_user,
                 special_user;"
        ))
        .await
        .expect("create roles");
}

/// The TLS cluster of this module, started once.
fn tls_cluster() -> &'static TlsCluster {
    TLS_CLUSTER.get_or_init(|| {
        pgcarve::localpg::reap_stale_dirs();
        start_on_keeper_thread(|| {
            // Generated in a temporary directory of their own (removed at the end of this
            // closure): the cluster copies the server's pair, we copy the CAs.
            let certs = make_certs();
            let cluster = Cluster::start(&ClusterOptions {
                tls: Some((
                    certs.path().join("server.crt"),
                    certs.path().join("server.key"),
                )),
                hba_tcp: Some(hba_lines()),
                ..ClusterOptions::default()
            })
            .expect("start TLS cluster");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(create_roles(&cluster));
            let client = cluster.dir().join("client");
            std::fs::create_dir(&client).expect("client cert dir");
            for f in ["ca.crt", "other-ca.crt"] {
                std::fs::copy(certs.path().join(f), client.join(f)).expect("copy CA");
            }
            std::fs::write(
                client.join("no-cert.pem"),
                "this file holds no certificate\n",
            )
            .expect("write no-cert.pem");
            TlsCluster { cluster }
        })
    })
}

/// Replication connection + IDENTIFY_SYSTEM; returns whether it ran over TLS.
async fn try_repl(url: &str) -> Result<bool, ConnError> {
    let info = ConnInfo::parse(url).expect("parse URL");
    let tls = TlsConnector::new(&info).expect("TLS connector");
    let mut conn = ReplicationConn::connect(&info, &tls).await?;
    let sys = conn.identify_system().await?;
    assert_eq!(sys.dbname, info.dbname);
    let is_tls = conn.is_tls();
    conn.close().await;
    Ok(is_tls)
}

/// Normal tokio-postgres connection + `SELECT 1`; returns whether it ran over TLS (pg_stat_ssl).
async fn try_sql(url: &str) -> Result<bool, tokio_postgres::Error> {
    let info = ConnInfo::parse(url).expect("parse URL");
    let tls = TlsConnector::new(&info).expect("TLS connector");
    let (client, conn) = info.to_tokio_config().connect(tls).await?;
    let driver = tokio::spawn(conn);
    let one: i32 = client.query_one("SELECT 1", &[]).await?.get(0);
    assert_eq!(one, 1);
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?
        .get(0);
    drop(client);
    let _ = driver.await;
    Ok(ssl)
}

/// Both connections succeed, over TLS exactly when `tls` says.
async fn assert_connects(url: &str, tls: bool) {
    let repl = try_repl(url)
        .await
        .unwrap_or_else(|e| panic!("replication connection to {url}: {e}"));
    assert_eq!(repl, tls, "replication connection TLS to {url}");
    let sql = try_sql(url)
        .await
        .unwrap_or_else(|e| panic!("tokio-postgres connection to {url}: {e}"));
    assert_eq!(sql, tls, "tokio-postgres connection TLS to {url}");
}

/// An error and all its sources, `: `-separated (tokio-postgres keeps the cause out of Display).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn sqlstate(e: &tokio_postgres::Error) -> Option<&str> {
    e.code().map(|c| c.code())
}

/// Both connections fail with SQLSTATE `code`.
async fn assert_sqlstate(url: &str, code: &str) {
    let repl = try_repl(url)
        .await
        .expect_err("replication connection should fail");
    assert!(
        matches!(&repl, ConnError::Server { code: c, .. } if c == code),
        "replication connection: expected SQLSTATE {code}, got {repl:?}"
    );
    let sql = try_sql(url)
        .await
        .expect_err("tokio-postgres connection should fail");
    assert_eq!(sqlstate(&sql), Some(code), "tokio-postgres: {sql}");
}

/// Both connections fail in the TLS handshake on certificate verification, for the reason
/// `why` (a piece of rustls's message, e.g. `UnknownIssuer`).
async fn assert_cert_rejected(url: &str, why: &str) {
    let repl = try_repl(url)
        .await
        .expect_err("replication connection should fail");
    assert!(
        matches!(&repl, ConnError::Io(_)) && repl.to_string().contains(why),
        "replication connection: expected a certificate error ({why}), got {repl:?} ({repl})"
    );
    let sql = try_sql(url)
        .await
        .expect_err("tokio-postgres connection should fail");
    assert!(
        sqlstate(&sql).is_none() && chain(&sql).contains(why),
        "tokio-postgres: expected a certificate error ({why}), got {}",
        chain(&sql)
    );
}

#[tokio::test]
async fn scram_sha_256_accepts_right_password_and_rejects_wrong_one() {
    let t = tls_cluster();
    let ok = t.url("scram_user", Some(PASSWORD), "127.0.0.1", "sslmode=disable");
    assert_connects(&ok, false).await;
    let bad = t.url("scram_user", Some(WRONG), "127.0.0.1", "sslmode=disable");
    assert_sqlstate(&bad, "28P01").await;
}

#[tokio::test]
async fn md5_accepts_right_password_and_rejects_wrong_one() {
    let t = tls_cluster();
    // The password really is stored as md5, so the server asks for the md5 challenge (with a
    // SCRAM verifier it would switch to SCRAM).
    let admin = connect(&t.cluster.socket_url(DB)).await;
    let stored: String = admin
        .query_one(
            "SELECT left(rolpassword, 3) FROM pg_authid WHERE rolname = 'md5_user'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "md5");

    let ok = t.url("md5_user", Some(PASSWORD), "127.0.0.1", "sslmode=disable");
    assert_connects(&ok, false).await;
    let bad = t.url("md5_user", Some(WRONG), "127.0.0.1", "sslmode=disable");
    assert_sqlstate(&bad, "28P01").await;
}

#[tokio::test]
async fn cleartext_password_auth_works() {
    let t = tls_cluster();
    let ok = t.url("pw_user", Some(PASSWORD), "127.0.0.1", "sslmode=disable");
    assert_connects(&ok, false).await;
    let bad = t.url("pw_user", Some(WRONG), "127.0.0.1", "sslmode=disable");
    assert_sqlstate(&bad, "28P01").await;
}

#[tokio::test]
async fn percent_encoded_password_with_uri_delimiters_authenticates() {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    let t = tls_cluster();
    let encoded = utf8_percent_encode(SPECIAL, NON_ALPHANUMERIC).to_string();
    // In the userinfo part…
    let url = t.url(
        "special_user",
        Some(&encoded),
        "127.0.0.1",
        "sslmode=disable",
    );
    assert_connects(&url, false).await;
    // …and as the `password` query parameter.
    let url = t.url(
        "special_user",
        None,
        "127.0.0.1",
        &format!("sslmode=disable&password={encoded}"),
    );
    assert_connects(&url, false).await;
}

#[tokio::test]
async fn missing_password_fails_with_auth_error_naming_the_role() {
    let t = tls_cluster();
    for user in ["scram_user", "md5_user", "pw_user"] {
        let url = t.url(user, None, "127.0.0.1", "sslmode=disable");
        let repl = try_repl(&url).await.expect_err("no password: must fail");
        match &repl {
            ConnError::Auth(msg) => assert!(
                msg.contains(user) && msg.contains("password"),
                "auth error should name role {user} and the missing password: {msg}"
            ),
            other => panic!("{user}: expected ConnError::Auth, got {other:?}"),
        }
        let sql = try_sql(&url).await.expect_err("no password: must fail");
        assert!(
            chain(&sql).contains("password"),
            "{user}: tokio-postgres error should mention the password: {}",
            chain(&sql)
        );
    }
}

#[tokio::test]
async fn sslmode_require_connects_over_tls() {
    let t = tls_cluster();
    let url = t.url("tls_user", Some(PASSWORD), "127.0.0.1", "sslmode=require");
    assert_connects(&url, true).await;
}

#[tokio::test]
async fn sslmode_require_with_a_root_cert_checks_the_chain_like_libpq() {
    let t = tls_cluster();
    let good = format!("sslmode=require&sslrootcert={}", t.ca().display());
    assert_connects(&t.url("tls_user", Some(PASSWORD), "127.0.0.1", &good), true).await;
    let wrong = format!("sslmode=require&sslrootcert={}", t.other_ca().display());
    assert_cert_rejected(
        &t.url("tls_user", Some(PASSWORD), "127.0.0.1", &wrong),
        "UnknownIssuer",
    )
    .await;
}

#[tokio::test]
async fn sslmode_disable_is_rejected_for_hostssl_only_user() {
    let t = tls_cluster();
    let url = t.url("tls_user", Some(PASSWORD), "127.0.0.1", "sslmode=disable");
    assert_sqlstate(&url, "28000").await;
}

#[tokio::test]
async fn sslmode_prefer_uses_tls_when_server_offers_it() {
    let t = tls_cluster();
    let url = t.url("tls_user", Some(PASSWORD), "127.0.0.1", "sslmode=prefer");
    assert_connects(&url, true).await;
    // prefer is the default.
    let url = t.url("tls_user", Some(PASSWORD), "127.0.0.1", "");
    assert_connects(&url, true).await;
}

#[tokio::test]
async fn sslmode_prefer_falls_back_to_plain_when_server_has_no_tls() {
    let c = clusters();
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=prefer",
        c.source.port
    );
    assert_connects(&url, false).await;
}

#[tokio::test]
async fn verify_full_with_ca_and_matching_host_name_works() {
    let t = tls_cluster();
    let params = format!("sslmode=verify-full&sslrootcert={}", t.ca().display());
    let url = t.url("tls_user", Some(PASSWORD), "localhost", &params);
    assert_connects(&url, true).await;
}

#[tokio::test]
async fn verify_full_rejects_ip_host_not_named_in_certificate() {
    let t = tls_cluster();
    let params = format!("sslmode=verify-full&sslrootcert={}", t.ca().display());
    let url = t.url("tls_user", Some(PASSWORD), "127.0.0.1", &params);
    assert_cert_rejected(&url, "not valid for name").await;
}

#[tokio::test]
async fn verify_ca_accepts_ip_host_because_name_is_not_checked() {
    let t = tls_cluster();
    let params = format!("sslmode=verify-ca&sslrootcert={}", t.ca().display());
    let url = t.url("tls_user", Some(PASSWORD), "127.0.0.1", &params);
    assert_connects(&url, true).await;
}

#[tokio::test]
async fn verify_modes_reject_certificate_from_wrong_ca() {
    let t = tls_cluster();
    for (mode, host) in [
        ("verify-ca", "127.0.0.1"),
        ("verify-ca", "localhost"),
        ("verify-full", "localhost"),
    ] {
        let params = format!("sslmode={mode}&sslrootcert={}", t.other_ca().display());
        let url = t.url("tls_user", Some(PASSWORD), host, &params);
        assert_cert_rejected(&url, "UnknownIssuer").await;
    }
}

#[tokio::test]
async fn verify_modes_fail_early_without_usable_root_cert() {
    let t = tls_cluster();
    // A missing file, and a file that holds no certificate.
    let no_cert = t.no_cert();
    for root in [Path::new("/nonexistent/ca.pem"), no_cert.as_path()] {
        for mode in ["verify-ca", "verify-full"] {
            let url = format!(
                "postgresql://tls_user:{PASSWORD}@localhost:{}/{DB}?sslmode={mode}&sslrootcert={}",
                t.cluster.port,
                root.display()
            );
            let info = ConnInfo::parse(&url).unwrap();
            match TlsConnector::new(&info) {
                Err(TlsError::RootCert { path, .. }) => {
                    assert_eq!(Path::new(&path), root, "{mode}")
                }
                other => panic!(
                    "{mode} with {}: expected RootCert, got {other:?}",
                    root.display()
                ),
            }
        }
    }

    // No sslrootcert at all: ~/.postgresql/root.crt is the fallback. Only checked when that file
    // does not exist (tests share the process environment, so HOME is not changed here).
    let home = std::env::var_os("HOME").unwrap_or_default();
    if Path::new(&home).join(".postgresql/root.crt").exists() {
        eprintln!("~/.postgresql/root.crt exists; NoRootCert not checked");
        return;
    }
    for mode in ["verify-ca", "verify-full"] {
        let url = format!(
            "postgresql://tls_user@localhost:{}/{DB}?sslmode={mode}",
            t.cluster.port
        );
        let info = ConnInfo::parse(&url).unwrap();
        match TlsConnector::new(&info) {
            Err(e @ TlsError::NoRootCert(m)) => {
                assert_eq!(m, info.sslmode);
                assert!(e.to_string().contains("sslrootcert"), "{e}");
            }
            other => panic!("{mode} without sslrootcert: expected NoRootCert, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn sslmode_require_against_server_without_tls_is_refused() {
    let c = clusters();
    let url = format!(
        "postgresql://postgres@127.0.0.1:{}/postgres?sslmode=require",
        c.source.port
    );
    let repl = try_repl(&url).await.expect_err("must refuse plain TCP");
    assert!(
        matches!(repl, ConnError::TlsRefused(SslMode::Require)),
        "expected TlsRefused, got {repl:?}"
    );
    let sql = try_sql(&url).await.expect_err("must refuse plain TCP");
    assert!(
        sqlstate(&sql).is_none() && chain(&sql).contains("TLS"),
        "tokio-postgres: expected a TLS refusal, got {}",
        chain(&sql)
    );
}

#[tokio::test]
async fn errors_never_contain_the_password() {
    let t = tls_cluster();
    let mut shown = Vec::new();
    for (user, mode) in [
        ("scram_user", "disable"),
        ("md5_user", "disable"),
        ("pw_user", "disable"),
        ("tls_user", "require"),
    ] {
        let url = t.url(user, Some(WRONG), "127.0.0.1", &format!("sslmode={mode}"));
        let repl = try_repl(&url).await.expect_err("wrong password must fail");
        let sql = try_sql(&url).await.expect_err("wrong password must fail");
        shown.push(format!("{} / {repl:?}", chain(&repl)));
        shown.push(format!("{} / {sql:?}", chain(&sql)));
    }
    // Certificate failures, with the right password in the URL.
    let params = format!("sslmode=verify-full&sslrootcert={}", t.other_ca().display());
    let url = t.url("tls_user", Some(PASSWORD), "localhost", &params);
    let repl = try_repl(&url).await.expect_err("wrong CA must fail");
    let sql = try_sql(&url).await.expect_err("wrong CA must fail");
    shown.push(format!("{} / {repl:?}", chain(&repl)));
    shown.push(format!("{} / {sql:?}", chain(&sql)));
    // Setup failure and the parsed parameters themselves.
    let url = t.url(
        "tls_user",
        Some(PASSWORD),
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
    );
    let info = ConnInfo::parse(&url).unwrap();
    let e = TlsConnector::new(&info).expect_err("missing CA file");
    shown.push(format!("{} / {e:?}", chain(&e)));
    shown.push(format!("{info:?} / {}", info.display_target()));

    for text in &shown {
        assert!(
            !text.contains(PASSWORD) && !text.contains(WRONG),
            "password leaked: {text}"
        );
    }
}
