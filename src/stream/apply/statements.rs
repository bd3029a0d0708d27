//! The statements a flush sends for one table's run of changes: inserts through
//! COPY, updates row by row (pipelined prepared statements) or set-based where that
//! is provably the same, deletes set-based; and how rows are matched.

use super::*;

impl TargetSession {
    pub(super) async fn copy_inserts(&mut self, shape: &TableShape, run: &[Op]) -> Result<()> {
        let rows = run.len() as u64;
        let format = if shape.binary { " (FORMAT binary)" } else { "" };
        let sql = format!(
            "COPY {} ({}) FROM STDIN{format}",
            shape.name.quoted(),
            shape.column_list()
        );
        let ctx = || format!("inserting {rows} rows into {} on the target", shape.name);
        let stmt = self.statement(sql).await?;
        let sink = self
            .client
            .copy_in::<_, Bytes>(&stmt)
            .await
            .pg_context(ctx)?;
        futures_util::pin_mut!(sink);
        // Sent in chunks as it is encoded: a run's data in one piece (several MiB
        // for a flush of a streamed transaction) was held twice, encoded and in the
        // connection's write buffer, which then kept that size.
        let mut enc = CopyEncoder::new(shape.binary);
        for op in run {
            if let Op::Insert { new, .. } = op {
                enc.push_row(new.columns.iter());
            }
            if enc.len() >= COPY_CHUNK {
                sink.feed(enc.take()).await.pg_context(ctx)?;
            }
        }
        sink.send(enc.finish()).await.pg_context(ctx)?;
        sink.finish().await.pg_context(ctx)?;
        self.counts.inserted += rows;
        self.note_applied(&shape.name, RowOp::Insert, rows);
        Ok(())
    }

    pub(super) async fn updates(
        &mut self,
        shape: &TableShape,
        run: &[Op],
        lsns: &[Option<Lsn>],
    ) -> Result<()> {
        if shape.key.is_empty() {
            return Err(no_identity(shape));
        }
        // Consecutive updates that set the same columns without changing the key
        // become one set-based statement where that is provably what one statement
        // per row does (no constraint checked row by row covers a column they set);
        // the rest go one by one.
        let set_based = !shape.match_full_row && !shape.has_array_column();
        let mut start = 0;
        while start < run.len() {
            let mask = if set_based {
                same_key_mask(shape, &run[start])
            } else {
                None
            };
            let mut end = start + 1;
            if mask.is_some() {
                while end < run.len() && same_key_mask(shape, &run[end]) == mask {
                    end += 1;
                }
            }
            let (part, part_lsns) = (&run[start..end], &lsns[start..end]);
            let rel = part[0].rel();
            match mask {
                Some(mask)
                    if end - start >= SET_BASED_MIN
                        && !sets_guarded(shape, &mask)
                        && !self.conflicted.contains(&rel) =>
                {
                    if self.guarded_runs < GUARDED_RUNS_PER_TXN {
                        self.guarded_set_based(shape, part, part_lsns, &mask)
                            .await?
                    } else {
                        self.set_based_updates(shape, part, part_lsns, &mask)
                            .await?
                    }
                }
                _ => self.row_updates(shape, part, part_lsns).await?,
            }
            start = end;
        }
        Ok(())
    }

