//! The sandboxes' DNS resolver.
//!
//! Kernel hooks redirect every DNS query a sandboxed process sends (UDP or
//! TCP port 53) to a listener this module owns. Each sandbox gets its own
//! listener pair (one UDP socket, one TCP listener, same loopback port), so
//! the listener a query arrives on says which sandbox sent it; nothing in
//! the packet is trusted for that.
//!
//! Every query goes through the same phases, in this order (the
//! `pingora` habit: named phases, one place each):
//!
//! 1. **parse**: the header, then the whole message. No id, or a message
//!    that is itself a response: no reply at all. Unreadable: `FORMERR`.
//! 2. **budget**: the sandbox's token bucket for all queries.
//! 3. **size**: UDP queries over 512 bytes without EDNS, or over
//!    [`Limits::max_query_bytes`] with it (TCP frames are bounded on read).
//! 4. **form**: opcode `QUERY` only (`NOTIMP`), exactly one question and
//!    nothing else but an OPT record (`FORMERR`), so no bytes ride along
//!    to upstream unjudged.
//! 5. **type**: class `IN`; ordinary lookup types pass; `NULL`, `ANY`, zone
//!    transfers and the rest are refused.
//! 6. **shape**: names that look like DNS tunnelling (long labels, long
//!    names, non-hostname bytes, labels that look like encoded data, and
//!    the same for the short labels left of a name's last two, read
//!    together, so data split into many short labels is caught too); the
//!    sandbox's budget of name bytes per minute
//!    ([`Limits::name_bytes_per_minute`]); then the sandbox's separate,
//!    smaller budget for `TXT`.
//! 7. **policy**: [`DnsPolicy::check_name`]; a deny never reaches upstream.
//! 8. **forward**: the original query bytes go to [`Upstream`], the reply
//!    comes back unchanged, and its A/AAAA answers go to
//!    [`DnsPolicy::record_answers`] so later connects can be attributed.
//!    The one change: a reply bigger than a UDP client can take is replaced
//!    by a truncated one (TC), and the client asks again over TCP.
//!
//! Refusals in phases 2, 3, 5 and 6 are answered `REFUSED`; policy denies
//! with [`Limits::deny_rcode`].
//! Every refusal in phases 1–7 is reported to [`DnsPolicy::record_refusal`].

mod bucket;
mod server;
mod shape;
mod upstream;
mod wire;

#[cfg(test)]
mod tests;

use std::{fmt, io, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

pub use self::{server::SandboxResolver, upstream::Upstream};

/// What the daemon tells the resolver about a name for one sandbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameVerdict {
    /// Forward the query.
    Allow,
    /// Answer it without asking upstream; `rule` and `reason` go to the audit log.
    Deny { rule: Arc<str>, reason: Arc<str> },
}

/// How the daemon judges names and learns about answers.
///
/// The methods are called on the resolver's tasks, so they must be quick and
/// must not block (no file or network I/O; hand work to a channel instead).
pub trait DnsPolicy: Send + Sync + 'static {
    /// `sandbox`: opaque id the daemon gave when starting the listeners.
    /// `name`: lowercased, no trailing dot; the root is `""`.
    fn check_name(&self, sandbox: u64, name: &str) -> NameVerdict;

    /// Called with the A/AAAA answers of an allowed query (name lowercased,
    /// no trailing dot), so later connects to those IPs can be attributed to
    /// the name. Addresses reached through a CNAME chain are attributed to
    /// the queried name; each TTL is the smallest along the chain.
    fn record_answers(&self, sandbox: u64, name: &str, answers: &[(std::net::IpAddr, Duration)]);

    /// Called for every refused or denied query (for the audit log).
    /// `name` and `qtype` are `""` when the query was too broken to read
    /// them; names with odd bytes carry them as `\DDD` escapes. A sandbox
    /// can make this happen at its full packet rate (a flood of refused
    /// queries), so aggregate rather than write one line each.
    fn record_refusal(&self, sandbox: u64, name: &str, qtype: &str, why: &Refusal);
}

