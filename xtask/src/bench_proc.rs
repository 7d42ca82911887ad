//! What a proxy costs its host, read from /proc: CPU time and resident
//! memory of its processes (the proxy and every descendant, e.g. Squid's
//! certificate helpers).

/// `pids` and all their descendants that are still alive.
pub fn tree(pids: &[u32]) -> Vec<u32> {
    let mut all = Vec::new();
    let mut todo = pids.to_vec();
    while let Some(pid) = todo.pop() {
        if all.contains(&pid) || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        all.push(pid);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for task in tasks.flatten() {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            todo.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    all
}

/// User plus system CPU time of `pids`, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Fields after the command name (which may hold spaces), from field 3 on.
            let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = after.split_whitespace().collect();
            // utime and stime are fields 14 and 15 (1-based), 11 and 12 here.
            let field = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (field(11) + field(12)) / ticks
        })
        .sum()
}

/// Resident memory of `pids`, in KiB.
pub fn rss_kb(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}