    /// A set-based update inside a savepoint: should the target refuse it with a
    /// unique or exclusion violation all the same (a constraint added after the
    /// table's Relation was read), the run is applied one statement per row.
    pub(super) async fn guarded_set_based(
        &mut self,
        shape: &TableShape,
        run: &[Op],
        lsns: &[Option<Lsn>],
        mask: &[bool],
    ) -> Result<()> {
        self.guarded_runs += 1;
        self.client
            .batch_execute(&format!("SAVEPOINT {SET_BASED_SAVEPOINT}"))
            .await
            .pg_context(|| "opening a savepoint on the target".into())?;
        match self.set_based_updates(shape, run, lsns, mask).await {
            Ok(()) => self
                .client
                .batch_execute(&format!("RELEASE SAVEPOINT {SET_BASED_SAVEPOINT}"))
                .await
                .pg_context(|| "releasing a savepoint on the target".into()),
            Err(e) if crate::rewrite::is_conflict(&e) => {
                tracing::warn!(
                    table = %shape.name,
                    rows = run.len(),
                    "a set-based update conflicted with a unique constraint (added on the target since the table was read?): updating this table one row at a time from now on"
                );
                if let Some(op) = run.first() {
                    self.conflicted.insert(op.rel());
                }
                self.client
                    .batch_execute(&format!(
                        "ROLLBACK TO SAVEPOINT {SET_BASED_SAVEPOINT}; RELEASE SAVEPOINT {SET_BASED_SAVEPOINT}"
                    ))
                    .await
                    .pg_context(|| "rolling back to a savepoint on the target".into())?;
                self.row_updates(shape, run, lsns).await
            }
            Err(e) => Err(e),
        }
    }

