//! Ring changes planned before they are made: what a leave, a remove or a
//! new weight would move, between which nodes, how long it would take, and
//! whether it is safe at all.
//!
//! A change is judged against the gossiped [`ClusterState`] and the failure
//! detectors' opinion of who is alive. The new ring is computed with the same
//! [`claim`] the claimant will run once the change is committed, from the
//! same inputs, so the plan shows the moves that will happen (as long as
//! membership does not change in between; committing re-checks).
//!
//! Refused, with nothing changed: an unknown member; a leave or remove that
//! would leave fewer than N members in the ring; a remove of a member that is
//! up (a live node leaves instead, handing its data over itself); a weight of
//! 0 or over [`MAX_WEIGHT`], or the weight it has; any change while another
//! one is still running (a member is leaving, a ring is still to be claimed,
//! or a member still streams partitions) — except that a remove only waits
//! for the ring, since streams may be waiting for the very node it removes.
//!
//! Bytes are estimates: a member gossips its disk use, not the size of each
//! partition, so a partition's size is its holders' average bytes per held
//! partition.

use crate::membership::ClusterState;
use crate::ring::{claim, Ring, MAX_WEIGHT};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// One ring change, as an operator asks for it. Its JSON form is also how a
/// staged change is kept on disk until it is committed or cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Change {
    /// A live member decommissions itself: it streams its partitions to
    /// their new owners, then stops.
    Leave { member: String },
    /// A dead member is taken out: survivors make new replicas of its
    /// partitions from the copies they hold.
    Remove { member: String },
    /// A member's share of the partitions changes.
    Weight { member: String, weight: u32 },
}

impl Change {
    pub fn member(&self) -> &str {
        match self {
            Change::Leave { member } | Change::Remove { member } | Change::Weight { member, .. } => member,
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::Leave { member } => write!(f, "leave {member}"),
            Change::Remove { member } => write!(f, "remove {member}"),
            Change::Weight { member, weight } => write!(f, "weight {member} {weight}"),
        }
    }
}

/// How a new replica gets its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// A replica that loses the partition streams it (handoff).
    Stream,
    /// Anti-entropy from the replicas that keep it (no live member loses
    /// it: the one that does is dead).
    Repair,
}

/// One new replica of one partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Move {
    pub partition: u32,
    pub from: String,
    pub to: String,
    pub via: Via,
    pub bytes: u64,
}

/// What a change would do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub change: Change,
    /// The ring version the plan was computed from.
    pub ring_version: u64,
    pub moves: Vec<Move>,
    pub bytes: u64,
    /// Bytes each member sends and receives.
    pub sends: BTreeMap<String, u64>,
    pub receives: BTreeMap<String, u64>,
    /// Partitions each member owns (first in the preference list) after.
    pub owned_after: BTreeMap<String, usize>,
    /// At the configured stream rate, with every sender streaming at once.
    pub estimate_s: f64,
    pub warnings: Vec<String>,
}

/// Why a change cannot be made; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn refuse<T>(why: String) -> Result<T, Refusal> {
    Err(Refusal(why))
}

/// Why no new change may start now, if one is still running. Only live
/// members' stream figures count: a dead one streams nothing.
pub fn running(state: &ClusterState, alive: &dyn Fn(&str) -> bool) -> Option<String> {
    if let Some(m) =
        state.members.values().find(|m| m.leaving && state.ring.as_ref().is_some_and(|r| r.contains(&m.id)))
    {
        return Some(format!("{} is still leaving (the ring has not been claimed without it yet)", m.id));
    }
    if state.needs_claim() {
        return Some("the ring is still to be claimed for the last membership change".into());
    }
    let streaming: Vec<String> = state
        .members
        .values()
        .filter(|m| m.load.moving_partitions > 0 && alive(&m.id))
        .map(|m| format!("{} ({} partitions)", m.id, m.load.moving_partitions))
        .collect();
    if !streaming.is_empty() {
        return Some(format!("partitions are still streaming from {}", streaming.join(", ")));
    }
    None
}

