//! Answers "what would this sandbox's policy do with this request, and
//! why": for `sluice policy explain` (against a running sandbox), `sluice
//! policy test` (cases in a file, for CI) and `sluice policy replay`
//! (recorded decisions against another profile).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use serde::{Deserialize, Serialize};

use super::{Action, ConnectQuery, Policy, RequestInfo, Scheme, Verdict};

/// The address assumed when none is known: documentation space, which the
/// address classes count as public.
pub const ASSUMED_IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Explanation {
    pub profile: String,
    pub method: String,
    pub url: String,
    pub host: Option<String>,
    pub ip: IpAddr,
    /// No address was known, so [`ASSUMED_IP`] stood in.
    pub ip_assumed: bool,
    pub port: u16,
    /// allow, ask or deny (what is enforced; a dry-run profile says allow
    /// and sets `would_deny`).
    pub verdict: String,
    pub would_deny: bool,
    pub rule: String,
    pub bundle: Option<String>,
    pub reason: String,
    /// Every rule that matched, in order, as `action rule`.
    pub matched: Vec<String>,
}

/// Explains `method url` under `policy`.
pub fn explain_url(
    policy: &Policy,
    method: &str,
    url: &str,
    ip: Option<IpAddr>,
    headers: &BTreeMap<String, String>,
    body_size: Option<u64>,
) -> Result<Explanation, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let scheme = match uri.scheme_str() {
        Some("https") => Scheme::Https,
        Some("http") => Scheme::Http,
        _ => return Err(format!("{url:?} must start with http:// or https://")),
    };
    let host = uri.host().ok_or_else(|| format!("{url:?} names no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let literal = host.parse::<IpAddr>().ok();
    let port = uri.port_u16().unwrap_or(if scheme == Scheme::Https { 443 } else { 80 });
    let (ip, ip_assumed) = match ip.or(literal) {
        Some(ip) => (ip, false),
        None => (ASSUMED_IP, true),
    };
    let mut header_map = hyper::HeaderMap::new();
    for (name, value) in headers {
        let name = hyper::header::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("{name:?} is not a header name"))?;
        let value = hyper::header::HeaderValue::from_str(value).map_err(|_| format!("bad value for header {name}"))?;
        header_map.append(name, value);
    }
    let method = method.to_ascii_uppercase();
    let query = ConnectQuery { host: literal.is_none().then_some(host.as_str()), ip, port };
    let request = RequestInfo {
        method: &method,
        path: uri.path(),
        scheme,
        headers: Some(&header_map),
        body_len: body_size.or(Some(0)),
    };
    let decision = policy.evaluate_request(&query, &request);
    let matched = policy
        .matching_rules(&query, Some(&request))
        .into_iter()
        .map(|(name, action, _): (Arc<str>, Action, _)| format!("{action} {name}"))
        .collect();
    Ok(Explanation {
        profile: policy.name().to_owned(),
        method,
        url: url.to_owned(),
        host: literal.is_none().then_some(host),
        ip,
        ip_assumed,
        port,
        verdict: decision.verdict.as_str().to_owned(),
        would_deny: decision.would_deny,
        rule: decision.rule.to_string(),
        bundle: decision.bundle.as_deref().map(str::to_owned),
        reason: decision.reason.to_string(),
        matched,
    })
}

impl Explanation {
    /// The enforced outcome, with a dry run's would-be denial counted as one.
    pub fn effective(&self) -> &str {
        if self.would_deny {
            "deny"
        } else {
            &self.verdict
        }
    }
}

impl std::fmt::Display for Explanation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = match (self.verdict.as_str(), self.would_deny) {
            (_, true) => "ALLOW (dry run; enforcing, this would be DENY)".to_owned(),
            (v, false) => v.to_ascii_uppercase(),
        };
        writeln!(f, "{} {} -> {verdict}", self.method, self.url)?;
        match &self.bundle {
            Some(bundle) => writeln!(f, "  rule:    {} (bundle {bundle})", self.rule)?,
            None => writeln!(f, "  rule:    {}", self.rule)?,
        }
        writeln!(f, "  reason:  {}", self.reason)?;
        writeln!(f, "  profile: {}", self.profile)?;
        let assumed = if self.ip_assumed { " (assumed: no address known; pass --ip)" } else { "" };
        writeln!(f, "  address: {}:{}{assumed}", self.ip, self.port)?;
        if self.matched.is_empty() {
            writeln!(f, "  matched: no rule (deny by default)")?;
        } else {
            writeln!(f, "  matched: {}", self.matched.join(", "))?;
            writeln!(
                f,
                "           (deny wins over allow, allow over ask; the first of each kind names the decision)"
            )?;
        }
        Ok(())
    }
}

/// `verdict` as a test case or a log record writes it.
pub fn parse_verdict(text: &str) -> Option<Verdict> {
    match text.to_ascii_lowercase().as_str() {
        "allow" => Some(Verdict::Allow),
        "ask" => Some(Verdict::Ask),
        "deny" => Some(Verdict::Deny),
        _ => None,
    }
}
