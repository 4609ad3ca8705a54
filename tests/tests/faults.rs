//! Failures on real processes, checked against the client histories:
//! kill -9 under load, a network partition with hinted handoff, a wiped node
//! restored by anti-entropy, concurrent writers on both sides of a
//! partition, the riak_test kv679 case, and a control run that proves the
//! checker catches stale reads.
//!
//! Every load is bounded in operations and time; every node and every
//! nftables rule is removed however the test ends.

use ringkv_core::version::Object;
use ringkv_net::{ClientConfig, Level, Reply, Request, WriteOptions};
use ringkv_tests::faults::{node_ip, Partition};
use ringkv_tests::harness::{cli, eventually, Cluster, Node};
use ringkv_tests::history::{check, History, Op, Outcome};
use ringkv_tests::load::{self, LoadSpec};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Short timeouts and frequent background rounds, so faults resolve quickly.
const FAST: &[&str] = &["--request-timeout-ms", "2000", "--anti-entropy-interval-s", "3", "--handoff-interval-s", "1"];

fn addrs(c: &Cluster, which: &[usize]) -> Vec<SocketAddr> {
    which.iter().map(|&i| c.node(i).addr()).collect()
}

fn ips(which: &[usize]) -> Vec<Ipv4Addr> {
    which.iter().map(|&i| node_ip(i)).collect()
}

/// Share of requests invoked in [from, to) that were acknowledged.
fn availability(history: &History, from: u64, to: u64) -> (usize, usize) {
    let during: Vec<_> = history.events().into_iter().filter(|e| e.invoked_us >= from && e.invoked_us < to).collect();
    let ok = during.iter().filter(|e| matches!(e.outcome, Outcome::Ok(_))).count();
    (ok, during.len())
}

fn local_values(node: &Node, key: &[u8]) -> Vec<Vec<u8>> {
    match node.client().call(Request::ReplicaRead { key: key.to_vec() }).unwrap() {
        Reply::ReplicaRead { found: true, object } => {
            Object::decode(&object).unwrap().values().map(<[u8]>::to_vec).collect()
        }
        _ => vec![],
    }
}

#[test]
fn kill_9_of_one_node_under_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, 1, FAST);
    let history = History::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut spec = LoadSpec::new(addrs(&c, &[0, 1, 2]), "k9/");
    spec.clients = 6;
    spec.duration = Duration::from_secs(9);
    spec.max_ops = 3000;
    spec.w = Level::Count(2);
    let workers = load::start(&spec, &history, &stop, 0);
    std::thread::sleep(Duration::from_secs(2));
    let killed_at = history.now_us();
    c.nodes[2].kill();
    std::thread::sleep(Duration::from_secs(3));
    let restarted_at = history.now_us();
    c.nodes[2].restart();
    for w in workers {
        w.join().unwrap();
    }
    c.wait_converged(3, Duration::from_secs(30));
    let converge = c.wait_merkle_converged(3, Duration::from_secs(60));
    let keys = history.written_keys();
    let report = check(&history.events(), &c.read_all(0, &keys), false);
    let (ok, during) = availability(&history, killed_at, restarted_at);
    println!(
        "kill -9 under load: {} puts acknowledged, {} failed, {} indeterminate, {} deletes; lost {}; \
         {ok}/{during} requests ({:.1}%) succeeded while the node was down; replicas converged {converge:?} after the load",
        report.puts_acked,
        report.puts_failed,
        report.puts_indeterminate,
        report.deletes_acked,
        report.lost.len(),
        100.0 * ok as f64 / during.max(1) as f64
    );
    report.assert_ok();
    assert!(report.puts_acked > 300, "the load ran: {report:?}");
    assert!(during > 50 && ok as f64 / during as f64 > 0.9, "writes at w=2 stayed available: {ok}/{during}");
}

