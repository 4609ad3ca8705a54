//! Start-up checks of what glommio needs from the host: a new enough
//! kernel, io_uring allowed, and a memlock limit it accepts.
//!
//! Without them a shard fails deep inside glommio with a message that names
//! neither the cause nor the fix. Each decision is a pure function of facts
//! read from the host (kernel release, RLIMIT_MEMLOCK, the outcome of an
//! io_uring_setup probe), so it is tested with made-up hosts; [`check_host`]
//! reads the facts and returns the first failure as one line, or warnings
//! for what only costs speed. docs/DEPLOY.md states the same requirements.

use std::io;

/// The oldest kernel glommio 0.9 supports (its README, "Supported Linux kernels").
pub const MIN_KERNEL: (u32, u32) = (5, 8);

/// glommio 0.9 refuses to create an executor when RLIMIT_MEMLOCK is below
/// this (`MIN_MEMLOCK_LIMIT` in its `sys/uring.rs`).
pub const MIN_MEMLOCK_BYTES: u64 = 512 * 1024;

/// What one shard pins for its I/O buffers: glommio registers its default
/// 10 MiB buffer area with each of an executor's three rings (main,
/// latency, poll), and the kernel counts every registration against the
/// limit. Below it glommio logs "Skipping" and uses unregistered buffers.
pub const PINNED_BYTES_PER_SHARD: u64 = 3 * (10 << 20);

/// The facts the checks decide on.
#[derive(Debug, Clone)]
pub struct Host {
    /// `uname -r`, e.g. `6.1.0-18-amd64`.
    pub kernel_release: String,
    /// The soft RLIMIT_MEMLOCK in bytes; `None` for unlimited.
    pub memlock_bytes: Option<u64>,
    /// CAP_IPC_LOCK: the kernel does not count pinned pages of such a process.
    pub ipc_lock: bool,
    /// The outcome of creating (and closing) a one-entry io_uring.
    pub io_uring: Result<(), i32>,
}

impl Host {
    /// Reads the facts of the host this process runs on.
    pub fn current() -> Host {
        Host {
            kernel_release: kernel_release(),
            memlock_bytes: memlock_limit(),
            ipc_lock: has_ipc_lock(),
            io_uring: probe_io_uring(),
        }
    }
}

/// Checks this host for `shards` shards: `Err` is the reason not to start,
/// `Ok` holds warnings to log.
pub fn check_host(shards: usize) -> Result<Vec<String>, String> {
    check(&Host::current(), shards)
}

/// The checks, in the order an operator would fix them.
pub fn check(host: &Host, shards: usize) -> Result<Vec<String>, String> {
    check_kernel(&host.kernel_release)?;
    let mut warnings = Vec::new();
    if let Some(limit) = host.memlock_bytes {
        if limit < MIN_MEMLOCK_BYTES {
            return Err(format!(
                "the memlock limit (RLIMIT_MEMLOCK) is {}, below the {} io_uring needs: raise it \
                 (LimitMEMLOCK=infinity in the systemd unit, or `ulimit -l unlimited`); see docs/DEPLOY.md",
                kib(limit),
                kib(MIN_MEMLOCK_BYTES)
            ));
        }
        let pinned = PINNED_BYTES_PER_SHARD * shards as u64;
        if !host.ipc_lock && limit < pinned {
            warnings.push(format!(
                "the memlock limit (RLIMIT_MEMLOCK) is {}, below the {} that {shards} shard(s) pin for I/O \
                 buffers: io_uring falls back to unregistered buffers (slower); set LimitMEMLOCK=infinity",
                kib(limit),
                kib(pinned)
            ));
        }
    }
    check_io_uring(host.io_uring)?;
    Ok(warnings)
}

/// The kernel must be `MIN_KERNEL` or newer. A release we cannot read is
/// let through: the io_uring probe still catches a kernel without it.
pub fn check_kernel(release: &str) -> Result<(), String> {
    let Some(version) = parse_release(release) else { return Ok(()) };
    if version < MIN_KERNEL {
        return Err(format!(
            "Linux {}.{} is too old: ringkv needs {}.{} or newer for io_uring (kernel release {release:?})",
            version.0, version.1, MIN_KERNEL.0, MIN_KERNEL.1
        ));
    }
    Ok(())
}

/// `(major, minor)` of a release such as `6.1.0-18-amd64`.
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

