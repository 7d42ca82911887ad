//! `cargo xtask bench`: what sluice costs, measured against the same work
//! done directly and through the proxies users pick today, in the same run,
//! in interleaved rounds, with the same client and the same upstreams.
//!
//! Configurations:
//! - `direct`: the client talks to the upstreams itself;
//! - `sluice`: the client runs under `sluice run`; sluice's eBPF programs
//!   redirect its connects to the proxy (the way sluice is meant to be used);
//! - `iptables`: the client runs in a network namespace whose TCP an iptables
//!   REDIRECT rule on the host side of its veth sends to the same daemon's
//!   redirect listener (the classic transparent proxy), see `bench_net.rs`;
//! - `mitmproxy` (from `PyPI`, `bench_mitm.rs`) and `squid` (Debian `squid-openssl`,
//!   ssl-bump, `bench_squid.rs`) as explicit proxies that intercept HTTPS.
//!
//! Measures: TCP connect, kept round trip and bulk upload (transparent
//! configurations); for plain HTTP and intercepted HTTPS h1/h2 (see
//! `bench_tls.rs`) a request on a kept connection (p50, p99, p99.9), a new
//! connection with its handshake, requests/s over 1, 32 and 256 connections,
//! a large download, the proxy's CPU time per request and its memory under
//! load (from /proc, `bench_proc.rs`); the proxies' memory idle and per idle
//! connection; DNS through sluice's resolver. Output: a table, a JSON file and
//! SVG plots (`bench_report.rs`) under `<target>/bench/`.
//!
//! Everything runs from a release build (TLS in an unoptimized build would
//! measure the build).

#[path = "bench_audit.rs"]
pub mod audit;
#[path = "bench_docker.rs"]
mod docker;
#[path = "bench_mitm.rs"]
mod mitm;
#[path = "bench_net.rs"]
mod net;
#[path = "bench_proc.rs"]
mod proc;
#[path = "bench_report.rs"]
mod report;
#[path = "bench_squid.rs"]
mod squid;
#[path = "bench_tls.rs"]
mod tls;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::step;

/// Measurements one client run reports, one `name value` pair a line.
pub type Sample = BTreeMap<String, f64>;

/// Every configuration, in table order.
pub const CONFIGS: [&str; 5] = ["direct", "sluice", "iptables", "mitmproxy", "squid"];
/// What the client measures: TCP, plain HTTP, HTTPS h1 and h2, DNS.
pub const PROTOCOLS: [&str; 5] = ["tcp", "http", "h1", "h2", "dns"];
/// Connection counts for requests/s.
pub const CONNS: [usize; 3] = [1, 32, 256];

