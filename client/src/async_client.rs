//! The async client, on tokio: the same core, driven by tasks.
//!
//! - Each connection is a task that owns its socket and its
//!   [`Connection`] state machine. Requests reach it on a bounded channel
//!   (a command carries the request and a oneshot for the answer); it
//!   writes them as they come, reads answers as they arrive and hands each
//!   to its request's oneshot, whatever the order: many tasks' requests
//!   share the connection. It applies the connection's deadlines (a
//!   handshake or a request unanswered too long fails the connection and
//!   every request on it) and ends when it fails or the client is dropped.
//! - Each request runs its [`Operation`] in the caller's task: it sends
//!   attempts through the connection tasks, and waits for their answers
//!   and the operation's next deadline at once, so hedges and failovers
//!   happen on time. A request whose caller stops waiting (its future is
//!   dropped) leaves its answers to be discarded.
//! - The [`Router`] is shared behind a mutex, held only for the core's
//!   synchronous steps, never across an await. A topology refresh runs as
//!   a task of its own, at most one at a time (the router says when).
//!
//! With TLS, the connection task drives a rustls `ClientConnection` between
//! the socket and the core ([`crate::tls`], the same code as the blocking
//! client's) on tokio's readiness API; without, the plain path is as it
//! was.
//!
//! The client is cheap to clone (an `Arc`); clones share connections.

// The shell owns the clock (client/clippy.toml bans it everywhere else).
#![allow(clippy::disallowed_methods)]

use crate::builder::{Config, MAX_IN_FLIGHT_PER_CONNECTION};
use crate::core::conn::{Connection, Event, RequestId};
use crate::core::op::{Action, AttemptId, Kind, Operation, Stats};
use crate::core::route::{Router, RouterConfig};
use crate::error::{Error, Result};
use crate::requests;
use crate::resolve::{resolve_siblings, Resolve, Value};
use crate::siblings::{Context, ReadOptions, Siblings, WriteOptions};
use crate::telemetry;
use crate::tls::TryIo;
use futures_util::stream::{FuturesUnordered, StreamExt};
use ringkv_net::proto::{Reply, Request};
use ringkv_net::Topology;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

/// How much to read from a socket at once.
const READ_CHUNK: usize = 64 * 1024;

/// A node's answer and the ring version it reported.
type Answer = (Result<Reply>, u64);

struct Command {
    request: Request,
    timeout: Duration,
    reply: oneshot::Sender<Answer>,
}

/// The sending side of a connection task.
#[derive(Clone)]
struct Handle {
    tx: mpsc::Sender<Command>,
    /// Requests queued or in flight on it, to pick the least busy.
    load: Arc<AtomicUsize>,
}

struct Inner {
    config: Arc<Config>,
    router: Mutex<Router>,
    pools: Mutex<HashMap<SocketAddr, Vec<Handle>>>,
}

/// An async ringkv client on tokio; see the module doc. Use it inside a
/// tokio runtime (it spawns its connection tasks there); its futures are
/// `Send`, so any task may call it.
///
/// ```no_run
/// use ringkv_client::{AsyncClient, WriteOptions};
///
/// # async fn demo() -> ringkv_client::Result<()> {
/// let client = AsyncClient::builder().seed("127.0.0.1:7070").build_async().await?;
/// // Concurrent requests from many tasks share each connection.
/// let tasks: Vec<_> = (0..100)
///     .map(|i| {
///         let c = client.clone();
///         tokio::spawn(async move { c.put(format!("k{i}"), "v", &WriteOptions::default()).await })
///     })
///     .collect();
/// for t in tasks {
///     t.await.expect("task")?;
/// }
/// let read = client.get("k7").await?;
/// assert_eq!(read.single(), Some(&b"v"[..]));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct AsyncClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AsyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncClient").field("ring_version", &self.ring_version()).finish()
    }
}

impl AsyncClient {
    /// A builder; finish it with [`crate::ClientBuilder::build_async`].
    pub fn builder() -> crate::ClientBuilder {
        crate::ClientBuilder::new()
    }

    pub(crate) async fn connect(config: Config) -> Result<AsyncClient> {
        let router = Router::new(RouterConfig {
            request_timeout: config.request_timeout,
            hedge_reads: config.hedged_reads,
            hedge_percentile: config.hedge_percentile,
            seeds: config.seeds.clone(),
        });
        let inner =
            Arc::new(Inner { config: Arc::new(config), router: Mutex::new(router), pools: Mutex::new(HashMap::new()) });
        inner.refresh().await?;
        Ok(AsyncClient { inner })
    }

    /// The topology requests are routed by.
    pub fn topology(&self) -> Option<Topology> {
        self.inner.router().topology().cloned()
    }

