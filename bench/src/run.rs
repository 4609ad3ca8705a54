//! `ringkv-bench run`: resolves the target, loads the records, runs the
//! measured phase (or a sweep of them), shows progress, and writes the
//! results.
//!
//! Workers are scoped threads (crossbeam) that connect, meet at a barrier,
//! get the common start time, and send progress over a crossbeam channel;
//! their stats are merged when they are joined.

use crate::codec::{Codec, EchoCodec, RingkvCodec, RingkvOptions};
use crate::cpu;
use crate::driver::{self, Interval, Pace, Source, Timing, WorkerResult, WorkerSpec};
use crate::echo_server::EchoConfig;
use crate::keydist::{Distribution, KeyChooser};
use crate::placement;
use crate::plot;
use crate::report::{self, RunReport, SweepPoint};
use crate::stats::{new_hist, Quantiles, RunStats};
use crate::target::{self, Kind, ResolveOptions, Resolved, TargetUrl};
use crate::workload::{KeySpace, ValueSize, Workload};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use ringkv_net::proto::Level;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DistArg {
    Uniform,
    Zipfian,
    Latest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reads {
    Coordinated,
    Client,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durable {
    /// The node's default (durable).
    Default,
    Yes,
    No,
}

/// Parses `10s`, `500ms`, `2m` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("'{s}' is not a duration like 10s or 500ms"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "us" => n / 1e6,
        _ => return Err(format!("unknown unit in '{s}' (us, ms, s, m)")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("duration '{s}' out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// ringkv://HOST:PORT, redis://HOST:PORT, echo://HOST:PORT, or
    /// echo://local to start an echo server in this process.
    #[arg(long)]
    pub target: TargetUrl,
    /// redis: follow Redis Cluster slots (CLUSTER SLOTS, MOVED, ASK).
    #[arg(long)]
    pub cluster: bool,
    #[arg(long, value_enum, default_value = "a")]
    pub workload: Workload,
    /// Records loaded before the run and chosen from by reads and updates.
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,
    /// Do not load the records (they are there from an earlier run).
    #[arg(long)]
    pub no_load: bool,
    /// Key distribution [default: zipfian; latest for workload d].
    #[arg(long, value_enum)]
    pub distribution: Option<DistArg>,
    #[arg(long, default_value_t = 0.99)]
    pub zipf_theta: f64,
    /// Value bytes: fixed (1024) or a uniform range (100-2000).
    #[arg(long, default_value = "1024")]
    pub value_size: ValueSize,
    /// ringkv read quorum: one, quorum, all or a count [default: the node's].
    #[arg(long)]
    pub r: Option<Level>,
    /// ringkv write quorum [default: the node's].
    #[arg(long)]
    pub w: Option<Level>,
    /// ringkv: acknowledge writes after fsync (yes) or before (no).
    #[arg(long, value_enum, default_value = "default")]
    pub durable: Durable,
    /// ringkv request timeout sent with each request, 0 = the node's default.
    #[arg(long, default_value_t = 0)]
    pub timeout_ms: u32,
    /// ringkv cluster name presented in the handshake.
    #[arg(long, default_value = "ringkv")]
    pub ringkv_cluster: String,
    /// ringkv: authenticate with this token (nodes with `auth_tokens`).
    #[arg(long, env = ringkv_net::auth::TOKEN_ENV, hide_env_values = true)]
    pub token: Option<String>,
    /// ringkv: authenticate as this user; the password comes from $RINGKV_PASSWORD.
    #[arg(long, env = ringkv_net::auth::USER_ENV)]
    pub user: Option<String>,
    /// ringkv: send everything to the given port and let the node forward
    /// between its shards.
    #[arg(long)]
    pub no_shard_aware: bool,
    /// ringkv: write without the last context seen (each write then adds a
    /// sibling instead of replacing what was read).
    #[arg(long)]
    pub blind_writes: bool,
    /// ringkv reads: `coordinated` (to one node, which asks the replicas)
    /// or `client` (the harness asks r replicas for their copies itself and
    /// compares them, reading through a coordinator when they differ; r
    /// from --r, the node's default taken as a quorum). Needs the cluster's
    /// topology (not with --no-shard-aware).
    #[arg(long, value_enum, default_value = "coordinated")]
    pub reads: Reads,
    /// Connections (clients) per endpoint, over all threads.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Requests in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub pipeline: usize,
    /// Worker threads, each driving its share of the connections.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Pin worker i to the i-th CPU of this list (e.g. 0 or 0,1).
    #[arg(long)]
    pub client_cpus: Option<cpu::CpuList>,
    /// Open loop at this many operations per second (else closed loop).
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// After the run, how long outstanding operations may still complete.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Open-loop runs at increasing rates up to saturation.
    #[arg(long)]
    pub sweep: bool,
    /// Rates in the sweep.
    #[arg(long, default_value_t = 8)]
    pub sweep_steps: usize,
    /// Highest sweep rate [default: 110% of a closed-loop probe].
    #[arg(long)]
    pub sweep_max: Option<f64>,
    /// Requests in flight per connection while loading.
    #[arg(long, default_value_t = 16)]
    pub load_pipeline: usize,
    /// Write the results as JSON here (plus .hgrm files and an SVG plot
    /// beside it).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Name of the run in tables and plots [default: the target].
    #[arg(long)]
    pub label: Option<String>,
    #[arg(long)]
    pub no_progress: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Spin on the completion queue instead of sleeping (burns the
    /// client's cores; removes the client's wake-up from the latency).
    #[arg(long)]
    pub busy_poll: bool,
    /// echo://local: pin the echo server to these CPUs.
    #[arg(long)]
    pub echo_cpus: Option<cpu::CpuList>,
    /// echo://local: busy-poll echo server.
    #[arg(long)]
    pub echo_busy_poll: bool,
    /// The CPUs the servers run on: their busy share over the measured
    /// window (from /proc/stat) is reported beside the servers' processes'
    /// CPU time, as a check that no server process was missed.
    #[arg(long)]
    pub server_cpus: Option<cpu::CpuList>,
    /// More local addresses whose listening processes count as the server
    /// (comma-separated), e.g. the echo server behind a relay.
    #[arg(long, value_delimiter = ',')]
    pub server_endpoints: Vec<SocketAddr>,
    /// When the measured window starts, write its start and end here as
    /// CLOCK_MONOTONIC seconds ("START END"), so a profiler started by a
    /// script can follow the window (bench/profile.sh). Each phase of a
    /// sweep writes it again.
    #[arg(long)]
    pub window_file: Option<PathBuf>,
}

impl RunArgs {
    fn distribution(&self) -> Distribution {
        let theta = self.zipf_theta;
        match self.distribution {
            Some(DistArg::Uniform) => Distribution::Uniform,
            Some(DistArg::Zipfian) => Distribution::Zipfian(theta),
            Some(DistArg::Latest) => Distribution::Latest(theta),
            None if self.workload.reads_latest() => Distribution::Latest(theta),
            None => Distribution::Zipfian(theta),
        }
    }

    fn ringkv_options(&self) -> RingkvOptions {
        RingkvOptions {
            r: self.r.unwrap_or_default(),
            w: self.w.unwrap_or_default(),
            durable: match self.durable {
                Durable::Default => None,
                Durable::Yes => Some(true),
                Durable::No => Some(false),
            },
            timeout_ms: self.timeout_ms,
        }
    }

    /// How every ringkv connection of the run is opened.
    fn ringkv_client(&self) -> Result<ringkv_net::ClientConfig> {
        let password = std::env::var(ringkv_net::auth::PASSWORD_ENV).ok();
        let credentials = ringkv_net::auth::Credentials::from_options(
            self.token.as_deref(),
            self.user.as_deref(),
            password.as_deref(),
        )
        .map_err(|e| anyhow!(e))?;
        Ok(ringkv_net::ClientConfig {
            cluster: self.ringkv_cluster.clone(),
            timeout: Duration::from_secs(10),
            credentials,
            ..Default::default()
        })
    }

    fn validate(&self) -> Result<()> {
        driver::check_layout(self.concurrency, self.threads, self.pipeline)?;
        if !(self.zipf_theta > 0.0 && self.zipf_theta < 1.0) {
            bail!("--zipf-theta must be between 0 and 1 (exclusive)");
        }
        if self.records == 0 {
            bail!("--records must be positive");
        }
        if self.duration.is_zero() {
            bail!("--duration must be positive");
        }
        if let Some(r) = self.rate {
            if !(r > 0.0 && r.is_finite()) {
                bail!("--rate must be positive");
            }
        }
        if self.sweep && self.rate.is_some() {
            bail!("--sweep chooses its own rates; drop --rate");
        }
        if self.sweep && self.sweep_steps == 0 {
            bail!("--sweep-steps must be positive");
        }
        if self.cluster && self.target.kind != Kind::Redis {
            bail!("--cluster is for redis:// targets");
        }
        if self.load_pipeline == 0 || self.load_pipeline > 1024 {
            bail!("--load-pipeline must be 1..=1024");
        }
        if self.reads == Reads::Client && (self.target.kind != Kind::Ringkv || self.no_shard_aware) {
            bail!("--reads client is for ringkv:// targets with their topology (drop --no-shard-aware)");
        }
        Ok(())
    }
}

/// What every phase of a run shares.
struct Ctx<'a> {
    args: &'a RunArgs,
    resolved: &'a Resolved,
    keys: Arc<KeySpace>,
    make_codec: Arc<dyn Fn() -> Codec + Send + Sync>,
    connect: Arc<dyn Fn(SocketAddr) -> Result<std::net::TcpStream> + Send + Sync>,
    /// Local server processes whose CPU time is sampled over the measured
    /// window.
    servers: Vec<u32>,
    /// `--server-cpus`, whose busy time is sampled over the window.
    server_cpus: Option<Vec<usize>>,
    /// The echo server runs in this process (echo://local).
    echo_in_process: bool,
    /// ringkv: the last context seen per record, merged from the workers
    /// after each phase so the next phase's writes replace what was written.
    contexts: std::sync::Mutex<Vec<Vec<u8>>>,
}

/// CPU counters at one instant.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    client_ns: u64,
    server_ns: u64,
    cores: Option<placement::CoreSample>,
}

/// What a window cost: the difference of two samples.
#[derive(Debug, Clone, Copy)]
struct CpuUsed {
    client_ns: u64,
    server_ns: u64,
    cores: Option<placement::CoreTimes>,
}

impl CpuSample {
    fn since(self, earlier: CpuSample) -> CpuUsed {
        CpuUsed {
            client_ns: self.client_ns.saturating_sub(earlier.client_ns),
            server_ns: self.server_ns.saturating_sub(earlier.server_ns),
            cores: self.cores.zip(earlier.cores).map(|(a, b)| a.since(b)),
        }
    }
}

impl Ctx<'_> {
    /// CPU counters now. The client is this whole process (workers,
    /// io_uring helper threads, progress display) less an in-process echo
    /// server; the server is the sum over its local processes.
    fn cpu_sample(&self) -> CpuSample {
        let echo = if self.echo_in_process { crate::echo_server::in_process_cpu_ns() } else { 0 };
        let servers: u64 = self.servers.iter().map(|&pid| placement::process_cpu_ns(pid)).sum();
        CpuSample {
            client_ns: cpu::process_cpu_ns().saturating_sub(echo),
            server_ns: servers + echo,
            cores: self.server_cpus.as_deref().and_then(placement::core_sample),
        }
    }

    fn knows_server_cpu(&self) -> bool {
        self.echo_in_process || !self.servers.is_empty()
    }
}

/// The merged outcome of one phase.
struct PhaseResult {
    stats: RunStats,
    workers: Vec<WorkerResult>,
    seconds: f64,
    /// CPU time the local server(s) used in the measured window, if known.
    server_cpu_ns: Option<u64>,
    /// CPU time this process (the client) used in the measured window.
    client_cpu_ns: u64,
    /// Busy and total time of `--server-cpus` in the measured window.
    server_cores: Option<placement::CoreTimes>,
}

pub fn run(args: &RunArgs) -> Result<RunReport> {
    args.validate()?;
    let opts = ResolveOptions {
        redis_cluster: args.cluster,
        shard_aware: !args.no_shard_aware,
        ringkv: args.ringkv_client()?,
        echo: EchoConfig {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            cpus: args.echo_cpus.clone().map(|c| c.0),
            busy_poll: args.echo_busy_poll,
        },
    };
    let resolved = target::resolve(&args.target, &opts)?;
    let ropts = args.ringkv_options();
    let make_codec: Arc<dyn Fn() -> Codec + Send + Sync> = match resolved.kind {
        Kind::Ringkv => Arc::new(move || Codec::Ringkv(RingkvCodec::new(ropts))),
        Kind::Redis => Arc::new(|| Codec::Redis),
        Kind::Echo => Arc::new(move || Codec::Echo(EchoCodec::new(ropts))),
    };
    let (kind, ringkv) = (resolved.kind, opts.ringkv.clone());
    let connect: Arc<dyn Fn(SocketAddr) -> Result<std::net::TcpStream> + Send + Sync> =
        Arc::new(move |a| target::connect(kind, a, &ringkv));
    let ctx = Ctx {
        args,
        resolved: &resolved,
        keys: Arc::new(KeySpace::new(args.records)),
        make_codec,
        connect,
        servers: local_servers(&resolved, args),
        server_cpus: args.server_cpus.as_ref().map(|c| c.0.clone()),
        echo_in_process: args.target.addr.is_none(),
        contexts: std::sync::Mutex::new(if resolved.kind == Kind::Ringkv && !args.blind_writes {
            vec![Vec::new(); usize::try_from(args.records).context("--records too large")?]
        } else {
            Vec::new()
        }),
    };

    let target_name = match &args.target.addr {
        Some(a) => format!("{}://{a}", resolved.kind.name()),
        None => format!("echo://{} (in-process)", resolved.endpoints[0]),
    };
    let server_placement = server_placement(&ctx.servers, args);
    if let Some(c) = &args.server_cpus {
        if placement::core_sample(&c.0).is_none() {
            bail!("--server-cpus {}: not every one of these CPUs is in /proc/stat", cpu::format_cpu_list(&c.0));
        }
    }
    eprintln!("target {target_name}: {}", resolved.routing);
    eprintln!(
        "machine: {} online CPUs; client threads: {}",
        cpu::online_cpus(),
        match &args.client_cpus {
            Some(c) => format!("pinned to CPUs {}", cpu::format_cpu_list(&c.0)),
            None => format!("unpinned (allowed CPUs {})", cpu::format_cpu_list(&cpu::allowed_cpus())),
        }
    );
    eprintln!("server: {} process(es): {server_placement}", ctx.servers.len());

    if !args.no_load {
        load(&ctx)?;
    }

    let mut report = RunReport {
        label: args.label.clone().unwrap_or_else(|| target_name.clone()),
        target: target_name,
        target_kind: resolved.kind.name().into(),
        routing: match args.reads {
            Reads::Client if resolved.router.most_replicas() > 1 => {
                format!("{}; reads client-driven (copies of r replicas compared)", resolved.routing)
            }
            Reads::Client => bail!("--reads client needs the cluster's topology; the node did not give it"),
            Reads::Coordinated => resolved.routing.clone(),
        },
        endpoints: resolved.endpoints.iter().map(ToString::to_string).collect(),
        workload: args.workload.name().into(),
        mode: if args.sweep {
            "sweep".into()
        } else if args.rate.is_some() {
            "open".into()
        } else {
            "closed".into()
        },
        rate: args.rate,
        concurrency: args.concurrency,
        pipeline: args.pipeline,
        threads: args.threads,
        duration_s: args.duration.as_secs_f64(),
        warmup_s: args.warmup.as_secs_f64(),
        records: args.records,
        value_size: args.value_size.to_string(),
        distribution: args.distribution().name().into(),
        zipf_theta: args.zipf_theta,
        server_placement,
        server_pids: ctx.servers.clone(),
        server_cpus: args.server_cpus.as_ref().map(|c| c.0.clone()).unwrap_or_default(),
        ..Default::default()
    };

    let last = if args.sweep {
        let (points, last) = sweep(&ctx)?;
        report.sweep = points;
        last
    } else {
        let pace = match args.rate {
            Some(rate) => Pace::Open { rate },
            None => Pace::Closed,
        };
        measured(&ctx, pace, "run")?
    };
    report.fill(&last.stats, last.seconds);
    let per_op = |ns: u64| {
        let ops = last.stats.completed_in_window;
        if ops > 0 {
            ns as f64 / 1000.0 / ops as f64
        } else {
            0.0
        }
    };
    report.client_worker_cpu_us_per_op = report.client_cpu_us_per_op;
    report.client_cpu_us_per_op = per_op(last.client_cpu_ns);
    report.server_cpu_us_per_op = last.server_cpu_ns.map(per_op);
    if let Some(cores) = last.server_cores {
        report.server_cores_busy_share = cores.busy_share();
        report.server_cores_busy_us_per_op = Some(per_op(cores.busy_ns));
    }
    report.client_cpus = last.workers.iter().filter_map(|w| w.cpu).collect();
    report.check_server_cpu();
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    report.client_placement = client_placement(&last.workers);
    report.io_uring = last.workers.first().map(|w| w.ring_flags.to_string()).unwrap_or_default();
    if let Some(path) = &args.json {
        let stem = path.with_extension("");
        report.hgrm_files = report::write_hgrms(&last.stats, &stem)?
            .iter()
            .map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            .collect();
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
        let svg = stem.with_extension("svg");
        if args.sweep {
            plot::sweep_plot(std::slice::from_ref(&report), &svg)?;
        } else {
            plot::distribution_plot(std::slice::from_ref(&report), "all", &svg)?;
        }
        eprintln!("wrote {}, {} and {} .hgrm file(s)", path.display(), svg.display(), report.hgrm_files.len());
    }
    Ok(report)
}

fn server_placement(servers: &[u32], args: &RunArgs) -> String {
    if args.target.addr.is_none() {
        return format!(
            "echo server in this process ({}), CPUs {}",
            if args.echo_busy_poll { "busy-poll" } else { "blocking thread per connection" },
            args.echo_cpus.as_ref().map(|c| cpu::format_cpu_list(&c.0)).unwrap_or_else(|| "unpinned".into())
        );
    }
    let seen: Vec<String> = servers.iter().filter_map(|&pid| placement::describe_process(pid)).collect();
    if seen.is_empty() {
        "placement unknown (not a local process this user can inspect)".into()
    } else {
        seen.join(" | ")
    }
}

/// Every local process behind the target's endpoints and `--server-endpoints`
/// (not this process: an in-process echo server is accounted apart).
fn local_servers(resolved: &Resolved, args: &RunArgs) -> Vec<u32> {
    if args.target.addr.is_none() {
        return Vec::new();
    }
    let mut endpoints = resolved.server_endpoints.clone();
    endpoints.extend(resolved.endpoints.iter().copied());
    endpoints.extend(args.server_endpoints.iter().copied());
    placement::server_processes(&endpoints, std::process::id())
}

fn client_placement(workers: &[WorkerResult]) -> String {
    let parts: Vec<String> = workers
        .iter()
        .enumerate()
        .map(|(i, w)| match (w.cpu, w.pinned) {
            (Some(c), true) => format!("worker {i} pinned to CPU {c}"),
            (Some(c), false) => format!("worker {i} unpinned, last on CPU {c}"),
            (None, _) => format!("worker {i} unpinned"),
        })
        .collect();
    parts.join(", ")
}

fn load(ctx: &Ctx<'_>) -> Result<()> {
    let a = ctx.args;
    let t0 = Instant::now();
    let timeout = Duration::from_secs(600);
    let res = phase(ctx, Pace::Closed, a.load_pipeline, Duration::ZERO, timeout, timeout, "load", |_| Source::Load {
        records: a.records,
    })?;
    let all = res.stats.all();
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "loaded {} records in {:.1}s ({:.0} inserts/s, p99 {:.0} us){}",
        all.ok(),
        secs,
        all.ok() as f64 / secs.max(1e-9),
        Quantiles::of(&all.hist).p99_us,
        if all.error_count() > 0 { format!(", {} errors: {:?}", all.error_count(), all.errors) } else { String::new() }
    );
    if all.ok() == 0 {
        bail!("the load phase wrote nothing: {:?}", all.errors);
    }
    Ok(())
}

