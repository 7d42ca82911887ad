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
//! - bulk upload throughput through the relay or not;
//! - HTTPS (h1 and h2, see `bench_tls.rs`) against an upstream served from this
//!   process: directly, intercepted by sluice, and through mitmproxy
//!   (`bench_mitm.rs`): a request on a kept connection, a new connection with
//!   its handshake, requests/s over 32 connections, a large download.
//!
//! Everything runs from a release build (TLS in an unoptimized build would
//! measure the build). Results also go to `<target>/bench/results.json`.

#[path = "bench_mitm.rs"]
mod mitm;
#[path = "bench_tls.rs"]
mod tls;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use serde_json::json;

use crate::step;

/// Measurements one client run reports, one `name value` pair a line.
type Sample = BTreeMap<String, f64>;

/// Where this run measures HTTPS from.
const CONFIGS: [&str; 3] = ["direct", "sluice", "mitmproxy"];
const PROTOCOLS: [&str; 2] = ["h1", "h2"];

/// How much one run measures.
struct Sizes {
    rounds: usize,
    connects: usize,
    round_trips: usize,
    bulk_mb: u64,
    kept: usize,
    new: usize,
    rps_secs: f64,
    /// At most this long for each of the kept and new measures.
    cap_secs: f64,
    big_mib: u64,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 3,
                connects: 1000,
                round_trips: 5000,
                bulk_mb: 256,
                kept: 2000,
                new: 200,
                rps_secs: 1.0,
                cap_secs: 2.0,
                big_mib: 16,
            }
        } else {
            Self {
                rounds: 5,
                connects: 3000,
                round_trips: 20_000,
                bulk_mb: 1024,
                kept: 10_000,
                new: 1000,
                rps_secs: 3.0,
                cap_secs: 5.0,
                big_mib: 64,
            }
        }
    }
}

pub fn run(quick: bool) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        step("building the bench itself (release): TLS in a debug build would measure the build");
        crate::run(crate::cargo().args(["build", "--release", "--package", "xtask"]))?;
        let mut bench = Command::new(target_dir().join("release/xtask"));
        bench.args(["bench-client", "bench"]);
        if quick {
            bench.arg("--quick");
        }
        return crate::run(&mut bench);
    }
    bench(quick)
}

/// The cargo target directory (`CARGO_TARGET_DIR` is honoured).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::workspace_root().join("target"), |dir| crate::workspace_root().join(dir))
}