    /// The ring version requests are routed by.
    pub fn ring_version(&self) -> u64 {
        self.inner.router().ring_version()
    }

    /// Fetches the topology now, from any member or seed.
    pub async fn refresh_topology(&self) -> Result<()> {
        self.inner.refresh().await
    }

    /// Reads every sibling of `key`, with the default read quorum.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Siblings> {
        self.get_with(key, &ReadOptions::default()).await
    }

    /// Reads every sibling of `key`.
    pub async fn get_with(&self, key: impl AsRef<[u8]>, opts: &ReadOptions) -> Result<Siblings> {
        let key = key.as_ref();
        let planned = requests::get(&self.inner.config, key, opts);
        self.call("get", key, planned).await.and_then(requests::siblings)
    }

    /// Writes `value` under `key`; returns the new version's context.
    /// Without a context (`WriteOptions::default()`) the value becomes a
    /// sibling of whatever is there.
    pub async fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, opts: &WriteOptions) -> Result<Context> {
        let key = key.as_ref();
        let planned = requests::put(&self.inner.config, key, value.as_ref(), opts);
        self.call("put", key, planned).await.and_then(requests::written)
    }

    /// Deletes `key` (the siblings its context covers).
    pub async fn delete(&self, key: impl AsRef<[u8]>, opts: &WriteOptions) -> Result<()> {
        let key = key.as_ref();
        let planned = requests::delete(&self.inner.config, key, opts);
        self.call("delete", key, planned).await.and_then(requests::deleted)
    }

    /// Reads `key` as a `T`, merging siblings with `resolver`; when there
    /// were several, writes the merge back with the read's context, so the
    /// next read finds one value. `None`: the key has no value. The
    /// write-back is best effort, as [`crate::Client::get_resolved`] says.
    ///
    /// ```no_run
    /// use ringkv_client::{LastWriterWins, Timestamped, WriteOptions};
    /// # async fn demo(client: ringkv_client::AsyncClient) -> ringkv_client::Result<()> {
    /// // Last writer wins, by the writers' clocks: the explicit choice to
    /// // drop concurrent writes.
    /// use ringkv_client::Value;
    /// client.put("status", Timestamped::now("online".to_string()).encode(), &WriteOptions::default()).await?;
    /// let status: Option<Timestamped<String>> = client.get_resolved("status", &LastWriterWins).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get_resolved<T: Value, R: Resolve<T> + ?Sized>(
        &self,
        key: impl AsRef<[u8]>,
        resolver: &R,
    ) -> Result<Option<T>> {
        let key = key.as_ref();
        let r = resolve_siblings(self.get(key).await?, resolver)?;
        if let (true, Some(v)) = (r.needs_write_back, &r.value) {
            if let Err(e) = self.put(key, v.encode(), &WriteOptions::with_context(r.context)).await {
                telemetry::write_back_failed(&e);
            }
        }
        Ok(r.value)
    }

    /// Read, resolve, modify, write: see [`crate::Client::update`].
    pub async fn update<T, R, F>(&self, key: impl AsRef<[u8]>, resolver: &R, change: F) -> Result<T>
    where
        T: Value,
        R: Resolve<T> + ?Sized,
        F: FnOnce(Option<T>) -> T,
    {
        let key = key.as_ref();
        let r = resolve_siblings(self.get(key).await?, resolver)?;
        let new = change(r.value);
        self.put(key, new.encode(), &WriteOptions::with_context(r.context)).await?;
        Ok(new)
    }

    async fn call(&self, op_name: &'static str, key: &[u8], planned: requests::Planned) -> Result<Reply> {
        self.inner.maybe_refresh();
        let span = telemetry::request_span(op_name, key);
        let started = Instant::now();
        let route = self.inner.router().replicas(key, started);
        let op = planned.operation(route, started);
        let (result, stats) = self.inner.run(op).instrument(span.clone()).await;
        telemetry::request_done(op_name, &span, started.elapsed(), stats, &result);
        result
    }
}

impl Inner {
    fn router(&self) -> std::sync::MutexGuard<'_, Router> {
        // A panic while holding the lock (a core assertion) leaves the
        // router as consistent as any step left it; keep serving.
        self.router.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn maybe_refresh(self: &Arc<Self>) {
        if self.router().start_refresh(Instant::now()) {
            let inner = Arc::clone(self);
            // A failed refresh keeps the old topology, which still routes.
            tokio::spawn(async move {
                let _ = inner.refresh().await;
            });
        }
    }

