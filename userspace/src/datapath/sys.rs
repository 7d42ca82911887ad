//! Host facts the datapath needs: where bpffs and cgroup v2 are mounted.

use std::{
    ffi::CString,
    path::{Path, PathBuf},
};

use super::DatapathError;

/// Where sluice pins its programs and maps.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Mounts bpffs at [`BPFFS`] if nothing is mounted there yet (a fresh
/// machine of this kind has none), so pins can outlive the daemon.
pub fn ensure_bpffs() -> Result<(), DatapathError> {
    if fs_magic(Path::new(BPFFS)) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    std::fs::create_dir_all(BPFFS).map_err(|source| DatapathError::Io { what: format!("creating {BPFFS}"), source })?;
    let target = CString::new(BPFFS).expect("no NUL");
    let fstype = CString::new("bpf").expect("no NUL");
    // SAFETY: valid C strings; no data argument.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(DatapathError::Io {
            what: format!("mounting bpffs at {BPFFS} (sluice needs root)"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
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
    fn finds_the_hybrid_cgroup2_mount() {
        let info = "25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw\n\
                    27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_cgroup2_mount(info), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(parse_cgroup2_mount("27 25 0:25 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"), None);
    }
}