fn bench(quick: bool) -> anyhow::Result<()> {
    step("building sluice (release)");
    crate::run(crate::cargo().args(["build", "--release", "--package", "sluice"]))?;
    let sluice = target_dir().join("release/sluice");
    let client = std::env::current_exe()?;
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let sizes = Sizes::new(quick);
    let rounds = sizes.rounds;

    // Before pinning, so that pip is not confined to one CPU.
    let mitmdump = mitm::install(&out_dir.join("venv"));
    if let Err(error) = &mitmdump {
        eprintln!("mitmproxy could not be installed, its rows will say unavailable: {error:#}");
    }

    // CPU placement dominates small latencies on two cores: servers, sluice
    // (inherited by `sluice run`) and mitmproxy on CPU 0, the client on CPU 1.
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
    let upstream = tls::start_upstream(&dir, sizes.big_mib * 1024 * 1024)?;
    let mut mitm_version = String::new();
    let mut mitm = mitmdump.and_then(|exe| {
        mitm_version = mitm::version(&exe);
        step(&format!("starting mitmdump ({mitm_version}) on CPU 0"));
        mitm::start(&exe, &dir.join("mitmproxy"), &upstream.ca_pem)
    });
    let mut mitm_unavailable = mitm.as_ref().err().map(|error| format!("{error:#}"));

    let client_args = |mode: &str| -> Vec<String> {
        vec![
            "bench-client".into(),
            mode.into(),
            connect_addr.to_string(),
            echo_addr.to_string(),
            sink_addr.to_string(),
            sizes.connects.to_string(),
            sizes.round_trips.to_string(),
            sizes.bulk_mb.to_string(),
        ]
    };
    let in_sandbox = |name: &str, upstream_ca: Option<&Path>| {
        let mut run = Command::new(&sluice);
        run.args(["run", "--quiet", "--name", name]);
        if let Some(ca) = upstream_ca {
            run.arg("--upstream-ca").arg(ca);
        }
        run.arg("--profile").arg(&profile).arg("--").arg(&client);
        run
    };

    let started = Instant::now();
    let load_before = loadavg();
    let mut direct = Vec::new();
    let mut sandboxed = Vec::new();
    let mut https: BTreeMap<(&str, &str), Vec<Sample>> = BTreeMap::new();
    for round in 1..=rounds {
        step(&format!("round {round}/{rounds}: TCP direct, then through sluice"));
        direct.push(parse(&Command::new(&client).args(client_args("all")).output()?)?);
        sandboxed.push(parse(&in_sandbox("bench", None).args(client_args("all")).output()?)?);
        for proto in PROTOCOLS {
            step(&format!("round {round}/{rounds}: HTTPS {proto} direct, through sluice, through mitmproxy"));
            let runs = HttpsRuns { client: &client, upstream: &upstream, sizes: &sizes, proto };
            let mut command = Command::new(&client);
            command.env("SSL_CERT_FILE", &upstream.ca_pem).args(runs.args(None));
            https.entry((proto, "direct")).or_default().push(parse(&command.output()?)?);
            // `sluice run` points SSL_CERT_FILE at the system roots plus the sandbox CA.
            let mut command = in_sandbox("bench-tls", Some(&upstream.ca_pem));
            command.args(runs.args(None));
            https.entry((proto, "sluice")).or_default().push(parse(&command.output()?)?);
            if let Ok(proxy) = &mitm {
                match runs.through(proxy) {
                    Ok(sample) => https.entry((proto, "mitmproxy")).or_default().push(sample),
                    Err(error) => {
                        eprintln!("the client failed through mitmproxy; its rows will say unavailable: {error:#}");
                        mitm_unavailable = Some(format!("{error:#}"));
                        mitm = Err(error);
                    }
                }
            }
        }
    }
    let load = [load_before, loadavg()];
    // Stops mitmdump (by its PID).
    drop(mitm);
    let _ = std::fs::remove_dir_all(&dir);
    if mitm_unavailable.is_some() {
        https.retain(|(_, config), _| *config != "mitmproxy");
    }

    print_tcp(&direct, &sandboxed, rounds);
    let (summary, targets) = print_https(&https, &sizes, mitm_unavailable.as_deref());
    print_minting(&sluice);
    eprintln!("(measured in {:.0} s)", started.elapsed().as_secs_f64());
    println!("load average (1, 5, 15 min) before: {}; after: {}", load[0], load[1]);
    let measured = Measured { direct, sandboxed, https, mitm_version, mitm_unavailable, summary, targets, load };
    let path = out_dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&results(quick, &sizes, &measured)?)? + "\n")?;
    println!("results and every sample: {}", path.display());
    Ok(())
}

/// Everything one run measured, for the JSON file.
struct Measured<'a> {
    direct: Vec<Sample>,
    sandboxed: Vec<Sample>,
    https: BTreeMap<(&'a str, &'a str), Vec<Sample>>,
    mitm_version: String,
    mitm_unavailable: Option<String>,
    summary: Vec<serde_json::Value>,
    targets: Vec<serde_json::Value>,
    /// /proc/loadavg before and after the rounds: other work on the machine skews everything.
    load: [String; 2],
}

/// One HTTPS client run's parameters.
struct HttpsRuns<'a> {
    client: &'a Path,
    upstream: &'a tls::Upstream,
    sizes: &'a Sizes,
    proto: &'a str,
}

impl HttpsRuns<'_> {
    fn args(&self, proxy: Option<SocketAddr>) -> Vec<String> {
        let mut args = vec![
            "bench-client".into(),
            "tls".into(),
            "kept,new,rps,bulk".into(),
            self.proto.into(),
            self.upstream.addr.to_string(),
        ];
        args.extend(proxy.map(|p| p.to_string()));
        args.push(format!("kept={}", self.sizes.kept));
        args.push(format!("new={}", self.sizes.new));
        args.push(format!("secs={}", self.sizes.rps_secs));
        args.push(format!("cap={}", self.sizes.cap_secs));
        args
    }

    /// The client through mitmproxy, trusting mitmproxy's CA.
    fn through(&self, proxy: &mitm::Mitm) -> anyhow::Result<Sample> {
        let mut command = Command::new(self.client);
        command.env("SSL_CERT_FILE", &proxy.ca_pem).args(self.args(Some(proxy.addr)));
        parse(&command.output()?)
    }
}

fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn results(quick: bool, sizes: &Sizes, m: &Measured) -> anyhow::Result<serde_json::Value> {
    let Measured { direct, sandboxed, https, mitm_version, mitm_unavailable, summary, targets, load } = m;
    Ok(json!({
        "time_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "quick": quick,
        "rounds": sizes.rounds,
        "machine": machine(),
        "load_average_before_and_after": load,
        "pinning": "upstream servers, sluice and mitmproxy on CPU 0; the client on CPU 1",
        "sluice": { "commit": git(&["rev-parse", "HEAD"]), "uncommitted_changes": !git(&["status", "--porcelain"]).is_empty() },
        "mitmproxy": {
            "version": mitm_version,
            "available": mitm_unavailable.is_none(),
            "unavailable_because": mitm_unavailable,
            "options": mitm::options(Path::new("BENCH-CA.pem")),
            "connect_target": "127.0.0.1:PORT (the upstream's address), SNI bench.test",
        },
        "parameters": {
            "tcp": { "connects": sizes.connects, "round_trips": sizes.round_trips, "bulk_upload_mb": sizes.bulk_mb },
            "https": {
                "kept_requests": sizes.kept,
                "new_connections": sizes.new,
                "kept_and_new_stop_after_seconds": sizes.cap_secs,
                "new_connection": "TCP connect + (CONNECT for mitmproxy) + full TLS handshake, no resumption + GET /small",
                "rps_connections": tls::RPS_CONNECTIONS,
                "rps_seconds": sizes.rps_secs,
                "small_body_bytes": 64,
                "big_body_mib": sizes.big_mib,
                "server_name": tls::SERVER_NAME,
            },
        },
        "samples": {
            "tcp": { "direct": direct, "sluice": sandboxed },
            "https": PROTOCOLS.iter().map(|proto| {
                let per_config: BTreeMap<&str, &Vec<Sample>> = CONFIGS
                    .iter()
                    .filter_map(|config| https.get(&(*proto, *config)).map(|s| (*config, s)))
                    .collect();
                (proto.to_string(), json!(per_config))
            }).collect::<serde_json::Map<_, _>>(),
        },
        "summary": summary,
        "targets": targets,
    }))
}

