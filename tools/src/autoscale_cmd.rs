//! `ringkv autoscale`: runs the core's autoscale policy against a cluster
//! and carries out its decisions through a provisioner (docs/ELASTICITY.md).
//!
//! Every `--interval-s` it reads the cluster's gossiped load from any member,
//! asks the policy, prints the decision as one JSON line with the figures that
//! caused it, and acts (unless `--dry-run`):
//! - add: the provisioner starts nodes seeded to the cluster (`local`: a
//!   `ringkv server` on the next free 127.0.0.x address; `command`: the
//!   operator's `--add-cmd`);
//! - remove: one resumable operation, recorded in the state file before it
//!   starts: the node is made to leave (stage and commit), the controller
//!   waits until it has handed everything over and stopped, then the
//!   provisioner retires the machine (`local`: makes sure the process is
//!   gone; `command`: `--remove-cmd`). A controller restarted halfway picks
//!   the operation up where the state file says it was.
//!
//! A provisioner that fails or hangs (past `--command-timeout-s`) is retried
//! with back-off, each failure logged; an add that fails leaves nothing
//! behind, a remove that fails at the retire step leaves a node that already
//! left (it holds no data), so the cluster is never left half-changed.

use crate::cli::{AutoscaleArgs, Endpoint, ProvisionerKind};
use crate::client_cmd::connect;
use crate::cluster_cmd::local_server;
use crate::ring_cmd::any_info;
use crate::Failure;
use ringkv_core::autoscale::{AutoscaleConfig, Decision, MemberLoad, Observation, Policy};
use ringkv_net::proto::{NodeInfo, Reply, Request, RingAction, RingChange};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// What the controller must remember across its own restarts.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct State {
    /// Nodes this controller started and may remove.
    nodes: Vec<Managed>,
    /// A remove in progress: the member that is being made to leave.
    removing: Option<String>,
    /// Names handed out so far, so a new node never reuses one.
    started: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Managed {
    id: String,
    addr: String,
    /// Local provisioner: the server's pid.
    pid: Option<i32>,
}

fn load_state(path: &Path) -> Result<State, Failure> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| Failure::Usage(format!("state file {} is not readable: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
        Err(e) => Err(Failure::Unreachable(format!("cannot read {}: {e}", path.display()))),
    }
}

/// Written to a temporary file and renamed, so a crash never leaves half.
fn save_state(path: &Path, s: &State) -> Result<(), Failure> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_string_pretty(s).expect("state serialises");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| Failure::Unreachable(format!("cannot write {}: {e}", path.display())))
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn log(event: &str, fields: serde_json::Value) {
    let mut line = json!({ "ts_ms": now_ms(), "event": event });
    if let (Some(l), Some(f)) = (line.as_object_mut(), fields.as_object()) {
        l.extend(f.clone());
    }
    println!("{line}");
}

fn policy_config(a: &AutoscaleArgs) -> Result<AutoscaleConfig, Failure> {
    let cfg = AutoscaleConfig {
        target_cpu: a.target_cpu,
        tolerance: a.tolerance,
        max_p99_us: a.max_p99_us,
        scale_out_window_ms: a.scale_out_window_s * 1000,
        scale_in_window_ms: a.scale_in_window_s * 1000,
        cooldown_ms: a.cooldown_s * 1000,
        min_nodes: a.min_nodes,
        max_nodes: a.max_nodes,
        replicas: a.replicas,
    };
    cfg.validate().map_err(Failure::Usage)?;
    Ok(cfg)
}

/// The policy's view of what `n` reports.
fn observe(n: &NodeInfo, state: &State, managed_only: bool) -> Observation {
    let members = n
        .members
        .iter()
        .map(|m| MemberLoad {
            id: m.node_id.clone(),
            cpu: f64::from(m.cpu_permille) / 1000.0,
            ops_per_sec: m.ops_per_sec,
            p99_us: m.p99_us,
            serving: m.status == "up" && m.alive,
        })
        .collect();
    let serving = |id: &str| n.members.iter().any(|m| m.node_id == id && m.status == "up" && m.alive);
    let pending = state.nodes.iter().filter(|m| !serving(&m.id)).count();
    let leaving = n.members.iter().find(|m| m.status == "leaving" && m.alive);
    let streaming: Vec<String> = n
        .members
        .iter()
        .filter(|m| m.alive && m.moving_partitions > 0)
        .map(|m| format!("{} ({} partitions)", m.node_id, m.moving_partitions))
        .collect();
    let running = match (leaving, &state.removing) {
        (Some(m), _) => Some(format!("{} is leaving", m.node_id)),
        (None, Some(id)) => Some(format!("the removal of {id} is still to finish")),
        _ if !streaming.is_empty() => Some(format!("partitions are streaming from {}", streaming.join(", "))),
        _ => None,
    };
    let removable = if managed_only { state.nodes.iter().map(|m| m.id.clone()).collect() } else { Vec::new() };
    Observation { now_ms: now_ms(), members, pending, running, removable }
}

