//! The byte formats carried inside messages: a client's causal context and
//! a replica's object (ReplicaWrite, Handoff, Purge). What decodes must
//! encode back to bytes that decode to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringkv_core::version::{Object, VersionVector};

fuzz_target!(|data: &[u8]| {
    if let Ok(vv) = VersionVector::decode_context(data) {
        let again = VersionVector::decode_context(&vv.encode_context()).expect("an encoded context decodes");
        assert_eq!(again, vv);
    }
    if let Ok(obj) = Object::decode(data) {
        let mut bytes = Vec::new();
        obj.encode(&mut bytes);
        let again = Object::decode(&bytes).expect("an encoded object decodes");
        assert_eq!(again, obj);
    }
});
