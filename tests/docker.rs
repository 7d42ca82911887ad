//! Docker containers as sandboxes, with a real Docker engine the harness
//! starts, an image built locally, and upstreams in a test network
//! namespace that containers can reach only through sluice (the engine
//! forwards nothing). Needs root and Debian's docker.io.

mod harness;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    process::Output,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use harness::{
    cni::{self, CniNetwork},
    dns::TestDns,
    docker::{self, Containerd, DockerEngine},
    web::{TestCa, WebServer},
    Daemon, EchoServer, TestNet, SLUICE,
};
use sluice::{
    audit::{Decision, Kind, Verdict},
    control::SandboxStatus,
};

const WEB_PROFILE: &str = r#"
name = "web"
[[rule]]
name = "web"
action = "allow"
hosts = ["web.test"]
ports = [443]
"#;

/// Allows a host nobody serves: everything these tests ask for is denied.
const CLOSED_PROFILE: &str = r#"
name = "closed"
[[rule]]
name = "elsewhere"
action = "allow"
hosts = ["elsewhere.test"]
ports = [443]
"#;

/// Allows `web.test` and `web6.test` (IPv6 only).
const WEB6_PROFILE: &str = r#"
name = "web6"
[[rule]]
name = "web"
action = "allow"
hosts = ["web.test", "web6.test"]
ports = [443]
"#;

/// A TLS upstream `web.test` and a canary `canary.test` in a test network,
/// a DNS server for both, a Docker engine (and a containerd), and a daemon
/// that enforces their containers under its container parent.
struct World {
    net: TestNet,
    web: WebServer,
    canary: EchoServer,
    _dns: TestDns,
    engine: Arc<DockerEngine>,
    /// Dropped before the daemon: its containers go first.
    containerd: Option<Containerd>,
    daemon: Daemon,
    profiles: PathBuf,
    ca: TestCa,
}

impl World {
    fn new(discover: bool) -> Self {
        Self::with(discover, false, &[])
    }

    /// A world whose daemon gets `extra` arguments too, and an IPv6
    /// container address if `ipv6`.
    fn with(discover: bool, ipv6: bool, extra: &[&str]) -> Self {
        Self::start(discover, ipv6, false, extra)
    }

    /// A daemon that discovers the containers of a containerd of the
    /// world's own (and not the Docker engine's).
    fn with_containerd() -> Self {
        Self::start(false, false, true, &[])
    }

    fn start(discover_docker: bool, ipv6: bool, discover_containerd: bool, extra: &[&str]) -> Self {
        let net = TestNet::new();
        let ca = TestCa::new();
        let web = WebServer::start(&net, SocketAddr::new(net.v4(2), 443), Some(ca.server_config(&["web.test"], false)));
        let canary_ip = net.add_host(3);
        let canary = EchoServer::start(net.tcp_listener(SocketAddr::new(canary_ip, 443)));
        let zone = HashMap::from([
            ("web.test".to_owned(), vec![net.v4(2)]),
            ("canary.test".to_owned(), vec![canary_ip]),
            ("web6.test".to_owned(), vec![net.v6(2)]),
            ("canary6.test".to_owned(), vec![net.v6(3)]),
        ]);
        let dns = TestDns::start(net.udp_socket(SocketAddr::new(net.v4(2), 53)), zone);
        let engine = docker::engine();
        let profiles = std::env::temp_dir().join(format!("sluice-docker-profiles-{}-{}", std::process::id(), net.n));
        std::fs::create_dir_all(&profiles).unwrap();
        std::fs::write(profiles.join("web.toml"), WEB_PROFILE).unwrap();
        std::fs::write(profiles.join("closed.toml"), CLOSED_PROFILE).unwrap();
        std::fs::write(profiles.join("web6.toml"), WEB6_PROFILE).unwrap();
        let mut args = vec![
            "--container-address".to_owned(),
            docker::container_address(&net).to_string(),
            "--profiles-dir".to_owned(),
            profiles.display().to_string(),
        ];
        if discover_docker {
            args.extend(["--docker".to_owned(), engine.socket.display().to_string()]);
        }
        if ipv6 {
            args.extend(["--container-address6".to_owned(), docker::container_address6(&net).to_string()]);
        }
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let containerd = discover_containerd.then(|| Containerd::start(&engine));
        if let Some(containerd) = &containerd {
            args.extend(["--containerd-socket".to_owned(), containerd.socket().display().to_string()]);
            args.extend(["--containerd-namespace".to_owned(), containerd.namespace.clone()]);
        }
        let daemon = Daemon::start_configured(Some(dns.addr), Some(&ca.cert_pem), None, args);
        Self { net, web, canary, _dns: dns, engine, containerd, daemon, profiles, ca }
    }

    fn containerd(&self) -> &Containerd {
        self.containerd.as_ref().expect("a world with a containerd")
    }

    /// `ctr run -d` of container `id` under the daemon's container parent,
    /// in a network namespace of its own on `network` (else the host's),
    /// with the directory `share(id)` mounted at /etc/sluice.
    fn ctr_run(&self, id: &str, network: Option<&CniNetwork>, labels: &[&str]) {
        self.ctr_run_in(&self.containerd().namespace, id, network, labels);
    }

