//! What the apply path knows about each replicated table: pgoutput's Relation
//! messages matched against the target's own definition, with schema drift followed
//! where it arrives (columns added, dropped and renamed on the source are changed
//! alike on the target, see [`super::drift`]; a retyped column stops the pipeline
//! with the statement to run). The session runs the statements where they belong
//! (`session.rs`); this module plans them and records the result. Rows are found by the
//! source's replica identity as the Relation message flags it (never the target's
//! primary key), and the target's unique constraints are read here, once per
//! table, for the set-based decision of the apply path.

use std::collections::HashMap;

use anyhow::Result;
use tokio_postgres::Client;

use super::constraints::TargetConstraints;
use super::decoder::{Relation, ReplicaIdentity};
use super::drift::{self, Change, Refusal, SentColumn};
pub use super::faults::Fatal;
use super::lanes::{bytewise_type, LaneRule};
use super::memory::{SeenColumn, StreamMemory};
use crate::catalog;
use crate::pg::{quote_ident, PgResultExt, QualifiedName};

/// One column as the apply path writes it.
#[derive(Clone, Debug)]
pub struct ShapeColumn {
    /// Column name, quoted.
    pub quoted: String,
    /// The target column's type, as SQL.
    pub type_sql: String,
    /// Whether the type has a default btree operator class, so `column = value` may
    /// narrow a whole-row match through an index (the match itself compares the
    /// values' text, which tells equal values apart that are not identical).
    pub narrows: bool,
}

/// How the apply path writes one table: column order of pgoutput's tuples, and how
/// rows are identified.
#[derive(Clone, Debug)]
pub struct TableShape {
    /// The table.
    pub name: QualifiedName,
    /// Columns in tuple order.
    pub columns: Vec<ShapeColumn>,
    /// Column names (unquoted) in tuple order.
    pub column_names: Vec<String>,
    /// Positions (in `columns`) of the source's replica identity columns (the
    /// Relation message flags them), which find a row; every column for `FULL`.
    pub key: Vec<usize>,
    /// `REPLICA IDENTITY FULL`: rows are matched by identical values of the whole old
    /// row, and exactly one matching row is changed, since several may be identical.
    pub match_full_row: bool,
    /// For each column, whether a set-based UPDATE setting it could trip a target
    /// constraint that one statement per row would pass (see [`TargetConstraints`]).
    pub set_guarded: Vec<bool>,
    /// Whether values arrive in binary format.
    pub binary: bool,
    /// How its changes may be applied beside other batches' (see [`super::lanes`]).
    pub lane: LaneRule,
}

impl TableShape {
    /// The placeholder for parameter `n` holding a value of column `col`: values are
    /// raw bytes of the column's type (binary) or of `text`, cast in SQL.
    pub fn param(&self, n: usize, col: usize) -> String {
        let ty = &self.columns[col].type_sql;
        if self.binary {
            format!("${n}::{ty}")
        } else {
            format!("${n}::text::{ty}")
        }
    }

    /// Whether any column is an array, which `unnest` would flatten: such tables
    /// are changed row by row rather than set-based.
    pub fn has_array_column(&self) -> bool {
        self.columns.iter().any(|c| c.type_sql.ends_with(']'))
    }

