//! Where a local server runs: finds the process listening on a loopback
//! port through /proc and lists its threads' CPU affinity, so every run can
//! state the core placement of both sides (a wake-up across cores costs tens
//! of microseconds on small VMs, as much as the request itself).

use std::collections::BTreeMap;
use std::fs;

/// The socket inode listening on `port` (IPv4 or IPv6), from /proc/net.
fn listening_inode(port: u16) -> Option<u64> {
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEXIP:HEXPORT, st 0A is LISTEN, inode is field 9.
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else { continue };
            let Some((_, p)) = local.rsplit_once(':') else { continue };
            if *state == "0A" && u16::from_str_radix(p, 16).ok() == Some(port) {
                return inode.parse().ok();
            }
        }
    }
    None
}

fn pid_owning(inode: u64) -> Option<u32> {
    let want = format!("socket:[{inode}]");
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).map(|l| l.to_string_lossy() == want).unwrap_or(false) {
                return Some(pid);
            }
        }
    }
    None
}

fn status_field(status: &str, name: &str) -> Option<String> {
    status.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim_start_matches(':').trim().to_string()))
}

/// The pid of the local process listening on `port`.
pub fn listener_pid(port: u16) -> Option<u32> {
    pid_owning(listening_inode(port)?)
}

/// CPU time (user + system, ns) of process `pid`, exited threads included,
/// from /proc/PID/stat (kernel clock ticks, usually 10 ms: measure over
/// seconds).
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line.
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    (ticks(11) + ticks(12)) * 1_000_000_000 / hz
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

/// "comm pid N: threads X on CPUs a; Y on CPUs b" for the local process
/// listening on `port`, or `None` when it cannot be found (remote server,
/// no permission).
pub fn describe_listener(port: u16) -> Option<String> {
    let pid = pid_owning(listening_inode(port)?)?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string();
    // Group threads by name pattern and allowed CPUs.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_our_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let d = describe_listener(port).expect("our listener is visible in /proc");
        assert!(d.contains(&format!("pid {}", std::process::id())), "{d}");
        assert!(d.contains("allowed on CPUs"), "{d}");
        assert_eq!(listener_pid(port), Some(std::process::id()));
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i ^ (i >> 3));
        }
        std::hint::black_box(x);
        assert!(process_cpu_ns(std::process::id()) > 0);
        let _ = threads_cpu_ns(std::process::id(), "no-such-thread");
    }
}
