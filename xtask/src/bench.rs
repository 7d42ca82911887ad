//! `cargo xtask bench`: what sluice costs, measured against the same work
//! done directly, in the same run, in interleaved rounds.
//!
//! Servers run here on 127.0.0.1; the client is this binary again
//! (`xtask bench-client`), started either as a plain process (direct) or under
//! `sluice run` (every connect redirected by the kernel programs and relayed
//! by the proxy). Rows:
//! - `connect()`: the syscall's latency, which inside a sandbox includes the
//!   kernel hooks and a handshake with the proxy instead of the server;
//! - round trip of 64 bytes on a kept connection, through the relay or not;
//! - bulk upload throughput through the relay or not.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::step;

/// Measurements one client run reports, one `name value` pair a line.
#[derive(Debug, Default, Clone)]
struct Sample {
    connect_p50_us: f64,
    connect_p99_us: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    bulk_mb_s: f64,
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    let sluice = crate::build_sluice()?;
    let client = std::env::current_exe()?;
    let rounds = if quick { 2 } else { 5 };
    let (connects, round_trips, bulk_mb) = if quick { (1000, 5000, 256) } else { (3000, 20_000, 1024) };

    // CPU placement dominates small latencies on two cores: servers and
    // sluice (inherited by `sluice run`) on CPU 0, the client on CPU 1.
    pin_to_cpu(0)?;
    let connect_addr = spawn_server(accept_and_close)?;
    let echo_addr = spawn_server(echo)?;
    let sink_addr = spawn_server(sink)?;
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let profile = dir.join("bench.toml");
    std::fs::write(
        &profile,
        "name = \"bench\"\n[[rule]]\nname = \"bench-servers\"\naction = \"allow\"\nips = [\"127.0.0.1/32\"]\n",
    )?;
    let client_args = |mode: &str| -> Vec<String> {
        vec![
            "bench-client".into(),
            mode.into(),
            connect_addr.to_string(),
            echo_addr.to_string(),
            sink_addr.to_string(),
            connects.to_string(),
            round_trips.to_string(),
            bulk_mb.to_string(),
        ]
    };

    let mut direct = Vec::new();
    let mut sandboxed = Vec::new();
    for round in 1..=rounds {
        step(&format!("round {round}/{rounds}: direct, then through sluice"));
        direct.push(parse(&Command::new(&client).args(client_args("all")).output()?)?);
        let mut run = Command::new(&sluice);
        run.args(["run", "--quiet", "--name", "bench", "--profile"]).arg(&profile).arg("--").arg(&client);
        sandboxed.push(parse(&run.args(client_args("all")).output()?)?);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let rows: [Row; 5] = [
        ("connect() p50", |s| s.connect_p50_us, "µs", false),
        ("connect() p99", |s| s.connect_p99_us, "µs", false),
        ("kept-conn round trip p50", |s| s.rtt_p50_us, "µs", false),
        ("kept-conn round trip p99", |s| s.rtt_p99_us, "µs", false),
        ("bulk upload", |s| s.bulk_mb_s, "MB/s", true),
    ];
    println!();
    println!("sluice bench ({rounds} interleaved rounds, median [min-max]; kernel {})", kernel());
    println!("{:<28} {:>24} {:>24} {:>14}", "measure", "direct", "sluice", "sluice - direct");
    for (name, get, unit, higher_is_better) in rows {
        let d = stats(&direct, get);
        let s = stats(&sandboxed, get);
        let delta = if higher_is_better {
            format!("{:.0}% of direct", 100.0 * s.0 / d.0)
        } else {
            format!("{:+.1} {unit}", s.0 - d.0)
        };
        // Spreads that overlap mean the difference is within noise.
        let tie = if d.1 <= s.2 && s.1 <= d.2 { " (tie)" } else { "" };
        println!(
            "{name:<28} {:>24} {:>24} {:>14}{tie}",
            format!("{:.1} [{:.1}-{:.1}] {unit}", d.0, d.1, d.2),
            format!("{:.1} [{:.1}-{:.1}] {unit}", s.0, s.1, s.2),
            delta
        );
    }
    println!("targets: kernel hook adds < 1 µs to connect(); relay adds < 30 µs at p50 on a kept connection; bulk >= 80% of direct");
    println!(
        "note: inside a sandbox connect() completes against sluice's proxy, not the server; both are on loopback here."
    );
    Ok(())
}

/// A result row: name, the measure, its unit, and whether more is better.
type Row = (&'static str, fn(&Sample) -> f64, &'static str, bool);

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned()
}