    /// Quoted column list in tuple order.
    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.quoted.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What following one Relation message takes on the target, from
/// [`Relations::plan`] to [`Relations::install`].
#[derive(Clone, Debug)]
pub struct SchemaChange {
    /// The table.
    pub table: QualifiedName,
    /// Statements to run on the target, in order; none when its shape already fits.
    pub statements: Vec<String>,
    /// The message describes the table as the source catalog does now: the change
    /// is committed there (not inside a transaction still open).
    pub committed: bool,
    /// The table's rows must be copied again.
    resync: bool,
    /// What to log once the statements ran.
    notes: Vec<String>,
    /// The columns to remember as described.
    seen: Vec<SeenColumn>,
}

/// Relation oid → shape, for one replication session.
#[derive(Clone)]
pub struct Relations {
    shapes: HashMap<u32, TableShape>,
    type_names: HashMap<(u32, i32), String>,
    binary: bool,
    /// Tables of the pipeline: anything else is a publication edited by hand.
    allowed: Vec<QualifiedName>,
    /// Tables whose rows must be copied again (a column added with a volatile
    /// default rewrote them on the source).
    resync: Vec<QualifiedName>,
}

impl Relations {
    /// An empty map for a session whose values arrive in binary (or text) format.
    pub fn new(binary: bool, allowed: Vec<QualifiedName>) -> Self {
        Relations {
            shapes: HashMap::new(),
            type_names: HashMap::new(),
            binary,
            allowed,
            resync: Vec::new(),
        }
    }

    /// Whether `table` is one of the pipeline's.
    pub fn is_allowed(&self, table: &QualifiedName) -> bool {
        self.allowed.contains(table)
    }

    /// The pipeline's tables (changed by `walshuttle tables add|remove`); returns the
    /// relation oids of tables no longer among them, whose shapes are forgotten.
    pub fn set_allowed(&mut self, tables: Vec<QualifiedName>) -> Vec<u32> {
        let gone: Vec<u32> = self
            .shapes
            .iter()
            .filter(|(_, s)| !tables.contains(&s.name))
            .map(|(oid, _)| *oid)
            .collect();
        for oid in &gone {
            self.shapes.remove(oid);
        }
        self.allowed = tables;
        gone
    }

    /// The relation oid this session knows `table` by, if it has seen it.
    pub fn oid_of(&self, table: &QualifiedName) -> Option<u32> {
        self.shapes
            .iter()
            .find(|(_, s)| &s.name == table)
            .map(|(oid, _)| *oid)
    }

    /// Takes the tables whose rows must be copied again.
    pub fn take_resync(&mut self) -> Vec<QualifiedName> {
        std::mem::take(&mut self.resync)
    }

    /// The shape of a relation seen in this session.
    pub fn get(&self, oid: u32) -> Result<&TableShape> {
        self.shapes.get(&oid).ok_or_else(|| {
            anyhow::anyhow!("change for relation {oid} arrived before its Relation message")
        })
    }

