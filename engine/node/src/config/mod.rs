//! A node's settings: the one list that declares them, TOML loading and
//! validation.
//!
//! Each setting is declared once below (doc, key, type, default, flag form);
//! `NodeConfig`, its defaults, its TOML keys, the `ringkv server` flags and
//! docs/CONFIG.md are all derived from that declaration ([`setting`]). A
//! value comes from the default, then the TOML file (`--config`), then a flag
//! given on the command line. `validate` checks the values, alone and
//! against each other, and names the setting in its one-line error.

pub mod setting;

use ringkv_core::keyspace::{self, DEFAULT_MAX_PAIR_BYTES, DEFAULT_PARTITIONS, MAX_PAIR_BYTES_LIMIT};
use ringkv_net::frame::DEFAULT_MAX_FRAME_BYTES;
use ringkv_net::proto::Role;
use setting::{declare_settings, Flag};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub use setting::{LogFormat, Setting};

pub const DEFAULT_PORT: u16 = 7070;

/// The shortest cluster secret or client token accepted: shorter ones could
/// be guessed by trying them against a recorded exchange offline.
pub const MIN_SECRET_BYTES: usize = 16;

declare_settings! {
    /// Unique name of the node. Unset: the one stored in the data
    /// directory, or the listen address for a new directory.
    node_id: Option<String> = None, Flag::Value;
    /// Address of shard 0; shard i listens on port + i.
    listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)), Flag::Value;
    /// Where the node keeps its data.
    data_dir: PathBuf = PathBuf::from("ringkv-data"), Flag::Value;
    /// Other nodes to join through, as IP:PORT.
    seeds: Vec<String> = Vec::new(), Flag::List("IP:PORT");
    /// Shards (executors, one per core). Unset: the number of cores.
    shards: Option<usize> = None, Flag::Value;
    /// Relative capacity: partitions are claimed in proportion to it (1 to 10000).
    weight: u32 = 1, Flag::Value;
    /// Cluster name; clients and peers must present the same one.
    cluster: String = ringkv_net::client::DEFAULT_CLUSTER.to_string(), Flag::Value;
    /// Partitions of the hash ring (Q, a power of two), fixed when the cluster is created.
    partitions: u32 = DEFAULT_PARTITIONS, Flag::Value;
    /// Replication factor N.
    replicas: usize = 3, Flag::Value;
    /// Largest key plus value a client may write, in bytes (at most 1 MiB).
    max_pair_bytes: usize = DEFAULT_MAX_PAIR_BYTES, Flag::Value;
    /// Largest frame accepted on a connection, in bytes; at least
    /// max_pair_bytes + 4096.
    max_frame_bytes: usize = DEFAULT_MAX_FRAME_BYTES, Flag::Value;
    /// Size of each log segment file, in MiB.
    segment_mb: u64 = 64, Flag::Value;
    /// Record cache per shard, in MiB.
    cache_mb: usize = 64, Flag::Value;
    /// Timeout of a request that does not set its own, in milliseconds.
    request_timeout_ms: u64 = 5_000, Flag::Value;
    /// Pin each shard's thread to a core. Off, placement is left to the OS
    /// (or to taskset, or systemd's CPUAffinity).
    pin_cpus: bool = true, Flag::Switch("no-pin");
    /// First core to pin to (shard i goes to core (offset + i) mod cores),
    /// so that several nodes on one machine can be spread out.
    cpu_offset: usize = 0, Flag::Value;
    /// Client connections a shard holds at once.
    max_connections_per_shard: usize = 4096, Flag::Value;
    /// Requests in flight per connection; more get Overloaded.
    max_in_flight_per_connection: usize = 1024, Flag::Value;
    /// Hints (writes held for unreachable replicas) a shard keeps at most.
    max_hints_per_shard: u64 = 1_000_000, Flag::Value;
    /// Seconds between anti-entropy passes over a shard's partitions.
    anti_entropy_interval_s: u64 = 60, Flag::Value;
    /// Seconds between hinted-handoff attempts.
    handoff_interval_s: u64 = 3, Flag::Value;
    /// A tombstone is purged once every replica holds it and it is this
    /// many seconds old: longer than hints and partitions are expected to
    /// last, so that no older version of the key is still on its way.
    tombstone_grace_s: u64 = 3600, Flag::Value;
    /// Seconds between compaction passes.
    compaction_interval_s: u64 = 10, Flag::Value;
    /// A sealed segment is rewritten once this share of its bytes is garbage (0 to 1).
    compaction_garbage_ratio: f64 = 0.5, Flag::Value;
    /// Compaction reads plus writes at most this many MiB per second, paced a 1 MiB window at a time.
    compaction_mb_per_s: u64 = 64, Flag::Value;
    /// Partition streams (handoff after a ring change) send at most this
    /// many MiB of keys and values per second from this node, shared by its
    /// shards; each shard streams one partition at a time.
    stream_mb_per_s: u64 = 32, Flag::Value;
    /// Shards of this node that may stream partitions at once (each streams
    /// one partition at a time).
    stream_concurrency: usize = 2, Flag::Value;

    // Authentication and connection limits (docs/SECURITY.md). Without
    // credentials a node listens on loopback addresses only.
    /// Shared by every node of the cluster; peers prove they know it (at
    /// least 16 bytes). The flag reads it from a file.
    cluster_secret: Option<String> = None, Flag::SecretFile("cluster-secret-file"), secret;
    /// Tokens a client may authenticate with (each at least 16 bytes). The
    /// flag reads them from a file, one per line.
    auth_tokens: Vec<String> = Vec::new(), Flag::SecretLines("auth-tokens-file"), secret;
    /// Users and their passwords a client may authenticate with, as a TOML
    /// table `[auth_users]` of `name = "password"`.
    auth_users: BTreeMap<String, String> = BTreeMap::new(), Flag::FileOnly, secret;
    /// A connection must finish its handshake within this many milliseconds.
    handshake_timeout_ms: u64 = 10_000, Flag::Value;
    /// A connection with nothing in flight that sends nothing for this many
    /// milliseconds is closed.
    idle_timeout_ms: u64 = 300_000, Flag::Value;
    /// Connections the node holds at once, over all its shards.
    max_connections: usize = 8192, Flag::Value;
    /// Response bytes a connection may leave unread; past them the node
    /// reads nothing more from it until they drain.
    max_output_buffer_bytes: usize = 16 << 20, Flag::Value;
    /// A connection whose pending responses cannot be written within this
    /// many milliseconds (the client does not read) is closed.
    write_stall_timeout_ms: u64 = 30_000, Flag::Value;

    // TLS (docs/SECURITY.md, "TLS"): off unless tls_cert is set, and then
    // on for every client port and every peer connection, both directions.
    /// PEM certificate chain the node presents to clients and peers. Set, the
    /// node speaks TLS only. It must name the node's IP address (an IP SAN),
    /// or tls_peer_server_name, and serve both as server and client
    /// certificate. Read at start-up: a new one needs a restart.
    tls_cert: Option<PathBuf> = None, Flag::Value;
    /// PEM private key of tls_cert.
    tls_key: Option<PathBuf> = None, Flag::Value;
    /// PEM bundle of the CAs whose certificates this node trusts: peers'
    /// (always checked, both directions) and clients' (when presented).
    /// Required with tls_cert.
    tls_ca: Option<PathBuf> = None, Flag::Value;
    /// Refuse clients that present no certificate signed by tls_ca (mutual TLS).
    tls_require_client_cert: bool = false, Flag::Switch("tls-require-client-cert");
    /// Check peers' certificates for this DNS name instead of their IP
    /// address (when every node's certificate carries one cluster-wide name).
    tls_peer_server_name: Option<String> = None, Flag::Value;

    // Operations (docs/OPERATIONS.md).
    /// Serve Prometheus metrics over HTTP on this address (GET /metrics);
    /// off when unset.
    metrics: Option<SocketAddr> = None, Flag::Value;
    /// How log lines are written: text for people, json (one object per
    /// line) for log shippers.
    log_format: LogFormat = LogFormat::Text, Flag::Env("RINGKV_LOG_FORMAT");
    /// Log client requests slower than this many milliseconds; 0: never.
    slow_request_ms: u64 = 1000, Flag::Value;
}

