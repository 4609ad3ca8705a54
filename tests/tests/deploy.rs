//! The bare-metal deployment (docs/DEPLOY.md): start-up checks of the host,
//! readiness for systemd, the unit file and the example configuration.
//!
//! Nodes listen on 127.0.0.1 only; the example configuration's 10.0.0.x
//! addresses are parsed and checked, never bound.

use ringkv_engine::config::NodeConfig;
use ringkv_net::{Client, ClientConfig};
use ringkv_tests::harness::{free_ports, ringkv_bin};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// `ringkv server` on a fresh 127.0.0.1 port with data under `dir`, its
/// output in `dir/server.log`; `memlock` lowers RLIMIT_MEMLOCK for it alone.
fn server(dir: &Path, memlock: Option<u64>, env: &[(&str, &str)], extra: &[&str]) -> (Child, SocketAddr) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, free_ports(Ipv4Addr::LOCALHOST, 1)));
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let mut cmd = Command::new(ringkv_bin());
    cmd.args(["server", "--listen", &addr.to_string(), "--shards", "1", "--no-pin", "--data-dir"])
        .arg(dir.join("data"))
        .args(extra)
        .env("RINGKV_LOG", "info")
        .env_remove("RINGKV_LOG_FORMAT")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: prctl and setrlimit are async-signal-safe; nothing allocates.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if let Some(bytes) = memlock {
                let lim = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    (cmd.spawn().expect("spawning ringkv server"), addr)
}

/// Waits for the process to exit; kills it and fails after `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ringkv server still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stop(child: &mut Child) -> ExitStatus {
    // SAFETY: kill only signals the child we started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    wait_exit(child, Duration::from_secs(60))
}

fn log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
}

/// glommio refuses to create an executor below 512 KiB of RLIMIT_MEMLOCK;
/// without the start-up check the node would fail inside its first shard.
/// The check must stop it first, with one line that says what to raise,
/// and before it touches the data directory.
#[test]
fn a_memlock_limit_too_low_for_io_uring_stops_start_up_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _) = server(dir.path(), Some(256 << 10), &[], &[]);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(!status.success(), "started with a 256 KiB memlock limit: {}", log(dir.path()));
    let out = log(dir.path());
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of reason, got:\n{out}");
    assert!(
        lines[0].starts_with("ringkv: the memlock limit (RLIMIT_MEMLOCK) is 256 KiB, below the 512 KiB io_uring needs")
            && lines[0].contains("LimitMEMLOCK=infinity"),
        "{out}"
    );
    assert!(!dir.path().join("data").exists(), "the data directory was created before the check");
}

/// `Type=notify`: systemd counts the service as started when READY=1
/// arrives, so it must come only once every shard serves, and a stop is
/// announced with STOPPING=1.
#[test]
fn the_node_tells_systemd_it_is_ready_only_once_it_serves_and_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&socket).unwrap();
    systemd.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let (mut child, addr) = server(dir.path(), None, &[("NOTIFY_SOCKET", socket.to_str().unwrap())], &[]);
    let mut buf = [0u8; 512];
    let n = systemd.recv(&mut buf).unwrap_or_else(|e| panic!("no notification ({e}); log:\n{}", log(dir.path())));
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert_eq!(ready, format!("READY=1\nSTATUS=serving 1 shard(s) on {addr}"));
    // No retry: READY=1 promises the node serves now.
    let mut c = Client::connect(addr, &ClientConfig::default()).expect("ready but not serving");
    c.ping().unwrap();
    drop(c);
    assert!(stop(&mut child).success(), "{}", log(dir.path()));
    // The datagram waits in the socket after the sender is gone.
    let n = systemd.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
}

/// log_format is a setting like the others, with an environment variable
/// for log shippers' unit files: the flag beats $RINGKV_LOG_FORMAT, which
/// beats the file. The line that says the node serves shows which won.
#[test]
fn the_log_format_comes_from_the_flag_then_the_environment_then_the_file() {
    let cases = [
        ("json", None, None, true),
        ("json", Some("text"), None, false),
        ("text", Some("json"), None, true),
        ("text", Some("json"), Some("text"), false),
    ];
    for (file, env, flag, json) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("node.toml");
        std::fs::write(&config, format!("log_format = \"{file}\"\n")).unwrap();
        let mut args = vec!["--config", config.to_str().unwrap()];
        args.extend(flag.iter().flat_map(|f| ["--log-format", *f]));
        let env: Vec<(&str, &str)> = env.iter().map(|v| ("RINGKV_LOG_FORMAT", *v)).collect();
        let (mut child, _) = server(dir.path(), None, &env, &args);
        let deadline = Instant::now() + Duration::from_secs(60);
        let line = loop {
            if let Some(l) = log(dir.path()).lines().find(|l| l.contains("serving 1 shard(s)")) {
                break l.to_string();
            }
            assert!(Instant::now() < deadline, "never served; log:\n{}", log(dir.path()));
            std::thread::sleep(Duration::from_millis(50));
        };
        stop(&mut child);
        let parsed = serde_json::from_str::<serde_json::Value>(&line).is_ok();
        assert_eq!(parsed, json, "file {file}, env {env:?}, flag {flag:?}: {line}");
    }
}

