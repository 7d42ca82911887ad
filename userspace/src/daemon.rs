//! The daemon: owns the datapath, the sandbox registry, the proxy, the
//! resolvers and the control API, and wires them together.
//!
//! One *instance* (default `sluice`) names everything it owns, so several
//! can run side by side (tests, `sluice run` without a daemon):
//! - the enforced cgroup parent `<cgroup2>/<instance>`,
//! - pins under `/sys/fs/bpf/<instance>`,
//! - runtime state under `/run/<instance>` (control socket, sandboxes.json).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{bail, Context as _};
use sluice_common::{ip_to_words, SandboxEntry, Target, PROTO_TCP};
use tokio::{net::TcpListener, task::JoinHandle};

use crate::{
    audit::{Decision, DecisionLog, Kind, Verdict},
    containers::exempt::Exemptions,
    control::{Health, RegisterRequest, SandboxStatus},
    datapath::{self, Datapath, KernelEvent, Origin},
    dns::{self, DnsPolicy, NameVerdict, Refusal, SandboxResolver, Upstream},
    policy::{self, Policy},
    proxy::{self, ProxyContext},
    sandbox::{self, cgroup, ProfileSource, Registry, Sandbox, SandboxRecord, SandboxTls},
};

/// The addresses sandboxes in the host's network namespace reach sluice on:
/// IPv4 sockets go to 127.0.0.1, IPv6 sockets to `::1` (IPv6-only sockets
/// cannot reach an IPv4 address), or to `::ffff:127.0.0.1` on hosts without
/// IPv6 loopback.
const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;
const LOOPBACK6: Ipv6Addr = Ipv6Addr::LOCALHOST;
pub const DEFAULT_INSTANCE: &str = "sluice";
pub const DEFAULT_PROXY_PORT: u16 = 15_001;
pub const DEFAULT_DNS_PORT: u16 = 15_053;
/// Name of the container parent below the enforced parent.
pub const CONTAINERS_CGROUP: &str = "containers";

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub instance: String,
    /// cgroup v2 mount point.
    pub cgroup_root: PathBuf,
    /// Proxy port; 0 picks a free one (only when not adopting pinned state).
    pub proxy_port: u16,
    /// Resolver port for cgroups that are not registered sandboxes.
    pub dns_port: u16,
    /// Upstream DNS servers; empty means the host's /etc/resolv.conf.
    pub upstream_dns: Vec<SocketAddr>,
    pub decision_log: Option<PathBuf>,
    /// The decision log's signing key and checkpoint schedule.
    pub audit: crate::audit::AuditConfig,
    /// Serve the control API on `control_socket()`.
    pub serve_control: bool,
    /// Extra roots (PEM files) upstream certificates may chain to, besides
    /// the system's.
    pub upstream_ca: Vec<PathBuf>,
    /// Secrets file (`name = "value"` lines, root-only) and directory (one
    /// file per secret); `SLUICE_SECRET_<NAME>` variables count too.
    pub secrets_file: Option<PathBuf>,
    pub secrets_dir: Option<PathBuf>,
    /// Extra proxy listeners for connections redirected by iptables/nftables
    /// (REDIRECT) instead of the kernel programs.
    pub redirect_listeners: Vec<RedirectListener>,
    /// How long a request an `ask` rule holds waits for an operator.
    pub approval_timeout: Duration,
    /// The address containers in network namespaces of their own reach
    /// sluice on (their own 127.0.0.1 is not the host's). sluice puts it on
    /// the host's loopback interface, where every bridge-networked container
    /// routes through its gateway. None: no container sandboxes.
    pub container_address: Option<Ipv4Addr>,
    /// The IPv6 address containers reach sluice on, put on the loopback
    /// interface too: IPv6 destinations of container sandboxes go there
    /// (an IPv6-only socket or network cannot reach an IPv4 address).
    /// None: they go to the IPv4 container address, IPv4-mapped.
    pub container_address6: Option<Ipv6Addr>,
    /// Docker Engine API socket to discover containers from.
    pub docker_socket: Option<PathBuf>,
    /// containerd socket to discover containers from, and the namespaces
    /// followed there.
    pub containerd_socket: Option<PathBuf>,
    pub containerd_namespaces: crate::containers::containerd::Namespaces,
    /// Profiles (`NAME.toml`) that a container's `sluice.profile=NAME`
    /// label selects.
    pub profiles_dir: Option<PathBuf>,
    /// Enforce only containers with this label; discovery exempts the
    /// others. None: every container under the container parent.
    pub enforce_label: Option<crate::containers::exempt::EnforceLabel>,
    /// Register discovered containers that hold capabilities reaching past
    /// what sluice can confine (privileged ones); refused by default.
    pub allow_privileged_containers: bool,
    /// Per-sandbox limits on the proxy's connections, and the descriptors
    /// kept for the daemon itself.
    pub limits: proxy::limits::LimitsConfig,
    /// Requests one sandbox may have held for an operator at once.
    pub max_held_approvals: usize,
    /// How long an HTTP/1 client has for each request head.
    pub header_read_timeout: Duration,
    /// A client connection with no bytes either way this long is closed.
    pub idle_timeout: Duration,
}

/// A proxy listener for connections an iptables/nftables REDIRECT rule sends
/// to it: their original destination comes from conntrack, and every one of
/// them is decided by the policy of the sandbox named here (it must be
/// registered by the time connections arrive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedirectListener {
    pub addr: SocketAddr,
    pub sandbox: String,
}

impl std::str::FromStr for RedirectListener {
    type Err = String;

    /// `ADDR=SANDBOX`, e.g. `10.231.0.1:15002=gateway`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (addr, sandbox) = text.split_once('=').ok_or("expected ADDR=SANDBOX, e.g. 10.231.0.1:15002=gateway")?;
        let addr = addr.parse().map_err(|e| format!("invalid listener address {addr:?}: {e}"))?;
        sandbox::validate_name(sandbox)?;
        Ok(Self { addr, sandbox: sandbox.to_owned() })
    }
}

impl DaemonConfig {
    pub fn new(instance: &str) -> anyhow::Result<Self> {
        sandbox::validate_name(instance).map_err(anyhow::Error::msg).context("invalid instance name")?;
        Ok(Self {
            instance: instance.to_owned(),
            cgroup_root: datapath::cgroup2_mount()?,
            proxy_port: DEFAULT_PROXY_PORT,
            dns_port: DEFAULT_DNS_PORT,
            upstream_dns: Vec::new(),
            decision_log: Some(PathBuf::from(format!("/var/log/{instance}/decisions.jsonl"))),
            audit: crate::audit::AuditConfig::for_instance(instance),
            serve_control: true,
            upstream_ca: Vec::new(),
            secrets_file: None,
            secrets_dir: None,
            redirect_listeners: Vec::new(),
            approval_timeout: Duration::from_mins(1),
            container_address: None,
            container_address6: None,
            docker_socket: None,
            containerd_socket: None,
            containerd_namespaces: crate::containers::containerd::Namespaces::default(),
            profiles_dir: None,
            enforce_label: None,
            allow_privileged_containers: false,
            limits: proxy::limits::LimitsConfig::default(),
            max_held_approvals: crate::approvals::DEFAULT_MAX_PER_SANDBOX,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_mins(5),
        })
    }

    pub fn cgroup_parent(&self) -> PathBuf {
        self.cgroup_root.join(&self.instance)
    }

    /// The parent of container sandboxes (`docker run --cgroup-parent`),
    /// below the enforced parent so the same programs cover it.
    pub fn containers_parent(&self) -> PathBuf {
        self.cgroup_parent().join(CONTAINERS_CGROUP)
    }

