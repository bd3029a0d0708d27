//! What the apply path knows about each replicated table: pgoutput's Relation
//! messages matched against the target's own definition, with schema drift handled
//! where it arrives (a column added on the source is added on the target; a dropped
//! or retyped column stops the pipeline with what to do).

use std::collections::HashMap;

use anyhow::Result;
use tokio_postgres::Client;

use super::decoder::{Relation, ReplicaIdentity};
use crate::catalog;
use crate::pg::{quote_ident, PgResultExt, QualifiedName};

/// An error that retrying cannot fix: the pipeline stops and says what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Fatal(pub String);

/// Column types whose values have no equality operator: compared as text when a
/// keyless table's rows must be matched by every column.
const NO_EQUALITY: &[&str] = &[
    "json", "xml", "point", "line", "lseg", "box", "path", "polygon", "circle",
];

/// One column as the apply path writes it.
#[derive(Clone, Debug)]
pub struct ShapeColumn {
    /// Column name, quoted.
    pub quoted: String,
    /// The target column's type, as SQL.
    pub type_sql: String,
    /// Whether values of the type can be compared with `=`.
    pub has_equality: bool,
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
    /// Positions (in `columns`) of the columns that identify a row.
    pub key: Vec<usize>,
    /// Whether `key` is unique on the target (primary key), so `ON CONFLICT` works.
    pub unique_key: bool,
    /// A keyless `REPLICA IDENTITY FULL` table: rows are matched on every column and
    /// exactly one matching row is changed, since several may be identical.
    pub match_full_row: bool,
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
            let base = tcol
                .type_sql
                .split(['(', '['])
                .next()
                .unwrap_or_default()
                .trim();
            columns.push(ShapeColumn {
                quoted: quote_ident(&col.name),
                type_sql: tcol.type_sql.clone(),
                has_equality: !NO_EQUALITY.contains(&base) && !tcol.type_sql.ends_with("json[]"),
            });
        }
        let position = |n: &str| rel.columns.iter().position(|c| c.name == n);
        let target_key: Option<Vec<usize>> = if target.has_primary_key && !target.key.is_empty() {
            target.key.iter().map(|k| position(k)).collect()
        } else {
            None
        };
        let flagged: Vec<usize> = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
            .collect();
        let (key, unique_key, match_full_row) = match target_key {
            Some(k) => (k, true, false),
            None if rel.replica_identity == ReplicaIdentity::Full => {
                ((0..rel.columns.len()).collect(), false, true)
            }
            None if !flagged.is_empty() => (flagged, false, false),
            None => {
                return Err(Fatal(format!(
                    "table {name} has no key on the target and no replica identity on the source: add a primary key or set REPLICA IDENTITY FULL on the source"
                ))
                .into())
            }
        };
        let shape = TableShape {
            name,
            column_names: rel.columns.iter().map(|c| c.name.clone()).collect(),
            columns,
            key,
            unique_key,
            match_full_row,
            binary: self.binary,
        };
        let changed = self
            .shapes
            .get(&rel.oid)
            .map(|old| old.columns.len() != shape.columns.len() || old.name != shape.name)
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
