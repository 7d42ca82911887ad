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
    }
}
