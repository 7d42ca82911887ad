//! The one place that decides which name a connection and each of its
//! requests are judged under, and which authority the upstream receives.
//!
//! A name a client claims (TLS server name, Host header, h2 `:authority`,
//! absolute-form request target) is only believed when something ties it
//! to the address the connection really goes to: an answer of sluice's
//! resolver to this sandbox for this address, or the upstream's certificate,
//! verified for that name on that address (intercepted TLS). An unproven
//! name selects no credential and satisfies no host rule: the address alone
//! decides. The Host an upstream receives is always the authority that was
//! checked; a request whose Host disagrees with its target or `:authority`,
//! or that has two Host headers, is refused.

use std::net::IpAddr;

use hyper::{header, http::uri, Request, StatusCode};

use super::{classify::Classified, Refusal};
use crate::{
    audit::HostSource,
    policy::{Decision as PolicyDecision, Verdict as PolicyVerdict},
    sandbox::NameMemory,
};

/// What a decision says when a claimed name decided nothing.
pub const UNRESOLVED: &str = "name not resolved by the sandbox for this address";
/// The rule of a refusal that only a claimed name would have allowed.
pub const UNRESOLVED_RULE: &str = crate::rules::UNRESOLVED_NAME;
/// The rule of a request or connection whose names disagree.
pub const MISMATCH_RULE: &str = crate::rules::HOST_MISMATCH;

/// What ties a name to the connection's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof {
    /// sluice's resolver gave this sandbox this address for the name.
    Resolved,
    /// The TLS server name of a connection sluice intercepts: the upstream's
    /// certificate is verified for it on this address before any request
    /// goes. Holds only if the connection is intercepted, not spliced.
    Certificate,
    /// Nothing but the client's word.
    Claimed,
}

/// The name a connection is judged under.
#[derive(Debug, Clone)]
pub struct Named {
    /// The name the client claimed or the sandbox resolved; `None`: the
    /// address only.
    pub name: Option<String>,
    pub source: HostSource,
    pub proof: Proof,
}

impl Named {
    /// The name host rules and credential bindings may match.
    pub fn believed(&self) -> Option<&str> {
        self.name.as_deref().filter(|_| self.proof != Proof::Claimed)
    }
}

/// Names a connection from its first bytes. A claimed name that contradicts
/// what the sandbox resolved for the address is refused (the reason says
/// so); one the sandbox never resolved for it is kept, unproven.
pub fn name_connection(names: &NameMemory, classified: &Classified, ip: IpAddr) -> Result<Named, String> {
    let claimed = match classified {
        Classified::Tls { sni: Some(name), .. } => Some((name.clone(), HostSource::Sni)),
        Classified::Http { host: Some(name) } if name.parse::<IpAddr>().is_err() => {
            Some((name.clone(), HostSource::Http))
        }
        _ => None,
    };
    let resolved = names.names_for(ip);
    let Some((name, source)) = claimed else {
        return Ok(match resolved.last() {
            Some(name) => Named { name: Some(name.to_string()), source: HostSource::Dns, proof: Proof::Resolved },
            None => Named { name: None, source: HostSource::Ip, proof: Proof::Claimed },
        });
    };
    if resolved.iter().any(|known| known.eq_ignore_ascii_case(&name)) {
        return Ok(Named { name: Some(name), source, proof: Proof::Resolved });
    }
    if !resolved.is_empty() {
        return Err(contradiction(&name, ip, &resolved));
    }
    let proof = if source == HostSource::Sni { Proof::Certificate } else { Proof::Claimed };
    Ok(Named { name: Some(name), source, proof })
}

/// Whether a request's host is tied to the connection's address: `Some`
/// (the name rules may match), `None` (an address, or a name nothing ties
/// to it), or the refusal of a name that contradicts the connection's.
pub fn believe_request_host(
    names: &NameMemory,
    sni: Option<&str>,
    host: &str,
    ip: IpAddr,
) -> Result<Option<String>, Refusal> {
    if let Some(sni) = sni {
        // The upstream's certificate was verified for the server name.
        if !host.eq_ignore_ascii_case(sni) {
            return Err(Refusal::new(
                StatusCode::MISDIRECTED_REQUEST,
                MISMATCH_RULE,
                format!("the request names {host:?} but the TLS handshake named {sni:?}"),
            ));
        }
        return Ok(Some(host.to_owned()));
    }
    if host.parse::<IpAddr>().is_ok() {
        return Ok(None);
    }
    let resolved = names.names_for(ip);
    if resolved.iter().any(|known| known.eq_ignore_ascii_case(host)) {
        return Ok(Some(host.to_owned()));
    }
    if resolved.is_empty() {
        return Ok(None);
    }
    Err(Refusal::new(StatusCode::MISDIRECTED_REQUEST, MISMATCH_RULE, contradiction(host, ip, &resolved)))
}

