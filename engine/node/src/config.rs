//! A node's settings: defaults, TOML loading and validation.
//!
//! Every setting can come from a TOML file (`--config`) and be overridden by
//! a command-line flag; the names are the same in both (flags use dashes).

use ringkv_core::keyspace::{self, DEFAULT_MAX_PAIR_BYTES, DEFAULT_PARTITIONS, MAX_PAIR_BYTES_LIMIT};
use ringkv_net::frame::DEFAULT_MAX_FRAME_BYTES;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const DEFAULT_PORT: u16 = 7070;

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
        if self.stream_mb_per_s == 0 {
            return Err("stream_mb_per_s must be positive".into());
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
}
