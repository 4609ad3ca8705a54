//! Where a request goes: the routing state shared by every request of a
//! client, with no I/O.
//!
//! The [`Router`] owns the cluster's [`Topology`] (key -> partition ->
//! replicas -> each replica's owning shard address), what the client knows
//! of each endpoint's health, and the latencies it observed. From these it
//! derives, for every request:
//!
//! - the order of endpoints to try: the key's replicas in preference order,
//!   those marked down moved last (still tried: they may be all there is);
//! - how long one replica gets before the next is asked, and when a read is
//!   hedged; both from the observed p99 ([`attempt_deadline`],
//!   [`down_backoff`]);
//! - when the topology must be fetched again: a response carried a newer
//!   ring version, or a request had to fail over (a member may have
//!   changed). Refreshes are at most one in flight and one per
//!   [`REFRESH_MIN_INTERVAL`].
//!
//! An endpoint that failed is "down" for a back-off (1 s doubling to 8 s):
//! requests try it last, so a client reconnects to it only when every
//! other replica failed too. The first request after the back-off probes
//! it, since it is then ordered normally again; a success clears it.

use ringkv_core::latency::RecentLatencies;
use ringkv_net::Topology;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The shortest wait for one replica before the next is asked (high
/// enough that a busy machine's ordinary jitter does not send requests
/// elsewhere).
pub const MIN_ATTEMPT: Duration = Duration::from_millis(50);
/// The wait before enough latencies were seen to derive one.
const FIRST_ATTEMPT: Duration = Duration::from_millis(500);
/// Request latencies kept for the deadline.
pub const SAMPLES: usize = 512;

/// How long one replica gets before the next is asked: twice the observed
/// p99 (`None` before enough samples), at least [`MIN_ATTEMPT`], at most
/// `timeout`.
pub fn attempt_deadline(p99_us: Option<u64>, timeout: Duration) -> Duration {
    let derived = p99_us.map_or(FIRST_ATTEMPT, |p99| Duration::from_micros(2 * p99).max(MIN_ATTEMPT));
    derived.min(timeout)
}

/// How long an endpoint that failed `failures` times in a row (at least
/// once) is tried last before it is probed again: 1 s, doubling to 8 s.
pub fn down_backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.max(1).saturating_sub(1).min(3))
}

/// The least time between two topology refreshes.
pub const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The earliest a read is hedged, however fast the cluster (below this a
/// hedge only doubles the load).
pub const MIN_HEDGE_DELAY: Duration = Duration::from_millis(2);

#[derive(Debug, Clone, Copy)]
struct Health {
    failures: u32,
    down_until: Instant,
}

/// What makes a router: the client's configuration of routing.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The whole time a request may take, all attempts together.
    pub request_timeout: Duration,
    /// Whether reads are hedged.
    pub hedge_reads: bool,
    /// The percentile of observed latencies after which a read is hedged
    /// (99: only the slowest hundredth of reads is doubled).
    pub hedge_percentile: f64,
    /// Where to fetch the topology from when no member answers.
    pub seeds: Vec<SocketAddr>,
}

/// The routing state; see the module doc.
#[derive(Debug)]
pub struct Router {
    config: RouterConfig,
    topology: Option<Topology>,
    health: HashMap<SocketAddr, Health>,
    latencies: RecentLatencies,
    /// The newest ring version any node reported.
    newest_seen: u64,
    /// A failover happened since the last refresh.
    failed_over: bool,
    refresh_in_flight: bool,
    last_refresh: Option<Instant>,
}

