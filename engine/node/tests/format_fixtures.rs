//! Golden files from each on-disk format version must keep loading, and a
//! version this build does not know must be refused with a clear message,
//! never misread. If a change makes one of these fail, it broke
//! compatibility with existing data.
//!
//! - `fixtures/store-v1`: a shard directory written by segment format 1
//!   (object records only);
//! - `fixtures/store-v2`: format 2, with every record kind (objects, hints,
//!   a retired hint, a purge, a dropped partition) and hint files;
//! - `fixtures/cluster-state-v1.bin`, `-v2.bin` and `-v3.bin`: saved `cluster.state` files (formats 1 to 3);
//! - `fixtures/meta-v1/ringkv.meta`: a data directory's identity file.
//!
//! To regenerate the current version's files (only when adding a version,
//! into new names): `RINGKV_WRITE_FIXTURES=1 cargo test -p ringkv-engine
//! --test format_fixtures`. The older versions' files were written by
//! older builds and are never rewritten.

use glommio::{LocalExecutorBuilder, Placement};
use ringkv_core::keyspace::partition_of;
use ringkv_core::membership::{ClusterState, Load, Member};
use ringkv_core::ring::{claim, Claimant};
use ringkv_core::version::VersionVector;
use ringkv_engine::config::NodeConfig;
use ringkv_engine::store::{format, segment, Store, StoreConfig, WriteContext};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn writing() -> bool {
    std::env::var_os("RINGKV_WRITE_FIXTURES").is_some()
}

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        shard: 0,
        incarnation: 0x5eed,
        partitions: 16,
        segment_bytes: 32 * 1024,
        cache_bytes: 1 << 20,
        max_unflushed_bytes: 1 << 20,
        hash_seed: 1,
        max_hints: 1000,
    }
}

const BLIND: WriteContext = WriteContext::Client(VersionVector::new_const());

/// The objects every reader must find, in every version.
fn expected() -> Vec<(&'static str, Vec<&'static [u8]>)> {
    vec![
        ("plain", vec![b"value"]),
        ("siblings", vec![b"left", b"right"]),
        ("binary", vec![&[0, 1, 2, 255, 254]]),
        ("replaced", vec![b"second"]),
        ("deleted", vec![]),
    ]
}

/// A key of a partition none of [`expected`]'s keys is in (it is dropped).
fn lone_key() -> Vec<u8> {
    let taken: Vec<u32> = expected().iter().map(|(k, _)| partition_of(k.as_bytes(), 16)).collect();
    (0..).map(|i| format!("dropped-{i}").into_bytes()).find(|k| !taken.contains(&partition_of(k, 16))).unwrap()
}

fn run<T: 'static>(f: impl std::future::Future<Output = T> + 'static) -> T {
    LocalExecutorBuilder::new(Placement::Unbound).make().unwrap().run(f)
}

/// The current version's store fixture: everything format 2 can hold.
fn write_store_v2(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let dir = dir.to_path_buf();
    run(async move {
        let s = Store::open(config(&dir)).await.unwrap();
        let w = |k: &'static str, v: &'static [u8]| {
            let s = s.clone();
            async move { s.write(k.as_bytes(), Some(v.to_vec()), &BLIND, true, 1_700_000_000_000).await.unwrap() }
        };
        w("plain", b"value").await;
        w("siblings", b"left").await;
        w("siblings", b"right").await;
        w("binary", &[0, 1, 2, 255, 254]).await;
        let first = w("replaced", b"first").await;
        let ctx = WriteContext::Client(first.context().clone());
        s.write(b"replaced", Some(b"second".to_vec()), &ctx, true, 1_700_000_000_001).await.unwrap();
        w("deleted", b"gone").await;
        s.write(b"deleted", None, &WriteContext::Local, true, 1_700_000_000_002).await.unwrap();
        // Hints for another node: one delivered (retired), one pending.
        let held = s.get(b"plain").await.unwrap().unwrap();
        s.put_hint("n9", b"hint-delivered", &held, true).await.unwrap();
        s.put_hint("n9", b"hint-pending", &held, true).await.unwrap();
        let batch = s.hint_batch("n9", 10).await.unwrap();
        let delivered: Vec<_> =
            batch.into_iter().filter(|(k, _, _)| k == b"hint-delivered").map(|(k, id, _)| (k, id)).collect();
        assert_eq!(s.hints_delivered("n9", &delivered).await.unwrap(), 1);
        // A purged tombstone.
        w("purged", b"old").await;
        let tomb = s.write(b"purged", None, &WriteContext::Local, true, 1_700_000_000_003).await.unwrap();
        assert!(s.purge(b"purged", &tomb).await.unwrap());
        // A dropped partition, written to past one segment so the fixture
        // has sealed segments with their hint files.
        let lone = lone_key();
        let mut ctx = VersionVector::new();
        for i in 0..12u8 {
            let value = vec![i; 4000];
            let o = s.write(&lone, Some(value), &WriteContext::Client(ctx), true, 1_700_000_000_004).await.unwrap();
            ctx = o.context().clone();
        }
        let p = partition_of(&lone, 16);
        assert!(s.drop_partition(p, &s.partition_snapshot(p)).await.unwrap());
        s.close().await.unwrap();
    });
}