fn measured(ctx: &Ctx<'_>, pace: Pace, name: &str) -> Result<PhaseResult> {
    let a = ctx.args;
    let chooser = KeyChooser::new(a.distribution(), a.records);
    let mix = a.workload.mix();
    let keys = ctx.keys.clone();
    let res = phase(ctx, pace, a.pipeline, a.warmup, a.duration, a.drain, name, |_| Source::Workload {
        mix,
        chooser: chooser.clone(),
        keys: keys.clone(),
    })?;
    if !a.no_progress || a.sweep {
        let all = res.stats.all();
        let q = Quantiles::of(&all.hist);
        eprintln!(
            "{name}: {:.0} ops/s, p50 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, {} errors",
            res.stats.completed_in_window as f64 / res.seconds,
            q.p50_us,
            q.p99_us,
            q.p999_us,
            all.error_count()
        );
    }
    Ok(res)
}

/// A closed-loop probe for the highest throughput, then open-loop runs at
/// rising rates until the server falls behind.
fn sweep(ctx: &Ctx<'_>) -> Result<(Vec<SweepPoint>, PhaseResult)> {
    let a = ctx.args;
    let max = match a.sweep_max {
        Some(m) => m,
        None => {
            let probe = measured(ctx, Pace::Closed, "probe (closed loop)")?;
            probe.stats.completed_in_window as f64 / probe.seconds * 1.1
        }
    };
    if max.is_nan() || max <= 0.0 {
        bail!("the probe completed nothing; cannot choose sweep rates");
    }
    let mut points = Vec::new();
    let mut last = None;
    for step in 1..=a.sweep_steps {
        let rate = max * step as f64 / a.sweep_steps as f64;
        let res = measured(ctx, Pace::Open { rate }, &format!("sweep {step}/{} at {rate:.0} ops/s", a.sweep_steps))?;
        let all = res.stats.all();
        let q = Quantiles::of(&all.hist);
        let achieved = res.stats.completed_in_window as f64 / res.seconds;
        let errors = all.error_count() + res.stats.send_lag.error_count();
        points.push(SweepPoint {
            target_ops_per_sec: rate,
            ops_per_sec: achieved,
            p50_us: q.p50_us,
            p99_us: q.p99_us,
            p999_us: q.p999_us,
            max_us: q.max_us,
            errors,
        });
        last = Some(res);
        // Saturated: it no longer keeps up with the schedule.
        if achieved < 0.9 * rate || errors as f64 > 0.01 * (all.ok() as f64).max(1.0) {
            eprintln!("saturated at {rate:.0} ops/s (achieved {achieved:.0}); sweep done");
            break;
        }
    }
    Ok((points, last.ok_or_else(|| anyhow!("empty sweep"))?))
}

