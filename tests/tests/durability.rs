//! Durability of one node: SIGKILL mid-load, torn log tails, a full disk.

use ringkv_engine::store::{format, segment};
use ringkv_net::{Client, ClientConfig, ClientError, ErrorCode, Level, Reply, Request, WriteOptions};
use ringkv_tests::harness::{Node, NodeSpec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What one writer knows about one key it owns.
#[derive(Default, Clone, Debug)]
struct KeyLog {
    /// The last value whose put was acknowledged, and its context.
    acked: Option<Vec<u8>>,
    context: Vec<u8>,
    /// A put sent but never answered (the node died): it may or may not be there.
    in_doubt: Option<Vec<u8>>,
}

struct WriterResult {
    keys: HashMap<Vec<u8>, KeyLog>,
    acked_writes: u64,
}

/// Writes to its own keys until the node dies or its bounds are hit. Each put
/// carries the context of the key's previous acknowledged put, so the latest
/// acknowledged value supersedes all earlier ones. Pipelined writers keep a
/// batch of puts (to distinct keys) in flight on one connection.
fn writer(
    addr: std::net::SocketAddr,
    id: usize,
    pipelined: bool,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
) -> WriterResult {
    const KEYS: usize = 40;
    const MAX_OPS: u64 = 50_000;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut keys: HashMap<Vec<u8>, KeyLog> = HashMap::new();
    let mut acked_writes = 0u64;
    let cfg = ClientConfig { timeout: Duration::from_secs(5), ..Default::default() };
    let mut c = Client::connect(addr, &cfg).expect("writer connects");
    let batch = if pipelined { 8 } else { 1 };
    let mut seq = 0u64;
    'run: while !stop.load(Ordering::Relaxed) && acked_writes < MAX_OPS && Instant::now() < deadline {
        let mut sent = Vec::with_capacity(batch);
        for b in 0..batch {
            let k = format!("w{id}/k{}", (seq as usize * batch + b) % KEYS).into_bytes();
            let value = format!("w{id}-{}-{seq}", String::from_utf8_lossy(&k)).into_bytes();
            let log = keys.entry(k.clone()).or_default();
            let req = Request::Put {
                key: k.clone(),
                value: value.clone(),
                context: log.context.clone(),
                w: Level::Default,
                durable: None,
            };
            match c.send(req) {
                Ok(rid) => sent.push((rid, k, value)),
                Err(_) => {
                    log.in_doubt = Some(value);
                    for (_, k, v) in sent {
                        keys.get_mut(&k).expect("sent key").in_doubt = Some(v);
                    }
                    break 'run;
                }
            }
        }
        seq += 1;
        let mut failed = false;
        for (rid, k, v) in sent {
            let log = keys.get_mut(&k).expect("sent key");
            if failed {
                log.in_doubt = Some(v);
                continue;
            }
            match c.wait(rid) {
                Ok(Reply::Put { context }) => {
                    log.acked = Some(v);
                    log.context = context;
                    log.in_doubt = None;
                    acked_writes += 1;
                    acks.fetch_add(1, Ordering::Relaxed);
                }
                Ok(other) => panic!("unexpected reply {other:?}"),
                Err(ClientError::Server(e)) => panic!("server refused a valid put: {e}"),
                Err(_) => {
                    log.in_doubt = Some(v);
                    failed = true;
                }
            }
        }
        if failed {
            break;
        }
    }
    WriterResult { keys, acked_writes }
}

