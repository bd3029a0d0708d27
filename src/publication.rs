//! Publications belong to their pipeline. A pipeline's publication is named after its
//! slot unless `--publication` says otherwise, and walshuttle marks the ones it creates
//! with a comment naming the slot (`walshuttle pipeline <slot>`; slot names are unique
//! per source cluster). It never alters or drops a publication marked for another
//! pipeline, nor an unmarked one (the user's) that this pipeline's state does not
//! record: another pipeline's tables would silently stop arriving.

use anyhow::{bail, Result};
use tokio_postgres::Client;

use crate::pg::{quote_ident, quote_literal, PgResultExt, QualifiedName};
use crate::row_selection::RowSelection;
use crate::state::StateStore;

/// The comment walshuttle puts on the publications it creates, before the slot name.
const MARK: &str = "walshuttle pipeline ";

/// Who a publication on the source belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// No publication of that name.
    Missing,
    /// Marked for the walshuttle pipeline (slot) named.
    Pipeline(String),
    /// Not marked by walshuttle: made by a user, or by a walshuttle older than the
    /// marks.
    Unmarked,
}

/// The publication a pipeline uses, checked to be its own to create or alter.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Publication name.
    pub name: String,
    /// The pipeline (slot) it belongs to.
    pub slot: String,
    /// An unmarked publication this pipeline's state records (made before the marks):
    /// it is adopted, i.e. marked as this pipeline's, when altered.
    pub adopt_unmarked: bool,
}

/// The publication name for a pipeline: the explicit `--publication`, else the one
/// its state records, else the slot's name. An explicit name that differs from the
/// recorded one is refused (the pipeline's tables are in the recorded one).
pub fn resolve(explicit: Option<&str>, slot: &str, recorded: Option<&str>) -> Result<String> {
    match (explicit, recorded) {
        (Some(e), Some(r)) if e != r => bail!(
            "pipeline {slot} uses publication {r} (recorded in its state), not {e}: leave out --publication (and the config file's publication), or tear the pipeline down with `walshuttle teardown --slot {slot}` to start it again with another"
        ),
        (Some(e), _) => Ok(e.to_string()),
        (None, Some(r)) => Ok(r.to_string()),
        (None, None) => Ok(slot.to_string()),
    }
}

/// Looks up who owns publication `name` on the source.
pub async fn owner(src: &Client, name: &str) -> Result<Owner> {
    let row = src
        .query_opt(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .pg_context(|| format!("looking up publication {name} on the source"))?;
    Ok(match row {
        None => Owner::Missing,
        Some(r) => match r
            .get::<_, Option<String>>(0)
            .as_deref()
            .map(|c| c.strip_prefix(MARK))
        {
            Some(Some(slot)) => Owner::Pipeline(slot.to_string()),
            _ => Owner::Unmarked,
        },
    })
}

/// Decides and checks the publication of pipeline `slot` before anything is written:
/// resolves its name (see [`resolve`]) and refuses one that another pipeline or the
/// user owns.
pub async fn plan(
    src: &Client,
    tgt: &Client,
    state: &StateStore,
    slot: &str,
    explicit: Option<&str>,
) -> Result<Plan> {
    let recorded = state
        .existing_pipeline(tgt, slot)
        .await?
        .map(|p| p.publication);
    let name = resolve(explicit, slot, recorded.as_deref())?;
    let recorded_here = recorded.as_deref() == Some(name.as_str());
    let plan = Plan {
        name,
        slot: slot.to_string(),
        adopt_unmarked: recorded_here,
    };
    check(&plan, &owner(src, &plan.name).await?)?;
    if plan.adopt_unmarked {
        // An unmarked publication recorded by two pipelines of this state schema (made
        // before the marks with the default name) is shared: altering it would
        // change the other pipeline's tables.
        if let Some(other) = other_pipeline_recording(tgt, state, slot, &plan.name).await? {
            if owner(src, &plan.name).await? == Owner::Unmarked {
                bail!(
                    "publication {} is also used by walshuttle pipeline {other} (recorded in schema {}), so pipeline {slot} will not change its tables: tear one of the pipelines down, or pick another --publication for {slot}",
                    plan.name,
                    state.schema()
                );
            }
        }
    }
    Ok(plan)
}

/// Another pipeline in `state` that records publication `name`, if any.
async fn other_pipeline_recording(
    tgt: &Client,
    state: &StateStore,
    slot: &str,
    name: &str,
) -> Result<Option<String>> {
    if state.installed_version(tgt).await?.is_none() {
        return Ok(None);
    }
    Ok(tgt
        .query_opt(
            &format!(
                "SELECT pipeline FROM {} WHERE publication = $1 AND pipeline <> $2 ORDER BY 1 LIMIT 1",
                state.table("pipelines")
            ),
            &[&name, &slot],
        )
        .await
        .pg_context(|| "reading the pipelines of the state schema".into())?
        .map(|r| r.get(0)))
}

/// Refuses a publication this pipeline may not create or alter.
fn check(plan: &Plan, owner: &Owner) -> Result<()> {
    match owner {
        Owner::Missing => Ok(()),
        Owner::Pipeline(s) if *s == plan.slot => Ok(()),
        Owner::Pipeline(other) => bail!(
            "publication {} on the source belongs to walshuttle pipeline {other}, and changing its tables would stop that pipeline's tables from arriving: pick another --publication for pipeline {} (the default is the slot's name)",
            plan.name,
            plan.slot
        ),
        Owner::Unmarked if plan.adopt_unmarked => Ok(()),
        Owner::Unmarked => bail!(
            "publication {} already exists on the source and was not made by walshuttle for pipeline {}, so walshuttle will not change its tables: pick another --publication (the default is the slot's name), or drop it on the source if nothing uses it",
            plan.name,
            plan.slot
        ),
    }
}

/// Creates the pipeline's publication for exactly `tables` (marked as the pipeline's),
/// or points its existing one at exactly them, each with its column list and row
/// filter from `rows`. Checks ownership again: something may have changed since
/// [`plan`].
pub async fn ensure(
    src: &Client,
    plan: &Plan,
    tables: &[QualifiedName],
    rows: &RowSelection,
) -> Result<()> {
    let name = &plan.name;
    // `ONLY`: without it PostgreSQL publishes every inheritance child of a table as
    // well, tables nobody named. (A partitioned table's partitions are published
    // through it either way; the pipeline lists leaf partitions themselves.)
    let list = tables
        .iter()
        .map(|t| rows.publication_item(t))
        .collect::<Vec<_>>()
        .join(", ");
    let owner = owner(src, name).await?;
    check(plan, &owner)?;
    let mark = format!(
        "COMMENT ON PUBLICATION {} IS {}",
        quote_ident(name),
        quote_literal(&format!("{MARK}{}", plan.slot))
    );
    let exists = owner != Owner::Missing;
    // One simple-query string runs as one implicit transaction: created and marked
    // together, or neither.
    let sql = if exists {
        format!(
            "ALTER PUBLICATION {} SET TABLE {list}; {mark}",
            quote_ident(name)
        )
    } else {
        format!(
            "CREATE PUBLICATION {} FOR TABLE {list}; {mark}",
            quote_ident(name)
        )
    };
    src.batch_execute(&sql).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot {} publication {name} on the source: {}; the source user must own the tables (or be superuser)",
            if exists { "update" } else { "create" },
            crate::pg::connect::describe(&e)
        )
    })?;
    Ok(())
}