/// Runs one phase on all workers and merges what they recorded.
#[allow(clippy::too_many_arguments)]
fn phase(
    ctx: &Ctx<'_>,
    pace: Pace,
    pipeline: usize,
    warmup: Duration,
    duration: Duration,
    drain: Duration,
    name: &str,
    source: impl Fn(usize) -> Source,
) -> Result<PhaseResult> {
    let a = ctx.args;
    let threads = a.threads;
    let groups = driver::split(a.concurrency, threads);
    let connected = Barrier::new(threads + 1);
    let go = Barrier::new(threads + 1);
    let timing: OnceLock<Timing> = OnceLock::new();
    let (tx, rx) = crossbeam::channel::unbounded::<Interval>();
    // Worker 0 takes the context cache, the others get copies.
    let mut contexts = std::mem::take(&mut *ctx.contexts.lock().map_err(|_| anyhow!("poisoned"))?);
    let mut context_copies: Vec<Vec<Vec<u8>>> = (1..threads).map(|_| contexts.clone()).collect();
    let show = !a.no_progress && name != "load";
    let window_file = if name == "load" { None } else { a.window_file.as_deref() };
    let (results, cpu): (Vec<Result<WorkerResult>>, CpuUsed) = crossbeam::thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, &g) in groups.iter().enumerate() {
            let spec = WorkerSpec {
                index: i,
                workers: threads,
                cpu: a.client_cpus.as_ref().map(|c| c.0[i % c.0.len()]),
                groups: g,
                pipeline,
                pace,
                source: source(i),
                endpoints: ctx.resolved.endpoints.clone(),
                router: ctx.resolved.router.boxed_clone(),
                make_codec: ctx.make_codec.clone(),
                connect: ctx.connect.clone(),
                value_size: a.value_size,
                blind_writes: a.blind_writes,
                seed: a.seed,
                busy_poll: a.busy_poll,
                copy_reads: match a.reads {
                    Reads::Client => Some(a.r.unwrap_or_default()),
                    Reads::Coordinated => None,
                },
                progress: Some(tx.clone()),
                contexts: if i == 0 { std::mem::take(&mut contexts) } else { context_copies.pop().unwrap_or_default() },
            };
            let (connected, go, timing) = (&connected, &go, &timing);
            handles.push(s.spawn(move |_| {
                driver::run(spec, || {
                    connected.wait();
                    go.wait();
                    timing.get().copied().ok_or_else(|| anyhow!("no start time"))
                })
            }));
        }
        drop(tx);
        connected.wait();
        // A short lead so every worker is waiting when the clock starts.
        let start = Instant::now() + Duration::from_millis(5);
        let t = Timing {
            start,
            measure_from: start + warmup,
            end: start + warmup + duration,
            give_up: start + warmup + duration + drain,
        };
        let _ = timing.set(t);
        go.wait();
        let on_window = || {
            if let Some(path) = window_file {
                if let Err(e) = write_window_file(path, &t) {
                    eprintln!("warning: cannot write {}: {e}", path.display());
                }
            }
        };
        let cpu = progress_loop(&rx, show, name, t, pace, &|| ctx.cpu_sample(), &on_window);
        let results: Vec<_> =
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("a worker panicked")))).collect();
        (results, cpu)
    })
    .map_err(|_| anyhow!("a worker thread panicked"))?;
    let mut stats = RunStats::default();
    let mut workers = Vec::new();
    for r in results {
        let mut w = r?;
        stats.merge(&w.stats);
        merge_contexts(&mut contexts, std::mem::take(&mut w.contexts));
        workers.push(w);
    }
    *ctx.contexts.lock().map_err(|_| anyhow!("poisoned"))? = contexts;
    let server_cpu_ns = ctx.knows_server_cpu().then_some(cpu.server_ns);
    Ok(PhaseResult {
        stats,
        workers,
        seconds: duration.as_secs_f64(),
        server_cpu_ns,
        client_cpu_ns: cpu.client_ns,
        server_cores: cpu.cores,
    })
}

