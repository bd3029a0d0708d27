//! Sequences of the replicated tables, mirrored on the target and kept at or past
//! the source.
//!
//! Logical replication carries rows, not sequences: a target promoted to primary would
//! hand out ids the source already used, or none at all where a column's default
//! calls a sequence the target lacks. The sequences mirrored are:
//!
//! - every sequence of a schema holding a replicated table (a standalone
//!   `CREATE SEQUENCE invoice_no` the application calls with `nextval`, one never
//!   called), except identity sequences of tables not replicated;
//! - every sequence a replicated column's default calls (`nextval('billing.x')`,
//!   found through the default's dependency, whatever its schema);
//! - identity columns' sequences, which the target's own identity column has.
//!
//! Each is created on the target when missing (its schema too) with the source's
//! parameters (type, increment, min/max, start, cache, cycle), owned by the same
//! column when that column is replicated; a replicated column without a default on
//! the target gets the source's `nextval(...)` default. Values only move forward:
//! the target is set to at least the source's next value (from `last_value` and
//! `is_called`) plus an optional gap; a target that is ahead keeps its value.

use anyhow::Result;
use tokio_postgres::GenericClient;

use crate::pg::{quote_ident, quote_literal, PgResultExt, QualifiedName};

/// One mirrored sequence and what was done to it on the target.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SyncedSequence {
    /// The sequence on the source (schema-qualified, as SQL needs it).
    pub source_sequence: String,
    /// The sequence on the target (schema-qualified, as SQL needs it).
    pub target_sequence: String,
    /// Replicated columns whose default calls it (`table.column`).
    pub columns: Vec<String>,
    /// The next value the source would hand out.
    pub source_next: i64,
    /// The next value the target hands out now.
    pub target_next: i64,
    /// Whether the sequence had to be created on the target.
    pub created: bool,
}

/// A source sequence and where it goes on the target.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MappedSequence {
    /// On the source (schema-qualified, quoted).
    pub source_sequence: String,
    /// On the target (schema-qualified, quoted).
    pub target_sequence: String,
    /// Replicated columns fed by it (`table.column`).
    pub columns: Vec<String>,
    /// Whether the target has it already (else it is created).
    pub on_target: bool,
    #[serde(skip)]
    spec: Spec,
    #[serde(skip)]
    oid: i64,
}

#[derive(Clone, Debug, Default)]
struct Spec {
    schema: String,
    type_sql: String,
    increment: i64,
    min: i64,
    max: i64,
    start: i64,
    cache: i64,
    cycle: bool,
    /// Owned by this replicated column (quoted table, column).
    owned_by: Option<(String, String)>,
}

