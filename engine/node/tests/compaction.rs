//! Compaction and fast restart, on a real store in a glommio executor.

use glommio::{LocalExecutorBuilder, Placement};
use ringkv_core::keyspace::partition_of;
use ringkv_engine::store::compaction::{compact_until, pass, CrashPoint};
use ringkv_engine::store::{segment, Store, StoreConfig, WriteContext};
use std::path::Path;
use std::rc::Rc;

const SEGMENT: u64 = 64 * 1024;

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        shard: 0,
        incarnation: 9,
        partitions: 16,
        segment_bytes: SEGMENT,
        cache_bytes: 256 * 1024,
        max_unflushed_bytes: 8 << 20,
        hash_seed: 3,
        max_hints: 1000,
    }
}

fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    LocalExecutorBuilder::new(Placement::Unbound).make().unwrap().run(f)
}

async fn open(dir: &Path) -> Rc<Store> {
    Store::open(config(dir)).await.unwrap()
}

/// Overwrites `key` with `value`, superseding what was there.
async fn set(s: &Store, key: &str, value: &str) {
    let ctx = s.get(key.as_bytes()).await.unwrap().map(|o| o.context().clone()).unwrap_or_default();
    s.write(key.as_bytes(), Some(value.as_bytes().to_vec()), &WriteContext::Client(ctx), true, 1).await.unwrap();
}

async fn value(s: &Store, key: &str) -> Option<String> {
    let o = s.get(key.as_bytes()).await.unwrap()?;
    let vs: Vec<&[u8]> = o.values().collect();
    assert!(vs.len() <= 1, "{key} has siblings");
    vs.first().map(|v| String::from_utf8(v.to_vec()).unwrap())
}

fn segment_files(dir: &Path) -> usize {
    segment::list_segments(dir).unwrap().len()
}

/// 40 keys rewritten 30 times with ~1 KiB values: most of the log is garbage.
async fn churn(s: &Store, rounds: usize, tag: &str) {
    let pad = "x".repeat(900);
    for round in 0..rounds {
        for k in 0..40 {
            set(s, &format!("key{k}"), &format!("{tag}-{round}-{pad}")).await;
        }
    }
}

#[test]
fn compaction_under_concurrent_writes_keeps_latest_values_and_reclaims_space() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let s = open(&d).await;
        churn(&s, 30, "a").await;
        let before = segment_files(&d);
        let log_before = s.stats().log_bytes;
        // Writers and compaction at once.
        let writer = {
            let s = s.clone();
            glommio::spawn_local(async move { churn(&s, 10, "b").await })
        };
        let mut compacted = 0;
        for _ in 0..5 {
            compacted += s.compact_now(0.3).await.unwrap().len();
            glommio::timer::sleep(std::time::Duration::from_millis(5)).await;
        }
        writer.await;
        compacted += s.compact_now(0.3).await.unwrap().len();
        s.delete_retired(std::time::Duration::ZERO).await;
        assert!(compacted > 0, "something was compacted");
        for k in 0..40 {
            assert!(value(&s, &format!("key{k}")).await.unwrap().starts_with("b-9-"), "key{k} keeps its latest value");
        }
        let after = segment_files(&d);
        assert!(after < before, "segments {before} -> {after}");
        assert!(s.stats().bytes_reclaimed > 0);
        let _ = log_before;
        s.close().await.unwrap();
        let s = open(&d).await;
        for k in 0..40 {
            assert!(value(&s, &format!("key{k}")).await.unwrap().starts_with("b-9-"), "key{k} after restart");
        }
    });
}

/// The background pass reads and writes at its rate a window at a time
/// (the server's default path): writes that go on meanwhile are kept, and
/// every key keeps its latest value.
#[test]
fn a_paced_compaction_pass_under_concurrent_writes_keeps_latest_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let s = open(&d).await;
        churn(&s, 30, "a").await;
        let writer = {
            let s = s.clone();
            glommio::spawn_local(async move { churn(&s, 10, "b").await })
        };
        // 8 MiB/s over a few MiB of segments: the pass sleeps between windows.
        let done = pass(&s, 0.3, Some(8 << 20)).await.unwrap();
        writer.await;
        assert!(!done.is_empty(), "something was compacted");
        assert!(done.iter().all(|c| c.bytes_out < c.bytes_in), "garbage was left behind: {done:?}");
        for k in 0..40 {
            assert!(value(&s, &format!("key{k}")).await.unwrap().starts_with("b-9-"), "key{k} keeps its latest value");
        }
        s.close().await.unwrap();
        let s = open(&d).await;
        for k in 0..40 {
            assert!(value(&s, &format!("key{k}")).await.unwrap().starts_with("b-9-"), "key{k} after restart");
        }
    });
}