/// The cluster state as it would be after `change`.
pub fn apply(state: &ClusterState, change: &Change) -> ClusterState {
    let mut after = state.clone();
    if let Some(m) = after.members.get_mut(change.member()) {
        match change {
            Change::Leave { .. } | Change::Remove { .. } => m.leaving = true,
            Change::Weight { weight, .. } => m.weight = *weight,
        }
        m.version += 1;
    }
    after
}

/// Checks `change` and works out what it would move. `alive` is this node's
/// failure detectors' opinion; `stream_bytes_per_sec` one member's stream
/// budget.
pub fn plan(
    state: &ClusterState,
    alive: &dyn Fn(&str) -> bool,
    change: &Change,
    replicas: usize,
    stream_bytes_per_sec: u64,
) -> Result<Plan, Refusal> {
    let id = change.member();
    let Some(member) = state.members.get(id) else {
        let known: Vec<&str> = state.members.keys().map(String::as_str).collect();
        return refuse(format!("no member {id:?} in this cluster (members: {})", known.join(", ")));
    };
    let Some(before) = &state.ring else { return refuse("the cluster has no ring yet".into()) };
    // Streams may be waiting for the very node a remove takes out: only a
    // ring still to claim holds a remove back.
    let blocking = match change {
        Change::Remove { .. } => state.needs_claim().then(|| "the ring is still to be claimed".to_string()),
        _ => running(state, alive),
    };
    if let Some(why) = blocking {
        return refuse(format!("another ring change is still running: {why}; wait for it to finish"));
    }
    let in_ring = state.desired_claimants().len();
    match change {
        Change::Leave { .. } | Change::Remove { .. } if member.leaving => {
            return refuse(format!("{id} is already leaving"));
        }
        Change::Leave { .. } | Change::Remove { .. } if in_ring <= replicas => {
            return refuse(format!(
                "{id} cannot go: the cluster would have {} members but keeps {replicas} copies of every key, \
                 so it needs at least {replicas} (add a node first)",
                in_ring - 1
            ));
        }
        Change::Leave { .. } if !alive(id) => {
            return refuse(format!("{id} is down: a dead node cannot hand its data over, use remove {id}"));
        }
        Change::Remove { .. } if alive(id) => {
            return refuse(format!("{id} is up: remove is for dead nodes; a live node leaves (leave {id})"));
        }
        Change::Weight { weight, .. } if *weight == 0 || *weight > MAX_WEIGHT => {
            return refuse(format!(
                "weight must be between 1 and {MAX_WEIGHT}, got {weight} (to take a node out, make it leave)"
            ));
        }
        Change::Weight { weight, .. } if *weight == member.weight => {
            return refuse(format!("{id} already has weight {weight}"));
        }
        Change::Weight { .. } if !alive(id) => {
            return refuse(format!("{id} is down: its weight can only change while it is up"));
        }
        _ => {}
    }
    let after_state = apply(state, change);
    let after = claim(Some(before), &after_state.desired_claimants(), state.partitions, replicas);
    Ok(moves(state, before, &after, alive, change, replicas, stream_bytes_per_sec))
}

fn partition_bytes(state: &ClusterState, holders: &[&str]) -> u64 {
    let per: Vec<u64> = holders
        .iter()
        .filter_map(|h| state.members.get(*h))
        .filter(|m| !m.pins.is_empty())
        .map(|m| m.load.disk_bytes / m.pins.len() as u64)
        .collect();
    if per.is_empty() {
        0
    } else {
        per.iter().sum::<u64>() / per.len() as u64
    }
}

