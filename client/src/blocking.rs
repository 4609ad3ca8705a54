//! The blocking client: a thin shell that carries out the core's actions
//! with non-blocking sockets and `poll(2)`.
//!
//! A call runs its operation(s) to the end on the caller's thread: it sends
//! what the [`Operation`]s ask, waits in `poll` for the sockets with
//! requests in flight or bytes to write (and no longer than the earliest
//! deadline of an operation or a connection), feeds what arrives to the
//! [`Connection`]s and their events to the operations. Hedged reads and
//! [`Client::get_many`] therefore wait on several sockets at once, and
//! every connection is multiplexed: a pipelined batch shares connections,
//! answers match their requests in any order.
//!
//! Connections are opened when first needed, at most
//! `connections_per_shard` per shard, and dropped when they fail; the next
//! request that routes there reconnects (endpoints that failed are tried
//! last, see [`crate::core::route`]). The TCP connect is non-blocking and
//! completes in the same poll loop as the handshake, both within the
//! connect timeout, so an unreachable replica delays no failover.
//!
//! With TLS, each connection also holds a rustls `ClientConnection` that
//! the same loop drives ([`crate::tls`]): the TLS handshake completes in the
//! poll loop too, within the connect timeout, and the plain path is left
//! as it was.
//!
//! The topology is refreshed at the start of a call when the router asks
//! for it (a node reported a newer ring, or a request failed over).
//!
//! A `Client` is `Send` but not shared: use one per thread, or the async
//! client for many concurrent requests.

// The shell owns the clock and the sockets (client/clippy.toml bans them
// everywhere else).
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use crate::builder::{ClientBuilder, Config, MAX_IN_FLIGHT_PER_CONNECTION};
use crate::core::conn::{Connection, Event, RequestId};
use crate::core::op::{Action, AttemptId, Kind, Operation, Stats};
use crate::core::route::{Router, RouterConfig};
use crate::error::{Error, Result};
use crate::requests;
use crate::resolve::{resolve_siblings, Resolve, Value};
use crate::siblings::{Context, ReadOptions, Siblings, WriteOptions};
use crate::telemetry;
use ringkv_net::proto::{Reply, Request};
use ringkv_net::Topology;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How much to read from a socket at once.
const READ_CHUNK: usize = 64 * 1024;

struct Conn {
    serial: u64,
    addr: SocketAddr,
    stream: TcpStream,
    core: Connection,
    /// TLS between the socket and `core`; `None`: plain TCP.
    tls: Option<Box<rustls::ClientConnection>>,
    /// The TCP connect is in progress (the socket is non-blocking from the
    /// start, so an unreachable node costs no caller a blocked connect).
    connecting: bool,
}

/// Operations being run together, and which attempt each wire request is.
struct Run {
    ops: Vec<Operation>,
    results: Vec<Option<Result<Reply>>>,
    sent: HashMap<(usize, AttemptId), (u64, RequestId)>,
    waiting: HashMap<(u64, RequestId), (usize, AttemptId)>,
    queue: VecDeque<(usize, Action)>,
}

impl Run {
    fn all_done(&self) -> bool {
        self.results.iter().all(Option::is_some)
    }
}

/// A blocking ringkv client; see the module doc.
///
/// ```no_run
/// use ringkv_client::{Client, WriteOptions};
///
/// let mut client = Client::builder().seed("127.0.0.1:7070").build()?;
/// client.put(b"greeting", b"hello", &WriteOptions::default())?;
/// let read = client.get(b"greeting")?;
/// assert_eq!(read.single(), Some(&b"hello"[..]));
/// // Replace exactly what was read:
/// client.put(b"greeting", b"hello again", &WriteOptions::with_context(read.context().clone()))?;
/// client.delete(b"greeting", &WriteOptions::default())?;
/// # Ok::<(), ringkv_client::Error>(())
/// ```
pub struct Client {
    config: Arc<Config>,
    router: Router,
    conns: Vec<Conn>,
    next_serial: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("ring_version", &self.router.ring_version())
            .field("connections", &self.conns.len())
            .finish()
    }
}

