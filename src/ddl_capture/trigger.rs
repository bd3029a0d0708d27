//! The event trigger `--capture-ddl` installs on the source: what it emits, how it is
//! installed (idempotently, in walshuttle's own schema `walshuttle_ddl`, named after
//! the pipeline) and removed by `teardown`.
//!
//! For every DDL command that touches a table of the pipeline, creates a table the
//! pipeline would carry (every table, or a partition of a carried parent), or drops
//! one, the trigger emits `pg_logical_emit_message(true, 'walshuttle.ddl.<slot>',
//! json)` inside the command's own transaction. The JSON is the table's desired
//! state read from the catalog right after the command (columns in attnum order with
//! type, NOT NULL, default, generation expression and the value existing rows got
//! when the column was added; indexes and constraints as PostgreSQL prints them),
//! beside the state the trigger recorded after the previous command (`before`),
//! kept in a table of its own per pipeline: the pair says exactly which attribute
//! was renamed, dropped or added, with no guessing.
//!
//! A table that joins (created in a carried schema, attached or created as a
//! partition) is added to the publication by the trigger, in the same transaction,
//! so rows written right after its creation are decoded, unless it has no replica
//! identity PostgreSQL can use for updates and deletes (no primary key, no `FULL`,
//! no usable `USING INDEX`): published, the source would refuse its UPDATEs and
//! DELETEs, so it is left out and an `unpublished` message says so; the `ALTER
//! TABLE` that gives it one brings it in. A failure inside the
//! trigger never fails the user's DDL: it emits an `error` message instead, which
//! stops the pipeline with the reason.

use anyhow::{bail, Result};
use tokio_postgres::Client;

use crate::pg::{quote_ident, quote_literal, PgResultExt, QualifiedName};

/// The source schema holding every pipeline's trigger objects.
pub const SCHEMA: &str = "walshuttle_ddl";

/// Longest slot name whose trigger names fit PostgreSQL's 63-byte identifiers.
const MAX_SLOT_LEN: usize = 47;

/// The names of one pipeline's trigger objects on the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// The message prefix, `walshuttle.ddl.<slot>`.
    pub prefix: String,
    /// The table of recorded shapes (and the event trigger function's name).
    pub base: String,
    /// The `ddl_command_end` event trigger.
    pub end_trigger: String,
    /// The `sql_drop` event trigger.
    pub drop_trigger: String,
    /// The `table_rewrite` event trigger.
    pub rewrite_trigger: String,
    /// The transaction-local setting listing the tables rewritten in the
    /// transaction (oids, `{…}`), which the `table_rewrite` trigger fills and the
    /// `ddl_command_end` trigger reads.
    pub rewritten_setting: String,
}

impl Names {
    /// The names for pipeline (slot) `slot`.
    pub fn for_slot(slot: &str) -> Self {
        Names {
            prefix: format!("walshuttle.ddl.{slot}"),
            base: slot.to_string(),
            end_trigger: format!("walshuttle_ddl_{slot}"),
            drop_trigger: format!("walshuttle_drop_{slot}"),
            rewrite_trigger: format!("walshuttle_rw_{slot}"),
            rewritten_setting: format!("walshuttle.rewritten_{slot}"),
        }
    }

    fn object(&self, suffix: &str) -> String {
        format!(
            "{}.{}",
            quote_ident(SCHEMA),
            quote_ident(&format!("{}{suffix}", self.base))
        )
    }
}

/// What the trigger needs to know about the pipeline.
#[derive(Clone, Debug)]
pub struct Spec {
    /// Slot (= pipeline) name.
    pub slot: String,
    /// The pipeline's publication, which joining tables are added to.
    pub publication: String,
    /// The pipeline carries every table (no `--tables`): tables created later join.
    pub every_table: bool,
    /// Schemas whose new tables never join (walshuttle's state schema).
    pub excluded_schemas: Vec<String>,
    /// The pipeline's tables now.
    pub tables: Vec<QualifiedName>,
}

