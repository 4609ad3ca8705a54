//! `ringkv autoscale --provisioner local` on real processes: load above the
//! target for the window adds a node, a quiet period removes it again, never
//! below N, with at most one change per cool-down; no acknowledged write is
//! lost on the way (the lost-write checker).
//!
//! The controller and every node it started are stopped by pid however the
//! test ends; the load is bounded in operations and time.

use ringkv_tests::harness::{ringkv_bin, Cluster};
use ringkv_tests::history::{check, History};
use ringkv_tests::load::{self, LoadSpec};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

const FAST: &[&str] = &["--request-timeout-ms", "2000", "--anti-entropy-interval-s", "3", "--handoff-interval-s", "1"];

/// The controller process, and the nodes its log says it started: all
/// killed on drop.
struct Controller {
    child: Child,
    log: PathBuf,
}

impl Controller {
    fn events(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn of(&self, event: &str) -> Vec<serde_json::Value> {
        self.events().into_iter().filter(|e| e["event"] == event).collect()
    }

    fn wait_for(&self, event: &str, timeout: Duration) -> serde_json::Value {
        let start = Instant::now();
        loop {
            if let Some(e) = self.of(event).into_iter().next() {
                return e;
            }
            assert!(
                start.elapsed() < timeout,
                "no {event:?} within {timeout:?}; controller log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for e in self.of("added") {
            if let Some(pid) = e["pid"].as_i64() {
                // SAFETY: a node this test's controller started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

fn start_controller(dir: &Path, seed: &str, port: u16) -> Controller {
    // Any real load is far above a 5% target; an idle node far below.
    let policy = ["--target-cpu", "0.05", "--max-nodes", "4", "--scale-out-window-s", "6", "--scale-in-window-s", "15"];
    let timing = ["--cooldown-s", "10", "--interval-s", "2", "--duration-s", "200"];
    start_controller_with(dir, seed, port, &[&policy[..], &timing[..]].concat())
}

fn start_controller_with(dir: &Path, seed: &str, port: u16, args: &[&str]) -> Controller {
    let log = dir.join("autoscale.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(ringkv_bin());
    cmd.args(["autoscale", "--provisioner", "local", "--endpoint", seed])
        .arg("--local-dir")
        .arg(dir.join("auto"))
        .args(["--local-port", &port.to_string()])
        .args(args);
    for a in FAST {
        cmd.arg(format!("--server-arg={a}"));
    }
    let child = cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out).spawn().unwrap();
    Controller { child, log }
}

#[test]
fn load_adds_a_node_and_a_quiet_period_removes_it_never_below_n() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, 1, FAST);
    let ctl = start_controller(dir.path(), &c.node(0).addr().to_string(), c.node(0).spec.port);
    let history = History::new();
    let mut spec = LoadSpec::new(c.nodes.iter().map(|n| n.addr()).collect(), "as/");
    spec.clients = 4;
    spec.duration = Duration::from_secs(30);
    spec.max_ops = 30_000;
    spec.pause = Duration::from_millis(1);
    let workers = load::start(&spec, &history, &Arc::new(AtomicBool::new(false)), 0);
    let added = ctl.wait_for("added", Duration::from_secs(60));
    let new_id = added["member"].as_str().unwrap().to_string();
    assert!(added["addr"].as_str().unwrap().starts_with("127.0.0.4:"), "the next free loopback address: {added}");
    for w in workers {
        w.join().unwrap();
    }
    let removed = ctl.wait_for("removed", Duration::from_secs(150));
    assert_eq!(removed["member"], new_id.as_str(), "only a node the controller started is removed");

    // The decisions that changed something, and the figures behind them.
    let changes: Vec<serde_json::Value> =
        ctl.of("decision").into_iter().filter(|e| e["decision"]["decision"] != "hold").collect();
    assert_eq!(changes.len(), 2, "one add, one remove: {changes:#?}");
    assert_eq!(changes[0]["decision"]["decision"], "add");
    assert!(changes[0]["decision"]["reason"].as_str().unwrap().contains("mean CPU"), "{}", changes[0]);
    assert_eq!(changes[1]["decision"]["decision"], "remove");
    let gap = changes[1]["ts_ms"].as_u64().unwrap() - changes[0]["ts_ms"].as_u64().unwrap();
    assert!(gap >= 10_000, "two changes within the 10 s cool-down ({gap} ms)");
    for d in ctl.of("decision") {
        assert!(d["serving"].as_u64().unwrap() >= 3, "never below N: {d}");
    }

    // The cluster is back to its three nodes, and lost nothing.
    let info = c.node(0).client().node_info().unwrap();
    let up: Vec<&str> = info.members.iter().filter(|m| m.status == "up").map(|m| m.node_id.as_str()).collect();
    assert_eq!(up, ["n1", "n2", "n3"], "{info:?}");
    c.wait_merkle_converged(3, Duration::from_secs(60));
    let report = check(&history.events(), &c.read_all(0, &history.written_keys()), false);
    report.assert_ok();
    assert!(report.puts_acked > 500, "the load ran: {report:?}");
}

/// Runs the controller to completion (bounded by `--duration-s`) and
/// returns its events.
fn run_controller(dir: &Path, seed: &str, target: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let log = dir.join("autoscale-run.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(ringkv_bin())
        .args(["autoscale", "--endpoint", seed, "--interval-s", "1", "--scale-out-window-s", "2"])
        .args(["--target-cpu", target, "--duration-s", "20"])
        .arg("--local-dir")
        .arg(dir.join("ctl"))
        .args(extra)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("the controller did not stop after --duration-s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::fs::read_to_string(&log).unwrap().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

#[test]
fn a_failing_or_hanging_provisioner_is_retried_with_back_off_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, 1, FAST);
    let seed = c.node(0).addr().to_string();
    for (script, expect) in [("echo no capacity >&2; exit 3", "no capacity"), ("sleep 30", "did not finish within 1 s")]
    {
        // Far under an idle node's CPU: the policy wants nodes at once.
        let events = run_controller(
            dir.path(),
            &seed,
            "0.0001",
            &["--provisioner", "command", "--add-cmd", script, "--remove-cmd", "true", "--command-timeout-s", "1"],
        );
        let retries: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "retry").collect();
        assert!(retries.len() >= 2, "{script}: retried: {events:#?}");
        assert!(
            retries.iter().all(|r| r["action"] == "add" && r["error"].as_str().unwrap().contains(expect)),
            "{retries:?}"
        );
        let waits: Vec<u64> = retries.iter().map(|r| r["in_s"].as_u64().unwrap()).collect();
        assert!(waits.windows(2).all(|w| w[1] > w[0]), "{script}: back-off grows: {waits:?}");
        assert!(!events.iter().any(|e| e["event"] == "added"));
        assert_eq!(c.node(0).client().node_info().unwrap().members.len(), 3, "nothing changed");
    }
}

#[test]
fn a_dry_run_prints_decisions_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, 1, FAST);
    let events = run_controller(dir.path(), &c.node(0).addr().to_string(), "0.0001", &["--dry-run"]);
    let adds: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["event"] == "decision" && e["decision"]["decision"] == "add").collect();
    assert!(!adds.is_empty(), "the policy wanted nodes: {events:#?}");
    assert!(adds[0]["decision"]["reason"].as_str().unwrap().contains("mean CPU"));
    assert!(!events.iter().any(|e| e["event"] == "added" || e["event"] == "retry"));
    assert_eq!(c.node(0).client().node_info().unwrap().members.len(), 3);
}

#[test]
fn a_controller_restarted_in_the_middle_of_a_removal_finishes_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 4, 1, FAST);
    // What a controller that died after deciding to remove n4 left behind.
    let ctl_dir = dir.path().join("ctl");
    std::fs::create_dir_all(&ctl_dir).unwrap();
    let state = serde_json::json!({
        "nodes": [{ "id": "n4", "addr": c.node(3).addr().to_string(), "pid": c.node(3).pid() }],
        "removing": "n4",
        "started": 1,
    });
    std::fs::write(ctl_dir.join("autoscale.json"), state.to_string()).unwrap();
    let seed = c.node(0).addr().to_string();
    let dir_path = dir.path().to_path_buf();
    let ctl = std::thread::spawn(move || run_controller(&dir_path, &seed, "0.6", &[]));
    // n4 leaves, hands everything over and stops (reaped here, its parent).
    let status = c.nodes[3].wait_exit(Duration::from_secs(20)).expect("n4 left and stopped");
    assert!(status.success());
    let events = ctl.join().unwrap();
    let removed: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "removed").collect();
    assert_eq!(removed.len(), 1, "{events:#?}");
    assert_eq!(removed[0]["member"], "n4");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ctl_dir.join("autoscale.json")).unwrap()).unwrap();
    assert!(saved["removing"].is_null() && saved["nodes"].as_array().unwrap().is_empty(), "{saved}");
    let info = c.node(0).client().node_info().unwrap();
    assert_eq!(info.members.iter().filter(|m| m.status == "up").count(), 3);
}

