//! Length-prefixed framing: a 4-byte little-endian length, then the payload.
//!
//! [`FrameDecoder`] is sans-I/O: feed it whatever bytes arrived and take out
//! whole frames. It never buffers more than one maximum-size frame plus the
//! bytes of one read, and it rejects a length over the maximum *before*
//! allocating for it, so a hostile peer cannot make us allocate unboundedly.

use thiserror::Error;

pub const LEN_BYTES: usize = 4;

/// The default cap on one frame from a client: room for the largest pair that
/// `max_pair_bytes` may allow plus its envelope.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 2 * 1024 * 1024;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
}

/// Appends a frame header for a payload of `len` bytes.
pub fn put_header(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).expect("frame length fits in u32");
    out.extend_from_slice(&len.to_le_bytes());
}

/// Accumulates bytes from a stream and yields complete frames.
///
/// `storage[start..end]` holds the unconsumed bytes. Storage is initialised
/// once as it grows and reused, so reading straight into [`FrameDecoder::spare`]
/// costs no per-read zeroing.
#[derive(Debug)]
pub struct FrameDecoder {
    storage: Vec<u8>,
    start: usize,
    end: usize,
    max_frame: usize,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> Self {
        FrameDecoder { storage: Vec::new(), start: 0, end: 0, max_frame }
    }

    pub fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// Changes the cap for the frames still to come (a node allows only a
    /// small one until the handshake is done).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Bytes received but not yet returned as frames.
    pub fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, data: &[u8]) {
        let spare = self.spare(data.len());
        spare[..data.len()].copy_from_slice(data);
        self.end += data.len();
    }

    /// A region of at least `min` bytes to read into directly; keep what was
    /// read with [`FrameDecoder::commit`].
    pub fn spare(&mut self, min: usize) -> &mut [u8] {
        self.compact();
        if self.storage.len() < self.end + min {
            self.storage.resize(self.end + min, 0);
        }
        &mut self.storage[self.end..]
    }

    /// Keeps `n` bytes written into the region from the last [`FrameDecoder::spare`].
    pub fn commit(&mut self, n: usize) {
        assert!(self.end + n <= self.storage.len(), "committed more than the spare region");
        self.end += n;
    }

    /// The next complete frame's payload, if one is buffered. After an error
    /// the stream is out of sync: the caller must close the connection.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        let avail = &self.storage[self.start..self.end];
        if avail.len() < LEN_BYTES {
            return Ok(None);
        }
        let len = u32::from_le_bytes([avail[0], avail[1], avail[2], avail[3]]) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max_frame {
            return Err(FrameError::TooLarge { len, max: self.max_frame });
        }
        if avail.len() < LEN_BYTES + len {
            return Ok(None);
        }
        let from = self.start + LEN_BYTES;
        self.start = from + len;
        Ok(Some(&self.storage[from..from + len]))
    }

    fn compact(&mut self) {
        if self.start == 0 {
            return;
        }
        self.storage.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        // Give back the memory a large frame left behind.
        if self.end == 0 && self.storage.len() > 1 << 20 {
            self.storage.truncate(64 * 1024);
            self.storage.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in payloads {
            put_header(&mut out, p.len());
            out.extend_from_slice(p);
        }
        out
    }

    #[test]
    fn frames_split_across_reads_come_out_whole() {
        let bytes = framed(&[&b"hello"[..], b"x", b"world!"]);
        for chunk in 1..bytes.len() {
            let mut d = FrameDecoder::new(64);
            let mut got = Vec::new();
            for piece in bytes.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f.to_vec());
                }
            }
            assert_eq!(got, vec![b"hello".to_vec(), b"x".to_vec(), b"world!".to_vec()], "chunk {chunk}");
            assert_eq!(d.buffered(), 0);
        }
    }

    #[test]
    fn an_oversized_length_is_refused_before_its_bytes_arrive() {
        let mut d = FrameDecoder::new(1024);
        d.push(&(1_000_000u32).to_le_bytes());
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { len: 1_000_000, max: 1024 }));
        assert!(d.storage.capacity() < 1024, "no allocation for the announced size");
    }

    #[test]
    fn a_zero_length_frame_is_an_error() {
        let mut d = FrameDecoder::new(1024);
        d.push(&[0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(FrameError::Empty));
    }

    #[test]
    fn reading_into_spare_space_equals_pushing() {
        let bytes = framed(&[&b"abc"[..], b"defg"]);
        let mut d = FrameDecoder::new(64);
        let spare = d.spare(100);
        spare[..bytes.len()].copy_from_slice(&bytes);
        d.commit(bytes.len());
        assert_eq!(d.next_frame().unwrap(), Some(&b"abc"[..]));
        assert_eq!(d.next_frame().unwrap(), Some(&b"defg"[..]));
        assert_eq!(d.next_frame().unwrap(), None);
    }
}
