//! Container rows: how long after `docker run` a container's first connect
//! reaches sluice's proxy, and how long until Docker discovery has
//! registered its sandbox (p50/p95/p99 over N containers started one after
//! another under the daemon's container parent).
//!
//! It runs a Docker engine of its own (own socket and state, no NAT, no
//! forwarding, a bridge on 10.231.255.0/24), an image imported from the
//! host's curl and its libraries (no registry), and a sluice daemon with a
//! container address (10.231.0.1). Each container connects once to
//! 127.0.0.1:PORT with a port of its own: sluice redirects it to the proxy,
//! which denies it (the built-in profile refuses loopback), so nothing
//! leaves the host and the decision log says when it arrived.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _};

const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";
const INSTANCE: &str = "sluice-bench-docker";
const SUBNET: &str = "10.231.255.0/24";
const BRIDGE: &str = "slbenchdk0";
const CONTAINER_ADDRESS: &str = "10.231.0.1";
const FIRST_PORT: u16 = 20_000;

/// Runs the container rows and prints them; the JSON for results.json, or
/// None when Docker is not installed (said on stdout).
pub fn run(sluice: &Path, quick: bool) -> anyhow::Result<Option<serde_json::Value>> {
    if !Path::new(DOCKERD).exists() || !Path::new(DOCKER).exists() {
        println!("containers: skipped (no {DOCKERD}; `cargo xtask setup` installs docker.io)");
        return Ok(None);
    }
    let count: u16 = if quick { 10 } else { 50 };
    crate::step(&format!("containers: docker run -> first enforced connect and registration, {count} containers"));
    let world = World::start(sluice)?;
    let mut started = Vec::new();
    for i in 0..count {
        let port = (FIRST_PORT + i).to_string();
        let url = format!("http://127.0.0.1:{port}/");
        let name = format!("sluice-bench-{i}");
        let parent = format!("--cgroup-parent=/{INSTANCE}/containers");
        let at = unix_ms(SystemTime::now());
        // The container stays a moment after its connect, so discovery
        // finds it running.
        let script = format!("/bin/curl -s -m 2 {url}; /bin/sleep 3");
        world.docker(&[
            "run",
            "-d",
            "--rm",
            "--name",
            &name,
            &parent,
            "--network",
            INSTANCE,
            IMAGE,
            "/bin/dash",
            "-c",
            &script,
        ])?;
        started.push((name, FIRST_PORT + i, at));
    }
    let decisions = world.wait_decisions(&started)?;
    let mut to_connect = Vec::new();
    let mut to_registered = Vec::new();
    let mut unknown = 0;
    for (name, _, at) in &started {
        let (connect, registered, was_unknown) = decisions[name];
        to_connect.push(connect.saturating_sub(*at));
        to_registered.push(registered.saturating_sub(*at));
        unknown += usize::from(was_unknown);
    }
    let connect = percentiles(&mut to_connect);
    let registered = percentiles(&mut to_registered);
    println!(
        "containers ({count}, one after another): docker run -> first connect at the proxy  p50 {} ms  p95 {} ms  p99 {} ms",
        connect[0], connect[1], connect[2]
    );
    println!(
        "containers ({count}): docker run -> sandbox registered by discovery  p50 {} ms  p95 {} ms  p99 {} ms; \
         {unknown} first connects came before registration (denied as unknown-sandbox)",
        registered[0], registered[1], registered[2]
    );
    Ok(Some(serde_json::json!({
        "containers": count,
        "run_to_first_connect_ms": { "p50": connect[0], "p95": connect[1], "p99": connect[2] },
        "run_to_registered_ms": { "p50": registered[0], "p95": registered[1], "p99": registered[2] },
        "first_connect_before_registration": unknown,
        "samples_ms": { "first_connect": to_connect, "registered": to_registered },
    })))
}

const IMAGE: &str = "sluice-bench/curl:latest";

/// The engine, its network and image, and the daemon; all removed on drop.
struct World {
    run_dir: PathBuf,
    data_root: PathBuf,
    dockerd: Child,
    daemon: Option<Child>,
    sluice: PathBuf,
}

