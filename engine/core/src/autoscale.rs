//! The autoscale policy: from the gossiped load and the ring to one of add
//! nodes, remove a node, or hold, each with the figures that decided it.
//!
//! Modelled on Kubernetes' horizontal pod autoscaler, whose behaviour
//! operators know: the wanted size is `ceil(nodes * utilisation / target)`,
//! ratios within `tolerance` of 1 hold, and the wanted sizes of a recent
//! window are *stabilised*: a scale-out takes the smallest wanted size of the
//! last `scale_out_window_ms` (the load must be high for the whole window), a
//! scale-in the largest of the last `scale_in_window_ms` (it must be low for
//! the whole, longer, window). Because a scale-in only happens when the
//! remaining nodes would still be at or under the target, the next reading
//! does not ask for the node back: the policy does not undo its own moves.
//!
//! Further rules, each with a test:
//! - never fewer than `max(min_nodes, replicas)` serving nodes, never more
//!   than `max_nodes`;
//! - nodes already provisioned but not yet in the ring count as capacity,
//!   so a slow join is not answered with more nodes;
//! - no decision while a ring change is still running (a member leaving,
//!   partitions streaming, a ring to claim);
//! - after each change, nothing for `cooldown_ms`;
//! - a scale-out adds what is wanted (fast), a scale-in removes one node
//!   (slow), the least busy of those the controller may remove.
//!
//! Pure: time is the observation's `now_ms`; the caller acts and reports.

use serde::Serialize;
use std::collections::VecDeque;
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub struct AutoscaleConfig {
    /// The busy share of the shards the cluster should run at (0..1).
    pub target_cpu: f64,
    /// Ratios of utilisation to target within this of 1 hold.
    pub tolerance: f64,
    /// When set, a mean p99 above this asks for one more node whatever the
    /// CPU says.
    pub max_p99_us: Option<u64>,
    pub scale_out_window_ms: u64,
    pub scale_in_window_ms: u64,
    pub cooldown_ms: u64,
    pub min_nodes: usize,
    pub max_nodes: usize,
    /// N: the cluster never shrinks below it.
    pub replicas: usize,
}

impl Default for AutoscaleConfig {
    fn default() -> Self {
        AutoscaleConfig {
            target_cpu: 0.6,
            tolerance: 0.1,
            max_p99_us: None,
            scale_out_window_ms: 60_000,
            scale_in_window_ms: 300_000,
            cooldown_ms: 300_000,
            min_nodes: 3,
            max_nodes: 16,
            replicas: 3,
        }
    }
}

impl AutoscaleConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.target_cpu > 0.0 && self.target_cpu < 1.0) {
            return Err(format!("the target CPU share must be between 0 and 1, got {}", self.target_cpu));
        }
        if !(0.0..1.0).contains(&self.tolerance) {
            return Err(format!("the tolerance must be in [0, 1), got {}", self.tolerance));
        }
        if self.max_nodes < self.floor() {
            return Err(format!(
                "max nodes ({}) is below the minimum ({}: min nodes and N, whichever is larger)",
                self.max_nodes,
                self.floor()
            ));
        }
        Ok(())
    }

    fn floor(&self) -> usize {
        self.min_nodes.max(self.replicas)
    }
}

/// One member's figures, as gossiped.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberLoad {
    pub id: String,
    /// Busy share of its shards, 0..=1.
    pub cpu: f64,
    pub ops_per_sec: u64,
    pub p99_us: u64,
    /// In the ring, not leaving, and alive: it serves.
    pub serving: bool,
}

/// What the policy sees at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub now_ms: u64,
    pub members: Vec<MemberLoad>,
    /// Nodes started but not serving yet.
    pub pending: usize,
    /// Why a ring change is still running, if one is.
    pub running: Option<String>,
    /// Members the controller may remove (the ones it manages); empty: any.
    pub removable: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "decision", rename_all = "lowercase")]
