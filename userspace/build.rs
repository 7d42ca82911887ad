//! Builds sluice's kernel programs (`ebpf/sluice-ebpf`) for the BPF target
//! with the nightly toolchain and bpf-linker, and leaves the object in
//! `OUT_DIR` for `include_bytes!`. The kernel crate is a workspace of its own,
//! so this runs a separate cargo with a clean environment.
use std::{env, path::PathBuf, process::Command};

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let ebpf_dir = manifest_dir.join("../ebpf/sluice-ebpf");
    let common_dir = manifest_dir.join("../ebpf/sluice-common");
    for path in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        ebpf_dir.join(".cargo/config.toml"),
        common_dir.join("src"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target_dir = out_dir.join("ebpf-target");

    assert!(
        Command::new("bpf-linker").arg("--version").output().is_ok(),
        "bpf-linker is not installed, so sluice's kernel programs cannot be built.\n\
         Run `cargo xtask setup` (it installs LLVM 22, bpf-linker and nightly rust-src)."
    );

    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", "nightly", "cargo", "build", "--release", "--locked"])
        .current_dir(&ebpf_dir)
        .env("CARGO_TARGET_DIR", &target_dir);
    // The outer build's settings are for the host target; none may leak into
    // the BPF build.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_BUILD_TARGET",
        "CARGO_MAKEFLAGS",
        "CARGO",
    ] {
        cargo.env_remove(var);
    }
    for (key, _) in env::vars_os() {
        if key.to_string_lossy().starts_with("CARGO_FEATURE_") || key.to_string_lossy().starts_with("CARGO_CFG_") {
            cargo.env_remove(key);
        }
    }
    let status = cargo.status().unwrap_or_else(|error| {
        panic!(
            "could not run `rustup run nightly cargo` to build the kernel programs: {error}. Run `cargo xtask setup`."
        )
    });
    assert!(
        status.success(),
        "building the kernel programs failed (see above). If the nightly toolchain lacks rust-src, run `cargo xtask setup`."
    );
    let object = target_dir.join("bpfel-unknown-none/release/sluice");
    std::fs::copy(&object, out_dir.join("sluice.bpf.o"))
        .unwrap_or_else(|error| panic!("kernel object {} missing: {error}", object.display()));
}
