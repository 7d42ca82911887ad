//! The bench's output: a table with sluice's ratios to direct and to each
//! peer, targets (reported, never asserted), the results JSON and the plots.
//!
//! Each cell is the median over the rounds with [min-max]. Two results whose
//! ranges overlap are a tie: the difference is within the run's own noise.

use std::{fmt::Write as _, path::Path};

use serde_json::json;

use super::{num, stats, Measured, Sample, CONFIGS, CONNS};

/// One table row: key in the client's output, label, unit, whether higher is better.
pub struct Row {
    pub key: String,
    pub label: String,
    pub unit: &'static str,
    pub higher_is_better: bool,
}

fn row(key: &str, label: &str, unit: &'static str, higher_is_better: bool) -> Row {
    Row { key: key.to_owned(), label: label.to_owned(), unit, higher_is_better }
}

/// The rows for one protocol.
pub fn rows(proto: &str, big_mib: u64) -> Vec<Row> {
    match proto {
        "tcp" => vec![
            row("connect_p50_us", "connect() p50", "µs", false),
            row("connect_p99_us", "connect() p99", "µs", false),
            row("rtt_p50_us", "kept round trip p50", "µs", false),
            row("rtt_p99_us", "kept round trip p99", "µs", false),
            row("rtt_p999_us", "kept round trip p99.9", "µs", false),
            row("bulk_mb_s", "bulk upload", "MB/s", true),
        ],
        "dns" => vec![row("dns_p50_us", "A query p50", "µs", false), row("dns_p99_us", "A query p99", "µs", false)],
        _ => {
            let mut rows = vec![
                row("kept_p50_us", "kept conn p50", "µs", false),
                row("kept_p99_us", "kept conn p99", "µs", false),
                row("kept_p999_us", "kept conn p99.9", "µs", false),
            ];
            if proto != "http" {
                rows.push(row("new_p50_us", "new conn+handshake p50", "µs", false));
                rows.push(row("new_p99_us", "new conn+handshake p99", "µs", false));
            }
            for conns in CONNS {
                rows.push(row(&format!("rps_{conns}"), &format!("req/s, {conns} conn"), "req/s", true));
            }
            rows.push(row("cpu_us_per_req_32", "proxy CPU per req (32 conn)", "µs", false));
            rows.push(row("rss_load_kb_256", "proxy RSS, 256 conn", "KiB", false));
            rows.push(row("bulk_mb_s", &format!("GET {big_mib} MiB"), "MB/s", true));
            rows
        }
    }
}

fn title(proto: &str) -> &'static str {
    match proto {
        "tcp" => "TCP (transparent configurations only)",
        "http" => "plain HTTP/1.1",
        "h1" => "HTTPS, intercepted, HTTP/1.1",
        "h2" => "HTTPS, intercepted, HTTP/2",
        _ => "DNS (sluice's resolver vs the server itself)",
    }
}

pub type Stat = (f64, f64, f64);

fn get(m: &Measured, proto: &str, config: &str, key: &str) -> Option<Stat> {
    m.samples.get(&(proto_static(proto), config_static(config))).and_then(|s: &Vec<Sample>| stats(s, key))
}

fn proto_static(proto: &str) -> &'static str {
    super::PROTOCOLS.into_iter().find(|p| *p == proto).unwrap_or("")
}

fn config_static(config: &str) -> &'static str {
    CONFIGS.into_iter().find(|c| *c == config).unwrap_or("")
}

/// Whether two results' ranges overlap.
pub fn tie(a: Stat, b: Stat) -> bool {
    a.1 <= b.2 && b.1 <= a.2
}

/// How sluice compares with `other` on a row: e.g. "3.1x better", "tie".
fn versus(row: &Row, sluice: Stat, other: Stat) -> String {
    if tie(sluice, other) {
        return "tie".into();
    }
    let factor = if row.higher_is_better { sluice.0 / other.0 } else { other.0 / sluice.0 };
    if factor >= 1.0 {
        format!("{factor:.2}x better")
    } else {
        format!("{:.2}x worse", 1.0 / factor)
    }
}

