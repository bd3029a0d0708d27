//! `--capture-ddl`: DDL captured on the source by an event trigger and applied on the
//! target at its place in the log.
//!
//! pgoutput carries no DDL; the Relation path (`stream::drift`) infers column changes
//! from the next Relation message. With this flag the source says what happened:
//! - [`trigger`] installs, per pipeline, an event trigger whose function emits each
//!   command touching the pipeline's tables as a transactional logical message with
//!   the table's desired state, so it arrives in commit order with the data, between
//!   the last change under the old shape and the first under the new;
//! - [`apply`] plans, from that message and the target's catalog, the statements that
//!   make the target table match; `stream::session` runs them on the main connection
//!   at a commit boundary, records tables that join, are renamed or dropped, and
//!   copies again the tables whose rows the stream cannot carry. The Relation message
//!   that follows then finds the target already matching, and plans nothing.

pub mod apply;
pub mod trigger;

use anyhow::Result;
use tokio_postgres::Client;

use crate::config::Endpoint;
use crate::pg::{connect, QualifiedName};
use crate::state::{Selection, StateStore};

/// The logical message prefix of pipeline `slot`'s trigger.
pub fn prefix(slot: &str) -> String {
    trigger::Names::for_slot(slot).prefix
}

/// Checks the privilege, installs the pipeline's trigger on the source and records in
/// the state that the pipeline captures DDL. Called by bootstrap before the slot is
/// created, so every command after the slot's start is captured.
pub async fn enable(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    slot: &str,
    publication: &str,
    every_table: bool,
    tables: &[QualifiedName],
) -> Result<()> {
    trigger::check_privilege(src, slot).await?;
    trigger::install(
        src,
        &trigger::Spec {
            slot: slot.to_string(),
            publication: publication.to_string(),
            every_table,
            excluded_schemas: vec![state.schema().to_string(), trigger::SCHEMA.to_string()],
            tables: tables.to_vec(),
        },
    )
    .await?;
    state.set_capture_ddl(tgt, slot, true).await?;
    tracing::info!(
        slot,
        "DDL on the source is captured by an event trigger and applied on the target in log order"
    );
    Ok(())
}

/// [`enable`] for a bootstrapped pipeline (`run --capture-ddl`): its tables,
/// publication and selection come from its state.
pub async fn enable_for_pipeline(
    source: &Endpoint,
    target: &Endpoint,
    state: &StateStore,
    slot: &str,
) -> Result<()> {
    let src = connect(source, "ddl capture").await?;
    let tgt = connect(target, "ddl capture").await?;
    let Some(pipeline) = state.pipeline(&tgt, slot).await? else {
        anyhow::bail!("pipeline {slot} has no state on the target: run bootstrap first");
    };
    let every_table = state.selection(&tgt, slot).await? == Selection::EveryTable;
    enable(
        &src,
        &tgt,
        state,
        slot,
        &pipeline.publication,
        every_table,
        &pipeline.tables,
    )
    .await
}
