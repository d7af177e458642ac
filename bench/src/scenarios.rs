//! One trial of each scenario. Every function runs a single, bounded trial
//! against addresses that are either the backends themselves (direct) or a
//! proxy in front of them, and returns the raw figures of that trial.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::servers::{TcpSink, UdpSink};
use crate::spawn::{ProcStats, Proto, Proxy, proc_stats};

/// Client write buffer for bulk transfers.
const BULK_BUF: usize = 256 * 1024;
/// Timeout for connect, and for any single read or write of a client.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Round trips done before RR samples are recorded.
const RR_WARMUP: usize = 200;
/// Time left for datagrams still in flight (in a proxy) after the sender stops.
const UDP_DRAIN: Duration = Duration::from_millis(200);
/// Client threads of the connection-rate scenario.
const CONNRATE_THREADS: usize = 2;

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// TCP bulk throughput with `streams` parallel connections writing to the
/// sink for `dur`. Returns Gbit/s received by the sink.
pub fn bulk(addr: SocketAddr, sink: &TcpSink, streams: usize, dur: Duration) -> Result<f64> {
    let accepted_before = sink.accepted();
    let conns = (0..streams)
        .map(|_| connect(addr))
        .collect::<Result<Vec<_>>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    let b0 = sink.bytes();
    let t0 = Instant::now();
    let writers: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let stop = stop.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let buf = vec![0xA5u8; BULK_BUF];
                while !stop.load(Ordering::Relaxed) {
                    s.write_all(&buf)?;
                }
                Ok(())
            })
        })
        .collect();
    // Duration timer, not synchronisation.
    std::thread::sleep(dur);
    let b1 = sink.bytes();
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut first_err = None;
    for w in writers {
        match w.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => first_err = first_err.or(Some(anyhow!(e))),
            Err(_) => first_err = first_err.or(Some(anyhow!("writer thread panicked"))),
        }
    }
    // Connections are closed now; wait until the sink has seen them all end.
    sink.wait_quiet(accepted_before + streams as u64, Duration::from_secs(10))?;
    if let Some(e) = first_err {
        return Err(e.context("bulk writer"));
    }
    Ok((b1 - b0) as f64 * 8.0 / elapsed.as_secs_f64() / 1e9)
}