/// Preflight of `--capture-ddl`: the source role must be able to create event
/// triggers (superuser up to PostgreSQL 17), and the slot name must leave room for
/// the trigger names.
pub async fn check_privilege(source: &Client, slot: &str) -> Result<()> {
    if slot.len() > MAX_SLOT_LEN {
        bail!(
            "--capture-ddl names its event triggers after the slot, and slot {slot} is longer than {MAX_SLOT_LEN} characters: choose a shorter --slot, or leave out --capture-ddl"
        );
    }
    let row = source
        .query_one(
            "SELECT current_user::text, r.rolsuper, current_setting('server_version_num')::int \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .pg_context(|| "checking whether the source role may create event triggers".into())?;
    let (user, superuser, version): (String, bool, i32) = (row.get(0), row.get(1), row.get(2));
    if !superuser {
        bail!(
            "--capture-ddl installs an event trigger on the source, which only a superuser may create on PostgreSQL {}, and the source role {user} is not one: connect as a superuser (or run ALTER ROLE {} SUPERUSER on the source), or leave out --capture-ddl (without it, `run` still follows added, dropped and renamed columns from the Relation messages)",
            version / 10000,
            quote_ident(&user)
        );
    }
    Ok(())
}

/// Installs (or refreshes) the pipeline's trigger on the source, in one
/// transaction, and records the current shape of each of its tables (those already
/// recorded keep the trigger's own record, which follows the log).
pub async fn install(source: &Client, spec: &Spec) -> Result<()> {
    let names = Names::for_slot(&spec.slot);
    let sql = install_sql(&names, spec);
    let schemas: Vec<&str> = spec.tables.iter().map(|t| t.schema.as_str()).collect();
    let tables: Vec<&str> = spec.tables.iter().map(|t| t.name.as_str()).collect();
    let track = names.object("");
    let shape = names.object("_shape");
    let ctx = || {
        format!(
            "installing the DDL capture trigger of pipeline {} on the source",
            spec.slot
        )
    };
    source
        .batch_execute(&format!("BEGIN; {sql}"))
        .await
        .pg_context(ctx)?;
    let result = async {
        let carried = "WITH t AS (SELECT c.oid FROM unnest($1::text[], $2::text[]) AS u(s, n) \
                        JOIN pg_namespace ns ON ns.nspname = u.s \
                        JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = u.n), \
                  a AS (SELECT t.oid FROM t UNION SELECT p.relid FROM t, pg_partition_ancestors(t.oid) p)";
        source
            .execute(
                &format!("{carried} DELETE FROM {track} WHERE relid NOT IN (SELECT oid FROM a)"),
                &[&schemas, &tables],
            )
            .await?;
        source
            .execute(
                &format!(
                    "{carried} INSERT INTO {track} (relid, shape) SELECT oid, {shape}(oid) FROM a \
                     ON CONFLICT (relid) DO NOTHING"
                ),
                &[&schemas, &tables],
            )
            .await?;
        source.batch_execute("COMMIT").await
    }
    .await;
    if let Err(e) = result {
        let _ = source.batch_execute("ROLLBACK").await;
        return Err(e).pg_context(ctx);
    }
    Ok(())
}

/// Whether the pipeline's trigger is installed on the source.
pub async fn installed(source: &Client, slot: &str) -> Result<bool> {
    let names = Names::for_slot(slot);
    Ok(source
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_event_trigger WHERE evtname IN ($1, $2, $4)) \
                 OR to_regclass($3) IS NOT NULL",
            &[
                &names.end_trigger,
                &names.drop_trigger,
                &names.object(""),
                &names.rewrite_trigger,
            ],
        )
        .await
        .pg_context(|| "looking up the DDL capture trigger on the source".into())?
        .get(0))
}

/// Drops the pipeline's trigger, its functions and its table; the schema too when
/// no other pipeline's objects are left in it.
pub async fn remove(source: &Client, slot: &str) -> Result<()> {
    let names = Names::for_slot(slot);
    let sql = format!(
        "BEGIN; \
         DROP EVENT TRIGGER IF EXISTS {end}; DROP EVENT TRIGGER IF EXISTS {drop}; \
         DROP EVENT TRIGGER IF EXISTS {rw}; DROP FUNCTION IF EXISTS {rwf}(); \
         DROP FUNCTION IF EXISTS {f}(); DROP FUNCTION IF EXISTS {emit}(oid, text, text, boolean); \
         DROP FUNCTION IF EXISTS {shape}(oid); DROP FUNCTION IF EXISTS {usable}(oid); \
         DROP TABLE IF EXISTS {track}; COMMIT",
        end = quote_ident(&names.end_trigger),
        drop = quote_ident(&names.drop_trigger),
        rw = quote_ident(&names.rewrite_trigger),
        rwf = names.object("_rewrite"),
        f = names.object(""),
        emit = names.object("_emit"),
        shape = names.object("_shape"),
        usable = names.object("_usable"),
        track = names.object(""),
    );
    source.batch_execute(&sql).await.pg_context(|| {
        format!("dropping the DDL capture trigger of pipeline {slot} on the source")
    })?;
    let empty: bool = source
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1) \
                AND NOT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = $1)",
            &[&SCHEMA],
        )
        .await
        .pg_context(|| format!("checking whether schema {SCHEMA} on the source is empty"))?
        .get(0);
    if empty {
        source
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {} RESTRICT",
                quote_ident(SCHEMA)
            ))
            .await
            .pg_context(|| format!("dropping schema {SCHEMA} on the source"))?;
    }
    Ok(())
}