impl World {
    fn start(sluice: &Path) -> anyhow::Result<Self> {
        let pid = std::process::id();
        let run_dir = PathBuf::from(format!("/run/sluice-bench-docker-{pid}"));
        let data_root = PathBuf::from(format!("/var/lib/sluice-bench-docker-{pid}"));
        std::fs::create_dir_all(&run_dir)?;
        let dockerd = Command::new(DOCKERD)
            .arg(format!("--host=unix://{}", run_dir.join("docker.sock").display()))
            .arg(format!("--data-root={}", data_root.display()))
            .arg(format!("--exec-root={}", run_dir.join("exec").display()))
            .arg(format!("--pidfile={}", run_dir.join("dockerd.pid").display()))
            .args(["--iptables=false", "--ip6tables=false", "--ip-forward=false", "--bridge=none"])
            .arg(format!("--containerd-namespace=sluice-bench-{pid}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(run_dir.join("dockerd.log"))?)
            .spawn()
            .context("starting dockerd")?;
        let mut world = Self { run_dir, data_root, dockerd, daemon: None, sluice: sluice.to_owned() };
        let deadline = Instant::now() + Duration::from_mins(1);
        while world.docker(&["version"]).is_err() {
            if Instant::now() > deadline {
                bail!("dockerd did not come up; see {}", world.run_dir.join("dockerd.log").display());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        world.import_image()?;
        world.docker(&[
            "network",
            "create",
            "--subnet",
            SUBNET,
            "-o",
            &format!("com.docker.network.bridge.name={BRIDGE}"),
            "-o",
            "com.docker.network.bridge.enable_ip_masquerade=false",
            INSTANCE,
        ])?;
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{BRIDGE}/forwarding"), "0")?;
        let _ = Command::new(&world.sluice).args(["teardown", "--instance", INSTANCE]).output();
        let decisions = world.run_dir.join("decisions.jsonl");
        world.daemon = Some(
            Command::new(&world.sluice)
                .args(["daemon", "--instance", INSTANCE, "--proxy-port", "0", "--dns-port", "0"])
                .arg("--decision-log")
                .arg(&decisions)
                .args(["--upstream-dns", "127.0.0.1:9", "--container-address", CONTAINER_ADDRESS, "--docker"])
                .arg(world.run_dir.join("docker.sock"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(world.run_dir.join("daemon.log"))?)
                .spawn()
                .context("starting sluice daemon")?,
        );
        let socket = PathBuf::from(format!("/run/{INSTANCE}/control.sock"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if Instant::now() > deadline {
                bail!("sluice daemon did not come up; see {}", world.run_dir.join("daemon.log").display());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Discovery connects right after the control socket appears.
        std::thread::sleep(Duration::from_millis(500));
        Ok(world)
    }

    fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        let output = Command::new(DOCKER)
            .env("DOCKER_HOST", format!("unix://{}", self.run_dir.join("docker.sock").display()))
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !output.status.success() {
            bail!("docker {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    }

    /// The host's curl, dash and sleep with their libraries, as an image.
    fn import_image(&self) -> anyhow::Result<()> {
        let root = self.run_dir.join("rootfs");
        std::fs::create_dir_all(root.join("bin"))?;
        for program in ["/usr/bin/curl", "/bin/dash", "/bin/sleep"] {
            let name = Path::new(program).file_name().context("program name")?;
            std::fs::copy(program, root.join("bin").join(name)).with_context(|| format!("copying {program}"))?;
            let ldd = Command::new("ldd").arg(program).output()?;
            for library in String::from_utf8_lossy(&ldd.stdout).split_whitespace().filter(|w| w.starts_with('/')) {
                let target = root.join(library.trim_start_matches('/'));
                std::fs::create_dir_all(target.parent().context("library path")?)?;
                std::fs::copy(library, &target).with_context(|| format!("copying {library}"))?;
            }
        }
        let mut tar = Command::new("tar").arg("-C").arg(&root).args(["-c", "."]).stdout(Stdio::piped()).spawn()?;
        let import = Command::new(DOCKER)
            .env("DOCKER_HOST", format!("unix://{}", self.run_dir.join("docker.sock").display()))
            .args(["import", "-", IMAGE])
            .stdin(tar.stdout.take().context("tar output")?)
            .output()?;
        tar.wait()?;
        if !import.status.success() {
            bail!("docker import: {}", String::from_utf8_lossy(&import.stderr).trim());
        }
        Ok(())
    }

    /// Per container: when its first connect reached the proxy, when its
    /// sandbox was registered (unix ms), and whether that connect came first.
    fn wait_decisions(&self, started: &[(String, u16, u64)]) -> anyhow::Result<HashMap<String, (u64, u64, bool)>> {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let text = std::fs::read_to_string(self.run_dir.join("decisions.jsonl")).unwrap_or_default();
            let mut connects: HashMap<u16, (u64, bool)> = HashMap::new();
            let mut registered: HashMap<String, u64> = HashMap::new();
            for decision in text.lines().filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok()) {
                let Some(at) = decision["time"].as_str().and_then(parse_time) else { continue };
                match (decision["kind"].as_str(), decision["rule"].as_str()) {
                    (Some("connect"), rule) => {
                        let port = decision["destination"].as_str().and_then(|d| d.rsplit(':').next()?.parse().ok());
                        if let Some(port) = port {
                            connects.entry(port).or_insert((at, rule == Some("unknown-sandbox")));
                        }
                    }
                    (Some("lifecycle"), Some("registered")) => {
                        // The sandbox is named after the container.
                        if let Some(sandbox) = decision["sandbox"].as_str() {
                            registered.entry(sandbox.to_owned()).or_insert(at);
                        }
                    }
                    _ => {}
                }
            }
            let all: Option<HashMap<_, _>> = started
                .iter()
                .map(|(name, port, _)| {
                    let (connect, unknown) = connects.get(port)?;
                    Some((name.clone(), (*connect, *registered.get(name)?, *unknown)))
                })
                .collect();
            if let Some(all) = all {
                return Ok(all);
            }
            if Instant::now() > deadline {
                bail!(
                    "not every container's connect and registration was logged within 60 s; see {}",
                    self.run_dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
            let _ = daemon.wait();
            let _ = Command::new(&self.sluice).args(["teardown", "--instance", INSTANCE]).output();
        }
        if let Ok(ids) = self.docker(&["ps", "-aq"]) {
            for id in ids.lines() {
                let _ = self.docker(&["rm", "-f", id]);
            }
        }
        let _ = self.docker(&["network", "rm", INSTANCE]);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.dockerd.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.dockerd.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.dockerd.kill();
        let _ = self.dockerd.wait();
        let _ = std::fs::remove_dir_all(&self.data_root);
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// p50, p95, p99 (nearest rank) in ms; sorts the samples.
fn percentiles(samples: &mut [u64]) -> [u64; 3] {
    samples.sort_unstable();
    [50, 95, 99].map(|p| {
        let rank = (samples.len() * p).div_ceil(100).max(1);
        samples[rank - 1]
    })
}

fn unix_ms(at: SystemTime) -> u64 {
    u64::try_from(at.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
}

/// `2026-11-22T19:31:18.911Z` as unix milliseconds.
fn parse_time(text: &str) -> Option<u64> {
    let (date, time) = text.strip_suffix('Z')?.split_once('T')?;
    let mut date = date.split('-').map(|part| part.parse::<i64>().ok());
    let (year, month, day) = (date.next()??, date.next()??, date.next()??);
    let (hms, millis) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.split(':').map(|part| part.parse::<i64>().ok());
    let (hour, minute, second) = (hms.next()??, hms.next()??, hms.next()??);
    let millis: i64 = format!("{millis:0<3}").get(..3)?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 24 + hour) * 60 + minute) * 60_000 + second * 1000 + millis).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_times_are_unix_milliseconds() {
        assert_eq!(parse_time("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(parse_time("2026-11-22T19:31:18.911Z"), Some(1_795_375_878_911));
        assert_eq!(parse_time("2000-03-01T00:00:01.5Z"), Some(951_868_801_500));
        assert_eq!(parse_time("garbage"), None);
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let mut samples: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentiles(&mut samples), [50, 95, 99]);
        assert_eq!(percentiles(&mut [7]), [7, 7, 7]);
    }
}