    /// The same in another containerd namespace.
    fn ctr_run_in(&self, namespace: &str, id: &str, network: Option<&CniNetwork>, labels: &[&str]) {
        let cgroup = format!("/{}/containers/{id}", self.daemon.instance);
        std::fs::create_dir_all(self.share(id)).unwrap();
        let mount = format!("type=bind,src={},dst=/etc/sluice,options=rbind:ro", self.share(id).display());
        let mut options = vec!["--mount".to_owned(), mount];
        if let Some(network) = network {
            options.extend(["--with-ns".to_owned(), format!("network:{}", network.attach(id).display())]);
        } else {
            options.push("--net-host".to_owned());
        }
        for label in labels {
            options.extend(["--label".to_owned(), (*label).to_owned()]);
        }
        self.containerd().run_detached(namespace, id, &cgroup, &options.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// A host directory a containerd container sees at /etc/sluice.
    fn share(&self, id: &str) -> PathBuf {
        self.profiles.join(format!("share-{id}"))
    }

    /// Gives a containerd container its sandbox's trust bundle, through
    /// its /etc/sluice mount.
    fn hand_over_ca_ctr(&self, id: &str, sandbox: &SandboxStatus) {
        std::fs::copy(&sandbox.record.ca_bundle, self.share(id).join("ca.pem")).unwrap();
    }

    /// curl from a `ctr task exec` process in container `id`.
    fn ctr_curl(&self, id: &str, url: &str) -> Output {
        let curl = ["/bin/curl", "-fsS", "--max-time", "10", "--cacert", "/etc/sluice/ca.pem", url];
        self.containerd().exec(&self.containerd().namespace, id, &curl)
    }

    fn cgroup_parent(&self) -> String {
        format!("--cgroup-parent=/{}/containers", self.daemon.instance)
    }

    /// `docker run -d` under the daemon's container parent, as compose
    /// would with `cgroup_parent:`; returns the container id.
    fn start_container(&self, labels: &[&str]) -> String {
        let parent = self.cgroup_parent();
        let mut args = vec!["run", "-d", &parent, "--network", &self.engine.network];
        for label in labels {
            args.extend(["--label", label]);
        }
        args.extend([self.engine.image.as_str(), "/bin/sleep", "300"]);
        self.engine.run(&args)
    }

    /// `sluice docker run --profile web.toml -- --rm IMAGE CMD...`.
    fn sluice_docker_run(&self, profile: &str, sandbox: &str, command: &[&str]) -> Output {
        self.sluice_docker_run_on(&self.engine.network, profile, sandbox, command)
    }

    /// The same on another network (`host`, `none`).
    fn sluice_docker_run_on(&self, network: &str, profile: &str, sandbox: &str, command: &[&str]) -> Output {
        self.sluice_docker_run_with(&["--network", network], profile, sandbox, command)
    }

    /// The same with these `docker run` arguments (a network at least).
    fn sluice_docker_run_with(&self, docker_args: &[&str], profile: &str, sandbox: &str, command: &[&str]) -> Output {
        let mut run = std::process::Command::new(SLUICE);
        run.args(["docker", "run", "--instance", &self.daemon.instance, "--sandbox", sandbox, "--profile"])
            .arg(self.profiles.join(format!("{profile}.toml")))
            .args(["--", "--rm"])
            .args(docker_args)
            .arg(&self.engine.image)
            .args(command)
            .env("SLUICE_DOCKER", docker::DOCKER)
            .env("DOCKER_HOST", format!("unix://{}", self.engine.socket.display()));
        run.output().unwrap()
    }

    /// The sandbox the daemon registered for a container, waiting up to 10 s.
    fn sandbox_of(&self, container: &str) -> SandboxStatus {
        wait_for(&format!("a sandbox for container {container}"), || {
            self.daemon.statuses().into_iter().find(|s| s.record.container.as_ref().is_some_and(|c| c.id == container))
        })
    }

    /// A container's address on the test network.
    fn address_of(&self, container: &str) -> std::net::IpAddr {
        let ip =
            self.engine.run(&["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container]);
        ip.parse().unwrap_or_else(|_| panic!("container {container} has no address: {ip:?}"))
    }

    /// The records about a container (`container` set), by rule, waiting up
    /// to 10 s for one.
    fn wait_container_record(&self, container: &str, rule: &str) -> Decision {
        let decisions = self.daemon.wait_decisions(&format!("{rule} for container {container}"), |d| {
            d.iter().any(|d| d.rule == rule && d.container.as_ref().is_some_and(|c| c.id == container))
        });
        decisions
            .into_iter()
            .find(|d| d.rule == rule && d.container.as_ref().is_some_and(|c| c.id == container))
            .unwrap()
    }

    fn exec_curl(&self, container: &str, url: &str) -> Output {
        self.engine.output(&[
            "exec",
            container,
            "/bin/curl",
            "-fsS",
            "--max-time",
            "10",
            "--cacert",
            "/tmp/ca.pem",
            url,
        ])
    }

    /// Gives a running container its sandbox's trust bundle, as an operator
    /// would for a container started without `sluice docker run`.
    fn hand_over_ca(&self, container: &str, sandbox: &SandboxStatus) {
        let bundle = sandbox.record.ca_bundle.display().to_string();
        self.engine.run(&["cp", &bundle, &format!("{container}:/tmp/ca.pem")]);
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.profiles);
    }
}

fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn has(decisions: &[Decision], sandbox: &str, kind: Kind, verdict: Verdict, rule: &str) -> bool {
    decisions.iter().any(|d| {
        d.sandbox.as_deref() == Some(sandbox)
            && d.kind == kind
            && d.verdict == verdict
            && (rule.is_empty() || d.rule == rule)
    })
}

#[test]
fn sluice_docker_run_intercepts_allowed_https_and_denies_the_rest() {
    if !docker::available() {
        return;
    }
    let world = World::new(true);

    let allowed =
        world.sluice_docker_run("web", "dk-web", &["/bin/curl", "-fsS", "--max-time", "10", "https://web.test/echo"]);
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert!(text(&allowed).contains("host=web.test"), "{}", text(&allowed));
    // The container trusted nothing but its bundle (system roots and its
    // sandbox CA), so the answer came through sluice's interception.
    let requests = world.web.seen();
    assert_eq!(requests.len(), 1, "{requests:?}");

    let by_name =
        world.sluice_docker_run("web", "dk-canary", &["/bin/curl", "-fsS", "--max-time", "10", "https://canary.test/"]);
    assert!(!by_name.status.success(), "{}", text(&by_name));
    let canary_ip = world.net.v4(3).to_string();
    let by_ip = world.sluice_docker_run(
        "web",
        "dk-canary-ip",
        &["/bin/curl", "-fsSk", "--max-time", "10", &format!("https://{canary_ip}/")],
    );
    assert!(!by_ip.status.success(), "{}", text(&by_ip));
    assert_eq!(world.canary.accepted(), 0, "the canary was reached");

    let decisions = world.daemon.wait_decisions("each container's sandbox went with it", |d| {
        ["dk-web", "dk-canary", "dk-canary-ip"]
            .iter()
            .all(|name| has(d, name, Kind::Lifecycle, Verdict::Info, "removed"))
    });
    assert!(has(&decisions, "dk-web", Kind::Request, Verdict::Allow, ""), "no allowed request for dk-web");
    assert!(has(&decisions, "dk-web", Kind::Lifecycle, Verdict::Info, "container-bound"));
    assert!(
        has(&decisions, "dk-canary", Kind::Dns, Verdict::Deny, "")
            || has(&decisions, "dk-canary", Kind::Connect, Verdict::Deny, "")
    );
    assert!(has(&decisions, "dk-canary-ip", Kind::Connect, Verdict::Deny, ""));
    assert!(world.daemon.statuses().is_empty(), "sandboxes left behind");
    let ca_dir = sluice::daemon::runtime_dir(&world.daemon.instance).join("ca");
    let left: Vec<_> =
        std::fs::read_dir(&ca_dir).map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "CA files left behind: {left:?}");
}

#[test]
fn labels_pick_profiles_and_docker_exec_is_enforced() {
    if !docker::available() {
        return;
    }
    let world = World::new(true);
    let open = world.start_container(&["sluice.profile=web"]);
    let closed = world.start_container(&["sluice.profile=closed", "team=research"]);
    let open_sandbox = world.sandbox_of(&open);
    let closed_sandbox = world.sandbox_of(&closed);
    let info = closed_sandbox.record.container.clone().unwrap();
    assert_eq!(info.image, world.engine.image);
    assert_eq!(info.labels.get("team").map(String::as_str), Some("research"));
    assert!(closed_sandbox.record.cgroup.ends_with(&closed), "{:?}", closed_sandbox.record.cgroup);
    world.hand_over_ca(&open, &open_sandbox);
    world.hand_over_ca(&closed, &closed_sandbox);

    // The same URL, from processes started by `docker exec` in each.
    let from_open = world.exec_curl(&open, "https://web.test/echo");
    assert!(from_open.status.success(), "{}", text(&from_open));
    assert!(text(&from_open).contains("host=web.test"));
    let from_closed = world.exec_curl(&closed, "https://web.test/echo");
    assert!(!from_closed.status.success(), "{}", text(&from_closed));
    assert_eq!(world.web.seen().len(), 1, "only the open container's request may arrive");
    let closed_name = closed_sandbox.record.name.clone();
    let decisions = world.daemon.wait_decisions("the closed container's denial", |d| {
        has(d, &closed_name, Kind::Dns, Verdict::Deny, "") || has(d, &closed_name, Kind::Connect, Verdict::Deny, "")
    });
    // Each record of a container's sandbox names the container, labels included.
    let denial = decisions
        .iter()
        .find(|d| d.sandbox.as_deref() == Some(closed_name.as_str()) && d.verdict == Verdict::Deny)
        .unwrap();
    let identity = denial.container.as_ref().expect("the denial names its container");
    assert_eq!((identity.runtime.as_str(), identity.id.as_str()), ("docker", closed.as_str()));
    assert_eq!(identity.image, world.engine.image);
    assert_eq!(identity.labels.get("team").map(String::as_str), Some("research"));
    let allowed = world.daemon.wait_decisions("the open container's request", |d| {
        has(d, &open_sandbox.record.name, Kind::Request, Verdict::Allow, "")
    });
    let request = allowed
        .iter()
        .find(|d| d.sandbox.as_deref() == Some(open_sandbox.record.name.as_str()) && d.kind == Kind::Request)
        .unwrap();
    let identity = request.container.as_ref().expect("the request names its container");
    assert_eq!(identity.labels.get("sluice.profile").map(String::as_str), Some("web"));
    let filtered = world.daemon.cli(&["log", "--json", "--label", "team=research"]);
    let filtered = String::from_utf8_lossy(&filtered.stdout);
    assert!(filtered.lines().count() > 0 && filtered.contains(&closed_name), "{filtered}");
    assert!(!filtered.contains(&format!("\"sandbox\":\"{}\"", open_sandbox.record.name)), "{filtered}");

    world.engine.run(&["rm", "-f", &open, &closed]);
    let decisions = world.daemon.wait_decisions("both sandboxes removed", |d| {
        [&open_sandbox.record.name, &closed_name]
            .iter()
            .all(|name| has(d, name, Kind::Lifecycle, Verdict::Info, "removed"))
    });
    assert!(has(&decisions, &closed_name, Kind::Lifecycle, Verdict::Info, "container-stopped"));
    assert!(world.daemon.statuses().is_empty());
}

#[test]
fn privileged_containers_are_not_registered_and_cannot_switch_enforcement_off() {
    if !docker::available() {
        return;
    }
    let world = World::new(true);
    let attack_dir = harness::attacker().parent().unwrap().display().to_string();
    let mount = format!("{attack_dir}:/attack:ro");
    let parent = world.cgroup_parent();
    let config = sluice::daemon::DaemonConfig::new(&world.daemon.instance).unwrap();
    let enforced_parent = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(config.cgroup_parent()).unwrap());
    let canary_ip = world.net.v4(3).to_string();
    // (This engine knows no CAP_BPF; CAP_SYS_ADMIN covers bpf(). And
    // `--privileged` itself cannot start here: this machine withholds
    // CAP_SYS_RESOURCE from everything, and runc cannot grant it.)
    for flags in [
        &["--cap-add", "SYS_ADMIN", "--cap-add", "SYS_PTRACE"][..],
        &["--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE"],
    ] {
        let mut args = vec!["run", "-d", &parent, "--network", &world.engine.network, "-v", &mount];
        args.extend(flags);
        args.extend(["--label", "sluice.profile=web", world.engine.image.as_str(), "/bin/sleep", "300"]);
        let id = world.engine.run(&args);
        // Refused registration, it stays an unknown sandbox, denied everything.
        let decisions = world.daemon.wait_decisions("the privileged container refused", |d| {
            d.iter().any(|d| d.rule == "container-unregistered" && d.reason.contains(&id[..12]))
        });
        let refusal = decisions.iter().find(|d| d.rule == "container-unregistered").unwrap();
        assert!(refusal.reason.contains("CAP_SYS_ADMIN") && refusal.reason.contains("CAP_SYS_PTRACE"), "{refusal}");
        assert!(world.daemon.statuses().iter().all(|s| s.record.container.as_ref().is_none_or(|c| c.id != id)));
        // With every capability it has, it tries to detach sluice's links:
        // the guard kills it at its first bpf() (exit 137).
        let attack =
            world.engine.output(&["exec", &id, "/attack/attack", "detach-by-id", &enforced_parent.to_string()]);
        assert_eq!(attack.status.code(), Some(137), "{}", text(&attack));
        assert!(!text(&attack).contains("link-detach: ok"), "{}", text(&attack));
        let connect = world.engine.output(&["exec", &id, "/attack/attack", "connect", &canary_ip, "443"]);
        assert_eq!(world.canary.accepted(), 0, "{}", text(&connect));
        world.engine.run(&["rm", "-f", &id]);
    }
    world.daemon.wait_decisions("the guard's kills recorded", |d| d.iter().any(|d| d.rule == "tamper-bpf"));
    // A default container after them is registered and still enforced.
    let image = world.engine.image.clone();
    let after = world.engine.run(&[
        "run",
        "-d",
        &parent,
        "--network",
        &world.engine.network,
        "-v",
        &mount,
        "--label",
        "sluice.profile=web",
        &image,
        "/bin/sleep",
        "300",
    ]);
    world.sandbox_of(&after);
    // Default capabilities: the same attack gets nowhere (Docker's seccomp
    // refuses bpf(), or the guard kills it).
    let attack = world.engine.output(&["exec", &after, "/attack/attack", "detach-by-id", &enforced_parent.to_string()]);
    let said = text(&attack);
    assert!(said.contains("link-next-id: refused") || attack.status.code() == Some(137), "{said}");
    assert!(!said.contains("link-detach: ok"), "{said}");
    let connect = world.engine.output(&["exec", &after, "/attack/attack", "connect", &canary_ip, "443"]);
    let after_name = world.sandbox_of(&after).record.name;
    world.daemon.wait_decisions("the default container's connect denied", |d| {
        has(d, &after_name, Kind::Connect, Verdict::Deny, "") || has(d, &after_name, Kind::Request, Verdict::Deny, "")
    });
    assert_eq!(world.canary.accepted(), 0, "{}", text(&connect));
}

#[test]
fn containers_are_cut_off_while_sluice_is_down_and_rediscovered_after() {
    if !docker::available() {
        return;
    }
    let mut world = World::new(true);
    let before = world.start_container(&["sluice.profile=web"]);
    let registered = world.sandbox_of(&before);

    world.daemon.kill();
    // Started while no daemon runs: the pinned programs still redirect it,
    // to a proxy nobody serves.
    let parent = world.cgroup_parent();
    let web_ip = world.net.v4(2).to_string();
    let canary_ip = world.net.v4(3).to_string();
    let script = format!(
        "curl -fsSk --max-time 5 https://{web_ip}/down; echo rc=$?; \
         curl -fsSk --max-time 5 https://{canary_ip}/; echo rc=$?; \
         curl -fsSk --max-time 5 https://web.test/down; echo rc=$?"
    );
    let offline = world.engine.output(&[
        "run",
        "--rm",
        &parent,
        "--network",
        &world.engine.network,
        &world.engine.image,
        "/bin/sh",
        "-c",
        &script,
    ]);
    let said = text(&offline);
    assert_eq!(said.matches("rc=0").count(), 0, "something got through:\n{said}");
    assert_eq!(said.matches("rc=").count(), 3, "{said}");
    let during = world.start_container(&["sluice.profile=web"]);
    let from_during = world.exec_curl(&during, "https://web.test/down");
    assert!(!from_during.status.success(), "{}", text(&from_during));
    assert!(world.web.seen().is_empty(), "the upstream was reached while sluice was down");
    assert_eq!(world.canary.accepted(), 0);

    world.daemon.restart();
    // The container registered before is taken over as it was.
    let again = world.sandbox_of(&before);
    assert_eq!(again.record.cgroup_id, registered.record.cgroup_id);
    assert_eq!(again.record.dns_port, registered.record.dns_port);
    assert_eq!(again.record.name, registered.record.name);
    // The one started meanwhile is found and registered.
    let found = world.sandbox_of(&during);
    world.hand_over_ca(&before, &again);
    world.hand_over_ca(&during, &found);
    for container in [&before, &during] {
        let output = world.exec_curl(container, "https://web.test/echo");
        assert!(output.status.success(), "{}", text(&output));
    }
    assert_eq!(world.web.seen().len(), 2);
}

#[test]
fn a_container_sluice_has_not_registered_is_denied_as_unknown() {
    if !docker::available() {
        return;
    }
    // No discovery: containers under the parent are enforced, never known.
    let world = World::new(false);
    let parent = world.cgroup_parent();
    let web_ip = world.net.v4(2).to_string();
    let output = world.engine.output(&[
        "run",
        "--rm",
        &parent,
        "--network",
        &world.engine.network,
        &world.engine.image,
        "/bin/curl",
        "-fsSk",
        "--max-time",
        "5",
        &format!("https://{web_ip}/unknown"),
    ]);
    assert!(!output.status.success(), "{}", text(&output));
    assert!(world.web.seen().is_empty());
    let destination: SocketAddr = format!("{web_ip}:443").parse().unwrap();
    world.daemon.wait_decisions("an unknown-sandbox denial", |d| {
        d.iter()
            .any(|d| d.rule == "unknown-sandbox" && d.destination == Some(destination) && d.verdict == Verdict::Deny)
    });
}

/// Without containerd discovery: a sandbox registered through the API (as
/// `sluice docker run` does) gives `ctr run --cgroup` containers below its
/// cgroup their identity from the first instruction. Host networking: the
/// container reaches the container address as a host address.
#[test]
fn ctr_run_containers_are_enforced_under_a_registered_sandbox() {
    if !docker::available() {
        return;
    }
    if !std::path::Path::new(docker::CTR).exists() {
        eprintln!("SKIPPED: needs {} (docker.io brings containerd)", docker::CTR);
        return;
    }
    let world = World::new(false);
    let containerd = docker::Containerd::start(&world.engine);
    let request = sluice::control::RegisterRequest {
        name: "ctr-web".to_owned(),
        cgroup: None,
        profile: sluice::sandbox::ProfileSource::File { path: world.profiles.join("web.toml"), text: String::new() },
        placement: sluice::sandbox::Placement::Container,
    };
    let status = harness::block_on(world.daemon.client().register(&request)).expect("register");
    let cgroup = format!("/{}/containers/ctr-web", world.daemon.instance);
    let mount =
        format!("type=bind,src={},dst=/etc/sluice/ca-bundle.pem,options=rbind:ro", status.record.ca_bundle.display());
    let ctr_curl = |id: &str, url: &str| {
        containerd
            .ctr()
            .args(["run", "--rm", "--net-host", "--cgroup", &format!("{cgroup}/{id}"), "--mount", &mount])
            .args([&containerd.image, id, "/bin/curl", "-fsS", "--max-time", "10"])
            .args(["--cacert", "/etc/sluice/ca-bundle.pem", url])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let allowed = ctr_curl("c1", "https://web.test/echo");
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert!(text(&allowed).contains("host=web.test"), "{}", text(&allowed));
    assert_eq!(world.web.seen().len(), 1);
    let denied = ctr_curl("c2", "https://canary.test/");
    assert!(!denied.status.success(), "{}", text(&denied));
    assert_eq!(world.canary.accepted(), 0, "the canary was reached");
    let decisions = world.daemon.wait_decisions("ctr-web's allow and deny", |d| {
        has(d, "ctr-web", Kind::Request, Verdict::Allow, "")
            && (has(d, "ctr-web", Kind::Dns, Verdict::Deny, "") || has(d, "ctr-web", Kind::Connect, Verdict::Deny, ""))
    });
    assert!(!decisions.iter().any(|d| d.rule == "unknown-sandbox"), "a ctr container was not attributed");
}

/// `--network host`: the container shares the host's namespace, reaches the
/// container address as a host address, and is enforced like the others.
/// `--network none`: no route to sluice, so every connect fails at once.
#[test]
fn host_and_none_networked_containers_are_enforced() {
    if !docker::available() {
        return;
    }
    let world = World::new(true);
    let curl = ["/bin/curl", "-fsS", "--max-time", "10"];
    let allowed =
        world.sluice_docker_run_on("host", "web", "dk-host", &[&curl[..], &["https://web.test/echo"]].concat());
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert!(text(&allowed).contains("host=web.test"), "{}", text(&allowed));
    let denied =
        world.sluice_docker_run_on("host", "web", "dk-host-deny", &[&curl[..], &["https://canary.test/"]].concat());
    assert!(!denied.status.success(), "{}", text(&denied));
    let canary_ip = format!("https://{}/", world.net.v4(3));
    let isolated = world.sluice_docker_run_on("none", "web", "dk-none", &[&curl[..], &["-k", &canary_ip]].concat());
    assert!(!isolated.status.success(), "{}", text(&isolated));
    assert_eq!(world.canary.accepted(), 0, "the canary was reached");
    assert_eq!(world.web.seen().len(), 1, "{:?}", world.web.seen());
    let decisions = world.daemon.wait_decisions("the host-networked container's decisions", |d| {
        has(d, "dk-host", Kind::Request, Verdict::Allow, "")
            && (has(d, "dk-host-deny", Kind::Dns, Verdict::Deny, "")
                || has(d, "dk-host-deny", Kind::Connect, Verdict::Deny, ""))
    });
    assert!(!decisions.iter().any(|d| d.rule == "unknown-sandbox"), "a container was not attributed");
}

/// `--enforce-label`: a labelled and an unlabelled container under the same
/// parent. The labelled one is enforced as ever; the unlabelled one, once
/// discovery has seen it, reaches a host-local server on the Docker bridge
/// directly (the server sees the container's own address and the request
/// as curl sent it), across a daemon restart too. Before discovery has seen
/// a container, it reaches nothing.
#[test]
fn enforce_label_exempts_unlabelled_containers_once_discovered() {
    if !docker::available() {
        return;
    }
    let mut world = World::with(true, false, &["--enforce-label", "sluice.enforce=true"]);
    // The bridge's host address: reachable from the test network's
    // containers without any forwarding, so only sluice stands between.
    let gateway = std::net::IpAddr::from([10, 231, u8::try_from(world.engine.subnet).unwrap(), 1]);
    let direct = EchoServer::start(std::net::TcpListener::bind((gateway, 0)).unwrap());
    let direct_url = format!("http://{}/direct", direct.addr);
    let curl_direct = |container: &str| {
        world.engine.output(&["exec", container, "/bin/curl", "-sS", "--max-time", "5", &direct_url]);
    };

    let enforced = world.start_container(&["sluice.enforce=true", "sluice.profile=web"]);
    let exempt = world.start_container(&["team=free"]);
    let sandbox = world.sandbox_of(&enforced);
    world.hand_over_ca(&enforced, &sandbox);
    let record = world.wait_container_record(&exempt, "container-exempt");
    assert_eq!(record.kind, Kind::Lifecycle);
    assert_eq!(record.container.as_ref().unwrap().labels.get("team").map(String::as_str), Some("free"));
    assert!(
        !world.daemon.statuses().iter().any(|s| s.record.container.as_ref().is_some_and(|c| c.id == exempt)),
        "an exempted container got a sandbox"
    );

    // Labelled: allowed through interception, denied elsewhere, and the
    // bridge server is just another destination its policy does not allow.
    let allowed = world.exec_curl(&enforced, "https://web.test/echo");
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert!(text(&allowed).contains("host=web.test"), "{}", text(&allowed));
    let denied = world.exec_curl(&enforced, "https://canary.test/");
    assert!(!denied.status.success(), "{}", text(&denied));
    curl_direct(&enforced);
    assert_eq!(world.canary.accepted(), 0, "the canary was reached");
    assert_eq!(direct.accepted(), 0, "the enforced container reached the bridge server");

    // Unlabelled: straight to the server, as itself, untouched.
    let exempt_ip = world.address_of(&exempt);
    curl_direct(&exempt);
    let seen = wait_for("the exempted container's request", || {
        let seen = direct.seen();
        (seen.len() == 1).then_some(seen)
    });
    assert_eq!(seen[0].peer.ip(), exempt_ip, "the request did not come from the container itself");
    assert!(
        seen[0].received.starts_with(b"GET /direct HTTP/1.1\r\n"),
        "{:?}",
        String::from_utf8_lossy(&seen[0].received)
    );

    // Daemon down: the pinned exemption stays, and a container started
    // meanwhile, which discovery has not seen, reaches nothing.
    world.daemon.kill();
    let late = world.start_container(&[]);
    curl_direct(&late);
    assert_eq!(direct.accepted(), 1, "an undiscovered container was let through");
    curl_direct(&exempt);
    wait_for("the exempted container's request while sluice is down", || (direct.seen().len() == 2).then_some(()));

    // Back: the late one is found and exempted, the labelled one is still
    // enforced.
    world.daemon.restart();
    world.wait_container_record(&late, "container-exempt");
    let late_ip = world.address_of(&late);
    curl_direct(&late);
    wait_for("the late container's request", || direct.seen().iter().any(|s| s.peer.ip() == late_ip).then_some(()));
    let denied = world.exec_curl(&enforced, "https://canary.test/");
    assert!(!denied.status.success(), "{}", text(&denied));
    assert_eq!(world.canary.accepted(), 0, "the canary was reached");

    // Stopped: the exemption goes, and the log says so.
    world.engine.run(&["rm", "-f", &exempt]);
    let stopped = world.wait_container_record(&exempt, "container-stopped");
    assert!(stopped.reason.contains("exemption"), "{}", stopped.reason);
    let kept =
        std::fs::read_to_string(sluice::daemon::runtime_dir(&world.daemon.instance).join("exempt.json")).unwrap();
    assert!(!kept.contains(&exempt) && kept.contains(&late), "{kept}");
}

/// `--container-address6`: a container whose every IPv6 socket is
/// IPv6-only (`net.ipv6.bindv6only=1`) on an IPv6-enabled Docker network
/// is redirected to sluice's IPv6 container address: allowed HTTPS to an
/// IPv6 upstream goes through interception, an IPv6 canary gets nothing,
/// and IPv4 still goes to the IPv4 container address.
#[test]
fn ipv6_only_sockets_in_containers_reach_sluice_on_the_ipv6_container_address() {
    if !docker::available() {
        return;
    }
    let world = World::with(true, true, &[]);
    let web6 = WebServer::start(
        &world.net,
        SocketAddr::new(world.net.v6(2), 443),
        Some(world.ca.server_config(&["web6.test"], false)),
    );
    let canary6_ip = world.net.add_host6(3);
    let canary6 = EchoServer::start(world.net.tcp_listener(SocketAddr::new(canary6_ip, 443)));
    let parent = world.cgroup_parent();
    let container = world.engine.run(&[
        "run",
        "-d",
        &parent,
        "--network",
        &world.engine.network,
        "--sysctl",
        "net.ipv6.bindv6only=1",
        "--label",
        "sluice.profile=web6",
        &world.engine.image,
        "/bin/sleep",
        "300",
    ]);
    let sandbox = world.sandbox_of(&container);
    world.hand_over_ca(&container, &sandbox);

    let curl6 = |url: &str, extra: &str| {
        world.engine.output(&[
            "exec",
            &container,
            "/bin/curl",
            "-6",
            "-fsS",
            extra,
            "--max-time",
            "10",
            "--cacert",
            "/tmp/ca.pem",
            url,
        ])
    };
    let allowed = curl6("https://web6.test/echo", "-v");
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert!(text(&allowed).contains("host=web6.test"), "{}", text(&allowed));
    assert_eq!(web6.seen().len(), 1, "the IPv6 upstream did not get the request");
    let by_name = curl6("https://canary6.test/", "-v");
    assert!(!by_name.status.success(), "{}", text(&by_name));
    let by_ip = curl6(&format!("https://[{canary6_ip}]/"), "-k");
    assert!(!by_ip.status.success(), "{}", text(&by_ip));
    assert_eq!(canary6.accepted(), 0, "the IPv6 canary was reached");
    let v4 = world.exec_curl(&container, "https://web.test/echo");
    assert!(v4.status.success(), "{}", text(&v4));
    assert_eq!(world.web.seen().len(), 1);

    let name = sandbox.record.name.clone();
    let web6_addr = SocketAddr::new(world.net.v6(2), 443);
    let canary6_addr = SocketAddr::new(canary6_ip, 443);
    let decisions = world.daemon.wait_decisions("the IPv6 allow and deny", |d| {
        d.iter().any(|d| {
            d.sandbox.as_deref() == Some(name.as_str())
                && d.kind == Kind::Request
                && d.verdict == Verdict::Allow
                && d.destination == Some(web6_addr)
        }) && d.iter().any(|d| {
            d.sandbox.as_deref() == Some(name.as_str())
                && d.verdict == Verdict::Deny
                && d.destination == Some(canary6_addr)
        })
    });
    assert!(!decisions.iter().any(|d| d.rule == "unknown-sandbox"), "a flow was not attributed");
}

#[test]
fn one_profile_decides_by_container_labels() {
    if !docker::available() {
        return;
    }
    let world = World::new(true);
    let shared = r#"
name = "shared"
[[rule]]
name = "ml-web"
action = "allow"
hosts = ["web.test"]
ports = [443]
labels = { team = "ml*" }
"#;
    std::fs::write(world.profiles.join("shared.toml"), shared).unwrap();
    // Discovered containers: registered with their labels.
    let ml = world.start_container(&["sluice.profile=shared", "team=ml-research"]);
    let web = world.start_container(&["sluice.profile=shared", "team=web"]);
    let (ml_sandbox, web_sandbox) = (world.sandbox_of(&ml), world.sandbox_of(&web));
    assert_eq!((ml_sandbox.profile_name.as_str(), web_sandbox.profile_name.as_str()), ("shared", "shared"));
    world.hand_over_ca(&ml, &ml_sandbox);
    world.hand_over_ca(&web, &web_sandbox);
    let from_ml = world.exec_curl(&ml, "https://web.test/echo");
    assert!(from_ml.status.success(), "{}", text(&from_ml));
    let from_web = world.exec_curl(&web, "https://web.test/echo");
    assert!(!from_web.status.success(), "{}", text(&from_web));
    assert_eq!(world.web.seen().len(), 1, "only the ml container's request may arrive");

    // `sluice docker run` registers before the container exists; the rule
    // applies once discovery binds the container and its labels.
    let retry = "for i in 1 2 3 4 5 6 7 8 9 10; do /bin/curl -fsS --max-time 5 https://web.test/echo && exit 0; \
                 sleep 1; done; exit 1";
    let output = world.sluice_docker_run_with(
        &["--network", &world.engine.network, "--label", "team=ml"],
        "shared",
        "dk-ml",
        &["/bin/sh", "-c", retry],
    );
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(world.web.seen().len(), 2);
    let decisions = world
        .daemon
        .wait_decisions("dk-ml relabelled", |d| has(d, "dk-ml", Kind::Lifecycle, Verdict::Info, "profile-relabelled"));
    assert!(has(&decisions, "dk-ml", Kind::Request, Verdict::Allow, ""));
    world.engine.run(&["rm", "-f", &ml, &web]);
}

fn containerd_available() -> bool {
    if !docker::available() {
        return false;
    }
    if !std::path::Path::new(docker::CTR).exists() {
        eprintln!("SKIPPED: needs {} (docker.io brings containerd)", docker::CTR);
        return false;
    }
    cni::available()
}

/// Plain `ctr run` containers under the container parent, never registered
/// through the API, in network namespaces of their own set up by CNI: found
/// through containerd's API, enforced by their labels (the same URL allowed
/// for one, denied for the other), and torn down when their task exits.
#[test]
fn containerd_containers_are_discovered_and_enforced_by_label() {
    if !containerd_available() {
        return;
    }
    let world = World::with_containerd();
    // First, one in a namespace the daemon does not follow: by the time the
    // others are registered, its start event has been read and passed over.
    let other = format!("{}-other", world.containerd().namespace);
    world.containerd().import_image(&world.engine, &other);
    world.ctr_run_in(&other, "elsewhere", None, &["sluice.profile=web"]);
    let network = CniNetwork::new(&world.profiles, &world.net, docker::container_address(&world.net));
    world.ctr_run("open", Some(&network), &["sluice.profile=web"]);
    world.ctr_run("closed", Some(&network), &["sluice.profile=closed", "team=research"]);
    let open = world.sandbox_of("open");
    let closed = world.sandbox_of("closed");
    let info = closed.record.container.clone().unwrap();
    assert_eq!(info.runtime, "containerd");
    assert_eq!(info.namespace, world.containerd().namespace);
    assert_eq!(info.image, world.containerd().image);
    assert_eq!(info.labels.get("team").map(String::as_str), Some("research"));
    assert_eq!(closed.record.name, "closed");
    let parent = format!("{}/containers/closed", world.daemon.instance);
    assert!(closed.record.cgroup.ends_with(&parent), "{:?}", closed.record.cgroup);
    world.hand_over_ca_ctr("open", &open);
    world.hand_over_ca_ctr("closed", &closed);
    let names: Vec<String> = world.daemon.statuses().into_iter().map(|s| s.record.name).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    let web = world.net.v4(2);
    let unknown = world.containerd().exec(
        &other,
        "elsewhere",
        &["/bin/curl", "-fsSk", "--max-time", "5", &format!("https://{web}/unknown")],
    );
    assert!(!unknown.status.success(), "{}", text(&unknown));
    assert!(world.web.seen().is_empty(), "the unfollowed namespace's container reached the upstream");
    let destination = SocketAddr::new(web, 443);
    world.daemon.wait_decisions("an unknown-sandbox denial", |d| {
        d.iter().any(|d| d.rule == "unknown-sandbox" && d.destination == Some(destination))
    });

    let from_open = world.ctr_curl("open", "https://web.test/echo");
    assert!(from_open.status.success(), "{}", text(&from_open));
    assert!(text(&from_open).contains("host=web.test"), "{}", text(&from_open));
    let from_closed = world.ctr_curl("closed", "https://web.test/echo");
    assert!(!from_closed.status.success(), "{}", text(&from_closed));
    let canary = world.ctr_curl("open", "https://canary.test/");
    assert!(!canary.status.success(), "{}", text(&canary));
    let canary_ip = world.ctr_curl("open", &format!("https://{}/", world.net.v4(3)));
    assert!(!canary_ip.status.success(), "{}", text(&canary_ip));
    assert_eq!(world.canary.accepted(), 0, "the canary was reached");
    assert_eq!(world.web.seen().len(), 1, "only the open container's request may arrive");
    let decisions = world.daemon.wait_decisions("the containers' allow and denials", |d| {
        has(d, "open", Kind::Request, Verdict::Allow, "")
            && (has(d, "closed", Kind::Dns, Verdict::Deny, "") || has(d, "closed", Kind::Connect, Verdict::Deny, ""))
            && has(d, "open", Kind::Connect, Verdict::Deny, "")
    });
    assert!(
        !decisions.iter().any(|d| d.rule == "unknown-sandbox" && d.destination != Some(destination)),
        "a container was not attributed"
    );

    // The task ends: its sandbox goes, and the audit log says why.
    let killed = world.containerd().ctr().args(["task", "kill", "-s", "SIGKILL", "open"]).output().unwrap();
    assert!(killed.status.success(), "{}", text(&killed));
    world.daemon.wait_decisions("the open container's sandbox removed", |d| {
        has(d, "open", Kind::Lifecycle, Verdict::Info, "container-stopped")
            && has(d, "open", Kind::Lifecycle, Verdict::Info, "removed")
    });
    let left: Vec<String> = world.daemon.statuses().into_iter().map(|s| s.record.name).collect();
    assert_eq!(left, ["closed"]);
}

/// A restarted daemon takes a running containerd container's sandbox over
/// as it was, and finds the one started while it was down (which could
/// reach nothing meanwhile).
#[test]
fn containerd_containers_are_rediscovered_after_a_restart() {
    if !containerd_available() {
        return;
    }
    let mut world = World::with_containerd();
    world.ctr_run("before", None, &["sluice.profile=web"]);
    let registered = world.sandbox_of("before");

    world.daemon.kill();
    world.ctr_run("during", None, &["sluice.profile=web"]);
    std::fs::copy(&registered.record.ca_bundle, world.share("during").join("ca.pem")).unwrap();
    let offline = world.ctr_curl("during", "https://web.test/down");
    assert!(!offline.status.success(), "{}", text(&offline));
    assert!(world.web.seen().is_empty(), "the upstream was reached while sluice was down");

    world.daemon.restart();
    let again = world.sandbox_of("before");
    assert_eq!(again.record.cgroup_id, registered.record.cgroup_id);
    assert_eq!(again.record.dns_port, registered.record.dns_port);
    assert_eq!(again.record.name, registered.record.name);
    let found = world.sandbox_of("during");
    world.hand_over_ca_ctr("before", &again);
    world.hand_over_ca_ctr("during", &found);
    for id in ["before", "during"] {
        let output = world.ctr_curl(id, "https://web.test/echo");
        assert!(output.status.success(), "{id}: {}", text(&output));
    }
    assert_eq!(world.web.seen().len(), 2);
    assert_eq!(world.canary.accepted(), 0);
}

/// A Docker engine runs its containers through its containerd, which
/// knows them without their Docker labels. Followed outside Docker's own
/// namespace (this engine uses one of its own), containerd's reports of
/// them are left to Docker discovery: the container keeps one sandbox, with
/// its Docker identity and the profile its labels pick, and loses it once.
#[test]
fn docker_containers_seen_through_containerd_are_left_to_docker_discovery() {
    if !containerd_available() {
        return;
    }
    let engine = docker::engine();
    let socket = engine.containerd_socket().display().to_string();
    let world = World::with(true, false, &["--containerd-socket", &socket]);
    wait_for("containerd discovery", || world.daemon.log().contains("following containerd").then_some(()));
    let id = world.start_container(&["sluice.profile=web"]);
    let sandbox = world.sandbox_of(&id);
    wait_for("containerd's report of the container", || {
        world.daemon.log().lines().any(|l| l.contains("left to Docker discovery") && l.contains(&id)).then_some(())
    });
    let statuses = world.daemon.statuses();
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    let info = statuses[0].record.container.clone().unwrap();
    assert_eq!((info.runtime.as_str(), info.id.as_str()), ("docker", id.as_str()));
    world.hand_over_ca(&id, &sandbox);
    let allowed = world.exec_curl(&id, "https://web.test/echo");
    assert!(allowed.status.success(), "{}", text(&allowed));

    world.engine.run(&["rm", "-f", &id]);
    let name = sandbox.record.name.clone();
    let decisions = world
        .daemon
        .wait_decisions("the sandbox removed", |d| has(d, &name, Kind::Lifecycle, Verdict::Info, "removed"));
    assert_eq!(decisions.iter().filter(|d| d.rule == "registered").count(), 1);
    assert_eq!(decisions.iter().filter(|d| d.rule == "removed").count(), 1);
    assert!(!decisions.iter().any(|d| d.rule == "container-unregistered" || d.rule == "container-bound"));
    assert!(world.daemon.statuses().is_empty());
}