/// How much one run measures.
pub struct Sizes {
    pub rounds: usize,
    pub connects: usize,
    pub round_trips: usize,
    pub bulk_mb: u64,
    pub kept: usize,
    pub new: usize,
    pub rps_secs: f64,
    /// At most this long for each of the kept and new measures.
    pub cap_secs: f64,
    pub big_mib: u64,
    /// DNS queries a round; sluice's resolvers allow a sandbox 200/s with a
    /// burst of 400, and the client asks as fast as answers come.
    pub dns: usize,
    /// Idle connections to hold open through each proxy, and the most time
    /// opening them may take.
    pub idle: usize,
    pub idle_cap_secs: f64,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                rounds: 3,
                connects: 500,
                round_trips: 2000,
                bulk_mb: 128,
                kept: 2000,
                new: 100,
                rps_secs: 0.5,
                cap_secs: 0.7,
                big_mib: 16,
                dns: 300,
                idle: 2000,
                idle_cap_secs: 10.0,
            }
        } else {
            Self {
                rounds: 5,
                connects: 2000,
                round_trips: 10_000,
                bulk_mb: 512,
                kept: 10_000,
                new: 500,
                rps_secs: 1.2,
                cap_secs: 1.5,
                big_mib: 64,
                dns: 300,
                idle: 10_000,
                idle_cap_secs: 25.0,
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

/// A peer (`squid`), or a peer with one protocol (`squid h1`), that could
/// not be had, and why (its rows say so).
pub type Unavailable = BTreeMap<String, String>;

/// Everything one run measured.
pub struct Measured {
    pub sizes: Sizes,
    pub quick: bool,
    /// Samples by (protocol, configuration), one a round.
    pub samples: BTreeMap<(&'static str, &'static str), Vec<Sample>>,
    /// Memory of each proxy (KiB): idle after start, and holding idle connections.
    pub memory: BTreeMap<&'static str, serde_json::Value>,
    pub versions: BTreeMap<&'static str, String>,
    pub unavailable: Unavailable,
    /// /proc/loadavg before and after the rounds: other work on the machine skews everything.
    pub load: [String; 2],
    pub seconds: f64,
}

/// Where each configuration's client runs and what it trusts.
struct Setup<'a> {
    client: PathBuf,
    sluice: PathBuf,
    profile: PathBuf,
    net: &'a net::Net,
    daemon: &'a net::Daemon,
    redirect_bundle: PathBuf,
    upstream: &'a tls::Upstream,
    mitm: Option<&'a mitm::Mitm>,
    squid: Option<&'a squid::Squid>,
    runs: std::cell::Cell<u32>,
}

impl Setup<'_> {
    /// The client command for `config` (None if that configuration is
    /// unavailable), with the proxy address to add to its arguments and the
    /// proxy's PID.
    fn command(&self, config: &str) -> Option<(Command, Option<SocketAddr>, Option<u32>)> {
        let plain = |ca: &Path| {
            let mut command = Command::new(&self.client);
            command.env("SSL_CERT_FILE", ca);
            command
        };
        Some(match config {
            "direct" => (plain(&self.upstream.ca_pem), None, None),
            "sluice" => {
                // `sluice run` points SSL_CERT_FILE at the system roots plus the sandbox CA.
                let n = self.runs.get() + 1;
                self.runs.set(n);
                let mut run = Command::new(&self.sluice);
                run.args(["run", "--quiet", "--as-root", "--instance", net::INSTANCE, "--name", &format!("bench-{n}")]);
                run.arg("--profile").arg(&self.profile).arg("--").arg(&self.client);
                (run, None, Some(self.daemon.pid()))
            }
            "iptables" => {
                let mut command = self.net.command(&self.client);
                command.env("SSL_CERT_FILE", &self.redirect_bundle);
                (command, None, Some(self.daemon.pid()))
            }
            "mitmproxy" => self.mitm.map(|m| (plain(&m.ca_pem), Some(m.addr), Some(m.pid())))?,
            "squid" => self.squid.map(|s| (plain(&s.ca_pem), Some(s.addr), Some(s.pid())))?,
            _ => return None,
        })
    }
}

