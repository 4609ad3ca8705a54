//! Golden data directories from each on-disk format version must keep
//! loading. `tests/fixtures/store-v1` was written by format 1; if a change
//! makes this test fail, the change broke compatibility with existing data.
//!
//! To regenerate (only when adding a new format version, into a new folder):
//! `RINGKV_WRITE_FIXTURES=1 cargo test -p ringkv-engine --test format_fixtures`.

use glommio::{LocalExecutorBuilder, Placement};
use ringkv_core::version::VersionVector;
use ringkv_engine::store::{format, segment, Store, StoreConfig, WriteContext};
use std::path::{Path, PathBuf};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1")
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

/// The content every format-1 reader must find.
fn expected() -> Vec<(&'static str, Vec<&'static [u8]>)> {
    vec![
        ("plain", vec![b"value"]),
        ("siblings", vec![b"left", b"right"]),
        ("binary", vec![&[0, 1, 2, 255, 254]]),
        ("replaced", vec![b"second"]),
        ("deleted", vec![]),
    ]
}

fn write_fixture(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let dir = dir.to_path_buf();
    LocalExecutorBuilder::new(Placement::Unbound).make().unwrap().run(async move {
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
        s.close().await.unwrap();
    });
}

#[test]
fn format_1_data_directories_still_load() {
    if std::env::var_os("RINGKV_WRITE_FIXTURES").is_some() {
        let _ = std::fs::remove_dir_all(fixture_dir());
        write_fixture(&fixture_dir());
    }
    // Work on a copy: opening a store starts a new segment in its directory.
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture_dir()).expect("fixture directory exists") {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    // The raw bytes follow the documented layout (docs/STORAGE.md).
    let first = segment::list_segments(tmp.path()).unwrap()[0];
    let bytes = std::fs::read(segment::segment_path(tmp.path(), first)).unwrap();
    let header = format::SegmentHeader::decode(&bytes).unwrap();
    assert_eq!((header.shard, header.segment, header.incarnation), (0, first, 0x5eed));
    let rec = format::decode_record(&bytes[format::HEADER_BYTES as usize..]).unwrap().unwrap();
    assert_eq!(rec.key, b"plain");

    let dir = tmp.path().to_path_buf();
    LocalExecutorBuilder::new(Placement::Unbound).make().unwrap().run(async move {
        let s = Store::open(config(&dir)).await.unwrap();
        for (key, values) in expected() {
            let obj = s.get(key.as_bytes()).await.unwrap().unwrap_or_else(|| panic!("{key} missing"));
            let got: Vec<&[u8]> = obj.values().collect();
            assert_eq!(got, values, "{key}");
        }
        assert_eq!(s.stats().keys, 4);
        assert_eq!(s.stats().tombstones, 1);
        assert_eq!(s.recovery_report().truncated, None);
    });
}
