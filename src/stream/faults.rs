//! Which errors `run` rides through and which stop it.
//!
//! A *fault* belongs to a connection or a server: a connection closed or cut, a
//! server shutting down, restarting or out of resources, a deadlock or serialization
//! failure, a lock not available. Trying again later can succeed, so `run` reconnects
//! with backoff. Anything else the servers answer (a value the target type refuses,
//! a constraint the source does not have, a missing table or privilege: SQLSTATE
//! classes 22, 23, 42, 0A, …) comes back identical on every retry, so `run` stops
//! with one line saying where (the source transaction's commit LSN, the table, the
//! key the server named) and what to do, and records it for `status` and `/healthz`.

use std::fmt;

use crate::pg::connect::PgError;
use crate::pg::replication::ReplicationError;
use crate::pg::{Lsn, QualifiedName};

/// An error that retrying cannot fix: the pipeline stops and says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// What `run` does about an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// A fault of a connection or server: reconnect and try again.
    Fault,
    /// The same every time: stop.
    Fatal,
}

/// SQLSTATEs (whole codes, or two-letter classes) of faults worth retrying.
const FAULT_STATES: &[&str] = &[
    "08",    // connection exception
    "53",    // insufficient resources: disk full, out of memory, too many connections
    "58",    // system error: I/O error on the server
    "57P01", // admin shutdown
    "57P02", // crash shutdown
    "57P03", // cannot connect now (starting up, in recovery)
    "57P05", // idle session timeout
    "57014", // query canceled (by an operator or a timeout)
    "57000", // operator intervention
    "40001", // serialization failure (also: conflict with recovery)
    "40P01", // deadlock detected
    "40003", // statement completion unknown
    "55P03", // lock not available
    "55006", // object in use (a replication slot still held)
    "25006", // read-only transaction (a target in recovery, mid-failover)
    "25P02", // in failed transaction: a symptom, the cause is reported by itself
    "72000", // snapshot too old
];

/// Whether SQLSTATE `code` is a fault of a connection or server.
pub fn is_fault_state(code: &str) -> bool {
    FAULT_STATES.iter().any(|s| code.starts_with(s))
}

/// Classifies an error: [`Fatal`] anywhere in the chain is fatal; a closed
/// connection or an I/O error is a fault; otherwise the first SQLSTATE decides;
/// an error without one (a timeout, a stalled connection) is a fault.
pub fn classify(e: &anyhow::Error) -> Class {
    // `anyhow::Error::downcast_ref` looks through every context layer.
    if e.downcast_ref::<Fatal>().is_some() {
        return Class::Fatal;
    }
    let mut state: Option<String> = None;
    for cause in e.chain() {
        if let Some(pg) = cause.downcast_ref::<PgError>() {
            if pg.closed {
                return Class::Fault;
            }
            state = state.or_else(|| pg.code.as_ref().map(|c| c.code().to_string()));
        } else if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            if pg.is_closed() {
                return Class::Fault;
            }
            state = state.or_else(|| pg.code().map(|c| c.code().to_string()));
        } else if let Some(r) = cause.downcast_ref::<ReplicationError>() {
            match r {
                ReplicationError::Server { code, .. } => {
                    state = state.or_else(|| Some(code.code().to_string()));
                }
                _ => return Class::Fault,
            }
        } else if cause.downcast_ref::<std::io::Error>().is_some() {
            return Class::Fault;
        }
    }
    match state {
        Some(code) if !is_fault_state(&code) => Class::Fatal,
        _ => Class::Fault,
    }
}

/// Which source transactions a failed target statement was applying.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceTxns {
    /// One source transaction, by its commit LSN.
    One(Lsn),
    /// Several coalesced into one target transaction, by the commit LSNs of the
    /// first and the last; the failing one is not known.
    Range(Lsn, Lsn),
    /// A streamed transaction still open on the source (its commit LSN is not known
    /// yet), by its transaction id.
    Streamed(u32),
}

impl SourceTxns {
    /// The set of commit LSNs `lsns` (in any order), or `None` when empty.
    pub fn spanning(lsns: impl IntoIterator<Item = Lsn>) -> Option<SourceTxns> {
        let mut span: Option<(Lsn, Lsn)> = None;
        for lsn in lsns {
            span = Some(match span {
                None => (lsn, lsn),
                Some((lo, hi)) => (lo.min(lsn), hi.max(lsn)),
            });
        }
        span.map(|(lo, hi)| {
            if lo == hi {
                SourceTxns::One(lo)
            } else {
                SourceTxns::Range(lo, hi)
            }
        })
    }
}

impl fmt::Display for SourceTxns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SourceTxns::One(lsn) => write!(f, "the source transaction committed at {lsn}"),
            SourceTxns::Range(lo, hi) => write!(
                f,
                "one of the source transactions committed at {lo} to {hi} (applied together; the failing one is not known)"
            ),
            SourceTxns::Streamed(xid) => write!(
                f,
                "the source transaction {xid} (streamed while still open on the source)"
            ),
        }
    }
}

/// Where an apply error happened, attached as context to the error (found again
/// with `anyhow::Error::downcast_ref`, outermost first): the source transactions
/// and the table being written.
#[derive(Clone, Debug)]
pub struct ApplyContext {
    /// The source transactions the failing statement applied, when known.
    pub txns: Option<SourceTxns>,
    /// The table written, when known.
    pub table: Option<QualifiedName>,
}