    /// `containers_parent` as container runtimes take it: a path from the
    /// cgroup root (`/sluice/containers`).
    pub fn containers_parent_relative(&self) -> PathBuf {
        Path::new("/").join(&self.instance).join(CONTAINERS_CGROUP)
    }

    pub fn pin_dir(&self) -> PathBuf {
        Path::new(datapath::BPFFS).join(&self.instance)
    }

    pub fn runtime_dir(&self) -> PathBuf {
        runtime_dir(&self.instance)
    }

    /// Names (never values) of secrets revoked through the control API.
    pub fn revoked_secrets_file(&self) -> PathBuf {
        self.runtime_dir().join("revoked-secrets.json")
    }

    pub fn control_socket(&self) -> PathBuf {
        control_socket(&self.instance)
    }

    /// Containers exempted by label (see `containers::exempt`).
    fn exempt_file(&self) -> PathBuf {
        self.runtime_dir().join("exempt.json")
    }

    fn state_file(&self) -> PathBuf {
        self.runtime_dir().join("sandboxes.json")
    }

    /// Sandboxes' CA certificates and trust bundles (readable by sandboxes).
    fn ca_dir(&self) -> PathBuf {
        self.runtime_dir().join("ca")
    }

    /// Sandboxes' CA keys, root-only, kept so a restarted daemon presents
    /// the same CA the sandboxes already trust.
    fn keys_dir(&self) -> PathBuf {
        self.runtime_dir().join("keys")
    }

    /// Bundles revoked across every sandbox; kept across restarts.
    fn revoked_file(&self) -> PathBuf {
        self.runtime_dir().join("revoked-bundles.json")
    }
}

/// The secret sources, and the revocations an earlier daemon recorded.
fn load_secrets(
    config: &DaemonConfig,
) -> anyhow::Result<(crate::credentials::SecretStore, crate::credentials::SecretEdits)> {
    let sources = crate::credentials::SecretStore::load(config.secrets_file.as_deref(), config.secrets_dir.as_deref())
        .context("loading secrets")?;
    Ok((sources, crate::credentials::SecretEdits::with_revoked(read_revoked(&config.revoked_secrets_file()))))
}

