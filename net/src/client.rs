//! A blocking client for one ringkv endpoint.
//!
//! It sends each request to the node (and shard) it is connected to; routing
//! across a cluster is the cluster client's job. Requests can be pipelined:
//! [`Client::send`] queues without waiting and [`Client::recv`] returns
//! responses in the order they arrive. With [`ClientConfig::tls`] the
//! connection runs over TLS (rustls' blocking stream), and TLS failures are
//! [`ClientError::Tls`].

use crate::auth::Credentials;
use crate::proto::{GetResult, Hello, HelloAck, Level, NodeInfo, Reply, Request, Response, WireError};
use crate::session::{Event, Session, SessionError};
use crate::tls::{self, ClientTls};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;
use thiserror::Error;

pub const DEFAULT_CLUSTER: &str = "ringkv";

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    #[error("{0}")]
    Server(WireError),
    #[error("cannot reach {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("unexpected reply to {request}: {reply:?}")]
    UnexpectedReply { request: &'static str, reply: Box<Reply> },
    /// The TLS handshake or a TLS record failed (see [`tls::describe`]).
    #[error("TLS: {0}")]
    Tls(String),
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub cluster: String,
    /// How long to wait for a connection and for each response.
    pub timeout: Duration,
    /// Local address to connect from (default: the system's choice). Lets a
    /// test client stand on one side of a network partition.
    pub bind: Option<std::net::IpAddr>,
    /// What to authenticate with, if the node asks.
    pub credentials: Option<Credentials>,
    /// Speak TLS to the node (a node with `tls_cert` refuses plain TCP).
    pub tls: Option<ClientTls>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            cluster: DEFAULT_CLUSTER.to_string(),
            timeout: Duration::from_secs(10),
            bind: None,
            credentials: None,
            tls: None,
        }
    }
}

fn open(addr: &SocketAddr, config: &ClientConfig) -> io::Result<TcpStream> {
    let Some(ip) = config.bind else { return TcpStream::connect_timeout(addr, config.timeout) };
    let s = socket2::Socket::new(socket2::Domain::for_address(*addr), socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(ip, 0).into())?;
    s.connect_timeout(&(*addr).into(), config.timeout)?;
    Ok(s.into())
}

