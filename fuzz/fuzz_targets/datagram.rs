//! Datagram codec: split any bytes into datagrams; re-encoding them gives back the bytes
//! consumed.
#![no_main]

use hostnet_link::proto::{decode_datagram, encode_datagram};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let mut out = Vec::new();
    let mut consumed = 0;
    while let Some((payload, used)) = decode_datagram(rest) {
        assert_eq!(used, payload.len() + 2);
        encode_datagram(payload, &mut out).expect("a decoded datagram encodes");
        consumed += used;
        rest = rest.get(used..).unwrap_or_default();
    }
    assert_eq!(out.as_slice(), data.get(..consumed).unwrap_or_default());
});
