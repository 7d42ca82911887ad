//! The first process of a `sluice run` sandbox's own pid namespace.
//!
//! The command must not see or name anything outside its sandbox: not the
//! daemon, not the user's other processes (their `environ`, `cmdline`, open
//! files). So [`super::confine::Confinement::apply`] puts it in a new pid
//! namespace, and this small init is that namespace's pid 1:
//!
//! - pid 1 of a namespace gets no signal it has no handler for, so a
//!   command running as pid 1 would ignore the `SIGTERM` that `sluice run`
//!   forwards; the init catches the forwarded signals and passes them on;
//! - it reaps every orphan, so nothing the command leaves behind piles up
//!   as zombies;
//! - when the command exits, the init exits with its status and the kernel
//!   ends whatever else still runs in the namespace: a sandbox does not
//!   outlive its command.
//!
//! It is the sluice binary itself, executed afresh (`sluice-init -- CMD`,
//! dispatched in `main` before anything else), so it holds none of the
//! memory of the `sluice run` that started it.

use std::{
    ffi::{CString, OsString},
    os::unix::ffi::OsStrExt as _,
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
};

/// `argv[0]` by which `main` recognises the init.
pub const ARGV0: &str = "sluice-init";

/// Signals passed on to the command (those `sluice run` forwards).
const FORWARDED: [libc::c_int; 7] =
    [libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1, libc::SIGUSR2, libc::SIGINT, libc::SIGQUIT, libc::SIGWINCH];

/// The command's pid, once it exists; 0 before.
static CHILD: AtomicI32 = AtomicI32::new(0);
/// With a terminal, keyboard signals reach the whole foreground group, the
/// command included: passing them on would deliver them twice.
static TTY: AtomicBool = AtomicBool::new(false);

extern "C" fn pass_on(signal: libc::c_int) {
    if TTY.load(Ordering::Relaxed) && (signal == libc::SIGINT || signal == libc::SIGQUIT) {
        return;
    }
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, signal) };
    }
}

/// Installs the handlers that pass [`FORWARDED`] signals on to the child
/// (once [`CHILD`] is set). Async-signal-safe: meant also for the forked
/// child of `sluice run` in `Confinement::apply`.
pub fn install_forwarding() {
    // SAFETY: plain syscalls; the handler only reads atomics and calls kill.
    unsafe {
        TTY.store(libc::isatty(0) == 1, Ordering::Relaxed);
        for signal in FORWARDED {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = pass_on as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut());
        }
    }
}

/// The part of `sluice run`'s child that stays outside the new pid
/// namespace (the namespace's init is its only child): holds no
/// descriptor beyond stdio (so `spawn` learns of the exec as usual), passes
/// signals on, and exits with the init's status. Async-signal-safe.
pub fn keep_until(child: libc::pid_t) -> ! {
    CHILD.store(child, Ordering::Relaxed);
    // SAFETY: plain syscalls.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        let code = wait_for(child);
        libc::_exit(libc::c_int::from(code))
    }
}

/// Waits for `child` alone and turns its status into an exit code.
fn wait_for(child: libc::pid_t) -> u8 {
    loop {
        let mut status = 0;
        // SAFETY: plain syscall.
        let pid = unsafe { libc::waitpid(child, &raw mut status, 0) };
        if pid == child {
            return exit_code(status);
        }
        if pid < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
}

fn exit_code(status: libc::c_int) -> u8 {
    if libc::WIFSIGNALED(status) {
        128u8.wrapping_add(libc::WTERMSIG(status) as u8)
    } else {
        libc::WEXITSTATUS(status) as u8
    }
}

/// Is this process the init? (`argv[0]` is [`ARGV0`].)
pub fn is_init(argv0: Option<&OsString>) -> bool {
    argv0.is_some_and(|a| a.as_bytes() == ARGV0.as_bytes())
}

/// Runs `argv` (after a leading `--`) as the namespace's only child and
/// returns the exit code for the whole sandbox: the command's, or 128 +
/// the signal that ended it; 127 when it cannot be found, 126 when it
/// cannot be run.
pub fn main(args: &[OsString]) -> u8 {
    let argv = match args.first().map(|a| a.as_bytes()) {
        Some(b"--") => &args[1..],
        _ => args,
    };
    let Some(program) = argv.first() else {
        eprintln!("sluice: {ARGV0}: no command");
        return 2;
    };
    let c_argv: Result<Vec<CString>, _> = argv.iter().map(|a| CString::new(a.as_bytes())).collect();
    let Ok(c_argv) = c_argv else {
        eprintln!("sluice: cannot run {}: an argument holds a NUL byte", program.to_string_lossy());
        return 126;
    };
    let mut pointers: Vec<*const libc::c_char> = c_argv.iter().map(|a| a.as_ptr()).collect();
    pointers.push(std::ptr::null());

    // Handlers first: a signal between fork and the store of CHILD is
    // caught (and, with no child yet, dropped) instead of ignored by the
    // kernel, and exec resets them to the default in the child.
    install_forwarding();
    // SAFETY: plain syscalls between fork and exec in the child.
    unsafe {
        let child = libc::fork();
        if child < 0 {
            eprintln!("sluice: {ARGV0}: fork: {}", std::io::Error::last_os_error());
            return 126;
        }
        if child == 0 {
            libc::execvp(pointers[0], pointers.as_ptr());
            let error = std::io::Error::last_os_error();
            eprintln!("sluice: cannot run {}: {error}", program.to_string_lossy());
            libc::_exit(if error.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 });
        }
        CHILD.store(child, Ordering::Relaxed);
        reap_until(child)
    }
}

/// Reaps every process that ends in the namespace until `child` does, and
/// turns its status into an exit code.
fn reap_until(child: libc::pid_t) -> u8 {
    loop {
        let mut status = 0;
        // SAFETY: plain syscall.
        let pid = unsafe { libc::waitpid(-1, &raw mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // No child left without having seen ours end: cannot happen,
            // but never spin.
            return 1;
        }
        if pid == child && (libc::WIFEXITED(status) || libc::WIFSIGNALED(status)) {
            return exit_code(status);
        }
    }
}
