//! Ring changes on real processes under bounded load, each checked against
//! the client histories: a fourth node joins, a node leaves, a killed node
//! is removed, and a stream broken by a restart of its receiver or its sender resumes.
//!
//! Every load is bounded in operations and time; every node is stopped by
//! pid however the test ends (the harness's `Drop`).

use ringkv_net::{Level, WriteOptions};
use ringkv_tests::harness::{cli, eventually, Cluster, Node};
use ringkv_tests::history::{check, History};
use ringkv_tests::load::{self, LoadSpec};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Short timeouts and frequent background rounds, so changes settle quickly.
const FAST: &[&str] = &["--request-timeout-ms", "2000", "--anti-entropy-interval-s", "3", "--handoff-interval-s", "1"];

fn addrs(c: &Cluster, which: &[usize]) -> Vec<SocketAddr> {
    which.iter().map(|&i| c.node(i).addr()).collect()
}

/// Writes `count` keys of `size` bytes at w=all; returns the keys.
fn preload(node: &Node, prefix: &str, count: usize, size: usize) -> Vec<Vec<u8>> {
    let mut c = node.client();
    let opts = WriteOptions { w: Level::All, ..Default::default() };
    (0..count)
        .map(|i| {
            let key = format!("{prefix}{i:05}").into_bytes();
            let mut value = format!("{prefix}{i}:").into_bytes();
            value.resize(size, b'.');
            c.put(&key, &value, &opts).unwrap_or_else(|e| panic!("preload {i}: {e}"));
            key
        })
        .collect()
}

/// Every preloaded key still reads, at r=all, as what was written.
fn assert_preloaded(c: &Cluster, via: usize, prefix: &str, keys: &[Vec<u8>], size: usize) {
    let all = c.read_all(via, keys);
    for (i, k) in keys.iter().enumerate() {
        let mut want = format!("{prefix}{i}:").into_bytes();
        want.resize(size, b'.');
        assert_eq!(all[k], vec![want], "{}", String::from_utf8_lossy(k));
    }
}

/// Keys each running node stores, by node id.
fn keys_by_node(c: &Cluster) -> Vec<(String, u64)> {
    c.nodes
        .iter()
        .filter(|n| n.is_running())
        .map(|n| (n.spec.node_id.clone(), n.client().node_info().unwrap().shards.iter().map(|s| s.keys).sum()))
        .collect()
}

/// No live member streams any more, as `node` sees it.
fn quiet(node: &Node) -> bool {
    node.try_client().and_then(|mut c| c.node_info().ok()).is_some_and(|i| {
        i.members.iter().filter(|m| m.alive).all(|m| m.moving_partitions == 0) && i.stream_keys_total == 0
    })
}