/// Why a query was not forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The daemon's policy denied the name.
    PolicyDeny { rule: Arc<str>, reason: Arc<str> },
    /// Not a well-formed query with exactly one question (answered `FORMERR`).
    Malformed { detail: &'static str },
    /// A UDP query larger than a stub resolver ever needs to send.
    QueryTooLarge { len: usize, max: usize },
    /// A label longer than [`Limits::max_label_len`]: tunnelling-shaped.
    LabelTooLong { len: usize, max: usize },
    /// A name longer than [`Limits::max_name_len`]: tunnelling-shaped.
    NameTooLong { len: usize, max: usize },
    /// A label holds bytes other than letters, digits, `-` and `_`; host
    /// names never do, binary tunnels do.
    NotAHostname,
    /// A label that looks like encoded data (see [`Limits::encoded_label_min_len`]).
    EncodedLabel { label: String },
    /// The sandbox used up a query budget.
    RateLimited { budget: Budget },
    /// A query type sandboxes may not ask for (`NULL`, `ANY`, `AXFR`, …).
    QueryTypeRefused { qtype: String },
    /// A class other than `IN`.
    QueryClassRefused { class: String },
    /// An opcode other than `QUERY` (answered `NOTIMP`).
    OpcodeRefused { opcode: String },
}

/// Which per-sandbox budget ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    /// [`Limits::all_queries`]
    AllQueries,
    /// [`Limits::txt_queries`]
    Txt,
    /// [`Limits::name_bytes_per_minute`]
    NameBytes { per_minute: u32 },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::PolicyDeny { rule, reason } => {
                write!(f, "denied by policy rule {rule}: {reason}")
            }
            Self::Malformed { detail } => write!(f, "malformed query: {detail}"),
            Self::QueryTooLarge { len, max } => {
                write!(f, "query too large: {len} bytes, limit {max}")
            }
            Self::LabelTooLong { len, max } => {
                write!(f, "name too long (tunnelling-shaped): a label of {len} bytes, limit {max}")
            }
            Self::NameTooLong { len, max } => write!(f, "name too long (tunnelling-shaped): {len} bytes, limit {max}"),
            Self::NotAHostname => f.write_str("tunnelling-shaped name: bytes other than letters, digits, '-' and '_'"),
            Self::EncodedLabel { label } => {
                write!(f, "tunnelling-shaped name: label {label:?} looks like encoded data")
            }
            Self::RateLimited { budget: Budget::AllQueries } => f.write_str("rate limited: too many queries"),
            Self::RateLimited { budget: Budget::Txt } => f.write_str("rate limited: too many TXT queries"),
            Self::RateLimited { budget: Budget::NameBytes { per_minute } } => write!(
                f,
                "rate limited (tunnelling-shaped volume): the sandbox's names passed {per_minute} bytes in a minute"
            ),
            Self::QueryTypeRefused { qtype } => write!(f, "query type {qtype} refused"),
            Self::QueryClassRefused { class } => write!(f, "query class {class} refused"),
            Self::OpcodeRefused { opcode } => write!(f, "opcode {opcode} not supported"),
        }
    }
}

/// The response code a policy deny gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DenyRcode {
    /// The name "does not exist": clients fail fast and do not retry.
    #[default]
    NxDomain,
    /// The resolver "refuses": some clients then try the next nameserver.
    Refused,
}

/// A token bucket: `per_second` tokens refill, at most `burst` saved up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens added per second.
    pub per_second: u32,
    /// Most tokens held; a new bucket starts full.
    pub burst: u32,
}

