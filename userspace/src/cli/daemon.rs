use std::{net::SocketAddr, path::PathBuf};

use clap::Args;

use super::InstanceArgs;
use crate::containers::containerd::{self, Namespaces};
use crate::daemon::{Daemon, DaemonConfig, RedirectListener, DEFAULT_DNS_PORT, DEFAULT_PROXY_PORT};

#[derive(Debug, Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    pub instance: InstanceArgs,
    /// Proxy port on 127.0.0.1 (ignored when re-adopting pinned state).
    #[arg(long, default_value_t = DEFAULT_PROXY_PORT)]
    pub proxy_port: u16,
    /// Resolver port for unregistered cgroups (ignored when re-adopting).
    #[arg(long, default_value_t = DEFAULT_DNS_PORT)]
    pub dns_port: u16,
    /// Upstream DNS server (repeatable); default: /etc/resolv.conf.
    #[arg(long = "upstream-dns", value_name = "IP:PORT")]
    pub upstream_dns: Vec<SocketAddr>,
    /// Decision log (JSON lines); default /var/log/<instance>/decisions.jsonl.
    #[arg(long)]
    pub decision_log: Option<PathBuf>,
    /// The audit signing key (Ed25519, made on first start, root-only);
    /// default /var/lib/<instance>/audit.key.
    #[arg(long, value_name = "FILE")]
    pub audit_key: Option<PathBuf>,
    /// A signed checkpoint in the decision log after this many lines...
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_checkpoint_records: u64,
    /// ... or this many seconds after the last one, if lines came since.
    #[arg(long, default_value_t = 10.0)]
    pub audit_checkpoint_secs: f64,
    /// Extra CA (PEM file, repeatable) upstream certificates may chain to,
    /// besides the system roots.
    #[arg(long = "upstream-ca", value_name = "PEM")]
    pub upstream_ca: Vec<PathBuf>,
    /// Secrets file: `name = "value"` lines, owned by root, mode 600.
    /// Re-read on SIGHUP.
    #[arg(long)]
    pub secrets: Option<PathBuf>,
    /// Directory with one file per secret (e.g. a mounted secret volume).
    #[arg(long)]
    pub secrets_dir: Option<PathBuf>,
    /// Also accept connections redirected by an iptables/nftables REDIRECT
    /// rule on ADDR (repeatable): their original destination comes from
    /// conntrack and the policy of sandbox SANDBOX decides them.
    #[arg(long = "redirect-listener", value_name = "ADDR=SANDBOX")]
    pub redirect_listeners: Vec<RedirectListener>,
    /// How long a request held by an `ask` rule waits for `sluice approve`
    /// before it is denied (e.g. 60s, 5m).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub approval_timeout: std::time::Duration,
    /// Enforce containers: the IPv4 address they reach sluice on, put on
    /// the host's loopback interface (a container's own 127.0.0.1 is not the
    /// host's). Containers go under the cgroup parent /<instance>/containers.
    #[arg(long, value_name = "IPV4")]
    pub container_address: Option<std::net::Ipv4Addr>,
    /// Also an IPv6 address containers reach sluice on (on the loopback
    /// interface too), for IPv6 destinations: containers whose sockets or
    /// networks are IPv6-only cannot reach an IPv4 address. Without it,
    /// IPv6 sockets go to the IPv4 address, IPv4-mapped.
    #[arg(long, value_name = "IPV6", requires = "container_address")]
    pub container_address6: Option<std::net::Ipv6Addr>,
    /// Discover Docker containers through this Engine API socket
    /// (e.g. /run/docker.sock); needs --container-address.
    #[arg(long, value_name = "SOCKET", requires = "container_address")]
    pub docker: Option<PathBuf>,
    /// Discover containerd containers through this socket; default
    /// /run/containerd/containerd.sock when it exists and there is a
    /// --container-address.
    #[arg(long, value_name = "SOCKET", requires = "container_address")]
    pub containerd_socket: Option<PathBuf>,
    /// Follow only this containerd namespace (repeatable); default: every
    /// namespace but Docker's own (`moby`), whose containers --docker finds.
    #[arg(long = "containerd-namespace", value_name = "NAME")]
    pub containerd_namespaces: Vec<String>,
    /// Profiles a container's `sluice.profile=NAME` label selects (NAME.toml).
    #[arg(long, value_name = "DIR")]
    pub profiles_dir: Option<PathBuf>,
    /// Enforce only containers labelled KEY=VALUE (e.g. sluice.enforce=true);
    /// discovery exempts the others, whose traffic then goes direct. Until
    /// discovery has seen a container it is denied. Default: every
    /// container under the container parent.
    #[arg(long, value_name = "KEY=VALUE", requires = "container_address")]
    pub enforce_label: Option<crate::containers::exempt::EnforceLabel>,
    /// Also register discovered containers that hold CAP_SYS_ADMIN, CAP_BPF,
    /// CAP_SYS_PTRACE, CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_PERFMON or
    /// CAP_DAC_READ_SEARCH (`--privileged`, `--cap-add`). By default they
    /// stay unknown sandboxes, denied everything: sluice cannot confine them.
    #[arg(long, requires = "container_address")]
    pub allow_privileged_containers: bool,
    /// Connections one sandbox may hold open through the proxy at once;
    /// more are refused (closed) until some close.
    #[arg(long, default_value_t = 512, value_name = "N")]
    pub max_connections_per_sandbox: usize,
    /// New connections one sandbox may open per second, on average.
    #[arg(long, default_value_t = 200.0, value_name = "N")]
    pub connections_per_second: f64,
    /// New connections one sandbox may open at once above that rate.
    #[arg(long, default_value_t = 400.0, value_name = "N")]
    pub connection_burst: f64,
    /// Descriptors kept for the daemon itself (control API, kernel ring
    /// buffer, resolver): sandbox connections are refused while fewer than
    /// this many are left below the open files limit.
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub descriptor_reserve: u64,
    /// Requests one sandbox may have held by `ask` rules at once; more are
    /// refused (HTTP 429).
    #[arg(long, default_value_t = crate::approvals::DEFAULT_MAX_PER_SANDBOX, value_name = "N")]
    pub max_held_approvals: usize,
    /// How long an HTTP/1 client has for each request head (also how long
    /// an idle kept-alive HTTP/1 connection stays open).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: std::time::Duration,
    /// Close a client connection on which nothing moved either way this
    /// long (HTTP/2 included). Keep it above --approval-timeout.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: std::time::Duration,
    /// Refusals by the limits above are summed into one record per sandbox
    /// and rule this often.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub limit_record_interval: std::time::Duration,
}

