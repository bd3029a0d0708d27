//! Column lists and row filters (`--columns`, `--row-filter`, PostgreSQL 15+
//! publications) carried through bootstrap, streaming, verify and status; refused
//! up front where the source would refuse UPDATEs or DELETEs, or is too old.

mod support;

use std::time::Duration;

use support::{run, wait_streaming, wait_while_running, walshuttle, Cluster, RunChild, RunLogs};
use tokio_postgres::Client;

/// `orders`: a key, a secondary UNIQUE (listed), a UNIQUE on a column left out,
/// and a filter on the key. `"Order Items"`: quoted mixed-case names, a column
/// left out, a filter on the key. `events`: REPLICA IDENTITY FULL, so its filter
/// may read a non-key column and an UPDATE of that column moves a row in or out.
const SCHEMA: &str = r#"
    CREATE TABLE orders (id bigint PRIMARY KEY, code text NOT NULL UNIQUE, total numeric(12,2),
                         secret text UNIQUE, note text, doc text);
    ALTER TABLE orders ALTER COLUMN doc SET STORAGE EXTERNAL;
    INSERT INTO orders SELECT g, 'c' || g, g * 1.5, 's' || g, 'n' || g,
                              CASE WHEN g % 10 = 3 THEN repeat(md5(g::text), 200) END
        FROM generate_series(1, 300) g;
    CREATE TABLE "Order Items" ("Item Id" int PRIMARY KEY, "Qty" int NOT NULL, "Comment" text);
    INSERT INTO "Order Items" SELECT g, g % 9, 'comment ' || g FROM generate_series(1, 90) g;
    CREATE TABLE events (id int PRIMARY KEY, kind text NOT NULL, body text);
    ALTER TABLE events REPLICA IDENTITY FULL;
    INSERT INTO events SELECT g, CASE WHEN g % 2 = 0 THEN 'keep' ELSE 'drop' END, 'b' || g
        FROM generate_series(1, 40) g;
"#;

/// What the target must hold of each table: (source query, target query).
const VIEWS: &[(&str, &str)] = &[
    (
        "SELECT id, code, total, doc FROM orders WHERE id > 100",
        "SELECT id, code, total, doc FROM orders",
    ),
    (
        r#"SELECT "Item Id", "Qty" FROM "Order Items" WHERE "Item Id" % 3 <> 0"#,
        r#"SELECT "Item Id", "Qty" FROM "Order Items""#,
    ),
    (
        "SELECT id, kind, body FROM events WHERE kind = 'keep'",
        "SELECT id, kind, body FROM events",
    ),
];

fn selection_args(cmd: &mut std::process::Command) {
    cmd.args([
        "--columns",
        "orders (id, code, total, doc)",
        "--columns",
        r#"public."Order Items" ("Item Id", "Qty")"#,
        "--row-filter",
        "orders WHERE id > 100",
        "--row-filter",
        r#""Order Items" WHERE "Item Id" % 3 <> 0"#,
        "--row-filter",
        "events WHERE kind = 'keep'",
    ]);
}

async fn fingerprint(client: &Client, query: &str) -> Result<(i64, String), String> {
    client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(t::text, E'\\n' ORDER BY t::text)), '') FROM ({query}) t"
            ),
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .map_err(|e| e.to_string())
}

/// Whether the target holds exactly the selected columns of the selected rows.
async fn selected_equal(src: &Client, tgt: &Client) -> bool {
    for (on_source, on_target) in VIEWS {
        let s = fingerprint(src, on_source).await;
        if s.is_err() || s != fingerprint(tgt, on_target).await {
            return false;
        }
    }
    true
}

