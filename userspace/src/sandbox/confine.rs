//! What `sluice run` does to a command between fork and exec so that,
//! root or not, it can neither switch enforcement off nor read what sluice
//! guards: whom it runs as, its own cgroup and mount namespaces with
//! sluice's state hidden, a capability bounding set without what reaches
//! the enforcer or the kernel, and the seccomp filter.
//!
//! Everything that allocates or reads files happens in [`Confinement::new`],
//! in the parent; [`Confinement::apply`] runs in the forked child and makes
//! only async-signal-safe system calls, in this order:
//! 1. enter the sandbox cgroup;
//! 2. `unshare(CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWPID)`: the sandbox
//!    cgroup becomes the root of the command's cgroup namespace, and the
//!    command gets a pid namespace of its own; then fork: the parent stays
//!    outside, waits and passes signals on (`init::keep_until`), the child
//!    is the namespace's pid 1, mounts its own `/proc` (only the sandbox's
//!    processes in it) and goes on below, then executes `sluice-init`
//!    ([`super::init`]), which runs the command;
//! 3. make every mount private, `/sys`, `/proc/sys` and
//!    `/proc/sysrq-trigger` read-only (no `uevent_helper`, `core_pattern`
//!    or sysrq to run code outside the sandbox);
//! 4. mount a fresh cgroup2 over each cgroup2 mount point: the command sees
//!    its own subtree only;
//! 5. hide sluice's state: an empty read-only tmpfs (mode 000) over every
//!    bpffs, tracefs and debugfs mount and `/sys/fs/bpf`, over the secrets
//!    directory and every sluice runtime directory (keys, control socket,
//!    state), with the sandbox's own CA bundle bound back read-only;
//!    `/dev/null` over the secrets file, the decision log and every block
//!    device node (a raw disk would show the secrets file);
//! 6. drop [`dropped_capabilities`] from the bounding set, so that nothing
//!    run later (setuid `sudo` included) gets them back;
//! 7. install the seccomp filter (as root, so without `no_new_privs`);
//! 8. switch to the user (groups, gid, uid: every capability goes), or with
//!    `--as-root` keep only [`KEPT_CAPABILITIES`] in the effective,
//!    permitted and inheritable sets; the ambient set is emptied.

