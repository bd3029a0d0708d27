//! TLS against real clusters with `ssl = on` and certificates from a throwaway CA:
//! `verify-full` for bootstrap and for `run`'s replication connection, a wrong CA
//! refused before anything is written, `require` without a CA, `verify-ca` against a
//! certificate for another host name, and `disable` refused by a `hostssl`-only server.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use support::{
    run, wait_for_convergence_running, wait_while_running, walshuttle, Cluster, ClusterOptions,
    RunLogs, ServerTls, PASSWORD,
};
use tokio_postgres::Client;

/// A throwaway certificate authority.
struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("self-sign the CA");
        TestCa { cert, key }
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this CA.
    fn server(&self, names: &[&str]) -> ServerTls {
        let key = KeyPair::generate().expect("generate server key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "walshuttle test server");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("sign the server certificate");
        ServerTls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes the CA certificate as PEM into `dir`.
    fn write(&self, dir: &Path, file: &str) -> PathBuf {
        let path = dir.join(file);
        std::fs::write(&path, self.cert.pem()).expect("write CA PEM");
        path
    }
}

/// Every TCP connection must use TLS; the harness itself connects over the socket.
fn tls_only_cluster(server: ServerTls) -> Cluster {
    Cluster::start_with(ClusterOptions {
        tls: Some(server),
        hba: vec![
            "hostssl all all 127.0.0.1/32 scram-sha-256".into(),
            "hostssl replication all 127.0.0.1/32 scram-sha-256".into(),
        ],
        ..Default::default()
    })
}

/// `walshuttle` with both URLs through `localhost` and the given query parameters.
fn walshuttle_tls(source: &Cluster, target: &Cluster, query: &str) -> Command {
    let mut cmd = walshuttle(source, target);
    cmd.env(
        "WALSHUTTLE_SOURCE",
        source.url_via("localhost", "postgres", query),
    )
    .env(
        "WALSHUTTLE_TARGET",
        target.url_via("localhost", "postgres", query),
    );
    cmd
}

async fn seed(src: &Client, rows: i32) {
    src.batch_execute(&format!(
        "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, {rows}) g;"
    ))
    .await
    .expect("seed the source");
}

async fn count(client: &Client, sql: &str) -> i64 {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

async fn assert_nothing_written(src: &Client, tgt: &Client) {
    assert_eq!(
        count(src, "SELECT count(*) FROM pg_replication_slots").await,
        0,
        "a slot was created"
    );
    assert_eq!(
        count(src, "SELECT count(*) FROM pg_publication").await,
        0,
        "a publication was created"
    );
    assert_eq!(
        count(
            tgt,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'walshuttle'"
        )
        .await,
        0,
        "the state schema was created"
    );
    assert_eq!(
        count(
            tgt,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'items'"
        )
        .await,
        0,
        "a target table was created"
    );
}

/// Runs a command expected to fail; returns its last stderr line (the error).
fn expect_failure(cmd: Command, needles: &[&str]) -> String {
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(
        code, 1,
        "expected exit 1; stdout: {stdout}\nstderr: {stderr}"
    );
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(
        last.starts_with("error: "),
        "last line is not the error: {stderr}"
    );
    for needle in needles {
        assert!(last.contains(needle), "`{needle}` missing from: {last}");
    }
    assert!(!stderr.contains(PASSWORD), "password leaked: {stderr}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_bootstrap_and_streaming_over_tls() {
    let ca = TestCa::new("walshuttle test CA");
    let certs = tempfile::tempdir().unwrap();
    let ca_path = ca.write(certs.path(), "ca.pem");
    let source = tls_only_cluster(ca.server(&["localhost", "127.0.0.1"]));
    let target = tls_only_cluster(ca.server(&["localhost", "127.0.0.1"]));
    let src = source.local_client_for("postgres").await;
    let tgt = target.local_client_for("postgres").await;
    seed(&src, 500).await;
    let query = format!("sslmode=verify-full&sslrootcert={}", ca_path.display());

    let mut cmd = walshuttle_tls(&source, &target, &query);
    cmd.args(["bootstrap", "--jobs", "2"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(
        code, 0,
        "bootstrap failed:\nstdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(count(&tgt, "SELECT count(*) FROM items").await, 500);
    support::assert_tables_equal(&src, &tgt, &["items"]).await;

    let mut logs = RunLogs::new();
    let mut cmd = walshuttle_tls(&source, &target, &query);
    cmd.args(["run", "--jobs", "2"]);
    let mut child = logs.spawn(cmd);
    // The walsender serving walshuttle runs over TLS (pg_hba allows nothing else,
    // and pg_stat_ssl says so).
    wait_while_running(
        "a TLS replication connection",
        Duration::from_secs(60),
        &mut child,
        || async {
            count(
                &src,
                "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.backend_type = 'walsender' AND s.ssl",
            )
            .await
                > 0
        },
    )
    .await;
    src.batch_execute(
        "INSERT INTO items SELECT g, 'streamed ' || g FROM generate_series(501, 600) g;
         UPDATE items SET name = 'changed' WHERE id <= 10;
         DELETE FROM items WHERE id BETWEEN 11 AND 20;",
    )
    .await
    .unwrap();
    wait_for_convergence_running(&mut child, &src, &tgt, &["items"], Duration::from_secs(60)).await;
    assert_eq!(count(&tgt, "SELECT count(*) FROM items").await, 590);
    child.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_is_refused_before_anything_is_written() {
    let ca = TestCa::new("walshuttle test CA");
    let other = TestCa::new("some other CA");
    let certs = tempfile::tempdir().unwrap();
    let wrong = other.write(certs.path(), "other-ca.pem");
    let source = tls_only_cluster(ca.server(&["localhost", "127.0.0.1"]));
    let target = tls_only_cluster(ca.server(&["localhost", "127.0.0.1"]));
    let src = source.local_client_for("postgres").await;
    let tgt = target.local_client_for("postgres").await;
    seed(&src, 10).await;

    let query = format!("sslmode=verify-full&sslrootcert={}", wrong.display());
    let mut cmd = walshuttle_tls(&source, &target, &query);
    cmd.arg("bootstrap");
    let line = expect_failure(
        cmd,
        &[
            "cannot connect to the",
            "TLS handshake failed",
            "certificate",
            "UnknownIssuer",
            "sslrootcert",
        ],
    );
    eprintln!("{line}");
    assert_nothing_written(&src, &tgt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_without_a_ca_and_verify_ca_ignores_the_host_name() {
    let ca = TestCa::new("walshuttle test CA");
    let certs = tempfile::tempdir().unwrap();
    let ca_path = ca.write(certs.path(), "ca.pem");
    // The certificates name a host that is not the one we connect to.
    let source = tls_only_cluster(ca.server(&["db.example.internal"]));
    let target = tls_only_cluster(ca.server(&["db.example.internal"]));
    let src = source.local_client_for("postgres").await;
    let tgt = target.local_client_for("postgres").await;
    seed(&src, 50).await;

    // verify-full checks the name: refused, nothing written.
    let query = format!("sslmode=verify-full&sslrootcert={}", ca_path.display());
    let mut cmd = walshuttle_tls(&source, &target, &query);
    cmd.arg("bootstrap");
    let line = expect_failure(cmd, &["TLS handshake failed", "localhost", "verify-ca"]);
    eprintln!("{line}");
    assert_nothing_written(&src, &tgt).await;

    // require: TLS without any certificate check (libpq's meaning), no CA needed;
    // HOME points at an empty directory so no ~/.postgresql/root.crt is involved.
    let home = tempfile::tempdir().unwrap();
    let mut cmd = walshuttle_tls(&source, &target, "sslmode=require");
    cmd.env("HOME", home.path())
        .args(["bootstrap", "--jobs", "2"]);
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(
        code, 0,
        "require bootstrap failed:\nstdout: {stdout}\nstderr: {stderr}"
    );
    support::assert_tables_equal(&src, &tgt, &["items"]).await;

    // verify-ca checks the chain only, through an IP address the certificate does
    // not name either: a rerun finds the finished bootstrap and exits 0.
    let mut cmd = walshuttle(&source, &target);
    let query = format!("sslmode=verify-ca&sslrootcert={}", ca_path.display());
    cmd.env(
        "WALSHUTTLE_SOURCE",
        source.url_via("127.0.0.1", "postgres", &query),
    )
    .env(
        "WALSHUTTLE_TARGET",
        target.url_via("127.0.0.1", "postgres", &query),
    )
    .arg("bootstrap");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(
        code, 0,
        "verify-ca rerun failed:\nstdout: {stdout}\nstderr: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_against_a_tls_only_server_and_verify_without_a_ca_are_refused_clearly() {
    let ca = TestCa::new("walshuttle test CA");
    let source = tls_only_cluster(ca.server(&["localhost", "127.0.0.1"]));
    let target = tls_only_cluster(ca.server(&["localhost", "127.0.0.1"]));
    let src = source.local_client_for("postgres").await;
    let tgt = target.local_client_for("postgres").await;
    seed(&src, 10).await;

    let mut cmd = walshuttle_tls(&source, &target, "sslmode=disable");
    cmd.arg("bootstrap");
    let line = expect_failure(cmd, &["no encryption", "only over TLS", "sslmode=require"]);
    eprintln!("{line}");

    // verify-full with neither sslrootcert nor ~/.postgresql/root.crt.
    let home = tempfile::tempdir().unwrap();
    let mut cmd = walshuttle_tls(&source, &target, "sslmode=verify-full");
    cmd.env("HOME", home.path()).arg("bootstrap");
    let line = expect_failure(cmd, &["sslmode=verify-full", "root.crt", "sslrootcert="]);
    eprintln!("{line}");
    assert_nothing_written(&src, &tgt).await;

    // ... but ~/.postgresql/root.crt is used when present, as libpq does.
    let pgdir = home.path().join(".postgresql");
    std::fs::create_dir(&pgdir).unwrap();
    ca.write(&pgdir, "root.crt");
    let mut cmd = walshuttle_tls(&source, &target, "sslmode=verify-full");
    cmd.env("HOME", home.path()).arg("bootstrap");
    let (code, stdout, stderr) = run(cmd);
    assert_eq!(
        code, 0,
        "bootstrap with root.crt failed:\nstdout: {stdout}\nstderr: {stderr}"
    );
    support::assert_tables_equal(&src, &tgt, &["items"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connections_negotiate_tls_per_sslmode() {
    use walshuttle::config::{Endpoint, Side};
    use walshuttle::pg::replication::{ReplicationClient, ReplicationError};

    let ca = TestCa::new("walshuttle test CA");
    let other = TestCa::new("some other CA");
    let certs = tempfile::tempdir().unwrap();
    let ca_path = ca.write(certs.path(), "ca.pem");
    let wrong = other.write(certs.path(), "other-ca.pem");
    let tls = tls_only_cluster(ca.server(&["localhost", "127.0.0.1"]));
    let plain = Cluster::start();
    let endpoint = |cluster: &Cluster, query: &str| {
        Endpoint::parse(
            Side::Source,
            &cluster.url_via("localhost", "postgres", query),
        )
        .expect("parse the URL")
    };

    // verify-full with the right CA: a working replication session over TLS.
    let e = endpoint(
        &tls,
        &format!("sslmode=verify-full&sslrootcert={}", ca_path.display()),
    );
    let mut repl = ReplicationClient::connect(&e, None)
        .await
        .expect("TLS replication connection");
    let rows = repl.simple_query("IDENTIFY_SYSTEM").await.unwrap();
    assert!(rows[0].get("systemid").is_some());
    let src = tls.local_client_for("postgres").await;
    let ssl = count(
        &src,
        &format!(
            "SELECT count(*) FROM pg_stat_ssl WHERE ssl AND pid = {}",
            repl.backend_pid
        ),
    )
    .await;
    assert_eq!(ssl, 1, "the walsender session is not encrypted");
    repl.close().await;

    // The wrong CA: a TLS error naming the certificate problem.
    let e = endpoint(
        &tls,
        &format!("sslmode=verify-full&sslrootcert={}", wrong.display()),
    );
    match ReplicationClient::connect(&e, None).await {
        Err(ReplicationError::Tls(m)) => {
            assert!(
                m.contains("UnknownIssuer") && m.contains("sslrootcert"),
                "{m}"
            )
        }
        Err(other) => panic!("expected a TLS error, got {other}"),
        Ok(_) => panic!("connected with the wrong CA"),
    }

    // require against a server without TLS: refused, on both kinds of connection.
    let e = endpoint(&plain, "sslmode=require");
    match ReplicationClient::connect(&e, None).await {
        Err(ReplicationError::Tls(m)) => assert!(m.contains("does not accept TLS"), "{m}"),
        Err(other) => panic!("expected a TLS error, got {other}"),
        Ok(_) => panic!("require connected without TLS"),
    }
    let err = match walshuttle::pg::connect(&e, "test").await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("require connected without TLS"),
    };
    assert!(err.contains("does not accept TLS"), "{err}");
    assert!(!err.contains(PASSWORD), "{err}");

    // prefer (the default) falls back to plain on both.
    let e = endpoint(&plain, "");
    let mut repl = ReplicationClient::connect(&e, None)
        .await
        .expect("plain replication connection under prefer");
    repl.simple_query("IDENTIFY_SYSTEM").await.unwrap();
    repl.close().await;
    let client = walshuttle::pg::connect(&e, "test")
        .await
        .expect("plain session under prefer");
    let ssl: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!ssl);
}
