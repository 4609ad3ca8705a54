//! A small service on tokio: many request handlers count page views in
//! ringkv at once, sharing one `AsyncClient` (its connections multiplex
//! every handler's requests).
//!
//! Concurrent increments of one counter are concurrent writes: ringkv keeps
//! them as siblings rather than letting one overwrite another. The counter
//! is therefore a grow-only counter (one slot per handler, merged by
//! maximum, the value is the sum), so merging siblings never loses or
//! double-counts an increment; `update` reads, merges, increments this
//! handler's slot and writes back with the read's context.
//!
//! With a cluster running (`cargo run --release --bin ringkv -- cluster up`):
//!
//! ```sh
//! cargo run -p ringkv-client --features tokio --example counter_service -- 127.0.0.1:7070
//! ```

use ringkv_client::{AsyncClient, Resolve, Value, WriteOptions};
use std::collections::BTreeMap;

/// A grow-only counter: each writer's own count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Counter(BTreeMap<u32, u64>);

impl Counter {
    fn total(&self) -> u64 {
        self.0.values().sum()
    }

    fn increment(mut self, writer: u32) -> Counter {
        *self.0.entry(writer).or_default() += 1;
        self
    }
}

/// Stored as `writer=count` pairs, comma-separated.
impl Value for Counter {
    fn encode(&self) -> Vec<u8> {
        self.0.iter().map(|(w, n)| format!("{w}={n}")).collect::<Vec<_>>().join(",").into_bytes()
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
        let mut c = Counter::default();
        for pair in text.split(',').filter(|p| !p.is_empty()) {
            let (w, n) = pair.split_once('=').ok_or_else(|| format!("bad pair {pair:?}"))?;
            c.0.insert(w.parse().map_err(|_| "bad writer")?, n.parse().map_err(|_| "bad count")?);
        }
        Ok(c)
    }
}

/// Each writer's slot only grows, so the larger count is the later one.
struct MergeCounters;

impl Resolve<Counter> for MergeCounters {
    fn merge(&self, a: &Counter, b: &Counter) -> Counter {
        let mut out = a.clone();
        for (w, n) in &b.0 {
            let slot = out.0.entry(*w).or_default();
            *slot = (*slot).max(*n);
        }
        out
    }
}

const HANDLERS: u32 = 8;
const REQUESTS_PER_HANDLER: u32 = 25;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    ringkv_client::check::merge_laws_hold(
        &MergeCounters,
        &[
            Counter::default(),
            Counter::default().increment(1),
            Counter::default().increment(1).increment(1).increment(2),
        ],
    )?;
    let seed = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:7070".into());
    let client = AsyncClient::builder().seed(seed).build_async().await?;
    let page = format!("views:{}", std::process::id());

    // Every handler serves its requests; all count the same page.
    let handlers: Vec<_> = (0..HANDLERS)
        .map(|writer| {
            let (client, page) = (client.clone(), page.clone());
            tokio::spawn(async move {
                for _ in 0..REQUESTS_PER_HANDLER {
                    client.update(&page, &MergeCounters, |c| c.unwrap_or_default().increment(writer)).await?;
                }
                Ok::<_, ringkv_client::Error>(())
            })
        })
        .collect();
    for h in handlers {
        h.await??;
    }

    let views = client.get_resolved(&page, &MergeCounters).await?.unwrap_or_default();
    println!("{} views counted by {HANDLERS} concurrent handlers", views.total());
    assert_eq!(views.total(), u64::from(HANDLERS * REQUESTS_PER_HANDLER), "no increment lost or doubled");
    let read = client.get(&page).await?;
    client.delete(&page, &WriteOptions::with_context(read.context().clone())).await?;
    Ok(())
}
