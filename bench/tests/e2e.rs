//! End-to-end runs of the built `ringkv-bench` binary: against its own echo
//! server, directly and behind one and two relays, against a real single
//! ringkv node, and against a local 3-node cluster (where the harness must
//! count all three server processes). Every spawned process is killed by a
//! guard when the test ends (or panics), and every run is bounded in time.

use ringkv_net::{Client, ClientConfig, Level, WriteOptions};
use serde_json::Value;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_ringkv-bench");

/// Kills the child when dropped.
struct Guard(Child);

impl Guard {
    fn pid(&self) -> u64 {
        u64::from(self.0.id())
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(mut cmd: Command) -> Guard {
    // SAFETY: prctl is async-signal-safe; the hook allocates nothing. The
    // child dies with the thread that spawned it, even if the test is killed.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Guard(cmd.spawn().expect("spawning"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_listening(addr: SocketAddr, child: &mut Guard) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(addr).is_err() {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("server exited during start-up: {status}");
        }
        assert!(Instant::now() < deadline, "{addr} not listening in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// What a finished ringkv-bench run printed.
struct Output {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs ringkv-bench with `args`, killing it after `limit`.
fn bench(args: &[&str], limit: Duration) -> Output {
    let logs = tempfile::tempdir().unwrap();
    let (out, err) = (logs.path().join("out"), logs.path().join("err"));
    let mut cmd = Command::new(BENCH);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let mut g = spawn(cmd);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = g.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "ringkv-bench {args:?} ran over {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    Output { status, stdout: read(&out), stderr: read(&err) }
}

fn ok(out: &Output) -> String {
    let text = format!("{}\n{}", out.stdout, out.stderr);
    assert!(out.status.success(), "ringkv-bench failed: {text}");
    text
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).expect("valid JSON")
}

fn assert_result(v: &Value, ops: &[&str]) {
    for k in ["target", "workload", "ops_per_sec", "errors", "ops", "client_cpu_us_per_op"] {
        assert!(v.get(k).is_some(), "missing key {k} in {v}");
    }
    assert!(v["ops_per_sec"].as_f64().unwrap() > 0.0, "{v}");
    assert!(v["client_cpu_us_per_op"].as_f64().unwrap() > 0.0, "{v}");
    for op in ops {
        let o = &v["ops"][op];
        for k in ["count", "p50_us", "p90_us", "p99_us", "p999_us", "max_us"] {
            assert!(o.get(k).is_some(), "missing ops.{op}.{k} in {v}");
        }
        assert!(o["count"].as_u64().unwrap() > 0, "no {op} in {v}");
        assert!(o["p50_us"].as_f64().unwrap() > 0.0);
        assert!(o["p99_us"].as_f64().unwrap() >= o["p50_us"].as_f64().unwrap());
    }
}

#[test]
fn echo_runs_closed_open_and_sweep_and_plots_them() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = Command::new(BENCH);
    cmd.args(["echo-server", "--listen", &addr.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
    let mut server = spawn(cmd);
    wait_listening(addr, &mut server);
    let target = format!("echo://{addr}");
    let limit = Duration::from_secs(60);

    let closed = dir.path().join("closed.json");
    let c = closed.to_str().unwrap();
    let out = bench(
        &["run", "--target", &target, "--workload", "c", "--records", "200", "--duration", "1s", "--warmup", "200ms"]
            .into_iter()
            .chain(["--concurrency", "2", "--no-progress", "--label", "closed", "--json", c])
            .collect::<Vec<_>>(),
        limit,
    );
    let text = ok(&out);
    assert!(text.contains("p99.9"), "a summary table: {text}");
    let v = read_json(&closed);
    assert_result(&v, &["read"]);
    assert_eq!(v["errors"], 0);
    assert!(dir.path().join("closed.read.hgrm").exists());
    assert!(dir.path().join("closed.all.hgrm").exists());
    assert!(std::fs::read_to_string(dir.path().join("closed.svg")).unwrap().starts_with("<svg"));

    // Open loop at a modest rate: the achieved rate follows the schedule.
    let open = dir.path().join("open.json");
    let out = bench(
        &["run", "--target", &target, "--workload", "a", "--records", "200", "--rate", "2000", "--duration", "1s"]
            .into_iter()
            .chain(["--warmup", "200ms", "--no-progress", "--label", "open", "--json", open.to_str().unwrap()])
            .collect::<Vec<_>>(),
        limit,
    );
    ok(&out);
    let v = read_json(&open);
    assert_result(&v, &["read", "update"]);
    let rate = v["ops_per_sec"].as_f64().unwrap();
    assert!((1600.0..=2400.0).contains(&rate), "open loop at 2000/s achieved {rate}");
    assert!(v["send_lag_us"]["count"].as_u64().unwrap() > 0);

    // A short sweep.
    let sweep = dir.path().join("sweep.json");
    let out = bench(
        &["run", "--target", &target, "--workload", "c", "--records", "100", "--sweep", "--sweep-steps", "2"]
            .into_iter()
            .chain(["--duration", "500ms", "--warmup", "100ms", "--no-progress", "--json", sweep.to_str().unwrap()])
            .collect::<Vec<_>>(),
        limit,
    );
    ok(&out);
    let v = read_json(&sweep);
    assert!(!v["sweep"].as_array().unwrap().is_empty(), "{v}");

    // Overlaid plot and comparison table of the result files.
    let svg = dir.path().join("both.svg");
    ok(&bench(&["plot", c, open.to_str().unwrap(), "--out", svg.to_str().unwrap()], limit));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("\nclosed\n") && text.contains("\nopen\n"), "both runs in the legend");
    assert!(
        text.contains("workload c, closed loop") && text.contains("workload a, open loop at 2000 ops/s"),
        "a panel per workload and load"
    );
    let table = ok(&bench(&["compare", c, open.to_str().unwrap()], limit));
    assert!(table.contains("| closed |") && table.contains("| open |"), "{table}");
}

/// The `ringkv` binary of this workspace, built with the tests' profile
/// (as `tests/src/harness.rs` does); `RINGKV_BIN` overrides it.
fn ringkv_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RINGKV_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps");
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap().to_string();
    let target_dir = profile_dir.parent().expect("target dir");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "ringkv-tools", "--bin", "ringkv"]).arg("--target-dir").arg(target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    assert!(cmd.status().expect("running cargo").success(), "building ringkv failed");
    let bin = profile_dir.join("ringkv");
    assert!(bin.exists(), "{} missing after build", bin.display());
    bin
}

#[test]
fn workload_a_against_a_real_node() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut cmd = Command::new(ringkv_bin());
    cmd.arg("server")
        .args(["--listen", &addr.to_string(), "--shards", "1", "--no-pin"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("RINGKV_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut node = spawn(cmd);
    wait_listening(addr, &mut node);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cfg = ClientConfig { timeout: Duration::from_secs(2), ..Default::default() };
        if Client::connect(addr, &cfg).and_then(|mut c| c.ping()).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "node not serving");
        std::thread::sleep(Duration::from_millis(50));
    }

    let json = dir.path().join("a.json");
    let out = bench(
        &[
            "run",
            "--target",
            &format!("ringkv://{addr}"),
            "--workload",
            "a",
            "--records",
            "500",
            "--duration",
            "1500ms",
        ]
        .into_iter()
        .chain(["--warmup", "300ms", "--concurrency", "2", "--durable", "no", "--no-progress"])
        .chain(["--json", json.to_str().unwrap()])
        .collect::<Vec<_>>(),
        Duration::from_secs(90),
    );
    let text = ok(&out);
    assert!(text.contains("topology-aware"), "requests are routed by the cluster layout: {text}");
    let v = read_json(&json);
    assert_result(&v, &["read", "update"]);
    assert_eq!(v["errors"], 0, "{v}");
    assert_eq!(v["target_kind"], "ringkv");
    // Loaded records are found.
    assert_eq!(v["ops"]["read"]["not_found"], 0, "{v}");

    // Read-modify-write (get, then put with the read's context) as one op.
    let json = dir.path().join("f.json");
    let out = bench(
        &["run", "--target", &format!("ringkv://{addr}"), "--workload", "f", "--records", "500", "--no-load"]
            .into_iter()
            .chain(["--duration", "1s", "--warmup", "200ms", "--durable", "no", "--no-progress"])
            .chain(["--json", json.to_str().unwrap()])
            .collect::<Vec<_>>(),
        Duration::from_secs(60),
    );
    ok(&out);
    let v = read_json(&json);
    assert_result(&v, &["read", "rmw"]);
    assert_eq!(v["errors"], 0, "{v}");
}

fn pids_of(v: &Value) -> Vec<u64> {
    let mut pids: Vec<u64> =
        v["server_pids"].as_array().expect("server_pids").iter().map(|p| p.as_u64().unwrap()).collect();
    pids.sort_unstable();
    pids
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

#[test]
fn echo_behind_one_and_two_relays_answers_runs() {
    let dir = tempfile::tempdir().unwrap();
    let start = |args: &[String]| -> (Guard, SocketAddr) {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = Command::new(BENCH);
        cmd.args(args).args(["--listen", &addr.to_string()]).stdout(Stdio::null()).stderr(Stdio::null());
        let mut g = spawn(cmd);
        wait_listening(addr, &mut g);
        (g, addr)
    };
    let (echo, echo_addr) = start(&["echo-server".into()]);
    let (hop1, hop1_addr) = start(&["relay-server".into(), "--upstream".into(), echo_addr.to_string()]);
    let (hop2, hop2_addr) = start(&["relay-server".into(), "--upstream".into(), hop1_addr.to_string()]);
    let cpus = format!("0-{}", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) - 1);

    let cases = [
        ("relay1", hop1_addr, vec![echo_addr], vec![echo.pid(), hop1.pid()]),
        ("relay2", hop2_addr, vec![echo_addr, hop1_addr], vec![echo.pid(), hop1.pid(), hop2.pid()]),
    ];
    for (name, target, behind, want_pids) in cases {
        let json = dir.path().join(format!("{name}.json"));
        let behind: Vec<String> = behind.iter().map(ToString::to_string).collect();
        let target = format!("echo://{target}");
        let out = bench(
            &["run", "--target", &target, "--workload", "a", "--records", "200", "--duration", "1s"]
                .into_iter()
                .chain(["--warmup", "200ms", "--concurrency", "4", "--pipeline", "4", "--no-progress"])
                .chain(["--server-endpoints", &behind.join(","), "--server-cpus", &cpus])
                .chain(["--label", name, "--json", json.to_str().unwrap()])
                .collect::<Vec<_>>(),
            Duration::from_secs(60),
        );
        let text = ok(&out);
        let v = read_json(&json);
        assert_result(&v, &["read", "update"]);
        assert_eq!(v["errors"], 0, "every reply came back through the relays: {text}");
        assert_eq!(pids_of(&v), sorted(want_pids), "the relays and the echo server are the server: {text}");
        let share = v["server_cores_busy_share"].as_f64().expect("busy share of the server CPUs");
        assert!((0.0..=1.0).contains(&share) && share > 0.0, "{v}");
        assert!(v["server_cores_busy_us_per_op"].as_f64().unwrap() > 0.0, "{v}");
        assert!(text.contains("% busy"), "the summary gives the busy share: {text}");
    }
}

/// A port free on 127.0.0.1, .2 and .3 alike.
fn port_free_on_three_addresses() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if (2..=3).all(|i| TcpListener::bind(format!("127.0.0.{i}:{port}")).is_ok()) {
            return port;
        }
    }
    panic!("no port free on 127.0.0.1-3");
}

