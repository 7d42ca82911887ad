//! sluice's kernel programs.
//!
//! Attached to an enforced cgroup parent, they make every socket of every
//! process below it go through sluice:
//! - `connect4/6`: TCP connects go to the proxy, DNS (TCP or UDP port 53) to
//!   the sandbox's resolver; the original destination is remembered under
//!   the socket cookie. Other UDP connects are refused.
//! - `sock_ops`: once a redirected TCP connection is established, re-keys the
//!   flow by the client's address and port, which is what the proxy sees on
//!   `accept()`. This runs before the final ACK of the handshake is sent, so
//!   the entry exists before the proxy can accept the connection.
//! - `sendmsg4/6`: unconnected UDP may only carry DNS, which is rewritten to
//!   the resolver; `recvmsg4/6` and `getpeername4/6` show the sandbox the
//!   address it asked for, so resolvers that check reply sources still work.
//! - `sock_create` and the LSM `socket_create` hook: only TCP, UDP, Unix and
//!   netlink sockets can be made (no raw, packet, ICMP, SCTP, ...).
//! - `egress`: any packet that is not addressed to sluice is dropped, as the
//!   last line for whatever slipped past the socket hooks.
//! - `bind4/6`: a sandbox in the host's network namespace cannot bind the
//!   ports of sluice's proxy and resolvers, so a daemon that is down can
//!   always start again on them.
//!
//! Loopback is the caller's network namespace's own: a sandbox in a
//! namespace of its own (a container) reaches its own 127.0.0.0/8 and ::1
//! untouched, never the host's; a sandbox that shares the host's namespace
//! shares the host's loopback, which the proxy allows only as its profile
//! says (the built-in profile never does).
//!
//! Every program finds out who the caller is in one walk of its cgroup
//! ancestors ([`caller_of`]): a registered sandbox, an unregistered cgroup
//! under an enforced parent (denied as unknown), or a container cgroup the
//! daemon exempted (left alone by all of them).
//!
//! Decisions never depend on user space being alive: if the daemon is gone the
//! rewritten connects hit a port nobody listens on and fail. Fail closed.
#![no_std]
#![no_main]

mod guard;

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_netns_cookie,
        bpf_get_socket_cookie, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
    },
    macros::{cgroup_skb, cgroup_sock, cgroup_sock_addr, lsm_cgroup, map, sock_ops},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{LsmContext, SkBuffContext, SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use sluice_common::{
    Counters, EndpointKey, Flow, FlowKey, Ip6Words, RefusedEvent, SandboxEntry, Target, TaskMark, FAMILY_V4, FAMILY_V6,
    MAX_CGROUP_DEPTH, MAX_SANDBOX_SLOTS, MAX_TASKS, PROTO_TCP, PROTO_UDP, REASON_BIND_RESERVED, REASON_EGRESS,
    REASON_RUNTIME_RESOLVER, REASON_SOCKET, REASON_TRANSPORT, REASON_UDP_CONNECT, REASON_UDP_SEND,
};

const DNS_PORT: u16 = 53;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const AF_UNIX: i32 = 1;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_NETLINK: i32 = 16;
const IPPROTO_TCP: i32 = 6;
const IPPROTO_UDP: i32 = 17;
/// Verdicts of cgroup programs.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[map]
static SANDBOXES: HashMap<u64, SandboxEntry> = HashMap::with_max_entries(MAX_SANDBOX_SLOTS, 0);
#[map]
static FLOWS_BY_COOKIE: LruHashMap<u64, Flow> = LruHashMap::with_max_entries(65_536, 0);
#[map]
static FLOWS_BY_ADDR: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(65_536, 0);
#[map]
static ENDPOINTS: HashMap<EndpointKey, u8> = HashMap::with_max_entries(2 * MAX_SANDBOX_SLOTS + 64, 0);
#[map]
static DEFAULT_TARGET: Array<Target> = Array::with_max_entries(1, 0);
#[map]
static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_SANDBOX_SLOTS, 0);
/// cgroup ids of the enforced parents, with where their unregistered
/// cgroups are sent: the programs' own parent, and parents below it whose
/// sandboxes live in other network namespaces (containers) and so cannot
/// reach sluice on loopback. Also read by `sys_enter`, the one program that
/// is not attached to a cgroup.
#[map]
static ENFORCED_PARENTS: HashMap<u64, Target> = HashMap::with_max_entries(64, 0);
/// Container cgroups below an enforced parent that are not enforced: the
/// daemon's discovery puts a container here when its runtime reports it
/// without the daemon's enforce label (`--enforce-label`). Every program
/// leaves the processes below such a cgroup alone. Only the daemon writes
/// it; nothing a sandbox does reaches it.
#[map]
static EXEMPT: HashMap<u64, u8> = HashMap::with_max_entries(MAX_SANDBOX_SLOTS, 0);
/// Which sandbox each task belongs to (see `guard`).
#[map]
static TASKS: HashMap<u32, TaskMark> = HashMap::with_max_entries(MAX_TASKS, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);
/// Ports sluice's proxy and resolvers listen on (any address, TCP and UDP
/// alike), which sandboxes in the host's network namespace may not bind.
/// Only the daemon writes it.
#[map]
static RESERVED_PORTS: HashMap<u32, u8> = HashMap::with_max_entries(2 * MAX_SANDBOX_SLOTS + 64, 0);

