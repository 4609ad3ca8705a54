//! The client's configuration, and the builder that makes a client from it.
//!
//! [`ClientBuilder`] collects the settings and checks them once, in
//! [`ClientBuilder::build`] (blocking client) or `build_async` (tokio
//! client); the shells only ever see a checked [`Config`]. Defaults: cluster
//! `ringkv`, connect timeout 2 s, request timeout 10 s, the node's default
//! r, w and durability, one connection per shard, reads hedged after the
//! observed p99.
//!
//! TLS is off unless a CA is given ([`ClientBuilder::tls_ca`] or
//! [`ClientBuilder::tls_roots`]); with it every connection is TLS, the
//! node's certificate is checked for the address connected to (an IP SAN)
//! or for [`ClientBuilder::tls_server_name`], and a client certificate is
//! presented when one is given ([`ClientBuilder::tls_client_cert`]), for
//! nodes with `tls_require_client_cert`.

use crate::error::{Error, Result};
use ringkv_net::auth::Credentials;
use ringkv_net::client::DEFAULT_CLUSTER;
use ringkv_net::tls::{self, ClientTls, Identity};
use ringkv_net::Level;
use rustls::RootCertStore;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

/// The most connections a client opens to one shard.
pub const MAX_CONNECTIONS_PER_SHARD: usize = 64;
/// The percentile a read is hedged after unless told otherwise.
pub const DEFAULT_HEDGE_PERCENTILE: f64 = 99.0;
/// The hedge percentiles accepted: below the median a hedge doubles most
/// reads; 100 would be the slowest read ever seen.
const HEDGE_PERCENTILES: std::ops::RangeInclusive<f64> = 50.0..=99.9;
/// The most requests in flight on one connection; beyond it a request
/// waits for another connection or a free slot.
pub const MAX_IN_FLIGHT_PER_CONNECTION: usize = 1024;

/// A client's settings, checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the first topology comes from.
    pub seeds: Vec<SocketAddr>,
    /// The cluster name the nodes must have.
    pub cluster: String,
    /// How long a TCP connect and handshake may take.
    pub connect_timeout: Duration,
    /// How long a request may take, every attempt together.
    pub request_timeout: Duration,
    /// The default read quorum.
    pub r: Level,
    /// The default write quorum.
    pub w: Level,
    /// The default durability (`None`: the node's).
    pub durable: Option<bool>,
    /// Connections opened to each shard, at most.
    pub connections_per_shard: usize,
    /// What to authenticate with.
    pub credentials: Option<Credentials>,
    /// Whether reads are hedged.
    pub hedged_reads: bool,
    /// The percentile of observed latencies a read is hedged after.
    pub hedge_percentile: f64,
    /// Whether gets ask their r replicas for their copies themselves.
    pub client_driven_reads: bool,
    /// TLS settings; `None`: plain TCP.
    pub tls: Option<ClientTls>,
}

/// Where the trusted CAs come from.
#[derive(Debug, Clone)]
enum Roots {
    File(PathBuf),
    Given(RootCertStore),
}

/// The TLS settings given to the builder, checked in `build`.
#[derive(Debug, Clone, Default)]
struct TlsOptions {
    roots: Option<Roots>,
    client_cert: Option<(PathBuf, PathBuf)>,
    server_name: Option<String>,
}

impl TlsOptions {
    fn is_set(&self) -> bool {
        self.roots.is_some() || self.client_cert.is_some() || self.server_name.is_some()
    }

    fn load(self) -> Result<Option<ClientTls>> {
        if !self.is_set() {
            return Ok(None);
        }
        let roots = match self.roots {
            Some(Roots::File(path)) => tls::load_roots(&path, "TLS CA").map_err(Error::Config)?,
            Some(Roots::Given(roots)) => roots,
            None => return Err(Error::Config("TLS needs the CAs to trust: tls_ca or tls_roots".into())),
        };
        let identity = match self.client_cert {
            Some((cert, key)) => {
                Some(Identity::load(&cert, "TLS client certificate", &key, "TLS client key").map_err(Error::Config)?)
            }
            None => None,
        };
        ClientTls::new(roots, identity, self.server_name.as_deref()).map(Some).map_err(Error::Config)
    }
}

