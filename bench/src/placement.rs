//! Where a local server runs and what it costs: finds every process serving
//! a target's endpoints through /proc (listening sockets matched by address
//! and port, then the process tree below each owner), lists their threads'
//! CPU affinity so every run can state the core placement of both sides (a
//! wake-up across cores costs tens of microseconds on small VMs, as much as
//! the request itself), and reads the CPU time of those processes and the
//! busy time of whole cores.
//!
//! Two independent measures of the server's cost, on purpose: the sum over
//! the processes found, and the busy share of the server's CPUs from
//! /proc/stat. If the first is much smaller than the second, a process was
//! missed (or something else runs on those cores), and the run says so.
//!
//! Everything here is best effort: a process that exits or that we may not
//! read is skipped, never an error.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

/// A listening TCP socket of this network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub inode: u64,
}

/// An address printed by /proc/net/tcp{,6}: the kernel prints the raw
/// network-order words as native-endian hex, 8 digits per 32-bit word.
fn parse_hex_ip(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// The LISTEN sockets of one /proc/net/tcp or tcp6 table.
pub fn parse_net_table(text: &str) -> Vec<Listener> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        // local_address is HEXIP:HEXPORT, st 0A is LISTEN, inode is field 9.
        let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else { continue };
        if *state != "0A" {
            continue;
        }
        let Some((ip, port)) = local.split_once(':') else { continue };
        let (Some(ip), Ok(port), Ok(inode)) = (parse_hex_ip(ip), u16::from_str_radix(port, 16), inode.parse()) else {
            continue;
        };
        out.push(Listener { addr: SocketAddr::new(ip, port), inode });
    }
    out
}

/// Every listening TCP socket (IPv4 and IPv6) visible to this process.
pub fn listening_sockets() -> Vec<Listener> {
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = fs::read_to_string(table) {
            out.extend(parse_net_table(&text));
        }
    }
    out
}

/// Whether a socket listening on `listen` serves connections to `endpoint`:
/// the same port, and the same address (an IPv4-mapped IPv6 address counts
/// as its IPv4 address). A wildcard listener (0.0.0.0 or ::) serves every
/// local address, but only loopback endpoints are known to be local without
/// asking the interfaces, so a wildcard matches those alone: a remote
/// endpoint on the same port must never pick up a local process.
pub fn listener_serves(listen: SocketAddr, endpoint: SocketAddr) -> bool {
    if listen.port() != endpoint.port() {
        return false;
    }
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    let (l, e) = (canon(listen.ip()), canon(endpoint.ip()));
    l == e || (l.is_unspecified() && e.is_loopback())
}

/// The pids of the processes numbered in /proc.
fn pids() -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect()
}

/// Which process holds each of `inodes` open (the first one found, when a
/// socket is shared after a fork).
fn socket_owners(inodes: &HashSet<u64>) -> BTreeMap<u64, u32> {
    let mut owners = BTreeMap::new();
    if inodes.is_empty() {
        return owners;
    }
    for pid in pids() {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else { continue };
            let link = link.to_string_lossy();
            let Some(inode) = link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) else { continue };
            if let Ok(inode) = inode.parse::<u64>() {
                if inodes.contains(&inode) {
                    owners.entry(inode).or_insert(pid);
                }
            }
        }
    }
    owners
}

/// The fields of /proc/PID/stat after the parenthesised command name (which
/// may itself hold spaces and parentheses): field 3 (state) is index 0.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// pid -> parent pid, for every process we can read.
fn parents() -> BTreeMap<u32, u32> {
    pids().into_iter().filter_map(|pid| Some((pid, stat_fields(pid)?.get(1)?.parse().ok()?))).collect()
}

/// `roots` and all their descendants in the `parent` map, sorted.
pub fn with_descendants(roots: &[u32], parent: &BTreeMap<u32, u32>) -> Vec<u32> {
    let mut children: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (&pid, &ppid) in parent {
        children.entry(ppid).or_default().push(pid);
    }
    let mut seen: BTreeSet<u32> = BTreeSet::new();
    let mut todo: Vec<u32> = roots.to_vec();
    while let Some(p) = todo.pop() {
        if seen.insert(p) {
            todo.extend(children.get(&p).into_iter().flatten().copied());
        }
    }
    seen.into_iter().collect()
}

