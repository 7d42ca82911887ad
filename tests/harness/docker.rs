//! A Docker engine of the test run's own: `dockerd` started by the harness
//! with its own socket, state directories and bridge network, an image
//! built locally from the host's binaries (no registry), and everything
//! removed again when the last test using it ends.
//!
//! Network rules: the engine makes no NAT and no forwarding (`--iptables=false`,
//! `--ip-forward=false`, forwarding off on its bridge), so a container can
//! reach nothing but the host's own addresses: the test hosts in network
//! namespaces are reachable from a container only through sluice's proxy.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex, Weak},
    thread,
    time::{Duration, Instant},
};

pub const DOCKERD: &str = "/usr/sbin/dockerd";
/// Debian's client, of the engine's own version (another `docker` may come
/// first on PATH).
pub const DOCKER: &str = "/usr/bin/docker";
/// Host programs copied into the test image, with their libraries.
const IMAGE_PROGRAMS: [&str; 4] = ["/usr/bin/curl", "/bin/dash", "/bin/sleep", "/bin/cat"];

pub struct DockerEngine {
    pub socket: PathBuf,
    run_dir: PathBuf,
    data_root: PathBuf,
    child: Mutex<Option<Child>>,
    /// The test network (a bridge with its own subnets 10.231.N.0/24 and
    /// `fd00:231:N::/64`).
    pub network: String,
    pub subnet: u32,
    /// The test image: curl, sh, sleep, cat.
    pub image: String,
    /// The namespace of the engine's containers in its containerd.
    pub containerd_namespace: String,
}

/// Whether Docker tests can run here; prints why not.
pub fn available() -> bool {
    if !super::privileged() {
        return false;
    }
    for binary in [DOCKERD, DOCKER, "/usr/sbin/runc"] {
        if !Path::new(binary).exists() {
            eprintln!("SKIPPED: needs {binary} (`cargo xtask setup` installs docker.io)");
            return false;
        }
    }
    true
}

