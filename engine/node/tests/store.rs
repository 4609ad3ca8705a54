//! The store driven directly inside a glommio executor: writes, versions,
//! rotation, recovery and torn tails.

use glommio::{LocalExecutorBuilder, Placement};
use ringkv_core::version::VersionVector;
use ringkv_engine::store::{format, segment, Store, StoreConfig, StoreError, WriteContext};
use std::path::Path;
use std::rc::Rc;

fn config(dir: &Path, segment_bytes: u64) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        shard: 0,
        incarnation: 42,
        partitions: 16,
        segment_bytes,
        cache_bytes: 1 << 20,
        max_unflushed_bytes: 8 << 20,
        hash_seed: 7,
        max_hints: 1000,
    }
}

fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    LocalExecutorBuilder::new(Placement::Unbound).make().unwrap().run(f)
}

const BLIND: WriteContext = WriteContext::Client(VersionVector::new_const());

async fn put(s: &Store, key: &str, value: &str) {
    s.write(key.as_bytes(), Some(value.as_bytes().to_vec()), &BLIND, true, 1).await.unwrap();
}

async fn values(s: &Store, key: &str) -> Vec<String> {
    match s.get(key.as_bytes()).await.unwrap() {
        None => vec![],
        Some(o) => o.values().map(|v| String::from_utf8(v.to_vec()).unwrap()).collect(),
    }
}

async fn open(dir: &Path, segment_bytes: u64) -> Rc<Store> {
    Store::open(config(dir, segment_bytes)).await.unwrap()
}

#[test]
fn writes_are_read_back_after_a_clean_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let s = open(&d, 1 << 20).await;
        put(&s, "a", "1").await;
        let ctx = s.get(b"a").await.unwrap().unwrap().context().clone();
        s.write(b"a", Some(b"2".to_vec()), &WriteContext::Client(ctx), true, 2).await.unwrap();
        put(&s, "b", "x").await;
        s.write(b"b", None, &WriteContext::Local, true, 3).await.unwrap();
        assert_eq!(values(&s, "a").await, ["2"]);
        assert!(s.get(b"b").await.unwrap().unwrap().is_deleted());
        s.close().await.unwrap();
        let s = open(&d, 1 << 20).await;
        assert_eq!(values(&s, "a").await, ["2"]);
        assert!(s.get(b"b").await.unwrap().unwrap().is_deleted());
        assert_eq!(s.stats().keys, 1);
        assert_eq!(s.stats().tombstones, 1);
    });
}

#[test]
fn blind_writes_become_siblings_and_a_read_context_resolves_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let s = open(&d, 1 << 20).await;
        put(&s, "k", "one").await;
        put(&s, "k", "two").await;
        assert_eq!(values(&s, "k").await, ["one", "two"]);
        let ctx = s.get(b"k").await.unwrap().unwrap().context().clone();
        s.write(b"k", Some(b"three".to_vec()), &WriteContext::Client(ctx), true, 1).await.unwrap();
        assert_eq!(values(&s, "k").await, ["three"]);
    });
}

#[test]
fn many_small_segments_rotate_and_recover_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        // 64 KiB segments with ~1 KiB records: dozens of rotations.
        let s = open(&d, 64 * 1024).await;
        let value = "v".repeat(1000);
        for round in 0..3 {
            for i in 0..200 {
                let key = format!("key-{i}");
                let cur = s.get(key.as_bytes()).await.unwrap();
                let ctx = cur.map(|o| o.context().clone()).unwrap_or_default();
                let v = format!("{round}-{value}");
                s.write(key.as_bytes(), Some(v.into_bytes()), &WriteContext::Client(ctx), round == 2, 1).await.unwrap();
            }
        }
        s.close().await.unwrap();
        assert!(segment::list_segments(&d).unwrap().len() > 10);
        let s = open(&d, 64 * 1024).await;
        for i in 0..200 {
            let got = values(&s, &format!("key-{i}")).await;
            assert_eq!(got.len(), 1, "key-{i} has one value");
            assert!(got[0].starts_with("2-"), "key-{i} kept its latest value");
        }
    });
}

#[test]
fn concurrent_writers_to_one_key_never_lose_a_sibling() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let s = open(&d, 1 << 20).await;
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let s = s.clone();
                glommio::spawn_local(async move { put(&s, "hot", &format!("v{i}")).await })
            })
            .collect();
        for t in tasks {
            t.await;
        }
        let mut got = values(&s, "hot").await;
        got.sort();
        let mut want: Vec<String> = (0..20).map(|i| format!("v{i}")).collect();
        want.sort();
        assert_eq!(got, want, "every blind write survives as a sibling");
    });
}

/// The last segment that holds records, and the end of its valid data.
fn last_record_end(dir: &Path) -> (std::path::PathBuf, usize, usize) {
    for id in segment::list_segments(dir).unwrap().into_iter().rev() {
        let path = segment::segment_path(dir, id);
        let bytes = std::fs::read(&path).unwrap();
        let mut pos = format::HEADER_BYTES as usize;
        let mut last = None;
        while let Ok(Some(r)) = format::decode_record(&bytes[pos..]) {
            last = Some(pos);
            pos += r.len;
        }
        if let Some(start) = last {
            return (path, start, pos);
        }
    }
    panic!("no records found");
}