/// The byte stream under a session: plain TCP, or TLS over it.
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Stream {
    fn new(tcp: TcpStream, tls: Option<&ClientTls>) -> Result<Stream, ClientError> {
        let Some(tls) = tls else { return Ok(Stream::Plain(tcp)) };
        let ip = tcp.peer_addr()?.ip();
        let conn = tls.connect(ip).map_err(|e| ClientError::Tls(tls::describe(&e)))?;
        Ok(Stream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => &s.sock,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    /// Sends what TLS still holds (a write may leave records buffered).
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// Options of a put or delete.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    pub context: Vec<u8>,
    pub w: Level,
    pub durable: Option<bool>,
}

pub struct Client {
    stream: Stream,
    session: Session,
    timeout: Duration,
    server: HelloAck,
    /// Responses that arrived while waiting for another one.
    early: HashMap<u64, Response>,
    /// The highest ring version a response carried.
    ring_version: u64,
}

impl Client {
    pub fn connect(addr: impl ToSocketAddrs + std::fmt::Display, config: &ClientConfig) -> Result<Client, ClientError> {
        let name = addr.to_string();
        let connect_err = |source| ClientError::Connect { addr: name.clone(), source };
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs().map_err(connect_err)?.collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for a in addrs {
            match open(&a, config) {
                Ok(stream) => return Self::handshake(stream, config),
                Err(e) => last = e,
            }
        }
        Err(connect_err(last))
    }

    fn handshake(stream: TcpStream, config: &ClientConfig) -> Result<Client, ClientError> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(config.timeout))?;
        stream.set_write_timeout(Some(config.timeout))?;
        let mut c = Client {
            stream: Stream::new(stream, config.tls.as_ref())?,
            session: Session::with_credentials(Hello::client(&config.cluster), config.credentials.clone()),
            timeout: config.timeout,
            server: HelloAck {
                protocol_version: 0,
                node_id: String::new(),
                shard: 0,
                shards: 0,
                cluster: String::new(),
            },
            early: HashMap::new(),
            ring_version: 0,
        };
        c.flush()?;
        match c.next_event()? {
            Event::Connected(ack) => {
                c.server = ack;
                Ok(c)
            }
            Event::Response(r) => Err(SessionError::Protocol(format!("response {} before handshake", r.id)).into()),
        }
    }

    /// The connected stream, handshake done, for a caller that speaks the
    /// protocol itself (the benchmark's load generator). Refused while
    /// requests are outstanding or received bytes are unread: the caller
    /// would never see them; and refused over TLS, which a plain stream
    /// cannot carry on.
    pub fn into_stream(self) -> Result<TcpStream, ClientError> {
        if self.session.in_flight() > 0 || self.session.buffered() > 0 || !self.early.is_empty() {
            return Err(SessionError::Protocol("the connection has requests or data outstanding".into()).into());
        }
        match self.stream {
            Stream::Plain(s) => Ok(s),
            Stream::Tls(_) => Err(ClientError::Tls("a TLS connection cannot be handed over as plain TCP".into())),
        }
    }

    /// What the server said about itself in the handshake.
    pub fn server(&self) -> &HelloAck {
        &self.server
    }

    pub fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.timeout = timeout;
        self.stream.tcp().set_read_timeout(Some(timeout))?;
        self.stream.tcp().set_write_timeout(Some(timeout))
    }

    /// Queues and sends a request without waiting for its response.
    pub fn send(&mut self, body: Request) -> Result<u64, ClientError> {
        let id = self.session.send(body, self.timeout.as_millis().min(u32::MAX as u128) as u32);
        self.flush()?;
        Ok(id)
    }

    /// Queues requests and sends them in one write.
    pub fn send_batch(&mut self, bodies: impl IntoIterator<Item = Request>) -> Result<Vec<u64>, ClientError> {
        let t = self.timeout.as_millis().min(u32::MAX as u128) as u32;
        let ids = bodies.into_iter().map(|b| self.session.send(b, t)).collect();
        self.flush()?;
        Ok(ids)
    }

    pub fn in_flight(&self) -> usize {
        self.session.in_flight() + self.early.len()
    }

    /// The next response to arrive, whichever request it answers.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        if let Some(id) = self.early.keys().next().copied() {
            return Ok(self.early.remove(&id).expect("key just seen"));
        }
        self.recv_from_socket()
    }

    /// The newest ring version the node reported in a response.
    pub fn ring_version(&self) -> u64 {
        self.ring_version
    }

    fn recv_from_socket(&mut self) -> Result<Response, ClientError> {
        match self.next_event()? {
            Event::Response(r) => {
                self.ring_version = self.ring_version.max(r.ring_version);
                Ok(r)
            }
            Event::Connected(_) => Err(SessionError::Protocol("second handshake".into()).into()),
        }
    }

    /// Waits for the response to request `id`; others that arrive first are
    /// kept for their own `wait` or `recv`.
    pub fn wait(&mut self, id: u64) -> Result<Reply, ClientError> {
        if let Some(r) = self.early.remove(&id) {
            return r.result.map_err(ClientError::Server);
        }
        loop {
            let r = self.recv_from_socket()?;
            if r.id == id {
                return r.result.map_err(ClientError::Server);
            }
            self.early.insert(r.id, r);
        }
    }

    pub fn call(&mut self, body: Request) -> Result<Reply, ClientError> {
        let id = self.send(body)?;
        self.wait(id)
    }

    /// Like [`Client::call`], but waits at most `wait` for the answer (the
    /// request itself still carries the connection's timeout, so the node
    /// keeps trying as long as the caller would overall). After a timeout
    /// the connection must be dropped: the late answer would still arrive.
    pub fn call_within(&mut self, body: Request, wait: Duration) -> Result<Reply, ClientError> {
        let id = self.send(body)?;
        let wait = wait.max(Duration::from_millis(1));
        self.stream.tcp().set_read_timeout(Some(wait))?;
        let answer = self.wait(id);
        self.stream.tcp().set_read_timeout(Some(self.timeout))?;
        match answer {
            Err(ClientError::Timeout(_)) => Err(ClientError::Timeout(wait)),
            other => other,
        }
    }

    pub fn get(&mut self, key: &[u8], r: Level) -> Result<GetResult, ClientError> {
        match self.call(Request::Get { key: key.to_vec(), r })? {
            Reply::Get(g) => Ok(g),
            other => Err(unexpected("get", other)),
        }
    }

    /// Writes `value`; returns the context of the new version.
    pub fn put(&mut self, key: &[u8], value: &[u8], opts: &WriteOptions) -> Result<Vec<u8>, ClientError> {
        let body = Request::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            context: opts.context.clone(),
            w: opts.w,
            durable: opts.durable,
        };
        match self.call(body)? {
            Reply::Put { context } => Ok(context),
            other => Err(unexpected("put", other)),
        }
    }

    pub fn delete(&mut self, key: &[u8], opts: &WriteOptions) -> Result<(), ClientError> {
        let body =
            Request::Delete { key: key.to_vec(), context: opts.context.clone(), w: opts.w, durable: opts.durable };
        match self.call(body)? {
            Reply::Delete => Ok(()),
            other => Err(unexpected("delete", other)),
        }
    }

    pub fn ping(&mut self) -> Result<(), ClientError> {
        match self.call(Request::Ping { payload: Vec::new() })? {
            Reply::Pong { .. } => Ok(()),
            other => Err(unexpected("ping", other)),
        }
    }

    pub fn node_info(&mut self) -> Result<NodeInfo, ClientError> {
        match self.call(Request::NodeInfo)? {
            Reply::NodeInfo(n) => Ok(n),
            other => Err(unexpected("node-info", other)),
        }
    }

    fn flush(&mut self) -> Result<(), ClientError> {
        let out = self.session.output();
        if !out.is_empty() {
            let n = out.len();
            self.stream.write_all(out).and_then(|()| self.stream.flush()).map_err(|e| self.io_error(e))?;
            self.session.consumed(n);
        }
        Ok(())
    }

    fn next_event(&mut self) -> Result<Event, ClientError> {
        loop {
            if let Some(e) = self.session.poll()? {
                return Ok(e);
            }
            // An answer to a challenge (and what it held back) goes out
            // before we wait for more.
            self.flush()?;
            const READ: usize = 64 * 1024;
            let buf = self.session.read_buffer(READ);
            let n = match self.stream.read(buf) {
                Ok(n) => n,
                Err(e) => return Err(self.io_error(e)),
            };
            self.session.commit_read(n);
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection").into());
            }
        }
    }

    fn io_error(&self, e: io::Error) -> ClientError {
        if let Some(t) = tls::from_io(&e) {
            return ClientError::Tls(tls::describe(t));
        }
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout(self.timeout),
            _ => ClientError::Io(e),
        }
    }
}

fn unexpected(request: &'static str, reply: Reply) -> ClientError {
    ClientError::UnexpectedReply { request, reply: Box::new(reply) }
}
