//! Command-line definitions (DESIGN section 10).

use clap::{Args, Parser, Subcommand, ValueEnum};
use ringkv_core::autoscale::AutoscaleConfig;
use ringkv_net::Level;
use std::path::PathBuf;

pub use crate::server_args::ServerArgs;

#[derive(Parser)]
#[command(name = "ringkv", version, about = "ringkv: a Dynamo-style distributed key-value store")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a node in the foreground. Every setting is also a TOML key of
    /// --config FILE; docs/CONFIG.md lists them.
    Server(Box<ServerArgs>),
    /// Print the configuration reference (docs/CONFIG.md), generated from
    /// the settings' declarations.
    ConfigReference,
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
    /// Scale the cluster from its load: add nodes when it runs hot, remove
    /// one when it has been quiet, through a provisioner (docs/ELASTICITY.md).
    Autoscale(Box<AutoscaleArgs>),
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
    /// Speak TLS, trusting the CAs of this PEM bundle (nodes with `tls_cert`).
    #[arg(long, env = ringkv_net::tls::CA_ENV)]
    pub tls_ca: Option<PathBuf>,
    /// Present this PEM certificate (nodes with `tls_require_client_cert`);
    /// needs --tls-key.
    #[arg(long, env = ringkv_net::tls::CERT_ENV, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = ringkv_net::tls::KEY_ENV, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Check the node's certificate for this DNS name instead of the
    /// endpoint's IP address.
    #[arg(long, env = ringkv_net::tls::SERVER_NAME_ENV)]
    pub tls_server_name: Option<String>,
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

/// How the autoscaler starts and stops machines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProvisionerKind {
    /// `ringkv server` processes on the next free 127.0.0.x address (development, tests).
    Local,
    /// The operator's own scripts (--add-cmd, --remove-cmd).
    Command,
}

fn policy_default() -> AutoscaleConfig {
    AutoscaleConfig::default()
}

#[derive(Args, Debug, Clone)]
pub struct AutoscaleArgs {
    /// A member to read the cluster's load from (others are found from it).
    #[command(flatten)]
    pub endpoint: Endpoint,
    #[arg(long, value_enum, default_value_t = ProvisionerKind::Local)]
    pub provisioner: ProvisionerKind,
    /// Command provisioner: run with `sh -c`, with $RINGKV_NODE_ID and $RINGKV_SEEDS;
    /// it starts a node and prints its IP:PORT on its last line.
    #[arg(long)]
    pub add_cmd: Option<String>,
    /// Command provisioner: run with $RINGKV_NODE_ID and $RINGKV_ADDR once the
    /// node has left; it stops the machine.
    #[arg(long)]
    pub remove_cmd: Option<String>,
    /// Command provisioner: the policy may pick any member to remove, not only
    /// the ones this controller added.
    #[arg(long)]
    pub remove_any: bool,
    /// A provisioner command that runs longer than this is killed and retried.
    #[arg(long, default_value_t = 300)]
    pub command_timeout_s: u64,
    /// Local provisioner: where new nodes keep their data and logs (and the
    /// controller its state).
    #[arg(long, default_value = "ringkv-autoscale")]
    pub local_dir: PathBuf,
    /// Local provisioner: the port new nodes listen on.
    #[arg(long, default_value_t = 7070)]
    pub local_port: u16,
    #[arg(long, default_value_t = 1)]
    pub local_shards: u16,
    /// Local provisioner: one more argument for `ringkv server` (repeat it).
    #[arg(long, allow_hyphen_values = true)]
    pub server_arg: Vec<String>,
    /// Names of new nodes: this prefix and a number.
    #[arg(long, default_value = "auto")]
    pub name_prefix: String,
    /// The controller's state (what it started, a remove in progress)
    /// [default: LOCAL_DIR/autoscale.json].
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// The busy share of the shards to run at.
    #[arg(long, default_value_t = policy_default().target_cpu)]
    pub target_cpu: f64,
    /// Hold while utilisation is within this share of the target.
    #[arg(long, default_value_t = policy_default().tolerance)]
    pub tolerance: f64,
    /// Add a node while the mean p99 is above this many µs.
    #[arg(long)]
    pub max_p99_us: Option<u64>,
    /// Load must be high this long before nodes are added.
    #[arg(long, default_value_t = policy_default().scale_out_window_ms / 1000)]
    pub scale_out_window_s: u64,
    /// Load must be low this long before a node is removed.
    #[arg(long, default_value_t = policy_default().scale_in_window_ms / 1000)]
    pub scale_in_window_s: u64,
    /// Nothing changes this long after a change.
    #[arg(long, default_value_t = policy_default().cooldown_ms / 1000)]
    pub cooldown_s: u64,
    #[arg(long, default_value_t = policy_default().min_nodes)]
    pub min_nodes: usize,
    #[arg(long, default_value_t = policy_default().max_nodes)]
    pub max_nodes: usize,
    /// The cluster's N: it never shrinks below it.
    #[arg(long, default_value_t = policy_default().replicas)]
    pub replicas: usize,
    /// Seconds between readings.
    #[arg(long, default_value_t = 5)]
    pub interval_s: u64,
    /// Print decisions, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Stop after this many readings (default: run until killed).
    #[arg(long)]
    pub max_rounds: Option<u64>,
    /// Stop after this many seconds (default: run until killed).
    #[arg(long)]
    pub duration_s: Option<u64>,
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
    /// Print the documented JSON (docs/OPERATIONS.md) instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Refresh every this many seconds, in place, until interrupted.
    #[arg(long, num_args = 0..=1, default_missing_value = "2")]
    pub watch: Option<u64>,
}
