//! The scaling goals of docs/SCALING.md, on the pure ring and gossip
//! machines (`ringkv-scaling` prints the full tables).

use ringkv_core::membership::GossipConfig;
use ringkv_sim::scaling::{equal_weights, gossip_study, grow_and_shrink, mixed_weights};

/// 3 -> 100 -> 3 nodes one at a time at Q=4096: no step copies more than
/// 1.1x the data it must, and every node owns its weighted share within 5%.
#[test]
fn growing_to_100_nodes_and_back_moves_at_most_1_1x_the_data_it_must() {
    for (name, weight) in [("mixed", mixed_weights as fn(usize) -> u32), ("equal", equal_weights)] {
        let steps = grow_and_shrink(4096, 3, (3, 100, 1), weight, 7);
        assert_eq!(steps.len(), 2 * 97);
        for s in &steps {
            assert!(s.data_ratio() <= 1.1, "{name} weights, {} -> {}: {s:?}", s.from, s.to);
            assert!(s.worst_share_error <= 0.05, "{name} weights, {} -> {}: {s:?}", s.from, s.to);
        }
    }
}

/// Several nodes at a time, as an autoscaler adds them.
#[test]
fn steps_of_ten_nodes_move_at_most_1_1x_the_data_they_must() {
    for s in grow_and_shrink(4096, 3, (3, 83, 10), equal_weights, 3) {
        assert!(s.data_ratio() <= 1.1, "{} -> {}: {s:?}", s.from, s.to);
        assert!(s.worst_share_error <= 0.05, "{} -> {}: {s:?}", s.from, s.to);
    }
}

/// 200 nodes at Q=4096: a join reaches everyone within 2 log2(n) rounds;
/// a failure is known everywhere within 20 (the detectors' own wait sets
/// that, see docs/SCALING.md), with no live node ever held down; and a
/// steady-state exchange carries a small fraction of the whole state.
#[test]
fn gossip_spreads_a_join_within_2_log2_n_rounds_and_a_failure_without_false_suspicions() {
    let n = 200;
    let f = gossip_study(n, 4096, 33, 11, GossipConfig::default());
    let bound = (2.0 * (n as f64).log2()).floor() as u32;
    assert!(f.join_rounds <= bound && f.join_ring_rounds <= bound, "{f:?}");
    assert!(f.failure_rounds <= 20, "{f:?}");
    assert_eq!(f.false_suspicions, 0, "{f:?}");
    assert!(f.steady_mean_bytes * 5.0 < f.full_state_bytes as f64, "{f:?}");
}
