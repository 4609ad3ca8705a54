//! Property tests of the decoders that face the network: arbitrary input
//! must produce an error, never a panic, and never an unbounded buffer.

use proptest::prelude::*;
use ringkv_net::frame::FrameDecoder;
use ringkv_net::proto::{decode, DecodeLimits, Encoder, Level, Message, Request, RequestFrame};

fn request() -> impl Strategy<Value = Request> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        (bytes(), any::<u8>()).prop_map(|(key, r)| Request::Get { key, r: Level::from_byte(r) }),
        (bytes(), bytes(), bytes(), any::<u8>(), proptest::option::of(any::<bool>())).prop_map(
            |(key, value, context, w, durable)| Request::Put { key, value, context, w: Level::from_byte(w), durable }
        ),
        (bytes(), bytes(), any::<u8>()).prop_map(|(key, context, w)| Request::Delete {
            key,
            context,
            w: Level::from_byte(w),
            durable: None
        }),
        bytes().prop_map(|payload| Request::Ping { payload }),
        Just(Request::NodeInfo),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_payloads_never_panic_the_decoder(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&payload, DecodeLimits::SERVER);
        let _ = decode(&payload, DecodeLimits::CLIENT);
    }

    #[test]
    fn mutated_valid_frames_never_panic_the_decoder(
        req in request(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = Encoder::new().to_vec(&Message::Request(RequestFrame { id: 1, timeout_ms: 0, body: req, hops: 0 }));
        let payload = &mut bytes[4..];
        for (at, x) in flips {
            let i = at.index(payload.len());
            payload[i] ^= x;
        }
        let _ = decode(payload, DecodeLimits::SERVER);
    }

    #[test]
    fn requests_round_trip(id in any::<u64>(), timeout_ms in any::<u32>(), body in request()) {
        let msg = Message::Request(RequestFrame { id, timeout_ms, body, hops: 0 });
        let bytes = Encoder::new().to_vec(&msg);
        prop_assert_eq!(decode(&bytes[4..], DecodeLimits::SERVER).unwrap(), msg);
    }

    #[test]
    fn the_frame_decoder_stays_bounded_on_any_stream(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)
    ) {
        let max = 256;
        let mut d = FrameDecoder::new(max);
        for c in chunks {
            d.push(&c);
            loop {
                match d.next_frame() {
                    Ok(Some(f)) => prop_assert!(f.len() <= max),
                    Ok(None) => break,
                    Err(_) => return Ok(()),
                }
            }
            prop_assert!(d.buffered() < max + 4 + 300);
        }
    }
}