impl Client {
    /// A builder; finish it with [`ClientBuilder::build`].
    pub fn builder() -> ClientBuilder {
        ClientBuilder::new()
    }

    pub(crate) fn connect(config: Config) -> Result<Client> {
        let router = Router::new(RouterConfig {
            request_timeout: config.request_timeout,
            hedge_reads: config.hedged_reads,
            hedge_percentile: config.hedge_percentile,
            seeds: config.seeds.clone(),
        });
        let mut c = Client { config: Arc::new(config), router, conns: Vec::new(), next_serial: 0 };
        c.refresh_topology()?;
        Ok(c)
    }

    /// The topology requests are routed by.
    pub fn topology(&self) -> Option<&Topology> {
        self.router.topology()
    }

    /// The ring version requests are routed by.
    pub fn ring_version(&self) -> u64 {
        self.router.ring_version()
    }

    /// Fetches the topology now, from any member or seed.
    pub fn refresh_topology(&mut self) -> Result<()> {
        let now = Instant::now();
        let sources = self.router.topology_sources(now);
        let op = Operation::new(Kind::Read, Request::Topology, sources, now, self.config.request_timeout);
        let (result, _) = self.execute(vec![op]).pop().expect("one operation, one result");
        let fetched = result.and_then(requests::topology);
        telemetry::topology_refreshed(&fetched.as_ref().map(Topology::version).map_err(Clone::clone));
        match fetched {
            Ok(t) => {
                self.router.set_topology(t, Instant::now());
                Ok(())
            }
            Err(e) => {
                self.router.refresh_failed(Instant::now());
                Err(e)
            }
        }
    }

    fn maybe_refresh(&mut self) {
        if self.router.start_refresh(Instant::now()) {
            // A failed refresh keeps the old topology, which still routes
            // (nodes forward what they do not own); the error is counted.
            let _ = self.refresh_topology();
        }
    }

    /// Reads every sibling of `key`, with the default read quorum.
    pub fn get(&mut self, key: impl AsRef<[u8]>) -> Result<Siblings> {
        self.get_with(key, &ReadOptions::default())
    }

    /// Reads every sibling of `key`.
    pub fn get_with(&mut self, key: impl AsRef<[u8]>, opts: &ReadOptions) -> Result<Siblings> {
        let key = key.as_ref();
        let planned = requests::get(&self.config, key, opts);
        self.call("get", key, planned).and_then(requests::siblings)
    }

    /// Reads many keys at once, pipelined over the connections (each
    /// read is routed, hedged and retried on its own). Results are in the
    /// order of `keys`.
    ///
    /// ```no_run
    /// # let mut client = ringkv_client::Client::builder().seed("127.0.0.1:7070").build()?;
    /// let keys = ["user:1", "user:2", "user:3"];
    /// for (key, read) in keys.iter().zip(client.get_many(&keys, &Default::default())) {
    ///     println!("{key}: {} value(s)", read?.len());
    /// }
    /// # Ok::<(), ringkv_client::Error>(())
    /// ```
    pub fn get_many<K: AsRef<[u8]>>(&mut self, keys: &[K], opts: &ReadOptions) -> Vec<Result<Siblings>> {
        self.maybe_refresh();
        let span = telemetry::request_span("get_many", &[]);
        let _entered = span.enter();
        let now = Instant::now();
        let ops: Vec<Operation> = keys
            .iter()
            .map(|k| {
                let p = requests::get(&self.config, k.as_ref(), opts);
                p.operation(self.router.replicas(k.as_ref(), now), now)
            })
            .collect();
        let started: Vec<Instant> = ops.iter().map(Operation::started).collect();
        let results = self.execute(ops);
        let done = Instant::now();
        results
            .into_iter()
            .zip(started)
            .map(|((r, stats), t)| {
                telemetry::request_done("get", &span, done.saturating_duration_since(t), stats, &r);
                r.and_then(requests::siblings)
            })
            .collect()
    }