#[test]
fn a_partitioned_node_gets_its_hints_and_replicas_converge_after_healing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 5, 1, FAST);
    let history = History::new();
    let stop = Arc::new(AtomicBool::new(false));
    // Clients stand on the majority side (they connect from 127.0.0.1).
    let mut spec = LoadSpec::new(addrs(&c, &[0, 1, 2, 3]), "part/");
    spec.clients = 4;
    spec.keys = 80;
    spec.duration = Duration::from_secs(10);
    spec.max_ops = 3000;
    let workers = load::start(&spec, &history, &stop, 0);
    std::thread::sleep(Duration::from_secs(2));
    let cut = Partition::new(&[&ips(&[0, 1, 2, 3]), &ips(&[4])], c.ports());
    let cut_at = history.now_us();
    std::thread::sleep(Duration::from_secs(5));
    let hints = c.hints_pending();
    let healed_at = history.now_us();
    cut.heal();
    let healed = Instant::now();
    for w in workers {
        w.join().unwrap();
    }
    eventually(Duration::from_secs(60), "hints to be delivered", || c.hints_pending() == 0);
    c.wait_merkle_converged(3, Duration::from_secs(90));
    let converged_after_heal = healed.elapsed();
    let keys = history.written_keys();
    let report = check(&history.events(), &c.read_all(0, &keys), false);
    let (ok, during) = availability(&history, cut_at, healed_at);
    println!(
        "partition of 1 of 5: {} puts acknowledged, lost {}; {hints} hints held during the cut; {ok}/{during} requests \
         succeeded during it; hints delivered and all replicas equal {converged_after_heal:?} after healing",
        report.puts_acked,
        report.lost.len()
    );
    report.assert_ok();
    assert!(hints > 0, "fallbacks held hints for the cut-off node");
    assert!(ok as f64 / during.max(1) as f64 > 0.9, "the majority side stayed available: {ok}/{during}");
}

#[test]
fn a_wiped_node_is_restored_by_anti_entropy_and_a_second_repair_moves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Continuous anti-entropy rarely, so the repair command does the work.
    let slow = &["--request-timeout-ms", "2000", "--anti-entropy-interval-s", "3600"];
    let mut c = Cluster::start(dir.path(), 3, 2, slow);
    let mut client = c.node(0).client();
    let all = WriteOptions { w: Level::All, ..Default::default() };
    for i in 0..300 {
        client.put(format!("wipe/{i}").as_bytes(), format!("v{i}").as_bytes(), &all).unwrap();
    }
    client.delete(b"wipe/0", &all).unwrap();
    // A permanent failure: the disk is gone.
    c.nodes[1].stop();
    std::fs::remove_dir_all(&c.nodes[1].spec.dir).unwrap();
    c.nodes[1].restart();
    c.wait_converged(3, Duration::from_secs(30));
    assert!(local_values(c.node(1), b"wipe/5").is_empty(), "the node came back empty");

    let endpoint = c.node(1).addr().to_string();
    let first = cli(&["repair", "--json", "--endpoint", &endpoint], None);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let first: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    println!("first repair on the wiped node: {first}");
    // 300 keys, one of them a tombstone, all missing here.
    assert_eq!(first["keys_pulled"], 300, "{first}");
    assert_eq!(first["keys_differing"], 300, "{first}");
    assert_eq!(first["keys_pushed"], 0, "{first}");
    for i in 1..300 {
        let key = format!("wipe/{i}");
        assert_eq!(local_values(c.node(1), key.as_bytes()), vec![format!("v{i}").into_bytes()], "{key}");
    }
    let second = cli(&["repair", "--json", "--endpoint", &endpoint], None);
    let second: serde_json::Value = serde_json::from_slice(&second.stdout).unwrap();
    println!("second repair: {second}");
    assert_eq!(second["keys_pulled"], 0, "{second}");
    assert_eq!(second["keys_pushed"], 0, "{second}");
    assert_eq!(second["exchanges"], second["in_sync"], "{second}");
    c.wait_merkle_converged(3, Duration::from_secs(10));
}