/// The statements that create (or replace) the trigger's objects.
fn install_sql(names: &Names, spec: &Spec) -> String {
    let excluded = if spec.excluded_schemas.is_empty() {
        "ARRAY[]::text[]".to_string()
    } else {
        format!(
            "ARRAY[{}]::text[]",
            spec.excluded_schemas
                .iter()
                .map(|s| quote_literal(s))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    TEMPLATE
        .replace("{SCHEMA}", &quote_ident(SCHEMA))
        .replace("{TRACK}", &names.object(""))
        .replace("{SHAPE}", &names.object("_shape"))
        .replace("{EMIT}", &names.object("_emit"))
        .replace("{USABLE}", &names.object("_usable"))
        .replace("{FN}", &names.object(""))
        .replace("{END}", &quote_ident(&names.end_trigger))
        .replace("{DROP}", &quote_ident(&names.drop_trigger))
        .replace("{RW}", &quote_ident(&names.rewrite_trigger))
        .replace("{RWFN}", &names.object("_rewrite"))
        .replace("{RWSET}", &quote_literal(&names.rewritten_setting))
        .replace("{PREFIX}", &quote_literal(&names.prefix))
        .replace("{PUB}", &quote_literal(&spec.publication))
        .replace("{EVERY}", if spec.every_table { "true" } else { "false" })
        .replace("{EXCLUDED}", &excluded)
}

/// The trigger's objects. Functions run as their owner (`SECURITY DEFINER`, with a
/// fixed `search_path`) so any role's DDL can record shapes and join the publication.
const TEMPLATE: &str = r#"
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC;
CREATE TABLE IF NOT EXISTS {TRACK} (relid oid PRIMARY KEY, shape jsonb NOT NULL);

CREATE OR REPLACE FUNCTION {SHAPE}(rel oid) RETURNS jsonb
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $body$
SELECT jsonb_build_object(
  'oid', c.oid::bigint, 'schema', n.nspname::text, 'name', c.relname::text,
  'kind', c.relkind::text, 'persistence', c.relpersistence::text,
  'columns', coalesce((
     SELECT jsonb_agg(jsonb_build_object(
        'name', a.attname::text, 'attnum', a.attnum, 'type', format_type(a.atttypid, a.atttypmod),
        'type_oid', a.atttypid::bigint, 'not_null', a.attnotnull,
        'default', CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, d.adrelid) END,
        'generated', CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END,
        'identity', a.attidentity::text, 'has_missing', a.atthasmissing,
        'missing', CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END)
        ORDER BY a.attnum)
     FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
     WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '[]'::jsonb),
  'indexes', coalesce((
     SELECT jsonb_agg(jsonb_build_object('name', ic.relname::text, 'def', pg_get_indexdef(i.indexrelid))
        ORDER BY ic.relname)
     FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid
     WHERE i.indrelid = c.oid
       AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid AND k.conrelid = c.oid)), '[]'::jsonb),
  'constraints', coalesce((
     SELECT jsonb_agg(jsonb_build_object('name', k.conname::text, 'type', k.contype::text, 'def', pg_get_constraintdef(k.oid))
        ORDER BY k.conname)
     FROM pg_constraint k WHERE k.conrelid = c.oid AND k.contype IN ('p', 'u', 'c', 'x', 'f')), '[]'::jsonb))
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel
$body$;

CREATE OR REPLACE FUNCTION {USABLE}(rel oid) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $body$
SELECT coalesce((SELECT CASE c.relreplident
  WHEN 'f' THEN true
  WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary
                          AND i.indisvalid AND i.indisunique AND i.indimmediate AND i.indpred IS NULL)
  WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident
                          AND i.indisvalid AND i.indisunique AND i.indimmediate AND i.indpred IS NULL)
  ELSE false END
FROM pg_class c WHERE c.oid = rel), false)
$body$;

