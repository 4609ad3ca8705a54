//! Redis Cluster routing: key slots (CRC16/XMODEM with hash tags), the slot
//! map from CLUSTER SLOTS, MOVED/ASK redirections, and every node of the
//! cluster from CLUSTER NODES (to count their CPU time).

use crate::resp::Resp;
use std::net::{IpAddr, SocketAddr};

pub const SLOTS: usize = 16384;

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), as Redis Cluster uses.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

/// The slot of a key: only the part inside the first non-empty `{...}` is
/// hashed when there is one, so related keys can share a slot.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = match key.iter().position(|&b| b == b'{') {
        Some(open) => match key[open + 1..].iter().position(|&b| b == b'}') {
            Some(len) if len > 0 => &key[open + 1..open + 1 + len],
            _ => key,
        },
        None => key,
    };
    crc16(hashed) % SLOTS as u16
}

/// Which master serves each slot.
#[derive(Debug, Clone)]
pub struct SlotMap {
    pub masters: Vec<SocketAddr>,
    /// Index into `masters` for every slot.
    pub owner: Vec<u16>,
}

/// Reads a CLUSTER SLOTS reply. `seed` stands in for masters announced with
/// an empty address ("the address you reached me on").
pub fn parse_cluster_slots(reply: &Resp<'_>, seed: SocketAddr) -> Result<SlotMap, String> {
    let Resp::Array(Some(ranges)) = reply else {
        return Err(format!("CLUSTER SLOTS answered {reply:?}"));
    };
    let mut masters: Vec<SocketAddr> = Vec::new();
    let mut owner = vec![u16::MAX; SLOTS];
    for range in ranges {
        let Resp::Array(Some(parts)) = range else { return Err("a slot range is not an array".into()) };
        let (Some(Resp::Integer(start)), Some(Resp::Integer(end)), Some(Resp::Array(Some(node)))) =
            (parts.first(), parts.get(1), parts.get(2))
        else {
            return Err(format!("bad slot range {range:?}"));
        };
        let (start, end) = (usize::try_from(*start), usize::try_from(*end));
        let (Ok(start), Ok(end)) = (start, end) else { return Err("negative slot".into()) };
        if start > end || end >= SLOTS {
            return Err(format!("slot range {start}-{end} out of bounds"));
        }
        let (Some(Resp::Bulk(Some(host))), Some(Resp::Integer(port))) = (node.first(), node.get(1)) else {
            return Err(format!("bad node entry {node:?}"));
        };
        let port = u16::try_from(*port).map_err(|_| format!("bad port {port}"))?;
        let addr = if host.is_empty() {
            SocketAddr::new(seed.ip(), port)
        } else {
            let host = std::str::from_utf8(host).map_err(|_| "non-UTF-8 host".to_string())?;
            let ip: IpAddr = host.parse().map_err(|_| format!("node address '{host}' is not an IP"))?;
            SocketAddr::new(ip, port)
        };
        let idx = match masters.iter().position(|m| *m == addr) {
            Some(i) => i,
            None => {
                masters.push(addr);
                masters.len() - 1
            }
        };
        for o in &mut owner[start..=end] {
            *o = idx as u16;
        }
    }
    if let Some(slot) = owner.iter().position(|&o| o == u16::MAX) {
        return Err(format!("slot {slot} is not served by any master"));
    }
    Ok(SlotMap { masters, owner })
}

