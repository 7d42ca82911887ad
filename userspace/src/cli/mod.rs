//! The command line: one file per subcommand, each thin over the library.

mod approvals;
mod audit;
mod ca;
mod daemon;
mod debug;
mod docker;
mod log;
mod policy;
mod run;
mod sandbox;
mod secrets;
mod teardown;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::daemon::DEFAULT_INSTANCE;

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "eBPF-enforced egress proxy for AI-agent sandboxes", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the enforcement daemon (loads and pins the kernel programs).
    Daemon(daemon::DaemonArgs),
    /// Run a command in a new sandbox, under a profile, and show what it did.
    Run(run::RunArgs),
    /// Docker containers as sandboxes (`sluice docker run`).
    #[command(subcommand)]
    Docker(docker::DockerCommand),
    /// Inspect sandboxes.
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
    /// Sandbox CA certificates.
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// Measurements for `cargo xtask bench`.
    #[command(subcommand, hide = true)]
    Debug(debug::DebugCommand),
    /// Show decisions (what was allowed and denied, and why).
    Log(log::LogArgs),
    /// The audit trail: the public key of its signatures, offline checks.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Profiles: check, explain, test, replay, bundles, and changes to
    /// running sandboxes.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// List requests held by `ask` rules, waiting for an operator.
    Approvals(approvals::ListArgs),
    /// Let a held request through (`--always`: and the same ones after it).
    Approve(approvals::AnswerArgs),
    /// Refuse a held request (`--always`: and the same ones after it).
    Deny(approvals::AnswerArgs),
    /// Secrets the daemon injects: list, set (rotate), revoke, reload.
    #[command(subcommand)]
    Secrets(secrets::SecretsCommand),
    /// Remove every pin and attachment of an instance (sandboxes sluice made
    /// are killed and removed). Sandboxes are no longer enforced afterwards.
    Teardown(teardown::TeardownArgs),
}

/// Which daemon instance to talk to.
#[derive(Debug, Clone, Args)]
pub struct InstanceArgs {
    /// Instance name: names the cgroup parent, the bpffs pin directory and
    /// /run/<instance>/control.sock.
    #[arg(long, env = "SLUICE_INSTANCE", default_value = DEFAULT_INSTANCE, global = true)]
    pub instance: String,
}

impl InstanceArgs {
    pub fn control_socket(&self) -> PathBuf {
        crate::daemon::control_socket(&self.instance)
    }

    /// A client for the running daemon, or an error that says how to start
    /// one (nothing listens) or why it refused (e.g. a sandboxed caller).
    pub async fn daemon(&self) -> anyhow::Result<crate::control::client::ControlClient> {
        let socket = self.control_socket();
        let client = crate::control::client::ControlClient::new(&socket);
        match client.health().await {
            Ok(_) => Ok(client),
            Err(error) if error.downcast_ref::<std::io::Error>().is_some() => anyhow::bail!(
                "no sluice daemon is listening on {} (start one with `sluice daemon --instance {}`)",
                socket.display(),
                self.instance
            ),
            Err(error) => Err(error.context(format!("the sluice daemon at {} refused", socket.display()))),
        }
    }
}

/// Runs a parsed command line; returns the process exit code.
pub fn main(cli: Cli) -> anyhow::Result<u8> {
    let default_level = match cli.command {
        Command::Daemon(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG").unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Daemon(args) => daemon::run(args).await.map(|()| 0),
            Command::Run(args) => run::run(args).await,
            Command::Docker(command) => docker::run(command).await,
            Command::Sandbox(command) => sandbox::run(command).await.map(|()| 0),
            Command::Ca(command) => ca::run(command).await.map(|()| 0),
            Command::Log(args) => log::run(args).await.map(|()| 0),
            Command::Audit(command) => audit::run(command).await,
            Command::Debug(command) => debug::run(&command),
            Command::Policy(command) => policy::run(&command).await,
            Command::Approvals(args) => approvals::list(&args).await.map(|()| 0),
            Command::Approve(args) => approvals::answer(&args, true).await.map(|()| 0),
            Command::Deny(args) => approvals::answer(&args, false).await.map(|()| 0),
            Command::Secrets(command) => secrets::run(command).await.map(|()| 0),
            Command::Teardown(args) => teardown::run(&args).await.map(|()| 0),
        }
    })
}
