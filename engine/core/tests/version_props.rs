//! Properties of versions: merge is a join (commutative, associative,
//! idempotent); a version dominated by another is never returned; concurrent
//! ones always are; and arbitrary bytes never panic the decoders.

use proptest::prelude::*;
use ringkv_core::version::{Actor, Object, VersionVector};

/// A small causal history: a sequence of writes at a few replicas, each on
/// top of a replica's current state, with some replicas syncing in between.
#[derive(Debug, Clone)]
enum Step {
    /// Replica `at` coordinates a write; `with_context` uses its own state's
    /// context (a read-modify-write), otherwise it is blind.
    Write { at: usize, with_context: bool, delete: bool },
    /// Replica `to` merges replica `from`'s state.
    Sync { from: usize, to: usize },
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        (0..3usize, any::<bool>(), prop::bool::weighted(0.15)).prop_map(|(at, with_context, delete)| Step::Write {
            at,
            with_context,
            delete
        }),
        (0..3usize, 0..3usize).prop_map(|(from, to)| Step::Sync { from, to }),
    ];
    proptest::collection::vec(step, 0..24)
}

/// What one write did: the value it wrote (none for a delete) and the values
/// it superseded: those its writer saw (its context covered them).
struct Written {
    value: Option<Vec<u8>>,
    seen: Vec<Vec<u8>>,
}

/// Runs the steps; returns the replicas' objects and every write.
fn play(steps: &[Step]) -> (Vec<Object>, Vec<Written>) {
    let mut replicas = vec![Object::default(); 3];
    let mut writes = Vec::new();
    for (n, s) in steps.iter().enumerate() {
        match *s {
            Step::Write { at, with_context, delete } => {
                let local = replicas[at].clone();
                let ctx = if with_context { local.context().clone() } else { VersionVector::new() };
                let actor = Actor::new(at as u64 + 1, 0, 1);
                let dot = Object::next_dot(Some(&local), &ctx, actor);
                let value = format!("w{n}").into_bytes();
                let seen: Vec<Vec<u8>> =
                    if with_context { local.values().map(<[u8]>::to_vec).collect() } else { vec![] };
                let value = (!delete).then_some(value);
                replicas[at] = Object::apply_write(Some(&local), &ctx, dot, n as u64, value.clone());
                writes.push(Written { value, seen });
            }
            Step::Sync { from, to } => {
                replicas[to] = replicas[to].merge(&replicas[from]);
            }
        }
    }
    (replicas, writes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn merge_is_commutative_associative_and_idempotent(s in steps()) {
        let (r, _) = play(&s);
        prop_assert_eq!(r[0].merge(&r[1]), r[1].merge(&r[0]));
        prop_assert_eq!(r[0].merge(&r[1]).merge(&r[2]), r[0].merge(&r[1].merge(&r[2])));
        prop_assert_eq!(r[0].merge(&r[0]), r[0].clone());
        for o in &r {
            prop_assert!(o.check_invariants().is_ok());
            prop_assert_eq!(Object::decode(&o.to_bytes()).unwrap(), o.clone());
        }
    }

    #[test]
    fn exactly_the_values_no_write_superseded_survive(s in steps()) {
        let (r, writes) = play(&s);
        let all = r[0].merge(&r[1]).merge(&r[2]);
        let mut live: Vec<Vec<u8>> = all.values().map(<[u8]>::to_vec).collect();
        live.sort();
        // Oracle: a value survives unless some write (a put or a delete) made
        // with a context had it in view. Dominated versions never return;
        // concurrent ones always do.
        let superseded: std::collections::HashSet<&Vec<u8>> = writes.iter().flat_map(|w| &w.seen).collect();
        let mut want: Vec<Vec<u8>> =
            writes.iter().filter_map(|w| w.value.clone()).filter(|v| !superseded.contains(v)).collect();
        want.sort();
        prop_assert_eq!(live, want);
    }

    #[test]
    fn descends_means_merging_changes_nothing(s in steps()) {
        let (r, _) = play(&s);
        for a in &r {
            for b in &r {
                prop_assert_eq!(a.descends(b), a.merge(b) == *a);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = Object::decode(&bytes);
        let _ = VersionVector::decode_context(&bytes);
    }
}
