//! Strangers and bad clients against a real node: authentication of peers
//! and clients, the handshake and idle timeouts, the limits on connections,
//! requests in flight and unwritten responses, and the refusal to listen
//! beyond loopback without credentials (docs/SECURITY.md). Each test also
//! checks that a well-behaved client on another connection is still served.

use ringkv_net::auth::{self, Credentials, Direction, Transcript};
use ringkv_net::proto::{ErrorCode, Hello, Message, Reply, Request, Role};
use ringkv_net::session::{Event, Session, SessionError};
use ringkv_net::{Client, ClientConfig, ClientError, Level, WriteOptions};
use ringkv_tests::harness::{cli, cli_env, free_ports, Cluster, Node, NodeSpec};
use ringkv_tests::raw::{self, expect_error_then_close, read_frame};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

const SECRET: &str = "cluster-secret-for-tests-0123";
const TOKEN: &str = "client-token-for-tests-0123";

/// A one-shard node whose settings are `toml` plus credentials: the cluster
/// secret, [`TOKEN`], and the user alice (password "wonderland").
fn secured(toml: &str) -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let settings = format!(
        "{toml}\ncluster_secret = \"{SECRET}\"\nauth_tokens = [\"{TOKEN}\"]\n[auth_users]\nalice = \"wonderland\"\n"
    );
    let mut spec = NodeSpec::single(dir.path(), 1);
    spec.extra = vec!["--config".into(), write_config(dir.path(), &settings)];
    spec.credentials = Some(Credentials::Token(TOKEN.into()));
    (dir, Node::start(spec))
}

fn write_config(dir: &Path, toml: &str) -> String {
    let path = dir.join("node.toml");
    std::fs::write(&path, toml).unwrap();
    path.to_str().unwrap().to_string()
}

fn config(creds: Option<Credentials>) -> ClientConfig {
    ClientConfig { timeout: Duration::from_secs(5), credentials: creds, ..Default::default() }
}

/// A raw stream that has done the handshake with `creds`.
fn authed(addr: SocketAddr, creds: Credentials) -> TcpStream {
    let s = Client::connect(addr, &config(Some(creds))).unwrap().into_stream().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// The refusal a connection attempt got from the node.
fn refusal(r: Result<Client, ClientError>) -> ringkv_net::proto::WireError {
    match r {
        Err(ClientError::Session(SessionError::Refused(w))) => w,
        Err(e) => panic!("expected a refusal from the node, got {e}"),
        Ok(_) => panic!("the node accepted the connection"),
    }
}

/// Drives `session`'s handshake over `s` until the node acknowledges.
fn shake(s: &mut TcpStream, session: &mut Session) -> Result<(), SessionError> {
    loop {
        s.write_all(&session.take_output()).unwrap();
        match session.poll()? {
            Some(Event::Connected(_)) => return Ok(()),
            Some(Event::Response(r)) => panic!("a response before the handshake ended: {r:?}"),
            None if !session.output().is_empty() => continue,
            None => {}
        }
        let n = s.read(session.read_buffer(4096)).expect("the node answers");
        assert!(n > 0, "the node closed the connection");
        session.commit_read(n);
    }
}

/// Connects as the peer `n9` proving `secret`, and sends `body`.
fn as_peer(addr: SocketAddr, secret: &str, body: Request) -> Result<Reply, SessionError> {
    let hello = Hello { role: Role::Peer, node_id: "n9".into(), ..Hello::client("ringkv") };
    let mut session = Session::with_credentials(hello, Some(Credentials::ClusterSecret(secret.into())));
    let mut s = raw::connect(addr);
    shake(&mut s, &mut session)?;
    session.send(body, 0);
    s.write_all(&session.take_output()).unwrap();
    loop {
        if let Some(Event::Response(r)) = session.poll()? {
            return Ok(r.result.expect("the peer request succeeds"));
        }
        let n = s.read(session.read_buffer(4096)).expect("the node answers");
        assert!(n > 0, "the node closed the connection");
        session.commit_read(n);
    }
}

/// A client connection with a 64 KiB receive buffer (no autotuning), so
/// what the node cannot write stays in the node, authenticated with `creds`.
fn small_window_client(addr: SocketAddr, creds: Credentials) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(64 << 10).unwrap();
    sock.connect_timeout(&addr.into(), Duration::from_secs(5)).unwrap();
    let mut s: TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut session = Session::with_credentials(Hello::client("ringkv"), Some(creds));
    shake(&mut s, &mut session).unwrap();
    s
}

