use std::path::PathBuf;

use clap::Subcommand;

use crate::policy;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Parse and compile a profile file; errors give line and column.
    Check { file: PathBuf },
    /// Print the built-in default profile.
    Default,
}

pub fn run(command: &PolicyCommand) -> anyhow::Result<u8> {
    match command {
        PolicyCommand::Check { file } => {
            let profile = policy::load_profile(file)?;
            policy::Policy::compile(&profile)?;
            println!("{}: profile {:?} is valid ({} rules)", file.display(), profile.name, profile.rules.len());
            Ok(0)
        }
        PolicyCommand::Default => {
            print!("{}", policy::BUILTIN_DEFAULT_TOML);
            Ok(0)
        }
    }
}