fn torn_tail_case(damage: impl FnOnce(&mut Vec<u8>, usize, usize)) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run({
        let d = d.clone();
        async move {
            let s = open(&d, 1 << 20).await;
            for i in 0..50 {
                put(&s, &format!("k{i}"), &format!("value-{i}")).await;
            }
            // No close: a torn tail is what a crash leaves, and a crash
            // leaves no hint file for the segment being written.
        }
    });
    let (path, start, end) = last_record_end(&d);
    let mut bytes = std::fs::read(&path).unwrap();
    damage(&mut bytes, start, end);
    std::fs::write(&path, &bytes).unwrap();
    run(async move {
        let s = open(&d, 1 << 20).await;
        let report = s.recovery_report().clone();
        let (_, offset, _, _) = report.truncated.clone().expect("the damaged tail was truncated");
        assert_eq!(offset as usize, start, "cut exactly at the damaged record");
        for i in 0..49 {
            assert_eq!(values(&s, &format!("k{i}")).await, [format!("value-{i}")], "k{i} survives");
        }
        assert_eq!(values(&s, "k49").await, Vec::<String>::new(), "the torn write is gone, not garbled");
        // The store keeps working and a second restart is clean.
        put(&s, "after", "ok").await;
        s.close().await.unwrap();
        let s = open(&d, 1 << 20).await;
        assert_eq!(s.recovery_report().truncated, None);
        assert_eq!(values(&s, "after").await, ["ok"]);
        assert_eq!(values(&s, "k48").await, ["value-48"]);
    });
}

#[test]
fn a_record_cut_short_is_truncated_on_recovery() {
    torn_tail_case(|bytes, start, end| {
        let cut = start + (end - start) / 2;
        bytes[cut..end].fill(0);
    });
}

#[test]
fn a_flipped_byte_in_the_last_record_is_truncated_on_recovery() {
    torn_tail_case(|bytes, start, end| {
        bytes[start + (end - start) - 3] ^= 0x40;
    });
}

#[test]
fn damage_before_valid_records_in_a_later_segment_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run({
        let d = d.clone();
        async move {
            let s = open(&d, 64 * 1024).await;
            for i in 0..200 {
                put(&s, &format!("k{i}"), &"x".repeat(1000)).await;
            }
            s.close().await.unwrap();
        }
    });
    let first = segment::list_segments(&d).unwrap()[0];
    let path = segment::segment_path(&d, first);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[format::HEADER_BYTES as usize + 20] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    // Without hint files recovery reads every record and must notice (with
    // them it trusts the index snapshot; see the next test).
    for entry in std::fs::read_dir(&d).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "hint") {
            std::fs::remove_file(p).unwrap();
        }
    }
    run(async move {
        match Store::open(config(&d, 64 * 1024)).await {
            Err(StoreError::Corrupt { segment, .. }) => assert_eq!(segment, first),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a store with a damaged sealed segment opened"),
        }
    });
}

#[test]
fn a_damaged_record_behind_a_hint_file_is_reported_when_read_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run({
        let d = d.clone();
        async move {
            let s = open(&d, 1 << 20).await;
            for i in 0..20 {
                put(&s, &format!("k{i}"), &format!("value-{i}")).await;
            }
            s.close().await.unwrap();
        }
    });
    let (path, start, end) = last_record_end(&d);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[start + (end - start) - 2] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    run(async move {
        let s = open(&d, 1 << 20).await;
        assert!(s.recovery_report().segments_from_hints > 0, "the restart used hint files");
        match s.get(b"k19").await {
            Err(StoreError::Corrupt { .. }) => {}
            other => panic!("a damaged record was served: {other:?}"),
        }
        assert_eq!(values(&s, "k3").await, ["value-3"], "undamaged records are fine");
    });
}

/// Regression, found by the simulator (`ringkv-sim`, seeds 0..20 before the
/// fix): a replica asked to merge durably an object it already held from an
/// earlier, not yet synced merge (a duplicate delivery, a read repair that
/// arrived first) answered at once, because the merge added nothing. The
/// coordinator then counted a durable copy that was only in the page cache;
/// a crash of that replica lost it. A durable merge must wait for the disk
/// whether or not it writes anything.
#[test]
fn a_durable_merge_of_what_a_replica_already_holds_waits_for_its_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let s = open(&d, 1 << 20).await;
        let obj = s.write(b"origin", Some(b"v".to_vec()), &BLIND, true, 1).await.unwrap();
        s.merge(b"copy", &obj, false).await.unwrap();
        assert!(!s.all_durable(), "the first merge is not synced yet (nothing awaited since)");
        s.merge(b"copy", &obj, true).await.unwrap();
        assert!(s.all_durable(), "a durable merge returned before its data was on disk");
        // The same for a hint held for another node.
        s.put_hint("n9", b"hinted", &obj, false).await.unwrap();
        assert!(!s.all_durable());
        s.put_hint("n9", b"hinted", &obj, true).await.unwrap();
        assert!(s.all_durable(), "a durable hint returned before its data was on disk");
        s.close().await.unwrap();
    });
}