    /// Writes `value` under `key`; returns the new version's context.
    /// Without a context (`WriteOptions::default()`) the value becomes a
    /// sibling of whatever is there.
    ///
    /// ```no_run
    /// use ringkv_client::{Level, WriteOptions};
    /// # let mut client = ringkv_client::Client::builder().seed("127.0.0.1:7070").build()?;
    /// let read = client.get("profile:7")?;
    /// let opts = WriteOptions { w: Some(Level::All), durable: Some(true), ..WriteOptions::with_context(read.context().clone()) };
    /// match client.put("profile:7", "{\"name\":\"ann\"}", &opts) {
    ///     Ok(_context) => {}
    ///     Err(ringkv_client::Error::Unavailable { message }) => eprintln!("not enough replicas up: {message}"),
    ///     Err(e) => return Err(e),
    /// }
    /// # Ok::<(), ringkv_client::Error>(())
    /// ```
    pub fn put(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>, opts: &WriteOptions) -> Result<Context> {
        let key = key.as_ref();
        let planned = requests::put(&self.config, key, value.as_ref(), opts);
        self.call("put", key, planned).and_then(requests::written)
    }

    /// Deletes `key` (the siblings its context covers; all, with the
    /// context of a read, or none but a tombstone beside them without).
    pub fn delete(&mut self, key: impl AsRef<[u8]>, opts: &WriteOptions) -> Result<()> {
        let key = key.as_ref();
        let planned = requests::delete(&self.config, key, opts);
        self.call("delete", key, planned).and_then(requests::deleted)
    }

    /// Reads `key` as a `T`, merging siblings with `resolver`; when there
    /// were several, writes the merge back with the read's context, so the
    /// next read finds one value. `None`: the key has no value.
    ///
    /// The write-back is best effort: if it fails (say the write quorum is
    /// not reachable while the read quorum was) the merged value is still
    /// returned, the failure is counted
    /// (`ringkv_client_write_backs_failed_total`), and the next read merges
    /// the same siblings again.
    ///
    /// ```no_run
    /// # let mut client = ringkv_client::Client::builder().seed("127.0.0.1:7070").build()?;
    /// let longest = |a: &String, b: &String| if b.len() > a.len() || (b.len() == a.len() && b > a) { b.clone() } else { a.clone() };
    /// let name: Option<String> = client.get_resolved("user:7:name", &longest)?;
    /// # Ok::<(), ringkv_client::Error>(())
    /// ```
    pub fn get_resolved<T: Value, R: Resolve<T> + ?Sized>(
        &mut self,
        key: impl AsRef<[u8]>,
        resolver: &R,
    ) -> Result<Option<T>> {
        let key = key.as_ref();
        let r = resolve_siblings(self.get(key)?, resolver)?;
        if let (true, Some(v)) = (r.needs_write_back, &r.value) {
            if let Err(e) = self.put(key, v.encode(), &WriteOptions::with_context(r.context)) {
                telemetry::write_back_failed(&e);
            }
        }
        Ok(r.value)
    }

