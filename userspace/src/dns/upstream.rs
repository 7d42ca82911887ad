//! The nameservers sluice forwards allowed queries to.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use tokio::{
    net::{TcpStream, UdpSocket},
    time::{timeout, timeout_at, Instant},
};
use tracing::debug;

use super::{
    wire::{self, ExpectedReply},
    DnsError,
};

/// Per-server timeout when resolv.conf does not set one (glibc's default
/// is 5 s; sandboxed clients usually give up sooner, so answer sooner).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest reply accepted over UDP: a full datagram, so a large EDNS answer
/// is never cut short by our own buffer.
const MAX_UDP_REPLY: usize = 65_535;

/// Upstream nameservers, tried in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    servers: Vec<SocketAddr>,
    timeout: Duration,
}

impl Upstream {
    /// `timeout` bounds each attempt (UDP, then TCP if truncated) on each server.
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self { servers, timeout }
    }

    /// Reads `nameserver` lines (port 53) and `options timeout:N` from a
    /// resolv.conf. Scoped IPv6 addresses (`fe80::1%eth0`) are skipped: the
    /// daemon's sockets cannot tell which interface was meant.
    pub fn from_resolv_conf(path: &Path) -> Result<Self, DnsError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| DnsError::ResolvConf { path: path.to_owned(), source })?;
        let mut servers = Vec::new();
        let mut timeout = DEFAULT_TIMEOUT;
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or_default();
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => match words.next().map(str::parse::<IpAddr>) {
                    Some(Ok(ip)) => servers.push(SocketAddr::new(ip, 53)),
                    Some(Err(_)) | None => {
                        debug!(path = %path.display(), line, "skipping unusable nameserver line");
                    }
                },
                Some("options") => {
                    // glibc caps the timeout at 30 s.
                    if let Some(secs) = words
                        .filter_map(|option| option.strip_prefix("timeout:"))
                        .filter_map(|secs| secs.parse::<u64>().ok())
                        .next_back()
                    {
                        timeout = Duration::from_secs(secs.clamp(1, 30));
                    }
                }
                _ => {}
            }
        }
        if servers.is_empty() {
            return Err(DnsError::NoNameservers { path: path.to_owned() });
        }
        Ok(Self { servers, timeout })
    }

    /// The servers, in the order they are tried.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The bound on each attempt.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends `query` as is and returns the reply as is. Tries the servers in
    /// order; on each, UDP first and TCP when the UDP reply is truncated.
    /// Replies whose id or question differ from the query's are not taken.
    pub async fn exchange(&self, query: &[u8]) -> Result<Vec<u8>, DnsError> {
        let expected = ExpectedReply::from_query(query).map_err(|source| DnsError::BadQuery { source })?;
        let mut last = DnsError::NoUpstreams;
        for &server in &self.servers {
            match self.exchange_with(server, query, &expected).await {
                Ok(reply) => return Ok(reply),
                Err(error) => {
                    debug!(%server, %error, id = expected.id(), "upstream attempt failed");
                    last = error;
                }
            }
        }
        if self.servers.is_empty() {
            return Err(last);
        }
        Err(DnsError::UpstreamsFailed { tried: self.servers.len(), last: Box::new(last) })
    }

    async fn exchange_with(
        &self,
        server: SocketAddr,
        query: &[u8],
        expected: &ExpectedReply,
    ) -> Result<Vec<u8>, DnsError> {
        let reply = self.exchange_udp(server, query, expected).await?;
        // The TC bit is in the third byte; a matching reply has a header.
        let truncated = wire::read_header(&reply).is_some_and(|header| header.truncated());
        if !truncated {
            return Ok(reply);
        }
        debug!(%server, id = expected.id(), "truncated over UDP, retrying over TCP");
        self.exchange_tcp(server, query, expected).await
    }

    async fn exchange_udp(
        &self,
        server: SocketAddr,
        query: &[u8],
        expected: &ExpectedReply,
    ) -> Result<Vec<u8>, DnsError> {
        let io_error = |source| DnsError::UpstreamIo { server, source };
        let local: SocketAddr = match server {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local).await.map_err(io_error)?;
        // Connected, so the kernel drops datagrams from any other source.
        socket.connect(server).await.map_err(io_error)?;
        socket.send(query).await.map_err(io_error)?;

        let deadline = Instant::now() + self.timeout;
        let mut buf = vec![0_u8; MAX_UDP_REPLY];
        loop {
            let len = timeout_at(deadline, socket.recv(&mut buf))
                .await
                .map_err(|_| DnsError::UpstreamTimeout { server, timeout: self.timeout })?
                .map_err(io_error)?;
            let reply = &buf[..len];
            // A late reply to an earlier query on a reused port, or a forgery:
            // keep waiting for the real one.
            if expected.matches(reply) {
                return Ok(reply.to_vec());
            }
            debug!(%server, id = expected.id(), len, "ignoring UDP reply that does not match the query");
        }
    }

    async fn exchange_tcp(
        &self,
        server: SocketAddr,
        query: &[u8],
        expected: &ExpectedReply,
    ) -> Result<Vec<u8>, DnsError> {
        let io_error = |source| DnsError::UpstreamIo { server, source };
        let attempt = async {
            let mut stream = TcpStream::connect(server).await.map_err(io_error)?;
            wire::write_frame(&mut stream, query).await.map_err(io_error)?;
            let reply = wire::read_frame(&mut stream, usize::from(u16::MAX)).await.map_err(|_| {
                io_error(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed before a whole reply",
                ))
            })?;
            if expected.matches(&reply) {
                Ok(reply)
            } else {
                Err(DnsError::UpstreamMismatch { server })
            }
        };
        timeout(self.timeout, attempt).await.map_err(|_| DnsError::UpstreamTimeout { server, timeout: self.timeout })?
    }
}