/// Writes the current version's store fixture first when asked to, once
/// (the tests that read it run in parallel).
fn ensure_written() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if writing() {
            let _ = std::fs::remove_dir_all(fixtures().join("store-v2"));
            write_store_v2(&fixtures().join("store-v2"));
        }
    });
}

/// Copies a fixture directory (opening a store starts a new segment in it).
fn copy_of(name: &str) -> tempfile::TempDir {
    ensure_written();
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).expect("fixture directory exists") {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

fn first_segment_header(dir: &Path) -> (Vec<u8>, format::SegmentHeader) {
    let first = segment::list_segments(dir).unwrap()[0];
    let bytes = std::fs::read(segment::segment_path(dir, first)).unwrap();
    let header = format::SegmentHeader::decode(&bytes).unwrap();
    assert_eq!((header.shard, header.segment, header.incarnation), (0, first, 0x5eed));
    (bytes, header)
}

async fn check_objects(s: &Store) {
    for (key, values) in expected() {
        let obj = s.get(key.as_bytes()).await.unwrap().unwrap_or_else(|| panic!("{key} missing"));
        let got: Vec<&[u8]> = obj.values().collect();
        assert_eq!(got, values, "{key}");
    }
    assert_eq!(s.stats().keys, 4);
    assert_eq!(s.stats().tombstones, 1);
    assert_eq!(s.recovery_report().truncated, None);
}

#[test]
fn format_1_data_directories_still_load() {
    let tmp = copy_of("store-v1");
    // The raw bytes follow the documented layout (docs/STORAGE.md).
    let (bytes, _) = first_segment_header(tmp.path());
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1, "a format-1 segment");
    let rec = format::decode_record(&bytes[format::HEADER_BYTES as usize..]).unwrap().unwrap();
    assert_eq!(rec.key, b"plain");
    let dir = tmp.path().to_path_buf();
    run(async move {
        let s = Store::open(config(&dir)).await.unwrap();
        check_objects(&s).await;
    });
}

#[test]
fn format_2_data_directories_load_with_every_record_kind_and_their_hint_files() {
    let tmp = copy_of("store-v2");
    let (bytes, _) = first_segment_header(tmp.path());
    assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 2, "a format-2 segment");
    let hint_files = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "hint"));
    assert!(hint_files.count() >= 2, "the fixture has hint files for its segments");
    let dir = tmp.path().to_path_buf();
    run(async move {
        let s = Store::open(config(&dir)).await.unwrap();
        check_objects(&s).await;
        let r = s.recovery_report();
        assert!(r.segments_from_hints >= 2 && r.bytes_scanned == 0, "a clean stop: no value read ({r:?})");
        assert_eq!(s.hint_targets(), [("n9".to_string(), 1)], "the delivered hint stays retired");
        assert!(s.get(b"purged").await.unwrap().is_none(), "the purge holds");
        assert!(s.get(&lone_key()).await.unwrap().is_none(), "the dropped partition stays dropped");
    });
}

#[test]
fn a_segment_of_an_unknown_format_is_refused_with_a_clear_message() {
    let tmp = copy_of("store-v2");
    let first = segment::list_segments(tmp.path()).unwrap()[0];
    let path = segment::segment_path(tmp.path(), first);
    let mut bytes = std::fs::read(&path).unwrap();
    // A future version 3, with a header that is otherwise intact.
    bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&bytes[..40]);
    bytes[40..48].copy_from_slice(&sum.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = format::SegmentHeader::decode(&bytes).unwrap_err();
    assert_eq!(
        e.to_string(),
        "segment format version 3 is not supported (this build reads versions 1 to 2); \
         the data was written by a newer ringkv"
    );
    let dir = tmp.path().to_path_buf();
    let opened = run(async move { Store::open(config(&dir)).await.map(|_| ()) });
    let msg = opened.unwrap_err().to_string();
    assert!(msg.contains("segment format version 3 is not supported"), "{msg}");
}

