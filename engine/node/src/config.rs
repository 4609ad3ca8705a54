//! A node's settings: defaults, TOML loading and validation.
//!
//! Every setting can come from a TOML file (`--config`) and be overridden by
//! a command-line flag; the names are the same in both (flags use dashes).

use ringkv_core::keyspace::{self, DEFAULT_MAX_PAIR_BYTES, DEFAULT_PARTITIONS, MAX_PAIR_BYTES_LIMIT};
use ringkv_net::frame::DEFAULT_MAX_FRAME_BYTES;
use ringkv_net::proto::Role;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_PORT: u16 = 7070;

/// The shortest cluster secret or client token accepted: shorter ones could
/// be guessed by trying them against a recorded exchange offline.
pub const MIN_SECRET_BYTES: usize = 16;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Unique name of the node; defaults to the one in the data directory,
    /// or to the listen address for a new directory.
    pub node_id: Option<String>,
    /// Address of shard 0; shard i listens on port + i.
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Other nodes to join through, as IP:PORT.
    pub seeds: Vec<String>,
    /// Shards (executors, one per core); defaults to the number of cores.
    pub shards: Option<usize>,
    /// Relative capacity: partitions are claimed in proportion to it.
    pub weight: u32,
    pub cluster: String,
    /// Q, fixed when the cluster is created.
    pub partitions: u32,
    /// N, the replication factor.
    pub replicas: usize,
    pub max_pair_bytes: usize,
    pub max_frame_bytes: usize,
    pub segment_mb: u64,
    /// Record cache per shard.
    pub cache_mb: usize,
    pub request_timeout_ms: u64,
    /// Pin each shard's thread to a core.
    pub pin_cpus: bool,
    /// First core to pin to (shard i goes to core (offset + i) mod cores), so
    /// several nodes on one machine can be spread out.
    pub cpu_offset: usize,
    pub max_connections_per_shard: usize,
    pub max_in_flight_per_connection: usize,
    /// Hints (writes held for unreachable replicas) a shard keeps at most.
    pub max_hints_per_shard: u64,
    /// Seconds between anti-entropy passes over a shard's partitions.
    pub anti_entropy_interval_s: u64,
    /// Seconds between hinted-handoff attempts.
    pub handoff_interval_s: u64,
    /// A tombstone is purged once every replica holds it and it is this
    /// old: longer than hints and partitions are expected to last, so no
    /// older version of the key is still on its way.
    pub tombstone_grace_s: u64,
    /// Seconds between compaction passes.
    pub compaction_interval_s: u64,
    /// A sealed segment is rewritten once this share of its bytes is garbage.
    pub compaction_garbage_ratio: f64,
    /// Compaction reads plus writes at most this many MiB per second.
    pub compaction_mb_per_s: u64,
    /// Partition streams (handoff after a ring change) send at most this
    /// many MiB of keys and values per second from this node, shared by its
    /// shards; each shard streams one partition at a time.
    pub stream_mb_per_s: u64,
    /// Shards of this node that may stream partitions at once (each streams
    /// one partition at a time).
    pub stream_concurrency: usize,
    /// Serve Prometheus metrics over HTTP on this address (GET /metrics);
    /// off when unset.
    pub metrics: Option<SocketAddr>,
    /// Log client requests slower than this many ms; 0: never.
    pub slow_request_ms: u64,

    // Authentication and connection limits (docs/SECURITY.md). Without
    // credentials a node listens on loopback addresses only.
    /// Shared by every node of the cluster; peers prove they know it.
    pub cluster_secret: Option<String>,
    /// Tokens a client may authenticate with.
    pub auth_tokens: Vec<String>,
    /// Users and their passwords a client may authenticate with.
    pub auth_users: BTreeMap<String, String>,
    /// A connection must finish its handshake within this long.
    pub handshake_timeout_ms: u64,
    /// A connection with nothing in flight that sends nothing this long is closed.
    pub idle_timeout_ms: u64,
    /// Connections the node holds at once, over all its shards.
    pub max_connections: usize,
    /// Response bytes a connection may leave unread; past them the node
    /// reads nothing more from it until they drain.
    pub max_output_buffer_bytes: usize,
    /// A connection whose pending responses cannot be written within this
    /// long (the client does not read) is closed.
    pub write_stall_timeout_ms: u64,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            node_id: None,
            listen: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            data_dir: PathBuf::from("ringkv-data"),
            seeds: Vec::new(),
            shards: None,
            weight: 1,
            cluster: ringkv_net::client::DEFAULT_CLUSTER.to_string(),
            partitions: DEFAULT_PARTITIONS,
            replicas: 3,
            max_pair_bytes: DEFAULT_MAX_PAIR_BYTES,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            segment_mb: 64,
            cache_mb: 64,
            request_timeout_ms: 5_000,
            pin_cpus: true,
            cpu_offset: 0,
            max_connections_per_shard: 4096,
            max_in_flight_per_connection: 1024,
            max_hints_per_shard: 1_000_000,
            anti_entropy_interval_s: 60,
            tombstone_grace_s: 3600,
            handoff_interval_s: 3,
            compaction_interval_s: 10,
            compaction_garbage_ratio: 0.5,
            compaction_mb_per_s: 64,
            stream_mb_per_s: 32,
            stream_concurrency: 2,
            metrics: None,
            slow_request_ms: 1000,
            cluster_secret: None,
            auth_tokens: Vec::new(),
            auth_users: BTreeMap::new(),
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            max_connections: 8192,
            max_output_buffer_bytes: 16 << 20,
            write_stall_timeout_ms: 30_000,
        }
    }
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
        self.validate_security()
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
