//! The epochs a shard mints dots under, leased durably.
//!
//! A shard's actor is (node incarnation, shard, epoch). The shard may keep
//! minting under an epoch only while it provably holds every dot it minted
//! under it for that key (see `ringkv_core::version`). Two rules ensure that:
//!
//! - an epoch is never handed out twice: epochs come from a lease that is
//!   written to disk before any epoch in it is used;
//! - after an unclean stop, writes acknowledged without fsync may be gone, so
//!   every epoch used before is retired: `floor` (the lowest epoch that may be
//!   reused) jumps past the whole previous lease. A clean stop flushes
//!   everything first and leaves `floor` where it was.
//!
//! State file (`epochs`, replaced atomically): one line
//! `ringkv-epochs v1 floor=F leased=L clean=C`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// How many epochs one durable write of the state file covers.
pub const LEASE: u64 = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochState {
    /// Lowest epoch this shard may reuse (its history is intact from here).
    pub floor: u64,
    /// Epochs below this may have been handed out.
    pub leased: u64,
    /// The last stop flushed everything and recorded the exact next epoch.
    pub clean: bool,
}

impl EpochState {
    const FRESH: EpochState = EpochState { floor: 1, leased: 1, clean: true };

    fn render(&self) -> String {
        format!("ringkv-epochs v1 floor={} leased={} clean={}\n", self.floor, self.leased, u8::from(self.clean))
    }

    fn parse(s: &str) -> Option<EpochState> {
        let mut it = s.trim().split(' ');
        if it.next()? != "ringkv-epochs" || it.next()? != "v1" {
            return None;
        }
        let mut field = |name: &str| it.next()?.strip_prefix(name)?.parse::<u64>().ok();
        let floor = field("floor=")?;
        let leased = field("leased=")?;
        let clean = field("clean=")?;
        (floor <= leased && clean <= 1).then_some(EpochState { floor, leased, clean: clean == 1 })
    }

    /// The state to run under after loading `self`: where to start handing out
    /// epochs, and the floor that applies from now on.
    pub fn on_start(self) -> EpochState {
        if self.clean {
            EpochState { floor: self.floor, leased: self.leased, clean: false }
        } else {
            EpochState { floor: self.leased, leased: self.leased, clean: false }
        }
    }
}

pub struct Epochs {
    path: PathBuf,
    state: EpochState,
    next: u64,
}

impl Epochs {
    /// Loads (or creates) the state in `dir` and leases the first block. Blocking.
    pub fn open(dir: &Path) -> io::Result<Epochs> {
        let path = dir.join("epochs");
        let loaded = match fs::read_to_string(&path) {
            Ok(s) => EpochState::parse(&s).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{} is damaged: {s:?}", path.display()))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => EpochState::FRESH,
            Err(e) => return Err(e),
        };
        let state = loaded.on_start();
        let mut e = Epochs { path, state, next: state.leased };
        e.state.leased = e.next + LEASE;
        e.persist()?;
        Ok(e)
    }

    pub fn floor(&self) -> u64 {
        self.state.floor
    }

    /// True when the next epoch needs a lease extension (a blocking write).
    pub fn exhausted(&self) -> bool {
        self.next >= self.state.leased
    }

    /// The epoch [`Epochs::take`] hands out next.
    pub fn peek(&self) -> u64 {
        self.next
    }

    /// Hands out a fresh epoch; the caller extends the lease first when
    /// [`Epochs::exhausted`].
    pub fn take(&mut self) -> u64 {
        assert!(!self.exhausted(), "epoch taken beyond the durable lease");
        let e = self.next;
        self.next += 1;
        e
    }

    /// The state to write for a lease extension; write it with [`write_state`]
    /// and then call [`Epochs::extended`].
    pub fn extension(&self) -> (PathBuf, EpochState) {
        (self.path.clone(), EpochState { leased: self.state.leased + LEASE, ..self.state })
    }

    pub fn extended(&mut self, state: EpochState) {
        assert!(state.leased > self.state.leased);
        self.state = state;
    }

    /// Records a clean stop: everything is flushed, and the next run may start
    /// exactly at the next unused epoch.
    pub fn close_clean(&mut self) -> io::Result<()> {
        self.state = EpochState { floor: self.state.floor, leased: self.next, clean: true };
        self.persist()
    }

    fn persist(&self) -> io::Result<()> {
        write_state(&self.path, &self.state)
    }
}

/// Replaces the state file atomically and durably. Blocking.
pub fn write_state(path: &Path, state: &EpochState) -> io::Result<()> {
    crate::datadir::replace_file(path, state.render().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_retires_every_epoch_of_the_previous_run() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Epochs::open(dir.path()).unwrap();
        let first = e.take();
        assert_eq!(e.floor(), 1);
        drop(e); // no close_clean: a crash
        let mut e = Epochs::open(dir.path()).unwrap();
        assert!(e.floor() > first, "the epoch used before the crash is no longer reusable");
        assert!(e.take() >= e.floor());
    }

    #[test]
    fn a_clean_stop_keeps_the_floor_and_wastes_no_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Epochs::open(dir.path()).unwrap();
        let a = e.take();
        e.close_clean().unwrap();
        let mut e = Epochs::open(dir.path()).unwrap();
        assert_eq!(e.floor(), 1);
        assert_eq!(e.take(), a + 1);
    }

    #[test]
    fn a_raised_floor_survives_later_clean_stops() {
        let dir = tempfile::tempdir().unwrap();
        drop(Epochs::open(dir.path()).unwrap()); // crash
        let mut e = Epochs::open(dir.path()).unwrap();
        let floor = e.floor();
        e.close_clean().unwrap();
        assert_eq!(Epochs::open(dir.path()).unwrap().floor(), floor);
    }

    #[test]
    fn leases_extend_and_never_repeat_an_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Epochs::open(dir.path()).unwrap();
        let mut last = 0;
        for _ in 0..(LEASE + 5) {
            if e.exhausted() {
                let (path, state) = e.extension();
                write_state(&path, &state).unwrap();
                e.extended(state);
            }
            let x = e.take();
            assert!(x > last);
            last = x;
        }
        drop(e);
        assert!(Epochs::open(dir.path()).unwrap().take() > last);
    }

    #[test]
    fn a_damaged_state_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("epochs"), "garbage").unwrap();
        assert!(Epochs::open(dir.path()).is_err());
    }
}