/// Every node a CLUSTER NODES reply lists, masters and replicas: the
/// replicas are never asked, but replicating is part of the cluster's cost.
/// CLUSTER SLOTS is no help there: it lists a replica only once every node
/// has heard of it, seconds after the cluster is up. Lines are
/// `id ip:port@cport[,hostname] flags ...`; `seed` stands in for an empty
/// ip (a node that does not know its own address yet).
pub fn parse_cluster_nodes(text: &str, seed: SocketAddr) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(addr) = line.split_whitespace().nth(1) else { continue };
        let addr = addr.split(['@', ',']).next().unwrap_or_default();
        let Some((ip, port)) = addr.rsplit_once(':') else { continue };
        let Ok(port) = port.parse::<u16>() else { continue };
        let ip = if ip.is_empty() { Ok(seed.ip()) } else { ip.trim_matches(['[', ']']).parse::<IpAddr>() };
        if let Ok(ip) = ip {
            let a = SocketAddr::new(ip, port);
            if port != 0 && !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redirect {
    /// The slot has moved for good: update the map and retry there.
    Moved { slot: u16, addr: SocketAddr },
    /// The slot is migrating: retry there once, preceded by ASKING.
    Ask { slot: u16, addr: SocketAddr },
}

/// Recognises `MOVED <slot> <ip>:<port>` and `ASK <slot> <ip>:<port>`.
pub fn parse_redirect(error: &[u8]) -> Option<Redirect> {
    let text = std::str::from_utf8(error).ok()?;
    let mut words = text.split_ascii_whitespace();
    let kind = words.next()?;
    let slot: u16 = words.next()?.parse().ok()?;
    let addr: SocketAddr = words.next()?.parse().ok()?;
    if usize::from(slot) >= SLOTS {
        return None;
    }
    match kind {
        "MOVED" => Some(Redirect::Moved { slot, addr }),
        "ASK" => Some(Redirect::Ask { slot, addr }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::parse;

    #[test]
    fn crc16_xmodem_check_value() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn known_redis_slots() {
        // Values from CLUSTER KEYSLOT on a real Redis.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"hello"), 866);
        assert_eq!(key_slot(b"123456789"), 0x31C3);
    }

    #[test]
    fn hash_tags_hash_only_the_tag() {
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"{user1000}.following"));
        // Only the first tag counts, and an empty tag means the whole key.
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar"), crc16(b"foo{bar") % 16384);
    }

    #[test]
    fn cluster_slots_reply_becomes_a_map() {
        let reply = b"*3\r\n\
            *4\r\n:0\r\n:5460\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n*3\r\n$9\r\n127.0.0.1\r\n:7003\r\n$2\r\nid\r\n\
            *3\r\n:5461\r\n:10922\r\n*2\r\n$0\r\n\r\n:7001\r\n\
            *3\r\n:10923\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:7002\r\n";
        let (r, _) = parse(reply).unwrap().unwrap();
        let seed: SocketAddr = "127.0.0.5:7001".parse().unwrap();
        let m = parse_cluster_slots(&r, seed).unwrap();
        assert_eq!(m.masters.len(), 3);
        assert_eq!(m.masters[m.owner[0] as usize], "127.0.0.1:7000".parse().unwrap());
        assert_eq!(m.masters[m.owner[5461] as usize], "127.0.0.5:7001".parse().unwrap());
        assert_eq!(m.masters[m.owner[16383] as usize], "127.0.0.1:7002".parse().unwrap());

        let (partial, _) = parse(b"*1\r\n*3\r\n:0\r\n:100\r\n*2\r\n$9\r\n127.0.0.1\r\n:7000\r\n").unwrap().unwrap();
        assert!(parse_cluster_slots(&partial, seed).unwrap_err().contains("slot 101"));
    }

    #[test]
    fn cluster_nodes_lists_masters_and_replicas() {
        let text = "\
1d5c 127.0.0.1:7001@17001 master - 0 1796128598000 2 connected 5461-10922
9775 127.0.0.1:7004@17004,host4 slave dbab 0 1796128596000 1 connected
dbab :7000@17000 myself,master - 0 0 1 connected 0-5460
0520 [::1]:7003@17003 slave 5c88 0 1796128599000 3 connected
garbage
";
        let seed: SocketAddr = "127.0.0.9:7000".parse().unwrap();
        let got: Vec<String> = parse_cluster_nodes(text, seed).iter().map(ToString::to_string).collect();
        assert_eq!(got, vec!["127.0.0.1:7001", "127.0.0.1:7004", "127.0.0.9:7000", "[::1]:7003"]);
    }

    #[test]
    fn redirects_parse() {
        assert_eq!(
            parse_redirect(b"MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved { slot: 3999, addr: "127.0.0.1:6381".parse().unwrap() })
        );
        assert_eq!(
            parse_redirect(b"ASK 12 127.0.0.2:7002"),
            Some(Redirect::Ask { slot: 12, addr: "127.0.0.2:7002".parse().unwrap() })
        );
        assert_eq!(parse_redirect(b"ERR unknown command"), None);
        assert_eq!(parse_redirect(b"MOVED 99999 127.0.0.1:1"), None);
    }
}
