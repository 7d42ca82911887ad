//! Types shared by sluice's kernel programs and user space.
//!
//! Everything here is `#[repr(C)]` plain data that crosses the kernel/user
//! boundary through BPF maps, so the layout is the contract: fields are
//! ordered largest first and padded explicitly, and any change here must be
//! made on both sides at once (the kernel object is rebuilt by userspace's
//! build script, so they cannot drift apart in one build).
#![no_std]

/// Names of the maps and programs in the kernel object. User space pins them
/// under these names, so a restarted daemon finds them again.
pub mod names {
    pub const SANDBOXES: &str = "SANDBOXES";
    pub const FLOWS_BY_COOKIE: &str = "FLOWS_BY_COOKIE";
    pub const FLOWS_BY_ADDR: &str = "FLOWS_BY_ADDR";
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const DEFAULT_TARGET: &str = "DEFAULT_TARGET";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EVENTS: &str = "EVENTS";

    pub const CONNECT4: &str = "sluice_connect4";
    pub const CONNECT6: &str = "sluice_connect6";
    pub const SENDMSG4: &str = "sluice_sendmsg4";
    pub const SENDMSG6: &str = "sluice_sendmsg6";
    pub const RECVMSG4: &str = "sluice_recvmsg4";
    pub const RECVMSG6: &str = "sluice_recvmsg6";
    pub const GETPEERNAME4: &str = "sluice_getpeername4";
    pub const GETPEERNAME6: &str = "sluice_getpeername6";
    pub const SOCK_OPS: &str = "sluice_sock_ops";
    pub const SOCK_CREATE: &str = "sluice_sock_create";
    pub const SOCKET_CREATE_LSM: &str = "sluice_socket_create";
    pub const EGRESS: &str = "sluice_egress";
    pub const SYS_ENTER: &str = "sluice_sys_enter";
    pub const ENFORCED_PARENTS: &str = "ENFORCED_PARENTS";
    pub const EXEMPT: &str = "EXEMPT";
    pub const TASKS: &str = "TASKS";
    pub const RESERVED_PORTS: &str = "RESERVED_PORTS";
    pub const BIND4: &str = "sluice_bind4";
    pub const BIND6: &str = "sluice_bind6";

    /// The tamper guard's programs besides `sys_enter` (see the kernel
    /// crate's `guard` module), attached to the whole host.
    pub const GUARD_FORK: &str = "sluice_guard_fork";
    pub const GUARD_EXIT: &str = "sluice_guard_exit";
    pub const GUARD_CGROUP_MOVE: &str = "sluice_guard_cgroup_attach";
}

/// How many tasks the guard can bind to their sandboxes at once. A sandbox
/// that would need more cannot fork (the guard fails closed).
pub const MAX_TASKS: u32 = 65_536;

/// The sandbox a task belongs to, kept by the guard under the task's thread
/// group id from the moment it forks or execs inside a sandbox until it
/// exits. It follows the task and its children wherever
/// they move.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskMark {
    /// cgroup id of the sandbox (0 while its cgroup is not yet registered).
    pub sandbox_cgroup: u64,
    /// The task's own cgroup when it was marked: a mark made before its
    /// sandbox was registered is completed only while the task is still
    /// there.
    pub origin_cgroup: u64,
    /// Counter slot of the sandbox.
    pub slot: u32,
    pub _pad: u32,
}

/// How many sandboxes can have counters at once; slot 0 counts flows of
/// cgroups under an enforced parent that are not (yet) registered.
pub const MAX_SANDBOX_SLOTS: u32 = 4096;
/// Walk at most this many cgroup levels when looking for the enrolled
/// ancestor of the calling process.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// An IPv6 address or an IPv4 address in its IPv4-mapped IPv6 form
/// (`::ffff:a.b.c.d`), as four network-order words, the way `bpf_sock_addr`
/// and `bpf_sock_ops` present addresses. One form for both families keeps
/// map keys unambiguous.
pub type Ip6Words = [u32; 4];

