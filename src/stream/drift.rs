//! What a Relation message reveals about a change of a table's definition on the
//! source, read against the target's columns, the source catalog and the shape the
//! source described before: which columns were renamed, dropped or added, and which
//! retype stops the pipeline.
//!
//! pgoutput describes a table as its column names and types in attribute order, sent
//! before the first change after the definition changed, and nothing else: a name
//! missing from the list was dropped or renamed, a new name was added or renamed.
//! A rename keeps the attribute (`pg_attribute.attnum`), a drop and an add never
//! reuse one, so:
//!
//! - when the attribute number of the missing column is known (from an earlier
//!   Relation message of this process, looked up by name in the source catalog), the
//!   new column with that number is the renamed one, and no such column means it was
//!   dropped;
//! - otherwise the column's neighbours on the target bracket where its attribute
//!   was: a new column whose attribute lies between them, with only dropped
//!   attributes before it, is the renamed one. That is certain when a surviving
//!   column follows it (an added column gets a number past every existing one) or,
//!   for a column the source described before, when nothing at all lies between (a
//!   drop would have left its attribute there);
//! - when neither settles it (or the catalog has moved on since the message), the
//!   column is taken as dropped (kept, when the source never described it to this
//!   process: it may be the target's own) and the new one as added, and the table
//!   is copied again, which is right whatever happened;
//! - a column the source never described in this process and does not send is the
//!   target's own (or was dropped while `run` was away): it is kept, with a warning,
//!   since preflight lets an existing target table have columns of its own, and
//!   dropping one would destroy data that was never the source's.

use anyhow::Result;
use tokio_postgres::Client;

use super::decoder::{Relation, RelationColumn, ReplicaIdentity};
use super::memory::SeenColumn;
use crate::catalog::{types_compatible, Column};
use crate::pg::{quote_ident, PgResultExt, QualifiedName};

/// One attribute of a table in the source catalog, dropped ones included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceAttribute {
    /// `attnum`.
    pub attnum: i16,
    /// Column name (PostgreSQL's placeholder for a dropped one).
    pub name: String,
    /// `attisdropped`.
    pub dropped: bool,
    /// A generated column (pgoutput does not send it).
    pub generated: bool,
    /// Type as `format_type` prints it.
    pub type_sql: String,
}

