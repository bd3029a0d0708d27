//! What the apply path knows about each replicated table: pgoutput's Relation
//! messages matched against the target's own definition, with schema drift handled
//! where it arrives (a column added on the source is added on the target; a dropped
//! or retyped column stops the pipeline with what to do). Rows are found by the
//! source's replica identity as the Relation message flags it (never the target's
//! primary key), and the target's unique constraints are read here, once per
//! table, for the set-based decision of the apply path.

use std::collections::HashMap;

use anyhow::Result;
use tokio_postgres::Client;

use super::constraints::TargetConstraints;
use super::decoder::{Relation, ReplicaIdentity};
pub use super::faults::Fatal;
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

/// Relation oid → shape, for one replication session.
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

    /// Takes in a Relation message: checks the target against it, adds columns new
    /// on the source (through `apply`, the session whose transaction carries the
    /// change), and records the shape. Returns true when the shape changed, so
    /// cached statements must be dropped.
    pub async fn update(
        &mut self,
        rel: &Relation,
        source: &Client,
        apply: &Client,
    ) -> Result<bool> {
        let name = QualifiedName::new(rel.namespace.clone(), rel.name.clone());
        if !self.allowed.contains(&name) {
            return Err(Fatal(format!(
                "the publication sends table {name}, which is not part of this pipeline: the publication was edited by hand; restore it (ALTER PUBLICATION … SET TABLE) or tear the pipeline down and bootstrap again"
            ))
            .into());
        }
        let mut target = catalog::load_table(apply, &name)
            .await?
            .ok_or_else(|| Fatal(format!("table {name} no longer exists on the target: recreate it, or tear the pipeline down and bootstrap again")))?;
        let mut source_types = Vec::with_capacity(rel.columns.len());
        for col in &rel.columns {
            source_types.push(
                self.type_name(source, col.type_oid, col.type_modifier)
                    .await?,
            );
        }
        // Columns new on the source: add them on the target, in this transaction.
        let mut added = false;
        for (col, ty) in rel.columns.iter().zip(&source_types) {
            if target.columns.iter().any(|c| c.name == col.name) {
                continue;
            }
            if self.binary && !catalog::type_binary_portable(source, col.type_oid).await? {
                anyhow::bail!(
                    "column {name}.{} of type {ty}, which is not portable in binary, was added: reconnecting to choose the value format again",
                    col.name
                );
            }
            // Rows that existed when the column was added get the value they hold on
            // the source (see `added_columns`).
            let plan = super::added_columns::plan(source, &name, &col.name, ty).await?;
            apply
                .batch_execute(&format!("SET LOCAL lock_timeout = '10s'; {}", plan.sql))
                .await
                .pg_context(|| format!("adding column {name}.{} on the target", col.name))?;
            if plan.resync && !self.resync.contains(&name) {
                self.resync.push(name.clone());
            }
            tracing::info!(table = %name, column = %col.name, type_sql = %ty, "column added on the source: added it on the target");
            added = true;
        }
        if added {
            target = catalog::load_table(apply, &name)
                .await?
                .ok_or_else(|| Fatal(format!("table {name} disappeared from the target")))?;
        }
        // Columns gone from the source, or retyped: stop and say what to do.
        for tcol in target.columns.iter().filter(|c| c.is_copied()) {
            if !rel.columns.iter().any(|c| c.name == tcol.name) {
                return Err(Fatal(format!(
                    "column {name}.{} exists on the target but the source no longer sends it (dropped on the source?): drop it on the target (ALTER TABLE {} DROP COLUMN {}) or make it nullable, then run walshuttle again",
                    tcol.name,
                    name.quoted(),
                    quote_ident(&tcol.name)
                ))
                .into());
            }
        }
        let mut columns = Vec::with_capacity(rel.columns.len());
        for (col, source_type) in rel.columns.iter().zip(&source_types) {
            let Some(tcol) = target.columns.iter().find(|c| c.name == col.name) else {
                return Err(Fatal(format!(
                    "column {name}.{} is missing on the target",
                    col.name
                ))
                .into());
            };
            let same = &tcol.type_sql == source_type;
            if !same && (self.binary || !catalog::types_compatible(source_type, &tcol.type_sql)) {
                return Err(Fatal(format!(
                    "column {name}.{} changed type: {source_type} on the source, {} on the target: run ALTER TABLE {} ALTER COLUMN {} TYPE {source_type} on the target, then run walshuttle again",
                    col.name,
                    tcol.type_sql,
                    name.quoted(),
                    quote_ident(&col.name)
                ))
                .into());
            }
            columns.push(ShapeColumn {
                quoted: quote_ident(&col.name),
                type_sql: tcol.type_sql.clone(),
                narrows: false,
            });
        }
        // Rows are found as the source identifies them: by the replica identity's
        // columns (flagged in the Relation message), or the whole old row for FULL.
        let constraints = TargetConstraints::load(apply, &name).await?;
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
        let shape = TableShape {
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
        Ok(changed || added)
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
