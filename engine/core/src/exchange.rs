//! The gossip exchange as digests and deltas, so a round costs what
//! changed rather than the whole cluster state.
//!
//! Pushing the whole [`ClusterState`] every round costs about 100 bytes per
//! member (address, pins, load) plus the ring: some 150 KB at 1,000 members
//! and Q=4096, every second, from every node. The exchange here (after
//! Cassandra's SYN/ACK/ACK2 and van Renesse's scuttlebutt) sends that only
//! when the two nodes know different *rosters*:
//!
//! 1. [`Syn`]: the initiator's roster fingerprint (a hash of every member's
//!    id and generation), its ring's key, and for each member in id order its
//!    record version and heartbeat. Heartbeats are sent as the distance
//!    below the highest one: they follow the members' clocks in seconds (see
//!    [`crate::membership::Member::heartbeat`]), so a live member's costs a
//!    byte, and a record version a byte or two.
//! 2. [`Ack`]: if the rosters are the same, the receiver takes the newer
//!    heartbeats, and answers with its own heartbeats, the records it has
//!    newer, the positions of the records it wants, and its ring if that is
//!    newer ([`Ack::Delta`]). If they differ (a member joined or restarted
//!    and not everyone knows yet), positions mean nothing to the other side:
//!    it answers with a keyed digest instead ([`Ack::Roster`]: per member its
//!    id, generation, record version and heartbeat), a sixth of the whole
//!    state at a thousand members.
//! 3. [`Ack2`]: the initiator sends the records and ring asked for; after a
//!    keyed digest, the records it has newer and the ids it wants; nothing
//!    at all if there is nothing to send.
//! 4. [`Ack3`]: after a keyed digest, the receiver sends the records the
//!    initiator wanted (the answer to the `Ack2` request).
//!
//! Invariants: a delta is applied positionally only under the roster it was
//! computed for (either side's roster may change between messages; then
//! only the records, which carry their ids, are taken); every record
//! taken goes through the same merge as a whole state, so the outcome is the
//! one the full push-pull would reach, only later at worst.
//!
//! Pure: the caller moves the bytes and says what time it is.

use crate::codec::{err, put_varint, DecodeError, Reader};
use crate::membership::{
    decode_member, encode_member, get_str, put_str, ring_key, ClusterState, Gossip, Member, Mismatch, STATE_FORMAT,
};
use crate::ring::Ring;

/// The first message of an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Syn {
    pub cluster: String,
    pub partitions: u32,
    roster: u64,
    ring: Option<(u64, u64)>,
    /// Per member in id order: record version and heartbeat.
    entries: Vec<(u64, u64)>,
}

/// The receiver's answer to a [`Syn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack {
    Delta(Delta),
    /// The rosters differ: the receiver's keyed digest.
    Roster(Roster),
}

/// Every member the receiver knows, by id: what a peer with another roster
/// needs to see what differs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    /// The receiver's roster fingerprint, for the beats that come back.
    roster: u64,
    /// Per member in id order: id, generation, record version, heartbeat.
    entries: Vec<(String, u64, u64, u64)>,
    ring: Option<(u64, u64)>,
}

/// What the receiver of a [`Syn`] under the same roster sends back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    roster: u64,
    /// The receiver's heartbeat of each member, in id order.
    beats: Vec<u64>,
    /// Records the receiver has newer than the initiator.
    records: Vec<Member>,
    /// Positions (in id order) of records the initiator has newer.
    wanted: Vec<u32>,
    ring: Option<Ring>,
    /// The initiator's ring is newer.
    want_ring: bool,
}

/// The initiator's last message, when it has anything to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ack2 {
    Records {
        records: Vec<Member>,
        ring: Option<Ring>,
    },
    /// After [`Ack::Roster`]: what the initiator has newer, and the ids and
    /// ring it wants.
    Keyed {
        /// The receiver's roster, and the initiator's heartbeat of each of
        /// its members in that order (0: not known), so heartbeats travel
        /// both ways while the rosters differ.
        roster: u64,
        beats: Vec<u64>,
        records: Vec<Member>,
        ring: Option<Ring>,
        wanted: Vec<String>,
        want_ring: bool,
    },
}