/// Which sequences mirror, and the problems that keep one from being mapped (one
/// line each, saying what to do).
pub async fn plan(
    source: &impl GenericClient,
    target: &impl GenericClient,
    tables: &[QualifiedName],
) -> Result<(Vec<MappedSequence>, Vec<String>)> {
    let names: Vec<String> = tables.iter().map(|t| t.quoted()).collect();
    let rows = source
        .query(
            "WITH t AS (SELECT unnest($1::text[])::regclass::oid AS oid), \
             cand AS ( \
               SELECT c.oid FROM pg_class c \
                WHERE c.relkind = 'S' \
                  AND c.relnamespace IN (SELECT relnamespace FROM pg_class WHERE oid IN (SELECT oid FROM t)) \
               UNION \
               SELECT d.refobjid FROM pg_attrdef ad \
                 JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid \
                  AND d.refclassid = 'pg_class'::regclass \
                 JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S' \
                WHERE ad.adrelid IN (SELECT oid FROM t)) \
             SELECT n.nspname::text, c.relname::text, format_type(s.seqtypid, NULL), \
                    s.seqincrement, s.seqmin, s.seqmax, s.seqstart, s.seqcache, s.seqcycle, \
                    dep.deptype::text, dep.refobjid IN (SELECT oid FROM t), \
                    tn.nspname::text, tc.relname::text, a.attname::text, c.oid::int8, \
                    has_sequence_privilege(c.oid, 'SELECT') \
             FROM cand JOIN pg_sequence s ON s.seqrelid = cand.oid \
             JOIN pg_class c ON c.oid = cand.oid JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_depend dep ON dep.classid = 'pg_class'::regclass AND dep.objid = c.oid \
                  AND dep.refclassid = 'pg_class'::regclass AND dep.refobjsubid > 0 AND dep.deptype IN ('a', 'i') \
             LEFT JOIN pg_class tc ON tc.oid = dep.refobjid \
             LEFT JOIN pg_namespace tn ON tn.oid = tc.relnamespace \
             LEFT JOIN pg_attribute a ON a.attrelid = dep.refobjid AND a.attnum = dep.refobjsubid \
             ORDER BY 1, 2",
            &[&names],
        )
        .await
        .pg_context(|| "reading the sequences of the replicated tables on the source".into())?;
    let mut out: Vec<MappedSequence> = Vec::new();
    let mut problems = Vec::new();
    for r in rows {
        let (schema, name): (String, String) = (r.get(0), r.get(1));
        let source_sequence = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
        let deptype: Option<String> = r.get(9);
        let replicated_owner: bool = r.get::<_, Option<bool>>(10).unwrap_or(false);
        let owner = match (
            r.get::<_, Option<String>>(11),
            r.get::<_, Option<String>>(12),
        ) {
            (Some(s), Some(t)) => Some(QualifiedName { schema: s, name: t }),
            _ => None,
        };
        let column: Option<String> = r.get(13);
        let spec = Spec {
            schema: schema.clone(),
            type_sql: r.get(2),
            increment: r.get(3),
            min: r.get(4),
            max: r.get(5),
            start: r.get(6),
            cache: r.get(7),
            cycle: r.get(8),
            owned_by: None,
        };
        let target_sequence = match (deptype.as_deref(), &owner, &column) {
            // An identity sequence of a table not replicated: internal to it.
            (Some("i"), _, _) if !replicated_owner => continue,
            // An identity column's: the target column's own sequence, if it has one.
            (Some("i"), Some(t), Some(c)) => {
                match target
                    .query_one("SELECT pg_get_serial_sequence($1, $2)", &[&t.quoted(), c])
                    .await
                    .ok()
                    .and_then(|row| row.get::<_, Option<String>>(0))
                {
                    Some(seq) => seq,
                    None => source_sequence.clone(),
                }
            }
            _ => source_sequence.clone(),
        };
        let kind: Option<String> = target
            .query_opt(
                "SELECT relkind::text FROM pg_class WHERE oid = to_regclass($1)",
                &[&target_sequence],
            )
            .await
            .pg_context(|| format!("looking up {target_sequence} on the target"))?
            .map(|row| row.get(0));
        if kind.as_deref().is_some_and(|k| k != "S") {
            problems.push(format!(
                "sequence {source_sequence} cannot be mirrored: the target has a relation of that name that is not a sequence; rename or drop it on the target"
            ));
            continue;
        }
        if !r.get::<_, bool>(15) {
            problems.push(format!(
                "the source role may not read sequence {source_sequence}, whose value the target takes at the switchover: GRANT SELECT ON SEQUENCE {source_sequence} TO the source role"
            ));
        }
        let mut spec = spec;
        if let (true, Some(t), Some(c)) = (replicated_owner, &owner, &column) {
            spec.owned_by = Some((t.quoted(), c.clone()));
        }
        out.push(MappedSequence {
            source_sequence,
            target_sequence,
            columns: Vec::new(),
            on_target: kind.is_some(),
            spec,
            oid: r.get(14),
        });
    }
    // The columns fed by each, and defaults that call a sequence we cannot find.
    for table in tables {
        let rows = source
            .query(
                "SELECT a.attname::text, pg_get_expr(ad.adbin, ad.adrelid), \
                        (SELECT s.oid::int8 \
                           FROM pg_depend d JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S' \
                          WHERE d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid \
                            AND d.refclassid = 'pg_class'::regclass LIMIT 1) \
                 FROM pg_attrdef ad JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum \
                 WHERE ad.adrelid = $1::text::regclass AND NOT a.attisdropped AND a.attgenerated = '' \
                 ORDER BY a.attnum",
                &[&table.quoted()],
            )
            .await
            .pg_context(|| format!("reading the column defaults of {table} on the source"))?;
        for r in rows {
            let (column, expr): (String, String) = (r.get(0), r.get(1));
            let seq: Option<i64> = r.get(2);
            match seq.and_then(|s| out.iter_mut().find(|m| m.oid == s)) {
                Some(m) => m.columns.push(format!("{table}.{column}")),
                None if expr.contains("nextval(") => problems.push(format!(
                    "the default of {table}.{column} ({expr}) calls a sequence walshuttle cannot find (named in text, not as a regclass): write it as nextval('name'::regclass) on the source, or create the sequence and the default on the target by hand"
                )),
                None => {}
            }
        }
    }
    // Identity sequences feed their column.
    for m in &mut out {
        if let Some((t, c)) = &m.spec.owned_by {
            let fed = format!("{t}.{c}");
            if m.columns.is_empty() {
                m.columns.push(fed);
            }
        }
    }
    Ok((out, problems))
}

