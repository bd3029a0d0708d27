//! The one range copier: rows of one table read from the source under a snapshot and
//! written to the target, COPY bytes passed through undecoded.
//!
//! Bootstrap chunks only insert (their range is empty on the target). Catch-up,
//! `verify --repair` and table resync *rewrite*: they delete the target's rows in the
//! range first, then copy the source's, in the caller's target transaction, which
//! also records the range's copy position (see [`crate::positions`]). Rewriting all
//! differing keys of a table in one transaction, deletes first, can never trip a
//! UNIQUE constraint: every row left or written equals a source row.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures_util::{SinkExt, StreamExt};
use tokio_postgres::{Client, GenericClient, Transaction};

use crate::catalog::Table;
use crate::config::Endpoint;
use crate::pg::{quote_ident, quote_literal, PgResultExt, QualifiedName};
use crate::snapshot::SourceSnapshot;
use crate::state::{StateStore, StoredScope};

/// How long a rewrite waits for a moment between two apply transactions of a
/// running pipeline.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// Which rows of a table a rewrite replaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Every row.
    All,
    /// Rows with these identity keys (each key: its columns' text, in key order).
    Keys(Vec<Vec<String>>),
    /// Rows matching an SQL condition (a watermark window).
    Where(String),
}

/// Streams `COPY (SELECT columns FROM ONLY table WHERE predicate) TO STDOUT` from the
/// source into `COPY table (columns) FROM STDIN` inside `tx`; returns rows and bytes.
/// `on_bytes` sees every buffer as it passes (progress display).
pub async fn copy_rows(
    source: &Client,
    tx: &Transaction<'_>,
    table: &QualifiedName,
    columns: &str,
    predicate: &str,
    binary: bool,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<(u64, u64)> {
    let ctx = || format!("copying rows of {table}");
    let format = if binary { " (FORMAT binary)" } else { "" };
    let reader = source
        .copy_out(&format!(
            "COPY (SELECT {columns} FROM ONLY {} WHERE {predicate}) TO STDOUT{format}",
            table.quoted()
        ))
        .await
        .pg_context(ctx)?;
    let writer = tx
        .copy_in::<_, bytes::Bytes>(&format!(
            "COPY {} ({columns}) FROM STDIN{format}",
            table.quoted()
        ))
        .await
        .pg_context(ctx)?;
    futures_util::pin_mut!(reader);
    futures_util::pin_mut!(writer);
    let mut bytes = 0u64;
    while let Some(data) = reader.next().await {
        let data = data.pg_context(ctx)?;
        bytes += data.len() as u64;
        on_bytes(data.len() as u64);
        writer.feed(data).await.pg_context(ctx)?;
    }
    let rows = writer.finish().await.pg_context(ctx)?;
    Ok((rows, bytes))
}

/// An SQL array literal of text values: `'{"a","b\"c"}'::text[]`.
pub fn text_array(values: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let items: Vec<String> = values
        .into_iter()
        .map(|v| {
            format!(
                "\"{}\"",
                v.as_ref().replace('\\', "\\\\").replace('"', "\\\"")
            )
        })
        .collect();
    format!(
        "{}::text[]",
        quote_literal(&format!("{{{}}}", items.join(",")))
    )
}

/// `keys` (each a key's columns as text) as a set-returning source, shared by key
/// lookups: the identity key columns' types, and `unnest(…) AS u(c0, c1, …)`, whose
/// column `u.cN` holds key column N's text.
pub fn key_rows(table: &Table, keys: &[Vec<String>]) -> (Vec<String>, String) {
    let types: Vec<String> = table
        .key
        .iter()
        .map(|k| {
            table
                .columns
                .iter()
                .find(|c| &c.name == k)
                .map(|c| c.type_sql.clone())
                .unwrap_or_else(|| "text".into())
        })
        .collect();
    let arrays: Vec<String> = (0..types.len())
        .map(|i| {
            text_array(
                keys.iter()
                    .map(|k| k.get(i).map(String::as_str).unwrap_or("")),
            )
        })
        .collect();
    let aliases: Vec<String> = (0..types.len()).map(|i| format!("c{i}")).collect();
    let from = format!("unnest({}) AS u({})", arrays.join(", "), aliases.join(", "));
    (types, from)
}

/// `(k1, k2) IN (SELECT …)`: rows whose identity key is among `keys`, with each key
/// column compared in its own type (so indexes serve it).
pub fn keys_predicate(table: &Table, keys: &[Vec<String>]) -> String {
    let cols: Vec<String> = table.key.iter().map(|k| quote_ident(k)).collect();
    let (types, from) = key_rows(table, keys);
    let selected: Vec<String> = types
        .iter()
        .enumerate()
        .map(|(i, t)| format!("u.c{i}::{t}"))
        .collect();
    format!(
        "({}) IN (SELECT {} FROM {from})",
        cols.join(", "),
        selected.join(", ")
    )
}

/// Replaces the target's `rows` of `table` with the source's (read through
/// `source`, which reads under the caller's snapshot), inside `tx`. Returns (rows
/// deleted, rows copied).
pub async fn rewrite(
    source: &Client,
    tx: &Transaction<'_>,
    table: &Table,
    rows: &Rows,
    binary: bool,
) -> Result<(u64, u64)> {
    rewrite_reporting(source, tx, table, rows, binary, &|_| {}).await
}

/// [`rewrite`], calling `on_bytes` with every buffer of rows copied (progress).
pub async fn rewrite_reporting(
    source: &Client,
    tx: &Transaction<'_>,
    table: &Table,
    rows: &Rows,
    binary: bool,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<(u64, u64)> {
    let ctx = || format!("rewriting rows of {} on the target", table.name);
    let columns = table.copied_column_list();
    // The table's own rows on the target: not an inheritance child's, but every
    // partition's where it is partitioned there.
    let own = crate::own_rows::own_rows_on(tx, &table.name).await?;
    let (deleted, predicate) = match rows {
        Rows::All => {
            let n: i64 = tx
                .query_one(&format!("SELECT count(*) FROM {own}"), &[])
                .await
                .pg_context(ctx)?
                .get(0);
            tx.batch_execute(&format!("TRUNCATE {own}"))
                .await
                .pg_context(ctx)?;
            (n as u64, "true".to_string())
        }
        Rows::Keys(keys) if keys.is_empty() => return Ok((0, 0)),
        Rows::Keys(keys) => {
            let mut deleted = 0;
            let mut copied = 0;
            // Delete every key first, then copy: the rows in between never collide
            // with a UNIQUE constraint (each equals a source row).
            for batch in keys.chunks(50_000) {
                let p = keys_predicate(table, batch);
                deleted += tx
                    .execute(&format!("DELETE FROM {own} WHERE {p}"), &[])
                    .await
                    .pg_context(ctx)?;
            }
            for batch in keys.chunks(50_000) {
                let p = keys_predicate(table, batch);
                let p = table.source_rows(&p);
                copied += copy_rows(source, tx, &table.name, &columns, &p, binary, on_bytes)
                    .await?
                    .0;
            }
            return Ok((deleted, copied));
        }
        Rows::Where(condition) => {
            // The window's rows go through a staging table, so the target's rows with
            // the same keys can be deleted first.
            tx.batch_execute(&format!(
                "CREATE TEMP TABLE IF NOT EXISTS walshuttle_rewrite (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP; \
                 TRUNCATE walshuttle_rewrite",
                table.name.quoted()
            ))
            .await
            .pg_context(ctx)?;
            let staged = copy_into_staging(source, tx, table, condition, binary).await?;
            let join = table
                .key
                .iter()
                .map(|k| format!("t.{0} = s.{0}", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(" AND ");
            let deleted = tx
                .execute(
                    &format!("DELETE FROM {own} t USING walshuttle_rewrite s WHERE {join}"),
                    &[],
                )
                .await
                .pg_context(ctx)?;
            tx.batch_execute(&format!(
                "INSERT INTO {t} ({columns}) SELECT {columns} FROM walshuttle_rewrite; DROP TABLE walshuttle_rewrite",
                t = table.name.quoted()
            ))
            .await
            .pg_context(ctx)?;
            return Ok((deleted, staged));
        }
    };
    let (copied, _) = copy_rows(
        source,
        tx,
        &table.name,
        &columns,
        &table.source_rows(&predicate),
        binary,
        on_bytes,
    )
    .await?;
    Ok((deleted, copied))
}

async fn copy_into_staging(
    source: &Client,
    tx: &Transaction<'_>,
    table: &Table,
    condition: &str,
    binary: bool,
) -> Result<u64> {
    let ctx = || format!("reading changed rows of {} from the source", table.name);
    let columns = table.copied_column_list();
    let format = if binary { " (FORMAT binary)" } else { "" };
    let reader = source
        .copy_out(&format!(
            "COPY (SELECT {columns} FROM ONLY {} WHERE {}) TO STDOUT{format}",
            table.name.quoted(),
            table.source_rows(condition)
        ))
        .await
        .pg_context(ctx)?;
    let writer = tx
        .copy_in::<_, bytes::Bytes>(&format!(
            "COPY walshuttle_rewrite ({columns}) FROM STDIN{format}"
        ))
        .await
        .pg_context(ctx)?;
    futures_util::pin_mut!(reader);
    futures_util::pin_mut!(writer);
    while let Some(chunk) = reader.next().await {
        writer.feed(chunk.pg_context(ctx)?).await.pg_context(ctx)?;
    }
    writer.finish().await.pg_context(ctx)
}

/// Rewrites `rows` of `table` on the target now, safely whether the pipeline's
/// `run` is stopped, lagging or streaming: it waits for a moment when no apply
/// transaction is open and holds the pipeline's positions lock until it commits
/// (never queueing for it, so apply sessions never wait behind it); only then takes a
/// source snapshot, so that everything already applied is in it; rewrites the rows
/// and records the snapshot as their copy position, so the stream skips exactly the
/// changes the rewrite holds and applies the rest. Without a `pipeline` (a target no
/// pipeline streams into) no position is recorded. Returns (deleted, copied).
#[allow(clippy::too_many_arguments)]
pub async fn rewrite_now(
    source: &Endpoint,
    client: &mut Client,
    state: &StateStore,
    pipeline: Option<&str>,
    table: &Table,
    rows: Rows,
    binary: bool,
    purpose: &str,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<(u64, u64)> {
    let ctx = || format!("rewriting rows of {} on the target", table.name);
    let deadline = Instant::now() + LOCK_WAIT;
    let mut waited = false;
    loop {
        let tx = client.transaction().await.pg_context(ctx)?;
        if let Some(p) = pipeline {
            if !state.try_lock_positions(&tx, p).await? {
                tx.rollback().await.pg_context(ctx)?;
                if Instant::now() > deadline {
                    bail!(
                        "pipeline {p} kept an apply transaction open for {} s, so {} could not be rewritten: try again",
                        LOCK_WAIT.as_secs(),
                        table.name
                    );
                }
                if !waited {
                    tracing::info!(table = %table.name, "waiting for the running pipeline to finish its apply transaction");
                    waited = true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        }
        let snapshot = SourceSnapshot::take(source, std::slice::from_ref(&table.name)).await?;
        let view = snapshot.view.clone();
        let Some(session) = snapshot
            .into_sessions(source, purpose, 1)
            .await?
            .into_iter()
            .next()
        else {
            bail!("no session reads under the snapshot of {purpose}");
        };
        let (deleted, copied) =
            rewrite_reporting(&session.client, &tx, table, &rows, binary, on_bytes).await?;
        if let (Some(p), Some(view)) = (pipeline, &view) {
            let id = state.record_snapshot(&tx, p, view, purpose).await?;
            let scope = match rows {
                Rows::Keys(keys) => StoredScope::Keys(keys),
                Rows::All => StoredScope::Table,
                Rows::Where(_) => bail!("a rewrite by condition has no copy position"),
            };
            state.add_position(&tx, p, &table.name, &scope, id).await?;
        }
        tx.commit().await.pg_context(ctx)?;
        let _ = session.client.batch_execute("COMMIT").await;
        return Ok((deleted, copied));
    }
}

/// Runs `sql` inside a savepoint of `tx`; on a unique or exclusion violation rolls
/// back to the savepoint and returns `Ok(false)`.
pub async fn unless_conflict<T>(
    tx: &Transaction<'_>,
    name: &str,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<Option<T>> {
    tx.batch_execute(&format!("SAVEPOINT {name}"))
        .await
        .pg_context(|| "opening a savepoint on the target".into())?;
    match work.await {
        Ok(v) => {
            tx.batch_execute(&format!("RELEASE SAVEPOINT {name}"))
                .await
                .pg_context(|| "releasing a savepoint on the target".into())?;
            Ok(Some(v))
        }
        Err(e) if is_conflict(&e) => {
            tx.batch_execute(&format!("ROLLBACK TO SAVEPOINT {name}"))
                .await
                .pg_context(|| "rolling back to a savepoint on the target".into())?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Whether an error is a unique (23505) or exclusion (23P01) violation.
pub fn is_conflict(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<crate::pg::connect::PgError>()
            .and_then(|p| p.code.as_ref())
            .is_some_and(|code| code.code() == "23505" || code.code() == "23P01")
    })
}

/// Rows of a table on one side (for reports): its own, see [`crate::own_rows`].
pub async fn count_rows(client: &impl GenericClient, table: &QualifiedName) -> Result<i64> {
    let own = crate::own_rows::own_rows_on(client, table).await?;
    Ok(client
        .query_one(&format!("SELECT count(*) FROM {own}"), &[])
        .await
        .pg_context(|| format!("counting the rows of {table}"))?
        .get(0))
}
