//! The client library (`ringkv-client`) against a real 3-node cluster: what
//! a user does with it (put, get, delete, concurrent writes resolved into
//! one value) and what it must survive (a node stopped and one killed while
//! it serves reads). Every load loop is bounded in count and time; the
//! nodes are stopped by pid when the test ends, however it ends.

use ringkv_client::{AsyncClient, Client, Context, Credentials, Level, ReadOptions, Resolve, WriteOptions};
use ringkv_tests::harness::{Cluster, Node, NodeSpec};
use ringkv_tests::recorder::Counters;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// The node answers within 2 s, so a stopped node's connection is given up
/// on within about 3 s.
const FAST: &[&str] = &["--request-timeout-ms", "2000"];

/// A shopping cart: a set of items, merged by union.
struct Union;

impl Resolve<String> for Union {
    fn merge(&self, a: &String, b: &String) -> String {
        let items: BTreeSet<&str> = a.split(',').chain(b.split(',')).filter(|s| !s.is_empty()).collect();
        items.into_iter().collect::<Vec<_>>().join(",")
    }
}

fn blocking_client(c: &Cluster) -> Client {
    Client::builder()
        .seeds(c.addrs())
        .request_timeout(Duration::from_secs(3))
        .write_quorum(Level::Count(2))
        .read_quorum(Level::Count(2))
        .build()
        .expect("the client connects through a seed")
}

#[test]
fn the_blocking_client_writes_reads_resolves_siblings_and_keeps_reading_through_a_killed_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, 1, FAST);
    let mut client = blocking_client(&c);
    let t = client.topology().expect("a topology");
    assert!(client.ring_version() > 0);
    assert_eq!(t.route(b"any").len(), 3, "each key routes to its three replicas");

    // Put, read, replace with the context, delete with the context.
    let first = WriteOptions::default();
    client.put("greeting", "hello", &first).unwrap();
    let read = client.get("greeting").unwrap();
    assert_eq!(read.single(), Some(&b"hello"[..]));
    client.put("greeting", "hello again", &WriteOptions::with_context(read.context().clone())).unwrap();
    let read = client.get("greeting").unwrap();
    assert_eq!(read.values(), &[b"hello again".to_vec()], "the context replaced what was read");
    client.delete("greeting", &WriteOptions::with_context(read.context().clone())).unwrap();
    assert!(client.get("greeting").unwrap().is_empty(), "deleted");

    // Two writers that had not read each other: two siblings, which the
    // resolver merges and writes back, so the next read finds one value.
    client.put("cart", "apples", &first).unwrap();
    client.put("cart", "pears", &first).unwrap();
    let both = client.get("cart").unwrap();
    assert_eq!(both.len(), 2, "concurrent writes are siblings: {both:?}");
    let merged: Option<String> = client.get_resolved("cart", &Union).unwrap();
    assert_eq!(merged.as_deref(), Some("apples,pears"));
    let after = client.get("cart").unwrap();
    assert_eq!(after.values(), &[b"apples,pears".to_vec()], "the merge was written back");
    let updated = client.update("cart", &Union, |cart| Union.merge(&cart.unwrap_or_default(), &"figs".into())).unwrap();
    assert_eq!(updated, "apples,figs,pears");

    // A pipelined batch across all replicas' shards.
    let keys: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
    for k in &keys {
        client.put(k, format!("v-{k}"), &first).unwrap();
    }
    let all = client.get_many(&keys, &ReadOptions::default());
    for (k, r) in keys.iter().zip(&all) {
        assert_eq!(r.as_ref().unwrap().single(), Some(format!("v-{k}").as_bytes()), "{k}: {r:?}");
    }

    // Reads keep being served while a node is killed under them; the
    // client's metrics show the failovers it made to get there.
    let started = Instant::now();
    let (mut ok, mut errors) = (0u64, Vec::new());
    let counters = Counters::default();
    metrics::with_local_recorder(&counters, || {
        for i in 0..600 {
            if i == 100 {
                c.nodes[1].kill();
            }
            if started.elapsed() > Duration::from_secs(20) {
                break;
            }
            let k = &keys[i % keys.len()];
            match client.get(k) {
                Ok(r) if r.single() == Some(format!("v-{k}").as_bytes()) => ok += 1,
                Ok(r) => errors.push(format!("{k}: read {r:?}")),
                Err(e) => errors.push(format!("{k}: {e}")),
            }
        }
    });
    assert!(
        errors.is_empty(),
        "{} of {} reads failed: {:?}",
        errors.len(),
        ok + errors.len() as u64,
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 300, "the reads kept going after the kill: {ok}");
    assert_eq!(counters.get("ringkv_client_requests_total{op=get,outcome=ok}"), ok);
    assert_eq!(counters.get("ringkv_client_request_duration_seconds{op=get,outcome=ok}"), ok, "one duration each");
    assert!(counters.get("ringkv_client_failovers_total{op=get}") > 0, "the kill made reads fail over");
    assert!(counters.get("ringkv_client_connections_failed_total{reason=io}") > 0, "the killed node's connection");
    client.put("after-kill", "still writable", &first).expect("w=2 of the two nodes left");
}