/// Per-sandbox limits. The defaults are meant for a development sandbox
/// (package managers, git, HTTP clients): generous for real lookups, tight
/// for anything that moves data through names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest label allowed. Default 40: real host labels are short, while
    /// tunnels (iodine, dnscat2, dns2tcp) fill labels toward the 63 maximum.
    pub max_label_len: usize,
    /// Longest name allowed, in presentation form without the trailing dot.
    /// Default 180, well under the 253 maximum tunnels use; the longest
    /// ordinary names (IPv6 PTR, 73 bytes) fit easily.
    pub max_name_len: usize,
    /// Labels at least this long are checked for looking like encoded data
    /// (see `shape::looks_encoded`). Default 24. `usize::MAX` turns the check off.
    pub encoded_label_min_len: usize,
    /// Largest UDP query accepted when it carries EDNS. Default 1232 (the
    /// DNS Flag Day 2020 buffer size); without EDNS the RFC 1035 limit of
    /// 512 applies.
    pub max_query_bytes: usize,
    /// Largest TCP message accepted; a larger one closes the connection.
    /// Default 4096: a query is a few hundred bytes at most.
    pub max_tcp_message_bytes: usize,
    /// Budget for all queries of the sandbox. Default 200/s, burst 400:
    /// a parallel `npm install` stays well inside it.
    pub all_queries: RateLimit,
    /// Budget for TXT queries. Default 10/s, burst 20: TXT carries the most
    /// payload per answer and is the favourite of tunnels.
    pub txt_queries: RateLimit,
    /// Budget for the bytes of query names a sandbox sends per minute,
    /// whatever their type and shape. Default 65536 (64 KiB): thousands of
    /// ordinary lookups a minute, while a tunnel that fills its names is
    /// held to about 1 KiB/s of payload. Refused queries count too: a
    /// tunnel probing the shape check still spends its volume.
    pub name_bytes_per_minute: u32,
    /// How a policy deny is answered. Default `NXDOMAIN`.
    pub deny_rcode: DenyRcode,
    /// UDP queries being forwarded at once; more are answered `SERVFAIL`.
    /// Default 64.
    pub max_udp_in_flight: usize,
    /// Open TCP connections at once; more are closed on accept. Default 16.
    pub max_tcp_connections: usize,
    /// A TCP connection with no complete query for this long is closed; the
    /// same bound applies to writing a reply. Default 10 s.
    pub tcp_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_label_len: 40,
            max_name_len: 180,
            encoded_label_min_len: 24,
            max_query_bytes: 1232,
            max_tcp_message_bytes: 4096,
            all_queries: RateLimit { per_second: 200, burst: 400 },
            txt_queries: RateLimit { per_second: 10, burst: 20 },
            name_bytes_per_minute: 64 * 1024,
            deny_rcode: DenyRcode::NxDomain,
            max_udp_in_flight: 64,
            max_tcp_connections: 16,
            tcp_idle_timeout: Duration::from_secs(10),
        }
    }
}

/// Errors of the resolver and of its upstream exchanges.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("binding the resolver on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no usable nameserver line in {path}")]
    NoNameservers { path: PathBuf },
    #[error("no upstream nameservers configured")]
    NoUpstreams,
    #[error("the query to forward is not a DNS query: {source}")]
    BadQuery {
        #[source]
        source: hickory_proto::ProtoError,
    },
    #[error("upstream {server} did not answer within {timeout:?}")]
    UpstreamTimeout { server: SocketAddr, timeout: Duration },
    #[error("upstream {server}: {source}")]
    UpstreamIo {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("upstream {server} replied with a different id or question")]
    UpstreamMismatch { server: SocketAddr },
    #[error("all {tried} upstream nameservers failed; last: {last}")]
    UpstreamsFailed { tried: usize, last: Box<DnsError> },
}

/// Entry points for the fuzz targets in `fuzz/` and the corpus replayed by
/// the unit tests: the resolver's parse, form and shape phases on
/// arbitrary bytes, without sockets. Not an API.
#[doc(hidden)]
pub mod fuzzing {
    use super::{shape, wire, Limits, Refusal};

    /// Parses `bytes` as a query the way the resolver does and judges its
    /// name's shape. `None`: not a query the resolver would read.
    pub fn judge_query(bytes: &[u8]) -> Option<Result<String, Refusal>> {
        let header = wire::read_header(bytes)?;
        if !wire::counts_fit(&header, bytes.len()) {
            return None;
        }
        let message = wire::parse_exact(bytes).ok()?;
        let view = wire::RequestView::from_message(&message);
        let _ = wire::synthesize(&view, hickory_proto::op::ResponseCode::Refused, false);
        let question = message.queries().first()?;
        let canonical = shape::canonical_name(question.name());
        let _ = shape::qtype_name(question.query_type());
        Some(shape::check_shape(question.name(), &canonical, &Limits::default()).map(|()| canonical.text))
    }
}
