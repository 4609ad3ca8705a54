//! `ringkv cluster up`: a local cluster of N `ringkv server` processes on
//! 127.0.0.1 .. 127.0.0.N (same port), seeded to each other, in the
//! foreground. Ctrl-C (or SIGTERM) stops them all cleanly. A node that dies
//! is reported with its log tail while the others keep serving (surviving
//! that is the point of a replicated store); when none is left, the command
//! fails.

use crate::cli::ClusterUpArgs;
use ringkv_net::{Client, ClientConfig};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct LocalNode {
    id: String,
    addr: SocketAddr,
    log: PathBuf,
    child: Child,
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A `ringkv server` of this binary for node `id` on `addr`, its data in
/// `dir/id` and its output in `dir/id.log` (returned); the caller adds what
/// is particular to it and spawns it.
pub fn local_server(
    id: &str,
    addr: SocketAddr,
    dir: &Path,
    shards: usize,
    replicas: usize,
    seeds: &[String],
) -> Result<(Command, PathBuf), String> {
    let log = dir.join(format!("{id}.log"));
    let out = std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the ringkv binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("server")
        .args(["--node-id", id])
        .args(["--listen", &addr.to_string()])
        .arg("--data-dir")
        .arg(dir.join(id))
        .args(["--shards", &shards.to_string()])
        .args(["--replicas", &replicas.to_string()])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    if !seeds.is_empty() {
        cmd.args(["--seeds", &seeds.join(",")]);
    }
    Ok((cmd, log))
}

fn spawn(args: &ClusterUpArgs, i: usize, addrs: &[SocketAddr], dir: &Path) -> Result<LocalNode, String> {
    let id = format!("n{}", i + 1);
    let addr = addrs[i];
    let seeds: Vec<String> = addrs.iter().filter(|a| **a != addr).map(ToString::to_string).collect();
    let (mut cmd, log) = local_server(&id, addr, dir, args.shards, args.replicas, &seeds)?;
    cmd.args(["--cpu-offset", &i.to_string()]).args(if args.no_pin { &["--no-pin"][..] } else { &[][..] });
    // SAFETY: prctl is async-signal-safe; if this command dies, so do its nodes.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| format!("cannot start {id}: {e}"))?;
    Ok(LocalNode { id, addr, log, child })
}

fn stop_all(nodes: &mut [LocalNode]) {
    for n in nodes.iter() {
        // SAFETY: signalling our own children.
        unsafe { libc::kill(n.child.id() as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in nodes.iter_mut() {
        while n.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = n.child.kill();
                let _ = n.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Fails if a node exited; names it and shows its log.
fn check_alive(nodes: &mut [LocalNode]) -> Result<(), String> {
    for n in nodes.iter_mut() {
        if let Ok(Some(status)) = n.child.try_wait() {
            return Err(format!(
                "node {} exited ({status}); last lines of {}:\n{}",
                n.id,
                n.log.display(),
                tail(&n.log, 15)
            ));
        }
    }
    Ok(())
}

/// Waits until every node answers and sees all of them up in one ring.
fn wait_formed(nodes: &mut [LocalNode], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let cfg = ClientConfig { timeout: Duration::from_secs(2), ..Default::default() };
    loop {
        check_alive(nodes)?;
        let sees_all = |addr: SocketAddr| {
            let Ok(mut c) = Client::connect(addr, &cfg) else { return false };
            c.node_info()
                .is_ok_and(|info| info.members.iter().filter(|m| m.status == "up" && m.alive).count() == nodes.len())
        };
        if nodes.iter().all(|n| sees_all(n.addr)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the cluster did not form within {timeout:?}; see the logs in each node's .log file"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn up(args: &ClusterUpArgs) -> Result<(), String> {
    if args.nodes == 0 || args.nodes > 254 {
        return Err(format!("--nodes must be between 1 and 254, got {}", args.nodes));
    }
    if args.shards == 0 {
        return Err("--shards must be at least 1".into());
    }
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("cannot create {}: {e}", args.dir.display()))?;
    let addrs: Vec<SocketAddr> =
        (1..=args.nodes).map(|i| SocketAddr::from(([127, 0, 0, i as u8], args.port))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| format!("cannot handle signals: {e}"))?;
    }
    let mut nodes = Vec::with_capacity(args.nodes);
    for i in 0..args.nodes {
        match spawn(args, i, &addrs, &args.dir) {
            Ok(n) => nodes.push(n),
            Err(e) => {
                stop_all(&mut nodes);
                return Err(e);
            }
        }
    }
    if let Err(e) = wait_formed(&mut nodes, Duration::from_secs(60)) {
        stop_all(&mut nodes);
        return Err(e);
    }
    eprintln!(
        "ringkv cluster: {} nodes up (replicas N={}, {} shard(s) each), data in {}",
        nodes.len(),
        args.replicas.min(nodes.len()),
        args.shards,
        args.dir.display()
    );
    for n in &nodes {
        eprintln!("  {}  {}  log {}", n.id, n.addr, n.log.display());
    }
    eprintln!("try: ringkv put hello world && ringkv get hello --endpoint {}; ringkv status", addrs[addrs.len() - 1]);
    eprintln!("Ctrl-C stops the cluster.");
    let mut reported = vec![false; nodes.len()];
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        for (i, n) in nodes.iter_mut().enumerate() {
            if reported[i] {
                continue;
            }
            if let Ok(Some(status)) = n.child.try_wait() {
                reported[i] = true;
                eprintln!(
                    "ringkv cluster: node {} exited ({status}); the others keep running. Last lines of {}:\n{}",
                    n.id,
                    n.log.display(),
                    tail(&n.log, 10)
                );
            }
        }
        if reported.iter().all(|r| *r) {
            break Err("every node has exited".to_string());
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("ringkv cluster: stopping {} nodes", nodes.len());
    stop_all(&mut nodes);
    result
}