/// Names of revoked secrets, as JSON, in the runtime directory.
fn read_revoked(path: &Path) -> Vec<String> {
    std::fs::read(path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
}

pub fn runtime_dir(instance: &str) -> PathBuf {
    PathBuf::from("/run").join(instance)
}

pub fn control_socket(instance: &str) -> PathBuf {
    runtime_dir(instance).join("control.sock")
}

pub struct Daemon {
    config: DaemonConfig,
    datapath: Arc<Datapath>,
    registry: Arc<Registry>,
    log: Arc<DecisionLog>,
    upstream: Arc<Upstream>,
    target: Target,
    /// Where container sandboxes are sent (the container address), if any.
    container_target: Option<Target>,
    /// Registrations run one at a time: slot and port choice, map writes and
    /// the state file must agree.
    registering: tokio::sync::Mutex<()>,
    secrets: Arc<arc_swap::ArcSwap<crate::credentials::SecretStore>>,
    /// What the secret sources hold and the control API's edits over them;
    /// `secrets` is always the one applied to the other.
    secret_sources: Mutex<(crate::credentials::SecretStore, crate::credentials::SecretEdits)>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    unknown_resolvers: Mutex<Vec<SandboxResolver>>,
    /// Loopback addresses the proxy and resolvers listen on.
    listen_ips: Vec<IpAddr>,
    bridge: Arc<dyn DnsPolicy>,
    /// Bundles taken away from every sandbox.
    revoked: Mutex<policy::Revoked>,
    approvals: Arc<crate::approvals::Approvals>,
    /// Containers not enforced (`--enforce-label`), mirrored in the kernel.
    exemptions: Exemptions,
    /// Profile files as last seen (modification time, length), by sandbox.
    profile_stamps: Mutex<std::collections::HashMap<String, FileStamp>>,
}

/// What a profile file looked like when last read.
type FileStamp = (Option<SystemTime>, u64);

fn file_stamp(path: &Path) -> FileStamp {
    std::fs::metadata(path).map_or((None, 0), |m| (m.modified().ok(), m.len()))
}

impl Daemon {
    /// Starts everything; adopts pinned state and recorded sandboxes if an
    /// earlier daemon of this instance left them.
    pub async fn start(config: DaemonConfig) -> anyhow::Result<Arc<Self>> {
        preflight()?;
        not_dumpable()?;
        let parent = config.cgroup_parent();
        cgroup::create(&parent).with_context(|| format!("creating the enforced cgroup parent {}", parent.display()))?;
        // Audit: the signing key only where there is a trail to sign.
        let audit = match config.decision_log {
            Some(_) => config.audit.open().context("opening the audit signing key")?,
            None => crate::audit::Audit::default(),
        };
        let log = Arc::new(
            DecisionLog::open_audited(config.decision_log.as_deref(), crate::audit::LogLimits::default(), audit)
                .with_context(|| format!("opening the decision log {:?}", config.decision_log))?,
        );
        let upstream = Arc::new(if config.upstream_dns.is_empty() {
            Upstream::from_resolv_conf(Path::new("/etc/resolv.conf"))
                .context("reading upstream DNS servers from /etc/resolv.conf")?
        } else {
            Upstream::new(config.upstream_dns.clone(), Duration::from_secs(3))
        });

        // With pinned state the kernel already points at fixed ports: bind
        // those. Otherwise bind first and point the kernel at what we got.
        let adopted = if config.pin_dir().join("maps").exists() {
            Some(Datapath::open(&parent, &config.pin_dir(), Target::default())?)
        } else {
            None
        };
        let (proxy_port, dns_port) = adopted.as_ref().map_or((config.proxy_port, config.dns_port), |d| {
            (d.default_target().proxy_port, d.default_target().dns_port)
        });
        let ipv6 = match &adopted {
            Some(datapath) => datapath.default_target().ip6 == ip_to_words(LOOPBACK6.into()),
            None => std::net::TcpListener::bind((LOOPBACK6, 0)).is_ok(),
        };
        let listen_ips = listen_addresses(&config, ipv6)?;
        let proxy_listeners = bind_same_port(&listen_ips, proxy_port, |addr| async move {
            let listener = TcpListener::bind(addr).await?;
            let port = listener.local_addr()?.port();
            Ok((listener, port))
        })
        .await
        .with_context(|| format!("binding the proxy on port {proxy_port} (is another daemon running?)"))?;
        let mut proxy_addrs: Vec<SocketAddr> = proxy_listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
        let redirect_listeners = bind_redirect_listeners(&config.redirect_listeners, &mut proxy_addrs).await?;
        let registry = Arc::new(Registry::default());
        let bridge: Arc<dyn DnsPolicy> = Arc::new(DnsBridge { registry: registry.clone(), log: log.clone() });
        let unknown_resolvers = start_resolvers(&listen_ips, dns_port, 0, &bridge, &upstream)
            .await
            .with_context(|| format!("binding the resolver on port {dns_port}"))?;
        let target = Target {
            ip6: if ipv6 { ip_to_words(LOOPBACK6.into()) } else { ip_to_words(IpAddr::V6(LOOPBACK.to_ipv6_mapped())) },
            ip4: u32::from(LOOPBACK).to_be(),
            proxy_port: proxy_addrs[0].port(),
            dns_port: unknown_resolvers[0].local_addr().port(),
        };
        let datapath = Arc::new(match adopted {
            Some(datapath) => datapath,
            None => Datapath::open(&parent, &config.pin_dir(), target)
                .with_context(|| format!("setting up the kernel programs on {}", parent.display()))?,
        });
        datapath.add_endpoint(target, target.proxy_port, PROTO_TCP)?;
        datapath.add_endpoint(target, target.dns_port, sluice_common::PROTO_UDP)?;
        datapath.add_endpoint(target, target.dns_port, PROTO_TCP)?;

        let (sources, edits) = load_secrets(&config)?;
        let secrets = edits.apply(&sources);
        let revoked: policy::Revoked = std::fs::read(config.revoked_file())
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let secrets = Arc::new(arc_swap::ArcSwap::from_pointee(secrets));
        log.identify_containers_with(container_identity(registry.clone(), secrets.clone()));
        let daemon = Arc::new(Self {
            exemptions: Exemptions::readopt(config.exempt_file(), datapath.clone(), config.enforce_label.is_some()),
            revoked: Mutex::new(revoked),
            approvals: Arc::new(crate::approvals::Approvals::with_limit(
                config.approval_timeout,
                config.max_held_approvals,
            )),
            profile_stamps: Mutex::new(std::collections::HashMap::new()),
            container_target: enforce_containers(&config, &datapath, target)?,
            secrets,
            secret_sources: Mutex::new((sources, edits)),
            config,
            datapath: datapath.clone(),
            registry: registry.clone(),
            log: log.clone(),
            upstream,
            target,
            registering: tokio::sync::Mutex::new(()),
            tasks: Mutex::new(Vec::new()),
            unknown_resolvers: Mutex::new(unknown_resolvers),
            listen_ips,
            bridge,
        });

        daemon.serve_proxy(proxy_listeners, redirect_listeners, proxy_addrs.clone())?;
        if let Some(events) = datapath.take_events() {
            let (registry, log) = (registry.clone(), log.clone());
            daemon.spawn(forward_kernel_events(events, registry, log));
        }
        daemon.readopt().await;
        daemon.spawn(watch_links(datapath.clone(), log.clone()));
        daemon.watch_profile_files();
        daemon.start_discovery()?;
        if daemon.config.serve_control {
            let socket = daemon.config.control_socket();
            let listener_daemon = daemon.clone();
            // Bind now so callers can rely on the socket once start returns.
            let listener = crate::control::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
            drop(listener);
            daemon.spawn(async move {
                if let Err(error) = crate::control::serve(&socket, listener_daemon).await {
                    tracing::error!(%error, "control API stopped");
                }
            });
        }
        daemon.record_start();
        tracing::info!(
            instance = %daemon.config.instance,
            origin = ?datapath.origin(),
            proxy = ?proxy_addrs,
            lsm = datapath.lsm_enabled(),
            "sluice is enforcing {}",
            daemon.config.cgroup_parent().display()
        );
        Ok(daemon)
    }

    /// Audit: the daemon's start, in the trail.
    fn record_start(&self) {
        let how = if self.datapath.origin() == Origin::Adopted { "adopted" } else { "made" };
        let reason = format!(
            "sluice {} started (instance {}, pid {}, {how} the pinned kernel state)",
            env!("CARGO_PKG_VERSION"),
            self.config.instance,
            std::process::id()
        );
        self.log.record(Decision::new(Kind::Lifecycle, Verdict::Info, "daemon-start", reason));
    }

    /// Follows the container runtimes the configuration names.
    fn start_discovery(self: &Arc<Self>) -> anyhow::Result<()> {
        if let Some(socket) = self.config.docker_socket.clone() {
            if self.container_target.is_none() {
                bail!("discovering Docker containers needs a container address (--container-address)");
            }
            self.spawn(crate::containers::docker::watch(self.clone(), socket));
        }
        if let Some(socket) = self.config.containerd_socket.clone() {
            if self.container_target.is_none() {
                bail!("discovering containerd containers needs a container address (--container-address)");
            }
            let namespaces = self.config.containerd_namespaces.clone();
            self.spawn(crate::containers::containerd::watch(self.clone(), socket, namespaces));
        }
        Ok(())
    }

    /// Starts the proxy on its listeners: the kernel programs' and those for
    /// redirected connections.
    fn serve_proxy(
        &self,
        listeners: Vec<TcpListener>,
        redirect_listeners: Vec<(TcpListener, proxy::Attribution)>,
        addrs: Vec<SocketAddr>,
    ) -> anyhow::Result<()> {
        let upstream_roots = Arc::new(
            crate::tls::UpstreamRoots::system_and(&self.config.upstream_ca)
                .context("loading the roots upstream certificates are verified against")?,
        );
        let mut context = ProxyContext::new(
            self.datapath.clone(),
            self.registry.clone(),
            self.log.clone(),
            addrs,
            upstream_roots,
            self.secrets.clone(),
        );
        context.approvals = self.approvals.clone();
        context.set_limits(self.config.limits);
        context.header_read_timeout = self.config.header_read_timeout;
        context.idle_timeout = self.config.idle_timeout;
        let context = Arc::new(context);
        let kernel = listeners.into_iter().map(|listener| (listener, proxy::Attribution::Kernel));
        for (listener, attribution) in kernel.chain(redirect_listeners) {
            self.spawn(proxy::serve(listener, context.clone(), attribution));
        }
        Ok(())
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.lock().expect("lock poisoned").push(tokio::spawn(task));
    }

    pub fn log(&self) -> &Arc<DecisionLog> {
        &self.log
    }

    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    pub fn exemptions(&self) -> &Exemptions {
        &self.exemptions
    }

    /// Whether a cgroup path (relative to the cgroup v2 root, as in
    /// /proc/PID/cgroup) is at or under the enforced parent.
    pub fn is_enforced_cgroup(&self, relative: &Path) -> bool {
        let absolute = self.config.cgroup_root.join(relative.strip_prefix("/").unwrap_or(relative));
        absolute.starts_with(self.config.cgroup_parent())
    }

    pub fn health(&self) -> Health {
        Health {
            instance: self.config.instance.clone(),
            pid: std::process::id(),
            adopted: self.datapath.origin() == Origin::Adopted,
            lsm: self.datapath.lsm_enabled(),
            cgroup_parent: self.config.cgroup_parent(),
            proxy_port: self.target.proxy_port,
            decision_log: self.log.path().map(Path::to_owned),
            audit_key: self.log.path().map(|_| self.config.audit.key_file.clone()),
            secrets_file: self.config.secrets_file.clone(),
            secrets_dir: self.config.secrets_dir.clone(),
        }
    }

    pub fn statuses(&self) -> Vec<SandboxStatus> {
        self.registry.list().iter().map(|sandbox| self.status(sandbox)).collect()
    }

    fn status(&self, sandbox: &Sandbox) -> SandboxStatus {
        let counters = self.datapath.counters(sandbox.record.slot);
        SandboxStatus {
            record: sandbox.current_record(),
            profile_name: sandbox.policy.load().name().to_owned(),
            processes: cgroup::pids(&sandbox.record.cgroup).len(),
            redirected: counters.redirected,
            dns: counters.dns,
            refused: counters.refused,
            dropped_packets: counters.dropped_packets,
            env: crate::credentials::environment(sandbox.policy.load().credentials(), &sandbox.placeholders()),
        }
    }

    /// Registers a sandbox: compiles its profile, makes (or checks) its
    /// cgroup, starts its resolver and enrolls it in the kernel.
    pub async fn register(&self, request: RegisterRequest) -> anyhow::Result<SandboxStatus> {
        self.register_with(request, None).await
    }

    /// [`Daemon::register`], for a sandbox that stands for a container its
    /// runtime reported.
    pub async fn register_with(
        &self,
        request: RegisterRequest,
        container: Option<sandbox::ContainerInfo>,
    ) -> anyhow::Result<SandboxStatus> {
        sandbox::validate_name(&request.name).map_err(anyhow::Error::msg)?;
        let (source, policy) = self.compile_source(request.profile, &labels_of(container.as_ref()))?;
        let _guard = self.registering.lock().await;
        let parent = match request.placement {
            sandbox::Placement::Host => self.config.cgroup_parent(),
            sandbox::Placement::Container if self.container_target.is_some() => self.config.containers_parent(),
            sandbox::Placement::Container => {
                bail!("this daemon has no container address; start it with --container-address to enforce containers")
            }
        };
        let (cgroup_path, owns_cgroup) = if let Some(path) = &request.cgroup {
            let absolute = self.config.cgroup_root.join(path.strip_prefix("/").unwrap_or(path));
            if !absolute.starts_with(&parent) || absolute == parent {
                bail!("cgroup {} is not under the enforced parent {}", absolute.display(), parent.display());
            }
            if !absolute.is_dir() {
                bail!("cgroup {} does not exist", absolute.display());
            }
            (absolute, false)
        } else {
            let path = parent.join(&request.name);
            let created = cgroup::create(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
            if !created {
                bail!("cgroup {} already exists; pass it as `cgroup` to enroll it", path.display());
            }
            (path, true)
        };
        let record = SandboxRecord {
            name: request.name.clone(),
            cgroup_id: cgroup::id(&cgroup_path)?,
            cgroup: cgroup_path.clone(),
            slot: 0,
            dns_port: 0,
            profile: source,
            owns_cgroup,
            ca_bundle: PathBuf::new(),
            placeholders: crate::credentials::placeholders_for(
                policy.credentials(),
                &std::collections::BTreeMap::new(),
            ),
            created: SystemTime::now(),
            placement: request.placement,
            container,
        };
        match self.install(record, policy).await {
            Ok(sandbox) => {
                self.persist();
                let mut decision = Decision::new(
                    Kind::Lifecycle,
                    Verdict::Info,
                    "registered",
                    format!(
                        "sandbox {} enforced on {} with profile {}{}",
                        sandbox.name(),
                        sandbox.record.cgroup.display(),
                        sandbox.record.profile.describe(),
                        sandbox.container().map(|c| format!(" for {}", c.describe())).unwrap_or_default()
                    ),
                );
                decision.sandbox = Some(sandbox.name().to_owned());
                self.log.record(decision);
                Ok(self.status(&sandbox))
            }
            Err(error) => {
                if owns_cgroup {
                    let _ = cgroup::remove(&cgroup_path);
                }
                Err(error)
            }
        }
    }

    /// Starts a sandbox's resolver, enrolls it and adds it to the registry.
    /// `record.dns_port` is reused when set (re-adoption), else chosen.
    async fn install(&self, mut record: SandboxRecord, policy: Policy) -> anyhow::Result<Arc<Sandbox>> {
        let slot = self.registry.reserve(&record.name, record.cgroup_id)?;
        record.slot = slot;
        let resolvers =
            start_resolvers(&self.listen_ips, record.dns_port, record.cgroup_id, &self.bridge, &self.upstream);
        let resolvers = match resolvers.await {
            Ok(resolvers) => resolvers,
            // The old port is taken: pick another and repoint the kernel.
            Err(_) if record.dns_port != 0 => {
                start_resolvers(&self.listen_ips, 0, record.cgroup_id, &self.bridge, &self.upstream).await?
            }
            Err(error) => return Err(error),
        };
        record.dns_port = resolvers[0].local_addr().port();
        let tls = self.sandbox_tls(&mut record)?;
        let target = match record.placement {
            sandbox::Placement::Host => self.target,
            sandbox::Placement::Container => self
                .container_target
                .context("a container sandbox, and this daemon has no container address (--container-address)")?,
        };
        let entry = SandboxEntry { target: Target { dns_port: record.dns_port, ..target }, slot, _pad: 0 };
        let cgroup_id = record.cgroup_id;
        let sandbox = Arc::new(Sandbox::new(record, policy, resolvers, tls));
        self.registry.insert(sandbox.clone())?;
        if let Err(error) = self.datapath.enroll(cgroup_id, entry) {
            self.registry.remove(sandbox.name());
            sandbox.shut_down();
            return Err(error.into());
        }
        Ok(sandbox)
    }

    /// The sandbox's CA: the one kept for it if there is one (a restarted
    /// daemon), else a new one. Writes its trust bundle and records where.
    fn sandbox_tls(&self, record: &mut SandboxRecord) -> anyhow::Result<SandboxTls> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let (ca_dir, keys_dir) = (self.config.ca_dir(), self.config.keys_dir());
        std::fs::create_dir_all(&ca_dir)?;
        std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::create_dir_all(&keys_dir)?;
        std::fs::set_permissions(&keys_dir, std::fs::Permissions::from_mode(0o700))?;
        let (cert_path, key_path) =
            (ca_dir.join(format!("{}-ca.pem", record.name)), keys_dir.join(format!("{}.key", record.name)));
        let kept = match (std::fs::read_to_string(&cert_path), std::fs::read_to_string(&key_path)) {
            (Ok(cert), Ok(key)) if !record.ca_bundle.as_os_str().is_empty() => {
                crate::tls::SandboxCa::from_pem(&cert, &key).ok()
            }
            _ => None,
        };
        let ca = if let Some(ca) = kept {
            ca
        } else {
            let ca = crate::tls::SandboxCa::generate(&record.name)?;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .mode(0o600)
                .open(&key_path)
                .and_then(|mut file| std::io::Write::write_all(&mut file, ca.key_pem_for_storage().as_bytes()))
                .with_context(|| format!("storing the CA key in {}", key_path.display()))?;
            std::fs::write(&cert_path, ca.cert_pem())?;
            ca
        };
        let bundle = ca_dir.join(format!("{}-bundle.pem", record.name));
        std::fs::write(&bundle, crate::tls::trust_bundle(&ca)?)?;
        std::fs::set_permissions(&bundle, std::fs::Permissions::from_mode(0o644))?;
        record.ca_bundle = bundle;
        tracing::info!(sandbox = %record.name, ca = %ca.fingerprint_sha256(), "sandbox CA ready");
        let ca = Arc::new(ca);
        let minter = Arc::new(crate::tls::LeafMinter::new(ca.clone(), 1024)?);
        Ok(SandboxTls { ca, minter })
    }

    fn forget_tls(&self, name: &str) {
        for path in [
            self.config.ca_dir().join(format!("{name}-ca.pem")),
            self.config.ca_dir().join(format!("{name}-bundle.pem")),
            // Written by `sluice run` for wget.
            self.config.ca_dir().join(format!("{name}-bundle.wgetrc")),
            self.config.keys_dir().join(format!("{name}.key")),
        ] {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Re-reads the secrets (rotation). The next request uses them, on new
    /// and kept-alive connections alike; revocations and values set through
    /// the API stay. On error the secrets in force stay. Returns how many
    /// secrets are held.
    pub fn reload_secrets(&self) -> anyhow::Result<usize> {
        let loaded = crate::credentials::SecretStore::load(
            self.config.secrets_file.as_deref(),
            self.config.secrets_dir.as_deref(),
        )?;
        let mut sources = self.secret_sources.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        sources.0 = loaded;
        let store = sources.1.apply(&sources.0);
        let count = store.len();
        self.secrets.store(Arc::new(store));
        drop(sources);
        let decision =
            Decision::new(Kind::Lifecycle, Verdict::Info, "secrets-reloaded", format!("{count} secrets held"));
        self.log.record(decision);
        Ok(count)
    }

    /// Names of the secrets, where each came from, which are revoked.
    pub fn secrets(&self) -> Vec<crate::credentials::SecretInfo> {
        self.secrets.load().list()
    }

    /// Sets a secret's value (rotation through the API; lifts a revocation).
    /// The next request uses it.
    pub fn set_secret(&self, name: &str, value: crate::credentials::Secret) -> anyhow::Result<()> {
        anyhow::ensure!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)),
            "secret name {name:?} must be letters, digits, '_', '-' or '.'"
        );
        anyhow::ensure!(!value.expose().is_empty(), "the value of secret {name:?} is empty");
        self.edit_secrets(name, "secret-set", |edits| edits.set(name, value))
    }

    /// Revokes a secret now: no request gets it (kept-alive connections
    /// included) and requests that need it are refused, until a new value
    /// is set. Survives reloads and daemon restarts.
    pub fn revoke_secret(&self, name: &str) -> anyhow::Result<()> {
        self.edit_secrets(name, "secret-revoked", |edits| edits.revoke(name))
    }

    fn edit_secrets(
        &self,
        name: &str,
        rule: &str,
        edit: impl FnOnce(&mut crate::credentials::SecretEdits),
    ) -> anyhow::Result<()> {
        let mut sources = self.secret_sources.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        edit(&mut sources.1);
        self.secrets.store(Arc::new(sources.1.apply(&sources.0)));
        let revoked: Vec<&String> = sources.1.revoked().collect();
        let path = self.config.revoked_secrets_file();
        let saved = std::fs::create_dir_all(self.config.runtime_dir())
            .and_then(|()| write_private(&path, &serde_json::to_vec(&revoked).unwrap_or_default()));
        drop(sources);
        let reason = match rule {
            "secret-revoked" => format!("secret {name} revoked through the control API"),
            _ => format!("secret {name} set through the control API"),
        };
        self.log.record(Decision::new(Kind::Lifecycle, Verdict::Info, rule, reason));
        saved.with_context(|| format!("saving revoked secret names to {}", path.display()))
    }

    /// Edits a sandbox's profile in force (add or remove a rule) and puts
    /// the result in force like [`Daemon::set_profile`].
    pub async fn edit_profile(
        &self,
        name: &str,
        edit: impl FnOnce(&mut policy::Profile) -> anyhow::Result<()>,
    ) -> anyhow::Result<SandboxStatus> {
        let sandbox = self.registry.by_name(name).with_context(|| format!("no sandbox named {name:?}"))?;
        let source = sandbox.current_record().profile;
        let mut profile = in_force(&source)?;
        let origin = source.describe().into_owned();
        edit(&mut profile)?;
        let text = toml::to_string(&profile).context("writing the edited profile")?;
        let origin = if origin.ends_with(" (edited)") { origin } else { format!("{origin} (edited)") };
        self.set_profile(name, ProfileSource::Inline { origin, text }).await
    }

    /// The profile a sandbox enforces, as text.
    pub fn profile_view(&self, name: &str) -> Option<crate::control::ProfileView> {
        let sandbox = self.registry.by_name(name)?;
        let source = sandbox.current_record().profile;
        let (file, text) = match &source {
            ProfileSource::Builtin => (None, policy::BUILTIN_DEFAULT_TOML.to_owned()),
            ProfileSource::Inline { text, .. } => (None, text.clone()),
            ProfileSource::File { path, text } => (Some(path.clone()), text.clone()),
        };
        Some(crate::control::ProfileView {
            sandbox: name.to_owned(),
            profile_name: sandbox.policy.load().name().to_owned(),
            origin: source.describe().into_owned(),
            file,
            text,
        })
    }

    /// Ties a sandbox to the container it enforces (registered first, as
    /// `sluice docker run` does, then reported by the runtime). Rules with
    /// `labels` are decided against the container's labels from now on.
    pub async fn bind_container(&self, sandbox: &Sandbox, info: sandbox::ContainerInfo) -> anyhow::Result<()> {
        let relabelled = sandbox.container().map(|c| c.labels).as_ref() != Some(&info.labels);
        let labels = info.labels.clone();
        sandbox.set_container(info);
        self.persist();
        if !relabelled {
            return Ok(());
        }
        let source = sandbox.current_record().profile;
        let profile = in_force(&source)?;
        if profile.rules.iter().any(|rule| rule.labels.is_some()) {
            let policy = Policy::compile_for(&profile, &self.revoked(), &labels)?;
            self.put_in_force(sandbox.name(), source, policy, "profile-relabelled").await?;
        }
        Ok(())
    }

    /// Replaces a sandbox's profile at runtime. A broken profile is refused
    /// and the one in force stays.
    pub async fn set_profile(&self, name: &str, source: ProfileSource) -> anyhow::Result<SandboxStatus> {
        let labels = labels_of(self.registry.by_name(name).and_then(|sandbox| sandbox.container()).as_ref());
        let (source, policy) = self.compile_source(source, &labels)?;
        self.put_in_force(name, source, policy, "profile-changed").await
    }

    async fn put_in_force(
        &self,
        name: &str,
        source: ProfileSource,
        policy: Policy,
        why: &str,
    ) -> anyhow::Result<SandboxStatus> {
        let _guard = self.registering.lock().await;
        let sandbox = self.registry.by_name(name).with_context(|| format!("no sandbox named {name:?}"))?;
        let described = source.describe().into_owned();
        if let ProfileSource::File { path, .. } = &source {
            self.profile_stamps.lock().expect("lock poisoned").insert(name.to_owned(), file_stamp(path));
        }
        sandbox.replace_policy(source, policy);
        self.persist();
        let mut decision =
            Decision::new(Kind::Lifecycle, Verdict::Info, why, format!("sandbox {name} now enforces {described}"));
        decision.sandbox = Some(name.to_owned());
        self.log.record(decision);
        Ok(self.status(&sandbox))
    }

    /// Checks profile files for changes every [`PROFILE_POLL`].
    fn watch_profile_files(self: &Arc<Self>) {
        let watcher = self.clone();
        self.spawn(async move {
            let mut tick = tokio::time::interval(PROFILE_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                watcher.reload_profiles(false).await;
            }
        });
    }

    /// Compiles a profile source with the bundles revoked now. A file is read
    /// (includes resolved) and the source returned carries that text as its
    /// last good version.
    fn compile_source(
        &self,
        source: ProfileSource,
        labels: &policy::Labels,
    ) -> anyhow::Result<(ProfileSource, Policy)> {
        let profile = source.load()?;
        let policy = Policy::compile_for(&profile, &self.revoked(), labels)?;
        let source = match source {
            ProfileSource::File { path, .. } => {
                let path = path.canonicalize().unwrap_or(path);
                ProfileSource::File { path, text: toml::to_string(&profile).context("writing the profile")? }
            }
            other => other,
        };
        Ok((source, policy))
    }

    pub fn revoked(&self) -> policy::Revoked {
        self.revoked.lock().expect("lock poisoned").clone()
    }

    pub fn approvals(&self) -> &Arc<crate::approvals::Approvals> {
        &self.approvals
    }

    /// Reads profile files again: those whose file changed since last seen,
    /// or all of them (`force`, on SIGHUP). A file that no longer parses is
    /// refused, logged, and its last good version stays in force. Returns
    /// (sandbox, outcome) for each file read.
    pub async fn reload_profiles(&self, force: bool) -> Vec<(String, Result<bool, String>)> {
        let mut outcomes = Vec::new();
        for sandbox in self.registry.list() {
            let ProfileSource::File { path, text } = sandbox.current_record().profile else { continue };
            let name = sandbox.name().to_owned();
            let stamp = file_stamp(&path);
            let previous = self.profile_stamps.lock().expect("lock poisoned").insert(name.clone(), stamp);
            // Not seen before (just registered or adopted): compare its text.
            if !force && previous.is_some_and(|seen| seen == stamp) {
                continue;
            }
            let file = ProfileSource::File { path: path.clone(), text: String::new() };
            let outcome = match self.compile_source(file, &labels_of(sandbox.container().as_ref())) {
                Ok((ProfileSource::File { text: new_text, .. }, _)) if new_text == text => Ok(false),
                Ok((source, policy)) => self
                    .put_in_force(&name, source, policy, "profile-reloaded")
                    .await
                    .map(|_| true)
                    .map_err(|e| format!("{e:#}")),
                Err(error) => {
                    let error = format!("{error:#}");
                    tracing::error!(sandbox = %name, %error, "profile file refused; the last good profile stays in force");
                    let mut decision = Decision::new(
                        Kind::Lifecycle,
                        Verdict::Info,
                        "profile-reload-failed",
                        format!("{error}; the last good profile stays in force"),
                    );
                    decision.sandbox = Some(name.clone());
                    self.log.record(decision);
                    Err(error)
                }
            };
            outcomes.push((name, outcome));
        }
        outcomes
    }

    /// Takes a capability bundle away from every sandbox at once (or gives
    /// it back), now and after restarts. Returns the sandboxes whose
    /// profiles take the bundle, each recompiled.
    pub async fn set_bundle_revoked(&self, bundle: &str, revoke: bool) -> anyhow::Result<Vec<String>> {
        policy::bundles::get(bundle)?;
        {
            let mut revoked = self.revoked.lock().expect("lock poisoned");
            if revoke {
                revoked.insert(bundle.to_owned());
            } else {
                revoked.remove(bundle);
            }
            let path = self.config.revoked_file();
            std::fs::create_dir_all(self.config.runtime_dir())?;
            write_private(&path, &serde_json::to_vec(&*revoked)?)
                .with_context(|| format!("saving {}", path.display()))?;
        }
        let revoked = self.revoked();
        let mut affected = Vec::new();
        for sandbox in self.registry.list() {
            let source = sandbox.current_record().profile;
            let profile = in_force(&source)?;
            if !profile.bundles.iter().any(|b| b == bundle) {
                continue;
            }
            let policy = Policy::compile_for(&profile, &revoked, &labels_of(sandbox.container().as_ref()))?;
            let why = if revoke { "bundle-revoked" } else { "bundle-restored" };
            self.put_in_force(sandbox.name(), source, policy, why).await?;
            affected.push(sandbox.name().to_owned());
        }
        Ok(affected)
    }

    /// Answers a held request. "Always" also adds a rule for the same
    /// destination, method and path to the sandbox's profile.
    pub async fn answer_approval(
        &self,
        id: u64,
        answer: crate::approvals::Answer,
    ) -> anyhow::Result<crate::approvals::Pending> {
        let Some(pending) = self.approvals.list().into_iter().find(|p| p.id == id) else {
            bail!("nothing is waiting for approval {id} (answered already, timed out, or never asked)");
        };
        if answer.always {
            let rule = remembered_rule(&pending, answer.allow);
            let rule_name = rule.name.clone().unwrap_or_default();
            self.edit_profile(&pending.sandbox, |profile| {
                match rule.action {
                    policy::Action::Allow => profile.rules.insert(0, rule),
                    _ => profile.rules.push(rule),
                }
                Ok(())
            })
            .await
            .with_context(|| format!("remembering the answer as rule {rule_name}"))?;
        }
        self.approvals.answer(id, answer).with_context(|| format!("approval {id} ended while it was being answered"))
    }

    /// Removes a sandbox. In a cgroup sluice made, remaining processes are
    /// killed and the cgroup removed; an enrolled foreign cgroup is left as it
    /// is (its processes stay redirected, and are denied as unknown).
    pub async fn unregister(&self, name: &str) -> anyhow::Result<bool> {
        let _guard = self.registering.lock().await;
        let Some(sandbox) = self.registry.remove(name) else {
            return Ok(false);
        };
        if sandbox.record.owns_cgroup {
            let path = sandbox.record.cgroup.clone();
            tokio::task::spawn_blocking(move || cgroup::kill_all(&path, Duration::from_secs(5))).await??;
        }
        self.datapath.unenroll(sandbox.record.cgroup_id)?;
        sandbox.shut_down();
        self.forget_tls(name);
        if sandbox.record.owns_cgroup {
            cgroup::remove(&sandbox.record.cgroup)
                .with_context(|| format!("removing cgroup {}", sandbox.record.cgroup.display()))?;
            if let Ok(relative) = sandbox.record.cgroup.strip_prefix(&self.config.cgroup_root) {
                // Container runtimes on hybrid hosts mirror the directory in
                // the v1 hierarchies; remove what they left there.
                cgroup::remove_v1_mirrors(relative);
            }
        }
        self.persist();
        let mut decision = Decision::new(Kind::Lifecycle, Verdict::Info, "removed", format!("sandbox {name} removed"));
        decision.sandbox = Some(name.to_owned());
        self.log.record(decision);
        Ok(true)
    }

    pub(crate) fn persist(&self) {
        let path = self.config.state_file();
        let result = (|| -> std::io::Result<()> {
            std::fs::create_dir_all(self.config.runtime_dir())?;
            let tmp = path.with_extension("json.tmp");
            write_private(&tmp, &serde_json::to_vec_pretty(&self.registry.records())?)?;
            std::fs::rename(tmp, &path)
        })();
        if let Err(error) = result {
            tracing::error!(%error, path = %path.display(), "could not save sandbox state");
        }
    }

    /// Takes over the sandboxes an earlier daemon of this instance recorded.
    async fn readopt(&self) {
        let path = self.config.state_file();
        let Ok(text) = std::fs::read_to_string(&path) else { return };
        let records: Vec<SandboxRecord> = match serde_json::from_str(&text) {
            Ok(records) => records,
            Err(error) => {
                tracing::error!(%error, path = %path.display(), "ignoring unreadable sandbox state");
                return;
            }
        };
        let enrolled = self.datapath.enrolled();
        for record in records {
            let current_id = cgroup::id(&record.cgroup).ok();
            if current_id != Some(record.cgroup_id) {
                tracing::info!(sandbox = %record.name, "cgroup is gone; dropping the sandbox");
                let _ = self.datapath.unenroll(record.cgroup_id);
                continue;
            }
            let name = record.name.clone();
            let revoked = self.revoked();
            let labels = labels_of(record.container.as_ref());
            let compiled = record
                .profile
                .load_or_last_good()
                .map_err(anyhow::Error::from)
                .and_then(|profile| Ok(Policy::compile_for(&profile, &revoked, &labels)?));
            let result = match compiled {
                Ok(policy) => self.install(record, policy).await.map(|_| ()),
                Err(error) => Err(error),
            };
            match result {
                Ok(()) => tracing::info!(sandbox = %name, "re-adopted sandbox"),
                Err(error) => {
                    tracing::error!(sandbox = %name, error = %format!("{error:#}"), "could not re-adopt sandbox");
                }
            }
        }
        // Anything enrolled in the kernel that no record explains stays
        // redirected but unknown, which denies it: log it for the operator.
        for (cgroup_id, _) in enrolled {
            if self.registry.by_cgroup(cgroup_id).is_none() {
                tracing::warn!(cgroup_id, "enrolled cgroup without a record; removing it from the map");
                let _ = self.datapath.unenroll(cgroup_id);
            }
        }
        self.persist();
    }

    /// Stops serving. Pinned programs stay attached: sandboxes remain cut
    /// off until a daemon comes back or `sluice teardown` runs.
    pub fn stop(&self) {
        // First: the link watchdog must not pin anything a teardown removes.
        self.datapath.close();
        for task in self.tasks.lock().expect("lock poisoned").drain(..) {
            task.abort();
        }
        for sandbox in self.registry.list() {
            sandbox.shut_down();
        }
        for resolver in self.unknown_resolvers.lock().expect("lock poisoned").drain(..) {
            resolver.stop();
        }
    }

    /// Removes every sandbox sluice made and every pin: the instance is gone.
    pub async fn teardown(&self) -> anyhow::Result<()> {
        for sandbox in self.registry.list() {
            self.unregister(sandbox.name()).await?;
        }
        self.stop();
        teardown_instance(&self.config)?;
        Ok(())
    }
}

