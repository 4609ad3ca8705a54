//! The request path without sockets: what one shard spends on a request
//! besides the kernel's share, so a regression shows without a cluster.
//!
//! ```sh
//! cargo bench -p ringkv-engine --bench hot_path            # every step, 200,000 operations each
//! cargo bench -p ringkv-engine --bench hot_path -- --ops 50000
//! ```
//!
//! Each line times one step over many operations on one core, in a glommio
//! executor with a real store (1 KiB values, every record in memory, as in
//! the peers benchmark's working set):
//! - `decode put` / `decode get`: a client frame to a request (flatbuffers
//!   verified, as the node does);
//! - `coordinate get r=2`: the coordinator machine's whole work for a
//!   quorum read (plan, two answers merged, client answer), no I/O;
//! - `coordinate put w=2`: the same for a write (apply answer, two acks);
//! - `store get`: the replica's read from memory (`Store::get_now`);
//! - `store write`: a coordinated write appended (`Store::write_now`);
//! - `store merge`: a replica's merge of a newer object (`Store::merge_now`);
//! - `encode get reply` / `encode put reply`: the reply frame.
//!
//! It prints figures and asserts nothing: a benchmark, not a test.

use glommio::{LocalExecutorBuilder, Placement};
use ringkv_core::coordinator::{Coordinator, CoordinatorConfig};
use ringkv_core::effects::{Request as CoreRequest, Response as CoreResponse, WriteContext};
use ringkv_core::quorum::Level;
use ringkv_core::topology::Topology;
use ringkv_core::version::{Object, VersionVector};
use ringkv_engine::store::{Store, StoreConfig};
use ringkv_net::frame::FrameDecoder;
use ringkv_net::proto::{decode, DecodeLimits, Encoder, GetResult, Message, Reply, Request, RequestFrame, Response};
use std::hint::black_box;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let mut ops = 200_000u64;
    while let Some(a) = args.next() {
        if a == "--ops" {
            ops = args.next().and_then(|v| v.parse().ok()).expect("--ops N");
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_path_buf();
    LocalExecutorBuilder::new(Placement::Unbound).make().expect("executor").run(async move {
        run(&path, ops).await;
    });
}

fn report(step: &str, ops: u64, t0: Instant) {
    let ns = t0.elapsed().as_nanos() as f64 / ops as f64;
    println!("{step:<22} {ns:>9.0} ns/op");
}

fn key(i: u64) -> Vec<u8> {
    format!("user{:08}", i % 10_000).into_bytes()
}

fn frame_of(msg: &Message) -> Vec<u8> {
    let bytes = Encoder::new().to_vec(msg);
    let mut d = FrameDecoder::new(1 << 20);
    d.push(&bytes);
    d.next_frame().expect("a frame").expect("whole").to_vec()
}

async fn run(dir: &std::path::Path, ops: u64) {
    let value = vec![7u8; 1024];
    let put = Message::Request(RequestFrame {
        id: 1,
        timeout_ms: 0,
        hops: 0,
        body: Request::Put {
            key: key(1),
            value: value.clone(),
            context: vec![],
            w: Level::Quorum,
            durable: Some(false),
        },
    });
    let get = Message::Request(RequestFrame {
        id: 2,
        timeout_ms: 0,
        hops: 0,
        body: Request::Get { key: key(1), r: Level::Quorum },
    });
    let (put_frame, get_frame) = (frame_of(&put), frame_of(&get));

    let t0 = Instant::now();
    for _ in 0..ops {
        black_box(decode(black_box(&put_frame), DecodeLimits::SERVER).expect("decodes"));
    }
    report("decode put", ops, t0);
    let t0 = Instant::now();
    for _ in 0..ops {
        black_box(decode(black_box(&get_frame), DecodeLimits::SERVER).expect("decodes"));
    }
    report("decode get", ops, t0);

    // The coordinator machine alone: three replicas a, b, c; this is a.
    let walk: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let topo = Topology::from_walks("a", 3, vec![walk; 256], &[]);
    let mut coord = Coordinator::new(CoordinatorConfig::default());
    let store_obj = |v: &[u8]| {
        let ctx = VersionVector::new();
        let actor = ringkv_core::version::Actor::new(1, 0, 1);
        let dot = Object::next_dot(None, &ctx, actor);
        Object::apply_write(None, &ctx, dot, 0, Some(v.to_vec()))
    };
    let obj = store_obj(&value);
    let t0 = Instant::now();
    for i in 0..ops {
        coord.get(i, &topo, i, key(i), Level::Quorum, 1_000_000);
        let out: Vec<_> = std::iter::from_fn(|| coord.poll_outgoing()).collect();
        for o in &out {
            coord.handle_response(i, &topo, o.tag, Ok(CoreResponse::Object(Some(obj.clone()))));
        }
        black_box(coord.poll_answer());
    }
    report("coordinate get r=2", ops, t0);
    let t0 = Instant::now();
    for i in 0..ops {
        let ctx = WriteContext::Client(VersionVector::new());
        coord.write(i, &topo, i, key(i), Some(value.clone()), ctx, Level::Quorum, false, 1_000_000);
        let apply = coord.poll_outgoing().expect("apply");
        coord.handle_response(i, &topo, apply.tag, Ok(CoreResponse::Applied { obj: obj.clone(), lsn: i }));
        let out: Vec<_> = std::iter::from_fn(|| coord.poll_outgoing()).collect();
        for o in out.iter().filter(|o| matches!(o.req, CoreRequest::Write { .. })) {
            coord.handle_response(i, &topo, o.tag, Ok(CoreResponse::Done));
        }
        black_box(coord.poll_answer());
    }
    report("coordinate put w=2", ops, t0);

    let cfg = StoreConfig {
        dir: dir.to_path_buf(),
        shard: 0,
        incarnation: 9,
        partitions: 256,
        segment_bytes: 256 << 20,
        cache_bytes: 64 << 20,
        max_unflushed_bytes: 1 << 30,
        hash_seed: 3,
        max_hints: 1000,
    };
    let store = Store::open(cfg).await.expect("store opens");
    let blind = WriteContext::Client(VersionVector::new());
    for i in 0..10_000 {
        store.write(&key(i), Some(value.clone()), &blind, false, 1).await.expect("loads");
    }
    let t0 = Instant::now();
    for i in 0..ops {
        black_box(store.get_now(&key(i)).expect("in memory").expect("reads"));
    }
    report("store get", ops, t0);
    // Writes with the context of what is there (no sibling growth); the
    // flusher may need the executor now and then, so yield when asked.
    let t0 = Instant::now();
    let mut n = 0;
    let mut i = 0u64;
    while n < ops {
        let k = key(i);
        let ctx =
            WriteContext::Client(store.get_now(&k).expect("in memory").expect("reads").expect("exists").vv().clone());
        match store.write_now(&k, Some(value.clone()), &ctx, 2) {
            Ok(r) => {
                black_box(r.expect("writes"));
                n += 1;
                i += 1;
            }
            Err(_) => store.sync().await.expect("syncs"),
        }
    }
    report("store write", ops, t0);
    let newer = store.get_now(&key(0)).expect("in memory").expect("reads").expect("exists");
    let t0 = Instant::now();
    let mut n = 0;
    while n < ops {
        match store.merge_now(&key(n), &newer) {
            Some(r) => {
                black_box(r.expect("merges"));
                n += 1;
            }
            None => store.sync().await.expect("syncs"),
        }
    }
    report("store merge", ops, t0);

    let result = GetResult { found: true, values: vec![value.clone()], context: obj.context().encode_context() };
    let mut enc = Encoder::new();
    let mut out = Vec::with_capacity(4096);
    let t0 = Instant::now();
    for i in 0..ops {
        out.clear();
        let r = Response { id: i, ring_version: 1, result: Ok(Reply::Get(result.clone())) };
        enc.encode(&Message::Response(r), &mut out);
        black_box(&out);
    }
    report("encode get reply", ops, t0);
    let context = obj.context().encode_context();
    let t0 = Instant::now();
    for i in 0..ops {
        out.clear();
        let r = Response { id: i, ring_version: 1, result: Ok(Reply::Put { context: context.clone() }) };
        enc.encode(&Message::Response(r), &mut out);
        black_box(&out);
    }
    report("encode put reply", ops, t0);
    store.close().await.expect("closes");
}