/// The local processes serving `endpoints`: each process holding a
/// listening socket that serves one of them, plus every descendant of such
/// a process (helpers it forked, such as a Redis rewriting its log). `skip`
/// (this process) is left out. Sorted, without repeats.
pub fn server_processes(endpoints: &[SocketAddr], skip: u32) -> Vec<u32> {
    let wanted: HashSet<u64> = listening_sockets()
        .into_iter()
        .filter(|l| endpoints.iter().any(|&e| listener_serves(l.addr, e)))
        .map(|l| l.inode)
        .collect();
    let roots: Vec<u32> = socket_owners(&wanted).into_values().filter(|&p| p != skip).collect();
    if roots.is_empty() {
        return roots;
    }
    with_descendants(&roots, &parents()).into_iter().filter(|&p| p != skip).collect()
}

/// CPU time (user + system, ns) of process `pid`, its exited threads
/// included, plus that of the children it has reaped (so a helper that
/// exits inside the measured window still counts, through its parent);
/// 0 when it is gone. From /proc/PID/stat, in kernel clock ticks (usually
/// 10 ms): measure over seconds.
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Some(f) = stat_fields(pid) else { return 0 };
    // utime, stime, cutime, cstime are fields 14 to 17.
    let ticks: u64 = (11..=14).map(|i| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)).sum();
    ticks * 1_000_000_000 / clock_ticks_per_sec()
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64
}

/// CPU time (ns, the scheduler's precise per-thread accounting) of the live
/// threads of `pid` whose name starts with `prefix`.
pub fn threads_cpu_ns(pid: u32, prefix: &str) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    let mut total = 0;
    for t in tasks.flatten() {
        let name = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !name.starts_with(prefix) {
            continue;
        }
        // schedstat: time on CPU (ns), time waiting to run, timeslices.
        let stat = fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        total += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    total
}

fn status_field(status: &str, name: &str) -> Option<String> {
    status.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim_start_matches(':').trim().to_string()))
}

/// "comm pid N: X thread(s) [names] allowed on CPUs a; ..." for process
/// `pid`, or `None` when it cannot be read.
pub fn describe_process(pid: u32) -> Option<String> {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?.trim().to_string();
    // Group threads by allowed CPUs.
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for t in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let name = status_field(&status, "Name").unwrap_or_default();
        let allowed = status_field(&status, "Cpus_allowed_list").unwrap_or_default();
        groups.entry(allowed).or_default().push(name);
    }
    let parts: Vec<String> = groups
        .into_iter()
        .map(|(cpus, mut names)| {
            names.sort();
            let shown: Vec<&str> = names.iter().map(String::as_str).take(6).collect();
            let more = if names.len() > 6 { format!(" +{}", names.len() - 6) } else { String::new() };
            format!("{} thread(s) [{}{more}] allowed on CPUs {cpus}", names.len(), shown.join(" "))
        })
        .collect();
    Some(format!("{comm} pid {pid}: {}", parts.join("; ")))
}

/// The idle time of a set of CPUs at one instant, from /proc/stat.
///
/// Busy time is taken as elapsed time less idle time, not from the busy
/// columns: on a tickless kernel the idle and iowait columns are precise
/// (kept from the idle entry and exit times), while user, system, softirq
/// and steal are sampled at the scheduler tick, and a CPU that wakes up for
/// bursts of tens of microseconds dodges many ticks: measured here, 100 us
/// bursts at 50% duty showed 0.67 s busy of 1.68 s in those columns over a
/// 2 s window, while the process alone had used 0.89 s. Elapsed less idle
/// gave 1.02 s.
#[derive(Debug, Clone, Copy)]
pub struct CoreSample {
    idle_ticks: u64,
    cpus: usize,
    at: Instant,
}