#[test]
fn concurrent_writers_on_both_sides_of_a_partition_become_siblings() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 5, 1, FAST);
    // Keys the minority side {n4, n5} can write at w=2: it holds a replica.
    let client = ringkv_client::Client::builder().seeds(c.addrs()).build().unwrap();
    let topo = client.topology().unwrap().clone();
    let minority: Vec<SocketAddr> = addrs(&c, &[3, 4]);
    let keys: Vec<String> = (0..200)
        .map(|i| format!("split/{i}"))
        .filter(|k| topo.route(k.as_bytes()).iter().any(|a| minority.iter().any(|m| m.ip() == a.ip())))
        .take(12)
        .collect();
    assert_eq!(keys.len(), 12);
    let cut = Partition::new(&[&ips(&[0, 1, 2]), &ips(&[3, 4])], c.ports());
    // Wait until every node sees every node of the other side as down
    // (sloppy quorum on both): a coordinator that still believes a cut-off
    // replica alive waits for it until its deadline.
    let left = ClientConfig { bind: Some(IpAddr::V4(node_ip(0))), ..Default::default() };
    let right = ClientConfig { bind: Some(IpAddr::V4(node_ip(3))), ..Default::default() };
    eventually(Duration::from_secs(30), "both sides to notice the partition", || {
        let seen = |node: usize, cfg: &ClientConfig, down: usize| {
            ringkv_net::Client::connect(c.node(node).addr(), cfg)
                .and_then(|mut x| x.node_info())
                .is_ok_and(|i| i.members.iter().filter(|m| !m.alive).count() == down)
        };
        (0..3).all(|n| seen(n, &left, 2)) && (3..5).all(|n| seen(n, &right, 3))
    });
    let mut a = ringkv_net::Client::connect(c.node(0).addr(), &left).unwrap();
    let mut b = ringkv_net::Client::connect(c.node(3).addr(), &right).unwrap();
    let w2 = WriteOptions { w: Level::Count(2), ..Default::default() };
    for k in &keys {
        a.put(k.as_bytes(), format!("left:{k}").as_bytes(), &w2).unwrap_or_else(|e| panic!("left {k}: {e}"));
        b.put(k.as_bytes(), format!("right:{k}").as_bytes(), &w2).unwrap_or_else(|e| panic!("right {k}: {e}"));
    }
    cut.heal();
    eventually(Duration::from_secs(60), "hints to be delivered", || c.hints_pending() == 0);
    let converged = c.wait_merkle_converged(3, Duration::from_secs(90));
    let keys_b: Vec<Vec<u8>> = keys.iter().map(|k| k.as_bytes().to_vec()).collect();
    for (k, values) in c.read_all(0, &keys_b) {
        let mut values: Vec<String> = values.iter().map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        values.sort();
        let k = String::from_utf8(k).unwrap();
        assert_eq!(values, [format!("left:{k}"), format!("right:{k}")], "both sides' writes survive as siblings");
    }
    println!("both sides' writes kept as siblings on {} keys; replicas equal {converged:?} after hints", keys.len());
}

#[test]
fn a_coordinator_that_lost_its_data_keeps_old_values_beside_its_blind_write() {
    // riak_test kv679_dataloss: a wiped coordinator reusing its old dots
    // would make the new value look like it supersedes the old one.
    let dir = tempfile::tempdir().unwrap();
    let slow = &["--request-timeout-ms", "2000", "--anti-entropy-interval-s", "3600"];
    let mut c = Cluster::start(dir.path(), 3, 1, slow);
    let all = WriteOptions { w: Level::All, ..Default::default() };
    c.node(0).client().put(b"kv679", b"old", &all).unwrap();
    c.nodes[0].stop();
    std::fs::remove_dir_all(&c.nodes[0].spec.dir).unwrap();
    c.nodes[0].restart();
    c.wait_converged(3, Duration::from_secs(30));
    // Coordinated by the wiped node itself (a replica of every key here).
    c.node(0).client().put(b"kv679", b"new", &all).unwrap();
    let mut values: Vec<Vec<u8>> = c.node(1).client().get(b"kv679", Level::All).unwrap().values;
    values.sort();
    assert_eq!(values, vec![b"new".to_vec(), b"old".to_vec()], "both survive as siblings");
}