/// The cookie of the host's network namespace (the daemon's), set by user
/// space at load; 0 (unknown) treats every namespace as the host's.
#[unsafe(no_mangle)]
static INIT_NETNS_COOKIE: u64 = 0;

/// Whether the program's socket lives in a network namespace other than
/// the host's (a container's).
#[inline(always)]
fn in_own_netns(ctx: *mut core::ffi::c_void) -> bool {
    // SAFETY: a global set before load; a plain helper call on the context.
    let host = unsafe { read_volatile(&INIT_NETNS_COOKIE) };
    host != 0 && unsafe { bpf_get_netns_cookie(ctx) } != host
}

/// 127.0.0.0/8 (IPv4-mapped) and ::1.
#[inline(always)]
fn is_loopback(ip: Ip6Words) -> bool {
    (is_mapped(ip) && ip[3].to_ne_bytes()[0] == 127) || ip == [0, 0, 0, 1_u32.to_be()]
}

/// 127.0.0.11, where Docker serves a container its embedded resolver
/// (port 53, and behind it a socket of dockerd's on another port), which
/// forwards to the host's resolvers: never a container's own service.
#[inline(always)]
fn is_runtime_resolver(ip: Ip6Words) -> bool {
    is_mapped(ip) && ip[3].to_ne_bytes() == [127, 0, 0, 11]
}

/// Who a process is to the programs.
enum Caller {
    /// Below no enforced parent (only `sys_enter`, which is not attached to
    /// a cgroup, sees such processes).
    Outside,
    /// Below a container cgroup the daemon exempted: left alone.
    Exempt,
    /// Enforced: its sandbox cgroup (0 for an unregistered one) and where
    /// its traffic goes.
    Sandbox(u64, SandboxEntry),
}

/// The one walk of a process's cgroup ancestors, from the root down. The
/// shallowest registered or exempted ancestor decides, so processes in child
/// cgroups made inside a sandbox keep its identity. Unregistered cgroups under
/// an enforced parent get sandbox 0, which the proxy denies as "unknown
/// sandbox", and the target of their deepest enforced parent, so that a
/// container is refused by sluice, on an address it can reach, not by its
/// own loopback.
#[inline(always)]
fn caller_of(ancestor: impl Fn(i32) -> u64) -> Caller {
    let mut parent_target = None;
    for level in 1..=MAX_CGROUP_DEPTH {
        let id = ancestor(level);
        if id == 0 {
            break;
        }
        // SAFETY: the value is copied out before the map can change it.
        if let Some(entry) = unsafe { SANDBOXES.get(id) } {
            return Caller::Sandbox(id, *entry);
        }
        if unsafe { EXEMPT.get(id) }.is_some() {
            return Caller::Exempt;
        }
        if let Some(target) = unsafe { ENFORCED_PARENTS.get(id) } {
            parent_target = Some(*target);
        }
    }
    match parent_target {
        Some(target) => Caller::Sandbox(0, SandboxEntry { target, slot: 0, _pad: 0 }),
        None => Caller::Outside,
    }
}