/// Busy and total time of a set of CPUs over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreTimes {
    /// Neither idle nor waiting for I/O (steal included: the vCPU was
    /// runnable, the host ran something else).
    pub busy_ns: u64,
    /// The window's length times the number of CPUs.
    pub total_ns: u64,
}

impl CoreSample {
    /// The busy and total time from `earlier` to `self`.
    pub fn since(self, earlier: CoreSample) -> CoreTimes {
        let total_ns = (self.at.saturating_duration_since(earlier.at).as_nanos() as u64) * self.cpus as u64;
        let idle_ns = self.idle_ticks.saturating_sub(earlier.idle_ticks) * 1_000_000_000 / clock_ticks_per_sec();
        CoreTimes { busy_ns: total_ns.saturating_sub(idle_ns), total_ns }
    }
}

impl CoreTimes {
    /// Busy share, 0 to 1 (of all the CPUs together).
    pub fn busy_share(self) -> Option<f64> {
        (self.total_ns > 0).then(|| self.busy_ns as f64 / self.total_ns as f64)
    }
}

/// The idle + iowait ticks of `cpus` in a /proc/stat text, summed; `None`
/// if one of them is missing.
pub fn parse_idle_ticks(text: &str, cpus: &[usize]) -> Option<u64> {
    let mut per_cpu: BTreeMap<usize, u64> = BTreeMap::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let Some(n) = f.next().and_then(|name| name.strip_prefix("cpu")).and_then(|n| n.parse::<usize>().ok()) else {
            continue;
        };
        // user nice system idle iowait irq softirq steal guest guest_nice
        let v: Vec<u64> = f.take(5).map(|x| x.parse().unwrap_or(0)).collect();
        if v.len() == 5 {
            per_cpu.insert(n, v[3] + v[4]);
        }
    }
    cpus.iter().map(|c| per_cpu.get(c).copied()).sum()
}