/// The container identity records of DNS and kernel decisions carry (the
/// proxy's records take it from their flow).
fn container_identity(
    registry: Arc<Registry>,
    secrets: Arc<arc_swap::ArcSwap<crate::credentials::SecretStore>>,
) -> Box<crate::audit::ContainerOf> {
    Box::new(move |name| {
        let sandbox = registry.by_name(name)?;
        crate::proxy::container_for_records(&sandbox, &secrets.load())
    })
}

/// Removes an instance's pins (detaching its programs), its runtime state,
/// and its cgroup parent if empty. Works with or without a daemon.
pub fn teardown_instance(config: &DaemonConfig) -> anyhow::Result<usize> {
    let removed = datapath::teardown(&config.pin_dir())?;
    // State, control socket, CA certificates and keys: all of it is the
    // instance's own.
    crate::containers::host_address::remove_recorded(&config.runtime_dir());
    let _ = std::fs::remove_dir_all(config.runtime_dir());
    let parent = config.cgroup_parent();
    if parent.exists() && cgroup::pids(&parent).is_empty() {
        let _ = cgroup::remove(&parent);
        cgroup::remove_v1_mirrors(Path::new(&config.instance));
    }
    Ok(removed)
}

/// The addresses the proxy and resolvers listen on: loopback, and the
/// container address (put on the loopback interface now) if there is one.
fn listen_addresses(config: &DaemonConfig, ipv6: bool) -> anyhow::Result<Vec<IpAddr>> {
    let mut ips: Vec<IpAddr> = if ipv6 { vec![LOOPBACK.into(), LOOPBACK6.into()] } else { vec![LOOPBACK.into()] };
    if config.container_address6.is_some() && config.container_address.is_none() {
        bail!("an IPv6 container address needs an IPv4 one too (--container-address)");
    }
    if config.container_address6.is_some() && !ipv6 {
        bail!("an IPv6 container address, and this host has no IPv6 loopback");
    }
    let container_addresses = config.container_address.map(IpAddr::from).into_iter();
    for address in container_addresses.chain(config.container_address6.map(IpAddr::from)) {
        crate::containers::host_address::add(address, &config.runtime_dir())
            .with_context(|| format!("putting the container address {address} on the loopback interface"))?;
        ips.push(address);
    }
    Ok(ips)
}

