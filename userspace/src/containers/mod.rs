//! Containers as sandboxes: what a container runtime reports (running
//! containers, starts and stops) turned into sandbox registrations.
//!
//! Enforcement never waits for this: the kernel programs cover every cgroup
//! below the container parent from the container's first syscall, and a
//! container that is not registered yet is denied as an unknown sandbox.
//! Discovery gives a container its identity (id, name, image, labels), its
//! profile (`sluice.profile` label) and its CA, and tears the sandbox down
//! when the container stops. With `--enforce-label` a container without
//! the label is exempted instead ([`exempt`]).

pub mod containerd;
pub mod docker;
pub mod exempt;
pub mod host_address;

use std::{
    collections::{BTreeMap, HashSet},
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    audit::{Decision, Kind, Verdict},
    control::RegisterRequest,
    daemon::Daemon,
    sandbox::{self, cgroup, ContainerInfo, Placement, ProfileSource},
};
use exempt::Exemption;

/// Label naming the profile (a `NAME.toml` in the daemon's profiles
/// directory; `default` or no label: the built-in profile).
pub const PROFILE_LABEL: &str = "sluice.profile";
/// Label naming the sandbox (set by `sluice docker run`); default: the
/// container's name.
pub const SANDBOX_LABEL: &str = "sluice.sandbox";

/// A running container as its runtime reported it.
#[derive(Debug, Clone)]
pub struct Discovered {
    pub info: ContainerInfo,
    /// A process of the container (its init), whose cgroup is the container's.
    pub pid: u32,
}

/// Ties a running container to its sandbox: the one registered for its
/// cgroup or an ancestor of it (`sluice docker run` registers first), else
/// a new one under the profile its labels select. A container outside the
/// container parent is not sluice's to enforce and is left alone.
pub async fn started(daemon: &Daemon, found: Discovered) {
    if let Err(error) = try_started(daemon, &found).await {
        tracing::warn!(container = %found.info.describe(), error = %format!("{error:#}"), "container not registered");
        let mut decision = Decision::new(
            Kind::Lifecycle,
            Verdict::Deny,
            "container-unregistered",
            format!("{} stays denied as an unknown sandbox: {error:#}", found.info.describe()),
        );
        decision.sandbox = None;
        daemon.log().record(decision);
    }
}

/// Capabilities with which a container could reach past sluice: the kernel
/// guard kills a sandboxed `bpf()` or `ptrace` of outsiders, but not reads
/// of another process's memory through /proc (`CAP_SYS_PTRACE`), file
/// handles that open the host's files (`CAP_DAC_READ_SEARCH`), raw I/O,
/// or what a full `CAP_SYS_ADMIN` can do.
const PRIVILEGED_CAPABILITIES: [(u32, &str); 7] = [
    (2, "CAP_DAC_READ_SEARCH"),
    (16, "CAP_SYS_MODULE"),
    (17, "CAP_SYS_RAWIO"),
    (19, "CAP_SYS_PTRACE"),
    (21, "CAP_SYS_ADMIN"),
    (38, "CAP_PERFMON"),
    (39, "CAP_BPF"),
];

/// Which of [`PRIVILEGED_CAPABILITIES`] process `pid` may hold (its
/// bounding set, which limits what anything it execs can gain).
fn privileged_capabilities(pid: u32) -> anyhow::Result<Vec<&'static str>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the capabilities of pid {pid}"))?;
    let bounding = status
        .lines()
        .find_map(|line| line.strip_prefix("CapBnd:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .with_context(|| format!("no capability bounding set for pid {pid}"))?;
    Ok(held_capabilities(bounding))
}

fn held_capabilities(bounding: u64) -> Vec<&'static str> {
    PRIVILEGED_CAPABILITIES.iter().filter(|(bit, _)| bounding & (1 << bit) != 0).map(|(_, name)| *name).collect()
}