#[test]
fn an_oscillating_load_does_not_make_the_cluster_flap() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path(), 3, 1, FAST);
    let args = [
        "--target-cpu",
        "0.05",
        "--max-nodes",
        "5",
        "--scale-out-window-s",
        "4",
        "--scale-in-window-s",
        "20",
        "--cooldown-s",
        "15",
        "--interval-s",
        "1",
        "--duration-s",
        "75",
    ];
    let ctl = start_controller_with(dir.path(), &c.node(0).addr().to_string(), c.node(0).spec.port, &args);
    let history = History::new();
    // Five bursts of 6 s, 6 s apart: longer than the scale-out window,
    // shorter than the scale-in one.
    for burst in 0..5 {
        let mut spec = LoadSpec::new(c.nodes.iter().map(|n| n.addr()).collect(), &format!("osc{burst}/"));
        spec.clients = 4;
        spec.duration = Duration::from_secs(6);
        spec.max_ops = 10_000;
        spec.pause = Duration::from_millis(1);
        for w in load::start(&spec, &history, &Arc::new(AtomicBool::new(false)), burst * 10) {
            w.join().unwrap();
        }
        std::thread::sleep(Duration::from_secs(6));
    }
    let changes: Vec<serde_json::Value> =
        ctl.of("decision").into_iter().filter(|e| e["decision"]["decision"] != "hold").collect();
    assert!(!changes.is_empty(), "the bursts were over the target: {:#?}", ctl.events());
    assert!(changes.iter().all(|e| e["decision"]["decision"] == "add"), "no node removed between bursts: {changes:#?}");
    for pair in changes.windows(2) {
        let gap = pair[1]["ts_ms"].as_u64().unwrap() - pair[0]["ts_ms"].as_u64().unwrap();
        assert!(gap >= 15_000, "two changes within the cool-down ({gap} ms): {changes:#?}");
    }
    let report = check(&history.events(), &c.read_all(0, &history.written_keys()), false);
    report.assert_ok();
}
