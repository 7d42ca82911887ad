//! `cargo xtask fuzz [--seconds N] [TARGET...]`: runs the cargo-fuzz
//! targets in `fuzz/` (nightly) for a bounded time each, starting from the
//! committed corpus in `fuzz/corpus/TARGET/`. Installs cargo-fuzz first
//! when it is missing, with cargo's own progress on the terminal. A crash
//! leaves its input in `fuzz/artifacts/TARGET/`; copy it into the corpus
//! and the unit tests replay it from then on.

use std::path::Path;

use anyhow::{bail, Context as _};

/// Every target, in the order they run.
pub const TARGETS: [&str; 4] = ["classify", "dns_query", "profile", "path"];

pub fn run(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    for target in only {
        if !TARGETS.contains(&target.as_str()) {
            bail!("no fuzz target {target:?}; the targets are {}", TARGETS.join(", "));
        }
    }
    ensure_cargo_fuzz()?;
    let fuzz_dir = super::workspace_root().join("fuzz");
    let mut crashed = Vec::new();
    for target in TARGETS.iter().filter(|t| only.is_empty() || only.iter().any(|o| o == *t)) {
        super::step(&format!("fuzzing {target} for {seconds} s"));
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        // Fuzzing grows a working corpus; the committed one stays small.
        let work = super::workspace_root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        let status = std::process::Command::new("cargo")
            .current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", target])
            .arg(&work)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-timeout=10")
            .status()
            .context("running cargo fuzz")?;
        if !status.success() {
            crashed.push(*target);
        }
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets failed: {}; the inputs are in {}",
            crashed.join(", "),
            Path::new("fuzz/artifacts").display()
        );
    }
    super::step("no fuzz target found a crash");
    Ok(())
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = std::process::Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|output| output.status.success());
    if present {
        return Ok(());
    }
    super::step("installing cargo-fuzz (cargo install cargo-fuzz)");
    let status = std::process::Command::new("cargo")
        .args(["install", "cargo-fuzz"])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !status.success() {
        bail!("cargo install cargo-fuzz failed");
    }
    Ok(())
}