impl NodeConfig {
    pub fn from_toml_file(path: &Path) -> Result<NodeConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {}: {}", path.display(), e.message()))
    }

    pub fn shard_count(&self) -> usize {
        self.shards.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Checks every setting; the error is one line naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        keyspace::validate_partitions(self.partitions).map_err(|e| format!("partitions: {e}"))?;
        let shards = self.shard_count();
        if shards == 0 || shards > 256 {
            return Err(format!("shards must be between 1 and 256, got {shards}"));
        }
        if usize::from(self.listen.port()) + shards - 1 > usize::from(u16::MAX) {
            return Err(format!("listen port {} leaves no room for {shards} shard ports", self.listen.port()));
        }
        if self.listen.port() == 0 {
            return Err("listen port must not be 0: shard ports are derived from it".into());
        }
        if self.weight == 0 || self.weight > ringkv_core::ring::MAX_WEIGHT {
            return Err(format!("weight must be between 1 and {}, got {}", ringkv_core::ring::MAX_WEIGHT, self.weight));
        }
        if self.replicas == 0 || self.replicas > 16 {
            return Err(format!("replicas must be between 1 and 16, got {}", self.replicas));
        }
        if self.cluster.is_empty() || self.cluster.len() > 64 {
            return Err("cluster name must be 1 to 64 characters".into());
        }
        if self.max_pair_bytes == 0 || self.max_pair_bytes > MAX_PAIR_BYTES_LIMIT {
            return Err(format!(
                "max_pair_bytes must be between 1 and {MAX_PAIR_BYTES_LIMIT}, got {}",
                self.max_pair_bytes
            ));
        }
        if self.max_frame_bytes < self.max_pair_bytes + 4096 {
            return Err(format!(
                "max_frame_bytes ({}) must exceed max_pair_bytes ({}) by at least 4096",
                self.max_frame_bytes, self.max_pair_bytes
            ));
        }
        if self.segment_mb == 0 || self.segment_mb > 4000 {
            return Err(format!("segment_mb must be between 1 and 4000, got {}", self.segment_mb));
        }
        if self.anti_entropy_interval_s == 0 || self.handoff_interval_s == 0 || self.compaction_interval_s == 0 {
            return Err("anti_entropy_interval_s, handoff_interval_s and compaction_interval_s must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.compaction_garbage_ratio) {
            return Err(format!(
                "compaction_garbage_ratio must be between 0 and 1, got {}",
                self.compaction_garbage_ratio
            ));
        }
        if self.stream_mb_per_s == 0 || self.stream_concurrency == 0 {
            return Err("stream_mb_per_s and stream_concurrency must be positive".into());
        }
        if self.compaction_mb_per_s == 0 {
            return Err("compaction_mb_per_s must be positive".into());
        }
        if self.request_timeout_ms == 0 {
            return Err("request_timeout_ms must be positive".into());
        }
        if let Some(id) = &self.node_id {
            if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!("node id {id:?} must be 1 to 128 printable characters without spaces"));
            }
        }
        for s in &self.seeds {
            s.parse::<SocketAddr>().map_err(|_| format!("seed {s:?} is not an IP:PORT address"))?;
        }
        if let Some(metrics) = self.metrics {
            self.validate_metrics(metrics, shards)?;
        }
        self.validate_tls()?;
        self.validate_security()
    }

    /// Whether the node speaks TLS (on every port and to its peers).
    pub fn tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// Which `tls_*` settings go together; the files themselves are read
    /// at start-up (`crate::tls::NodeTls::load`).
    fn validate_tls(&self) -> Result<(), String> {
        let on = self.tls();
        let needs_cert =
            |setting: &str| format!("{setting} is set but tls_cert is not: TLS is on only with a certificate");
        if !on {
            if self.tls_key.is_some() {
                return Err(needs_cert("tls_key"));
            }
            if self.tls_ca.is_some() {
                return Err(needs_cert("tls_ca"));
            }
            if self.tls_require_client_cert {
                return Err(needs_cert("tls_require_client_cert"));
            }
            if self.tls_peer_server_name.is_some() {
                return Err(needs_cert("tls_peer_server_name"));
            }
            return Ok(());
        }
        if self.tls_key.is_none() {
            return Err("tls_cert needs tls_key, its private key".into());
        }
        if self.tls_ca.is_none() {
            return Err("tls_cert needs tls_ca: peers check each other's certificates against it".into());
        }
        if let Some(name) = &self.tls_peer_server_name {
            rustls::pki_types::ServerName::try_from(name.as_str())
                .map_err(|e| format!("tls_peer_server_name {name:?}: {e}"))?;
        }
        Ok(())
    }

    /// The metrics listener must not take one of the shards' ports.
    fn validate_metrics(&self, metrics: SocketAddr, shards: usize) -> Result<(), String> {
        let same_host =
            metrics.ip() == self.listen.ip() || metrics.ip().is_unspecified() || self.listen.ip().is_unspecified();
        let first = usize::from(self.listen.port());
        let last = first + shards - 1;
        if same_host && (first..=last).contains(&usize::from(metrics.port())) {
            return Err(format!("metrics address {metrics} takes one of the shard ports {first}..={last}"));
        }
        Ok(())
    }

    /// Whether connections of `role` must prove who they are: peers when a
    /// cluster secret is set, clients when tokens or users are.
    pub fn authenticates(&self, role: Role) -> bool {
        match role {
            Role::Peer => self.cluster_secret.is_some(),
            Role::Client => !self.auth_tokens.is_empty() || !self.auth_users.is_empty(),
        }
    }

    fn validate_security(&self) -> Result<(), String> {
        let (peers, clients) = (self.authenticates(Role::Peer), self.authenticates(Role::Client));
        let trusted_network = self.listen.ip().is_loopback();
        if !trusted_network && (!peers || !clients) {
            let missing = match (peers, clients) {
                (false, false) => "cluster_secret and client credentials (auth_tokens or auth_users)",
                (false, true) => "cluster_secret",
                _ => "client credentials (auth_tokens or auth_users)",
            };
            return Err(format!(
                "refusing to listen on {} without {missing}: see docs/SECURITY.md, or listen on a loopback address",
                self.listen.ip()
            ));
        }
        if clients && !peers {
            // Anyone may claim the peer role where peers need no proof, and
            // a peer may do everything a client may: the client check
            // would be for show.
            return Err("auth_tokens and auth_users need cluster_secret too: without it, anyone could skip them \
                        by connecting as a peer"
                .into());
        }
        if self.cluster_secret.as_ref().is_some_and(|s| s.len() < MIN_SECRET_BYTES) {
            return Err(format!("cluster_secret must be at least {MIN_SECRET_BYTES} bytes"));
        }
        if self.auth_tokens.iter().any(|t| t.len() < MIN_SECRET_BYTES) {
            return Err(format!("auth_tokens: every token must be at least {MIN_SECRET_BYTES} bytes"));
        }
        for (user, password) in &self.auth_users {
            if user.is_empty() || user.len() > 128 || user.chars().any(|c| c.is_control()) {
                return Err(format!("auth_users: user name {user:?} must be 1 to 128 printable characters"));
            }
            if password.is_empty() {
                return Err(format!("auth_users: user {user:?} has an empty password"));
            }
        }
        if self.handshake_timeout_ms == 0 || self.idle_timeout_ms == 0 || self.write_stall_timeout_ms == 0 {
            return Err("handshake_timeout_ms, idle_timeout_ms and write_stall_timeout_ms must be positive".into());
        }
        if self.max_connections == 0 || self.max_connections_per_shard == 0 || self.max_in_flight_per_connection == 0 {
            return Err(
                "max_connections, max_connections_per_shard and max_in_flight_per_connection must be positive".into()
            );
        }
        if self.max_output_buffer_bytes < self.max_frame_bytes {
            return Err(format!(
                "max_output_buffer_bytes ({}) must be at least max_frame_bytes ({}): one response must fit",
                self.max_output_buffer_bytes, self.max_frame_bytes
            ));
        }
        Ok(())
    }

    pub fn shard_addr(&self, shard: usize) -> SocketAddr {
        SocketAddr::new(self.listen.ip(), self.listen.port() + shard as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_documented_ones() {
        let c = NodeConfig::default();
        c.validate().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(c.data_dir, PathBuf::from("ringkv-data"));
        assert_eq!(c.max_pair_bytes, 10 * 1024);
    }

    #[test]
    fn toml_settings_use_the_flag_names() {
        let c: NodeConfig = toml::from_str(
            "node_id = \"n7\"\nlisten = \"127.0.0.7:9000\"\nshards = 2\nseeds = [\"127.0.0.1:9000\"]\nmax_pair_bytes = 2048\n",
        )
        .unwrap();
        assert_eq!(c.node_id.as_deref(), Some("n7"));
        assert_eq!(c.shard_addr(1).to_string(), "127.0.0.7:9001");
        assert_eq!(c.max_pair_bytes, 2048);
        c.validate().unwrap();
    }

    #[test]
    fn bad_settings_are_named_in_the_error() {
        assert!(toml::from_str::<NodeConfig>("shard = 2").is_err(), "unknown keys are refused");
        let bad = NodeConfig { partitions: 100, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("partitions"));
        let bad = NodeConfig { max_pair_bytes: 2 << 20, ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("max_pair_bytes"));
        let bad = NodeConfig { seeds: vec!["nowhere".into()], ..Default::default() };
        assert!(bad.validate().unwrap_err().contains("seed"));
    }

    const SECRET: &str = "0123456789abcdef";

    #[test]
    fn without_credentials_a_node_listens_on_loopback_only() {
        let public = NodeConfig { listen: "10.1.2.3:7070".parse().unwrap(), ..Default::default() };
        let e = public.validate().unwrap_err();
        assert_eq!(
            e,
            "refusing to listen on 10.1.2.3 without cluster_secret and client credentials (auth_tokens or \
             auth_users): see docs/SECURITY.md, or listen on a loopback address"
        );
        let any = NodeConfig { listen: "0.0.0.0:7070".parse().unwrap(), ..Default::default() };
        assert!(any.validate().is_err(), "the wildcard address is not loopback");
        // A secret alone is not enough: clients would still be anonymous.
        let half = NodeConfig { cluster_secret: Some(SECRET.into()), ..public.clone() };
        assert!(half.validate().unwrap_err().contains("without client credentials"));
        let tokens_only = NodeConfig { auth_tokens: vec![SECRET.into()], ..public.clone() };
        assert!(tokens_only.validate().unwrap_err().contains("without cluster_secret:"));
        // A secret alone is fine on loopback: peers are checked, local clients are not.
        NodeConfig { cluster_secret: Some(SECRET.into()), ..Default::default() }.validate().unwrap();
        NodeConfig { auth_tokens: vec![SECRET.into()], ..half.clone() }.validate().unwrap();
        let users = BTreeMap::from([("alice".to_string(), "pw".to_string())]);
        NodeConfig { auth_users: users, ..half }.validate().unwrap();
        // Every loopback address needs nothing.
        NodeConfig { listen: "127.0.0.5:7070".parse().unwrap(), ..Default::default() }.validate().unwrap();
        NodeConfig { listen: "[::1]:7070".parse().unwrap(), ..Default::default() }.validate().unwrap();
    }

    #[test]
    fn credentials_and_connection_limits_are_checked() {
        let short = NodeConfig { cluster_secret: Some("short".into()), ..Default::default() };
        assert!(short.validate().unwrap_err().contains("cluster_secret must be at least 16"));
        let empty = NodeConfig { cluster_secret: Some(String::new()), ..Default::default() };
        assert!(empty.validate().is_err(), "an empty secret is not 'no secret'");
        let token = NodeConfig { auth_tokens: vec![SECRET.into()], ..Default::default() };
        assert!(token.validate().unwrap_err().contains("need cluster_secret too"), "even on loopback");
        let secret = || Some(SECRET.to_string());
        let token = NodeConfig { auth_tokens: vec!["tok".into()], cluster_secret: secret(), ..Default::default() };
        assert!(token.validate().unwrap_err().contains("every token must be at least 16"));
        let users = |u: &str, p: &str| BTreeMap::from([(u.to_string(), p.to_string())]);
        let nameless = NodeConfig { auth_users: users("", "pw"), cluster_secret: secret(), ..Default::default() };
        assert!(nameless.validate().unwrap_err().contains("user name"));
        let open = NodeConfig { auth_users: users("bob", ""), cluster_secret: secret(), ..Default::default() };
        assert!(open.validate().unwrap_err().contains("\"bob\" has an empty password"));
        let zero = NodeConfig { handshake_timeout_ms: 0, ..Default::default() };
        assert!(zero.validate().unwrap_err().contains("handshake_timeout_ms"));
        let zero = NodeConfig { max_connections: 0, ..Default::default() };
        assert!(zero.validate().unwrap_err().contains("max_connections"));
        let small = NodeConfig { max_output_buffer_bytes: 1000, ..Default::default() };
        assert!(small.validate().unwrap_err().contains("max_output_buffer_bytes (1000)"));
    }

    #[test]
    fn every_setting_has_a_doc_a_toml_key_and_a_flag_form_that_round_trips() {
        let defaults = NodeConfig::default();
        let json = serde_json::to_value(&defaults).unwrap();
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        let settings = NodeConfig::settings();
        assert_eq!(settings.len(), keys.len(), "one row per field");
        for s in &settings {
            assert!(!s.doc_line().is_empty(), "{} has no doc", s.key);
            assert!(keys.contains(&s.key), "{} is not a TOML key", s.key);
            // A default a flag can spell reads back as the same default.
            if let (Some(d), Flag::Value | Flag::Env(_) | Flag::List(_)) = (&s.default, s.flag) {
                (s.check)(d).unwrap_or_else(|e| panic!("{}: default {d:?} does not parse: {e}", s.key));
                let mut c = NodeConfig::default();
                let values: Vec<String> = if matches!(s.flag, Flag::List(_)) {
                    d.split(',').map(String::from).collect()
                } else {
                    vec![d.clone()]
                };
                c.set_from_flag(s.key, &values).unwrap();
                assert_eq!(c, defaults, "{}", s.key);
            }
        }
        let flags: Vec<String> = settings.iter().filter_map(Setting::flag_name).collect();
        for kept in
            ["listen", "data-dir", "seeds", "no-pin", "cluster-secret-file", "auth-tokens-file", "max-connections"]
        {
            assert!(flags.iter().any(|f| f == kept), "--{kept} is gone");
        }
        let mut c = NodeConfig::default();
        c.set_from_flag("weight", &["5".into()]).unwrap();
        assert_eq!(c.weight, 5);
        assert_eq!(
            c.set_from_flag("weight", &["five".into()]).unwrap_err(),
            "weight: \"five\" is not a whole number up to 4294967295"
        );
        assert!(c.set_from_flag("wieght", &["5".into()]).is_err());
    }

    #[test]
    fn debug_output_redacts_secrets() {
        let c = NodeConfig {
            cluster_secret: Some("the-cluster-secret-0123".into()),
            auth_tokens: vec!["a-client-token-0123456".into()],
            auth_users: BTreeMap::from([("alice".to_string(), "wonderland".to_string())]),
            ..Default::default()
        };
        let shown = format!("{c:?}");
        for secret in ["the-cluster-secret", "a-client-token", "alice", "wonderland"] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(shown.contains("cluster_secret: <redacted>") && shown.contains("listen: 127.0.0.1:7070"), "{shown}");
        // Unset secrets show as unset, so a reader can tell they are off.
        let plain = format!("{:?}", NodeConfig::default());
        assert!(plain.contains("cluster_secret: None") && !plain.contains("redacted"), "{plain}");
    }

    #[test]
    fn tls_settings_go_together_or_are_named_in_the_error() {
        let pem = |name: &str| Some(PathBuf::from(format!("/etc/ringkv/{name}.pem")));
        let on =
            NodeConfig { tls_cert: pem("node"), tls_key: pem("node-key"), tls_ca: pem("ca"), ..Default::default() };
        on.validate().unwrap();
        assert!(on.tls() && !NodeConfig::default().tls(), "TLS is on with a certificate only");
        NodeConfig { tls_require_client_cert: true, tls_peer_server_name: Some("db.internal".into()), ..on.clone() }
            .validate()
            .unwrap();
        let cases = [
            (NodeConfig { tls_ca: None, ..on.clone() }, "tls_cert needs tls_ca"),
            (NodeConfig { tls_key: None, ..on.clone() }, "tls_cert needs tls_key"),
            (NodeConfig { tls_key: pem("k"), ..Default::default() }, "tls_key is set but tls_cert is not"),
            (NodeConfig { tls_ca: pem("ca"), ..Default::default() }, "tls_ca is set but tls_cert is not"),
            (NodeConfig { tls_require_client_cert: true, ..Default::default() }, "tls_require_client_cert is set"),
            (
                NodeConfig { tls_peer_server_name: Some("x".into()), ..Default::default() },
                "tls_peer_server_name is set",
            ),
            (NodeConfig { tls_peer_server_name: Some("not a name!".into()), ..on.clone() }, "tls_peer_server_name \""),
        ];
        for (cfg, expected) in cases {
            let e = cfg.validate().unwrap_err();
            assert!(e.contains(expected), "{expected}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
        let c: NodeConfig = toml::from_str(
            "tls_cert = \"/n.pem\"\ntls_key = \"/k.pem\"\ntls_ca = \"/ca.pem\"\ntls_require_client_cert = true\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert!(c.tls_require_client_cert);
    }

    #[test]
    fn operations_settings_are_read_and_checked() {
        let c: NodeConfig =
            toml::from_str("metrics = \"127.0.0.1:9100\"\nlog_format = \"json\"\nslow_request_ms = 0\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.metrics, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.slow_request_ms, 0);
        let d = NodeConfig::default();
        assert_eq!((d.metrics, d.log_format, d.slow_request_ms), (None, LogFormat::Text, 1000));
        assert!(toml::from_str::<NodeConfig>("log_format = \"xml\"").is_err());
        let clash = NodeConfig { shards: Some(2), metrics: Some("127.0.0.1:7071".parse().unwrap()), ..d.clone() };
        assert_eq!(
            clash.validate().unwrap_err(),
            "metrics address 127.0.0.1:7071 takes one of the shard ports 7070..=7071"
        );
        let wildcard = NodeConfig { metrics: Some("0.0.0.0:7070".parse().unwrap()), ..d.clone() };
        assert!(wildcard.validate().is_err());
        NodeConfig { metrics: Some("127.0.0.2:7070".parse().unwrap()), ..d }.validate().unwrap();
    }

    #[test]
    fn credentials_come_from_toml_and_say_which_roles_authenticate() {
        let c: NodeConfig = toml::from_str(&format!(
            "listen = \"10.0.0.1:7070\"\ncluster_secret = \"{SECRET}\"\n[auth_users]\nalice = \"pw\"\n"
        ))
        .unwrap();
        c.validate().unwrap();
        assert!(c.authenticates(Role::Peer) && c.authenticates(Role::Client));
        let d = NodeConfig::default();
        assert!(!d.authenticates(Role::Peer) && !d.authenticates(Role::Client));
    }
}