async fn wait_selected_equal(child: &mut RunChild, src: &Client, tgt: &Client) {
    wait_while_running(
        "the selected columns and rows to converge",
        Duration::from_secs(120),
        child,
        || selected_equal(src, tgt),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_list_and_a_row_filter_are_copied_streamed_and_verified() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(SCHEMA).await.unwrap();

    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--jobs", "2"]);
    selection_args(&mut cmd);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "bootstrap: {out}{err}");
    assert!(
        selected_equal(&src, &tgt).await,
        "the bootstrap did not copy exactly the selected columns and rows"
    );
    // The target tables have only the listed columns, and the indexes on them.
    let columns: Vec<String> = tgt
        .query(
            "SELECT table_name || '.' || column_name FROM information_schema.columns \
             WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        columns,
        [
            "Order Items.Item Id",
            "Order Items.Qty",
            "events.body",
            "events.id",
            "events.kind",
            "orders.code",
            "orders.doc",
            "orders.id",
            "orders.total"
        ],
    );
    let code_unique: i64 = tgt
        .query_one(
            "SELECT count(*) FROM pg_indexes WHERE tablename = 'orders' AND indexdef LIKE '%UNIQUE%(code)%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(code_unique, 1, "the listed UNIQUE column lost its index");
    // The publication carries the lists and filters.
    let published: Vec<String> = src
        .query(
            "SELECT tablename || ' ' || coalesce(array_to_string(attnames, ','), '*') || ' ' || coalesce(rowfilter, '') \
             FROM pg_publication_tables WHERE pubname = 'walshuttle' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        published,
        [
            "Order Items Item Id,Qty ((\"Item Id\" % 3) <> 0)",
            "events id,kind,body (kind = 'keep'::text)",
            "orders id,code,total,doc (id > 100)",
        ]
    );

    // Writes while nothing streams, then while `run` streams: UPDATEs moving rows
    // into and out of each filter, an UPDATE of a column left out, deletes.
    src.batch_execute(
        r#"UPDATE orders SET id = 1000 WHERE id = 10;             -- into the filter
           UPDATE orders SET id = -7, code = 'moved' WHERE id = 150; -- out of it
           UPDATE orders SET secret = 'changed', note = 'x' WHERE id = 120;
           DELETE FROM orders WHERE id IN (130, 20);
           INSERT INTO orders VALUES (2000, 'new', 1, 'snew', 'n'), (50000, 'n2', 2, NULL, NULL);
           UPDATE "Order Items" SET "Comment" = 'left out' WHERE "Item Id" = 4;
           UPDATE "Order Items" SET "Item Id" = 301 WHERE "Item Id" = 3;
           UPDATE "Order Items" SET "Qty" = 100 WHERE "Item Id" = 5;"#,
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    wait_streaming(&mut child, &src).await;
    src.batch_execute(
        r#"UPDATE events SET kind = 'drop' WHERE id = 2;           -- out: a DELETE
           UPDATE events SET kind = 'keep', body = 'in' WHERE id = 3; -- in: an INSERT
           UPDATE events SET body = 'still out' WHERE id = 5;
           UPDATE events SET body = 'still in' WHERE id = 6;
           DELETE FROM events WHERE id IN (8, 9);
           UPDATE orders SET id = 3000 WHERE id = 11;
           UPDATE orders SET id = 3013 WHERE id = 13;             -- in, TOASTed doc unchanged
           UPDATE orders SET id = -8 WHERE id = 160;
           UPDATE orders SET total = total + 1 WHERE id BETWEEN 170 AND 180;
           DELETE FROM "Order Items" WHERE "Item Id" IN (6, 7);"#,
    )
    .await
    .unwrap();
    wait_selected_equal(&mut child, &src, &tgt).await;

    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "verify: {out}{err}");

    // They are fixed for the pipeline's life: other ones are refused, the same
    // ones (as a config file repeats them) are not.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--row-filter", "orders WHERE id > 5"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("fixed for its life"), "{err}");
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("bootstrap");
    selection_args(&mut cmd);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "{out}{err}");

    let mut cmd = walshuttle(&source, &target);
    cmd.arg("status");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            r#"columns/rows     public."Order Items" ("Item Id", "Qty") WHERE (("Item Id" % 3) <> 0)"#
        ),
        "{out}"
    );
    assert!(
        out.contains(
            r#"columns/rows     public.orders ("id", "code", "total", "doc") WHERE (id > 100)"#
        ),
        "{out}"
    );

    child.sigterm();
    assert!(
        child.wait_exit(Duration::from_secs(60)).await.is_some(),
        "run did not stop on SIGTERM"
    );
    // A target row outside the filter is a difference, and so is a changed value
    // of a listed column; a change of a column left out on the source is not.
    tgt.batch_execute("INSERT INTO orders VALUES (3, 'c3', 4.5)")
        .await
        .unwrap();
    src.batch_execute("UPDATE orders SET note = 'unseen' WHERE id = 200")
        .await
        .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, out, err) = run(cmd);
    assert_eq!(
        code, 1,
        "verify must see the row outside the filter: {out}{err}"
    );
    assert!(out.contains("orders"), "{out}");
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["verify", "--repair"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "verify --repair: {out}{err}");
    assert!(
        selected_equal(&src, &tgt).await,
        "the repair did not restore exactly the selected rows"
    );
    tgt.batch_execute(r#"UPDATE "Order Items" SET "Qty" = -1 WHERE "Item Id" = 10"#)
        .await
        .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 1, "verify must see the changed value: {out}{err}");

    // The slot is lost; writes go on. catch-up repairs the gap (and the changed
    // value) with the same lists and filters, and keeps them in the publication.
    src.batch_execute("SELECT pg_drop_replication_slot('walshuttle')")
        .await
        .unwrap();
    src.batch_execute(
        r#"UPDATE orders SET id = -9 WHERE id = 190;
           UPDATE orders SET id = 4000 WHERE id = 12;
           UPDATE events SET kind = 'drop' WHERE id = 4;
           INSERT INTO "Order Items" VALUES (1000, 1, 'new'), (1002, 2, 'new');"#,
    )
    .await
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("catch-up");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "catch-up: {out}{err}");
    assert!(
        selected_equal(&src, &tgt).await,
        "catch-up did not restore exactly the selected columns and rows"
    );
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "verify after catch-up: {out}{err}");
    let filters: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'walshuttle' AND rowfilter IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        filters, 3,
        "catch-up dropped the row filters from the publication"
    );
}

