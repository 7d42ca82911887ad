//! `sluice audit`: the public half of the daemon's audit key, and offline
//! verification of a trail (hash chain, signed checkpoints, how it ends).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Subcommand;

use super::InstanceArgs;
use crate::audit::{
    chain::ChainHead, default_key_file, verify, Audit, AuditKey, Decision, DecisionLog, Kind, LogLimits, PublicKey,
    Verdict,
};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print the public key that verifies the daemon's checkpoints (save it
    /// somewhere the daemon's host cannot change).
    Pubkey {
        #[command(flatten)]
        instance: InstanceArgs,
        /// The signing key file (default: the running daemon's, else
        /// /var/lib/<instance>/audit.key).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
    /// Check a trail offline: its hash chain across files, every
    /// checkpoint's signature, and how it ends. Exit code 1 on any problem.
    Verify {
        /// Public key file(s) the checkpoints must be signed by (`sluice
        /// audit pubkey` output).
        #[arg(long = "key", value_name = "PUBKEY_FILE")]
        keys: Vec<PathBuf>,
        /// The log's files (`decisions.jsonl.N` .. `decisions.jsonl`, in
        /// any order: they are put in the order of their seq).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Cost per record of chaining and signing, for `cargo xtask bench`.
    #[command(hide = true)]
    Bench {
        #[arg(long, default_value_t = 100_000)]
        records: usize,
    },
}

pub async fn run(command: AuditCommand) -> anyhow::Result<u8> {
    match command {
        AuditCommand::Pubkey { instance, key_file } => {
            let path = match key_file {
                Some(path) => path,
                None => running_key_file(&instance).await.unwrap_or_else(|| default_key_file(&instance.instance)),
            };
            let key = AuditKey::load(&path).with_context(|| format!("reading the audit key {}", path.display()))?;
            println!("# sluice audit public key {} (from {})", key.id(), path.display());
            println!("{}", key.public().hex());
            Ok(0)
        }
        AuditCommand::Verify { keys, files } => {
            let keys = keys.iter().map(|path| PublicKey::read(path)).collect::<Result<Vec<_>, _>>()?;
            let report = verify::verify_files(&files, &keys)?;
            println!("{report}");
            Ok(u8::from(!report.ok()))
        }
        AuditCommand::Bench { records } => bench(records.max(1000)).map(|()| 0),
    }
}

/// The key file of the running daemon of `instance`, if one answers.
async fn running_key_file(instance: &InstanceArgs) -> Option<PathBuf> {
    let client = crate::control::client::ControlClient::connect(&instance.control_socket()).await?;
    client.health().await.ok()?.audit_key
}

/// A request decision of typical size.
fn sample() -> Decision {
    let mut d = Decision::new(Kind::Request, Verdict::Allow, "code-hosting", "allowed by rule code-hosting");
    d.sandbox = Some("agent-7".into());
    d.pid = Some(4242);
    d.destination = Some("10.231.0.10:443".parse().expect("an address"));
    d.host = Some("api.example.test".into());
    d.protocol = Some("https".into());
    d.method = Some("GET".into());
    d.path = Some("/repos/acme/widgets/pulls".into());
    d
}

fn ns_per(elapsed: Duration, n: usize) -> f64 {
    elapsed.as_secs_f64() * 1e9 / n as f64
}

/// Prints `key value` lines: in memory, serialising alone (chain off),
/// with the chain, with the chain and a checkpoint every 1000 lines, one
/// signature; through the log's writer thread to a file (checkpoints fsync
/// the file), unsigned and signed.
fn bench(records: usize) -> anyhow::Result<()> {
    let decision = sample();
    let key = AuditKey::generate()?;
    let mut body = Vec::with_capacity(512);
    let mut out = Vec::with_capacity(records * 400);

    let started = Instant::now();
    for _ in 0..records {
        body.clear();
        serde_json::to_writer(&mut body, &decision)?;
        out.extend_from_slice(&body);
        out.push(b'\n');
    }
    println!("audit_serialize_ns {:.0}", ns_per(started.elapsed(), records));

    out.clear();
    let mut head = ChainHead::default();
    let started = Instant::now();
    for _ in 0..records {
        body.clear();
        serde_json::to_writer(&mut body, &decision)?;
        head.seal(&body, &mut out);
    }
    println!("audit_chain_ns {:.0}", ns_per(started.elapsed(), records));

    out.clear();
    let mut head = ChainHead::default();
    let checkpoint = serde_json::to_vec(&Decision::new(Kind::Lifecycle, Verdict::Info, "audit-checkpoint", "bench"))?;
    let started = Instant::now();
    for _ in 0..records {
        body.clear();
        serde_json::to_writer(&mut body, &decision)?;
        head.seal(&body, &mut out);
        if head.since_checkpoint >= 1000 {
            head.seal_checkpoint(&key, &decision.time, false, &checkpoint, &mut out);
        }
    }
    println!("audit_chain_signed_ns {:.0}", ns_per(started.elapsed(), records));

    let started = Instant::now();
    for i in 0..1000u32 {
        std::hint::black_box(key.sign(&i.to_le_bytes()));
    }
    println!("audit_sign_ns {:.0}", ns_per(started.elapsed(), 1000));

    let dir = std::env::temp_dir().join(format!("sluice-audit-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let key = std::sync::Arc::new(key);
    let result = (|| {
        for (name, audit) in
            [("unsigned", Audit::default()), ("signed", Audit { key: Some(key.clone()), ..Audit::default() })]
        {
            let path = dir.join(format!("{name}.jsonl"));
            let limits = LogLimits { queue: records + 16, ..LogLimits::default() };
            let log = DecisionLog::open_audited(Some(&path), limits, audit)?;
            let started = Instant::now();
            for _ in 0..records {
                log.record(decision.clone());
            }
            log.close();
            let elapsed = started.elapsed();
            let dropped = log.counters().dropped.load(std::sync::atomic::Ordering::Relaxed);
            anyhow::ensure!(dropped == 0, "{dropped} records dropped in the bench");
            println!("audit_file_{name}_ns {:.0}", ns_per(elapsed, records));
            println!("audit_file_{name}_rps {:.0}", records as f64 / elapsed.as_secs_f64());
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
