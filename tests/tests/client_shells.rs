//! The client library's shells (blocking and tokio) against fake nodes:
//! in-process listeners that speak the wire protocol and misbehave exactly
//! as a test says (answer late, answer out of order, never answer, report
//! a newer ring). What a real cluster cannot do on cue, these can, in well
//! under a second each.

use ringkv_client::{AsyncClient, Client, ReadOptions};
use ringkv_core::membership::{ClusterState, Member};
use ringkv_core::ring::{claim, Claimant};
use ringkv_net::frame::FrameDecoder;
use ringkv_net::proto::{
    decode, DecodeLimits, Encoder, ErrorCode, GetResult, HelloAck, Message, Reply, Request, RequestFrame, Response,
    WireError, PROTOCOL_VERSION,
};
use ringkv_tests::recorder::Counters;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a fake node does with a get on its n-th connection (from 0):
/// answer after this long, or never.
type Behaviour = Arc<dyn Fn(usize, &[u8]) -> Option<Duration> + Send + Sync>;

/// Three fake nodes that form one cluster (each holds a replica of every
/// key); a get is answered with the value `"<node>:<key>"`.
struct Fakes {
    addrs: Vec<SocketAddr>,
    ring_version: Arc<AtomicU64>,
}

impl Fakes {
    /// Fakes whose gets are answered as `behaviour(node, connection, key)` says.
    fn start_by_connection(
        behaviour: impl Fn(usize, usize, &[u8]) -> Option<Duration> + Send + Sync + 'static,
    ) -> Fakes {
        let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let ring_version = Arc::new(AtomicU64::new(1));
        let behaviour = Arc::new(behaviour);
        for (i, l) in listeners.into_iter().enumerate() {
            let (addrs, ring_version, behaviour) = (addrs.clone(), ring_version.clone(), behaviour.clone());
            let b: Behaviour = Arc::new(move |conn, key| behaviour(i, conn, key));
            std::thread::spawn(move || {
                // The listener lives as long as the test process; each
                // connection is served on a thread of its own.
                for (conn, stream) in l.incoming().flatten().enumerate() {
                    let (addrs, ring_version, b) = (addrs.clone(), ring_version.clone(), b.clone());
                    std::thread::spawn(move || serve(i, conn, stream, &addrs, &ring_version, &b));
                }
            });
        }
        Fakes { addrs, ring_version }
    }

    /// Fakes whose gets are answered as `behaviour(node, key)` says.
    fn start(behaviour: impl Fn(usize, &[u8]) -> Option<Duration> + Send + Sync + 'static) -> Fakes {
        Fakes::start_by_connection(move |node, _, key| behaviour(node, key))
    }

    fn seeds(&self) -> Vec<String> {
        self.addrs.iter().map(ToString::to_string).collect()
    }

    /// The fake node a key's first replica is.
    fn first_replica(&self, client: &Client, key: &[u8]) -> usize {
        let first = client.topology().unwrap().route(key)[0];
        self.addrs.iter().position(|a| *a == first).unwrap()
    }
}

/// The cluster state the fakes report: three members at their addresses.
fn state(addrs: &[SocketAddr], ring_version: u64) -> Vec<u8> {
    let mut state = ClusterState::new("ringkv", 64);
    for (i, a) in addrs.iter().enumerate() {
        let id = format!("n{}", i + 1);
        let m = Member { heartbeat: 1, version: 1, ..Member::new(&id, &a.to_string(), 1, 1) };
        state.members.insert(id, m);
    }
    let claimants: Vec<Claimant> = (1..=3).map(|i| Claimant { id: format!("n{i}"), weight: 1 }).collect();
    let mut ring = claim(None, &claimants, 64, 3);
    ring.version = ring_version;
    state.ring = Some(ring);
    state.encode()
}

