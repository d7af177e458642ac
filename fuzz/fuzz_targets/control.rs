//! Control messages: decode a stream of them from any bytes; each decoded message re-encodes
//! to itself.
#![no_main]

use hostnet_link::proto::{decode_control, encode_control};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((msg, used))) = decode_control(rest) {
        assert!(used > 0 && used <= rest.len());
        let mut out = Vec::new();
        encode_control(&msg, &mut out).expect("a decoded message encodes");
        let (again, _) = decode_control(&out)
            .expect("re-encoded message decodes")
            .expect("re-encoded message is complete");
        assert_eq!(again, msg);
        rest = rest.get(used..).unwrap_or_default();
    }
});
