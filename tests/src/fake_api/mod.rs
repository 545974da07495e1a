//! A fake Kubernetes API server, in memory, speaking enough of the real protocol over
//! plain HTTP for an unmodified kube-rs client and `kubectl`: discovery; create, get,
//! replace, merge patch and delete of Services, Endpoints, EndpointSlices, Nodes and
//! Namespaces (an object with finalizers is marked with a deletionTimestamp and goes when
//! its last finalizer is removed); lists with `resourceVersion`/`resourceVersionMatch`, `limit`/`continue`
//! and label and field selectors; watches with bookmarks; `kind: Status` errors.
//! Faults on demand through [`Faults`] (in process) or `/fake/...` (the binary):
//! `GET /fake/resourceVersion`, `GET /fake/watches` (how many are open),
//! `POST /fake/compact[?resourceVersion=N]`, `POST /fake/drop-watches` (abort every watch
//! connection mid-stream), `POST /fake/expire-watches` (end every watch with an ERROR 410),
//! `POST /fake/delay?ms=N` (every API answer), `POST /fake/outage?seconds=N` (connections
//! closed and refused, state kept).
//!
//! Approximations, each where the real server's behaviour does not matter to a client
//! of Services and EndpointSlices:
//! - a strategic merge patch is applied as a JSON merge patch (lists are replaced whole,
//!   not merged by their patch merge key); JSON patch and server-side apply get 415;
//! - no OpenAPI documents (`/openapi/v2`, `/openapi/v3` are 404): run kubectl with
//!   `--validate=false`;
//! - objects in a namespace that does not exist are accepted, and deleting a namespace
//!   deletes only the Namespace object (no finalizers, no cascade);
//! - defaulting covers what readers of Services rely on (type, port protocols and
//!   targetPorts, ClusterIP and NodePort allocation) and little else; no other validation;
//! - a read at a resourceVersion the server has not reached fails at once with the real
//!   server's 504 instead of waiting up to 3 s for it;
//! - bookmarks come every [`Config::bookmark_interval`] (the real server: about a minute).

mod http;
pub mod selector;
pub mod store;
mod stream;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use store::{ApiError, Store};

/// Settings of a fake API server.
#[derive(Debug, Clone)]
pub struct Config {
    /// How often an idle watch that asked for bookmarks gets one.
    pub bookmark_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config { bookmark_interval: Duration::from_secs(5) }
    }
}

/// One API request as the server received it.
#[derive(Debug, Clone)]
pub struct Request {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub query: String,
}

/// Requests kept in the log; later ones are not recorded.
const MAX_RECORDED: usize = 100_000;

/// Binds a listener again after an outage (in the right network namespace).
pub type Rebind = Arc<dyn Fn() -> io::Result<std::net::TcpListener> + Send + Sync>;

/// State shared by the connections, the watches and the fault handle.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// Bumped after every write: wakes the watches to look at the history.
    changes: watch::Sender<u64>,
    drop_watches: watch::Sender<u64>,
    expire_watches: watch::Sender<u64>,
    /// Until when connections are refused.
    outage: watch::Sender<Option<Instant>>,
    /// How many listening sockets are open (none during an outage).
    listening: watch::Sender<usize>,
    delay_ms: AtomicU64,
    open_watches: AtomicUsize,
    /// Lists answered (a client relisting shows here).
    lists_served: AtomicU64,
    /// The API requests received (not `/fake`), oldest first, up to [`MAX_RECORDED`].
    requests: Mutex<Vec<Request>>,
    /// A duplicate of every open connection's socket, to shut them down on an outage.
    connections: Mutex<HashMap<u64, socket2::Socket>>,
    next_connection: AtomicU64,
    bookmark_interval: Duration,
    first_address: Mutex<Option<SocketAddr>>,
}

impl Shared {
    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    fn record(&self, method: &str, uri: &axum::http::Uri) {
        let mut requests = self.requests.lock().unwrap();
        if requests.len() < MAX_RECORDED {
            requests.push(Request {
                at: Instant::now(),
                method: method.to_string(),
                path: uri.path().to_string(),
                query: uri.query().unwrap_or("").to_string(),
            });
        }
    }