pub enum Decision {
    Hold { reason: String },
    Add { count: usize, reason: String },
    Remove { member: String, reason: String },
}

impl Decision {
    pub fn reason(&self) -> &str {
        match self {
            Decision::Hold { reason } | Decision::Add { reason, .. } | Decision::Remove { reason, .. } => reason,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Hold { reason } => write!(f, "hold: {reason}"),
            Decision::Add { count, reason } => write!(f, "add {count}: {reason}"),
            Decision::Remove { member, reason } => write!(f, "remove {member}: {reason}"),
        }
    }
}

pub struct Policy {
    cfg: AutoscaleConfig,
    /// (time, wanted size) of recent readings, oldest first.
    wanted: VecDeque<(u64, usize)>,
    last_change_ms: Option<u64>,
}

impl Policy {
    pub fn new(cfg: AutoscaleConfig) -> Policy {
        Policy { cfg, wanted: VecDeque::new(), last_change_ms: None }
    }

    pub fn config(&self) -> &AutoscaleConfig {
        &self.cfg
    }

    /// Tells the policy a change was made at `now_ms` (by it or anyone):
    /// the cool-down starts and the old readings no longer count.
    pub fn changed(&mut self, now_ms: u64) {
        self.last_change_ms = Some(now_ms);
        self.wanted.clear();
    }

    /// The decision for `obs`. An add or remove counts as made: the caller
    /// carries it out (and retries it) or calls [`Policy::changed`] later.
    pub fn decide(&mut self, obs: &Observation) -> Decision {
        let serving: Vec<&MemberLoad> = obs.members.iter().filter(|m| m.serving).collect();
        let n = serving.len();
        if n == 0 {
            return hold("no member is serving".into());
        }
        let cpu = serving.iter().map(|m| m.cpu).sum::<f64>() / n as f64;
        let p99 = serving.iter().map(|m| m.p99_us).sum::<u64>() / n as u64;
        let ratio = cpu / self.cfg.target_cpu;
        let mut want = if (ratio - 1.0).abs() <= self.cfg.tolerance { n } else { (n as f64 * ratio).ceil() as usize };
        let slow = self.cfg.max_p99_us.is_some_and(|max| p99 > max);
        if slow {
            want = want.max(n + 1);
        }
        let want = want.clamp(self.cfg.floor(), self.cfg.max_nodes);
        let now = obs.now_ms;
        self.wanted.push_back((now, want));
        let keep = self.cfg.scale_out_window_ms.max(self.cfg.scale_in_window_ms);
        // Keep one reading at or before the window's start, so a window is
        // known to be covered whatever the spacing of readings.
        while self.wanted.get(1).is_some_and(|&(t, _)| t + keep <= now) {
            self.wanted.pop_front();
        }
        let figures = format!(
            "mean CPU {:.0}% over {n} serving nodes against a target of {:.0}% (ratio {ratio:.2}), mean p99 {p99} µs",
            cpu * 100.0,
            self.cfg.target_cpu * 100.0
        );
        if let Some(why) = &obs.running {
            return hold(format!("{figures}; a ring change is still running: {why}"));
        }
        if let Some(at) = self.last_change_ms {
            if now < at + self.cfg.cooldown_ms {
                return hold(format!(
                    "{figures}; cooling down for {} s after the last change",
                    (at + self.cfg.cooldown_ms - now) / 1000
                ));
            }
        }
        let capacity = n + obs.pending;
        if let Some(out) = self.stable(now, self.cfg.scale_out_window_ms, true) {
            if out > capacity {
                let count = out - capacity;
                self.changed(now);
                let cause = if slow && out == n + 1 { "p99 over its limit" } else { "load over the target" };
                return Decision::Add {
                    count,
                    reason: format!(
                        "{figures}; {cause} for {} s: {out} nodes wanted, {n} serving, {} on their way",
                        self.cfg.scale_out_window_ms / 1000,
                        obs.pending
                    ),
                };
            }
            if out > n {
                return hold(format!("{figures}; {out} nodes wanted and {capacity} serving or on their way"));
            }
        }
        if let Some(inn) = self.stable(now, self.cfg.scale_in_window_ms, false) {
            if inn < n && obs.pending == 0 {
                let candidates: Vec<&&MemberLoad> =
                    serving.iter().filter(|m| obs.removable.is_empty() || obs.removable.contains(&m.id)).collect();
                // The least busy goes; of equals, the newest name.
                let pick = candidates.iter().min_by(|a, b| a.ops_per_sec.cmp(&b.ops_per_sec).then(b.id.cmp(&a.id)));
                if let Some(m) = pick {
                    let member = m.id.clone();
                    self.changed(now);
                    return Decision::Remove {
                        reason: format!(
                            "{figures}; under the target for {} s: {inn} nodes would do, removing the least busy",
                            self.cfg.scale_in_window_ms / 1000
                        ),
                        member,
                    };
                }
                return hold(format!("{figures}; {inn} nodes would do, but no member may be removed"));
            }
        }
        hold(format!("{figures}; {n} nodes are right"))
    }

