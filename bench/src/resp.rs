//! RESP2, the Redis protocol: command encoding and an incremental reply
//! parser.
//!
//! The parser works on whatever bytes have arrived: `Ok(None)` means "the
//! reply is not complete yet, read more", and nothing is consumed until a
//! whole reply is there. Replies borrow from the input, so the replies on the
//! request path (`+OK`, bulk strings, errors) cost no allocation; only arrays
//! allocate (CLUSTER SLOTS at start-up). Input is untrusted: lengths, nesting
//! and integers are checked and malformed input is an error, never a panic.

use std::fmt;

/// The longest bulk string Redis allows.
const MAX_BULK: usize = 512 * 1024 * 1024;
const MAX_ARRAY: usize = 1 << 24;
const MAX_DEPTH: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp<'a> {
    Simple(&'a [u8]),
    Error(&'a [u8]),
    Integer(i64),
    /// `None` is the null bulk string (`$-1`), e.g. GET of a missing key.
    Bulk(Option<&'a [u8]>),
    /// `None` is the null array (`*-1`).
    Array(Option<Vec<Resp<'a>>>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RespError(pub String);

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed RESP: {}", self.0)
    }
}

impl std::error::Error for RespError {}

fn err<T>(msg: impl Into<String>) -> Result<T, RespError> {
    Err(RespError(msg.into()))
}

/// Parses one reply from the start of `buf`: the reply and the bytes it used.
pub fn parse(buf: &[u8]) -> Result<Option<(Resp<'_>, usize)>, RespError> {
    parse_at(buf, 0, 0)
}

/// The line starting at `pos` (without CRLF) and the position after it.
fn line(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let rest = &buf[pos..];
    match rest.iter().position(|&b| b == b'\n') {
        None => Ok(None),
        Some(0) => err("line feed without carriage return"),
        Some(i) if rest[i - 1] != b'\r' => err("line feed without carriage return"),
        Some(i) => Ok(Some((&rest[..i - 1], pos + i + 1))),
    }
}

fn integer(digits: &[u8]) -> Result<i64, RespError> {
    let s = std::str::from_utf8(digits).map_err(|_| RespError("non-ASCII integer".into()))?;
    s.parse::<i64>().map_err(|_| RespError(format!("bad integer '{}'", s.escape_debug())))
}

fn parse_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Resp<'_>, usize)>, RespError> {
    let Some(&tag) = buf.get(pos) else { return Ok(None) };
    let Some((body, next)) = line(buf, pos + 1)? else { return Ok(None) };
    match tag {
        b'+' => Ok(Some((Resp::Simple(body), next))),
        b'-' => Ok(Some((Resp::Error(body), next))),
        b':' => Ok(Some((Resp::Integer(integer(body)?), next))),
        b'$' => {
            let len = integer(body)?;
            if len == -1 {
                return Ok(Some((Resp::Bulk(None), next)));
            }
            let len = usize::try_from(len).map_err(|_| RespError(format!("bulk length {len}")))?;
            if len > MAX_BULK {
                return err(format!("bulk length {len} over the maximum"));
            }
            let end = next + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return err("bulk string not followed by CRLF");
            }
            Ok(Some((Resp::Bulk(Some(&buf[next..end])), end + 2)))
        }
        b'*' => {
            let len = integer(body)?;
            if len == -1 {
                return Ok(Some((Resp::Array(None), next)));
            }
            let len = usize::try_from(len).map_err(|_| RespError(format!("array length {len}")))?;
            if len > MAX_ARRAY {
                return err(format!("array length {len} over the maximum"));
            }
            if depth >= MAX_DEPTH {
                return err("arrays nested too deep");
            }
            let mut items = Vec::with_capacity(len.min(64));
            let mut at = next;
            for _ in 0..len {
                let Some((item, after)) = parse_at(buf, at, depth + 1)? else { return Ok(None) };
                items.push(item);
                at = after;
            }
            Ok(Some((Resp::Array(Some(items)), at)))
        }
        other => err(format!("unknown type byte 0x{other:02x}")),
    }
}

