use clap::Args;

use super::InstanceArgs;
use crate::{control::client::ControlClient, daemon};

#[derive(Debug, Args)]
pub struct TeardownArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
}

pub async fn run(args: &TeardownArgs) -> anyhow::Result<()> {
    daemon::preflight()?;
    let config = daemon::DaemonConfig::new(&args.instance.instance)?;
    let socket = config.control_socket();
    if ControlClient::connect(&socket).await.is_some() {
        anyhow::bail!("the daemon of instance {:?} is running: stop it first, then tear down", config.instance);
    }
    // Sandboxes sluice made: kill what remains and remove their cgroups.
    let parent = config.cgroup_parent();
    if let Ok(entries) = std::fs::read_dir(&parent) {
        for entry in entries.filter_map(Result::ok).filter(|e| e.path().is_dir()) {
            let path = entry.path();
            crate::sandbox::cgroup::kill_all(&path, std::time::Duration::from_secs(5))?;
            crate::sandbox::cgroup::remove(&path)?;
        }
    }
    let removed = daemon::teardown_instance(&config)?;
    println!("removed {removed} pins of instance {:?}; its programs are detached", config.instance);
    Ok(())
}
