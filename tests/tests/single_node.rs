//! One real `ringkv server` process: round trips through the CLI and the
//! client library, versions, bad input, and an unwritable data directory.

use ringkv_net::proto::{testing, Encoder, ErrorCode, Hello, Message, Request};
use ringkv_net::{Client, ClientConfig, ClientError, Level, WriteOptions};
use ringkv_tests::harness::{cli, Node, NodeSpec};
use ringkv_tests::raw::{self, closed, expect_error_then_close, read_frame};
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

fn node(shards: usize) -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().unwrap();
    let n = Node::start(NodeSpec::single(dir.path(), shards));
    (dir, n)
}

fn run(node: &Node, args: &[&str], stdin: Option<&[u8]>) -> std::process::Output {
    let ep = node.addr().to_string();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--endpoint", &ep]);
    cli(&all, stdin)
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn cli_put_get_delete_round_trip_including_binary_values_and_missing_keys() {
    let (_d, n) = node(2);
    let put = run(&n, &["put", "greeting", "hello world"], None);
    assert!(put.status.success(), "put failed: {}", stderr(&put));
    let get = run(&n, &["get", "greeting"], None);
    assert!(get.status.success());
    assert_eq!(get.stdout, b"hello world", "piped output is the raw value");

    // Binary values through stdin come back byte for byte.
    let binary: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
    assert!(run(&n, &["put", "blob", "-"], Some(&binary)).status.success());
    let got = run(&n, &["get", "blob"], None);
    assert_eq!(got.stdout, binary);
    let json: serde_json::Value = serde_json::from_slice(&run(&n, &["get", "blob", "--json"], None).stdout).unwrap();
    assert_eq!(json["encoding"], "base64");
    assert_eq!(json["key"], "blob");

    // A missing key: exit 1 and "not found" on stderr.
    let missing = run(&n, &["get", "no-such-key"], None);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("not found"), "stderr: {}", stderr(&missing));

    // Delete, then the key is gone.
    assert!(run(&n, &["delete", "greeting"], None).status.success());
    let gone = run(&n, &["get", "greeting"], None);
    assert_eq!(gone.status.code(), Some(1));
    assert!(stderr(&gone).contains("not found"));
}

#[test]
fn cli_siblings_are_shown_and_resolved_with_the_json_context() {
    let (_d, n) = node(1);
    assert!(run(&n, &["put", "k", "left"], None).status.success());
    assert!(run(&n, &["put", "k", "right"], None).status.success());
    let json: serde_json::Value = serde_json::from_slice(&run(&n, &["get", "k", "--json"], None).stdout).unwrap();
    assert_eq!(json["values"], serde_json::json!(["left", "right"]));
    let ctx = json["context"].as_str().unwrap().to_string();
    assert!(run(&n, &["put", "k", "merged", "--context", &ctx], None).status.success());
    let after: serde_json::Value = serde_json::from_slice(&run(&n, &["get", "k", "--json"], None).stdout).unwrap();
    assert_eq!(after["values"], serde_json::json!(["merged"]));
    let bad = run(&n, &["put", "k", "x", "--context", "not-a-context!"], None);
    assert_eq!(bad.status.code(), Some(2), "a malformed context is a usage error");
}

#[test]
fn client_round_trips_versions_and_pipelining() {
    let (_d, n) = node(2);
    let mut c = n.client();
    assert!(!c.get(b"absent", Level::Default).unwrap().found);

    // Two blind writes: two siblings. A write with the read's context: one.
    c.put(b"doc", b"v1", &WriteOptions::default()).unwrap();
    c.put(b"doc", b"v2", &WriteOptions::default()).unwrap();
    let g = c.get(b"doc", Level::Default).unwrap();
    assert_eq!(g.values, vec![b"v1".to_vec(), b"v2".to_vec()]);
    let opts = WriteOptions { context: g.context, ..Default::default() };
    c.put(b"doc", b"v3", &opts).unwrap();
    assert_eq!(c.get(b"doc", Level::Default).unwrap().values, vec![b"v3".to_vec()]);

    // Pipelined requests on one connection, across both shards.
    let puts = (0..200).map(|i| Request::Put {
        key: format!("p{i}").into_bytes(),
        value: vec![i as u8; 100],
        context: vec![],
        w: Level::Default,
        durable: None,
    });
    let ids = c.send_batch(puts).unwrap();
    for id in ids {
        c.wait(id).unwrap();
    }
    let gets = (0..200).map(|i| Request::Get { key: format!("p{i}").into_bytes(), r: Level::Default });
    let ids = c.send_batch(gets).unwrap();
    for (i, id) in ids.into_iter().enumerate() {
        match c.wait(id).unwrap() {
            ringkv_net::Reply::Get(g) => assert_eq!(g.values, vec![vec![i as u8; 100]]),
            other => panic!("unexpected {other:?}"),
        }
    }
    let info = c.node_info().unwrap();
    assert_eq!(info.shards.len(), 2);
    assert_eq!(info.shards.iter().map(|s| s.keys).sum::<u64>(), 201);
    assert!(info.shards.iter().all(|s| s.keys > 0), "keys spread over both shards");
}