fn cell(stat: Option<Stat>) -> String {
    match stat {
        Some((median, min, max)) => format!("{} [{}-{}]", num(median), num(min), num(max)),
        None => "-".into(),
    }
}

pub fn print(m: &Measured) {
    println!();
    println!(
        "sluice bench: {} interleaved rounds, median [min-max]; kernel {}; upstreams, sluice and peers on CPU 0, \
         client on CPU 1; load average before {} after {}",
        m.sizes.rounds,
        super::kernel(),
        m.load[0],
        m.load[1]
    );
    println!(
        "configurations: direct; sluice = eBPF redirection (sluice run); iptables = the same daemon reached through \
         iptables REDIRECT from a network namespace (crosses a veth); mitmproxy {}; squid {} (ssl-bump)",
        m.versions.get("mitmproxy").map_or("", String::as_str),
        m.versions.get("squid").map_or("", String::as_str)
    );
    for proto in super::PROTOCOLS {
        println!();
        println!("{}", title(proto));
        let mut header = format!("{:<30}", "measure");
        for config in CONFIGS {
            let _ = write!(header, " {config:>22}");
        }
        println!("{header}   sluice vs direct; vs iptables, mitmproxy, squid");
        for row in rows(proto, m.sizes.big_mib) {
            let values: Vec<Option<Stat>> = CONFIGS.iter().map(|c| get(m, proto, c, &row.key)).collect();
            if values.iter().all(Option::is_none) {
                continue;
            }
            let mut line = format!("{:<30}", format!("{} ({})", row.label, row.unit));
            for value in &values {
                let _ = write!(line, " {:>22}", cell(*value));
            }
            let mut compare = Vec::new();
            if let (Some(d), Some(s)) = (values[0], values[1]) {
                let delta = if row.higher_is_better {
                    format!("{:.0}% of direct", 100.0 * s.0 / d.0)
                } else {
                    format!("{:+.1} {}", s.0 - d.0, row.unit)
                };
                compare.push(if tie(d, s) { format!("{delta} (tie)") } else { delta });
            }
            if let Some(s) = values[1] {
                for (config, other) in CONFIGS.iter().zip(&values).skip(2) {
                    if let Some(other) = other {
                        compare.push(format!("{config}: {}", versus(&row, s, *other)));
                    }
                }
            }
            println!("{line}   {}", compare.join("; "));
        }
    }
    println!();
    for (config, why) in &m.unavailable {
        println!("{config} unavailable: {why}");
    }
    print_memory(m);
    println!("targets (medians; reported, not asserted):");
    for target in targets(m) {
        println!(
            "  {:<62} {}",
            target["target"].as_str().unwrap_or_default(),
            target["shown"].as_str().unwrap_or_default()
        );
    }
    println!(
        "notes: kept = up to {} sequential GETs of 64 bytes on one connection; new = up to {} times TCP connect + full \
         TLS handshake (no resumption) + one GET; each stops after {} s. Proxy CPU and memory are read from /proc for \
         the proxy's processes (sluice's daemon serves both sluice and iptables). Explicit proxies are reached with \
         CONNECT ADDR:PORT and SNI bench.test and verify the upstream against the bench CA.",
        m.sizes.kept, m.sizes.new, m.sizes.cap_secs
    );
    eprintln!("(measured in {:.0} s)", m.seconds);
}

fn print_memory(m: &Measured) {
    for (config, memory) in &m.memory {
        let idle = memory["idle_kb"].as_u64().map_or("-".into(), |kb| format!("{:.1} MiB", kb as f64 / 1024.0));
        let held = &memory["idle_connections"];
        let per = held["kb_per_connection"].as_f64().map_or("-".into(), |kb| {
            format!(
                "{kb:.1} KiB per idle HTTPS connection ({} held, {:.1} MiB)",
                held["opened"],
                held["rss_held_kb"].as_f64().unwrap_or(0.0) / 1024.0
            )
        });
        println!("memory {config:<10} idle after start {idle}; {per}");
    }
}