CREATE OR REPLACE FUNCTION {EMIT}(rel oid, tag text, identity text, may_join boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
  before jsonb;
  after jsonb;
  leaf oid;
  rewritten oid[];
BEGIN
  after := {SHAPE}(rel);
  IF after IS NULL THEN
    RETURN;
  END IF;
  SELECT t.shape INTO before FROM {TRACK} t WHERE t.relid = rel;
  IF after->>'kind' = 'p' THEN
    IF before IS NOT NULL THEN
      UPDATE {TRACK} SET shape = after WHERE relid = rel;
    END IF;
    FOR leaf IN SELECT p.relid FROM pg_partition_tree(rel) p WHERE p.isleaf AND p.relid <> rel LOOP
      PERFORM {EMIT}(leaf, tag, identity, may_join);
    END LOOP;
    RETURN;
  END IF;
  IF before IS NULL THEN
    IF NOT may_join OR after->>'kind' <> 'r' OR after->>'persistence' <> 'p' THEN
      RETURN;
    END IF;
    IF NOT (({EVERY} AND NOT (after->>'schema' = ANY ({EXCLUDED}))
              AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                              AND d.objid = rel AND d.deptype = 'e'))
            OR EXISTS (SELECT 1 FROM pg_partition_ancestors(rel) a JOIN {TRACK} t ON t.relid = a.relid
                       WHERE a.relid <> rel)) THEN
      RETURN;
    END IF;
    IF NOT {USABLE}(rel) THEN
      -- Published without a usable replica identity, the table would make the
      -- source refuse its UPDATEs and DELETEs: it stays out until it has one (the
      -- ALTER TABLE that gives it one brings it here again).
      PERFORM pg_logical_emit_message(true, {PREFIX}, jsonb_build_object(
        'kind', 'unpublished', 'tag', tag, 'identity', identity, 'after', after)::text);
      RETURN;
    END IF;
    INSERT INTO {TRACK} (relid, shape)
      SELECT a.relid, {SHAPE}(a.relid) FROM pg_partition_ancestors(rel) a WHERE a.relid <> rel
      ON CONFLICT (relid) DO NOTHING;
    IF NOT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
                   WHERE p.pubname = {PUB} AND pr.prrelid = rel) THEN
      EXECUTE format('ALTER PUBLICATION %I ADD TABLE ONLY %I.%I', {PUB}, after->>'schema', after->>'name');
    END IF;
  ELSIF before = after THEN
    RETURN;
  END IF;
  INSERT INTO {TRACK} (relid, shape) VALUES (rel, after)
    ON CONFLICT (relid) DO UPDATE SET shape = EXCLUDED.shape;
  -- Whether this table's rows were rewritten in this transaction (the
  -- table_rewrite trigger's record): a retype then converted values with an
  -- expression the target cannot see (USING, or a cast), so the table is copied.
  rewritten := coalesce(nullif(current_setting({RWSET}, true), ''), '{}')::oid[];
  IF rel = ANY (rewritten) THEN
    PERFORM set_config({RWSET}, array_remove(rewritten, rel)::text, true);
  END IF;
  PERFORM pg_logical_emit_message(true, {PREFIX}, jsonb_build_object(
    'kind', 'table', 'tag', tag, 'identity', identity,
    'rewrote', rel = ANY (rewritten),
    'before', before, 'after', after)::text);
END
$body$;

CREATE OR REPLACE FUNCTION {FN}() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
DECLARE
  cmd record;
  rel oid;
  gone jsonb;
  last text;