#[test]
fn a_delete_without_context_removes_what_the_node_holds() {
    let (_d, n) = node(1);
    let mut c = n.client();
    c.put(b"k", b"a", &WriteOptions::default()).unwrap();
    c.put(b"k", b"b", &WriteOptions::default()).unwrap();
    c.delete(b"k", &WriteOptions::default()).unwrap();
    let g = c.get(b"k", Level::Default).unwrap();
    assert!(!g.found);
    assert!(!g.context.is_empty(), "a deleted key still has a context, so a later write can supersede it");
    c.put(b"k", b"again", &WriteOptions { context: g.context, ..Default::default() }).unwrap();
    assert_eq!(c.get(b"k", Level::Default).unwrap().values, vec![b"again".to_vec()]);
}

fn server_error(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[test]
fn oversized_pairs_and_bad_keys_are_refused_and_the_connection_stays_usable() {
    let (_d, n) = node(1);
    let mut c = n.client();
    let big = vec![7u8; 10 * 1024];
    assert_eq!(server_error(c.put(b"k", &big, &WriteOptions::default())), ErrorCode::PairTooLarge);
    assert!(!c.get(b"k", Level::Default).unwrap().found, "nothing was written");
    assert_eq!(server_error(c.put(b"", b"v", &WriteOptions::default())), ErrorCode::BadRequest);
    assert_eq!(server_error(c.get(&[b'x'; 1025], Level::Default)), ErrorCode::BadRequest);
    assert_eq!(server_error(c.get(b"k", Level::Count(4))), ErrorCode::BadRequest, "r above N=3");
    let bad_ctx = WriteOptions { context: vec![9, 9, 9], ..Default::default() };
    assert_eq!(server_error(c.put(b"k", b"v", &bad_ctx)), ErrorCode::BadRequest);
    // The largest pair that fits is accepted on the same connection.
    let fits = vec![1u8; 10 * 1024 - 1];
    c.put(b"k", &fits, &WriteOptions::default()).unwrap();
    assert_eq!(c.get(b"k", Level::Default).unwrap().values, vec![fits]);
}

fn raw(n: &Node) -> TcpStream {
    raw::client(n.addr())
}

#[test]
fn malformed_frames_get_an_error_and_only_that_connection_closes() {
    let (_d, n) = node(2);
    let mut bystander = n.client();
    bystander.put(b"safe", b"value", &WriteOptions::default()).unwrap();

    // A frame header announcing 1 GiB: refused before anything is buffered.
    let mut s = raw(&n);
    s.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
    expect_error_then_close(&mut s, ErrorCode::FrameTooLarge);

    // A frame whose payload is not a verifiable flatbuffer.
    let mut s = raw(&n);
    let junk: Vec<u8> = (0..64u32).map(|i| (i * 97 + 13) as u8).collect();
    s.write_all(&(junk.len() as u32).to_le_bytes()).unwrap();
    s.write_all(&junk).unwrap();
    expect_error_then_close(&mut s, ErrorCode::MalformedFrame);

    // Garbage instead of a hello.
    let mut s = TcpStream::connect(n.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(matches!(read_frame(&mut s), Some(Message::Error(_)) | None));
    assert!(closed(&mut s));

    // A hello of a protocol version this node does not speak: refused with
    // the versions named, not misread.
    let mut s = TcpStream::connect(n.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let future = Hello { protocol_version: ringkv_net::proto::PROTOCOL_VERSION + 1, ..Hello::client("ringkv") };
    s.write_all(&Encoder::new().to_vec(&Message::Hello(future))).unwrap();
    match read_frame(&mut s) {
        Some(Message::Error(e)) => {
            assert_eq!(e.code, ErrorCode::ProtocolMismatch);
            assert_eq!(e.message, "protocol version 2 is not supported (this node speaks 1)");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
    assert!(closed(&mut s));

    // A hello for another cluster.
    let mut s = TcpStream::connect(n.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&Encoder::new().to_vec(&Message::Hello(Hello::client("someone-else")))).unwrap();
    expect_error_then_close(&mut s, ErrorCode::ClusterMismatch);

    // A well-formed request of an unknown type: an error response, and the
    // connection keeps working.
    let mut s = raw(&n);
    s.write_all(&testing::request_with_unknown_type(41, 200)).unwrap();
    match read_frame(&mut s) {
        Some(Message::Response(r)) => {
            assert_eq!(r.id, 41);
            assert_eq!(r.result.unwrap_err().code, ErrorCode::UnknownMessage);
        }
        other => panic!("expected an error response, got {other:?}"),
    }
    let ping = Message::Request(ringkv_net::proto::RequestFrame {
        id: 42,
        timeout_ms: 0,
        hops: 0,
        body: Request::Ping { payload: b"still here".to_vec() },
    });
    s.write_all(&Encoder::new().to_vec(&ping)).unwrap();
    assert!(matches!(read_frame(&mut s), Some(Message::Response(r)) if r.id == 42 && r.result.is_ok()));

    // Everyone else never noticed.
    assert_eq!(bystander.get(b"safe", Level::Default).unwrap().values, vec![b"value".to_vec()]);
    let mut fresh = n.client();
    fresh.ping().unwrap();
}

#[test]
fn a_slow_or_silent_client_does_not_block_others() {
    let (_d, n) = node(1);
    // Half a frame, then silence: the server must keep serving others.
    let mut s = raw(&n);
    s.write_all(&100u32.to_le_bytes()).unwrap();
    s.write_all(&[1, 2, 3]).unwrap();
    let mut c = n.client();
    c.set_timeout(Duration::from_secs(5)).unwrap();
    for i in 0..50 {
        c.put(format!("k{i}").as_bytes(), b"v", &WriteOptions::default()).unwrap();
    }
    drop(s);
}

#[test]
fn an_unusable_data_directory_stops_start_up_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let port = ringkv_tests::harness::free_ports(std::net::Ipv4Addr::LOCALHOST, 1).to_string();
    let data = file.join("data");
    let out = cli(
        &["server", "--listen", &format!("127.0.0.1:{port}"), "--data-dir", data.to_str().unwrap(), "--shards", "1"],
        None,
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line of reason, got: {err}");
    assert!(lines[0].contains("data directory") && lines[0].contains("a-file"), "{err}");
}

#[test]
fn status_reports_node_shards_and_keys() {
    let (_d, n) = node(2);
    let mut c = n.client();
    for i in 0..10 {
        c.put(format!("key{i}").as_bytes(), b"x", &WriteOptions::default()).unwrap();
    }
    c.delete(b"key0", &WriteOptions::default()).unwrap();
    let out = run(&n, &["status", "--json"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["node_id"], "n1");
    assert_eq!(s["keys"], 9);
    assert_eq!(s["tombstones"], 1);
    assert_eq!(s["shards"].as_array().unwrap().len(), 2);
    assert!(s["disk_bytes"].as_u64().unwrap() > 0);
    let text = stdout(&run(&n, &["status"], None));
    assert!(text.contains("n1") && text.contains("total"), "{text}");
}

#[test]
fn a_wrong_cluster_name_is_refused_by_the_client_library() {
    let (_d, n) = node(1);
    let cfg = ClientConfig { cluster: "other".into(), ..Default::default() };
    match Client::connect(n.addr(), &cfg) {
        Err(ClientError::Session(e)) => assert!(e.to_string().contains("cluster"), "{e}"),
        Err(e) => panic!("wrong error {e}"),
        Ok(_) => panic!("connected to the wrong cluster"),
    }
}