#[test]
fn sigkill_mid_load_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(NodeSpec::single(dir.path(), 2));
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..6)
        .map(|i| {
            let (addr, stop, acks) = (node.addr(), stop.clone(), acks.clone());
            std::thread::spawn(move || writer(addr, i, i % 2 == 1, stop, acks))
        })
        .collect();
    // Let the load build up, then pull the plug while writes are in flight.
    let until = Instant::now() + Duration::from_secs(10);
    while acks.load(Ordering::Relaxed) < 3000 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    node.kill();
    stop.store(true, Ordering::Relaxed);
    let results: Vec<WriterResult> = writers.into_iter().map(|w| w.join().expect("writer thread")).collect();
    let acked: u64 = results.iter().map(|r| r.acked_writes).sum();
    assert!(acked >= 500, "the load ran before the kill ({acked} acked writes)");

    node.restart();
    let mut c = node.client();
    let (mut keys_checked, mut in_doubt_landed, mut in_doubt_lost) = (0, 0, 0);
    for r in &results {
        for (key, log) in &r.keys {
            let got = c.get(key, Level::Default).unwrap();
            let mut allowed: Vec<&Vec<u8>> = log.acked.iter().collect();
            allowed.extend(log.in_doubt.iter());
            match got.values.as_slice() {
                [] => assert!(log.acked.is_none(), "{}: acknowledged write lost", String::from_utf8_lossy(key)),
                [v] => {
                    assert!(
                        allowed.contains(&v),
                        "{}: read {:?}, which was never the latest write (acked {:?}, in doubt {:?})",
                        String::from_utf8_lossy(key),
                        String::from_utf8_lossy(v),
                        log.acked.as_ref().map(|a| String::from_utf8_lossy(a).into_owned()),
                        log.in_doubt.as_ref().map(|a| String::from_utf8_lossy(a).into_owned()),
                    );
                    if log.in_doubt.as_ref() == Some(v) {
                        in_doubt_landed += 1;
                    }
                }
                many => {
                    panic!("{}: {} siblings from a single sequential writer", String::from_utf8_lossy(key), many.len())
                }
            }
            if log.in_doubt.is_some() && got.values.first() != log.in_doubt.as_ref() {
                in_doubt_lost += 1;
            }
            if log.acked.is_some() {
                keys_checked += 1;
            }
        }
    }
    println!(
        "crash test: {acked} acknowledged writes over {keys_checked} keys; every key's latest acknowledged value \
         survived SIGKILL; {in_doubt_landed} in-flight writes landed, {in_doubt_lost} did not"
    );
}

#[test]
fn sigkill_while_compaction_runs_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = NodeSpec::single(dir.path(), 1);
    // Small segments and eager compaction: rewrites run all the time.
    spec.extra = ["--segment-mb", "1", "--compaction-interval-s", "1", "--compaction-garbage-ratio", "0.2"]
        .map(String::from)
        .to_vec();
    let mut node = Node::start(spec);
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..4)
        .map(|i| {
            let (addr, stop, acks) = (node.addr(), stop.clone(), acks.clone());
            std::thread::spawn(move || writer(addr, i, false, stop, acks))
        })
        .collect();
    let compactions = || {
        node.try_client()
            .and_then(|mut c| c.node_info().ok())
            .map_or(0, |i| i.shards.iter().map(|s| s.compactions).sum())
    };
    let until = Instant::now() + Duration::from_secs(20);
    while (compactions() < 3 || acks.load(Ordering::Relaxed) < 4000) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    let compacted = compactions();
    assert!(compacted >= 3, "compaction ran before the kill ({compacted})");
    node.kill();
    stop.store(true, Ordering::Relaxed);
    let results: Vec<WriterResult> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    node.restart();
    let mut c = node.client();
    let mut checked = 0;
    for r in &results {
        for (key, log) in &r.keys {
            let got = c.get(key, Level::Default).unwrap();
            let allowed: Vec<&Vec<u8>> = log.acked.iter().chain(log.in_doubt.iter()).collect();
            match got.values.as_slice() {
                [] => assert!(log.acked.is_none(), "{}: acknowledged write lost", String::from_utf8_lossy(key)),
                [v] => assert!(allowed.contains(&v), "{}: unexpected value", String::from_utf8_lossy(key)),
                many => panic!("{}: {} siblings", String::from_utf8_lossy(key), many.len()),
            }
            checked += 1;
        }
    }
    let acked: u64 = results.iter().map(|r| r.acked_writes).sum();
    println!("kill -9 during compaction: {acked} acknowledged writes over {checked} keys, {compacted} segments compacted before the kill; all intact");
}

/// The segment holding the last record, and that record's start and end.
fn last_record(dir: &Path) -> (PathBuf, usize, usize) {
    for id in segment::list_segments(dir).unwrap().into_iter().rev() {
        let path = segment::segment_path(dir, id);
        let bytes = std::fs::read(&path).unwrap();
        let mut pos = format::HEADER_BYTES as usize;
        let mut last = None;
        while let Ok(Some(r)) = format::decode_record(&bytes[pos..]) {
            last = Some((pos, pos + r.len));
            pos += r.len;
        }
        if let Some((s, e)) = last {
            return (path, s, e);
        }
    }
    panic!("no records in {}", dir.display());
}