fn contradiction(name: &str, ip: IpAddr, resolved: &[std::sync::Arc<str>]) -> String {
    format!(
        "the client named {name:?} but the sandbox resolved {ip} for {}",
        resolved.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
    )
}

/// Decides with `evaluate` (the policy, given the name to match) when the
/// client claimed `claimed` and `believed` says whether anything ties it to
/// `ip`. An unproven name decides nothing: the address alone is evaluated
/// (the reason names the claim), and a denial that only the claimed name
/// would have lifted is the rule [`UNRESOLVED_RULE`].
pub fn decide(
    claimed: Option<&str>,
    believed: bool,
    ip: IpAddr,
    evaluate: impl Fn(Option<&str>) -> PolicyDecision,
) -> PolicyDecision {
    let Some(name) = claimed.filter(|_| !believed) else {
        return evaluate(claimed);
    };
    let by_address = evaluate(None);
    let unproven = format!("the client named {name:?} for {ip}, a {UNRESOLVED}, and no verified certificate proves it");
    if by_address.verdict == PolicyVerdict::Allow || evaluate(Some(name)).verdict == PolicyVerdict::Deny {
        let reason = format!("{}; {unproven}", by_address.reason);
        return PolicyDecision { reason: reason.into(), ..by_address };
    }
    PolicyDecision {
        verdict: PolicyVerdict::Deny,
        rule: UNRESOLVED_RULE.into(),
        reason: format!("{unproven}: a rule for that name does not apply").into(),
        passthrough: false,
        would_deny: false,
        bundle: None,
        max_body: None,
    }
}

/// The authority a request names, as checked and as the upstream gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority {
    /// Lower case, without port, brackets or a trailing dot.
    pub host: String,
    /// `host[:port]` for the Host header or `:authority` sent upstream.
    pub value: String,
}

/// The request's authority: its target's (absolute form, h2 `:authority`)
/// or its single Host header. When both are present they must name the
/// same host; two Host headers are refused.
pub fn request_authority<B>(request: &Request<B>) -> Result<Authority, Refusal> {
    let refuse = |reason: String| Refusal::new(StatusCode::BAD_REQUEST, MISMATCH_RULE, reason);
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err(refuse("the request has more than one Host header".into()));
    }
    let host_header = match host_header {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|v| v.parse::<uri::Authority>().ok())
                .ok_or_else(|| refuse("the Host header is not a valid host".into()))?,
        ),
    };
    let target = request.uri().authority();
    let target_kind = if request.version() == hyper::Version::HTTP_2 { ":authority" } else { "request target" };
    let chosen = match (target, &host_header) {
        (Some(target), Some(host)) => {
            let (a, b) = (normalise(target.host()), normalise(host.host()));
            let ports_differ = matches!((target.port_u16(), host.port_u16()), (Some(x), Some(y)) if x != y);
            if a != b || ports_differ {
                return Err(refuse(format!(
                    "the {target_kind} names {:?} but the Host header names {:?}",
                    target.as_str(),
                    host.as_str()
                )));
            }
            target
        }
        (Some(target), None) => target,
        (None, Some(host)) => host,
        (None, None) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                crate::rules::NO_HOST,
                "the request names no host (no Host header or authority)",
            ))
        }
    };
    let host = normalise(chosen.host());
    if host.is_empty() {
        return Err(refuse("the request names an empty host".into()));
    }
    // Rebuilt from its parts: no user information goes upstream.
    let bare = chosen.host().trim_end_matches('.');
    let value = match chosen.port_u16() {
        Some(port) => format!("{bare}:{port}"),
        None => bare.to_owned(),
    };
    Ok(Authority { host, value })
}

