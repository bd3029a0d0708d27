//! A small client for PostgreSQL's streaming replication protocol.
//!
//! tokio-postgres on crates.io refuses the `replication` startup parameter and has no
//! CopyBoth mode, and the replication-capable forks exist only as git repositories, so
//! walshuttle speaks this part of the protocol itself on top of postgres-protocol's
//! message codecs: startup with `replication=database`, cleartext/MD5/SCRAM
//! authentication, simple queries for `IDENTIFY_SYSTEM` and
//! `CREATE_REPLICATION_SLOT` (in the syntax of the server's version), then CopyBoth for `START_REPLICATION`
//! with XLogData, keepalives and standby status updates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::{backend, frontend};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;

use crate::config::Endpoint;
use crate::pg::ident::quote_ident;
use crate::pg::lsn::Lsn;
use crate::pg::tls::{self, NegotiateError, Negotiated, TlsSettings};

/// What went wrong on a replication connection; callers branch on the kind
/// (a slot in use is waited for, a lost connection is retried).
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The TCP/Unix connection failed or broke.
    #[error("connection to the source failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered with an ErrorResponse.
    #[error("{message}{}", hint.as_ref().map(|h| format!("; hint: {h}")).unwrap_or_default())]
    Server {
        /// SQLSTATE of the error.
        code: SqlState,
        /// The server's primary message.
        message: String,
        /// The server's hint, if any.
        hint: Option<String>,
    },
    /// The server sent something this client did not expect at that point.
    #[error("unexpected reply from the source: {0}")]
    Protocol(String),
    /// The server asked for an authentication method walshuttle does not speak, or
    /// no password was given where one is needed.
    #[error("{0}")]
    Auth(String),
    /// TLS was required but refused, could not be set up, or its handshake failed
    /// (a certificate that does not verify, for one).
    #[error("{0}")]
    Tls(String),
}

impl ReplicationError {
    /// SQLSTATE of a server error, if this is one.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

type Result<T> = std::result::Result<T, ReplicationError>;

trait Transport: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Transport for T {}

/// One row of a simple-query result: text values by column position.
#[derive(Debug, Clone)]
pub struct SimpleRow {
    /// Column names, in order.
    pub columns: Vec<String>,
    /// Text values, `None` for NULL.
    pub values: Vec<Option<String>>,
}

impl SimpleRow {
    /// The value of the named column, if present and not NULL.
    pub fn get(&self, column: &str) -> Option<&str> {
        let idx = self.columns.iter().position(|c| c == column)?;
        self.values.get(idx)?.as_deref()
    }
}

/// What `CREATE_REPLICATION_SLOT … (SNAPSHOT 'export')` hands back.
#[derive(Debug, Clone)]
pub struct CreateSlotResult {
    /// Name of the slot created.
    pub slot_name: String,
    /// The LSN from which the slot decodes: everything committed before it is in the
    /// exported snapshot, everything after arrives through the slot.
    pub consistent_point: Lsn,
    /// Name of the exported snapshot, importable with `SET TRANSACTION SNAPSHOT` until
    /// this connection runs its next command.
    pub snapshot_name: String,
}

/// Size of the blocks the replication connection reads into.
const READ_BLOCK: usize = 64 * 1024;
/// Free space below which a read starts a new block instead of filling the current
/// one further (a read into less would return a fraction of a message).
const READ_MIN_SPACE: usize = 8 * 1024;
/// Most reserved at once for a long frame (the length comes from the server; a
/// longer frame grows in steps of this).
const READ_MAX_STEP: usize = 16 * 1024 * 1024;

/// How much to reserve in the read buffer before the next read, if anything:
/// `free` bytes are left in its current block, `buffered` bytes are unparsed, and
/// the frame at the front is `frame_len` bytes long (0 while its header is
/// incomplete).
///
/// Messages are split off the buffer without copying, so a block stays allocated
/// while any message read into it is alive, and a streamed transaction's buffered
/// changes hold thousands. Reserving a whole block before every read started a new
/// 64 KiB block per read however little the read then brought: a 2,000,000-row
/// transaction kept 1,798 blocks (118 MB) alive for about 20,000 buffered rows
/// (dhat). A block is now filled before the next one starts, and a frame longer
/// than the block gets its whole length at once (read 64 KiB at a time, a large
/// row was copied again at every step).
fn reserve_before_read(free: usize, buffered: usize, frame_len: usize) -> Option<usize> {
    let wanted = frame_len
        .saturating_sub(buffered)
        .clamp(READ_MIN_SPACE, READ_MAX_STEP);
    (free < wanted).then_some(wanted.max(READ_BLOCK))
}

/// A connection in `replication=database` mode, before streaming starts.
pub struct ReplicationClient {
    io: Box<dyn Transport>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// Server process id, as `pg_stat_replication.pid` shows it.
    pub backend_pid: i32,
    /// The server's major version (from its `server_version` parameter), 0 while
    /// unknown: replication commands are spelled differently before 15.
    pub server_major: u32,
}

/// The major version in a `server_version` parameter (`14.23`, `15.18 (Debian
/// 15.18-0+deb12u1)`, `19beta1`), 0 when there is none.
fn major_of_server_version(version: &str) -> u32 {
    let digits: String = version.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().unwrap_or(0)
}

/// `CREATE_REPLICATION_SLOT` for a permanent pgoutput slot exporting its snapshot:
/// PostgreSQL 15 introduced the option list, and 14 knows only the older
/// `EXPORT_SNAPSHOT` keyword (which 15+ still accept, but only for compatibility).
///
/// On PostgreSQL 17+ the slot is a failover slot: a standby with
/// `sync_replication_slots` keeps a copy, so the stream goes on from it after a
/// promotion, without a gap and without a catch-up.
fn create_slot_sql(slot: &str, server_major: u32) -> String {
    create_slot_sql_with(slot, server_major, true)
}

/// [`create_slot_sql`], or with `export` false the same slot without a snapshot
/// (`NOEXPORT_SNAPSHOT`, `SNAPSHOT 'nothing'`): an online bootstrap copies each
/// table under a snapshot of its own instead.
fn create_slot_sql_with(slot: &str, server_major: u32, export: bool) -> String {
    if (1..15).contains(&server_major) {
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {}",
            quote_ident(slot),
            if export {
                "EXPORT_SNAPSHOT"
            } else {
                "NOEXPORT_SNAPSHOT"
            }
        )
    } else {
        let failover = if server_major >= 17 { ", FAILOVER" } else { "" };
        format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT '{}'{failover})",
            quote_ident(slot),
            if export { "export" } else { "nothing" }
        )
    }
}