/// Where the kernel sends a sandbox's traffic: sluice's proxy and resolver.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Target {
    /// Proxy and resolver address for IPv6 sockets (may be IPv4-mapped).
    pub ip6: Ip6Words,
    /// Proxy and resolver address for IPv4 sockets, network order.
    pub ip4: u32,
    /// TCP port of the proxy, host order.
    pub proxy_port: u16,
    /// UDP and TCP port of the sandbox's resolver, host order.
    pub dns_port: u16,
}

/// An enrolled sandbox, keyed by the cgroup v2 id of its cgroup.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxEntry {
    pub target: Target,
    /// Index into the per-CPU counter array.
    pub slot: u32,
    pub _pad: u32,
}

/// A redirected flow: what the sandbox asked for and who asked.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// cgroup id of the enrolled sandbox cgroup, 0 if the caller sits under
    /// an enforced parent but in no registered sandbox.
    pub sandbox_cgroup: u64,
    /// cgroup id of the calling process itself (may be a child cgroup).
    pub cgroup: u64,
    /// Original destination, IPv4 in mapped form.
    pub orig_ip: Ip6Words,
    /// Thread group id (user-visible pid) of the caller, in the initial pid
    /// namespace.
    pub pid: u32,
    /// Original destination port, host order.
    pub orig_port: u16,
    /// `FAMILY_*` of the original destination.
    pub family: u8,
    /// `PROTO_*` of the socket.
    pub proto: u8,
}

/// Key of `FLOWS_BY_ADDR`: the client end of a redirected TCP connection as
/// the proxy sees it on `accept()`.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub ip: Ip6Words,
    /// Client port, host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key of `ENDPOINTS`: an address and port that sandboxed sockets may send
/// packets to (the proxy and the resolvers).
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub ip: Ip6Words,
    /// Port, host order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub _pad: [u8; 5],
}

/// Per-sandbox, per-CPU counters. Summed across CPUs in user space: per-CPU
/// slots need no atomics, which bpfel lacks.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// TCP connects sent to the proxy.
    pub redirected: u64,
    /// DNS queries (UDP connects/sends and TCP connects) sent to the resolver.
    pub dns: u64,
    /// Connects, sends and sockets refused in the kernel.
    pub refused: u64,
    /// Packets dropped on egress because they were not addressed to sluice.
    pub dropped_packets: u64,
}

/// A refused attempt, streamed to user space for the audit log.
#[repr(C)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RefusedEvent {
    pub sandbox_cgroup: u64,
    pub cgroup: u64,
    pub dst_ip: Ip6Words,
    pub pid: u32,
    /// Socket family, type and protocol as the kernel numbers them (for
    /// refused sockets), or the destination family and `PROTO_*`.
    pub family: u16,
    pub sock_type: u16,
    pub protocol: u16,
    pub dst_port: u16,
    /// `REASON_*`.
    pub reason: u8,
    pub _pad: [u8; 3],
    /// For the guard's kills: the `bpf()` command, the traced pid, the
    /// socket family, the clone flags; 0 otherwise.
    pub detail: u32,
    pub _pad_end: u32,
}

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// UDP connect to a port other than DNS.
pub const REASON_UDP_CONNECT: u8 = 1;
/// Unconnected UDP send to a port other than DNS.
pub const REASON_UDP_SEND: u8 = 2;
/// A socket family, type or protocol sandboxes may not create (raw, packet,
/// ICMP, SCTP, ...).
pub const REASON_SOCKET: u8 = 3;
/// A packet leaving the sandbox not addressed to sluice.
pub const REASON_EGRESS: u8 = 4;
/// A connect with a transport sluice cannot proxy (neither TCP nor UDP).
pub const REASON_TRANSPORT: u8 = 5;
/// A process asked for a socket family no sandbox may have (packet, vsock,
/// ...) without going through a launcher that refuses it, and was killed.
pub const REASON_SOCKET_KILLED: u8 = 6;
/// A sandboxed task called `bpf()` and was killed.
pub const REASON_BPF: u8 = 7;
/// A sandboxed task tried to trace or read a process outside its sandbox
/// (ptrace, process_vm_readv/writev, pidfd_getfd).
pub const REASON_PTRACE: u8 = 8;
/// A sandboxed task tried to open a perf event.
pub const REASON_PERF: u8 = 9;
/// A sandboxed task tried to load a kernel module or a kexec image.
pub const REASON_KERNEL_LOAD: u8 = 10;
/// A sandboxed task tried to mount a bpf file system.
pub const REASON_MOUNT: u8 = 11;
/// A task that left its sandbox's cgroups (or moved into another sandbox)
/// tried to make a socket.
pub const REASON_ESCAPED: u8 = 12;
/// A sandboxed task moved itself out of its sandbox and was killed.
pub const REASON_CGROUP_MOVE: u8 = 13;
/// A sandboxed task could not bind a child to its sandbox (the guard's task
/// map is full) and was killed.
pub const REASON_TASKS_FULL: u8 = 14;
/// A sandboxed task asked for a child that shares its descriptor table
/// without being its thread, or one born in another cgroup.
pub const REASON_CLONE: u8 = 15;
/// A sandboxed task tried to set up an io_uring.
pub const REASON_IO_URING: u8 = 16;
/// A sandbox in the host's network namespace tried to bind a port sluice's
/// proxy or a resolver listens on (or will again after a restart).
pub const REASON_BIND_RESERVED: u8 = 17;
/// A container sandbox reached for Docker's embedded resolver (127.0.0.11)
/// on a port other than 53: it forwards to the host's resolvers, a way
/// around sluice's.
pub const REASON_RUNTIME_RESOLVER: u8 = 18;