pub fn check_io_uring(probe: Result<(), i32>) -> Result<(), String> {
    match probe {
        Ok(()) => Ok(()),
        Err(libc::ENOSYS) => {
            Err("this kernel has no io_uring (io_uring_setup: ENOSYS): ringkv needs Linux 5.8 or newer with \
                 CONFIG_IO_URING"
                .into())
        }
        Err(libc::EPERM) => Err("io_uring is not permitted here (io_uring_setup: EPERM): check sysctl \
                                 kernel.io_uring_disabled and the seccomp profile of the container or service"
            .into()),
        Err(errno) => Err(format!("cannot create an io_uring: {}", io::Error::from_raw_os_error(errno))),
    }
}

fn kib(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{} KiB", bytes / 1024)
    }
}

fn kernel_release() -> String {
    // SAFETY: uname only writes into the struct we pass; an all-zero
    // utsname is a valid value of it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    // SAFETY: uname NUL-terminates release within the array.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) };
    release.to_string_lossy().into_owned()
}

fn memlock_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(lim.rlim_cur)
}

/// Whether the effective capabilities (`CapEff` in /proc/self/status) hold CAP_IPC_LOCK.
fn has_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim);
    caps.and_then(|hex| u64::from_str_radix(hex, 16).ok()).is_some_and(|c| c & (1 << CAP_IPC_LOCK) != 0)
}

/// Creates a one-entry io_uring and closes it: the errno says whether the
/// kernel has io_uring and lets this process use it.
fn probe_io_uring() -> Result<(), i32> {
    // struct io_uring_params is 120 bytes; all zero asks for defaults (the
    // kernel refuses non-zero reserved fields).
    let mut params = [0u64; 15];
    // SAFETY: io_uring_setup reads and writes only the params we pass,
    // which is as large as the kernel's struct io_uring_params.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO));
    }
    // SAFETY: fd is the ring we just created and nothing else owns it.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host { kernel_release: "6.1.0-18-amd64".into(), memlock_bytes: None, ipc_lock: false, io_uring: Ok(()) }
    }

    #[test]
    fn a_suitable_host_passes_without_warnings() {
        assert_eq!(check(&host(), 8), Ok(vec![]));
        assert_eq!(check(&Host { kernel_release: "5.8.0".into(), ..host() }, 1), Ok(vec![]));
    }

    #[test]
    fn an_old_kernel_is_refused_with_the_version_it_needs() {
        let e = check(&Host { kernel_release: "5.4.0-150-generic".into(), ..host() }, 1).unwrap_err();
        assert_eq!(
            e,
            "Linux 5.4 is too old: ringkv needs 5.8 or newer for io_uring (kernel release \"5.4.0-150-generic\")"
        );
        assert!(check_kernel("4.19.0").is_err());
        assert!(check_kernel("10.0").is_ok());
        assert!(check_kernel("unknown").is_ok(), "an unreadable release is left to the io_uring probe");
    }

    #[test]
    fn a_memlock_limit_below_what_glommio_accepts_is_refused() {
        let e = check(&Host { memlock_bytes: Some(64 << 10), ..host() }, 1).unwrap_err();
        assert!(e.starts_with("the memlock limit (RLIMIT_MEMLOCK) is 64 KiB, below the 512 KiB io_uring needs"), "{e}");
        assert!(!e.contains('\n'));
        assert!(check(&Host { memlock_bytes: Some(MIN_MEMLOCK_BYTES), ..host() }, 1).is_ok());
    }

    #[test]
    fn a_limit_too_small_for_the_buffers_only_warns_and_not_with_cap_ipc_lock() {
        let small = Host { memlock_bytes: Some(8 << 20), ..host() };
        let w = check(&small, 2).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("is 8 MiB, below the 60 MiB that 2 shard(s) pin"), "{}", w[0]);
        assert_eq!(check(&Host { ipc_lock: true, ..small }, 2), Ok(vec![]));
    }

    #[test]
    fn io_uring_that_is_missing_or_forbidden_is_named() {
        let e = check(&Host { io_uring: Err(libc::ENOSYS), ..host() }, 1).unwrap_err();
        assert!(e.contains("no io_uring"), "{e}");
        let e = check(&Host { io_uring: Err(libc::EPERM), ..host() }, 1).unwrap_err();
        assert!(e.contains("not permitted") && e.contains("io_uring_disabled"), "{e}");
        let e = check(&Host { io_uring: Err(libc::EMFILE), ..host() }, 1).unwrap_err();
        assert!(e.starts_with("cannot create an io_uring: "), "{e}");
    }

    #[test]
    fn this_host_can_run_the_tests() {
        // The test machines run shards; if this fails, so would every node.
        let h = Host::current();
        assert!(parse_release(&h.kernel_release).is_some(), "{h:?}");
        check(&h, 1).unwrap();
    }
}
