//! The shard-aware client (`ringkv-client`, hedged reads off so every
//! faster answer is failover's) rides through a stopped node and a killed one:
//! it gives a replica a deadline derived from the latencies it observed,
//! then asks the next (reads and writes), and retries on a reset or refused
//! connection. Load is bounded in operations and time.

use ringkv_client::{Client, Level, ReadOptions, WriteOptions};
use ringkv_tests::harness::Cluster;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const FAST: &[&str] = &["--request-timeout-ms", "2000"];

/// (offset from the start, latency, error if any) of every operation.
type Log = Arc<Mutex<Vec<(Duration, Duration, Option<String>)>>>;

fn p99(lat: &mut [Duration]) -> Duration {
    lat.sort();
    lat.get(lat.len() * 99 / 100).copied().unwrap_or_default()
}

#[test]
fn the_shard_aware_client_rides_through_a_stopped_and_a_killed_node_without_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Cluster::start(dir.path(), 3, 1, FAST);
    let seeds = c.addrs();
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let run_for = Duration::from_secs(16);
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (seeds, log) = (seeds.clone(), log.clone());
            std::thread::spawn(move || {
                let mut client = Client::builder().seeds(seeds).hedged_reads(false).build().unwrap();
                let opts = WriteOptions { w: Some(Level::Count(2)), ..Default::default() };
                let read = ReadOptions { r: Some(Level::Count(2)), ..Default::default() };
                let mut i = 0u64;
                while start.elapsed() < run_for && i < 20_000 {
                    let key = format!("f{}", (i * 7 + w) % 100);
                    let t = Instant::now();
                    let result = if i.is_multiple_of(2) {
                        client.put(key.as_bytes(), format!("v{i}"), &opts).map(|_| ())
                    } else {
                        client.get_with(key.as_bytes(), &read).map(|_| ())
                    };
                    let entry = (t - start, t.elapsed(), result.err().map(|e| e.to_string()));
                    log.lock().unwrap().push(entry);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let stopped = start.elapsed();
    c.nodes[1].pause();
    std::thread::sleep(Duration::from_secs(5));
    c.nodes[1].resume();
    let resumed = start.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let killed = start.elapsed();
    c.nodes[2].kill();
    for w in workers {
        w.join().unwrap();
    }
    let log = log.lock().unwrap();
    let errors: Vec<_> = log.iter().filter(|e| e.2.is_some()).collect();
    let window = |from: Duration, to: Duration| -> Vec<Duration> {
        log.iter().filter(|e| e.0 >= from && e.0 < to).map(|e| e.1).collect()
    };
    let mut healthy = window(Duration::ZERO, stopped);
    let mut during_stop = window(stopped, resumed);
    let mut after_kill = window(killed, run_for);
    let worst = during_stop.iter().chain(&after_kill).max().copied().unwrap_or_default();
    println!(
        "{} operations; p99 healthy {:?}, during the stop {:?}, after the kill {:?}; worst {worst:?}; {} errors",
        log.len(),
        p99(&mut healthy),
        p99(&mut during_stop),
        p99(&mut after_kill),
        errors.len()
    );
    assert!(errors.is_empty(), "no errors through the faults: {:?}", &errors[..errors.len().min(5)]);
    assert!(during_stop.len() > 200 && after_kill.len() > 200, "the load kept running");
    // Without failover a request to the stopped node waits out the whole
    // stop; no request waits anywhere near that long now.
    assert!(worst < Duration::from_millis(1500), "worst latency {worst:?}");
}
