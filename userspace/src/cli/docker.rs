//! `sluice docker run`: `docker run` for a container that is a sandbox from
//! its first instruction.
//!
//! The sandbox is registered before the container exists, with a cgroup of
//! its own below the daemon's container parent, and the container is
//! started under it (`--cgroup-parent`). The kernel finds a sandbox by its
//! shallowest registered ancestor cgroup, so the container's first connect
//! already carries its identity, with no window where it is unknown. The
//! container gets the sandbox CA at a stable path, the trust variables
//! `sluice run` sets, its credential placeholders and labels naming it.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Args, Subcommand};

use super::InstanceArgs;
use crate::{
    containers::{PROFILE_LABEL, SANDBOX_LABEL},
    control::RegisterRequest,
    sandbox::Placement,
};

/// Where the sandbox's CA appears inside the container.
pub const CA_IN_CONTAINER: &str = "/etc/sluice/ca.pem";
/// The CA plus the host's system roots, which the trust variables name.
pub const BUNDLE_IN_CONTAINER: &str = "/etc/sluice/ca-bundle.pem";
/// A wgetrc naming the bundle (Debian's wget reads no CA variable).
pub const WGETRC_IN_CONTAINER: &str = "/etc/sluice/wgetrc";

#[derive(Debug, Subcommand)]
pub enum DockerCommand {
    /// `docker run` with the container enforced as a sandbox from its first
    /// syscall. Arguments after `--` go to `docker run`.
    Run(DockerRunArgs),
}

#[derive(Debug, Args)]
pub struct DockerRunArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Profile file (TOML); default: the built-in profile.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Sandbox name (also the `sluice.sandbox` label); default docker-<pid>.
    #[arg(long)]
    pub sandbox: Option<String>,
    /// The docker client to run.
    #[arg(long, env = "SLUICE_DOCKER", default_value = "docker")]
    pub docker: PathBuf,
    /// `docker run` options, the image and its command.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "DOCKER RUN ARGS")]
    pub args: Vec<OsString>,
}

pub async fn run(command: DockerCommand) -> anyhow::Result<u8> {
    match command {
        DockerCommand::Run(args) => docker_run(args).await,
    }
}

async fn docker_run(args: DockerRunArgs) -> anyhow::Result<u8> {
    let client = args.instance.daemon().await?;
    let profile = super::run::profile_source(args.profile.as_deref())?;
    let profile_label = match &args.profile {
        Some(path) => path.file_stem().map_or_else(|| "file".into(), |stem| stem.to_string_lossy().into_owned()),
        None => "default".to_owned(),
    };
    let name = args.sandbox.clone().unwrap_or_else(|| format!("docker-{}", std::process::id()));
    let request = RegisterRequest { name: name.clone(), cgroup: None, profile, placement: Placement::Container };
    let status = client.register(&request).await?;
    let record = &status.record;

    let cgroup_root = crate::datapath::cgroup2_mount()?;
    let cgroup_parent = Path::new("/").join(record.cgroup.strip_prefix(&cgroup_root).with_context(|| {
        format!("sandbox cgroup {} is not under {}", record.cgroup.display(), cgroup_root.display())
    })?);
    let ca = ca_of_bundle(&record.ca_bundle);
    let wgetrc = record.ca_bundle.with_extension("wgetrc");
    std::fs::write(&wgetrc, format!("ca_certificate = {BUNDLE_IN_CONTAINER}\n"))
        .with_context(|| format!("writing {}", wgetrc.display()))?;

    let mut docker = std::process::Command::new(&args.docker);
    docker.arg("run");
    docker.arg(format!("--cgroup-parent={}", cgroup_parent.display()));
    docker.args(["--label", &format!("{SANDBOX_LABEL}={name}")]);
    docker.args(["--label", &format!("{PROFILE_LABEL}={profile_label}")]);
    for (host, inside) in
        [(&ca, CA_IN_CONTAINER), (&record.ca_bundle, BUNDLE_IN_CONTAINER), (&wgetrc, WGETRC_IN_CONTAINER)]
    {
        docker.args(["--volume", &format!("{}:{inside}:ro", host.display())]);
    }
    for variable in super::run::TRUST_VARIABLES {
        docker.args(["--env", &format!("{variable}={BUNDLE_IN_CONTAINER}")]);
    }
    docker.args(["--env", &format!("WGETRC={WGETRC_IN_CONTAINER}")]);
    // Credentials: the container only ever holds placeholders.
    for (variable, placeholder) in &status.env {
        docker.args(["--env", &format!("{variable}={placeholder}")]);
    }
    docker.args(&args.args);
    docker.stdin(Stdio::inherit()).stdout(Stdio::inherit()).stderr(Stdio::inherit());

    let result = tokio::process::Command::from(docker).status().await;
    // A container that never started (or ended before discovery saw it)
    // leaves a sandbox no runtime will report the end of: remove it. One
    // that runs on (`-d`) is the daemon's to remove when it stops.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let current = client.sandboxes().await?.into_iter().find(|s| s.record.name == name);
        match current {
            None => break,
            Some(sandbox) if sandbox.record.container.is_some() && sandbox.processes > 0 => break,
            Some(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Some(_) => {
                // The daemon may have removed it meanwhile.
                let _ = client.unregister(&name).await;
                break;
            }
        }
    }
    let status = result.with_context(|| format!("running {}", args.docker.display()))?;
    Ok(status.code().map_or(1, |code| u8::try_from(code).unwrap_or(1)))
}

/// The CA certificate next to a sandbox's trust bundle (`NAME-bundle.pem`
/// and `NAME-ca.pem` in the daemon's CA directory).
fn ca_of_bundle(bundle: &Path) -> PathBuf {
    let file = bundle.file_name().map(|f| f.to_string_lossy().replace("-bundle.pem", "-ca.pem")).unwrap_or_default();
    bundle.with_file_name(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_sits_next_to_the_bundle() {
        assert_eq!(ca_of_bundle(Path::new("/run/sluice/ca/a-bundle.pem")), PathBuf::from("/run/sluice/ca/a-ca.pem"));
    }
}