/// CLOCK_MONOTONIC now, in seconds (the clock `perf record -k mono` stamps
/// samples with, and the one `Instant` reads on Linux).
fn monotonic_s() -> f64 {
    // SAFETY: clock_gettime writes into the timespec we pass.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer, valid clock id.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// "START END" of the measured window in CLOCK_MONOTONIC seconds, written
/// whole (to a temporary name, then renamed) so a reader polling for the
/// file never sees half of it.
fn write_window_file(path: &std::path::Path, t: &Timing) -> std::io::Result<()> {
    let (now, mono) = (Instant::now(), monotonic_s());
    let at = |i: Instant| {
        if i >= now {
            mono + (i - now).as_secs_f64()
        } else {
            mono - (now - i).as_secs_f64()
        }
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{:.6} {:.6}\n", at(t.measure_from), at(t.end)))?;
    std::fs::rename(&tmp, path)
}

/// Keeps, per record, a context some worker saw (any is good enough: a
/// stale one only leaves a sibling for the next read to resolve).
fn merge_contexts(into: &mut Vec<Vec<u8>>, from: Vec<Vec<u8>>) {
    if into.is_empty() {
        *into = from;
        return;
    }
    for (a, b) in into.iter_mut().zip(from) {
        if a.is_empty() {
            *a = b;
        }
    }
}

/// Shows ops/s and p99 of the last second until the workers hang up, and
/// samples the CPU counters at the start and end of the measured window
/// (returns the difference); calls `on_window` as the window starts.
fn progress_loop(
    rx: &crossbeam::channel::Receiver<Interval>,
    show: bool,
    name: &str,
    t: Timing,
    pace: Pace,
    cpu: &dyn Fn() -> CpuSample,
    on_window: &dyn Fn(),
) -> CpuUsed {
    let total = t.end.saturating_duration_since(t.start).as_secs_f64().ceil().max(1.0) as u64;
    let bar = if show {
        let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(2));
        b.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len}s {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b.set_prefix(name.to_string());
        Some(b)
    } else {
        None
    };
    let mut rates: Vec<f64> = Vec::new();
    let mut hist = new_hist();
    let mut last_draw = Instant::now();
    let (mut cpu_from, mut cpu_to) = (None, None);
    loop {
        let now = Instant::now();
        if cpu_from.is_none() && now >= t.measure_from {
            cpu_from = Some(cpu());
            on_window();
        }
        if cpu_to.is_none() && now >= t.end {
            cpu_to = Some(cpu());
        }
        // Draw when the workers' once-a-second reports are in, or after a
        // silence (a stalled run shows as 0 ops/s).
        let mut wake = last_draw + Duration::from_millis(1500);
        if cpu_from.is_none() {
            wake = wake.min(t.measure_from);
        } else if cpu_to.is_none() {
            wake = wake.min(t.end);
        }
        let mut got = false;
        match rx.recv_deadline(wake) {
            Ok(iv) => {
                got = true;
                if rates.len() <= iv.worker {
                    rates.resize(iv.worker + 1, 0.0);
                }
                rates[iv.worker] = iv.ops as f64 / iv.elapsed.as_secs_f64().max(1e-9);
                let _ = hist.add(&iv.hist);
            }
            Err(crossbeam::channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam::channel::RecvTimeoutError::Disconnected) => break,
        }
        let since = last_draw.elapsed();
        if (got && since >= Duration::from_millis(900)) || since >= Duration::from_millis(1500) {
            if !got && since >= Duration::from_millis(1500) {
                rates.iter_mut().for_each(|r| *r = 0.0);
            }
            if let Some(b) = &bar {
                let now = Instant::now();
                let phase = if now < t.measure_from {
                    "warm-up"
                } else if now < t.end {
                    "measuring"
                } else {
                    "draining"
                };
                let p99 = if hist.is_empty() { 0.0 } else { hist.value_at_quantile(0.99) as f64 / 1000.0 };
                let rate = match pace {
                    Pace::Open { rate } => format!(" (target {rate:.0})"),
                    Pace::Closed => String::new(),
                };
                b.set_position(now.saturating_duration_since(t.start).as_secs().min(total));
                b.set_message(format!(
                    "{phase}: {:.0} ops/s{rate}, p99 {p99:.0} us",
                    rates.iter().fold(0.0, |a, b| a + b)
                ));
            }
            hist.reset();
            last_draw = Instant::now();
        }
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let from = cpu_from.unwrap_or_else(cpu);
    let to = cpu_to.unwrap_or_else(cpu);
    to.since(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("10h").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("abc").is_err());
    }
}
