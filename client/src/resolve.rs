//! Typed conflict resolution: how a user's type is stored, and how its
//! siblings are merged into one value.
//!
//! - [`Value`]: how a `T` becomes the bytes of a value and back;
//! - [`Resolve<T>`]: the user's merge of two concurrent values (and so of
//!   any number of siblings); any `Fn(&T, &T) -> T` is one;
//! - [`LastWriterWins`] and [`LatestBy`]: the explicit choice to keep one
//!   sibling and drop the others, by a timestamp the writer stored;
//! - [`resolve_siblings`]: what the clients' `get_resolved` and `update`
//!   do with a read: decode, merge, and say whether the merge must be
//!   written back (it must when there was more than one sibling, so the
//!   next read finds one value).
//!
//! A merge must be commutative, associative and idempotent, or replicas
//! that merge in different orders disagree; [`crate::check`] tests that.

use crate::error::Error;
use crate::siblings::{Context, Siblings};

/// How a type is stored as a value's bytes.
///
/// ```
/// use ringkv_client::Value;
/// assert_eq!(String::decode(&"hi".to_string().encode()).unwrap(), "hi");
/// ```
pub trait Value: Sized {
    /// The bytes to store.
    fn encode(&self) -> Vec<u8>;
    /// The value from stored bytes, or why they are not one.
    fn decode(bytes: &[u8]) -> Result<Self, String>;
}

impl Value for Vec<u8> {
    fn encode(&self) -> Vec<u8> {
        self.clone()
    }
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        Ok(bytes.to_vec())
    }
}

impl Value for String {
    fn encode(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        String::from_utf8(bytes.to_vec()).map_err(|e| e.to_string())
    }
}

/// A user's merge of concurrent values of `T`.
///
/// Implement [`Resolve::merge`]; [`Resolve::resolve`] folds it over all
/// siblings. A closure is a resolver too:
///
/// ```
/// use ringkv_client::Resolve;
/// let max = |a: &u64, b: &u64| *a.max(b);
/// assert_eq!(max.resolve(vec![3, 9, 4]), 9);
/// ```
pub trait Resolve<T> {
    /// The merge of two concurrent values. It must be commutative,
    /// associative and idempotent (see [`crate::check`]).
    fn merge(&self, a: &T, b: &T) -> T;

    /// The merge of all `siblings` (at least one).
    fn resolve(&self, siblings: Vec<T>) -> T {
        let mut it = siblings.into_iter();
        let first = it.next().expect("resolve is called with at least one sibling");
        it.fold(first, |acc, v| self.merge(&acc, &v))
    }
}

impl<T, F: Fn(&T, &T) -> T> Resolve<T> for F {
    fn merge(&self, a: &T, b: &T) -> T {
        self(a, b)
    }
}

/// A value stamped with the writer's clock, for [`LastWriterWins`].
///
/// Stored as the microseconds (8 bytes, little-endian) then the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timestamped<T> {
    /// Microseconds since the Unix epoch, as the writer's clock said.
    pub micros: u64,
    /// The value.
    pub value: T,
}

impl<T> Timestamped<T> {
    /// `value` stamped with this machine's clock.
    // A helper for the caller's side, outside the core: it may read the clock.
    #[allow(clippy::disallowed_methods)]
    pub fn now(value: T) -> Timestamped<T> {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros().min(u128::from(u64::MAX)) as u64);
        Timestamped { micros, value }
    }

    /// `value` stamped with `micros`.
    pub fn at(micros: u64, value: T) -> Timestamped<T> {
        Timestamped { micros, value }
    }
}

impl<T: Value> Value for Timestamped<T> {
    fn encode(&self) -> Vec<u8> {
        let mut out = self.micros.to_le_bytes().to_vec();
        out.extend_from_slice(&self.value.encode());
        out
    }
    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let Some((ts, rest)) = bytes.split_first_chunk::<8>() else {
            return Err(format!("a timestamped value needs 8 bytes of timestamp, got {}", bytes.len()));
        };
        Ok(Timestamped { micros: u64::from_le_bytes(*ts), value: T::decode(rest)? })
    }
}

/// Keeps the sibling with the latest timestamp and drops the others: the
/// explicit choice to lose concurrent writes. Clocks of different writers
/// disagree, so "latest" is as their clocks said. Equal timestamps are
/// broken by the encoded bytes, so every replica and client picks the same.
///
/// ```
/// use ringkv_client::{LastWriterWins, Resolve, Timestamped};
/// let kept = LastWriterWins.resolve(vec![Timestamped::at(5, "new".to_string()), Timestamped::at(2, "old".into())]);
/// assert_eq!(kept.value, "new");
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct LastWriterWins;

impl<T: Value + Clone> Resolve<Timestamped<T>> for LastWriterWins {
    fn merge(&self, a: &Timestamped<T>, b: &Timestamped<T>) -> Timestamped<T> {
        LatestBy(|t: &Timestamped<T>| t.micros).merge(a, b)
    }
}