fn print_tcp(direct: &[Sample], sandboxed: &[Sample], rounds: usize) {
    let rows: [(&str, &str, &str, bool); 5] = [
        ("connect() p50", "connect_p50_us", "µs", false),
        ("connect() p99", "connect_p99_us", "µs", false),
        ("kept-conn round trip p50", "rtt_p50_us", "µs", false),
        ("kept-conn round trip p99", "rtt_p99_us", "µs", false),
        ("bulk upload", "bulk_mb_s", "MB/s", true),
    ];
    println!();
    println!("sluice bench ({rounds} interleaved rounds, median [min-max]; kernel {})", kernel());
    println!("{:<28} {:>24} {:>24} {:>14}", "measure", "direct", "sluice", "sluice - direct");
    for (name, key, unit, higher_is_better) in rows {
        let d = stats(direct, key);
        let s = stats(sandboxed, key);
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
}

/// Prints the HTTPS table and the targets; returns both for the JSON file.
/// Leaf minting for a new server name against a cached one, measured inside
/// sluice (`sluice debug mint-bench`).
fn print_minting(sluice: &std::path::Path) {
    let output = Command::new(sluice).args(["debug", "mint-bench"]).output().ok();
    let Some(output) = output.filter(|o| o.status.success()) else {
        println!("leaf minting: unavailable (sluice debug mint-bench failed)");
        return;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let value =
        |key: &str| text.lines().find_map(|l| l.strip_prefix(key)?.trim().parse::<f64>().ok()).unwrap_or(f64::NAN);
    println!(
        "leaf minting: new name p50 {:.1} µs (p99 {:.1}); cached p50 {:.2} µs (p99 {:.2})",
        value("mint_cold_p50_us"),
        value("mint_cold_p99_us"),
        value("mint_cached_p50_us"),
        value("mint_cached_p99_us"),
    );
}

fn print_https(
    https: &BTreeMap<(&str, &str), Vec<Sample>>,
    sizes: &Sizes,
    mitm_unavailable: Option<&str>,
) -> (Vec<serde_json::Value>, Vec<serde_json::Value>) {
    let big = format!("GET {} MiB", sizes.big_mib);
    let rps = format!("req/s, {} conns", tls::RPS_CONNECTIONS);
    let rows: [(&str, &str, &str, bool); 6] = [
        ("kept conn p50", "kept_p50_us", "µs", false),
        ("kept conn p99", "kept_p99_us", "µs", false),
        ("new conn+handshake p50", "new_p50_us", "µs", false),
        ("new conn+handshake p99", "new_p99_us", "µs", false),
        (&rps, "rps", "req/s", true),
        (&big, "bulk_mb_s", "MB/s", true),
    ];
    println!();
    println!(
        "HTTPS, intercepted ({} interleaved rounds, median [min-max]; upstream, sluice and mitmproxy on CPU 0, client on CPU 1)",
        sizes.rounds
    );
    println!("{:<28} {:>24} {:>24} {:>24}   sluice vs direct / mitmproxy", "measure", "direct", "sluice", "mitmproxy");
    let mut summary = Vec::new();
    for proto in PROTOCOLS {
        for (name, key, unit, higher_is_better) in &rows {
            let get = |config: &str| https.get(&(proto, config)).map(|samples| stats(samples, key));
            let (d, s, m) = (get("direct"), get("sluice"), get("mitmproxy"));
            let cell = |v: Option<(f64, f64, f64)>| match v {
                Some((median, min, max)) => format!("{} [{}-{}] {unit}", num(median), num(min), num(max)),
                None => "unavailable".to_owned(),
            };
            let mut compare = Vec::new();
            if let (Some(d), Some(s)) = (d, s) {
                if *higher_is_better {
                    compare.push(format!("{:.0}% of direct", 100.0 * s.0 / d.0));
                } else {
                    compare.push(format!("{:+.1} {unit} ({:.2}x)", s.0 - d.0, s.0 / d.0));
                }
            }
            if let (Some(s), Some(m)) = (s, m) {
                compare.push(format!("{:.1}x mitmproxy", if *higher_is_better { s.0 / m.0 } else { m.0 / s.0 }));
            }
            println!(
                "{:<28} {:>24} {:>24} {:>24}   {}",
                format!("{name} {proto}"),
                cell(d),
                cell(s),
                cell(m),
                compare.join(", ")
            );
            let stat = |v: Option<(f64, f64, f64)>| {
                v.map(|(median, min, max)| json!({"median": median, "min": min, "max": max}))
            };
            summary.push(json!({
                "measure": key, "protocol": proto, "unit": unit,
                "direct": stat(d), "sluice": stat(s), "mitmproxy": stat(m),
            }));
        }
    }
    if let Some(reason) = mitm_unavailable {
        println!("mitmproxy unavailable: {reason}");
    }
    println!(
        "notes: kept = up to {} sequential GETs of 64 bytes on one connection; new = up to {} times TCP connect + full \
         TLS handshake (no resumption) + one GET; each stops after {} s. mitmproxy is reached with CONNECT \
         127.0.0.1:PORT and SNI bench.test, verifying the upstream against the bench CA, bodies streamed.",
        sizes.kept, sizes.new, sizes.cap_secs
    );
    for ((proto, config), samples) in https {
        for (key, wanted) in [("kept_count", sizes.kept), ("new_count", sizes.new)] {
            let fewest = samples.iter().filter_map(|s| s.get(key)).copied().fold(f64::INFINITY, f64::min);
            if fewest < wanted as f64 {
                println!(
                    "note: {config} {proto}: {} stopped after {} s with {fewest} samples (of {wanted})",
                    key.trim_end_matches("_count"),
                    sizes.cap_secs
                );
            }
        }
    }
    (summary, print_targets(https))
}

/// Prints each HTTPS target as met or missed (not asserted); returns them.
fn print_targets(https: &BTreeMap<(&str, &str), Vec<Sample>>) -> Vec<serde_json::Value> {
    let median = |proto: &str, config: &str, key: &str| https.get(&(proto, config)).map(|s| stats(s, key).0);
    let mut targets = Vec::new();
    println!("targets (medians; reported, not asserted):");
    let checks: [Target; 4] = [
        ("added at p50 on a kept connection <= 100 µs", "kept_p50_us", |s, d| s - d, "direct", 100.0, "µs"),
        ("new connection p50 <= 2x direct", "new_p50_us", |s, d| s / d, "direct", 2.0, "x"),
        ("req/s >= 5x mitmproxy", "rps", |s, m| m / s, "mitmproxy", 0.2, ""),
        ("MB/s >= 5x mitmproxy", "bulk_mb_s", |s, m| m / s, "mitmproxy", 0.2, ""),
    ];
    for (what, key, measure, against, limit, unit) in checks {
        let mut line = format!("  {what:<46}");
        for proto in PROTOCOLS {
            let (Some(s), Some(other)) = (median(proto, "sluice", key), median(proto, against, key)) else {
                let _ = write!(line, " {proto}: n/a ({against} unavailable)");
                targets.push(json!({"target": what, "protocol": proto, "met": null}));
                continue;
            };
            let value = measure(s, other);
            let met = value <= limit;
            let shown = match unit {
                "µs" => format!("{value:+.1} µs"),
                "x" => format!("{value:.3}x"),
                _ => format!("{:.1}x", s / other),
            };
            let verdict = if met { "met" } else { "MISSED" };
            let _ = write!(line, " {proto}: {verdict} ({shown})");
            targets.push(json!({"target": what, "protocol": proto, "met": met, "sluice": s, against: other}));
        }
        println!("{line}");
    }
    targets
}

/// A target: what, the measure, how sluice's median compares with the other
/// configuration's (lower is better), which configuration, the limit, its unit.
type Target = (&'static str, &'static str, fn(f64, f64) -> f64, &'static str, f64, &'static str);

/// A number with as many decimals as it needs.
fn num(value: f64) -> String {
    if value >= 1000.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned()
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, m)| m.trim()))
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total = meminfo.lines().find_map(|line| line.strip_prefix("MemTotal:")).unwrap_or_default().trim();
    json!({
        "kernel": kernel(),
        "kernel_version": std::fs::read_to_string("/proc/version").unwrap_or_default().trim(),
        "cpus": online_cpus(),
        "cpu_model": cpu_model,
        "memory": mem_total,
        "os": std::fs::read_to_string("/etc/os-release").unwrap_or_default().lines()
            .find_map(|line| line.strip_prefix("PRETTY_NAME=")).unwrap_or_default().trim_matches('"'),
    })
}