pub async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    let mut config = DaemonConfig::new(&args.instance.instance)?;
    config.proxy_port = args.proxy_port;
    config.dns_port = args.dns_port;
    config.upstream_dns = args.upstream_dns;
    config.upstream_ca = args.upstream_ca;
    config.secrets_file = args.secrets;
    config.secrets_dir = args.secrets_dir;
    config.redirect_listeners = args.redirect_listeners;
    config.approval_timeout = args.approval_timeout;
    config.container_address = args.container_address;
    config.container_address6 = args.container_address6;
    config.docker_socket = args.docker;
    config.containerd_socket = containerd_socket(args.containerd_socket, args.container_address.is_some());
    config.containerd_namespaces = Namespaces(args.containerd_namespaces);
    config.profiles_dir = args.profiles_dir;
    config.enforce_label = args.enforce_label;
    config.allow_privileged_containers = args.allow_privileged_containers;
    anyhow::ensure!(args.max_connections_per_sandbox > 0, "--max-connections-per-sandbox must be at least 1");
    anyhow::ensure!(
        args.connections_per_second > 0.0 && args.connection_burst >= 1.0,
        "--connections-per-second must be above 0 and --connection-burst at least 1"
    );
    anyhow::ensure!(!args.limit_record_interval.is_zero(), "--limit-record-interval must be above 0");
    config.limits = crate::proxy::limits::LimitsConfig {
        max_connections: args.max_connections_per_sandbox,
        connections_per_second: args.connections_per_second,
        connection_burst: args.connection_burst,
        descriptor_reserve: args.descriptor_reserve,
        record_interval: args.limit_record_interval,
    };
    config.max_held_approvals = args.max_held_approvals;
    config.header_read_timeout = args.header_read_timeout;
    config.idle_timeout = args.idle_timeout;
    if let Some(path) = args.decision_log {
        config.decision_log = Some(path);
    }
    if let Some(path) = args.audit_key {
        config.audit.key_file = path;
    }
    anyhow::ensure!(
        args.audit_checkpoint_secs.is_finite() && args.audit_checkpoint_secs > 0.0,
        "--audit-checkpoint-secs must be above 0"
    );
    config.audit.checkpoint_records = args.audit_checkpoint_records;
    config.audit.checkpoint_interval = std::time::Duration::from_secs_f64(args.audit_checkpoint_secs);
    if crate::control::client::ControlClient::connect(&config.control_socket()).await.is_some() {
        anyhow::bail!("a sluice daemon for instance {:?} is already running", config.instance);
    }
    crate::daemon::raise_open_files_limit();
    let daemon = Daemon::start(config).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = hangup.recv() => {
                match daemon.reload_secrets() {
                    Ok(count) => tracing::info!(count, "secrets reloaded"),
                    // The secrets in force stay; the error never includes values.
                    Err(error) => tracing::error!(error = %format!("{error:#}"), "secrets not reloaded"),
                }
                for (sandbox, outcome) in daemon.reload_profiles(true).await {
                    match outcome {
                        Ok(changed) => tracing::info!(%sandbox, changed, "profile file read again"),
                        Err(error) => tracing::error!(%sandbox, %error, "profile file refused; last good profile kept"),
                    }
                }
            }
        }
    }
    // Pins stay: sandboxes remain cut off until a daemon is back.
    daemon.stop();
    // The trail ends with its final checkpoint: a clean stop.
    daemon.log().close();
    tracing::info!("stopped; sandboxes stay cut off until a daemon restarts (or `sluice teardown`)");
    Ok(())
}

/// The containerd socket to follow: the one named (discovery waits for it
/// if it is not there yet), else the default one if it exists.
fn containerd_socket(named: Option<PathBuf>, containers: bool) -> Option<PathBuf> {
    if let Some(socket) = named {
        if !socket.exists() {
            tracing::warn!(
                socket = %socket.display(),
                "--containerd-socket does not exist (is containerd running?); discovery retries until it does"
            );
        }
        return Some(socket);
    }
    let default = PathBuf::from(containerd::DEFAULT_SOCKET);
    (containers && default.exists()).then_some(default)
}