    /// Read, resolve, modify, write: reads `key`, merges its siblings with
    /// `resolver`, applies `change` to the result (`None`: no value yet) and
    /// writes what it returns with the read's context, replacing every
    /// sibling read. Returns the value written. A concurrent writer's value
    /// is not lost: it becomes a sibling that the next read merges.
    ///
    /// ```no_run
    /// # let mut client = ringkv_client::Client::builder().seed("127.0.0.1:7070").build()?;
    /// // Tags as a comma-separated set, merged by union.
    /// let union = |a: &String, b: &String| {
    ///     let mut tags: Vec<&str> = a.split(',').chain(b.split(',')).filter(|t| !t.is_empty()).collect();
    ///     tags.sort_unstable();
    ///     tags.dedup();
    ///     tags.join(",")
    /// };
    /// let tags = client.update("post:9:tags", &union, |tags| union(&tags.unwrap_or_default(), &"rust".into()))?;
    /// assert!(tags.split(',').any(|t| t == "rust"));
    /// # Ok::<(), ringkv_client::Error>(())
    /// ```
    pub fn update<T, R, F>(&mut self, key: impl AsRef<[u8]>, resolver: &R, change: F) -> Result<T>
    where
        T: Value,
        R: Resolve<T> + ?Sized,
        F: FnOnce(Option<T>) -> T,
    {
        let key = key.as_ref();
        let r = resolve_siblings(self.get(key)?, resolver)?;
        let new = change(r.value);
        self.put(key, new.encode(), &WriteOptions::with_context(r.context))?;
        Ok(new)
    }

    fn call(&mut self, op_name: &'static str, key: &[u8], planned: requests::Planned) -> Result<Reply> {
        self.maybe_refresh();
        let span = telemetry::request_span(op_name, key);
        let _entered = span.enter();
        let now = Instant::now();
        let route = self.router.replicas(key, now);
        let op = planned.operation(route, now);
        let (result, stats) = self.execute(vec![op]).pop().expect("one operation, one result");
        telemetry::request_done(op_name, &span, now.elapsed(), stats, &result);
        result
    }

    /// Runs `ops` to their ends together; their results in order.
    fn execute(&mut self, ops: Vec<Operation>) -> Vec<(Result<Reply>, Stats)> {
        let n = ops.len();
        let mut run = Run {
            ops,
            results: (0..n).map(|_| None).collect(),
            sent: HashMap::new(),
            waiting: HashMap::new(),
            queue: VecDeque::new(),
        };
        let now = Instant::now();
        for i in 0..n {
            let actions = run.ops[i].start(&mut self.router, now);
            run.queue.extend(actions.into_iter().map(|a| (i, a)));
        }
        loop {
            self.apply(&mut run);
            if run.all_done() {
                break;
            }
            for c in &mut self.conns {
                flush(c);
            }
            self.drain_events(&mut run, Instant::now());
            self.apply(&mut run);
            if run.all_done() {
                break;
            }
            let wake = run
                .ops
                .iter()
                .filter_map(Operation::poll_timeout)
                .chain(self.conns.iter().filter_map(|c| c.core.poll_timeout()))
                .min();
            self.wait(wake);
            let now = Instant::now();
            for c in &mut self.conns {
                c.core.handle_timeout(now);
            }
            self.drain_events(&mut run, now);
            for i in 0..n {
                if run.ops[i].poll_timeout().is_some_and(|t| t <= now) {
                    let actions = run.ops[i].on_timeout(&mut self.router, now);
                    run.queue.extend(actions.into_iter().map(|a| (i, a)));
                }
            }
        }
        self.conns.retain(|c| !c.core.is_failed());
        let stats: Vec<Stats> = run.ops.iter().map(Operation::stats).collect();
        run.results.into_iter().map(|r| r.expect("all done")).zip(stats).collect()
    }

    /// Carries out the queued actions (which may queue more).
    fn apply(&mut self, run: &mut Run) {
        while let Some((i, action)) = run.queue.pop_front() {
            match action {
                Action::Send { attempt, addr, request, timeout } => {
                    let now = Instant::now();
                    telemetry::attempt_sent(addr, attempt.0);
                    match self.conn_for(addr) {
                        Ok(k) => {
                            let c = &mut self.conns[k];
                            let id = c.core.send(request, now, timeout);
                            run.sent.insert((i, attempt), (c.serial, id));
                            run.waiting.insert((c.serial, id), (i, attempt));
                        }
                        Err(e) => {
                            let actions = run.ops[i].on_response(attempt, Err(e), 0, &mut self.router, now);
                            run.queue.extend(actions.into_iter().map(|a| (i, a)));
                        }
                    }
                }
                Action::Abandon { attempt } => {
                    if let Some((serial, id)) = run.sent.remove(&(i, attempt)) {
                        run.waiting.remove(&(serial, id));
                        if let Some(c) = self.conns.iter_mut().find(|c| c.serial == serial) {
                            c.core.abandon(id);
                        }
                    }
                }
                Action::Done(result) => run.results[i] = Some(result),
            }
        }
    }