/// Quiet everywhere, twice, a few seconds apart (load figures are gossiped
/// every two seconds).
/// Waits until one of `senders` is inside a partition's stream: a chunk
/// (64 keys) acknowledged, at least two still to send.
fn mid_partition(c: &Cluster, senders: std::ops::Range<usize>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !senders.clone().any(|i| {
        let info = c.nodes[i].client().node_info().unwrap();
        info.stream_keys_total - info.stream_keys_left >= 64 && info.stream_keys_left >= 128
    }) {
        assert!(Instant::now() < deadline, "no sender got inside a partition");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn settled(c: &Cluster) -> bool {
    let running = || c.nodes.iter().filter(|n| n.is_running());
    if !running().all(quiet) {
        return false;
    }
    std::thread::sleep(Duration::from_secs(5));
    running().all(quiet)
}

fn run_cli(args: &[&str]) -> String {
    let out = cli(args, None);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "ringkv {args:?} failed:\n{text}");
    text
}

fn start_load(c: &Cluster, which: &[usize], prefix: &str, history: &Arc<History>) -> Vec<std::thread::JoinHandle<()>> {
    let mut spec = LoadSpec::new(addrs(c, which), prefix);
    spec.clients = 4;
    spec.keys = 60;
    spec.duration = Duration::from_secs(10);
    spec.max_ops = 4000;
    spec.pause = Duration::from_millis(5);
    load::start(&spec, history, &Arc::new(AtomicBool::new(false)), 0)
}

#[test]
fn a_fourth_node_joins_under_load_takes_a_quarter_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, 1, FAST);
    let keys = preload(c.node(0), "j/", 1500, 200);
    let history = History::new();
    let workers = start_load(&c, &[0, 1, 2], "jl/", &history);
    std::thread::sleep(Duration::from_secs(2));
    let port = c.node(0).spec.port;
    let mut spec = Cluster::spec(dir.path(), 3, 4, port, 1, FAST);
    spec.seeds = c.nodes.iter().map(|n| n.addr()).collect();
    c.nodes.push(Node::start(spec));
    for w in workers {
        w.join().unwrap();
    }
    c.wait_converged(4, Duration::from_secs(60));
    eventually(Duration::from_secs(120), "the streams to finish", || settled(&c));
    c.wait_merkle_converged(3, Duration::from_secs(60));
    let report = check(&history.events(), &c.read_all(0, &history.written_keys()), true);
    report.assert_ok();
    assert!(report.puts_acked > 200, "the load ran: {report:?}");
    assert_preloaded(&c, 3, "j/", &keys, 200);
    let by_node = keys_by_node(&c);
    let total: u64 = by_node.iter().map(|(_, k)| k).sum();
    let n4 = by_node.iter().find(|(id, _)| id == "n4").unwrap().1;
    let share = n4 as f64 / total as f64;
    println!("join: {report:?}; keys by node {by_node:?}; the new node holds {:.1}% of the copies", share * 100.0);
    assert!((share - 0.25).abs() <= 0.025, "the newcomer holds {share:.3} of the copies, not about 1/4: {by_node:?}");
}

#[test]
fn a_node_that_leaves_under_load_hands_everything_over_then_stops() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 4, 1, FAST);
    let keys = preload(c.node(0), "l/", 1000, 200);
    let history = History::new();
    // Clients use the nodes that stay.
    let workers = start_load(&c, &[0, 1, 2], "ll/", &history);
    std::thread::sleep(Duration::from_secs(1));
    let leaver = c.node(3).addr().to_string();
    let staged = run_cli(&["leave", "--endpoint", &leaver]);
    assert!(
        staged.contains("leave n4") && staged.contains("sends"),
        "the plan shows the change and what moves:\n{staged}"
    );
    let plan = run_cli(&["plan", "--json", "--endpoint", &leaver]);
    let plan: serde_json::Value = serde_json::from_str(plan.trim()).unwrap();
    assert!(plan["plan"]["moves"].as_array().unwrap().iter().all(|m| m["from"] == "n4"));
    run_cli(&["commit", "--wait", "--wait-s", "120", "--endpoint", &leaver]);
    let status = c.nodes[3].wait_exit(Duration::from_secs(60)).expect("the node stops once it holds nothing");
    assert!(status.success(), "a node that left exits cleanly:\n{}", c.nodes[3].log());
    for w in workers {
        w.join().unwrap();
    }
    c.wait_merkle_converged(3, Duration::from_secs(60));
    let report = check(&history.events(), &c.read_all(0, &history.written_keys()), true);
    report.assert_ok();
    assert!(report.puts_acked > 200, "the load ran: {report:?}");
    assert_preloaded(&c, 1, "l/", &keys, 200);
    // Its data directory holds no key, tombstone or hint.
    let inspect = cli(&["inspect", "--json", c.nodes[3].spec.dir.to_str().unwrap()], None);
    let v: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    for s in v["shards"].as_array().unwrap() {
        assert_eq!((s["keys"].as_u64(), s["tombstones"].as_u64(), s["hints"].as_u64()), (Some(0), Some(0), Some(0)));
    }
    let info = c.node(0).client().node_info().unwrap();
    let n4 = info.members.iter().find(|m| m.node_id == "n4").unwrap();
    assert_eq!(n4.partitions_replicated, 0);
    assert_eq!(n4.status, "left");
}

