//! Storage benchmarks of one shard's store, driven in-process (no network):
//!
//! - `index-memory [--keys N]`: heap bytes the index costs per 16-byte key;
//! - `durable-writes --dir D [--writers W] [--seconds S] [--value B]`: group
//!   commit throughput with 1 KiB values, and the bytes each fdatasync
//!   carried (what `bench/storage.sh` hands to fio as its block size);
//! - `restart --dir D [--keys N] [--value B]`: start-up time with hint files
//!   versus a full log replay of the same data;
//! - `compaction-latency --dir D [--keys N] [--seconds S]`: get latency
//!   percentiles while idle and while compaction rewrites half the log.
//!
//! Each prints a human summary and one `result ...` line of `key=value`
//! pairs for scripts. Without a command (plain `cargo bench`) it runs the
//! quick, disk-free `index-memory`.

use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use ringkv_core::version::VersionVector;
use ringkv_engine::store::index::{Entry, Index, KeyHasher, Loc};
use ringkv_engine::store::{compaction, Store, StoreConfig, WriteContext};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Counts live heap bytes, so `index-memory` measures what the allocator was
/// asked for rather than guessing from type sizes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const PARTITIONS: u32 = 256;
const BLIND: WriteContext = WriteContext::Client(VersionVector::new_const());

struct Args(Vec<String>);

impl Args {
    fn value<T: std::str::FromStr>(&self, flag: &str, default: T) -> T {
        match self.0.iter().position(|a| a == flag) {
            None => default,
            Some(i) => {
                let raw = self.0.get(i + 1).unwrap_or_else(|| fail(&format!("{flag} needs a value")));
                raw.parse().unwrap_or_else(|_| fail(&format!("{flag}: cannot parse {raw:?}")))
            }
        }
    }