/// systemd-analyze verify exits 0 even for unknown keys and bad values (it
/// only prints them), so the test also demands silence. It checks that
/// ExecStart's binary exists, so the unit is verified with the path of the
/// binary under test; the rest is the file as shipped.
#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("RINGKV_REQUIRE_SYSTEMD_ANALYZE").is_none(),
            "systemd-analyze is required here (RINGKV_REQUIRE_SYSTEMD_ANALYZE) but not installed"
        );
        println!("skipped: systemd-analyze is not installed (apt-get install systemd; .ci/run does)");
        return;
    }
    let unit = std::fs::read_to_string(repo_file("deploy/ringkv.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/ringkv server "), "the unit runs /usr/local/bin/ringkv");
    for line in ["Type=notify", "LimitMEMLOCK=infinity", "Restart=on-failure"] {
        assert!(unit.lines().any(|l| l == line), "{line} missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ringkv.service");
    let bin = ringkv_bin();
    std::fs::write(&path, unit.replace("/usr/local/bin/ringkv", bin.to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {}\n{said}", out.status);
}

/// The unit's ExecStart flags must exist: a renamed flag would stop every
/// deployed node at its next restart.
#[test]
fn the_units_flags_are_flags_of_ringkv_server() {
    let unit = std::fs::read_to_string(repo_file("deploy/ringkv.service")).unwrap();
    let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    let help = Command::new(ringkv_bin()).args(["server", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let flags: Vec<&str> = exec.split_whitespace().filter(|w| w.starts_with("--")).collect();
    assert!(flags.len() >= 3, "{exec}");
    for flag in flags {
        assert!(help.contains(&format!("{flag} ")), "{flag} is not a `ringkv server` flag");
    }
}

/// The example is for three hosts; checked here as node 1 with the secrets
/// the unit would add, and rewritten as nodes 2 and 3 as its table says.
#[test]
fn the_example_configuration_is_valid_for_each_of_the_three_hosts() {
    let example = repo_file("deploy/ringkv.toml.example");
    let text = std::fs::read_to_string(&example).unwrap();
    let with_secrets = |mut c: NodeConfig| {
        c.cluster_secret = Some("a-cluster-secret-of-enough-bytes".into());
        c.auth_tokens = vec!["a-client-token-of-enough-bytes".into()];
        c
    };
    let node1 = with_secrets(NodeConfig::from_toml_file(&example).unwrap());
    node1.validate().unwrap();
    assert_eq!((node1.node_id.as_deref(), node1.listen.to_string()), (Some("node1"), "10.0.0.1:7070".into()));
    assert_eq!(node1.seeds, ["10.0.0.2:7070", "10.0.0.3:7070"]);
    // Without the secrets the unit passes, such a node refuses to start.
    assert!(NodeConfig::from_toml_file(&example).unwrap().validate().unwrap_err().contains("refusing to listen"));
    let mut listens = vec![node1.listen];
    for (i, seeds) in [(2, "\"10.0.0.1:7070\", \"10.0.0.3:7070\""), (3, "\"10.0.0.1:7070\", \"10.0.0.2:7070\"")] {
        let host = text
            .replace("node_id = \"node1\"", &format!("node_id = \"node{i}\""))
            .replace("listen = \"10.0.0.1:7070\"", &format!("listen = \"10.0.0.{i}:7070\""))
            .replace("seeds = [\"10.0.0.2:7070\", \"10.0.0.3:7070\"]", &format!("seeds = [{seeds}]"));
        let c = with_secrets(toml_config(&host));
        c.validate().unwrap();
        assert!(!c.seeds.contains(&c.listen.to_string()), "node{i} seeds itself");
        listens.push(c.listen);
    }
    listens.dedup();
    assert_eq!(listens.len(), 3, "three distinct hosts");
}

fn toml_config(text: &str) -> NodeConfig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(&path, text).unwrap();
    NodeConfig::from_toml_file(&path).unwrap()
}
