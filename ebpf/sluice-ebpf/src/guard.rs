//! The tamper guard: programs on the whole host (not a cgroup) that hold the
//! boundary whatever a sandboxed task's capabilities are — a root process
//! written into a sandbox by hand, a `--privileged` container, a command
//! whose seccomp filter was never applied.
//!
//! This kernel cannot load BPF LSM programs (lockdown refuses them), and has
//! no error injection for `fmod_ret`, so nothing here can make a system call
//! fail. What the guard does instead is kill, in `sys_enter`, a sandboxed
//! task that asks for something no sandbox may have. The call itself still
//! runs, once, and the task never returns to user space to use its result:
//! - `bpf()`: every attack on sluice's kernel objects needs at least two
//!   (get a link or map descriptor by pin or id, then detach or write), so
//!   the first kills the attacker before it holds a descriptor in user space;
//! - processes that share a descriptor table without being threads of one
//!   process (`clone(CLONE_FILES)`) and children born in another cgroup
//!   (`CLONE_INTO_CGROUP`) cannot be made, so no helper outlives the kill
//!   with the descriptor (threads die with their process), and `io_uring`,
//!   whose operations skip system call hooks, cannot be set up;
//! - tracing or reading a process outside its sandbox (`ptrace`,
//!   `process_vm_readv/writev`, `pidfd_getfd`), perf events, kernel modules
//!   and kexec images, and mounting a bpf file system.
//!
//! Every task forked or exec'd inside a sandbox is bound to it by a mark
//! under its thread group id (`TASKS`), kept by `sched_process_fork` and
//! `sched_process_exit`. A bound task that leaves its sandbox's cgroups is
//! killed when it moves itself, or at its next `socket()` when another task
//! moved it; its existing sockets stay enforced, as the cgroup programs
//! follow a socket's cgroup, not its user's. Every kill is an event, which
//! the daemon turns into a decision record.

use aya_ebpf::{
    bindings::bpf_pidns_info,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_ns_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user,
        bpf_probe_read_user_str_bytes, bpf_send_signal,
    },
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use core::ptr::read_volatile;
use sluice_common::{
    RefusedEvent, TaskMark, REASON_BPF, REASON_CGROUP_MOVE, REASON_CLONE, REASON_ESCAPED, REASON_IO_URING,
    REASON_KERNEL_LOAD, REASON_MOUNT, REASON_PERF, REASON_PTRACE, REASON_SOCKET_KILLED, REASON_TASKS_FULL,
};

use crate::{caller_of, count, emit, Caller, TASKS};

const SIGKILL: u32 = 9;
const AF_UNIX: i32 = 1;
const AF_INET: i32 = 2;
const AF_INET6: i32 = 10;
const AF_NETLINK: i32 = 16;
const CLONE_FILES: u64 = 0x400;
const CLONE_THREAD: u64 = 0x1_0000;
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
const PTRACE_TRACEME: u64 = 0;
/// `socketcall(2)`'s call number for `socket`.
const SYS_SOCKETCALL_SOCKET: u64 = 1;
/// `thread_info.status` (first in `task_struct` on x86_64) and its flag for
/// a 32-bit system call (`int 0x80`) made by any process.
const THREAD_INFO_STATUS_OFFSET: usize = 16;
const TS_COMPAT: u32 = 0x2;

/// The initial pid namespace (device and inode of its nsfs file), set by
/// user space: a tracer in another pid namespace names only tasks of that
/// namespace, a tracer in this one names host tasks, which are checked.
#[unsafe(no_mangle)]
static INIT_PIDNS_DEV: u64 = 0;
#[unsafe(no_mangle)]
static INIT_PIDNS_INO: u64 = 0;
/// Where `sched_process_fork`'s record holds `child_pid`, read by user
/// space from the tracepoint's format.
#[unsafe(no_mangle)]
static FORK_CHILD_PID_OFFSET: u32 = 44;

/// The system calls the guard looks at, whichever table they came through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Socket,
    SocketCall,
    Bpf,
    Ptrace,
    ProcessVm,
    PidfdGetfd,
    PerfEventOpen,
    KernelLoad,
    IoUring,
    Clone,
    Clone3,
    Mount,
    Exec,
}

