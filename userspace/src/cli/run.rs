//! `sluice run`: a command in a fresh sandbox, with what it did shown live.

use std::{
    ffi::OsString,
    os::unix::{
        io::AsRawFd as _,
        process::{CommandExt as _, ExitStatusExt as _},
    },
    path::PathBuf,
};

use anyhow::Context as _;
use clap::Args;
use tokio::signal::unix::{signal, SignalKind};

use super::InstanceArgs;
use crate::{
    audit::{Decision, Verdict},
    control::{client::ControlClient, RegisterRequest},
    daemon::{self, Daemon, DaemonConfig},
    policy,
    sandbox::{
        confine::{self, Hidden},
        Placement, ProfileSource,
    },
};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Profile file (TOML); default: the built-in profile (`sluice policy default`).
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Sandbox name; default run-<pid>.
    #[arg(long)]
    pub name: Option<String>,
    /// Do not print sluice's decisions.
    #[arg(long, short)]
    pub quiet: bool,
    /// Upstream DNS server for the embedded daemon (repeatable); default:
    /// /etc/resolv.conf. Ignored when a daemon is running.
    #[arg(long = "upstream-dns", value_name = "IP:PORT")]
    pub upstream_dns: Vec<std::net::SocketAddr>,
    /// Also append decisions to this file (embedded daemon only).
    #[arg(long)]
    pub decision_log: Option<PathBuf>,
    /// Extra CA (PEM) upstream certificates may chain to (embedded daemon only).
    #[arg(long = "upstream-ca", value_name = "PEM")]
    pub upstream_ca: Vec<PathBuf>,
    /// Run the command as this user (names or numeric ids). Default: the
    /// user who ran `sudo sluice run` (`SUDO_UID`, `SUDO_GID`).
    #[arg(long, value_name = "USER[:GROUP]", conflicts_with = "as_root")]
    pub user: Option<confine::UserSpec>,
    /// Run the command as root, still without the capabilities that reach
    /// sluice or the kernel (`CAP_SYS_ADMIN`, `CAP_BPF`, `CAP_NET_ADMIN`,
    /// `CAP_SYS_PTRACE`, ...), in its own cgroup and mount namespaces.
    #[arg(long)]
    pub as_root: bool,
    /// A resolv.conf the command sees as /etc/resolv.conf (sluice answers
    /// its DNS queries whatever server it names).
    #[arg(long, value_name = "FILE")]
    pub resolv_conf: Option<PathBuf>,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

pub async fn run(args: RunArgs) -> anyhow::Result<u8> {
    daemon::preflight()?;
    // Whom the command runs as is settled before anything is set up.
    let run_as = confine::choose(
        args.as_root,
        args.user.as_ref(),
        std::env::var("SUDO_UID").ok().as_deref(),
        std::env::var("SUDO_GID").ok().as_deref(),
    )?;
    let account = match &run_as {
        confine::RunAs::Root => None,
        confine::RunAs::User(spec) => Some(confine::Account::resolve(spec)?),
    };
    if let Some(resolv) = &args.resolv_conf {
        anyhow::ensure!(resolv.is_file(), "--resolv-conf {} is not a file", resolv.display());
    }
    // sluice run holds a root-only control connection or is the daemon.
    daemon::not_dumpable()?;
    let profile = profile_source(args.profile.as_deref())?;
    let name = args.name.clone().unwrap_or_else(|| format!("run-{}", std::process::id()));
    let request = RegisterRequest { name: name.clone(), cgroup: None, profile, placement: Placement::Host };
    let show = !args.quiet;

    if let Some(client) = ControlClient::connect(&args.instance.control_socket()).await {
        let health = client.health().await?;
        let hidden = Hidden {
            runtime_dirs: vec![daemon::runtime_dir(&args.instance.instance)],
            files: health.decision_log.into_iter().chain(health.secrets_file).chain(health.audit_key).collect(),
            dirs: health.secrets_dir.into_iter().collect(),
            keep: Vec::new(),
        };
        let launch = Launch { account: account.as_ref(), hidden, resolv_conf: args.resolv_conf.as_deref() };
        let status = client.register(&request).await?;
        let tally = Tally::default();
        let follower = show.then(|| {
            let client = ControlClient::new(&args.instance.control_socket());
            let (name, tally) = (name.clone(), tally.clone());
            tokio::spawn(async move { client.follow(Some(&name), |d| tally.print(&d)).await })
        });
        let result = spawn_and_wait(&status.record, &status.env, &args.command, &launch).await;
        // Let the last decisions arrive before the summary.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if let Some(follower) = follower {
            follower.abort();
            if let Ok(code) = result {
                tally.summary(&name, code);
            }
        }
        client.unregister(&name).await?;
        return result;
    }

    // No daemon: enforce with one of our own, under an instance of its own
    // so it never collides with a daemon started later.
    let mut config = DaemonConfig::new(&format!("{}-run-{}", args.instance.instance, std::process::id()))?;
    config.proxy_port = 0;
    config.dns_port = 0;
    config.serve_control = false;
    config.upstream_dns.clone_from(&args.upstream_dns);
    config.decision_log.clone_from(&args.decision_log);
    // An embedded daemon's audit key lives and goes with its runtime state.
    config.audit.key_file = config.runtime_dir().join("keys").join("audit.key");
    config.upstream_ca.clone_from(&args.upstream_ca);
    let daemon = match Daemon::start(config.clone()).await {
        Ok(daemon) => daemon,
        Err(error) => {
            let _ = daemon::teardown_instance(&config);
            return Err(error);
        }
    };
    let tally = Tally::default();
    let printer = show.then(|| {
        let mut live = daemon.log().subscribe();
        let tally = tally.clone();
        tokio::spawn(async move {
            while let Ok(decision) = live.recv().await {
                tally.print(&decision);
            }
        })
    });
    let hidden = Hidden {
        runtime_dirs: vec![config.runtime_dir()],
        files: config.decision_log.iter().chain(&config.secrets_file).cloned().collect(),
        dirs: config.secrets_dir.iter().cloned().collect(),
        keep: Vec::new(),
    };
    let launch = Launch { account: account.as_ref(), hidden, resolv_conf: args.resolv_conf.as_deref() };
    let result = match daemon.register(request).await {
        Ok(status) => spawn_and_wait(&status.record, &status.env, &args.command, &launch).await,
        Err(error) => Err(error),
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    if let Some(printer) = printer {
        printer.abort();
        if let Ok(code) = result {
            tally.summary(&name, code);
        }
    }
    let teardown = daemon.teardown().await;
    let code = result?;
    teardown.context("cleaning up the sandbox")?;
    Ok(code)
}

