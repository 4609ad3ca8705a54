//! Property checks for a user's merge, to run in the user's own tests.
//!
//! Replicas and clients merge siblings in whatever order they meet them,
//! and may merge a value with itself (a write retried on another replica
//! lands twice). A merge gives the same answer everywhere only if it is
//!
//! - commutative: `merge(a, b) == merge(b, a)`;
//! - associative: `merge(merge(a, b), c) == merge(a, merge(b, c))`;
//! - idempotent: `merge(a, a) == a`.
//!
//! Each check takes sample values and tries every pair (or triple) of them,
//! returning the first counterexample. Feed it values from a property-test
//! strategy, or with the `proptest` feature use [`merge_laws`], which draws
//! them from a `proptest` strategy itself.
//!
//! ```
//! use ringkv_client::check;
//! let union = |a: &Vec<u8>, b: &Vec<u8>| {
//!     let mut v: Vec<u8> = a.iter().chain(b).copied().collect();
//!     v.sort_unstable();
//!     v.dedup();
//!     v
//! };
//! let samples = vec![vec![], vec![1], vec![1, 2], vec![3]];
//! check::merge_is_commutative(&union, &samples).unwrap();
//! check::merge_is_associative(&union, &samples).unwrap();
//! check::merge_is_idempotent(&union, &samples).unwrap();
//! // Appending is not commutative: the check says so, with the values.
//! let append = |a: &Vec<u8>, b: &Vec<u8>| [a.as_slice(), b.as_slice()].concat();
//! assert!(check::merge_is_commutative(&append, &samples).is_err());
//! ```

use crate::resolve::Resolve;
use std::fmt::Debug;

/// A law the merge broke, and the values that show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counterexample {
    /// Which law.
    pub law: &'static str,
    /// The inputs, as `Debug` shows them.
    pub inputs: Vec<String>,
    /// What the two sides of the law gave.
    pub left: String,
    /// See `left`.
    pub right: String,
}

impl std::fmt::Display for Counterexample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the merge is not {}: for {:?}, {} != {}", self.law, self.inputs, self.left, self.right)
    }
}

impl std::error::Error for Counterexample {}

fn differ<T: Debug>(law: &'static str, inputs: &[&T], left: &T, right: &T) -> Counterexample {
    Counterexample {
        law,
        inputs: inputs.iter().map(|v| format!("{v:?}")).collect(),
        left: format!("{left:?}"),
        right: format!("{right:?}"),
    }
}

/// `merge(a, b) == merge(b, a)` for every pair of `samples`.
pub fn merge_is_commutative<T, R>(resolver: &R, samples: &[T]) -> Result<(), Counterexample>
where
    T: PartialEq + Debug,
    R: Resolve<T> + ?Sized,
{
    for a in samples {
        for b in samples {
            let (ab, ba) = (resolver.merge(a, b), resolver.merge(b, a));
            if ab != ba {
                return Err(differ("commutative", &[a, b], &ab, &ba));
            }
        }
    }
    Ok(())
}

/// `merge(a, a) == a` for every sample, and merging a merge with either of
/// its inputs again changes nothing.
pub fn merge_is_idempotent<T, R>(resolver: &R, samples: &[T]) -> Result<(), Counterexample>
where
    T: PartialEq + Debug,
    R: Resolve<T> + ?Sized,
{
    for a in samples {
        let aa = resolver.merge(a, a);
        if &aa != a {
            return Err(differ("idempotent", &[a], &aa, a));
        }
        for b in samples {
            let ab = resolver.merge(a, b);
            let again = resolver.merge(&ab, b);
            if again != ab {
                return Err(differ("idempotent (merging a value in twice)", &[a, b], &again, &ab));
            }
        }
    }
    Ok(())
}

/// `merge(merge(a, b), c) == merge(a, merge(b, c))` for every triple of
/// `samples` (so keep them few: n samples make n³ triples).
pub fn merge_is_associative<T, R>(resolver: &R, samples: &[T]) -> Result<(), Counterexample>
where
    T: PartialEq + Debug,
    R: Resolve<T> + ?Sized,
{
    for a in samples {
        for b in samples {
            let ab = resolver.merge(a, b);
            for c in samples {
                let left = resolver.merge(&ab, c);
                let right = resolver.merge(a, &resolver.merge(b, c));
                if left != right {
                    return Err(differ("associative", &[a, b, c], &left, &right));
                }
            }
        }
    }
    Ok(())
}

/// All three laws on `samples`.
pub fn merge_laws_hold<T, R>(resolver: &R, samples: &[T]) -> Result<(), Counterexample>
where
    T: PartialEq + Debug,
    R: Resolve<T> + ?Sized,
{
    merge_is_commutative(resolver, samples)?;
    merge_is_idempotent(resolver, samples)?;
    merge_is_associative(resolver, samples)
}

/// All three laws on triples drawn from `strategy`, `cases` times, with
/// proptest's shrinking: the error names the smallest values found.
///
/// ```
/// use proptest::prelude::*;
/// let max = |a: &u32, b: &u32| *a.max(b);
/// ringkv_client::check::merge_laws(&max, any::<u32>(), 64).unwrap();
/// ```
#[cfg(feature = "proptest")]
pub fn merge_laws<T, R, S>(resolver: &R, strategy: S, cases: u32) -> Result<(), String>
where
    T: PartialEq + Debug + Clone,
    R: Resolve<T> + ?Sized,
    S: proptest::strategy::Strategy<Value = T>,
{
    use proptest::test_runner::{Config, TestCaseError, TestRunner};
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let triples = proptest::collection::vec(strategy, 3);
    runner
        .run(&triples, |samples| merge_laws_hold(resolver, &samples).map_err(|e| TestCaseError::fail(e.to_string())))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_law_names_its_counterexample() {
        let samples = [1i64, 2, 5];
        let minus = |a: &i64, b: &i64| a - b;
        let e = merge_is_commutative(&minus, &samples).unwrap_err();
        assert_eq!(e.law, "commutative");
        assert_eq!(e.inputs, vec!["1", "2"]);
        let sum = |a: &i64, b: &i64| a + b;
        assert!(merge_is_commutative(&sum, &samples).is_ok() && merge_is_associative(&sum, &samples).is_ok());
        assert_eq!(merge_is_idempotent(&sum, &samples).unwrap_err().law, "idempotent", "a counter is no merge");
        let avg = |a: &i64, b: &i64| (a + b) / 2;
        assert_eq!(merge_is_associative(&avg, &samples).unwrap_err().law, "associative");
        let max = |a: &i64, b: &i64| *a.max(b);
        merge_laws_hold(&max, &samples).unwrap();
    }
}
