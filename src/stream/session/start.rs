//! Everything before the first message: state, positions, the replication
//! connection and the session that applies what it sends.

use super::*;

/// Everything before the first message: state, positions, the replication
/// connection and the session that applies what it sends.
pub(super) async fn start<'a>(
    source: &'a Endpoint,
    target: &'a Endpoint,
    cfg: &'a StreamConfig,
) -> Result<Session<'a>> {
    let target_client = connect(target, "apply").await?;
    let state = &cfg.state;
    let pipeline = state
        .pipeline(&target_client, &cfg.slot)
        .await?
        .ok_or_else(|| {
            Fatal(format!(
                "pipeline {} has no state on the target: run bootstrap first",
                cfg.slot
            ))
        })?;
    let applied = state
        .progress(&target_client, &cfg.slot)
        .await?
        .or(pipeline.stream_start_lsn)
        .unwrap_or_default();
    let source_sql = connect(source, "lookup").await?;
    crate::switchover::fence::announce_run_session(&source_sql, &cfg.slot).await;
    if let Some(reason) = crate::slot::gap_reason(&source_sql, &cfg.slot).await? {
        return Err(crate::slot::SlotGone {
            slot: cfg.slot.clone(),
            reason,
        }
        .into());
    }
    if pipeline.phase == Phase::CatchingUp {
        // A catch-up was interrupted: its new slot is healthy but the repair is not
        // done, so finish it before streaming from that slot.
        return Err(crate::slot::SlotGone {
            slot: cfg.slot.clone(),
            reason: crate::slot::GapReason::Resumed,
        }
        .into());
    }
    // Tables being copied while the pipeline streams (their changes are held).
    let entries = state.table_entries(&target_client, &cfg.slot).await?;
    let (held_tables, replay_tables) = held_sets(&entries);
    crate::observe::tables_copying(held_tables.len());
    let binary = !cfg.memory.text_only()
        && binary_capable(&source_sql, &target_client, &pipeline.tables).await?;

    let mut repl = ReplicationClient::connect(source, None)
        .await
        .with_context(|| format!("opening a replication connection to {}", source.redacted))?;
    let _ = repl.simple_query("IDENTIFY_SYSTEM").await?;
    let mut options = vec![
        ("proto_version", "2".to_string()),
        ("publication_names", quote_ident(&cfg.publication)),
        ("binary", if binary { "true" } else { "false" }.to_string()),
        ("streaming", "on".to_string()),
    ];
    let ddl_prefix = if state.capture_ddl(&target_client, &cfg.slot).await? {
        options.push(("messages", "true".to_string()));
        Some(crate::ddl_capture::prefix(&cfg.slot))
    } else {
        None
    };
    let replication = match repl.start_replication(&cfg.slot, applied, &options).await {
        Ok(r) => r,
        Err(e) => {
            // Dropped or invalidated between the check and the start.
            let gone = matches!(e.code().map(|c| c.code()), Some("42704") | Some("55000"));
            if gone {
                if let Some(reason) = crate::slot::gap_reason(&source_sql, &cfg.slot).await? {
                    return Err(crate::slot::SlotGone {
                        slot: cfg.slot.clone(),
                        reason,
                    }
                    .into());
                }
            }
            return Err(e.into());
        }
    };
    if pipeline.phase != Phase::Streaming {
        let mut p = pipeline.clone();
        p.phase = Phase::Streaming;
        state.save_pipeline(&target_client, &p).await?;
    }
    if pipeline.stop_reason.is_some() {
        // Streaming again: whatever stopped the last `run` is behind us.
        state
            .set_stop_reason(&target_client, &cfg.slot, None)
            .await?;
    }
    let positions = StreamPositions::load(
        state,
        &target_client,
        &source_sql,
        &cfg.slot,
        applied,
        binary,
    )
    .await?;
    state
        .expire_positions(&target_client, &cfg.slot, applied)
        .await?;
    tracing::info!(slot = %cfg.slot, start = %applied, binary, copy_positions = !positions.is_empty(), "streaming changes");
    crate::observe::set_phase(crate::observe::RunPhase::Streaming, None);

    // Position checks and flags go through their own connection: the apply
    // connection may be in the middle of a COPY.
    let monitor = connect(target, "apply monitor").await?;
    // If this process vanishes behind a stalled network, the server ends the
    // abandoned apply transaction and frees its locks for the next session.
    target_client
        .batch_execute("SET idle_in_transaction_session_timeout = '5min'")
        .await
        .pg_context(|| "configuring the apply session on the target".into())?;
    // The progress row read at start may not be on the target's disk yet (apply
    // commits asynchronously, and a restart of walshuttle does not flush it): it is
    // confirmed to the source only once the target has flushed past it, like every
    // later commit. Until then the slot stays where it was confirmed before.
    let confirmed: Option<String> = source_sql
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&cfg.slot],
        )
        .await
        .pg_context(|| "reading the slot's confirmed position on the source".into())?
        .and_then(|r| r.get(0));
    let confirmed: Lsn = confirmed
        .and_then(|c| c.parse::<Lsn>().ok())
        .unwrap_or_default()
        .min(applied);
    let monitor = Arc::new(monitor);
    let durability = Durability::start(Arc::clone(&monitor), confirmed, applied).await?;
    let wal_sender_timeout_ms: i64 = source_sql
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .pg_context(|| "reading wal_sender_timeout on the source".into())?
        .get(0);
    let receive_timeout = if wal_sender_timeout_ms <= 0 {
        Duration::from_secs(30)
    } else {
        Duration::from_millis(wal_sender_timeout_ms as u64)
            .clamp(Duration::from_secs(5), Duration::from_secs(60))
    };
    // Tables a previous session found to need copying again, and did not finish.
    let pending_resync: Vec<QualifiedName> = entries
        .iter()
        .filter(|t| t.state == TableState::Resync)
        .map(|t| t.name.clone())
        .collect();
    let main_pid = backend_pid(&target_client).await?;
    let io = StreamIo::start(
        replication,
        applied,
        confirmed,
        cfg.status_interval,
        receive_timeout,
    );
    let session = Session {
        io,
        main_pid,
        binary,
        budget_warned: false,
        progress: Arc::default(),
        joins: TableJoins::new(held_tables, replay_tables, pending_resync),
        ignored: HashSet::new(),
        receive_timeout,
        monitor,
        ddl_prefix,
        cfg,
        source,
        target,
        source_sql,
        relations: Arc::new(Relations::new(binary, pipeline.tables.clone())),
        relation_cache: HashMap::new(),
        pending_relations: HashMap::new(),
        main: TargetSession::new(target_client, &cfg.target, state.apply_begin_sql(&cfg.slot))
            .await?,
        lanes: Lanes::new(if cfg.memory.serial_apply() {
            1
        } else {
            cfg.apply_lanes
        }),
        main_keys: ConflictKeys::default(),
        txn_keys: ConflictKeys::default(),
        streams: HashMap::new(),
        spooled: HashMap::new(),
        in_stream: None,
        current: None,
        main_mark: 0,
        main_has_partial: false,
        batch_txns: 0,
        batch_last: None,
        batch_started: Instant::now(),
        batch_age: Default::default(),
        applied,
        durability,
        received: applied,
        idle_wal_end: Lsn::ZERO,
        positions,
    };
    Ok(session)
}

