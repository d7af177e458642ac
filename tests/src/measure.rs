//! What the benchmarks measure with, shared by `src/bin/bridge_bench.rs` and
//! `src/bin/desktop_bench.rs`: the two servers (a byte-counting sink and a no-delay echo), the
//! clients (bulk throughput, 64-byte round trips, connection rate, UDP rate), percentiles, and the
//! number formats of the tables.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::net::{ANY4, sa};
use crate::{after, wait_until};

pub fn nodelay(s: &TcpStream) {
    let _ = s.set_nodelay(true);
}

/// Reads until EOF, then answers the byte count (8 bytes, little endian).
pub fn sink_handler(mut s: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = s.write_all(&total.to_le_bytes());
}

/// Echoes everything with TCP_NODELAY; on EOF half-closes its side and returns.
pub fn echo_nodelay(mut s: TcpStream) {
    nodelay(&s);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown(Shutdown::Write);
                return;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// CPU seconds (user + system, with reaped children) of the processes `pids`, from /proc.
pub fn cpu_secs(pids: &[i32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .map(|st| {
            // Fields after the parenthesised command name: utime, stime, cutime, cstime are
            // fields 14-17 overall, i.e. 12-15 after it.
            let rest = st.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<f64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0.0))
                .collect();
            f.get(11..15).map_or(0.0, |v| v.iter().sum::<f64>()) / hz
        })
        .sum()
}

/// `streams` connections to a [`sink_handler`] sending for `secs`; Gbit/s acknowledged by the
/// sink.
pub fn bulk(to: SocketAddr, streams: usize, secs: f64) -> Result<f64> {
    let t0 = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            thread::spawn(move || -> Result<u64> {
                let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let buf = vec![0x5au8; 128 * 1024];
                let end = Instant::now() + Duration::from_secs_f64(secs);
                let mut sent = 0u64;
                while Instant::now() < end {
                    s.write_all(&buf)?;
                    sent += buf.len() as u64;
                }
                s.shutdown(Shutdown::Write)?;
                let mut ack = [0u8; 8];
                s.read_exact(&mut ack)
                    .context("reading the sink's byte count")?;
                let got = u64::from_le_bytes(ack);
                if got != sent {
                    bail!("sink counted {got} bytes, {sent} sent");
                }
                Ok(sent)
            })
        })
        .collect();
    let mut total = 0;
    for h in handles {
        total += h
            .join()
            .map_err(|_| anyhow::anyhow!("bulk thread panicked"))??;
    }
    Ok(total as f64 * 8.0 / t0.elapsed().as_secs_f64() / 1e9)
}

/// 64-byte round trips on one connection to an echo server (200 warm-up trips first); (p50, p99)
/// in µs.
pub fn rr(to: SocketAddr, n: usize) -> Result<(f64, f64)> {
    rr_on(echo_client(to)?, 200, n)
}

/// 64-byte round trips on `s`, a stream to an echo, each echo checked (numbered messages):
/// `warmup` unmeasured, then `n`; (p50, p99) in µs.
pub fn rr_on(mut s: impl Read + Write, warmup: usize, n: usize) -> Result<(f64, f64)> {
    let mut msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut lat = Vec::with_capacity(n);
    for i in 0..warmup + n {
        msg[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)
            .with_context(|| format!("echo of round trip {i}"))?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if back != msg {
            bail!("round trip {i}: a wrong echo");
        }
        if i >= warmup {
            lat.push(us);
        }
    }
    Ok((pct(&mut lat, 50.0), pct(&mut lat, 99.0)))
}

/// A TCP client of an echo server: TCP_NODELAY, 5 s read timeout.
fn echo_client(to: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
    nodelay(&s);
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// Connections per second to an echo server: connect, 1 byte each way, close.
pub fn conn_rate(to: SocketAddr, n: usize) -> Result<f64> {
    conn_rate_with(|| echo_client(to), 0, n)
}

/// Connections per second to an echo, each opened by `open`, 1 byte written and its echo
/// checked, closed: `warmup` unmeasured, then `n`.
pub fn conn_rate_with<S: Read + Write>(
    open: impl Fn() -> Result<S>,
    warmup: usize,
    n: usize,
) -> Result<f64> {
    let one = |i: usize| -> Result<()> {
        let mut s = open().with_context(|| format!("connection {i}"))?;
        s.write_all(b"x")?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)
            .with_context(|| format!("echo on connection {i}"))?;
        if &b != b"x" {
            bail!("connection {i}: a wrong echo");
        }
        Ok(())
    };
    for i in 0..warmup {
        one(i)?;
    }
    let t0 = Instant::now();
    for i in 0..n {
        one(warmup + i)?;
    }
    Ok(n as f64 / t0.elapsed().as_secs_f64())
}

/// 64-byte datagrams sent as fast as one thread can for `secs` to a server that counts what it
/// receives in `counter`; (delivered/s, sent/s).
pub fn udp_rate(to: SocketAddr, counter: &AtomicU64, secs: f64) -> Result<(f64, f64)> {
    udp_rate_sized(to, counter, secs, 64)
}