/// The sandbox of a process a cgroup program runs for; None if it is
/// exempted. The programs run only below their parent, so a walk that finds
/// none (deeper than `MAX_CGROUP_DEPTH`) is still enforced, as unknown.
#[inline(always)]
fn sandbox_of(ancestor: impl Fn(i32) -> u64) -> Option<(u64, SandboxEntry)> {
    match caller_of(ancestor) {
        Caller::Sandbox(id, entry) => Some((id, entry)),
        Caller::Exempt => None,
        Caller::Outside => {
            let target = DEFAULT_TARGET.get(0).copied().unwrap_or_default();
            Some((0, SandboxEntry { target, slot: 0, _pad: 0 }))
        }
    }
}

#[inline(always)]
fn current_sandbox() -> Option<(u64, SandboxEntry)> {
    // SAFETY: plain helper calls.
    sandbox_of(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

#[inline(always)]
fn count(slot: u32, f: impl Fn(&mut Counters)) {
    if let Some(counters) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        f(unsafe { &mut *counters });
    }
}

fn pid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn emit(sandbox_cgroup: u64, cgroup: u64, event: RefusedEvent) {
    if let Some(mut entry) = EVENTS.reserve::<RefusedEvent>(0) {
        entry.write(RefusedEvent { sandbox_cgroup, cgroup, ..event });
        entry.submit(0);
    }
    // A full ring drops the event; the counters still count it.
}

#[inline(always)]
fn refuse_addr(
    sandbox_cgroup: u64,
    slot: u32,
    dst_ip: Ip6Words,
    dst_port: u16,
    family: u8,
    proto: u8,
    reason: u8,
) -> i32 {
    count(slot, |c| c.refused += 1);
    // SAFETY: plain helper call.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    emit(
        sandbox_cgroup,
        cgroup,
        RefusedEvent {
            dst_ip,
            pid: pid(),
            family: u16::from(family),
            protocol: u16::from(proto),
            dst_port,
            reason,
            ..RefusedEvent::default()
        },
    );
    REFUSE
}

fn mapped_v4(ip4: u32) -> Ip6Words {
    // ::ffff:a.b.c.d with every word in network order.
    [0, 0, 0xffff_u32.to_be(), ip4]
}

/// Reads the destination the caller passed, as words and host-order port.
#[inline(always)]
unsafe fn user_dst(sa: *mut bpf_sock_addr, v6: bool) -> (Ip6Words, u16) {
    let port = u16::from_be(read_volatile(addr_of_mut!((*sa).user_port)) as u16);
    let ip = if v6 {
        [
            read_volatile(addr_of_mut!((*sa).user_ip6[0])),
            read_volatile(addr_of_mut!((*sa).user_ip6[1])),
            read_volatile(addr_of_mut!((*sa).user_ip6[2])),
            read_volatile(addr_of_mut!((*sa).user_ip6[3])),
        ]
    } else {
        mapped_v4(read_volatile(addr_of_mut!((*sa).user_ip4)))
    };
    (ip, port)
}