/// The harness used to find the server by listening port alone, so of three
/// local nodes on one port (127.0.0.1, .2, .3) it counted the first and the
/// server CPU per operation came out a third of the truth. Each node must be
/// found by its own address.
/// Three nodes on 127.0.0.1-3 (N=3, one shard each), formed: every node
/// sees all three up and takes a write.
fn three_node_cluster(dir: &Path, extra: &[&str]) -> (Vec<SocketAddr>, Vec<Guard>) {
    let port = port_free_on_three_addresses();
    let addrs: Vec<SocketAddr> = (1..=3).map(|i| format!("127.0.0.{i}:{port}").parse().unwrap()).collect();
    let bin = ringkv_bin();
    let mut nodes: Vec<Guard> = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let seeds: Vec<String> = addrs.iter().filter(|a| *a != addr).map(ToString::to_string).collect();
        let mut cmd = Command::new(&bin);
        cmd.arg("server")
            .args(["--node-id", &format!("n{}", i + 1), "--listen", &addr.to_string()])
            .arg("--data-dir")
            .arg(dir.join(format!("n{}", i + 1)))
            .args(["--seeds", &seeds.join(","), "--shards", "1", "--replicas", "3", "--no-pin"])
            .args(extra)
            .env("RINGKV_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        nodes.push(spawn(cmd));
    }
    for (addr, node) in addrs.iter().zip(nodes.iter_mut()) {
        wait_listening(*addr, node);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let cfg = ClientConfig { timeout: Duration::from_secs(2), ..Default::default() };
    let opts = WriteOptions { context: Vec::new(), w: Level::Default, durable: Some(false) };
    let serving = |addr: SocketAddr| {
        let Ok(mut c) = Client::connect(addr, &cfg) else { return false };
        let up = c.node_info().is_ok_and(|n| n.members.iter().filter(|m| m.status == "up" && m.alive).count() == 3);
        up && c.put(b"probe", b"ok", &opts).is_ok()
    };
    while !addrs.iter().all(|&a| serving(a)) {
        for n in nodes.iter_mut() {
            assert!(n.0.try_wait().unwrap().is_none(), "a node exited during start-up");
        }
        assert!(Instant::now() < deadline, "the cluster did not form in time");
        std::thread::sleep(Duration::from_millis(200));
    }
    (addrs, nodes)
}

#[test]
fn a_three_node_cluster_run_counts_every_server_process() {
    let dir = tempfile::tempdir().unwrap();
    let (addrs, nodes) = three_node_cluster(dir.path(), &[]);
    let json = dir.path().join("c.json");
    let out = bench(
        &["run", "--target", &format!("ringkv://{}", addrs[0]), "--workload", "c", "--records", "300"]
            .into_iter()
            .chain(["--duration", "1s", "--warmup", "300ms", "--concurrency", "2", "--no-progress"])
            .chain(["--server-cpus", "0", "--json", json.to_str().unwrap()])
            .collect::<Vec<_>>(),
        Duration::from_secs(90),
    );
    let text = ok(&out);
    let v = read_json(&json);
    assert_result(&v, &["read"]);
    assert_eq!(v["errors"], 0, "{v}");
    let want = sorted(nodes.iter().map(Guard::pid).collect());
    assert_eq!(pids_of(&v), want, "all three nodes are counted: {text}");
    assert!(text.contains("3 process(es)"), "the summary says how many: {text}");
    assert!(v["server_cpu_us_per_op"].as_f64().unwrap() > 0.0, "{v}");
}

/// Client-driven reads: the harness asks two replicas for their copies
/// itself. With every replica up to date (written at w=all while loading),
/// every read is answered by its copies, none goes through a coordinator,
/// and each read is two requests on the wire.
#[test]
fn client_driven_reads_are_answered_by_the_replicas_copies() {
    let dir = tempfile::tempdir().unwrap();
    let (addrs, _nodes) = three_node_cluster(dir.path(), &[]);
    let json = dir.path().join("c.json");
    let out = bench(
        &["run", "--target", &format!("ringkv://{}", addrs[0]), "--workload", "c", "--records", "300"]
            .into_iter()
            .chain(["--w", "all", "--r", "quorum", "--reads", "client", "--duration", "1s", "--warmup", "300ms"])
            .chain(["--concurrency", "2", "--no-progress", "--json", json.to_str().unwrap()])
            .collect::<Vec<_>>(),
        Duration::from_secs(90),
    );
    let text = ok(&out);
    let v = read_json(&json);
    assert_result(&v, &["read"]);
    assert_eq!(v["errors"], 0, "{text}");
    let reads = v["ops"]["read"]["count"].as_u64().unwrap();
    assert!(reads > 0, "{v}");
    assert_eq!(v["copy_reads"].as_u64().unwrap(), reads, "every read answered by its copies: {text}");
    assert_eq!(v["copy_fallbacks"], 0, "{text}");
    assert_eq!(v["wire_requests"].as_u64().unwrap(), 2 * reads, "two copies asked per read at r=2: {text}");
    assert!(text.contains("reads client-driven"), "the summary says how reads were made: {text}");
}

/// Issue 14's measurement through the harness itself: an open loop of
/// workload A against a 3-node cluster while one node is stopped for 3 s
/// and, after it resumed, another is killed. The harness sends an attempt
/// that is not answered in time, or whose connection broke, to the key's
/// next replica, so it keeps measuring: no errors, and no operation waits
/// out the stop.
#[test]
fn the_harness_fails_over_through_a_stopped_and_a_killed_node() {
    let dir = tempfile::tempdir().unwrap();
    let (addrs, mut nodes) = three_node_cluster(dir.path(), &["--request-timeout-ms", "2000"]);
    let json = dir.path().join("a.json");
    let args: Vec<String> = ["run", "--target", &format!("ringkv://{}", addrs[0]), "--workload", "a", "--no-load"]
        .into_iter()
        .chain(["--records", "300", "--rate", "1000", "--duration", "9s", "--warmup", "1s"])
        .chain(["--concurrency", "4", "--no-progress", "--json", json.to_str().unwrap()])
        .map(String::from)
        .collect();
    let run = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bench(&args, Duration::from_secs(90))
    });
    let signal = |g: &Guard, sig| {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(g.pid() as i32, sig) };
    };
    std::thread::sleep(Duration::from_secs(3));
    signal(&nodes[1], libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(3));
    signal(&nodes[1], libc::SIGCONT);
    std::thread::sleep(Duration::from_secs(2));
    drop(nodes.remove(2));
    let out = run.join().unwrap();
    let text = ok(&out);
    let v = read_json(&json);
    assert_result(&v, &["read", "update"]);
    println!("{text}");
    assert_eq!(v["errors"], 0, "the harness kept measuring through the faults: {text}");
    assert!(v["failovers"].as_u64().unwrap() > 0, "the stopped and the killed node were failed over: {v}");
    let worst = v["all"]["max_us"].as_f64().unwrap();
    // Without failover an operation on the stopped node waits out the 3 s.
    assert!(worst < 1_500_000.0, "the worst operation took {worst} us: {text}");
}
