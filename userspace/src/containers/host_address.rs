//! The container addresses on the host's loopback interface.
//!
//! A container in a network namespace of its own cannot reach the host's
//! 127.0.0.1 or `::1`. An address on the host's `lo` is local to the host, so
//! a bridge-networked container reaches it through its default gateway and
//! the host delivers it locally: no forwarding, no NAT, and the proxy sees
//! the container's own address as the peer (which keeps flow keys apart
//! across namespaces). One IPv4 address, and optionally one IPv6 address for
//! containers whose sockets or networks are IPv6-only.

use std::{net::IpAddr, path::Path, process::Command};

use anyhow::{bail, Context as _};

const RECORD: &str = "container-address";

/// Puts `address` (as a /32 or /128) on `lo` if it is not there yet, and
/// records it under `runtime_dir` so teardown can take it away again.
pub fn add(address: IpAddr, runtime_dir: &Path) -> anyhow::Result<()> {
    let usable = match address {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => {
            !(v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || v6.to_ipv4_mapped().is_some())
        }
    };
    if !usable {
        bail!("{address} cannot be a container address: use a unicast address off the loopback ranges");
    }
    let mut ip = Command::new("ip");
    match address {
        IpAddr::V4(_) => ip.args(["-4", "addr", "replace", &format!("{address}/32"), "dev", "lo"]),
        // No duplicate address detection: the address must be usable at once.
        IpAddr::V6(_) => ip.args(["-6", "addr", "replace", &format!("{address}/128"), "dev", "lo", "nodad"]),
    };
    let output = ip.output().context("running `ip` (iproute2)")?;
    if !output.status.success() {
        bail!("ip addr replace {address} dev lo: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    std::fs::create_dir_all(runtime_dir)?;
    let record = runtime_dir.join(RECORD);
    let mut recorded = std::fs::read_to_string(&record).unwrap_or_default();
    if !recorded.lines().any(|line| line.trim() == address.to_string()) {
        recorded.push_str(&address.to_string());
        recorded.push('\n');
        std::fs::write(record, recorded)?;
    }
    Ok(())
}

/// Takes the recorded addresses off `lo`.
pub fn remove_recorded(runtime_dir: &Path) {
    let Ok(text) = std::fs::read_to_string(runtime_dir.join(RECORD)) else { return };
    for address in text.lines().filter_map(|line| line.trim().parse::<IpAddr>().ok()) {
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        let _ = Command::new("ip").args(["addr", "del", &format!("{address}/{prefix}"), "dev", "lo"]).output();
    }
    let _ = std::fs::remove_file(runtime_dir.join(RECORD));
}