/// Runs `cmd` with `sh -c` and the given environment, within `timeout`.
fn run_command(cmd: &str, env: &[(&str, String)], timeout: Duration) -> Result<String, String> {
    let mut c = Command::new("sh");
    c.arg("-c").arg(cmd).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} did not finish within {} s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for {cmd:?}: {e}")),
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn port_free(ip: Ipv4Addr, port: u16, shards: u16) -> bool {
    (0..shards).all(|s| TcpListener::bind(SocketAddr::from((ip, port + s))).is_ok())
}

/// Starts one node; returns it once it is running (not yet serving).
fn provision(a: &AutoscaleArgs, state: &mut State, n: &NodeInfo) -> Result<Managed, String> {
    let seeds: Vec<String> = n.members.iter().filter(|m| m.alive).map(|m| m.addr.clone()).collect();
    let id = format!("{}{}", a.name_prefix, state.started + 1);
    match a.provisioner {
        ProvisionerKind::Local => {
            let used: Vec<Ipv4Addr> = n
                .members
                .iter()
                .filter_map(|m| m.addr.parse::<SocketAddr>().ok())
                .filter_map(|s| match s.ip() {
                    std::net::IpAddr::V4(v4) => Some(v4),
                    _ => None,
                })
                .collect();
            let ip = (2..=254u8)
                .map(|x| Ipv4Addr::new(127, 0, 0, x))
                .find(|ip| !used.contains(ip) && port_free(*ip, a.local_port, a.local_shards))
                .ok_or("no free 127.0.0.x address for a new node")?;
            let addr = SocketAddr::from((ip, a.local_port));
            std::fs::create_dir_all(&a.local_dir)
                .map_err(|e| format!("cannot create {}: {e}", a.local_dir.display()))?;
            let shards = usize::from(a.local_shards);
            let (mut cmd, _log) = local_server(&id, addr, &a.local_dir, shards, a.replicas, &seeds)?;
            cmd.arg("--no-pin").args(&a.server_arg);
            // No parent-death signal: nodes outlive a controller restart.
            let child = cmd.spawn().map_err(|e| format!("cannot start {id}: {e}"))?;
            Ok(Managed { id, addr: addr.to_string(), pid: Some(child.id() as i32) })
        }
        ProvisionerKind::Command => {
            let cmd = a.add_cmd.as_deref().ok_or("--add-cmd is required with --provisioner command")?;
            let env = [("RINGKV_NODE_ID", id.clone()), ("RINGKV_SEEDS", seeds.join(","))];
            let out = run_command(cmd, &env, Duration::from_secs(a.command_timeout_s))?;
            // The script prints the new node's address (IP:PORT) on its last line.
            let addr = out.lines().last().unwrap_or("").trim().to_string();
            if addr.parse::<SocketAddr>().is_err() {
                return Err(format!("{cmd:?} must print the new node's IP:PORT on its last line, printed {out:?}"));
            }
            Ok(Managed { id, addr, pid: None })
        }
    }
}