/// Builds a client.
///
/// ```no_run
/// use ringkv_client::{Client, Level};
/// use std::time::Duration;
///
/// let mut client = Client::builder()
///     .seeds(["127.0.0.1:7070", "127.0.0.2:7070"])
///     .request_timeout(Duration::from_secs(2))
///     .read_quorum(Level::Quorum)
///     .write_quorum(Level::Count(2))
///     .durable(true)
///     .connections_per_shard(2)
///     .token("s3cret-token")
///     .build()?;
/// client.put(b"greeting", b"hello", &Default::default())?;
/// # Ok::<(), ringkv_client::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    seeds: Vec<String>,
    cluster: String,
    connect_timeout: Duration,
    request_timeout: Duration,
    r: Level,
    w: Level,
    durable: Option<bool>,
    connections_per_shard: usize,
    credentials: Option<Credentials>,
    hedged_reads: bool,
    hedge_percentile: f64,
    client_driven_reads: bool,
    tls: TlsOptions,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            seeds: Vec::new(),
            cluster: DEFAULT_CLUSTER.to_string(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            r: Level::Default,
            w: Level::Default,
            durable: None,
            connections_per_shard: 1,
            credentials: None,
            hedged_reads: true,
            hedge_percentile: DEFAULT_HEDGE_PERCENTILE,
            client_driven_reads: false,
            tls: TlsOptions::default(),
        }
    }
}

impl ClientBuilder {
    /// A builder with the defaults (see the module doc).
    pub fn new() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Adds a node to learn the cluster from (`IP:PORT` or `host:port`).
    pub fn seed(mut self, addr: impl Into<String>) -> Self {
        self.seeds.push(addr.into());
        self
    }

    /// Adds several seeds.
    pub fn seeds<S: Into<String>>(mut self, addrs: impl IntoIterator<Item = S>) -> Self {
        self.seeds.extend(addrs.into_iter().map(Into::into));
        self
    }

    /// The cluster's name (nodes of another cluster refuse the handshake).
    pub fn cluster(mut self, name: impl Into<String>) -> Self {
        self.cluster = name.into();
        self
    }

    /// How long connecting to a node (TCP and handshake) may take.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long a request may take, all its attempts together; the node is
    /// told the time left with each attempt.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The read quorum of requests that do not give one.
    pub fn read_quorum(mut self, r: Level) -> Self {
        self.r = r;
        self
    }

    /// The write quorum of requests that do not give one.
    pub fn write_quorum(mut self, w: Level) -> Self {
        self.w = w;
        self
    }

