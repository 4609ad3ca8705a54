//! A byte-bounded cache of records read from disk, keyed by location.
//!
//! Locations are immutable (a record at (segment, offset) never changes, and
//! segment ids are never reused), so entries need no invalidation: a stale
//! one is simply never asked for again and ages out. Eviction is CLOCK: one
//! reference bit per entry, a second chance for entries read since the hand
//! last passed them.

use super::index::Loc;
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

struct Slot {
    data: Rc<[u8]>,
    referenced: Cell<bool>,
}

pub struct RecordCache {
    map: HashMap<Loc, Slot>,
    clock: VecDeque<Loc>,
    bytes: usize,
    capacity: usize,
}

impl RecordCache {
    pub fn new(capacity: usize) -> Self {
        RecordCache { map: HashMap::new(), clock: VecDeque::new(), bytes: 0, capacity }
    }

    pub fn get(&self, loc: &Loc) -> Option<Rc<[u8]>> {
        let slot = self.map.get(loc)?;
        slot.referenced.set(true);
        Some(slot.data.clone())
    }

    pub fn insert(&mut self, loc: Loc, data: Rc<[u8]>) {
        if data.len() > self.capacity / 4 || self.map.contains_key(&loc) {
            return;
        }
        while self.bytes + data.len() > self.capacity {
            let Some(victim) = self.clock.pop_front() else {
                break;
            };
            let slot = self.map.get(&victim).expect("clock and map agree");
            if slot.referenced.replace(false) {
                self.clock.push_back(victim);
            } else {
                self.bytes -= slot.data.len();
                self.map.remove(&victim);
            }
        }
        self.bytes += data.len();
        self.clock.push_back(loc);
        self.map.insert(loc, Slot { data, referenced: Cell::new(false) });
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(offset: u32) -> Loc {
        Loc { segment: 1, offset, len: 10 }
    }

    #[test]
    fn stays_within_capacity_and_gives_read_entries_a_second_chance() {
        let mut c = RecordCache::new(100);
        for i in 0..5 {
            c.insert(loc(i), vec![i as u8; 20].into());
        }
        assert_eq!(c.bytes(), 100);
        assert!(c.get(&loc(0)).is_some()); // referenced: survives the next eviction
        c.insert(loc(9), vec![9; 20].into());
        assert!(c.bytes() <= 100);
        assert!(c.get(&loc(0)).is_some());
        assert!(c.get(&loc(1)).is_none(), "the unreferenced oldest entry went first");
        assert_eq!(&*c.get(&loc(9)).unwrap(), &[9u8; 20][..]);
    }

    #[test]
    fn oversized_records_are_not_cached() {
        let mut c = RecordCache::new(100);
        c.insert(loc(0), vec![0; 26].into());
        assert_eq!(c.bytes(), 0);
    }
}