/// With a container address: the container parent below the enforced
/// parent, whose unregistered cgroups the kernel sends to that address.
/// Returns where container sandboxes are sent.
fn enforce_containers(config: &DaemonConfig, datapath: &Datapath, target: Target) -> anyhow::Result<Option<Target>> {
    let Some(address) = config.container_address else { return Ok(None) };
    let ip6 = config.container_address6.unwrap_or_else(|| address.to_ipv6_mapped());
    let container_target = Target { ip4: u32::from(address).to_be(), ip6: ip_to_words(IpAddr::V6(ip6)), ..target };
    let containers = config.containers_parent();
    cgroup::create(&containers).with_context(|| format!("creating the container parent {}", containers.display()))?;
    datapath
        .add_parent(&containers, container_target)
        .with_context(|| format!("pointing {} at the container address", containers.display()))?;
    Ok(Some(container_target))
}

/// Binds one listener per address, all on the same port; with port 0 the
/// first picks it, and a clash on another address starts over.
async fn bind_same_port<T, F, Fut>(ips: &[IpAddr], port: u16, bind: F) -> anyhow::Result<Vec<T>>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<(T, u16)>>,
{
    let mut attempts = 0;
    'retry: loop {
        attempts += 1;
        let mut bound = Vec::with_capacity(ips.len());
        let mut chosen = port;
        for ip in ips {
            match bind(SocketAddr::new(*ip, chosen)).await {
                Ok((listener, actual)) => {
                    chosen = actual;
                    bound.push(listener);
                }
                Err(_) if port == 0 && !bound.is_empty() && attempts < 8 => continue 'retry,
                Err(error) => return Err(error.context(format!("binding {ip}:{chosen}"))),
            }
        }
        return Ok(bound);
    }
}