async fn try_started(daemon: &Daemon, found: &Discovered) -> anyhow::Result<()> {
    let config = daemon.config();
    let relative = cgroup::of_pid(found.pid).with_context(|| format!("reading the cgroup of pid {}", found.pid))?;
    let absolute = config.cgroup_root.join(relative.strip_prefix("/").unwrap_or(&relative));
    let parent = config.containers_parent();
    if !absolute.starts_with(&parent) || absolute == parent {
        tracing::info!(
            container = %found.info.describe(),
            cgroup = %relative.display(),
            "container is not under {} (start it with --cgroup-parent={}); not enforced",
            parent.display(),
            config.containers_parent_relative().display()
        );
        return Ok(());
    }
    let mut dir = absolute.as_path();
    while dir != parent {
        if let Some(sandbox) = cgroup::id(dir).ok().and_then(|id| daemon.registry().by_cgroup(id)) {
            if sandbox.container().as_ref() != Some(&found.info) {
                daemon.bind_container(&sandbox, found.info.clone()).await?;
                let mut decision = Decision::new(
                    Kind::Lifecycle,
                    Verdict::Info,
                    "container-bound",
                    format!("sandbox {} is {}", sandbox.name(), found.info.describe()),
                );
                decision.sandbox = Some(sandbox.name().to_owned());
                daemon.log().record(decision);
            }
            return Ok(());
        }
        dir = dir.parent().context("cgroup path ended above the container parent")?;
    }
    let cgroup_id = cgroup::id(&absolute)?;
    if let Some(label) = config.enforce_label.as_ref().filter(|label| !label.matches(&found.info.labels)) {
        return exempt(daemon, found, absolute, cgroup_id, &label.to_string());
    }
    if !config.allow_privileged_containers {
        let held = privileged_capabilities(found.pid)?;
        anyhow::ensure!(
            held.is_empty(),
            "it holds {} (privileged, or started with --cap-add), which reach past what sluice can confine; \
             start it without them, or start the daemon with --allow-privileged-containers",
            held.join(", ")
        );
    }
    daemon.exemptions().lift(cgroup_id)?;
    let profile = profile_for(&found.info.labels, config.profiles_dir.as_deref())?;
    let request = RegisterRequest {
        name: sandbox_name(daemon, &found.info),
        cgroup: Some(relative),
        profile,
        placement: Placement::Container,
    };
    daemon.register_with(request, Some(found.info.clone())).await?;
    Ok(())
}

/// Leaves a container that lacks the enforce label alone: its cgroup goes
/// into the kernel's exempt map (idempotent; the audit log says so once).
fn exempt(daemon: &Daemon, found: &Discovered, cgroup: PathBuf, cgroup_id: u64, label: &str) -> anyhow::Result<()> {
    let exemption = Exemption { cgroup, cgroup_id, container: found.info.clone() };
    if !daemon.exemptions().add(exemption).context("exempting the container's cgroup")? {
        return Ok(());
    }
    let mut decision = Decision::new(
        Kind::Lifecycle,
        Verdict::Info,
        "container-exempt",
        format!("{} has no label {label}: not enforced, its traffic goes direct", found.info.describe()),
    );
    decision.container = Some(found.info.clone());
    daemon.log().record(decision);
    Ok(())
}

/// The container stopped or was removed: its sandbox goes (CA, placeholders,
/// resolver, map entries), or its exemption, and the audit log says so.
/// `namespace` is containerd's (empty for Docker): ids are unique only
/// within one.
pub async fn stopped(daemon: &Daemon, runtime: &str, namespace: &str, id: &str, why: &str) {
    if let Some(exemption) = daemon.exemptions().of_container(runtime, namespace, id) {
        if let Err(error) = daemon.exemptions().lift(exemption.cgroup_id) {
            tracing::error!(container = %exemption.container.describe(), %error, "could not remove an exemption");
            return;
        }
        let mut decision = Decision::new(
            Kind::Lifecycle,
            Verdict::Info,
            "container-stopped",
            format!("{} {why}; its exemption is removed", exemption.container.describe()),
        );
        decision.container = Some(exemption.container);
        daemon.log().record(decision);
        return;
    }
    let Some(sandbox) = daemon
        .registry()
        .list()
        .into_iter()
        .find(|s| s.container().is_some_and(|c| c.runtime == runtime && c.namespace == namespace && c.id == id))
    else {
        return;
    };
    let info = sandbox.container().expect("matched on it");
    let mut decision = Decision::new(
        Kind::Lifecycle,
        Verdict::Info,
        "container-stopped",
        format!("{} {why}; removing sandbox {}", info.describe(), sandbox.name()),
    );
    decision.sandbox = Some(sandbox.name().to_owned());
    daemon.log().record(decision);
    if let Err(error) = daemon.unregister(sandbox.name()).await {
        tracing::error!(sandbox = %sandbox.name(), error = %format!("{error:#}"), "could not remove a container's sandbox");
    }
}

/// After (re)connecting to a runtime: registers every running container
/// and removes the sandboxes of containers that went away meanwhile.
/// Sandboxes that are still registered stay as they are (same cgroup, CA
/// and resolver), so a restarted daemon disturbs no container.
pub async fn reconcile(daemon: &Daemon, runtime: &str, running: Vec<Discovered>) {
    let ids: HashSet<(String, String)> =
        running.iter().map(|found| (found.info.namespace.clone(), found.info.id.clone())).collect();
    for found in running {
        started(daemon, found).await;
    }
    // The containers sluice holds something for: a sandbox or an exemption.
    let held = daemon.registry().list().into_iter().filter_map(|sandbox| sandbox.container());
    let held: Vec<ContainerInfo> = held.chain(daemon.exemptions().list().into_iter().map(|e| e.container)).collect();
    for info in held {
        if info.runtime == runtime && !ids.contains(&(info.namespace.clone(), info.id.clone())) {
            stopped(daemon, runtime, &info.namespace, &info.id, "is no longer running").await;
        }
    }
}

