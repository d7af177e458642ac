//! Checksummed payloads: a deterministic byte stream (splitmix64) that the sender and the receiver
//! both build from the same seed, so the receiver checks every byte without the payload ever being
//! stored.

use std::io::{self, ErrorKind, Read, Write};

/// The byte stream of one seed.
#[derive(Debug, Clone)]
pub struct Prng {
    state: u64,
    spare: [u8; 8],
    spare_len: usize,
}

impl Prng {
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x5DEE_CE66_D1CE_4E5B,
            spare: [0; 8],
            spare_len: 0,
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `out` with the next `out.len()` bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut i = 0;
        while i < out.len() && self.spare_len > 0 {
            out[i] = self.spare[8 - self.spare_len];
            self.spare_len -= 1;
            i += 1;
        }
        while out.len() - i >= 8 {
            out[i..i + 8].copy_from_slice(&self.next_u64().to_le_bytes());
            i += 8;
        }
        if i < out.len() {
            self.spare = self.next_u64().to_le_bytes();
            self.spare_len = 8;
            while i < out.len() {
                out[i] = self.spare[8 - self.spare_len];
                self.spare_len -= 1;
                i += 1;
            }
        }
    }
}

/// The first `len` bytes of the stream of `seed`.
pub fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    Prng::new(seed).fill(&mut v);
    v
}

/// Checks received chunks against the stream of a seed, byte for byte.
#[derive(Debug)]
pub struct Verifier {
    prng: Prng,
    offset: u64,
    expected: Vec<u8>,
    what: String,
}

impl Verifier {
    pub fn new(seed: u64, what: impl Into<String>) -> Self {
        Self {
            prng: Prng::new(seed),
            offset: 0,
            expected: Vec::new(),
            what: what.into(),
        }
    }

    /// Bytes verified so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn check(&mut self, data: &[u8]) -> Result<(), String> {
        self.expected.resize(data.len(), 0);
        self.prng.fill(&mut self.expected);
        if data != self.expected.as_slice() {
            let at = data
                .iter()
                .zip(&self.expected)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "{}: corrupted byte at offset {}: got {:#04x}, expected {:#04x}",
                self.what,
                self.offset + at as u64,
                data[at],
                self.expected[at]
            ));
        }
        self.offset += data.len() as u64;
        Ok(())
    }
}

/// Writes `total` bytes of the stream of `seed`.
pub fn write_prng(w: &mut impl Write, seed: u64, total: u64) -> io::Result<()> {
    let mut prng = Prng::new(seed);
    let mut buf = vec![0; 64 * 1024];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        prng.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Reads exactly `total` bytes and checks them against the stream of `seed`.
pub fn read_prng(r: &mut impl Read, seed: u64, total: u64, what: &str) -> Result<(), String> {
    let mut v = Verifier::new(seed, what);
    let mut buf = vec![0; 64 * 1024];
    while v.offset() < total {
        let want = (total - v.offset()).min(buf.len() as u64) as usize;
        match r.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(format!("{what}: EOF after {} of {total} bytes", v.offset()));
            }
            Ok(n) => v.check(&buf[..n])?,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "{what}: read error after {} of {total} bytes: {e}",
                    v.offset()
                ));
            }
        }
    }
    Ok(())
}

/// The next read must be a clean EOF (a read interrupted by a signal is tried again: a socket
/// with a receive timeout reports `EINTR` even for handlers installed with `SA_RESTART`).
pub fn expect_eof(r: &mut impl Read, what: &str) -> Result<(), String> {
    let mut b = [0u8; 1];
    loop {
        return match r.read(&mut b) {
            Ok(0) => Ok(()),
            Ok(_) => Err(format!("{what}: extra data where EOF was expected")),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => Err(format!("{what}: error where EOF was expected: {e}")),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_is_independent_of_chunking() {
        let whole = payload(7, 1000);
        let mut p = Prng::new(7);
        let mut parts = Vec::new();
        for n in [1, 3, 8, 13, 100, 875] {
            let mut b = vec![0; n];
            p.fill(&mut b);
            parts.extend(b);
        }
        assert_eq!(whole, parts);
        let mut v = Verifier::new(7, "t");
        v.check(&whole[..500]).unwrap();
        v.check(&whole[500..]).unwrap();
        let mut bad = payload(7, 10);
        bad[4] ^= 1;
        assert!(
            Verifier::new(7, "t")
                .check(&bad)
                .unwrap_err()
                .contains("offset 4")
        );
    }
}