/// Whether the target has walshuttle state, or the source a slot or publication.
async fn anything_written(src: &Client, tgt: &Client) -> String {
    let state: i64 = tgt
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'walshuttle'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let slots: i64 = src
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    let pubs: i64 = src
        .query_one("SELECT count(*) FROM pg_publication", &[])
        .await
        .unwrap()
        .get(0);
    let tables: i64 = tgt
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    match (state, slots, pubs, tables) {
        (0, 0, 0, 0) => String::new(),
        _ => format!("state {state}, slots {slots}, publications {pubs}, target tables {tables}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_filters_the_source_would_refuse_updates_for_are_refused_up_front() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(SCHEMA).await.unwrap();
    for (flag, value, says) in [
        // A filter on a column outside the replica identity: PostgreSQL would
        // refuse every UPDATE and DELETE of orders.
        ("--row-filter", "orders WHERE total > 0", "replica identity"),
        // A column list without the replica identity.
        ("--columns", "orders (code, total)", "replica identity"),
        // With REPLICA IDENTITY FULL the list must hold every column.
        ("--columns", "events (id, kind)", "replica identity"),
        ("--columns", "orders (id, nope)", "no such column"),
        ("--row-filter", "orders WHERE id > random()", "refuses"),
        ("--row-filter", "missing WHERE id > 1", "does not replicate"),
    ] {
        let mut cmd = walshuttle(&source, &target);
        cmd.args(["bootstrap", flag, value]);
        let (code, out, err) = run(cmd);
        assert_ne!(code, 0, "{flag} {value} was accepted: {out}{err}");
        assert!(err.contains(says), "{flag} {value}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
        assert_eq!(anything_written(&src, &tgt).await, "", "{flag} {value}");
    }
    // Not with --online (yet): refused before anything is written.
    let mut cmd = walshuttle(&source, &target);
    cmd.args([
        "bootstrap",
        "--online",
        "--row-filter",
        "orders WHERE id > 1",
    ]);
    let (code, out, err) = run(cmd);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("--online"), "{err}");
    assert_eq!(anything_written(&src, &tgt).await, "", "--online");
    // Nor column lists with --capture-ddl.
    let mut cmd = walshuttle(&source, &target);
    cmd.args([
        "bootstrap",
        "--capture-ddl",
        "--columns",
        "orders (id, code)",
    ]);
    let (code, out, err) = run(cmd);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("--capture-ddl"), "{err}");
    assert_eq!(anything_written(&src, &tgt).await, "", "--capture-ddl");
    // The source still takes UPDATEs and DELETEs of every table.
    src.batch_execute("UPDATE orders SET total = 0 WHERE id = 1; DELETE FROM events WHERE id = 1;")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_older_than_15_is_refused_naming_the_version() {
    let source = Cluster::start_version(14);
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(SCHEMA).await.unwrap();
    // Given by the config file this time.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("walshuttle.toml");
    std::fs::write(
        &config,
        "row_filter = [\"orders WHERE id > 100\"]\ncolumns = [\"orders (id, code)\"]\n",
    )
    .unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["--config", config.to_str().unwrap(), "config", "check"]);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("row_filter") && l.contains("orders WHERE id > 100")),
        "{out}"
    );
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["--config", config.to_str().unwrap(), "bootstrap"]);
    let (code, out, err) = run(cmd);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("PostgreSQL 15 or later"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert_eq!(anything_written(&src, &tgt).await, "");
}