impl ReplicationClient {
    /// Connects and authenticates. `options` is passed as the startup `options`
    /// parameter (e.g. `-c logical_decoding_work_mem=64MB`, which the walsender reads
    /// only from there).
    ///
    /// The hosts of the connection string are tried in order, as libpq does; with
    /// `target_session_attrs=read-write` a server that is read-only (a standby, or
    /// `default_transaction_read_only`) is passed over.
    pub async fn connect(endpoint: &Endpoint, options: Option<&str>) -> Result<Self> {
        let config = &endpoint.config;
        let hosts = config.get_hosts().len().max(1);
        let mut last_err = None;
        for host in 0..hosts {
            match Self::connect_host(endpoint, host, options).await {
                Ok(client) => return Ok(client),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            ReplicationError::Io(std::io::Error::other("no host to connect to"))
        }))
    }

    async fn connect_host(endpoint: &Endpoint, host: usize, options: Option<&str>) -> Result<Self> {
        let config = &endpoint.config;
        let timeout = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10));
        let io = tokio::time::timeout(timeout, open_transport(config, &endpoint.tls, host))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "connection timed out")
            })??;
        let mut client = ReplicationClient {
            io,
            read_buf: BytesMut::with_capacity(READ_BLOCK),
            write_buf: BytesMut::with_capacity(1024),
            backend_pid: 0,
            server_major: 0,
        };
        tokio::time::timeout(crate::pg::connect::LOGIN_TIMEOUT, client.startup(endpoint, options))
            .await
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the server accepted the replication connection but did not complete the login within 30 s",
                )
            })??;
        if config.get_target_session_attrs()
            == tokio_postgres::config::TargetSessionAttrs::ReadWrite
        {
            let rows = client.simple_query("SHOW transaction_read_only").await?;
            let read_only = rows
                .first()
                .and_then(|r| r.get("transaction_read_only"))
                .is_some_and(|v| v == "on");
            if read_only {
                client.close().await;
                return Err(ReplicationError::Io(std::io::Error::other(
                    "the server is read-only (target_session_attrs=read-write)",
                )));
            }
        }
        Ok(client)
    }

    async fn startup(&mut self, endpoint: &Endpoint, options: Option<&str>) -> Result<()> {
        let user = endpoint.user();
        let dbname = endpoint.dbname();
        let mut params: Vec<(&str, &str)> = vec![
            ("user", user.as_str()),
            ("database", dbname.as_str()),
            ("replication", "database"),
            ("application_name", "walshuttle stream"),
            ("client_encoding", "UTF8"),
        ];
        // The walsender formats text values with its own session settings, so it
        // runs under the same pinned ones as every other session.
        let mut all_options =
            crate::pg::session_settings::startup_options(endpoint.config.get_options());
        if let Some(extra) = options {
            all_options.push(' ');
            all_options.push_str(extra);
        }
        params.push(("options", all_options.trim()));
        frontend::startup_message(params.iter().copied(), &mut self.write_buf)?;
        self.flush().await?;

        let password = endpoint.config.get_password();
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            match self.read_message().await? {
                backend::Message::AuthenticationOk => {}
                backend::Message::AuthenticationCleartextPassword => {
                    let pw = password.ok_or_else(missing_password)?;
                    frontend::password_message(pw, &mut self.write_buf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationMd5Password(body) => {
                    let pw = password.ok_or_else(missing_password)?;
                    let hash = md5_hash(user.as_bytes(), pw, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSasl(body) => {
                    let pw = password.ok_or_else(missing_password)?;
                    let mut mechanisms = body.mechanisms();
                    let mut has_scram = false;
                    while let Some(m) = mechanisms.next()? {
                        has_scram |= m == sasl::SCRAM_SHA_256;
                    }
                    if !has_scram {
                        return Err(ReplicationError::Auth(
                            "the source offers no SASL mechanism walshuttle supports (SCRAM-SHA-256)".into(),
                        ));
                    }
                    let s = sasl::ScramSha256::new(pw, sasl::ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        sasl::SCRAM_SHA_256,
                        s.message(),
                        &mut self.write_buf,
                    )?;
                    self.flush().await?;
                    scram = Some(s);
                }
                backend::Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL continue without a start".into())
                    })?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut self.write_buf)?;
                    self.flush().await?;
                }
                backend::Message::AuthenticationSaslFinal(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL final without a start".into())
                    })?;
                    s.finish(body.data())?;
                }
                backend::Message::BackendKeyData(body) => self.backend_pid = body.process_id(),
                backend::Message::ParameterStatus(body) => {
                    if body.name()? == "server_version" {
                        self.server_major = major_of_server_version(body.value()?);
                    }
                }
                backend::Message::NoticeResponse(_) => {}
                backend::Message::ReadyForQuery(_) => return Ok(()),
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => {
                    return Err(ReplicationError::Auth(
                        "the source asked for an authentication method walshuttle does not support (use password, md5 or scram-sha-256)".into(),
                    ))
                }
            }
        }
    }

    /// Runs one simple-protocol command and collects its rows.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<SimpleRow>> {
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut columns: Vec<String> = Vec::new();
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                backend::Message::RowDescription(body) => {
                    columns = body.fields().map(|f| Ok(f.name().to_string())).collect()?;
                }
                backend::Message::DataRow(body) => {
                    let buf = body.buffer();
                    let values = body
                        .ranges()
                        .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned())))
                        .collect()?;
                    rows.push(SimpleRow {
                        columns: columns.clone(),
                        values,
                    });
                }
                backend::Message::ErrorResponse(body) => error = Some(server_error(&body)),
                backend::Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        match error {
            Some(e) => Err(e),
            None => Ok(rows),
        }
    }

    /// Creates a permanent logical slot with pgoutput and exports its snapshot (a
    /// failover slot on PostgreSQL 17+).
    pub async fn create_slot_exporting_snapshot(&mut self, slot: &str) -> Result<CreateSlotResult> {
        let sql = create_slot_sql(slot, self.server_major);
        let rows = self.simple_query(&sql).await?;
        let row = rows.first().ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        let consistent_point = row
            .get("consistent_point")
            .and_then(|v| v.parse::<Lsn>().ok())
            .ok_or_else(|| {
                ReplicationError::Protocol("no consistent_point in slot reply".into())
            })?;
        let snapshot_name = row
            .get("snapshot_name")
            .ok_or_else(|| ReplicationError::Protocol("no snapshot_name in slot reply".into()))?
            .to_string();
        Ok(CreateSlotResult {
            slot_name: slot.to_string(),
            consistent_point,
            snapshot_name,
        })
    }

    /// Creates a permanent logical slot with pgoutput holding no snapshot (a failover
    /// slot on PostgreSQL 17+); returns its consistent point, where its stream
    /// begins.
    pub async fn create_slot_without_snapshot(&mut self, slot: &str) -> Result<Lsn> {
        let sql = create_slot_sql_with(slot, self.server_major, false);
        let rows = self.simple_query(&sql).await?;
        let row = rows.first().ok_or_else(|| {
            ReplicationError::Protocol("CREATE_REPLICATION_SLOT returned no row".into())
        })?;
        row.get("consistent_point")
            .and_then(|v| v.parse::<Lsn>().ok())
            .ok_or_else(|| ReplicationError::Protocol("no consistent_point in slot reply".into()))
    }

    /// Starts logical streaming from `start` and turns this connection into a stream.
    /// `options` are pgoutput's plugin options, already formatted as `key 'value'`.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, String)],
    ) -> Result<ReplicationStream> {
        let opts = options
            .iter()
            .map(|(k, v)| format!("{} '{}'", quote_ident(k), v.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({opts})",
            quote_ident(slot)
        );
        frontend::query(&sql, &mut self.write_buf)?;
        self.flush().await?;
        loop {
            // CopyBothResponse ('W') is unknown to postgres-protocol's parser: check the
            // tag before handing a frame to it.
            if let Some(frame) = self.try_take_frame(b'W') {
                drop(frame);
                return Ok(ReplicationStream { client: self });
            }
            if self.read_buf.len() >= 5 && self.read_buf[0] != b'W' {
                match self.parse_buffered()? {
                    Some(backend::Message::ErrorResponse(body)) => {
                        let err = server_error(&body);
                        // Drain to ReadyForQuery is pointless: the caller drops us.
                        return Err(err);
                    }
                    Some(backend::Message::NoticeResponse(_)) | Some(_) => continue,
                    None => {}
                }
            }
            self.fill().await?;
        }
    }

    fn try_take_frame(&mut self, tag: u8) -> Option<Bytes> {
        if self.read_buf.len() < 5 || self.read_buf[0] != tag {
            return None;
        }
        let len = u32::from_be_bytes([
            self.read_buf[1],
            self.read_buf[2],
            self.read_buf[3],
            self.read_buf[4],
        ]) as usize;
        if self.read_buf.len() < len + 1 {
            return None;
        }
        let mut frame = self.read_buf.split_to(len + 1);
        frame.advance(5);
        Some(frame.freeze())
    }

    fn parse_buffered(&mut self) -> Result<Option<backend::Message>> {
        Ok(backend::Message::parse(&mut self.read_buf)?)
    }

    async fn read_message(&mut self) -> Result<backend::Message> {
        loop {
            if let Some(message) = self.parse_buffered()? {
                return Ok(message);
            }
            self.fill().await?;
        }
    }

    /// The whole length of the frame at the front of the buffer, once its header is
    /// in (0 before).
    fn buffered_frame_len(&self) -> usize {
        match self.read_buf.get(..5) {
            Some(h) => 1 + u32::from_be_bytes([h[1], h[2], h[3], h[4]]) as usize,
            None => 0,
        }
    }

    async fn fill(&mut self) -> Result<()> {
        let free = self.read_buf.capacity() - self.read_buf.len();
        if let Some(more) =
            reserve_before_read(free, self.read_buf.len(), self.buffered_frame_len())
        {
            self.read_buf.reserve(more);
        }
        let n = self.io.read_buf(&mut self.read_buf).await?;
        if n == 0 {
            return Err(ReplicationError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the source closed the replication connection",
            )));
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        let buf = self.write_buf.split();
        self.io.write_all(&buf).await?;
        self.io.flush().await?;
        Ok(())
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
    }
}

