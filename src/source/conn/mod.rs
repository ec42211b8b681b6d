//! The replication connection, built on tokio and postgres-protocol because tokio-postgres has
//! no CopyBoth support.
//!
//! ```text
//!  connect ─► [SSLRequest ─► TLS] ─► StartupMessage(replication=database)
//!          ─► auth (trust | cleartext | md5 | SCRAM-SHA-256) ─► ReadyForQuery
//!          ─► simple queries (IDENTIFY_SYSTEM, CREATE_REPLICATION_SLOT, …)
//!          ─► START_REPLICATION … ─► CopyBothResponse ─► CopyData in both directions
//! ```
//!
//! Framing is ours: every backend message is `tag u8, length i32 (self-inclusive), body`. Frames
//! other than CopyBoth-specific ones are handed to `postgres_protocol`'s parser. Reading is
//! cancel-safe (bytes accumulate in our buffer; a frame is taken out only when complete), so the
//! reader loop can `select!` on it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::conninfo::{ConnInfo, Host, SslMode};
use crate::lsn::Lsn;
use crate::pg::{message_is_safe, quote_ident, quote_literal, sqlstate_name};
use crate::tls::{TlsConnector, TlsStream};

/// Largest backend message we accept; a bigger length means a corrupt stream.
const MAX_FRAME: usize = 1 << 30;

const TAG_COPY_DATA: u8 = b'd';
const TAG_COPY_DONE: u8 = b'c';
const TAG_COPY_BOTH_RESPONSE: u8 = b'W';
const TAG_COPY_OUT_RESPONSE: u8 = b'H';
const TAG_ERROR_RESPONSE: u8 = b'E';
const TAG_NOTICE_RESPONSE: u8 = b'N';
const TAG_READY_FOR_QUERY: u8 = b'Z';
const TAG_ROW_DESCRIPTION: u8 = b'T';
const TAG_DATA_ROW: u8 = b'D';
const TAG_COMMAND_COMPLETE: u8 = b'C';
const TAG_PARAMETER_STATUS: u8 = b'S';
const TAG_EMPTY_QUERY: u8 = b'I';

/// Errors on the replication connection. Server errors keep SQLSTATE and the primary message
/// (about slots, publications, auth: no row data), never DETAIL.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket-level failure.
    #[error("replication connection I/O: {0}")]
    Io(#[from] io::Error),
    /// The server answered with an ErrorResponse.
    #[error("server error {code}: {message}")]
    Server {
        /// SQLSTATE.
        code: String,
        /// Primary message.
        message: String,
    },
    /// TLS was required but the server refused it.
    #[error("server does not accept TLS but sslmode={0} requires it")]
    TlsRefused(SslMode),
    /// Authentication asked for something we cannot do.
    #[error("authentication: {0}")]
    Auth(String),
    /// The server sent something out of protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server closed the connection.
    #[error("server closed the replication connection")]
    Closed,
}

impl ConnError {
    /// SQLSTATE when the server sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ConnError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A socket of one of the three kinds we connect over.
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(TlsStream<TcpStream>),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, b),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, b),
            Socket::Tls(s) => Pin::new(s).poll_write(cx, b),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One backend message: its tag and body (without the length word).
struct Frame {
    tag: u8,
    body: Bytes,
}

/// Result of `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone)]
pub struct SystemInfo {
    /// The cluster's unique system identifier (a decimal u64, kept as text).
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// Database the connection is attached to.
    pub dbname: String,
}

/// A logical replication connection (`replication=database`).
pub struct ReplicationConn {
    socket: Socket,
    rbuf: BytesMut,
    wbuf: BytesMut,
    tls: bool,
}

