//! Typed protocol messages and their flatbuffer encoding.
//!
//! The rest of ringkv speaks [`Message`]; only this module touches the
//! generated flatbuffer code. Decoding always runs the flatbuffer verifier with
//! limits sized to our messages ([`DecodeLimits`]): network input is never
//! trusted, and a message that fails verification is an error, not a panic.

use crate::frame;
use crate::generated as fb;
use flatbuffers::{FlatBufferBuilder, VerifierOptions, WIPOffset};
use thiserror::Error;

/// "RKV1" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"RKV1");
pub const PROTOCOL_VERSION: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Peer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub magic: u32,
    pub protocol_version: u16,
    pub role: Role,
    pub cluster: String,
    pub node_id: String,
    pub credentials: Vec<u8>,
    /// Set when the sender can answer a [`Challenge`]: its half of the
    /// nonces the proof covers (see [`crate::auth`]).
    pub auth_nonce: Vec<u8>,
    /// The user a client authenticates as; empty for a token (or a peer).
    pub user: String,
}

/// A node's answer to a hello that must authenticate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    pub nonce: Vec<u8>,
    /// For a peer: the node's own proof of the cluster secret; else empty.
    pub proof: Vec<u8>,
}

impl Hello {
    pub fn client(cluster: &str) -> Hello {
        Hello {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            role: Role::Client,
            cluster: cluster.to_string(),
            node_id: String::new(),
            credentials: Vec::new(),
            auth_nonce: Vec::new(),
            user: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub protocol_version: u16,
    pub node_id: String,
    pub shard: u16,
    pub shards: u16,
    pub cluster: String,
}

/// What went wrong, as the wire names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    Internal,
    BadRequest,
    PairTooLarge,
    Unavailable,
    Timeout,
    Overloaded,
    Storage,
    UnknownMessage,
    ProtocolMismatch,
    ClusterMismatch,
    StaleTopology,
    FrameTooLarge,
    MalformedFrame,
    /// Missing or wrong credentials, or a request the connection's role may
    /// not send.
    Unauthorized,
}

impl ErrorCode {
    /// Every code this build knows, for tallies by kind.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::Internal,
        ErrorCode::BadRequest,
        ErrorCode::PairTooLarge,
        ErrorCode::Unavailable,
        ErrorCode::Timeout,
        ErrorCode::Overloaded,
        ErrorCode::Storage,
        ErrorCode::UnknownMessage,
        ErrorCode::ProtocolMismatch,
        ErrorCode::ClusterMismatch,
        ErrorCode::StaleTopology,
        ErrorCode::FrameTooLarge,
        ErrorCode::MalformedFrame,
        ErrorCode::Unauthorized,
    ];

    /// Its place in [`ErrorCode::ALL`]. Exhaustive, so a new code does not
    /// compile until it has a place; the test checks `ALL` has it there.
    pub fn index(self) -> usize {
        match self {
            ErrorCode::Internal => 0,
            ErrorCode::BadRequest => 1,
            ErrorCode::PairTooLarge => 2,
            ErrorCode::Unavailable => 3,
            ErrorCode::Timeout => 4,
            ErrorCode::Overloaded => 5,
            ErrorCode::Storage => 6,
            ErrorCode::UnknownMessage => 7,
            ErrorCode::ProtocolMismatch => 8,
            ErrorCode::ClusterMismatch => 9,
            ErrorCode::StaleTopology => 10,
            ErrorCode::FrameTooLarge => 11,
            ErrorCode::MalformedFrame => 12,
            ErrorCode::Unauthorized => 13,
        }
    }

    fn to_fb(self) -> fb::ErrorCode {
        match self {
            ErrorCode::Internal => fb::ErrorCode::Internal,
            ErrorCode::BadRequest => fb::ErrorCode::BadRequest,
            ErrorCode::PairTooLarge => fb::ErrorCode::PairTooLarge,
            ErrorCode::Unavailable => fb::ErrorCode::Unavailable,
            ErrorCode::Timeout => fb::ErrorCode::Timeout,
            ErrorCode::Overloaded => fb::ErrorCode::Overloaded,
            ErrorCode::Storage => fb::ErrorCode::Storage,
            ErrorCode::UnknownMessage => fb::ErrorCode::UnknownMessage,
            ErrorCode::ProtocolMismatch => fb::ErrorCode::ProtocolMismatch,
            ErrorCode::ClusterMismatch => fb::ErrorCode::ClusterMismatch,
            ErrorCode::StaleTopology => fb::ErrorCode::StaleTopology,
            ErrorCode::FrameTooLarge => fb::ErrorCode::FrameTooLarge,
            ErrorCode::MalformedFrame => fb::ErrorCode::MalformedFrame,
            ErrorCode::Unauthorized => fb::ErrorCode::Unauthorized,
        }
    }

    fn from_fb(c: fb::ErrorCode) -> ErrorCode {
        match c {
            fb::ErrorCode::BadRequest => ErrorCode::BadRequest,
            fb::ErrorCode::PairTooLarge => ErrorCode::PairTooLarge,
            fb::ErrorCode::Unavailable => ErrorCode::Unavailable,
            fb::ErrorCode::Timeout => ErrorCode::Timeout,
            fb::ErrorCode::Overloaded => ErrorCode::Overloaded,
            fb::ErrorCode::Storage => ErrorCode::Storage,
            fb::ErrorCode::UnknownMessage => ErrorCode::UnknownMessage,
            fb::ErrorCode::ProtocolMismatch => ErrorCode::ProtocolMismatch,
            fb::ErrorCode::ClusterMismatch => ErrorCode::ClusterMismatch,
            fb::ErrorCode::StaleTopology => ErrorCode::StaleTopology,
            fb::ErrorCode::FrameTooLarge => ErrorCode::FrameTooLarge,
            fb::ErrorCode::MalformedFrame => ErrorCode::MalformedFrame,
            fb::ErrorCode::Unauthorized => ErrorCode::Unauthorized,
            // Internal, and codes from a newer peer that we do not know.
            _ => ErrorCode::Internal,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::Internal => "Internal",
            ErrorCode::BadRequest => "BadRequest",
            ErrorCode::PairTooLarge => "PairTooLarge",
            ErrorCode::Unavailable => "Unavailable",
            ErrorCode::Timeout => "Timeout",
            ErrorCode::Overloaded => "Overloaded",
            ErrorCode::Storage => "Storage",
            ErrorCode::UnknownMessage => "UnknownMessage",
            ErrorCode::ProtocolMismatch => "ProtocolMismatch",
            ErrorCode::ClusterMismatch => "ClusterMismatch",
            ErrorCode::StaleTopology => "StaleTopology",
            ErrorCode::FrameTooLarge => "FrameTooLarge",
            ErrorCode::MalformedFrame => "MalformedFrame",
            ErrorCode::Unauthorized => "Unauthorized",
        }
    }
}

/// An error as carried on the wire: a code and a human-readable line.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}: {message}", code.name())]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> WireError {
        WireError { code, message: message.into() }
    }
}