/// Each target, met or missed; also for the JSON.
pub fn targets(m: &Measured) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut add = |target: String, met: Option<bool>, shown: String| {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        out.push(json!({ "target": target, "met": met, "shown": format!("{verdict} ({shown})") }));
    };
    for proto in ["h1", "h2"] {
        let (d, s) = (get(m, proto, "direct", "kept_p50_us"), get(m, proto, "sluice", "kept_p50_us"));
        let target = format!("HTTPS {proto} kept p50: sluice adds < 100 µs");
        match (d, s) {
            (Some(d), Some(s)) => add(target, Some(s.0 - d.0 < 100.0), format!("{:+.1} µs", s.0 - d.0)),
            _ => add(target, None, "not measured".into()),
        }
    }
    for (peer, factor, protos) in [("mitmproxy", 5.0, &["h1", "h2"][..]), ("squid", 1.0, &["h1"][..])] {
        for proto in protos {
            for (key, what) in [("rps_32", "req/s (32 conn)"), ("bulk_mb_s", "MB/s")] {
                let target = format!("HTTPS {proto} {what}: sluice >= {factor}x {peer}");
                match (get(m, proto, "sluice", key), get(m, proto, peer, key)) {
                    (Some(s), Some(p)) => add(target, Some(s.0 >= factor * p.0), format!("{:.1}x", s.0 / p.0)),
                    _ => add(target, None, format!("{peer} unavailable")),
                }
            }
        }
    }
    let ebpf_vs_iptables = [
        ("tcp", "rtt_p50_us", false),
        ("tcp", "bulk_mb_s", true),
        ("http", "kept_p50_us", false),
        ("h1", "kept_p50_us", false),
        ("http", "rps_32", true),
        ("h1", "rps_32", true),
        ("h2", "rps_32", true),
    ];
    for (proto, key, higher) in ebpf_vs_iptables {
        let target = format!("eBPF no slower than iptables: {proto} {key}");
        match (get(m, proto, "sluice", key), get(m, proto, "iptables", key)) {
            (Some(s), Some(i)) => {
                let better = if higher { s.0 >= i.0 } else { s.0 <= i.0 };
                let tied = tie(s, i);
                let shown = format!("{} vs {}{}", num(s.0), num(i.0), if tied { ", tie" } else { "" });
                add(target, Some(better || tied), shown);
            }
            _ => add(target, None, "not measured".into()),
        }
    }
    let sluice = m.memory.get("sluice");
    let idle = sluice.and_then(|s| s["idle_kb"].as_f64());
    add(
        "sluice idle RSS < 30 MB".into(),
        idle.map(|kb| kb * 1024.0 < 30e6),
        idle.map_or("not measured".into(), |kb| format!("{:.1} MB", kb * 1024.0 / 1e6)),
    );
    let per = sluice.and_then(|s| s["idle_connections"]["kb_per_connection"].as_f64());
    add(
        "sluice < 10 KB per idle connection".into(),
        per.map(|kb| kb * 1024.0 < 10e3),
        per.map_or("not measured".into(), |kb| format!("{:.1} KB", kb * 1024.0 / 1e3)),
    );
    out
}