fn serve(
    node: usize,
    conn: usize,
    mut stream: TcpStream,
    addrs: &[SocketAddr],
    ring_version: &AtomicU64,
    behaviour: &Behaviour,
) {
    let writer = Arc::new(Mutex::new(stream.try_clone().unwrap()));
    let send = |w: &Mutex<TcpStream>, msg: Message| {
        let bytes = Encoder::new().to_vec(&msg);
        let _ = w.lock().unwrap().write_all(&bytes);
    };
    let mut dec = FrameDecoder::new(1 << 20);
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        dec.push(&buf[..n]);
        while let Some(frame) = dec.next_frame().unwrap() {
            match decode(frame, DecodeLimits::SERVER).unwrap() {
                Message::Hello(_) => {
                    let ack = HelloAck {
                        protocol_version: PROTOCOL_VERSION,
                        node_id: format!("n{}", node + 1),
                        shard: 0,
                        shards: 1,
                        cluster: "ringkv".into(),
                    };
                    send(&writer, Message::HelloAck(ack));
                }
                Message::Request(RequestFrame { id, body, .. }) => {
                    let version = ring_version.load(Ordering::SeqCst);
                    let (reply, delay) = match body {
                        Request::Topology => {
                            (Reply::Topology { state: state(addrs, version), replicas: 3 }, Some(Duration::ZERO))
                        }
                        Request::Get { key, .. } => {
                            let value = format!("n{}:{}", node + 1, String::from_utf8_lossy(&key)).into_bytes();
                            // "conflict" keys have two siblings.
                            let values = if key.starts_with(b"conflict") {
                                vec![[&value[..], b"/a"].concat(), [&value[..], b"/b"].concat()]
                            } else {
                                vec![value]
                            };
                            (Reply::Get(GetResult { found: true, values, context: vec![1] }), behaviour(conn, &key))
                        }
                        // Keys with "unwritable" in them refuse writes.
                        Request::Put { key, .. } if key.windows(10).any(|w| w == b"unwritable") => {
                            let e = WireError::new(ErrorCode::Unavailable, "1 of 2 replicas");
                            let response = Response { id, result: Err(e), ring_version: version };
                            send(&writer, Message::Response(response));
                            continue;
                        }
                        Request::Put { .. } => (Reply::Put { context: vec![1] }, Some(Duration::ZERO)),
                        other => panic!("the fake does not serve {other:?}"),
                    };
                    let Some(delay) = delay else { continue };
                    let w = writer.clone();
                    // Each answer on its own schedule: a later request's
                    // answer may overtake an earlier one's.
                    std::thread::spawn(move || {
                        std::thread::sleep(delay);
                        send(&w, Message::Response(Response { id, result: Ok(reply), ring_version: version }));
                    });
                }
                other => panic!("the fake got {other:?}"),
            }
        }
    }
}

fn value(r: &ringkv_client::Result<ringkv_client::Siblings>) -> String {
    String::from_utf8(r.as_ref().unwrap().single().unwrap().to_vec()).unwrap()
}

#[test]
fn pipelined_reads_on_one_connection_each_get_their_own_answer_when_answers_overtake() {
    // Keys starting with "slow" are answered after 150 ms, the others at
    // once: on each connection the later requests' answers come first.
    let fakes =
        Fakes::start(|_, key| Some(if key.starts_with(b"slow") { Duration::from_millis(150) } else { Duration::ZERO }));
    let mut client = Client::builder().seeds(fakes.seeds()).hedged_reads(false).build().unwrap();
    let keys: Vec<String> = (0..30).map(|i| if i % 3 == 0 { format!("slow{i}") } else { format!("fast{i}") }).collect();
    let started = Instant::now();
    let results = client.get_many(&keys, &ReadOptions::default());
    let took = started.elapsed();
    for (k, r) in keys.iter().zip(&results) {
        let node = fakes.first_replica(&client, k.as_bytes());
        assert_eq!(value(r), format!("n{}:{k}", node + 1), "the answer to {k}, from its first replica");
    }
    // One after another, the ten slow reads alone would take 1.5 s.
    assert!(took < Duration::from_millis(1000), "the batch was pipelined, not one after another: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_share_the_async_clients_connections_and_each_gets_its_own_answer() {
    let fakes =
        Fakes::start(|_, key| Some(if key.starts_with(b"slow") { Duration::from_millis(150) } else { Duration::ZERO }));
    let client = AsyncClient::builder().seeds(fakes.seeds()).hedged_reads(false).build_async().await.unwrap();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..60 {
        let client = client.clone();
        let key = if i % 3 == 0 { format!("slow{i}") } else { format!("fast{i}") };
        tasks.spawn(async move { (client.get(&key).await, key) });
    }
    let topology = client.topology().unwrap();
    while let Some(done) = tasks.join_next().await {
        let (r, key) = done.unwrap();
        let first = topology.route(key.as_bytes())[0];
        let node = fakes.addrs.iter().position(|a| *a == first).unwrap();
        assert_eq!(value(&r), format!("n{}:{key}", node + 1));
    }
    // Queued one after another, the twenty slow reads alone would take 3 s.
    assert!(started.elapsed() < Duration::from_millis(1500), "concurrent, not queued: {:?}", started.elapsed());
}

#[test]
fn a_replica_that_never_answers_is_given_up_on_and_the_next_one_serves_the_read() {
    // Node 1 answers nothing but the topology.
    let fakes = Fakes::start(|node, _| if node == 0 { None } else { Some(Duration::ZERO) });
    let mut client = Client::builder()
        .seeds(fakes.seeds())
        .request_timeout(Duration::from_secs(3))
        .hedged_reads(false)
        .build()
        .unwrap();
    let key = (0..).map(|i| format!("k{i}")).find(|k| fakes.first_replica(&client, k.as_bytes()) == 0).unwrap();
    let started = Instant::now();
    let read = client.get(&key);
    let took = started.elapsed();
    let second = client.topology().unwrap().route(key.as_bytes())[1];
    let node = fakes.addrs.iter().position(|a| *a == second).unwrap();
    assert_eq!(value(&read), format!("n{}:{key}", node + 1), "served by the second replica");
    // No latency seen yet: the first replica gets the initial 500 ms.
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(1500), "{took:?}");
    // Now node 1 is tried last: the next read of that key goes straight on.
    let started = Instant::now();
    value(&client.get(&key));
    assert!(started.elapsed() < Duration::from_millis(400), "no 500 ms wait again: {:?}", started.elapsed());
}