/// One message from the walsender while streaming.
#[derive(Debug, Clone)]
pub enum ReplicationMessage {
    /// A chunk of decoded WAL: one pgoutput message.
    XLogData {
        /// WAL position of the start of this message's record.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The pgoutput payload.
        data: Bytes,
    },
    /// A heartbeat carrying the server's end of WAL.
    Keepalive {
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// Whether the server wants a status update now (else it disconnects us at
        /// `wal_sender_timeout`).
        reply_requested: bool,
    },
}

/// A replication connection in CopyBoth mode.
pub struct ReplicationStream {
    client: ReplicationClient,
}

impl ReplicationStream {
    /// Waits for the next XLogData or keepalive. Cancel-safe: a partial frame stays
    /// buffered, so this can be raced against timers in `select!`.
    pub async fn next_message(&mut self) -> Result<ReplicationMessage> {
        loop {
            if let Some(message) = self.take_buffered()? {
                return Ok(message);
            }
            self.client.fill().await?;
        }
    }

    fn take_buffered(&mut self) -> Result<Option<ReplicationMessage>> {
        loop {
            let Some(message) = self.client.parse_buffered()? else {
                return Ok(None);
            };
            match message {
                backend::Message::CopyData(body) => {
                    return parse_copy_data(body.into_bytes()).map(Some);
                }
                backend::Message::ErrorResponse(body) => return Err(server_error(&body)),
                backend::Message::CopyDone => {
                    return Err(ReplicationError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the source ended the replication stream",
                    )))
                }
                _ => continue,
            }
        }
    }

    /// Whether a whole message is already buffered, so reading it will not wait:
    /// the apply path keeps coalescing transactions while this is true.
    pub fn has_buffered_message(&self) -> bool {
        let buf = &self.client.read_buf;
        if buf.len() < 5 {
            return false;
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        buf.len() > len
    }

    /// Sends a standby status update. `flush` is the position the source may free
    /// WAL up to: only what the target has durably committed.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<()> {
        let mut payload = BytesMut::with_capacity(34);
        payload.put_u8(b'r');
        payload.put_u64(write.0);
        payload.put_u64(flush.0);
        payload.put_u64(apply.0);
        payload.put_i64(pg_now_micros());
        payload.put_u8(u8::from(reply_requested));
        let data = frontend::CopyData::new(payload.freeze())?;
        data.write(&mut self.client.write_buf);
        self.client.flush().await
    }

    /// Ends CopyBoth and closes the connection.
    pub async fn close(mut self) {
        frontend::copy_done(&mut self.client.write_buf);
        let _ = self.client.flush().await;
        self.client.close().await;
    }
}