    /// Reads what a Relation message asks of the target (see [`super::drift`]):
    /// the statements that follow the source's change, to run before
    /// [`Relations::install`]. Reads through `target` and writes nothing.
    pub async fn plan(
        &mut self,
        rel: &Relation,
        source: &Client,
        target: &Client,
        memory: &StreamMemory,
        keep_dropped: bool,
    ) -> Result<SchemaChange> {
        let name = QualifiedName::new(rel.namespace.clone(), rel.name.clone());
        if !self.allowed.contains(&name) {
            return Err(Fatal(format!(
                "the publication sends table {name}, which is not part of this pipeline: the publication was edited by hand; restore it (ALTER PUBLICATION … SET TABLE) or tear the pipeline down and bootstrap again"
            ))
            .into());
        }
        let target_table = catalog::load_table(target, &name)
            .await?
            .ok_or_else(|| Fatal(format!("table {name} no longer exists on the target: recreate it, or tear the pipeline down and bootstrap again")))?;
        let mut source_types = Vec::with_capacity(rel.columns.len());
        for col in &rel.columns {
            source_types.push(
                self.type_name(source, col.type_oid, col.type_modifier)
                    .await?,
            );
        }
        let attributes = drift::source_attributes(source, rel.oid).await?;
        let sent: Vec<SentColumn> = rel
            .columns
            .iter()
            .zip(&source_types)
            .map(|(c, t)| SentColumn {
                name: &c.name,
                type_sql: t,
            })
            .collect();
        let seen = memory.shape(rel.oid);
        let decided = drift::decide(&drift::Inputs {
            table: &name,
            sent: &sent,
            target: &target_table.columns,
            source: &attributes,
            seen: seen.as_deref(),
            keep_dropped,
            binary: self.binary,
        });
        let plan = match decided {
            Ok(plan) => plan,
            Err(Refusal::Fatal(m)) => return Err(Fatal(m).into()),
            Err(Refusal::NeedsText(m)) => {
                memory.require_text();
                anyhow::bail!(m)
            }
        };
        let mut change = SchemaChange {
            table: name.clone(),
            statements: Vec::new(),
            committed: plan.committed,
            resync: plan.resync,
            notes: Vec::new(),
            // Attribute numbers by name, where the catalog still has the name (an
            // attribute keeps its number for life; a rename keeps it too).
            seen: sent
                .iter()
                .map(|c| SeenColumn {
                    name: c.name.to_string(),
                    attnum: attributes
                        .iter()
                        .find(|a| !a.dropped && a.name == c.name && a.type_sql == c.type_sql)
                        .map(|a| a.attnum)
                        .or_else(|| {
                            seen.iter()
                                .flatten()
                                .find(|s| s.name == c.name)
                                .and_then(|s| s.attnum)
                        }),
                })
                .collect(),
        };
        for ch in &plan.changes {
            match ch {
                Change::Add { column, type_sql } => {
                    let oid = rel
                        .columns
                        .iter()
                        .find(|c| &c.name == column)
                        .map(|c| c.type_oid)
                        .unwrap_or_default();
                    if self.binary && !catalog::type_binary_portable(source, oid).await? {
                        anyhow::bail!(
                            "column {name}.{column} of type {type_sql}, which is not portable in binary, was added: reconnecting to choose the value format again"
                        );
                    }
                    // Rows that existed when the column was added get the value they
                    // hold on the source (see `added_columns`).
                    let added = super::added_columns::plan(source, &name, column, type_sql).await?;
                    change.resync |= added.resync;
                    change.statements.push(added.sql);
                    change
                        .notes
                        .push(format!("column {column} ({type_sql}) added on the source: added it on the target"));
                }
                Change::Rename { from, to } => change.notes.push(format!(
                    "column {from} renamed to {to} on the source: renamed it on the target"
                )),
                Change::Drop { column } => change.notes.push(format!(
                    "column {column} dropped on the source: dropped it on the target"
                )),
                Change::Keep {
                    column,
                    make_nullable,
                    dropped_on_source: true,
                } => change.notes.push(format!(
                    "column {column} dropped on the source: kept on the target (--keep-dropped-columns){}",
                    if *make_nullable { ", made nullable so new rows fit" } else { "" }
                )),
                Change::Keep {
                    column,
                    make_nullable,
                    dropped_on_source: false,
                } => {
                    if *make_nullable || memory.first_warning(rel.oid, column) {
                        tracing::warn!(
                            table = %name,
                            column = %column,
                            "the target has a column the source does not send (the target's own, or dropped on the source while run was not following it): kept{}; drop it on the target if the source dropped it",
                            if *make_nullable { ", made nullable so new rows fit (--keep-dropped-columns)" } else { "" }
                        );
                    }
                }
            }
            if let Some(sql) = ch.statement(&name) {
                change.statements.push(sql);
            }
        }
        if plan.resync && !change.statements.is_empty() {
            change.notes.push(
                "the rows' values in the changed columns cannot be told from the messages: the table is copied again".into(),
            );
        }
        Ok(change)
    }