BEGIN
  IF tg_event = 'sql_drop' THEN
    FOR cmd IN SELECT * FROM pg_event_trigger_dropped_objects() LOOP
      IF cmd.object_type = 'table' THEN
        DELETE FROM {TRACK} WHERE relid = cmd.objid RETURNING shape INTO gone;
        IF gone IS NOT NULL AND gone->>'kind' = 'r' THEN
          PERFORM pg_logical_emit_message(true, {PREFIX}, jsonb_build_object(
            'kind', 'drop', 'tag', tg_tag, 'identity', cmd.object_identity, 'before', gone)::text);
        END IF;
      ELSIF cmd.object_type = 'table column' THEN
        PERFORM {EMIT}(cmd.objid, tg_tag, cmd.object_identity, false);
      ELSIF cmd.object_type IN ('index', 'table constraint') THEN
        last := cmd.address_names[array_length(cmd.address_names, 1)];
        FOR rel IN SELECT t.relid FROM {TRACK} t
                   WHERE t.shape->>'schema' = cmd.address_names[1]
                     AND (t.shape->'indexes' @> jsonb_build_array(jsonb_build_object('name', last))
                          OR t.shape->'constraints' @> jsonb_build_array(jsonb_build_object('name', last))) LOOP
          PERFORM {EMIT}(rel, tg_tag, cmd.object_identity, false);
        END LOOP;
      END IF;
    END LOOP;
    RETURN;
  END IF;
  FOR cmd IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    rel := NULL;
    IF cmd.object_type IN ('table', 'table column') THEN
      rel := cmd.objid;
    ELSIF cmd.object_type = 'index' THEN
      SELECT i.indrelid INTO rel FROM pg_index i WHERE i.indexrelid = cmd.objid;
    ELSIF cmd.object_type = 'table constraint' THEN
      SELECT k.conrelid INTO rel FROM pg_constraint k WHERE k.oid = cmd.objid;
    ELSIF cmd.object_type = 'rule' THEN
      SELECT r.ev_class INTO rel FROM pg_rewrite r WHERE r.oid = cmd.objid;
    ELSIF cmd.object_type = 'trigger' THEN
      SELECT g.tgrelid INTO rel FROM pg_trigger g WHERE g.oid = cmd.objid;
    ELSIF cmd.object_type = 'policy' THEN
      SELECT p.polrelid INTO rel FROM pg_policy p WHERE p.oid = cmd.objid;
    ELSIF cmd.object_type = 'type' THEN
      IF EXISTS (SELECT 1 FROM pg_enum e WHERE e.enumtypid = cmd.objid)
         AND EXISTS (SELECT 1 FROM {TRACK} t, jsonb_array_elements(t.shape->'columns') col
                     WHERE (col->>'type_oid')::oid IN (cmd.objid, (SELECT y.typarray FROM pg_type y WHERE y.oid = cmd.objid))) THEN
        PERFORM pg_logical_emit_message(true, {PREFIX}, jsonb_build_object(
          'kind', 'type', 'tag', tg_tag, 'identity', cmd.object_identity,
          'schema', cmd.schema_name, 'name', (SELECT y.typname::text FROM pg_type y WHERE y.oid = cmd.objid),
          'labels', (SELECT jsonb_agg(e.enumlabel::text ORDER BY e.enumsortorder) FROM pg_enum e WHERE e.enumtypid = cmd.objid))::text);
      END IF;
      CONTINUE;
    END IF;
    IF rel IS NULL THEN
      CONTINUE;
    END IF;
    IF tg_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE', 'CREATE INDEX', 'ALTER INDEX') THEN
      PERFORM {EMIT}(rel, tg_tag, cmd.object_identity, tg_tag IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE'));
    ELSIF EXISTS (SELECT 1 FROM {TRACK} t WHERE t.relid = rel AND t.shape->>'kind' = 'r')
          OR EXISTS (SELECT 1 FROM pg_partition_tree(rel) p JOIN {TRACK} t ON t.relid = p.relid
                     WHERE p.isleaf AND p.relid <> rel) THEN
      PERFORM pg_logical_emit_message(true, {PREFIX}, jsonb_build_object(
        'kind', 'other', 'tag', tg_tag, 'identity', cmd.object_identity, 'object_type', cmd.object_type,
        'after', {SHAPE}(rel))::text);
    END IF;
  END LOOP;
EXCEPTION WHEN OTHERS THEN
  PERFORM pg_logical_emit_message(true, {PREFIX}, jsonb_build_object(
    'kind', 'error', 'tag', tg_tag, 'message', SQLERRM)::text);
END
$body$;

CREATE OR REPLACE FUNCTION {RWFN}() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$
BEGIN
  PERFORM set_config({RWSET}, array_append(
    coalesce(nullif(current_setting({RWSET}, true), ''), '{}')::oid[],
    pg_event_trigger_table_rewrite_oid())::text, true);
EXCEPTION WHEN OTHERS THEN
  PERFORM pg_logical_emit_message(true, {PREFIX}, jsonb_build_object(
    'kind', 'error', 'tag', tg_tag, 'message', SQLERRM)::text);
END
$body$;

DROP EVENT TRIGGER IF EXISTS {RW};
CREATE EVENT TRIGGER {RW} ON table_rewrite EXECUTE FUNCTION {RWFN}();
DROP EVENT TRIGGER IF EXISTS {END};
CREATE EVENT TRIGGER {END} ON ddl_command_end EXECUTE FUNCTION {FN}();
DROP EVENT TRIGGER IF EXISTS {DROP};
CREATE EVENT TRIGGER {DROP} ON sql_drop EXECUTE FUNCTION {FN}();
"#;
