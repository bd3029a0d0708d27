//! Reads one row again from the source by its key, under a snapshot whose
//! visibility becomes the row's copy position.
//!
//! A key change can move a row whose TOASTed value it left unchanged (so pgoutput
//! did not send it) from a key range copied later into one copied earlier: the old
//! row is not on the target (the later copy already saw the change) and the new row
//! is not either (the earlier copy did not), so nothing on the target holds the
//! value. The source does: the row is read by its new key, written as it is now,
//! and the read's snapshot decides the row's later changes like any other copy's
//! (see [`crate::positions`] and docs/design.md, "Key changes into a range copied
//! earlier"). This is rare, so it opens a connection of its own and never sits on
//! the apply path otherwise.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use tokio_postgres::types::{FromSql, ToSql, Type};

use super::decoder::{TupleData, TupleValue};
use super::relations::{Fatal, TableShape};
use super::values::RawValue;
use crate::config::Endpoint;
use crate::pg::PgResultExt;
use crate::positions::SnapshotView;
use crate::snapshot::SourceSnapshot;

/// Longest a read of one row may take, connecting and locking included: past it
/// the source counts as unreachable (a transient error; `run` retries).
const TIMEOUT: Duration = Duration::from_secs(60);
/// Pause before taking the snapshot again when it does not yet see the change's
/// transaction (its commit is decoded a moment before it is visible).
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// A row read again from the source.
#[derive(Debug)]
pub struct Refetched {
    /// The row as it is under `snapshot`, in the stream's value format and tuple
    /// order; `None` when no row has the key any more (a later change in the
    /// stream deleted it or moved it away).
    pub row: Option<TupleData>,
    /// The key's columns as text, in key order (how copy positions store keys).
    pub key_text: Vec<String>,
    /// The key as the stream sends it (how live copy positions match rows).
    pub key: Vec<Bytes>,
    /// The snapshot the row was read under; it sees the change's transaction.
    pub snapshot: SnapshotView,
}

/// A column value exactly as the server sent it (binary result format).
struct Raw(Bytes);

impl<'a> FromSql<'a> for Raw {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(Bytes::copy_from_slice(raw)))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// Reads the row of `shape` whose identity key (columns `key_columns`, in the order
/// copy positions store keys) is the one in `new` (the new row of a key change
/// made by source transaction `xid`), under a fresh snapshot that sees `xid`.
/// Bounded by [`TIMEOUT`]; a source that does not answer in time is a transient
/// error.
///
/// `row_filter` is the table's row filter (`--row-filter`): a row outside it now
/// is not read (a later change in the stream moved it out).
pub async fn read_row(
    source: &Endpoint,
    shape: &TableShape,
    key_columns: &[String],
    new: &TupleData,
    xid: u32,
    row_filter: Option<&str>,
) -> Result<Refetched> {
    let read = read_row_now(source, shape, key_columns, new, xid, row_filter);
    match tokio::time::timeout(TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(&shape.name)),
    }
}

/// The error of a read that took longer than [`TIMEOUT`]: an I/O timeout, so `run`
/// retries it (a transient fault) rather than stopping for a person.
fn timed_out(table: &crate::pg::QualifiedName) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the source did not answer within {} s", TIMEOUT.as_secs()),
    ))
    .context(format!(
        "reading a row of {table} again from the source (its key changed and its TOASTed values were not sent)"
    ))
}