/// A sandbox's resolver on every listening address, one port for all.
async fn start_resolvers(
    ips: &[IpAddr],
    port: u16,
    sandbox: u64,
    policy: &Arc<dyn DnsPolicy>,
    upstream: &Arc<Upstream>,
) -> anyhow::Result<Vec<SandboxResolver>> {
    bind_same_port(ips, port, |addr| async move {
        let resolver =
            SandboxResolver::start(addr, sandbox, policy.clone(), upstream.clone(), dns::Limits::default()).await?;
        let port = resolver.local_addr().port();
        Ok((resolver, port))
    })
    .await
}

/// How often profile files are checked for changes.
const PROFILE_POLL: Duration = Duration::from_millis(500);

/// A sandbox's labels for its rules: its container's, if it has one.
fn labels_of(container: Option<&sandbox::ContainerInfo>) -> policy::Labels {
    container.map(|c| c.labels.clone()).unwrap_or_default()
}

/// The profile a source has in force: for a file, its last good version
/// (not the file as it is now).
fn in_force(source: &ProfileSource) -> anyhow::Result<policy::Profile> {
    Ok(match source {
        ProfileSource::File { path, text } => policy::parse_profile(text, &path.display().to_string())?,
        other => other.load()?,
    })
}

/// The rule an "always" answer adds: the same host (or address), port,
/// method and exact path.
fn remembered_rule(pending: &crate::approvals::Pending, allow: bool) -> policy::RuleSpec {
    let host = pending.host.as_deref().and_then(|h| h.parse::<policy::HostPattern>().ok());
    let ip_only = host.is_none() || pending.host.as_deref().is_some_and(|h| h.parse::<IpAddr>().is_ok());
    let (verb, action) = if allow { ("approved", policy::Action::Allow) } else { ("refused", policy::Action::Deny) };
    policy::RuleSpec {
        name: Some(format!("{verb}-{}", pending.id)),
        action,
        hosts: if ip_only { None } else { host.map(|h| vec![h]) },
        ips: ip_only.then(|| vec![policy::IpPattern::from(ipnet::IpNet::from(pending.destination.ip()))]),
        ports: policy::PortRange::single(pending.destination.port()).ok().map(|p| vec![p]),
        methods: pending.method.clone().map(|m| vec![m]),
        paths: pending.path.as_deref().map(|p| vec![globset::escape(p)]),
        schemes: None,
        headers: None,
        max_body: None,
        tls: None,
        labels: None,
        reason: Some(format!("answered by an operator (approval {})", pending.id)),
    }
}

