//! Ordinary (non-replication) connections, with errors a user can act on.

use anyhow::Result;
use tokio_postgres::Client;

use crate::config::Endpoint;
use crate::pg::session_settings;
use crate::pg::tls::{self, MakeRustlsConnect, SslMode};

/// Longest a connection attempt (socket, TLS and login) may take.
pub const LOGIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Opens a normal SQL session to one side and drives its connection on a task.
///
/// `purpose` becomes the session's `application_name` suffix, so `pg_stat_activity`
/// on either server shows which part of walshuttle a connection belongs to.
///
/// TLS follows the endpoint's `sslmode`/`sslrootcert` (see [`crate::pg::tls`]); the
/// session runs under the pinned settings of [`crate::pg::session_settings`].
pub async fn connect(endpoint: &Endpoint, purpose: &str) -> Result<Client> {
    let mut config = endpoint.config.clone();
    config.application_name(format!("walshuttle {purpose}"));
    // Dates, intervals, floats, time zones, search_path and timeouts as walshuttle
    // needs them, whatever the database or role set (see `session_settings`).
    config.options(session_settings::startup_options(
        endpoint.config.get_options(),
    ));
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    // Notice a peer that vanished (host down, cable cut) in about a minute rather
    // than the kernel's default two hours.
    config.keepalives(true);
    config.keepalives_idle(std::time::Duration::from_secs(30));
    let tls_config = endpoint.tls.client_config().map_err(|e| {
        anyhow::anyhow!(
            "cannot connect to the {} database {}: {e}",
            endpoint.side,
            endpoint.redacted
        )
    })?;
    // The driver's connect timeout covers opening the socket; a server that accepts
    // and then never answers the login must not hang us either.
    let (client, connection) = tokio::time::timeout(LOGIN_TIMEOUT, config.connect(MakeRustlsConnect::new(tls_config)))
        .await
        .map_err(|_| ConnectError {
            message: format!(
                "cannot connect to the {} database {}: the server accepted the connection but did not complete the login within {} s; check the host and port in {}",
                endpoint.side,
                endpoint.redacted,
                LOGIN_TIMEOUT.as_secs(),
                endpoint.side.flag()
            ),
            transient: true,
        })?
        .map_err(|e| connect_error(endpoint, &e))?;
    let side = endpoint.side;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%side, error = %describe(&e), "connection closed");
        }
    });
    Ok(client)
}

/// Builds the one-line message for a failed connection attempt, naming the side,
/// the redacted URL and what to check.
pub fn connect_error(endpoint: &Endpoint, e: &tokio_postgres::Error) -> anyhow::Error {
    if let Some(problem) = tls_problem(endpoint, e) {
        return ConnectError {
            message: format!(
                "cannot connect to the {} database {}: {problem}",
                endpoint.side, endpoint.redacted
            ),
            transient: false,
        }
        .into();
    }
    let what = describe(e);
    let hint = match e.code().map(|c| c.code()) {
        Some("28000")
            if e.as_db_error()
                .is_some_and(|db| db.message().contains("no encryption")) =>
        {
            format!(
                "the server accepts this connection only over TLS: use sslmode=require, or verify-full with sslrootcert, in {}",
                endpoint.side.flag()
            )
        }
        Some("28P01") | Some("28000") => {
            format!("check the user and password in {}", endpoint.side.flag())
        }
        Some("3D000") => format!(
            "create the database or fix its name in {}",
            endpoint.side.flag()
        ),
        _ if e.as_db_error().is_none() => format!(
            "check that the server is running and reachable, and the host and port in {}",
            endpoint.side.flag()
        ),
        _ => format!("check {}", endpoint.side.flag()),
    };
    // No answer at all (refused, reset, timed out, no route), or a server that is
    // starting, stopping or full: trying again later can succeed.
    let transient = match e.code() {
        None => e.as_db_error().is_none(),
        Some(code) => crate::exit::is_transient_state(code.code()),
    };
    ConnectError {
        message: format!(
            "cannot connect to the {} database {}: {what}; {hint}",
            endpoint.side, endpoint.redacted
        ),
        transient,
    }
    .into()
}

/// A failed connection attempt, in one line, and whether it is worth trying again
/// (the server down or unreachable) or needs a person (a wrong password, database
/// or TLS setting): see [`crate::exit`].
#[derive(Debug)]
pub struct ConnectError {
    /// The one-line message: side, redacted URL, what failed, what to check.
    pub message: String,
    /// Whether the server was down, unreachable or not accepting connections yet.
    pub transient: bool,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConnectError {}

/// The one-line TLS part of a failed connection, when TLS is what failed.
fn tls_problem(endpoint: &Endpoint, e: &tokio_postgres::Error) -> Option<String> {
    if tls::find_rustls_error(e).is_some() {
        return Some(tls::handshake_failure(e, &endpoint.tls));
    }
    // tokio-postgres's own TLS failures ("error performing TLS handshake: …").
    if e.as_db_error().is_some() || !e.to_string().contains("TLS") {
        return None;
    }
    let cause = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_default();
    if cause.contains("server does not support TLS") {
        return Some(tls::refused_message(endpoint.tls.mode));
    }
    if cause.contains("no hostname") && endpoint.tls.mode != SslMode::Disable {
        return Some(format!(
            "TLS is not available over a Unix-domain socket but sslmode={} requires it; use a TCP host name, or sslmode=prefer",
            endpoint.tls.mode
        ));
    }
    Some(format!("TLS handshake failed: {cause}"))
}

/// Renders a driver error as one line: the server's own message (with detail and
/// hint) when it sent one, else the driver's message and its cause.
pub fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = db.message().to_string();
        if let Some(detail) = db.detail() {
            text.push_str(" (");
            text.push_str(detail);
            text.push(')');
        }
        if let Some(hint) = db.hint() {
            text.push_str("; hint: ");
            text.push_str(hint);
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A failed statement or connection: what walshuttle was doing, the server's (or
/// driver's) one-line message, and the SQLSTATE, kept so that callers can tell a
/// fault worth retrying from an error that retrying cannot fix.
#[derive(Debug)]
pub struct PgError {
    /// What walshuttle was doing.
    pub what: String,
    /// The one-line message of [`describe`].
    pub message: String,
    /// The server's SQLSTATE, when the server answered with an error.
    pub code: Option<tokio_postgres::error::SqlState>,
    /// Whether the connection is closed (a fault of the connection, not the SQL).
    pub closed: bool,
    /// The table the server named in its error (`schema.table`), e.g. the table of
    /// a violated constraint.
    pub table: Option<String>,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.message)
    }
}

impl std::error::Error for PgError {}

/// Extension for query results: wraps driver errors with what walshuttle was doing,
/// in the one-line form of [`describe`], as a [`PgError`].
pub trait PgResultExt<T> {
    /// Adds `what` (e.g. "reading columns of public.users on the source") to the error.
    fn pg_context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> PgResultExt<T> for std::result::Result<T, tokio_postgres::Error> {
    fn pg_context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| {
            PgError {
                what: what(),
                message: describe(&e),
                code: e.code().cloned(),
                closed: e.is_closed(),
                table: e.as_db_error().and_then(|db| {
                    let table = db.table()?;
                    Some(match db.schema() {
                        Some(schema) => crate::pg::QualifiedName::new(schema, table).to_string(),
                        None => table.to_string(),
                    })
                }),
            }
            .into()
        })
    }
}
