//! Properties of the claim over 1..=64 nodes with mixed weights.

use proptest::prelude::*;
use ringkv_core::ring::{claim, Claimant, Ring};

const Q: u32 = 256;
const N: usize = 3;

fn members(weights: &[u32]) -> Vec<Claimant> {
    weights.iter().enumerate().map(|(i, &w)| Claimant { id: format!("node{i:03}"), weight: w }).collect()
}

fn exact_share(weights: &[u32], i: usize) -> f64 {
    f64::from(Q) * f64::from(weights[i]) / f64::from(weights.iter().sum::<u32>())
}

/// Each node's count is within 10% of its weighted share or one partition,
/// whichever is larger.
fn assert_balanced(r: &Ring, weights: &[u32]) -> Result<(), TestCaseError> {
    let counts = r.counts();
    for (i, _) in weights.iter().enumerate() {
        let id = format!("node{i:03}");
        let c = counts.get(id.as_str()).copied().unwrap_or(0) as f64;
        let share = exact_share(weights, i);
        let bound = (0.1 * share).max(1.0);
        prop_assert!((c - share).abs() <= bound, "{id}: {c} partitions for a share of {share:.2}");
    }
    Ok(())
}

fn assert_preference_lists(r: &Ring, nodes: usize) -> Result<(), TestCaseError> {
    for p in 0..Q {
        let list = r.preference_list(p, N);
        prop_assert_eq!(list.len(), N.min(nodes), "partition {} has {:?}", p, list);
        let mut dedup = list.clone();
        dedup.sort();
        dedup.dedup();
        prop_assert_eq!(dedup.len(), list.len());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn claims_are_balanced_with_distinct_replicas(weights in proptest::collection::vec(1u32..=8, 1..=64)) {
        let r = claim(None, &members(&weights), Q, N);
        assert_preference_lists(&r, weights.len())?;
        assert_balanced(&r, &weights)?;
    }

    #[test]
    fn adding_a_node_moves_at_most_1_1x_its_ideal_share(
        weights in proptest::collection::vec(1u32..=8, 1..=63),
        new_weight in 1u32..=8,
    ) {
        let before = claim(None, &members(&weights), Q, N);
        let mut grown = weights.clone();
        grown.push(new_weight);
        let after = claim(Some(&before), &members(&grown), Q, N);
        assert_preference_lists(&after, grown.len())?;
        assert_balanced(&after, &grown)?;
        let ideal = exact_share(&grown, grown.len() - 1);
        let moved = after.moved_from(&before) as f64;
        // Whole partitions: a share under one still needs one partition.
        prop_assert!(moved <= (1.1 * ideal).max(ideal.ceil() + 1.0), "moved {moved} for an ideal {ideal:.2}");
    }

    #[test]
    fn removing_a_node_moves_only_its_partitions(weights in proptest::collection::vec(1u32..=8, 2..=64), pick in any::<prop::sample::Index>()) {
        let all = members(&weights);
        let before = claim(None, &all, Q, N);
        let gone = pick.index(all.len());
        let rest: Vec<Claimant> = all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, m)| m.clone()).collect();
        let after = claim(Some(&before), &rest, Q, N);
        let owned = before.counts().get(all[gone].id.as_str()).copied().unwrap_or(0);
        prop_assert!(!after.contains(&all[gone].id));
        // Its partitions move; rounding may shift a few more between others,
        // and mending the spacing may cost up to 10% more.
        let minimum = owned + rest.len().min(owned + 1);
        prop_assert!(after.moved_from(&before) <= minimum + minimum / 10, "moved {} for {} owned", after.moved_from(&before), owned);
        assert_preference_lists(&after, rest.len())?;
    }

    /// Equal nodes added one at a time (as an operator adds servers) each
    /// replicate about N/n of the ring: spacing repair keeps the data
    /// balanced, not just ownership. (With unequal weights a heavy node must
    /// sit in most windows of N, so N times its share is not the target.)
    #[test]
    fn equal_nodes_added_one_by_one_replicate_equal_shares(n in 3usize..=24) {
        let weights = vec![1u32; n];
        let mut ring = claim(None, &members(&weights[..1]), Q, N);
        for k in 2..=n {
            ring = claim(Some(&ring), &members(&weights[..k]), Q, N);
        }
        let ideal = f64::from(Q) * N as f64 / n as f64;
        for i in 0..n {
            let held = ring.replicated_by(&format!("node{i:03}"), N).len() as f64;
            prop_assert!((held - ideal).abs() <= (0.1 * ideal).max(3.0), "node{i:03} replicates {held}, ideal {ideal:.1}");
        }
    }

    #[test]
    fn reclaiming_the_same_members_moves_nothing(weights in proptest::collection::vec(1u32..=8, 1..=64)) {
        let m = members(&weights);
        let r = claim(None, &m, Q, N);
        prop_assert_eq!(claim(Some(&r), &m, Q, N).moved_from(&r), 0);
    }
}

/// Not an assertion: the figures the closing note quotes, printed with
/// `cargo test -p ringkv-core --test ring_props -- --nocapture figures`.
#[test]
fn figures() {
    let mut worst_balance: f64 = 0.0;
    let mut worst_move: f64 = 0.0;
    let mut violations = 0;
    let mut partitions = 0;
    for n in 1..=64usize {
        let weights: Vec<u32> = (0..n).map(|i| 1 + (i as u32 * 7 + 3) % 4).collect();
        let r = claim(None, &members(&weights), Q, N);
        for (i, _) in weights.iter().enumerate() {
            let c = r.counts().get(format!("node{i:03}").as_str()).copied().unwrap_or(0) as f64;
            let share = exact_share(&weights, i);
            worst_balance = worst_balance.max((c - share).abs() / share);
        }
        violations += r.spacing_violations(N);
        partitions += Q as usize;
        let mut grown = weights.clone();
        grown.push(2);
        let after = claim(Some(&r), &members(&grown), Q, N);
        let ideal = exact_share(&grown, n);
        worst_move = worst_move.max(after.moved_from(&r) as f64 / ideal);
    }
    println!(
        "ring figures (Q={Q}, N={N}, 1..=64 nodes, weights 1..4): worst |count-share|/share {:.3}, \
         worst join movement {:.2}x ideal, spacing violations {violations} of {partitions} partitions",
        worst_balance, worst_move
    );
}