    fn dir(&self) -> PathBuf {
        let dir: String = self.value("--dir", String::new());
        if dir.is_empty() {
            fail("--dir DIR is required (a directory on the disk to measure)");
        }
        PathBuf::from(dir)
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("storage bench: {msg}");
    std::process::exit(2)
}

fn main() {
    let args = Args(std::env::args().skip(1).filter(|a| a != "--bench").collect());
    match args.0.first().map(String::as_str) {
        None | Some("index-memory") => index_memory(args.value("--keys", 1_000_000)),
        Some("durable-writes") => durable_writes(
            &args.dir(),
            args.value("--writers", 32),
            args.value("--seconds", 10),
            args.value("--value", 1024),
        ),
        Some("restart") => restart(&args.dir(), args.value("--keys", 10_000_000), args.value("--value", 100)),
        Some("compaction-latency") => {
            compaction_latency(&args.dir(), args.value("--keys", 200_000), args.value("--seconds", 10))
        }
        Some(other) => fail(&format!("unknown command {other:?}")),
    }
}

fn key16(i: u64) -> [u8; 16] {
    let mut k = *b"key-000000000000";
    let digits = format!("{i:012}");
    k[4..].copy_from_slice(&digits.as_bytes()[digits.len() - 12..]);
    k
}

fn index_memory(keys: u64) {
    let before = LIVE.load(Ordering::Relaxed);
    let mut index = Index::new(PARTITIONS, KeyHasher::new(1));
    for i in 0..keys {
        let key = key16(i);
        let p = ringkv_core::keyspace::partition_of(&key, PARTITIONS);
        let loc = Loc { segment: (i / 100_000) as u32, offset: (i % 100_000) as u32 * 64, len: 64 };
        index.insert(p, &key, Entry::new(loc, false, i as u32));
    }
    let bytes = LIVE.load(Ordering::Relaxed) - before;
    let per_key = bytes as f64 / keys as f64;
    // The payload itself: the key and the 16-byte entry, nothing else.
    let floor = 16.0 + std::mem::size_of::<Entry>() as f64;
    println!(
        "index: {keys} keys of 16 bytes in {PARTITIONS} partitions: {:.1} MiB, {per_key:.1} bytes/key \
         ({:.2}x the {floor} bytes of key + entry; Merkle trees included)",
        bytes as f64 / (1 << 20) as f64,
        per_key / floor
    );
    println!("result index-memory keys={keys} bytes_per_key={per_key:.1} floor_bytes={floor}");
    drop(index);
}

fn config(dir: &Path, cache_bytes: usize) -> StoreConfig {
    StoreConfig {
        dir: dir.to_path_buf(),
        shard: 0,
        incarnation: 1,
        partitions: PARTITIONS,
        segment_bytes: 64 << 20,
        cache_bytes,
        max_unflushed_bytes: 8 << 20,
        hash_seed: 7,
        max_hints: 0,
    }
}

fn executor() -> glommio::LocalExecutor {
    LocalExecutorBuilder::new(Placement::Unbound).make().unwrap_or_else(|e| fail(&format!("glommio: {e}")))
}

fn fresh(dir: &Path) {
    if dir.exists() {
        std::fs::remove_dir_all(dir).unwrap_or_else(|e| fail(&format!("clearing {}: {e}", dir.display())));
    }
}

fn drop_page_cache() {
    // Recovery reads segments with O_DIRECT, but hint files go through the
    // page cache; dropping it makes the hint-file start a cold one. Needs root.
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn durable_writes(dir: &Path, writers: u64, seconds: u64, value: usize) {
    fresh(dir);
    let dir = dir.to_path_buf();
    executor().run(async move {
        let store = Store::open(config(&dir, 8 << 20)).await.unwrap_or_else(|e| fail(&e.to_string()));
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let before = store.stats();
        let started = Instant::now();
        let tasks: Vec<_> = (0..writers)
            .map(|w| {
                let store = store.clone();
                glommio::spawn_local(async move {
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let key = key16(w << 40 | n);
                        store.write(&key, Some(vec![n as u8; value]), &BLIND, true, 1).await.expect("durable write");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        let mut ops = 0;
        for t in tasks {
            ops += t.await;
        }
        let secs = started.elapsed().as_secs_f64();
        let after = store.stats();
        let bytes = after.log_bytes - before.log_bytes;
        let flushes = (after.flushes - before.flushes).max(1);
        println!(
            "durable writes: {writers} writers, {value}-byte values, {seconds}s: {:.0} ops/s, {:.1} MiB/s of log, \
             {:.1} records and {} bytes per fdatasync, {:.0} fdatasyncs/s",
            ops as f64 / secs,
            bytes as f64 / secs / (1 << 20) as f64,
            ops as f64 / flushes as f64,
            bytes / flushes,
            flushes as f64 / secs
        );
        println!(
            "result durable-writes ops_per_sec={:.0} mib_per_sec={:.2} bytes_per_flush={} records_per_flush={:.1}",
            ops as f64 / secs,
            bytes as f64 / secs / (1 << 20) as f64,
            bytes / flushes,
            ops as f64 / flushes as f64
        );
        store.close().await.expect("close");
    });
}

fn restart(dir: &Path, keys: u64, value: usize) {
    fresh(dir);
    let load_dir = dir.to_path_buf();
    let loaded = Instant::now();
    executor().run(async move {
        let store = Store::open(config(&load_dir, 8 << 20)).await.unwrap_or_else(|e| fail(&e.to_string()));
        load(&store, keys, value, 0).await;
        store.close().await.expect("close");
    });
    println!("restart: loaded {keys} keys with {value}-byte values in {:.1}s", loaded.elapsed().as_secs_f64());

    let open = |label: &'static str| {
        drop_page_cache();
        let dir = dir.to_path_buf();
        executor().run(async move {
            let started = Instant::now();
            let store = Store::open(config(&dir, 8 << 20)).await.unwrap_or_else(|e| fail(&e.to_string()));
            let took = started.elapsed().as_secs_f64();
            let report = store.recovery_report().clone();
            let stats = store.stats();
            assert_eq!(stats.keys, keys, "every key is back after the {label} start");
            println!(
                "restart ({label}): {took:.2}s for {} keys; {} segments, {} from hint files, {} scanned ({:.0} MiB read)",
                stats.keys,
                report.segments,
                report.segments_from_hints,
                report.segments_scanned,
                report.bytes_scanned as f64 / (1 << 20) as f64
            );
            store.close().await.expect("close");
            took
        })
    };
    let with_hints = open("hint files");
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).expect("data dir") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "hint") {
            std::fs::remove_file(&path).expect("remove hint file");
            removed += 1;
        }
    }
    assert!(removed > 0, "the clean close wrote hint files");
    let replay = open("full replay");
    println!(
        "result restart keys={keys} hints_s={with_hints:.2} replay_s={replay:.2} speedup={:.1}",
        replay / with_hints
    );
}

fn compaction_latency(dir: &Path, keys: u64, seconds: u64) {
    fresh(dir);
    let dir = dir.to_path_buf();
    executor().run(async move {
        // A small cache, so gets go to the disk like a data set larger than RAM.
        let store = Store::open(config(&dir, 1 << 20)).await.unwrap_or_else(|e| fail(&e.to_string()));
        // Write every key, then overwrite two thirds of them: the early
        // segments become mostly garbage.
        load(&store, keys, 1024, 0).await;
        load(&store, keys * 2 / 3, 1024, 1).await;
        store.sync().await.expect("sync");
        store.write_ready_hints().await;
        let garbage = compaction::candidates(&store, 0.5).len();

        let idle = read_load(&store, keys, Duration::from_secs(seconds), None).await;
        let busy_queue = glommio::executor().create_task_queue(
            glommio::Shares::Static(20),
            glommio::Latency::NotImportant,
            "compaction",
        );
        let running = Rc::new(Cell::new(true));
        let compactor = {
            let (store, running) = (store.clone(), running.clone());
            glommio::spawn_local_into(
                async move {
                    // One pass of the server's compaction loop, at its
                    // default rate (64 MiB/s).
                    let done = compaction::pass(&store, 0.5, Some(64 << 20)).await.expect("compaction");
                    running.set(false);
                    done.iter().map(|c| c.bytes_in + c.bytes_out).sum::<u64>()
                },
                busy_queue,
            )
            .expect("spawn compaction")
        };
        let busy = read_load(&store, keys, Duration::from_secs(seconds), Some(running.clone())).await;
        let moved = compactor.await;
        println!(
            "compaction latency: {keys} keys of 1 KiB, {garbage} segments over half garbage, {} MiB compacted",
            moved >> 20
        );
        for (label, (h, secs)) in [("idle", &idle), ("compacting", &busy)] {
            println!(
                "  {label:>10}: {} gets in {secs:.1}s, p50 {} us, p99 {} us, p99.9 {} us, max {} us",
                h.len(),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99),
                h.value_at_quantile(0.999),
                h.max()
            );
        }
        let (i99, b99) = (idle.0.value_at_quantile(0.99), busy.0.value_at_quantile(0.99));
        println!(
            "result compaction-latency idle_p99_us={i99} compacting_p99_us={b99} ratio={:.2} compacted_mib={}",
            b99 as f64 / i99.max(1) as f64,
            moved >> 20
        );
        store.close().await.expect("close");
    });
}

/// Writes keys 0..`keys` from 16 concurrent writers, each value `value`
/// bytes of `fill`, superseding what the key held (no siblings), without
/// waiting for fdatasync.
async fn load(store: &Rc<Store>, keys: u64, value: usize, fill: u8) {
    const WRITERS: u64 = 16;
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            glommio::spawn_local(async move {
                for i in (w..keys).step_by(WRITERS as usize) {
                    let ctx = match store.get(&key16(i)).await.expect("get") {
                        Some(o) => WriteContext::Client(o.context().clone()),
                        None => BLIND,
                    };
                    store.write(&key16(i), Some(vec![fill; value]), &ctx, false, 1).await.expect("write");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await;
    }
}

/// Gets of random keys from 4 concurrent readers for `limit`, or until
/// `while_set` turns false; returns their latencies and the time it took.
async fn read_load(
    store: &Rc<Store>,
    keys: u64,
    limit: Duration,
    while_set: Option<Rc<Cell<bool>>>,
) -> (Histogram<u64>, f64) {
    let started = Instant::now();
    let deadline = started + limit;
    let tasks: Vec<_> = (0..4u64)
        .map(|r| {
            let (store, while_set) = (store.clone(), while_set.clone());
            glommio::spawn_local(async move {
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ r;
                while Instant::now() < deadline && while_set.as_ref().is_none_or(|w| w.get()) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let t = Instant::now();
                    let got = store.get(&key16(x % keys)).await.expect("get");
                    h.record(t.elapsed().as_micros() as u64).expect("record");
                    assert!(got.is_some(), "every key was written");
                }
                h
            })
        })
        .collect();
    let mut all = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        all.add(t.await).expect("merge");
    }
    (all, started.elapsed().as_secs_f64())
}