#[test]
fn a_stranger_cannot_act_as_a_peer_without_the_cluster_secret() {
    let (_d, n) = secured("");
    let mut bystander = n.client();
    bystander.put(b"k", b"v", &WriteOptions::default()).unwrap();

    // A peer hello that offers no proof is refused at once.
    let mut s = raw::connect(n.addr());
    let intruder = Hello { role: Role::Peer, node_id: "intruder".into(), ..Hello::client("ringkv") };
    raw::send(&mut s, &Message::Hello(intruder.clone()));
    let why = expect_error_then_close(&mut s, ErrorCode::Unauthorized);
    assert_eq!(why, "this node requires peers to prove the cluster secret");

    // One that answers the challenge with a guess of the secret is refused
    // too, and gets no hello ack (so no request of its is ever read).
    let mut s = raw::connect(n.addr());
    let hello = Hello { auth_nonce: auth::nonce(), ..intruder };
    raw::send(&mut s, &Message::Hello(hello.clone()));
    let Some(Message::Challenge(ch)) = read_frame(&mut s) else { panic!("expected a challenge") };
    let t = Transcript {
        cluster: "ringkv",
        role: "peer",
        identity: "intruder",
        connecting_nonce: &hello.auth_nonce,
        node_nonce: &ch.nonce,
    };
    raw::send(&mut s, &Message::Auth { proof: auth::proof(b"a-guess-at-the-secret", Direction::Connecting, &t) });
    raw::send(&mut s, &raw::request(1, Request::ReplicaRead { key: b"k".to_vec() }));
    assert_eq!(expect_error_then_close(&mut s, ErrorCode::Unauthorized), "wrong credentials");

    // The client library, given a wrong secret, stops at the node's proof.
    let e = as_peer(n.addr(), "not-the-cluster-secret", Request::ReplicaRead { key: b"k".to_vec() }).unwrap_err();
    assert!(e.to_string().contains("could not prove it knows the cluster secret"), "{e}");

    // An authenticated client may not send what only peers may.
    let mut c = n.client();
    let write =
        Request::ReplicaWrite { key: b"k".to_vec(), object: vec![1, 2, 3], durable: true, hint_for: String::new() };
    let purge = Request::Purge { key: b"k".to_vec(), object: vec![] };
    let batch = || Request::ReadBatch { keys: vec![b"k".to_vec()] };
    for body in [write, purge, batch()] {
        match c.call(body) {
            Err(ClientError::Server(w)) => {
                assert_eq!(w.code, ErrorCode::Unauthorized);
                assert!(w.message.contains("node-to-node request"), "{w}");
            }
            other => panic!("a peer-only request on a client connection: {other:?}"),
        }
    }
    c.ping().expect("the connection stays usable");

    // With the secret, the same request is served.
    match as_peer(n.addr(), SECRET, batch()).unwrap() {
        Reply::ReadBatch { entries } => assert_eq!(entries.len(), 1, "the key is found"),
        other => panic!("{other:?}"),
    }
    assert_eq!(bystander.get(b"k", Level::Default).unwrap().values, vec![b"v".to_vec()]);
}

#[test]
fn clients_authenticate_with_a_configured_token_or_user_and_nothing_else() {
    let (_d, n) = secured("");
    let mut bystander = n.client();

    let w = refusal(Client::connect(n.addr(), &config(None)));
    assert_eq!(
        (w.code, w.message.as_str()),
        (ErrorCode::Unauthorized, "this node requires credentials (a token, or a user and password)")
    );
    let wrong = [
        Credentials::Token("client-token-for-tests-0124".into()),
        Credentials::Token(SECRET.into()),
        Credentials::User { name: "alice".into(), password: "Wonderland".into() },
        Credentials::User { name: "bob".into(), password: "wonderland".into() },
    ];
    for creds in wrong {
        let w = refusal(Client::connect(n.addr(), &config(Some(creds.clone()))));
        assert_eq!((w.code, w.message.as_str()), (ErrorCode::Unauthorized, "wrong credentials"), "{creds:?}");
    }
    let alice = Credentials::User { name: "alice".into(), password: "wonderland".into() };
    Client::connect(n.addr(), &config(Some(alice))).unwrap().ping().unwrap();

    // The CLI: a token by flag or environment, a user with the password in
    // the environment; without them, one line naming what is missing.
    let ep = n.addr().to_string();
    let put = cli(&["put", "greeting", "hi", "--endpoint", &ep, "--token", TOKEN], None);
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
    let get = cli_env(&["get", "greeting", "--endpoint", &ep], None, &[("RINGKV_TOKEN", TOKEN)]);
    assert_eq!(get.stdout, b"hi");
    let env = [("RINGKV_USER", "alice"), ("RINGKV_PASSWORD", "wonderland")];
    assert_eq!(cli_env(&["get", "greeting", "--endpoint", &ep], None, &env).stdout, b"hi");
    let anon = cli(&["get", "greeting", "--endpoint", &ep], None);
    assert_eq!(anon.status.code(), Some(3));
    let err = String::from_utf8_lossy(&anon.stderr);
    assert!(err.contains("Unauthorized: this node requires credentials"), "{err}");
    let bad = cli(&["get", "greeting", "--endpoint", &ep, "--token", "client-token-for-tests-0124"], None);
    assert_eq!(bad.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("wrong credentials"));
    let no_pw = cli(&["get", "greeting", "--endpoint", &ep, "--user", "alice"], None);
    assert_eq!(no_pw.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_pw.stderr).contains("RINGKV_PASSWORD"));

    bystander.ping().unwrap();
}