/// Points the caller's address at `ip`/`port`. One field per store: the
/// verifier rejects stores that LLVM merges across context fields.
#[inline(always)]
unsafe fn set_user_dst(sa: *mut bpf_sock_addr, v6: bool, ip: Ip6Words, port: u16) {
    if v6 {
        write_volatile(addr_of_mut!((*sa).user_ip6[0]), ip[0]);
        write_volatile(addr_of_mut!((*sa).user_ip6[1]), ip[1]);
        write_volatile(addr_of_mut!((*sa).user_ip6[2]), ip[2]);
        write_volatile(addr_of_mut!((*sa).user_ip6[3]), ip[3]);
    } else {
        write_volatile(addr_of_mut!((*sa).user_ip4), ip[3]);
    }
    write_volatile(addr_of_mut!((*sa).user_port), u32::from(port.to_be()));
}

/// Where a connect or send to `dst` goes: an IPv6 destination to the
/// target's IPv6 address (which an IPv6-only socket or network can reach),
/// an IPv4 one (IPv4-mapped on an IPv6 socket) to its IPv4 address (which a
/// network without IPv6 can reach).
#[inline(always)]
fn target_ip(target: &Target, dst: Ip6Words) -> Ip6Words {
    if is_mapped(dst) {
        mapped_v4(target.ip4)
    } else {
        target.ip6
    }
}

/// Whether `ip` is one of the target's addresses.
#[inline(always)]
fn is_target_ip(target: &Target, ip: Ip6Words) -> bool {
    ip == target.ip6 || ip == mapped_v4(target.ip4)
}

#[inline(always)]
fn redirect(ctx: &SockAddrContext, v6: bool, connected: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run.
    let (sock_type, protocol) =
        unsafe { (read_volatile(addr_of_mut!((*sa).type_)), read_volatile(addr_of_mut!((*sa).protocol))) };
    let Some((sandbox_cgroup, entry)) = current_sandbox() else {
        return ALLOW;
    };
    let (orig_ip, orig_port) = unsafe { user_dst(sa, v6) };
    let family = if v6 && !is_mapped(orig_ip) { FAMILY_V6 } else { FAMILY_V4 };
    // A container's own loopback: nothing leaves its namespace, and the
    // proxy must never stand in for it (it would reach the host's). DNS
    // still goes to sluice's resolver, and Docker's resolver is refused:
    // both would be ways around sluice's resolver.
    if orig_port != DNS_PORT && is_loopback(orig_ip) && in_own_netns(ctx.as_ptr()) {
        if is_runtime_resolver(orig_ip) {
            let proto = if sock_type == SOCK_DGRAM { PROTO_UDP } else { PROTO_TCP };
            return refuse_addr(sandbox_cgroup, entry.slot, orig_ip, orig_port, family, proto, REASON_RUNTIME_RESOLVER);
        }
        return ALLOW;
    }
    let proto = match sock_type {
        SOCK_STREAM => PROTO_TCP,
        SOCK_DGRAM => PROTO_UDP,
        _ => {
            return refuse_addr(
                sandbox_cgroup,
                entry.slot,
                orig_ip,
                orig_port,
                family,
                protocol as u8,
                REASON_TRANSPORT,
            )
        }
    };
    if proto == PROTO_UDP && orig_port != DNS_PORT {
        let reason = if connected { REASON_UDP_CONNECT } else { REASON_UDP_SEND };
        return refuse_addr(sandbox_cgroup, entry.slot, orig_ip, orig_port, family, proto, reason);
    }
    let flow = Flow {
        sandbox_cgroup,
        // SAFETY: plain helper calls.
        cgroup: unsafe { bpf_get_current_cgroup_id() },
        orig_ip,
        pid: pid(),
        orig_port,
        family,
        proto,
    };
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if FLOWS_BY_COOKIE.insert(cookie, flow, 0).is_err() {
        // Without a record the proxy could not attribute the flow: refuse
        // rather than send it anywhere unattributed.
        return refuse_addr(sandbox_cgroup, entry.slot, orig_ip, orig_port, family, proto, REASON_TRANSPORT);
    }
    let port = if orig_port == DNS_PORT {
        count(entry.slot, |c| c.dns += 1);
        entry.target.dns_port
    } else {
        count(entry.slot, |c| c.redirected += 1);
        entry.target.proxy_port
    };
    unsafe { set_user_dst(sa, v6, target_ip(&entry.target, orig_ip), port) };
    ALLOW
}