/// x86_64 system call numbers.
fn call_64(id: u64) -> Option<Call> {
    Some(match id {
        41 => Call::Socket,
        321 => Call::Bpf,
        101 => Call::Ptrace,
        310 | 311 => Call::ProcessVm,
        438 => Call::PidfdGetfd,
        298 => Call::PerfEventOpen,
        175 | 176 | 313 | 246 | 320 => Call::KernelLoad,
        425 => Call::IoUring,
        56 => Call::Clone,
        435 => Call::Clone3,
        165 => Call::Mount,
        59 | 322 => Call::Exec,
        _ => return None,
    })
}

/// i386 numbers, for `int 0x80` from any process.
fn call_32(id: u64) -> Option<Call> {
    Some(match id {
        359 => Call::Socket,
        102 => Call::SocketCall,
        357 => Call::Bpf,
        26 => Call::Ptrace,
        347 | 348 => Call::ProcessVm,
        438 => Call::PidfdGetfd,
        336 => Call::PerfEventOpen,
        128 | 129 | 350 | 283 => Call::KernelLoad,
        425 => Call::IoUring,
        120 => Call::Clone,
        435 => Call::Clone3,
        21 => Call::Mount,
        11 | 358 => Call::Exec,
        _ => return None,
    })
}

/// The first system call arguments, from `pt_regs`, in the order of the
/// call's own table: x86_64 passes them in di, si, dx; i386 in bx, cx, dx.
struct Args([u64; 3]);

impl Args {
    /// # Safety
    /// `regs` is the tracepoint's BTF-typed `pt_regs` pointer.
    unsafe fn read(regs: *const u64, compat: bool) -> Self {
        // Word indices in x86_64 `struct pt_regs`.
        let (a, b, c) = if compat { (5, 11, 12) } else { (14, 13, 12) };
        Self([read_volatile(regs.add(a)), read_volatile(regs.add(b)), read_volatile(regs.add(c))])
    }
}

fn compat_call() -> bool {
    // SAFETY: thread_info is the first member of task_struct on x86_64; a
    // failed read counts as a 64-bit call.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let status = unsafe { bpf_probe_read_kernel(task.add(THREAD_INFO_STATUS_OFFSET).cast::<u32>()) };
    status.is_ok_and(|status| status & TS_COMPAT != 0)
}

fn tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

fn current_cgroup() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_get_current_cgroup_id() }
}

/// Where the calling task stands.
enum Standing {
    /// Not below an enforced parent and never bound to a sandbox.
    Host,
    /// Below a container cgroup the daemon exempted, and not bound.
    Exempt,
    /// In its sandbox (or an unregistered cgroup below an enforced parent,
    /// which the proxy denies as unknown): its sandbox id and counter slot.
    Sandboxed(u64, u32),
    /// Bound to a sandbox it is no longer in.
    Escaped(TaskMark),
}

impl Standing {
    /// The sandbox and slot a kill is recorded under.
    fn sandbox(&self) -> (u64, u32) {
        match self {
            Self::Sandboxed(id, slot) => (*id, *slot),
            Self::Escaped(mark) => (mark.sandbox_cgroup, mark.slot),
            Self::Host | Self::Exempt => (0, 0),
        }
    }
}

/// Walks the caller's cgroups and compares them with its mark. With `bind`,
/// a sandboxed task without a mark gets one, and a mark made before its
/// sandbox was registered is completed while the task is still where it was.
#[inline(always)]
fn standing(bind: bool) -> Standing {
    let tgid = tgid();
    // SAFETY: the value is copied out before the map can change it.
    let mark = unsafe { TASKS.get(tgid) }.copied();
    // SAFETY: plain helper calls.
    let caller = caller_of(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) });
    match (caller, mark) {
        (Caller::Outside, None) => Standing::Host,
        (Caller::Exempt, None) => Standing::Exempt,
        (Caller::Outside | Caller::Exempt, Some(mark)) => Standing::Escaped(mark),
        (Caller::Sandbox(id, entry), None) => {
            if bind {
                let mark = TaskMark { sandbox_cgroup: id, origin_cgroup: current_cgroup(), slot: entry.slot, _pad: 0 };
                let _ = TASKS.insert(tgid, mark, 0);
            }
            Standing::Sandboxed(id, entry.slot)
        }
        // Unregistered cgroups are denied everything by the proxy: still
        // confined, whatever the mark says.
        (Caller::Sandbox(0, entry), Some(_)) => Standing::Sandboxed(0, entry.slot),
        (Caller::Sandbox(id, entry), Some(mark)) if mark.sandbox_cgroup == id => Standing::Sandboxed(id, entry.slot),
        (Caller::Sandbox(id, entry), Some(mark)) if mark.sandbox_cgroup == 0 && mark.origin_cgroup == current_cgroup() => {
            if bind {
                let _ = TASKS.insert(tgid, TaskMark { sandbox_cgroup: id, slot: entry.slot, ..mark }, 0);
            }
            Standing::Sandboxed(id, entry.slot)
        }
        (Caller::Sandbox(..), Some(mark)) => Standing::Escaped(mark),
    }
}

