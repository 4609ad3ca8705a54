//! What an operator sees: the Prometheus endpoint, `ringkv status` (JSON
//! fields, joining nodes, --watch) and the event log (JSON lines, members
//! going down and up with the phi that decided it).

use ringkv_net::{ClientError, ErrorCode, Level, WriteOptions};
use ringkv_tests::harness::{cli, eventually, free_ports, ringkv_bin, Cluster, Node, NodeSpec};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// One sample: name, sorted labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// The scrape, parsed by an independent parser.
fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let (status, body) = http_get(addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("exposition text a parser accepts");
    parsed
        .samples
        .into_iter()
        .map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            let mut labels: Vec<(String, String)> = s.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            labels.sort();
            (s.metric, labels, v)
        })
        .collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| n == name && labels.iter().all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v)))
        .map(|(_, _, v)| v)
        .sum()
}

#[test]
fn the_metrics_endpoint_serves_exposition_text_whose_figures_move_with_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = NodeSpec::single(dir.path(), 2);
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, free_ports(Ipv4Addr::LOCALHOST, 1)));
    spec.extra = vec!["--replicas".into(), "1".into(), "--metrics".into(), metrics.to_string()];
    let node = Node::start(spec);
    let before = scrape(metrics);
    for family in
        ["ringkv_requests_total", "ringkv_errors_total", "ringkv_keys", "ringkv_members", "ringkv_connections"]
    {
        assert!(before.iter().any(|(n, _, _)| n == family), "{family} is exported");
    }
    let mut c = node.client();
    for i in 0..20 {
        c.put(format!("m{i}").as_bytes(), b"v", &WriteOptions::default()).unwrap();
        c.get(format!("m{i}").as_bytes(), Level::Count(1)).unwrap();
    }
    let big = vec![0u8; 64 * 1024];
    assert!(matches!(
        c.put(b"big", &big, &WriteOptions::default()),
        Err(ClientError::Server(e)) if e.code == ErrorCode::PairTooLarge
    ));
    // Load figures are published every two seconds.
    eventually(Duration::from_secs(10), "the keys gauge", || value(&scrape(metrics), "ringkv_keys", &[]) >= 20.0);
    let after = scrape(metrics);
    let moved = |name: &str, labels: &[(&str, &str)]| value(&after, name, labels) - value(&before, name, labels);
    assert_eq!(moved("ringkv_requests_total", &[("op", "put")]), 20.0);
    assert_eq!(moved("ringkv_requests_total", &[("op", "get")]), 20.0);
    assert_eq!(moved("ringkv_request_duration_seconds_count", &[("op", "get")]), 20.0);
    assert_eq!(moved("ringkv_errors_total", &[("kind", "PairTooLarge")]), 1.0);
    assert_eq!(value(&after, "ringkv_members", &[("state", "up")]), 1.0);
    assert!(value(&after, "ringkv_connections", &[]) >= 1.0);
    let (status, _) = http_get(metrics, "/elsewhere");
    assert!(status.contains("404"), "{status}");
}

#[test]
fn status_json_has_the_documented_fields_and_watch_refreshes() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, 1, &[]);
    let via = c.node(0).addr().to_string();
    let out = cli(&["status", "--json", "--endpoint", &via], None);
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in ["node_id", "cluster", "partitions", "replicas", "ring_version", "keys", "disk_bytes", "hints"] {
        assert!(!s[field].is_null(), "{field} in {s}");
    }
    for field in ["hot_partitions", "stream", "anti_entropy", "members", "shards"] {
        assert!(!s[field].is_null(), "{field} in {s}");
    }
    for m in s["members"].as_array().unwrap() {
        for field in [
            "node_id",
            "addr",
            "status",
            "alive",
            "weight",
            "partitions_owned",
            "share",
            "ops_per_sec",
            "p99_us",
            "cpu_busy",
            "disk_bytes",
            "hints_pending",
            "moving_partitions",
            "moving_bytes",
        ] {
            assert!(!m[field].is_null(), "member field {field} in {m}");
        }
    }
    // --watch redraws in place until stopped.
    let mut watch = Command::new(ringkv_bin())
        .args(["status", "--watch", "1", "--endpoint", &via])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    watch.kill().unwrap();
    let mut text = String::new();
    watch.stdout.take().unwrap().read_to_string(&mut text).unwrap();
    let _ = watch.wait();
    assert!(text.matches("\x1b[H\x1b[2J").count() >= 2, "at least two screens: {text:?}");
    assert!(text.contains("n1") && text.contains("n3"));
}

#[test]
fn a_node_still_joining_reports_joining_until_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = NodeSpec::single(dir.path(), 1);
    // A seed nobody answers: the node waits before forming a ring alone.
    spec.seeds = vec![SocketAddr::from(([127, 0, 0, 9], spec.port))];
    let node = Node::start(spec);
    let mine = |n: &Node| {
        let info = n.client().node_info().unwrap();
        info.members.iter().find(|m| m.node_id == "n1").map(|m| m.status.clone()).unwrap()
    };
    assert_eq!(mine(&node), "joining");
    match node.client().get(b"k", Level::Count(1)) {
        Err(ClientError::Server(e)) => assert!(e.message.contains("still joining"), "{e}"),
        other => panic!("a joining node served a read: {other:?}"),
    }
    // Once it formed its ring it serves, and says so.
    eventually(Duration::from_secs(30), "the node to form its ring", || mine(&node) == "up");
    assert!(node.client().get(b"k", Level::Count(1)).unwrap().values.is_empty());
}

#[test]
fn events_are_json_lines_and_a_member_going_down_is_logged_with_its_phi() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, 1, &["--log-format", "json"]);
    c.nodes[2].kill();
    eventually(Duration::from_secs(30), "n1 to log n3 down", || c.node(0).log().contains("member down"));
    c.nodes[2].restart();
    c.wait_converged(3, Duration::from_secs(60));
    eventually(Duration::from_secs(30), "n1 to log n3 up", || c.node(0).log().contains("member up"));
    let log = c.node(0).log();
    let events: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(events.len() > 3, "the log is JSON lines:\n{log}");
    let down = events.iter().find(|e| e["fields"]["message"].as_str().is_some_and(|m| m.starts_with("member down")));
    let down = down.unwrap_or_else(|| panic!("no member-down event in:\n{log}"));
    assert_eq!(down["fields"]["member"], "n3");
    assert!(down["fields"]["phi"].as_f64().is_some_and(|phi| phi > 0.0), "{down}");
    assert_eq!(down["level"], "WARN");
}

#[test]
fn hint_delivery_is_logged_when_it_starts_and_when_it_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 4, 1, &["--request-timeout-ms", "2000", "--handoff-interval-s", "1"]);
    c.nodes[3].pause();
    // Writes whose replicas include n4 leave hints on a fallback.
    let mut client = c.node(0).client();
    let opts = WriteOptions { w: Level::Count(2), ..Default::default() };
    for i in 0..60 {
        client.put(format!("h{i}").as_bytes(), b"v", &opts).unwrap();
    }
    eventually(Duration::from_secs(20), "hints to be held", || c.hints_pending() > 0);
    c.nodes[3].resume();
    let logs = || c.nodes[..3].iter().map(Node::log).collect::<String>();
    eventually(Duration::from_secs(60), "hint delivery to finish", || logs().contains("hint delivery finished"));
    assert!(logs().contains("hint delivery started"), "{}", logs());
    eventually(Duration::from_secs(30), "no hints left", || c.hints_pending() == 0);
}
