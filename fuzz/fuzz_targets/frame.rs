//! Framed mode: the pure frame-head decoder over any bytes, and the `Framed` adaptor reading
//! the same bytes to the end; both must agree on the payload and never panic.
#![no_main]

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use hostnet_link::proto::{FrameHead, Framed, decode_frame_head};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// The payload and outcome the pure decoder sees: `Some(true)` END, `Some(false)` RESET,
/// `None` error or truncated input.
fn decode_all(mut rest: &[u8]) -> (Vec<u8>, Option<bool>) {
    let mut payload = Vec::new();
    loop {
        match decode_frame_head(rest) {
            Ok(Some((FrameHead::Data(len), used))) => {
                let Some(body) = rest.get(used..used + len) else {
                    // Truncated: the adaptor delivers what there is, then fails.
                    payload.extend_from_slice(rest.get(used..).unwrap_or_default());
                    return (payload, None);
                };
                payload.extend_from_slice(body);
                rest = rest.get(used + len..).unwrap_or_default();
            }
            Ok(Some((FrameHead::End, _))) => return (payload, Some(true)),
            Ok(Some((FrameHead::Reset, _))) => return (payload, Some(false)),
            Ok(None) | Err(_) => return (payload, None),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (want, outcome) = decode_all(data);

    // `&[u8]` is always ready, so a no-op waker drives the adaptor to completion.
    let mut framed = Framed::new(data);
    let mut cx = Context::from_waker(Waker::noop());
    let mut got = Vec::new();
    // Alternate small reads (through the read buffer) and large ones (straight into the
    // caller's buffer).
    let mut small = [0u8; 4096];
    let mut large = vec![0u8; 16 * 1024];
    let mut turn = 0u32;
    let end = loop {
        turn += 1;
        let chunk: &mut [u8] = if turn % 2 == 0 { &mut large } else { &mut small };
        let mut buf = ReadBuf::new(chunk);
        match Pin::new(&mut framed).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break Some(true),
            Poll::Ready(Ok(())) => got.extend_from_slice(buf.filled()),
            Poll::Ready(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                break Some(false);
            }
            Poll::Ready(Err(_)) => break None,
            Poll::Pending => panic!("a slice reader never pends"),
        }
    };
    assert_eq!(end, outcome);
    assert_eq!(got, want);
});
