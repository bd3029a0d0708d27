//! Existing target tables with foreign keys or enabled user triggers, and what every
//! target session that writes replicated rows must do about them.
//!
//! walshuttle applies changes table by table (a transaction's rows are regrouped per
//! table), so a foreign-key check can fail on rows the source committed together, and
//! a user trigger would rewrite the source's values (a `BEFORE UPDATE` trigger setting
//! `updated_at`). Native logical replication applies with `session_replication_role =
//! replica`, which skips them; walshuttle does the same when the target role may set
//! it (superuser, or PostgreSQL 15+ `GRANT SET ON PARAMETER session_replication_role`).
//! Otherwise it refuses, unless `--allow-target-triggers` says to fire them as for any
//! writer. When no existing target table has any, replica mode is not used: it also
//! switches off deferred unique checks, which the source enforces.

use anyhow::{bail, Result};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::pg::{quote_ident, PgResultExt, QualifiedName};

/// What a target session that writes replicated rows must do, decided once per
/// command by [`decide`] and applied to each session by [`prepare_session`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetSetup {
    /// Set `session_replication_role = replica` (and check that it took).
    pub replica_role: bool,
}

/// One foreign key or trigger that would fire on replicated rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hazard {
    /// The target table.
    pub table: QualifiedName,
    /// What fires: `foreign key NAME to|from TABLE`, or `trigger NAME`.
    pub what: String,
}

/// Foreign keys (referencing or referenced) and enabled user triggers on the
/// existing target tables among `tables`. Triggers enabled only for replica mode
/// (`ENABLE REPLICA`) do not fire for an ordinary writer and are not listed.
pub async fn hazards<'a>(
    target: &Client,
    tables: impl IntoIterator<Item = &'a QualifiedName>,
) -> Result<Vec<Hazard>> {
    let (schemas, names): (Vec<String>, Vec<String>) = tables
        .into_iter()
        .map(|t| (t.schema.clone(), t.name.clone()))
        .unzip();
    let rows = target
        .query(
            "WITH t AS (SELECT c.oid, n.nspname::text AS s, c.relname::text AS r \
                        FROM unnest($1::text[], $2::text[]) AS u(s, r) \
                        JOIN pg_namespace n ON n.nspname = u.s \
                        JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = u.r) \
             SELECT t.s, t.r, 'foreign key ' || quote_ident(k.conname) || \
                    CASE WHEN k.conrelid = t.oid THEN ' to ' || k.confrelid::regclass::text \
                         ELSE ' from ' || k.conrelid::regclass::text END \
             FROM t JOIN pg_constraint k ON k.contype = 'f' AND (k.conrelid = t.oid OR k.confrelid = t.oid) \
             UNION \
             SELECT t.s, t.r, 'trigger ' || quote_ident(g.tgname) \
             FROM t JOIN pg_trigger g ON g.tgrelid = t.oid AND NOT g.tgisinternal AND g.tgenabled IN ('O', 'A') \
             ORDER BY 1, 2, 3",
            &[&schemas, &names],
        )
        .await
        .pg_context(|| "looking for foreign keys and triggers on the target tables".into())?;
    Ok(rows
        .iter()
        .map(|r| Hazard {
            table: QualifiedName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            what: r.get(2),
        })
        .collect())
}

/// `table (what, what); table (what)` for messages.
fn describe(hazards: &[Hazard]) -> String {
    let mut groups: Vec<(&QualifiedName, Vec<&str>)> = Vec::new();
    for h in hazards {
        match groups.last_mut() {
            Some((t, items)) if *t == &h.table => items.push(&h.what),
            _ => groups.push((&h.table, vec![&h.what])),
        }
    }
    groups
        .iter()
        .map(|(t, items)| format!("{t} ({})", items.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether this target session may set `session_replication_role = replica`
/// (tried and undone: the privilege rules differ between versions).
pub async fn replica_role_available(target: &Client) -> Result<bool> {
    match target
        .batch_execute("SET session_replication_role = replica")
        .await
    {
        Ok(()) => {
            target
                .batch_execute("RESET session_replication_role")
                .await
                .pg_context(|| "resetting session_replication_role on the target".into())?;
            Ok(true)
        }
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => Ok(false),
        Err(e) => Err(anyhow::anyhow!(
            "cannot check whether the target role may set session_replication_role: {}",
            crate::pg::connect::describe(&e)
        )),
    }
}

/// Decides, before anything is written, how target sessions must write the rows of
/// `tables`: plainly when no existing target table has foreign keys or enabled user
/// triggers; in replica mode when there are some and the role may use it; firing them
/// (with a warning naming the tables) when `allow_target_triggers`; else refuses with
/// one line saying what to do.
pub async fn decide<'a>(
    target: &Client,
    tables: impl IntoIterator<Item = &'a QualifiedName>,
    allow_target_triggers: bool,
) -> Result<TargetSetup> {
    let found = hazards(target, tables).await?;
    if found.is_empty() {
        return Ok(TargetSetup::default());
    }
    let list = describe(&found);
    if allow_target_triggers {
        tracing::warn!(
            "--allow-target-triggers: foreign keys and triggers on target tables fire on replicated rows as for any writer (foreign keys can fail, since rows are applied table by table; triggers can change the source's values): {list}"
        );
        return Ok(TargetSetup::default());
    }
    if replica_role_available(target).await? {
        tracing::info!("target tables have foreign keys or triggers; replicated rows are written with session_replication_role = replica, which skips them as native replication does: {list}");
        return Ok(TargetSetup { replica_role: true });
    }
    let role: String = target
        .query_one("SELECT current_user::text", &[])
        .await
        .pg_context(|| "reading the target role".into())?
        .get(0);
    bail!(
        "target tables have foreign keys or triggers that would fire on replicated rows (rows are applied table by table, and triggers would change the source's values): {list}; the target role {role} cannot set session_replication_role = replica, which skips them: run GRANT SET ON PARAMETER session_replication_role TO {} on the target (PostgreSQL 15+, or connect as a superuser), drop them, or pass --allow-target-triggers to fire them as for any writer",
        quote_ident(&role)
    )
}

/// Prepares a target session that writes replicated rows as `setup` says: sets
/// `session_replication_role = replica` and checks that it took.
pub async fn prepare_session(client: &Client, setup: &TargetSetup) -> Result<()> {
    if !setup.replica_role {
        return Ok(());
    }
    client
        .batch_execute("SET session_replication_role = replica")
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot set session_replication_role = replica on the target: {}; grant it (GRANT SET ON PARAMETER session_replication_role) or pass --allow-target-triggers",
                crate::pg::connect::describe(&e)
            )
        })?;
    let now: String = client
        .query_one("SELECT current_setting('session_replication_role')", &[])
        .await
        .pg_context(|| "checking session_replication_role on the target".into())?
        .get(0);
    if now != "replica" {
        bail!("session_replication_role is {now} on the target after setting it to replica: check the target for a setting that overrides it");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hazards_are_listed_per_table() {
        let t = |n: &str| QualifiedName::new("public".to_string(), n.to_string());
        let list = describe(&[
            Hazard {
                table: t("a"),
                what: "foreign key f to public.b".into(),
            },
            Hazard {
                table: t("a"),
                what: "trigger x".into(),
            },
            Hazard {
                table: t("b"),
                what: "foreign key f from public.a".into(),
            },
        ]);
        assert_eq!(
            list,
            "public.a (foreign key f to public.b, trigger x); public.b (foreign key f from public.a)"
        );
    }
}
