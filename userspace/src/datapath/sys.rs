//! Host facts the datapath needs: where bpffs, tracefs and cgroup v2 are
//! mounted, the initial pid namespace, a tracepoint's record layout.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use super::DatapathError;

/// Where sluice pins its programs and maps.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where the guard's fork tracepoint is found.
const TRACEFS: &str = "/sys/kernel/tracing";
const TRACEFS_MAGIC: i64 = 0x7472_6163;

/// Mounts bpffs at [`BPFFS`] if nothing is mounted there yet (a fresh
/// machine of this kind has none), so pins can outlive the daemon.
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    ensure_mounted(BPFFS, "bpf", BPF_FS_MAGIC)
}

fn ensure_mounted(point: &str, fs: &str, magic: i64) -> Result<(), DatapathError> {
    if fs_magic(Path::new(point)) == Some(magic) {
        return Ok(());
    }
    std::fs::create_dir_all(point).map_err(|source| DatapathError::Io { what: format!("creating {point}"), source })?;
    let target = CString::new(point).expect("no NUL");
    let fstype = CString::new(fs).expect("no NUL");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(DatapathError::Io {
            what: format!("mounting {fs} at {point} (sluice needs root)"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Device and inode of the initial pid namespace (this daemon's), as the
/// kernel's `bpf_get_ns_current_pid_tgid` compares them.
pub fn init_pid_namespace() -> Result<(u64, u64), DatapathError> {
    use std::os::unix::fs::MetadataExt as _;
    let ns = std::fs::metadata("/proc/self/ns/pid")
        .map_err(|source| DatapathError::Io { what: "reading /proc/self/ns/pid".into(), source })?;
    Ok((ns.dev(), ns.ino()))
}

/// The cookie of this process's network namespace (the host's), as the
/// kernel's `bpf_get_netns_cookie` returns it (`SO_NETNS_COOKIE`).
pub fn init_netns_cookie() -> Result<u64, DatapathError> {
    use std::os::fd::AsRawFd as _;
    let io = |what: &str| {
        let what = what.to_owned();
        move |source| DatapathError::Io { what, source }
    };
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io("opening a socket for the netns cookie"))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are ours and sized for the option.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io("reading the network namespace cookie (SO_NETNS_COOKIE)")(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}

/// Where `sched:sched_process_fork` records the child's pid, from the
/// tracepoint's format in tracefs (mounted if it is not).
pub fn fork_child_pid_offset() -> Result<u32, DatapathError> {
    ensure_mounted(TRACEFS, "tracefs", TRACEFS_MAGIC)?;
    let path = format!("{TRACEFS}/events/sched/sched_process_fork/format");
    let format = std::fs::read_to_string(&path)
        .map_err(|source| DatapathError::Io { what: format!("reading {path}"), source })?;
    field_offset(&format, "child_pid")
        .ok_or_else(|| DatapathError::Setup(format!("{path} has no child_pid field; this kernel is not supported")))
}

/// The offset of `field` in a tracepoint format description: lines like
/// `field:pid_t child_pid;	offset:44;	size:4;	signed:1;`.
fn field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let declaration = parts.next()?.strip_prefix("field:")?;
        if declaration.rsplit([' ', '*']).next()? != field {
            return None;
        }
        parts.find_map(|part| part.strip_prefix("offset:"))?.parse().ok()
    })
}

fn fs_magic(path: &Path) -> Option<i64> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs fills the zeroed struct.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) };
    (rc == 0).then_some(stat.f_type as i64)
}

/// The cgroup v2 mount point (`/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones), read from mountinfo.
pub fn cgroup2_mount() -> Result<PathBuf, DatapathError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|source| DatapathError::Io { what: "reading /proc/self/mountinfo".into(), source })?;
    parse_cgroup2_mount(&mountinfo).ok_or_else(|| {
        DatapathError::Setup(
            "no cgroup v2 hierarchy is mounted; sluice needs one (mount -t cgroup2 none /sys/fs/cgroup/unified)".into(),
        )
    })
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "36 25 0:31 / /sys/fs/cgroup/unified rw,... shared:9 - cgroup2 cgroup2 rw"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_field_offset_from_a_tracepoint_format() {
        let format = "name: sched_process_fork\nID: 312\nformat:\n\
            \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
            \tfield:char parent_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
            \tfield:pid_t parent_pid;\toffset:24;\tsize:4;\tsigned:1;\n\
            \tfield:pid_t child_pid;\toffset:44;\tsize:4;\tsigned:1;\n";
        assert_eq!(field_offset(format, "child_pid"), Some(44));
        assert_eq!(field_offset(format, "parent_pid"), Some(24));
        assert_eq!(field_offset(format, "pid"), None);
    }

    #[test]
    fn finds_the_hybrid_cgroup2_mount() {
        let info = "25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw\n\
                    27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(info), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_cgroup2_mount("27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"), None);
    }
}