    fn address_text(&self) -> String {
        self.first_address.lock().unwrap().map(|a| a.to_string()).unwrap_or_default()
    }

    fn kill_connections(&self) {
        for socket in self.connections.lock().unwrap().values() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Fault injection and introspection of a running server.
#[derive(Clone)]
pub struct Faults {
    shared: Arc<Shared>,
}

impl Faults {
    /// The current resourceVersion (etcd's revision: one counter over all resources).
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().resource_version()
    }

    /// Forgets all history: a watch or exact list at any older resourceVersion gets 410.
    pub fn compact(&self) -> u64 {
        self.compact_to(u64::MAX)
    }

    /// Forgets history up to `rv` (capped at the current one); returns the compacted RV.
    pub fn compact_to(&self, rv: u64) -> u64 {
        let compacted = self.shared.store.lock().unwrap().compact(rv);
        // Watches behind the compaction learn it now (an ERROR 410 event), as etcd's do.
        self.shared.changed();
        compacted
    }

    /// Aborts every open watch connection mid-stream; returns how many were open.
    pub fn drop_watches(&self) -> usize {
        let open = self.open_watches();
        self.shared.drop_watches.send_modify(|n| *n += 1);
        open
    }

    /// Ends every open watch with an ERROR event of 410 Expired (what a watch that fell
    /// behind the kept history gets); returns how many were open.
    pub fn expire_watches(&self) -> usize {
        let open = self.open_watches();
        self.shared.expire_watches.send_modify(|n| *n += 1);
        open
    }

    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::Relaxed)
    }

    /// The API requests received so far (what a client asked, and when).
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// How many list requests have been answered with a list.
    pub fn lists_served(&self) -> u64 {
        self.shared.lists_served.load(Ordering::Relaxed)
    }

    /// Delays every API answer (not the `/fake` ones) by this much; zero to stop.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_ms.store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// An outage: every open connection is closed and new ones are refused (the
    /// listening sockets are closed) for `duration`; the objects are kept. Returns once
    /// the listening sockets are closed.
    pub async fn outage(&self, duration: Duration) {
        self.shared.outage.send_replace(Some(Instant::now() + duration));
        self.shared.drop_watches.send_modify(|n| *n += 1);
        self.shared.kill_connections();
        let mut listening = self.shared.listening.subscribe();
        let _ = listening.wait_for(|open| *open == 0).await;
    }

    /// Direct access to the objects, for checks that should not go through HTTP.
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let result = f(&mut self.shared.store.lock().unwrap());
        self.shared.changed();
        result
    }
}

