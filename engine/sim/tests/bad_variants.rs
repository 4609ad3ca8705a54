//! The checker can fail: each known-bad variant of the protocols, compiled
//! in for the simulator only (ringkv-core's `bugs` feature), must be caught
//! on some of a few hundred seeds, with the violation that names it.

use ringkv_sim::{run, BadVariants, Options};

/// Runs seeds until one reports the expected violation.
fn caught(bugs: BadVariants, expect: &str) {
    let opts = Options { bugs, ..Options::default() };
    let hit = (0..300).find(|&seed| run(seed, &opts).violations.iter().any(|v| v.contains(expect)));
    assert!(hit.is_some(), "{bugs:?} went unnoticed on 300 seeds (expected a violation saying {expect:?})");
}

#[test]
fn acknowledging_a_durable_write_before_its_sync_is_caught() {
    caught(BadVariants { ack_before_sync: true, ..Default::default() }, "fewer than w");
}

#[test]
fn dropping_a_concurrent_sibling_on_merge_is_caught() {
    caught(BadVariants { drop_siblings: true, ..Default::default() }, "missed the acknowledged");
}

#[test]
fn counting_a_replicas_ack_twice_toward_w_is_caught() {
    caught(BadVariants { count_duplicate_acks: true, ..Default::default() }, "fewer than w");
}

#[test]
fn retiring_a_hint_before_the_owner_synced_it_is_caught() {
    caught(BadVariants { retire_hints_before_ack: true, ..Default::default() }, "durable copies left");
}
