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
    fn reads_the_v2_line_of_proc_cgroup() {
        let text = "12:cpu:/docker/abc\n1:name=systemd:/\n0::/sluice/agent-1\n";
        assert_eq!(parse_proc_cgroup(text), Some(PathBuf::from("/sluice/agent-1")));
        assert_eq!(parse_proc_cgroup("12:cpu:/x\n"), None);
    }
}
