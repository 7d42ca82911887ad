//! Hidden measurement commands used by `cargo xtask bench`.

use std::time::{Duration, Instant};

use clap::Subcommand;

use crate::tls::{LeafMinter, SandboxCa};

#[derive(Debug, Subcommand)]
pub enum DebugCommand {
    /// Time leaf minting: a new name each time (cold) against the cache.
    MintBench {
        #[arg(long, default_value_t = 300)]
        count: usize,
    },
    /// Time request decisions against profiles of 10, 1 000 and 10 000
    /// rules (exact hosts, subdomains, globs, networks, paths).
    PolicyBench {
        #[arg(long, default_value_t = 20_000)]
        count: usize,
    },
}

pub fn run(command: &DebugCommand) -> anyhow::Result<u8> {
    match command {
        DebugCommand::MintBench { count } => {
            let ca = std::sync::Arc::new(SandboxCa::generate("bench")?);
            let minter = LeafMinter::new(ca, count + 1)?;
            let mut cold = Vec::with_capacity(*count);
            for i in 0..*count {
                let name = format!("host-{i}.bench.test");
                let start = Instant::now();
                minter.leaf(&name)?;
                cold.push(start.elapsed());
            }
            let mut cached = Vec::with_capacity(*count);
            for _ in 0..*count {
                let start = Instant::now();
                minter.leaf("host-0.bench.test")?;
                cached.push(start.elapsed());
            }
            for (name, mut times) in [("mint_cold", cold), ("mint_cached", cached)] {
                times.sort();
                let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
                let us = |d: Duration| d.as_secs_f64() * 1e6;
                println!("{name}_p50_us {:.2}", us(at(0.5)));
                println!("{name}_p99_us {:.2}", us(at(0.99)));
            }
            Ok(0)
        }
        DebugCommand::PolicyBench { count } => {
            for rules in [10, 1_000, 10_000] {
                let mut times = policy_bench(rules, *count)?;
                times.sort();
                let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
                let ns = |d: Duration| d.as_secs_f64() * 1e9;
                println!("policy_{rules}_p50_ns {:.0}", ns(at(0.5)));
                println!("policy_{rules}_p99_ns {:.0}", ns(at(0.99)));
                println!("policy_{rules}_p999_ns {:.0}", ns(at(0.999)));
            }
            Ok(0)
        }
    }
}

/// Decision times for `count` requests against a profile of `rules` rules,
/// a quarter each of exact hosts with paths, subdomains, globs and networks;
/// the requests hit and miss every kind.
fn policy_bench(rules: usize, count: usize) -> anyhow::Result<Vec<Duration>> {
    use std::fmt::Write as _;

    use crate::policy::{ConnectQuery, Policy, RequestInfo, Scheme};

    let mut text = String::from("name = \"bench\"\n");
    for i in 0..rules {
        let body = match i % 4 {
            0 => format!("action = \"allow\"\nhosts = [\"h{i}.test\"]\nmethods = [\"GET\"]\npaths = [\"/api/**\"]"),
            1 => format!("action = \"allow\"\nhosts = [\"*.s{i}.test\"]"),
            2 => format!("action = \"deny\"\nhosts = [\"api-{i}-*.g.test\"]"),
            _ => format!("action = \"deny\"\nips = [\"10.{}.{}.0/24\"]\nports = [22]", (i / 256) % 256, i % 256),
        };
        writeln!(text, "[[rule]]\nname = \"r{i}\"\n{body}")?;
    }
    let policy = Policy::compile(&crate::policy::parse_profile(&text, "bench")?)?;
    let hosts: Vec<String> = (0..64)
        .map(|k| {
            let i = (k * 7919) % rules.max(1);
            match k % 5 {
                0 => format!("h{i}.test"),
                1 => format!("x.s{i}.test"),
                2 => format!("api-{i}-v2.g.test"),
                3 => format!("unknown-{k}.example"),
                _ => format!("deep.a.b.s{i}.test"),
            }
        })
        .collect();
    let mut times = Vec::with_capacity(count);
    for n in 0..count {
        let host = &hosts[n % hosts.len()];
        let ip = std::net::IpAddr::from([10, (n % 40) as u8, (n % 256) as u8, 9]);
        let query = ConnectQuery { host: Some(host), ip, port: if n % 3 == 0 { 22 } else { 443 } };
        let request = RequestInfo::simple("GET", "/api/v1/items", Scheme::Https);
        let start = Instant::now();
        let decision = policy.evaluate_request(&query, &request);
        times.push(start.elapsed());
        std::hint::black_box(decision);
    }
    Ok(times)
}