use std::{
    ffi::{CStr, CString, OsStr},
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

/// Capabilities (numbers from `linux/capability.h`) by name.
pub const CAPABILITIES: &[(&str, u32)] = &[
    ("CAP_CHOWN", 0),
    ("CAP_DAC_OVERRIDE", 1),
    ("CAP_DAC_READ_SEARCH", 2),
    ("CAP_FOWNER", 3),
    ("CAP_FSETID", 4),
    ("CAP_KILL", 5),
    ("CAP_SETGID", 6),
    ("CAP_SETUID", 7),
    ("CAP_SETPCAP", 8),
    ("CAP_LINUX_IMMUTABLE", 9),
    ("CAP_NET_BIND_SERVICE", 10),
    ("CAP_NET_BROADCAST", 11),
    ("CAP_NET_ADMIN", 12),
    ("CAP_NET_RAW", 13),
    ("CAP_IPC_LOCK", 14),
    ("CAP_IPC_OWNER", 15),
    ("CAP_SYS_MODULE", 16),
    ("CAP_SYS_RAWIO", 17),
    ("CAP_SYS_CHROOT", 18),
    ("CAP_SYS_PTRACE", 19),
    ("CAP_SYS_PACCT", 20),
    ("CAP_SYS_ADMIN", 21),
    ("CAP_SYS_BOOT", 22),
    ("CAP_SYS_NICE", 23),
    ("CAP_SYS_RESOURCE", 24),
    ("CAP_SYS_TIME", 25),
    ("CAP_SYS_TTY_CONFIG", 26),
    ("CAP_MKNOD", 27),
    ("CAP_LEASE", 28),
    ("CAP_AUDIT_WRITE", 29),
    ("CAP_AUDIT_CONTROL", 30),
    ("CAP_SETFCAP", 31),
    ("CAP_MAC_OVERRIDE", 32),
    ("CAP_MAC_ADMIN", 33),
    ("CAP_SYSLOG", 34),
    ("CAP_WAKE_ALARM", 35),
    ("CAP_BLOCK_SUSPEND", 36),
    ("CAP_AUDIT_READ", 37),
    ("CAP_PERFMON", 38),
    ("CAP_BPF", 39),
    ("CAP_CHECKPOINT_RESTORE", 40),
];

/// What root inside a sandbox keeps: what package managers, `sudo`, file
/// ownership and low ports need. Everything else, including capabilities
/// newer kernels add, is dropped. Against Docker's default set this lacks
/// `CAP_MKNOD` (a device node for the host's disk) and `CAP_NET_RAW` (raw
/// sockets are refused anyway), and has `CAP_IPC_LOCK` and `CAP_LEASE`,
/// which reach nothing of the host. `CAP_SYS_CHROOT` stays for build tools:
/// a chroot uncovers no mount, and mounting is refused.
pub const KEPT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_IPC_LOCK",
    "CAP_SYS_CHROOT",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

/// The capability numbers kept, as a mask.
pub fn kept_mask() -> u64 {
    CAPABILITIES.iter().filter(|(name, _)| KEPT_CAPABILITIES.contains(name)).fold(0, |mask, (_, n)| mask | 1 << n)
}

/// Capabilities dropped from a kernel whose highest is `last_cap`.
pub fn dropped_capabilities(last_cap: u32) -> Vec<u32> {
    let kept = kept_mask();
    (0..=last_cap.min(63)).filter(|n| kept & (1 << n) == 0).collect()
}

/// The kernel's highest capability number.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(40)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error(
        "sluice run was started as root without saying whom to run the command as: pass --user USER[:GROUP] \
         (sudo does this for you with the invoking user), or --as-root to run it as root (still without the \
         capabilities that reach sluice or the kernel)"
    )]
    NoIdentity,
    #[error("invalid --user {0:?}: expected USER[:GROUP], names or numeric ids")]
    Spec(String),
    #[error("no such user {0:?}")]
    NoUser(String),
    #[error("no such group {0:?}")]
    NoGroup(String),
    #[error("invalid {variable}={value:?} (set by sudo): expected a numeric id")]
    Sudo { variable: &'static str, value: String },
    #[error("cannot prepare the sandbox: {0}")]
    Path(String),
}

/// A user or group, by name or number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    Name(String),
    Id(u32),
}

impl Who {
    fn parse(text: &str) -> Option<Self> {
        if text.is_empty() || text.contains(['\0', ':']) {
            return None;
        }
        Some(text.parse().map_or_else(|_| Self::Name(text.to_owned()), Self::Id))
    }
}

/// `--user USER[:GROUP]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub user: Who,
    pub group: Option<Who>,
}

impl std::str::FromStr for UserSpec {
    type Err = ConfineError;

    fn from_str(text: &str) -> Result<Self, ConfineError> {
        let invalid = || ConfineError::Spec(text.to_owned());
        let (user, group) = match text.split_once(':') {
            Some((user, group)) => (user, Some(Who::parse(group).ok_or_else(invalid)?)),
            None => (text, None),
        };
        Ok(Self { user: Who::parse(user).ok_or_else(invalid)?, group })
    }
}

/// Whom the command runs as, before any lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    Root,
    User(UserSpec),
}

/// Picks whom to run as: `--as-root`, else `--user`, else the user who ran
/// sudo (`SUDO_UID`/`SUDO_GID`; root running sudo counts as nobody named).
pub fn choose(
    as_root: bool,
    user: Option<&UserSpec>,
    sudo_user: Option<&str>,
    sudo_group: Option<&str>,
) -> Result<RunAs, ConfineError> {
    if as_root {
        return Ok(RunAs::Root);
    }
    if let Some(spec) = user {
        return Ok(RunAs::User(spec.clone()));
    }
    let Some(uid) = sudo_user else { return Err(ConfineError::NoIdentity) };
    let id = |variable, value: &str| {
        value.parse::<u32>().map_err(|_| ConfineError::Sudo { variable, value: value.to_owned() })
    };
    let uid = id("SUDO_UID", uid)?;
    if uid == 0 {
        return Err(ConfineError::NoIdentity);
    }
    let group = sudo_group.map(|gid| id("SUDO_GID", gid)).transpose()?.map(Who::Id);
    Ok(RunAs::User(UserSpec { user: Who::Id(uid), group }))
}