#[test]
fn control_run_the_checker_reports_stale_reads_at_r1_w1_across_a_partition() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, 1, FAST);
    let cut = Partition::new(&[&ips(&[0, 1]), &ips(&[2])], c.ports());
    let history = History::new();
    let one = WriteOptions { w: Level::Count(1), ..Default::default() };
    let mut writer = c.node(0).client();
    let reader_cfg = ClientConfig { bind: Some(IpAddr::V4(node_ip(2))), ..Default::default() };
    let mut reader = ringkv_net::Client::connect(c.node(2).addr(), &reader_cfg).unwrap();
    for i in 0..30 {
        let key = format!("stale/{}", i % 5).into_bytes();
        let value = format!("v{i}").into_bytes();
        let t = history.now_us();
        let out = match writer.put(&key, &value, &one) {
            Ok(_) => Outcome::Ok(vec![]),
            Err(e) => load::classify(&e),
        };
        history.record(0, Op::Put { key: key.clone(), value, parents: vec![] }, t, out);
        let t = history.now_us();
        let out = match reader.get(&key, Level::Count(1)) {
            Ok(g) => Outcome::Ok(g.values),
            Err(e) => load::classify(&e),
        };
        history.record(1, Op::Get { key }, t, out);
    }
    cut.heal();
    c.wait_converged(3, Duration::from_secs(30));
    let keys = history.written_keys();
    let finals = c.read_all(0, &keys);
    let strict = check(&history.events(), &finals, true);
    check(&history.events(), &finals, false).assert_ok();
    println!("control run: the strict checker found {} stale reads", strict.stale_reads.len());
    assert!(!strict.stale_reads.is_empty(), "reads at r=1 from the cut-off node must be reported stale");
}

/// Tombstones held by each of the given nodes: (node index, count).
fn tombstones(c: &Cluster, which: &[usize]) -> Vec<(usize, u64)> {
    which
        .iter()
        .map(|&i| (i, c.node(i).client().node_info().unwrap().shards.iter().map(|s| s.tombstones).sum()))
        .collect()
}

#[test]
fn tombstones_are_not_purged_while_a_replica_still_holds_the_old_value() {
    // The danger a purge must avoid: a replica that missed the delete still
    // has the value, and anti-entropy would hand it back to replicas that
    // forgot the tombstone.
    let dir = tempfile::tempdir().unwrap();
    let grace_s = 3;
    let extra = ["--request-timeout-ms", "2000", "--anti-entropy-interval-s", "1", "--tombstone-grace-s", "3"];
    let mut c = Cluster::start(dir.path(), 3, 1, &extra);
    let keys: Vec<Vec<u8>> = (0..20).map(|i| format!("purge/{i}").into_bytes()).collect();
    let all = WriteOptions { w: Level::All, ..Default::default() };
    let mut client = c.node(0).client();
    for k in &keys {
        client.put(k, b"old", &all).unwrap();
    }
    // Killed, not paused: a paused node would still find the deletes
    // queued in its sockets when it wakes.
    c.nodes[2].kill();
    let quorum = |context| WriteOptions { context, w: Level::Count(2), ..Default::default() };
    for k in &keys {
        let context = client.get(k, Level::Count(2)).unwrap().context;
        client.delete(k, &quorum(context)).unwrap();
    }
    // Well past the grace period, with node 3 still holding the old values.
    std::thread::sleep(Duration::from_secs(grace_s + 5));
    for (node, held) in tombstones(&c, &[0, 1]) {
        assert_eq!(held, keys.len() as u64, "node {node} kept every tombstone while a replica was unreachable");
    }
    c.nodes[2].restart();
    let old = keys.iter().filter(|k| !local_values(c.node(2), k).is_empty()).count();
    assert!(old > 0, "node 3 came back with the old values");
    // Anti-entropy carries the tombstones to node 3, then the purge runs.
    let took = eventually(Duration::from_secs(90), "tombstones purged on every replica", || {
        tombstones(&c, &[0, 1, 2]).iter().all(|&(_, n)| n == 0)
    });
    println!("tombstones purged on all replicas {:.1}s after the replica came back", took.as_secs_f64());
    c.wait_converged(3, Duration::from_secs(30));
    for (k, values) in c.read_all(1, &keys) {
        assert!(values.is_empty(), "{k:?} came back after the purge: {values:?}");
    }
    // Replay honours the purge: a restarted node does not resurrect the
    // values still lying in its older segments.
    c.nodes[2].stop();
    c.nodes[2].restart();
    c.wait_converged(3, Duration::from_secs(30));
    for node in 0..3 {
        for (k, values) in c.read_all(node, &keys) {
            assert!(values.is_empty(), "{k:?} came back on restart: {values:?}");
        }
    }
    assert!(tombstones(&c, &[0, 1, 2]).iter().all(|&(_, n)| n == 0));
}
