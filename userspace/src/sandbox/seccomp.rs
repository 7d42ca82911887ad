//! The seccomp filter `sluice run` puts on a sandboxed command.
//!
//! It refuses (EPERM) what reaches sluice or the kernel rather than the
//! network: `bpf`, the ptrace family (`ptrace`, `process_vm_readv/writev`,
//! `pidfd_getfd`), `perf_event_open`, loading kernels and modules, every
//! mount API (so no fresh bpffs or cgroup2 can be mounted, and no hiding
//! mount of `sluice run` can be undone), `io_uring` (its socket operations
//! would bypass this filter and the kernel programs' syscall backstop), and
//! leaving the sandbox's cgroup namespace (`setns` into a cgroup or mount
//! namespace, `unshare`/`clone` of a new cgroup namespace). `clone3` gets
//! ENOSYS: its flags sit in memory a filter cannot read, and libc falls back
//! to `clone`, whose flags it can (what container runtimes do). It also
//! keeps `socket(2)` to Unix, IPv4, IPv6 and netlink, and refuses x32 and
//! foreign-architecture syscalls.
//!
//! The kernel programs already refuse raw and non-TCP/UDP IP sockets; the
//! socket family check gives packet, vsock and other non-IP sockets a clean
//! EPERM on kernels where the BPF LSM hook cannot be used (the cgroup-wide
//! `sys_enter` backstop would kill the process instead).
//!
//! `unshare(CLONE_NEWNS)` and new user namespaces stay allowed: with every
//! mount call refused a private mount namespace changes nothing, and tools
//! (build sandboxes, browsers) create them routinely.

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_EPERM: u32 = RET_ERRNO | libc::EPERM as u32;
const RET_ENOSYS: u32 = RET_ERRNO | libc::ENOSYS as u32;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// Offsets in `struct seccomp_data` (the low words of the arguments on a
/// little-endian machine).
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
const OFFSET_ARG0: u32 = 16;
const OFFSET_ARG1: u32 = 24;
/// `open_tree_attr(2)` (Linux 6.15); not in every libc yet.
const SYS_OPEN_TREE_ATTR: i64 = 467;

/// Syscalls refused outright, with why.
pub const REFUSED: &[(i64, &str)] = &[
    (libc::SYS_bpf, "bpf: detach or rewrite sluice's programs and maps"),
    (libc::SYS_ptrace, "ptrace: read or steer the daemon or other processes"),
    (libc::SYS_process_vm_readv, "read another process's memory"),
    (libc::SYS_process_vm_writev, "write another process's memory"),
    (libc::SYS_pidfd_getfd, "steal another process's descriptors"),
    (libc::SYS_perf_event_open, "perf: kernel and other processes' data"),
    (libc::SYS_kexec_load, "load another kernel"),
    (libc::SYS_kexec_file_load, "load another kernel"),
    (libc::SYS_init_module, "load kernel code"),
    (libc::SYS_finit_module, "load kernel code"),
    (libc::SYS_delete_module, "unload kernel code"),
    (libc::SYS_mount, "mount: bpffs, cgroup2, or undo a hiding mount"),
    (libc::SYS_umount2, "uncover what sluice hid"),
    (libc::SYS_fsopen, "new mount API"),
    (libc::SYS_fsmount, "new mount API"),
    (libc::SYS_fsconfig, "new mount API"),
    (libc::SYS_fspick, "new mount API"),
    (libc::SYS_move_mount, "new mount API"),
    (libc::SYS_open_tree, "new mount API: clone a mount"),
    (SYS_OPEN_TREE_ATTR, "new mount API: clone a mount"),
    (libc::SYS_mount_setattr, "new mount API: make a read-only mount writable"),
    (libc::SYS_pivot_root, "swap the root mount"),
    (libc::SYS_open_by_handle_at, "open files by handle, around hiding mounts"),
    (libc::SYS_io_uring_setup, "io_uring: socket operations outside this filter"),
    (libc::SYS_io_uring_enter, "io_uring"),
    (libc::SYS_io_uring_register, "io_uring"),
];

/// One instruction whose jumps name labels, resolved by [`assemble`].
enum Insn {
    Plain(libc::sock_filter),
    /// Jump to `then` if the condition holds, else fall through.
    JumpIf {
        op: u32,
        k: u32,
        then: &'static str,
    },
    Label(&'static str),
}

fn load(offset: u32) -> Insn {
    Insn::Plain(libc::sock_filter {
        code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
        jt: 0,
        jf: 0,
        k: offset,
    })
}

fn ret(k: u32) -> Insn {
    Insn::Plain(libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k })
}