/// A resolved account the command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the primary one included).
    pub groups: Vec<u32>,
    pub name: String,
    pub home: PathBuf,
}

impl Account {
    /// Looks the spec up in the user and group databases. A numeric user
    /// without an entry runs with its own number as group (give one with
    /// `USER:GROUP`), `/` as home and no other groups.
    pub fn resolve(spec: &UserSpec) -> Result<Self, ConfineError> {
        let entry = match &spec.user {
            Who::Name(name) => Some(passwd_by_name(name).ok_or_else(|| ConfineError::NoUser(name.clone()))?),
            Who::Id(uid) => passwd_by_uid(*uid),
        };
        let uid = match (&entry, &spec.user) {
            (Some(entry), _) => entry.uid,
            (None, Who::Id(uid)) => *uid,
            (None, Who::Name(name)) => return Err(ConfineError::NoUser(name.clone())),
        };
        let gid = match &spec.group {
            Some(Who::Id(gid)) => *gid,
            Some(Who::Name(name)) => group_by_name(name).ok_or_else(|| ConfineError::NoGroup(name.clone()))?,
            None => entry.as_ref().map_or(uid, |entry| entry.gid),
        };
        Ok(match entry {
            Some(entry) => Self { uid, gid, groups: group_list(&entry.name, gid), name: entry.name, home: entry.home },
            None => Self { uid, gid, groups: vec![gid], name: uid.to_string(), home: PathBuf::from("/") },
        })
    }
}

struct PasswdEntry {
    uid: u32,
    gid: u32,
    name: String,
    home: PathBuf,
}

/// `getpwnam_r` / `getpwuid_r`, growing the buffer as the C library asks.
fn passwd_lookup(
    call: impl Fn(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> libc::c_int,
) -> Option<PasswdEntry> {
    let mut size = 1024;
    loop {
        let mut buffer = vec![0 as libc::c_char; size];
        // SAFETY: zeroed plain C struct, filled in by the call.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        let rc = call(&raw mut entry, buffer.as_mut_ptr(), size, &raw mut found);
        if rc == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        if rc != 0 || found.is_null() {
            return None;
        }
        // SAFETY: on success the strings point into `buffer`, still alive.
        let (name, home) = unsafe { (CStr::from_ptr(entry.pw_name), CStr::from_ptr(entry.pw_dir)) };
        return Some(PasswdEntry {
            uid: entry.pw_uid,
            gid: entry.pw_gid,
            name: name.to_string_lossy().into_owned(),
            home: PathBuf::from(OsStr::from_bytes(home.to_bytes())),
        });
    }
}

fn passwd_by_name(name: &str) -> Option<PasswdEntry> {
    let name = CString::new(name).ok()?;
    // SAFETY: valid pointers for the duration of the call.
    passwd_lookup(|entry, buffer, size, found| unsafe { libc::getpwnam_r(name.as_ptr(), entry, buffer, size, found) })
}

fn passwd_by_uid(uid: u32) -> Option<PasswdEntry> {
    // SAFETY: valid pointers for the duration of the call.
    passwd_lookup(|entry, buffer, size, found| unsafe { libc::getpwuid_r(uid, entry, buffer, size, found) })
}

fn group_by_name(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    let mut size = 1024;
    loop {
        let mut buffer = vec![0 as libc::c_char; size];
        // SAFETY: zeroed plain C struct, filled in by the call.
        let mut entry: libc::group = unsafe { std::mem::zeroed() };
        let mut found = std::ptr::null_mut();
        // SAFETY: valid pointers for the duration of the call.
        let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &raw mut entry, buffer.as_mut_ptr(), size, &raw mut found) };
        if rc == libc::ERANGE && size < 1 << 20 {
            size *= 4;
            continue;
        }
        return (rc == 0 && !found.is_null()).then_some(entry.gr_gid);
    }
}

