//! Stream preface and header: decode any bytes; a decoded header re-encodes to itself.
#![no_main]

use hostnet_link::proto::{decode_header, encode_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((header, used))) = decode_header(data) {
        assert!(used <= data.len());
        let mut out = Vec::new();
        encode_header(&header, &mut out).expect("a decoded header encodes");
        let (again, _) = decode_header(&out)
            .expect("re-encoded header decodes")
            .expect("re-encoded header is complete");
        assert_eq!(again, header);
    }
});