fn git(args: &[&str]) -> String {
    Command::new("git")
        .args(args)
        .current_dir(crate::workspace_root())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Median (mean of the middle two for an even count), min and max.
fn stats(samples: &[Sample], key: &str) -> (f64, f64, f64) {
    let mut values: Vec<f64> = samples.iter().map(|s| s.get(key).copied().unwrap_or(f64::NAN)).collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = f64::midpoint(values[(n - 1) / 2], values[n / 2]);
    (median, values[0], values[n - 1])
}

fn parse(output: &std::process::Output) -> anyhow::Result<Sample> {
    if !output.status.success() {
        bail!(
            "bench client failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut sample = Sample::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some((key, value)) = line.split_once(' ') else { continue };
        let value: f64 = value.parse().with_context(|| format!("bad line {line:?}"))?;
        sample.insert(key.to_owned(), value);
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

/// The client side: `xtask bench-client all CONNECT ECHO SINK N RTTS MB`, or
/// `bench-client tls ...` (see `bench_tls.rs`); `bench-client bench [--quick]`
/// is the whole bench, started from a release build by [`run`].
///
/// For looking into one number by hand, `bench-client upstream` serves the
/// HTTPS upstream (64 MiB `/big`) on CPU 0, prints `ADDR CA-FILE`, and stops
/// when its standard input closes.
pub fn client(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("tls") => return tls::client(&args[1..]),
        Some("bench") => return bench(args.get(1).is_some_and(|a| a == "--quick")),
        Some("upstream") => {
            let dir = std::env::temp_dir().join(format!("sluice-bench-upstream-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            pin_to_cpu(0)?;
            let upstream = tls::start_upstream(&dir, 64 << 20)?;
            println!("{} {}", upstream.addr, upstream.ca_pem.display());
            std::io::stdout().flush()?;
            std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(());
        }
        _ => {}
    }
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
    // Not available_parallelism(): it counts only the CPUs this process may
    // use, and a client started by the bench inherits its pinning to CPU 0.
    let cpus = online_cpus();
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

/// CPUs online on the machine, whatever this process is pinned to.
fn online_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

fn report(name: &str, times: &mut [Duration]) {
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)].as_secs_f64() * 1e6;
    println!("{name}_p50_us {:.2}", at(0.50));
    println!("{name}_p99_us {:.2}", at(0.99));
}