    /// Whether writes are acknowledged only once on disk, for requests that
    /// do not say.
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = Some(durable);
        self
    }

    /// How many connections to open to each shard at most (1 to
    /// [`MAX_CONNECTIONS_PER_SHARD`]); more are opened only while every
    /// open one has requests in flight.
    pub fn connections_per_shard(mut self, n: usize) -> Self {
        self.connections_per_shard = n;
        self
    }

    /// Authenticates with one of the nodes' `auth_tokens`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.credentials = Some(Credentials::Token(token.into()));
        self
    }

    /// Authenticates as one of the nodes' `auth_users`.
    pub fn user(mut self, name: impl Into<String>, password: impl Into<String>) -> Self {
        self.credentials = Some(Credentials::User { name: name.into(), password: password.into() });
        self
    }

    /// Authenticates with `credentials` (`None`: not at all).
    pub fn credentials(mut self, credentials: Option<Credentials>) -> Self {
        self.credentials = credentials;
        self
    }

    /// Whether a read that has not been answered after the observed p99 is
    /// also sent to the next replica (on by default; writes never are).
    pub fn hedged_reads(mut self, on: bool) -> Self {
        self.hedged_reads = on;
        self
    }

    /// After which percentile of the latencies this client observed a read
    /// is hedged (default 99: one read in a hundred is sent twice; 90 cuts
    /// more of the tail for ten times the extra reads). From 50 to 99.9.
    pub fn hedge_percentile(mut self, percentile: f64) -> Self {
        self.hedge_percentile = percentile;
        self
    }

    /// Client-driven reads (off by default): a get asks its key's first r
    /// replicas for their own copies at once and, when they all answer the
    /// same, that is the answer, with each replica woken once instead of a
    /// coordinator twice (on this project's 3-node benchmark, about twice
    /// the reads per core). Copies that differ, refuse or are late make the
    /// get read through a coordinator, which merges and repairs. Only where
    /// the client knows the topology; r = 1 gets are unchanged.
    ///
    /// ```
    /// let builder = ringkv_client::ClientBuilder::new().seed("127.0.0.1:7070").client_driven_reads(true);
    /// # let _ = builder;
    /// ```
    pub fn client_driven_reads(mut self, on: bool) -> Self {
        self.client_driven_reads = on;
        self
    }

    /// Speaks TLS, trusting the CAs of this PEM bundle (read by `build`).
    pub fn tls_ca(mut self, pem_file: impl Into<PathBuf>) -> Self {
        self.tls.roots = Some(Roots::File(pem_file.into()));
        self
    }

    /// Speaks TLS, trusting these CAs (instead of [`ClientBuilder::tls_ca`]).
    pub fn tls_roots(mut self, roots: RootCertStore) -> Self {
        self.tls.roots = Some(Roots::Given(roots));
        self
    }

    /// Presents this certificate (PEM chain) with its private key (PEM)
    /// when a node asks for one (nodes with `tls_require_client_cert`).
    pub fn tls_client_cert(mut self, cert_pem_file: impl Into<PathBuf>, key_pem_file: impl Into<PathBuf>) -> Self {
        self.tls.client_cert = Some((cert_pem_file.into(), key_pem_file.into()));
        self
    }

    /// Checks every node's certificate for this DNS name, instead of the
    /// IP address connected to (for nodes that share one name).
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Self {
        self.tls.server_name = Some(name.into());
        self
    }

    /// Checks the settings, resolving seed names with `resolve`.
    pub(crate) fn config_with(self, resolve: impl Fn(&str) -> std::io::Result<Vec<SocketAddr>>) -> Result<Config> {
        if self.seeds.is_empty() {
            return Err(Error::Config("no seed given: name at least one node".into()));
        }
        if !HEDGE_PERCENTILES.contains(&self.hedge_percentile) {
            return Err(Error::Config(format!(
                "the hedge percentile must be from 50 to 99.9, not {}",
                self.hedge_percentile
            )));
        }
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(Error::Config("timeouts must be positive".into()));
        }
        if !(1..=MAX_CONNECTIONS_PER_SHARD).contains(&self.connections_per_shard) {
            return Err(Error::Config(format!(
                "connections per shard must be 1 to {MAX_CONNECTIONS_PER_SHARD}, not {}",
                self.connections_per_shard
            )));
        }
        if matches!(self.credentials, Some(Credentials::ClusterSecret(_))) {
            return Err(Error::Config("the cluster secret is for nodes; a client uses a token or a user".into()));
        }
        let tls = self.tls.load()?;
        let mut seeds = Vec::new();
        for s in &self.seeds {
            let addrs = resolve(s).map_err(|e| Error::Config(format!("seed {s:?}: {e}")))?;
            seeds.extend(addrs.into_iter().filter(|a| !seeds.contains(a)).collect::<Vec<_>>());
        }
        Ok(Config {
            seeds,
            cluster: self.cluster,
            connect_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            r: self.r,
            w: self.w,
            durable: self.durable,
            connections_per_shard: self.connections_per_shard,
            credentials: self.credentials,
            hedged_reads: self.hedged_reads,
            hedge_percentile: self.hedge_percentile,
            client_driven_reads: self.client_driven_reads,
            tls,
        })
    }

    /// Checks the settings, resolving seed names with the system resolver.
    pub(crate) fn config(self) -> Result<Config> {
        self.config_with(|s| s.to_socket_addrs().map(Iterator::collect))
    }

    /// Connects a blocking client: learns the topology from the first seed
    /// that answers.
    pub fn build(self) -> Result<crate::Client> {
        crate::Client::connect(self.config()?)
    }

    /// Connects an async client on the current tokio runtime.
    #[cfg(feature = "tokio")]
    pub async fn build_async(self) -> Result<crate::AsyncClient> {
        let seeds = self.seeds.clone();
        let mut resolved = Vec::new();
        for s in &seeds {
            let addrs =
                tokio::net::lookup_host(s.as_str()).await.map_err(|e| Error::Config(format!("seed {s:?}: {e}")))?;
            resolved.push((s.clone(), addrs.collect::<Vec<_>>()));
        }
        let config = self.config_with(|s| {
            Ok(resolved.iter().find(|(name, _)| name == s).map(|(_, a)| a.clone()).unwrap_or_default())
        })?;
        crate::AsyncClient::connect(config).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_builder_refuses_settings_that_cannot_work() {
        let e = ClientBuilder::new().config().unwrap_err();
        assert!(e.to_string().contains("no seed"), "{e}");
        let seeded = || ClientBuilder::new().seed("127.0.0.1:7070");
        assert!(seeded().connections_per_shard(0).config().is_err());
        assert!(seeded().connections_per_shard(65).config().is_err());
        assert!(seeded().request_timeout(Duration::ZERO).config().is_err());
        let secret = seeded().credentials(Some(Credentials::ClusterSecret("s".into())));
        assert!(secret.config().unwrap_err().to_string().contains("cluster secret"));
        assert!(seeded().seed("no-such-host.invalid:1").config().is_err());
        let nameless = seeded().tls_server_name("ringkv.internal").config().unwrap_err();
        assert!(nameless.to_string().contains("TLS needs the CAs to trust"), "{nameless}");
        let missing = seeded().tls_ca("/no/such/ca.pem").config().unwrap_err();
        assert!(missing.to_string().contains("TLS CA: cannot read /no/such/ca.pem"), "{missing}");
        let bad_name = seeded().tls_roots(RootCertStore::empty()).tls_server_name("not a name!").config();
        assert!(bad_name.unwrap_err().to_string().contains("server name"));
    }

    #[test]
    fn a_builder_keeps_what_it_was_told() {
        let c = ClientBuilder::new()
            .seeds(["127.0.0.1:7070", "127.0.0.1:7070", "127.0.0.2:7070"])
            .cluster("prod")
            .read_quorum(Level::All)
            .write_quorum(Level::Count(2))
            .durable(true)
            .connections_per_shard(4)
            .user("alice", "pw")
            .hedged_reads(false)
            .hedge_percentile(95.0)
            .config()
            .unwrap();
        assert_eq!(c.seeds.len(), 2, "a seed named twice is one");
        assert_eq!((c.cluster.as_str(), c.r, c.w, c.durable), ("prod", Level::All, Level::Count(2), Some(true)));
        assert_eq!(c.connections_per_shard, 4);
        assert_eq!(c.credentials.as_ref().map(Credentials::user), Some("alice"));
        assert!(!c.hedged_reads);
        assert_eq!(c.hedge_percentile, 95.0);
        for bad in [0.0, 49.9, 100.0, f64::NAN] {
            let e = ClientBuilder::new().seed("127.0.0.1:7070").hedge_percentile(bad).config().unwrap_err().to_string();
            assert!(e.contains("hedge percentile"), "{bad}: {e}");
        }
    }
}