fn is_mapped(ip: Ip6Words) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffff_u32.to_be()
}

#[cgroup_sock_addr(connect4)]
pub fn sluice_connect4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, false, true)
}

#[cgroup_sock_addr(connect6)]
pub fn sluice_connect6(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, true, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sluice_sendmsg4(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, false, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sluice_sendmsg6(ctx: SockAddrContext) -> i32 {
    redirect(&ctx, true, false)
}

/// Refuses a bind by a sandbox in the host's network namespace to a port
/// sluice listens on: while the daemon is down nothing holds those ports,
/// and a sandbox that took one would keep sluice from starting again (or
/// answer in its place). Containers bind in namespaces of their own.
#[inline(always)]
fn guard_bind(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some((sandbox_cgroup, entry)) = current_sandbox() else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    // SAFETY: the context pointer is valid for the program's run.
    let ((ip, port), sock_type) = unsafe { (user_dst(sa, v6), read_volatile(addr_of_mut!((*sa).type_))) };
    if port == 0 || in_own_netns(ctx.as_ptr()) {
        return ALLOW;
    }
    // SAFETY: only tested for presence.
    if unsafe { RESERVED_PORTS.get(&u32::from(port)) }.is_none() {
        return ALLOW;
    }
    let family = if v6 && !is_mapped(ip) { FAMILY_V6 } else { FAMILY_V4 };
    let proto = if sock_type == SOCK_DGRAM { PROTO_UDP } else { PROTO_TCP };
    refuse_addr(sandbox_cgroup, entry.slot, ip, port, family, proto, REASON_BIND_RESERVED)
}

#[cgroup_sock_addr(bind4)]
pub fn sluice_bind4(ctx: SockAddrContext) -> i32 {
    guard_bind(&ctx, false)
}

#[cgroup_sock_addr(bind6)]
pub fn sluice_bind6(ctx: SockAddrContext) -> i32 {
    guard_bind(&ctx, true)
}

/// Shows the sandbox the address it asked for instead of sluice's. For
/// `recvmsg` only replies that really come from the sandbox's resolver are
/// rewritten; for `getpeername` any redirected socket.
#[inline(always)]
fn restore(ctx: &SockAddrContext, v6: bool, only_from_resolver: bool) -> i32 {
    let sa = ctx.sock_addr;
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the map can change it.
    let Some(flow) = (unsafe { FLOWS_BY_COOKIE.get(cookie) }).copied() else {
        return ALLOW;
    };
    if only_from_resolver {
        let Some((_, entry)) = current_sandbox() else {
            return ALLOW;
        };
        let (src_ip, src_port) = unsafe { user_dst(sa, v6) };
        if src_port != entry.target.dns_port || !is_target_ip(&entry.target, src_ip) {
            return ALLOW;
        }
    }
    unsafe { set_user_dst(sa, v6, flow.orig_ip, flow.orig_port) };
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sluice_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, false, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sluice_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, true, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sluice_getpeername4(ctx: SockAddrContext) -> i32 {
    restore(&ctx, false, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sluice_getpeername6(ctx: SockAddrContext) -> i32 {
    restore(&ctx, true, false)
}

/// Re-keys an established redirected connection by the client's address and
/// port: the proxy's `accept()` sees exactly that as the peer. Named not to
/// clash with its `sockops` section.
#[sock_ops]
pub fn sluice_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out before the map can change it.
    let Some(flow) = (unsafe { FLOWS_BY_COOKIE.get(cookie) }).copied() else {
        return 1;
    };
    if flow.orig_port == DNS_PORT {
        // The resolver knows the sandbox by the port it listens on.
        return 1;
    }
    let ops = ctx.ops;
    // Read every field unconditionally, then choose: loads in two branches
    // get merged by LLVM into one load at a computed context offset (even
    // volatile ones), which the verifier rejects.
    // SAFETY: the context pointer is valid for the program's run.
    let (family, v4, v6, port) = unsafe {
        (
            read_volatile(addr_of_mut!((*ops).family)),
            read_volatile(addr_of_mut!((*ops).local_ip4)),
            [
                read_volatile(addr_of_mut!((*ops).local_ip6[0])),
                read_volatile(addr_of_mut!((*ops).local_ip6[1])),
                read_volatile(addr_of_mut!((*ops).local_ip6[2])),
                read_volatile(addr_of_mut!((*ops).local_ip6[3])),
            ],
            read_volatile(addr_of_mut!((*ops).local_port)) as u16,
        )
    };
    let ip = if family == AF_INET as u32 { mapped_v4(v4) } else { v6 };
    let key = FlowKey { ip, port, _pad: [0; 6] };
    // On failure the proxy finds no flow and refuses the connection.
    let _ = FLOWS_BY_ADDR.insert(key, flow, 0);
    1
}

/// Forgets a socket's flow when it closes.
#[cgroup_sock(sock_release)]
pub fn sluice_sock_release(ctx: SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = FLOWS_BY_COOKIE.remove(cookie);
    ALLOW
}

/// Which sockets a sandbox may make: TCP and UDP over IPv4/IPv6 (both go
/// through the hooks above), Unix and netlink (local only). Everything else —
/// raw, packet, ICMP, SCTP, MPTCP, vsock — is refused.
fn socket_allowed(family: i32, sock_type: i32, protocol: i32) -> bool {
    match family {
        AF_UNIX | AF_NETLINK => true,
        AF_INET | AF_INET6 => {
            matches!((sock_type as u32, protocol), (SOCK_STREAM, 0 | IPPROTO_TCP) | (SOCK_DGRAM, 0 | IPPROTO_UDP))
        }
        _ => false,
    }
}

/// Refuses a socket the caller may not have, unless the caller is exempted.
#[inline(always)]
fn refuse_socket(family: i32, sock_type: i32, protocol: i32) -> i32 {
    let Some(sandbox) = current_sandbox() else {
        return ALLOW;
    };
    emit_socket_refusal(sandbox, family, sock_type, protocol, REASON_SOCKET);
    REFUSE
}

#[inline(always)]
fn emit_socket_refusal(
    (sandbox_cgroup, entry): (u64, SandboxEntry),
    family: i32,
    sock_type: i32,
    protocol: i32,
    reason: u8,
) {
    count(entry.slot, |c| c.refused += 1);
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    emit(
        sandbox_cgroup,
        cgroup,
        RefusedEvent {
            pid: pid(),
            family: family as u16,
            sock_type: sock_type as u16,
            protocol: protocol as u16,
            reason,
            ..RefusedEvent::default()
        },
    );
}

/// `security_socket_create(family, type, protocol, kern)` for processes in
/// the cgroup: the only hook that also sees packet sockets.
#[lsm_cgroup(hook = "socket_create")]
pub fn sluice_socket_create(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let sock_type: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    if kern != 0 || socket_allowed(family, sock_type, protocol) {
        return ALLOW;
    }
    refuse_socket(family, sock_type, protocol)
}

/// The same rule for IPv4/IPv6 sockets through the cgroup socket hook, which
/// works where the BPF LSM is not enabled.
#[cgroup_sock(sock_create)]
pub fn sluice_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let (family, sock_type, protocol) = unsafe { ((*sk).family as i32, (*sk).type_ as i32, (*sk).protocol as i32) };
    if socket_allowed(family, sock_type, protocol) {
        return ALLOW;
    }
    refuse_socket(family, sock_type, protocol)
}

/// Drops every packet leaving a sandbox that is not addressed to sluice
/// (or IPv6 link control the kernel sends for it).
#[cgroup_skb(egress)]
pub fn sluice_egress(ctx: SkBuffContext) -> i32 {
    match packet_destination(&ctx) {
        Some(key) if unsafe { ENDPOINTS.get(key) }.is_some() => ALLOW,
        None if is_ipv6_link_control(&ctx) => ALLOW,
        // Loopback of a container's own namespace never reaches the host.
        Some(key) if is_loopback(key.ip) && !is_runtime_resolver(key.ip) && in_own_netns(ctx.as_ptr()) => ALLOW,
        dst => {
            let skb = ctx.skb.skb;
            let Some((sandbox_cgroup, entry)) = sandbox_of(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) })
            else {
                return ALLOW;
            };
            count(entry.slot, |c| c.dropped_packets += 1);
            let key = dst.unwrap_or_default();
            let cgroup = unsafe { bpf_skb_cgroup_id(skb) };
            emit(
                sandbox_cgroup,
                cgroup,
                RefusedEvent {
                    dst_ip: key.ip,
                    pid: pid(),
                    family: u16::from(if is_mapped(key.ip) { FAMILY_V4 } else { FAMILY_V6 }),
                    protocol: u16::from(key.proto),
                    dst_port: key.port,
                    reason: REASON_EGRESS,
                    ..RefusedEvent::default()
                },
            );
            REFUSE
        }
    }
}

const PROTO_ICMPV6: u8 = 58;
const PROTO_HOP_BY_HOP: u8 = 0;

/// IPv6 neighbour discovery (router and neighbour solicitations and
/// advertisements) and multicast listener messages. The kernel sends them
/// for a network namespace from a socket of the namespace's creator, which
/// for a container may be in the sandbox; without them IPv6 finds no
/// neighbour, not even sluice's gateway. Sandboxes cannot send ICMPv6
/// themselves (no raw or ICMP sockets), and these never leave the link:
/// neighbour discovery has hop limit 255 (receivers drop anything else),
/// multicast listener reports hop limit 1.
#[inline(always)]
fn is_ipv6_link_control(ctx: &SkBuffContext) -> bool {
    let Ok(first) = ctx.load::<u8>(0) else { return false };
    let (Ok(next), Ok(hops)) = (ctx.load::<u8>(6), ctx.load::<u8>(7)) else { return false };
    if first >> 4 != 6 {
        return false;
    }
    // MLD reports come behind a hop-by-hop header (router alert).
    let (next, offset) = if next == PROTO_HOP_BY_HOP {
        let (Ok(inner), Ok(len)) = (ctx.load::<u8>(40), ctx.load::<u8>(41)) else { return false };
        (inner, 40 + (usize::from(len) + 1) * 8)
    } else {
        (next, 40)
    };
    if next != PROTO_ICMPV6 {
        return false;
    }
    let Ok(icmp_type) = ctx.load::<u8>(offset) else { return false };
    match icmp_type {
        // Router/neighbour solicitation and advertisement.
        133..=136 => hops == 255,
        // MLD query, report, done; MLDv2 report.
        130..=132 | 143 => hops == 1,
        _ => false,
    }
}

/// Destination of an IP packet (the skb starts at the network header), or
/// None for anything that is not plain TCP or UDP.
#[inline(always)]
fn packet_destination(ctx: &SkBuffContext) -> Option<EndpointKey> {
    let first: u8 = ctx.load(0).ok()?;
    let (proto, ip, l4) = match first >> 4 {
        4 => {
            let ihl = usize::from(first & 0x0f) * 4;
            let proto: u8 = ctx.load(9).ok()?;
            let dst: u32 = ctx.load(16).ok()?;
            (proto, mapped_v4(dst), ihl)
        }
        6 => {
            let proto: u8 = ctx.load(6).ok()?;
            let dst: Ip6Words = ctx.load(24).ok()?;
            (proto, dst, 40)
        }
        _ => return None,
    };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let port: u16 = ctx.load(l4 + 2).ok()?;
    Some(EndpointKey { ip, port: u16::from_be(port), proto, _pad: [0; 5] })
}

/// GPL-compatible, as the kernel requires for LSM programs and some helpers.
#[unsafe(link_section = "license")]
#[used]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
