//! Installs what building and testing sluice needs on a fresh Debian 12
//! machine of the kind sluice targets, one visible step at a time. Each
//! step checks first, so a second run does nothing.

use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

use crate::{run as run_command, step};

/// LLVM major version bpf-linker is built against.
const LLVM: &str = "22";

pub fn run() -> anyhow::Result<()> {
    nightly_rust_src()?;
    apt_packages()?;
    bpf_linker()?;
    step("prerequisites are in place");
    Ok(())
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    if !succeeds("rustup", &["--version"]) {
        bail!("rustup is missing: sluice's kernel programs need rustup's nightly toolchain with rust-src");
    }
    if !succeeds("rustup", &["run", "nightly", "rustc", "--version"]) {
        bail!(
            "no nightly Rust toolchain is installed, and sluice's kernel programs need one \
             (install it with `rustup toolchain install nightly --component rust-src`)"
        );
    }
    let components =
        Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]).output()?;
    if String::from_utf8_lossy(&components.stdout).lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    step("installing rust-src for the nightly toolchain (kernel programs build core from source)");
    run_command(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// Debian packages: LLVM for bpf-linker; protoc for the containerd client's
/// generated code; iproute2, curl, python3 and dig for the tests' network
/// namespaces and clients; iptables for the REDIRECT path; docker.io and the
/// CNI plugins for container tests.
fn apt_packages() -> anyhow::Result<()> {
    let wanted = [
        (format!("llvm-{LLVM}-dev"), format!("/usr/lib/llvm-{LLVM}/bin/llvm-config")),
        // containerd-client's build script compiles containerd's API with it.
        ("protobuf-compiler".to_owned(), "/usr/bin/protoc".to_owned()),
        ("iproute2".to_owned(), "/usr/bin/ip".to_owned()),
        ("curl".to_owned(), "/usr/bin/curl".to_owned()),
        ("dnsutils".to_owned(), "/usr/bin/dig".to_owned()),
        ("python3".to_owned(), "/usr/bin/python3".to_owned()),
        // The tamper tests build their attacker static, and drop to an
        // ordinary user inside a sandbox with setpriv.
        ("gcc".to_owned(), "/usr/bin/gcc".to_owned()),
        ("libc6-dev".to_owned(), "/usr/lib/x86_64-linux-gnu/libc.a".to_owned()),
        ("util-linux".to_owned(), "/usr/bin/setpriv".to_owned()),
        // Container tests: a Docker engine (with containerd and runc) the
        // test harness starts itself.
        ("docker.io".to_owned(), "/usr/sbin/dockerd".to_owned()),
        ("iptables".to_owned(), "/usr/sbin/iptables".to_owned()),
        // containerd containers in network namespaces of their own.
        ("containernetworking-plugins".to_owned(), "/usr/lib/cni/bridge".to_owned()),
    ];
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, probe)| !std::path::Path::new(probe).exists())
        .map(|(package, _)| package.as_str())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !succeeds("apt-get", &["--version"]) {
        bail!("missing packages {missing:?} and no apt-get to install them: install them by hand");
    }
    step(&format!("installing Debian packages: {} (apt-get)", missing.join(" ")));
    run_command(Command::new("apt-get").arg("update"))?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("apt-get install failed (are you root?)")
}

fn bpf_linker() -> anyhow::Result<()> {
    if succeeds("bpf-linker", &["--version"]) {
        return Ok(());
    }
    step("building bpf-linker against LLVM 22 (cargo install, about 2 minutes)");
    let prefix = format!("/usr/lib/llvm-{LLVM}");
    run_command(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--locked", "--no-default-features", "--features", &format!("llvm-{LLVM}")])
            // Without LLVM_PREFIX its build script finds an older llvm-config first.
            .env(format!("LLVM_SYS_{LLVM}1_PREFIX"), &prefix)
            .env("LLVM_PREFIX", &prefix),
    )?;
    if !succeeds("bpf-linker", &["--version"]) {
        bail!("bpf-linker was installed but is not on PATH: add ~/.cargo/bin to PATH");
    }
    Ok(())
}