/// `tables add` takes a column list and a row filter for the table it adds, while
/// `run` streams the others; a resync copies only what is selected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_add_takes_a_column_list_and_a_row_filter() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(SCHEMA).await.unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--tables", "events"]);
    let mut child = logs.spawn(cmd);
    wait_streaming(&mut child, &src).await;

    let tables = |args: &[&str]| {
        let mut cmd = walshuttle(&source, &target);
        cmd.arg("tables").args(args);
        tokio::task::spawn_blocking(move || run(cmd))
    };
    // The source would refuse UPDATEs with this filter: refused, nothing added.
    let (code, out, err) = tables(&["add", "orders", "--row-filter", "orders WHERE total > 1"])
        .await
        .unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("replica identity"), "{err}");
    let (code, out, err) = tables(&[
        "add",
        "orders",
        "--columns",
        "orders (id, code, total, doc)",
        "--row-filter",
        "orders WHERE id > 100",
    ])
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    src.batch_execute(
        "UPDATE orders SET id = 5000 WHERE id = 1;
         UPDATE orders SET id = -1 WHERE id = 101;
         UPDATE orders SET note = 'left out', total = 9 WHERE id = 102;",
    )
    .await
    .unwrap();
    let orders = VIEWS[0];
    let equal = || async {
        fingerprint(&src, orders.0).await.ok() == fingerprint(&tgt, orders.1).await.ok()
    };
    wait_while_running(
        "orders to converge",
        Duration::from_secs(120),
        &mut child,
        equal,
    )
    .await;
    let (code, out, err) = tables(&["resync", "orders"]).await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(equal().await, "the resync copied other rows or columns");
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "verify: {out}{err}");
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("status");
    let (_, out, _) = run(cmd);
    assert!(
        out.contains(
            r#"columns/rows     public.orders ("id", "code", "total", "doc") WHERE (id > 100)"#
        ),
        "{out}"
    );
    // The target is not a whole copy: no switchover to it.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["switchover", "--dry-run", "--json"]);
    let (code, out, err) = tokio::task::spawn_blocking(move || run(cmd)).await.unwrap();
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("not a whole copy"), "{out}{err}");
}

/// A listed column renamed on the source is followed: the stream renames it on
/// the target, and verify reads the list as the publication holds it now
/// (PostgreSQL keeps it by attribute number), not by the names given at creation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_column_renamed_on_the_source_is_followed() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(SCHEMA).await.unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args([
        "run",
        "--tables",
        "orders",
        "--columns",
        "orders (id, code, total)",
        "--row-filter",
        "orders WHERE id > 100",
    ]);
    let mut child = logs.spawn(cmd);
    wait_streaming(&mut child, &src).await;
    src.batch_execute("UPDATE orders SET total = 7 WHERE id = 150")
        .await
        .unwrap();
    let view = |col: &'static str| {
        (
            format!("SELECT id, code, {col} FROM orders WHERE id > 100"),
            format!("SELECT id, code, {col} FROM orders"),
        )
    };
    let (s, t) = view("total");
    wait_while_running(
        "the update",
        Duration::from_secs(120),
        &mut child,
        || async { fingerprint(&src, &s).await.ok() == fingerprint(&tgt, &t).await.ok() },
    )
    .await;
    src.batch_execute(
        "ALTER TABLE orders RENAME COLUMN total TO amount;
         UPDATE orders SET amount = 8 WHERE id IN (150, 5);
         UPDATE orders SET id = 7000 WHERE id = 6;",
    )
    .await
    .unwrap();
    let (s, t) = view("amount");
    wait_while_running(
        "the rename",
        Duration::from_secs(120),
        &mut child,
        || async { fingerprint(&src, &s).await.ok() == fingerprint(&tgt, &t).await.ok() },
    )
    .await;
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "verify after the rename: {out}{err}");
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("status");
    let (_, out, _) = run(cmd);
    assert!(
        out.contains(r#"columns/rows     public.orders ("id", "code", "amount") WHERE (id > 100)"#),
        "{out}"
    );
}

/// `catch-up` on a target without a pipeline (the Python script's sync mode)
/// begins one with the flags' column lists and row filters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_without_a_pipeline_takes_the_lists_and_filters() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(SCHEMA).await.unwrap();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["catch-up", "--tables", "orders,events,\"Order Items\""]);
    selection_args(&mut cmd);
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "catch-up: {out}{err}");
    assert!(
        selected_equal(&src, &tgt).await,
        "catch-up did not copy exactly the selected columns and rows"
    );
    let filters: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'walshuttle' AND rowfilter IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(filters, 3, "the publication lacks the row filters");
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("verify");
    let (code, out, err) = run(cmd);
    assert_eq!(code, 0, "verify: {out}{err}");
}