/// Runs `follow` (connect to a runtime, reconcile, follow its events) again
/// a second after each time it ends, until the daemon stops: containers
/// keep being enforced meanwhile (unknown ones are denied). An error is
/// logged once until a connection works again.
async fn keep_following<F, Fut>(runtime: &str, socket: &Path, mut follow: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut reported = false;
    loop {
        if let Err(error) = follow().await {
            if !reported {
                tracing::warn!(runtime, socket = %socket.display(), error = %format!("{error:#}"), "container discovery interrupted; retrying");
                reported = true;
            }
        } else {
            reported = false;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The profile a container's labels select.
pub fn profile_for(labels: &BTreeMap<String, String>, profiles_dir: Option<&Path>) -> anyhow::Result<ProfileSource> {
    let Some(name) = labels.get(PROFILE_LABEL).filter(|name| name.as_str() != "default") else {
        return Ok(ProfileSource::Builtin);
    };
    sandbox::validate_name(name)
        .map_err(|_| anyhow::anyhow!("label {PROFILE_LABEL}={name:?} is not a profile name"))?;
    let dir = profiles_dir.with_context(|| {
        format!(
            "label {PROFILE_LABEL}={name} names a profile, and the daemon has no profiles directory (--profiles-dir)"
        )
    })?;
    let path = std::path::absolute(dir.join(format!("{name}.toml")))?;
    if !path.is_file() {
        anyhow::bail!("label {PROFILE_LABEL}={name}: no profile {}", path.display());
    }
    // The daemon reads the file itself, and again when it changes.
    Ok(ProfileSource::File { path, text: String::new() })
}

/// The `sluice.sandbox` label, else the container's name, else its short
/// id; suffixed with the short id when the name is taken.
fn sandbox_name(daemon: &Daemon, info: &ContainerInfo) -> String {
    let short = info.id.get(..12).unwrap_or(&info.id);
    let wanted = info.labels.get(SANDBOX_LABEL).unwrap_or(&info.name);
    let name = if sandbox::validate_name(wanted).is_ok() { wanted.clone() } else { format!("ctr-{short}") };
    if daemon.registry().by_name(&name).is_none() {
        return name;
    }
    let suffixed = format!("{}-{short}", name.get(..50).unwrap_or(&name));
    if sandbox::validate_name(&suffixed).is_ok() {
        suffixed
    } else {
        format!("ctr-{short}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_select_profiles_by_name_only() {
        let dir = std::env::temp_dir().join(format!("sluice-profiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("web.toml"), "name = \"web\"\n").unwrap();
        let labels = |value: &str| BTreeMap::from([(PROFILE_LABEL.to_owned(), value.to_owned())]);
        assert_eq!(profile_for(&BTreeMap::new(), Some(&dir)).unwrap(), ProfileSource::Builtin);
        assert_eq!(profile_for(&labels("default"), None).unwrap(), ProfileSource::Builtin);
        assert_eq!(
            profile_for(&labels("web"), Some(&dir)).unwrap(),
            ProfileSource::File { path: dir.join("web.toml"), text: String::new() }
        );
        let missing = profile_for(&labels("nope"), Some(&dir)).unwrap_err();
        assert!(format!("{missing:#}").contains("nope.toml"), "{missing:#}");
        let traversal = profile_for(&labels("../etc/passwd"), Some(&dir)).unwrap_err();
        assert!(traversal.to_string().contains("not a profile name"), "{traversal}");
        assert!(profile_for(&labels("web"), None).unwrap_err().to_string().contains("--profiles-dir"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod privilege_tests {
    #[test]
    fn a_default_container_holds_none_of_the_privileged_capabilities() {
        // Docker's default bounding set: chown, dac_override, fowner,
        // fsetid, kill, setgid, setuid, setpcap, net_bind_service, net_raw,
        // sys_chroot, mknod, audit_write, setfcap.
        assert!(super::held_capabilities(0x0000_0000_a804_25fb).is_empty());
        // --privileged: everything.
        assert_eq!(super::held_capabilities(0x0000_01ff_ffff_ffff).len(), 7);
        // --cap-add SYS_ADMIN --cap-add BPF.
        let held = super::held_capabilities(0x0000_0000_a804_25fb | 1 << 21 | 1 << 39);
        assert_eq!(held, ["CAP_SYS_ADMIN", "CAP_BPF"]);
    }
}