fn parse_copy_data(mut data: Bytes) -> Result<ReplicationMessage> {
    let short = || ReplicationError::Protocol("truncated replication message".into());
    if data.is_empty() {
        return Err(short());
    }
    match data.get_u8() {
        b'w' => {
            if data.len() < 24 {
                return Err(short());
            }
            let wal_start = Lsn(data.get_u64());
            let wal_end = Lsn(data.get_u64());
            let _server_time = data.get_i64();
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
            })
        }
        b'k' => {
            if data.len() < 17 {
                return Err(short());
            }
            let wal_end = Lsn(data.get_u64());
            let _server_time = data.get_i64();
            let reply_requested = data.get_u8() == 1;
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            })
        }
        other => Err(ReplicationError::Protocol(format!(
            "unknown replication message kind {:?}",
            other as char
        ))),
    }
}

/// Microseconds since 2000-01-01, PostgreSQL's timestamp epoch.
fn pg_now_micros() -> i64 {
    const PG_EPOCH_OFFSET_SECS: u64 = 946_684_800;
    let since_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let micros = since_unix
        .as_micros()
        .saturating_sub(u128::from(PG_EPOCH_OFFSET_SECS) * 1_000_000);
    i64::try_from(micros).unwrap_or(i64::MAX)
}

/// Connects to the first reachable host and negotiates TLS per `sslmode`
/// (SSLRequest, then a rustls handshake when the server answers `S`). Unix-domain
/// sockets never use TLS, as with libpq and the server itself.
/// Opens the socket (and TLS) to host number `only` of the connection string.
async fn open_transport(
    config: &tokio_postgres::Config,
    tls: &TlsSettings,
    only: usize,
) -> Result<Box<dyn Transport>> {
    let hosts = config.get_hosts();
    let hostaddrs = config.get_hostaddrs();
    let ports = config.get_ports();
    let mut last_err = None;
    for (i, host) in hosts.iter().enumerate().filter(|(i, _)| *i == only) {
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let attempt: Result<Box<dyn Transport>> = match host {
            Host::Tcp(name) => {
                let connected = match hostaddrs.get(i) {
                    Some(addr) => tokio::net::TcpStream::connect((*addr, port)).await,
                    None => tokio::net::TcpStream::connect((name.as_str(), port)).await,
                };
                match connected {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        match tls::negotiate(s, tls, name).await {
                            Ok(Negotiated::Plain(s)) => Ok(Box::new(s) as Box<dyn Transport>),
                            Ok(Negotiated::Tls(s)) => Ok(s as Box<dyn Transport>),
                            Err(NegotiateError::Io(e)) => Err(ReplicationError::Io(e)),
                            Err(NegotiateError::Tls(m)) => Err(ReplicationError::Tls(m)),
                        }
                    }
                    Err(e) => Err(ReplicationError::Io(e)),
                }
            }
            Host::Unix(dir) => {
                if tls.mode.tls_required() {
                    Err(ReplicationError::Tls(format!(
                        "TLS is not available over a Unix-domain socket but sslmode={} requires it; use a TCP host name, or sslmode=prefer",
                        tls.mode
                    )))
                } else {
                    let path = dir.join(format!(".s.PGSQL.{port}"));
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(|s| Box::new(s) as Box<dyn Transport>)
                        .map_err(ReplicationError::Io)
                }
            }
        };
        match attempt {
            Ok(t) => return Ok(t),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err
        .unwrap_or_else(|| ReplicationError::Io(std::io::Error::other("no host to connect to"))))
}

