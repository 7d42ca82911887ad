//! `sluice secrets`: the daemon's secrets by name. Values go in through
//! stdin (never the command line, which other users can read) and never
//! come out.

use std::io::Read as _;

use anyhow::Context as _;
use clap::Subcommand;
use zeroize::Zeroizing;

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// List secret names, where each came from, and which are revoked.
    List {
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Set a secret's value, read from stdin (rotation). The next request,
    /// on kept-alive connections too, uses it; lifts a revocation.
    Set {
        name: String,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Revoke a secret now: requests that need it are refused until it is
    /// set again. Survives reloads and daemon restarts.
    Revoke {
        name: String,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Re-read the secrets file and directory (like SIGHUP).
    Reload {
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
}

pub async fn run(command: SecretsCommand) -> anyhow::Result<()> {
    match command {
        SecretsCommand::List { instance } => {
            for secret in instance.daemon().await?.secrets().await? {
                let state = match (secret.revoked, secret.origin) {
                    (true, _) => "revoked".to_owned(),
                    (false, Some(origin)) => format!("{origin:?}").to_ascii_lowercase(),
                    (false, None) => "held".to_owned(),
                };
                println!("{:<32} {state}", secret.name);
            }
        }
        SecretsCommand::Set { name, instance } => {
            let mut value = Zeroizing::new(String::new());
            std::io::stdin().read_to_string(&mut value).context("reading the secret from stdin")?;
            let trimmed = value.trim_end_matches(['\n', '\r']);
            anyhow::ensure!(
                !trimmed.is_empty(),
                "no value on stdin (e.g. `printf %s \"$TOKEN\" | sluice secrets set {name}`)"
            );
            instance.daemon().await?.set_secret(&name, trimmed).await?;
            println!("secret {name} set; the next request uses it");
        }
        SecretsCommand::Revoke { name, instance } => {
            instance.daemon().await?.revoke_secret(&name).await?;
            println!("secret {name} revoked; requests that need it are refused");
        }
        SecretsCommand::Reload { instance } => {
            let count = instance.daemon().await?.reload_secrets().await?;
            println!("secrets reloaded: {count} held");
        }
    }
    Ok(())
}