impl Router {
    /// A router with no topology yet (every key routes nowhere until
    /// [`Router::set_topology`]).
    pub fn new(config: RouterConfig) -> Router {
        Router {
            config,
            topology: None,
            health: HashMap::new(),
            latencies: RecentLatencies::new(SAMPLES),
            newest_seen: 0,
            failed_over: false,
            refresh_in_flight: false,
            last_refresh: None,
        }
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// The topology requests are routed by, if one was fetched.
    pub fn topology(&self) -> Option<&Topology> {
        self.topology.as_ref()
    }

    /// The ring version routed by (0: none yet).
    pub fn ring_version(&self) -> u64 {
        self.topology.as_ref().map_or(0, Topology::version)
    }

    /// The newest ring version a node reported (at least
    /// [`Router::ring_version`]).
    pub fn newest_ring_version(&self) -> u64 {
        self.newest_seen.max(self.ring_version())
    }

    /// Routes by `t` from now on (ends a refresh in flight).
    pub fn set_topology(&mut self, t: Topology, now: Instant) {
        self.newest_seen = self.newest_seen.max(t.version());
        self.topology = Some(t);
        self.failed_over = false;
        self.refresh_in_flight = false;
        self.last_refresh = Some(now);
    }

    /// A refresh failed; a later one may be tried.
    pub fn refresh_failed(&mut self, now: Instant) {
        self.refresh_in_flight = false;
        self.last_refresh = Some(now);
    }

    /// The endpoints to try for `key`, in order: its replicas' shard
    /// addresses, endpoints marked down last.
    pub fn replicas(&self, key: &[u8], now: Instant) -> Vec<SocketAddr> {
        let Some(t) = &self.topology else { return Vec::new() };
        let mut route = t.route(key);
        // A stable sort keeps the preference order within each group.
        route.sort_by_key(|a| self.is_down(a, now));
        route
    }

    /// Where to fetch the topology: every member's first shard, then the
    /// seeds, endpoints marked down last.
    pub fn topology_sources(&self, now: Instant) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = self.topology.as_ref().map(Topology::members).unwrap_or_default();
        out.sort();
        for s in &self.config.seeds {
            if !out.contains(s) {
                out.push(*s);
            }
        }
        out.sort_by_key(|a| self.is_down(a, now));
        out
    }

    /// Whether `addr` is in its back-off after a failure.
    pub fn is_down(&self, addr: &SocketAddr, now: Instant) -> bool {
        self.health.get(addr).is_some_and(|h| h.down_until > now)
    }

    /// How long one replica gets before the next is asked.
    pub fn attempt_deadline(&self) -> Duration {
        attempt_deadline(self.latencies.p99_us(), self.config.request_timeout)
    }

    /// How long a read waits for its first replica before also asking the
    /// next (`None`: no hedging, or too few latencies seen to know what is
    /// slow): the configured percentile of observed latencies, so only
    /// that share of reads is doubled.
    pub fn hedge_delay(&self) -> Option<Duration> {
        if !self.config.hedge_reads {
            return None;
        }
        let after = self.latencies.quantile_us(self.config.hedge_percentile / 100.0)?;
        Some(Duration::from_micros(after).max(MIN_HEDGE_DELAY).min(self.attempt_deadline()))
    }

    /// `addr` answered a request sent at `sent` by `now`.
    pub fn succeeded(&mut self, addr: SocketAddr, sent: Instant, now: Instant) {
        let us = now.saturating_duration_since(sent).as_micros().min(u128::from(u64::MAX)) as u64;
        self.latencies.record(us);
        self.health.remove(&addr);
    }

    /// `addr` answered with an error: it is up, whatever it said.
    pub fn answered(&mut self, addr: SocketAddr) {
        self.health.remove(&addr);
    }

    /// `addr` failed (did not answer in time, or its connection broke):
    /// it is tried last until its back-off ends.
    pub fn failed(&mut self, addr: SocketAddr, now: Instant) {
        let h = self.health.entry(addr).or_insert(Health { failures: 0, down_until: now });
        h.failures = h.failures.saturating_add(1);
        h.down_until = now + down_backoff(h.failures);
    }

    /// A request went to another endpoint than its first choice.
    pub fn failed_over(&mut self) {
        self.failed_over = true;
    }

