use clap::Subcommand;

use super::InstanceArgs;

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print a sandbox's CA certificate (PEM), for clients that need to
    /// trust it. The CA's key never leaves the daemon.
    Export {
        /// Sandbox name.
        sandbox: String,
        #[command(flatten)]
        instance: InstanceArgs,
    },
}

pub async fn run(command: CaCommand) -> anyhow::Result<()> {
    match command {
        CaCommand::Export { sandbox, instance } => {
            print!("{}", instance.daemon().await?.ca(&sandbox).await?);
            Ok(())
        }
    }
}