/// Makes this process not dumpable: its /proc files (environ, mem, fd,
/// maps) belong to root and need `CAP_SYS_PTRACE`, which no sandbox has, and
/// it cannot be ptraced by its own sandboxed children. For `sluice daemon`
/// and the embedded daemon of `sluice run` alike.
pub fn not_dumpable() -> anyhow::Result<()> {
    // SAFETY: plain prctl.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        bail!("cannot make the daemon non-dumpable: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes a runtime state file readable by root only (0600), also when an
/// older daemon left it with another mode.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    std::io::Write::write_all(&mut file, bytes)
}

/// Checks what sluice needs before touching the kernel, with what to do.
pub fn preflight() -> anyhow::Result<()> {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        bail!("sluice must run as root (it loads eBPF programs and manages cgroups): try `sudo sluice ...`");
    }
    datapath::cgroup2_mount()?;
    Ok(())
}

/// Binds the listeners for redirected connections and adds their addresses to `addrs`.
async fn bind_redirect_listeners(
    redirects: &[RedirectListener],
    addrs: &mut Vec<SocketAddr>,
) -> anyhow::Result<Vec<(TcpListener, proxy::Attribution)>> {
    let mut listeners = Vec::new();
    for redirect in redirects {
        let listener = TcpListener::bind(redirect.addr)
            .await
            .with_context(|| format!("binding the redirect listener {}", redirect.addr))?;
        addrs.push(listener.local_addr()?);
        listeners.push((listener, proxy::Attribution::Redirected { sandbox: redirect.sandbox.clone() }));
    }
    Ok(listeners)
}

