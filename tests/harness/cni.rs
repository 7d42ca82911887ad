//! A CNI bridge network of the test's own for containerd containers: a
//! conflist in the test's directory, Debian's plugins run on it the way
//! `ctr run --cni` or a CRI runtime runs them, one network namespace per
//! container, everything removed on drop.
//!
//! Network rules: the bridge gets a gateway address on a subnet of its
//! own (10.232.N.0/24 beside the test network 10.231.N.0/24, so it is as
//! unique as that one) and the containers one route, to the daemon's
//! container address through it. No masquerading and no forwarding (the
//! plugin is told the bridge is not a gateway, so it leaves `ip_forward`
//! alone; the harness puts the gateway address on itself): containers
//! reach the host's own addresses only, that is sluice.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
};

/// Where Debian's containernetworking-plugins puts the plugins.
pub const PLUGINS: &str = "/usr/lib/cni";

pub struct CniNetwork {
    dir: PathBuf,
    conflist: PathBuf,
    bridge: String,
    gateway: Ipv4Addr,
    /// Container id and network namespace name of each attachment.
    attached: Mutex<Vec<(String, String)>>,
}

/// Whether CNI tests can run here; prints why not.
pub fn available() -> bool {
    let bridge = Path::new(PLUGINS).join("bridge");
    if !bridge.exists() {
        eprintln!("SKIPPED: needs {} (`cargo xtask setup` installs containernetworking-plugins)", bridge.display());
        return false;
    }
    true
}

impl CniNetwork {
    /// A bridge network under `dir`, beside test network `net`, whose
    /// containers route to `reach`.
    pub fn new(dir: &Path, net: &super::TestNet, reach: Ipv4Addr) -> Self {
        let n = net.n;
        let dir = dir.join("cni");
        std::fs::create_dir_all(&dir).unwrap();
        let bridge = format!("slcni{n}");
        let gateway = Ipv4Addr::new(10, 232, u8::try_from(n).unwrap(), 1);
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("sluice-test-{n}"),
            "plugins": [{
                "type": "bridge",
                "bridge": bridge,
                "isGateway": false,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.join("ipam"),
                    "ranges": [[{
                        "subnet": format!("10.232.{n}.0/24"),
                        "rangeStart": format!("10.232.{n}.10"),
                        "rangeEnd": format!("10.232.{n}.200"),
                        "gateway": gateway.to_string(),
                    }]],
                    "routes": [{ "dst": format!("{reach}/32") }],
                },
            }],
        });
        let path = dir.join("sluice-test.conflist");
        std::fs::write(&path, serde_json::to_vec_pretty(&conflist).unwrap()).unwrap();
        let _ = Command::new("ip").args(["link", "del", &bridge]).stderr(Stdio::null()).status();
        Self { dir, conflist: path, bridge, gateway, attached: Mutex::new(Vec::new()) }
    }

    /// A network namespace for container `id`, attached to the bridge;
    /// returns its path for `ctr run --with-ns network:PATH`.
    pub fn attach(&self, id: &str) -> PathBuf {
        let netns = format!("{}-{id}", self.bridge);
        super::sh(&["ip", "netns", "add", &netns]);
        self.attached.lock().unwrap().push((id.to_owned(), netns.clone()));
        self.plugins("ADD", id, &netns);
        // The bridge exists now: the gateway the containers' route points to.
        let has_gateway = Command::new("ip")
            .args(["-4", "-o", "addr", "show", "dev", &self.bridge])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{}/", self.gateway)));
        if !has_gateway {
            super::sh(&["ip", "addr", "add", &format!("{}/24", self.gateway), "dev", &self.bridge]);
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{}/forwarding", self.bridge), "0").unwrap();
        }
        PathBuf::from("/run/netns").join(netns)
    }

    /// Runs the conflist's plugins for one container, as the CNI spec says:
    /// each one gets the network's name and version and, when adding, the
    /// result of the one before.
    fn plugins(&self, command: &str, id: &str, netns: &str) {
        let list: serde_json::Value = serde_json::from_slice(&std::fs::read(&self.conflist).unwrap()).unwrap();
        let mut plugins: Vec<serde_json::Value> = list["plugins"].as_array().unwrap().clone();
        if command == "DEL" {
            plugins.reverse();
        }
        let mut previous: Option<serde_json::Value> = None;
        for mut plugin in plugins {
            plugin["name"] = list["name"].clone();
            plugin["cniVersion"] = list["cniVersion"].clone();
            if let Some(result) = previous.take() {
                plugin["prevResult"] = result;
            }
            let kind = plugin["type"].as_str().unwrap().to_owned();
            let mut child = Command::new(Path::new(PLUGINS).join(&kind))
                .env("CNI_COMMAND", command)
                .env("CNI_CONTAINERID", id)
                .env("CNI_NETNS", format!("/run/netns/{netns}"))
                .env("CNI_IFNAME", "eth0")
                .env("CNI_PATH", PLUGINS)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("run the CNI plugin {kind}: {e}"));
            child.stdin.take().unwrap().write_all(&serde_json::to_vec(&plugin).unwrap()).unwrap();
            let output = child.wait_with_output().unwrap();
            if command == "DEL" {
                continue;
            }
            assert!(
                output.status.success(),
                "CNI {command} {kind} for {id}: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            previous = serde_json::from_slice(&output.stdout).ok();
        }
    }
}

impl Drop for CniNetwork {
    fn drop(&mut self) {
        for (id, netns) in self.attached.lock().unwrap().drain(..) {
            self.plugins("DEL", &id, &netns);
            let _ = Command::new("ip").args(["netns", "del", &netns]).stderr(Stdio::null()).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).stderr(Stdio::null()).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
