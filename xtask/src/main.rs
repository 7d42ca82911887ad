//! `cargo xtask`: what a developer (or CI) runs, from a fresh machine on.
//!
//! - `setup`: installs what is missing (nightly rust-src, LLVM 22,
//!   bpf-linker, test tools), showing each step.
//! - `test`: setup, then build everything and run every test.
//! - `demo`: setup, build, and run a sandboxed command against a small
//!   stand-in internet in a network namespace, under the built-in profile.
//! - `bench`: sluice's overhead against direct connections, iptables
//!   redirection, mitmproxy and Squid (see bench.rs).
//! - `fuzz`: the parsers' fuzz targets, each for a bounded time (see fuzz.rs).

mod bench;
mod demo;
mod fuzz;
mod setup;

use std::process::Command;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites.
    Setup,
    /// Install prerequisites, build, and run every test (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Show sluice confining a command: allowed and denied traffic, with reasons.
    Demo,
    /// Measure sluice against direct connections, iptables redirection, mitmproxy and Squid.
    Bench {
        /// A shorter run.
        #[arg(long)]
        quick: bool,
        /// Only one part: `audit` (the audit trail's cost per record).
        #[arg(long, value_parser = ["audit"])]
        only: Option<String>,
    },
    /// Fuzz the parsers (ClientHello/HTTP classification, DNS, profiles,
    /// paths) with cargo-fuzz on nightly, each target for a bounded time.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
    /// The benchmark's client, run directly and inside a sandbox.
    #[command(hide = true)]
    BenchClient {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Test { args } => {
            setup::run()?;
            step("building and running every test");
            let mut cargo = cargo();
            // Every test binary runs even when one fails, so one failure
            // does not hide another.
            cargo.args(["test", "--workspace", "--release", "--no-fail-fast"]).args(&args);
            run_tests(&mut cargo)
        }
        Task::Demo => {
            setup::run()?;
            demo::run()
        }
        Task::Bench { only: Some(_), .. } => bench::audit::run_only(),
        Task::Bench { quick, only: None } => {
            setup::run()?;
            bench::run(quick)
        }
        Task::Fuzz { seconds, targets } => fuzz::run(seconds, &targets),
        Task::BenchClient { args } => bench::client(&args),
    }
}

pub fn step(what: &str) {
    eprintln!("\x1b[1m[xtask]\x1b[0m {what}");
}

pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_owned()
}

pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// Runs `cargo test`, passing its output through, and ends with one line
/// that totals every test binary's results.
fn run_tests(command: &mut Command) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let mut child = command.stdout(std::process::Stdio::piped()).spawn().context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    let (mut binaries, mut finished) = (0u64, 0u64);
    for line in std::io::BufReader::new(child.stdout.take().context("cargo test output")?).lines() {
        let line = line?;
        println!("{line}");
        let trimmed = line.trim();
        if trimmed.starts_with("running ") && (trimmed.ends_with(" tests") || trimmed.ends_with(" test")) {
            binaries += 1;
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            finished += 1;
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            passed += count("passed");
            failed += count("failed");
        }
    }
    let status = child.wait()?;
    let crashed = binaries.saturating_sub(finished);
    if crashed > 0 {
        println!("tests: {passed} passed, {failed} failed, {crashed} test binaries ended without a result (crashed)");
    } else {
        println!("tests: {passed} passed, {failed} failed");
    }
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    Ok(())
}

/// Builds the sluice binary (release) and returns its path.
pub fn build_sluice() -> anyhow::Result<std::path::PathBuf> {
    step("building sluice (release)");
    run(cargo().args(["build", "--release", "--package", "sluice"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), Into::into);
    Ok(target.join("release/sluice"))
}