/// The profile `--profile` names: a file (checked now, read by the daemon
/// itself, and again when it changes), or the built-in one.
pub(super) fn profile_source(path: Option<&std::path::Path>) -> anyhow::Result<ProfileSource> {
    let Some(path) = path else { return Ok(ProfileSource::Builtin) };
    // Fail here, before anything is set up, with line and column.
    policy::Policy::compile(&policy::load_profile(path)?)?;
    let path = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    Ok(ProfileSource::File { path, text: String::new() })
}

/// Prints decisions as they come and keeps a tally for the summary.
#[derive(Clone, Default)]
struct Tally(std::sync::Arc<std::sync::Mutex<(u32, u32)>>);

impl Tally {
    fn print(&self, decision: &Decision) -> bool {
        let mut counts = self.0.lock().expect("lock poisoned");
        match decision.verdict {
            Verdict::Allow => counts.0 += 1,
            Verdict::Deny => counts.1 += 1,
            Verdict::Ask | Verdict::Info => {}
        }
        eprintln!("sluice: {decision}");
        true
    }

    fn summary(&self, name: &str, code: u8) {
        let (allowed, denied) = *self.0.lock().expect("lock poisoned");
        eprintln!("sluice: sandbox {name}: {allowed} allowed, {denied} denied; command exited with {code}");
    }
}

/// Variables through which common clients find their trusted roots. All
/// point at the sandbox's bundle (system roots + its CA), so no client keeps
/// a setting inherited from the host that would leave the CA out.
pub(super) const TRUST_VARIABLES: [&str; 14] = [
    "SSL_CERT_FILE",
    "CURL_CA_BUNDLE",
    "REQUESTS_CA_BUNDLE",
    "PIP_CERT",
    "NODE_EXTRA_CA_CERTS",
    "NPM_CONFIG_CAFILE",
    "GIT_SSL_CAINFO",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "AWS_CA_BUNDLE",
    "HTTPLIB2_CA_CERTS",
    "CARGO_HTTP_CAINFO",
    "DENO_CERT",
    "SSL_CERT_BUNDLE",
    "BUNDLE_SSL_CA_CERT",
];

/// How the command is started: as whom, and what it must not see.
struct Launch<'a> {
    /// None: root (`--as-root`).
    account: Option<&'a confine::Account>,
    hidden: Hidden,
    resolv_conf: Option<&'a std::path::Path>,
}