    /// A node reported `ring_version` in a response.
    pub fn observe_ring_version(&mut self, ring_version: u64) {
        self.newest_seen = self.newest_seen.max(ring_version);
    }

    /// Whether the topology is to be fetched now: it is stale (a node
    /// reported a newer ring) or a request failed over, no refresh is in
    /// flight and the last ended long enough ago. A `true` answer marks a
    /// refresh in flight; end it with [`Router::set_topology`] or
    /// [`Router::refresh_failed`].
    pub fn start_refresh(&mut self, now: Instant) -> bool {
        let stale = self.newest_seen > self.ring_version() || self.topology.is_none();
        let due = self.last_refresh.is_none_or(|t| now.saturating_duration_since(t) >= REFRESH_MIN_INTERVAL);
        if (stale || self.failed_over) && due && !self.refresh_in_flight {
            self.refresh_in_flight = true;
            return true;
        }
        false
    }
}

#[cfg(test)]
// Tests take one reading of the clock as the base of fabricated times.
#[allow(clippy::disallowed_methods)]
pub(crate) mod tests {
    use super::*;
    use ringkv_core::membership::{ClusterState, Member};
    use ringkv_core::ring::{claim, Claimant};

    #[test]
    fn the_attempt_deadline_is_twice_the_p99_within_its_bounds_and_the_back_off_doubles_to_8_s() {
        let timeout = Duration::from_secs(2);
        assert_eq!(attempt_deadline(None, timeout), FIRST_ATTEMPT, "before enough samples");
        assert_eq!(attempt_deadline(Some(300_000), timeout), Duration::from_millis(600));
        assert_eq!(attempt_deadline(Some(1_000), timeout), MIN_ATTEMPT, "never below the floor");
        assert_eq!(attempt_deadline(Some(5_000_000), timeout), timeout, "never past the timeout");
        let backoffs: Vec<u64> = (0..6).map(|f| down_backoff(f).as_secs()).collect();
        assert_eq!(backoffs, [1, 1, 2, 4, 8, 8]);
    }