/// The engine shared by the tests of this process, started on first use
/// and stopped when the last test holding it drops it.
pub fn engine() -> Arc<DockerEngine> {
    static SHARED: Mutex<Weak<DockerEngine>> = Mutex::new(Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(engine) = shared.upgrade() {
        return engine;
    }
    let engine = Arc::new(DockerEngine::start());
    *shared = Arc::downgrade(&engine);
    engine
}

impl DockerEngine {
    fn start() -> Self {
        // Unique per engine, not only per process: an engine being stopped
        // (the last test dropped it) may overlap the next one starting.
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = format!("{}-{}", std::process::id(), STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let run_dir = PathBuf::from(format!("/run/sluice-test-docker-{pid}"));
        let data_root = PathBuf::from(format!("/var/lib/sluice-test-docker-{pid}"));
        std::fs::create_dir_all(&run_dir).unwrap();
        let socket = run_dir.join("docker.sock");
        let log = std::fs::File::create(run_dir.join("dockerd.log")).unwrap();
        let child = Command::new(DOCKERD)
            .arg(format!("--host=unix://{}", socket.display()))
            .arg(format!("--data-root={}", data_root.display()))
            .arg(format!("--exec-root={}", run_dir.join("exec").display()))
            .arg(format!("--pidfile={}", run_dir.join("dockerd.pid").display()))
            .args(["--iptables=false", "--ip6tables=false", "--ip-forward=false", "--bridge=none"])
            // A containerd of its own even if a system one is running.
            .arg(format!("--containerd-namespace=sluice-test-{pid}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        // One subnet for every engine of this process: an engine stops when
        // its last test ends and another may start later, and each test
        // network takes one of the few subnets a test binary has.
        static SUBNET: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let subnet = *SUBNET.get_or_init(super::next_subnet);
        let mut engine = Self {
            socket,
            run_dir,
            data_root,
            child: Mutex::new(Some(child)),
            network: format!("sluice-test-{pid}"),
            subnet,
            image: format!("sluice-test/curl:{pid}"),
            containerd_namespace: format!("sluice-test-{pid}"),
        };
        engine.wait_ready();
        engine.build_image();
        engine.create_network();
        engine
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            if self
                .docker()
                .arg("version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            if let Some(status) = self.child.lock().unwrap().as_mut().unwrap().try_wait().unwrap() {
                panic!("dockerd exited with {status}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "dockerd did not come up:\n{}", self.log());
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The socket of the containerd this engine started for itself.
    pub fn containerd_socket(&self) -> PathBuf {
        self.run_dir.join("exec/containerd/containerd.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.run_dir.join("dockerd.log")).unwrap_or_default()
    }

    /// The Docker client for this engine.
    pub fn docker(&self) -> Command {
        let mut command = Command::new(DOCKER);
        command.env("DOCKER_HOST", format!("unix://{}", self.socket.display()));
        command
    }

    /// Runs the client; panics with its output if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        let output = self.docker().args(args).output().unwrap();
        assert!(output.status.success(), "docker {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }

    /// Runs the client and returns what it did, success or not.
    pub fn output(&self, args: &[&str]) -> Output {
        self.docker().args(args).stdin(Stdio::null()).output().unwrap()
    }

    /// An image of the host's curl, dash (as /bin/sh), sleep and cat with
    /// their libraries, imported from a tar: nothing comes from a registry.
    fn build_image(&self) {
        let root = self.run_dir.join("rootfs");
        let _ = std::fs::remove_dir_all(&root);
        for dir in ["bin", "etc", "tmp"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for program in IMAGE_PROGRAMS {
            let name = Path::new(program).file_name().unwrap();
            std::fs::copy(program, root.join("bin").join(name)).unwrap();
            let ldd = Command::new("ldd").arg(program).output().unwrap();
            for library in String::from_utf8_lossy(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/')) {
                let target = root.join(library.trim_start_matches('/'));
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::copy(library, &target).unwrap_or_else(|e| panic!("copy {library}: {e}"));
            }
        }
        std::os::unix::fs::symlink("dash", root.join("bin/sh")).unwrap();
        std::fs::write(root.join("etc/nsswitch.conf"), "hosts: files dns\n").unwrap();
        let mut tar =
            Command::new("tar").arg("-C").arg(&root).args(["-c", "."]).stdout(Stdio::piped()).spawn().unwrap();
        let import =
            self.docker().args(["import", "-", &self.image]).stdin(tar.stdout.take().unwrap()).output().unwrap();
        assert!(tar.wait().unwrap().success(), "tar of the image root failed");
        assert!(import.status.success(), "docker import: {}", String::from_utf8_lossy(&import.stderr));
        let _ = std::fs::remove_dir_all(&root);
    }

    fn create_network(&self) {
        let bridge = self.bridge();
        // An engine being stopped may still hold the bridge of this subnet.
        let deadline = Instant::now() + Duration::from_secs(30);
        while Path::new("/sys/class/net").join(&bridge).exists() {
            assert!(Instant::now() < deadline, "the bridge {bridge} of an earlier engine is still there");
            thread::sleep(Duration::from_millis(50));
        }
        let forwarding6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap_or_default();
        self.run(&[
            "network",
            "create",
            "--subnet",
            &format!("10.231.{}.0/24", self.subnet),
            "--ipv6",
            "--subnet",
            &format!("fd00:231:{}::/64", self.subnet),
            "-o",
            &format!("com.docker.network.bridge.name={bridge}"),
            "-o",
            "com.docker.network.bridge.enable_ip_masquerade=false",
            &self.network,
        ]);
        // Nothing a container sends leaves through the host: only the host's
        // own addresses (sluice) are reachable.
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{bridge}/forwarding"), "0").unwrap();
        // IPv6 forwarding is one switch for the host: it must stay as it was.
        let now = std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/forwarding").unwrap_or_default();
        assert_eq!(now, forwarding6, "creating an IPv6 network turned IPv6 forwarding on");
    }

    fn bridge(&self) -> String {
        format!("sldk{}", self.subnet)
    }

    /// Every container of this engine, running or not.
    fn containers(&self) -> Vec<String> {
        self.run(&["ps", "-aq"]).lines().map(str::to_owned).collect()
    }
}

impl Drop for DockerEngine {
    fn drop(&mut self) {
        let containers = self.containers();
        if !containers.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(containers.iter().map(String::as_str));
            let _ = self.output(&args);
        }
        let _ = self.output(&["network", "rm", &self.network]);
        if let Some(mut child) = self.child.lock().unwrap().take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        // dockerd leaves its network namespace bind-mounted under exec/.
        unmount_below(&self.run_dir);
        unmount_below(&self.data_root);
        let _ = std::fs::remove_dir_all(&self.data_root);
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// Detaches every mount at or below `dir`, deepest first.
fn unmount_below(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut below: Vec<&str> = mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .filter(|point| Path::new(point).starts_with(dir))
        .collect();
    below.sort_by_key(|point| std::cmp::Reverse(point.len()));
    for point in below {
        if let Ok(path) = std::ffi::CString::new(point) {
            // SAFETY: a NUL-terminated path; MNT_DETACH only detaches.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// An address for a daemon's `--container-address`: the last one of a
/// test network's subnet (10.231.N.254), which nothing else there uses, so
/// each test's daemon has its own without using up another subnet.
pub fn container_address(net: &super::TestNet) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, 231, u8::try_from(net.n).unwrap(), 254)
}

/// The IPv6 counterpart for `--container-address6`: `fd00:231:N::fe`, in
/// the test network's IPv6 subnet, which nothing else there uses.
pub fn container_address6(net: &super::TestNet) -> std::net::Ipv6Addr {
    format!("fd00:231:{}::fe", net.n).parse().unwrap()
}

pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const CTR: &str = "/usr/bin/ctr";

/// A containerd of the test's own (own socket, root and state), with the
/// Docker engine's test image imported into a namespace of its own.
pub struct Containerd {
    dir: PathBuf,
    root: PathBuf,
    child: Option<Child>,
    pub namespace: String,
    pub image: String,
}

impl Containerd {
    pub fn start(docker: &DockerEngine) -> Self {
        // Unique per containerd: tests of one process may run several at once.
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let pid = format!("{}-{}", std::process::id(), STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let dir = PathBuf::from(format!("/run/sluice-test-containerd-{pid}"));
        let root = PathBuf::from(format!("/var/lib/sluice-test-containerd-{pid}"));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(CONTAINERD)
            .arg("--address")
            .arg(dir.join("containerd.sock"))
            .arg("--root")
            .arg(&root)
            .arg("--state")
            .arg(dir.join("state"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("containerd.log")).unwrap())
            .spawn()
            .expect("start containerd");
        let containerd = Self {
            dir,
            root,
            child: Some(child),
            namespace: format!("sluice-test-{pid}"),
            image: format!("docker.io/{}", docker.image),
        };
        let deadline = Instant::now() + Duration::from_mins(1);
        while !containerd.ctr().arg("version").stdout(Stdio::null()).stderr(Stdio::null()).status().unwrap().success() {
            assert!(Instant::now() < deadline, "containerd did not come up");
            thread::sleep(Duration::from_millis(100));
        }
        containerd.import_image(docker, &containerd.namespace);
        containerd
    }

    /// The Docker engine's test image, into `namespace`: no registry.
    pub fn import_image(&self, docker: &DockerEngine, namespace: &str) {
        let mut save = docker.docker().args(["save", &docker.image]).stdout(Stdio::piped()).spawn().unwrap();
        let import =
            self.ctr_in(namespace).args(["image", "import", "-"]).stdin(save.stdout.take().unwrap()).output().unwrap();
        assert!(save.wait().unwrap().success(), "docker save failed");
        assert!(import.status.success(), "ctr image import: {}", String::from_utf8_lossy(&import.stderr));
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// `ctr run -d` of the test image running `sleep 300` as container `id`
    /// in cgroup `cgroup`, with more `ctr run` options (labels, network,
    /// mounts).
    pub fn run_detached(&self, namespace: &str, id: &str, cgroup: &str, options: &[&str]) {
        let output = self
            .ctr_in(namespace)
            .args(["run", "-d", "--null-io", "--cgroup", cgroup])
            .args(options)
            .args([&self.image, id, "/bin/sleep", "300"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(output.status.success(), "ctr run {id}: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// `ctr task exec` of `command` in container `id` of `namespace`.
    pub fn exec(&self, namespace: &str, id: &str, command: &[&str]) -> Output {
        static EXECS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let exec_id = format!("exec-{}", EXECS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        self.ctr_in(namespace)
            .args(["task", "exec", "--exec-id", &exec_id, id])
            .args(command)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `ctr` for this containerd and namespace.
    pub fn ctr(&self) -> Command {
        self.ctr_in(&self.namespace)
    }

    /// `ctr` for this containerd and another namespace.
    pub fn ctr_in(&self, namespace: &str) -> Command {
        let mut command = Command::new(CTR);
        command.arg("--address").arg(self.socket()).args(["--namespace", namespace]);
        command
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Every namespace's: their shims would outlive containerd.
        let namespaces = self.ctr().args(["namespaces", "list", "-q"]).output();
        for namespace in namespaces.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default().lines()
        {
            let Ok(output) = self.ctr_in(namespace).args(["containers", "list", "-q"]).output() else { continue };
            for id in String::from_utf8_lossy(&output.stdout).lines() {
                let _ = self.ctr_in(namespace).args(["task", "kill", "-s", "SIGKILL", id]).output();
                let _ = self.ctr_in(namespace).args(["task", "delete", "-f", id]).output();
                let _ = self.ctr_in(namespace).args(["containers", "delete", id]).output();
            }
        }
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
        // Snapshots are bind and overlay mounts under the root.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/self/mounts | sort -r | xargs -r -n1 umount -l",
                self.root.display()
            ))
            .status();
        let _ = std::fs::remove_dir_all(&self.root);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
