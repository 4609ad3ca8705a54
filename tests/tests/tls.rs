//! TLS against real nodes (docs/SECURITY.md, "TLS"): a cluster whose peers
//! talk over TLS, clients (the library's blocking and async shells, the
//! CLI) that speak it, and everything that must be refused: plain TCP, a
//! client that trusts another CA or checks another name, a client without
//! a certificate where one is required, a node whose certificate another
//! CA signed, and settings that cannot work. Certificates are made at test
//! time. Each refusal is followed by a check that the node still serves.

use ringkv_client::{Client as LibClient, Error, Level, WriteOptions};
use ringkv_net::session::SessionError;
use ringkv_net::{Client, ClientConfig, ClientError};
use ringkv_tests::certs::{Ca, Leaf};
use ringkv_tests::harness::{cli, cli_env, eventually, free_ports, Cluster, Node, NodeSpec};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

fn node_ip(i: usize) -> String {
    format!("127.0.0.{}", i + 1)
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A library client seeded with `addr`, trusting `ca`'s PEM bundle.
fn lib_client(addr: SocketAddr, ca: &Path) -> Result<LibClient, Error> {
    LibClient::builder()
        .seed(addr.to_string())
        .tls_ca(ca)
        .connect_timeout(Duration::from_secs(2))
        .request_timeout(Duration::from_secs(5))
        .build()
}

fn tls_message(e: Error) -> String {
    match e {
        Error::Tls { message, .. } => message,
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[test]
fn a_tls_cluster_serves_tls_clients_and_refuses_plain_tcp_other_cas_and_other_names() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster");
    let certs: Vec<Leaf> = (0..3).map(|i| ca.node(&format!("n{}", i + 1), &[&node_ip(i)])).collect();
    // Peers gossip and replicate over TLS: without it working, the nodes
    // would never see each other up.
    let cluster = Cluster::start_with(dir.path(), 3, 1, &[], |i, spec| {
        spec.extra.extend(certs[i].server_flags(&ca.pem));
        spec.tls = Some(ca.client_tls(None));
    });
    let addr = |i: usize| cluster.node(i).addr();

    // Written through one node, read through another: blocking, then async.
    let mut writer = lib_client(addr(0), &ca.pem).expect("a TLS client connects");
    let all = WriteOptions { w: Some(Level::All), ..WriteOptions::default() };
    writer.put("colour", "teal", &all).expect("put over TLS");
    let mut reader = lib_client(addr(1), &ca.pem).unwrap();
    assert_eq!(reader.get("colour").unwrap().single(), Some(&b"teal"[..]));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client =
            LibClient::builder().seed(addr(2).to_string()).tls_ca(&ca.pem).build_async().await.expect("async over TLS");
        assert_eq!(client.get("colour").await.unwrap().single(), Some(&b"teal"[..]));
        client.put("shape", "round", &all).await.expect("async put over TLS");
    });
    assert_eq!(writer.get("shape").unwrap().single(), Some(&b"round"[..]));

    // Plain TCP is refused in ringkv's own protocol, with the reason.
    let plain = Client::connect(addr(0), &ClientConfig { timeout: Duration::from_secs(5), ..Default::default() });
    match plain {
        Err(ClientError::Session(SessionError::Refused(w))) => assert!(w.message.contains("TLS"), "{w}"),
        Err(e) => panic!("expected the node's refusal, got {e}"),
        Ok(_) => panic!("a plain client was served by a TLS node"),
    }
    let e = LibClient::builder().seed(addr(0).to_string()).build().expect_err("plain library client");
    assert!(e.to_string().contains("accepts TLS connections only"), "{e}");
    assert!(cluster.node(0).log().contains("refused a plain TCP connection"), "the refusal is logged");

    // Another CA, or another name: the client says which.
    let other = Ca::new(dir.path(), "other");
    let wrong_ca = tls_message(lib_client(addr(0), &other.pem).expect_err("untrusted certificate"));
    assert!(wrong_ca.contains("not signed by a CA trusted here"), "{wrong_ca}");
    let named = LibClient::builder().seed(addr(0).to_string()).tls_ca(&ca.pem).tls_server_name("db.example").build();
    let mismatch = tls_message(named.expect_err("a certificate for another name"));
    assert!(mismatch.contains("name mismatch"), "{mismatch}");

    // The CLI, with --tls-ca and by the environment.
    let (e0, e1) = (addr(0).to_string(), addr(1).to_string());
    let out = cli(&["put", "fruit", "plum", "--endpoint", &e0, "--w", "all", "--tls-ca", path(&ca.pem)], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli_env(&["get", "fruit", "--endpoint", &e1], None, &[("RINGKV_TLS_CA", path(&ca.pem))]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "plum", "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["status", "--endpoint", &e1, "--tls-ca", path(&ca.pem)], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["get", "fruit", "--endpoint", &e1], None);
    assert_eq!(out.status.code(), Some(3), "the node refused: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TLS"));
    let out = cli(&["get", "fruit", "--endpoint", &e1, "--tls-ca", path(&other.pem)], None);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not signed by a CA trusted here"));

    // A node whose certificate another CA signed cannot join, even though
    // it trusts the cluster's CA: the members refuse its certificate.
    let port = cluster.node(0).spec.port;
    let mut spec = Cluster::spec(dir.path(), 3, 4, port, 1, &[]);
    spec.extra = other.node("rogue", &[&node_ip(3)]).server_flags(&ca.pem);
    let mut rogue = Node::new(spec);
    rogue.spawn();
    eventually(Duration::from_secs(20), "the members to refuse the rogue's certificate", || {
        cluster.node(0).log().contains("TLS handshake failed") && rogue.log().contains("cannot connect to a peer")
    });
    for i in 0..3 {
        let members = cluster.node(i).client().node_info().unwrap().members;
        assert_eq!(members.len(), 3, "node {i} let the rogue in: {members:?}");
    }
    // Through all of this, the nodes kept serving.
    assert_eq!(reader.get("fruit").unwrap().single(), Some(&b"plum"[..]));
}

#[test]
fn with_client_certificates_required_only_clients_with_one_from_the_ca_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster");
    let other = Ca::new(dir.path(), "other");
    let alice = ca.client("alice");
    let mut spec = NodeSpec::single(dir.path(), 1);
    spec.extra = ca.node("n1", &["127.0.0.1"]).server_flags(&ca.pem);
    spec.extra.extend(["--tls-require-client-cert".into(), "--replicas".into(), "1".into()]);
    spec.tls = Some(ca.client_tls(Some(&alice)));
    let node = Node::start(spec);
    let seed = node.addr().to_string();

    let without = tls_message(lib_client(node.addr(), &ca.pem).expect_err("no client certificate"));
    assert!(without.contains("requires a client certificate"), "{without}");
    let stranger = other.client("mallory");
    let foreign = LibClient::builder().seed(&seed).tls_ca(&ca.pem).tls_client_cert(&stranger.cert, &stranger.key);
    let refused = tls_message(foreign.build().expect_err("a certificate from another CA"));
    assert!(refused.contains("refused this side's certificate"), "{refused}");

    let mut client = LibClient::builder()
        .seed(&seed)
        .tls_ca(&ca.pem)
        .tls_client_cert(&alice.cert, &alice.key)
        .build()
        .expect("a client with a certificate from the CA");
    client.put("k", "v", &WriteOptions::default()).unwrap();
    assert_eq!(client.get("k").unwrap().single(), Some(&b"v"[..]));
    let (cert, key) = (path(&alice.cert), path(&alice.key));
    let out =
        cli(&["get", "k", "--endpoint", &seed, "--tls-ca", path(&ca.pem), "--tls-cert", cert, "--tls-key", key], None);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v", "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["get", "k", "--endpoint", &seed, "--tls-ca", path(&ca.pem)], None);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn tls_settings_that_cannot_work_stop_the_node_with_one_line_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "cluster");
    let (n1, n2) = (ca.node("n1", &["127.0.0.1"]), ca.node("n2", &["127.0.0.1"]));
    let data = dir.path().join("data");
    let listen = format!("127.0.0.1:{}", free_ports(Ipv4Addr::LOCALHOST, 1));
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").unwrap();
    let cases: [(Vec<&str>, &str); 4] = [
        (vec!["--tls-cert", path(&n1.cert), "--tls-key", path(&n1.key)], "tls_cert needs tls_ca"),
        (vec!["--tls-cert", path(&n1.cert), "--tls-key", path(&n2.key), "--tls-ca", path(&ca.pem)], "tls_key:"),
        (
            vec!["--tls-cert", "/no/such.pem", "--tls-key", path(&n1.key), "--tls-ca", path(&ca.pem)],
            "tls_cert: cannot read",
        ),
        (vec!["--tls-cert", path(&n1.cert), "--tls-key", path(&n1.key), "--tls-ca", path(&garbage)], "tls_ca:"),
    ];
    for (flags, expected) in cases {
        let mut args = vec!["server", "--listen", &listen, "--data-dir", path(&data), "--shards", "1", "--no-pin"];
        args.extend(flags);
        let out = cli(&args, None);
        assert_eq!(out.status.code(), Some(1), "{expected}");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "one line of reason, got: {err}");
        assert!(lines[0].contains(expected), "{expected}: {err}");
    }
    assert!(!data.exists(), "nothing was created");
}