/// After [`Ack2::Keyed`]: the records (and ring) the initiator wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack3 {
    records: Vec<Member>,
    ring: Option<Ring>,
}

/// Any message of the exchange, as it travels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Syn(Syn),
    Ack(Ack),
    Ack2(Ack2),
    Ack3(Ack3),
}

// Tags of the encoded messages. A cluster state's first byte is its format
// (1 to STATE_FORMAT), so a peer that still pushes whole states is told
// apart from these.
const SYN: u8 = 0x80;
const ACK_DELTA: u8 = 0x81;
const ACK_ROSTER: u8 = 0x82;
const ACK2_RECORDS: u8 = 0x83;
const ACK2_KEYED: u8 = 0x84;
const ACK3: u8 = 0x85;
const _: () = assert!(STATE_FORMAT < SYN);

/// Fingerprint of the members' ids and generations.
fn roster(state: &ClusterState) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for m in state.members.values() {
        h.update(m.id.as_bytes());
        h.update(&[0]);
        h.update(&m.generation.to_le_bytes());
    }
    h.digest()
}

impl Gossip {
    /// Opens an exchange with a peer.
    pub fn syn(&self) -> Syn {
        let s = &self.state;
        Syn {
            cluster: s.cluster.clone(),
            partitions: s.partitions,
            roster: roster(s),
            ring: s.ring.as_ref().map(ring_key),
            entries: s.members.values().map(|m| (m.version, m.heartbeat)).collect(),
        }
    }

    /// Answers a peer's [`Syn`], taking its newer heartbeats. A peer of
    /// another cluster is refused, and nothing of it taken.
    pub fn on_syn(&mut self, now_ms: u64, syn: &Syn) -> Result<Ack, Mismatch> {
        self.state.compatible(&ClusterState::new(&syn.cluster, syn.partitions))?;
        let mine = roster(&self.state);
        if mine != syn.roster || syn.entries.len() != self.state.members.len() {
            let entries =
                self.state.members.values().map(|m| (m.id.clone(), m.generation, m.version, m.heartbeat)).collect();
            return Ok(Ack::Roster(Roster { roster: mine, entries, ring: self.state.ring.as_ref().map(ring_key) }));
        }
        let mut records = Vec::new();
        let mut wanted = Vec::new();
        let mut heard = Vec::new();
        for (i, (m, &(version, beat))) in self.state.members.values_mut().zip(&syn.entries).enumerate() {
            if m.id != self.me && m.beat(m.generation, beat) {
                heard.push(m.id.clone());
            }
            if m.version > version {
                records.push(m.clone());
            } else if version > m.version {
                wanted.push(i as u32);
            }
        }
        for id in &heard {
            self.heard(id, now_ms);
        }
        let (ring, want_ring) = compare_rings(self.state.ring.as_ref(), syn.ring);
        let delta = Delta {
            roster: mine,
            beats: self.state.members.values().map(|m| m.heartbeat).collect(),
            records,
            wanted,
            ring: ring.cloned(),
            want_ring,
        };
        self.settle(now_ms, false);
        Ok(Ack::Delta(delta))
    }

    /// Takes the peer's answer; returns the last message, if there is
    /// anything left to send.
    pub fn on_ack(&mut self, now_ms: u64, ack: &Ack) -> Result<Option<Ack2>, Mismatch> {
        let d = match ack {
            Ack::Roster(r) => return Ok(self.on_roster(now_ms, r)),
            Ack::Delta(d) => d,
        };
        let positional = roster(&self.state) == d.roster && d.beats.len() == self.state.members.len();
        let mut asked = Vec::new();
        if positional {
            self.take_beats(now_ms, &d.beats);
            let members: Vec<&Member> = self.state.members.values().collect();
            asked = d.wanted.iter().filter_map(|&i| members.get(i as usize).map(|m| (*m).clone())).collect();
        }
        let ring = if d.want_ring { self.state.ring.clone() } else { None };
        self.absorb(now_ms, &d.records, d.ring.as_ref());
        Ok((!asked.is_empty() || ring.is_some()).then_some(Ack2::Records { records: asked, ring }))
    }