    async fn refresh(&self) -> Result<()> {
        let now = Instant::now();
        let sources = self.router().topology_sources(now);
        let op = Operation::new(Kind::Read, Request::Topology, sources, now, self.config.request_timeout);
        let fetched = self.run(op).await.0.and_then(requests::topology);
        telemetry::topology_refreshed(&fetched.as_ref().map(Topology::version).map_err(Clone::clone));
        match fetched {
            Ok(t) => {
                self.router().set_topology(t, Instant::now());
                Ok(())
            }
            Err(e) => {
                self.router().refresh_failed(Instant::now());
                Err(e)
            }
        }
    }

    /// Runs `op` to its end.
    async fn run(&self, mut op: Operation) -> (Result<Reply>, Stats) {
        let mut answers = FuturesUnordered::new();
        let mut actions = op.start(&mut self.router(), Instant::now());
        loop {
            let mut refused: Vec<(AttemptId, Error)> = Vec::new();
            for action in actions.drain(..) {
                match action {
                    Action::Send { attempt, addr, request, timeout } => {
                        telemetry::attempt_sent(addr, attempt.0);
                        let (reply, rx) = oneshot::channel();
                        match self.dispatch(addr, Command { request, timeout, reply }) {
                            Ok(()) => answers.push(async move { (attempt, rx.await) }),
                            Err(e) => refused.push((attempt, e)),
                        }
                    }
                    // The answer will be ignored: the operation no longer
                    // has the attempt in flight.
                    Action::Abandon { .. } => {}
                    Action::Done(result) => return (result, op.stats()),
                }
            }
            if !refused.is_empty() {
                let mut router = self.router();
                for (attempt, e) in refused {
                    actions.extend(op.on_response(attempt, Err(e), 0, &mut router, Instant::now()));
                }
                continue;
            }
            let wake = op.poll_timeout().expect("an operation not done has a deadline");
            tokio::select! {
                Some((attempt, answer)) = answers.next() => {
                    let (result, ring_version) = answer.unwrap_or_else(|_| {
                        let gone = std::io::Error::other("the connection task ended without an answer");
                        (Err(Error::io(gone)), 0)
                    });
                    actions = op.on_response(attempt, result, ring_version, &mut self.router(), Instant::now());
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    actions = op.on_timeout(&mut self.router(), Instant::now());
                }
            }
        }
    }

    /// Queues `cmd` on a connection to `addr`: the least busy, or a new one
    /// while fewer than `connections_per_shard` are open and all are busy.
    fn dispatch(&self, addr: SocketAddr, cmd: Command) -> Result<()> {
        let handle = {
            let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
            let pool = pools.entry(addr).or_default();
            // A task that ended closed its channel: that connection is gone.
            pool.retain(|h| !h.tx.is_closed());
            let best = pool.iter().min_by_key(|h| h.load.load(Ordering::Relaxed)).cloned();
            let busy = best.as_ref().is_none_or(|h| h.load.load(Ordering::Relaxed) > 0);
            match best {
                Some(h) if !(busy && pool.len() < self.config.connections_per_shard) => h,
                _ => {
                    let h = spawn_connection(addr, Arc::clone(&self.config));
                    pool.push(h.clone());
                    h
                }
            }
        };
        handle.load.fetch_add(1, Ordering::Relaxed);
        handle.tx.try_send(cmd).map_err(|e| {
            handle.load.fetch_sub(1, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => {
                    Error::Overloaded { message: format!("every connection to {addr} is full (client side)") }
                }
                mpsc::error::TrySendError::Closed(_) => {
                    Error::io(std::io::Error::new(std::io::ErrorKind::NotConnected, "the connection just closed"))
                }
            }
        })
    }
}

fn spawn_connection(addr: SocketAddr, config: Arc<Config>) -> Handle {
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT_PER_CONNECTION);
    let load = Arc::new(AtomicUsize::new(0));
    tokio::spawn(connection_task(addr, config, rx, Arc::clone(&load)));
    Handle { tx, load }
}

/// Fails every command still queued on `rx` with `error`.
fn refuse_queued(rx: &mut mpsc::Receiver<Command>, load: &AtomicUsize, error: &Error) {
    rx.close();
    while let Ok(cmd) = rx.try_recv() {
        load.fetch_sub(1, Ordering::Relaxed);
        let _ = cmd.reply.send((Err(error.clone()), 0));
    }
}

