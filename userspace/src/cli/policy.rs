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
    /// Allow a host (name, `*.suffix`, IP or CIDR) for a running sandbox.
    Allow {
        #[arg(long)]
        sandbox: String,
        host: String,
        /// Only these ports (repeatable); default any.
        #[arg(long = "port")]
        ports: Vec<u16>,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Deny a host (name, `*.suffix`, IP or CIDR) for a running sandbox.
    Deny {
        #[arg(long)]
        sandbox: String,
        host: String,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
    /// Remove a rule, by name, from a running sandbox's profile.
    RemoveRule {
        #[arg(long)]
        sandbox: String,
        rule: String,
        #[command(flatten)]
        instance: super::InstanceArgs,
    },
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
            let client = instance.daemon().await?;
            let source = crate::sandbox::ProfileSource::Inline { origin: file.display().to_string(), text };
            let status = client.set_profile(sandbox, &source).await?;
            println!("sandbox {sandbox} now enforces profile {:?} from {}", status.profile_name, file.display());
            Ok(0)
        }
        PolicyCommand::Allow { sandbox, host, ports, instance } => {
            add_host_rule(instance, sandbox, policy::Action::Allow, host, ports).await
        }
        PolicyCommand::Deny { sandbox, host, instance } => {
            add_host_rule(instance, sandbox, policy::Action::Deny, host, &[]).await
        }
        PolicyCommand::RemoveRule { sandbox, rule, instance } => {
            instance.daemon().await?.remove_rule(sandbox, rule).await?;
            println!("sandbox {sandbox}: removed rule {rule}");
            Ok(0)
        }
        PolicyCommand::Default => {
            print!("{}", policy::BUILTIN_DEFAULT_TOML);
            Ok(0)
        }
    }
}

async fn add_host_rule(
    instance: &super::InstanceArgs,
    sandbox: &str,
    action: policy::Action,
    host: &str,
    ports: &[u16],
) -> anyhow::Result<u8> {
    let rule = host_rule(action, host, ports)?;
    let status = instance.daemon().await?.add_rule(sandbox, &rule).await?;
    println!("sandbox {sandbox}: added rule {} ({})", rule.name.unwrap_or_default(), status.record.profile.describe());
    Ok(0)
}

/// A rule for one host: an IP or CIDR becomes an `ips` condition, anything
/// else a `hosts` pattern. Named after what it does, e.g. `allow-example.com`.
fn host_rule(action: policy::Action, host: &str, ports: &[u16]) -> anyhow::Result<policy::RuleSpec> {
    let is_address = host.parse::<std::net::IpAddr>().is_ok() || host.parse::<ipnet::IpNet>().is_ok();
    let name = format!("{action}-{}", host.replace('/', "-"));
    let condition = if is_address { format!("ips = [\"{host}\"]") } else { format!("hosts = [\"{host}\"]") };
    let ports = if ports.is_empty() {
        String::new()
    } else {
        format!("ports = [{}]\n", ports.iter().map(ToString::to_string).collect::<Vec<_>>().join(", "))
    };
    let text = format!("name = \"cli\"\n[[rule]]\nname = \"{name}\"\naction = \"{action}\"\n{condition}\n{ports}");
    // Parsing validates the host the way a profile file would.
    let mut profile = policy::parse_profile(&text, "command line")?;
    Ok(profile.rules.remove(0))
}
