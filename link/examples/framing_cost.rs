//! What framed mode costs against raw, over a unix socket pair on this machine.
//!
//! ```text
//! cargo run --release -p hostnet-link --example framing_cost
//! ```
//!
//! Throughput: one task writes `FRAMING_BYTES` (default 1 GiB) in 256 KiB writes and shuts
//! down; another reads it in 256 KiB reads to EOF; median of `FRAMING_RUNS` (default 5) runs per
//! mode, raw and framed runs interleaved. Latency: a 64-byte ping-pong, `FRAMING_RTTS` (default
//! 20,000) round trips per mode, p50 and p99.

use std::time::{Duration, Instant};

use hostnet_link::proto::Framed;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const CHUNK: usize = 256 * 1024;

trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Raw,
    Framed,
}

/// A unix socket pair (what the framed mode runs on); TCP on loopback where there is none.
#[cfg(unix)]
fn socket_pair() -> std::io::Result<(impl Io, impl Io)> {
    tokio::net::UnixStream::pair()
}

/// A unix socket pair (what the framed mode runs on); TCP on loopback where there is none.
#[cfg(not(unix))]
fn socket_pair() -> std::io::Result<(impl Io, impl Io)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let a = std::net::TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    a.set_nonblocking(true)?;
    b.set_nonblocking(true)?;
    Ok((
        tokio::net::TcpStream::from_std(a)?,
        tokio::net::TcpStream::from_std(b)?,
    ))
}

fn pair(mode: Mode) -> std::io::Result<(Box<dyn Io>, Box<dyn Io>)> {
    let (a, b) = socket_pair()?;
    Ok(match mode {
        Mode::Raw => (Box::new(a), Box::new(b)),
        Mode::Framed => (Box::new(Framed::new(a)), Box::new(Framed::new(b))),
    })
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn throughput(mode: Mode, total: u64) -> std::io::Result<Duration> {
    let (mut tx, mut rx) = pair(mode)?;
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let buf = vec![0x5au8; CHUNK];
        let mut left = total;
        while left > 0 {
            let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            tx.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        tx.shutdown().await?;
        Ok::<_, std::io::Error>(tx)
    });
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let n = rx.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let elapsed = start.elapsed();
    let _tx = writer.await.map_err(std::io::Error::other)??;
    assert_eq!(got, total, "{mode:?}: bytes lost");
    Ok(elapsed)
}

async fn latency(mode: Mode, rtts: u64) -> std::io::Result<Vec<Duration>> {
    let (mut a, mut b) = pair(mode)?;
    let echo = tokio::spawn(async move {
        let mut msg = [0u8; 64];
        for _ in 0..rtts {
            b.read_exact(&mut msg).await?;
            b.write_all(&msg).await?;
            b.flush().await?;
        }
        Ok::<_, std::io::Error>(b)
    });
    let mut samples = Vec::with_capacity(usize::try_from(rtts).unwrap_or(0));
    let mut msg = [7u8; 64];
    for _ in 0..rtts {
        let t = Instant::now();
        a.write_all(&msg).await?;
        a.flush().await?;
        a.read_exact(&mut msg).await?;
        samples.push(t.elapsed());
    }
    let _b = echo.await.map_err(std::io::Error::other)??;
    samples.sort();
    Ok(samples)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn main() -> std::io::Result<()> {
    let total = env_or("FRAMING_BYTES", 1 << 30);
    let runs = env_or("FRAMING_RUNS", 5).max(1);
    let rtts = env_or("FRAMING_RTTS", 20_000).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let gib = total as f64 / f64::from(1u32 << 30);
        println!("throughput: {gib:.2} GiB per run, {runs} runs per mode, 256 KiB writes, unix socket pair");
        let mut raw = Vec::new();
        let mut framed = Vec::new();
        for run in 0..runs {
            for (mode, out) in [(Mode::Raw, &mut raw), (Mode::Framed, &mut framed)] {
                let d = throughput(mode, total).await?;
                let gbps = total as f64 / d.as_secs_f64() / 1e9;
                println!("  run {run} {mode:?}: {d:.2?} = {gbps:.2} GB/s");
                out.push(gbps);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (raw_m, framed_m) = (median(&mut raw), median(&mut framed));
        println!(
            "median: raw {raw_m:.2} GB/s, framed {framed_m:.2} GB/s, framed/raw = {:.3}",
            framed_m / raw_m
        );

        println!("latency: {rtts} round trips of 64 bytes per mode");
        let mut p50s = Vec::new();
        for mode in [Mode::Raw, Mode::Framed] {
            let s = latency(mode, rtts).await?;
            let (p50, p99) = (pct(&s, 0.5), pct(&s, 0.99));
            println!("  {mode:?}: p50 {p50:.2?}, p99 {p99:.2?}");
            p50s.push(p50);
        }
        if let [raw, framed] = p50s[..] {
            println!(
                "p50 framed/raw = {:.3}",
                framed.as_secs_f64() / raw.as_secs_f64()
            );
        }
        Ok(())
    })
}