#[test]
fn a_killed_node_is_removed_and_its_replicas_are_restored_from_survivors() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 4, 1, FAST);
    let keys = preload(c.node(0), "r/", 800, 200);
    c.nodes[3].kill();
    let via = c.node(0).addr().to_string();
    // A node that is up cannot be removed.
    let up = cli(&["remove", "n2", "--endpoint", &via], None);
    assert!(!up.status.success() && String::from_utf8_lossy(&up.stderr).contains("n2 is up"));
    eventually(Duration::from_secs(30), "n4 to be seen down", || {
        c.node(0).client().node_info().unwrap().members.iter().any(|m| m.node_id == "n4" && !m.alive)
    });
    let history = History::new();
    let workers = start_load(&c, &[0, 1, 2], "rl/", &history);
    let staged = run_cli(&["remove", "n4", "--endpoint", &via]);
    assert!(staged.contains("remove n4"), "{staged}");
    run_cli(&["commit", "--endpoint", &via]);
    for w in workers {
        w.join().unwrap();
    }
    // Anti-entropy fills the new replicas; the repair command starts it now.
    for n in 0..3 {
        run_cli(&["repair", "--endpoint", &c.node(n).addr().to_string()]);
    }
    c.wait_merkle_converged(3, Duration::from_secs(90));
    let report = check(&history.events(), &c.read_all(0, &history.written_keys()), false);
    report.assert_ok();
    assert_preloaded(&c, 2, "r/", &keys, 200);
    // Three copies of every preloaded key on the three survivors.
    for k in &keys {
        for n in 0..3 {
            let copy = c.node(n).client().call(ringkv_net::Request::ReplicaRead { key: k.clone() }).unwrap();
            assert!(matches!(copy, ringkv_net::Reply::ReplicaRead { found: true, .. }), "n{} lacks {k:?}", n + 1);
        }
    }
}

#[test]
fn a_stream_broken_by_a_restart_of_its_receiver_resumes_rather_than_restarts() {
    let dir = tempfile::tempdir().unwrap();
    // Few, big partitions (375 keys, six chunks each), streamed slowly, so
    // the kill lands inside one.
    let slow: Vec<&str> = FAST.iter().copied().chain(["--stream-mb-per-s", "1", "--partitions", "16"]).collect();
    let mut c = Cluster::start(dir.path(), 3, 1, &slow);
    let size = 1000;
    let keys = preload(c.node(0), "s/", 6000, size);
    let port = c.node(0).spec.port;
    let mut spec = Cluster::spec(dir.path(), 3, 4, port, 1, &slow);
    spec.seeds = c.nodes.iter().map(|n| n.addr()).collect();
    c.nodes.push(Node::start(spec));
    c.wait_converged(4, Duration::from_secs(60));
    // Mid-stream: the receiver is killed and comes back, while a sender
    // has a chunk of a partition acknowledged and two still to send (so its
    // transfer breaks with something to resume from).
    mid_partition(&c, 0..3);
    c.nodes[3].kill();
    // Down long enough for the senders' calls to fail and their detectors
    // to notice, so the transfers break rather than wait.
    eventually(Duration::from_secs(30), "n4 to be seen down", || {
        c.node(0).client().node_info().unwrap().members.iter().any(|m| m.node_id == "n4" && !m.alive)
    });
    c.nodes[3].restart();
    c.wait_converged(4, Duration::from_secs(60));
    eventually(Duration::from_secs(180), "the streams to finish", || settled(&c));
    let sent: u64 = c.nodes[..3].iter().map(|n| n.client().node_info().unwrap().stream_bytes_sent).sum();
    let resumed: u64 = c.nodes[..3].iter().map(|n| n.client().node_info().unwrap().stream_keys_resumed).sum();
    let received: u64 = c.nodes[3].client().node_info().unwrap().shards.iter().map(|s| s.keys).sum();
    let moved = received * (size as u64 + 8);
    println!(
        "stream: {sent} bytes sent for {received} keys ({moved} bytes of keys and values); {resumed} keys resumed"
    );
    assert!(resumed > 0, "the broken stream resumed");
    assert!((sent as f64) < 1.3 * moved as f64, "{sent} bytes sent for {moved} bytes moved");
    assert_preloaded(&c, 3, "s/", &keys, size);
}