    /// Feeds every connection's events to the operations they concern.
    fn drain_events(&mut self, run: &mut Run, now: Instant) {
        for k in 0..self.conns.len() {
            while let Some(event) = self.conns[k].core.poll_event() {
                let serial = self.conns[k].serial;
                let answers: Vec<(RequestId, Result<Reply>, u64)> = match event {
                    Event::Connected(_) => continue,
                    Event::Response { id, result, ring_version } => vec![(id, result, ring_version)],
                    Event::Failed { ids, error } => {
                        telemetry::connection_failed(self.conns[k].addr, &error);
                        ids.into_iter().map(|id| (id, Err(error.clone()), 0)).collect()
                    }
                };
                for (id, result, ring_version) in answers {
                    let Some((i, attempt)) = run.waiting.remove(&(serial, id)) else {
                        self.router.observe_ring_version(ring_version);
                        continue;
                    };
                    run.sent.remove(&(i, attempt));
                    let actions = run.ops[i].on_response(attempt, result, ring_version, &mut self.router, now);
                    run.queue.extend(actions.into_iter().map(|a| (i, a)));
                }
            }
        }
    }

    /// The connection to send to `addr` on: the least busy open one, or a
    /// new one while fewer than `connections_per_shard` are open and every
    /// open one is busy.
    fn conn_for(&mut self, addr: SocketAddr) -> Result<usize> {
        // Bring each connection to `addr` up to date before choosing one: a
        // node closes a connection left idle too long (`idle_timeout_ms`),
        // and a connection may be past its wire deadline without anyone
        // having looked (connections are only polled while a call waits).
        // A request placed on either would fail with it, and wrongly mark
        // the endpoint down.
        let now = Instant::now();
        for c in self.conns.iter_mut().filter(|c| c.addr == addr) {
            receive(c);
            c.core.handle_timeout(now);
        }
        let open = self.conns.iter().filter(|c| c.addr == addr && !c.core.is_failed()).count();
        let best = (0..self.conns.len())
            .filter(|&k| self.conns[k].addr == addr && !self.conns[k].core.is_failed())
            .min_by_key(|&k| self.conns[k].core.in_flight());
        let busy = best.is_none_or(|k| self.conns[k].core.in_flight() > 0);
        if busy && open < self.config.connections_per_shard {
            match self.open(addr) {
                Ok(k) => return Ok(k),
                // A busy connection is better than none.
                Err(e) if best.is_none() => return Err(e),
                Err(_) => {}
            }
        }
        match best {
            Some(k) if self.conns[k].core.in_flight() < MAX_IN_FLIGHT_PER_CONNECTION => Ok(k),
            _ => Err(Error::Overloaded { message: format!("every connection to {addr} is full (client side)") }),
        }
    }