    /// The stabilised wanted size over the last `window_ms`: the smallest
    /// (`out`) or largest reading, once readings cover the whole window.
    fn stable(&self, now: u64, window_ms: u64, out: bool) -> Option<usize> {
        let first = self.wanted.front()?.0;
        if now < first + window_ms {
            return None;
        }
        let recent = self.wanted.iter().filter(|&&(t, _)| t + window_ms >= now).map(|&(_, w)| w);
        if out {
            recent.min()
        } else {
            recent.max()
        }
    }
}

fn hold(reason: String) -> Decision {
    Decision::Hold { reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AutoscaleConfig {
        AutoscaleConfig {
            scale_out_window_ms: 30_000,
            scale_in_window_ms: 120_000,
            cooldown_ms: 60_000,
            max_nodes: 8,
            ..AutoscaleConfig::default()
        }
    }

    fn obs(now_s: u64, cpus: &[f64]) -> Observation {
        Observation {
            now_ms: now_s * 1000,
            members: cpus
                .iter()
                .enumerate()
                .map(|(i, &cpu)| MemberLoad {
                    id: format!("n{}", i + 1),
                    cpu,
                    ops_per_sec: 1000 + i as u64,
                    p99_us: 500,
                    serving: true,
                })
                .collect(),
            pending: 0,
            running: None,
            removable: vec![],
        }
    }

    /// Feeds one reading every 5 s from `from_s` to `to_s` (inclusive) and
    /// returns the decisions that were not holds, with their times.
    fn run(p: &mut Policy, from_s: u64, to_s: u64, cpus: &[f64]) -> Vec<(u64, Decision)> {
        (from_s..=to_s)
            .step_by(5)
            .map(|t| (t, p.decide(&obs(t, cpus))))
            .filter(|(_, d)| !matches!(d, Decision::Hold { .. }))
            .collect()
    }

    #[test]
    fn load_within_the_tolerance_holds() {
        let mut p = Policy::new(cfg());
        assert!(run(&mut p, 0, 600, &[0.63, 0.58, 0.65]).is_empty(), "ratio 1.03: within 10%");
    }

    #[test]
    fn sustained_high_load_scales_out_by_what_is_wanted_and_a_spike_does_not() {
        let mut p = Policy::new(cfg());
        // A 20 s spike in a 30 s window: nothing.
        assert!(run(&mut p, 0, 60, &[0.6, 0.6, 0.6]).is_empty());
        assert!(run(&mut p, 65, 85, &[0.95, 0.95, 0.95]).is_empty());
        assert!(run(&mut p, 90, 200, &[0.6, 0.6, 0.6]).is_empty());
        // 90% for the whole window: ceil(3 * 1.5) = 5, so add 2, once
        // within the cool-down.
        let out = run(&mut p, 205, 290, &[0.9, 0.9, 0.9]);
        assert_eq!(out.len(), 1, "{out:?}");
        let (t, Decision::Add { count, reason }) = &out[0] else { panic!("{out:?}") };
        assert_eq!((*t, *count), (235, 2), "{reason}");
        assert!(reason.contains("mean CPU 90%") && reason.contains("5 nodes wanted"), "{reason}");
    }

    #[test]
    fn scale_in_waits_for_the_long_window_and_removes_one_node_at_a_time() {
        let mut p = Policy::new(cfg());
        let quiet = [0.1, 0.1, 0.1, 0.1, 0.1];
        let out = run(&mut p, 0, 125, &quiet);
        assert_eq!(out.len(), 1, "{out:?}");
        let (t, Decision::Remove { member, reason }) = &out[0] else { panic!("{out:?}") };
        assert_eq!(*t, 120, "only after 120 s below: {reason}");
        assert_eq!(member, "n1", "the least busy");
        // The cool-down then holds everything for 60 s.
        assert!(run(&mut p, 130, 175, &quiet[..4]).is_empty());
    }

    #[test]
    fn never_below_n_or_the_minimum_and_never_above_the_maximum() {
        let mut p = Policy::new(AutoscaleConfig { min_nodes: 1, ..cfg() });
        assert!(run(&mut p, 0, 1000, &[0.01, 0.01, 0.01]).is_empty(), "three nodes for N=3, however quiet");
        let mut p = Policy::new(cfg());
        let out = run(&mut p, 0, 40, &[1.0; 7]);
        assert!(matches!(out[..], [(_, Decision::Add { count: 1, .. })]), "12 wanted, 8 at most: {out:?}");
        p.changed(0);
        assert!(run(&mut p, 100, 400, &[1.0; 8]).is_empty(), "at the maximum");
    }

    #[test]
    fn nodes_on_their_way_count_and_running_changes_hold() {
        let mut p = Policy::new(cfg());
        for t in (0..=30).step_by(5) {
            let mut o = obs(t, &[0.9, 0.9, 0.9]);
            o.pending = 2;
            let d = p.decide(&o);
            assert!(matches!(d, Decision::Hold { .. }), "5 wanted, 3 serving + 2 joining: {d}");
        }
        let mut p = Policy::new(cfg());
        for t in (0..=60).step_by(5) {
            let mut o = obs(t, &[0.95, 0.95, 0.95]);
            o.running = Some("n4 is still leaving".into());
            let d = p.decide(&o);
            assert!(d.reason().contains("still running"), "{d}");
        }
    }

    #[test]
    fn only_removable_members_are_removed() {
        let mut p = Policy::new(cfg());
        let mut first = None;
        for t in (0..=125).step_by(5) {
            let mut o = obs(t, &[0.1, 0.1, 0.1, 0.1]);
            o.removable = vec!["n3".into()];
            match p.decide(&o) {
                Decision::Hold { .. } => {}
                d => first = first.or(Some(d)),
            }
        }
        assert!(matches!(first, Some(Decision::Remove { ref member, .. }) if member == "n3"), "{first:?}");
    }

    #[test]
    fn a_slow_tail_adds_a_node_whatever_the_cpu() {
        let mut p = Policy::new(AutoscaleConfig { max_p99_us: Some(2_000), ..cfg() });
        let mut adds = vec![];
        for t in (0..=40).step_by(5) {
            let mut o = obs(t, &[0.6, 0.6, 0.6]);
            o.members.iter_mut().for_each(|m| m.p99_us = 9_000);
            if let d @ Decision::Add { .. } = p.decide(&o) {
                adds.push(d);
            }
        }
        assert!(matches!(&adds[..], [Decision::Add { count: 1, reason }] if reason.contains("p99")), "{adds:?}");
    }

    /// Load over time in, decisions out: an oscillating load never makes two
    /// changes within a cool-down, and a scale-in is not undone by the next
    /// readings (the remaining nodes are under the target).
    #[test]
    fn traces() {
        struct Step {
            from_s: u64,
            to_s: u64,
            /// Total CPU demand in node-shares, spread over the nodes.
            demand: f64,
        }
        let cases: &[(&str, &[Step], &[&str])] = &[
            (
                "ramp up then quiet",
                &[
                    Step { from_s: 0, to_s: 100, demand: 1.8 },
                    Step { from_s: 105, to_s: 200, demand: 3.0 },
                    Step { from_s: 205, to_s: 600, demand: 0.9 },
                ],
                &["add 2", "remove", "remove"],
            ),
            (
                "oscillating every 20 s",
                &[
                    Step { from_s: 0, to_s: 20, demand: 3.0 },
                    Step { from_s: 25, to_s: 40, demand: 0.6 },
                    Step { from_s: 45, to_s: 60, demand: 3.0 },
                    Step { from_s: 65, to_s: 80, demand: 0.6 },
                    Step { from_s: 85, to_s: 100, demand: 3.0 },
                    Step { from_s: 105, to_s: 120, demand: 0.6 },
                ],
                &[],
            ),
            (
                "high and low for 40 s each, longer than the scale-out window",
                &[
                    Step { from_s: 0, to_s: 40, demand: 2.4 },
                    Step { from_s: 45, to_s: 80, demand: 1.2 },
                    Step { from_s: 85, to_s: 120, demand: 2.4 },
                    Step { from_s: 125, to_s: 160, demand: 1.2 },
                    Step { from_s: 165, to_s: 200, demand: 2.4 },
                    Step { from_s: 205, to_s: 240, demand: 1.2 },
                    Step { from_s: 245, to_s: 280, demand: 2.4 },
                ],
                // One node for the peaks, kept through the troughs.
                &["add 1"],
            ),
        ];
        for (name, steps, want) in cases {
            let mut p = Policy::new(cfg());
            let mut nodes = 3usize;
            let mut got: Vec<(u64, String)> = vec![];
            for s in steps.iter() {
                for t in (s.from_s..=s.to_s).step_by(5) {
                    let per = (s.demand / nodes as f64).min(1.0);
                    match p.decide(&obs(t, &vec![per; nodes])) {
                        Decision::Add { count, .. } => {
                            nodes += count;
                            got.push((t, format!("add {count}")));
                        }
                        Decision::Remove { .. } => {
                            nodes -= 1;
                            got.push((t, "remove".into()));
                        }
                        Decision::Hold { .. } => {}
                    }
                }
            }
            let kinds: Vec<&str> = got.iter().map(|(_, k)| k.as_str()).collect();
            assert_eq!(&kinds, want, "{name}: {got:?}");
            for w in got.windows(2) {
                assert!(w[1].0 - w[0].0 >= 60, "{name}: two changes within the cool-down: {got:?}");
            }
            assert!(nodes >= 3, "{name}");
        }
    }

    #[test]
    fn readings_that_do_not_fall_on_the_window_edges_still_cover_it() {
        let mut p = Policy::new(cfg());
        let mut removed_at = None;
        // Every 2.1 s, as a real controller's clock drifts.
        for i in 0..100u64 {
            let t = i * 2_100;
            let mut o = obs(0, &[0.05, 0.05, 0.05, 0.05]);
            o.now_ms = t;
            if let Decision::Remove { .. } = p.decide(&o) {
                removed_at = Some(t);
                break;
            }
        }
        let t = removed_at.expect("a quiet cluster shrinks");
        assert!((120_000..=122_100).contains(&t), "after the 120 s window, at {t}");
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(AutoscaleConfig { target_cpu: 1.5, ..cfg() }.validate().is_err());
        assert!(AutoscaleConfig { max_nodes: 2, ..cfg() }.validate().unwrap_err().contains("below the minimum"));
        cfg().validate().unwrap();
    }
}