fn if_eq(k: u32, then: &'static str) -> Insn {
    Insn::JumpIf { op: libc::BPF_JEQ, k, then }
}

fn if_any_bit(k: u32, then: &'static str) -> Insn {
    Insn::JumpIf { op: libc::BPF_JSET, k, then }
}

/// Resolves labels into classic BPF's forward jump offsets.
fn assemble(program: &[Insn]) -> Vec<libc::sock_filter> {
    let mut positions = std::collections::HashMap::new();
    let mut at = 0usize;
    for insn in program {
        match insn {
            Insn::Label(name) => {
                positions.insert(*name, at);
            }
            _ => at += 1,
        }
    }
    let mut out = Vec::with_capacity(at);
    for insn in program {
        match insn {
            Insn::Label(_) => {}
            Insn::Plain(filter) => out.push(*filter),
            Insn::JumpIf { op, k, then } => {
                let target = positions[then];
                let offset = target - out.len() - 1;
                let jt = u8::try_from(offset).expect("seccomp jump too long");
                out.push(libc::sock_filter { code: (libc::BPF_JMP | op | libc::BPF_K) as u16, jt, jf: 0, k: *k });
            }
        }
    }
    out
}

/// The filter program.
pub fn filter() -> Vec<libc::sock_filter> {
    let allowed_families = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK];
    let mut program = vec![
        load(OFFSET_ARCH),
        if_eq(AUDIT_ARCH_X86_64, "native"),
        ret(RET_KILL_PROCESS),
        Insn::Label("native"),
        load(OFFSET_NR),
        Insn::JumpIf { op: libc::BPF_JGE, k: X32_SYSCALL_BIT, then: "eperm" },
    ];
    for (nr, _) in REFUSED {
        program.push(if_eq(*nr as u32, "eperm"));
    }
    program.extend([
        if_eq(libc::SYS_clone3 as u32, "enosys"),
        if_eq(libc::SYS_socket as u32, "socket"),
        if_eq(libc::SYS_setns as u32, "setns"),
        // unshare(flags) and, on x86-64, clone(flags, ...): flags are arg0.
        if_eq(libc::SYS_unshare as u32, "new-namespace"),
        if_eq(libc::SYS_clone as u32, "new-namespace"),
        ret(RET_ALLOW),
        Insn::Label("socket"),
        load(OFFSET_ARG0),
    ]);
    for family in allowed_families {
        program.push(if_eq(family as u32, "allow"));
    }
    program.extend([
        ret(RET_EPERM),
        // setns(fd, nstype): 0 (whatever the fd is, e.g. the host's cgroup
        // or mount namespace, or a pidfd for all of them) or any flag set
        // that includes a cgroup or mount namespace.
        Insn::Label("setns"),
        load(OFFSET_ARG1),
        if_eq(0, "eperm"),
        if_any_bit((libc::CLONE_NEWCGROUP | libc::CLONE_NEWNS) as u32, "eperm"),
        ret(RET_ALLOW),
        Insn::Label("new-namespace"),
        load(OFFSET_ARG0),
        if_any_bit(libc::CLONE_NEWCGROUP as u32, "eperm"),
        Insn::Label("allow"),
        ret(RET_ALLOW),
        Insn::Label("eperm"),
        ret(RET_EPERM),
        Insn::Label("enosys"),
        ret(RET_ENOSYS),
    ]);
    assemble(&program)
}

