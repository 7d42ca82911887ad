use clap::Subcommand;

use super::InstanceArgs;
use crate::control::client::ControlClient;

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
            let socket = instance.control_socket();
            let Some(client) = ControlClient::connect(&socket).await else {
                anyhow::bail!("no sluice daemon is listening on {}", socket.display());
            };
            print!("{}", client.ca(&sandbox).await?);
            Ok(())
        }
    }
}
