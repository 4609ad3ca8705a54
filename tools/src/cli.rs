//! Command-line definitions (DESIGN section 10).

use clap::{Args, Parser, Subcommand};
use ringkv_net::Level;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "ringkv", version, about = "ringkv: a Dynamo-style distributed key-value store")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a node in the foreground.
    Server(Box<ServerArgs>),
    /// Write a value (VALUE, or - to read it from stdin).
    Put(PutArgs),
    /// Read a key's value(s); exits 1 when the key is not found.
    Get(GetArgs),
    /// Delete a key.
    Delete(DeleteArgs),
    /// Show the cluster as the node sees it: members, states, ownership, load.
    Status(StatusArgs),
    /// Run anti-entropy now: compare this node's partitions with their other
    /// replicas and exchange the keys that differ; reports what it did.
    Repair(RepairArgs),
    /// Verify a stopped node's data directory offline: segments, checksums,
    /// hint files, live and garbage bytes. Exits non-zero on damage.
    Inspect(InspectArgs),
    /// Stage the decommission of the node at --endpoint: its partitions move
    /// to their new owners, then it stops. Shows the plan; `commit` applies.
    Leave(StageArgs),
    /// Stage the removal of a dead node: survivors make new replicas of its
    /// partitions. Shows the plan; `commit` applies.
    Remove(RemoveArgs),
    /// Stage a new weight (share of the partitions) for a node.
    Weight(WeightArgs),
    /// Show the ring change staged on --endpoint, recomputed now.
    Plan(RingArgs),
    /// Apply the staged ring change (--wait: until its streams finish).
    Commit(RingArgs),
    /// Forget the staged ring change.
    Cancel(RingArgs),
    /// Manage a local development cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
}

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// Start N nodes on 127.0.0.1..127.0.0.N in the foreground; Ctrl-C stops them.
    Up(ClusterUpArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ClusterUpArgs {
    /// How many nodes.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Where the nodes keep their data and logs.
    #[arg(long, default_value = "ringkv-cluster")]
    pub dir: PathBuf,
    /// The port every node listens on (each on its own 127.0.0.x address).
    #[arg(long, default_value_t = 7070)]
    pub port: u16,
    /// Shards per node (one core each; small by default so that several
    /// nodes share a small machine).
    #[arg(long, default_value_t = 1)]
    pub shards: usize,
    /// Replication factor N.
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Do not pin the nodes' shards to cores (leave placement to the OS, or
    /// to taskset around this command).
    #[arg(long)]
    pub no_pin: bool,
}

#[derive(Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// Unique node name (default: the one stored in the data directory, or
    /// the listen address for a new one).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Address of shard 0; shard i listens on port + i [default: 127.0.0.1:7070].
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Where the node keeps its data [default: ./ringkv-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Nodes to join through, as IP:PORT,IP:PORT.
    #[arg(long, value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// Shards (one per core) [default: number of cores].
    #[arg(long)]
    pub shards: Option<usize>,
    /// Relative capacity of this node [default: 1].
    #[arg(long)]
    pub weight: Option<u32>,
    /// A TOML file with any of these settings (flags override it).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Cluster name; clients and peers must use the same [default: ringkv].
    #[arg(long)]
    pub cluster: Option<String>,
    /// Partitions of the hash ring, fixed at cluster creation [default: 256].
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Replication factor N [default: 3].
    #[arg(long)]
    pub replicas: Option<usize>,
    /// Largest key plus value accepted, in bytes [default: 10240].
    #[arg(long)]
    pub max_pair_bytes: Option<usize>,
    /// Size of each log segment file, in MiB [default: 64].
    #[arg(long)]
    pub segment_mb: Option<u64>,
    /// Record cache per shard, in MiB [default: 64].
    #[arg(long)]
    pub cache_mb: Option<usize>,
    /// Default request timeout [default: 5000].
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// Do not pin shard threads to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// First core to pin shard 0 to [default: 0].
    #[arg(long)]
    pub cpu_offset: Option<usize>,
    /// Seconds between anti-entropy passes [default: 60].
    #[arg(long)]
    pub anti_entropy_interval_s: Option<u64>,
    /// Seconds between hinted-handoff attempts [default: 3].
    #[arg(long)]
    pub handoff_interval_s: Option<u64>,
    /// Seconds a tombstone is kept after every replica has it [default: 3600].
    #[arg(long)]
    pub tombstone_grace_s: Option<u64>,
    /// Hints a shard holds at most for unreachable replicas [default: 1000000].
    #[arg(long)]
    pub max_hints_per_shard: Option<u64>,
    /// Seconds between compaction passes [default: 10].
    #[arg(long)]
    pub compaction_interval_s: Option<u64>,
    /// Rewrite a sealed segment once this share of it is garbage [default: 0.5].
    #[arg(long)]
    pub compaction_garbage_ratio: Option<f64>,
    /// Compaction I/O budget in MiB/s [default: 64].
    #[arg(long)]
    pub compaction_mb_per_s: Option<u64>,
    /// Partition stream budget of the node in MiB/s [default: 32].
    #[arg(long)]
    pub stream_mb_per_s: Option<u64>,
    /// File holding the cluster secret that peers prove (docs/SECURITY.md).
    #[arg(long)]
    pub cluster_secret_file: Option<PathBuf>,
    /// File of tokens clients may authenticate with, one per line.
    #[arg(long)]
    pub auth_tokens_file: Option<PathBuf>,
    /// A connection must finish its handshake within this long [default: 10000].
    #[arg(long)]
    pub handshake_timeout_ms: Option<u64>,
    /// Close a connection with nothing in flight that is silent this long [default: 300000].
    #[arg(long)]
    pub idle_timeout_ms: Option<u64>,
    /// Connections the node holds at once [default: 8192].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Requests in flight per connection; more get Overloaded [default: 1024].
    #[arg(long)]
    pub max_in_flight_per_connection: Option<usize>,
    /// Unwritten response bytes per connection before it is no longer read [default: 16777216].
    #[arg(long)]
    pub max_output_buffer_bytes: Option<usize>,
    /// Close a connection whose responses cannot be written this long [default: 30000].
    #[arg(long)]
    pub write_stall_timeout_ms: Option<u64>,
}

#[derive(Args, Debug, Clone)]
pub struct Endpoint {
    /// The node that coordinates the request.
    #[arg(long, env = "RINGKV_ENDPOINT", default_value = "127.0.0.1:7070")]
    pub endpoint: String,
    /// Cluster name to present to the node.
    #[arg(long, env = "RINGKV_CLUSTER", default_value = "ringkv")]
    pub cluster: String,
    /// Give up after this long.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// Authenticate with this token (nodes with `auth_tokens`).
    #[arg(long, env = ringkv_net::auth::TOKEN_ENV, hide_env_values = true)]
    pub token: Option<String>,
    /// Authenticate as this user; the password comes from $RINGKV_PASSWORD.
    #[arg(long, env = ringkv_net::auth::USER_ENV)]
    pub user: Option<String>,
}

#[derive(Args)]
pub struct PutArgs {
    pub key: String,
    /// The value, or - to read it (binary-safe) from stdin.
    pub value: String,
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Write quorum: one, quorum, all or a count [default: quorum].
    #[arg(long)]
    pub w: Option<Level>,
    /// Context from an earlier get (--json): replaces the values that read saw.
    #[arg(long)]
    pub context: Option<String>,
    /// Acknowledge before the write is on disk.
    #[arg(long)]
    pub no_sync: bool,
    /// Print the new version's context as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct GetArgs {
    pub key: String,
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Read quorum: one, quorum, all or a count [default: quorum].
    #[arg(long)]
    pub r: Option<Level>,
    /// Print {"key", "values", "context", "encoding"} instead of raw values.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct DeleteArgs {
    pub key: String,
    #[command(flatten)]
    pub endpoint: Endpoint,
    #[arg(long)]
    pub w: Option<Level>,
    /// Context from an earlier get: delete exactly what that read saw.
    #[arg(long)]
    pub context: Option<String>,
}

#[derive(Args)]
pub struct InspectArgs {
    /// The node's data directory.
    pub dir: PathBuf,
    #[arg(long)]
    pub json: bool,
    /// List every segment, not only a per-shard summary.
    #[arg(long)]
    pub segments: bool,
}

#[derive(Args)]
pub struct StageArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Print the plan as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RemoveArgs {
    /// The dead node's id.
    pub id: String,
    #[command(flatten)]
    pub stage: StageArgs,
}

#[derive(Args)]
pub struct WeightArgs {
    /// The node's id.
    pub id: String,
    /// Its new weight (1..=10000; shares are proportional to weights).
    pub weight: u32,
    #[command(flatten)]
    pub stage: StageArgs,
}

#[derive(Args)]
pub struct RingArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    #[arg(long)]
    pub json: bool,
    /// After a commit, wait for the partitions to finish moving, with progress.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 3600)]
    pub wait_s: u64,
}

#[derive(Args)]
pub struct RepairArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Only this partition (default: every partition the node replicates).
    #[arg(long)]
    pub partition: Option<u32>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    #[arg(long)]
    pub json: bool,
}
