//! The node's significant events, as one structured log line each.
//!
//! The gossip agent calls in after every gossip round ([`Seen::membership`]:
//! members up or down with the phi that decided it, state changes such as
//! joining to up, ring changes) and after every load refresh
//! ([`Seen::background`]: hints delivered, keys repaired, partitions handed
//! off and what is left to stream, a disk nearly full). Each call compares
//! with what the previous one saw, so an event is logged once, when it
//! happens. Slow requests are logged where they are answered (the driver).

use crate::shard::ShardSnapshot;
use crate::view::{ClusterView, Route};
use ringkv_core::membership::ClusterState;
use std::collections::BTreeMap;
use std::path::Path;

/// A member's state as operators see it: joining, up, leaving, or left
/// (leaving, out of the ring, and no longer answering).
pub fn member_state(view: &ClusterView, id: &str, r: &Route) -> &'static str {
    let in_ring = view.ring.as_ref().is_some_and(|ring| ring.contains(id));
    match r.status {
        ringkv_core::membership::Status::Leaving if !in_ring && !view.alive(id) => "left",
        ringkv_core::membership::Status::Leaving => "leaving",
        ringkv_core::membership::Status::Up => "up",
        ringkv_core::membership::Status::Joining => "joining",
    }
}

/// Free space under which the disk counts as nearly full.
const DISK_LOW_SHARE: f64 = 0.10;
/// How often a nearly full disk is logged again, in refreshes (2 s each).
const DISK_WARN_EVERY: u64 = 30;

#[derive(Default)]
pub struct Seen {
    alive: BTreeMap<String, bool>,
    status: BTreeMap<String, String>,
    ring_version: u64,
    totals: Option<Totals>,
    refreshes: u64,
}

#[derive(Default, Clone, Copy)]
struct Totals {
    /// Members hints are being delivered to, over all shards.
    delivering: usize,
    hints_delivered: u64,
    keys_repaired: u64,
    handed_off: u64,
    stream_bytes: u64,
    purged: u64,
}

impl Seen {
    /// After a gossip round: who came up or went down, state changes, and a
    /// new ring.
    pub fn membership(&mut self, state: &ClusterState, alive: impl Fn(&str) -> bool, phi: impl Fn(&str) -> f64) {
        for id in state.members.keys() {
            let now_alive = alive(id);
            match self.alive.insert(id.clone(), now_alive) {
                Some(was) if was != now_alive => {
                    if now_alive {
                        tracing::info!(member = %id, "member up");
                    } else {
                        tracing::warn!(member = %id, phi = phi(id), "member down: no heartbeat for longer than the detector allows");
                    }
                }
                _ => {}
            }
            let status = state.status(id).map(|s| s.to_string()).unwrap_or_default();
            if let Some(was) = self.status.insert(id.clone(), status.clone()) {
                if was != status {
                    tracing::info!(member = %id, from = %was, to = %status, "member state changed");
                }
            }
        }
        if let Some(ring) = &state.ring {
            if ring.version != self.ring_version {
                let members: Vec<String> = ring.members().iter().map(|c| format!("{}:{}", c.id, c.weight)).collect();
                if self.ring_version != 0 {
                    tracing::info!(version = ring.version, members = %members.join(","), "ring changed");
                }
                self.ring_version = ring.version;
            }
        }
    }

    /// After a load refresh: background work since the last one.
    pub fn background(&mut self, stats: &[ShardSnapshot], data_dir: &Path) {
        self.refreshes += 1;
        let now = Totals {
            delivering: stats.iter().map(|s| s.delivering).sum(),
            hints_delivered: stats.iter().map(|s| s.hinted.delivered).sum(),
            keys_repaired: stats.iter().map(|s| s.repaired.keys_repaired).sum(),
            handed_off: stats.iter().map(|s| s.streamed.partitions_handed_off).sum(),
            stream_bytes: stats.iter().map(|s| s.streamed.bytes_sent).sum(),
            purged: stats.iter().map(|s| s.repaired.tombstones_purged).sum(),
        };
        let pending_hints: u64 = stats.iter().map(|s| s.store.hints).sum();
        let to_stream: u32 = stats.iter().map(|s| s.stream.partitions).sum();
        let bytes_left: u64 = stats.iter().map(|s| s.stream.bytes_left).sum();
        if let Some(before) = self.totals {
            if now.delivering > 0 && before.delivering == 0 {
                tracing::info!(to_members = now.delivering, pending = pending_hints, "hint delivery started");
            }
            if now.delivering == 0 && before.delivering > 0 {
                tracing::info!(pending = pending_hints, "hint delivery finished");
            }
            if now.hints_delivered > before.hints_delivered {
                tracing::info!(
                    delivered = now.hints_delivered - before.hints_delivered,
                    pending = pending_hints,
                    "hints delivered to their owners"
                );
            }
            if now.keys_repaired > before.keys_repaired {
                tracing::info!(keys = now.keys_repaired - before.keys_repaired, "anti-entropy repaired keys");
            }
            if now.purged > before.purged {
                tracing::info!(tombstones = now.purged - before.purged, "tombstones purged past their grace");
            }
            if now.handed_off > before.handed_off || now.stream_bytes > before.stream_bytes {
                tracing::info!(
                    handed_off = now.handed_off - before.handed_off,
                    bytes = now.stream_bytes - before.stream_bytes,
                    partitions_left = to_stream,
                    bytes_left,
                    "streaming partitions to their new owners"
                );
            }
        }
        self.totals = Some(now);
        if self.refreshes % DISK_WARN_EVERY == 1 {
            if let Some((free, total)) = disk_space(data_dir) {
                if total > 0 && (free as f64) < DISK_LOW_SHARE * total as f64 {
                    tracing::warn!(free_bytes = free, total_bytes = total, dir = %data_dir.display(), "disk nearly full");
                }
            }
        }
    }
}

/// Free and total bytes of the file system holding `dir`.
fn disk_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we pass; `path` is a
    // valid NUL-terminated string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut s) } != 0 {
        return None;
    }
    let block = s.f_frsize as u64;
    Some((s.f_bavail as u64 * block, s.f_blocks as u64 * block))
}
