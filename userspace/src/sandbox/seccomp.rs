//! The seccomp filter `sluice run` puts on a sandboxed command: `socket(2)`
//! only for Unix, IPv4, IPv6 and netlink; no `io_uring` (its socket operation
//! would bypass the filter); no x32 or foreign-architecture syscalls.
//!
//! The kernel programs already refuse raw and non-TCP/UDP IP sockets; this
//! gives packet, vsock and other non-IP sockets a clean EPERM on kernels
//! where the BPF LSM hook cannot be used (the cgroup-wide `sys_enter`
//! backstop would kill the process instead).

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const RET_EPERM: u32 = 0x0005_0000 | libc::EPERM as u32;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// Offsets in `struct seccomp_data`.
const OFFSET_NR: u32 = 0;
const OFFSET_ARCH: u32 = 4;
const OFFSET_ARG0: u32 = 16;

fn load(offset: u32) -> libc::sock_filter {
    libc::sock_filter { code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16, jt: 0, jf: 0, k: offset }
}

fn jump(op: u32, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code: (libc::BPF_JMP | op | libc::BPF_K) as u16, jt, jf, k }
}

fn ret(k: u32) -> libc::sock_filter {
    libc::sock_filter { code: (libc::BPF_RET | libc::BPF_K) as u16, jt: 0, jf: 0, k }
}

/// The filter program. Jump offsets count instructions after the jump.
pub fn socket_filter() -> Vec<libc::sock_filter> {
    let allowed_families = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK];
    let mut program = vec![
        load(OFFSET_ARCH),
        jump(libc::BPF_JEQ, AUDIT_ARCH_X86_64, 1, 0),
        ret(RET_KILL_PROCESS),
        load(OFFSET_NR),
        jump(libc::BPF_JGE, X32_SYSCALL_BIT, 0, 1),
        ret(RET_EPERM),
        jump(libc::BPF_JEQ, libc::SYS_io_uring_setup as u32, 0, 1),
        ret(RET_EPERM),
        jump(libc::BPF_JEQ, libc::SYS_socket as u32, 1, 0),
        ret(RET_ALLOW),
        load(OFFSET_ARG0),
    ];
    let n = allowed_families.len() as u8;
    for (i, family) in allowed_families.iter().enumerate() {
        // On a match jump over the remaining checks and the EPERM return.
        program.push(jump(libc::BPF_JEQ, *family as u32, n - i as u8, 0));
    }
    program.push(ret(RET_EPERM));
    program.push(ret(RET_ALLOW));
    program
}

/// Installs `filter` on the calling process. Async-signal-safe: meant for
/// `pre_exec`. Root (`CAP_SYS_ADMIN`) needs no `no_new_privs`, so setuid
/// programs in the sandbox keep working; others get it set.
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
    fn evaluate(program: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let insn = program[pc];
            let class = u32::from(insn.code) & 0x07;
            match class {
                c if c == libc::BPF_LD => {
                    acc = match insn.k {
                        OFFSET_ARCH => arch,
                        OFFSET_NR => nr,
                        OFFSET_ARG0 => arg0,
                        other => panic!("unexpected load offset {other}"),
                    };
                    pc += 1;
                }
                c if c == libc::BPF_JMP => {
                    let op = u32::from(insn.code) & 0xf0;
                    let taken = if op == libc::BPF_JEQ { acc == insn.k } else { acc >= insn.k };
                    pc += 1 + usize::from(if taken { insn.jt } else { insn.jf });
                }
                c if c == libc::BPF_RET => return insn.k,
                other => panic!("unexpected class {other}"),
            }
        }
    }

    #[test]
    fn only_ip_unix_and_netlink_sockets_pass() {
        let program = socket_filter();
        let socket = libc::SYS_socket as u32;
        for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6, libc::AF_NETLINK] {
            assert_eq!(evaluate(&program, AUDIT_ARCH_X86_64, socket, family as u32), RET_ALLOW, "family {family}");
        }
        for family in [libc::AF_PACKET, libc::AF_VSOCK, libc::AF_BLUETOOTH, libc::AF_ALG, 0, 255] {
            assert_eq!(evaluate(&program, AUDIT_ARCH_X86_64, socket, family as u32), RET_EPERM, "family {family}");
        }
        assert_eq!(evaluate(&program, AUDIT_ARCH_X86_64, libc::SYS_read as u32, 0), RET_ALLOW);
        assert_eq!(evaluate(&program, AUDIT_ARCH_X86_64, libc::SYS_io_uring_setup as u32, 0), RET_EPERM);
        assert_eq!(evaluate(&program, AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | socket, 17), RET_EPERM);
        assert_eq!(evaluate(&program, 0x4000_0003, socket, 2), RET_KILL_PROCESS);
    }
}
