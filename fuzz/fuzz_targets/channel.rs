//! Datagram channel frames: split any bytes into frames until one is incomplete or an error;
//! re-encoding the frames gives back the bytes consumed, and nothing panics.
#![no_main]

use hostnet_link::proto::channel::{decode_frame, encode_frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut out = Vec::new();
    let mut consumed = 0;
    while let Ok(Some((frame, used))) = decode_frame(rest) {
        assert_eq!(used, frame.encoded_len());
        encode_frame(&frame, &mut out).expect("a decoded frame encodes");
        consumed += used;
        rest = rest.get(used..).unwrap_or_default();
    }
    assert_eq!(out.as_slice(), data.get(..consumed).unwrap_or_default());
});