fn stats(samples: &[Sample], get: fn(&Sample) -> f64) -> (f64, f64, f64) {
    let mut values: Vec<f64> = samples.iter().map(get).collect();
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], values[0], values[values.len() - 1])
}

fn parse(output: &std::process::Output) -> anyhow::Result<Sample> {
    if !output.status.success() {
        bail!(
            "bench client failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut sample = Sample::default();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some((key, value)) = line.split_once(' ') else { continue };
        let value: f64 = value.parse().with_context(|| format!("bad line {line:?}"))?;
        match key {
            "connect_p50_us" => sample.connect_p50_us = value,
            "connect_p99_us" => sample.connect_p99_us = value,
            "rtt_p50_us" => sample.rtt_p50_us = value,
            "rtt_p99_us" => sample.rtt_p99_us = value,
            "bulk_mb_s" => sample.bulk_mb_s = value,
            _ => {}
        }
    }
    Ok(sample)
}

fn spawn_server(handle: fn(TcpStream)) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || handle(stream));
        }
    });
    Ok(addr)
}

fn accept_and_close(_stream: TcpStream) {}

fn echo(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Reads everything, then answers one byte so the client can time the end.
fn sink(mut stream: TcpStream) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut len = [0u8; 8];
    if stream.read_exact(&mut len).is_err() {
        return;
    }
    let mut left = u64::from_be_bytes(len);
    while left > 0 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n as u64),
        }
    }
    let _ = stream.write_all(b"k");
}

/// The client side, run as `xtask bench-client all CONNECT ECHO SINK N RTTS MB`.
pub fn client(args: &[String]) -> anyhow::Result<()> {
    let [_, connect, echo, sink, connects, round_trips, mb] = args else {
        bail!("usage: bench-client all CONNECT ECHO SINK CONNECTS ROUND_TRIPS MB");
    };
    let (connect, echo, sink): (SocketAddr, SocketAddr, SocketAddr) = (connect.parse()?, echo.parse()?, sink.parse()?);
    pin_to_cpu(1)?;

    let mut times = Vec::new();
    for _ in 0..connects.parse::<usize>()? {
        let start = Instant::now();
        let stream = TcpStream::connect(connect)?;
        times.push(start.elapsed());
        drop(stream);
    }
    report("connect", &mut times);

    let mut stream = TcpStream::connect(echo)?;
    stream.set_nodelay(true)?;
    let message = [7u8; 64];
    let mut back = [0u8; 64];
    // Warm up the path (first bytes wait for the proxy's classification).
    stream.write_all(&message)?;
    stream.read_exact(&mut back)?;
    let mut times = Vec::new();
    for _ in 0..round_trips.parse::<usize>()? {
        let start = Instant::now();
        stream.write_all(&message)?;
        stream.read_exact(&mut back)?;
        times.push(start.elapsed());
    }
    report("rtt", &mut times);

    let bytes = mb.parse::<u64>()? * 1024 * 1024;
    let mut stream = TcpStream::connect(sink)?;
    let chunk = vec![1u8; 256 * 1024];
    let start = Instant::now();
    stream.write_all(&bytes.to_be_bytes())?;
    let mut sent = 0;
    while sent < bytes {
        stream.write_all(&chunk)?;
        sent += chunk.len() as u64;
    }
    stream.read_exact(&mut [0u8; 1])?;
    let elapsed = start.elapsed();
    println!("bulk_mb_s {:.1}", bytes as f64 / 1e6 / elapsed.as_secs_f64());
    Ok(())
}

/// Pins the calling process (and what it starts later) to one CPU; on a
/// one-CPU machine everything shares CPU 0.
fn pin_to_cpu(cpu: usize) -> anyhow::Result<()> {
    let cpus = thread::available_parallelism().map_or(1, std::num::NonZero::get);
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET stays in bounds.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu.min(cpus - 1), &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            return Err(std::io::Error::last_os_error()).context("pinning to a CPU");
        }
    }
    Ok(())
}

fn report(name: &str, times: &mut [Duration]) {
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)].as_secs_f64() * 1e6;
    println!("{name}_p50_us {:.2}", at(0.50));
    println!("{name}_p99_us {:.2}", at(0.99));
}
