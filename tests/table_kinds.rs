//! Table kinds beyond plain tables: partitioned tables replicate as their leaf
//! partitions; unlogged tables, which logical replication cannot carry, are left out
//! by default and refused by name; extension types bring their extension along.

mod support;

use std::time::Duration;

use support::{run, wait_for_convergence_running, walshuttle, Cluster, RunLogs};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_replicate_and_unlogged_tables_are_left_out() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE TABLE events (id bigint, day date, v text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
         CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         INSERT INTO events SELECT g, date '2024-06-01' + (g % 400), 'e' || g FROM generate_series(1, 5000) g;
         CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
         INSERT INTO scratch VALUES (1);",
    )
    .await
    .unwrap();

    // Named explicitly, an unlogged table is refused with what to do.
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["bootstrap", "--tables", "scratch"]);
    let (code, _, stderr) = run(cmd);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("unlogged") && stderr.contains("SET LOGGED"),
        "{stderr}"
    );

    // Named by its parent, a partitioned table means its partitions.
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.args(["run", "--tables", "events"]);
    let mut child = logs.spawn(cmd);
    let tables = ["public.events_2024", "public.events_2025"];
    wait_for_convergence_running(&mut child, &src, &tgt, &tables, Duration::from_secs(60)).await;
    src.batch_execute(
        "INSERT INTO events VALUES (9001, '2025-03-01', 'new'); UPDATE events SET v = 'changed' WHERE id = 10;
         DELETE FROM events WHERE id = 11;",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &tables, Duration::from_secs(60)).await;
    let scratch: i64 = tgt
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = 'scratch'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(scratch, 0, "the unlogged table was created on the target");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extension_types_bring_their_extension_to_the_target() {
    let source = Cluster::start();
    let target = Cluster::start();
    let src = source.client().await;
    let tgt = target.client().await;
    src.batch_execute(
        "CREATE EXTENSION citext;
         CREATE TABLE people (id int PRIMARY KEY, email citext NOT NULL, aliases citext[]);
         INSERT INTO people VALUES (1, 'Ann@Example.com', ARRAY['A@x.org', NULL]), (2, 'bob@example.com', NULL);",
    )
    .await
    .unwrap();
    let mut logs = RunLogs::new();
    let mut cmd = walshuttle(&source, &target);
    cmd.arg("run");
    let mut child = logs.spawn(cmd);
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["public.people"],
        Duration::from_secs(60),
    )
    .await;
    src.batch_execute("UPDATE people SET email = 'ANN@example.com' WHERE id = 1; INSERT INTO people VALUES (3, 'c@d.e', '{}')")
        .await
        .unwrap();
    wait_for_convergence_running(
        &mut child,
        &src,
        &tgt,
        &["public.people"],
        Duration::from_secs(60),
    )
    .await;
    // The type is the extension's on the target too: comparisons ignore case.
    let found: i64 = tgt
        .query_one(
            "SELECT count(*) FROM people WHERE email = 'ann@EXAMPLE.com'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, 1);
}