    /// Takes the newer of `beats`, one per member in id order.
    fn take_beats(&mut self, now_ms: u64, beats: &[u64]) {
        let mut heard = Vec::new();
        for (m, &beat) in self.state.members.values_mut().zip(beats) {
            if m.id != self.me && m.beat(m.generation, beat) {
                heard.push(m.id.clone());
            }
        }
        for id in &heard {
            self.heard(id, now_ms);
        }
    }

    /// After a keyed digest: takes the newer heartbeats, and says what this
    /// side has newer and what it wants.
    fn on_roster(&mut self, now_ms: u64, r: &Roster) -> Option<Ack2> {
        let theirs: std::collections::BTreeMap<&str, (u64, u64, u64)> =
            r.entries.iter().map(|(id, g, v, b)| (id.as_str(), (*g, *v, *b))).collect();
        let mut wanted = Vec::new();
        let mut heard = Vec::new();
        for (id, &(generation, version, beat)) in &theirs {
            match self.state.members.get_mut(*id) {
                None => wanted.push(id.to_string()),
                Some(m) => {
                    if (generation, version) > (m.generation, m.version) {
                        wanted.push(id.to_string());
                    } else if m.id != self.me && m.beat(generation, beat) {
                        heard.push(m.id.clone());
                    }
                }
            }
        }
        for id in &heard {
            self.heard(id, now_ms);
        }
        let records: Vec<Member> = self
            .state
            .members
            .values()
            .filter(|m| theirs.get(m.id.as_str()).is_none_or(|&(g, v, _)| (m.generation, m.version) > (g, v)))
            .cloned()
            .collect();
        let (ring, want_ring) = compare_rings(self.state.ring.as_ref(), r.ring);
        let ring = ring.cloned();
        self.settle(now_ms, false);
        let nothing = records.is_empty() && wanted.is_empty() && ring.is_none() && !want_ring;
        let beats = r
            .entries
            .iter()
            .map(|(id, g, _, _)| self.state.members.get(id).filter(|m| m.generation == *g).map_or(0, |m| m.heartbeat))
            .collect();
        (!nothing).then_some(Ack2::Keyed { roster: r.roster, beats, records, ring, wanted, want_ring })
    }

    /// Takes the initiator's last message; after a keyed digest, answers
    /// with what it wanted.
    pub fn on_ack2(&mut self, now_ms: u64, ack2: &Ack2) -> Result<Option<Ack3>, Mismatch> {
        match ack2 {
            Ack2::Records { records, ring } => {
                self.absorb(now_ms, records, ring.as_ref());
                Ok(None)
            }
            Ack2::Keyed { roster: theirs, beats, records, ring, wanted, want_ring } => {
                if roster(&self.state) == *theirs && beats.len() == self.state.members.len() {
                    self.take_beats(now_ms, beats);
                }
                // Taken first: a record it sent may make this node claim a
                // new ring (a joiner's), which it then gets at once.
                let before = self.state.ring.as_ref().map(ring_key);
                self.absorb(now_ms, records, ring.as_ref());
                let claimed = self.state.ring.as_ref().map(ring_key) != before && ring.is_none();
                Ok(Some(Ack3 {
                    records: wanted.iter().filter_map(|id| self.state.members.get(id).cloned()).collect(),
                    ring: if *want_ring || claimed { self.state.ring.clone() } else { None },
                }))
            }
        }
    }

    /// Takes what the peer sent after a keyed digest.
    pub fn on_ack3(&mut self, now_ms: u64, ack3: &Ack3) {
        self.absorb(now_ms, &ack3.records, ack3.ring.as_ref());
    }
}