/// Appends a command as an array of bulk strings (the form Redis expects
/// from clients).
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    header(out, b'*', args.len());
    for a in args {
        header(out, b'$', a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

fn header(out: &mut Vec<u8>, tag: u8, n: usize) {
    out.push(tag);
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(input: &[u8]) -> Resp<'_> {
        let (r, used) = parse(input).unwrap().expect("complete");
        assert_eq!(used, input.len());
        r
    }

    #[test]
    fn every_type_parses() {
        assert_eq!(whole(b"+OK\r\n"), Resp::Simple(b"OK"));
        assert_eq!(whole(b"-ERR wrong\r\n"), Resp::Error(b"ERR wrong"));
        assert_eq!(whole(b":-42\r\n"), Resp::Integer(-42));
        assert_eq!(whole(b"$5\r\nhe\r\no\r\n"), Resp::Bulk(Some(b"he\r\no")));
        assert_eq!(whole(b"$0\r\n\r\n"), Resp::Bulk(Some(b"")));
        assert_eq!(whole(b"$-1\r\n"), Resp::Bulk(None));
        assert_eq!(whole(b"*-1\r\n"), Resp::Array(None));
        assert_eq!(whole(b"*0\r\n"), Resp::Array(Some(vec![])));
        assert_eq!(
            whole(b"*3\r\n:1\r\n*2\r\n+a\r\n$1\r\nb\r\n$-1\r\n"),
            Resp::Array(Some(vec![
                Resp::Integer(1),
                Resp::Array(Some(vec![Resp::Simple(b"a"), Resp::Bulk(Some(b"b"))])),
                Resp::Bulk(None),
            ]))
        );
    }

    #[test]
    fn partial_input_asks_for_more_at_every_cut() {
        let input = b"*2\r\n$3\r\nfoo\r\n*1\r\n:12\r\n+OK\r\n";
        let first_len = input.len() - 5;
        for cut in 0..first_len {
            assert_eq!(parse(&input[..cut]).unwrap(), None, "cut at {cut}");
        }
        let (r, used) = parse(input).unwrap().unwrap();
        assert_eq!(used, first_len);
        assert!(matches!(r, Resp::Array(Some(ref v)) if v.len() == 2));
        assert_eq!(parse(&input[used..]).unwrap(), Some((Resp::Simple(b"OK"), 5)));
    }

    #[test]
    fn pipelined_replies_come_out_one_by_one() {
        let input = b"+OK\r\n$2\r\nhi\r\n-MOVED 1 127.0.0.1:7000\r\n";
        let mut at = 0;
        let mut got = Vec::new();
        while let Some((r, used)) = parse(&input[at..]).unwrap() {
            got.push(r);
            at += used;
        }
        assert_eq!(got, vec![Resp::Simple(b"OK"), Resp::Bulk(Some(b"hi")), Resp::Error(b"MOVED 1 127.0.0.1:7000")]);
    }

    #[test]
    fn malformed_input_is_an_error() {
        for bad in [
            &b"?x\r\n"[..],
            b"+OK\n",
            b":12a\r\n",
            b"$-2\r\n",
            b"$3\r\nabcd\r\n",
            b"*-5\r\n",
            b"$99999999999999999999\r\n",
            b"$600000000\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?} accepted", String::from_utf8_lossy(bad));
        }
        let deep = b"*1\r\n".repeat(20);
        assert!(parse(&deep).is_err());
    }

    #[test]
    fn commands_encode_as_bulk_arrays() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"SET", b"k", b"value"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nvalue\r\n");
        out.clear();
        encode_command(&mut out, &[b"GET", &[b'x'; 12]]);
        assert_eq!(
            parse(&out).unwrap().unwrap().0,
            Resp::Array(Some(vec![Resp::Bulk(Some(b"GET")), Resp::Bulk(Some(&[b'x'; 12]))]))
        );
    }
}