fn moves(
    state: &ClusterState,
    before: &Ring,
    after: &Ring,
    alive: &dyn Fn(&str) -> bool,
    change: &Change,
    replicas: usize,
    rate: u64,
) -> Plan {
    let gone = match change {
        Change::Remove { member } => Some(member.as_str()),
        _ => None,
    };
    let mut plan = Plan {
        change: change.clone(),
        ring_version: before.version,
        moves: Vec::new(),
        bytes: 0,
        sends: BTreeMap::new(),
        receives: BTreeMap::new(),
        owned_after: after.counts().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        estimate_s: 0.0,
        warnings: Vec::new(),
    };
    let mut lost = Vec::new();
    let mut thin = 0usize;
    for p in 0..state.partitions {
        let old = before.preference_list(p, replicas);
        let new = after.preference_list(p, replicas);
        let live: Vec<&str> = old.iter().copied().filter(|h| Some(*h) != gone && alive(h)).collect();
        if live.is_empty() {
            lost.push(p);
        } else if live.len() < replicas.min(old.len()) {
            thin += 1;
        }
        let old_set: BTreeSet<&str> = old.iter().copied().collect();
        let losing: Vec<&str> = old.iter().copied().filter(|h| !new.contains(h) && alive(h)).collect();
        for to in new.iter().filter(|n| !old_set.contains(*n)) {
            let (from, via) = match losing.first() {
                Some(f) => (*f, Via::Stream),
                None => match live.iter().find(|h| new.contains(h)) {
                    Some(f) => (*f, Via::Repair),
                    None => continue,
                },
            };
            let bytes = partition_bytes(state, &old);
            *plan.sends.entry(from.to_string()).or_default() += bytes;
            *plan.receives.entry(to.to_string()).or_default() += bytes;
            plan.bytes += bytes;
            plan.moves.push(Move { partition: p, from: from.to_string(), to: to.to_string(), via, bytes });
        }
    }
    let busiest = plan.sends.values().copied().max().unwrap_or(0);
    plan.estimate_s = if rate == 0 { 0.0 } else { busiest as f64 / rate as f64 };
    if !lost.is_empty() {
        let shown: Vec<String> = lost.iter().take(8).map(u32::to_string).collect();
        plan.warnings.push(format!(
            "{} partitions have no live copy (partitions {}{}): their keys come back only with a node that holds them",
            lost.len(),
            shown.join(", "),
            if lost.len() > 8 { ", ..." } else { "" }
        ));
    }
    if thin > 0 {
        plan.warnings.push(format!(
            "{thin} partitions have fewer than {replicas} live copies until their new replicas are filled"
        ));
    }
    if plan.moves.iter().any(|m| m.via == Via::Repair) {
        plan.warnings.push(
            "partitions of a dead member are restored by anti-entropy from the survivors: run `ringkv repair` \
             to start at once rather than at the next round"
                .into(),
        );
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{Load, Member};
    use crate::ring::Claimant;

    const Q: u32 = 64;

    fn state(ids: &[&str]) -> ClusterState {
        let mut s = ClusterState::new("c", Q);
        let claimants: Vec<Claimant> = ids.iter().map(|i| Claimant { id: i.to_string(), weight: 1 }).collect();
        let ring = claim(None, &claimants, Q, 3);
        for (i, id) in ids.iter().enumerate() {
            let pins = ring.replicated_by(id, 3).into_iter().map(|p| (p, 0)).collect();
            let m = Member {
                heartbeat: 1,
                version: 1,
                pins,
                load: Load { disk_bytes: 64 << 20, ..Load::default() },
                ..Member::new(id, &format!("127.0.0.{}:7070", i + 1), 1, 1)
            };
            s.members.insert(id.to_string(), m);
        }
        s.ring = Some(ring);
        s
    }

    fn all_up(_: &str) -> bool {
        true
    }

    #[test]
    fn a_leave_moves_only_the_leavers_partitions_to_the_others() {
        let s = state(&["a", "b", "c", "d"]);
        let p = plan(&s, &all_up, &Change::Leave { member: "d".into() }, 3, 1 << 20).unwrap();
        let held_by_d = s.ring.as_ref().unwrap().replicated_by("d", 3).len();
        assert_eq!(p.moves.len(), held_by_d, "one new replica per partition d held");
        assert!(p.moves.iter().all(|m| m.from == "d" && m.to != "d" && m.via == Via::Stream));
        assert!(!p.owned_after.contains_key("d"));
        // d holds 64 MiB over its partitions, all of which it sends.
        assert_eq!(p.sends["d"], p.bytes);
        assert!((p.estimate_s - p.bytes as f64 / (1 << 20) as f64).abs() < 1e-9);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn a_removal_is_restored_from_survivors_and_says_so() {
        let s = state(&["a", "b", "c", "d"]);
        let d_down = |id: &str| id != "d";
        let p = plan(&s, &d_down, &Change::Remove { member: "d".into() }, 3, 1 << 20).unwrap();
        assert!(!p.moves.is_empty());
        assert!(p.moves.iter().all(|m| m.via == Via::Repair && m.from != "d" && m.to != "d"));
        assert!(p.warnings.iter().any(|w| w.contains("fewer than 3 live copies")), "{:?}", p.warnings);
    }

    #[test]
    fn a_removal_that_leaves_partitions_without_a_live_copy_warns() {
        let s = state(&["a", "b", "c", "d", "e"]);
        // Three members down: some partitions had all their copies on them.
        let up = |id: &str| id == "a" || id == "b";
        let p = plan(&s, &up, &Change::Remove { member: "e".into() }, 3, 1 << 20).unwrap();
        assert!(p.warnings.iter().any(|w| w.contains("no live copy")), "{:?}", p.warnings);
    }

    #[test]
    fn a_heavier_weight_moves_partitions_to_the_member() {
        let s = state(&["a", "b", "c", "d"]);
        let p = plan(&s, &all_up, &Change::Weight { member: "a".into(), weight: 3 }, 3, 1 << 20).unwrap();
        assert!(p.owned_after["a"] > s.ring.as_ref().unwrap().counts()["a"]);
        assert!(p.moves.iter().any(|m| m.to == "a"));
    }

    #[test]
    fn bad_changes_are_refused_with_the_reason() {
        let s = state(&["a", "b", "c", "d"]);
        let three = state(&["a", "b", "c"]);
        let d_down = |id: &str| id != "d";
        type Case<'a> = (&'a ClusterState, &'a dyn Fn(&str) -> bool, Change, &'a str);
        let cases: Vec<Case> = vec![
            (&s, &all_up, Change::Leave { member: "zz".into() }, "no member \"zz\""),
            (&three, &all_up, Change::Leave { member: "a".into() }, "needs at least 3"),
            (&three, &|id: &str| id != "c", Change::Remove { member: "c".into() }, "needs at least 3"),
            (&s, &all_up, Change::Remove { member: "d".into() }, "d is up"),
            (&s, &d_down, Change::Leave { member: "d".into() }, "use remove d"),
            (&s, &all_up, Change::Weight { member: "a".into(), weight: 0 }, "between 1 and"),
            (&s, &all_up, Change::Weight { member: "a".into(), weight: MAX_WEIGHT + 1 }, "between 1 and"),
            (&s, &all_up, Change::Weight { member: "a".into(), weight: 1 }, "already has weight 1"),
        ];
        for (st, alive, change, why) in cases {
            let e = plan(st, alive, &change, 3, 1).unwrap_err();
            assert!(e.0.contains(why), "{change}: {e}");
        }
    }

    #[test]
    fn no_second_change_while_one_is_running() {
        let s = state(&["a", "b", "c", "d", "e"]);
        let leaving = apply(&s, &Change::Leave { member: "e".into() });
        let e = plan(&leaving, &all_up, &Change::Leave { member: "d".into() }, 3, 1).unwrap_err();
        assert!(e.0.contains("still running"), "{e}");
        let mut streaming = s.clone();
        streaming.members.get_mut("b").unwrap().load.moving_partitions = 2;
        let e = plan(&streaming, &all_up, &Change::Weight { member: "a".into(), weight: 2 }, 3, 1).unwrap_err();
        assert!(e.0.contains("streaming from b (2 partitions)"), "{e}");
    }

    #[test]
    fn the_plan_shows_the_ring_the_claimant_will_compute() {
        let s = state(&["a", "b", "c", "d"]);
        let change = Change::Leave { member: "b".into() };
        let p = plan(&s, &all_up, &change, 3, 1).unwrap();
        let after = apply(&s, &change);
        let ring = claim(s.ring.as_ref(), &after.desired_claimants(), Q, 3);
        let owned: BTreeMap<String, usize> = ring.counts().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        assert_eq!(p.owned_after, owned);
    }
}
