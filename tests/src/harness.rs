//! Real `ringkv` processes for tests.
//!
//! Every node listens on a loopback address (127.0.0.x) only. A [`Node`]
//! kills its process when dropped, so a failing test (a panic) still stops
//! everything it started; the child also gets SIGKILL if the thread that
//! spawned it dies (PR_SET_PDEATHSIG), which covers a test process that is
//! itself killed.

use ringkv_net::auth::Credentials;
use ringkv_net::tls::ClientTls;
use ringkv_net::{Client, ClientConfig};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `ringkv` binary of this workspace, built (once per test process) with
/// the same profile as the tests, so a test never runs a stale binary.
/// `RINGKV_BIN` overrides it.
pub fn ringkv_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("RINGKV_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("test executable path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe.parent().and_then(Path::parent).expect("test binary lives in target/<profile>/deps");
        let profile = profile_dir.file_name().and_then(|n| n.to_str()).expect("profile dir name").to_string();
        let target_dir = profile_dir.parent().expect("target dir");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "ringkv-tools", "--bin", "ringkv"]);
        cmd.arg("--target-dir").arg(target_dir);
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
        let status = cmd.status().expect("running cargo to build ringkv");
        assert!(status.success(), "building the ringkv binary failed");
        let bin = profile_dir.join("ringkv");
        assert!(bin.exists(), "{} missing after build", bin.display());
        bin
    })
    .clone()
}

/// `count` consecutive free ports on `ip`, distinct from any other call in
/// this process.
pub fn free_ports(ip: Ipv4Addr, count: u16) -> u16 {
    free_ports_on(&[ip], count)
}

/// `count` consecutive ports free on every one of `ips`.
pub fn free_ports_on(ips: &[Ipv4Addr], count: u16) -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20_000 + (std::process::id() % 400) as u16 * 100;
    for _ in 0..2000 {
        let off = NEXT.fetch_add(count, Ordering::Relaxed);
        let base = start.wrapping_add(off % 20_000);
        if !(20_000..=60_000).contains(&base) {
            continue;
        }
        let all_free =
            ips.iter().all(|&ip| (0..count).all(|i| TcpListener::bind(SocketAddrV4::new(ip, base + i)).is_ok()));
        if all_free {
            return base;
        }
    }
    panic!("no {count} free consecutive ports on {ips:?}");
}

#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub node_id: String,
    pub ip: Ipv4Addr,
    pub port: u16,
    pub shards: usize,
    pub dir: PathBuf,
    pub seeds: Vec<SocketAddr>,
    /// Extra `ringkv server` flags.
    pub extra: Vec<String>,
    /// What the harness's own clients authenticate with (a node configured
    /// with tokens or users through `extra`).
    pub credentials: Option<Credentials>,
    /// How the harness's own clients speak TLS to it (a node given TLS
    /// flags through `extra`).
    pub tls: Option<ClientTls>,
}

impl NodeSpec {
    /// A single node on 127.0.0.1 with fresh ports and data under `dir`.
    pub fn single(dir: &Path, shards: usize) -> NodeSpec {
        let ip = Ipv4Addr::LOCALHOST;
        NodeSpec {
            node_id: "n1".into(),
            ip,
            port: free_ports(ip, shards as u16),
            shards,
            dir: dir.join("data"),
            seeds: Vec::new(),
            extra: Vec::new(),
            credentials: None,
            tls: None,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((self.ip, self.port))
    }

    /// How the harness connects to this node.
    pub fn client_config(&self, timeout: Duration) -> ClientConfig {
        ClientConfig { timeout, credentials: self.credentials.clone(), tls: self.tls.clone(), ..Default::default() }
    }
}

pub struct Node {
    pub spec: NodeSpec,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

impl Node {
    /// A node that is not started yet.
    pub fn new(spec: NodeSpec) -> Node {
        let log = spec.dir.with_extension("log");
        Node { spec, child: None, log, starts: 0 }
    }

    /// Starts the node and waits until every shard answers a ping.
    pub fn start(spec: NodeSpec) -> Node {
        let mut n = Node::new(spec);
        n.spawn();
        n.wait_ready(Duration::from_secs(60));
        n
    }