fn crash_case(point: CrashPoint) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run({
        let d = d.clone();
        async move {
            let s = open(&d).await;
            churn(&s, 20, "c").await;
            s.write_ready_hints().await;
            let victim = ringkv_engine::store::compaction::candidates(&s, 0.3)[0];
            let done = compact_until(&s, victim, Some(point)).await.unwrap();
            assert!(done.is_some());
            // The process dies here: nothing else runs, no clean stop.
        }
    });
    run(async move {
        let s = open(&d).await;
        for k in 0..40 {
            assert!(
                value(&s, &format!("key{k}")).await.unwrap().starts_with("c-19-"),
                "key{k} after a crash at {point:?}"
            );
        }
        assert!(std::fs::read_dir(&d).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
        // Compaction still works afterwards and cleans up whatever the crash left.
        s.compact_now(0.3).await.unwrap();
        s.close().await.unwrap();
        let s = open(&d).await;
        for k in 0..40 {
            assert!(value(&s, &format!("key{k}")).await.unwrap().starts_with("c-19-"));
        }
    });
}

#[test]
fn a_crash_before_the_output_is_renamed_loses_nothing() {
    crash_case(CrashPoint::BeforeRename);
}

#[test]
fn a_crash_after_the_output_is_in_place_but_before_the_swap_loses_nothing() {
    crash_case(CrashPoint::AfterRename);
}

#[test]
fn a_restart_after_a_clean_stop_reads_indexes_from_hint_files_not_values() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run({
        let d = d.clone();
        async move {
            let s = open(&d).await;
            churn(&s, 10, "h").await;
            s.close().await.unwrap();
        }
    });
    run(async move {
        let s = open(&d).await;
        let r = s.recovery_report().clone();
        assert!(r.segments_from_hints >= 5, "{r:?}");
        assert_eq!(r.bytes_scanned, 0, "no record was read at start-up: {r:?}");
        for k in 0..40 {
            assert!(value(&s, &format!("key{k}")).await.unwrap().starts_with("h-9-"));
        }
    });
}

#[test]
fn a_dropped_partition_stays_dropped_across_compaction_and_later_writes_stay() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let s = open(&d).await;
        churn(&s, 10, "d").await;
        let p = partition_of(b"key0", 16);
        let in_p = |k: &str| partition_of(k.as_bytes(), 16) == p;
        let dropped: Vec<String> = (0..40).map(|k| format!("key{k}")).filter(|k| in_p(k)).collect();
        let kept: Vec<String> = (0..40).map(|k| format!("key{k}")).filter(|k| !in_p(k)).collect();
        assert!(!dropped.is_empty() && !kept.is_empty());
        let snapshot = s.partition_snapshot(p);
        assert!(s.drop_partition(p, &snapshot).await.unwrap());
        // A key of the partition written after the drop must survive it.
        let newcomer = (0..).map(|i| format!("new{i}")).find(|k| in_p(k)).unwrap();
        set(&s, &newcomer, "after-drop").await;
        // More segments after the drop, touching only other partitions.
        let pad = "y".repeat(900);
        for round in 0..8 {
            for k in &kept {
                set(&s, k, &format!("f-{round}-{pad}")).await;
            }
        }
        for _ in 0..3 {
            s.compact_now(0.0).await.unwrap();
        }
        s.delete_retired(std::time::Duration::ZERO).await;
        s.close().await.unwrap();
        for pass in ["after compaction", "after a second restart"] {
            let s = open(&d).await;
            for k in &dropped {
                assert_eq!(value(&s, k).await, None, "{k} came back {pass}");
            }
            assert_eq!(value(&s, &newcomer).await.as_deref(), Some("after-drop"), "{pass}");
            for k in &kept {
                assert!(value(&s, k).await.unwrap().starts_with("f-7-"), "{k} {pass}");
            }
            s.close().await.unwrap();
        }
    });
}