    /// Records the shape a Relation message describes, once the target matches it
    /// (after the statements of [`Relations::plan`] ran through `target`). Returns
    /// true when the shape changed, so cached statements must be dropped.
    pub async fn install(
        &mut self,
        rel: &Relation,
        target: &Client,
        change: SchemaChange,
        memory: &StreamMemory,
    ) -> Result<bool> {
        let name = change.table.clone();
        for note in &change.notes {
            tracing::info!(table = %name, "{note}");
        }
        if change.resync && !self.resync.contains(&name) {
            self.resync.push(name.clone());
        }
        memory.remember_shape(rel.oid, change.seen);
        let altered = !change.statements.is_empty();
        let target_table = catalog::load_table(target, &name)
            .await?
            .ok_or_else(|| Fatal(format!("table {name} disappeared from the target")))?;
        let mut columns = Vec::with_capacity(rel.columns.len());
        for col in &rel.columns {
            let Some(tcol) = target_table.columns.iter().find(|c| c.name == col.name) else {
                return Err(Fatal(format!(
                    "column {name}.{} is missing on the target",
                    col.name
                ))
                .into());
            };
            columns.push(ShapeColumn {
                quoted: quote_ident(&col.name),
                type_sql: tcol.type_sql.clone(),
                narrows: false,
            });
        }
        // Rows are found as the source identifies them: by the replica identity's
        // columns (flagged in the Relation message), or the whole old row for FULL.
        let constraints = TargetConstraints::load(target, &name).await?;
        let column_names: Vec<String> = rel.columns.iter().map(|c| c.name.clone()).collect();
        let flagged: Vec<usize> = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
            .collect();
        let (key, match_full_row) = if rel.replica_identity == ReplicaIdentity::Full {
            ((0..rel.columns.len()).collect(), true)
        } else {
            // Without identity columns the source refuses updates and deletes, so
            // only inserts can arrive (see `TableShape::key`'s use in apply).
            (flagged, false)
        };
        let key_names: Vec<String> = key.iter().map(|&k| column_names[k].clone()).collect();
        if !match_full_row
            && !key_names.is_empty()
            && constraints.identity_index(&key_names).is_none()
        {
            tracing::warn!(
                table = %name,
                identity = %key_names.join(", "),
                "the target has no unique index on the source's replica identity: every update and delete scans the table; run CREATE UNIQUE INDEX ON {} ({}) on the target",
                name.quoted(),
                key_names.iter().map(|k| quote_ident(k)).collect::<Vec<_>>().join(", ")
            );
        }
        for (col, shape_col) in column_names.iter().zip(columns.iter_mut()) {
            shape_col.narrows = constraints.is_ordered(col);
        }
        let set_guarded = if match_full_row {
            vec![true; column_names.len()]
        } else {
            constraints.guarded(&key_names, &column_names)
        };
        let lane = if !match_full_row
            && !key.is_empty()
            && key.iter().all(|&k| bytewise_type(rel.columns[k].type_oid))
            && constraints.identities_independent(&key_names)
        {
            LaneRule::Keyed
        } else if (match_full_row || key.is_empty()) && constraints.identities_independent(&[]) {
            LaneRule::InsertsFree
        } else {
            LaneRule::Serial
        };
        let shape = TableShape {
            lane,
            name,
            column_names,
            columns,
            key,
            match_full_row,
            set_guarded,
            binary: self.binary,
        };
        let changed = self
            .shapes
            .get(&rel.oid)
            .map(|old| {
                old.columns.len() != shape.columns.len()
                    || old.name != shape.name
                    || old.key != shape.key
                    || old.match_full_row != shape.match_full_row
            })
            .unwrap_or(false);
        self.shapes.insert(rel.oid, shape);
        Ok(changed || altered)
    }

    async fn type_name(&mut self, source: &Client, oid: u32, typmod: i32) -> Result<String> {
        if let Some(name) = self.type_names.get(&(oid, typmod)) {
            return Ok(name.clone());
        }
        let name: String = source
            .query_one("SELECT format_type($1, $2)", &[&oid, &typmod])
            .await
            .pg_context(|| format!("looking up type {oid} on the source"))?
            .get(0);
        self.type_names.insert((oid, typmod), name.clone());
        Ok(name)
    }
}
