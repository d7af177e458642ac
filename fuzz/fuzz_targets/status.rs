//! Relay status: decode any bytes; a decoded status re-encodes to itself.
#![no_main]

use hostnet_link::proto::{decode_status, encode_status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((status, used))) = decode_status(data) {
        assert!(used <= data.len());
        let mut out = Vec::new();
        encode_status(&status, &mut out).expect("a decoded status encodes");
        let (again, _) = decode_status(&out)
            .expect("re-encoded status decodes")
            .expect("re-encoded status is complete");
        assert_eq!(again, status);
    }
});
