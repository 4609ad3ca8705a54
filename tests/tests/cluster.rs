//! Three real nodes on 127.0.0.1..3: replication, siblings across
//! coordinators, a paused node, read repair, joins, refusals, routing.

use ringkv_core::version::Object;
use ringkv_net::{ClientError, ErrorCode, Level, Reply, Request, WriteOptions};
use ringkv_tests::harness::{cli, eventually, Cluster, Node};
use std::time::{Duration, Instant};

/// Nodes answer failing requests within 2 s instead of the default 5.
const FAST: &[&str] = &["--request-timeout-ms", "2000"];

fn values(g: &ringkv_net::GetResult) -> Vec<String> {
    g.values.iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect()
}

/// This node's own copy of `key`, read without coordination.
fn local_copy(node: &Node, key: &[u8]) -> Option<Object> {
    match node.client().call(Request::ReplicaRead { key: key.to_vec() }).unwrap() {
        Reply::ReplicaRead { found: true, object } => Some(Object::decode(&object).unwrap()),
        Reply::ReplicaRead { found: false, .. } => None,
        other => panic!("unexpected {other:?}"),
    }
}

fn local_values(node: &Node, key: &[u8]) -> Vec<String> {
    local_copy(node, key)
        .map(|o| o.values().map(|v| String::from_utf8_lossy(v).into_owned()).collect())
        .unwrap_or_default()
}

/// Polls `cond` for up to `timeout`.

#[test]
fn a_write_through_one_node_is_read_through_another_at_r_all() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, 1, FAST);
    c.node(0).client().put(b"greeting", b"hello", &WriteOptions { w: Level::All, ..Default::default() }).unwrap();
    let g = c.node(2).client().get(b"greeting", Level::All).unwrap();
    assert_eq!(values(&g), ["hello"]);
    // Every replica holds it (N=3 on three nodes: all of them).
    for n in &c.nodes {
        assert_eq!(local_values(n, b"greeting"), ["hello"], "{}", n.spec.node_id);
    }
    // The CLI asks the node it is told to, and that node coordinates.
    let out = cli(&["get", "greeting", "--r", "all", "--endpoint", &c.node(1).addr().to_string()], None);
    assert_eq!(out.stdout, b"hello");
}

#[test]
fn blind_writes_through_two_coordinators_are_siblings_until_a_context_resolves_them() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, 2, FAST);
    c.node(0).client().put(b"cart", b"apples", &WriteOptions::default()).unwrap();
    c.node(1).client().put(b"cart", b"pears", &WriteOptions::default()).unwrap();
    let g = c.node(2).client().get(b"cart", Level::All).unwrap();
    let mut vs = values(&g);
    vs.sort();
    assert_eq!(vs, ["apples", "pears"], "concurrent writes through different nodes are both kept");
    let opts = WriteOptions { context: g.context, ..Default::default() };
    c.node(2).client().put(b"cart", b"apples,pears", &opts).unwrap();
    for n in &c.nodes {
        assert_eq!(values(&n.client().get(b"cart", Level::All).unwrap()), ["apples,pears"], "{}", n.spec.node_id);
    }
}

#[test]
fn with_a_node_paused_quorum_works_all_fails_and_read_repair_heals_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, 1, FAST);
    let paused = c.node(2);
    paused.pause();
    let mut n1 = c.node(0).client();
    for i in 0..20 {
        n1.put(format!("k{i}").as_bytes(), format!("v{i}").as_bytes(), &WriteOptions::default())
            .unwrap_or_else(|e| panic!("quorum write {i} with one node paused: {e}"));
    }
    let mut n2 = c.node(1).client();
    assert_eq!(values(&n2.get(b"k7", Level::Quorum).unwrap()), ["v7"]);
    // `all` cannot be met: Timeout before the detector notices, Unavailable after.
    let started = Instant::now();
    let all = n1.put(b"needs-all", b"x", &WriteOptions { w: Level::All, ..Default::default() });
    match all {
        Err(ClientError::Server(e)) => {
            assert!(matches!(e.code, ErrorCode::Timeout | ErrorCode::Unavailable), "{e}")
        }
        other => panic!("a write at all with a node paused returned {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5), "failed within the request timeout, not a hang");
    match n2.get(b"k7", Level::All) {
        Err(ClientError::Server(e)) => {
            assert!(matches!(e.code, ErrorCode::Timeout | ErrorCode::Unavailable), "{e}")
        }
        other => panic!("a read at all with a node paused returned {other:?}"),
    }

    paused.resume();
    // Once the node answers again, reads at all succeed and repair its copy.
    eventually(Duration::from_secs(20), "reads at all after resume", || n2.get(b"k0", Level::All).is_ok());
    for i in 0..20 {
        let key = format!("k{i}");
        assert_eq!(values(&n2.get(key.as_bytes(), Level::All).unwrap()), [format!("v{i}")]);
    }
    for i in 0..20 {
        let key = format!("k{i}");
        eventually(Duration::from_secs(10), "read repair of the paused node", || {
            local_values(paused, key.as_bytes()) == [format!("v{i}")]
        });
    }
}

#[test]
fn the_client_routes_by_topology_and_follows_a_join() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, 2, FAST);
    let mut client = ringkv_client::Client::builder().seeds(c.addrs()).build().unwrap();
    let v1 = client.ring_version();
    for i in 0..200 {
        let key = format!("user{i}");
        // The first address is a replica's own shard for the key.
        let route = client.topology().unwrap().route(key.as_bytes());
        assert_eq!(route.len(), 3);
        client.put(key.as_bytes(), format!("value{i}"), &ringkv_client::WriteOptions::default()).unwrap();
    }

    // A fourth node joins with nothing but seeds.
    let port = c.node(0).spec.port;
    let mut spec = Cluster::spec(dir.path(), 3, 4, port, 2, FAST);
    spec.seeds = c.nodes.iter().map(|n| n.addr()).collect();
    c.nodes.push(Node::start(spec));
    c.wait_converged(4, Duration::from_secs(60));

    // The client learns the new ring from a response and keeps working.
    eventually(Duration::from_secs(20), "the client to refresh its topology", || {
        let _ = client.get(b"user0");
        client.ring_version() > v1
    });
    assert_eq!(client.topology().unwrap().cluster().members.len(), 4);
    let all = ringkv_client::ReadOptions { r: Some(Level::All), ..Default::default() };
    for i in 0..200 {
        let key = format!("user{i}");
        let g = client.get_with(key.as_bytes(), &all).unwrap();
        assert_eq!(g.values(), [format!("value{i}").into_bytes()], "{key} after the join");
    }
    // Handoff gives the newcomer its share of the data.
    let n4 = &c.nodes[3];
    eventually(Duration::from_secs(60), "handoff to the new node", || {
        n4.try_client()
            .and_then(|mut x| x.node_info().ok())
            .is_some_and(|i| i.shards.iter().map(|s| s.keys).sum::<u64>() > 50)
    });
}