    /// Starts a connection to `addr`; the TCP connect completes in the poll
    /// loop, and the core's handshake deadline (the connect timeout) bounds
    /// both.
    fn open(&mut self, addr: SocketAddr) -> Result<usize> {
        let connect_err = |e: io::Error| Error::Connect { addr, source: Arc::new(e) };
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)
            .map_err(connect_err)?;
        socket.set_nonblocking(true).map_err(connect_err)?;
        socket.set_nodelay(true).map_err(connect_err)?;
        let connecting = match socket.connect(&addr.into()) {
            Ok(()) => false,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => true,
            Err(e) => return Err(connect_err(e)),
        };
        let stream: TcpStream = socket.into();
        let tls = crate::tls::start(&self.config, addr)?;
        let core = Connection::new(
            &self.config.cluster,
            self.config.credentials.clone(),
            Instant::now(),
            self.config.connect_timeout,
        );
        telemetry::connection_opened(addr);
        self.next_serial += 1;
        self.conns.push(Conn { serial: self.next_serial, addr, stream, core, tls, connecting });
        Ok(self.conns.len() - 1)
    }

    /// Waits until a socket with work is readable (or writable, with bytes
    /// to send) or `wake` comes, and reads and writes what it can.
    fn wait(&mut self, wake: Option<Instant>) {
        let active: Vec<usize> = (0..self.conns.len())
            .filter(|&k| {
                let c = &self.conns[k].core;
                !c.is_failed() && (c.in_flight() > 0 || !c.is_ready() || self.conns[k].wants_write())
            })
            .collect();
        let mut fds: Vec<libc::pollfd> = active
            .iter()
            .map(|&k| {
                let c = &self.conns[k];
                // A connect in progress completes as writability.
                let events = if c.connecting {
                    libc::POLLOUT
                } else if c.wants_write() {
                    libc::POLLIN | libc::POLLOUT
                } else {
                    libc::POLLIN
                };
                libc::pollfd { fd: c.stream.as_raw_fd(), events, revents: 0 }
            })
            .collect();
        let timeout_ms = match wake {
            // Rounded up, so a wake-up never comes before the deadline.
            Some(t) => t.saturating_duration_since(Instant::now()).as_micros().div_ceil(1000).min(i32::MAX as u128)
                as libc::c_int,
            None => 1000,
        };
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(timeout_ms as u64));
            return;
        }
        // SAFETY: `fds` is a valid, exclusively borrowed array of `fds.len()`
        // pollfd structs for the duration of the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc <= 0 {
            // A timeout, or EINTR: the caller re-checks the deadlines.
            return;
        }
        for (fd, &k) in fds.iter().zip(&active) {
            if fd.revents == 0 {
                continue;
            }
            let c = &mut self.conns[k];
            if c.connecting {
                connected(c);
                continue;
            }
            if fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                receive(c);
            }
            if fd.revents & libc::POLLOUT != 0 {
                flush(c);
            }
        }
    }
}

impl Conn {
    /// Whether there are bytes for the socket to take.
    fn wants_write(&self) -> bool {
        match &self.tls {
            None => !self.core.transmit().is_empty(),
            Some(tls) => crate::tls::wants_write(tls, &self.core),
        }
    }
}

/// The connect in progress ended (the socket polled writable or in
/// error): the connection goes on to its handshake, or fails.
fn connected(c: &mut Conn) {
    c.connecting = false;
    let error = match c.stream.take_error() {
        Ok(None) => return flush(c),
        Ok(Some(e)) | Err(e) => e,
    };
    c.core.fail(Error::Connect { addr: c.addr, source: Arc::new(error) });
}

/// Writes what the connection has to send, as far as the socket takes it.
fn flush(c: &mut Conn) {
    if c.connecting {
        return;
    }
    if let Some(tls) = &mut c.tls {
        return crate::tls::flush(tls, &mut c.core, &mut c.stream);
    }
    loop {
        let out = c.core.transmit();
        if out.is_empty() {
            return;
        }
        match c.stream.write(out) {
            Ok(0) => return c.core.fail(Error::io(io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => c.core.advance_transmit(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return c.core.fail(Error::io(e)),
        }
    }
}

/// Reads what the socket holds into the connection.
fn receive(c: &mut Conn) {
    if c.connecting {
        return;
    }
    if let Some(tls) = &mut c.tls {
        return crate::tls::receive(tls, &mut c.core, &mut c.stream, c.addr);
    }
    while !c.core.is_failed() {
        let buf = c.core.read_buffer(READ_CHUNK);
        match c.stream.read(buf) {
            Ok(n) => {
                c.core.commit_read(n);
                if n == 0 {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return c.core.fail(Error::io(e)),
        }
    }
}