/// Request/response latency on one connection: 64 bytes out, 64 bytes back.
/// Returns (p50, p99) in microseconds.
pub fn rr(addr: SocketAddr, dur: Duration, max: usize) -> Result<(f64, f64)> {
    let mut s = connect(addr)?;
    s.set_nodelay(true)?;
    let msg = [0x5Au8; 64];
    let mut back = [0u8; 64];
    for _ in 0..RR_WARMUP {
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
    }
    let mut samples = Vec::with_capacity(max);
    let deadline = Instant::now() + dur;
    while samples.len() < max {
        let t = Instant::now();
        if t >= deadline {
            break;
        }
        s.write_all(&msg).context("rr write")?;
        s.read_exact(&mut back).context("rr read")?;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    if samples.is_empty() {
        bail!("no round trips completed");
    }
    samples.sort_unstable();
    Ok((
        percentile(&samples, 50.0) / 1e3,
        percentile(&samples, 99.0) / 1e3,
    ))
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64
}

/// Connection rate: each client thread repeatedly connects, writes one byte,
/// reads the echo and closes (client closes first), for `dur` or until `max`
/// connections in total. Returns connections per second.
pub fn connrate(addr: SocketAddr, dur: Duration, max: u64) -> Result<f64> {
    let started = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_err: Arc<Mutex<Option<anyhow::Error>>> = Arc::new(Mutex::new(None));
    let t0 = Instant::now();
    let deadline = t0 + dur;
    let threads: Vec<_> = (0..CONNRATE_THREADS)
        .map(|_| {
            let (started, done, errors, first_err) = (
                started.clone(),
                done.clone(),
                errors.clone(),
                first_err.clone(),
            );
            std::thread::spawn(move || {
                while started.fetch_add(1, Ordering::Relaxed) < max && Instant::now() < deadline {
                    match one_connection(addr) {
                        Ok(()) => {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            let mut g = first_err.lock().unwrap_or_else(|e| e.into_inner());
                            g.get_or_insert(e);
                            if errors.fetch_add(1, Ordering::Relaxed) >= 100 {
                                return;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let elapsed = t0.elapsed();
    let (done, errors) = (done.load(Ordering::Relaxed), errors.load(Ordering::Relaxed));
    let first_err = first_err.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(e) = first_err {
        if done == 0 || errors > 100 {
            return Err(e.context(format!("{errors} failed connections")));
        }
        eprintln!(
            "    warning: {errors} of {} connections failed: {e:#}",
            done + errors
        );
    }
    Ok(done as f64 / elapsed.as_secs_f64())
}

fn one_connection(addr: SocketAddr) -> Result<()> {
    let mut s = connect(addr)?;
    s.write_all(&[1])?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

/// UDP datagram rate: one socket sends `size`-byte datagrams as fast as it can
/// for `dur` (at most `max` datagrams) to the sink. Returns (delivered
/// datagrams per second, loss in percent).
pub fn udp(
    addr: SocketAddr,
    sink: &UdpSink,
    trial: u32,
    size: usize,
    dur: Duration,
    max: u64,
) -> Result<(f64, f64)> {
    if size < 12 {
        bail!("datagram size {size} < 12");
    }
    sink.begin_trial(trial);
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(addr)?;
    let mut buf = vec![0u8; size];
    buf[..4].copy_from_slice(&trial.to_le_bytes());
    let (mut sent, mut refused) = (0u64, 0u64);
    let t0 = Instant::now();
    for seq in 0..max {
        if seq % 256 == 0 && t0.elapsed() >= dur {
            break;
        }
        buf[4..12].copy_from_slice(&seq.to_le_bytes());
        match sock.send(&buf) {
            Ok(_) => sent += 1,
            // ICMP port unreachable from an earlier datagram: nobody listens.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused += 1;
                if refused > 1000 && sent < refused {
                    bail!("destination {addr} refuses datagrams");
                }
            }
            // Local queue full (ENOBUFS/EAGAIN): the datagram was not sent.
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENOBUFS) => {}
            Err(e) => return Err(e).context("udp send"),
        }
    }
    let elapsed = t0.elapsed();
    // Settle timer: let datagrams queued in the proxy reach the sink.
    std::thread::sleep(UDP_DRAIN);
    let received = sink.received().min(sent);
    if sent == 0 {
        bail!("no datagram sent");
    }
    Ok((
        received as f64 / elapsed.as_secs_f64(),
        100.0 * (1.0 - received as f64 / sent as f64),
    ))
}

/// Footprint of a freshly started proxy, read right after it reports ready.
pub fn idle(bin: &Path, echo: SocketAddr, verbose: bool) -> Result<ProcStats> {
    let proxy = Proxy::spawn(bin, Proto::Tcp, echo, verbose)?;
    proc_stats(proxy.pid())
}

/// Result of holding many idle connections through one proxy.
#[derive(Debug, Clone)]
pub struct ConnsResult {
    /// Connections that completed their 1-byte round trip.
    pub held: u64,
    /// Set when the proxy process exited while connections were being opened.
    pub died: bool,
    /// Why opening stopped early, if it did.
    pub stopped: Option<String>,
    /// Proxy footprint with all connections held (None if it died).
    pub stats: Option<ProcStats>,
    /// Footprint right after ready, for the per-connection cost.
    pub idle: ProcStats,
}

/// Opens `count` connections through a fresh proxy to the echo server, one
/// 1-byte round trip each, then reads the proxy's footprint and closes them.
pub fn conns(bin: &Path, echo: SocketAddr, count: usize, verbose: bool) -> Result<ConnsResult> {
    let mut proxy = Proxy::spawn(bin, Proto::Tcp, echo, verbose)?;
    let idle = proc_stats(proxy.pid())?;
    let mut held = Vec::with_capacity(count);
    let mut stopped = None;
    for _ in 0..count {
        match one_idle_connection(proxy.addr) {
            Ok(s) => held.push(s),
            Err(e) => {
                stopped = Some(format!("{e:#}"));
                break;
            }
        }
    }
    // If opening failed, give a dying proxy a moment to be reaped so the
    // failure is classified correctly.
    let died = if stopped.is_some() {
        proxy.wait_exit(Duration::from_secs(1)).is_some()
    } else {
        proxy.exit_status().is_some()
    };
    let stats = if died {
        None
    } else {
        Some(proc_stats(proxy.pid())?)
    };
    let n = held.len() as u64;
    // Client closes first; then the proxy is stopped by its guard.
    drop(held);
    drop(proxy);
    Ok(ConnsResult {
        held: n,
        died,
        stopped,
        stats,
        idle,
    })
}

fn one_idle_connection(addr: SocketAddr) -> Result<TcpStream> {
    let mut s = connect(addr)?;
    s.write_all(&[7]).context("write")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).context("read echo")?;
    Ok(s)
}