#[test]
fn slow_handshakes_and_idle_connections_are_closed() {
    let (_d, n) = secured("handshake_timeout_ms = 500\nidle_timeout_ms = 1500");

    // Slowloris: three bytes of a frame header, then nothing.
    let started = Instant::now();
    let mut s = raw::connect(n.addr());
    s.write_all(&[40, 0, 0]).unwrap();
    let why = expect_error_then_close(&mut s, ErrorCode::Timeout);
    assert_eq!(why, "handshake not done within 500 ms");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(450) && took < Duration::from_secs(3), "{took:?}");

    // A hello, and then the challenge is never answered.
    let mut s = raw::connect(n.addr());
    raw::send(&mut s, &Message::Hello(Hello { auth_nonce: auth::nonce(), ..Hello::client("ringkv") }));
    assert!(matches!(read_frame(&mut s), Some(Message::Challenge(_))));
    expect_error_then_close(&mut s, ErrorCode::Timeout);

    // Done with the handshake, then silent with nothing in flight, while
    // another client that keeps talking is served throughout.
    let mut bystander = n.client();
    let talking = std::thread::spawn(move || {
        for _ in 0..8 {
            bystander.ping().unwrap();
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let started = Instant::now();
    let mut s = authed(n.addr(), Credentials::Token(TOKEN.into()));
    assert_eq!(expect_error_then_close(&mut s, ErrorCode::Timeout), "idle for 1500 ms: closing");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(4), "{took:?}");
    talking.join().unwrap();
}

/// The node's resident memory, from /proc.
fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/pid/status");
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

#[test]
fn a_client_that_pipelines_without_reading_is_bounded() {
    let limits = "max_in_flight_per_connection = 8\nmax_frame_bytes = 65536\nmax_output_buffer_bytes = 65536\n\
                  write_stall_timeout_ms = 1000";
    let (_d, n) = secured(limits);
    let mut bystander = n.client();
    let token = || Credentials::Token(TOKEN.into());

    // 200 requests in one write: past 8 in flight (until their answers are
    // written) they are answered Overloaded at once, and all are answered.
    let mut s = authed(n.addr(), token());
    let burst: Vec<u8> = (1..=200u64)
        .flat_map(|id| ringkv_net::proto::Encoder::new().to_vec(&raw::request(id, Request::Ping { payload: vec![] })))
        .collect();
    s.write_all(&burst).unwrap();
    let (mut pongs, mut overloaded) = (0, 0);
    for _ in 0..200 {
        match read_frame(&mut s) {
            Some(Message::Response(r)) => match r.result {
                Ok(Reply::Pong { .. }) => pongs += 1,
                Err(e) if e.code == ErrorCode::Overloaded => {
                    assert_eq!(e.message, "8 requests already in flight on this connection");
                    overloaded += 1;
                }
                other => panic!("{other:?}"),
            },
            other => panic!("expected a response, got {other:?}"),
        }
    }
    assert!(pongs >= 8 && overloaded > 0, "{pongs} pongs, {overloaded} overloaded");
    drop(s);

    // 256 MiB of 32 KiB pings, never reading the echoes: the node stops
    // reading once its output bound is reached, and closes the connection
    // when the answers cannot be written for the stall timeout. Before
    // this bound the node buffered every answer.
    let before = rss_bytes(n.pid());
    let mut s = small_window_client(n.addr(), token());
    let ping = ringkv_net::proto::Encoder::new().to_vec(&raw::request(1, Request::Ping { payload: vec![7; 32 << 10] }));
    let total = 8192 * ping.len();
    let started = Instant::now();
    let mut writer = s.try_clone().unwrap();
    let pushed = std::thread::spawn(move || {
        let mut sent = 0;
        while sent < total && writer.write_all(&ping).is_ok() {
            sent += ping.len();
        }
        sent
    });
    let mut peak = before;
    while !pushed.is_finished() {
        peak = peak.max(rss_bytes(n.pid()));
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = pushed.join().unwrap();
    assert!(sent < total / 4, "the node kept reading: {sent} of {total} bytes taken");
    let grew = peak.saturating_sub(before);
    assert!(grew < 32 << 20, "node memory grew by {grew} bytes");
    // What the kernel buffered can still be read, then the connection ends.
    let mut sink = vec![0u8; 1 << 16];
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ended = loop {
        match s.read(&mut sink) {
            Ok(0) => break true,
            Ok(_) => {}
            Err(e) => break e.kind() != std::io::ErrorKind::WouldBlock,
        }
    };
    assert!(ended, "the node still holds the connection");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(n.log().contains("closing a connection that does not read its responses"), "{}", n.log());
    bystander.ping().unwrap();
}

#[test]
fn connections_past_the_node_limit_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = NodeSpec::single(dir.path(), 1);
    spec.extra = vec!["--max-connections".into(), "3".into()];
    let n = Node::start(spec);
    // The harness's start-up connections are gone once a fresh one is served.
    let deadline = Instant::now() + Duration::from_secs(5);
    let held: Vec<TcpStream> = (0..3)
        .map(|_| loop {
            let mut s = raw::connect(n.addr());
            raw::send(&mut s, &Message::Hello(Hello::client("ringkv")));
            match read_frame(&mut s) {
                Some(Message::HelloAck(_)) => break s,
                other => assert!(Instant::now() < deadline, "{other:?}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        })
        .collect();
    let mut s = raw::connect(n.addr());
    assert_eq!(expect_error_then_close(&mut s, ErrorCode::Overloaded), "node has 3 connections already");
    drop(held);
    // Freed slots are usable again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while n.try_client().and_then(|mut c| c.ping().ok()).is_none() {
        assert!(Instant::now() < deadline, "no connection accepted after others closed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn without_credentials_a_node_will_not_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_ports(Ipv4Addr::LOCALHOST, 1).to_string();
    let listen = format!("0.0.0.0:{port}");
    let args = ["server", "--listen", &listen, "--data-dir", data.to_str().unwrap(), "--shards", "1"];
    let out = cli(&args, None);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of reason, got: {err}");
    assert!(lines[0].contains("refusing to listen on 0.0.0.0 without cluster_secret and client credentials"), "{err}");
    // A secret alone still leaves clients anonymous.
    let secret = dir.path().join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let with_secret: Vec<&str> =
        args.iter().copied().chain(["--cluster-secret-file", secret.to_str().unwrap()]).collect();
    let out = cli(&with_secret, None);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("without client credentials"));
    assert!(!data.exists(), "nothing was created");
}

#[test]
fn nodes_that_share_the_cluster_secret_replicate_to_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let c = Cluster::start(dir.path(), 2, 1, &["--cluster-secret-file", secret.to_str().unwrap(), "--replicas", "2"]);
    // w = all: the write needs the other node, over an authenticated peer
    // connection. A node that tried its peer before that peer was up fails
    // fast for a moment after (peer.rs backs off), even once gossip from the
    // peer has shown it alive: so a few tries.
    let all = WriteOptions { w: Level::All, ..Default::default() };
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = c.node(0).client().put(b"shared", b"secret", &all) {
        assert!(Instant::now() < deadline, "{e}; log:\n{}", c.node(0).log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = c.node(1).client().get(b"shared", Level::All).unwrap();
    // A retried blind write may leave equal siblings; any value but ours is wrong.
    assert!(!got.values.is_empty() && got.values.iter().all(|v| v == b"secret"), "{:?}", got.values);
    for node in &c.nodes {
        assert!(!node.log().contains("refused the handshake"), "{}", node.log());
    }
    // And the forged peer is still turned away here.
    let mut s = raw::connect(c.node(0).addr());
    raw::send(&mut s, &Message::Hello(Hello { role: Role::Peer, node_id: "n9".into(), ..Hello::client("ringkv") }));
    expect_error_then_close(&mut s, ErrorCode::Unauthorized);
}