#[test]
fn a_slow_read_is_hedged_on_the_next_replica_after_the_observed_p99() {
    // Node 1 answers after 2 s; the others at once.
    let fakes = Fakes::start(|node, _| Some(if node == 0 { Duration::from_secs(2) } else { Duration::ZERO }));
    let mut client = Client::builder().seeds(fakes.seeds()).build().unwrap();
    let (slow, fast): (Vec<String>, Vec<String>) =
        (0..200).map(|i| format!("k{i}")).partition(|k| fakes.first_replica(&client, k.as_bytes()) == 0);
    // Enough fast reads for a p99 (sub-millisecond here).
    for k in fast.iter().take(40) {
        value(&client.get(k));
    }
    let counters = Counters::default();
    let (read, took) = metrics::with_local_recorder(&counters, || {
        let started = Instant::now();
        (client.get(&slow[0]), started.elapsed())
    });
    assert!(value(&read).starts_with('n') && !value(&read).starts_with("n1:"), "{}", value(&read));
    assert_eq!(counters.get("ringkv_client_hedges_total{op=get}"), 1, "served by the hedge");
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[test]
fn a_newer_ring_version_in_an_answer_makes_the_client_fetch_the_topology_again() {
    let fakes = Fakes::start(|_, _| Some(Duration::ZERO));
    let mut client = Client::builder().seeds(fakes.seeds()).build().unwrap();
    assert_eq!(client.ring_version(), 1);
    fakes.ring_version.store(2, Ordering::SeqCst);
    value(&client.get("a"));
    // At most one refresh a second: the next call after that fetches it.
    std::thread::sleep(Duration::from_millis(1000));
    value(&client.get("b"));
    assert_eq!(client.ring_version(), 2, "the client routes by the ring a node reported");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_client_refreshes_a_stale_ring_in_the_background() {
    let fakes = Fakes::start(|_, _| Some(Duration::ZERO));
    let client = AsyncClient::builder().seeds(fakes.seeds()).build_async().await.unwrap();
    fakes.ring_version.store(5, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.ring_version() != 5 {
        assert!(Instant::now() < deadline, "still routing by ring {}", client.ring_version());
        client.get("k").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn a_connection_that_stopped_answering_is_failed_by_its_deadline_and_replaced() {
    // Node 1's first connection answers nothing but the topology; a new
    // connection to it answers.
    let fakes = Fakes::start_by_connection(|node, conn, _| (node != 0 || conn > 0).then_some(Duration::ZERO));
    let timeout = Duration::from_secs(1);
    let mut client =
        Client::builder().seeds(fakes.seeds()).request_timeout(timeout).hedged_reads(false).build().unwrap();
    let key = (0..).map(|i| format!("k{i}")).find(|k| fakes.first_replica(&client, k.as_bytes()) == 0).unwrap();
    let other = (0..).map(|i| format!("o{i}")).find(|k| fakes.first_replica(&client, k.as_bytes()) != 0).unwrap();
    let counters = Counters::default();
    metrics::with_local_recorder(&counters, || {
        // The read fails over; node 1's connection keeps the unanswered
        // request until its wire deadline (the timeout plus a grace period).
        assert!(!value(&client.get(&key)).starts_with("n1:"));
        std::thread::sleep(timeout + ringkv_client::core::conn::STALL_GRACE);
        value(&client.get(&other));
        assert_eq!(counters.get("ringkv_client_connections_failed_total{reason=io}"), 1, "the stalled one");
        // Node 1's back-off is over: it is probed on a new connection.
        assert_eq!(value(&client.get(&key)), format!("n1:{key}"), "served by node 1 again");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_client_replaces_a_connection_that_stopped_answering() {
    let fakes = Fakes::start_by_connection(|node, conn, _| (node != 0 || conn > 0).then_some(Duration::ZERO));
    let timeout = Duration::from_secs(1);
    let client = AsyncClient::builder()
        .seeds(fakes.seeds())
        .request_timeout(timeout)
        .hedged_reads(false)
        .build_async()
        .await
        .unwrap();
    let topology = client.topology().unwrap();
    let key = (0..).map(|i| format!("k{i}")).find(|k| topology.route(k.as_bytes())[0] == fakes.addrs[0]).unwrap();
    assert!(!value(&client.get(&key).await).starts_with("n1:"), "failed over while node 1 is silent");
    // The connection task fails its connection at the wire deadline; after
    // node 1's back-off a read probes it on a new connection.
    tokio::time::sleep(timeout + ringkv_client::core::conn::STALL_GRACE).await;
    assert_eq!(value(&client.get(&key).await), format!("n1:{key}"), "served by node 1 on a new connection");
}

#[test]
fn a_seed_that_refuses_connections_is_passed_over() {
    let fakes = Fakes::start(|_, _| Some(Duration::ZERO));
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // closed again at once
    let started = Instant::now();
    let mut seeds = vec![dead.to_string()];
    seeds.extend(fakes.seeds());
    let mut client = Client::builder().seeds(seeds).build().expect("the next seed answers");
    assert!(started.elapsed() < Duration::from_millis(500), "a refusal costs no wait: {:?}", started.elapsed());
    value(&client.get("k"));
}

#[test]
fn a_resolving_read_returns_the_merge_even_when_writing_it_back_fails() {
    let fakes = Fakes::start(|_, _| Some(Duration::ZERO));
    let mut client = Client::builder().seeds(fakes.seeds()).build().unwrap();
    let latest = |a: &String, b: &String| a.max(b).clone();
    let counters = Counters::default();
    metrics::with_local_recorder(&counters, || {
        let merged: Option<String> = client.get_resolved("conflict-ok", &latest).unwrap();
        assert!(merged.unwrap().ends_with("conflict-ok/b"), "the resolver's pick");
        assert_eq!(counters.get("ringkv_client_requests_total{op=put,outcome=ok}"), 1, "written back");
        let merged: Option<String> = client.get_resolved("conflict-unwritable", &latest).unwrap();
        assert!(merged.unwrap().ends_with("conflict-unwritable/b"), "the read still answers");
        assert_eq!(counters.get("ringkv_client_write_backs_failed_total{reason=unavailable}"), 1);
    });
}

#[test]
fn a_request_gets_its_own_timeout_over_the_clients() {
    // Every node answers gets after 400 ms.
    let fakes = Fakes::start(|_, _| Some(Duration::from_millis(400)));
    let mut client = Client::builder()
        .seeds(fakes.seeds())
        .request_timeout(Duration::from_secs(5))
        .hedged_reads(false)
        .build()
        .unwrap();
    let started = Instant::now();
    let quick = ReadOptions { timeout: Some(Duration::from_millis(150)), ..Default::default() };
    match client.get_with("k", &quick) {
        Err(ringkv_client::Error::Timeout { after, by_node: false }) => {
            assert!(after >= Duration::from_millis(150) && after < Duration::from_millis(400), "{after:?}")
        }
        other => panic!("expected the request's own timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(400));
    value(&client.get("k")); // the client's timeout leaves room for 400 ms
}