impl ReplicationConn {
    /// Connects, negotiates TLS per sslmode, and authenticates.
    pub async fn connect(info: &ConnInfo, tls: &TlsConnector) -> Result<Self, ConnError> {
        tokio::time::timeout(info.connect_timeout, Self::connect_inner(info, tls, true))
            .await
            .map_err(|_| {
                ConnError::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect timed out after {:?}", info.connect_timeout),
                ))
            })?
    }

    async fn connect_inner(
        info: &ConnInfo,
        tls: &TlsConnector,
        try_tls: bool,
    ) -> Result<Self, ConnError> {
        let mut socket = match &info.host {
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{}", info.port));
                Socket::Unix(UnixStream::connect(path).await?)
            }
            Host::Tcp(host) => {
                let tcp = TcpStream::connect((host.as_str(), info.port)).await?;
                tcp.set_nodelay(true)?;
                set_keepalive(&tcp)?;
                let mode = tls.mode();
                if mode == SslMode::Disable || !try_tls {
                    Socket::Tcp(tcp)
                } else {
                    let mut tcp = tcp;
                    let mut b = BytesMut::new();
                    frontend::ssl_request(&mut b);
                    tcp.write_all(&b).await?;
                    let answer = tcp.read_u8().await?;
                    match answer {
                        b'S' => Socket::Tls(tls.handshake(host, tcp).await?),
                        b'N' if mode == SslMode::Prefer => Socket::Tcp(tcp),
                        b'N' => return Err(ConnError::TlsRefused(mode)),
                        other => {
                            return Err(ConnError::Protocol(format!(
                                "unexpected answer 0x{other:02x} to SSLRequest"
                            )))
                        }
                    }
                }
            }
        };
        let is_tls = matches!(socket, Socket::Tls(_));
        let mut wbuf = BytesMut::new();
        let params = [
            ("user", info.user.as_str()),
            ("database", info.dbname.as_str()),
            ("replication", "database"),
            ("application_name", info.application_name.as_str()),
            ("client_encoding", "UTF8"),
            // Values arrive as the source's text output; fix the formats that depend on settings
            // (the target sessions read them with the same settings). Startup parameters win
            // over per-database and per-role settings. money's text depends on lc_monetary
            // (symbol, separators, fraction digits): in C on both sides the stored amount
            // travels exactly.
            ("DateStyle", "ISO"),
            ("IntervalStyle", "postgres"),
            ("extra_float_digits", "3"),
            ("lc_monetary", "C"),
        ];
        frontend::startup_message(params.iter().copied(), &mut wbuf)
            .map_err(|e| ConnError::Protocol(e.to_string()))?;
        socket.write_all(&wbuf).await?;
        wbuf.clear();
        let mut conn = ReplicationConn {
            socket,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf,
            tls: is_tls,
        };
        conn.authenticate(info).await?;
        Ok(conn)
    }

    /// Whether the connection runs over TLS.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    async fn authenticate(&mut self, info: &ConnInfo) -> Result<(), ConnError> {
        let password = || {
            info.password
                .as_ref()
                .map(|p| p.expose().as_bytes())
                .ok_or_else(|| {
                    ConnError::Auth(format!(
                        "server asks a password for role {:?} but none is configured",
                        info.user
                    ))
                })
        };
        loop {
            let frame = self.read_frame().await?;
            match self.parse(frame)? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let pw = password()?;
                    frontend::password_message(pw, &mut self.wbuf)
                        .map_err(|e| ConnError::Protocol(e.to_string()))?;
                    self.flush_wbuf().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = password()?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        info.user.as_bytes(),
                        pw,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)
                        .map_err(|e| ConnError::Protocol(e.to_string()))?;
                    self.flush_wbuf().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram = false;
                    while let Some(m) = mechanisms
                        .next()
                        .map_err(|e| ConnError::Protocol(e.to_string()))?
                    {
                        scram |= m == SCRAM_SHA_256;
                    }
                    if !scram {
                        return Err(ConnError::Auth(
                            "server offers no SASL mechanism we support (SCRAM-SHA-256)".into(),
                        ));
                    }
                    self.scram(password()?).await?;
                }
                backend::Message::AuthenticationKerberosV5
                | backend::Message::AuthenticationScmCredential
                | backend::Message::AuthenticationGss
                | backend::Message::AuthenticationSspi => {
                    return Err(ConnError::Auth(
                        "server asks for an authentication method pgcarve does not support (use scram-sha-256, md5, password or trust)".into(),
                    ))
                }
                backend::Message::ParameterStatus(_)
                | backend::Message::BackendKeyData(_)
                | backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                _ => return Err(ConnError::Protocol("unexpected message during startup".into())),
            }
        }
    }

    async fn scram(&mut self, password: &[u8]) -> Result<(), ConnError> {
        let mut scram = ScramSha256::new(password, ChannelBinding::unsupported());
        frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut self.wbuf)
            .map_err(|e| ConnError::Protocol(e.to_string()))?;
        self.flush_wbuf().await?;
        let frame = self.read_frame().await?;
        match self.parse(frame)? {
            backend::Message::AuthenticationSaslContinue(body) => {
                scram
                    .update(body.data())
                    .map_err(|e| ConnError::Auth(format!("SCRAM: {e}")))?;
            }
            _ => return Err(ConnError::Protocol("expected SASL continue".into())),
        }
        frontend::sasl_response(scram.message(), &mut self.wbuf)
            .map_err(|e| ConnError::Protocol(e.to_string()))?;
        self.flush_wbuf().await?;
        let frame = self.read_frame().await?;
        match self.parse(frame)? {
            backend::Message::AuthenticationSaslFinal(body) => scram
                .finish(body.data())
                .map_err(|e| ConnError::Auth(format!("SCRAM server signature: {e}"))),
            _ => Err(ConnError::Protocol("expected SASL final".into())),
        }
    }

    fn parse(&self, frame: Frame) -> Result<backend::Message, ConnError> {
        if frame.tag == TAG_ERROR_RESPONSE {
            return Err(server_error(&frame.body));
        }
        let mut buf = BytesMut::with_capacity(frame.body.len() + 5);
        buf.extend_from_slice(&[frame.tag]);
        buf.extend_from_slice(&((frame.body.len() + 4) as i32).to_be_bytes());
        buf.extend_from_slice(&frame.body);
        backend::Message::parse(&mut buf)
            .map_err(|e| ConnError::Protocol(e.to_string()))?
            .ok_or_else(|| ConnError::Protocol("incomplete message".into()))
    }

    async fn flush_wbuf(&mut self) -> Result<(), ConnError> {
        self.socket.write_all(&self.wbuf).await?;
        self.socket.flush().await?;
        self.wbuf.clear();
        Ok(())
    }

    /// Takes one complete frame out of the read buffer, if there is one.
    fn take_frame(&mut self) -> Result<Option<Frame>, ConnError> {
        if self.rbuf.len() < 5 {
            return Ok(None);
        }
        let tag = self.rbuf[0];
        let len = i32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]]);
        if len < 4 || len as usize > MAX_FRAME {
            return Err(ConnError::Protocol(format!(
                "invalid message length {len} (tag 0x{tag:02x})"
            )));
        }
        let total = 1 + len as usize;
        if self.rbuf.len() < total {
            self.rbuf.reserve(total - self.rbuf.len());
            return Ok(None);
        }
        let mut frame = self.rbuf.split_to(total);
        frame.advance(5);
        Ok(Some(Frame {
            tag,
            body: frame.freeze(),
        }))
    }

    /// Reads the next frame. Cancel-safe.
    async fn read_frame(&mut self) -> Result<Frame, ConnError> {
        loop {
            if let Some(f) = self.take_frame()? {
                return Ok(f);
            }
            if self.rbuf.capacity() - self.rbuf.len() < 8192 {
                self.rbuf.reserve(64 * 1024);
            }
            let n = self.socket.read_buf(&mut self.rbuf).await?;
            if n == 0 {
                return Err(ConnError::Closed);
            }
        }
    }

    /// Runs one simple query and returns its rows as text (NULL as `None`).
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ConnError> {
        frontend::query(sql, &mut self.wbuf).map_err(|e| ConnError::Protocol(e.to_string()))?;
        self.flush_wbuf().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                TAG_ERROR_RESPONSE => error = Some(server_error(&frame.body)),
                TAG_READY_FOR_QUERY => break,
                TAG_DATA_ROW => rows.push(parse_data_row(frame.body)?),
                TAG_ROW_DESCRIPTION | TAG_COMMAND_COMPLETE | TAG_NOTICE_RESPONSE
                | TAG_PARAMETER_STATUS | TAG_EMPTY_QUERY => {}
                other => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected message 0x{other:02x} in simple query"
                    )))
                }
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemInfo, ConnError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ConnError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let col = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemInfo {
            system_id: col(0),
            timeline: col(1).parse().unwrap_or(0),
            xlogpos: col(2).parse().unwrap_or(Lsn::ZERO),
            dbname: col(3),
        })
    }

    /// Creates a logical slot for pgoutput without exporting a snapshot; returns its
    /// consistent point.
    pub async fn create_logical_slot(&mut self, slot: &str) -> Result<Lsn, ConnError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(slot)
        );
        let rows = self.simple_query(&sql).await?;
        let lsn = rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .and_then(|s| s.parse().ok())
            .unwrap_or(Lsn::ZERO);
        Ok(lsn)
    }

    /// Creates a logical slot for pgoutput that exports a snapshot (`TEMPORARY`: dropped when
    /// this connection ends); returns its consistent point and the snapshot's name. The
    /// snapshot shows exactly the transactions that committed before the consistent point, and
    /// stays importable (`SET TRANSACTION SNAPSHOT`) until this connection runs another command
    /// or closes (PostgreSQL docs, "Streaming Replication Protocol", `CREATE_REPLICATION_SLOT`).
    pub async fn create_logical_slot_exporting(
        &mut self,
        slot: &str,
        temporary: bool,
    ) -> Result<(Lsn, String), ConnError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput EXPORT_SNAPSHOT",
            quote_ident(slot),
            if temporary { " TEMPORARY" } else { "" }
        );
        let rows = self.simple_query(&sql).await?;
        let row = rows
            .first()
            .ok_or_else(|| ConnError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        let lsn = row
            .get(1)
            .cloned()
            .flatten()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                ConnError::Protocol("CREATE_REPLICATION_SLOT: no consistent point".into())
            })?;
        let snapshot = row.get(2).cloned().flatten().ok_or_else(|| {
            ConnError::Protocol("CREATE_REPLICATION_SLOT: no snapshot name".into())
        })?;
        Ok((lsn, snapshot))
    }

    /// Sends `START_REPLICATION SLOT … LOGICAL start (options)` and waits for CopyBothResponse.
    /// `start` = `Lsn::ZERO` means "from the slot's confirmed position".
    pub async fn start_replication(
        &mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<(), ConnError> {
        let opts: Vec<String> = options
            .iter()
            .map(|(k, v)| format!("{} {}", quote_ident(k), quote_literal(v)))
            .collect();
        let mut sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {}",
            quote_ident(slot),
            start
        );
        // An empty option list "()" is a syntax error.
        if !opts.is_empty() {
            sql.push_str(&format!(" ({})", opts.join(", ")));
        }
        frontend::query(&sql, &mut self.wbuf).map_err(|e| ConnError::Protocol(e.to_string()))?;
        self.flush_wbuf().await?;
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                TAG_COPY_BOTH_RESPONSE => return Ok(()),
                TAG_NOTICE_RESPONSE | TAG_PARAMETER_STATUS => {}
                TAG_ERROR_RESPONSE => {
                    let err = server_error(&frame.body);
                    // Read up to ReadyForQuery so the connection stays usable after the error.
                    while self.read_frame().await?.tag != TAG_READY_FOR_QUERY {}
                    return Err(err);
                }
                TAG_COPY_OUT_RESPONSE => {
                    return Err(ConnError::Protocol(
                        "server answered START_REPLICATION with CopyOut".into(),
                    ))
                }
                other => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected message 0x{other:02x} after START_REPLICATION"
                    )))
                }
            }
        }
    }

    /// The next CopyData payload in CopyBoth mode; `None` when the server ends the copy.
    /// Cancel-safe, so the reader loop can `select!` on it.
    pub async fn next_copy_data(&mut self) -> Result<Option<Bytes>, ConnError> {
        loop {
            let frame = self.read_frame().await?;
            match frame.tag {
                TAG_COPY_DATA => return Ok(Some(frame.body)),
                TAG_COPY_DONE => return Ok(None),
                TAG_ERROR_RESPONSE => return Err(server_error(&frame.body)),
                TAG_NOTICE_RESPONSE | TAG_PARAMETER_STATUS => {}
                other => {
                    return Err(ConnError::Protocol(format!(
                        "unexpected message 0x{other:02x} in CopyBoth"
                    )))
                }
            }
        }
    }

    /// Sends one CopyData message (a standby status update).
    pub async fn send_copy_data(&mut self, payload: &[u8]) -> Result<(), ConnError> {
        frontend::CopyData::new(payload)
            .map_err(|e| ConnError::Protocol(e.to_string()))?
            .write(&mut self.wbuf);
        self.flush_wbuf().await
    }

    /// Ends the session politely (Terminate) and closes the socket.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.wbuf);
        let _ = self.flush_wbuf().await;
        let _ = self.socket.shutdown().await;
    }
}