/// Runs the command inside the sandbox's cgroup from its first instruction,
/// confined (see `sandbox::confine`) and trusting the sandbox's CA, forwards
/// signals, and returns its exit code (128 + signal if killed).
async fn spawn_and_wait(
    sandbox: &crate::sandbox::SandboxRecord,
    env: &std::collections::BTreeMap<String, String>,
    argv: &[OsString],
    launch: &Launch<'_>,
) -> anyhow::Result<u8> {
    // The command runs under sluice's init, pid 1 of the sandbox's own pid
    // namespace (see `sandbox::init`). The binary is opened here, by root:
    // the user the command runs as may not be able to walk to it.
    let me = std::fs::File::open(std::env::current_exe().context("finding the sluice binary")?)
        .context("opening the sluice binary")?;
    let mut command = std::process::Command::new(format!("/proc/self/fd/{}", me.as_raw_fd()));
    command.arg0(crate::sandbox::init::ARGV0).arg("--").args(argv);
    // Secrets for the daemon never reach a sandbox (they were taken out of
    // sluice's own environment at start-up; this is the second lock).
    for (name, _) in std::env::vars_os() {
        if crate::credentials::is_secret_variable(&name) {
            command.env_remove(name);
        }
    }
    for variable in TRUST_VARIABLES {
        command.env(variable, &sandbox.ca_bundle);
    }
    // A directory of system roots would be consulted instead of, not beside,
    // the bundle by some clients.
    command.env_remove("SSL_CERT_DIR");
    // Credentials: the sandbox only ever holds placeholders.
    for (variable, placeholder) in env {
        command.env(variable, placeholder);
    }
    // Debian's wget reads no variable; it takes its CA from a wgetrc.
    let wgetrc = sandbox.ca_bundle.with_extension("wgetrc");
    if std::fs::write(&wgetrc, format!("ca_certificate = {}\n", sandbox.ca_bundle.display())).is_ok() {
        command.env("WGETRC", &wgetrc);
    }
    if let Some(account) = launch.account {
        command.env("HOME", &account.home).env("USER", &account.name).env("LOGNAME", &account.name);
    }
    // What the command must still read in the (hidden) runtime directory.
    let mut hidden = launch.hidden.clone();
    hidden.keep.extend([sandbox.ca_bundle.clone(), wgetrc]);
    if let Some(dir) = sandbox.ca_bundle.parent() {
        hidden.keep.push(dir.join(format!("{}-ca.pem", sandbox.name)));
    }
    let confinement = confine::Confinement::new(&sandbox.cgroup, launch.account, &hidden, launch.resolv_conf)?;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || confinement.apply());
    }
    let forwarder = SignalForwarder::install()?;
    let mut child = match tokio::process::Command::from(command).spawn() {
        Ok(child) => child,
        Err(error) => {
            eprintln!("sluice: cannot run {}: {error}", argv[0].to_string_lossy());
            return Ok(if error.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 });
        }
    };
    let pid = child.id().context("child has no pid")? as i32;
    drop(me);
    let forwarder = tokio::spawn(forwarder.forward_to(pid));
    let status = child.wait().await?;
    forwarder.abort();
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(signal)) => 128 + signal as u8,
        (None, None) => 1,
    })
}

/// Signals `sluice run` catches and hands to the child. With a terminal, the
/// kernel already sends keyboard signals (INT, QUIT) and WINCH to the whole
/// foreground group, child included: those are caught (so sluice survives to
/// clean up) but not forwarded, which would deliver them twice.
struct SignalForwarder {
    streams: Vec<(libc::c_int, tokio::signal::unix::Signal)>,
    tty: bool,
}

impl SignalForwarder {
    /// Installs the handlers; must happen before the child exists, or a
    /// signal arriving in between would kill sluice instead.
    fn install() -> std::io::Result<Self> {
        // SAFETY: plain syscall.
        let tty = unsafe { libc::isatty(0) } == 1;
        let mut kinds = vec![
            SignalKind::terminate(),
            SignalKind::hangup(),
            SignalKind::user_defined1(),
            SignalKind::user_defined2(),
            SignalKind::interrupt(),
            SignalKind::quit(),
        ];
        if !tty {
            kinds.push(SignalKind::window_change());
        }
        let streams =
            kinds.into_iter().map(|kind| Ok((kind.as_raw_value(), signal(kind)?))).collect::<std::io::Result<_>>()?;
        Ok(Self { streams, tty })
    }

    async fn forward_to(self, child: i32) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (raw, mut stream) in self.streams {
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    let _ = tx.send(raw);
                }
            });
        }
        while let Some(raw) = rx.recv().await {
            if self.tty && (raw == libc::SIGINT || raw == libc::SIGQUIT) {
                continue;
            }
            // SAFETY: plain syscall to our own child.
            unsafe { libc::kill(child, raw) };
        }
    }
}