/// Installs `filter` on the calling process. Async-signal-safe: meant for
/// `pre_exec`. Root (`CAP_SYS_ADMIN`) needs no `no_new_privs`, so setuid
/// programs in the sandbox (`sudo`) keep working; others get it set.
pub fn install(filter: &[libc::sock_filter]) -> std::io::Result<()> {
    let program = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr().cast_mut() };
    // SAFETY: prctl with a valid filter program that outlives the call.
    unsafe {
        let set = |p: &libc::sock_fprog| {
            libc::prctl(libc::PR_SET_SECCOMP, libc::SECCOMP_MODE_FILTER, std::ptr::from_ref(p) as libc::c_ulong, 0, 0)
        };
        if set(&program) == 0 {
            return Ok(());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || set(&program) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the classic BPF program on a seccomp_data-like input.
    fn evaluate(program: &[libc::sock_filter], arch: u32, nr: i64, args: [u32; 2]) -> u32 {
        assert!(program.len() < 4096, "the kernel takes at most 4096 instructions");
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let insn = program[pc];
            let class = u32::from(insn.code) & 0x07;
            match class {
                c if c == libc::BPF_LD => {
                    acc = match insn.k {
                        OFFSET_ARCH => arch,
                        OFFSET_NR => nr as u32,
                        OFFSET_ARG0 => args[0],
                        OFFSET_ARG1 => args[1],
                        other => panic!("unexpected load offset {other}"),
                    };
                    pc += 1;
                }
                c if c == libc::BPF_JMP => {
                    let op = u32::from(insn.code) & 0xf0;
                    let taken = match op {
                        o if o == libc::BPF_JEQ => acc == insn.k,
                        o if o == libc::BPF_JGE => acc >= insn.k,
                        o if o == libc::BPF_JSET => acc & insn.k != 0,
                        other => panic!("unexpected jump {other:#x}"),
                    };
                    pc += 1 + usize::from(if taken { insn.jt } else { insn.jf });
                }
                c if c == libc::BPF_RET => return insn.k,
                other => panic!("unexpected class {other}"),
            }
        }
    }

    fn native(nr: i64, args: [u32; 2]) -> u32 {
        evaluate(&filter(), AUDIT_ARCH_X86_64, nr, args)
    }

    #[test]
    fn only_ip_unix_and_netlink_sockets_pass() {
        let socket = libc::SYS_socket;
        for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK] {
            assert_eq!(native(socket, [family as u32, 0]), RET_ALLOW, "family {family}");
        }
        for family in [libc::AF_PACKET, libc::AF_VSOCK, libc::AF_BLUETOOTH, libc::AF_ALG, 0, 255] {
            assert_eq!(native(socket, [family as u32, 0]), RET_EPERM, "family {family}");
        }
        assert_eq!(native(libc::SYS_read, [0, 0]), RET_ALLOW);
        assert_eq!(evaluate(&filter(), AUDIT_ARCH_X86_64, i64::from(X32_SYSCALL_BIT) | socket, [17, 0]), RET_EPERM);
        assert_eq!(evaluate(&filter(), 0x4000_0003, socket, [2, 0]), RET_KILL_PROCESS);
    }

    #[test]
    fn what_reaches_sluice_or_the_kernel_is_refused() {
        for nr in [
            libc::SYS_bpf,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_pidfd_getfd,
            libc::SYS_perf_event_open,
            libc::SYS_kexec_load,
            libc::SYS_kexec_file_load,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_delete_module,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_fsopen,
            libc::SYS_fsmount,
            libc::SYS_fsconfig,
            libc::SYS_fspick,
            libc::SYS_move_mount,
            libc::SYS_open_tree,
            libc::SYS_mount_setattr,
            libc::SYS_pivot_root,
            libc::SYS_io_uring_setup,
            libc::SYS_io_uring_enter,
            libc::SYS_io_uring_register,
        ] {
            assert_eq!(native(nr, [0, 0]), RET_EPERM, "syscall {nr}");
        }
        // clone3 hides its flags from the filter: ENOSYS sends libc to clone.
        assert_eq!(native(libc::SYS_clone3, [0, 0]), RET_ENOSYS);
    }

    #[test]
    fn no_way_out_of_the_cgroup_namespace() {
        let cgroup = libc::CLONE_NEWCGROUP as u32;
        for nr in [libc::SYS_unshare, libc::SYS_clone] {
            assert_eq!(native(nr, [cgroup, 0]), RET_EPERM, "{nr} with CLONE_NEWCGROUP");
            assert_eq!(native(nr, [cgroup | libc::CLONE_NEWUSER as u32, 0]), RET_EPERM, "{nr} with a user ns too");
        }
        // A private mount namespace is harmless once mounting is refused;
        // fork-like clones and threads are ordinary.
        assert_eq!(native(libc::SYS_unshare, [libc::CLONE_NEWNS as u32, 0]), RET_ALLOW);
        assert_eq!(native(libc::SYS_clone, [libc::SIGCHLD as u32, 0]), RET_ALLOW);
        let thread =
            (libc::CLONE_VM | libc::CLONE_FS | libc::CLONE_FILES | libc::CLONE_SIGHAND | libc::CLONE_THREAD) as u32;
        assert_eq!(native(libc::SYS_clone, [thread, 0]), RET_ALLOW);
        // setns: any type (0), a cgroup or mount namespace, alone or among others.
        for nstype in [0, cgroup, libc::CLONE_NEWNS as u32, cgroup | libc::CLONE_NEWNET as u32] {
            assert_eq!(native(libc::SYS_setns, [3, nstype]), RET_EPERM, "setns type {nstype:#x}");
        }
        assert_eq!(native(libc::SYS_setns, [3, libc::CLONE_NEWNET as u32]), RET_ALLOW);
    }
}
