//! The audit row of `cargo xtask bench`: what the hash chain and the signed
//! checkpoints cost per record, measured inside sluice (`sluice audit
//! bench`): serialising a request record alone (chain off), with the chain,
//! with the chain and a signed checkpoint every 1000 lines, one signature,
//! and records through the log's writer thread into a file (checkpoints
//! fsync it), unsigned and signed. `cargo xtask bench --only audit` runs
//! only this row.

use std::{path::Path, process::Command};

/// Records per measurement.
const RECORDS: usize = 200_000;
/// Target of issue 15: the audit's own cost per record.
const TARGET_NS: f64 = 2000.0;

/// Builds sluice (release) and prints the audit row alone.
pub fn run_only() -> anyhow::Result<()> {
    crate::step("building sluice (release)");
    crate::run(crate::cargo().args(["build", "--release", "--package", "sluice"]))?;
    print(&super::target_dir().join("release/sluice"));
    Ok(())
}

/// Prints the audit row; a failure to measure is said, not hidden.
pub fn print(sluice: &Path) {
    let output = Command::new(sluice).args(["audit", "bench", "--records", &RECORDS.to_string()]).output();
    let Some(text) =
        output.ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    else {
        println!("audit trail: unavailable (sluice audit bench failed)");
        return;
    };
    let value = |key: &str| -> f64 {
        text.lines().find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(f64::NAN)
    };
    let (off, chain, signed) = (value("audit_serialize_ns"), value("audit_chain_ns"), value("audit_chain_signed_ns"));
    let added = signed - off;
    let verdict = if added < TARGET_NS { "met" } else { "MISSED" };
    println!(
        "audit trail, per record ({RECORDS} records, one thread): serialise only (chain off) {off:.0} ns, \
         + SHA-256 chain {chain:.0} ns, + a signed checkpoint every 1000 lines {signed:.0} ns: \
         audit adds {added:.0} ns (target < 2 µs: {verdict}); one Ed25519 signature {:.1} µs",
        value("audit_sign_ns") / 1000.0
    );
    println!(
        "audit trail, through the writer thread into a file: chained, unsigned {:.0} records/s ({:.0} ns each) \
         vs signed with fsync per checkpoint {:.0} records/s ({:.0} ns each)",
        value("audit_file_unsigned_rps"),
        value("audit_file_unsigned_ns"),
        value("audit_file_signed_rps"),
        value("audit_file_signed_ns"),
    );
}
