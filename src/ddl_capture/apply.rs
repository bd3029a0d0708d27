//! What one captured DDL message asks of the target: the statements that make the
//! target table match the desired state the trigger read on the source, planned
//! from the pair (`before`, `after`) of recorded shapes. `before` says what each
//! attribute was called and how it was defined when the previous command ended, so
//! a rename is an attribute whose name changed, a drop one that is gone, an add one
//! that is new; only what the source changed is changed on the target (a column the
//! target keeps on purpose, or made nullable, is left alone).

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio_postgres::Client;

use crate::catalog::{self, types_compatible};
use crate::pg::{quote_ident, quote_literal, PgResultExt, QualifiedName};
use crate::stream::memory::SeenColumn;

/// A message of the trigger, as emitted (see [`super::trigger`]).
#[derive(Clone, Debug, Deserialize)]
pub struct DdlMessage {
    /// `table`, `drop`, `type`, `other` or `error`.
    pub kind: String,
    /// The command tag (`ALTER TABLE`, `CREATE INDEX`, ...).
    #[serde(default)]
    pub tag: String,
    /// The object's identity as PostgreSQL prints it.
    #[serde(default)]
    pub identity: Option<String>,
    /// The source rewrote the table's rows in this transaction (its `table_rewrite`
    /// event trigger saw it, whatever the statement's text or the function it ran
    /// in): a retype converted the values with an expression (`USING`, or the cast)
    /// walshuttle cannot see, so the table is copied again.
    #[serde(default)]
    pub rewrote: bool,
    /// The table as recorded after the previous command (none for a new table).
    #[serde(default)]
    pub before: Option<Shape>,
    /// The table as the command left it.
    #[serde(default)]
    pub after: Option<Shape>,
    /// An enum type's schema (`type`).
    #[serde(default)]
    pub schema: Option<String>,
    /// An enum type's name (`type`).
    #[serde(default)]
    pub name: Option<String>,
    /// An enum type's labels in order (`type`).
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// The trigger's own failure (`error`).
    #[serde(default)]
    pub message: Option<String>,
}

/// A table's definition as the trigger reads it.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Shape {
    /// Relation oid on the source.
    pub oid: i64,
    /// Schema.
    pub schema: String,
    /// Name.
    pub name: String,
    /// `relkind`.
    pub kind: String,
    /// `relpersistence`.
    pub persistence: String,
    /// Columns in attribute order.
    pub columns: Vec<ShapeColumn>,
    /// Indexes that back no constraint.
    pub indexes: Vec<Named>,
    /// Constraints.
    pub constraints: Vec<Named>,
}

impl Shape {
    /// The table's name.
    pub fn table(&self) -> QualifiedName {
        QualifiedName::new(self.schema.clone(), self.name.clone())
    }

    fn column(&self, attnum: i16) -> Option<&ShapeColumn> {
        self.columns.iter().find(|c| c.attnum == attnum)
    }
}

/// One column of a [`Shape`].
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ShapeColumn {
    /// Name.
    pub name: String,
    /// `attnum`, kept for life (a rename keeps it).
    pub attnum: i16,
    /// Type as `format_type` prints it.
    #[serde(rename = "type")]
    pub type_sql: String,
    /// NOT NULL.
    pub not_null: bool,
    /// Default expression.
    #[serde(default)]
    pub default: Option<String>,
    /// Generation expression.
    #[serde(default)]
    pub generated: Option<String>,
    /// `attidentity`.
    #[serde(default)]
    pub identity: String,
    /// `atthasmissing`: rows older than the column hold `missing`.
    #[serde(default)]
    pub has_missing: bool,
    /// `attmissingval`, as text.
    #[serde(default)]
    pub missing: Option<String>,
}

/// An index or constraint by name, with its definition.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Named {
    /// Its name.
    pub name: String,
    /// `pg_get_indexdef` / `pg_get_constraintdef`.
    pub def: String,
    /// `contype`, for constraints.
    #[serde(default, rename = "type")]
    pub contype: Option<String>,
}

/// Parses a message's content.
pub fn parse(content: &[u8]) -> Result<DdlMessage> {
    serde_json::from_slice(content).context("reading a message of the DDL capture trigger")
}

