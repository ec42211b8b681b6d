//! Throwaway local PostgreSQL clusters, for the demo and for every integration test.
//!
//! `initdb` into a temporary directory, `wal_level = logical`, a free TCP port on 127.0.0.1, the
//! Unix socket inside the temporary directory, everything removed on `Drop`. When we run as root
//! (initdb refuses root), the server runs as the `postgres` user. The server is started with a
//! parent-death signal (SIGQUIT, immediate shutdown) so a killed test binary or demo leaves no
//! server behind; the process that starts it must therefore outlive the cluster (see
//! [`Cluster::start`]).

use std::ffi::CString;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How clients must authenticate on TCP (Unix-socket connections stay `trust`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// No password.
    Trust,
    /// `password` (cleartext).
    Password,
    /// md5 challenge.
    Md5,
    /// SCRAM-SHA-256.
    Scram,
}

impl AuthMethod {
    fn hba(self) -> &'static str {
        match self {
            AuthMethod::Trust => "trust",
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::Scram => "scram-sha-256",
        }
    }
}

/// Options for a new cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// TCP authentication method.
    pub auth: AuthMethod,
    /// Password of the `postgres` superuser (set when `auth` is not `Trust`).
    pub password: String,
    /// Server certificate and key (PEM), to run with `ssl = on`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Only accept TLS on TCP (`hostssl` lines only).
    pub tls_only: bool,
    /// Extra `postgresql.conf` settings.
    pub settings: Vec<(String, String)>,
    /// `pg_hba.conf` lines for TCP, replacing the generated ones (Unix sockets stay `trust`).
    pub hba_tcp: Option<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            auth: AuthMethod::Trust,
            password: "pgcarve-test".into(),
            tls: None,
            tls_only: false,
            settings: Vec::new(),
            hba_tcp: None,
        }
    }
}

/// A running throwaway cluster.
pub struct Cluster {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// TCP port on 127.0.0.1.
    pub port: u16,
    /// Superuser password (meaningful when auth is not trust).
    pub password: String,
    bindir: PathBuf,
}

