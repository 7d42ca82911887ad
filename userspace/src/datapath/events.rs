//! The kernel's stream of refused attempts (ring buffer), decoded.

use std::net::SocketAddr;

use aya::maps::{MapData, RingBuf};
use serde::Serialize;
use sluice_common::{
    words_to_ip, RefusedEvent, REASON_BIND_RESERVED, REASON_BPF, REASON_CGROUP_MOVE, REASON_CLONE, REASON_EGRESS,
    REASON_ESCAPED, REASON_IO_URING, REASON_KERNEL_LOAD, REASON_MOUNT, REASON_PERF, REASON_PTRACE,
    REASON_RUNTIME_RESOLVER, REASON_SOCKET, REASON_SOCKET_KILLED, REASON_TASKS_FULL, REASON_TRANSPORT,
    REASON_UDP_CONNECT, REASON_UDP_SEND,
};
use tokio::io::unix::AsyncFd;

/// Why the kernel refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    UdpConnect,
    UdpSend,
    Socket,
    SocketKilled,
    Egress,
    Transport,
    /// The tamper guard's kills.
    Bpf,
    Ptrace,
    PerfEvent,
    KernelLoad,
    Mount,
    Escaped,
    CgroupMove,
    TasksFull,
    Clone,
    IoUring,
    /// A bind to one of sluice's own ports from the host's namespace.
    BindReserved,
    /// Docker's embedded resolver on another port than 53.
    RuntimeResolver,
    Unknown,
}

impl RefusalReason {
    fn from_code(code: u8) -> Self {
        match code {
            REASON_UDP_CONNECT => Self::UdpConnect,
            REASON_UDP_SEND => Self::UdpSend,
            REASON_SOCKET => Self::Socket,
            REASON_SOCKET_KILLED => Self::SocketKilled,
            REASON_EGRESS => Self::Egress,
            REASON_TRANSPORT => Self::Transport,
            REASON_BPF => Self::Bpf,
            REASON_PTRACE => Self::Ptrace,
            REASON_PERF => Self::PerfEvent,
            REASON_KERNEL_LOAD => Self::KernelLoad,
            REASON_MOUNT => Self::Mount,
            REASON_ESCAPED => Self::Escaped,
            REASON_CGROUP_MOVE => Self::CgroupMove,
            REASON_TASKS_FULL => Self::TasksFull,
            REASON_CLONE => Self::Clone,
            REASON_IO_URING => Self::IoUring,
            REASON_BIND_RESERVED => Self::BindReserved,
            REASON_RUNTIME_RESOLVER => Self::RuntimeResolver,
            _ => Self::Unknown,
        }
    }

    /// What an operator reads in the log.
    pub fn explain(self) -> &'static str {
        match self {
            Self::UdpConnect => "UDP is only allowed for DNS (port 53); the UDP connect was refused",
            Self::UdpSend => "UDP is only allowed for DNS (port 53); the datagram was refused",
            Self::Socket => "sandboxes may only create TCP, UDP, Unix and netlink sockets",
            Self::SocketKilled => "sandboxes may only create TCP, UDP, Unix and netlink sockets; the process asked for another family and was killed",
            Self::Egress => "packet not addressed to sluice dropped on egress",
            Self::Transport => "transport cannot be proxied",
            Self::Bpf => "sandboxes may not call bpf(): sluice's kernel programs and maps are out of their reach; the process was killed",
            Self::Ptrace => "sandboxes may trace or read only their own processes; the process reached for one outside and was killed",
            Self::PerfEvent => "sandboxes may not open perf events; the process was killed",
            Self::KernelLoad => "sandboxes may not load kernel modules or kexec images; the process was killed",
            Self::Mount => "sandboxes may not mount a bpf file system; the process was killed",
            Self::Escaped => "the process left its sandbox's cgroup and stays bound to its sandbox; it asked for a socket and was killed",
            Self::CgroupMove => "the process moved itself out of its sandbox's cgroup and was killed",
            Self::TasksFull => "the guard could not bind a new process to its sandbox (too many processes); the parent was killed",
            Self::Clone => "sandboxes may not make processes that share a descriptor table without being threads, or that are born in another cgroup; the process was killed",
            Self::IoUring => "sandboxes may not use io_uring; the process was killed",
            Self::BindReserved => "sandboxes may not bind the ports of sluice's proxy and resolvers, so sluice can always start again on them; the bind was refused",
            Self::RuntimeResolver => "the container runtime's resolver (127.0.0.11) forwards to the host's resolvers; sandboxes resolve names only through sluice",
            Self::Unknown => "refused in the kernel",
        }
    }
}

/// A refused attempt, as user space reports it.
#[derive(Debug, Clone, Serialize)]
pub struct KernelEvent {
    pub sandbox_cgroup: u64,
    pub cgroup: u64,
    pub pid: u32,
    pub reason: RefusalReason,
    /// Destination, for refused sends, connects and packets.
    pub destination: Option<SocketAddr>,
    /// Socket family/type/protocol numbers, for refused sockets.
    pub socket: Option<(u16, u16, u16)>,
    /// The guard's detail: `bpf()` command, ptrace access mode, kernel
    /// load id.
    pub detail: Option<u32>,
}

impl RefusalReason {
    /// Whether the refusal came from the tamper guard rather than from the
    /// redirection.
    pub fn is_tamper(self) -> bool {
        matches!(
            self,
            Self::Bpf
                | Self::Ptrace
                | Self::PerfEvent
                | Self::KernelLoad
                | Self::Mount
                | Self::Escaped
                | Self::CgroupMove
                | Self::TasksFull
                | Self::Clone
                | Self::IoUring
        )
    }
}

impl From<&RefusedEvent> for KernelEvent {
    fn from(raw: &RefusedEvent) -> Self {
        let reason = RefusalReason::from_code(raw.reason);
        let (destination, socket, detail) = if matches!(reason, RefusalReason::Socket | RefusalReason::SocketKilled) {
            (None, Some((raw.family, raw.sock_type, raw.protocol)), None)
        } else if reason.is_tamper() {
            (None, None, Some(raw.detail))
        } else {
            (Some(SocketAddr::new(words_to_ip(raw.dst_ip), raw.dst_port)), None, None)
        };
        Self {
            sandbox_cgroup: raw.sandbox_cgroup,
            cgroup: raw.cgroup,
            pid: raw.pid,
            reason,
            destination,
            socket,
            detail,
        }
    }
}

/// Async reader of the ring buffer.
pub struct EventStream {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl EventStream {
    pub(super) fn new(ring: RingBuf<MapData>) -> Self {
        // SAFETY: the ring buffer owns its fd and the AsyncFd owns the ring
        // buffer, so the fd stays open for as long as it is registered.
        let ring = unsafe { AsyncFd::register(ring) }
            .map_err(|e| e.into_parts().1)
            .expect("ring buffer fd registers with the reactor");
        Self { ring }
    }

    /// Waits for the next batch of events.
    pub async fn next_batch(&mut self) -> std::io::Result<Vec<KernelEvent>> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(item) = ring.next() {
                if item.len() >= std::mem::size_of::<RefusedEvent>() {
                    // SAFETY: the kernel wrote a RefusedEvent; read unaligned.
                    let raw: RefusedEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    batch.push(KernelEvent::from(&raw));
                }
            }
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}