/// A connection whose socket the server can shut down from outside (an outage).
struct TrackedStream {
    stream: TcpStream,
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for TrackedStream {
    fn drop(&mut self) {
        self.shared.connections.lock().unwrap().remove(&self.id);
    }
}

impl AsyncRead for TrackedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts connections, closing the listening socket during an outage (so connecting is
/// refused) and binding it again afterwards.
struct FaultListener {
    listener: Option<TcpListener>,
    rebind: Rebind,
    address: SocketAddr,
    outage: watch::Receiver<Option<Instant>>,
    shared: Arc<Shared>,
}

impl FaultListener {
    fn track(&self, stream: TcpStream) -> io::Result<TrackedStream> {
        // As the API server's (Go sets it on every connection): without it, a watch event
        // written in pieces can wait for the client's delayed ACK, 40 ms.
        stream.set_nodelay(true)?;
        let duplicate = socket2::SockRef::from(&stream).try_clone()?;
        let id = self.shared.next_connection.fetch_add(1, Ordering::Relaxed);
        self.shared.connections.lock().unwrap().insert(id, duplicate);
        Ok(TrackedStream { stream, id, shared: self.shared.clone() })
    }
}

impl axum::serve::Listener for FaultListener {
    type Io = TrackedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TrackedStream, SocketAddr) {
        loop {
            let until = *self.outage.borrow_and_update();
            if let Some(until) = until.filter(|u| *u > Instant::now()) {
                if self.listener.take().is_some() {
                    self.shared.listening.send_modify(|n| *n -= 1);
                }
                tokio::select! {
                    () = tokio::time::sleep_until(until.into()) => {}
                    _ = self.outage.changed() => {}
                }
                continue;
            }
            let Some(listener) = &self.listener else {
                match (self.rebind)().and_then(|l| {
                    l.set_nonblocking(true)?;
                    TcpListener::from_std(l)
                }) {
                    Ok(listener) => {
                        self.listener = Some(listener);
                        self.shared.listening.send_modify(|n| *n += 1);
                    }
                    // The address may still be held for a moment after the outage.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
                continue;
            };
            tokio::select! {
                accepted = listener.accept() => match accepted.and_then(|(stream, peer)| Ok((self.track(stream)?, peer))) {
                    Ok(connection) => return connection,
                    // Out of file descriptors or a connection reset before accept: retry.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
                _ = self.outage.changed() => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.address)
    }
}

/// A running fake API server; stops (closing every connection) on drop.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addresses: Vec<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl FakeApiServer {
    /// Serves on `address` (port 0 picks one; see [`FakeApiServer::address`]).
    pub fn bind(address: SocketAddr, config: Config) -> io::Result<Self> {
        let listener = std::net::TcpListener::bind(address)?;
        let bound = listener.local_addr()?;
        let mut server = FakeApiServer::new(config);
        server.serve(listener, Arc::new(move || std::net::TcpListener::bind(bound)))?;
        Ok(server)
    }

    /// A server with no listener yet: add them with [`FakeApiServer::serve`].
    pub fn new(config: Config) -> Self {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new()),
            changes: watch::channel(0).0,
            drop_watches: watch::channel(0).0,
            expire_watches: watch::channel(0).0,
            outage: watch::channel(None).0,
            listening: watch::channel(0).0,
            delay_ms: AtomicU64::new(0),
            open_watches: AtomicUsize::new(0),
            lists_served: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
            connections: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(0),
            bookmark_interval: config.bookmark_interval,
            first_address: Mutex::new(None),
        });
        FakeApiServer { shared, addresses: Vec::new(), tasks: Vec::new() }
    }

    /// Serves the same state on one more listener (e.g. one bound inside a lab's network
    /// namespace, with `rebind` binding it there again after an outage). Must be called
    /// inside a tokio runtime.
    pub fn serve(&mut self, listener: std::net::TcpListener, rebind: Rebind) -> io::Result<SocketAddr> {
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        self.shared.first_address.lock().unwrap().get_or_insert(address);
        self.shared.listening.send_modify(|n| *n += 1);
        let fault_listener = FaultListener {
            listener: Some(TcpListener::from_std(listener)?),
            rebind,
            address,
            outage: self.shared.outage.subscribe(),
            shared: self.shared.clone(),
        };
        let router = axum::Router::new().fallback(http::handle).with_state(self.shared.clone());
        self.tasks.push(tokio::spawn(async move {
            let _ = axum::serve(fault_listener, router).await;
        }));
        self.addresses.push(address);
        Ok(address)
    }

    /// The first listener's address.
    pub fn address(&self) -> SocketAddr {
        self.addresses[0]
    }

    /// `http://ADDRESS` of the first listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.address())
    }

    pub fn faults(&self) -> Faults {
        Faults { shared: self.shared.clone() }
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        self.shared.drop_watches.send_modify(|n| *n += 1);
        self.shared.kill_connections();
    }
}

/// A kube-rs client for a server at `url` (plain HTTP, no credentials).
pub fn kube_client(url: &str) -> kube::Client {
    let config = kube::Config::new(url.parse().expect("a server URL"));
    kube::Client::try_from(config).expect("a kube client for the fake API server")
}

/// A kubeconfig for kubectl pointing at `url`.
pub fn kubeconfig(url: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {url}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
         current-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
    )
}