fn bench(quick: bool) -> anyhow::Result<()> {
    step("building sluice (release)");
    crate::run(crate::cargo().args(["build", "--release", "--package", "sluice"]))?;
    let sluice = target_dir().join("release/sluice");
    let client = std::env::current_exe()?;
    let out_dir = target_dir().join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let sizes = Sizes::new(quick);
    let mut unavailable = Unavailable::new();
    let mut versions = BTreeMap::new();

    // Installs first, before pinning, so that pip and apt are not confined to one CPU.
    let mitmdump = install(&out_dir, &mut versions, &mut unavailable)?;

    // CPU placement dominates small latencies on two cores: servers, sluice
    // and the peers on CPU 0, the client on CPU 1.
    raise_open_files_limit();
    pin_to_cpu(0)?;
    step("setting up the bench network namespace, upstreams and sluice daemon");
    let mut bench_net = net::Net::new()?;
    let host = IpAddr::V4(net::host_ip());
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let servers = [spawn_server(host, accept_and_close)?, spawn_server(host, echo)?, spawn_server(host, sink)?];
        let upstream = tls::start_upstream(&dir, host, sizes.big_mib * 1024 * 1024)?;
        let dns = net::start_dns()?;
        let profile = dir.join("bench.toml");
        let profile_text = format!(
            "name = \"bench\"\n[[rule]]\nname = \"bench-servers\"\naction = \"allow\"\nips = [\"{}/32\"]\n\n\
             [[rule]]\nname = \"bench-names\"\naction = \"allow\"\nhosts = [\"*.bench.test\"]\n",
            net::host_ip()
        );
        std::fs::write(&profile, &profile_text)?;
        let daemon = net::Daemon::start(&sluice, &dir, &upstream.ca_pem)?;
        let redirect_bundle = daemon.register(net::REDIRECT_SANDBOX, &profile_text)?;
        bench_net.redirect_tcp_to(daemon.redirect_port)?;
        let (mitm, squid) = start_peers(mitmdump.as_ref(), &dir, &upstream, &mut versions, &mut unavailable);
        let setup = Setup {
            client: client.clone(),
            sluice: sluice.clone(),
            profile: profile.clone(),
            net: &bench_net,
            daemon: &daemon,
            redirect_bundle,
            upstream: &upstream,
            mitm: mitm.as_ref(),
            squid: squid.as_ref(),
            runs: std::cell::Cell::new(0),
        };
        let started = Instant::now();
        let load_before = loadavg();
        let samples = rounds(&setup, servers, dns, &sizes, &mut unavailable);
        let load = [load_before, loadavg()];
        let seconds = started.elapsed().as_secs_f64();

        // Memory from fresh processes: allocators keep what the rounds freed,
        // which would hide what idle connections cost.
        drop(setup);
        drop((mitm, squid, daemon));
        step("memory: sluice, mitmproxy and Squid restarted, idle, then holding idle HTTPS connections");
        let daemon = net::Daemon::start(&sluice, &dir, &upstream.ca_pem)?;
        let (mitm, squid) = start_peers(mitmdump.as_ref(), &dir, &upstream, &mut versions, &mut unavailable);
        std::thread::sleep(Duration::from_millis(500));
        let pids = [
            ("sluice", Some(daemon.pid())),
            ("mitmproxy", mitm.as_ref().map(mitm::Mitm::pid)),
            ("squid", squid.as_ref().map(squid::Squid::pid)),
        ];
        let mut memory: BTreeMap<_, _> = pids
            .into_iter()
            .filter_map(|(name, pid)| {
                Some((name, serde_json::json!({ "idle_kb": proc::rss_kb(&proc::tree(&[pid?])) })))
            })
            .collect();
        let setup = Setup {
            client: client.clone(),
            sluice: sluice.clone(),
            profile,
            net: &bench_net,
            daemon: &daemon,
            redirect_bundle: PathBuf::new(),
            upstream: &upstream,
            mitm: mitm.as_ref(),
            squid: squid.as_ref(),
            runs: std::cell::Cell::new(0),
        };
        for config in ["sluice", "mitmproxy", "squid"].into_iter().filter(|c| selected(c)) {
            if let Some(held) = idle_memory(&setup, config, &sizes)? {
                memory.entry(config).or_insert_with(|| serde_json::json!({}))["idle_connections"] = held;
            }
        }
        Ok::<_, anyhow::Error>(Measured {
            sizes,
            quick,
            samples,
            memory,
            versions: versions.clone(),
            unavailable: unavailable.clone(),
            load,
            seconds,
        })
    })();
    // The guards (peers, daemon, namespace) have dropped by now.
    drop(bench_net);
    let _ = std::fs::remove_dir_all(&dir);
    output(&result?, &sluice, &out_dir)
}

/// The table, leaf minting, the results file and the plots.
fn output(measured: &Measured, sluice: &Path, out_dir: &Path) -> anyhow::Result<()> {
    report::print(measured);
    print_minting(sluice);
    print_policy_evaluation(sluice);
    audit::print(sluice);
    let path = out_dir.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report::json(measured)?)? + "\n")?;
    println!("results and every sample: {}", path.display());
    for plot in report::plots(&measured.samples, out_dir)? {
        println!("plot: {}", plot.display());
    }
    containers(sluice, out_dir, measured.quick);
    Ok(())
}

/// The container rows (`bench_docker.rs`), written to containers.json; a
/// failure there is reported and does not undo the rows above.
fn containers(sluice: &std::path::Path, out_dir: &std::path::Path, quick: bool) {
    match docker::run(sluice, quick) {
        Ok(Some(json)) => {
            let path = out_dir.join("containers.json");
            if std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap_or_default() + "\n").is_ok() {
                println!("container samples: {}", path.display());
            }
        }
        Ok(None) => {}
        Err(error) => println!("containers: not measured: {error:#}"),
    }
}

/// Installs what the configurations need: iptables, mitmproxy (a venv
/// under `out_dir`), Squid. Returns mitmdump, or why it is unavailable.
fn install(
    out_dir: &Path,
    versions: &mut BTreeMap<&'static str, String>,
    unavailable: &mut Unavailable,
) -> anyhow::Result<anyhow::Result<PathBuf>> {
    net::install_iptables()?;
    let mitmdump = mitm::install(&out_dir.join("venv"));
    if let Err(error) = &mitmdump {
        eprintln!("mitmproxy could not be installed, its rows will say unavailable: {error:#}");
    }
    match squid::install() {
        Ok(version) => {
            versions.insert("squid", version);
        }
        Err(error) => {
            eprintln!("Squid could not be installed, its rows will say unavailable: {error:#}");
            unavailable.insert("squid".into(), format!("{error:#}"));
        }
    }
    Ok(mitmdump)
}