fn parse_data_row(mut body: Bytes) -> Result<Vec<Option<String>>, ConnError> {
    let bad = || ConnError::Protocol("malformed DataRow".into());
    let n = body.try_get_i16().map_err(|_| bad())?;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = body.try_get_i32().map_err(|_| bad())?;
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.remaining() < len {
            return Err(bad());
        }
        let v = body.split_to(len);
        row.push(Some(String::from_utf8(v.to_vec()).map_err(|_| bad())?));
    }
    Ok(row)
}

/// TCP keepalives and TCP_USER_TIMEOUT as on every connection (see `crate::conninfo`).
fn set_keepalive(tcp: &TcpStream) -> io::Result<()> {
    use crate::conninfo::{KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_RETRIES};
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let sock = socket2::SockRef::from(tcp);
    sock.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    sock.set_tcp_user_timeout(Some(crate::conninfo::TCP_USER_TIMEOUT))?;
    Ok(())
}

/// Builds a [`ConnError::Server`] from an ErrorResponse body: SQLSTATE and primary message only,
/// and the message only for SQLSTATE classes that do not quote data. Errors raised while the
/// server decodes (encoding conversion, an output function, an internal error) may carry bytes
/// of a row: their message is withheld, the SQLSTATE and its name stay.
fn server_error(body: &Bytes) -> ConnError {
    let mut code = String::new();
    let mut message = String::new();
    let mut b = body.clone();
    while let Ok(field) = b.try_get_u8() {
        if field == 0 {
            break;
        }
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        let value = String::from_utf8_lossy(&b[..end]).into_owned();
        b.advance((end + 1).min(b.len()));
        match field {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    if !message_is_safe(&code) {
        message = format!(
            "{} (message withheld: it may quote row data)",
            sqlstate_name(&code)
        );
    }
    ConnError::Server { code, message }
}

#[cfg(test)]
mod tests;