/// Finds PostgreSQL server binaries: `PATH`, `pg_config --bindir`, `/usr/lib/postgresql/*/bin`
/// (newest first).
pub fn find_bindir() -> Option<PathBuf> {
    find_bindir_unresolved().map(|d| {
        // PATH may hold symlinks to a few server binaries only (e.g. /usr/local/bin/initdb);
        // the directory they point into has all of them (pg_isready too).
        std::fs::canonicalize(d.join("initdb"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or(d)
    })
}

fn find_bindir_unresolved() -> Option<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("PGCARVE_PG_BINDIR").map(PathBuf::from) {
        if has(&dir) {
            return Some(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has(&d) {
                return Some(d);
            }
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has(&d) {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has(d))
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

/// The message to show when no server binaries are installed.
pub const INSTALL_HINT: &str = "PostgreSQL server binaries (initdb, postgres) not found in PATH, \
`pg_config --bindir` or /usr/lib/postgresql/*/bin; install them (Debian/Ubuntu: \
`apt-get install -y postgresql`; Fedora: `dnf install postgresql-server`) or set PGCARVE_PG_BINDIR";

/// The uid/gid to run the server as: `postgres` when we are root, ourselves otherwise.
fn server_identity() -> io::Result<Option<(libc::uid_t, libc::gid_t)>> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new("postgres").expect("static name");
    // SAFETY: getpwnam returns a pointer to static storage or null; we copy the ids out at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(io::Error::other(
            "running as root, and there is no `postgres` user to run the server as (initdb refuses root)",
        ));
    }
    // SAFETY: pw is non-null and points to a valid passwd record.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
}

fn chown_tree(path: &Path, id: Option<(libc::uid_t, libc::gid_t)>) -> io::Result<()> {
    if let Some((uid, gid)) = id {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Builds a command that runs as `id` (when set), with a clean, deterministic environment.
fn command(
    program: &Path,
    id: Option<(libc::uid_t, libc::gid_t)>,
    die_with_parent: bool,
) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env("LC_ALL", "C")
        .env("LANG", "C")
        .env("PATH", "/usr/bin:/bin")
        .env("TZ", "UTC");
    // SAFETY: the closure only calls async-signal-safe functions (prctl, setsid, setgroups,
    // setgid, setuid).
    unsafe {
        cmd.pre_exec(move || {
            // Own session: a terminal Ctrl-C reaches the demo, which then stops cleanly and can
            // still compare the databases, instead of also stopping the server under it.
            if die_with_parent && libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((uid, gid)) = id {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // After setuid: changing credentials clears the parent-death signal.
            if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Removes leftovers of clusters whose process is gone (a test binary's static clusters are never
/// dropped; their servers die with it, their directories stay). Only directories untouched for
/// ten minutes are considered, so a cluster being set up by another process is safe.
pub fn reap_stale_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("pgcarve-pg-") {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600))
            .unwrap_or(false);
        let pidfile = e.path().join("data/postmaster.pid");
        let alive = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
            // SAFETY: signal 0 only checks that the process exists.
            .map(|pid| unsafe { libc::kill(pid, 0) } == 0)
            .unwrap_or(false);
        if old && !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Cluster {
    /// initdb and start a cluster. The calling thread must outlive the cluster: the server gets
    /// SIGQUIT when the thread that started it exits (tests start clusters from a long-lived
    /// thread; see `tests/common`).
    pub fn start(opts: &ClusterOptions) -> io::Result<Cluster> {
        let bindir = find_bindir().ok_or_else(|| io::Error::other(INSTALL_HINT))?;
        let id = server_identity()?;
        let mut dir = tempfile::Builder::new().prefix("pgcarve-pg-").tempdir()?;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock)?;
        chown_tree(dir.path(), id)?;
        chown_tree(&sock, id)?;

        let pwfile = dir.path().join("pwfile");
        std::fs::write(&pwfile, format!("{}\n", opts.password))?;
        chown_tree(&pwfile, id)?;
        let out = command(&bindir.join("initdb"), id, false)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
                "-A",
                "trust",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }

        let mut hba = String::from("local all all trust\nlocal replication all trust\n");
        let kind = if opts.tls_only { "hostssl" } else { "host" };
        match &opts.hba_tcp {
            Some(lines) => hba.push_str(lines),
            None => {
                for db in ["all", "replication"] {
                    hba.push_str(&format!(
                        "{kind} {db} all 127.0.0.1/32 {}\n",
                        opts.auth.hba()
                    ));
                    hba.push_str(&format!("{kind} {db} all ::1/128 {}\n", opts.auth.hba()));
                }
            }
        }
        std::fs::write(data.join("pg_hba.conf"), hba)?;

        let mut conf = String::new();
        let mut set = |k: &str, v: &str| conf.push_str(&format!("{k} = '{v}'\n"));
        set("listen_addresses", "127.0.0.1");
        set("unix_socket_directories", &sock.display().to_string());
        set("wal_level", "logical");
        // One slot per test environment, and the test binary shares one source cluster: the
        // slots of finished tests stay (inactive) until the cluster goes.
        set("max_wal_senders", "100");
        set("max_replication_slots", "200");
        set("max_connections", "200");
        // Two-phase transactions, so tests can see pgoutput's prepare messages.
        set("max_prepared_transactions", "10");
        set("fsync", "off");
        set("synchronous_commit", "on");
        set("full_page_writes", "off");
        set("shared_buffers", "64MB");
        set("logging_collector", "off");
        set("log_min_messages", "warning");
        set(
            "password_encryption",
            if opts.auth == AuthMethod::Md5 {
                "md5"
            } else {
                "scram-sha-256"
            },
        );
        if let Some((cert, key)) = &opts.tls {
            let c = dir.path().join("server.crt");
            let k = dir.path().join("server.key");
            std::fs::copy(cert, &c)?;
            std::fs::copy(key, &k)?;
            std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))?;
            chown_tree(&c, id)?;
            chown_tree(&k, id)?;
            set("ssl", "on");
            set("ssl_cert_file", &c.display().to_string());
            set("ssl_key_file", &k.display().to_string());
        }
        for (k, v) in &opts.settings {
            set(k, v);
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        io::Write::write_all(&mut f, conf.as_bytes())?;
        drop(f);

        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            let log = std::fs::File::create(dir.path().join("server.log"))?;
            chown_tree(&dir.path().join("server.log"), id)?;
            let child = command(&bindir.join("postgres"), id, true)
                .arg("-D")
                .arg(&data)
                .arg("-p")
                .arg(port.to_string())
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            let mut cluster = Cluster {
                dir,
                child: Some(child),
                port,
                password: opts.password.clone(),
                bindir: bindir.clone(),
            };
            match cluster.wait_ready() {
                Ok(()) => return Ok(cluster),
                Err(e) => {
                    last_err = Some(e);
                    cluster.stop();
                    dir = cluster.take_dir();
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("cluster did not start")))
    }

    /// Stops the server the way a crash would (immediate shutdown: no checkpoint, crash
    /// recovery on the next start) and starts it again on the same data and port.
    pub fn crash_and_restart(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            // SIGQUIT is PostgreSQL's "immediate" shutdown.
            // SAFETY: kill on a pid we own.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGQUIT);
            }
            child.wait()?;
        }
        let id = server_identity()?;
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("server.log"))?;
        let child = command(&self.bindir.join("postgres"), id, true)
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.stop();
        let placeholder = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, placeholder)
    }

    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let sock = self.socket_dir();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    return Err(io::Error::other(format!(
                        "postgres exited with {status}: {}",
                        self.server_log_tail()
                    )));
                }
            }
            let ok = Command::new(self.bindir.join("pg_isready"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .arg("-h")
                .arg(&sock)
                .arg("-p")
                .arg(self.port.to_string())
                .arg("-q")
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::other("postgres did not become ready in 60 s"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of the server log, for error messages.
    pub fn server_log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Directory holding the Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// The cluster's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A libpq URI for `dbname` over TCP as `postgres`, with the given sslmode.
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "postgresql://postgres@127.0.0.1:{}/{}?sslmode=disable",
            self.port, dbname
        )
    }

    /// A libpq URI over the Unix socket.
    pub fn socket_url(&self, dbname: &str) -> String {
        format!(
            "postgresql://postgres@/{}?host={}&port={}",
            dbname,
            self.socket_dir().display(),
            self.port
        )
    }

    /// Server binaries in use.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Immediate shutdown (as after a crash) or fast shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGINT is PostgreSQL's "fast" shutdown: roll back, checkpoint, exit.
            // SAFETY: kill on a pid we own.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGINT);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