/// What a message asks of the session.
#[derive(Debug)]
pub enum Action {
    /// Nothing to do on the target; logged.
    Skip(String),
    /// Stop the pipeline with this line.
    Stop(String),
    /// Enum labels to add on the target, each in a transaction of its own.
    Labels(Vec<String>),
    /// Make a table match.
    Table(TablePlan),
    /// A table of the pipeline was dropped on the source.
    Dropped(QualifiedName),
}

/// The statements that make one target table match the source's.
#[derive(Debug)]
pub struct TablePlan {
    /// Source relation oid.
    pub oid: u32,
    /// The table's name on the target now.
    pub from: QualifiedName,
    /// Its name after the change.
    pub to: QualifiedName,
    /// The table joins the pipeline.
    pub joins: bool,
    /// Create the column types it uses that the target lacks, first.
    pub needs_types: bool,
    /// In order.
    pub statements: Vec<String>,
    /// Its rows must be copied again (values the stream does not carry).
    pub resync: bool,
    /// What to log.
    pub notes: Vec<String>,
    /// The columns the source describes now, with attribute numbers.
    pub seen: Vec<SeenColumn>,
}

/// Commands on a carried table that do not change what the target holds: the rows
/// they make the source write (triggers, policies) arrive as rows. A rule is not
/// among them: it can turn the table into a view.
const HARMLESS: &[&str] = &[
    "COMMENT",
    "GRANT",
    "REVOKE",
    "SECURITY LABEL",
    "CREATE TRIGGER",
    "ALTER TRIGGER",
    "CREATE POLICY",
    "ALTER POLICY",
    "CREATE STATISTICS",
    "ALTER STATISTICS",
    "ALTER TABLE",
    "CREATE INDEX",
    "ALTER INDEX",
];

/// Plans what `msg` asks of the target. `carried` are the pipeline's tables; reads
/// the target through `target` and writes nothing.
pub async fn plan(
    msg: &DdlMessage,
    target: &Client,
    carried: &[QualifiedName],
    keep_dropped: bool,
) -> Result<Action> {
    match msg.kind.as_str() {
        "table" => {
            let Some(after) = &msg.after else {
                return Ok(Action::Skip(format!("{} without a table", msg.tag)));
            };
            table_plan(msg, after, target, carried, keep_dropped).await
        }
        "drop" => match &msg.before {
            Some(b) if carried.contains(&b.table()) => Ok(Action::Dropped(b.table())),
            _ => Ok(Action::Skip(format!("{}: not a table of the pipeline", msg.tag))),
        },
        "type" => enum_labels(msg, target).await,
        "unpublished" => {
            let table = msg.after.as_ref().map(Shape::table);
            let (name, quoted) = match &table {
                Some(t) => (t.to_string(), t.quoted()),
                None => {
                    let id = msg.identity.clone().unwrap_or_else(|| "?".into());
                    (id.clone(), id)
                }
            };
            Ok(Action::Skip(format!(
                "table {name} was made on the source ({}) without a replica identity PostgreSQL can use for updates and deletes, so it is left out of the publication (published, the source would refuse its UPDATEs and DELETEs) and its rows are not replicated: run ALTER TABLE {quoted} REPLICA IDENTITY FULL on the source, or add a primary key; it then joins the pipeline by itself",
                msg.tag
            )))
        }
        "other" => {
            let table = msg.after.as_ref().map(Shape::table);
            match table {
                Some(t) if carried.contains(&t) && !HARMLESS.contains(&msg.tag.as_str()) => {
                    Ok(Action::Stop(unsupported(&msg.tag, &t)))
                }
                _ => Ok(Action::Skip(format!(
                    "{} on {}: nothing to change on the target",
                    msg.tag,
                    msg.identity.as_deref().unwrap_or("?")
                ))),
            }
        }
        "error" => Ok(Action::Skip(format!(
            "the DDL capture trigger failed on the source during {} ({}): that command was not captured; the Relation messages still show added, dropped and renamed columns",
            msg.tag,
            msg.message.as_deref().unwrap_or("no reason given")
        ))),
        other => Ok(Action::Skip(format!("unknown DDL message kind {other}"))),
    }
}