    /// Starts the process without waiting for it to serve.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.spec.node_id);
        std::fs::create_dir_all(self.spec.dir.parent().expect("data dir has a parent")).expect("creating test dir");
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        self.starts += 1;
        let _ = writeln!(log, "===== start #{} =====", self.starts);
        let mut cmd = Command::new(ringkv_bin());
        cmd.arg("server")
            .args(["--node-id", &self.spec.node_id])
            .args(["--listen", &self.spec.addr().to_string()])
            .arg("--data-dir")
            .arg(&self.spec.dir)
            .args(["--shards", &self.spec.shards.to_string()])
            .arg("--no-pin")
            .args(&self.spec.extra)
            .env("RINGKV_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        if !self.spec.seeds.is_empty() {
            let seeds: Vec<String> = self.spec.seeds.iter().map(ToString::to_string).collect();
            cmd.args(["--seeds", &seeds.join(",")]);
        }
        // SAFETY: prctl is async-signal-safe; no allocation happens in the hook.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.child = Some(cmd.spawn().expect("spawning ringkv server"));
    }

    /// Waits until every shard port completes a handshake and a ping.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for shard in 0..self.spec.shards {
            let addr = SocketAddr::from((self.spec.ip, self.spec.port + shard as u16));
            loop {
                if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().expect("try_wait")) {
                    panic!("node {} exited during start-up ({status}); log:\n{}", self.spec.node_id, self.log());
                }
                let cfg = self.spec.client_config(Duration::from_secs(2));
                if let Ok(mut c) = Client::connect(addr, &cfg) {
                    if c.ping().is_ok() {
                        break;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} not ready in {timeout:?}; log:\n{}",
                    self.spec.node_id,
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.spec.addr()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("node is running").id() as i32
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr(), &self.spec.client_config(ClientConfig::default().timeout))
            .expect("connecting to node")
    }

