//! The container address on the host's loopback interface.
//!
//! A container in a network namespace of its own cannot reach the host's
//! 127.0.0.1. An address on the host's `lo` is local to the host, so a
//! bridge-networked container reaches it through its default gateway and
//! the host delivers it locally: no forwarding, no NAT, and the proxy sees
//! the container's own address as the peer (which keeps flow keys apart
//! across namespaces).

use std::{net::Ipv4Addr, path::Path, process::Command};

use anyhow::{bail, Context as _};

const RECORD: &str = "container-address";

/// Puts `address/32` on `lo` (if it is not there yet) and records it under
/// `runtime_dir` so teardown can take it away again.
pub fn add(address: Ipv4Addr, runtime_dir: &Path) -> anyhow::Result<()> {
    if address.is_loopback() || address.is_unspecified() || address.is_multicast() || address.is_broadcast() {
        bail!("{address} cannot be a container address: use a unicast address outside 127.0.0.0/8");
    }
    let output = Command::new("ip")
        .args(["-4", "addr", "replace", &format!("{address}/32"), "dev", "lo"])
        .output()
        .context("running `ip` (iproute2)")?;
    if !output.status.success() {
        bail!("ip addr replace {address}/32 dev lo: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    std::fs::create_dir_all(runtime_dir)?;
    std::fs::write(runtime_dir.join(RECORD), address.to_string())?;
    Ok(())
}

/// Takes the recorded address off `lo`, if one was recorded.
pub fn remove_recorded(runtime_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(runtime_dir.join(RECORD)) else { return };
    let Ok(address) = text.trim().parse::<Ipv4Addr>() else { return };
    let _ = Command::new("ip").args(["-4", "addr", "del", &format!("{address}/32"), "dev", "lo"]).output();
    let _ = std::fs::remove_file(runtime_dir.join(RECORD));
}