/// Reads every attribute of relation `oid` on the source, in attribute order.
pub async fn source_attributes(client: &Client, oid: u32) -> Result<Vec<SourceAttribute>> {
    Ok(client
        .query(
            "SELECT a.attnum, a.attname::text, a.attisdropped, a.attgenerated <> '', \
                    format_type(a.atttypid, a.atttypmod) \
             FROM pg_attribute a WHERE a.attrelid = $1 AND a.attnum > 0 ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .pg_context(|| format!("reading the columns of relation {oid} on the source"))?
        .iter()
        .map(|r| SourceAttribute {
            attnum: r.get(0),
            name: r.get(1),
            dropped: r.get(2),
            generated: r.get(3),
            type_sql: r.get::<_, Option<String>>(4).unwrap_or_default(),
        })
        .collect())
}

/// The Relation message pgoutput would send for `table` now, read from the source
/// catalog: replaying changes held for a table (see [`super::held`]) needs its shape
/// when this session has not received the table's own message.
pub async fn catalog_relation(client: &Client, table: &QualifiedName) -> Result<Relation> {
    let ctx = || format!("reading the definition of {table} on the source");
    let Some(row) = client
        .query_opt(
            "SELECT c.oid, c.relreplident::text, \
                    coalesce((SELECT i.indkey::int2[] FROM pg_index i WHERE i.indrelid = c.oid \
                              AND CASE c.relreplident WHEN 'd' THEN i.indisprimary \
                                                      WHEN 'i' THEN i.indisreplident ELSE false END \
                              LIMIT 1), '{}') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .pg_context(ctx)?
    else {
        anyhow::bail!("table {table} no longer exists on the source");
    };
    let oid: u32 = row.get(0);
    let replica_identity = match row.get::<_, String>(1).as_str() {
        "n" => ReplicaIdentity::Nothing,
        "f" => ReplicaIdentity::Full,
        "i" => ReplicaIdentity::Index,
        _ => ReplicaIdentity::Default,
    };
    let key: Vec<i16> = row.get(2);
    let columns = client
        .query(
            "SELECT a.attnum, a.attname::text, a.atttypid, a.atttypmod FROM pg_attribute a \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&oid],
        )
        .await
        .pg_context(ctx)?
        .iter()
        .map(|r| RelationColumn {
            is_key: replica_identity == ReplicaIdentity::Full || key.contains(&r.get::<_, i16>(0)),
            name: r.get(1),
            type_oid: r.get(2),
            type_modifier: r.get(3),
        })
        .collect();
    Ok(Relation {
        xid: None,
        oid,
        namespace: table.schema.clone(),
        name: table.name.clone(),
        replica_identity,
        columns,
    })
}

/// A column as the Relation message sends it.
#[derive(Clone, Copy, Debug)]
pub struct SentColumn<'a> {
    /// Name.
    pub name: &'a str,
    /// Type as `format_type` prints it.
    pub type_sql: &'a str,
}

/// Everything the decision reads.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The table.
    pub table: &'a QualifiedName,
    /// The Relation message's columns, in its order.
    pub sent: &'a [SentColumn<'a>],
    /// The target table's columns, in attribute order.
    pub target: &'a [Column],
    /// The source catalog now.
    pub source: &'a [SourceAttribute],
    /// The columns the source last described, if it did in this process.
    pub seen: Option<&'a [SeenColumn]>,
    /// `--keep-dropped-columns`.
    pub keep_dropped: bool,
    /// Values arrive in binary: the types must be identical.
    pub binary: bool,
}

/// One change to make on the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// `ALTER TABLE … RENAME COLUMN from TO to`.
    Rename {
        /// The target's name.
        from: String,
        /// The source's name.
        to: String,
    },
    /// `ALTER TABLE … DROP COLUMN`.
    Drop {
        /// The column.
        column: String,
    },
    /// The column stays on the target although the source does not send it.
    Keep {
        /// The column.
        column: String,
        /// It is NOT NULL without a default: made nullable, so new rows fit.
        make_nullable: bool,
        /// The source dropped it (else it is the target's own, as far as is known).
        dropped_on_source: bool,
    },
    /// Added as the source added it (see `added_columns`).
    Add {
        /// The column.
        column: String,
        /// Its type on the source.
        type_sql: String,
    },
}

impl Change {
    /// The statement that makes the change on the target, if it takes one (an
    /// added column's comes from `added_columns`, which reads the source).
    pub fn statement(&self, table: &QualifiedName) -> Option<String> {
        let t = table.quoted();
        match self {
            Change::Rename { from, to } => Some(format!(
                "ALTER TABLE {t} RENAME COLUMN {} TO {}",
                quote_ident(from),
                quote_ident(to)
            )),
            Change::Drop { column } => Some(format!(
                "ALTER TABLE {t} DROP COLUMN IF EXISTS {}",
                quote_ident(column)
            )),
            Change::Keep {
                column,
                make_nullable: true,
                ..
            } => Some(format!(
                "ALTER TABLE {t} ALTER COLUMN {} DROP NOT NULL",
                quote_ident(column)
            )),
            Change::Keep { .. } | Change::Add { .. } => None,
        }
    }
}

/// What the Relation message asks of the target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In order: renames, drops and kept columns, then added columns.
    pub changes: Vec<Change>,
    /// What existing rows hold cannot be derived from the messages: copy the table
    /// again.
    pub resync: bool,
    /// The message describes the table as the source catalog does now, so the
    /// change it shows is committed there.
    pub committed: bool,
}

