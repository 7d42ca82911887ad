use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;

use crate::policy;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Parse and compile a profile file; errors give line and column.
    Check { file: PathBuf },
    /// Print the built-in default profile.
    Default,
    /// Put a profile in force for a running sandbox, atomically: its next
    /// request (on new and kept-alive connections) is decided by it.
    Set {
        /// Sandbox name.
        #[arg(long)]
        sandbox: String,
        file: PathBuf,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
}

pub async fn run(command: &PolicyCommand) -> anyhow::Result<u8> {
    match command {
        PolicyCommand::Check { file } => {
            let profile = policy::load_profile(file)?;
            policy::Policy::compile(&profile)?;
            println!("{}: profile {:?} is valid ({} rules)", file.display(), profile.name, profile.rules.len());
            Ok(0)
        }
        PolicyCommand::Set { sandbox, file, instance } => {
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            // Check here for line and column; the daemon checks again.
            policy::Policy::compile(&policy::parse_profile(&text, &file.display().to_string())?)?;
            let socket = instance.control_socket();
            let Some(client) = crate::control::client::ControlClient::connect(&socket).await else {
                anyhow::bail!("no sluice daemon is listening on {}", socket.display());
            };
            let source = crate::sandbox::ProfileSource::Inline { origin: file.display().to_string(), text };
            let status = client.set_profile(sandbox, &source).await?;
            println!("sandbox {sandbox} now enforces profile {:?} from {}", status.profile_name, file.display());
            Ok(0)
        }
        PolicyCommand::Default => {
            print!("{}", policy::BUILTIN_DEFAULT_TOML);
            Ok(0)
        }
    }
}