/// One connection's task; see the module doc.
async fn connection_task(
    addr: SocketAddr,
    config: Arc<Config>,
    mut rx: mpsc::Receiver<Command>,
    load: Arc<AtomicUsize>,
) {
    let connected = tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr)).await;
    let stream = match connected {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let error = Error::Connect { addr, source: Arc::new(e) };
            telemetry::connection_failed(addr, &error);
            return refuse_queued(&mut rx, &load, &error);
        }
        Err(_) => {
            let late = std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
            let error = Error::Connect { addr, source: Arc::new(late) };
            telemetry::connection_failed(addr, &error);
            return refuse_queued(&mut rx, &load, &error);
        }
    };
    let _ = stream.set_nodelay(true);
    let mut tls = match crate::tls::start(&config, addr) {
        Ok(tls) => tls,
        Err(error) => {
            telemetry::connection_failed(addr, &error);
            return refuse_queued(&mut rx, &load, &error);
        }
    };
    telemetry::connection_opened(addr);
    let mut core = Connection::new(&config.cluster, config.credentials.clone(), Instant::now(), config.connect_timeout);
    let mut replies: HashMap<RequestId, oneshot::Sender<Answer>> = HashMap::new();
    let mut clients_gone = false;
    let error = loop {
        // Write what the socket takes now; the rest when it is writable.
        match &mut tls {
            None => write_available(&stream, &mut core),
            Some(tls) => crate::tls::flush(tls, &mut core, &mut TryIo(&stream)),
        }
        let failed = deliver(&mut core, &mut replies, &load);
        if let Some(e) = failed {
            break e;
        }
        if clients_gone && replies.is_empty() {
            return;
        }
        let accepting = !clients_gone && replies.len() < MAX_IN_FLIGHT_PER_CONNECTION;
        let want_write = match &tls {
            None => !core.transmit().is_empty(),
            Some(tls) => crate::tls::wants_write(tls, &core),
        };
        let wake = core.poll_timeout();
        tokio::select! {
            cmd = rx.recv(), if accepting => match cmd {
                Some(cmd) if cmd.reply.is_closed() => {
                    load.fetch_sub(1, Ordering::Relaxed);
                }
                Some(cmd) => {
                    // A deadline may have passed unnoticed (select picks
                    // among ready branches at random): apply it before
                    // taking a request that would only fail with the
                    // connection.
                    let now = Instant::now();
                    core.handle_timeout(now);
                    if core.is_failed() {
                        load.fetch_sub(1, Ordering::Relaxed);
                        let gone = std::io::Error::new(std::io::ErrorKind::NotConnected, "the connection stopped answering");
                        let _ = cmd.reply.send((Err(Error::io(gone)), 0));
                    } else {
                        let id = core.send(cmd.request, now, cmd.timeout);
                        replies.insert(id, cmd.reply);
                    }
                }
                // Every handle is gone (the client was dropped): finish
                // what is in flight, then end.
                None => clients_gone = true,
            },
            ready = stream.readable() => match ready {
                Ok(()) => match &mut tls {
                    None => read_available(&stream, &mut core),
                    Some(tls) => crate::tls::receive(tls, &mut core, &mut TryIo(&stream), addr),
                },
                Err(e) => core.fail(Error::io(e)),
            },
            ready = stream.writable(), if want_write => {
                if let Err(e) = ready {
                    core.fail(Error::io(e));
                }
            }
            _ = sleep_until_opt(wake) => core.handle_timeout(Instant::now()),
        }
    };
    telemetry::connection_failed(addr, &error);
    refuse_queued(&mut rx, &load, &error);
}

/// Hands each answer the connection produced to its request's oneshot;
/// returns the connection's failure, if it failed.
fn deliver(
    core: &mut Connection,
    replies: &mut HashMap<RequestId, oneshot::Sender<Answer>>,
    load: &AtomicUsize,
) -> Option<Error> {
    let mut answer = |id: RequestId, a: Answer| {
        if let Some(reply) = replies.remove(&id) {
            load.fetch_sub(1, Ordering::Relaxed);
            // The caller may have stopped waiting: nothing to do then.
            let _ = reply.send(a);
        }
    };
    let mut failed = None;
    while let Some(event) = core.poll_event() {
        match event {
            Event::Connected(_) => {}
            Event::Response { id, result, ring_version } => answer(id, (result, ring_version)),
            Event::Failed { ids, error } => {
                for id in ids {
                    answer(id, (Err(error.clone()), 0));
                }
                failed = Some(error);
            }
        }
    }
    failed
}

/// Writes what the connection has to send, as far as the socket takes it.
fn write_available(stream: &TcpStream, core: &mut Connection) {
    while !core.transmit().is_empty() {
        match stream.try_write(core.transmit()) {
            Ok(n) => core.advance_transmit(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => return core.fail(Error::io(e)),
        }
    }
}

/// Reads what the socket holds into the connection.
fn read_available(stream: &TcpStream, core: &mut Connection) {
    while !core.is_failed() {
        let buf = core.read_buffer(READ_CHUNK);
        match stream.try_read(buf) {
            Ok(n) => {
                core.commit_read(n);
                if n == 0 {
                    return;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => return core.fail(Error::io(e)),
        }
    }
}

/// Sleeps until `t`, or forever without one.
async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}