async fn read_row_now(
    source: &Endpoint,
    shape: &TableShape,
    key_columns: &[String],
    new: &TupleData,
    xid: u32,
    row_filter: Option<&str>,
) -> Result<Refetched> {
    let ctx = || format!("reading a row of {} again from the source", shape.name);
    let key_at: Option<Vec<usize>> = key_columns
        .iter()
        .map(|k| shape.column_names.iter().position(|c| c == k))
        .collect();
    let key_at = match key_at {
        Some(at) if !at.is_empty() && !shape.match_full_row => at,
        _ => {
        return Err(Fatal(format!(
            "a key change in {} left TOASTed values unsent and the table has no identity key to read the row again by: run `walshuttle tables resync {}`",
            shape.name,
            shape.name.quoted()
            ))
            .into())
        }
    };
    let mut key = Vec::with_capacity(key_at.len());
    let mut params = Vec::with_capacity(key_at.len());
    for &col in &key_at {
        match new.columns.get(col) {
            Some(TupleValue::Binary(b)) | Some(TupleValue::Text(b)) => {
                key.push(b.clone());
                params.push(RawValue(Some(b.clone())));
            }
            _ => bail!(
                "the new row of a key change in {} has no value for key column {}",
                shape.name,
                shape
                    .column_names
                    .get(col)
                    .map(String::as_str)
                    .unwrap_or("?")
            ),
        }
    }
    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
    let placeholders: Vec<String> = key_at
        .iter()
        .enumerate()
        .map(|(i, &col)| shape.param(i + 1, col))
        .collect();
    let key_sql = placeholders
        .iter()
        .map(|p| format!("({p})::text"))
        .collect::<Vec<_>>()
        .join(", ");
    let filter = key_at
        .iter()
        .zip(&placeholders)
        .map(|(&col, p)| format!("{} = {p}", shape.columns[col].quoted))
        .collect::<Vec<_>>()
        .join(" AND ");
    // Values in the stream's format: binary results are each type's send format;
    // text ones are read as text (a value the type's input accepts).
    let select = shape
        .columns
        .iter()
        .map(|c| {
            if shape.binary {
                c.quoted.clone()
            } else {
                format!("{}::text", c.quoted)
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let filter = match row_filter {
        Some(f) => format!("{filter} AND ({f})"),
        None => filter,
    };
    let row_sql = format!(
        "SELECT {select} FROM ONLY {} WHERE {filter}",
        shape.name.quoted()
    );

    let started = Instant::now();
    loop {
        let snapshot = SourceSnapshot::take(source, std::slice::from_ref(&shape.name)).await?;
        let view = snapshot
            .view
            .clone()
            .context("a snapshot to read a row again under has no recorded visibility")?;
        if !view.sees(xid) {
            // The commit was decoded before the source made it visible; it will be.
            snapshot.release().await;
            if started.elapsed() > TIMEOUT {
                bail!(
                    "the source never showed transaction {xid} committed while reading a row of {} again",
                    shape.name
                );
            }
            tokio::time::sleep(RETRY_PAUSE).await;
            continue;
        }
        let client = snapshot.holder();
        let key_row = client
            .query_one(&format!("SELECT {key_sql}"), &refs)
            .await
            .pg_context(ctx)?;
        let mut key_text = Vec::with_capacity(key_at.len());
        for i in 0..key_at.len() {
            key_text.push(key_row.try_get::<_, String>(i).pg_context(ctx)?);
        }
        let row = client.query_opt(&row_sql, &refs).await.pg_context(ctx)?;
        let row = match row {
            None => None,
            Some(r) => {
                let mut columns = Vec::with_capacity(shape.columns.len());
                for i in 0..shape.columns.len() {
                    let value = match r.try_get::<_, Option<Raw>>(i).pg_context(ctx)? {
                        None => TupleValue::Null,
                        Some(Raw(b)) if shape.binary => TupleValue::Binary(b),
                        Some(Raw(b)) => TupleValue::Text(b),
                    };
                    columns.push(value);
                }
                Some(TupleData { columns })
            }
        };
        snapshot.release().await;
        return Ok(Refetched {
            row,
            key_text,
            key,
            snapshot: view,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_that_times_out_is_transient() {
        let e = timed_out(&crate::pg::QualifiedName::new("public", "t"));
        assert!(crate::exit::is_transient(&e));
        assert!(matches!(
            crate::stream::faults::classify(&e),
            crate::stream::faults::Class::Fault
        ));
        assert!(format!("{e:#}").contains("did not answer within 60 s"));
    }
}
