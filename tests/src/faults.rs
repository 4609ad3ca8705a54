//! Network partitions between loopback nodes, with real nftables rules.
//!
//! A [`Partition`] installs a table of its own that drops every packet from
//! an address on one side to an address on another, to or from the
//! cluster's ports (so clusters of other tests on the same addresses are
//! untouched); nodes bind their outgoing sockets to their own 127.0.0.x
//! address, so the rules see who talks to whom. Dropping the value (also
//! when a test panics) deletes the table. The nodes never know a test is
//! running.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct Partition {
    table: String,
}

fn nft(args: &[&str]) -> Result<(), String> {
    let out = Command::new("nft")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run nft (Debian package nftables; .ci/run installs it): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("nft {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Partition {
    /// Cuts every link between addresses of different `sides`, for traffic
    /// to or from `ports` (a cluster's shard ports).
    pub fn new(sides: &[&[Ipv4Addr]], ports: std::ops::RangeInclusive<u16>) -> Partition {
        let range = format!("{}-{}", ports.start(), ports.end());
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let table = format!("ringkv_test_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let p = Partition { table };
        nft(&["add", "table", "ip", &p.table]).unwrap_or_else(|e| panic!("{e}"));
        nft(&["add", "chain", "ip", &p.table, "out", "{ type filter hook output priority 0 ; policy accept ; }"])
            .unwrap_or_else(|e| panic!("{e}"));
        for (i, a) in sides.iter().enumerate() {
            for (j, b) in sides.iter().enumerate() {
                if i == j {
                    continue;
                }
                for from in *a {
                    for to in *b {
                        let (f, t) = (from.to_string(), to.to_string());
                        for dir in ["dport", "sport"] {
                            let rule = [
                                "add", "rule", "ip", &p.table, "out", "ip", "saddr", &f, "ip", "daddr", &t, "tcp", dir,
                                &range, "drop",
                            ];
                            nft(&rule).unwrap_or_else(|e| panic!("{e}"));
                        }
                    }
                }
            }
        }
        p
    }

    /// Removes the rules now (dropping the value does the same).
    pub fn heal(self) {}
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = nft(&["delete", "table", "ip", &self.table]);
    }
}

/// 127.0.0.i for node index i (0-based).
pub fn node_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, i as u8 + 1)
}
