//! What a read returns and a write takes: siblings and causal contexts.
//!
//! ringkv keeps every concurrent value of a key as a *sibling*. A read
//! returns all of them together with an opaque [`Context`], the causal past
//! the reader has seen. A write with that context replaces exactly the
//! siblings that were read; a write without one (an empty context) adds a
//! sibling beside whatever is there. The context is the node's encoding of
//! a version vector; the client never looks inside.
//!
//! [`ReadOptions`] and [`WriteOptions`] override the client's defaults for
//! one request (`None`: the default the client was built with).

use ringkv_net::Level;
use std::time::Duration;

/// The causal context of a read: pass it to the write that replaces what
/// was read.
///
/// ```
/// use ringkv_client::Context;
/// let blind = Context::default();
/// assert!(blind.is_empty(), "a write without a context adds a sibling");
/// let c = Context::from_bytes(vec![1, 2, 3]);
/// assert_eq!(c.as_bytes(), &[1, 2, 3]);
/// ```
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Context(Vec<u8>);

impl Context {
    /// A context from its bytes (as kept by a caller between a read and a
    /// write, e.g. in a web form).
    pub fn from_bytes(bytes: Vec<u8>) -> Context {
        Context(bytes)
    }

    /// Its bytes, opaque.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Whether it is empty: nothing was read (a blind write).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Its bytes, by value.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Context({} bytes)", self.0.len())
    }
}

/// A key's values as read: every sibling, and the context to write with.
///
/// Siblings equal byte for byte are one value here: a write that was sent
/// again to another replica (after the first did not answer in time) is
/// stored twice with the same value, and a caller should not see that as a
/// conflict. [`Siblings::stored`] still counts them apart, so a resolving
/// read writes back and the node keeps one.
///
/// ```
/// use ringkv_client::{Context, Siblings};
/// let s = Siblings::new(vec![b"apples".to_vec(), b"pears".to_vec()], Context::default());
/// assert!(s.is_conflict());
/// assert_eq!(s.len(), 2);
/// assert_eq!(Siblings::new(vec![b"one".to_vec()], Context::default()).single(), Some(&b"one"[..]));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Siblings {
    values: Vec<Vec<u8>>,
    context: Context,
    stored: usize,
}

impl Siblings {
    /// Siblings from the values a node returned (equal ones kept once, in
    /// the order they first appear) and the read's context.
    ///
    /// ```
    /// use ringkv_client::{Context, Siblings};
    /// let twice = Siblings::new(vec![b"v".to_vec(), b"v".to_vec()], Context::default());
    /// assert_eq!((twice.len(), twice.stored()), (1, 2));
    /// assert_eq!(twice.single(), Some(&b"v"[..]));
    /// ```
    pub fn new(values: Vec<Vec<u8>>, context: Context) -> Siblings {
        let stored = values.len();
        let mut distinct: Vec<Vec<u8>> = Vec::with_capacity(values.len());
        for v in values {
            // Siblings are few (each is a concurrent write): a linear scan.
            if !distinct.contains(&v) {
                distinct.push(v);
            }
        }
        Siblings { values: distinct, context, stored }
    }

    /// How many siblings the node holds, equal values counted apart.
    pub fn stored(&self) -> usize {
        self.stored
    }

    /// The values; empty when the key does not exist (or was deleted).
    pub fn values(&self) -> &[Vec<u8>] {
        &self.values
    }

    /// The context to write with, to replace exactly these values. Also
    /// meaningful for a missing key: it covers a delete that was read.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// Whether the key has no value.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// How many distinct values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether concurrent writes left more than one distinct value.
    pub fn is_conflict(&self) -> bool {
        self.values.len() > 1
    }

    /// The value, if there is exactly one.
    pub fn single(&self) -> Option<&[u8]> {
        match &self.values[..] {
            [v] => Some(v),
            _ => None,
        }
    }

    /// The parts, by value.
    pub fn into_parts(self) -> (Vec<Vec<u8>>, Context) {
        (self.values, self.context)
    }
}

/// Per-request read options.
///
/// ```
/// use ringkv_client::{Level, ReadOptions};
/// use std::time::Duration;
/// let all = ReadOptions { r: Some(Level::All), timeout: Some(Duration::from_millis(200)) };
/// assert_eq!(ReadOptions::default().r, None, "the client's default");
/// # let _ = all;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// The read quorum (`None`: the client's default).
    pub r: Option<Level>,
    /// How long the read may take, all attempts together (`None`: the
    /// client's request timeout).
    pub timeout: Option<Duration>,
}

/// Per-request write options (put and delete).
///
/// ```
/// use ringkv_client::{Context, Level, WriteOptions};
/// let opts = WriteOptions { w: Some(Level::All), durable: Some(true), ..WriteOptions::with_context(Context::default()) };
/// # let _ = opts;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// The context of the read this write replaces (empty: add a sibling).
    pub context: Context,
    /// The write quorum (`None`: the client's default).
    pub w: Option<Level>,
    /// Whether replicas acknowledge only after an fsync (`None`: the
    /// client's default, else the node's).
    pub durable: Option<bool>,
    /// How long the write may take, all attempts together (`None`: the
    /// client's request timeout).
    pub timeout: Option<Duration>,
}

impl WriteOptions {
    /// The client's defaults, writing after `context`.
    pub fn with_context(context: Context) -> WriteOptions {
        WriteOptions { context, ..WriteOptions::default() }
    }
}