pub fn json(m: &Measured) -> anyhow::Result<serde_json::Value> {
    let mut summary = Vec::new();
    for proto in super::PROTOCOLS {
        for row in rows(proto, m.sizes.big_mib) {
            let per_config: serde_json::Map<String, serde_json::Value> = CONFIGS
                .iter()
                .filter_map(|c| {
                    get(m, proto, c, &row.key)
                        .map(|(median, min, max)| (c.to_string(), json!({"median": median, "min": min, "max": max})))
                })
                .collect();
            if !per_config.is_empty() {
                summary.push(json!({"protocol": proto, "measure": row.key, "unit": row.unit, "results": per_config}));
            }
        }
    }
    let samples: serde_json::Map<String, serde_json::Value> = super::PROTOCOLS
        .iter()
        .map(|proto| {
            let per_config: serde_json::Map<String, serde_json::Value> = CONFIGS
                .iter()
                .filter_map(|c| m.samples.get(&(*proto, *c)).map(|s| (c.to_string(), json!(s))))
                .collect();
            (proto.to_string(), json!(per_config))
        })
        .collect();
    let s = &m.sizes;
    Ok(json!({
        "time_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        "quick": m.quick,
        "rounds": s.rounds,
        "seconds": m.seconds,
        "machine": super::machine(),
        "load_average_before_and_after": m.load,
        "pinning": "upstreams, sluice's daemon, mitmproxy and Squid on CPU 0; the client on CPU 1",
        "sluice": { "commit": super::git(&["rev-parse", "HEAD"]), "uncommitted_changes": !super::git(&["status", "--porcelain"]).is_empty() },
        "configurations": {
            "direct": "the client talks to the upstream itself",
            "sluice": "sluice run: eBPF redirection to the daemon's proxy",
            "iptables": "client in a network namespace; iptables nat PREROUTING REDIRECT on the host side of its veth to the same daemon's --redirect-listener",
            "mitmproxy": { "version": m.versions.get("mitmproxy"), "options": super::mitm::options(Path::new("BENCH-CA.pem")) },
            "squid": { "version": m.versions.get("squid"), "config": super::squid::config("ADDR:PORT".parse().unwrap_or_else(|_| ([127, 0, 0, 1], 0).into()), Path::new("DIR"), Path::new("SQUID-CA.pem"), Path::new("BENCH-CA.pem")) },
        },
        "unavailable": m.unavailable,
        "parameters": {
            "tcp": { "connects": s.connects, "round_trips": s.round_trips, "bulk_upload_mb": s.bulk_mb },
            "http": {
                "kept_requests": s.kept, "new_connections": s.new, "kept_and_new_stop_after_seconds": s.cap_secs,
                "new_connection": "TCP connect + (CONNECT for explicit proxies) + full TLS handshake, no resumption + GET /small",
                "rps_connections": CONNS, "rps_seconds": s.rps_secs, "small_body_bytes": 64, "big_body_mib": s.big_mib,
                "server_name": super::tls::SERVER_NAME,
            },
            "dns_queries": s.dns,
            "idle_connections_wanted": s.idle,
        },
        "memory": m.memory,
        "summary": summary,
        "targets": targets(m),
        "samples": samples,
    }))
}

/// Samples by (protocol, configuration).
pub type Samples = std::collections::BTreeMap<(&'static str, &'static str), Vec<Sample>>;

/// One colour per configuration, in [`CONFIGS`] order.
const COLOURS: [plotters::style::RGBColor; 5] = [
    plotters::style::RGBColor(90, 90, 90),
    plotters::style::RGBColor(31, 119, 180),
    plotters::style::RGBColor(44, 160, 44),
    plotters::style::RGBColor(255, 127, 14),
    plotters::style::RGBColor(214, 39, 40),
];

/// Writes the plots (SVG) into `dir`; returns their paths.
pub fn plots(samples: &Samples, dir: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let latency = dir.join("latency-kept.svg");
    plot_latency(samples, &latency)?;
    let throughput = dir.join("throughput.svg");
    plot_throughput(samples, &throughput)?;
    Ok(vec![latency, throughput])
}

fn median(samples: &Samples, proto: &'static str, config: &'static str, key: &str) -> Option<f64> {
    samples.get(&(proto, config)).and_then(|s| stats(s, key)).map(|s| s.0)
}