/// Starts mitmproxy and Squid (each on CPU 0, by inheritance); a peer that
/// cannot start is recorded as unavailable.
fn start_peers(
    mitmdump: Result<&PathBuf, &anyhow::Error>,
    dir: &Path,
    upstream: &tls::Upstream,
    versions: &mut BTreeMap<&'static str, String>,
    unavailable: &mut Unavailable,
) -> (Option<mitm::Mitm>, Option<squid::Squid>) {
    let mitm = mitmdump.map_err(|e| anyhow::anyhow!("{e:#}")).and_then(|exe| {
        versions.insert("mitmproxy", mitm::version(exe));
        step(&format!("starting mitmdump ({}) on CPU 0", versions["mitmproxy"]));
        mitm::start(exe, &dir.join("mitmproxy"), &upstream.ca_pem)
    });
    let mitm = mitm.map_err(|error| unavailable.insert("mitmproxy".into(), format!("{error:#}"))).ok();
    let squid = if unavailable.contains_key("squid") {
        None
    } else {
        step("starting Squid (ssl-bump) on CPU 0");
        squid::start(&dir.join("squid"), IpAddr::V4(net::host_ip()), &upstream.ca_pem)
            .map_err(|error| unavailable.insert("squid".into(), format!("{error:#}")))
            .ok()
    };
    (mitm, squid)
}

/// Every round, each configuration in turn (a different one first each round).
fn rounds(
    setup: &Setup,
    servers: [SocketAddr; 3],
    dns: SocketAddr,
    sizes: &Sizes,
    unavailable: &mut Unavailable,
) -> BTreeMap<(&'static str, &'static str), Vec<Sample>> {
    let mut samples = BTreeMap::new();
    for round in 1..=sizes.rounds {
        let mut order: Vec<&'static str> = CONFIGS.into_iter().filter(|c| selected(c)).collect();
        let first = (round - 1) % order.len().max(1);
        order.rotate_left(first);
        for config in order {
            step(&format!("round {round}/{}: {config}", sizes.rounds));
            measure_config(setup, config, servers, dns, sizes, &mut samples, unavailable);
        }
    }
    samples
}

/// One round of one configuration: every protocol it can carry.
fn measure_config(
    setup: &Setup,
    config: &'static str,
    servers: [SocketAddr; 3],
    dns: SocketAddr,
    sizes: &Sizes,
    samples: &mut BTreeMap<(&'static str, &'static str), Vec<Sample>>,
    unavailable: &mut Unavailable,
) {
    let transparent = matches!(config, "direct" | "sluice" | "iptables");
    for proto in PROTOCOLS {
        // Squid speaks HTTP/1.1 to its clients only; DNS goes through
        // sluice's resolver only with its eBPF redirection.
        let skip = match proto {
            "tcp" => !transparent,
            "h2" => config == "squid",
            "dns" => !matches!(config, "direct" | "sluice"),
            _ => false,
        };
        if skip || unavailable.contains_key(config) || unavailable.contains_key(&format!("{config} {proto}")) {
            continue;
        }
        let Some((mut command, proxy, pid)) = setup.command(config) else { continue };
        command.args(["bench-client"]);
        match proto {
            "tcp" => {
                command.args(["all", &servers[0].to_string(), &servers[1].to_string(), &servers[2].to_string()]);
                command.args([sizes.connects.to_string(), sizes.round_trips.to_string(), sizes.bulk_mb.to_string()]);
            }
            "dns" => {
                command.args(["dns", &dns.to_string(), &sizes.dns.to_string()]);
            }
            _ => {
                let kinds = if proto == "http" { "kept,rps,bulk" } else { "kept,new,rps,bulk" };
                let upstream = if proto == "http" { setup.upstream.plain_addr } else { setup.upstream.addr };
                command.args(["tls", kinds, proto, &upstream.to_string()]);
                command.args(proxy.map(|p| p.to_string()));
                command.arg(format!("kept={}", sizes.kept));
                command.arg(format!("new={}", sizes.new));
                command.arg(format!("secs={}", sizes.rps_secs));
                command.arg(format!("cap={}", sizes.cap_secs));
                command.arg(format!("conns={}", CONNS.map(|c| c.to_string()).join(",")));
                command.args(pid.map(|pid| format!("pids={pid}")));
            }
        }
        match command.output().map_err(anyhow::Error::from).and_then(|output| parse(&output)) {
            Ok(sample) => samples.entry((proto, config)).or_default().push(sample),
            Err(error) if matches!(config, "mitmproxy" | "squid") => {
                eprintln!("the client failed through {config} ({proto}); its rows will say unavailable: {error:#}");
                unavailable.insert(format!("{config} {proto}"), format!("{error:#}"));
                samples.remove(&(proto, config));
            }
            Err(error) => eprintln!("{config} {proto} failed this round: {error:#}"),
        }
    }
}