#[test]
fn a_torn_tail_is_truncated_on_restart_and_the_rest_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(NodeSpec::single(dir.path(), 1));
    let mut c = node.client();
    for i in 0..100 {
        c.put(format!("key{i:03}").as_bytes(), format!("value{i}").as_bytes(), &WriteOptions::default()).unwrap();
    }
    node.kill();
    let shard_dir = node.spec.dir.join("shard-000");
    let (path, start, end) = last_record(&shard_dir);
    let mut bytes = std::fs::read(&path).unwrap();
    // Cut the last record short, as a crash in the middle of its write would.
    bytes[start + (end - start) / 2..end].fill(0);
    std::fs::write(&path, &bytes).unwrap();

    node.restart();
    assert!(node.log().contains("truncating a torn tail"), "the node reports the truncation:\n{}", node.log());
    let mut c = node.client();
    for i in 0..99 {
        assert_eq!(
            c.get(format!("key{i:03}").as_bytes(), Level::Default).unwrap().values,
            vec![format!("value{i}").into_bytes()]
        );
    }
    assert!(!c.get(b"key099", Level::Default).unwrap().found, "the torn record is gone, not garbled");

    // A flipped byte in the new last record, after another crash.
    c.put(b"late", b"value", &WriteOptions::default()).unwrap();
    node.kill();
    let (path, start, end) = last_record(&shard_dir);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[start + (end - start) / 2] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    node.restart();
    let mut c = node.client();
    assert!(!c.get(b"late", Level::Default).unwrap().found);
    assert!(c.get(b"key098", Level::Default).unwrap().found);
}

/// A small ext4 file system on a loop device, unmounted on drop.
struct SmallDisk {
    mount: PathBuf,
    image: PathBuf,
}

impl SmallDisk {
    fn new(dir: &Path, mb: u64) -> SmallDisk {
        let image = dir.join("disk.img");
        let mount = dir.join("mnt");
        std::fs::create_dir_all(&mount).unwrap();
        let f = std::fs::File::create(&image).unwrap();
        f.set_len(mb << 20).unwrap();
        let ok = |cmd: &mut std::process::Command| cmd.status().map(|s| s.success()).unwrap_or(false);
        assert!(
            ok(std::process::Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image)),
            "mkfs.ext4 is needed for the full-disk test (Debian package e2fsprogs)"
        );
        assert!(
            ok(std::process::Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mount)),
            "mounting a loop device is needed for the full-disk test (run as root)"
        );
        SmallDisk { mount, image }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.mount).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

#[test]
fn a_full_disk_fails_writes_keeps_acknowledged_data_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::new(dir.path(), 48);
    // Take most of the space with a file we can delete later.
    let filler = disk.mount.join("filler");
    std::fs::write(&filler, vec![0u8; 20 << 20]).unwrap();
    let mut spec = NodeSpec::single(dir.path(), 1);
    spec.dir = disk.mount.join("data");
    spec.extra = vec!["--segment-mb".into(), "2".into()];
    let node = Node::start(spec);
    let mut c = node.client();
    let value = vec![b'x'; 8000];
    let mut acked = Vec::new();
    let mut refusal = None;
    for i in 0..10_000 {
        let key = format!("k{i:05}");
        match c.put(key.as_bytes(), &value, &WriteOptions::default()) {
            Ok(_) => acked.push(key),
            Err(ClientError::Server(e)) => {
                refusal = Some(e);
                break;
            }
            Err(e) => panic!("the node failed instead of refusing the write: {e}"),
        }
    }
    let refusal = refusal.expect("the disk filled up");
    assert_eq!(refusal.code, ErrorCode::Storage);
    assert!(refusal.message.contains("no space"), "{}", refusal.message);
    assert!(acked.len() > 100, "{} writes fit before the disk filled", acked.len());

    // Reads keep working and every acknowledged write is there.
    for key in &acked {
        assert_eq!(c.get(key.as_bytes(), Level::Default).unwrap().values, vec![value.clone()], "{key}");
    }
    // Further writes keep failing cleanly while the disk is full.
    assert!(matches!(c.put(b"more", &value, &WriteOptions::default()), Err(ClientError::Server(_))));

    // Space returns: writes succeed again without a restart.
    std::fs::remove_file(&filler).unwrap();
    c.put(b"after", b"space returned", &WriteOptions::default()).unwrap();
    assert_eq!(c.get(b"after", Level::Default).unwrap().values, vec![b"space returned".to_vec()]);
    assert_eq!(c.get(acked[0].as_bytes(), Level::Default).unwrap().values, vec![value]);
    drop(c);
    drop(node);
}