/// Kept-connection request latency at each percentile (medians over the
/// rounds), one panel per protocol, one line per configuration.
fn plot_latency(samples: &Samples, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let quantiles: Vec<&str> = super::QUANTILES.iter().map(|(_, label)| *label).filter(|l| *l != "max").collect();
    let root = SVGBackend::new(path, (1500, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    for (panel, proto) in panels.iter().zip(["http", "h1", "h2"]) {
        let lines: Vec<(usize, Vec<(usize, f64)>)> = CONFIGS
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let points = quantiles
                    .iter()
                    .enumerate()
                    .filter_map(|(x, q)| median(samples, proto, config, &format!("kept_{q}_us")).map(|y| (x, y)))
                    .collect();
                (i, points)
            })
            .filter(|(_, points): &(usize, Vec<(usize, f64)>)| !points.is_empty())
            .collect();
        let values = lines.iter().flat_map(|(_, p)| p.iter().map(|(_, y)| *y));
        let (low, high) = values.fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
        if lines.is_empty() {
            continue;
        }
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{}: request on a kept connection", title(proto)), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0usize..quantiles.len() - 1, (low * 0.8..high * 1.25).log_scale())?;
        chart
            .configure_mesh()
            .x_labels(quantiles.len())
            .x_label_formatter(&|x| quantiles.get(*x).map_or(String::new(), |q| (*q).to_owned()))
            .y_desc("µs (log)")
            .draw()?;
        for (i, points) in lines {
            let colour = COLOURS[i];
            chart
                .draw_series(LineSeries::new(points, colour.stroke_width(2)))?
                .label(CONFIGS[i])
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperLeft).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

/// Requests/s at 1, 32 and 256 connections and MB/s for the large body,
/// one bar per configuration in each protocol's group (medians over the
/// rounds; the whisker is the rounds' range).
fn plot_throughput(samples: &Samples, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let protos = ["http", "h1", "h2"];
    let root = SVGBackend::new(path, (1400, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let measures = [
        ("rps_1", "req/s, 1 connection"),
        ("rps_32", "req/s, 32 connections"),
        ("rps_256", "req/s, 256 connections"),
        ("bulk_mb_s", "MB/s, large body"),
    ];
    for (panel, (key, what)) in root.split_evenly((2, 2)).iter().zip(measures) {
        let width = CONFIGS.len() + 1;
        let bars: Vec<(usize, usize, (f64, f64, f64))> = protos
            .iter()
            .enumerate()
            .flat_map(|(g, proto)| {
                CONFIGS.iter().enumerate().filter_map(move |(i, config)| {
                    samples.get(&(*proto, *config)).and_then(|s| stats(s, key)).map(|stat| (g * width + i, i, stat))
                })
            })
            .collect();
        let top = bars.iter().map(|(_, _, s)| s.2).fold(1.0, f64::max) * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(what, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0..(protos.len() * width), 0.0..top)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(protos.len() * width)
            .x_label_formatter(&|x| {
                if x % width == CONFIGS.len() / 2 {
                    protos.get(x / width).map_or("", |p| title(p)).to_owned()
                } else {
                    String::new()
                }
            })
            .draw()?;
        for (x, i, (median, min, max)) in bars {
            chart.draw_series(std::iter::once(Rectangle::new([(x, 0.0), (x + 1, median)], COLOURS[i].filled())))?;
            chart.draw_series(std::iter::once(PathElement::new(vec![(x, min), (x, max)], BLACK.stroke_width(1))))?;
        }
        for (i, config) in CONFIGS.iter().enumerate() {
            let colour = COLOURS[i];
            chart
                .draw_series(std::iter::empty::<Rectangle<(usize, f64)>>())?
                .label(*config)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
        }
        chart.configure_series_labels().position(SeriesLabelPosition::UpperRight).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

/// `bench-client plot RESULTS.json DIR`: the plots again from a results file.
pub fn replot(args: &[String]) -> anyhow::Result<()> {
    let [file, dir] = args else { anyhow::bail!("usage: bench-client plot RESULTS.json DIR") };
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file)?)?;
    let mut samples = Samples::new();
    for proto in super::PROTOCOLS {
        for config in CONFIGS {
            if let Some(list) = results["samples"][proto][config].as_array() {
                let parsed: Vec<Sample> = list.iter().filter_map(|s| serde_json::from_value(s.clone()).ok()).collect();
                samples.insert((proto, config), parsed);
            }
        }
    }
    for plot in plots(&samples, Path::new(dir))? {
        println!("plot: {}", plot.display());
    }
    Ok(())
}

/// `bench-client markdown RESULTS.json`: the README's table (medians; the
/// last column compares sluice with direct and the peers).
pub fn markdown(args: &[String]) -> anyhow::Result<()> {
    let [file] = args else { anyhow::bail!("usage: bench-client markdown RESULTS.json") };
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file)?)?;
    let big = results["parameters"]["http"]["big_body_mib"].as_u64().unwrap_or(64);
    println!("| measure | {} | sluice vs direct / iptables / mitmproxy / squid |", CONFIGS.join(" | "));
    println!("|---|{}---|", "---|".repeat(CONFIGS.len()));
    let summary = results["summary"].as_array().cloned().unwrap_or_default();
    for proto in super::PROTOCOLS {
        for row in rows(proto, big) {
            let Some(entry) = summary.iter().find(|e| e["protocol"] == proto && e["measure"] == row.key.as_str())
            else {
                continue;
            };
            let stat = |config: &str| {
                let r = &entry["results"][config];
                Some((r["median"].as_f64()?, r["min"].as_f64()?, r["max"].as_f64()?))
            };
            let cells: Vec<String> = CONFIGS.iter().map(|c| stat(c).map_or(String::new(), |s| num(s.0))).collect();
            let mut compare = Vec::new();
            if let (Some(d), Some(s)) = (stat("direct"), stat("sluice")) {
                let delta = if row.higher_is_better {
                    format!("{:.0} % of direct", 100.0 * s.0 / d.0)
                } else {
                    format!("{:+.1} {}", s.0 - d.0, row.unit)
                };
                compare.push(if tie(d, s) { format!("{delta} (tie)") } else { delta });
            }
            if let Some(s) = stat("sluice") {
                for config in &CONFIGS[2..] {
                    if let Some(other) = stat(config) {
                        compare.push(format!("{config} {}", versus(&row, s, other)));
                    }
                }
            }
            println!(
                "| {} {} ({}) | {} | {} |",
                label(proto),
                row.label,
                row.unit,
                cells.join(" | "),
                compare.join(", ")
            );
        }
    }
    let memory = &results["memory"];
    let idle: Vec<String> = CONFIGS
        .iter()
        .map(|c| memory[c]["idle_kb"].as_f64().map_or(String::new(), |kb| format!("{:.1}", kb / 1024.0)))
        .collect();
    println!("| proxy RSS idle after start (MiB) | {} | |", idle.join(" | "));
    let per: Vec<String> = CONFIGS
        .iter()
        .map(|c| {
            let held = &memory[c]["idle_connections"];
            held["kb_per_connection"].as_f64().map_or(String::new(), |kb| format!("{kb:.1} ({} held)", held["opened"]))
        })
        .collect();
    println!("| proxy RSS per idle HTTPS connection (KiB) | {} | |", per.join(" | "));
    println!();
    println!("Targets (reported, not asserted):");
    println!();
    for target in results["targets"].as_array().into_iter().flatten() {
        let (what, shown) =
            (target["target"].as_str().unwrap_or_default(), target["shown"].as_str().unwrap_or_default());
        println!("- {what}: {shown}");
    }
    Ok(())
}

fn label(proto: &str) -> &'static str {
    match proto {
        "tcp" => "TCP",
        "http" => "HTTP",
        "h1" => "HTTPS h1",
        "h2" => "HTTPS h2",
        _ => "DNS",
    }
}
