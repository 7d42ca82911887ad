//! Who a connection belongs to and where it was going.
//!
//! Connections redirected by sluice's kernel programs carry a flow record
//! (original destination, sandbox cgroup, pid). A listener may also receive
//! connections redirected the classic way, by an iptables/nftables REDIRECT
//! rule (a gateway for a network namespace, say): conntrack then knows the
//! original destination (`SO_ORIGINAL_DST`, `IP6T_SO_ORIGINAL_DST` for IPv6),
//! nothing knows the process, and the sandbox whose policy applies is the
//! one configured for that listener (`sluice daemon --redirect-listener
//! ADDR=SANDBOX`). The rest of the proxy treats both alike.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd as _,
    sync::Arc,
};

use tokio::net::TcpStream;

use super::ProxyContext;
use crate::{
    audit::{Decision, Kind, Verdict},
    sandbox::Sandbox,
};

/// How a listener learns a connection's sandbox and original destination.
#[derive(Debug, Clone)]
pub enum Attribution {
    /// From the flow record the kernel programs wrote.
    Kernel,
    /// From conntrack (iptables/nftables REDIRECT); every connection on the
    /// listener belongs to the named sandbox.
    Redirected { sandbox: String },
}

/// A connection's sandbox, original destination and pid (0: not known).
pub(super) struct Attributed {
    pub destination: SocketAddr,
    pub sandbox: Arc<Sandbox>,
    pub pid: u32,
}

impl Attribution {
    /// Attributes an accepted connection, or says why it must be dropped
    /// (the decision to log).
    pub(super) fn attribute(
        &self,
        ctx: &ProxyContext,
        client: &TcpStream,
        peer: SocketAddr,
    ) -> Result<Attributed, Box<Decision>> {
        let deny = |rule: &str, reason: String| {
            let mut decision = Decision::new(Kind::Connect, Verdict::Deny, rule, reason);
            decision.destination = client.local_addr().ok();
            Box::new(decision)
        };
        match self {
            Self::Kernel => {
                let Some(flow) = ctx.datapath.take_flow(peer) else {
                    // Reached the proxy port without passing the kernel hooks: a
                    // host process, or a sandbox whose flow record was lost.
                    // Never forward.
                    return Err(deny(
                        crate::rules::NO_FLOW_RECORD,
                        format!("connection from {peer} was not redirected by sluice's kernel programs"),
                    ));
                };
                let destination = flow.original_destination();
                let Some(sandbox) = ctx.registry.by_cgroup(flow.sandbox_cgroup) else {
                    let mut decision = deny(
                        crate::rules::UNKNOWN_SANDBOX,
                        format!("cgroup {} is under an enforced parent but is not a registered sandbox", flow.cgroup),
                    );
                    decision.pid = Some(flow.pid);
                    decision.destination = Some(destination);
                    return Err(decision);
                };
                Ok(Attributed { destination, sandbox, pid: flow.pid })
            }
            Self::Redirected { sandbox } => {
                // A connection made straight to the listener has itself as
                // original destination, which the proxy refuses as it refuses
                // any connection to its own listeners.
                let destination = original_destination(client).map_err(|error| {
                    deny(
                        crate::rules::NO_ORIGINAL_DESTINATION,
                        format!("connection from {peer} has no redirected destination in conntrack: {error}"),
                    )
                })?;
                let Some(found) = ctx.registry.by_name(sandbox) else {
                    let mut decision = deny(
                        crate::rules::UNKNOWN_SANDBOX,
                        format!("redirected connections here belong to sandbox {sandbox:?}, which is not registered"),
                    );
                    decision.destination = Some(destination);
                    return Err(decision);
                };
                Ok(Attributed { destination, sandbox: found, pid: 0 })
            }
        }
    }
}

/// The destination a connection redirected (or destination-NATed) had before the rule
/// rewrote it, as conntrack recorded it.
fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    if stream.local_addr()?.is_ipv4() {
        // SAFETY: a zeroed sockaddr_in is valid; the kernel writes at most `len` bytes.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        getsockopt(fd, libc::SOL_IP, libc::SO_ORIGINAL_DST, &raw mut addr)?;
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddrV4::new(ip, u16::from_be(addr.sin_port)).into())
    } else {
        // SAFETY: as above.
        let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
        getsockopt(fd, libc::SOL_IPV6, libc::IP6T_SO_ORIGINAL_DST, &raw mut addr)?;
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        // A v4-mapped answer is an IPv4 destination seen by a dual-stack socket.
        let ip = ip.to_ipv4_mapped().map_or(ip.into(), Into::into);
        Ok(SocketAddr::new(ip, u16::from_be(addr.sin6_port)))
    }
}

fn getsockopt<T>(fd: i32, level: i32, name: i32, out: *mut T) -> std::io::Result<()> {
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<T>()).expect("small struct");
    // SAFETY: `out` points to a writable T and `len` is its size.
    if unsafe { libc::getsockopt(fd, level, name, out.cast(), &raw mut len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