fn normalise(host: &str) -> String {
    host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;

    fn request(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut builder = Request::builder().uri(uri);
        for host in hosts {
            builder = builder.header("host", *host);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn the_authority_is_the_target_or_the_one_host_header() {
        let got = request_authority(&request("https://API.Example.test:8443/x", &[])).unwrap();
        assert_eq!(got, Authority { host: "api.example.test".into(), value: "API.Example.test:8443".into() });
        let got = request_authority(&request("/x", &["[fd00::1]:80"])).unwrap();
        assert_eq!(got.host, "fd00::1");
        assert_eq!(got.value, "[fd00::1]:80");
        let got = request_authority(&request("https://api.test/x", &["API.test."])).unwrap();
        assert_eq!(got.host, "api.test");
        let got = request_authority(&request("http://user@api.test/x", &[])).unwrap();
        assert_eq!(got.value, "api.test", "no user information upstream");
        assert_eq!(request_authority(&request("/x", &[])).unwrap_err().rule, "no-host");
    }

    #[test]
    fn disagreeing_and_duplicate_hosts_are_refused() {
        for (uri, hosts) in [
            ("https://api.test/x", &["evil.test"][..]),
            ("https://api.test:443/x", &["api.test:8443"][..]),
            ("/x", &["api.test", "evil.test"][..]),
            ("/x", &["api.test", "api.test"][..]),
            ("/x", &["api.test/../evil"][..]),
        ] {
            let refusal = request_authority(&request(uri, hosts)).unwrap_err();
            assert_eq!(
                (refusal.status, refusal.rule.as_str()),
                (StatusCode::BAD_REQUEST, MISMATCH_RULE),
                "{uri} {hosts:?}"
            );
        }
    }

    #[test]
    fn a_claimed_name_is_believed_only_when_resolved_or_proven() {
        let memory = NameMemory::default();
        let ip: IpAddr = "198.18.0.10".parse().unwrap();
        let http = |host: &str| Classified::Http { host: Some(host.into()) };
        let tls = |sni: &str| Classified::Tls { sni: Some(sni.into()), alpn: Vec::new() };

        let named = name_connection(&memory, &http("allowed.test"), ip).unwrap();
        assert_eq!((named.proof, named.believed()), (Proof::Claimed, None));
        let named = name_connection(&memory, &tls("allowed.test"), ip).unwrap();
        assert_eq!((named.proof, named.believed()), (Proof::Certificate, Some("allowed.test")));
        assert_eq!(believe_request_host(&memory, None, "allowed.test", ip).unwrap(), None);

        memory.remember("allowed.test", ip, Duration::from_mins(1));
        let named = name_connection(&memory, &http("Allowed.test"), ip).unwrap();
        assert_eq!(named.proof, Proof::Resolved);
        assert!(name_connection(&memory, &http("other.test"), ip).unwrap_err().contains("allowed.test"));
        assert_eq!(believe_request_host(&memory, None, "allowed.test", ip).unwrap().as_deref(), Some("allowed.test"));
        assert_eq!(believe_request_host(&memory, None, "other.test", ip).unwrap_err().rule, MISMATCH_RULE);
        assert_eq!(
            believe_request_host(&memory, Some("a.test"), "b.test", ip).unwrap_err().status,
            StatusCode::MISDIRECTED_REQUEST
        );
        let named = name_connection(&memory, &Classified::Opaque, ip).unwrap();
        assert_eq!((named.source, named.believed()), (HostSource::Dns, Some("allowed.test")));
    }

    fn verdict(verdict: PolicyVerdict, rule: &str) -> PolicyDecision {
        PolicyDecision {
            verdict,
            rule: Arc::from(rule),
            reason: Arc::from(format!("by {rule}")),
            passthrough: false,
            would_deny: false,
            bundle: None,
            max_body: None,
        }
    }

    #[test]
    fn an_unproven_name_decides_nothing() {
        let ip: IpAddr = "198.18.0.10".parse().unwrap();
        let by_name = |host: Option<&str>| match host {
            Some("allowed.test") => verdict(PolicyVerdict::Allow, "named"),
            _ => verdict(PolicyVerdict::Deny, "default-deny"),
        };
        assert_eq!(&*decide(Some("allowed.test"), true, ip, by_name).rule, "named");
        let refused = decide(Some("allowed.test"), false, ip, by_name);
        assert_eq!((refused.verdict, &*refused.rule), (PolicyVerdict::Deny, UNRESOLVED_RULE));
        assert!(refused.reason.contains(UNRESOLVED), "{}", refused.reason);
        let other = decide(Some("other.test"), false, ip, by_name);
        assert_eq!(&*other.rule, "default-deny");
        assert!(other.reason.contains(UNRESOLVED));
        let by_address = |_: Option<&str>| verdict(PolicyVerdict::Allow, "by-address");
        let allowed = decide(Some("allowed.test"), false, ip, by_address);
        assert_eq!(&*allowed.rule, "by-address");
        assert!(allowed.reason.contains("allowed.test"), "the record keeps the claim: {}", allowed.reason);
    }
}