/// Whether `teardown` of pipeline `slot` may drop publication `name`: only its own
/// (marked for it, or unmarked and recorded by its state and no other pipeline's).
/// `Err` carries the reason it is kept.
pub async fn droppable(
    src: &Client,
    name: &str,
    slot: &str,
    recorded_here: bool,
    recorded_by_other: Option<&str>,
) -> Result<std::result::Result<bool, String>> {
    Ok(match owner(src, name).await? {
        Owner::Missing => Ok(false),
        Owner::Pipeline(s) if s == slot => Ok(true),
        Owner::Pipeline(other) => Err(format!(
            "kept publication {name} on the source: it belongs to walshuttle pipeline {other}"
        )),
        Owner::Unmarked => match recorded_by_other {
            Some(other) => Err(format!(
                "kept publication {name} on the source: walshuttle pipeline {other} uses it too"
            )),
            None if recorded_here => Ok(true),
            None => Err(format!(
                "kept publication {name} on the source: it was not made by walshuttle for pipeline {slot}"
            )),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_from_flag_state_or_slot() {
        assert_eq!(resolve(None, "p1", None).unwrap(), "p1");
        assert_eq!(
            resolve(None, "p1", Some("walshuttle")).unwrap(),
            "walshuttle"
        );
        assert_eq!(resolve(Some("x"), "p1", None).unwrap(), "x");
        assert_eq!(resolve(Some("x"), "p1", Some("x")).unwrap(), "x");
        let err = resolve(Some("x"), "p1", Some("walshuttle")).unwrap_err();
        assert!(
            err.to_string().contains("uses publication walshuttle"),
            "{err}"
        );
    }

    #[test]
    fn another_pipelines_or_the_users_publication_is_refused() {
        let plan = Plan {
            name: "pub".into(),
            slot: "p2".into(),
            adopt_unmarked: false,
        };
        assert!(check(&plan, &Owner::Missing).is_ok());
        assert!(check(&plan, &Owner::Pipeline("p2".into())).is_ok());
        let err = check(&plan, &Owner::Pipeline("p1".into())).unwrap_err();
        assert!(err.to_string().contains("pipeline p1"), "{err}");
        assert!(check(&plan, &Owner::Unmarked).is_err());
        let adopt = Plan {
            adopt_unmarked: true,
            ..plan
        };
        assert!(check(&adopt, &Owner::Unmarked).is_ok());
    }
}