/// Ours to send if ours is newer; whether to ask for theirs if theirs is.
fn compare_rings(ours: Option<&Ring>, theirs: Option<(u64, u64)>) -> (Option<&Ring>, bool) {
    let ours_key = ours.map(ring_key);
    match (ours_key, theirs) {
        (Some(a), Some(b)) if a > b => (ours, false),
        (Some(_), None) => (ours, false),
        (Some(a), Some(b)) => (None, b > a),
        (None, Some(_)) => (None, true),
        (None, None) => (None, false),
    }
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Message::Syn(s) => {
                out.push(SYN);
                put_str(&mut out, &s.cluster);
                put_varint(&mut out, u64::from(s.partitions));
                out.extend_from_slice(&s.roster.to_le_bytes());
                put_ring_key(&mut out, s.ring);
                let base = s.entries.iter().map(|e| e.1).max().unwrap_or(0);
                put_varint(&mut out, base);
                put_varint(&mut out, s.entries.len() as u64);
                for &(version, beat) in &s.entries {
                    put_varint(&mut out, version);
                    put_varint(&mut out, base - beat);
                }
            }
            Message::Ack(Ack::Delta(d)) => {
                out.push(ACK_DELTA);
                out.extend_from_slice(&d.roster.to_le_bytes());
                put_beats(&mut out, &d.beats);
                put_records(&mut out, &d.records);
                put_varint(&mut out, d.wanted.len() as u64);
                for &w in &d.wanted {
                    put_varint(&mut out, u64::from(w));
                }
                put_ring(&mut out, d.ring.as_ref());
                out.push(u8::from(d.want_ring));
            }
            Message::Ack(Ack::Roster(r)) => {
                out.push(ACK_ROSTER);
                out.extend_from_slice(&r.roster.to_le_bytes());
                put_ring_key(&mut out, r.ring);
                let base = r.entries.iter().map(|e| e.3).max().unwrap_or(0);
                put_varint(&mut out, base);
                put_varint(&mut out, r.entries.len() as u64);
                for (id, generation, version, beat) in &r.entries {
                    put_str(&mut out, id);
                    put_varint(&mut out, *generation);
                    put_varint(&mut out, *version);
                    put_varint(&mut out, base - beat);
                }
            }
            Message::Ack2(Ack2::Records { records, ring }) => {
                out.push(ACK2_RECORDS);
                put_records(&mut out, records);
                put_ring(&mut out, ring.as_ref());
            }
            Message::Ack2(Ack2::Keyed { roster, beats, records, ring, wanted, want_ring }) => {
                out.push(ACK2_KEYED);
                out.extend_from_slice(&roster.to_le_bytes());
                put_beats(&mut out, beats);
                put_records(&mut out, records);
                put_ring(&mut out, ring.as_ref());
                put_varint(&mut out, wanted.len() as u64);
                for id in wanted {
                    put_str(&mut out, id);
                }
                out.push(u8::from(*want_ring));
            }
            Message::Ack3(a) => {
                out.push(ACK3);
                put_records(&mut out, &a.records);
                put_ring(&mut out, a.ring.as_ref());
            }
        }
        out
    }

    /// Whether `bytes` are a message of this exchange rather than a whole
    /// cluster state pushed by a node of an older build.
    pub fn is_exchange(bytes: &[u8]) -> bool {
        bytes.first().is_some_and(|&t| (SYN..=ACK3).contains(&t))
    }

    /// Decodes a message; `partitions` bounds positions and pins (the
    /// receiver's Q: a message of another Q is refused by the Syn check or
    /// fails here).
    pub fn decode(bytes: &[u8], partitions: u32) -> Result<Message, DecodeError> {
        let mut r = Reader::new(bytes);
        let tag = r.u8()?;
        let msg = match tag {
            SYN => {
                let cluster = get_str(&mut r)?;
                let partitions = u32::try_from(r.varint()?).map_err(|_| DecodeError { what: "partitions over u32" })?;
                let roster = r.u64_le()?;
                let ring = get_ring_key(&mut r)?;
                let base = r.varint()?;
                let n = r.len(r.remaining())?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let version = r.varint()?;
                    entries.push((version, below(base, r.varint()?)?));
                }
                Message::Syn(Syn { cluster, partitions, roster, ring, entries })
            }
            ACK_DELTA => {
                let roster = r.u64_le()?;
                let beats = get_beats(&mut r)?;
                let records = get_records(&mut r, partitions)?;
                let k = r.len(r.remaining())?;
                let mut wanted = Vec::with_capacity(k);
                for _ in 0..k {
                    wanted.push(u32::try_from(r.varint()?).map_err(|_| DecodeError { what: "position over u32" })?);
                }
                let ring = get_ring(&mut r, partitions)?;
                let want_ring = r.u8()? != 0;
                Message::Ack(Ack::Delta(Delta { roster, beats, records, wanted, ring, want_ring }))
            }
            ACK_ROSTER => {
                let roster = r.u64_le()?;
                let ring = get_ring_key(&mut r)?;
                let base = r.varint()?;
                let n = r.len(r.remaining())?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let id = get_str(&mut r)?;
                    let (generation, version) = (r.varint()?, r.varint()?);
                    entries.push((id, generation, version, below(base, r.varint()?)?));
                }
                Message::Ack(Ack::Roster(Roster { roster, entries, ring }))
            }
            ACK2_KEYED => {
                let roster = r.u64_le()?;
                let beats = get_beats(&mut r)?;
                let records = get_records(&mut r, partitions)?;
                let ring = get_ring(&mut r, partitions)?;
                let n = r.len(r.remaining())?;
                let wanted = (0..n).map(|_| get_str(&mut r)).collect::<Result<Vec<_>, _>>()?;
                let want_ring = r.u8()? != 0;
                Message::Ack2(Ack2::Keyed { roster, beats, records, ring, wanted, want_ring })
            }
            ACK3 => {
                let records = get_records(&mut r, partitions)?;
                let ring = get_ring(&mut r, partitions)?;
                Message::Ack3(Ack3 { records, ring })
            }
            ACK2_RECORDS => {
                let records = get_records(&mut r, partitions)?;
                let ring = get_ring(&mut r, partitions)?;
                Message::Ack2(Ack2::Records { records, ring })
            }
            _ => return err("not a gossip exchange message"),
        };
        if !r.is_empty() {
            return err("trailing bytes after a gossip message");
        }
        Ok(msg)
    }
}