#[test]
fn a_stream_broken_by_a_restart_of_its_sender_resumes_from_what_it_saved() {
    let dir = tempfile::tempdir().unwrap();
    let slow: Vec<&str> = FAST.iter().copied().chain(["--stream-mb-per-s", "1", "--partitions", "16"]).collect();
    let mut c = Cluster::start(dir.path(), 3, 1, &slow);
    // Big values: each partition takes n1 about 1.5 s at 1 MB/s, longer
    // than the second between two saves of what its targets acknowledged.
    let size = 8000;
    let keys = preload(c.node(0), "t/", 3000, size);
    let port = c.node(0).spec.port;
    let mut spec = Cluster::spec(dir.path(), 3, 4, port, 1, &slow);
    spec.seeds = c.nodes.iter().map(|n| n.addr()).collect();
    c.nodes.push(Node::start(spec));
    c.wait_converged(4, Duration::from_secs(60));
    // n1 dies three quarters into a partition: a save (once a second while
    // chunks are acknowledged) has happened since the partition started.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = c.node(0).client().node_info().unwrap();
        let (left, total) = (info.stream_keys_left, info.stream_keys_total);
        if left > 0 && left * 4 < total {
            break;
        }
        assert!(Instant::now() < deadline, "n1 never got three quarters into a partition");
        std::thread::sleep(Duration::from_millis(10));
    }
    c.nodes[0].kill();
    c.nodes[0].restart();
    c.wait_converged(4, Duration::from_secs(60));
    eventually(Duration::from_secs(180), "the streams to finish", || settled(&c));
    let resumed = c.node(0).client().node_info().unwrap().stream_keys_resumed;
    println!("sender restart: {resumed} keys resumed by the restarted sender");
    assert!(resumed > 0, "the restarted sender skipped what its targets had acknowledged");
    assert_preloaded(&c, 3, "t/", &keys, size);
}

#[test]
fn bad_changes_are_refused_and_a_staged_then_committed_weight_survives_restarts_of_the_node_and_the_claimant() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, 1, FAST);
    let via = c.node(0).addr().to_string();
    let refused = |args: &[&str], why: &str| {
        let mut all = args.to_vec();
        all.extend(["--endpoint", &via]);
        let out = cli(&all, None);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(3), "{args:?} is refused: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    };
    refused(&["leave"], "needs at least 3");
    refused(&["remove", "n3"], "would have 2 members");
    refused(&["weight", "n2", "0"], "between 1 and");
    refused(&["weight", "nobody", "2"], "no member \"nobody\"");
    refused(&["commit"], "no ring change is staged");
    let staged = run_cli(&["weight", "n2", "3", "--endpoint", &via]);
    assert!(staged.contains("weight n2 3"), "{staged}");
    refused(&["weight", "n3", "2"], "already staged");
    // Nothing changed while staged.
    let share = |c: &Cluster, i: usize| {
        let info = c.node(i).client().node_info().unwrap();
        info.members.iter().find(|m| m.node_id == "n2").map(|m| (m.weight, m.partitions_owned)).unwrap()
    };
    assert_eq!(share(&c, 0).0, 1);
    // The staged change survives a restart of the node it was staged on.
    c.nodes[0].stop();
    c.nodes[0].restart();
    c.wait_converged(3, Duration::from_secs(60));
    let kept = run_cli(&["plan", "--endpoint", &via]);
    assert!(kept.contains("weight n2 3"), "still staged after the restart:\n{kept}");
    assert_eq!(share(&c, 1).0, 1, "and still not applied");
    run_cli(&["commit", "--wait", "--wait-s", "60", "--endpoint", &via]);
    // 3 of 5 weight units: about 60% of the 256 partitions.
    eventually(Duration::from_secs(30), "the new ring", || {
        let (w, owned) = share(&c, 2);
        w == 3 && (148..=160).contains(&owned)
    });
    // n1 is the claimant (the lowest id); restart it and n2.
    for i in [0, 1] {
        c.nodes[i].stop();
        c.nodes[i].restart();
    }
    c.wait_converged(3, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    for i in 0..3 {
        let (w, owned) = share(&c, i);
        assert_eq!(w, 3, "n{} sees n2's weight after the restarts", i + 1);
        assert!((148..=160).contains(&owned), "n2 owns {owned} as n{} sees it", i + 1);
    }
}
