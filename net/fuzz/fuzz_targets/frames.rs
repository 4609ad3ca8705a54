//! The node's read path: bytes from a socket, in pieces of any size, through
//! the frame decoder and into `proto::decode` under each side's verifier
//! limits. Nothing may panic, and a decoded message must encode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringkv_net::frame::FrameDecoder;
use ringkv_net::proto::{decode, DecodeLimits, Encoder};

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the stream is cut into reads.
    let Some((&cut, stream)) = data.split_first() else { return };
    let piece = usize::from(cut % 64) + 1;
    let mut dec = FrameDecoder::new(64 * 1024);
    let mut enc = Encoder::new();
    for chunk in stream.chunks(piece) {
        dec.push(chunk);
        loop {
            match dec.next_frame() {
                Ok(Some(payload)) => {
                    for limits in [DecodeLimits::SERVER, DecodeLimits::PEER, DecodeLimits::CLIENT] {
                        if let Ok(msg) = decode(payload, limits) {
                            // Whatever we accept, we can also say.
                            let again = enc.to_vec(&msg);
                            assert!(again.len() > 4);
                        }
                    }
                }
                Ok(None) => break,
                // A framing error ends the connection.
                Err(_) => return,
            }
        }
    }
});