/// Opens idle HTTPS connections (one request each) through `config`'s proxy
/// and reads its memory before and while they are held.
fn idle_memory(setup: &Setup, config: &str, sizes: &Sizes) -> anyhow::Result<Option<serde_json::Value>> {
    let Some((mut command, proxy, Some(pid))) = setup.command(config) else { return Ok(None) };
    // Each proxied connection holds two descriptors in the proxy, and the
    // hard limit on open files bounds that.
    let limit = hard_open_files_limit();
    let wanted = sizes.idle.min(usize::try_from(limit / 2).unwrap_or(usize::MAX).saturating_sub(200));
    command.args(["bench-client", "tls", "idle", "h1", &setup.upstream.addr.to_string()]);
    command.args(proxy.map(|p| p.to_string()));
    command.args([format!("idle={wanted}"), format!("cap={}", sizes.idle_cap_secs)]);
    let pids = || proc::tree(&[pid]);
    std::thread::sleep(Duration::from_millis(300));
    let before = proc::rss_kb(&pids());
    let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("client output")?).read_line(&mut line)?;
    let opened: u64 = line.strip_prefix("idle_open ").and_then(|n| n.trim().parse().ok()).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(500));
    let held = proc::rss_kb(&pids());
    drop(child.stdin.take());
    let _ = child.wait();
    if opened == 0 {
        eprintln!("no idle connection could be opened through {config}");
        return Ok(None);
    }
    println!("{config}: {opened} idle connections, RSS {before} KiB -> {held} KiB");
    Ok(Some(serde_json::json!({
        "wanted": wanted,
        "opened": opened,
        "rss_before_kb": before,
        "rss_held_kb": held,
        "kb_per_connection": held.saturating_sub(before) as f64 / opened as f64,
        "open_files_hard_limit": limit,
    })))
}

/// Whether `config` is measured: all by default, or those named in
/// `SLUICE_BENCH_CONFIGS` (comma-separated), for looking into one by hand.
fn selected(config: &str) -> bool {
    std::env::var("SLUICE_BENCH_CONFIGS").map_or(true, |list| list.split(',').any(|c| c.trim() == config))
}

fn hard_open_files_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscall on a valid struct.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) };
    limit.rlim_max
}

/// Soft limit on open files up to the hard limit: the upstreams and the
/// client hold thousands of connections.
fn raise_open_files_limit() {
    let hard = hard_open_files_limit();
    let wanted = libc::rlimit { rlim_cur: hard, rlim_max: hard };
    // SAFETY: plain syscall on a valid struct.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const wanted) };
}

fn loadavg() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// Leaf minting for a new server name against a cached one, measured inside
/// sluice (`sluice debug mint-bench`).
fn print_minting(sluice: &std::path::Path) {
    let Some(value) = debug_measure(sluice, "mint-bench") else {
        println!("leaf minting: unavailable (sluice debug mint-bench failed)");
        return;
    };
    println!(
        "leaf minting: new name p50 {:.1} µs (p99 {:.1}); cached p50 {:.2} µs (p99 {:.2})",
        value("mint_cold_p50_us"),
        value("mint_cold_p99_us"),
        value("mint_cached_p50_us"),
        value("mint_cached_p99_us"),
    );
}

/// Request decisions against profiles of 10, 1 000 and 10 000 rules,
/// measured inside sluice (`sluice debug policy-bench`); target: under 2 µs
/// at p99 with 10 000 rules.
fn print_policy_evaluation(sluice: &std::path::Path) {
    let Some(value) = debug_measure(sluice, "policy-bench") else {
        println!("policy evaluation: unavailable (sluice debug policy-bench failed)");
        return;
    };
    for rules in [10, 1_000, 10_000] {
        let p99 = value(&format!("policy_{rules}_p99_ns "));
        let target = if rules == 10_000 {
            if p99 < 2000.0 {
                "  (target < 2 µs: met)"
            } else {
                "  (target < 2 µs: MISSED)"
            }
        } else {
            ""
        };
        println!(
            "policy evaluation, {rules:>6} rules: p50 {:.2} µs, p99 {:.2} µs, p99.9 {:.2} µs{target}",
            value(&format!("policy_{rules}_p50_ns ")) / 1000.0,
            p99 / 1000.0,
            value(&format!("policy_{rules}_p999_ns ")) / 1000.0,
        );
    }
}