/// The user's groups from the group database, `gid` first.
fn group_list(name: &str, gid: u32) -> Vec<u32> {
    let Ok(cname) = CString::new(name) else { return vec![gid] };
    let mut count: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; count as usize];
        // SAFETY: `groups` holds `count` entries.
        let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &raw mut count) };
        if rc >= 0 {
            groups.truncate(rc as usize);
            let mut list = vec![gid];
            list.extend(groups.into_iter().filter(|g| *g != gid));
            return list;
        }
        if count > 65_536 {
            return vec![gid];
        }
    }
}

/// sluice state a sandboxed command must not see.
#[derive(Debug, Clone, Default)]
pub struct Hidden {
    /// Runtime directories of the daemon (keys, control socket, state).
    pub runtime_dirs: Vec<PathBuf>,
    /// Files inside them the command must still read (its CA bundle).
    pub keep: Vec<PathBuf>,
    /// Files to blank (secrets file, decision log).
    pub files: Vec<PathBuf>,
    /// Directories to hide (secrets directory).
    pub dirs: Vec<PathBuf>,
}

/// One step of the mount set-up, with its paths ready for the child.
#[derive(Debug)]
enum MountStep {
    /// Bind the path onto itself and make it read-only, recursively.
    ReadOnly(CString),
    /// A fresh cgroup2 (rooted at the namespace's root cgroup) here.
    Cgroup2(CString),
    /// An empty read-only tmpfs, mode 000.
    Hide(CString),
    /// A read-only tmpfs with `keep` (absolute paths below `dir`) bound
    /// back read-only; `parents` are directories to make for them, in
    /// order.
    HideExcept { dir: CString, parents: Vec<CString>, keep: Vec<CString> },
    /// `/dev/null` over a file.
    Blank(CString),
    /// A file bound read-only over another (a resolv.conf).
    BindFile { source: CString, target: CString },
}

/// Everything the child does between fork and exec, prepared.
#[derive(Debug)]
pub struct Confinement {
    cgroup_procs: CString,
    mounts: Vec<MountStep>,
    drop_bounding: Vec<u32>,
    filter: Vec<libc::sock_filter>,
    /// Switch to this user; None: stay root with the kept capabilities.
    user: Option<(u32, u32, Vec<libc::gid_t>)>,
}

fn cstring(path: &Path) -> Result<CString, ConfineError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ConfineError::Path(format!("{} has a NUL", path.display())))
}

/// Mount points and file system types from `/proc/self/mountinfo` text.
pub fn mounts_of(mountinfo: &str) -> Vec<(PathBuf, String)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let point = before.split(' ').nth(4)?;
            let fstype = after.split(' ').next()?;
            Some((PathBuf::from(unescape_mountinfo(point)), fstype.to_owned()))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Some(value) =
                std::str::from_utf8(&bytes[i + 1..i + 4]).ok().and_then(|o| u8::from_str_radix(o, 8).ok())
            {
                out.push(value);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Block device nodes under /dev (one level of subdirectories too, e.g.
/// /dev/mapper), not following symlinks.
fn block_devices() -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt as _;
    let mut found = Vec::new();
    let mut scan = |dir: &Path, deeper: bool| -> Vec<PathBuf> {
        let mut subdirs = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_block_device() {
                found.push(entry.path());
            } else if deeper
                && kind.is_dir()
                && !["pts", "shm", "mqueue", "hugepages"].contains(&&*entry.file_name().to_string_lossy())
            {
                subdirs.push(entry.path());
            }
        }
        subdirs
    };
    for subdir in scan(Path::new("/dev"), true) {
        scan(&subdir, false);
    }
    found
}

/// Runtime directories of every sluice instance on the host: a directory
/// in /run with a `keys` directory or a control socket.
pub fn sluice_runtime_dirs() -> Vec<PathBuf> {
    std::fs::read_dir("/run")
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.join("keys").is_dir() || path.join("control.sock").exists())
        .collect()
}

