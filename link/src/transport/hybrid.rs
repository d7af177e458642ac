//! The hybrid vsock `CONNECT` handshake (Firecracker, Cloud Hypervisor, vhost-device-vsock).
//!
//! The host connects to the hypervisor's unix socket and writes `CONNECT <port>\n`; the backend
//! connects to the guest's vsock port and answers `OK <host-side port>\n`; from then on the unix
//! stream is the guest connection. When nothing listens on the guest port, vhost-device-vsock
//! closes the unix stream without a reply (or, on some versions, never answers), so the reply is
//! read under a timeout and an immediate close is reported as "no listener".
//!
//! The reply is read one byte at a time so that no byte after the `\n` is consumed: what follows
//! belongs to the guest. Lines are bounded ([`MAX_REPLY`]).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest reply line accepted, newline included (`OK 4294967295\n` is 14 bytes).
pub(crate) const MAX_REPLY: usize = 32;

/// How the handshake failed.
#[derive(Debug)]
pub(crate) enum HybridFailure {
    /// The backend closed without writing anything.
    ClosedWithoutReply,
    /// I/O error (the partial reply, if any, is lost: the error is what matters).
    Io(std::io::Error),
    /// A reply that is not `OK <n>\n` (escaped, as received so far).
    BadReply(String),
}

/// Sends `CONNECT port\n` and reads `OK n\n`; returns `n` (the backend's host-side port).
pub(crate) async fn connect_handshake<S>(io: &mut S, port: u32) -> Result<u32, HybridFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(HybridFailure::Io)?;
    let mut line = Vec::with_capacity(MAX_REPLY);
    loop {
        let mut byte = [0u8; 1];
        let n = match io.read(&mut byte).await {
            Ok(n) => n,
            // A backend that closes with our request unread resets instead of closing.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && line.is_empty() => 0,
            Err(e) => return Err(HybridFailure::Io(e)),
        };
        if n == 0 {
            return Err(if line.is_empty() {
                HybridFailure::ClosedWithoutReply
            } else {
                HybridFailure::BadReply(format!("{} (then closed)", escape(&line)))
            });
        }
        line.push(byte[0]);
        if byte[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_REPLY {
            return Err(HybridFailure::BadReply(format!("{}...", escape(&line))));
        }
    }
    parse_ok(&line).ok_or_else(|| HybridFailure::BadReply(escape(&line)))
}

/// `OK <u32>\n` (a `\r` before the `\n` is tolerated).
fn parse_ok(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let num = line.strip_prefix(b"OK ")?;
    if num.is_empty() || !num.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(num).ok()?.parse().ok()
}

fn escape(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ok_lines() {
        assert_eq!(parse_ok(b"OK 1073741824\n"), Some(1_073_741_824));
        assert_eq!(parse_ok(b"OK 5\r\n"), Some(5));
        assert_eq!(parse_ok(b"OK\n"), None);
        assert_eq!(parse_ok(b"OK \n"), None);
        assert_eq!(parse_ok(b"OK -1\n"), None);
        assert_eq!(parse_ok(b"OK 4294967296\n"), None);
        assert_eq!(parse_ok(b"ok 5\n"), None);
        assert_eq!(parse_ok(b"OK 5"), None);
    }

    #[tokio::test]
    async fn keeps_bytes_after_the_newline() {
        let (mut host, mut backend) = tokio::io::duplex(64);
        backend.write_all(b"OK 77\nguest says hi").await.unwrap();
        assert_eq!(connect_handshake(&mut host, 1024).await.unwrap(), 77);
        let mut req = [0u8; 13];
        backend.read_exact(&mut req).await.unwrap();
        assert_eq!(&req, b"CONNECT 1024\n");
        let mut rest = [0u8; 13];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"guest says hi");
    }

    #[tokio::test]
    async fn close_and_garbage_are_distinguished() {
        let (mut host, backend) = tokio::io::duplex(64);
        drop(backend);
        // The write may fail first (broken pipe) on a duplex; either is a failure.
        assert!(connect_handshake(&mut host, 1).await.is_err());

        let (mut host, mut backend) = tokio::io::duplex(64);
        let peer = tokio::spawn(async move {
            let mut req = [0u8; 10];
            backend.read_exact(&mut req).await.unwrap();
            drop(backend);
        });
        assert!(matches!(
            connect_handshake(&mut host, 1).await,
            Err(HybridFailure::ClosedWithoutReply)
        ));
        peer.await.unwrap();

        let (mut host, mut backend) = tokio::io::duplex(64);
        backend.write_all(b"NO\n").await.unwrap();
        match connect_handshake(&mut host, 1).await {
            Err(HybridFailure::BadReply(r)) => assert_eq!(r, "NO\\n"),
            other => panic!("{other:?}"),
        }

        let (mut host, mut backend) = tokio::io::duplex(64);
        backend.write_all(&[b'A'; 40]).await.unwrap();
        assert!(matches!(
            connect_handshake(&mut host, 1).await,
            Err(HybridFailure::BadReply(_))
        ));
    }
}
