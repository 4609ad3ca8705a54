//! Golden frames of wire protocol version 1: one file per message kind, each
//! a whole frame (length header and flatbuffer) as a version-1 peer sends
//! it. Every one must keep decoding to the same message; a change that
//! breaks this breaks mixed-version clusters and existing clients.
//! A peer of another protocol version is refused at the hello (see the
//! node's `single_node` tests).
//!
//! To regenerate (only when adding a protocol version, into a new folder):
//! `RINGKV_WRITE_FIXTURES=1 cargo test -p ringkv-net --test wire_fixtures`.

use ringkv_net::frame::FrameDecoder;
use ringkv_net::proto::{
    decode, DecodeLimits, Encoder, ErrorCode, GetResult, Hello, HelloAck, Level, MemberInfo, Message, NodeInfo,
    PartitionRoot, RepairReport, Reply, Request, RequestFrame, Response, ShardStats, WireError, PROTOCOL_VERSION,
};
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wire-v1")
}

fn req(id: u64, body: Request) -> Message {
    Message::Request(RequestFrame { id, timeout_ms: 1500, hops: (id % 2) as u8, body })
}

fn resp(id: u64, reply: Reply) -> Message {
    Message::Response(Response { id, ring_version: 7, result: Ok(reply) })
}

/// Every message kind of version 1, by file name.
fn messages() -> Vec<(&'static str, Message)> {
    let k = || b"key".to_vec();
    vec![
        ("hello-client", Message::Hello(Hello::client("golden"))),
        (
            "hello-peer",
            Message::Hello(Hello {
                node_id: "n1".into(),
                role: ringkv_net::proto::Role::Peer,
                ..Hello::client("golden")
            }),
        ),
        (
            "hello-ack",
            Message::HelloAck(HelloAck {
                protocol_version: PROTOCOL_VERSION,
                node_id: "n2".into(),
                shard: 1,
                shards: 4,
                cluster: "golden".into(),
            }),
        ),
        ("error", Message::Error(WireError::new(ErrorCode::ClusterMismatch, "wrong cluster"))),
        ("req-get", req(1, Request::Get { key: k(), r: Level::Count(2) })),
        (
            "req-put",
            req(
                2,
                Request::Put {
                    key: k(),
                    value: vec![0, 255],
                    context: vec![1, 0],
                    w: Level::All,
                    durable: Some(false),
                },
            ),
        ),
        ("req-delete", req(3, Request::Delete { key: k(), context: vec![], w: Level::Quorum, durable: None })),
        ("req-ping", req(4, Request::Ping { payload: b"p".to_vec() })),
        ("req-node-info", req(5, Request::NodeInfo)),
        ("req-topology", req(6, Request::Topology)),
        (
            "req-replica-write",
            req(7, Request::ReplicaWrite { key: k(), object: vec![1, 2], durable: true, hint_for: "n3".into() }),
        ),
        ("req-replica-read", req(8, Request::ReplicaRead { key: k() })),
        ("req-gossip", req(9, Request::Gossip { state: vec![1, 2, 3] })),
        (
            "req-handoff",
            req(10, Request::Handoff { partition: 3, entries: vec![(k(), vec![9]), (b"j".to_vec(), vec![])] }),
        ),
        ("req-merkle", req(11, Request::Merkle { partition: 3, segments: vec![0, 31] })),
        ("req-keys", req(12, Request::Keys { partition: 3, leaves: vec![5, 1023] })),
        ("req-read-batch", req(13, Request::ReadBatch { keys: vec![k(), b"other".to_vec()] })),
        ("req-repair", req(14, Request::Repair { partition: Some(3) })),
        ("req-merkle-roots", req(15, Request::MerkleRoots)),
        ("req-purge", req(16, Request::Purge { key: k(), object: vec![1] })),
        ("req-get-copy", req(17, Request::GetCopy { key: k() })),
        (
            "resp-get",
            resp(1, Reply::Get(GetResult { found: true, values: vec![b"a".to_vec(), vec![]], context: vec![1] })),
        ),
        ("resp-put", resp(2, Reply::Put { context: vec![1, 2] })),
        ("resp-delete", resp(3, Reply::Delete)),
        ("resp-pong", resp(4, Reply::Pong { payload: b"p".to_vec() })),
        (
            "resp-node-info",
            resp(
                5,
                Reply::NodeInfo(NodeInfo {
                    node_id: "n1".into(),
                    cluster: "golden".into(),
                    listen: "127.0.0.1:7070".into(),
                    version: "0.1.0".into(),
                    partitions: 16,
                    shards: vec![ShardStats {
                        shard: 0,
                        keys: 3,
                        tombstones: 1,
                        disk_bytes: 4096,
                        segments: 1,
                        hints: 2,
                        compactions: 0,
                    }],
                    replicas: 3,
                    ring_version: 4,
                    members: vec![MemberInfo {
                        node_id: "n1".into(),
                        addr: "127.0.0.1:7070".into(),
                        status: "up".into(),
                        alive: true,
                        weight: 1,
                        shards: 1,
                        partitions_owned: 16,
                        partitions_replicated: 16,
                        hints_pending: 2,
                        keys: 3,
                        ..MemberInfo::default()
                    }],
                    // Fields added since are absent from these frames.
                    ..NodeInfo::default()
                }),
            ),
        ),
        ("resp-topology", resp(6, Reply::Topology { state: vec![1, 2], replicas: 3 })),
        ("resp-replica-write", resp(7, Reply::ReplicaWrite)),
        ("resp-replica-read", resp(8, Reply::ReplicaRead { found: true, object: vec![1, 2] })),
        ("resp-gossip", resp(9, Reply::Gossip { state: vec![3, 2, 1] })),
        ("resp-handoff", resp(10, Reply::Handoff { applied: 2 })),
        ("resp-merkle", resp(11, Reply::Merkle { root: 1, segments: vec![2, 3], leaves: vec![] })),
        ("resp-keys", resp(12, Reply::Keys { keys: vec![(k(), 99)] })),
        ("resp-read-batch", resp(13, Reply::ReadBatch { entries: vec![(k(), vec![1])] })),
        (
            "resp-repair",
            resp(14, Reply::Repair(RepairReport { partitions: 2, exchanges: 3, keys_pulled: 5, ..Default::default() })),
        ),
        (
            "resp-merkle-roots",
            resp(
                15,
                Reply::MerkleRoots { roots: vec![PartitionRoot { partition: 3, root: 8, keys: 2, last_sync_ms: 9 }] },
            ),
        ),
        ("resp-purge", resp(16, Reply::Purge { purged: true })),
        ("resp-error", Message::Response(Response::new(17, Err(WireError::new(ErrorCode::PairTooLarge, "too big"))))),
    ]
}

#[test]
fn protocol_1_frames_still_decode_to_the_same_messages() {
    if std::env::var_os("RINGKV_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        for (name, m) in messages() {
            std::fs::write(dir().join(format!("{name}.bin")), Encoder::new().to_vec(&m)).unwrap();
        }
    }
    for (name, want) in messages() {
        let bytes = std::fs::read(dir().join(format!("{name}.bin"))).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut d = FrameDecoder::new(1 << 20);
        d.push(&bytes);
        let payload = d.next_frame().unwrap().unwrap_or_else(|| panic!("{name}: not one whole frame")).to_vec();
        assert!(d.next_frame().unwrap().is_none(), "{name}: one frame per file");
        let got = decode(&payload, DecodeLimits::PEER).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(got, want, "{name}");
    }
}