/// The tables whose changes are held (being copied, or copied with held changes
/// still to apply), and those of them whose copy is in.
pub(super) fn held_sets(
    entries: &[crate::state::TableEntry],
) -> (HashSet<QualifiedName>, HashSet<QualifiedName>) {
    let held = entries
        .iter()
        .filter(|e| matches!(e.state, TableState::Held | TableState::Copied))
        .map(|e| e.name.clone())
        .collect();
    let replay = entries
        .iter()
        .filter(|e| e.state == TableState::Copied)
        .map(|e| e.name.clone())
        .collect();
    (held, replay)
}

/// The backend process id of a target connection (for liveness probes).
pub(super) async fn backend_pid(client: &Client) -> Result<i32> {
    Ok(client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .pg_context(|| "reading the apply session's process id on the target".into())?
        .get(0))
}

/// Whether every pipeline table can take pgoutput's binary values: identical,
/// database-independent types on both sides.
pub(super) async fn binary_capable(
    source: &Client,
    target: &Client,
    tables: &[QualifiedName],
) -> Result<bool> {
    use futures_util::{StreamExt, TryStreamExt};
    // The futures are made first: a closure inside the stream would not be `Send`
    // for every lifetime, which `tokio::spawn` of `run` needs.
    let checks: Vec<_> = tables
        .iter()
        .map(|name| table_binary_capable(source, target, name))
        .collect();
    let each: Vec<bool> = futures_util::stream::iter(checks)
        .buffered(crate::catalog::PIPELINE_DEPTH)
        .try_collect()
        .await?;
    Ok(each.into_iter().all(|b| b))
}

/// [`binary_capable`] for one table.
pub(super) async fn table_binary_capable(
    source: &Client,
    target: &Client,
    name: &QualifiedName,
) -> Result<bool> {
    let Some(mut table) = crate::catalog::load_table(source, name).await? else {
        return Err(Fatal(format!(
            "table {name} of this pipeline no longer exists on the source"
        ))
        .into());
    };
    // Columns added on the source since the target table was made are added by
    // the stream when their first change arrives (see `added_columns`).
    let existing = crate::catalog::load_table(target, name).await?;
    if let Some(existing) = &existing {
        let (present, added): (Vec<_>, Vec<_>) = table
            .columns
            .into_iter()
            .partition(|c| existing.columns.iter().any(|t| t.name == c.name));
        table.columns = present;
        if added.iter().any(|c| !c.binary_portable) {
            return Ok(false);
        }
    }
    // Errors of the servers came from the reads above, each judged by its SQLSTATE;
    // an incompatible table is not retried.
    match crate::catalog::target_fit(&table, existing.as_ref()) {
        Ok(fit) => Ok(fit.binary()),
        Err(e) => Err(Fatal(e.to_string()).into()),
    }
}