/// [`udp_rate`] with datagrams of `size` bytes.
pub fn udp_rate_sized(
    to: SocketAddr,
    counter: &AtomicU64,
    secs: f64,
    size: usize,
) -> Result<(f64, f64)> {
    let s = UdpSocket::bind(sa(ANY4, 0))?;
    let msg = vec![9u8; size];
    // Open the flow first.
    let start = counter.load(Ordering::Relaxed);
    if !wait_until(after(Duration::from_secs(3)), || {
        let _ = s.send_to(&msg, to);
        thread::sleep(Duration::from_millis(5));
        counter.load(Ordering::Relaxed) > start
    }) {
        bail!("no UDP datagram reached the namespace via {to}");
    }
    thread::sleep(Duration::from_millis(50));
    let before = counter.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    while Instant::now() < end {
        for _ in 0..64 {
            if s.send_to(&msg, to).is_ok() {
                sent += 1;
            }
        }
    }
    let el = t0.elapsed().as_secs_f64();
    thread::sleep(Duration::from_millis(200));
    let got = counter.load(Ordering::Relaxed) - before;
    Ok((got as f64 / el, sent as f64 / el))
}

/// The round trip of the first datagram of `n` new flows (a fresh client socket each) to a UDP
/// echo server, µs; (p50, p99).
pub fn udp_first_rtt(to: SocketAddr, n: usize) -> Result<(f64, f64)> {
    let mut lat = Vec::with_capacity(n);
    let mut back = [0u8; 64];
    for i in 0..n {
        let s = UdpSocket::bind(sa(ANY4, 0))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let msg = (i as u64).to_be_bytes();
        let t = Instant::now();
        s.send_to(&msg, to)?;
        let (got, _) = s
            .recv_from(&mut back)
            .with_context(|| format!("no echo of a new flow's first datagram via {to}"))?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        if back.get(..got) != Some(&msg[..]) {
            bail!("a wrong echo via {to}");
        }
    }
    Ok((pct(&mut lat, 50.0), pct(&mut lat, 99.0)))
}

/// The `p`th percentile (nearest rank) of `v`, which it sorts; NaN when empty.
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

pub fn median(mut v: Vec<f64>) -> f64 {
    pct(&mut v, 50.0)
}

/// Like [`crate::wait_until`], polling every millisecond (for latencies measured in ms).
pub fn wait_until_fast(deadline: Instant, mut cond: impl FnMut() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// A figure for a table: `-` when absent, 3 significant digits or so otherwise.
pub fn fmt(v: Option<f64>) -> String {
    match v {
        None => "-".into(),
        Some(x) if x >= 1e5 => format!("{:.0}k", x / 1e3),
        Some(x) if x >= 100.0 => format!("{x:.0}"),
        Some(x) if x >= 10.0 => format!("{x:.1}"),
        Some(x) => format!("{x:.2}"),
    }
}

/// `a / b` as `0.56x`, or `-`.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_formats() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&mut v, 50.0), 51.0);
        assert_eq!(pct(&mut v, 99.0), 99.0);
        assert!(pct(&mut [], 50.0).is_nan());
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(fmt(Some(178_000.0)), "178k");
        assert_eq!(fmt(Some(16.61)), "16.6");
        assert_eq!(fmt(None), "-");
        assert_eq!(ratio(Some(1.0), Some(2.0)), "0.50x");
        assert_eq!(ratio(Some(1.0), None), "-");
    }
}

/// One figure of a benchmark table: its name, its unit and one value per path.
#[derive(Debug, Clone)]
pub struct Row<const N: usize> {
    pub name: String,
    pub unit: &'static str,
    pub values: [Option<f64>; N],
}

/// Prints `rows` as a markdown table: figure, unit, a column per path in `paths`, then a
/// column per ratio `(name, a, b)` (`values[a] / values[b]`); columns as wide as their
/// contents.
pub fn print_table<const N: usize>(
    paths: [&str; N],
    ratios: &[(&str, usize, usize)],
    rows: &[Row<N>],
) {
    let mut cells: Vec<Vec<String>> = Vec::with_capacity(rows.len() + 1);
    cells.push(
        ["figure", "unit"]
            .into_iter()
            .chain(paths)
            .chain(ratios.iter().map(|r| r.0))
            .map(String::from)
            .collect(),
    );
    for r in rows {
        let mut line = vec![r.name.clone(), r.unit.to_string()];
        line.extend(r.values.iter().map(|v| fmt(*v)));
        line.extend(
            ratios
                .iter()
                .map(|&(_, a, b)| ratio(r.values[a], r.values[b])),
        );
        cells.push(line);
    }
    let widths: Vec<usize> = (0..cells[0].len())
        .map(|c| {
            cells
                .iter()
                .map(|l| l[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let print = |line: &[String]| {
        let mut out = String::from("|");
        for (c, (cell, w)) in line.iter().zip(&widths).enumerate() {
            let pad = " ".repeat(w - cell.chars().count());
            if c == 0 {
                out.push_str(&format!(" {cell}{pad} |"));
            } else {
                out.push_str(&format!(" {pad}{cell} |"));
            }
        }
        println!("{out}");
    };
    print(&cells[0]);
    let rule: String = widths
        .iter()
        .map(|w| format!("|{}", "-".repeat(w + 2)))
        .collect();
    println!("{rule}|");
    for line in &cells[1..] {
        print(line);
    }
}