    /// A client, or `None` if the node does not answer within two seconds.
    pub fn try_client(&self) -> Option<Client> {
        Client::connect(self.addr(), &self.spec.client_config(Duration::from_secs(2))).ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// kill -9: no flush, no clean-stop record.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (the node flushes and exits 0).
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.try_wait().expect("try_wait") {
                assert!(
                    status.success(),
                    "node {} exited with {status} on SIGTERM; log:\n{}",
                    self.spec.node_id,
                    self.log()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("node {} did not stop within 30s of SIGTERM", self.spec.node_id);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGSTOP: the process stays, but answers nothing.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Starts the process again on the same address and data directory.
    pub fn restart(&mut self) {
        self.spawn();
        self.wait_ready(Duration::from_secs(60));
    }

    /// Waits for the process to exit by itself, returning whether it succeeded.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(s) = c.try_wait().expect("try_wait") {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // A paused process must be resumed to die promptly.
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the `ringkv` CLI with `args`, feeding `stdin`, and returns its output.
pub fn cli(args: &[&str], stdin: Option<&[u8]>) -> Output {
    cli_env(args, stdin, &[])
}

/// [`cli`] with these environment variables set.
pub fn cli_env(args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(ringkv_bin());
    cmd.args(args).env_remove("RINGKV_ENDPOINT").env("RINGKV_LOG", "warn");
    // Credentials and TLS only where a test passes them.
    use ringkv_net::{auth, tls};
    let vars = [auth::TOKEN_ENV, auth::USER_ENV, auth::PASSWORD_ENV, tls::CA_ENV, tls::CERT_ENV, tls::KEY_ENV];
    for var in vars.into_iter().chain([tls::SERVER_NAME_ENV]) {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning ringkv cli");
    if let Some(input) = stdin {
        child.stdin.take().expect("stdin piped").write_all(input).expect("writing stdin");
    }
    child.wait_with_output().expect("waiting for ringkv cli")
}

/// A local cluster of real processes on 127.0.0.1 .. 127.0.0.N, one port.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub dir: PathBuf,
}

impl Cluster {
    /// Spec of node `i` (0-based) in a cluster of `n` under `dir`.
    pub fn spec(dir: &Path, i: usize, n: usize, port: u16, shards: usize, extra: &[&str]) -> NodeSpec {
        let ip = Ipv4Addr::new(127, 0, 0, i as u8 + 1);
        let seeds = (0..n).filter(|j| *j != i).map(|j| SocketAddr::from(([127, 0, 0, j as u8 + 1], port))).collect();
        NodeSpec {
            node_id: format!("n{}", i + 1),
            ip,
            port,
            shards,
            dir: dir.join(format!("n{}", i + 1)),
            seeds,
            extra: extra.iter().map(ToString::to_string).collect(),
            credentials: None,
            tls: None,
        }
    }

    /// Starts `n` nodes seeded to each other and waits until every node sees
    /// all of them up and alive.
    pub fn start(dir: &Path, n: usize, shards: usize, extra: &[&str]) -> Cluster {
        Cluster::start_with(dir, n, shards, extra, |_, _| {})
    }

    /// [`Cluster::start`], with each node's spec changed by `customize`
    /// (its index, its spec) before it starts: per-node flags, such as a
    /// TLS certificate of its own.
    pub fn start_with(
        dir: &Path,
        n: usize,
        shards: usize,
        extra: &[&str],
        mut customize: impl FnMut(usize, &mut NodeSpec),
    ) -> Cluster {
        let ips: Vec<Ipv4Addr> = (1..=n as u8).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
        let port = free_ports_on(&ips, shards as u16);
        let mut nodes: Vec<Node> = (0..n)
            .map(|i| {
                let mut spec = Cluster::spec(dir, i, n, port, shards, extra);
                customize(i, &mut spec);
                let mut node = Node::new(spec);
                node.spawn();
                node
            })
            .collect();
        for node in &mut nodes {
            node.wait_ready(Duration::from_secs(60));
        }
        let c = Cluster { nodes, dir: dir.to_path_buf() };
        c.wait_converged(n, Duration::from_secs(60));
        c
    }

    /// Waits until every running node sees `members` members, all up and alive.
    pub fn wait_converged(&self, members: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            loop {
                let ok = node.try_client().and_then(|mut c| c.node_info().ok()).is_some_and(|i| {
                    i.members.len() == members && i.members.iter().all(|m| m.status == "up" && m.alive)
                });
                if ok {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster did not converge to {members} members within {timeout:?}; {} log:\n{}",
                    node.spec.node_id,
                    node.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Each partition's Merkle roots as the running replicas report them.
    pub fn merkle_roots(&self) -> std::collections::BTreeMap<u32, Vec<(String, u64)>> {
        let mut out: std::collections::BTreeMap<u32, Vec<(String, u64)>> = Default::default();
        for n in self.nodes.iter().filter(|n| n.is_running()) {
            let Some(mut c) = n.try_client() else { continue };
            if let Ok(ringkv_net::Reply::MerkleRoots { roots }) = c.call(ringkv_net::Request::MerkleRoots) {
                for r in roots {
                    out.entry(r.partition).or_default().push((n.spec.node_id.clone(), r.root));
                }
            }
        }
        out
    }

    /// Waits until the replicas of every partition report equal Merkle roots
    /// (and every partition is reported by `replicas` nodes); returns how long.
    pub fn wait_merkle_converged(&self, replicas: usize, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let roots = self.merkle_roots();
            let converged = roots.values().all(|rs| rs.len() == replicas && rs.iter().all(|(_, r)| *r == rs[0].1))
                && !roots.is_empty();
            if converged {
                return started.elapsed();
            }
            if started.elapsed() > timeout {
                let differing: Vec<_> = roots
                    .iter()
                    .filter(|(_, rs)| rs.len() != replicas || rs.iter().any(|(_, r)| *r != rs[0].1))
                    .take(5)
                    .collect();
                panic!("replicas did not converge within {timeout:?}; e.g. {differing:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Hints held across the running nodes.
    pub fn hints_pending(&self) -> u64 {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .filter_map(|n| n.try_client().and_then(|mut c| c.node_info().ok()))
            .map(|i| i.shards.iter().map(|s| s.hints).sum::<u64>())
            .sum()
    }

    /// Every key's values, read at r=all through node `via`.
    pub fn read_all(&self, via: usize, keys: &[Vec<u8>]) -> std::collections::BTreeMap<Vec<u8>, Vec<Vec<u8>>> {
        let mut c = self.nodes[via].client();
        keys.iter()
            .map(|k| {
                let g = c.get(k, ringkv_net::Level::All).unwrap_or_else(|e| panic!("final read of {k:?}: {e}"));
                (k.clone(), g.values)
            })
            .collect()
    }

    /// The shard ports the cluster's nodes listen on.
    pub fn ports(&self) -> std::ops::RangeInclusive<u16> {
        let s = &self.nodes[0].spec;
        s.port..=s.port + s.shards as u16 - 1
    }

    pub fn addrs(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr().to_string()).collect()
    }
}

/// Polls `cond` every 100 ms until it holds, and returns how long that
/// took; fails the test, naming `what`, once `timeout` has passed.
pub fn eventually(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
    started.elapsed()
}
