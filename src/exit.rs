//! Exit codes a supervisor can act on.
//!
//! | code | meaning | a supervisor should |
//! |---|---|---|
//! | 0 | success (or `verify`: equal) | nothing |
//! | 1 | needs a person: the message says what to do (`verify`: different) | not restart |
//! | 2 | usage: a bad flag or config file (`verify`: any error) | not restart |
//! | 75 | transient (`EX_TEMPFAIL`): a server down or unreachable | restart later |
//!
//! `run` itself rides through transient errors (it retries with backoff, start-up
//! included); 75 is what any command exits with when a server it needs is down or
//! unreachable and it does not wait for it. Local errors (no writable `TMPDIR`, a
//! full disk, a permission) need a person.

use crate::pg::connect::{ConnectError, PgError};
use crate::pg::replication::ReplicationError;
use crate::stream::faults::Fatal;

/// Success.
pub const SUCCESS: u8 = 0;
/// An error that needs a person; its one-line message says what to do.
pub const NEEDS_A_PERSON: u8 = 1;
/// A bad command line or config file.
pub const USAGE: u8 = 2;
/// A server down or unreachable: trying again later can succeed (`EX_TEMPFAIL`).
pub const TRANSIENT: u8 = 75;

/// SQLSTATEs (whole codes or classes) of a server that is down, going down,
/// starting up or out of connections: the same request can succeed later.
const TRANSIENT_STATES: &[&str] = &[
    "08",    // connection exception
    "57P01", // admin shutdown
    "57P02", // crash shutdown
    "57P03", // cannot connect now (starting up, in recovery)
    "53300", // too many connections
];

/// Whether SQLSTATE `code` says the server is down, starting or full.
pub fn is_transient_state(code: &str) -> bool {
    TRANSIENT_STATES.iter().any(|s| code.starts_with(s))
}

/// Whether `e` says a server is down or unreachable (refused, reset, timed out,
/// shutting down, starting up), rather than something a person must fix. Narrower
/// than [`crate::stream::faults::classify`]: an error without a server or
/// connection behind it (a refused flag, a check that failed) is not transient.
pub fn is_transient(e: &anyhow::Error) -> bool {
    if e.downcast_ref::<Fatal>().is_some() {
        return false;
    }
    e.chain().any(|cause| {
        if cause.is::<crate::bootstrap::RewrittenEveryTime>() {
            true
        } else if let Some(c) = cause.downcast_ref::<ConnectError>() {
            c.transient
        } else if let Some(pg) = cause.downcast_ref::<PgError>() {
            pg.closed
                || pg
                    .code
                    .as_ref()
                    .is_some_and(|c| is_transient_state(c.code()))
        } else if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            pg.is_closed() || pg.code().is_some_and(|c| is_transient_state(c.code()))
        } else if let Some(r) = cause.downcast_ref::<ReplicationError>() {
            match r {
                ReplicationError::Io(_) => true,
                ReplicationError::Server { code, .. } => is_transient_state(code.code()),
                _ => false,
            }
        } else if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotConnected
                    | BrokenPipe
                    | TimedOut
                    | UnexpectedEof
                    | HostUnreachable
                    | NetworkUnreachable
            )
        } else {
            false
        }
    })
}

/// The exit code of a command that failed with `e`: [`TRANSIENT`] or
/// [`NEEDS_A_PERSON`].
pub fn code_for(e: &anyhow::Error) -> u8 {
    if is_transient(e) {
        TRANSIENT
    } else {
        NEEDS_A_PERSON
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_connection_is_transient_and_a_check_is_not() {
        let refused = anyhow::Error::new(ConnectError {
            message: "cannot connect".into(),
            transient: true,
        })
        .context("reading the state");
        assert_eq!(code_for(&refused), TRANSIENT);
        let password = anyhow::Error::new(ConnectError {
            message: "password authentication failed".into(),
            transient: false,
        });
        assert_eq!(code_for(&password), NEEDS_A_PERSON);
        // A burst of TRUNCATE on the source while slots were created passes.
        let rewritten =
            anyhow::Error::new(crate::bootstrap::RewrittenEveryTime).context("bootstrapping");
        assert_eq!(code_for(&rewritten), TRANSIENT);
        assert_eq!(
            code_for(&anyhow::anyhow!("table t has no primary key")),
            NEEDS_A_PERSON
        );
        let io: anyhow::Error =
            ReplicationError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)).into();
        assert_eq!(code_for(&io), TRANSIENT);
        let tmp = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::NotFound))
            .context("creating a spool file");
        assert_eq!(code_for(&tmp), NEEDS_A_PERSON);
        let fatal = anyhow::Error::new(Fatal("stop".into())).context(ConnectError {
            message: "x".into(),
            transient: true,
        });
        assert_eq!(code_for(&fatal), NEEDS_A_PERSON);
        assert!(is_transient_state("57P03") && is_transient_state("08006"));
        assert!(!is_transient_state("28P01"));
    }
}