/// Why the stream cannot go on as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Retrying cannot help: stop, saying what to do.
    Fatal(String),
    /// A column's type differs between the message and the target in a way only
    /// text values can carry: reconnect asking for text.
    NeedsText(String),
}

/// The statement that retypes `column` of `table` on the target to `type_sql`.
pub fn retype_statement(table: &QualifiedName, column: &str, type_sql: &str) -> String {
    let c = quote_ident(column);
    format!(
        "ALTER TABLE {} ALTER COLUMN {c} TYPE {type_sql} USING {c}::{type_sql}",
        table.quoted()
    )
}

/// A rename candidate's standing.
enum Pairing<'a> {
    Certain(&'a SentColumn<'a>),
    Unsure,
    None,
}

/// Decides what the Relation message asks of the target (see the module's doc).
pub fn decide(inp: &Inputs<'_>) -> Result<Plan, Refusal> {
    let table = inp.table;
    let live = |name: &str| inp.source.iter().find(|a| !a.dropped && a.name == name);
    let attnum = |name: &str| live(name).map(|a| a.attnum);
    let committed = inp
        .source
        .iter()
        .filter(|a| !a.dropped && !a.generated)
        .map(|a| (a.name.as_str(), a.type_sql.as_str()))
        .eq(inp.sent.iter().map(|c| (c.name, c.type_sql)));
    let seen_column = |name: &str| inp.seen.and_then(|s| s.iter().find(|c| c.name == name));
    let sent = |name: &str| inp.sent.iter().find(|c| c.name == name);
    let copied: Vec<&Column> = inp.target.iter().filter(|c| c.is_copied()).collect();
    let mut plan = Plan {
        committed,
        ..Plan::default()
    };

    // The same name on both sides, but another attribute on the source now: the
    // column was dropped and added again (or names were swapped by renames).
    let mut replaced: Vec<&str> = Vec::new();
    if committed {
        for s in inp.sent {
            if !copied.iter().any(|c| c.name == s.name) {
                continue;
            }
            let (Some(before), Some(now)) =
                (seen_column(s.name).and_then(|c| c.attnum), attnum(s.name))
            else {
                continue;
            };
            if before == now {
                continue;
            }
            let renamed_onto = inp
                .seen
                .is_some_and(|cols| cols.iter().any(|c| c.attnum == Some(now)));
            if renamed_onto {
                plan.resync = true;
            } else {
                replaced.push(s.name);
            }
        }
    }

    let gone: Vec<&Column> = copied
        .iter()
        .filter(|c| sent(&c.name).is_none())
        .copied()
        .collect();
    let new: Vec<&SentColumn> = inp
        .sent
        .iter()
        .filter(|s| !inp.target.iter().any(|c| c.name == s.name))
        .collect();
    if !committed && (!gone.is_empty() || !new.is_empty()) {
        // The catalog has moved on since the message: names cannot be matched to
        // attributes with certainty.
        plan.resync = true;
    }

    let mut renamed: Vec<(&str, &SentColumn)> = Vec::new();
    let mut dropped: Vec<&Column> = Vec::new();
    let mut own: Vec<&Column> = Vec::new();
    for g in &gone {
        let free: Vec<&SentColumn> = new
            .iter()
            .filter(|n| !renamed.iter().any(|(_, r)| r.name == n.name))
            .copied()
            .collect();
        let was_sent = seen_column(&g.name);
        let pairing = match (inp.seen, was_sent.and_then(|c| c.attnum)) {
            (_, Some(k)) => match free.iter().find(|n| attnum(n.name) == Some(k)) {
                Some(n) => Pairing::Certain(n),
                None => Pairing::None,
            },
            // Not sent the last time either: the target's own.
            (Some(_), None) if was_sent.is_none() => Pairing::None,
            (seen, None) => by_neighbours(inp, &copied, g, &free, &replaced, seen.is_none()),
        };
        match pairing {
            Pairing::Certain(n) => {
                if n.type_sql != g.type_sql && !types_compatible(n.type_sql, &g.type_sql) {
                    return Err(Refusal::Fatal(format!(
                        "column {table}.{} was renamed to {} and changed type ({} on the target, {} on the source): run on the target ALTER TABLE {} RENAME COLUMN {} TO {}; {} (if the source converted its values with another USING expression, run `walshuttle verify --repair --tables {}` afterwards), then start walshuttle run again",
                        g.name,
                        n.name,
                        g.type_sql,
                        n.type_sql,
                        table.quoted(),
                        quote_ident(&g.name),
                        quote_ident(n.name),
                        retype_statement(table, n.name, n.type_sql),
                        table.quoted()
                    )));
                }
                renamed.push((g.name.as_str(), n));
            }
            Pairing::Unsure if was_sent.is_some() => {
                plan.resync = true;
                dropped.push(g);
            }
            // Never described to this process: perhaps the target's own, which must
            // not be dropped or taken over; kept, and the rows copied again.
            Pairing::Unsure => {
                plan.resync = true;
                own.push(g);
            }
            Pairing::None if seen_column(&g.name).is_some() => dropped.push(g),
            Pairing::None => own.push(g),
        }
    }

    for (from, to) in &renamed {
        plan.changes.push(Change::Rename {
            from: from.to_string(),
            to: to.name.to_string(),
        });
    }
    for name in &replaced {
        plan.changes.push(Change::Drop {
            column: name.to_string(),
        });
    }
    for g in dropped {
        plan.changes.push(if inp.keep_dropped {
            Change::Keep {
                column: g.name.clone(),
                make_nullable: blocks_inserts(g),
                dropped_on_source: true,
            }
        } else {
            Change::Drop {
                column: g.name.clone(),
            }
        });
    }
    for g in own {
        if blocks_inserts(g) && !inp.keep_dropped {
            return Err(Refusal::Fatal(format!(
                "column {table}.{c} exists on the target, the source does not send it, and it is NOT NULL without a default, so rows from the source cannot be inserted: if it was dropped on the source, run ALTER TABLE {t} DROP COLUMN {q} on the target; if it is the target's own, give it a default or make it nullable (ALTER TABLE {t} ALTER COLUMN {q} DROP NOT NULL), or start run with --keep-dropped-columns, which makes it nullable; then start walshuttle run again",
                c = g.name,
                t = table.quoted(),
                q = quote_ident(&g.name)
            )));
        }
        plan.changes.push(Change::Keep {
            column: g.name.clone(),
            make_nullable: blocks_inserts(g),
            dropped_on_source: false,
        });
    }
    for n in &new {
        if !renamed.iter().any(|(_, r)| r.name == n.name) {
            plan.changes.push(Change::Add {
                column: n.name.to_string(),
                type_sql: n.type_sql.to_string(),
            });
        }
    }
    for name in &replaced {
        if let Some(s) = sent(name) {
            plan.changes.push(Change::Add {
                column: s.name.to_string(),
                type_sql: s.type_sql.to_string(),
            });
        }
    }

    // Types of the columns the target keeps under the source's names.
    for s in inp.sent {
        if replaced.contains(&s.name) {
            continue;
        }
        let target_name = renamed
            .iter()
            .find(|(_, n)| n.name == s.name)
            .map(|(from, _)| *from)
            .unwrap_or(s.name);
        let Some(t) = inp.target.iter().find(|c| c.name == target_name) else {
            continue;
        };
        if t.type_sql == s.type_sql {
            continue;
        }
        let compatible = types_compatible(s.type_sql, &t.type_sql);
        // The target was already changed to the source's current type: the message
        // describes rows written before the change, whose values text carries.
        let target_ahead = live(s.name).is_some_and(|a| a.type_sql == t.type_sql);
        if compatible || target_ahead {
            if inp.binary {
                return Err(Refusal::NeedsText(format!(
                    "column {table}.{} arrives as {} but is {} on the target: reconnecting to receive values as text",
                    s.name, s.type_sql, t.type_sql
                )));
            }
            continue;
        }
        return Err(Refusal::Fatal(format!(
            "column {table}.{} changed type on the source ({} there, {} on the target): run on the target {} (if the source converted its values with another USING expression, run `walshuttle verify --repair --tables {}` afterwards), then start walshuttle run again",
            s.name,
            s.type_sql,
            t.type_sql,
            retype_statement(table, target_name, s.type_sql),
            table.quoted()
        )));
    }
    Ok(plan)
}

