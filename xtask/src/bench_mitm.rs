//! mitmproxy as the peer in the HTTPS rows: installed from `PyPI` into a venv
//! the first time, started with upstream verification on (trusting the bench
//! CA), stopped by its PID when the bench ends.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};

use crate::step;

/// Returns `mitmdump` from `venv`, installing mitmproxy there first if it is
/// missing. Every step shows its progress.
pub fn install(venv: &Path) -> anyhow::Result<PathBuf> {
    let mitmdump = venv.join("bin/mitmdump");
    if mitmdump.exists() {
        return Ok(mitmdump);
    }
    step(&format!("installing mitmproxy from PyPI into {} (first run only)", venv.display()));
    let result = create_venv(venv).and_then(|()| {
        crate::run(Command::new(venv.join("bin/pip")).args(["install", "--progress-bar", "on", "mitmproxy"]))
    });
    if let Err(error) = result {
        // A half-made venv would be taken for a finished one next time.
        let _ = std::fs::remove_dir_all(venv);
        return Err(error);
    }
    if !mitmdump.exists() {
        bail!("pip finished but {} is missing", mitmdump.display());
    }
    Ok(mitmdump)
}

fn create_venv(venv: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(venv);
    if crate::run(Command::new("python3").arg("-m").arg("venv").arg(venv)).is_ok() {
        return Ok(());
    }
    // Debian's python3 makes venvs only with python3-venv installed.
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("`python3 -m venv` failed");
    }
    step("installing python3-venv (Debian) so that python3 can make a venv");
    crate::run(Command::new("apt-get").args(["install", "-y", "python3-venv"]))?;
    let _ = std::fs::remove_dir_all(venv);
    crate::run(Command::new("python3").arg("-m").arg("venv").arg(venv))
}

/// `mitmdump --version`'s first line, e.g. "Mitmproxy: 11.0.2".
pub fn version(mitmdump: &Path) -> String {
    Command::new(mitmdump)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).lines().next().map(str::to_owned))
        .unwrap_or_default()
}

/// A running mitmdump; dropped, it is killed by its PID.
pub struct Mitm {
    child: Child,
    pub addr: SocketAddr,
    /// mitmproxy's CA, for the client to trust.
    pub ca_pem: PathBuf,
}

/// The options the bench runs mitmdump with (besides listen address and
/// confdir): upstream certificates verified against the bench CA, bodies
/// streamed instead of buffered whole.
pub fn options(upstream_ca: &Path) -> Vec<String> {
    vec![
        "--set".into(),
        format!("ssl_verify_upstream_trusted_ca={}", upstream_ca.display()),
        "--set".into(),
        "stream_large_bodies=1m".into(),
        "-q".into(),
    ]
}

/// Starts mitmdump on a free 127.0.0.1 port (it inherits this process's CPU
/// affinity) and waits until it accepts connections and its CA exists.
pub fn start(mitmdump: &Path, confdir: &Path, upstream_ca: &Path) -> anyhow::Result<Mitm> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    std::fs::create_dir_all(confdir)?;
    let log = confdir.join("mitmdump.log");
    let mut child = Command::new(mitmdump)
        .args(["--listen-host", "127.0.0.1", "--listen-port", &port.to_string()])
        .arg("--set")
        .arg(format!("confdir={}", confdir.display()))
        .args(options(upstream_ca))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(confdir.join("mitmdump.err"))?)
        .spawn()
        .with_context(|| format!("starting {}", mitmdump.display()))?;
    let ca_pem = confdir.join("mitmproxy-ca-cert.pem");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(status) = child.try_wait()? {
            let err = std::fs::read_to_string(confdir.join("mitmdump.err")).unwrap_or_default();
            bail!("mitmdump exited with {status}: {}", err.trim());
        }
        if ca_pem.exists() && TcpStream::connect(addr).is_ok() {
            return Ok(Mitm { child, addr, ca_pem });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("mitmdump did not listen on {addr} within 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Mitm {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Mitm {
    fn drop(&mut self) {
        // Child::kill signals exactly this PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