/// Heartbeats as distances below the highest: a byte each for live members.
fn put_beats(out: &mut Vec<u8>, beats: &[u64]) {
    let base = beats.iter().copied().max().unwrap_or(0);
    put_varint(out, base);
    put_varint(out, beats.len() as u64);
    for &b in beats {
        put_varint(out, base - b);
    }
}

fn get_beats(r: &mut Reader<'_>) -> Result<Vec<u64>, DecodeError> {
    let base = r.varint()?;
    let n = r.len(r.remaining())?;
    (0..n).map(|_| below(base, r.varint()?)).collect()
}

fn below(base: u64, lag: u64) -> Result<u64, DecodeError> {
    base.checked_sub(lag).ok_or(DecodeError { what: "heartbeat below zero" })
}

fn put_ring_key(out: &mut Vec<u8>, key: Option<(u64, u64)>) {
    match key {
        None => out.push(0),
        Some((version, hash)) => {
            out.push(1);
            put_varint(out, version);
            out.extend_from_slice(&hash.to_le_bytes());
        }
    }
}

fn get_ring_key(r: &mut Reader<'_>) -> Result<Option<(u64, u64)>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some((r.varint()?, r.u64_le()?))),
        _ => err("bad ring key flag"),
    }
}

fn put_ring(out: &mut Vec<u8>, ring: Option<&Ring>) {
    match ring {
        None => out.push(0),
        Some(ring) => {
            out.push(1);
            ring.encode(out);
        }
    }
}

fn get_ring(r: &mut Reader<'_>, partitions: u32) -> Result<Option<Ring>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        1 => {
            let ring = Ring::decode(r)?;
            if ring.partitions() != partitions {
                return err("ring partition count differs from ours");
            }
            Ok(Some(ring))
        }
        _ => err("bad ring flag"),
    }
}

fn put_records(out: &mut Vec<u8>, records: &[Member]) {
    put_varint(out, records.len() as u64);
    for m in records {
        encode_member(m, out);
    }
}