    /// A topology of `n` nodes at 127.0.0.1..n:7070, one shard each.
    pub(crate) fn topology(n: u8, ring_version: u64) -> Topology {
        let mut state = ClusterState::new("c", 64);
        let ids: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let member =
                Member { heartbeat: 1, version: 1, ..Member::new(id, &format!("127.0.0.{}:7070", i + 1), 1, 1) };
            state.members.insert(id.clone(), member);
        }
        let claimants: Vec<Claimant> = ids.iter().map(|id| Claimant { id: id.clone(), weight: 1 }).collect();
        let mut ring = claim(None, &claimants, 64, 3);
        ring.version = ring_version;
        state.ring = Some(ring);
        Topology::decode(&state.encode(), 3).expect("a valid topology")
    }

    pub(crate) fn config() -> RouterConfig {
        RouterConfig {
            request_timeout: Duration::from_secs(2),
            hedge_reads: true,
            hedge_percentile: 99.0,
            seeds: vec!["127.0.0.9:7070".parse().unwrap()],
        }
    }

    #[test]
    fn a_key_routes_to_its_replicas_with_down_endpoints_last_until_their_backoff_ends() {
        let t0 = Instant::now();
        let mut r = Router::new(config());
        assert!(r.replicas(b"k", t0).is_empty(), "no topology, no route");
        r.set_topology(topology(3, 1), t0);
        let natural = r.replicas(b"k", t0);
        assert_eq!(natural.len(), 3);
        assert_eq!(natural, r.topology().unwrap().route(b"k"), "the topology's preference order");
        r.failed(natural[0], t0);
        let during = r.replicas(b"k", t0 + Duration::from_millis(999));
        assert_eq!(during, vec![natural[1], natural[2], natural[0]], "the failed one is tried last");
        assert_eq!(r.replicas(b"k", t0 + Duration::from_secs(1)), natural, "probed again after 1 s");
        // A second failure doubles the back-off; a success clears it.
        r.failed(natural[0], t0 + Duration::from_secs(1));
        assert!(r.is_down(&natural[0], t0 + Duration::from_millis(2999)));
        r.succeeded(natural[0], t0, t0 + Duration::from_secs(3));
        assert!(!r.is_down(&natural[0], t0 + Duration::from_secs(3)));
    }

    #[test]
    fn a_newer_ring_version_or_a_failover_asks_for_one_refresh_at_a_time() {
        let t0 = Instant::now();
        let mut r = Router::new(config());
        r.set_topology(topology(3, 5), t0);
        let later = t0 + REFRESH_MIN_INTERVAL;
        assert!(!r.start_refresh(later), "up to date");
        r.observe_ring_version(5);
        assert!(!r.start_refresh(later), "the same version is not stale");
        r.observe_ring_version(6);
        assert!(!r.start_refresh(t0 + Duration::from_millis(10)), "not twice a second");
        assert!(r.start_refresh(later), "a node knows a newer ring");
        assert!(!r.start_refresh(later), "one refresh in flight");
        r.refresh_failed(later);
        assert!(r.start_refresh(later + REFRESH_MIN_INTERVAL), "retried after a failed refresh");
        r.set_topology(topology(3, 6), later + REFRESH_MIN_INTERVAL);
        let much_later = later + 3 * REFRESH_MIN_INTERVAL;
        assert!(!r.start_refresh(much_later));
        r.failed_over();
        assert!(r.start_refresh(much_later), "a failover may mean a member changed");
    }

    #[test]
    fn deadlines_and_the_hedge_follow_the_observed_latency() {
        let t0 = Instant::now();
        let mut r = Router::new(config());
        assert_eq!(r.hedge_delay(), None, "nothing observed: no basis to call a read slow");
        assert_eq!(r.attempt_deadline(), attempt_deadline(None, Duration::from_secs(2)));
        for _ in 0..64 {
            r.succeeded("127.0.0.1:7070".parse().unwrap(), t0, t0 + Duration::from_millis(10));
        }
        assert_eq!(r.hedge_delay(), Some(Duration::from_millis(10)));
        assert_eq!(r.attempt_deadline(), Duration::from_millis(50), "2 x p99, at least MIN_ATTEMPT");
        let off = Router::new(RouterConfig { hedge_reads: false, ..config() });
        assert_eq!(off.hedge_delay(), None);
        // Hedged after the p90 instead: 9 reads in 10 take 10 ms, 1 takes 40.
        let mut p90 = Router::new(RouterConfig { hedge_percentile: 90.0, ..config() });
        for i in 0..100 {
            let ms = if i % 10 == 0 { 40 } else { 10 };
            p90.succeeded("127.0.0.1:7070".parse().unwrap(), t0, t0 + Duration::from_millis(ms));
        }
        assert_eq!(p90.hedge_delay(), Some(Duration::from_millis(40)), "p90 of 10 x 40 ms among 100");
        let mut p80 = Router::new(RouterConfig { hedge_percentile: 80.0, ..config() });
        for i in 0..100 {
            let ms = if i % 10 == 0 { 40 } else { 10 };
            p80.succeeded("127.0.0.1:7070".parse().unwrap(), t0, t0 + Duration::from_millis(ms));
        }
        assert_eq!(p80.hedge_delay(), Some(Duration::from_millis(10)));
    }

    #[test]
    fn topology_sources_are_the_members_then_the_seeds() {
        let t0 = Instant::now();
        let mut r = Router::new(config());
        assert_eq!(r.topology_sources(t0), config().seeds);
        r.set_topology(topology(2, 1), t0);
        let s = r.topology_sources(t0);
        assert_eq!(s.len(), 3);
        assert_eq!(s[2], config().seeds[0]);
    }
}