impl fmt::Display for ApplyContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "applying ")?;
        match &self.txns {
            Some(t) => write!(f, "{t}")?,
            None => write!(f, "source changes")?,
        }
        if let Some(table) = &self.table {
            write!(f, " to table {table}")?;
        }
        Ok(())
    }
}

/// The one line `run` stops with for a fatal error: where (source transaction,
/// table, the server's message whose detail names the key or row), the SQLSTATE,
/// and what to do.
pub fn stop_message(e: &anyhow::Error) -> String {
    if let Some(fatal) = e.downcast_ref::<Fatal>() {
        return fatal.0.clone();
    }
    let context = e.downcast_ref::<ApplyContext>();
    let pg = e.chain().find_map(|c| c.downcast_ref::<PgError>());
    let code = pg
        .and_then(|p| p.code.as_ref())
        .map(|c| c.code().to_string());
    let table = context
        .and_then(|c| c.table.as_ref().map(|t| t.to_string()))
        .or_else(|| pg.and_then(|p| p.table.clone()));
    let mut line = String::from("stopped ");
    match context {
        Some(c) => {
            line.push_str("while applying ");
            match &c.txns {
                Some(t) => line.push_str(&t.to_string()),
                None => line.push_str("source changes"),
            }
        }
        None => line.push_str("streaming"),
    }
    if let Some(table) = &table {
        line.push_str(&format!(" to table {table}"));
    }
    let message = match pg {
        Some(p) => p.message.clone(),
        None => e.chain().last().map(|c| c.to_string()).unwrap_or_default(),
    };
    line.push_str(&format!(": {message}"));
    if let Some(code) = &code {
        line.push_str(&format!(" (SQLSTATE {code})"));
    }
    line.push_str("; retrying cannot fix this: ");
    line.push_str(&advice(code.as_deref(), table.as_deref()));
    line.replace('\n', " ")
}

/// What to do about an error of SQLSTATE `code`.
fn advice(code: Option<&str>, table: Option<&str>) -> String {
    let table = table.unwrap_or("the table");
    let then = "then start `walshuttle run` again (it resumes with that transaction)";
    match code.map(|c| &c[..2.min(c.len())]) {
        Some("23") => format!(
            "the target refuses a row the source accepted: make {table} on the target accept it (drop or relax the target's constraint the source does not have, or fix the row on the source), {then}"
        ),
        Some("22") => format!(
            "the target refuses a value the source holds: make the column of {table} on the target accept it (ALTER TABLE … ALTER COLUMN … TYPE as on the source), {then}"
        ),
        Some("42") => format!(
            "the target's definition of {table} or the target role's privileges no longer match the pipeline: restore them as on the source, {then}"
        ),
        _ => format!("fix the cause on the target, {then}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::error::SqlState;

    fn pg_error(code: &str, closed: bool) -> anyhow::Error {
        PgError {
            what: "applying".into(),
            message: "boom (Key (id)=(1) already exists.)".into(),
            code: Some(SqlState::from_code(code)),
            closed,
            table: Some("public.t".into()),
        }
        .into()
    }

    #[test]
    fn connection_and_server_faults_are_retried() {
        for code in [
            "08006", "57P01", "57P02", "57P03", "53100", "53300", "40001", "40P01", "55P03",
        ] {
            assert_eq!(classify(&pg_error(code, false)), Class::Fault, "{code}");
        }
        assert_eq!(classify(&pg_error("23505", true)), Class::Fault);
        assert_eq!(
            classify(&anyhow::anyhow!("a step took longer than 120 s")),
            Class::Fault
        );
        let io: anyhow::Error = ReplicationError::Io(std::io::Error::other("reset")).into();
        assert_eq!(classify(&io), Class::Fault);
    }

    #[test]
    fn errors_of_the_data_are_fatal() {
        for code in [
            "23505", "23514", "23502", "22003", "22P02", "42P01", "42501", "0A000",
        ] {
            assert_eq!(classify(&pg_error(code, false)), Class::Fatal, "{code}");
        }
        let wrapped = pg_error("23514", false).context(ApplyContext {
            txns: Some(SourceTxns::One(Lsn(0x1_0000_0010))),
            table: None,
        });
        assert_eq!(classify(&wrapped), Class::Fatal);
        assert_eq!(
            classify(&anyhow::Error::new(Fatal("stop".into())).context("outer")),
            Class::Fatal
        );
    }

    #[test]
    fn the_stop_message_names_transaction_table_key_and_what_to_do() {
        let e = pg_error("23505", false).context(ApplyContext {
            txns: SourceTxns::spanning([Lsn(0x1_0000_0020), Lsn(0x1_0000_0010)]),
            table: Some(QualifiedName::new("public", "t")),
        });
        let line = stop_message(&e);
        assert!(line.contains("committed at 1/10 to 1/20"), "{line}");
        assert!(line.contains("table public.t"), "{line}");
        assert!(line.contains("Key (id)=(1)"), "{line}");
        assert!(line.contains("SQLSTATE 23505"), "{line}");
        assert!(line.contains("walshuttle run"), "{line}");
        assert_eq!(
            SourceTxns::spanning([Lsn(5), Lsn(5)]),
            Some(SourceTxns::One(Lsn(5)))
        );
        assert_eq!(SourceTxns::spanning([]), None);
    }
}
