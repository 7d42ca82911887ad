//! Squid as a peer: Debian's `squid-openssl` (plain `squid` cannot bump
//! TLS), a forward proxy that intercepts HTTPS with `ssl-bump`, verifying
//! upstreams against the bench CA, caching nothing. Installed the first time
//! with apt-get, started in the foreground on the bench address, stopped by
//! its PID.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

use crate::step;

const SQUID: &str = "/usr/sbin/squid";
const CERTGEN: &str = "/usr/lib/squid/security_file_certgen";

/// Installs squid-openssl if Squid is missing; returns `squid -v`'s version line.
pub fn install() -> anyhow::Result<String> {
    if !Path::new(SQUID).exists() {
        step("installing squid-openssl (Debian) for the Squid configuration (first run only)");
        crate::run(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends", "squid-openssl"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    let out = Command::new(SQUID).arg("-v").output().context("running squid -v")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !text.contains("--with-openssl") {
        bail!("this Squid was built without OpenSSL and cannot ssl-bump: install squid-openssl instead of squid");
    }
    if !Path::new(CERTGEN).exists() {
        bail!("{CERTGEN} is missing");
    }
    Ok(text.lines().next().unwrap_or_default().trim().to_owned())
}

/// A running Squid; dropped, it is stopped by its PID.
pub struct Squid {
    child: Child,
    pub addr: SocketAddr,
    /// The CA Squid signs bumped connections with, for the client to trust.
    pub ca_pem: PathBuf,
}

impl Squid {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The configuration the bench runs Squid with.
pub fn config(addr: SocketAddr, dir: &Path, ca_and_key: &Path, upstream_ca: &Path) -> String {
    let dir = dir.display();
    format!(
        "http_port {addr} ssl-bump tls-cert={ca} generate-host-certificates=on dynamic_cert_mem_cache_size=16MB\n\
         sslcrtd_program {CERTGEN} -s {dir}/ssl_db -M 16MB\n\
         sslcrtd_children 4 startup=1 idle=1\n\
         acl step1 at_step SslBump1\n\
         ssl_bump peek step1\n\
         ssl_bump bump all\n\
         tls_outgoing_options cafile={upstream}\n\
         http_access allow all\n\
         cache deny all\n\
         access_log none\n\
         cache_log {dir}/cache.log\n\
         pid_filename none\n\
         coredump_dir {dir}\n\
         max_filedescriptors 20000\n\
         workers 1\n\
         shutdown_lifetime 0 seconds\n",
        ca = ca_and_key.display(),
        upstream = upstream_ca.display(),
    )
}

/// Starts Squid on a free port of `ip` (it inherits this process's CPU
/// affinity) and waits until it accepts connections.
pub fn start(dir: &Path, ip: std::net::IpAddr, upstream_ca: &Path) -> anyhow::Result<Squid> {
    std::fs::create_dir_all(dir)?;
    // Squid drops to the `proxy` user: it must read and write here.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777))?;
    let ca_pem = dir.join("squid-ca.pem");
    let ca_and_key = dir.join("squid-ca-and-key.pem");
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, "sluice bench Squid CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = params.self_signed(&key)?;
    std::fs::write(&ca_pem, cert.pem())?;
    std::fs::write(&ca_and_key, cert.pem() + &key.serialize_pem())?;
    let db = dir.join("ssl_db");
    let _ = std::fs::remove_dir_all(&db);
    crate::run(Command::new(CERTGEN).arg("-c").arg("-s").arg(&db).args(["-M", "16MB"]).stdout(Stdio::null()))?;
    crate::run(Command::new("chown").args(["-R", "proxy:proxy"]).arg(dir))?;

    let port = TcpListener::bind((ip, 0))?.local_addr()?.port();
    let addr = SocketAddr::new(ip, port);
    let conf = dir.join("squid.conf");
    std::fs::write(&conf, config(addr, dir, &ca_and_key, upstream_ca))?;
    let mut child = Command::new(SQUID)
        .arg("-N")
        .arg("-f")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("squid.err"))?)
        .spawn()
        .context("starting squid")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(dir.join("cache.log")).unwrap_or_default();
            let err = std::fs::read_to_string(dir.join("squid.err")).unwrap_or_default();
            bail!("squid exited with {status}: {}\n{}", err.trim(), log.trim());
        }
        if TcpStream::connect(addr).is_ok() {
            return Ok(Squid { child, addr, ca_pem });
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("squid did not listen on {addr} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        // SIGTERM first so that Squid stops its certificate helpers.
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