impl Confinement {
    /// Prepares the confinement of a command entering `cgroup` as `who`
    /// (None: root with the kept capabilities).
    pub fn new(
        cgroup: &Path,
        who: Option<&Account>,
        hidden: &Hidden,
        resolv_conf: Option<&Path>,
    ) -> Result<Self, ConfineError> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| ConfineError::Path(format!("reading /proc/self/mountinfo: {e}")))?;
        let mounts = mounts_of(&mountinfo);
        let mut steps = Vec::new();
        for path in ["/sys", "/proc/sys", "/proc/sysrq-trigger"] {
            if Path::new(path).exists() {
                steps.push(MountStep::ReadOnly(cstring(Path::new(path))?));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (point, fstype) in &mounts {
            if fstype == "cgroup2" && seen.insert(point.clone()) {
                steps.push(MountStep::Cgroup2(cstring(point)?));
            }
        }
        let mut hide: Vec<PathBuf> = vec![PathBuf::from(crate::datapath::BPFFS)];
        hide.extend(
            mounts
                .iter()
                .filter(|(_, fstype)| ["bpf", "tracefs", "debugfs"].contains(&&**fstype))
                .map(|(p, _)| p.clone()),
        );
        hide.extend(["/sys/kernel/tracing", "/sys/kernel/debug"].map(PathBuf::from));
        hide.extend(hidden.dirs.iter().cloned());
        let mut hidden_so_far = std::collections::BTreeSet::new();
        for dir in hide {
            // Below another hidden directory it is gone already.
            if dir.is_dir() && !hidden_so_far.iter().any(|h: &PathBuf| dir.starts_with(h)) {
                steps.push(MountStep::Hide(cstring(&dir)?));
                hidden_so_far.insert(dir);
            }
        }
        let mut runtime_dirs: Vec<PathBuf> = hidden.runtime_dirs.clone();
        runtime_dirs.extend(sluice_runtime_dirs());
        runtime_dirs.sort();
        runtime_dirs.dedup();
        for dir in runtime_dirs.iter().filter(|d| d.is_dir()) {
            let keep: Vec<&PathBuf> = hidden.keep.iter().filter(|k| k.starts_with(dir) && k.is_file()).collect();
            let mut parents = Vec::new();
            for file in &keep {
                let mut chain: Vec<&Path> = file.ancestors().skip(1).take_while(|a| *a != dir.as_path()).collect();
                chain.reverse();
                for parent in chain {
                    let parent = cstring(parent)?;
                    if !parents.contains(&parent) {
                        parents.push(parent);
                    }
                }
            }
            let keep = keep.into_iter().map(|k| cstring(k)).collect::<Result<_, _>>()?;
            steps.push(MountStep::HideExcept { dir: cstring(dir)?, parents, keep });
        }
        let blank = hidden.files.iter().cloned().chain(block_devices());
        for file in blank {
            if file.exists() && !file.is_dir() && !runtime_dirs.iter().any(|d| file.starts_with(d)) {
                steps.push(MountStep::Blank(cstring(&file)?));
            }
        }
        if let Some(source) = resolv_conf {
            let source = std::path::absolute(source).map_err(|e| ConfineError::Path(e.to_string()))?;
            steps.push(MountStep::BindFile { source: cstring(&source)?, target: c"/etc/resolv.conf".to_owned() });
        }
        Ok(Self {
            cgroup_procs: cstring(&cgroup.join("cgroup.procs"))?,
            mounts: steps,
            drop_bounding: dropped_capabilities(last_capability()),
            filter: super::seccomp::filter(),
            user: who.map(|a| (a.uid, a.gid, a.groups.clone())),
        })
    }

    /// Confines the calling process. Meant for `pre_exec`: only
    /// async-signal-safe system calls, no allocation.
    pub fn apply(&self) -> std::io::Result<()> {
        enter_cgroup(&self.cgroup_procs)?;
        // SAFETY: plain syscalls with valid arguments throughout.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWCGROUP | libc::CLONE_NEWPID))?;
            super::init::install_forwarding();
            match libc::fork() {
                -1 => return Err(std::io::Error::last_os_error()),
                0 => {}
                init => super::init::keep_until(init),
            }
            // From here on: pid 1 of the new pid namespace, which ends
            // with the process that waits for it (a parent outside the
            // namespace cannot be checked for: getppid() says 0).
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
            // Private first, so that nothing mounted below reaches the host.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            check(libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ))?;
        }
        for step in &self.mounts {
            step.apply()?;
        }
        for cap in &self.drop_bounding {
            // SAFETY: plain syscall.
            check(unsafe { libc::prctl(PR_CAPBSET_DROP, libc::c_ulong::from(*cap), 0, 0, 0) })?;
        }
        super::seccomp::install(&self.filter)?;
        // SAFETY: plain syscalls; raw ones, so only this (the only) thread
        // changes credentials.
        unsafe {
            if let Some((uid, gid, groups)) = &self.user {
                check_long(libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()))?;
                check_long(libc::syscall(libc::SYS_setresgid, *gid, *gid, *gid))?;
                check_long(libc::syscall(libc::SYS_setresuid, *uid, *uid, *uid))?;
            } else {
                let kept = kept_mask();
                let header = CapHeader { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
                let low = kept as u32;
                let high = (kept >> 32) as u32;
                let data = [
                    CapData { effective: low, permitted: low, inheritable: low },
                    CapData { effective: high, permitted: high, inheritable: high },
                ];
                check_long(libc::syscall(libc::SYS_capset, &raw const header, data.as_ptr()))?;
            }
            check(libc::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0))?;
            // Again: the credential change cleared it.
            check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
        }
        Ok(())
    }
}