#[test]
fn compacting_the_segment_holding_a_partition_drop_alone_does_not_resurrect_the_partition() {
    // The drop record is what keeps the partition's older records (in
    // segments not compacted yet) from coming back at the next restart:
    // compaction must carry it over, with its original boundary.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let s = open(&d).await;
        churn(&s, 10, "g").await;
        let p = partition_of(b"key0", 16);
        let in_p = |k: &str| partition_of(k.as_bytes(), 16) == p;
        let dropped: Vec<String> = (0..40).map(|k| format!("key{k}")).filter(|k| in_p(k)).collect();
        let drop_segment = s.active_segment();
        assert!(s.drop_partition(p, &s.partition_snapshot(p)).await.unwrap());
        // Move on to later segments without touching the partition.
        let pad = "z".repeat(900);
        for round in 0..5 {
            for k in (0..40).map(|k| format!("key{k}")).filter(|k| !in_p(k)) {
                set(&s, &k, &format!("h-{round}-{pad}")).await;
            }
        }
        assert_ne!(s.active_segment(), drop_segment, "the drop's segment is sealed");
        compact_until(&s, drop_segment, None).await.unwrap().expect("compacted");
        s.delete_retired(std::time::Duration::ZERO).await;
        s.close().await.unwrap();
        let s = open(&d).await;
        for k in &dropped {
            assert_eq!(value(&s, k).await, None, "{k} came back");
        }
    });
}

#[test]
fn a_purged_key_stays_gone_across_compaction_and_restarts() {
    // The old value stays in an early segment that is never compacted here:
    // only the purge marker keeps replay from bringing it back.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    run(async move {
        let s = open(&d).await;
        set(&s, "doomed", "old-value").await;
        let value_segment = s.active_segment();
        churn(&s, 5, "a").await;
        let live = s.get(b"doomed").await.unwrap().unwrap();
        assert!(!s.purge(b"doomed", &live).await.unwrap(), "a live value is never purged");
        s.write(b"doomed", None, &WriteContext::Client(live.context().clone()), true, 1).await.unwrap();
        let tomb = s.get(b"doomed").await.unwrap().unwrap();
        assert!(!s.purge(b"doomed", &live).await.unwrap(), "not when the replica holds something else");
        assert_eq!(s.stats().tombstones, 1);
        assert!(s.purge(b"doomed", &tomb).await.unwrap());
        assert!(s.get(b"doomed").await.unwrap().is_none());
        assert_eq!(s.stats().tombstones, 0);
        assert!(!s.purge(b"doomed", &tomb).await.unwrap(), "purging twice does nothing");
        let marker_segment = s.active_segment();
        churn(&s, 5, "b").await;
        assert_ne!(s.active_segment(), marker_segment, "the marker's segment is sealed");
        assert_ne!(value_segment, marker_segment);
        compact_until(&s, marker_segment, None).await.unwrap().expect("compacted");
        s.delete_retired(std::time::Duration::ZERO).await;
        assert!(segment::list_segments(&d).unwrap().contains(&value_segment), "the old value is still on disk");
        s.close().await.unwrap();

        let s = open(&d).await;
        assert!(s.get(b"doomed").await.unwrap().is_none(), "back after a restart from hint files");
        assert_eq!(s.stats().tombstones, 0);
        s.close().await.unwrap();
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "hint") {
                std::fs::remove_file(path).unwrap();
            }
        }
        let s = open(&d).await;
        assert_eq!(s.recovery_report().segments_from_hints, 0, "a full replay");
        assert!(s.get(b"doomed").await.unwrap().is_none(), "back after a full replay");
        // Once nothing older remains, the marker can go; the key stays gone,
        // and it can be written again.
        s.compact_now(0.0).await.unwrap();
        s.delete_retired(std::time::Duration::ZERO).await;
        set(&s, "doomed", "reborn").await;
        s.close().await.unwrap();
        let s = open(&d).await;
        assert_eq!(value(&s, "doomed").await.as_deref(), Some("reborn"));
        for k in 0..40 {
            assert!(value(&s, &format!("key{k}")).await.unwrap().starts_with("b-4-"), "key{k} kept its latest value");
        }
    });
}
