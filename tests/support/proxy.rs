//! A small TCP proxy for network-fault tests: walshuttle connects to the proxy, the
//! proxy forwards to a test cluster, and the test cuts, stalls or slows the traffic.
//!
//! The proxy runs on its own single-threaded tokio runtime in a thread of its own,
//! so it keeps forwarding while the test blocks (e.g. in `Cluster::restart`), and it
//! stops (closing every connection) when dropped.
//!
//! - [`Proxy::cut`] resets every current connection (both directions), as a broken
//!   network path or a restarted middlebox would; new connections go through.
//! - [`Proxy::set_stalled`] stops forwarding bytes in both directions while keeping
//!   the sockets open (a black hole: nothing is lost, nothing arrives); connections
//!   accepted while stalled are held open but silent (the upstream connection is made
//!   only when the stall ends).
//! - [`Proxy::stall_current`] black-holes only the connections open now, for good,
//!   while new connections flow (a NAT or firewall that forgot a flow).
//! - [`Proxy::set_delay`] adds latency to every chunk forwarded.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::PASSWORD;

struct Control {
    upstream_port: u16,
    /// Stalled: nothing is forwarded.
    stalled: watch::Sender<bool>,
    /// Bumped by `cut`: every connection from an earlier generation is reset.
    cut_generation: watch::Sender<u64>,
    /// Bumped by `stall_current`: every connection from an earlier generation is
    /// silent for good.
    blackhole_generation: watch::Sender<u64>,
    /// Delay per chunk, microseconds.
    delay_us: AtomicU64,
    /// Connections open now (accepted and not yet closed).
    open: AtomicUsize,
    /// Connections accepted so far.
    accepted: AtomicU64,
}

/// A running proxy in front of one server port.
pub struct Proxy {
    /// The port the proxy listens on (127.0.0.1).
    pub port: u16,
    control: Arc<Control>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Listens on 127.0.0.1:0 and forwards every connection to 127.0.0.1:`upstream_port`.
    pub fn start(upstream_port: u16) -> Proxy {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("test-proxy")
            .enable_all()
            .build()
            .expect("build the proxy runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy port");
        listener
            .set_nonblocking(true)
            .expect("make the proxy listener non-blocking");
        let port = listener.local_addr().expect("proxy local addr").port();
        let control = Arc::new(Control {
            upstream_port,
            stalled: watch::channel(false).0,
            cut_generation: watch::channel(0).0,
            blackhole_generation: watch::channel(0).0,
            delay_us: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
        });
        let ctl = control.clone();
        runtime.spawn(async move {
            let listener = TcpListener::from_std(listener).expect("register the proxy listener");
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = client.set_nodelay(true);
                ctl.accepted.fetch_add(1, Ordering::Relaxed);
                let ctl = ctl.clone();
                tokio::spawn(async move {
                    ctl.open.fetch_add(1, Ordering::Relaxed);
                    handle(client, &ctl).await;
                    ctl.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Proxy {
            port,
            control,
            runtime: Some(runtime),
        }
    }

    /// URL of the `postgres` database as the superuser, through the proxy.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// URL of a database through the proxy.
    pub fn url_for(&self, db: &str) -> String {
        format!(
            "postgresql://postgres:{PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// Resets every current connection (both directions). Returns how many there were.
    pub fn cut(&self) -> usize {
        let open = self.control.open.load(Ordering::Relaxed);
        self.control.cut_generation.send_modify(|g| *g += 1);
        open
    }

    /// Stops (true) or resumes (false) forwarding in both directions; sockets stay open.
    pub fn set_stalled(&self, stalled: bool) {
        self.control.stalled.send_replace(stalled);
    }

    /// Silences the connections open now for good (they stay open; nothing passes
    /// either way); later connections are unaffected. Returns how many there were.
    pub fn stall_current(&self) -> usize {
        let open = self.control.open.load(Ordering::Relaxed);
        self.control.blackhole_generation.send_modify(|g| *g += 1);
        open
    }

    /// Latency added before each chunk is forwarded (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        self.control
            .delay_us
            .store(delay.as_micros() as u64, Ordering::Relaxed);
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.control.open.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.control.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Drops every task, and with them every socket.
            rt.shutdown_background();
        }
    }
}

/// Waits until `rx`'s value differs from `from` (forever if the sender is gone).
async fn changed_from(mut rx: watch::Receiver<u64>, from: u64) {
    if rx.wait_for(|g| *g != from).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits until the proxy is not stalled.
async fn unstalled(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|s| !*s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn handle(mut client: TcpStream, ctl: &Control) {
    let cut_gen = *ctl.cut_generation.borrow();
    let hole_gen = *ctl.blackhole_generation.borrow();
    let cut = changed_from(ctl.cut_generation.subscribe(), cut_gen);
    tokio::pin!(cut);
    // Accepted while stalled: held open and silent until the stall ends.
    let mut stalled = ctl.stalled.subscribe();
    tokio::select! {
        _ = unstalled(&mut stalled) => {}
        _ = &mut cut => {
            let _ = client.set_zero_linger();
            return;
        }
    }
    let mut upstream = match TcpStream::connect(("127.0.0.1", ctl.upstream_port)).await {
        Ok(s) => s,
        // The server is down: the client sees its connection closed.
        Err(_) => return,
    };
    let _ = upstream.set_nodelay(true);
    let reset = {
        let (mut cr, mut cw) = client.split();
        let (mut ur, mut uw) = upstream.split();
        let hole = changed_from(ctl.blackhole_generation.subscribe(), hole_gen);
        tokio::pin!(hole);
        let to_server = pump(&mut cr, &mut uw, ctl);
        let to_client = pump(&mut ur, &mut cw, ctl);
        tokio::pin!(to_server);
        tokio::pin!(to_client);
        let mut holed = false;
        loop {
            tokio::select! {
                _ = &mut to_server, if !holed => break false,
                _ = &mut to_client, if !holed => break false,
                _ = &mut hole, if !holed => holed = true,
                _ = &mut cut => break true,
            }
        }
    };
    if reset {
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
}

/// Copies one direction chunk by chunk, honouring stalls and delays, until EOF or
/// an error (then the whole connection ends).
async fn pump<R, W>(from: &mut R, to: &mut W, ctl: &Control)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut stalled = ctl.stalled.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        unstalled(&mut stalled).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let delay = ctl.delay_us.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_micros(delay)).await;
        }
        unstalled(&mut stalled).await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