    /// One `UPDATE … FROM unnest(…)` for updates setting the same columns; the last
    /// image of each key wins, as it would applied one by one.
    pub(super) async fn set_based_updates(
        &mut self,
        shape: &TableShape,
        run: &[Op],
        lsns: &[Option<Lsn>],
        mask: &[bool],
    ) -> Result<()> {
        let mut last_by_key: HashMap<Vec<Bytes>, usize> = HashMap::with_capacity(run.len());
        for (i, op) in run.iter().enumerate() {
            let Op::Update { new, .. } = op else { continue };
            let key: Vec<Bytes> = shape
                .key
                .iter()
                .map(|&k| value_bytes(new.columns.get(k)))
                .collect();
            last_by_key.insert(key, i);
        }
        let mut rows: Vec<usize> = last_by_key.into_values().collect();
        rows.sort_unstable();
        let cols: Vec<usize> = (0..shape.columns.len()).filter(|&i| mask[i]).collect();
        let arrays = cols
            .iter()
            .enumerate()
            .map(|(n, &c)| {
                if shape.binary {
                    format!("${}::{}[]", n + 1, shape.columns[c].type_sql)
                } else {
                    format!("${}::text[]", n + 1)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let value = |n: usize, c: usize| {
            if shape.binary {
                format!("u.c{n}")
            } else {
                format!("u.c{n}::{}", shape.columns[c].type_sql)
            }
        };
        let sets = cols
            .iter()
            .enumerate()
            .filter(|(_, c)| !shape.key.contains(c))
            .map(|(n, &c)| format!("{} = {}", shape.columns[c].quoted, value(n, c)))
            .collect::<Vec<_>>();
        if sets.is_empty() {
            return self.row_updates(shape, run, lsns).await;
        }
        let conds = shape
            .key
            .iter()
            .filter_map(|k| cols.iter().position(|c| c == k).map(|n| (n, *k)))
            .map(|(n, k)| format!("t.{} = {}", shape.columns[k].quoted, value(n, k)))
            .collect::<Vec<_>>();
        let aliases = (0..cols.len())
            .map(|n| format!("c{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "UPDATE {} AS t SET {} FROM unnest({arrays}) AS u({aliases}) WHERE {}",
            shape.name.quoted(),
            sets.join(", "),
            conds.join(" AND ")
        );
        let stmt = self.statement(sql).await?;
        let params: Vec<RawArray> = cols
            .iter()
            .enumerate()
            .map(|(n, &c)| RawArray {
                element_oid: element_oid(&stmt, n).unwrap_or(TEXT_OID),
                elements: rows
                    .iter()
                    .map(|&i| match &run[i] {
                        Op::Update { new, .. } => match new.columns.get(c) {
                            Some(TupleValue::Text(b)) | Some(TupleValue::Binary(b)) => {
                                Some(b.clone())
                            }
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect(),
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let n = self.client.execute(&stmt, &refs).await.pg_context(|| {
            format!(
                "updating {} rows of {} on the target",
                rows.len(),
                shape.name
            )
        })?;
        self.counts.updated += n;
        self.note_applied(&shape.name, RowOp::Update, n);
        for _ in n..rows.len() as u64 {
            self.note_missing(shape, "update");
        }
        Ok(())
    }

    pub(super) async fn row_updates(
        &mut self,
        shape: &TableShape,
        run: &[Op],
        lsns: &[Option<Lsn>],
    ) -> Result<()> {
        // Build every statement first (prepared once, cached), then pipeline them.
        let mut prepared: Vec<(Statement, Vec<RawValue>)> = Vec::with_capacity(run.len());
        for op in run {
            let Op::Update { old, new, .. } = op else {
                continue;
            };
            let (sql, values) = update_sql(shape, old.as_ref(), new);
            let stmt = self.statement(sql).await?;
            prepared.push((stmt, values));
        }
        let affected = self
            .pipeline(&prepared, lsns, &shape.name, "updating")
            .await?;
        for n in affected {
            if n > 0 {
                self.counts.updated += 1;
                self.note_applied(&shape.name, RowOp::Update, 1);
            } else {
                self.note_missing(shape, "update");
            }
        }
        Ok(())
    }

    pub(super) async fn deletes(
        &mut self,
        shape: &TableShape,
        run: &[Op],
        lsns: &[Option<Lsn>],
    ) -> Result<()> {
        if shape.key.is_empty() {
            return Err(no_identity(shape));
        }
        if shape.match_full_row {
            let mut prepared = Vec::with_capacity(run.len());
            for op in run {
                let Op::Delete { old, .. } = op else { continue };
                let (where_sql, values) = match_clause(shape, old.tuple(), 1);
                let sql = format!(
                    "DELETE FROM {} WHERE ctid = {}",
                    shape.name.quoted(),
                    one_row(shape, &where_sql)
                );
                prepared.push((self.statement(sql).await?, values));
            }
            let affected = self
                .pipeline(&prepared, lsns, &shape.name, "deleting")
                .await?;
            for n in affected {
                if n > 0 {
                    self.counts.deleted += 1;
                    self.note_applied(&shape.name, RowOp::Delete, 1);
                }
            }
            return Ok(());
        }
        // Set-based: one statement for the whole run, keys passed as arrays.
        let key_cols: Vec<String> = shape
            .key
            .iter()
            .map(|&k| shape.columns[k].quoted.clone())
            .collect();
        let arrays = shape
            .key
            .iter()
            .enumerate()
            .map(|(n, &k)| {
                if shape.binary {
                    format!("${}::{}[]", n + 1, shape.columns[k].type_sql)
                } else {
                    format!("${}::text[]", n + 1)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let aliases: Vec<String> = (0..shape.key.len()).map(|n| format!("c{n}")).collect();
        let selected = shape
            .key
            .iter()
            .enumerate()
            .map(|(n, &k)| {
                if shape.binary {
                    format!("u.c{n}")
                } else {
                    format!("u.c{n}::{}", shape.columns[k].type_sql)
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "DELETE FROM {} WHERE ({}) IN (SELECT {selected} FROM unnest({arrays}) AS u({}))",
            shape.name.quoted(),
            key_cols.join(", "),
            aliases.join(", ")
        );
        let stmt = self.statement(sql).await?;
        let mut columns: Vec<Vec<Option<Bytes>>> =
            vec![Vec::with_capacity(run.len()); shape.key.len()];
        for op in run {
            let Op::Delete { old, .. } = op else { continue };
            for (n, &k) in shape.key.iter().enumerate() {
                let v = match old.tuple().columns.get(k) {
                    Some(TupleValue::Text(b)) | Some(TupleValue::Binary(b)) => Some(b.clone()),
                    _ => None,
                };
                columns[n].push(v);
            }
        }
        let params: Vec<RawArray> = columns
            .into_iter()
            .enumerate()
            .map(|(n, elements)| RawArray {
                element_oid: element_oid(&stmt, n).unwrap_or(TEXT_OID),
                elements,
            })
            .collect();
        let refs: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let n = self.client.execute(&stmt, &refs).await.pg_context(|| {
            format!(
                "deleting {} rows from {} on the target",
                run.len(),
                shape.name
            )
        })?;
        self.counts.deleted += n;
        self.note_applied(&shape.name, RowOp::Delete, n);
        Ok(())
    }

    /// Runs prepared statements pipelined, returning rows affected by each; a
    /// failure names the source transaction of the statement that failed (`lsns`,
    /// aligned with `prepared`).
    pub(super) async fn pipeline(
        &self,
        prepared: &[(Statement, Vec<RawValue>)],
        lsns: &[Option<Lsn>],
        table: &QualifiedName,
        what: &str,
    ) -> Result<Vec<u64>> {
        let mut affected = Vec::with_capacity(prepared.len());
        for (n, chunk) in prepared.chunks(PIPELINE_DEPTH).enumerate() {
            let futures = chunk.iter().enumerate().map(|(i, (stmt, values))| {
                let executed = self.client.execute_raw(stmt, values.iter());
                async move { executed.await.map_err(|e| (i, e)) }
            });
            // Replies come in order, so the first error is the first statement that
            // failed (the ones after it only report the aborted transaction).
            let mut failed_at = None;
            let results = futures_util::future::try_join_all(futures)
                .await
                .map_err(|(i, e)| {
                    failed_at = Some(n * PIPELINE_DEPTH + i);
                    e
                })
                .pg_context(|| format!("{what} rows of {table} on the target"));
            match results {
                Ok(results) => affected.extend(results),
                Err(e) => {
                    let lsn = failed_at.and_then(|i| lsns.get(i).copied().flatten());
                    return Err(self.locate(e, [lsn], Some(table)));
                }
            }
        }
        Ok(affected)
    }

    /// Counts rows of the open transaction for the metrics reported at commit.
    pub(super) fn note_applied(&mut self, table: &QualifiedName, op: RowOp, rows: u64) {
        if rows > 0 {
            *self.uncommitted.entry((table.clone(), op)).or_insert(0) += rows;
        }
    }

    pub(super) fn note_missing(&mut self, shape: &TableShape, what: &str) {
        self.counts.missing += 1;
        if self.counts.missing <= 10 || self.counts.missing.is_power_of_two() {
            tracing::warn!(
                table = %shape.name,
                missing = self.counts.missing,
                "row to {what} not found on the target: the target was changed outside walshuttle (verify --repair fixes it)"
            );
        }
    }
}

/// Whether an update run setting the columns of `mask` sets one a constraint
/// checked row by row covers (key columns are matched, not set).
fn sets_guarded(shape: &TableShape, mask: &[bool]) -> bool {
    mask.iter()
        .enumerate()
        .any(|(i, &set)| set && !shape.key.contains(&i) && shape.set_guarded.get(i) != Some(&false))
}

/// An update or delete of a table whose source identity names no columns (which
/// the source itself refuses to publish): stop and say what to do.
fn no_identity(shape: &TableShape) -> anyhow::Error {
    Fatal(format!(
        "an update or delete of table {} arrived, but its source replica identity names no columns to find the row by: run ALTER TABLE {} REPLICA IDENTITY FULL on the source (or give it a primary key), then run walshuttle again",
        shape.name,
        shape.name.quoted()
    ))
    .into()
}

/// The ctid of exactly one row matching `where_sql`: one no other session holds
/// (two apply sessions changing two identical rows must not wait on each other: on
/// the source they changed different rows, so an unheld one exists), else any,
/// waiting for it (a lock held by something outside walshuttle).
fn one_row(shape: &TableShape, where_sql: &str) -> String {
    let table = shape.name.quoted();
    format!(
        "coalesce((SELECT ctid FROM {table} WHERE {where_sql} LIMIT 1 FOR UPDATE SKIP LOCKED), \
                  (SELECT ctid FROM {table} WHERE {where_sql} LIMIT 1 FOR UPDATE))"
    )
}

/// For an update that keeps its key, which columns it sets (unchanged TOAST values
/// are not set); `None` when the key changes, which needs the old key.
fn same_key_mask(shape: &TableShape, op: &Op) -> Option<Vec<bool>> {
    let Op::Update { old, new, .. } = op else {
        return None;
    };
    if let Some(old) = old {
        let changed = shape
            .key
            .iter()
            .any(|&k| value_bytes(old.tuple().columns.get(k)) != value_bytes(new.columns.get(k)));
        if changed {
            return None;
        }
    }
    let mask: Vec<bool> = (0..shape.columns.len())
        .map(|i| !matches!(new.columns.get(i), Some(TupleValue::UnchangedToast) | None))
        .collect();
    // The key must be among the values sent.
    shape.key.iter().all(|&k| mask[k]).then_some(mask)
}

/// A value's bytes (empty for NULL and unchanged TOAST), for comparing keys.
fn value_bytes(v: Option<&TupleValue>) -> Bytes {
    match v {
        Some(TupleValue::Text(b)) | Some(TupleValue::Binary(b)) => b.clone(),
        _ => Bytes::new(),
    }
}

/// Element oid of array parameter `n` of a prepared statement.
fn element_oid(stmt: &Statement, n: usize) -> Option<u32> {
    match stmt.params().get(n)?.kind() {
        Kind::Array(elem) => Some(elem.oid()),
        _ => None,
    }
}

/// The UPDATE for one change: SET every column sent (unchanged TOAST values are
/// left alone), WHERE the old key (or, for keyless identity-full tables, exactly one
/// row matching the whole old row).
fn update_sql(
    shape: &TableShape,
    old: Option<&OldTuple>,
    new: &TupleData,
) -> (String, Vec<RawValue>) {
    let mut values = Vec::with_capacity(shape.columns.len() * 2);
    let mut sets = Vec::with_capacity(shape.columns.len());
    for (i, col) in shape.columns.iter().enumerate() {
        let Some(v) = new.columns.get(i).and_then(RawValue::from_tuple) else {
            continue;
        };
        values.push(v);
        sets.push(format!("{} = {}", col.quoted, shape.param(values.len(), i)));
    }
    let identity = old.map(OldTuple::tuple).unwrap_or(new);
    let table = shape.name.quoted();
    let sql = if shape.match_full_row {
        let (where_sql, where_values) = match_clause(shape, identity, values.len() + 1);
        values.extend(where_values);
        format!(
            "UPDATE {table} SET {} WHERE ctid = {}",
            sets.join(", "),
            one_row(shape, &where_sql)
        )
    } else {
        let mut conds = Vec::with_capacity(shape.key.len());
        for &k in &shape.key {
            let v = identity
                .columns
                .get(k)
                .and_then(RawValue::from_tuple)
                .unwrap_or(RawValue(None));
            values.push(v);
            conds.push(format!(
                "{} = {}",
                shape.columns[k].quoted,
                shape.param(values.len(), k)
            ));
        }
        format!(
            "UPDATE {table} SET {} WHERE {}",
            sets.join(", "),
            conds.join(" AND ")
        )
    };
    (sql, values)
}

/// The condition matching rows identical to `row` in every column that was sent:
/// each value's text form (the parameter cast to the column's type and printed, as
/// the column is, under the pinned session settings), so `1.0` and `1.00`, `0` and
/// `-0`, or equal jsonb values written differently are told apart as the source
/// told its rows apart; `column = value` first where the type has a btree class, so
/// an index narrows the search. Parameters are numbered from `first`.
fn match_clause(shape: &TableShape, row: &TupleData, first: usize) -> (String, Vec<RawValue>) {
    let mut values = Vec::new();
    let mut conds = Vec::new();
    for (i, col) in shape.columns.iter().enumerate() {
        let Some(v) = row.columns.get(i).and_then(RawValue::from_tuple) else {
            continue;
        };
        if v.0.is_none() {
            conds.push(format!("{} IS NULL", col.quoted));
            continue;
        }
        let n = first + values.len();
        values.push(v);
        let param = shape.param(n, i);
        let identical = format!("{}::text COLLATE \"C\" = ({param})::text", col.quoted);
        if col.narrows {
            conds.push(format!("{} = {param} AND {identical}", col.quoted));
        } else {
            conds.push(identical);
        }
    }
    if conds.is_empty() {
        conds.push("true".into());
    }
    (conds.join(" AND "), values)
}
