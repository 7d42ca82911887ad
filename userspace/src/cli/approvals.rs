//! `sluice approvals`, `sluice approve ID`, `sluice deny ID`: answering the
//! requests `ask` rules hold.

use clap::Args;

use super::InstanceArgs;
use crate::approvals::Answer;

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub instance: InstanceArgs,
}

#[derive(Debug, Args)]
pub struct AnswerArgs {
    /// The approval id `sluice approvals` shows.
    pub id: u64,
    /// Remember the answer for this sandbox: a rule for the same host, port,
    /// method and path is added to its profile.
    #[arg(long)]
    pub always: bool,
    #[command(flatten)]
    pub instance: InstanceArgs,
}

pub async fn list(args: &ListArgs) -> anyhow::Result<()> {
    let pending = args.instance.daemon().await?.approvals().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&pending)?);
        return Ok(());
    }
    if pending.is_empty() {
        println!("nothing is waiting for approval");
        return Ok(());
    }
    println!("{:>5}  {:<16} {:>7}  {:<40} {:<18} {:>5}", "ID", "SANDBOX", "PID", "REQUEST", "RULE", "LEFT");
    for p in pending {
        let target = p.host.clone().unwrap_or_else(|| p.destination.ip().to_string());
        let request = match (&p.method, &p.path) {
            (Some(method), Some(path)) => format!("{method} {target}{path}"),
            _ => format!("connect {target}:{}", p.destination.port()),
        };
        println!("{:>5}  {:<16} {:>7}  {:<40} {:<18} {:>4}s", p.id, p.sandbox, p.pid, request, p.rule, p.expires_in);
    }
    Ok(())
}

pub async fn answer(args: &AnswerArgs, allow: bool) -> anyhow::Result<()> {
    let answer = Answer { allow, always: args.always };
    let pending = args.instance.daemon().await?.answer(args.id, answer).await?;
    let verb = if allow { "approved" } else { "denied" };
    let what = match (&pending.method, &pending.path) {
        (Some(method), Some(path)) => {
            format!("{method} {}{path}", pending.host.as_deref().unwrap_or(&pending.destination.to_string()))
        }
        _ => format!("connection to {}", pending.host.as_deref().unwrap_or(&pending.destination.to_string())),
    };
    let always = if args.always { " (and remembered for this sandbox)" } else { "" };
    println!("{verb} {} for sandbox {}: {what}{always}", pending.id, pending.sandbox);
    Ok(())
}