/// The idle time of `cpus` now.
pub fn core_sample(cpus: &[usize]) -> Option<CoreSample> {
    let text = fs::read_to_string("/proc/stat").ok()?;
    let at = Instant::now();
    Some(CoreSample { idle_ticks: parse_idle_ticks(&text, cpus)?, cpus: cpus.len(), at })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_our_own_listener_by_address_and_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let me = std::process::id();
        // Found when not skipped, and only for the address it is bound to.
        assert_eq!(server_processes(&[addr], 0), vec![me]);
        assert!(server_processes(&[addr], me).is_empty());
        let other_ip = SocketAddr::new("127.0.0.2".parse().unwrap(), addr.port());
        assert!(server_processes(&[other_ip], 0).is_empty(), "127.0.0.2 is another address");
        let d = describe_process(me).expect("we can read ourselves");
        assert!(d.contains(&format!("pid {me}")) && d.contains("allowed on CPUs"), "{d}");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i ^ (i >> 3));
        }
        std::hint::black_box(x);
        assert!(process_cpu_ns(me) > 0);
        assert_eq!(process_cpu_ns(u32::MAX), 0, "a missing process costs nothing");
        let _ = threads_cpu_ns(me, "no-such-thread");
    }

    #[test]
    fn net_tables_parse() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 0100007F:1B9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1111 1 0\n\
            1: 0200007F:1B9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2222 1 0\n\
            2: 0100007F:1B9E 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 3333 1 0\n\
            3: 00000000:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0\n";
        let got = parse_net_table(v4);
        let want: Vec<(&str, u64)> = vec![("127.0.0.1:7070", 1111), ("127.0.0.2:7070", 2222), ("0.0.0.0:6379", 4444)];
        let got: Vec<(String, u64)> = got.iter().map(|l| (l.addr.to_string(), l.inode)).collect();
        let want: Vec<(String, u64)> = want.into_iter().map(|(a, i)| (a.to_string(), i)).collect();
        assert_eq!(got, want, "established sockets are not listeners");
        // ::1 and :: as the kernel prints them on a little-endian machine.
        let v6 = "  sl  local_address remote_address st tx_queue rx_queue tr tm->when retrnsmt uid timeout inode\n\
            0: 00000000000000000000000001000000:1B9E 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 5555 1\n\
            1: 00000000000000000000000000000000:1B9F 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 6666 1\n";
        if cfg!(target_endian = "little") {
            let got: Vec<String> = parse_net_table(v6).iter().map(|l| l.addr.to_string()).collect();
            assert_eq!(got, vec!["[::1]:7070".to_string(), "[::]:7071".to_string()]);
        }
    }

    #[test]
    fn listeners_serve_their_address_or_any_loopback_when_wildcard() {
        let s = |a: &str| a.parse::<SocketAddr>().unwrap();
        assert!(listener_serves(s("127.0.0.2:7070"), s("127.0.0.2:7070")));
        assert!(!listener_serves(s("127.0.0.1:7070"), s("127.0.0.2:7070")), "another node on the same port");
        assert!(!listener_serves(s("127.0.0.2:7070"), s("127.0.0.2:7071")));
        assert!(listener_serves(s("0.0.0.0:7070"), s("127.0.0.3:7070")));
        assert!(listener_serves(s("[::]:7070"), s("127.0.0.1:7070")));
        assert!(listener_serves(s("[::]:7070"), s("[::1]:7070")));
        assert!(listener_serves(s("[::ffff:127.0.0.3]:7070"), s("127.0.0.3:7070")));
        assert!(listener_serves(s("10.1.2.3:7070"), s("10.1.2.3:7070")), "bound to it: it is local");
        assert!(!listener_serves(s("0.0.0.0:7070"), s("10.1.2.3:7070")), "a wildcard never claims a remote host");
    }

    #[test]
    fn process_trees_include_descendants_once() {
        // 1 -> 10 -> 11 -> 12, 1 -> 20, 10 -> 13; 30 alone.
        let parent: BTreeMap<u32, u32> = [(10, 1), (11, 10), (12, 11), (13, 10), (20, 1), (30, 0)].into();
        assert_eq!(with_descendants(&[10], &parent), vec![10, 11, 12, 13]);
        assert_eq!(with_descendants(&[11, 12, 30], &parent), vec![11, 12, 30]);
        assert_eq!(with_descendants(&[99], &parent), vec![99], "a root we cannot see still counts");
    }

    #[test]
    fn proc_stat_idle_and_busy_share() {
        let text = "cpu  100 0 100 800 0 0 0 0 0 0\n\
                    cpu0 10 0 10 80 0 0 0 0 0 0\n\
                    cpu1 50 5 20 20 5 0 0 0 7 0\n\
                    intr 1 2 3\n";
        assert_eq!(parse_idle_ticks(text, &[0]), Some(80));
        assert_eq!(parse_idle_ticks(text, &[1]), Some(25), "iowait counts as idle");
        assert_eq!(parse_idle_ticks(text, &[0, 1]), Some(105));
        assert_eq!(parse_idle_ticks(text, &[2]), None, "an unknown CPU");

        let hz = clock_ticks_per_sec();
        let t0 = Instant::now();
        let a = CoreSample { idle_ticks: 1000, cpus: 2, at: t0 };
        // Two CPUs for one second, half a second idle between them.
        let b = CoreSample { idle_ticks: 1000 + hz / 2, cpus: 2, at: t0 + std::time::Duration::from_secs(1) };
        let w = b.since(a);
        assert_eq!(w, CoreTimes { busy_ns: 1_500_000_000, total_ns: 2_000_000_000 });
        assert_eq!(w.busy_share(), Some(0.75));
        assert_eq!(a.since(a).busy_share(), None, "an empty window has no share");

        let now = core_sample(&[0]).expect("this machine has a CPU 0");
        std::thread::sleep(std::time::Duration::from_millis(30));
        let share = core_sample(&[0]).unwrap().since(now).busy_share().unwrap();
        assert!((0.0..=1.0).contains(&share), "{share}");
    }
}
