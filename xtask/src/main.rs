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

/// The environment variable the test harness appends its skips to (see
/// `tests/harness/mod.rs`: one `<kind>\t<test>\t<reason>` line per skip).
const SKIP_REPORT_ENV: &str = "SLUICE_SKIP_REPORT";

/// Runs `cargo test`, passing its output through, and ends with one line
/// that totals every test binary's results. libtest counts a test that
/// skipped itself as passed; the harness's skip report says which did, so
/// they are counted as skipped, and under `CI=true` a test that skipped
/// because it needs root fails the run (CI runs as root and must run them
/// all).
fn run_tests(command: &mut Command) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let report = std::env::temp_dir().join(format!("sluice-skips-{}.tsv", std::process::id()));
    let _ = std::fs::remove_file(&report);
    command.env(SKIP_REPORT_ENV, &report);
    let mut child = command.stdout(std::process::Stdio::piped()).spawn().context("running cargo test")?;
    let mut totals = Totals::default();
    for line in std::io::BufReader::new(child.stdout.take().context("cargo test output")?).lines() {
        let line = line?;
        println!("{line}");
        totals.note(&line);
    }
    let status = child.wait()?;
    let skips = std::fs::read_to_string(&report).unwrap_or_default();
    let _ = std::fs::remove_file(&report);
    let skips = Skips::parse(&skips);
    for (kind, test, reason) in &skips.lines {
        println!("skipped ({kind}): {test}: {reason}");
    }
    println!("{}", totals.summary(&skips));
    if !status.success() {
        bail!("cargo test failed with {status}");
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if in_ci && skips.needs_root > 0 {
        bail!("{} tests that need root were skipped under CI=true; CI must run them all", skips.needs_root);
    }
    Ok(())
}

/// What libtest's result lines add up to.
#[derive(Debug, Default, PartialEq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
    binaries: u64,
    finished: u64,
}

impl Totals {
    fn note(&mut self, line: &str) {
        let trimmed = line.trim();
        if trimmed.starts_with("running ") && (trimmed.ends_with(" tests") || trimmed.ends_with(" test")) {
            self.binaries += 1;
        }
        if let Some(rest) = line.strip_prefix("test result: ") {
            self.finished += 1;
            let count = |word: &str| {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(word)?.trim().rsplit(' ').next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            self.passed += count("passed");
            self.failed += count("failed");
            self.ignored += count("ignored");
        }
    }

    /// The closing line: a skipped test is not a passed one.
    fn summary(&self, skips: &Skips) -> String {
        let skipped = skips.lines.len() as u64;
        let passed = self.passed.saturating_sub(skipped);
        let total = passed + self.failed + skipped + self.ignored;
        let mut line = format!(
            "tests: {total} total, {passed} passed, {} failed, {skipped} skipped ({} need root), {} ignored",
            self.failed, skips.needs_root, self.ignored
        );
        let crashed = self.binaries.saturating_sub(self.finished);
        if crashed > 0 {
            let _ = std::fmt::Write::write_fmt(
                &mut line,
                format_args!(", {crashed} test binaries ended without a result (crashed)"),
            );
        }
        line
    }
}

/// The harness's skip report.
#[derive(Debug, Default)]
struct Skips {
    /// (kind, test, reason) per skip.
    lines: Vec<(String, String, String)>,
    needs_root: u64,
}

impl Skips {
    fn parse(report: &str) -> Self {
        let mut skips = Self::default();
        for line in report.lines().filter(|l| !l.trim().is_empty()) {
            let mut fields = line.splitn(3, '\t');
            let kind = fields.next().unwrap_or_default().to_owned();
            let test = fields.next().unwrap_or_default().to_owned();
            let reason = fields.next().unwrap_or_default().to_owned();
            if kind == "needs-root" {
                skips.needs_root += 1;
            }
            skips.lines.push((kind, test, reason));
        }
        skips
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipped_tests_are_counted_apart_from_passed_ones() {
        let mut totals = Totals::default();
        for line in [
            "running 3 tests",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s",
            "running 2 tests",
            "test result: FAILED. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.1s",
            "running 1 test",
        ] {
            totals.note(line);
        }
        let skips = Skips::parse("needs-root\tallowed_host\tneeds root\nneeds-tool\tgit_clone\tneeds git\n");
        assert_eq!(skips.needs_root, 1);
        assert_eq!(
            totals.summary(&skips),
            "tests: 6 total, 2 passed, 1 failed, 2 skipped (1 need root), 1 ignored, \
             1 test binaries ended without a result (crashed)"
        );
        assert_eq!(
            Totals::default().summary(&Skips::parse("")),
            "tests: 0 total, 0 passed, 0 failed, 0 skipped (0 need root), 0 ignored"
        );
    }
}

/// Builds the sluice binary (release) and returns its path.
pub fn build_sluice() -> anyhow::Result<std::path::PathBuf> {
    step("building sluice (release)");
    run(cargo().args(["build", "--release", "--package", "sluice"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| workspace_root().join("target"), Into::into);
    Ok(target.join("release/sluice"))
}