const PR_CAPBSET_DROP: libc::c_int = 24;
const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const MOUNT_ATTR_RDONLY: u64 = 1;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn check_long(rc: libc::c_long) -> std::io::Result<()> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Nothing there is nothing to hide.
fn missing_is_fine(result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

const HIDDEN_FLAGS: libc::c_ulong = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

impl MountStep {
    fn apply(&self) -> std::io::Result<()> {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: plain syscalls with valid, NUL-terminated paths.
        unsafe {
            match self {
                Self::ReadOnly(path) => {
                    check(libc::mount(path.as_ptr(), path.as_ptr(), null, libc::MS_BIND | libc::MS_REC, null.cast()))?;
                    let attr = MountAttr { attr_set: MOUNT_ATTR_RDONLY, attr_clr: 0, propagation: 0, userns_fd: 0 };
                    check_long(libc::syscall(
                        libc::SYS_mount_setattr,
                        libc::AT_FDCWD,
                        path.as_ptr(),
                        libc::AT_RECURSIVE as libc::c_uint,
                        &raw const attr,
                        std::mem::size_of::<MountAttr>(),
                    ))
                }
                Self::Cgroup2(path) => {
                    // The kernel refuses the same file system twice on one
                    // mount point: take the host's view away first (in
                    // this mount namespace only).
                    check(libc::umount2(path.as_ptr(), libc::MNT_DETACH))?;
                    check(libc::mount(
                        c"cgroup2".as_ptr(),
                        path.as_ptr(),
                        c"cgroup2".as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                        null.cast(),
                    ))
                }
                Self::Hide(path) => missing_is_fine(check(libc::mount(
                    c"tmpfs".as_ptr(),
                    path.as_ptr(),
                    c"tmpfs".as_ptr(),
                    HIDDEN_FLAGS,
                    c"mode=000,size=4k,nr_inodes=1".as_ptr().cast(),
                ))),
                Self::HideExcept { dir, parents, keep } => hide_except(dir, parents, keep),
                Self::Blank(path) => missing_is_fine(check(libc::mount(
                    c"/dev/null".as_ptr(),
                    path.as_ptr(),
                    null,
                    libc::MS_BIND,
                    null.cast(),
                ))),
                Self::BindFile { source, target } => {
                    check(libc::mount(source.as_ptr(), target.as_ptr(), null, libc::MS_BIND, null.cast()))?;
                    check(libc::mount(
                        null,
                        target.as_ptr(),
                        null,
                        libc::MS_REMOUNT | libc::MS_BIND | HIDDEN_FLAGS,
                        null.cast(),
                    ))
                }
            }
        }
    }
}

/// `/proc/self/fd/N` for a descriptor, written into `buffer` without
/// allocating.
fn proc_fd_path(fd: libc::c_int, buffer: &mut [u8; 32]) -> *const libc::c_char {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buffer[..PREFIX.len()].copy_from_slice(PREFIX);
    let mut digits = [0u8; 10];
    let mut n = fd.unsigned_abs();
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..count {
        buffer[PREFIX.len() + i] = digits[count - 1 - i];
    }
    buffer[PREFIX.len() + count] = 0;
    buffer.as_ptr().cast()
}

/// Covers `dir` with a tmpfs and binds the `keep` files back read-only:
/// they are opened (`O_PATH`) before the cover, so they stay reachable
/// through /proc/self/fd.
fn hide_except(dir: &CStr, parents: &[CString], keep: &[CString]) -> std::io::Result<()> {
    const MAX_KEPT: usize = 8;
    let null = std::ptr::null::<libc::c_char>();
    let mut fds = [-1 as libc::c_int; MAX_KEPT];
    for (slot, path) in fds.iter_mut().zip(keep) {
        // SAFETY: plain syscall with a valid path.
        *slot = unsafe { libc::open(path.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    }
    let close_all = |fds: &[libc::c_int]| {
        for fd in fds.iter().filter(|fd| **fd >= 0) {
            // SAFETY: our own descriptors.
            unsafe { libc::close(*fd) };
        }
    };
    let result = (|| {
        // SAFETY: plain syscalls with valid, NUL-terminated paths.
        unsafe {
            check(libc::mount(
                c"tmpfs".as_ptr(),
                dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"mode=755,size=64k,nr_inodes=64".as_ptr().cast(),
            ))?;
            for parent in parents {
                if libc::mkdir(parent.as_ptr(), 0o755) < 0 && *libc::__errno_location() != libc::EEXIST {
                    return Err(std::io::Error::last_os_error());
                }
                // Whatever the umask: the user must get through to the file.
                check(libc::chmod(parent.as_ptr(), 0o755))?;
            }
            for (fd, path) in fds.iter().zip(keep) {
                if *fd < 0 {
                    continue;
                }
                let placeholder = libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o644);
                if placeholder < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(placeholder);
                let mut buffer = [0u8; 32];
                let source = proc_fd_path(*fd, &mut buffer);
                check(libc::mount(source, path.as_ptr(), null, libc::MS_BIND, null.cast()))?;
                check(libc::mount(
                    null,
                    path.as_ptr(),
                    null,
                    libc::MS_REMOUNT | libc::MS_BIND | HIDDEN_FLAGS,
                    null.cast(),
                ))?;
            }
            check(libc::mount(
                null,
                dir.as_ptr(),
                null,
                libc::MS_REMOUNT | HIDDEN_FLAGS,
                c"mode=755,size=64k,nr_inodes=64".as_ptr().cast(),
            ))
        }
    })();
    close_all(&fds);
    result
}

/// Moves the calling (freshly forked) process into the cgroup: writing "0"
/// to cgroup.procs means "me".
fn enter_cgroup(procs: &CStr) -> std::io::Result<()> {
    // SAFETY: open/write/close are async-signal-safe; the path is valid.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let error = std::io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(error);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_specs_parse_names_and_ids() {
        let spec: UserSpec = "alice".parse().unwrap();
        assert_eq!(spec, UserSpec { user: Who::Name("alice".into()), group: None });
        let spec: UserSpec = "1000:100".parse().unwrap();
        assert_eq!(spec, UserSpec { user: Who::Id(1000), group: Some(Who::Id(100)) });
        let spec: UserSpec = "bob:staff".parse().unwrap();
        assert_eq!(spec, UserSpec { user: Who::Name("bob".into()), group: Some(Who::Name("staff".into())) });
        for bad in ["", ":", "alice:", ":staff", "a:b:c", "a\0b"] {
            assert!(bad.parse::<UserSpec>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn whom_to_run_as() {
        let alice: UserSpec = "alice".parse().unwrap();
        assert_eq!(choose(true, None, Some("1000"), None).unwrap(), RunAs::Root);
        assert_eq!(choose(false, Some(&alice), Some("1000"), Some("1000")).unwrap(), RunAs::User(alice));
        assert_eq!(
            choose(false, None, Some("1000"), Some("50")).unwrap(),
            RunAs::User(UserSpec { user: Who::Id(1000), group: Some(Who::Id(50)) })
        );
        // Root with nothing said, or root running sudo: refused, naming both flags.
        for (uid, gid) in [(None, None), (Some("0"), Some("0"))] {
            let error = choose(false, None, uid, gid).unwrap_err().to_string();
            assert!(error.contains("--user") && error.contains("--as-root"), "{error}");
        }
        assert!(matches!(choose(false, None, Some("x"), None), Err(ConfineError::Sudo { .. })));
    }

    #[test]
    fn accounts_resolve_from_the_user_database() {
        let root = Account::resolve(&"root".parse().unwrap()).unwrap();
        assert_eq!((root.uid, root.gid, root.name.as_str()), (0, 0, "root"));
        assert_eq!(root.groups[0], 0);
        let numeric = Account::resolve(&"4000123:4000124".parse().unwrap()).unwrap();
        assert_eq!((numeric.uid, numeric.gid, numeric.groups.clone()), (4_000_123, 4_000_124, vec![4_000_124]));
        assert_eq!(numeric.home, PathBuf::from("/"));
        assert!(matches!(Account::resolve(&"no-such-user-sluice".parse().unwrap()), Err(ConfineError::NoUser(_))));
        assert!(matches!(
            Account::resolve(&"root:no-such-group-sluice".parse().unwrap()),
            Err(ConfineError::NoGroup(_))
        ));
    }

    #[test]
    fn the_capabilities_that_reach_sluice_or_the_kernel_are_dropped() {
        let dropped = dropped_capabilities(40);
        let number = |name: &str| CAPABILITIES.iter().find(|(n, _)| *n == name).unwrap().1;
        for name in [
            "CAP_SYS_ADMIN",
            "CAP_BPF",
            "CAP_PERFMON",
            "CAP_NET_ADMIN",
            "CAP_SYS_PTRACE",
            "CAP_SYS_MODULE",
            "CAP_SYS_RAWIO",
            "CAP_SYS_BOOT",
            "CAP_SYS_TIME",
            "CAP_MAC_ADMIN",
            "CAP_MAC_OVERRIDE",
            "CAP_SYSLOG",
            "CAP_SYS_RESOURCE",
            "CAP_DAC_READ_SEARCH",
            "CAP_LINUX_IMMUTABLE",
            "CAP_CHECKPOINT_RESTORE",
            "CAP_NET_RAW",
            "CAP_MKNOD",
            "CAP_AUDIT_CONTROL",
            "CAP_IPC_OWNER",
        ] {
            assert!(dropped.contains(&number(name)), "{name} is kept");
        }
        for name in KEPT_CAPABILITIES {
            assert!(!dropped.contains(&number(name)), "{name} is dropped");
        }
        // A capability a newer kernel adds is dropped too.
        assert!(dropped_capabilities(41).contains(&41));
        assert_eq!(kept_mask().count_ones() as usize, KEPT_CAPABILITIES.len());
    }

    #[test]
    fn mountinfo_names_mount_points_and_types() {
        let text = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                    50 22 0:44 / /sys/fs/bpf rw,nosuid shared:2 - bpf bpf rw,mode=700\n\
                    51 22 0:45 / /mnt/with\\040space rw - tmpfs tmpfs rw\n";
        let mounts = mounts_of(text);
        assert_eq!(mounts[0], (PathBuf::from("/sys/fs/cgroup/unified"), "cgroup2".to_owned()));
        assert_eq!(mounts[1], (PathBuf::from("/sys/fs/bpf"), "bpf".to_owned()));
        assert_eq!(mounts[2].0, PathBuf::from("/mnt/with space"));
    }

    #[test]
    fn proc_fd_paths_are_written_without_allocating() {
        let mut buffer = [0u8; 32];
        for (fd, text) in [(0, "/proc/self/fd/0"), (7, "/proc/self/fd/7"), (1234, "/proc/self/fd/1234")] {
            let ptr = proc_fd_path(fd, &mut buffer);
            // SAFETY: proc_fd_path NUL-terminates within the buffer.
            assert_eq!(unsafe { CStr::from_ptr(ptr) }.to_str().unwrap(), text);
        }
    }
}
