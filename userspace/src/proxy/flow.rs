//! What the proxy knows about one connection ([`Flow`]), filled in phase by
//! phase and then shared by every request on it. Decision records are built
//! from it ([`Flow::record`]), so a record names the sandbox, pid,
//! destination and container the connection was attributed to, never a
//! name looked up again.

use std::{net::SocketAddr, sync::Arc};

use super::authority::Named;
use crate::{
    audit::{Decision, Kind, Verdict},
    credentials::SecretStore,
    sandbox::{ContainerInfo, Sandbox},
};

/// One connection of a sandbox, as the phases learned it.
pub struct Flow {
    /// Connect phase: the flow record (or conntrack) and the registry.
    pub sandbox: Arc<Sandbox>,
    /// `None`: not known (connections redirected by iptables/nftables).
    pub pid: Option<u32>,
    /// Where the sandbox was going before the kernel redirected it.
    pub destination: SocketAddr,
    /// The container the sandbox stands for, as records may show it (labels
    /// that hold a secret's value withheld).
    pub container: Option<ContainerInfo>,
    /// Client hello phase: `tls`, `http` or `opaque`.
    pub protocol: &'static str,
    /// Client hello phase: the name the connection is judged under and
    /// what ties it to the destination.
    pub named: Option<Named>,
    /// Client hello phase: the TLS facts of an intercepted connection.
    pub tls: Option<TlsFacts>,
}

/// What the client's `ClientHello` said.
#[derive(Debug, Clone, Default)]
pub struct TlsFacts {
    /// The server name the client sent: requests must name the same host.
    pub sni: Option<String>,
    /// ALPN protocols offered, in the client's order of preference.
    pub alpn: Vec<Vec<u8>>,
}

impl Flow {
    /// A flow as the connect phase knows it.
    pub fn new(sandbox: Arc<Sandbox>, pid: u32, destination: SocketAddr, secrets: &SecretStore) -> Self {
        let container = container_for_records(&sandbox, secrets);
        Self {
            sandbox,
            pid: (pid != 0).then_some(pid),
            destination,
            container,
            protocol: "opaque",
            named: None,
            tls: None,
        }
    }

    /// The server name of an intercepted connection.
    pub fn sni(&self) -> Option<&str> {
        self.tls.as_ref().and_then(|tls| tls.sni.as_deref())
    }

    /// A denial record of `kind` for this flow; the phase that decides
    /// fills in rule, reason and what it judged.
    pub fn record(&self, kind: Kind) -> Decision {
        let mut decision = Decision::new(kind, Verdict::Deny, "", "");
        decision.sandbox = Some(self.sandbox.name().to_owned());
        decision.container.clone_from(&self.container);
        decision.pid = self.pid;
        decision.destination = Some(self.destination);
        decision
    }
}

/// The container identity decision records of `sandbox` carry; a label
/// whose value holds a secret's value is kept with its value withheld.
pub fn container_for_records(sandbox: &Sandbox, secrets: &SecretStore) -> Option<ContainerInfo> {
    let mut info = sandbox.container()?;
    if !secrets.is_empty() {
        for value in info.labels.values_mut() {
            if secrets.appears_in(value) {
                "[withheld: holds a secret]".clone_into(value);
            }
        }
    }
    Some(info)
}
