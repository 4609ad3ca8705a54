//! `ringkv inspect DIR` on a real node's directory: healthy, torn, damaged.

use ringkv_engine::store::{format, segment};
use ringkv_net::WriteOptions;
use ringkv_tests::harness::{cli, Node, NodeSpec};
use std::path::{Path, PathBuf};

/// A stopped node's data directory with 700 keys over several 1 MiB segments.
fn populated(dir: &Path, clean_stop: bool) -> PathBuf {
    let mut spec = NodeSpec::single(dir, 1);
    spec.extra = vec!["--segment-mb".into(), "1".into()];
    let mut node = Node::start(spec);
    let mut c = node.client();
    let value = vec![b'v'; 3000];
    for i in 0..700 {
        c.put(format!("key{i}").as_bytes(), &value, &WriteOptions::default()).unwrap();
    }
    c.delete(b"key0", &WriteOptions::default()).unwrap();
    if clean_stop {
        node.stop();
    } else {
        node.kill();
    }
    node.spec.dir.clone()
}

fn inspect(dir: &Path) -> (bool, serde_json::Value) {
    let out = cli(&["inspect", "--json", dir.to_str().unwrap()], None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("inspect printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.success(), v)
}

fn shard_dir(data: &Path) -> PathBuf {
    data.join("shard-000")
}

#[test]
fn a_healthy_directory_passes_and_is_described() {
    let dir = tempfile::tempdir().unwrap();
    let data = populated(dir.path(), true);
    let (ok, v) = inspect(&data);
    assert!(ok, "{v}");
    assert_eq!(v["healthy"], true);
    let shard = &v["shards"][0];
    assert_eq!(shard["keys"], 699);
    assert_eq!(shard["tombstones"], 1);
    let segments = shard["segments"].as_array().unwrap();
    assert!(segments.len() > 1, "several segments at 1 MiB each");
    // After a clean stop every segment with records has a matching hint file.
    for s in segments.iter().filter(|s| s["records"].as_u64().unwrap() > 0) {
        assert_eq!(s["hint_file"], "ok", "{s}");
    }
    let text = String::from_utf8(cli(&["inspect", dir.path().join("data").to_str().unwrap()], None).stdout).unwrap();
    assert!(text.contains("no damage found"), "{text}");
}

#[test]
fn a_torn_tail_is_reported_but_is_not_damage() {
    let dir = tempfile::tempdir().unwrap();
    let data = populated(dir.path(), false);
    // The newest segment holding records, cut in its last record.
    let sd = shard_dir(&data);
    let id = *segment::list_segments(&sd)
        .unwrap()
        .iter()
        .rev()
        // Holding a record, not only zeroed space (a first byte of 0 is a
        // record whose first field starts with 0 one time in 256).
        .find(|&&id| {
            let bytes = std::fs::read(segment::segment_path(&sd, id)).unwrap();
            matches!(format::decode_record(&bytes[format::HEADER_BYTES as usize..]), Ok(Some(_)))
        })
        .unwrap();
    let path = segment::segment_path(&sd, id);
    let mut bytes = std::fs::read(&path).unwrap();
    let mut pos = format::HEADER_BYTES as usize;
    let mut last = pos;
    while let Ok(Some(r)) = format::decode_record(&bytes[pos..]) {
        last = pos;
        pos += r.len;
    }
    bytes[last + 20] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let (ok, v) = inspect(&data);
    assert!(ok, "a torn tail is what a crash leaves: {v}");
    let seg = v["shards"][0]["segments"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap().clone();
    assert!(!seg["torn_tail"].is_null(), "{seg}");
}

#[test]
fn damage_in_a_sealed_segment_and_a_wrong_hint_file_fail_inspection() {
    let dir = tempfile::tempdir().unwrap();
    let data = populated(dir.path(), true);
    let sd = shard_dir(&data);
    let first = segment::list_segments(&sd).unwrap()[0];
    let path = segment::segment_path(&sd, first);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[format::HEADER_BYTES as usize + 100] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let (ok, v) = inspect(&data);
    assert!(!ok, "damage must fail inspection: {v}");
    let problems = v["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p.as_str().unwrap().contains("damage")), "{problems:?}");
    assert!(problems.iter().any(|p| p.as_str().unwrap().contains("hint file")), "{problems:?}");

    // A hint file that does not describe its segment, alone.
    let dir2 = tempfile::tempdir().unwrap();
    let data2 = populated(dir2.path(), true);
    let sd2 = shard_dir(&data2);
    let id = segment::list_segments(&sd2).unwrap()[0];
    let hint = sd2.join(format!("{id:010}.hint"));
    let mut h = std::fs::read(&hint).unwrap();
    h[20] ^= 1;
    std::fs::write(&hint, &h).unwrap();
    let (ok, v) = inspect(&data2);
    assert!(!ok, "{v}");
    assert!(v["problems"][0].as_str().unwrap().contains("hint file"), "{v}");
}