/// Raises the soft limit on open files to the hard limit: every proxied
/// connection holds two descriptors, and the usual soft limit of 1024 would
/// cap the proxy near 500 connections. Only for `sluice daemon`: `sluice run`
/// would hand the raised limit to the command it runs.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            let wanted = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const wanted) != 0 {
                tracing::warn!(error = %std::io::Error::last_os_error(), "could not raise the open files limit");
            }
        }
    }
}

/// Tells the resolvers what each sandbox may resolve, and remembers answers.
struct DnsBridge {
    registry: Arc<Registry>,
    log: Arc<DecisionLog>,
}

impl DnsPolicy for DnsBridge {
    fn check_name(&self, sandbox: u64, name: &str) -> NameVerdict {
        let Some(sandbox) = self.registry.by_cgroup(sandbox) else {
            return NameVerdict::Deny {
                rule: "unknown-sandbox".into(),
                reason: "the query came from a cgroup that is not a registered sandbox".into(),
            };
        };
        let decision = sandbox.policy.load().may_resolve(name);
        if decision.would_deny {
            let mut record =
                Decision::new(Kind::Dns, Verdict::Allow, decision.rule.to_string(), decision.reason.to_string());
            record.would_deny = true;
            record.sandbox = Some(sandbox.name().to_owned());
            record.host = Some(name.to_owned());
            self.log.record(record);
        }
        if decision.is_allowed() {
            NameVerdict::Allow
        } else {
            NameVerdict::Deny { rule: decision.rule, reason: decision.reason }
        }
    }

    fn record_answers(&self, sandbox: u64, name: &str, answers: &[(IpAddr, Duration)]) {
        let Some(sandbox) = self.registry.by_cgroup(sandbox) else { return };
        for (ip, ttl) in answers {
            sandbox.names.remember(name, *ip, *ttl);
        }
        let mut decision = Decision::new(
            Kind::Dns,
            Verdict::Allow,
            "resolved",
            format!("{} -> {}", name, answers.iter().map(|(ip, _)| ip.to_string()).collect::<Vec<_>>().join(", ")),
        );
        decision.sandbox = Some(sandbox.name().to_owned());
        decision.host = Some(name.to_owned());
        self.log.record(decision);
    }

    fn record_refusal(&self, sandbox: u64, name: &str, qtype: &str, why: &Refusal) {
        let sandbox_name = self.registry.by_cgroup(sandbox).map(|s| s.name().to_owned());
        let rule = match why {
            Refusal::PolicyDeny { rule, .. } => rule.to_string(),
            Refusal::RateLimited { .. } => "dns-rate-limit".to_owned(),
            Refusal::LabelTooLong { .. }
            | Refusal::NameTooLong { .. }
            | Refusal::EncodedLabel { .. }
            | Refusal::NotAHostname => "dns-tunnel-shape".to_owned(),
            _ => "dns-refused".to_owned(),
        };
        let mut decision = Decision::new(Kind::Dns, Verdict::Deny, rule, format!("{qtype} query refused: {why}"));
        decision.sandbox = sandbox_name;
        decision.host = Some(name.to_owned());
        self.log.record(decision);
    }
}

async fn forward_kernel_events(mut events: datapath::EventStream, registry: Arc<Registry>, log: Arc<DecisionLog>) {
    loop {
        let batch = match events.next_batch().await {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(%error, "kernel event stream failed");
                return;
            }
        };
        for event in batch {
            log.record(kernel_decision(&event, &registry));
        }
    }
}

/// Checks twice a second that no one detached sluice's cgroup links, and
/// attaches them again if someone did (see `datapath::Datapath::heal`).
async fn watch_links(datapath: Arc<Datapath>, log: Arc<DecisionLog>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_failure = None;
    loop {
        tick.tick().await;
        let outcome = {
            let datapath = datapath.clone();
            tokio::task::spawn_blocking(move || datapath.heal()).await
        };
        let (verdict, reason) = match outcome {
            Ok(Ok(healed)) if healed.is_empty() => continue,
            Ok(Ok(healed)) => (
                Verdict::Info,
                format!(
                    "kernel links {} were detached or unpinned by someone else; attached and pinned again, with every sandbox frozen in between",
                    healed.join(", ")
                ),
            ),
            Ok(Err(error)) => (Verdict::Deny, format!("checking or healing the kernel links failed: {error}")),
            Err(error) => (Verdict::Deny, format!("the link watchdog failed: {error}")),
        };
        // A failure that persists is recorded once.
        if verdict == Verdict::Deny {
            if last_failure.as_ref() == Some(&reason) {
                continue;
            }
            last_failure = Some(reason.clone());
        }
        tracing::error!("{reason}");
        log.record(Decision::new(Kind::Kernel, verdict, "kernel-links-healed", reason));
    }
}

fn kernel_decision(event: &KernelEvent, registry: &Registry) -> Decision {
    use std::fmt::Write as _;
    let rule = match event.reason {
        datapath::RefusalReason::Socket | datapath::RefusalReason::SocketKilled => "kernel-socket",
        datapath::RefusalReason::Egress => "kernel-egress",
        datapath::RefusalReason::UdpConnect | datapath::RefusalReason::UdpSend => "kernel-udp",
        datapath::RefusalReason::Bpf => "tamper-bpf",
        datapath::RefusalReason::Ptrace => "tamper-ptrace",
        datapath::RefusalReason::PerfEvent => "tamper-perf",
        datapath::RefusalReason::KernelLoad => "tamper-kernel-load",
        datapath::RefusalReason::Mount => "tamper-mount",
        datapath::RefusalReason::Escaped | datapath::RefusalReason::CgroupMove => "tamper-cgroup-escape",
        datapath::RefusalReason::TasksFull => "tamper-tasks-full",
        datapath::RefusalReason::Clone => "tamper-clone",
        datapath::RefusalReason::IoUring => "tamper-io-uring",
        datapath::RefusalReason::BindReserved => "kernel-bind-reserved",
        datapath::RefusalReason::RuntimeResolver => "kernel-runtime-resolver",
        _ => "kernel",
    };
    let mut reason = event.reason.explain().to_owned();
    if let Some((family, sock_type, protocol)) = event.socket {
        let _ = write!(reason, " (family {family}, type {sock_type}, protocol {protocol})");
    }
    match (event.reason, event.detail) {
        (datapath::RefusalReason::Bpf, Some(cmd)) => {
            let _ = write!(reason, " (bpf command {cmd})");
        }
        (datapath::RefusalReason::Ptrace, Some(pid)) if pid != 0 => {
            let _ = write!(reason, " (pid {pid})");
        }
        (datapath::RefusalReason::Clone, Some(flags)) => {
            let _ = write!(reason, " (clone flags {flags:#x})");
        }
        _ => {}
    }
    let mut decision = Decision::new(Kind::Kernel, Verdict::Deny, rule, reason);
    decision.sandbox = registry.by_cgroup(event.sandbox_cgroup).map(|s| s.name().to_owned());
    decision.pid = (event.pid != 0).then_some(event.pid);
    decision.destination = event.destination;
    decision.protocol = Some(match event.reason {
        datapath::RefusalReason::UdpConnect | datapath::RefusalReason::UdpSend => "udp".into(),
        datapath::RefusalReason::Socket | datapath::RefusalReason::SocketKilled => "socket".into(),
        reason if reason.is_tamper() => "tamper".into(),
        _ => "ip".into(),
    });
    decision
}