/// Keeps the sibling whose `key` is greatest (a timestamp or version the
/// type carries itself), ties broken by the encoded bytes.
///
/// ```
/// use ringkv_client::{LatestBy, Resolve};
/// #[derive(Clone, Debug, PartialEq)]
/// struct Profile { updated_at: u64, name: String }
/// impl ringkv_client::Value for Profile {
///     fn encode(&self) -> Vec<u8> { format!("{}:{}", self.updated_at, self.name).into_bytes() }
///     fn decode(b: &[u8]) -> Result<Self, String> {
///         let s = std::str::from_utf8(b).map_err(|e| e.to_string())?;
///         let (t, n) = s.split_once(':').ok_or("no ':'")?;
///         Ok(Profile { updated_at: t.parse().map_err(|_| "bad time")?, name: n.into() })
///     }
/// }
/// let newest = LatestBy(|p: &Profile| p.updated_at);
/// let a = Profile { updated_at: 1, name: "ann".into() };
/// let b = Profile { updated_at: 2, name: "anne".into() };
/// assert_eq!(newest.merge(&a, &b), b);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct LatestBy<F>(pub F);

impl<T: Value + Clone, K: Ord, F: Fn(&T) -> K> Resolve<T> for LatestBy<F> {
    fn merge(&self, a: &T, b: &T) -> T {
        let ka = ((self.0)(a), a.encode());
        let kb = ((self.0)(b), b.encode());
        if kb > ka {
            b.clone()
        } else {
            a.clone()
        }
    }
}

/// A read turned into one typed value.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution<T> {
    /// The merged value (`None`: the key has no value).
    pub value: Option<T>,
    /// The read's context: a write with it replaces every sibling read.
    pub context: Context,
    /// Whether the node holds several siblings (equal ones included), so
    /// the merge must be written back (with `context`) for the next read to
    /// find one value.
    pub needs_write_back: bool,
}

/// Decodes `siblings` and merges them with `resolver`.
pub fn resolve_siblings<T: Value, R: Resolve<T> + ?Sized>(
    siblings: Siblings,
    resolver: &R,
) -> Result<Resolution<T>, Error> {
    let needs_write_back = siblings.stored() > 1;
    let (values, context) = siblings.into_parts();
    let decoded: Vec<T> = values.iter().map(|v| T::decode(v)).collect::<Result<_, _>>().map_err(Error::Decode)?;
    let value = if decoded.is_empty() { None } else { Some(resolver.resolve(decoded)) };
    Ok(Resolution { value, context, needs_write_back })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_writer_wins_keeps_the_latest_and_breaks_ties_the_same_way_everywhere() {
        let a = Timestamped::at(10, "a".to_string());
        let b = Timestamped::at(20, "b".to_string());
        let tie = Timestamped::at(20, "c".to_string());
        assert_eq!(LastWriterWins.merge(&a, &b), b);
        assert_eq!(LastWriterWins.merge(&b, &a), b);
        assert_eq!(LastWriterWins.merge(&b, &tie), LastWriterWins.merge(&tie, &b), "a tie has one winner");
        let bytes = b.encode();
        assert_eq!(Timestamped::<String>::decode(&bytes).unwrap(), b);
        assert!(Timestamped::<String>::decode(&[1, 2]).is_err());
    }

    #[test]
    fn several_siblings_are_merged_and_marked_for_write_back_one_is_not() {
        let union = |a: &String, b: &String| {
            let mut items: Vec<&str> = a.split(',').chain(b.split(',')).filter(|s| !s.is_empty()).collect();
            items.sort_unstable();
            items.dedup();
            items.join(",")
        };
        let ctx = Context::from_bytes(vec![9]);
        let two = Siblings::new(vec![b"pears".to_vec(), b"apples".to_vec()], ctx.clone());
        let r = resolve_siblings::<String, _>(two, &union).unwrap();
        assert_eq!(r, Resolution { value: Some("apples,pears".into()), context: ctx, needs_write_back: true });
        let one =
            resolve_siblings::<String, _>(Siblings::new(vec![b"x".to_vec()], Context::default()), &union).unwrap();
        assert!(!one.needs_write_back);
        let twice = Siblings::new(vec![b"x".to_vec(), b"x".to_vec()], Context::default());
        let r = resolve_siblings::<String, _>(twice, &union).unwrap();
        assert_eq!(r.value.as_deref(), Some("x"));
        assert!(r.needs_write_back, "a duplicate stored twice is collapsed by the write-back");
        let none = resolve_siblings::<String, _>(Siblings::default(), &union).unwrap();
        assert_eq!(none.value, None);
        let bad = resolve_siblings::<String, _>(Siblings::new(vec![vec![0xff]], Context::default()), &union);
        assert!(matches!(bad, Err(Error::Decode(_))));
    }
}
