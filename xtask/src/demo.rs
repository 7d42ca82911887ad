//! `cargo xtask demo`: sluice confining a real command under the built-in
//! profile, with nothing leaving this machine.
//!
//! A network namespace stands in for the internet: `docs.demo.test`
//! (198.18.0.10, the benchmarking range, which the built-in profile treats as
//! public), `intranet.demo.test` (10.231.250.10, an internal address), and a
//! DNS server (198.18.0.53) that knows both. The sandboxed shell uses that
//! DNS server through its own resolv.conf; sluice resolves for it and decides
//! every connection.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{bail, Context as _};

use crate::step;

const NETNS: &str = "sluice-demo";
const HOST_IF: &str = "sluice-demo0";
const NS_IF: &str = "sluice-demo1";

/// What the sandboxed shell does; each line is echoed before it runs.
const SCRIPT: &str = r#"
run() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; echo "(exit $?)"; sleep 0.3; }
run curl -sS --max-time 5 -w '[HTTP %{http_code}]\n' http://docs.demo.test/
run curl -sS --max-time 5 -w '[HTTP %{http_code}]\n' https://docs.demo.test/
run curl -sS --max-time 5 -w '[HTTP %{http_code}]\n' http://intranet.demo.test/
run curl -sS --max-time 5 http://docs.demo.test:8080/
run python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"quic?", ("198.18.0.10", 443))'
run python3 -c 'import socket; socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)'
"#;

pub fn run() -> anyhow::Result<()> {
    if !Path::new("/usr/sbin/dnsmasq").exists() {
        step("installing dnsmasq-base (the demo's stand-in DNS server)");
        crate::run(Command::new("apt-get").args(["install", "-y", "--no-install-recommends", "dnsmasq-base"]))?;
    }
    let sluice = crate::build_sluice()?;
    let dir = std::env::temp_dir().join("sluice-demo");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www/index.html"), "hello from docs.demo.test, reached through sluice\n")?;
    std::fs::write(dir.join("resolv.conf"), "nameserver 198.18.0.53\noptions timeout:2 attempts:1\n")?;
    std::fs::write(dir.join("demo.sh"), SCRIPT)?;
    make_demo_certificates(&dir)?;

    step("creating the stand-in internet (network namespace sluice-demo)");
    let net = DemoNet::create()?;
    let _servers = DemoNet::start_servers(&dir)?;

    step("running a shell under `sluice run` with the built-in profile");
    eprintln!("  (the profile: `sluice policy default`; every line below marked 'sluice:' is a decision)\n");
    let status = Command::new(&sluice)
        .args(["run", "--as-root", "--name", "demo", "--upstream-dns", "198.18.0.53:53", "--upstream-ca"])
        .arg(dir.join("demo-ca.pem"))
        .arg("--resolv-conf")
        .arg(dir.join("resolv.conf"))
        .arg("--")
        .arg("sh")
        .arg(dir.join("demo.sh"))
        .status()
        .context("running sluice")?;
    eprintln!();
    step(&format!("sluice run finished ({status}); the sandbox, its cgroup and its programs are gone"));
    drop(net);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The demo's HTTPS server: the same page over TLS, with a certificate
/// from the demo's own CA (which sluice is told to trust upstream).
const HTTPS_SERVER: &str = r#"
import functools, http.server, ssl, sys
root, cert, key = sys.argv[1:4]
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)
server = http.server.ThreadingHTTPServer(("0.0.0.0", 443), handler)
context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// A demo CA and a certificate for docs.demo.test signed by it (openssl).
fn make_demo_certificates(dir: &Path) -> anyhow::Result<()> {
    let at = |name: &str| dir.join(name).display().to_string();
    sh(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=sluice demo upstream CA",
        "-keyout",
        &at("demo-ca.key"),
        "-out",
        &at("demo-ca.pem"),
    ])?;
    sh(&[
        "openssl",
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=docs.demo.test",
        "-keyout",
        &at("docs.key"),
        "-out",
        &at("docs.csr"),
    ])?;
    std::fs::write(dir.join("docs.ext"), "subjectAltName=DNS:docs.demo.test\n")?;
    sh(&[
        "openssl",
        "x509",
        "-req",
        "-in",
        &at("docs.csr"),
        "-CA",
        &at("demo-ca.pem"),
        "-CAkey",
        &at("demo-ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &at("docs.ext"),
        "-out",
        &at("docs.pem"),
    ])
}

struct DemoNet;

impl DemoNet {
    fn create() -> anyhow::Result<Self> {
        // A leftover from an interrupted demo.
        let _ = quiet(&["ip", "link", "del", HOST_IF]);
        let _ = quiet(&["ip", "netns", "del", NETNS]);
        let net = Self;
        sh(&["ip", "netns", "add", NETNS])?;
        sh(&["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF])?;
        sh(&["ip", "link", "set", NS_IF, "netns", NETNS])?;
        for addr in ["198.18.0.1/24", "10.231.250.1/24"] {
            sh(&["ip", "addr", "add", addr, "dev", HOST_IF])?;
        }
        sh(&["ip", "link", "set", HOST_IF, "up"])?;
        for addr in ["198.18.0.10/24", "198.18.0.53/24", "10.231.250.10/24"] {
            sh(&["ip", "netns", "exec", NETNS, "ip", "addr", "add", addr, "dev", NS_IF])?;
        }
        sh(&["ip", "netns", "exec", NETNS, "ip", "link", "set", NS_IF, "up"])?;
        sh(&["ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up"])?;
        Ok(net)
    }

    fn start_servers(dir: &Path) -> anyhow::Result<Servers> {
        let web = Command::new("ip")
            .args(["netns", "exec", NETNS, "python3", "-m", "http.server", "80", "--bind", "0.0.0.0", "--directory"])
            .arg(dir.join("www"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let https = Command::new("ip")
            .args(["netns", "exec", NETNS, "python3", "-c", HTTPS_SERVER])
            .arg(dir.join("www"))
            .arg(dir.join("docs.pem"))
            .arg(dir.join("docs.key"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let dns = Command::new("ip")
            .args([
                "netns",
                "exec",
                NETNS,
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=198.18.0.53",
                "--address=/docs.demo.test/198.18.0.10",
                "--address=/intranet.demo.test/10.231.250.10",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let servers = Servers(vec![web, https, dns]);
        std::thread::sleep(std::time::Duration::from_millis(500));
        Ok(servers)
    }
}

impl Drop for DemoNet {
    fn drop(&mut self) {
        let _ = quiet(&["ip", "link", "del", HOST_IF]);
        let _ = quiet(&["ip", "netns", "del", NETNS]);
    }
}

struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(args[0])
        .args(&args[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {args:?}"))?;
    if !status.success() {
        bail!("{args:?} failed (the demo needs root)");
    }
    Ok(())
}

fn quiet(args: &[&str]) -> std::io::Result<std::process::ExitStatus> {
    Command::new(args[0]).args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).status()
}