fn unsupported(tag: &str, table: &QualifiedName) -> String {
    format!(
        "the source ran {tag} on {table}, which --capture-ddl does not apply on the target: take the table out of the pipeline with `walshuttle tables remove {q}`, start `walshuttle run` again, then bring it back with `walshuttle tables add {q}`, which copies it as it is now",
        q = table.quoted()
    )
}

async fn enum_labels(msg: &DdlMessage, target: &Client) -> Result<Action> {
    let (Some(schema), Some(name), Some(labels)) = (&msg.schema, &msg.name, &msg.labels) else {
        return Ok(Action::Skip(format!(
            "{}: incomplete type message",
            msg.tag
        )));
    };
    let ty = QualifiedName::new(schema.clone(), name.clone());
    let have: Vec<String> = target
        .query(
            "SELECT e.enumlabel::text FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid \
             JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = $1 AND t.typname = $2 \
             ORDER BY e.enumsortorder",
            &[schema, name],
        )
        .await
        .pg_context(|| format!("reading the labels of type {ty} on the target"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if have.is_empty() {
        return Ok(Action::Skip(format!(
            "type {ty} is not on the target: it is created when a column uses it"
        )));
    }
    Ok(Action::Labels(label_statements(&ty, labels, &have)))
}

/// `ALTER TYPE … ADD VALUE` for each label the target lacks, at its place.
fn label_statements(ty: &QualifiedName, labels: &[String], have: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, l) in labels.iter().enumerate() {
        if have.contains(l) {
            continue;
        }
        let place = match i.checked_sub(1).and_then(|p| labels.get(p)) {
            Some(prev) => format!(" AFTER {}", quote_literal(prev)),
            None => labels
                .get(1)
                .map(|next| format!(" BEFORE {}", quote_literal(next)))
                .unwrap_or_default(),
        };
        out.push(format!(
            "ALTER TYPE {} ADD VALUE IF NOT EXISTS {}{place}",
            ty.quoted(),
            quote_literal(l)
        ));
    }
    out
}

async fn table_plan(
    msg: &DdlMessage,
    after: &Shape,
    target: &Client,
    carried: &[QualifiedName],
    keep_dropped: bool,
) -> Result<Action> {
    let to = after.table();
    let from = msg
        .before
        .as_ref()
        .map(Shape::table)
        .unwrap_or_else(|| to.clone());
    let joins = !carried.contains(&from);
    if joins && msg.before.is_some() {
        return Ok(Action::Skip(format!(
            "{} on {from}, which the pipeline does not carry",
            msg.tag
        )));
    }
    if after.persistence != "p" {
        return Ok(Action::Stop(format!(
            "table {to} was made UNLOGGED on the source, so its changes no longer reach the WAL walshuttle reads: make it LOGGED again (ALTER TABLE {} SET LOGGED), or {}",
            to.quoted(),
            unsupported(&msg.tag, &to).split_once(": ").map(|(_, fix)| fix).unwrap_or_default()
        )));
    }
    let oid = u32::try_from(after.oid).unwrap_or_default();
    let mut plan = TablePlan {
        oid,
        from: from.clone(),
        to: to.clone(),
        joins,
        seen: after
            .columns
            .iter()
            .filter(|c| c.generated.is_none())
            .map(|c| SeenColumn {
                name: c.name.clone(),
                attnum: Some(c.attnum),
            })
            .collect(),
        needs_types: false,
        statements: Vec::new(),
        resync: false,
        notes: Vec::new(),
    };
    let existing = catalog::load_table(target, &from).await?;
    let before = msg.before.as_ref();
    match (&existing, before) {
        (None, _) if !joins => {
            return Ok(Action::Stop(format!(
                "table {from} no longer exists on the target: recreate it, or take it out of the pipeline with `walshuttle tables remove {}`",
                from.quoted()
            )))
        }
        (None, _) => {
            plan.needs_types = true;
            plan.statements.push(create_table(after));
            plan.statements.extend(named_statements(&to, None, after, &[], &[]).0);
            plan.notes.push(format!("table {to} created on the source ({}): created on the target, and carried from now on", msg.tag));
        }
        (Some(t), _) => {
            if from != to {
                plan.statements.extend(rename_table(&from, &to));
                plan.notes.push(format!("table {from} renamed to {to} on the source: renamed on the target"));
            }
            let cols = column_statements(&to, before, after, &t.columns, keep_dropped, msg.rewrote);
            plan.needs_types = cols.adds;
            plan.resync |= cols.resync;
            plan.statements.extend(cols.statements);
            plan.notes.extend(cols.notes);
            let (indexes, constraints) = target_names(target, &from).await?;
            let (stmts, notes) = named_statements(&to, before, after, &indexes, &constraints);
            plan.statements.extend(stmts);
            plan.notes.extend(notes);
            if joins {
                plan.notes.push(format!("table {to} joins the pipeline ({}): it existed on the target already", msg.tag));
            }
        }
    }
    // A table created with rows (CREATE TABLE AS, SELECT INTO) or attached as a
    // partition brings rows no change in the stream carries.
    if joins && msg.tag != "CREATE TABLE" {
        plan.resync = true;
    }
    Ok(Action::Table(plan))
}

/// `CREATE TABLE` on the target from the source's desired state (keys and indexes
/// follow from [`named_statements`]).
fn create_table(after: &Shape) -> String {
    let cols = after
        .columns
        .iter()
        .map(|c| {
            let mut def = format!("{} {}", quote_ident(&c.name), c.type_sql);
            if let Some(expr) = &c.generated {
                def.push_str(&format!(" GENERATED ALWAYS AS ({expr}) STORED"));
            } else if !c.identity.is_empty() {
                def.push_str(" GENERATED BY DEFAULT AS IDENTITY");
            } else if let Some(expr) = usable_default(c) {
                def.push_str(&format!(" DEFAULT {expr}"));
            }
            if c.not_null {
                def.push_str(" NOT NULL");
            }
            def
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "CREATE SCHEMA IF NOT EXISTS {}; CREATE TABLE IF NOT EXISTS {} ({cols})",
        quote_ident(&after.schema),
        after.table().quoted()
    )
}

fn rename_table(from: &QualifiedName, to: &QualifiedName) -> Vec<String> {
    let mut out = Vec::new();
    let mut now = from.clone();
    if from.schema != to.schema {
        out.push(format!(
            "CREATE SCHEMA IF NOT EXISTS {}",
            quote_ident(&to.schema)
        ));
        out.push(format!(
            "ALTER TABLE {} SET SCHEMA {}",
            now.quoted(),
            quote_ident(&to.schema)
        ));
        now = QualifiedName::new(to.schema.clone(), from.name.clone());
    }
    if from.name != to.name {
        out.push(format!(
            "ALTER TABLE {} RENAME TO {}",
            now.quoted(),
            quote_ident(&to.name)
        ));
    }
    out
}

/// A default the target can have: sequences are not replicated, so a `nextval`
/// default would hand out other values (the source's arrive with every row).
fn usable_default(c: &ShapeColumn) -> Option<&str> {
    c.default.as_deref().filter(|d| !d.contains("nextval("))
}

/// Column statements and what they mean.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ColumnPlan {
    /// In order: drops, renames, adds, then changes of kept columns.
    pub statements: Vec<String>,
    /// Rows must be copied again.
    pub resync: bool,
    /// A column is added (its type may be missing on the target).
    pub adds: bool,
    /// What to log.
    pub notes: Vec<String>,
}

/// Plans the column changes from `before` to `after` on a target table whose
/// columns are `target` (named `table` once renamed).
pub fn column_statements(
    table: &QualifiedName,
    before: Option<&Shape>,
    after: &Shape,
    target: &[catalog::Column],
    keep_dropped: bool,
    rewrote: bool,
) -> ColumnPlan {
    let t = table.quoted();
    let mut out = ColumnPlan::default();
    let on_target = |name: &str| target.iter().find(|c| c.name == name);
    let mut names: BTreeSet<String> = target.iter().map(|c| c.name.clone()).collect();
    // Dropped: an attribute the source had that is gone.
    if let Some(b) = before {
        for old in &b.columns {
            if after.column(old.attnum).is_some() {
                continue;
            }
            let Some(tc) = on_target(&old.name) else {
                continue;
            };
            if keep_dropped {
                if tc.not_null && tc.default.is_none() {
                    out.statements.push(format!(
                        "ALTER TABLE {t} ALTER COLUMN {} DROP NOT NULL",
                        quote_ident(&old.name)
                    ));
                }
                out.notes.push(format!(
                    "column {} dropped on the source: kept on the target (--keep-dropped-columns)",
                    old.name
                ));
            } else {
                out.statements.push(format!(
                    "ALTER TABLE {t} DROP COLUMN IF EXISTS {}",
                    quote_ident(&old.name)
                ));
                names.remove(&old.name);
                out.notes.push(format!(
                    "column {} dropped on the source: dropped on the target",
                    old.name
                ));
            }
        }
    }
    let mut changes = Vec::new();
    for new in &after.columns {
        let c = quote_ident(&new.name);
        let old = before.and_then(|b| b.column(new.attnum));
        match old {
            Some(old) => {
                if old.name != new.name && names.contains(&old.name) && !names.contains(&new.name) {
                    out.statements.push(format!(
                        "ALTER TABLE {t} RENAME COLUMN {} TO {c}",
                        quote_ident(&old.name)
                    ));
                    names.remove(&old.name);
                    names.insert(new.name.clone());
                    out.notes.push(format!(
                        "column {} renamed to {} on the source: renamed on the target",
                        old.name, new.name
                    ));
                }
                if !names.contains(&new.name) {
                    continue;
                }
                let target_type = on_target(&old.name)
                    .or_else(|| on_target(&new.name))
                    .map(|c| c.type_sql.as_str())
                    .unwrap_or(new.type_sql.as_str());
                if old.type_sql != new.type_sql && target_type != new.type_sql {
                    changes.push(format!(
                        "ALTER TABLE {t} ALTER COLUMN {c} TYPE {ty} USING {c}::{ty}",
                        ty = new.type_sql
                    ));
                    out.resync |= rewrote;
                    out.notes.push(format!(
                        "column {} retyped to {} on the source: retyped on the target{}",
                        new.name,
                        new.type_sql,
                        if rewrote {
                            " (the source rewrote its rows, with USING or a cast: the table is copied again)"
                        } else {
                            ""
                        }
                    ));
                }
                if old.default != new.default && new.generated.is_none() {
                    changes.push(match usable_default(new) {
                        Some(expr) => {
                            format!("ALTER TABLE {t} ALTER COLUMN {c} SET DEFAULT {expr}")
                        }
                        None => format!("ALTER TABLE {t} ALTER COLUMN {c} DROP DEFAULT"),
                    });
                }
                if old.generated.is_some() && new.generated.is_none() {
                    changes.push(format!(
                        "ALTER TABLE {t} ALTER COLUMN {c} DROP EXPRESSION IF EXISTS"
                    ));
                }
                if old.not_null != new.not_null {
                    changes.push(format!(
                        "ALTER TABLE {t} ALTER COLUMN {c} {} NOT NULL",
                        if new.not_null { "SET" } else { "DROP" }
                    ));
                }
            }
            None if names.contains(&new.name) => {
                // Not new to the target (a table joining that exists there, or a
                // message received again): only a retype is followed.
                if let Some(tc) = on_target(&new.name) {
                    if !types_compatible(&new.type_sql, &tc.type_sql) && new.generated.is_none() {
                        changes.push(format!(
                            "ALTER TABLE {t} ALTER COLUMN {c} TYPE {ty} USING {c}::{ty}",
                            ty = new.type_sql
                        ));
                    }
                }
            }
            None => {
                out.adds = true;
                names.insert(new.name.clone());
                let (sql, resync) = add_column(&t, new);
                out.statements.extend(sql);
                out.resync |= resync;
                out.notes.push(format!(
                    "column {} ({}) added on the source: added on the target{}",
                    new.name,
                    new.type_sql,
                    if resync { " (existing rows got values the stream does not carry: the table is copied again)" } else { "" }
                ));
            }
        }
    }
    out.statements.extend(changes);
    out
}

/// Adds `c` so that existing rows hold what they hold on the source: the value
/// recorded at `ADD COLUMN` (`attmissingval`), else NULL; a default without a
/// recorded value was volatile (or the table was rewritten) and the rows are copied
/// again.
fn add_column(t: &str, c: &ShapeColumn) -> (Vec<String>, bool) {
    let q = quote_ident(&c.name);
    let ty = &c.type_sql;
    if let Some(expr) = &c.generated {
        return (
            vec![format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {q} {ty} GENERATED ALWAYS AS ({expr}) STORED")],
            false,
        );
    }
    if !c.identity.is_empty() {
        return (
            vec![format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {q} {ty} GENERATED BY DEFAULT AS IDENTITY")],
            true,
        );
    }
    let not_null = if c.not_null { " NOT NULL" } else { "" };
    match (&c.missing, usable_default(c)) {
        (Some(value), default) if c.has_missing => {
            let mut v = vec![format!(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {q} {ty}{not_null} DEFAULT {}::{ty}",
                quote_literal(value)
            )];
            v.push(match default {
                Some(expr) => format!("ALTER TABLE {t} ALTER COLUMN {q} SET DEFAULT {expr}"),
                None => format!("ALTER TABLE {t} ALTER COLUMN {q} DROP DEFAULT"),
            });
            (v, false)
        }
        (_, Some(expr)) => (
            vec![format!(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {q} {ty}{not_null} DEFAULT {expr}"
            )],
            true,
        ),
        (_, None) if c.default.is_some() => (
            vec![format!("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {q} {ty}")],
            true,
        ),
        (_, None) => (
            vec![format!(
                "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {q} {ty}{not_null}"
            )],
            false,
        ),
    }
}

/// The names of the target table's indexes and constraints.
async fn target_names(
    target: &Client,
    table: &QualifiedName,
) -> Result<(Vec<String>, Vec<String>)> {
    let ctx = || format!("reading the indexes and constraints of {table} on the target");
    let indexes = target
        .query(
            "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
             WHERE i.indrelid = $1::text::regclass",
            &[&table.quoted()],
        )
        .await
        .pg_context(ctx)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let constraints = target
        .query(
            "SELECT conname::text FROM pg_constraint WHERE conrelid = $1::text::regclass",
            &[&table.quoted()],
        )
        .await
        .pg_context(ctx)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok((indexes, constraints))
}

/// Indexes and constraints: those the source has and the target lacks are built,
/// those the source dropped are dropped. Foreign keys are left to the target's
/// owner (the target's own checks decide what they may reference).
pub fn named_statements(
    table: &QualifiedName,
    before: Option<&Shape>,
    after: &Shape,
    indexes: &[String],
    constraints: &[String],
) -> (Vec<String>, Vec<String>) {
    let t = table.quoted();
    let schema = quote_ident(&table.schema);
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let has = |list: &[Named], name: &str| list.iter().any(|n| n.name == name);
    if let Some(b) = before {
        for k in &b.constraints {
            if !has(&after.constraints, &k.name) && constraints.contains(&k.name) {
                out.push(format!(
                    "ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {}",
                    quote_ident(&k.name)
                ));
                notes.push(format!(
                    "constraint {} dropped on the source: dropped on the target",
                    k.name
                ));
            }
        }
        for i in &b.indexes {
            if !has(&after.indexes, &i.name) && indexes.contains(&i.name) {
                out.push(format!(
                    "DROP INDEX IF EXISTS {schema}.{}",
                    quote_ident(&i.name)
                ));
                notes.push(format!(
                    "index {} dropped on the source: dropped on the target",
                    i.name
                ));
            }
        }
    }
    for k in &after.constraints {
        if constraints.contains(&k.name) || indexes.contains(&k.name) {
            continue;
        }
        if k.contype.as_deref() == Some("f") {
            notes.push(format!("foreign key {} is on the source only: add it on the target by hand if it belongs there", k.name));
            continue;
        }
        out.push(format!(
            "ALTER TABLE {t} ADD CONSTRAINT {} {}",
            quote_ident(&k.name),
            k.def
        ));
        notes.push(format!(
            "constraint {} added on the source: added on the target",
            k.name
        ));
    }
    for i in &after.indexes {
        if indexes.contains(&i.name) {
            continue;
        }
        out.push(i.def.replacen(" INDEX ", " INDEX IF NOT EXISTS ", 1));
        notes.push(format!(
            "index {} created on the source: created on the target",
            i.name
        ));
    }
    (out, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, attnum: i16, ty: &str) -> ShapeColumn {
        ShapeColumn {
            name: name.into(),
            attnum,
            type_sql: ty.into(),
            not_null: false,
            default: None,
            generated: None,
            identity: String::new(),
            has_missing: false,
            missing: None,
        }
    }

    fn shape(columns: Vec<ShapeColumn>) -> Shape {
        Shape {
            oid: 1,
            schema: "public".into(),
            name: "t".into(),
            kind: "r".into(),
            persistence: "p".into(),
            columns,
            indexes: vec![],
            constraints: vec![],
        }
    }

    fn target(cols: &[(&str, &str)]) -> Vec<catalog::Column> {
        cols.iter()
            .map(|(n, ty)| catalog::Column {
                name: n.to_string(),
                type_sql: ty.to_string(),
                type_oid: 0,
                not_null: false,
                default: None,
                generated: None,
                identity: String::new(),
                binary_portable: true,
                binary_form: String::new(),
            })
            .collect()
    }

    #[test]
    fn a_rename_keeps_the_attribute_and_a_drop_loses_it() {
        let t = QualifiedName::new("public", "t");
        let before = shape(vec![
            col("id", 1, "integer"),
            col("a", 2, "text"),
            col("b", 3, "text"),
        ]);
        let after = shape(vec![col("id", 1, "integer"), col("c", 3, "text")]);
        let p = column_statements(
            &t,
            Some(&before),
            &after,
            &target(&[("id", "integer"), ("a", "text"), ("b", "text")]),
            false,
            false,
        );
        assert_eq!(
            p.statements,
            vec![
                "ALTER TABLE \"public\".\"t\" DROP COLUMN IF EXISTS \"a\"",
                "ALTER TABLE \"public\".\"t\" RENAME COLUMN \"b\" TO \"c\"",
            ]
        );
        assert!(!p.resync && !p.adds);
    }

    #[test]
    fn an_added_column_gets_the_value_recorded_for_existing_rows() {
        let t = QualifiedName::new("public", "t");
        let before = shape(vec![col("id", 1, "integer")]);
        let mut added = col("at", 2, "timestamp with time zone");
        added.has_missing = true;
        added.missing = Some("2024-01-01 00:00:00+00".into());
        added.default = Some("now()".into());
        let after = shape(vec![col("id", 1, "integer"), added.clone()]);
        let p = column_statements(
            &t,
            Some(&before),
            &after,
            &target(&[("id", "integer")]),
            false,
            false,
        );
        assert_eq!(p.statements.len(), 2);
        assert!(
            p.statements[0].contains("DEFAULT '2024-01-01 00:00:00+00'::timestamp with time zone")
        );
        assert!(p.statements[1].ends_with("SET DEFAULT now()"));
        assert!(!p.resync);
        // A volatile default left no recorded value: copied again.
        added.has_missing = false;
        added.missing = None;
        added.default = Some("gen_random_uuid()".into());
        let after = shape(vec![col("id", 1, "integer"), added]);
        let p = column_statements(
            &t,
            Some(&before),
            &after,
            &target(&[("id", "integer")]),
            false,
            false,
        );
        assert!(p.resync);
    }

    #[test]
    fn enum_labels_go_in_at_their_place() {
        let ty = QualifiedName::new("public", "mood");
        let s = label_statements(
            &ty,
            &["sad".into(), "meh".into(), "happy".into()],
            &["sad".into(), "happy".into()],
        );
        assert_eq!(
            s,
            vec!["ALTER TYPE \"public\".\"mood\" ADD VALUE IF NOT EXISTS 'meh' AFTER 'sad'"]
        );
    }
}