impl Flow {
    /// The original destination as a socket address.
    #[cfg(feature = "user")]
    pub fn original_destination(&self) -> core::net::SocketAddr {
        core::net::SocketAddr::new(words_to_ip(self.orig_ip), self.orig_port)
    }
}

/// Turns map words into an address, unmapping IPv4-mapped IPv6.
#[cfg(feature = "user")]
pub fn words_to_ip(words: Ip6Words) -> core::net::IpAddr {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        // Words hold network-order bytes in memory order.
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    let v6 = core::net::Ipv6Addr::from(octets);
    match v6.to_ipv4_mapped() {
        Some(v4) => core::net::IpAddr::V4(v4),
        None => core::net::IpAddr::V6(v6),
    }
}

/// Turns an address into map words, mapping IPv4 into IPv6.
#[cfg(feature = "user")]
pub fn ip_to_words(ip: core::net::IpAddr) -> Ip6Words {
    let octets = match ip {
        core::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        core::net::IpAddr::V6(v6) => v6.octets(),
    };
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    words
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C) plain data with explicit padding and
    // no invalid bit patterns.
    unsafe impl aya::Pod for super::Target {}
    unsafe impl aya::Pod for super::SandboxEntry {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::RefusedEvent {}
    unsafe impl aya::Pod for super::TaskMark {}
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use super::*;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn words_round_trip_and_unmap_v4() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 231, 0, 2));
        let words = ip_to_words(v4);
        // 0xffff in the third word, in network order.
        assert_eq!(words[2].to_ne_bytes(), [0, 0, 0xff, 0xff]);
        assert_eq!(words[3].to_ne_bytes(), [10, 231, 0, 2]);
        assert_eq!(words_to_ip(words), v4);
        let v6 = IpAddr::V6("fd00:231::2".parse::<Ipv6Addr>().unwrap());
        assert_eq!(words_to_ip(ip_to_words(v6)), v6);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Flow>(), 40);
        assert_eq!(core::mem::size_of::<FlowKey>(), 24);
        assert_eq!(core::mem::size_of::<EndpointKey>(), 24);
        assert_eq!(core::mem::size_of::<Target>(), 24);
        assert_eq!(core::mem::size_of::<SandboxEntry>(), 32);
        assert_eq!(core::mem::size_of::<RefusedEvent>(), 56);
        assert_eq!(core::mem::size_of::<TaskMark>(), 24);
    }
}