#[test]
fn nodes_of_another_cluster_name_or_partition_count_refuse_to_join() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 2, 1, FAST);
    let port = c.node(0).spec.port;
    for (flag, value, expect) in [("--cluster", "elsewhere", "cluster"), ("--partitions", "512", "512 partitions")] {
        let mut spec = Cluster::spec(dir.path(), 2, 3, port, 1, FAST);
        spec.dir = dir.path().join(format!("stranger{value}"));
        spec.extra.extend([flag.to_string(), value.to_string()]);
        let mut stranger = Node::new(spec);
        stranger.spawn();
        let status = stranger.wait_exit(Duration::from_secs(30)).expect("the stranger stops by itself");
        assert!(!status.success());
        let log = stranger.log();
        let reason = log.lines().rev().find(|l| l.contains("refusing to join")).unwrap_or("");
        assert!(reason.contains(expect), "one-line reason naming the mismatch, got:\n{log}");
    }
    // The cluster is unaffected: still two members, both serving.
    c.wait_converged(2, Duration::from_secs(10));
    c.nodes[0].client().put(b"still", b"fine", &WriteOptions { w: Level::All, ..Default::default() }).unwrap_or_else(
        |e| panic!("write at all after the strangers left: {e}\n{}\n{}", c.nodes[0].log(), c.nodes[1].log()),
    );
    let info = c.nodes[1].client().node_info().unwrap();
    assert_eq!(info.members.len(), 2);
    let _ = &mut c;
}

#[test]
fn status_lists_every_member_with_state_weight_shards_and_share() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, 2, FAST);
    let out = cli(&["status", "--json", "--endpoint", &c.node(1).addr().to_string()], None);
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let members = s["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    let mut total_share = 0.0;
    for m in members {
        assert_eq!(m["status"], "up");
        assert_eq!(m["alive"], true);
        assert_eq!(m["shards"], 2);
        assert_eq!(m["weight"], 1);
        let share = m["share"].as_f64().unwrap();
        assert!((share - 1.0 / 3.0).abs() < 0.01, "share {share}");
        total_share += share;
    }
    assert!((total_share - 1.0).abs() < 1e-9);
    let text = String::from_utf8_lossy(&cli(&["status", "--endpoint", &c.node(0).addr().to_string()], None).stdout)
        .into_owned();
    for id in ["n1", "n2", "n3"] {
        assert!(text.contains(id), "{text}");
    }
}

/// Client-driven reads (`GetCopy`): a replica answers with its own copy,
/// exactly what a coordinated read of that copy returns; a node that is not
/// one of the key's replicas refuses (`StaleTopology`) rather than answer
/// from whatever it has, so a client can never count it toward r.
#[test]
fn a_copy_read_is_answered_by_replicas_only_and_matches_a_coordinated_read() {
    let dir = tempfile::tempdir().unwrap();
    // N=2 of 3 nodes, two shards each: every key has a non-replica, and a
    // copy read can land on the node's other shard.
    let c = Cluster::start(dir.path(), 3, 2, &["--request-timeout-ms", "2000", "--replicas", "2"]);
    let all = WriteOptions { w: Level::All, ..Default::default() };
    let mut clients: Vec<_> = c.nodes.iter().map(Node::client).collect();
    for i in 0..20 {
        let key = format!("copy-{i}");
        clients[0].put(key.as_bytes(), format!("v{i}").as_bytes(), &all).unwrap();
    }
    for i in 0..21 {
        // Key 20 was never written: its replicas say so.
        let key = format!("copy-{i}");
        let coordinated = clients[1].get(key.as_bytes(), Level::All).unwrap();
        let (mut answered, mut refused) = (0, 0);
        for cl in clients.iter_mut() {
            match cl.call(Request::GetCopy { key: key.clone().into_bytes() }) {
                Ok(Reply::Get(g)) => {
                    assert_eq!(g, coordinated, "{key}: a replica's copy is what a read at r=all returns");
                    answered += 1;
                }
                Err(ClientError::Server(e)) if e.code == ErrorCode::StaleTopology => refused += 1,
                other => panic!("{key}: unexpected {other:?}"),
            }
        }
        assert_eq!((answered, refused), (2, 1), "{key}: its two replicas answer, the third node refuses");
        assert_eq!(coordinated.found, i < 20, "{key}");
    }
}