/// Creates what the target lacks of `tables`' sequences (see the module doc):
/// the sequences, their schemas, ownership, and the columns' `nextval` defaults.
/// Returns the mapping.
pub async fn mirror(
    source: &impl GenericClient,
    target: &impl GenericClient,
    tables: &[QualifiedName],
) -> Result<Vec<MappedSequence>> {
    let (mapped, problems) = plan(source, target, tables).await?;
    if let Some(p) = problems.first() {
        tracing::warn!(problem = %p, more = problems.len() - 1, "a sequence is not mirrored");
    }
    for m in &mapped {
        if m.on_target {
            continue;
        }
        let s = &m.spec;
        let mut sql = format!(
            "CREATE SCHEMA IF NOT EXISTS {}; CREATE SEQUENCE IF NOT EXISTS {} AS {} INCREMENT BY {} \
             MINVALUE {} MAXVALUE {} START WITH {} CACHE {} {}",
            quote_ident(&s.schema),
            m.target_sequence,
            s.type_sql,
            s.increment,
            s.min,
            s.max,
            s.start,
            s.cache,
            if s.cycle { "CYCLE" } else { "NO CYCLE" },
        );
        if let Some((t, c)) = &s.owned_by {
            sql.push_str(&format!(
                "; ALTER SEQUENCE {} OWNED BY {t}.{}",
                m.target_sequence,
                quote_ident(c)
            ));
            // An identity column on the source that is a plain column on the
            // target (made there by hand) is fed through a default.
            let bare: Option<bool> = target
                .query_opt(
                    "SELECT NOT a.atthasdef AND a.attidentity = '' FROM pg_attribute a \
                     WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
                    &[t, c],
                )
                .await
                .pg_context(|| format!("reading {t}.{c} on the target"))?
                .map(|row| row.get(0));
            if bare == Some(true) {
                sql.push_str(&format!(
                    "; ALTER TABLE {t} ALTER COLUMN {} SET DEFAULT nextval({})",
                    quote_ident(c),
                    quote_literal(&m.target_sequence)
                ));
            }
        }
        target
            .batch_execute(&sql)
            .await
            .pg_context(|| format!("creating sequence {} on the target", m.target_sequence))?;
        tracing::info!(sequence = %m.target_sequence, "created sequence on the target");
    }
    // Defaults: a replicated column whose source default calls a sequence, and
    // which has none on the target.
    for table in tables {
        let rows = source
            .query(
                "SELECT a.attname::text, pg_get_expr(ad.adbin, ad.adrelid) \
                 FROM pg_attrdef ad JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum \
                 WHERE ad.adrelid = $1::text::regclass AND NOT a.attisdropped AND a.attgenerated = '' \
                   AND EXISTS (SELECT 1 FROM pg_depend d JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S' \
                               WHERE d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid \
                                 AND d.refclassid = 'pg_class'::regclass)",
                &[&table.quoted()],
            )
            .await
            .pg_context(|| format!("reading the column defaults of {table} on the source"))?;
        for r in rows {
            let (column, expr): (String, String) = (r.get(0), r.get(1));
            let bare: Option<bool> = target
                .query_opt(
                    "SELECT NOT a.atthasdef AND a.attidentity = '' FROM pg_attribute a \
                     WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
                    &[&table.quoted(), &column],
                )
                .await
                .pg_context(|| format!("reading {table}.{column} on the target"))?
                .map(|row| row.get(0));
            if bare == Some(true) {
                target
                    .batch_execute(&format!(
                        "ALTER TABLE {} ALTER COLUMN {} SET DEFAULT {expr}",
                        table.quoted(),
                        quote_ident(&column)
                    ))
                    .await
                    .pg_context(|| {
                        format!("setting the default of {table}.{column} on the target")
                    })?;
            }
        }
    }
    Ok(mapped)
}

/// Mirrors the sequences of `tables` ([`mirror`]) and brings each on the target to
/// at least the source's next value plus `gap` (in the sequence's direction);
/// returns what it did for each.
pub async fn sync(
    source: &impl GenericClient,
    target: &impl GenericClient,
    tables: &[QualifiedName],
    gap: i64,
) -> Result<Vec<SyncedSequence>> {
    let mapped = mirror(source, target, tables).await?;
    let mut out = Vec::with_capacity(mapped.len());
    for m in mapped {
        let seq = &m.source_sequence;
        let increment = m.spec.increment;
        // The source's next value (`last_value` of a sequence never called is
        // itself the next one).
        let next: i64 = source
            .query_one(
                &format!(
                    "SELECT CASE WHEN is_called THEN last_value + {increment} ELSE last_value END FROM {seq}"
                ),
                &[],
            )
            .await
            .pg_context(|| format!("reading sequence {seq} on the source"))?
            .get(0);
        let target_seq = &m.target_sequence;
        let wanted = next.saturating_add(gap.saturating_mul(increment.signum()));
        // Only forward (in the sequence's direction): a target that is ahead keeps
        // its value.
        let target_next: i64 = target
            .query_one(
                &format!(
                    "WITH cur AS (SELECT CASE WHEN is_called THEN last_value + {increment} ELSE last_value END AS next FROM {target_seq}) \
                     SELECT CASE WHEN ({increment} > 0 AND $1 > next) OR ({increment} < 0 AND $1 < next) \
                                 THEN setval({lit}, $1, false) ELSE next END FROM cur",
                    lit = quote_literal(target_seq)
                ),
                &[&wanted],
            )
            .await
            .pg_context(|| format!("setting sequence {target_seq} on the target"))?
            .get(0);
        out.push(SyncedSequence {
            source_sequence: m.source_sequence.clone(),
            target_sequence: m.target_sequence.clone(),
            columns: m.columns.clone(),
            source_next: next,
            target_next,
            created: !m.on_target,
        });
    }
    Ok(out)
}