/// NOT NULL without a default (or identity): a row from the source, which does not
/// send the column, cannot be inserted.
fn blocks_inserts(c: &Column) -> bool {
    c.not_null && c.default.is_none() && c.identity.is_empty()
}

/// Whether a new column is the missing column `g` renamed, judged by where their
/// attributes lie (see the module's doc). At `first_sight` (the source never
/// described the table to this process), `g` may be a column of the target's own
/// after all the source's: only a surviving column after it makes a rename certain.
fn by_neighbours<'a>(
    inp: &Inputs<'a>,
    copied: &[&Column],
    g: &Column,
    free: &[&'a SentColumn<'a>],
    replaced: &[&str],
    first_sight: bool,
) -> Pairing<'a> {
    let Some(at) = copied.iter().position(|c| c.name == g.name) else {
        return Pairing::None;
    };
    let anchor = |c: &Column| -> Option<i16> {
        if replaced.contains(&c.name.as_str()) || !inp.sent.iter().any(|s| s.name == c.name) {
            return None;
        }
        inp.source
            .iter()
            .find(|a| !a.dropped && a.name == c.name)
            .map(|a| a.attnum)
    };
    let before = copied[..at].iter().rev().find_map(|c| anchor(c));
    let after_at = copied[at + 1..]
        .iter()
        .position(|c| anchor(c).is_some())
        .map(|p| at + 1 + p);
    let kp = before.unwrap_or(0);
    let kq = after_at.and_then(|i| anchor(copied[i]));
    // Other columns missing between the same neighbours would compete for the slot.
    let lo = copied[..at]
        .iter()
        .rposition(|c| anchor(c).is_some())
        .map(|p| p + 1)
        .unwrap_or(0);
    let hi = after_at.unwrap_or(copied.len());
    let rivals = copied[lo..hi]
        .iter()
        .filter(|c| c.name != g.name && !inp.sent.iter().any(|s| s.name == c.name))
        .count();
    let between = |lo: i16, hi: i16| {
        inp.source
            .iter()
            .filter(move |a| a.attnum > lo && a.attnum < hi)
    };
    let plausible: Vec<(&SentColumn, i16)> = free
        .iter()
        .filter_map(|n| {
            let kn = inp
                .source
                .iter()
                .find(|a| !a.dropped && a.name == n.name)?
                .attnum;
            let inside = kn > kp && kq.is_none_or(|q| kn < q);
            (inside && between(kp, kn).all(|a| a.dropped)).then_some((*n, kn))
        })
        .collect();
    match plausible.as_slice() {
        [] => Pairing::None,
        [(n, kn)]
            if rivals == 0
                && (kq.is_some() || (!first_sight && between(kp, *kn).next().is_none())) =>
        {
            Pairing::Certain(n)
        }
        _ => Pairing::Unsure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: &str, not_null: bool) -> Column {
        Column {
            name: name.into(),
            type_sql: ty.into(),
            type_oid: 0,
            not_null,
            default: None,
            generated: None,
            identity: String::new(),
            binary_portable: true,
            binary_form: ty.into(),
        }
    }

    fn attr(attnum: i16, name: &str, ty: &str) -> SourceAttribute {
        SourceAttribute {
            attnum,
            name: name.into(),
            dropped: false,
            generated: false,
            type_sql: ty.into(),
        }
    }

    fn dropped(attnum: i16) -> SourceAttribute {
        SourceAttribute {
            attnum,
            name: format!("........pg.dropped.{attnum}........"),
            dropped: true,
            generated: false,
            type_sql: "-".into(),
        }
    }

    fn seen(cols: &[(&str, Option<i16>)]) -> Vec<SeenColumn> {
        cols.iter()
            .map(|(n, a)| SeenColumn {
                name: n.to_string(),
                attnum: *a,
            })
            .collect()
    }

    struct Case {
        sent: Vec<(&'static str, &'static str)>,
        target: Vec<Column>,
        source: Vec<SourceAttribute>,
        seen: Option<Vec<SeenColumn>>,
        keep: bool,
    }

    impl Case {
        fn decide(&self) -> Result<Plan, Refusal> {
            let sent: Vec<SentColumn> = self
                .sent
                .iter()
                .map(|(n, t)| SentColumn {
                    name: n,
                    type_sql: t,
                })
                .collect();
            let table = QualifiedName::new("public", "t");
            decide(&Inputs {
                table: &table,
                sent: &sent,
                target: &self.target,
                source: &self.source,
                seen: self.seen.as_deref(),
                keep_dropped: self.keep,
                binary: true,
            })
        }
    }

    fn rename(from: &str, to: &str) -> Change {
        Change::Rename {
            from: from.into(),
            to: to.into(),
        }
    }

    fn drop(c: &str) -> Change {
        Change::Drop { column: c.into() }
    }

    fn add(c: &str, t: &str) -> Change {
        Change::Add {
            column: c.into(),
            type_sql: t.into(),
        }
    }

    #[test]
    fn a_rename_is_told_from_a_drop_and_an_add_by_the_attribute_number() {
        // (id, b) seen with b at 2; now b2 at 2: renamed.
        let mut case = Case {
            sent: vec![("id", "integer"), ("b2", "text")],
            target: vec![col("id", "integer", true), col("b", "text", false)],
            source: vec![attr(1, "id", "integer"), attr(2, "b2", "text")],
            seen: Some(seen(&[("id", Some(1)), ("b", Some(2))])),
            keep: false,
        };
        let plan = case.decide().unwrap();
        assert_eq!(plan.changes, vec![rename("b", "b2")]);
        assert!(!plan.resync && plan.committed);
        // b dropped (2) and b2 added (3): the same message, another history.
        case.source = vec![attr(1, "id", "integer"), dropped(2), attr(3, "b2", "text")];
        let plan = case.decide().unwrap();
        assert_eq!(plan.changes, vec![drop("b"), add("b2", "text")]);
        assert!(!plan.resync);
    }

    #[test]
    fn without_an_earlier_message_the_neighbours_decide_or_the_table_is_copied_again() {
        // A surviving column after it: an added column would have a higher number.
        let mut case = Case {
            sent: vec![("id", "integer"), ("title", "text"), ("qty", "integer")],
            target: vec![
                col("id", "integer", true),
                col("name", "text", false),
                col("qty", "integer", false),
            ],
            source: vec![
                attr(1, "id", "integer"),
                dropped(2),
                attr(3, "title", "text"),
                attr(4, "qty", "integer"),
            ],
            seen: None,
            keep: false,
        };
        assert_eq!(
            case.decide().unwrap().changes,
            vec![rename("name", "title")]
        );
        // The last column, never described before: the target's own plus an added
        // column fits too, so it is kept, the new one added, the rows copied again.
        case.sent = vec![("id", "integer"), ("title", "text")];
        case.target = vec![col("id", "integer", true), col("name", "text", false)];
        case.source = vec![attr(1, "id", "integer"), attr(2, "title", "text")];
        let kept = Change::Keep {
            column: "name".into(),
            make_nullable: false,
            dropped_on_source: false,
        };
        let plan = case.decide().unwrap();
        assert_eq!(plan.changes, vec![kept.clone(), add("title", "text")]);
        assert!(plan.resync);
        // Described before (number unknown), nothing between: certain.
        case.seen = Some(seen(&[("id", Some(1)), ("name", None)]));
        assert_eq!(
            case.decide().unwrap().changes,
            vec![rename("name", "title")]
        );
        // A dropped attribute before the new one: either story fits, so drop and
        // add, and copy the rows again.
        case.source = vec![
            attr(1, "id", "integer"),
            dropped(2),
            attr(3, "title", "text"),
        ];
        let plan = case.decide().unwrap();
        assert_eq!(plan.changes, vec![drop("name"), add("title", "text")]);
        assert!(plan.resync);
        // Not described the last time: the target's own, never taken for a rename.
        case.seen = Some(seen(&[("id", Some(1))]));
        case.source = vec![attr(1, "id", "integer"), attr(2, "title", "text")];
        let plan = case.decide().unwrap();
        assert_eq!(plan.changes, vec![kept, add("title", "text")]);
        assert!(!plan.resync);
    }

    #[test]
    fn a_column_the_source_never_sent_is_kept_and_one_it_stopped_sending_is_dropped() {
        let mut case = Case {
            sent: vec![("id", "integer")],
            target: vec![col("id", "integer", true), col("mine", "text", false)],
            source: vec![attr(1, "id", "integer")],
            seen: None,
            keep: false,
        };
        assert_eq!(
            case.decide().unwrap().changes,
            vec![Change::Keep {
                column: "mine".into(),
                make_nullable: false,
                dropped_on_source: false
            }]
        );
        case.seen = Some(seen(&[("id", Some(1)), ("mine", Some(2))]));
        case.source.push(dropped(2));
        assert_eq!(case.decide().unwrap().changes, vec![drop("mine")]);
        case.keep = true;
        case.target[1].not_null = true;
        assert_eq!(
            case.decide().unwrap().changes,
            vec![Change::Keep {
                column: "mine".into(),
                make_nullable: true,
                dropped_on_source: true
            }]
        );
        // Never sent, NOT NULL without a default, no flag: new rows cannot fit.
        case.keep = false;
        case.seen = None;
        assert!(matches!(case.decide(), Err(Refusal::Fatal(m)) if m.contains("DROP NOT NULL")));
    }

    #[test]
    fn a_retype_stops_with_the_statement_and_a_target_ahead_asks_for_text() {
        let mut case = Case {
            sent: vec![("id", "integer"), ("n", "bigint")],
            target: vec![col("id", "integer", true), col("n", "integer", false)],
            source: vec![attr(1, "id", "integer"), attr(2, "n", "bigint")],
            seen: None,
            keep: false,
        };
        match case.decide() {
            Err(Refusal::Fatal(m)) => assert!(
                m.contains(
                    r#"ALTER TABLE "public"."t" ALTER COLUMN "n" TYPE bigint USING "n"::bigint"#
                ),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
        // The target already has the source's current type; the message is older.
        case.sent = vec![("id", "integer"), ("n", "integer")];
        case.target[1] = col("n", "bigint", false);
        assert!(matches!(case.decide(), Err(Refusal::NeedsText(_))));
    }

    #[test]
    fn a_column_dropped_and_added_again_under_its_name_is_replaced() {
        let case = Case {
            sent: vec![("id", "integer"), ("c", "text")],
            target: vec![col("id", "integer", true), col("c", "text", false)],
            source: vec![attr(1, "id", "integer"), dropped(2), attr(3, "c", "text")],
            seen: Some(seen(&[("id", Some(1)), ("c", Some(2))])),
            keep: false,
        };
        assert_eq!(
            case.decide().unwrap().changes,
            vec![drop("c"), add("c", "text")]
        );
    }
}