/// Client-driven reads (`client_driven_reads(true)`): gets ask two replicas
/// for their copies. A replica that missed writes while it was down answers
/// an older copy; those reads go through a coordinator and still return the
/// newest value, and the rest are answered by the copies alone.
#[test]
fn client_driven_reads_return_the_newest_write_when_a_replica_missed_it() {
    let dir = tempfile::tempdir().unwrap();
    // No hinted handoff or anti-entropy during the test: n3 stays behind
    // until a read repairs it.
    let slow_repair = ["--handoff-interval-s", "600", "--anti-entropy-interval-s", "600"];
    let mut c = Cluster::start(dir.path(), 3, 1, &[FAST, &slow_repair[..]].concat());
    let seeds = c.addrs();
    let copy_reader = || {
        Client::builder()
            .seeds(seeds.clone())
            .request_timeout(Duration::from_secs(3))
            .read_quorum(Level::Count(2))
            .client_driven_reads(true)
            .hedged_reads(false)
            .build()
            .unwrap()
    };
    let keys: Vec<String> = (0..30).map(|i| format!("cd{i}")).collect();
    let reads = |client: &mut Client, want: &str| {
        let counters = Counters::default();
        metrics::with_local_recorder(&counters, || {
            for k in &keys {
                let got = client.get(k).unwrap();
                assert_eq!(got.values(), &[want.as_bytes().to_vec()], "{k}");
            }
        });
        counters.get("ringkv_client_copy_fallbacks_total{op=get}")
    };
    let mut writer = blocking_client(&c);
    let all = WriteOptions { w: Some(Level::All), ..WriteOptions::default() };
    for k in &keys {
        writer.put(k, "old", &all).unwrap();
    }
    assert_eq!(reads(&mut copy_reader(), "old"), 0, "replicas that agree answer by their copies alone");

    c.nodes[2].kill();
    for k in &keys {
        let read = writer.get(k).unwrap();
        writer.put(k, "new", &WriteOptions::with_context(read.context().clone())).unwrap();
    }
    c.nodes[2].restart();
    // Until the restarted node sees the others up, a read it coordinates
    // finds too few replicas (a node's verdict, which ends the request).
    c.wait_converged(3, Duration::from_secs(30));
    // A fresh client, which has not seen n3 fail and so asks it first
    // where it is a key's first or second replica.
    let fallbacks = reads(&mut copy_reader(), "new");
    assert!(fallbacks > 0, "reads whose copies included n3's older one went through a coordinator");
    assert!(fallbacks < keys.len() as u64, "reads of two up-to-date copies did not: {fallbacks}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_client_multiplexes_tasks_resolves_siblings_and_rides_through_a_stopped_and_a_killed_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = tokio::task::block_in_place(|| Cluster::start(dir.path(), 3, 1, FAST));
    let client = AsyncClient::builder()
        .seeds(c.addrs())
        .request_timeout(Duration::from_secs(3))
        .write_quorum(Level::Count(2))
        .read_quorum(Level::Count(2))
        .connections_per_shard(2)
        .build_async()
        .await
        .expect("the client connects through a seed");
    assert!(client.ring_version() > 0);

    // Many tasks at once, their requests multiplexed over a few connections.
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let client = client.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    let k = format!("a{w}-{i}");
                    client.put(&k, format!("v-{k}"), &WriteOptions::default()).await?;
                }
                Ok::<_, ringkv_client::Error>(())
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap().unwrap();
    }
    let keys: Vec<String> = (0..16).flat_map(|w| (0..10).map(move |i| format!("a{w}-{i}"))).collect();
    let mut reads = tokio::task::JoinSet::new();
    for k in keys.clone() {
        let client = client.clone();
        reads.spawn(async move { (client.get(&k).await, k) });
    }
    while let Some(done) = reads.join_next().await {
        let (r, k) = done.unwrap();
        let r = r.unwrap();
        assert_eq!(r.single(), Some(format!("v-{k}").as_bytes()), "{k}: {r:?}");
    }

    // Put, replace, delete.
    client.put("greeting", "hello", &WriteOptions::default()).await.unwrap();
    let read = client.get("greeting").await.unwrap();
    client.delete("greeting", &WriteOptions::with_context(read.context().clone())).await.unwrap();
    assert!(client.get("greeting").await.unwrap().is_empty());

    // Concurrent writers make siblings; a resolving read merges them once.
    let blind = WriteOptions::default();
    let (a, b) = tokio::join!(client.put("cart", "apples", &blind), client.put("cart", "pears", &blind));
    a.unwrap();
    b.unwrap();
    assert_eq!(client.get("cart").await.unwrap().len(), 2);
    let merged: Option<String> = client.get_resolved("cart", &Union).await.unwrap();
    assert_eq!(merged.as_deref(), Some("apples,pears"));
    assert_eq!(client.get("cart").await.unwrap().values(), &[b"apples,pears".to_vec()]);

    // Readers in four tasks, bounded in count and time; one node is
    // stopped for two seconds, then another is killed.
    let run_for = Duration::from_secs(9);
    let started = Instant::now();
    let readers: Vec<_> = (0..4)
        .map(|r| {
            let (client, keys) = (client.clone(), keys.clone());
            tokio::spawn(async move {
                let (mut ok, mut errors, mut worst) = (0u32, Vec::new(), Duration::ZERO);
                let mut i = r;
                while started.elapsed() < run_for && i < 20_000 {
                    let k = &keys[i % keys.len()];
                    let t = Instant::now();
                    match client.get(k).await {
                        Ok(v) if v.single() == Some(format!("v-{k}").as_bytes()) => ok += 1,
                        Ok(v) => errors.push(format!("{k}: {v:?}")),
                        Err(e) => errors.push(format!("{k}: {e}")),
                    }
                    worst = worst.max(t.elapsed());
                    i += 4;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (ok, errors, worst)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.nodes[1].pause();
    tokio::time::sleep(Duration::from_secs(2)).await;
    c.nodes[1].resume();
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.nodes[2].kill();
    let (mut ok, mut errors, mut worst) = (0, Vec::new(), Duration::ZERO);
    for r in readers {
        let (o, e, w) = r.await.unwrap();
        ok += o;
        errors.extend(e);
        worst = worst.max(w);
    }
    assert!(errors.is_empty(), "{} reads failed: {:?}", errors.len(), &errors[..errors.len().min(5)]);
    assert!(ok > 400, "the readers kept going: {ok}");
    // Without a deadline per replica a read to the stopped node would wait
    // out the stop; with it, none comes near.
    assert!(worst < Duration::from_millis(1500), "worst read {worst:?}");
    let w2 = WriteOptions { context: Context::default(), w: Some(Level::Count(2)), ..Default::default() };
    client.put("after-kill", "still writable", &w2).await.expect("w=2 of the two nodes left");
}

#[test]
fn the_builders_token_or_user_authenticates_and_wrong_credentials_are_unauthorized() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.toml");
    let settings = "cluster_secret = \"cluster-secret-0123456789\"\nauth_tokens = [\"client-token-0123\"]\n[auth_users]\nalice = \"wonderland\"\n";
    std::fs::write(&config, settings).unwrap();
    let mut spec = NodeSpec::single(dir.path(), 1);
    spec.extra = vec!["--config".into(), config.to_str().unwrap().into()];
    spec.credentials = Some(Credentials::Token("client-token-0123".into()));
    let node = Node::start(spec);
    let seed = node.addr().to_string();

    let mut by_token = Client::builder().seed(&seed).token("client-token-0123").build().unwrap();
    by_token.put("k", "v", &WriteOptions::default()).unwrap();
    let mut by_user = Client::builder().seed(&seed).user("alice", "wonderland").build().unwrap();
    assert_eq!(by_user.get("k").unwrap().single(), Some(&b"v"[..]));

    for builder in [
        Client::builder().seed(&seed).token("wrong"),
        Client::builder().seed(&seed).user("alice", "mad hatter"),
        Client::builder().seed(&seed),
    ] {
        match builder.build() {
            Err(ringkv_client::Error::Unauthorized { .. }) => {}
            other => panic!("expected Unauthorized, got {other:?}"),
        }
    }
}
