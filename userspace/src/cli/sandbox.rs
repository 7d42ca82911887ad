use clap::Subcommand;

use super::InstanceArgs;

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// List sandboxes with their kernel counters.
    Ls {
        #[command(flatten)]
        instance: InstanceArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(command: SandboxCommand) -> anyhow::Result<()> {
    match command {
        SandboxCommand::Ls { instance, json } => {
            let sandboxes = instance.daemon().await?.sandboxes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sandboxes)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<12} {:>5} {:>10} {:>8} {:>8} {:>8}  CGROUP",
                "NAME", "PROFILE", "PIDS", "REDIRECTED", "DNS", "REFUSED", "DROPPED"
            );
            for s in sandboxes {
                println!(
                    "{:<24} {:<12} {:>5} {:>10} {:>8} {:>8} {:>8}  {}",
                    s.record.name,
                    s.profile_name,
                    s.processes,
                    s.redirected,
                    s.dns,
                    s.refused,
                    s.dropped_packets,
                    s.record.cgroup.display()
                );
            }
            Ok(())
        }
    }
}
