//! The examples' merges obey the laws a merge needs (commutative,
//! associative, idempotent), checked with the crate's own helpers on
//! values drawn by proptest; and the helpers catch a merge that does not.

use proptest::prelude::*;
use ringkv_client::{check, resolve_siblings, Context, LastWriterWins, Siblings, Timestamped, Value};

#[allow(dead_code)]
#[path = "../examples/shopping_cart.rs"]
mod shopping_cart;

use shopping_cart::{Cart, MergeCarts};

fn cart() -> impl Strategy<Value = Cart> {
    let item = prop::sample::select(vec!["apples", "pears", "figs", "milk"]);
    let adds = prop::collection::vec((item.clone(), 1u32..5), 0..4);
    let removes = prop::collection::vec(item, 0..2);
    (adds, removes).prop_map(|(adds, removes)| {
        let mut c = Cart::default();
        for (i, q) in adds {
            c.add(i, q);
        }
        for i in removes {
            c.remove(i);
        }
        c
    })
}

proptest! {
    #[test]
    fn the_cart_merge_is_commutative_and_idempotent(a in cart(), b in cart()) {
        check::merge_is_commutative(&MergeCarts, &[a.clone(), b.clone()]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check::merge_is_idempotent(&MergeCarts, &[a, b]).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }

    #[test]
    fn a_cart_survives_its_encoding(a in cart()) {
        prop_assert_eq!(Cart::decode(&a.encode()).unwrap(), a);
    }

    /// However the node orders the siblings, the resolved cart is the same,
    /// and it holds every item any sibling added and no removed one.
    #[test]
    fn siblings_resolve_to_the_same_cart_in_any_order(carts in prop::collection::vec(cart(), 1..5)) {
        let encoded: Vec<Vec<u8>> = carts.iter().map(Value::encode).collect();
        let forward = resolve_siblings::<Cart, _>(Siblings::new(encoded.clone(), Context::default()), &MergeCarts).unwrap();
        let mut reversed = encoded;
        reversed.reverse();
        let backward = resolve_siblings::<Cart, _>(Siblings::new(reversed, Context::default()), &MergeCarts).unwrap();
        prop_assert_eq!(&forward.value, &backward.value);
        prop_assert_eq!(forward.needs_write_back, carts.len() > 1);
        let merged = forward.value.unwrap();
        for c in &carts {
            for item in c.items.keys() {
                prop_assert!(merged.items.contains_key(item), "{item} from a sibling was lost");
            }
            for item in &c.removed {
                prop_assert!(merged.visible().iter().all(|(i, _)| i != item), "{item} was removed in a sibling");
            }
        }
    }
}

#[test]
fn the_cart_merge_obeys_every_law_on_a_proptest_strategy() {
    check::merge_laws(&MergeCarts, cart(), 128).unwrap();
    check::merge_laws_hold(&MergeCarts, &shopping_cart::sample_carts()).unwrap();
}

#[test]
fn last_writer_wins_obeys_the_laws_and_a_summing_merge_is_caught() {
    let lww = prop::collection::vec(any::<u8>(), 0..3)
        .prop_flat_map(|v| (0u64..4).prop_map(move |t| Timestamped::at(t, v.clone())));
    check::merge_laws(&LastWriterWins, lww, 128).unwrap();
    // Adding quantities double-counts a sibling merged twice: not idempotent.
    let adding = |a: &Cart, b: &Cart| {
        let mut out = a.clone();
        for (i, q) in &b.items {
            *out.items.entry(i.clone()).or_default() += q;
        }
        out.removed.extend(b.removed.iter().cloned());
        out
    };
    check::merge_is_commutative(&adding, &shopping_cart::sample_carts()).unwrap();
    let e = check::merge_laws(&adding, cart(), 256).unwrap_err();
    assert!(e.contains("idempotent"), "{e}");
}