fn get_records(r: &mut Reader<'_>, partitions: u32) -> Result<Vec<Member>, DecodeError> {
    let n = r.len(r.remaining())?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(decode_member(r, STATE_FORMAT, partitions)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::tests::node;
    use crate::membership::GossipConfig;

    /// One exchange from `a` to `b` through encoded bytes; returns the
    /// bytes each message took.
    fn exchange(a: &mut Gossip, b: &mut Gossip, now: u64) -> Vec<usize> {
        let through = |m: Message| Message::decode(&m.encode(), 64).expect("decodes");
        let mut sizes = Vec::new();
        let syn = Message::Syn(a.syn());
        sizes.push(syn.encode().len());
        let Message::Syn(syn) = through(syn) else { panic!("a syn") };
        let ack = Message::Ack(b.on_syn(now, &syn).expect("same cluster"));
        sizes.push(ack.encode().len());
        let Message::Ack(ack) = through(ack) else { panic!("an ack") };
        if let Some(ack2) = a.on_ack(now, &ack).expect("same cluster") {
            let ack2 = Message::Ack2(ack2);
            sizes.push(ack2.encode().len());
            let Message::Ack2(ack2) = through(ack2) else { panic!("an ack2") };
            if let Some(ack3) = b.on_ack2(now, &ack2).expect("same cluster") {
                let ack3 = Message::Ack3(ack3);
                sizes.push(ack3.encode().len());
                let Message::Ack3(ack3) = through(ack3) else { panic!("an ack3") };
                a.on_ack3(now, &ack3);
            }
        }
        sizes
    }

    fn three() -> Vec<Gossip> {
        let mut nodes = vec![node("a", 1, &[2, 3]), node("b", 2, &[1, 3]), node("c", 3, &[1, 2])];
        for round in 1..=4u64 {
            for n in nodes.iter_mut() {
                n.tick(round * 1000, round);
            }
            for i in 0..3 {
                for j in 0..3 {
                    if i != j {
                        let (a, b) = pair(&mut nodes, i, j);
                        exchange(a, b, round * 1000);
                    }
                }
            }
        }
        nodes
    }

    fn pair(nodes: &mut [Gossip], i: usize, j: usize) -> (&mut Gossip, &mut Gossip) {
        assert_ne!(i, j);
        if i < j {
            let (l, r) = nodes.split_at_mut(j);
            (&mut l[i], &mut r[0])
        } else {
            let (l, r) = nodes.split_at_mut(i);
            (&mut r[0], &mut l[j])
        }
    }

    #[test]
    fn exchanges_form_the_same_ring_as_whole_states_do() {
        let nodes = three();
        let ring = nodes[0].state().ring.clone().expect("a ring formed");
        assert_eq!(ring.members().len(), 3);
        // Everything but the heartbeats (which move every round) agrees.
        let content = |s: &ClusterState| {
            let mut s = s.clone();
            s.members.values_mut().for_each(|m| m.heartbeat = 0);
            s
        };
        for n in &nodes {
            assert_eq!(content(n.state()), content(nodes[0].state()), "{} differs", n.me());
            assert_eq!(n.member().pins.len(), 64);
        }
    }

    #[test]
    fn in_steady_state_an_exchange_carries_heartbeats_only() {
        let mut nodes = three();
        for n in nodes.iter_mut() {
            n.tick(5000, 9);
        }
        let (a, b) = pair(&mut nodes, 0, 1);
        let sizes = exchange(a, b, 5000);
        assert_eq!(sizes.len(), 2, "no third message when nothing changed");
        // Syn: tag, cluster, Q, roster, ring key, base, 3 x (version, lag);
        // Ack: tag, roster, base, 3 lags, no records, nothing wanted, no ring.
        assert!(sizes[0] < 40 && sizes[1] < 25, "{sizes:?}");
        assert_eq!(a.state().members["c"].heartbeat, b.state().members["c"].heartbeat);
        assert_eq!(b.state().members["a"].heartbeat, a.state().members["a"].heartbeat, "b took a's beat");
        assert_eq!(a.state().members["b"].heartbeat, b.state().members["b"].heartbeat, "a took b's beat");
    }

    #[test]
    fn a_change_travels_both_ways_as_one_record() {
        let mut nodes = three();
        // The initiator changed: the receiver wants it; the third message has it.
        nodes[2].set_weight(4);
        let (c, a) = pair(&mut nodes, 2, 0);
        let sizes = exchange(c, a, 6000);
        assert_eq!(sizes.len(), 3);
        assert_eq!(a.state().members["c"].weight, 4);
        // The receiver changed: the answer carries it.
        nodes[1].leave();
        let (a, b) = pair(&mut nodes, 0, 1);
        assert_eq!(exchange(a, b, 7000).len(), 3, "a's newer record of c goes to b, b's own comes back");
        assert!(a.state().members["b"].leaving);
        assert_eq!(b.state().members["c"].weight, 4);
        // The claimant a re-claimed without b: b gets the new ring next time.
        assert!(!a.state().ring.as_ref().unwrap().contains("b"));
        let (b, a) = pair(&mut nodes, 1, 0);
        exchange(b, a, 8000);
        assert_eq!(b.state().ring, a.state().ring);
    }

    #[test]
    fn a_member_the_peer_does_not_know_makes_it_a_keyed_exchange() {
        let mut nodes = three();
        let mut d = node("d", 4, &[1]);
        d.tick(9000, 0);
        // Keyed digest, d's record and the ids it wants, then the records.
        let sizes = exchange(&mut d, &mut nodes[0], 9000);
        assert_eq!(sizes.len(), 4, "{sizes:?}");
        assert!(nodes[0].state().members.contains_key("d"), "the seed learned of d");
        assert_eq!(d.state().members.len(), 4, "d learned the cluster");
        assert_eq!(d.state().ring, nodes[0].state().ring, "and its ring");
        // a knows d, b does not: b's keyed digest carries ids, not records.
        let (a, b) = pair(&mut nodes, 0, 1);
        a.tick(9400, 3);
        let whole = a.state().encode().len();
        let sizes = exchange(a, b, 9500);
        assert_eq!(b.state().members["a"].heartbeat, a.member().heartbeat, "heartbeats travel both ways");
        assert_eq!(sizes.len(), 4, "{sizes:?}");
        assert!(sizes[1] * 2 < whole, "a keyed digest ({} B) is much less than the state ({whole} B)", sizes[1]);
        assert!(b.state().members.contains_key("d"));
        // With the same roster now, the next exchange is a delta again.
        let syn = a.syn();
        let Ack::Delta(_) = b.on_syn(9600, &syn).unwrap() else { panic!("same roster, a delta") };
        // A restart (a new generation) is news the same way.
        let mut again = node("d", 4, &[1]);
        again.state.members.get_mut("d").unwrap().generation = 2;
        exchange(&mut again, &mut nodes[0], 9700);
        assert_eq!(nodes[0].state().members["d"].generation, 2);
    }

    #[test]
    fn a_syn_of_another_cluster_is_refused_and_nothing_taken() {
        let mut a = node("a", 1, &[]);
        let other = Gossip::new(
            Member { id: "x".into(), ..a.member().clone() },
            "other",
            64,
            vec![],
            None,
            GossipConfig::default(),
            0,
        );
        assert!(matches!(a.on_syn(0, &other.syn()), Err(Mismatch::Cluster { .. })));
        assert_eq!(a.state().members.len(), 1);
    }

    #[test]
    fn every_message_round_trips_and_every_truncation_is_an_error() {
        let mut nodes = three();
        nodes[1].set_weight(3);
        let (a, b) = pair(&mut nodes, 0, 1);
        let syn = a.syn();
        let ack = b.on_syn(1, &syn).unwrap();
        let ack2 = a.on_ack(1, &ack).unwrap();
        let mut msgs = vec![Message::Syn(syn), Message::Ack(ack)];
        msgs.extend(ack2.map(Message::Ack2));
        let mut d = node("d", 4, &[1]);
        d.tick(10, 0);
        let roster = a.on_syn(11, &d.syn()).unwrap();
        let keyed = d.on_ack(12, &roster).unwrap().expect("d wants everything");
        let ack3 = a.on_ack2(13, &keyed).unwrap().expect("an answer to a keyed ack2");
        msgs.extend([Message::Ack(roster), Message::Ack2(keyed), Message::Ack3(ack3)]);
        for m in msgs {
            let bytes = m.encode();
            assert!(Message::is_exchange(&bytes));
            assert_eq!(Message::decode(&bytes, 64).unwrap(), m);
            for cut in 0..bytes.len() {
                assert!(Message::decode(&bytes[..cut], 64).is_err(), "{m:?} cut at {cut}");
            }
        }
        assert!(!Message::is_exchange(&a.state().encode()), "a whole state is told apart");
    }
}
