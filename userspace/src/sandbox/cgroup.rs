//! cgroup v2 directories: create, identify, populate, empty and remove.
//!
//! cgroup v2 is plain files; sluice needs no controllers, only the
//! hierarchy (programs attach to a directory, identity is its id).

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`) is the
/// inode number of the cgroup's directory.
pub fn id(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// Creates `path` (and missing parents); returns whether it was created now.
pub fn create(path: &Path) -> io::Result<bool> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                create(parent)?;
            }
            create(path)
        }
        Err(error) => Err(error),
    }
}

/// Moves a process into the cgroup.
pub fn enter(path: &Path, pid: u32) -> io::Result<()> {
    std::fs::write(path.join("cgroup.procs"), pid.to_string())
}

/// Processes directly in the cgroup and its descendants.
pub fn pids(path: &Path) -> Vec<u32> {
    let mut all = Vec::new();
    collect_pids(path, &mut all);
    all
}

fn collect_pids(path: &Path, into: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(path.join("cgroup.procs")) {
        into.extend(text.lines().filter_map(|line| line.trim().parse::<u32>().ok()));
    }
    for child in children(path) {
        collect_pids(&child, into);
    }
}

fn children(path: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process in the cgroup tree (cgroup.kill, else SIGKILL one by
/// one) and waits up to `timeout` for it to empty.
pub fn kill_all(path: &Path, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = pids(path);
        if pids.is_empty() {
            return Ok(());
        }
        if std::fs::write(path.join("cgroup.kill"), "1").is_err() {
            for pid in pids {
                // SAFETY: plain syscall; the pid was in the cgroup we own.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!("processes remain in {}", path.display())));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the cgroup and any child cgroups made inside it (they must be
/// empty of processes).
pub fn remove(path: &Path) -> io::Result<()> {
    for child in children(path) {
        remove(&child)?;
    }
    match std::fs::remove_dir(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Removes `relative` (a path from the hierarchy root) and what is below it
/// from every cgroup v1 hierarchy, where it exists and is empty. On hybrid
/// hosts container runtimes make a container's cgroup parents in each v1
/// hierarchy too and never remove them. Best effort: a directory still in
/// use stays.
pub fn remove_v1_mirrors(relative: &Path) {
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else { return };
    let relative = relative.strip_prefix("/").unwrap_or(relative);
    if relative.as_os_str().is_empty() {
        return;
    }
    for mount in v1_mounts(&mountinfo) {
        let _ = remove(&mount.join(relative));
    }
}

fn v1_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup").then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .collect()
}

/// The cgroup v2 path of a process relative to the hierarchy root, from
/// `/proc/PID/cgroup` (`0::/docker/abc`).
pub fn of_pid(pid: u32) -> io::Result<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    parse_proc_cgroup(&text).ok_or_else(|| io::Error::other(format!("process {pid} has no cgroup v2 entry")))
}

fn parse_proc_cgroup(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|line| line.strip_prefix("0::").map(PathBuf::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_v1_hierarchies() {
        let info = "26 25 0:24 / /sys/fs/cgroup/unified rw shared:5 - cgroup2 cgroup2 rw\n\
                    27 25 0:25 / /sys/fs/cgroup/cpu rw shared:6 - cgroup cgroup rw,cpu\n\
                    28 25 0:26 / /sys/fs/cgroup/memory rw shared:7 - cgroup cgroup rw,memory\n";
        assert_eq!(v1_mounts(info), vec![PathBuf::from("/sys/fs/cgroup/cpu"), PathBuf::from("/sys/fs/cgroup/memory")]);
    }

    #[test]
    fn reads_the_v2_line_of_proc_cgroup() {
        let text = "12:cpu:/docker/abc\n1:name=systemd:/\n0::/sluice/agent-1\n";
        assert_eq!(parse_proc_cgroup(text), Some(PathBuf::from("/sluice/agent-1")));
        assert_eq!(parse_proc_cgroup("12:cpu:/x\n"), None);
    }
}