/// Runs `sluice debug COMMAND` and returns a lookup of the `key value`
/// lines it prints (NaN for a missing key), or `None` if it failed.
fn debug_measure(sluice: &std::path::Path, command: &str) -> Option<impl Fn(&str) -> f64> {
    let output = Command::new(sluice).args(["debug", command]).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    Some(move |key: &str| {
        text.lines().find_map(|l| l.strip_prefix(key)?.trim().parse::<f64>().ok()).unwrap_or(f64::NAN)
    })
}

/// A number with as many decimals as it needs.
pub fn num(value: f64) -> String {
    if value >= 1000.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

pub fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned()
}

pub fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name").and_then(|rest| rest.split_once(':')).map(|(_, m)| m.trim()))
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total = meminfo.lines().find_map(|line| line.strip_prefix("MemTotal:")).unwrap_or_default().trim();
    serde_json::json!({
        "kernel": kernel(),
        "kernel_version": std::fs::read_to_string("/proc/version").unwrap_or_default().trim(),
        "cpus": online_cpus(),
        "cpu_model": cpu_model,
        "memory": mem_total,
        "os": std::fs::read_to_string("/etc/os-release").unwrap_or_default().lines()
            .find_map(|line| line.strip_prefix("PRETTY_NAME=")).unwrap_or_default().trim_matches('"'),
    })
}

pub fn git(args: &[&str]) -> String {
    Command::new("git")
        .args(args)
        .current_dir(crate::workspace_root())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// Median (mean of the middle two for an even count), min and max.
/// Median (mean of the middle two for an even count), min and max of `key`
/// over the rounds that reported it.
pub fn stats(samples: &[Sample], key: &str) -> Option<(f64, f64, f64)> {
    let mut values: Vec<f64> = samples.iter().filter_map(|s| s.get(key).copied()).filter(|v| v.is_finite()).collect();
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = f64::midpoint(values[(n - 1) / 2], values[n / 2]);
    Some((median, values[0], values[n - 1]))
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

fn spawn_server(ip: IpAddr, handle: fn(TcpStream)) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind((ip, 0))?;
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
/// is the whole bench, started from a release build by [`run`];
/// `bench-client containers [--quick]` only the container rows.
///
/// For looking into one number by hand, `bench-client upstream` serves the
/// HTTPS upstream (64 MiB `/big`) on CPU 0, prints `ADDR CA-FILE`, and stops
/// when its standard input closes.
pub fn client(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("tls") => return tls::client(&args[1..]),
        Some("dns") => return net::dns_client(&args[1..]),
        Some("plot") => return report::replot(&args[1..]),
        Some("markdown") => return report::markdown(&args[1..]),
        Some("bench") => return bench(args.get(1).is_some_and(|a| a == "--quick")),
        // Only the container rows, with the release sluice already built.
        Some("containers") => {
            let sluice = target_dir().join("release/sluice");
            return docker::run(&sluice, args.get(1).is_some_and(|a| a == "--quick")).map(drop);
        }
        Some("upstream") => {
            let dir = std::env::temp_dir().join(format!("sluice-bench-upstream-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            pin_to_cpu(0)?;
            let upstream = tls::start_upstream(&dir, std::net::Ipv4Addr::LOCALHOST.into(), 64 << 20)?;
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

/// Percentiles the clients report (per mille), for the tables and the
/// latency distribution plots.
pub const QUANTILES: [(u32, &str); 9] = [
    (100, "p10"),
    (250, "p25"),
    (500, "p50"),
    (750, "p75"),
    (900, "p90"),
    (950, "p95"),
    (990, "p99"),
    (999, "p999"),
    (1000, "max"),
];

fn report(name: &str, times: &mut [Duration]) {
    times.sort();
    for (per_mille, label) in QUANTILES {
        let at = (times.len() * per_mille as usize / 1000).min(times.len() - 1);
        println!("{name}_{label}_us {:.2}", times[at].as_secs_f64() * 1e6);
    }
}