/// A read or write quorum as requested by a client (defined by the core,
/// which decides what each level needs).
pub use ringkv_core::quorum::Level;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Get {
        key: Vec<u8>,
        r: Level,
    },
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        context: Vec<u8>,
        w: Level,
        durable: Option<bool>,
    },
    Delete {
        key: Vec<u8>,
        context: Vec<u8>,
        w: Level,
        durable: Option<bool>,
    },
    Ping {
        payload: Vec<u8>,
    },
    NodeInfo,
    Topology,
    /// Merge `object` (canonical object bytes) into the receiver's replica,
    /// or hold it as a hint for `hint_for` when that is not empty.
    ReplicaWrite {
        key: Vec<u8>,
        object: Vec<u8>,
        durable: bool,
        hint_for: String,
    },
    /// The receiver's own replica of `key`.
    ReplicaRead {
        key: Vec<u8>,
    },
    /// The receiver's own copy of `key`, answered like a get (values and
    /// context), for a client that asks r replicas itself and compares the
    /// answers (client-driven reads, docs/PROTOCOL.md). Refused with
    /// `StaleTopology` unless the receiver is one of the key's replicas and
    /// the key's partition is not moving.
    GetCopy {
        key: Vec<u8>,
    },
    Gossip {
        state: Vec<u8>,
    },
    Handoff {
        partition: u32,
        entries: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// Root and segment hashes (no segments given) or the leaves of `segments`.
    Merkle {
        partition: u32,
        segments: Vec<u32>,
    },
    Keys {
        partition: u32,
        leaves: Vec<u32>,
    },
    ReadBatch {
        keys: Vec<Vec<u8>>,
    },
    /// Anti-entropy now: one partition, or all this node replicates.
    Repair {
        partition: Option<u32>,
    },
    MerkleRoots,
    /// Drop the receiver's tombstone of `key` if its replica is exactly
    /// `object` (canonical bytes): every replica holds it, past the grace.
    Purge {
        key: Vec<u8>,
        object: Vec<u8>,
    },
    /// Stage, show, commit or cancel a ring change, or (from the node that
    /// commits it) apply one to the node it concerns.
    RingChange {
        action: RingAction,
        change: Option<RingChange>,
    },
}

/// A ring change (defined by the core's planner).
pub use ringkv_core::plan::Change as RingChange;

/// What a ring-change request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingAction {
    /// The staged change and its plan, recomputed now.
    Show,
    /// Plans the change and keeps it, staged, on the node asked.
    Stage,
    /// Makes the staged change.
    Commit,
    /// Forgets the staged change.
    Cancel,
    /// Makes the change now, on the node it concerns.
    Apply,
}

impl RingAction {
    fn code(self) -> u8 {
        match self {
            RingAction::Show => 0,
            RingAction::Stage => 1,
            RingAction::Commit => 2,
            RingAction::Cancel => 3,
            RingAction::Apply => 4,
        }
    }

    fn from_code(c: u8) -> Option<RingAction> {
        Some(match c {
            0 => RingAction::Show,
            1 => RingAction::Stage,
            2 => RingAction::Commit,
            3 => RingAction::Cancel,
            4 => RingAction::Apply,
            _ => return None,
        })
    }
}

/// What one anti-entropy run compared and moved (defined by the core's
/// repair machine).
pub use ringkv_core::antientropy::RepairReport;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRoot {
    pub partition: u32,
    pub root: u64,
    pub keys: u64,
    pub last_sync_ms: u64,
}