/// The cluster state of the fixture: two members, a ring, pins and load.
fn state_v1() -> ClusterState {
    let mut s = ClusterState::new("golden", 16);
    for (i, id) in ["a", "b"].iter().enumerate() {
        let pins: BTreeMap<u32, u16> = (0..16).filter(|p| p % 2 == i as u32).map(|p| (p, (p % 2) as u16)).collect();
        let load = Load {
            ops_per_sec: 10 + i as u64,
            p99_us: 900,
            disk_bytes: 1 << 20,
            keys: 42,
            hints: i as u64,
            ..Load::default()
        };
        let m = Member {
            id: id.to_string(),
            addr: format!("127.0.0.{}:7070", i + 1),
            shards: 2,
            weight: 1 + i as u32,
            leaving: false,
            generation: 1_700_000_000_000 + i as u64,
            heartbeat: 77,
            version: 77,
            pins,
            load,
            holding: Default::default(),
        };
        s.members.insert(id.to_string(), m);
    }
    let claimants = [Claimant { id: "a".into(), weight: 1 }, Claimant { id: "b".into(), weight: 2 }];
    s.ring = Some(claim(None, &claimants, 16, 3));
    s
}

/// Format 2: the same state with the load figures and held partitions
/// format 2 added.
fn state_v2() -> ClusterState {
    let mut s = state_v1();
    for (i, m) in s.members.values_mut().enumerate() {
        m.load.cpu_permille = 250 + i as u32;
        m.load.moving_partitions = 3;
        m.load.moving_bytes = 1 << 22;
        m.holding = [1, 5, 15].into();
    }
    s
}

/// Format 3: the same state with record versions apart from heartbeats.
fn state_v3() -> ClusterState {
    let mut s = state_v2();
    for (i, m) in s.members.values_mut().enumerate() {
        m.heartbeat = 1_700_000_100 + i as u64;
        m.version = 5 + i as u64;
    }
    s
}

#[test]
fn cluster_state_files_of_formats_1_to_3_still_load_and_others_are_refused() {
    // Formats 1 and 2 were written by older builds: never rewritten. Their
    // heartbeat versioned the record, and is read as its version.
    let v1 = std::fs::read(fixtures().join("cluster-state-v1.bin")).expect("fixture exists");
    assert_eq!(v1[0], 1, "format byte");
    assert_eq!(ClusterState::decode(&v1).unwrap(), state_v1(), "new load figures read as 0");
    let v2 = std::fs::read(fixtures().join("cluster-state-v2.bin")).expect("fixture exists");
    assert_eq!(v2[0], 2, "format byte");
    assert_eq!(ClusterState::decode(&v2).unwrap(), state_v2());
    let path = fixtures().join("cluster-state-v3.bin");
    if writing() {
        std::fs::write(&path, state_v3().encode()).unwrap();
    }
    let bytes = std::fs::read(&path).expect("fixture exists");
    assert_eq!(bytes[0], 3, "format byte");
    assert_eq!(ClusterState::decode(&bytes).unwrap(), state_v3());
    assert_eq!(state_v3().encode(), bytes, "this build writes format 3 byte for byte");
    let mut future = bytes.clone();
    future[0] = 4;
    let e = ClusterState::decode(&future).unwrap_err();
    assert!(e.to_string().contains("cluster state format is not supported"), "{e}");
}

#[test]
fn data_directory_identity_files_of_format_1_still_open_and_others_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let fixture = std::fs::read_to_string(fixtures().join("meta-v1/ringkv.meta")).unwrap();
    std::fs::write(tmp.path().join("ringkv.meta"), &fixture).unwrap();
    let cfg = NodeConfig {
        data_dir: tmp.path().to_path_buf(),
        cluster: "golden".into(),
        partitions: 16,
        node_id: Some("n1".into()),
        shards: Some(2),
        ..NodeConfig::default()
    };
    let dir = ringkv_engine::datadir::open(&cfg).unwrap();
    assert_eq!(dir.meta.incarnation(), 0x0123_4567_89ab_cdef);
    drop(dir);
    std::fs::write(tmp.path().join("ringkv.meta"), fixture.replace("format = 1", "format = 2")).unwrap();
    let e = ringkv_engine::datadir::open(&cfg).err().expect("a newer format is refused");
    assert!(e.contains("has format 2, this build reads format 1"), "{e}");
}