/// Kills the calling process and records why.
#[inline(always)]
fn kill(standing: &Standing, reason: u8, detail: u32) {
    kill_with(standing, RefusedEvent { reason, detail, ..RefusedEvent::default() });
}

#[inline(always)]
fn kill_with(standing: &Standing, event: RefusedEvent) {
    let (sandbox, slot) = standing.sandbox();
    count(slot, |c| c.refused += 1);
    emit(sandbox, current_cgroup(), RefusedEvent { pid: tgid(), ..event });
    // SAFETY: plain helper call; the signal is delivered before the task
    // returns to user space.
    unsafe { bpf_send_signal(SIGKILL) };
}

/// Whether a socket of `family` is one no sandbox may have.
fn forbidden_family(family: i32) -> bool {
    !matches!(family, AF_UNIX | AF_INET | AF_INET6 | AF_NETLINK)
}

/// Whether the tracer may reach the task with thread group id `target`:
/// only tasks bound to its own (registered) sandbox. A tracer in a pid
/// namespace of its own names tasks of that namespace only.
#[inline(always)]
fn may_trace(sandbox: u64, target: u64) -> bool {
    let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: globals set by user space before load; `ns` is ours.
    let in_init_ns = unsafe {
        bpf_get_ns_current_pid_tgid(
            read_volatile(&INIT_PIDNS_DEV),
            read_volatile(&INIT_PIDNS_INO),
            &mut ns,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    } == 0;
    if !in_init_ns {
        return true;
    }
    // SAFETY: the value is copied out before the map can change it.
    let mark = unsafe { TASKS.get(target as u32) }.copied();
    sandbox != 0 && mark.is_some_and(|mark| mark.sandbox_cgroup == sandbox)
}

/// The clone flags of a `clone` or `clone3` call.
#[inline(always)]
fn clone_flags(call: Call, args: &Args) -> u64 {
    if call == Call::Clone {
        return args.0[0];
    }
    // clone3(struct clone_args *, size): flags are its first member. An
    // unreadable struct makes the call fail anyway.
    // SAFETY: a user pointer read through the helper.
    unsafe { bpf_probe_read_user(args.0[0] as *const u64) }.unwrap_or(0)
}

/// The family `socket()` asks for, through either entry.
#[inline(always)]
fn socket_family(call: Call, args: &Args) -> Option<i32> {
    match call {
        Call::Socket => Some(args.0[0] as i32),
        // socketcall(SYS_SOCKET, u32 args[3]).
        Call::SocketCall if args.0[0] == SYS_SOCKETCALL_SOCKET => {
            // SAFETY: a user pointer read through the helper.
            unsafe { bpf_probe_read_user(args.0[1] as *const u32) }.ok().map(|family| family as i32)
        }
        _ => None,
    }
}

/// Runs for every system call on the host; leaves at the first check for
/// all but the few above.
#[btf_tracepoint(function = "sys_enter")]
pub fn sluice_sys_enter(ctx: BtfTracePointContext) -> i32 {
    let id: i64 = ctx.arg(1);
    let id = id as u64;
    // Cheap filter first: the numbers above, in either table, are below
    // 439; compat is looked up only for those.
    if id > 438 {
        return 0;
    }
    let compat = compat_call();
    let Some(call) = (if compat { call_32(id) } else { call_64(id) }) else {
        return 0;
    };
    let regs: *const u64 = ctx.arg(0);
    // SAFETY: tp_btf arguments are BTF-typed pointers the verifier checks.
    let args = unsafe { Args::read(regs, compat) };
    guard(call, &args);
    0
}

#[inline(always)]
fn guard(call: Call, args: &Args) {
    let standing = standing(call == Call::Exec);
    let sandbox = match standing {
        Standing::Host => return,
        // Exempted containers sit below the enforced parent: a detached link
        // would free every sandbox, so they may not call bpf() either.
        Standing::Exempt => {
            if call == Call::Bpf {
                kill(&standing, REASON_BPF, args.0[0] as u32);
            }
            return;
        }
        Standing::Escaped(_) => {
            if socket_family(call, args).is_some() {
                kill(&standing, REASON_ESCAPED, 0);
                return;
            }
            None
        }
        Standing::Sandboxed(sandbox, _) => Some(sandbox),
    };
    match call {
        Call::Socket | Call::SocketCall => {
            if let Some(family) = socket_family(call, args) {
                if forbidden_family(family) {
                    let event = RefusedEvent {
                        reason: REASON_SOCKET_KILLED,
                        family: family as u16,
                        sock_type: (args.0[1] & 0xf) as u16,
                        ..RefusedEvent::default()
                    };
                    kill_with(&standing, event);
                }
            }
        }
        Call::Bpf => kill(&standing, REASON_BPF, args.0[0] as u32),
        Call::Ptrace => {
            let (request, target) = (args.0[0], args.0[1]);
            if request != PTRACE_TRACEME && !sandbox.is_some_and(|sandbox| may_trace(sandbox, target)) {
                kill(&standing, REASON_PTRACE, target as u32);
            }
        }
        Call::ProcessVm => {
            if !sandbox.is_some_and(|sandbox| may_trace(sandbox, args.0[0])) {
                kill(&standing, REASON_PTRACE, args.0[0] as u32);
            }
        }
        Call::PidfdGetfd => kill(&standing, REASON_PTRACE, 0),
        Call::PerfEventOpen => kill(&standing, REASON_PERF, 0),
        Call::KernelLoad => kill(&standing, REASON_KERNEL_LOAD, 0),
        Call::IoUring => kill(&standing, REASON_IO_URING, 0),
        Call::Clone | Call::Clone3 => {
            let flags = clone_flags(call, args);
            if (flags & CLONE_FILES != 0 && flags & CLONE_THREAD == 0) || flags & CLONE_INTO_CGROUP != 0 {
                kill(&standing, REASON_CLONE, flags as u32);
            }
        }
        Call::Mount => {
            let mut name = [0u8; 8];
            // SAFETY: a user pointer read through the helper.
            if let Ok(name) = unsafe { bpf_probe_read_user_str_bytes(args.0[2] as *const u8, &mut name) } {
                if name == b"bpf" {
                    kill(&standing, REASON_MOUNT, 0);
                }
            }
        }
        Call::Exec => {}
    }
}

/// `sched:sched_process_fork`, in the parent: a child of a bound or
/// sandboxed task is bound to the same sandbox, wherever it is born. A
/// child that cannot be bound (the map is full) takes its parent with it.
#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn sluice_guard_fork(ctx: TracePointContext) -> u32 {
    let mark = match standing(true) {
        Standing::Host | Standing::Exempt => return 0,
        Standing::Escaped(mark) => mark,
        Standing::Sandboxed(sandbox, slot) => {
            TaskMark { sandbox_cgroup: sandbox, origin_cgroup: current_cgroup(), slot, _pad: 0 }
        }
    };
    // SAFETY: the offset comes from the tracepoint's format.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(read_volatile(&FORK_CHILD_PID_OFFSET) as usize) }) else {
        return 0;
    };
    if TASKS.insert(child as u32, mark, 0).is_err() {
        kill(&Standing::Escaped(mark), REASON_TASKS_FULL, 0);
    }
    0
}

/// `sched_process_exit`, in the exiting task: the mark goes with the
/// thread group's leader.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sluice_guard_exit(_ctx: BtfTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if pid_tgid as u32 == (pid_tgid >> 32) as u32 {
        let _ = TASKS.remove(tgid());
    }
    0
}

/// `cgroup_attach_task(dst_cgrp, path, task, threadgroup)`, after a move: a
/// bound task that moved itself out of its sandbox is killed before it
/// returns to user space. (One moved by another is killed at its next
/// `socket()`.)
#[btf_tracepoint(function = "cgroup_attach_task")]
pub fn sluice_guard_cgroup_attach(ctx: BtfTracePointContext) -> i32 {
    let task: u64 = ctx.arg(2);
    // SAFETY: plain helper call.
    if task != unsafe { bpf_get_current_task() } {
        return 0;
    }
    // SAFETY: the value is only tested for presence.
    if unsafe { TASKS.get(tgid()) }.is_none() {
        return 0;
    }
    let standing = standing(false);
    if let Standing::Escaped(_) = standing {
        kill(&standing, REASON_CGROUP_MOVE, 0);
    }
    0
}