impl Request {
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Get { .. } => "get",
            Request::Put { .. } => "put",
            Request::Delete { .. } => "delete",
            Request::Ping { .. } => "ping",
            Request::NodeInfo => "node-info",
            Request::Topology => "topology",
            Request::ReplicaWrite { .. } => "replica-write",
            Request::ReplicaRead { .. } => "replica-read",
            Request::GetCopy { .. } => "get-copy",
            Request::Gossip { .. } => "gossip",
            Request::Handoff { .. } => "handoff",
            Request::Merkle { .. } => "merkle",
            Request::Keys { .. } => "keys",
            Request::ReadBatch { .. } => "read-batch",
            Request::Repair { .. } => "repair",
            Request::MerkleRoots => "merkle-roots",
            Request::Purge { .. } => "purge",
            Request::RingChange { .. } => "ring-change",
        }
    }

    /// Requests only other nodes may send: the ones that change replicas
    /// behind the coordinator's back or expose the cluster's internals in
    /// bulk. A replica read stays open to clients: it shows one key's
    /// versions, which operators and tests inspect, and changes nothing.
    pub fn is_peer_only(&self) -> bool {
        matches!(
            self,
            Request::ReplicaWrite { .. }
                | Request::Gossip { .. }
                | Request::Handoff { .. }
                | Request::Merkle { .. }
                | Request::Keys { .. }
                | Request::ReadBatch { .. }
                | Request::Purge { .. }
                // Applying skips the plan's checks: only a committing node may.
                | Request::RingChange { action: RingAction::Apply, .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFrame {
    pub id: u64,
    /// 0 = the server's default.
    pub timeout_ms: u32,
    pub body: Request,
    /// How many nodes already forwarded this request (loops stop at one).
    pub hops: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GetResult {
    pub found: bool,
    pub values: Vec<Vec<u8>>,
    pub context: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardStats {
    pub shard: u16,
    pub keys: u64,
    pub tombstones: u64,
    pub disk_bytes: u64,
    pub segments: u32,
    pub hints: u64,
    pub compactions: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberInfo {
    pub node_id: String,
    pub addr: String,
    pub status: String,
    pub alive: bool,
    pub weight: u32,
    pub shards: u16,
    pub partitions_owned: u32,
    pub partitions_replicated: u32,
    pub hints_pending: u64,
    pub keys: u64,
    pub ops_per_sec: u64,
    pub p99_us: u64,
    pub cpu_permille: u32,
    pub disk_bytes: u64,
    pub moving_partitions: u32,
    pub moving_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub node_id: String,
    pub cluster: String,
    pub listen: String,
    pub version: String,
    pub partitions: u32,
    pub shards: Vec<ShardStats>,
    pub replicas: u8,
    pub ring_version: u64,
    pub members: Vec<MemberInfo>,
    /// The busiest partitions coordinated here: (partition, ops/s).
    pub hot_partitions: Vec<(u32, u64)>,
    pub stream_keys_left: u64,
    pub stream_keys_total: u64,
    pub stream_bytes_sent: u64,
    pub stream_keys_resumed: u64,
    /// JSON of the staged ring change and its plan; empty when none.
    pub staged: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Get(GetResult),
    Put {
        context: Vec<u8>,
    },
    Delete,
    Pong {
        payload: Vec<u8>,
    },
    NodeInfo(NodeInfo),
    Topology {
        state: Vec<u8>,
        replicas: u8,
    },
    ReplicaWrite,
    ReplicaRead {
        found: bool,
        object: Vec<u8>,
    },
    Gossip {
        state: Vec<u8>,
    },
    Handoff {
        applied: u32,
    },
    Merkle {
        root: u64,
        segments: Vec<u64>,
        leaves: Vec<u64>,
    },
    Keys {
        keys: Vec<(Vec<u8>, u32)>,
    },
    ReadBatch {
        entries: Vec<(Vec<u8>, Vec<u8>)>,
    },
    Repair(RepairReport),
    MerkleRoots {
        roots: Vec<PartitionRoot>,
    },
    Purge {
        purged: bool,
    },
    /// JSON: the change, its moves, estimate and warnings (empty: none).
    RingChange {
        plan: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub result: Result<Reply, WireError>,
    /// The answering node's ring version (0 when unknown).
    pub ring_version: u64,
}

impl Response {
    pub fn new(id: u64, result: Result<Reply, WireError>) -> Response {
        Response { id, result, ring_version: 0 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    Request(RequestFrame),
    Response(Response),
    /// A connection-level error; the sender closes the connection after it.
    Error(WireError),
    /// The node's half of authentication, answering a hello.
    Challenge(Challenge),
    /// The connecting side's proof, answering a challenge.
    Auth {
        proof: Vec<u8>,
    },
}

/// Why a frame's payload could not be turned into a [`Message`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("unverifiable flatbuffer: {0}")]
    Malformed(String),
    #[error("unknown message type {0}")]
    UnknownMessage(u8),
    #[error("message lacks required field '{0}'")]
    Missing(&'static str),
    /// A well-formed request of a type this build does not know: answerable
    /// with an error response, the connection stays usable.
    #[error("unknown request type {tag} in request {id}")]
    UnknownRequest { id: u64, tag: u8 },
}

impl DecodeError {
    /// The wire error to answer a client with.
    pub fn to_wire(&self) -> WireError {
        let code = match self {
            DecodeError::UnknownMessage(_) | DecodeError::UnknownRequest { .. } => ErrorCode::UnknownMessage,
            DecodeError::Malformed(_) | DecodeError::Missing(_) => ErrorCode::MalformedFrame,
        };
        WireError::new(code, self.to_string())
    }
}

/// Verifier limits: how deep and how many tables a message may have.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_depth: usize,
    pub max_tables: usize,
}

impl DecodeLimits {
    /// What a server accepts from clients: requests are a handful of tables.
    pub const SERVER: DecodeLimits = DecodeLimits { max_depth: 6, max_tables: 16 };
    /// What a node accepts from peers: a handoff batch has a table per entry.
    pub const PEER: DecodeLimits = DecodeLimits { max_depth: 6, max_tables: 1 << 16 };
    /// What a client accepts from servers: a get may return many siblings.
    pub const CLIENT: DecodeLimits = DecodeLimits { max_depth: 6, max_tables: 1 << 16 };
}

/// Decodes one frame payload.
pub fn decode(payload: &[u8], limits: DecodeLimits) -> Result<Message, DecodeError> {
    let opts = VerifierOptions {
        max_depth: limits.max_depth,
        max_tables: limits.max_tables,
        // The verifier counts a vtable again for every table sharing it, so
        // many small tables look bigger than they are; 8x the payload still
        // stops a small message that expands into a huge DAG.
        max_apparent_size: payload.len().saturating_mul(8).max(64 * 1024),
        ignore_missing_null_terminator: false,
    };
    let frame =
        flatbuffers::root_with_opts::<fb::Frame>(&opts, payload).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    match frame.body_type() {
        fb::FrameBody::Hello => {
            let h = frame.body_as_hello().ok_or(DecodeError::Missing("hello"))?;
            Ok(Message::Hello(Hello {
                magic: h.magic(),
                protocol_version: h.protocol_version(),
                role: if h.role() == fb::Role::Peer { Role::Peer } else { Role::Client },
                cluster: h.cluster().unwrap_or_default().to_string(),
                node_id: h.node_id().unwrap_or_default().to_string(),
                credentials: bytes(h.credentials()),
                auth_nonce: bytes(h.auth_nonce()),
                user: h.user().unwrap_or_default().to_string(),
            }))
        }
        fb::FrameBody::HelloAck => {
            let h = frame.body_as_hello_ack().ok_or(DecodeError::Missing("hello_ack"))?;
            Ok(Message::HelloAck(HelloAck {
                protocol_version: h.protocol_version(),
                node_id: h.node_id().unwrap_or_default().to_string(),
                shard: h.shard(),
                shards: h.shards(),
                cluster: h.cluster().unwrap_or_default().to_string(),
            }))
        }
        fb::FrameBody::Request => {
            let r = frame.body_as_request().ok_or(DecodeError::Missing("request"))?;
            let body = decode_request(&r).map_err(|e| match e {
                DecodeError::UnknownMessage(tag) => DecodeError::UnknownRequest { id: r.id(), tag },
                e => e,
            })?;
            Ok(Message::Request(RequestFrame { id: r.id(), timeout_ms: r.timeout_ms(), body, hops: r.hops() }))
        }
        fb::FrameBody::Response => {
            let r = frame.body_as_response().ok_or(DecodeError::Missing("response"))?;
            let result = match r.error() {
                Some(e) => Err(decode_error(&e)),
                None => Ok(decode_reply(&r)?),
            };
            Ok(Message::Response(Response { id: r.id(), result, ring_version: r.ring_version() }))
        }
        fb::FrameBody::Error => {
            let e = frame.body_as_error().ok_or(DecodeError::Missing("error"))?;
            Ok(Message::Error(decode_error(&e)))
        }
        fb::FrameBody::Challenge => {
            let c = frame.body_as_challenge().ok_or(DecodeError::Missing("challenge"))?;
            Ok(Message::Challenge(Challenge { nonce: bytes(c.nonce()), proof: bytes(c.proof()) }))
        }
        fb::FrameBody::Auth => {
            let a = frame.body_as_auth().ok_or(DecodeError::Missing("auth"))?;
            Ok(Message::Auth { proof: bytes(a.proof()) })
        }
        other => Err(DecodeError::UnknownMessage(other.0)),
    }
}

fn bytes(v: Option<flatbuffers::Vector<'_, u8>>) -> Vec<u8> {
    v.map(|v| v.bytes().to_vec()).unwrap_or_default()
}

fn decode_error(e: &fb::Error<'_>) -> WireError {
    WireError { code: ErrorCode::from_fb(e.code()), message: e.message().unwrap_or_default().to_string() }
}

fn decode_request(r: &fb::Request<'_>) -> Result<Request, DecodeError> {
    Ok(match r.body_type() {
        fb::RequestBody::GetRequest => {
            let g = r.body_as_get_request().ok_or(DecodeError::Missing("get"))?;
            Request::Get { key: bytes(g.key()), r: Level::from_byte(g.r()) }
        }
        fb::RequestBody::PutRequest => {
            let p = r.body_as_put_request().ok_or(DecodeError::Missing("put"))?;
            Request::Put {
                key: bytes(p.key()),
                value: bytes(p.value()),
                context: bytes(p.context()),
                w: Level::from_byte(p.w()),
                durable: p.durable(),
            }
        }
        fb::RequestBody::DeleteRequest => {
            let d = r.body_as_delete_request().ok_or(DecodeError::Missing("delete"))?;
            Request::Delete {
                key: bytes(d.key()),
                context: bytes(d.context()),
                w: Level::from_byte(d.w()),
                durable: d.durable(),
            }
        }
        fb::RequestBody::PingRequest => {
            let p = r.body_as_ping_request().ok_or(DecodeError::Missing("ping"))?;
            Request::Ping { payload: bytes(p.payload()) }
        }
        fb::RequestBody::NodeInfoRequest => Request::NodeInfo,
        fb::RequestBody::TopologyRequest => Request::Topology,
        fb::RequestBody::ReplicaWriteRequest => {
            let w = r.body_as_replica_write_request().ok_or(DecodeError::Missing("replica write"))?;
            Request::ReplicaWrite {
                key: bytes(w.key()),
                object: bytes(w.object()),
                durable: w.durable(),
                hint_for: w.hint_for().unwrap_or_default().to_string(),
            }
        }
        fb::RequestBody::ReplicaReadRequest => {
            let g = r.body_as_replica_read_request().ok_or(DecodeError::Missing("replica read"))?;
            Request::ReplicaRead { key: bytes(g.key()) }
        }
        fb::RequestBody::GetCopyRequest => {
            let g = r.body_as_get_copy_request().ok_or(DecodeError::Missing("get copy"))?;
            Request::GetCopy { key: bytes(g.key()) }
        }
        fb::RequestBody::GossipRequest => {
            let g = r.body_as_gossip_request().ok_or(DecodeError::Missing("gossip"))?;
            Request::Gossip { state: bytes(g.state()) }
        }
        fb::RequestBody::HandoffRequest => {
            let h = r.body_as_handoff_request().ok_or(DecodeError::Missing("handoff"))?;
            let entries = h
                .entries()
                .map(|es| es.iter().map(|e| (bytes(e.key()), bytes(e.object()))).collect())
                .unwrap_or_default();
            Request::Handoff { partition: h.partition(), entries }
        }
        fb::RequestBody::MerkleRequest => {
            let m = r.body_as_merkle_request().ok_or(DecodeError::Missing("merkle"))?;
            Request::Merkle {
                partition: m.partition(),
                segments: m.segments().map(|v| v.iter().collect()).unwrap_or_default(),
            }
        }
        fb::RequestBody::KeysRequest => {
            let k = r.body_as_keys_request().ok_or(DecodeError::Missing("keys"))?;
            Request::Keys {
                partition: k.partition(),
                leaves: k.leaves().map(|v| v.iter().collect()).unwrap_or_default(),
            }
        }
        fb::RequestBody::ReadBatchRequest => {
            let b = r.body_as_read_batch_request().ok_or(DecodeError::Missing("read batch"))?;
            Request::ReadBatch {
                keys: b.keys().map(|v| v.iter().map(|k| bytes(k.key())).collect()).unwrap_or_default(),
            }
        }
        fb::RequestBody::RepairRequest => {
            let rp = r.body_as_repair_request().ok_or(DecodeError::Missing("repair"))?;
            Request::Repair { partition: rp.one().then_some(rp.partition()) }
        }
        fb::RequestBody::MerkleRootsRequest => Request::MerkleRoots,
        fb::RequestBody::PurgeRequest => {
            let g = r.body_as_purge_request().ok_or(DecodeError::Missing("purge"))?;
            Request::Purge { key: bytes(g.key()), object: bytes(g.object()) }
        }
        fb::RequestBody::RingChangeRequest => {
            let g = r.body_as_ring_change_request().ok_or(DecodeError::Missing("ring change"))?;
            let action = RingAction::from_code(g.action()).ok_or(DecodeError::Missing("a known ring-change action"))?;
            let member = g.member().unwrap_or_default().to_string();
            let change = match g.kind() {
                0 => None,
                1 => Some(RingChange::Leave { member }),
                2 => Some(RingChange::Remove { member }),
                3 => Some(RingChange::Weight { member, weight: g.weight() }),
                _ => return Err(DecodeError::Missing("a known ring-change kind")),
            };
            Request::RingChange { action, change }
        }
        other => return Err(DecodeError::UnknownMessage(other.0)),
    })
}

fn decode_reply(r: &fb::Response<'_>) -> Result<Reply, DecodeError> {
    Ok(match r.result_type() {
        fb::ResultBody::GetResult => {
            let g = r.result_as_get_result().ok_or(DecodeError::Missing("get result"))?;
            let values = g.values().map(|vs| vs.iter().map(|v| bytes(v.data())).collect()).unwrap_or_default();
            Reply::Get(GetResult { found: g.found(), values, context: bytes(g.context()) })
        }
        fb::ResultBody::PutResult => {
            let p = r.result_as_put_result().ok_or(DecodeError::Missing("put result"))?;
            Reply::Put { context: bytes(p.context()) }
        }
        fb::ResultBody::DeleteResult => Reply::Delete,
        fb::ResultBody::PongResult => {
            let p = r.result_as_pong_result().ok_or(DecodeError::Missing("pong"))?;
            Reply::Pong { payload: bytes(p.payload()) }
        }
        fb::ResultBody::NodeInfoResult => {
            let n = r.result_as_node_info_result().ok_or(DecodeError::Missing("node info"))?;
            let shards = n
                .shards()
                .map(|v| {
                    v.iter()
                        .map(|s| ShardStats {
                            shard: s.shard(),
                            keys: s.keys(),
                            tombstones: s.tombstones(),
                            disk_bytes: s.disk_bytes(),
                            segments: s.segments(),
                            hints: s.hints(),
                            compactions: s.compactions(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            let members = n
                .members()
                .map(|v| {
                    v.iter()
                        .map(|m| MemberInfo {
                            node_id: m.node_id().unwrap_or_default().to_string(),
                            addr: m.addr().unwrap_or_default().to_string(),
                            status: m.status().unwrap_or_default().to_string(),
                            alive: m.alive(),
                            weight: m.weight(),
                            shards: m.shards(),
                            partitions_owned: m.partitions_owned(),
                            partitions_replicated: m.partitions_replicated(),
                            hints_pending: m.hints_pending(),
                            keys: m.keys(),
                            ops_per_sec: m.ops_per_sec(),
                            p99_us: m.p99_us(),
                            cpu_permille: m.cpu_permille(),
                            disk_bytes: m.disk_bytes(),
                            moving_partitions: m.moving_partitions(),
                            moving_bytes: m.moving_bytes(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            Reply::NodeInfo(NodeInfo {
                node_id: n.node_id().unwrap_or_default().to_string(),
                cluster: n.cluster().unwrap_or_default().to_string(),
                listen: n.listen().unwrap_or_default().to_string(),
                version: n.version().unwrap_or_default().to_string(),
                partitions: n.partitions(),
                shards,
                replicas: n.replicas(),
                ring_version: n.ring_version(),
                members,
                hot_partitions: n
                    .hot_partitions()
                    .map(|v| v.iter().map(|h| (h.partition(), h.ops_per_sec())).collect())
                    .unwrap_or_default(),
                stream_keys_left: n.stream_keys_left(),
                stream_keys_total: n.stream_keys_total(),
                stream_bytes_sent: n.stream_bytes_sent(),
                stream_keys_resumed: n.stream_keys_resumed(),
                staged: n.staged().unwrap_or_default().to_string(),
            })
        }
        fb::ResultBody::TopologyResult => {
            let t = r.result_as_topology_result().ok_or(DecodeError::Missing("topology"))?;
            Reply::Topology { state: bytes(t.state()), replicas: t.replicas() }
        }
        fb::ResultBody::ReplicaWriteResult => Reply::ReplicaWrite,
        fb::ResultBody::PurgeResult => {
            let g = r.result_as_purge_result().ok_or(DecodeError::Missing("purge result"))?;
            Reply::Purge { purged: g.purged() }
        }
        fb::ResultBody::RingChangeResult => {
            let g = r.result_as_ring_change_result().ok_or(DecodeError::Missing("ring change result"))?;
            Reply::RingChange { plan: g.plan().unwrap_or_default().to_string() }
        }
        fb::ResultBody::ReplicaReadResult => {
            let g = r.result_as_replica_read_result().ok_or(DecodeError::Missing("replica read result"))?;
            Reply::ReplicaRead { found: g.found(), object: bytes(g.object()) }
        }
        fb::ResultBody::GossipResult => {
            let g = r.result_as_gossip_result().ok_or(DecodeError::Missing("gossip result"))?;
            Reply::Gossip { state: bytes(g.state()) }
        }
        fb::ResultBody::HandoffResult => {
            let h = r.result_as_handoff_result().ok_or(DecodeError::Missing("handoff result"))?;
            Reply::Handoff { applied: h.applied() }
        }
        fb::ResultBody::MerkleResult => {
            let m = r.result_as_merkle_result().ok_or(DecodeError::Missing("merkle result"))?;
            Reply::Merkle {
                root: m.root(),
                segments: m.segments().map(|v| v.iter().collect()).unwrap_or_default(),
                leaves: m.leaves().map(|v| v.iter().collect()).unwrap_or_default(),
            }
        }
        fb::ResultBody::KeysResult => {
            let k = r.result_as_keys_result().ok_or(DecodeError::Missing("keys result"))?;
            Reply::Keys {
                keys: k.keys().map(|v| v.iter().map(|d| (bytes(d.key()), d.digest())).collect()).unwrap_or_default(),
            }
        }
        fb::ResultBody::ReadBatchResult => {
            let b = r.result_as_read_batch_result().ok_or(DecodeError::Missing("read batch result"))?;
            Reply::ReadBatch {
                entries: b
                    .entries()
                    .map(|v| v.iter().map(|e| (bytes(e.key()), bytes(e.object()))).collect())
                    .unwrap_or_default(),
            }
        }
        fb::ResultBody::RepairResult => {
            let x = r.result_as_repair_result().ok_or(DecodeError::Missing("repair result"))?;
            Reply::Repair(RepairReport {
                partitions: x.partitions(),
                exchanges: x.exchanges(),
                in_sync: x.in_sync(),
                leaves_differing: x.leaves_differing(),
                keys_differing: x.keys_differing(),
                keys_pulled: x.keys_pulled(),
                keys_pushed: x.keys_pushed(),
                errors: x.errors(),
            })
        }
        fb::ResultBody::MerkleRootsResult => {
            let m = r.result_as_merkle_roots_result().ok_or(DecodeError::Missing("merkle roots"))?;
            Reply::MerkleRoots {
                roots: m
                    .roots()
                    .map(|v| {
                        v.iter()
                            .map(|x| PartitionRoot {
                                partition: x.partition(),
                                root: x.root(),
                                keys: x.keys(),
                                last_sync_ms: x.last_sync_ms(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }
        }
        fb::ResultBody::NONE => return Err(DecodeError::Missing("result or error")),
        other => return Err(DecodeError::UnknownMessage(other.0)),
    })
}

/// Builds framed messages; keep one per connection to reuse its buffer.
pub struct Encoder {
    fbb: FlatBufferBuilder<'static>,
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new()
    }
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder { fbb: FlatBufferBuilder::with_capacity(1024) }
    }

    /// Appends `msg`, framed, to `out`.
    pub fn encode(&mut self, msg: &Message, out: &mut Vec<u8>) {
        self.fbb.reset();
        let fbb = &mut self.fbb;
        let (body_type, body) = match msg {
            Message::Hello(h) => (fb::FrameBody::Hello, encode_hello(fbb, h)),
            Message::HelloAck(h) => (fb::FrameBody::HelloAck, encode_hello_ack(fbb, h)),
            Message::Request(r) => (fb::FrameBody::Request, encode_request(fbb, r)),
            Message::Response(r) => (fb::FrameBody::Response, encode_response(fbb, r)),
            Message::Error(e) => (fb::FrameBody::Error, encode_error(fbb, e).as_union_value()),
            Message::Challenge(c) => {
                let nonce = fbb.create_vector(&c.nonce);
                let proof = fbb.create_vector(&c.proof);
                let t = fb::Challenge::create(fbb, &fb::ChallengeArgs { nonce: Some(nonce), proof: Some(proof) });
                (fb::FrameBody::Challenge, t.as_union_value())
            }
            Message::Auth { proof } => {
                let proof = fbb.create_vector(proof);
                let t = fb::Auth::create(fbb, &fb::AuthArgs { proof: Some(proof) });
                (fb::FrameBody::Auth, t.as_union_value())
            }
        };
        let frame = fb::Frame::create(fbb, &fb::FrameArgs { body_type, body: Some(body) });
        fbb.finish(frame, None);
        let data = fbb.finished_data();
        frame::put_header(out, data.len());
        out.extend_from_slice(data);
    }

    /// Convenience for one message in a fresh buffer.
    pub fn to_vec(&mut self, msg: &Message) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(msg, &mut out);
        out
    }
}

type Fbb = FlatBufferBuilder<'static>;
type Union = WIPOffset<flatbuffers::UnionWIPOffset>;

fn encode_hello(fbb: &mut Fbb, h: &Hello) -> Union {
    let cluster = fbb.create_string(&h.cluster);
    let node_id = fbb.create_string(&h.node_id);
    let credentials = fbb.create_vector(&h.credentials);
    // Written only when set, so a hello without authentication encodes
    // byte for byte as protocol 1 always did (tests/fixtures/wire-v1).
    let auth_nonce = (!h.auth_nonce.is_empty()).then(|| fbb.create_vector(&h.auth_nonce));
    let user = (!h.user.is_empty()).then(|| fbb.create_string(&h.user));
    fb::Hello::create(
        fbb,
        &fb::HelloArgs {
            magic: h.magic,
            protocol_version: h.protocol_version,
            role: if h.role == Role::Peer { fb::Role::Peer } else { fb::Role::Client },
            cluster: Some(cluster),
            credentials: Some(credentials),
            node_id: Some(node_id),
            auth_nonce,
            user,
        },
    )
    .as_union_value()
}

fn encode_hello_ack(fbb: &mut Fbb, h: &HelloAck) -> Union {
    let node_id = fbb.create_string(&h.node_id);
    let cluster = fbb.create_string(&h.cluster);
    fb::HelloAck::create(
        fbb,
        &fb::HelloAckArgs {
            protocol_version: h.protocol_version,
            node_id: Some(node_id),
            shard: h.shard,
            shards: h.shards,
            cluster: Some(cluster),
        },
    )
    .as_union_value()
}

fn encode_error<'a>(fbb: &mut FlatBufferBuilder<'a>, e: &WireError) -> WIPOffset<fb::Error<'a>> {
    let message = fbb.create_string(&e.message);
    fb::Error::create(fbb, &fb::ErrorArgs { code: e.code.to_fb(), message: Some(message) })
}

fn encode_request(fbb: &mut Fbb, r: &RequestFrame) -> Union {
    let (body_type, body) = match &r.body {
        Request::Get { key, r } => {
            let key = fbb.create_vector(key);
            let t = fb::GetRequest::create(fbb, &fb::GetRequestArgs { key: Some(key), r: r.to_byte() });
            (fb::RequestBody::GetRequest, t.as_union_value())
        }
        Request::Put { key, value, context, w, durable } => {
            let key = fbb.create_vector(key);
            let value = fbb.create_vector(value);
            let context = fbb.create_vector(context);
            let t = fb::PutRequest::create(
                fbb,
                &fb::PutRequestArgs {
                    key: Some(key),
                    value: Some(value),
                    context: Some(context),
                    w: w.to_byte(),
                    durable: *durable,
                },
            );
            (fb::RequestBody::PutRequest, t.as_union_value())
        }
        Request::Delete { key, context, w, durable } => {
            let key = fbb.create_vector(key);
            let context = fbb.create_vector(context);
            let t = fb::DeleteRequest::create(
                fbb,
                &fb::DeleteRequestArgs { key: Some(key), context: Some(context), w: w.to_byte(), durable: *durable },
            );
            (fb::RequestBody::DeleteRequest, t.as_union_value())
        }
        Request::Ping { payload } => {
            let payload = fbb.create_vector(payload);
            let t = fb::PingRequest::create(fbb, &fb::PingRequestArgs { payload: Some(payload) });
            (fb::RequestBody::PingRequest, t.as_union_value())
        }
        Request::NodeInfo => {
            let t = fb::NodeInfoRequest::create(fbb, &fb::NodeInfoRequestArgs {});
            (fb::RequestBody::NodeInfoRequest, t.as_union_value())
        }
        Request::Topology => {
            let t = fb::TopologyRequest::create(fbb, &fb::TopologyRequestArgs {});
            (fb::RequestBody::TopologyRequest, t.as_union_value())
        }
        Request::ReplicaWrite { key, object, durable, hint_for } => {
            let key = fbb.create_vector(key);
            let object = fbb.create_vector(object);
            let hint_for = fbb.create_string(hint_for);
            let t = fb::ReplicaWriteRequest::create(
                fbb,
                &fb::ReplicaWriteRequestArgs {
                    key: Some(key),
                    object: Some(object),
                    durable: *durable,
                    hint_for: Some(hint_for),
                },
            );
            (fb::RequestBody::ReplicaWriteRequest, t.as_union_value())
        }
        Request::ReplicaRead { key } => {
            let key = fbb.create_vector(key);
            let t = fb::ReplicaReadRequest::create(fbb, &fb::ReplicaReadRequestArgs { key: Some(key) });
            (fb::RequestBody::ReplicaReadRequest, t.as_union_value())
        }
        Request::GetCopy { key } => {
            let key = fbb.create_vector(key);
            let t = fb::GetCopyRequest::create(fbb, &fb::GetCopyRequestArgs { key: Some(key) });
            (fb::RequestBody::GetCopyRequest, t.as_union_value())
        }
        Request::Gossip { state } => {
            let state = fbb.create_vector(state);
            let t = fb::GossipRequest::create(fbb, &fb::GossipRequestArgs { state: Some(state) });
            (fb::RequestBody::GossipRequest, t.as_union_value())
        }
        Request::Handoff { partition, entries } => {
            let es: Vec<_> = entries
                .iter()
                .map(|(k, o)| {
                    let key = fbb.create_vector(k);
                    let object = fbb.create_vector(o);
                    fb::HandoffEntry::create(fbb, &fb::HandoffEntryArgs { key: Some(key), object: Some(object) })
                })
                .collect();
            let es = fbb.create_vector(&es);
            let t =
                fb::HandoffRequest::create(fbb, &fb::HandoffRequestArgs { partition: *partition, entries: Some(es) });
            (fb::RequestBody::HandoffRequest, t.as_union_value())
        }
        Request::Merkle { partition, segments } => {
            let segments = fbb.create_vector(segments);
            let t = fb::MerkleRequest::create(
                fbb,
                &fb::MerkleRequestArgs { partition: *partition, segments: Some(segments) },
            );
            (fb::RequestBody::MerkleRequest, t.as_union_value())
        }
        Request::Keys { partition, leaves } => {
            let leaves = fbb.create_vector(leaves);
            let t = fb::KeysRequest::create(fbb, &fb::KeysRequestArgs { partition: *partition, leaves: Some(leaves) });
            (fb::RequestBody::KeysRequest, t.as_union_value())
        }
        Request::ReadBatch { keys } => {
            let ks: Vec<_> = keys
                .iter()
                .map(|k| {
                    let key = fbb.create_vector(k);
                    fb::Key::create(fbb, &fb::KeyArgs { key: Some(key) })
                })
                .collect();
            let ks = fbb.create_vector(&ks);
            let t = fb::ReadBatchRequest::create(fbb, &fb::ReadBatchRequestArgs { keys: Some(ks) });
            (fb::RequestBody::ReadBatchRequest, t.as_union_value())
        }
        Request::Repair { partition } => {
            let t = fb::RepairRequest::create(
                fbb,
                &fb::RepairRequestArgs { partition: partition.unwrap_or(0), one: partition.is_some() },
            );
            (fb::RequestBody::RepairRequest, t.as_union_value())
        }
        Request::MerkleRoots => {
            let t = fb::MerkleRootsRequest::create(fbb, &fb::MerkleRootsRequestArgs {});
            (fb::RequestBody::MerkleRootsRequest, t.as_union_value())
        }
        Request::Purge { key, object } => {
            let (key, object) = (fbb.create_vector(key), fbb.create_vector(object));
            let t = fb::PurgeRequest::create(fbb, &fb::PurgeRequestArgs { key: Some(key), object: Some(object) });
            (fb::RequestBody::PurgeRequest, t.as_union_value())
        }
        Request::RingChange { action, change } => {
            let (kind, weight) = match change {
                None => (0, 0),
                Some(RingChange::Leave { .. }) => (1, 0),
                Some(RingChange::Remove { .. }) => (2, 0),
                Some(RingChange::Weight { weight, .. }) => (3, *weight),
            };
            let member = change.as_ref().map(|c| fbb.create_string(c.member()));
            let t = fb::RingChangeRequest::create(
                fbb,
                &fb::RingChangeRequestArgs { action: action.code(), kind, member, weight },
            );
            (fb::RequestBody::RingChangeRequest, t.as_union_value())
        }
    };
    fb::Request::create(
        fbb,
        &fb::RequestArgs { id: r.id, timeout_ms: r.timeout_ms, body_type, body: Some(body), hops: r.hops },
    )
    .as_union_value()
}

fn encode_response(fbb: &mut Fbb, r: &Response) -> Union {
    let mut args = fb::ResponseArgs { id: r.id, ring_version: r.ring_version, ..Default::default() };
    match &r.result {
        Err(e) => args.error = Some(encode_error(fbb, e)),
        Ok(reply) => {
            let (t, v) = encode_reply(fbb, reply);
            args.result_type = t;
            args.result = Some(v);
        }
    }
    fb::Response::create(fbb, &args).as_union_value()
}

fn encode_reply(fbb: &mut Fbb, reply: &Reply) -> (fb::ResultBody, Union) {
    match reply {
        Reply::Get(g) => {
            let values: Vec<_> = g
                .values
                .iter()
                .map(|v| {
                    let data = fbb.create_vector(v);
                    fb::Value::create(fbb, &fb::ValueArgs { data: Some(data) })
                })
                .collect();
            let values = fbb.create_vector(&values);
            let context = fbb.create_vector(&g.context);
            let t = fb::GetResult::create(
                fbb,
                &fb::GetResultArgs { found: g.found, values: Some(values), context: Some(context) },
            );
            (fb::ResultBody::GetResult, t.as_union_value())
        }
        Reply::Put { context } => {
            let context = fbb.create_vector(context);
            let t = fb::PutResult::create(fbb, &fb::PutResultArgs { context: Some(context) });
            (fb::ResultBody::PutResult, t.as_union_value())
        }
        Reply::Delete => {
            let t = fb::DeleteResult::create(fbb, &fb::DeleteResultArgs {});
            (fb::ResultBody::DeleteResult, t.as_union_value())
        }
        Reply::Pong { payload } => {
            let payload = fbb.create_vector(payload);
            let t = fb::PongResult::create(fbb, &fb::PongResultArgs { payload: Some(payload) });
            (fb::ResultBody::PongResult, t.as_union_value())
        }
        Reply::NodeInfo(n) => {
            let shards: Vec<_> = n
                .shards
                .iter()
                .map(|s| {
                    fb::ShardStats::create(
                        fbb,
                        &fb::ShardStatsArgs {
                            shard: s.shard,
                            keys: s.keys,
                            tombstones: s.tombstones,
                            disk_bytes: s.disk_bytes,
                            segments: s.segments,
                            hints: s.hints,
                            compactions: s.compactions,
                        },
                    )
                })
                .collect();
            let shards = fbb.create_vector(&shards);
            let members: Vec<_> = n
                .members
                .iter()
                .map(|m| {
                    let node_id = fbb.create_string(&m.node_id);
                    let addr = fbb.create_string(&m.addr);
                    let status = fbb.create_string(&m.status);
                    fb::MemberInfo::create(
                        fbb,
                        &fb::MemberInfoArgs {
                            node_id: Some(node_id),
                            addr: Some(addr),
                            status: Some(status),
                            alive: m.alive,
                            weight: m.weight,
                            shards: m.shards,
                            partitions_owned: m.partitions_owned,
                            partitions_replicated: m.partitions_replicated,
                            hints_pending: m.hints_pending,
                            keys: m.keys,
                            ops_per_sec: m.ops_per_sec,
                            p99_us: m.p99_us,
                            cpu_permille: m.cpu_permille,
                            disk_bytes: m.disk_bytes,
                            moving_partitions: m.moving_partitions,
                            moving_bytes: m.moving_bytes,
                        },
                    )
                })
                .collect();
            let members = fbb.create_vector(&members);
            let node_id = fbb.create_string(&n.node_id);
            let cluster = fbb.create_string(&n.cluster);
            let listen = fbb.create_string(&n.listen);
            let version = fbb.create_string(&n.version);
            let hot: Vec<_> = n
                .hot_partitions
                .iter()
                .map(|&(partition, ops_per_sec)| {
                    fb::PartitionLoad::create(fbb, &fb::PartitionLoadArgs { partition, ops_per_sec })
                })
                .collect();
            let hot = fbb.create_vector(&hot);
            let staged = fbb.create_string(&n.staged);
            let t = fb::NodeInfoResult::create(
                fbb,
                &fb::NodeInfoResultArgs {
                    node_id: Some(node_id),
                    cluster: Some(cluster),
                    listen: Some(listen),
                    version: Some(version),
                    partitions: n.partitions,
                    shards: Some(shards),
                    replicas: n.replicas,
                    ring_version: n.ring_version,
                    members: Some(members),
                    hot_partitions: Some(hot),
                    stream_keys_left: n.stream_keys_left,
                    stream_keys_total: n.stream_keys_total,
                    stream_bytes_sent: n.stream_bytes_sent,
                    stream_keys_resumed: n.stream_keys_resumed,
                    staged: Some(staged),
                },
            );
            (fb::ResultBody::NodeInfoResult, t.as_union_value())
        }
        Reply::Topology { state, replicas } => {
            let state = fbb.create_vector(state);
            let t =
                fb::TopologyResult::create(fbb, &fb::TopologyResultArgs { state: Some(state), replicas: *replicas });
            (fb::ResultBody::TopologyResult, t.as_union_value())
        }
        Reply::ReplicaWrite => {
            let t = fb::ReplicaWriteResult::create(fbb, &fb::ReplicaWriteResultArgs {});
            (fb::ResultBody::ReplicaWriteResult, t.as_union_value())
        }
        Reply::Purge { purged } => {
            let t = fb::PurgeResult::create(fbb, &fb::PurgeResultArgs { purged: *purged });
            (fb::ResultBody::PurgeResult, t.as_union_value())
        }
        Reply::RingChange { plan } => {
            let plan = fbb.create_string(plan);
            let t = fb::RingChangeResult::create(fbb, &fb::RingChangeResultArgs { plan: Some(plan) });
            (fb::ResultBody::RingChangeResult, t.as_union_value())
        }
        Reply::ReplicaRead { found, object } => {
            let object = fbb.create_vector(object);
            let t =
                fb::ReplicaReadResult::create(fbb, &fb::ReplicaReadResultArgs { found: *found, object: Some(object) });
            (fb::ResultBody::ReplicaReadResult, t.as_union_value())
        }
        Reply::Gossip { state } => {
            let state = fbb.create_vector(state);
            let t = fb::GossipResult::create(fbb, &fb::GossipResultArgs { state: Some(state) });
            (fb::ResultBody::GossipResult, t.as_union_value())
        }
        Reply::Handoff { applied } => {
            let t = fb::HandoffResult::create(fbb, &fb::HandoffResultArgs { applied: *applied });
            (fb::ResultBody::HandoffResult, t.as_union_value())
        }
        Reply::Merkle { root, segments, leaves } => {
            let segments = fbb.create_vector(segments);
            let leaves = fbb.create_vector(leaves);
            let t = fb::MerkleResult::create(
                fbb,
                &fb::MerkleResultArgs { root: *root, segments: Some(segments), leaves: Some(leaves) },
            );
            (fb::ResultBody::MerkleResult, t.as_union_value())
        }
        Reply::Keys { keys } => {
            let ks: Vec<_> = keys
                .iter()
                .map(|(k, d)| {
                    let key = fbb.create_vector(k);
                    fb::KeyDigest::create(fbb, &fb::KeyDigestArgs { key: Some(key), digest: *d })
                })
                .collect();
            let ks = fbb.create_vector(&ks);
            let t = fb::KeysResult::create(fbb, &fb::KeysResultArgs { keys: Some(ks) });
            (fb::ResultBody::KeysResult, t.as_union_value())
        }
        Reply::ReadBatch { entries } => {
            let es: Vec<_> = entries
                .iter()
                .map(|(k, o)| {
                    let key = fbb.create_vector(k);
                    let object = fbb.create_vector(o);
                    fb::HandoffEntry::create(fbb, &fb::HandoffEntryArgs { key: Some(key), object: Some(object) })
                })
                .collect();
            let es = fbb.create_vector(&es);
            let t = fb::ReadBatchResult::create(fbb, &fb::ReadBatchResultArgs { entries: Some(es) });
            (fb::ResultBody::ReadBatchResult, t.as_union_value())
        }
        Reply::Repair(x) => {
            let t = fb::RepairResult::create(
                fbb,
                &fb::RepairResultArgs {
                    partitions: x.partitions,
                    exchanges: x.exchanges,
                    in_sync: x.in_sync,
                    leaves_differing: x.leaves_differing,
                    keys_differing: x.keys_differing,
                    keys_pulled: x.keys_pulled,
                    keys_pushed: x.keys_pushed,
                    errors: x.errors,
                },
            );
            (fb::ResultBody::RepairResult, t.as_union_value())
        }
        Reply::MerkleRoots { roots } => {
            let rs: Vec<_> = roots
                .iter()
                .map(|x| {
                    fb::PartitionRoot::create(
                        fbb,
                        &fb::PartitionRootArgs {
                            partition: x.partition,
                            root: x.root,
                            keys: x.keys,
                            last_sync_ms: x.last_sync_ms,
                        },
                    )
                })
                .collect();
            let rs = fbb.create_vector(&rs);
            let t = fb::MerkleRootsResult::create(fbb, &fb::MerkleRootsResultArgs { roots: Some(rs) });
            (fb::ResultBody::MerkleRootsResult, t.as_union_value())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_error_code_is_listed_once_at_its_index() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i, "{code:?} is listed at {i}");
        }
        // Every code the wire can carry is in the list.
        for &wire in fb::ErrorCode::ENUM_VALUES {
            let code = ErrorCode::from_fb(wire);
            assert_eq!(ErrorCode::ALL[code.index()], code, "{wire:?}");
            assert_eq!(code.to_fb(), wire);
        }
    }

    use super::*;
    use crate::frame::FrameDecoder;

    fn round_trip(msg: Message, limits: DecodeLimits) -> Message {
        let bytes = Encoder::new().to_vec(&msg);
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&bytes);
        let payload = d.next_frame().unwrap().unwrap().to_vec();
        decode(&payload, limits).unwrap()
    }

    #[test]
    fn every_message_kind_round_trips() {
        let msgs = vec![
            Message::Hello(Hello::client("prod")),
            Message::HelloAck(HelloAck {
                protocol_version: 1,
                node_id: "n1".into(),
                shard: 2,
                shards: 4,
                cluster: "prod".into(),
            }),
            Message::Request(RequestFrame {
                id: 7,
                hops: 1,
                timeout_ms: 100,
                body: Request::Put {
                    key: b"k".to_vec(),
                    value: vec![0, 255, 1],
                    context: vec![1, 0],
                    w: Level::All,
                    durable: Some(false),
                },
            }),
            Message::Request(RequestFrame {
                id: 8,
                timeout_ms: 0,
                hops: 0,
                body: Request::Get { key: b"k".to_vec(), r: Level::Count(2) },
            }),
            Message::Request(RequestFrame {
                id: 9,
                hops: 0,
                timeout_ms: 0,
                body: Request::Delete { key: b"k".to_vec(), context: vec![], w: Level::Default, durable: None },
            }),
            Message::Request(RequestFrame { id: 10, timeout_ms: 0, hops: 0, body: Request::NodeInfo }),
            Message::Request(RequestFrame {
                id: 11,
                timeout_ms: 0,
                hops: 0,
                body: Request::Handoff {
                    partition: 3,
                    entries: vec![(b"k".to_vec(), vec![1, 2]), (b"j".to_vec(), vec![])],
                },
            }),
            Message::Request(RequestFrame {
                id: 12,
                timeout_ms: 0,
                hops: 0,
                body: Request::ReplicaWrite {
                    key: b"k".to_vec(),
                    object: vec![1],
                    durable: false,
                    hint_for: "n2".into(),
                },
            }),
            Message::Request(RequestFrame {
                id: 13,
                timeout_ms: 0,
                hops: 0,
                body: Request::ReadBatch { keys: vec![b"a".to_vec(), b"bc".to_vec()] },
            }),
            Message::Request(RequestFrame {
                id: 14,
                timeout_ms: 0,
                hops: 0,
                body: Request::Repair { partition: Some(3) },
            }),
            Message::Response(Response {
                id: 14,
                ring_version: 2,
                result: Ok(Reply::Repair(RepairReport { partitions: 1, keys_pulled: 5, ..Default::default() })),
            }),
            Message::Response(Response {
                id: 15,
                ring_version: 2,
                result: Ok(Reply::Keys { keys: vec![(b"k".to_vec(), 7)] }),
            }),
            Message::Request(RequestFrame {
                id: 16,
                timeout_ms: 0,
                hops: 0,
                body: Request::Purge { key: b"gone".to_vec(), object: vec![1, 2, 3] },
            }),
            Message::Response(Response { id: 16, ring_version: 2, result: Ok(Reply::Purge { purged: true }) }),
            Message::Request(RequestFrame {
                id: 17,
                timeout_ms: 0,
                hops: 0,
                body: Request::RingChange {
                    action: RingAction::Stage,
                    change: Some(RingChange::Weight { member: "n2".into(), weight: 3 }),
                },
            }),
            Message::Request(RequestFrame {
                id: 18,
                timeout_ms: 0,
                hops: 0,
                body: Request::RingChange { action: RingAction::Commit, change: None },
            }),
            Message::Response(Response {
                id: 17,
                ring_version: 2,
                result: Ok(Reply::RingChange { plan: "{\"moves\":[]}".into() }),
            }),
            Message::Response(Response {
                id: 11,
                ring_version: 9,
                result: Ok(Reply::Topology { state: vec![1, 2, 3], replicas: 3 }),
            }),
            Message::Response(Response {
                id: 7,
                ring_version: 0,
                result: Ok(Reply::Get(GetResult {
                    found: true,
                    values: vec![b"a".to_vec(), vec![]],
                    context: vec![1],
                })),
            }),
            Message::Response(Response::new(8, Err(WireError::new(ErrorCode::PairTooLarge, "too big")))),
            Message::Response(Response::new(9, Ok(Reply::Delete))),
            Message::Error(WireError::new(ErrorCode::ClusterMismatch, "wrong cluster")),
        ];
        for m in msgs {
            assert_eq!(round_trip(m.clone(), DecodeLimits::CLIENT), m);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            assert!(decode(&junk, DecodeLimits::SERVER).is_err(), "junk of {len} accepted");
        }
    }

    #[test]
    fn a_server_refuses_responses_with_more_tables_than_a_request_needs() {
        let many = Message::Response(Response {
            id: 1,
            ring_version: 0,
            result: Ok(Reply::Get(GetResult { found: true, values: vec![vec![1]; 100], context: vec![] })),
        });
        let bytes = Encoder::new().to_vec(&many);
        assert!(matches!(decode(&bytes[4..], DecodeLimits::SERVER), Err(DecodeError::Malformed(_))));
        assert!(decode(&bytes[4..], DecodeLimits::CLIENT).is_ok());
    }

    #[test]
    fn levels_parse_and_resolve_against_n() {
        assert_eq!("one".parse::<Level>().unwrap().resolve(3), Some(1));
        assert_eq!("quorum".parse::<Level>().unwrap().resolve(3), Some(2));
        assert_eq!("all".parse::<Level>().unwrap().resolve(5), Some(5));
        assert_eq!(Level::Default.resolve(3), Some(2));
        assert_eq!("4".parse::<Level>().unwrap().resolve(3), None);
        // A one-node cluster with N=3: quorum and all mean its one replica.
        assert_eq!(Level::Default.required(3, 1), Ok(1));
        assert_eq!(Level::All.required(3, 2), Ok(2));
        assert_eq!(Level::Count(2).required(3, 1), Ok(2));
        assert!(Level::Count(4).required(3, 3).is_err());
        assert!("0".parse::<Level>().is_err());
        assert!("many".parse::<Level>().is_err());
        for b in 0..=255u8 {
            let l = Level::from_byte(b);
            assert_eq!(l.to_byte(), b);
        }
    }
}

/// Builders of deliberately odd frames, for tests of how peers react.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// A framed, well-formed request whose body has a union type this build
    /// does not define.
    pub fn request_with_unknown_type(id: u64, body_type: u8) -> Vec<u8> {
        let mut fbb = FlatBufferBuilder::new();
        let body = fb::NodeInfoRequest::create(&mut fbb, &fb::NodeInfoRequestArgs {}).as_union_value();
        let req = fb::Request::create(
            &mut fbb,
            &fb::RequestArgs { id, timeout_ms: 0, body_type: fb::RequestBody(body_type), body: Some(body), hops: 0 },
        );
        let frame = fb::Frame::create(
            &mut fbb,
            &fb::FrameArgs { body_type: fb::FrameBody::Request, body: Some(req.as_union_value()) },
        );
        fbb.finish(frame, None);
        let mut out = Vec::new();
        frame::put_header(&mut out, fbb.finished_data().len());
        out.extend_from_slice(fbb.finished_data());
        out
    }
}