fn missing_password() -> ReplicationError {
    ReplicationError::Auth(
        "the source asks for a password but the connection string has none".into(),
    )
}

fn server_error(body: &backend::ErrorResponseBody) -> ReplicationError {
    let mut code = String::new();
    let mut message = String::new();
    let mut hint = None;
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        match field.type_() {
            b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'H' => hint = Some(String::from_utf8_lossy(field.value_bytes()).into_owned()),
            _ => {}
        }
    }
    ReplicationError::Server {
        code: SqlState::from_code(&code),
        message,
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::{
        create_slot_sql, create_slot_sql_with, major_of_server_version, reserve_before_read,
        READ_BLOCK, READ_MIN_SPACE,
    };

    #[test]
    fn a_read_block_is_filled_before_the_next_is_reserved() {
        // Room for more messages: no new block (each new block stays allocated as
        // long as one message read into it is).
        assert_eq!(reserve_before_read(60_000, 0, 0), None);
        assert_eq!(reserve_before_read(READ_MIN_SPACE, 100, 300), None);
        // Too little room left for a useful read: a new block.
        assert_eq!(
            reserve_before_read(READ_MIN_SPACE - 1, 0, 0),
            Some(READ_BLOCK)
        );
        // A frame longer than the room left: its whole remaining length at once.
        assert_eq!(
            reserve_before_read(40_000, 10_000, 1_000_000),
            Some(990_000)
        );
        assert_eq!(reserve_before_read(1_000_000, 10_000, 1_000_000), None);
        // A huge length is not trusted with one allocation.
        assert_eq!(
            reserve_before_read(0, 5, u32::MAX as usize),
            Some(super::READ_MAX_STEP)
        );
    }

    #[test]
    fn server_versions_give_their_major() {
        assert_eq!(major_of_server_version("14.23"), 14);
        assert_eq!(
            major_of_server_version("15.18 (Debian 15.18-0+deb12u1)"),
            15
        );
        assert_eq!(major_of_server_version("19beta1"), 19);
        assert_eq!(major_of_server_version(""), 0);
    }

    #[test]
    fn slots_are_created_with_the_syntax_of_the_servers_version() {
        assert_eq!(
            create_slot_sql("s", 14),
            r#"CREATE_REPLICATION_SLOT "s" LOGICAL pgoutput EXPORT_SNAPSHOT"#
        );
        for major in [0, 15, 16] {
            assert_eq!(
                create_slot_sql("s", major),
                r#"CREATE_REPLICATION_SLOT "s" LOGICAL pgoutput (SNAPSHOT 'export')"#
            );
        }
        // Failover slots from 17 on.
        for major in [17, 18] {
            assert_eq!(
                create_slot_sql("s", major),
                r#"CREATE_REPLICATION_SLOT "s" LOGICAL pgoutput (SNAPSHOT 'export', FAILOVER)"#
            );
        }
        // Without a snapshot (online bootstrap).
        assert_eq!(
            create_slot_sql_with("s", 14, false),
            r#"CREATE_REPLICATION_SLOT "s" LOGICAL pgoutput NOEXPORT_SNAPSHOT"#
        );
        assert_eq!(
            create_slot_sql_with("s", 16, false),
            r#"CREATE_REPLICATION_SLOT "s" LOGICAL pgoutput (SNAPSHOT 'nothing')"#
        );
        assert_eq!(
            create_slot_sql_with("s", 17, false),
            r#"CREATE_REPLICATION_SLOT "s" LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER)"#
        );
    }
}
