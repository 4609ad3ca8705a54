//! The requests a client sends and what their replies mean, for both
//! shells: one place that applies the client's defaults (r, w, durable) to
//! a request and turns a [`Reply`] into the typed result a caller gets.

use crate::builder::Config;
use crate::core::op::{Kind, Operation};
use crate::error::{Error, Result};
use crate::siblings::{Context, ReadOptions, Siblings, WriteOptions};
use ringkv_net::proto::{Reply, Request};
use ringkv_net::Topology;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A request with what the core needs to run it.
pub(crate) struct Planned {
    pub kind: Kind,
    pub request: Request,
    /// The whole time it may take.
    pub timeout: Duration,
    /// A client-driven read (`ClientBuilder::client_driven_reads`).
    pub copies: bool,
}

impl Planned {
    /// The operation that runs it along `route`.
    pub fn operation(self, route: Vec<SocketAddr>, now: Instant) -> Operation {
        let op = Operation::new(self.kind, self.request, route, now, self.timeout);
        if self.copies {
            op.read_copies_first()
        } else {
            op
        }
    }
}

/// A get of `key`.
pub(crate) fn get(config: &Config, key: &[u8], opts: &ReadOptions) -> Planned {
    Planned {
        kind: Kind::Read,
        request: Request::Get { key: key.to_vec(), r: opts.r.unwrap_or(config.r) },
        timeout: opts.timeout.unwrap_or(config.request_timeout),
        copies: config.client_driven_reads,
    }
}

/// A put of `value` under `key`.
pub(crate) fn put(config: &Config, key: &[u8], value: &[u8], opts: &WriteOptions) -> Planned {
    let req = Request::Put {
        key: key.to_vec(),
        value: value.to_vec(),
        context: opts.context.as_bytes().to_vec(),
        w: opts.w.unwrap_or(config.w),
        durable: opts.durable.or(config.durable),
    };
    Planned { kind: Kind::Write, request: req, timeout: opts.timeout.unwrap_or(config.request_timeout), copies: false }
}

/// A delete of `key`.
pub(crate) fn delete(config: &Config, key: &[u8], opts: &WriteOptions) -> Planned {
    let req = Request::Delete {
        key: key.to_vec(),
        context: opts.context.as_bytes().to_vec(),
        w: opts.w.unwrap_or(config.w),
        durable: opts.durable.or(config.durable),
    };
    Planned { kind: Kind::Write, request: req, timeout: opts.timeout.unwrap_or(config.request_timeout), copies: false }
}

fn unexpected(request: &str, reply: &Reply) -> Error {
    Error::Protocol(format!("unexpected reply to {request}: {reply:?}"))
}

/// A get's reply as siblings.
pub(crate) fn siblings(reply: Reply) -> Result<Siblings> {
    match reply {
        Reply::Get(g) => Ok(Siblings::new(g.values, Context::from_bytes(g.context))),
        other => Err(unexpected("get", &other)),
    }
}

/// A put's reply as the new version's context.
pub(crate) fn written(reply: Reply) -> Result<Context> {
    match reply {
        Reply::Put { context } => Ok(Context::from_bytes(context)),
        other => Err(unexpected("put", &other)),
    }
}

/// A delete's reply.
pub(crate) fn deleted(reply: Reply) -> Result<()> {
    match reply {
        Reply::Delete => Ok(()),
        other => Err(unexpected("delete", &other)),
    }
}

/// A topology reply as a routable topology.
pub(crate) fn topology(reply: Reply) -> Result<Topology> {
    match reply {
        Reply::Topology { state, replicas } => Topology::decode(&state, replicas).map_err(Error::Protocol),
        other => Err(unexpected("topology", &other)),
    }
}