/// Retires a node that has left (it holds nothing any more).
fn retire(a: &AutoscaleArgs, m: &Managed) -> Result<(), String> {
    match a.provisioner {
        ProvisionerKind::Local => {
            let Some(pid) = m.pid else { return Ok(()) };
            let deadline = Instant::now() + Duration::from_secs(30);
            // SAFETY: signal 0 only checks that the process exists.
            while unsafe { libc::kill(pid, 0) } == 0 && !is_zombie(pid) {
                if Instant::now() > deadline {
                    // SAFETY: our own child, which left the cluster already.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                    return Err(format!("{} (pid {pid}) had not stopped 30 s after leaving; sent SIGTERM", m.id));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        }
        ProvisionerKind::Command => {
            let cmd = a.remove_cmd.as_deref().ok_or("--remove-cmd is required with --provisioner command")?;
            let env = [("RINGKV_NODE_ID", m.id.clone()), ("RINGKV_ADDR", m.addr.clone())];
            run_command(cmd, &env, Duration::from_secs(a.command_timeout_s)).map(|_| ())
        }
    }
}

fn is_zombie(pid: i32) -> bool {
    // The controller started the node, so it is reaped here.
    let mut status = 0;
    // SAFETY: non-blocking wait on a pid we started.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) == pid }
}

fn endpoint_of(e: &Endpoint, addr: &str) -> Endpoint {
    Endpoint { endpoint: addr.to_string(), ..e.clone() }
}

/// Makes `member` leave: stage and commit on the member itself. A member
/// already leaving (a restarted controller) is fine.
fn start_leave(a: &AutoscaleArgs, n: &NodeInfo, member: &str) -> Result<(), String> {
    let info = n.members.iter().find(|m| m.node_id == member).ok_or(format!("{member} is not a member"))?;
    if info.status == "leaving" || info.status == "left" {
        return Ok(());
    }
    let e = endpoint_of(&a.endpoint, &info.addr);
    let ask = |action, change| -> Result<(), String> {
        let mut c = connect(&e).map_err(|f| f.message())?;
        match c.call(Request::RingChange { action, change }) {
            Ok(Reply::RingChange { .. }) => Ok(()),
            Ok(other) => Err(format!("unexpected reply {other:?}")),
            Err(err) => Err(err.to_string()),
        }
    };
    // A change left staged by an earlier attempt is replaced.
    let _ = ask(RingAction::Cancel, None);
    ask(RingAction::Stage, Some(RingChange::Leave { member: member.to_string() }))?;
    ask(RingAction::Commit, None)
}

/// Whether a leaving member is done: it shows as left, or is gone from a
/// ring it is no longer in.
fn has_left(n: &NodeInfo, member: &str) -> bool {
    n.members.iter().find(|m| m.node_id == member).is_none_or(|m| m.status == "left")
}

struct Backoff {
    failures: u32,
    next_try: Instant,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff { failures: 0, next_try: Instant::now() }
    }

    fn ready(&self) -> bool {
        Instant::now() >= self.next_try
    }

    fn failed(&mut self) -> Duration {
        self.failures += 1;
        let wait = Duration::from_secs((1u64 << self.failures.min(6)).min(60));
        self.next_try = Instant::now() + wait;
        wait
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.next_try = Instant::now();
    }
}

pub fn run(a: &AutoscaleArgs) -> Result<(), Failure> {
    let mut policy = Policy::new(policy_config(a)?);
    let state_path: PathBuf = a.state.clone().unwrap_or_else(|| a.local_dir.join("autoscale.json"));
    if let Some(dir) = state_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure::Unreachable(format!("cannot create {}: {e}", dir.display())))?;
    }
    let mut state = load_state(&state_path)?;
    let mut endpoints = vec![a.endpoint.clone()];
    let mut backoff = Backoff::new();
    // An add the policy decided that a provisioner has not carried out yet.
    let mut to_add = 0usize;
    log("start", json!({ "config": format!("{:?}", policy.config()), "state": state, "dry_run": a.dry_run }));
    let started = Instant::now();
    let mut rounds = 0u64;
    loop {
        if a.max_rounds.is_some_and(|m| rounds >= m) || a.duration_s.is_some_and(|d| started.elapsed().as_secs() >= d) {
            return Ok(());
        }
        rounds += 1;
        if rounds > 1 {
            std::thread::sleep(Duration::from_secs(a.interval_s));
        }
        let info = match any_info(&mut endpoints) {
            Ok(i) => i,
            Err(f) => {
                log("unreachable", json!({ "error": f.message() }));
                continue;
            }
        };
        // A remove in progress goes first, whatever the load says.
        if let Some(member) = state.removing.clone() {
            if !a.dry_run && backoff.ready() {
                let step = if has_left(&info, &member) {
                    let m = state.nodes.iter().find(|m| m.id == member).cloned();
                    match m.map_or(Ok(()), |m| retire(a, &m)) {
                        Ok(()) => {
                            state.nodes.retain(|m| m.id != member);
                            state.removing = None;
                            save_state(&state_path, &state)?;
                            policy.changed(now_ms());
                            log("removed", json!({ "member": member }));
                            Ok(())
                        }
                        Err(e) => Err(e),
                    }
                } else {
                    start_leave(a, &info, &member)
                };
                match step {
                    Ok(()) => backoff.succeeded(),
                    Err(e) => {
                        let wait = backoff.failed();
                        log(
                            "retry",
                            json!({ "action": "remove", "member": member, "error": e, "in_s": wait.as_secs() }),
                        );
                    }
                }
            }
            continue;
        }
        if to_add > 0 {
            if !backoff.ready() {
                continue;
            }
            match provision(a, &mut state, &info) {
                Ok(m) => {
                    state.started += 1;
                    log("added", json!({ "member": m.id, "addr": m.addr, "pid": m.pid }));
                    state.nodes.push(m);
                    save_state(&state_path, &state)?;
                    to_add -= 1;
                    backoff.succeeded();
                    policy.changed(now_ms());
                }
                Err(e) => {
                    let wait = backoff.failed();
                    log("retry", json!({ "action": "add", "error": e, "in_s": wait.as_secs() }));
                }
            }
            continue;
        }
        let obs = observe(&info, &state, a.provisioner == ProvisionerKind::Local || !a.remove_any);
        let decision = policy.decide(&obs);
        log(
            "decision",
            json!({ "decision": decision, "serving": obs.members.iter().filter(|m| m.serving).count(),
            "pending": obs.pending }),
        );
        if a.dry_run {
            continue;
        }
        match decision {
            Decision::Hold { .. } => {}
            Decision::Add { count, .. } => to_add = count,
            Decision::Remove { member, .. } => {
                // Recorded before anything happens: a restart resumes it.
                state.removing = Some(member.clone());
                save_state(&state_path, &state)?;
                if let Err(e) = start_leave(a, &info, &member) {
                    let wait = backoff.failed();
                    log("retry", json!({ "action": "remove", "member": member, "error": e, "in_s": wait.as_secs() }));
                }
            }
        }
    }
}
