//! `sluice log`: the decision log, filtered, as text or JSON lines;
//! `--follow` streams new decisions from the daemon.

use clap::Args;

use super::InstanceArgs;
use crate::audit::{log_files, terminal_safe, Decision, Verdict};

#[derive(Debug, Args)]
pub struct LogArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Only this sandbox.
    #[arg(long)]
    pub sandbox: Option<String>,
    /// Only decisions about containers with this label (repeatable: all
    /// must match); `KEY` alone matches any value.
    #[arg(long = "label", value_name = "KEY[=VALUE]")]
    pub labels: Vec<String>,
    /// Only denials.
    #[arg(long)]
    pub deny: bool,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
    /// Keep printing new decisions as they happen.
    #[arg(long, short)]
    pub follow: bool,
}

pub async fn run(args: LogArgs) -> anyhow::Result<()> {
    let client = args.instance.daemon().await?;
    let wanted = |d: &Decision| {
        args.sandbox.as_ref().is_none_or(|name| d.sandbox.as_ref() == Some(name))
            && (!args.deny || d.verdict == Verdict::Deny)
            && args.labels.iter().all(|wanted| has_label(d, wanted))
    };
    let print = |d: &Decision| {
        if args.json {
            println!("{}", serde_json::to_string(d).unwrap_or_default());
        } else {
            // The decision escapes itself; its time and sandbox name are
            // read from a file, so they are escaped here.
            let sandbox = d.sandbox.as_deref().map(|s| format!("[{}] ", terminal_safe(s))).unwrap_or_default();
            println!("{} {sandbox}{d}", terminal_safe(&d.time));
        }
    };
    if args.follow {
        return client
            .follow(args.sandbox.as_deref(), |d| {
                if wanted(&d) {
                    print(&d);
                }
                true
            })
            .await;
    }
    let health = client.health().await?;
    let Some(path) = health.decision_log else {
        anyhow::bail!("this daemon keeps no decision log file; use --follow");
    };
    // Rotated files first, oldest to newest, then the current one.
    let files = log_files(&path);
    if files.is_empty() {
        anyhow::bail!("reading {}: no such file", path.display());
    }
    for file in files {
        let text = match std::fs::read(&file) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            // Rotated away between listing and reading: its records are in the next file.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => anyhow::bail!("reading {}: {error}", file.display()),
        };
        for line in text.lines() {
            if let Ok(decision) = serde_json::from_str::<Decision>(line) {
                if wanted(&decision) {
                    print(&decision);
                }
            }
        }
    }
    Ok(())
}

/// Whether the decision is about a container labelled `KEY=VALUE` (or
/// carrying `KEY` at all).
fn has_label(decision: &Decision, wanted: &str) -> bool {
    let Some(container) = &decision.container else { return false };
    match wanted.split_once('=') {
        Some((key, value)) => container.labels.get(key).is_some_and(|v| v == value),
        None => container.labels.contains_key(wanted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{audit::Kind, sandbox::ContainerInfo};

    #[test]
    fn label_filter_matches_key_and_value() {
        let mut d = Decision::new(Kind::Connect, Verdict::Deny, "r", "why");
        assert!(!has_label(&d, "team"));
        d.container = Some(ContainerInfo {
            runtime: "docker".into(),
            id: "1".into(),
            name: "a".into(),
            image: "i".into(),
            labels: [("team".to_owned(), "research".to_owned())].into(),
            namespace: String::new(),
        });
        assert!(has_label(&d, "team"));
        assert!(has_label(&d, "team=research"));
        assert!(!has_label(&d, "team=ops"));
        assert!(!has_label(&d, "owner"));
    }
}
