//! The compiled policy: indexes built once from a [`Profile`] so a decision
//! looks at the rules a host name could select rather than every rule.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use ipnet::IpNet;

use super::error::{Location, PolicyError, RuleRef};
use super::model::{Action, HostPatternKind, IpPattern, PortRange, Profile, TlsMode, DEFAULT_DENY, MAX_NAME_LEN};

/// One connection attempt as the proxy sees it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectQuery<'a> {
    /// The name the sandbox asked for (from sluice's resolver, SNI or Host),
    /// if known. An IP literal here counts as no name.
    pub host: Option<&'a str>,
    /// The real destination; IPv4-mapped IPv6 is treated as IPv4.
    pub ip: IpAddr,
    pub port: u16,
}

/// One HTTP request on an inspected connection.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo<'a> {
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

#[derive(Debug, Clone)]
pub struct Decision {
    pub verdict: Verdict,
    /// The deciding rule's name, or `default-deny`.
    pub rule: Arc<str>,
    /// The rule's reason text, or a generated one.
    pub reason: Arc<str>,
    /// An allowed TLS connection is spliced, not intercepted.
    pub passthrough: bool,
    /// Dry-run profile: this allow is a denial that was not enforced.
    pub would_deny: bool,
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    fn default_deny(reason: String) -> Self {
        Self {
            verdict: Verdict::Deny,
            rule: Arc::from(DEFAULT_DENY),
            reason: Arc::from(reason),
            passthrough: false,
            would_deny: false,
        }
    }
}

/// A compiled profile. Cloning is a reference-count bump.
#[derive(Clone)]
pub struct Policy {
    inner: Arc<Compiled>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("name", &self.inner.name)
            .field("rules", &self.inner.rules.len())
            .finish_non_exhaustive()
    }
}

struct Compiled {
    name: String,
    dry_run: bool,
    credentials: Vec<super::model::CredentialSpec>,
    /// In file order; indexes below refer to positions here.
    rules: Vec<CompiledRule>,
    hosts: HostIndex,
}

struct CompiledRule {
    action: Action,
    /// Ready-made for decisions so evaluation does not allocate.
    name: Arc<str>,
    reason: Arc<str>,
    ips: Option<IpSet>,
    ports: Option<RangeSet<u16>>,
    /// Upper case.
    methods: Option<Vec<Box<str>>>,
    paths: Option<GlobSet>,
    passthrough: bool,
}

impl CompiledRule {
    /// The non-host conditions; the host condition is decided by [`HostIndex`].
    fn matches_addr(&self, ip: IpAddr, port: u16) -> bool {
        self.ips.as_ref().is_none_or(|set| set.contains(ip)) && self.ports.as_ref().is_none_or(|set| set.contains(port))
    }

    /// The request conditions. Before a request is known (`request` None),
    /// a rule with request conditions can only allow a connection whose
    /// requests will each be checked (`inspected`), and denies none: the
    /// requests themselves decide.
    fn matches_request(&self, request: Option<&RequestInfo<'_>>, inspected: bool) -> bool {
        if self.methods.is_none() && self.paths.is_none() {
            return true;
        }
        let Some(request) = request else {
            return inspected && self.action == Action::Allow;
        };
        self.methods.as_ref().is_none_or(|methods| methods.iter().any(|m| m.eq_ignore_ascii_case(request.method)))
            && self.paths.as_ref().is_none_or(|paths| paths.is_match(request.path))
    }

    fn decision(&self) -> Decision {
        Decision {
            verdict: match self.action {
                Action::Allow => Verdict::Allow,
                Action::Deny => Verdict::Deny,
            },
            rule: Arc::clone(&self.name),
            reason: Arc::clone(&self.reason),
            passthrough: self.passthrough,
            would_deny: false,
        }
    }
}

impl Policy {
    /// Validates `profile` (as the parser does) and builds its matchers.
    pub fn compile(profile: &Profile) -> Result<Policy, PolicyError> {
        Self::compile_located(profile, &format!("profile {:?}", profile.name), &|_| None)
    }

    /// `compile` with errors that name the file the profile came from and
    /// where each rule starts in it.
    pub(crate) fn compile_located(
        profile: &Profile,
        origin: &str,
        locate_rule: &dyn Fn(usize) -> Option<Location>,
    ) -> Result<Policy, PolicyError> {
        profile.check().map_err(|problem| PolicyError::from_problem(origin, locate_rule, problem))?;

        let mut rules = Vec::with_capacity(profile.rules.len());
        let mut hosts = HostIndexBuilder::new();
        for (index, spec) in profile.rules.iter().enumerate() {
            let name = spec.effective_name(index);
            let reason = match &spec.reason {
                Some(reason) => reason.clone(),
                None => match spec.action {
                    Action::Allow => format!("allowed by rule {name}"),
                    Action::Deny => format!("denied by rule {name}"),
                },
            };
            match &spec.hosts {
                None => hosts.unconditional.push(index),
                Some(patterns) => {
                    for pattern in patterns {
                        hosts.add(pattern.kind(), index).map_err(|message| PolicyError::Rule {
                            origin: origin.to_owned(),
                            location: locate_rule(index),
                            rule: RuleRef { index: index + 1, name: name.clone() },
                            message,
                        })?;
                    }
                }
            }
            let rule_error = |message: String| PolicyError::Rule {
                origin: origin.to_owned(),
                location: locate_rule(index),
                rule: RuleRef { index: index + 1, name: name.clone() },
                message,
            };
            let paths = match &spec.paths {
                None => None,
                Some(globs) => {
                    let mut set = GlobSetBuilder::new();
                    for glob in globs {
                        let glob = GlobBuilder::new(glob)
                            .literal_separator(true)
                            .build()
                            .map_err(|e| rule_error(format!("path {glob:?} is not a valid glob: {e}")))?;
                        set.add(glob);
                    }
                    Some(set.build().map_err(|e| rule_error(format!("path globs: {e}")))?)
                }
            };
            rules.push(CompiledRule {
                action: spec.action,
                methods: spec
                    .methods
                    .as_ref()
                    .map(|m| m.iter().map(|m| m.to_ascii_uppercase().into_boxed_str()).collect()),
                paths,
                passthrough: spec.tls == Some(TlsMode::Passthrough),
                name: Arc::from(name),
                reason: Arc::from(reason),
                ips: spec.ips.as_deref().map(IpSet::new),
                ports: spec
                    .ports
                    .as_deref()
                    .map(|ports| RangeSet::new(ports.iter().map(|p: &PortRange| (p.lo(), p.hi())))),
            });
        }
        let hosts = hosts.build().map_err(|message| PolicyError::Compile { profile: profile.name.clone(), message })?;
        Ok(Policy {
            inner: Arc::new(Compiled {
                name: profile.name.clone(),
                dry_run: profile.mode == super::model::Mode::DryRun,
                credentials: profile.credentials.clone(),
                rules,
                hosts,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The profile's credential bindings.
    pub fn credentials(&self) -> &[super::model::CredentialSpec] {
        &self.inner.credentials
    }

    /// A connection whose requests will not be seen (opaque TCP, TLS that
    /// is not intercepted). Forbid wins: the first matching deny rule decides;
    /// otherwise the first matching allow rule; otherwise `default-deny`.
    pub fn evaluate(&self, q: &ConnectQuery<'_>) -> Decision {
        self.decide(q, None, false)
    }

    /// A connection whose requests will each be checked with
    /// [`Policy::evaluate_request`] (plain HTTP, intercepted TLS): allow rules
    /// with request conditions may let it through to that check.
    pub fn evaluate_inspected(&self, q: &ConnectQuery<'_>) -> Decision {
        self.decide(q, None, true)
    }

    /// One request on an inspected connection.
    pub fn evaluate_request(&self, q: &ConnectQuery<'_>, request: &RequestInfo<'_>) -> Decision {
        self.decide(q, Some(request), true)
    }

    fn decide(&self, q: &ConnectQuery<'_>, request: Option<&RequestInfo<'_>>, inspected: bool) -> Decision {
        self.dry_run(self.decide_enforced(q, request, inspected))
    }

    /// In a dry-run profile a denial lets the connection through, marked so
    /// the decision log says what would have happened.
    fn dry_run(&self, decision: Decision) -> Decision {
        if !self.inner.dry_run || decision.is_allowed() {
            return decision;
        }
        Decision { verdict: Verdict::Allow, would_deny: true, ..decision }
    }

    fn decide_enforced(&self, q: &ConnectQuery<'_>, request: Option<&RequestInfo<'_>>, inspected: bool) -> Decision {
        let ip = q.ip.to_canonical();
        let host = match q.host.map(classify_host) {
            Some(QueryHost::Invalid(raw)) => {
                // Fail closed: a name no DNS name could be must not slip past a
                // deny rule whose host condition it was crafted to dodge.
                return Decision::default_deny(format!("host name {raw:?} is not a valid DNS name"));
            }
            Some(QueryHost::Name(name)) => Some(name),
            Some(QueryHost::IpLiteral) | None => None,
        };

        let inner = &*self.inner;
        let mut first_allow = None;
        for index in inner.hosts.candidates(host.as_deref()) {
            let rule = &inner.rules[index];
            if !rule.matches_addr(ip, q.port) || !rule.matches_request(request, inspected) {
                continue;
            }
            match rule.action {
                // Candidates come in file order, so this is the first deny.
                Action::Deny => return rule.decision(),
                Action::Allow => {
                    first_allow.get_or_insert(index);
                }
            }
        }
        match first_allow {
            Some(index) => inner.rules[index].decision(),
            None => match request {
                Some(request) => Decision::default_deny(format!(
                    "no rule allows {} {} on {}",
                    request.method,
                    request.path,
                    Destination { host: host.as_deref(), ip, port: q.port }
                )),
                None => Decision::default_deny(format!(
                    "no rule allows {}",
                    Destination { host: host.as_deref(), ip, port: q.port }
                )),
            },
        }
    }

    /// May the sandbox resolve this name through sluice's resolver? Allowed
    /// when some allow rule could match a connection to this name (its host
    /// condition matches, or it has none), unless a deny rule that depends on
    /// the host alone (no `ips`, no `ports`; a rule with no conditions counts)
    /// matches the name, since every connection to it would be denied anyway.
    pub fn may_resolve(&self, name: &str) -> Decision {
        self.dry_run(self.may_resolve_enforced(name))
    }

    fn may_resolve_enforced(&self, name: &str) -> Decision {
        let host = match classify_host(name) {
            QueryHost::Name(name) => Some(name),
            QueryHost::IpLiteral => None,
            QueryHost::Invalid(raw) => {
                return Decision::default_deny(format!("{raw:?} is not a valid DNS name"));
            }
        };
        let inner = &*self.inner;
        let mut first_allow = None;
        for index in inner.hosts.candidates(host.as_deref()) {
            let rule = &inner.rules[index];
            match rule.action {
                Action::Deny
                    if rule.ips.is_none() && rule.ports.is_none() && rule.methods.is_none() && rule.paths.is_none() =>
                {
                    return rule.decision();
                }
                Action::Deny => {}
                Action::Allow => {
                    first_allow.get_or_insert(index);
                }
            }
        }
        match first_allow {
            Some(index) => inner.rules[index].decision(),
            None => Decision::default_deny(format!("no rule allows connections to {name}")),
        }
    }
}

struct Destination<'a> {
    host: Option<&'a str>,
    ip: IpAddr,
    port: u16,
}

impl fmt::Display for Destination<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.host, self.ip) {
            (Some(host), _) => write!(f, "{host}:{}", self.port),
            (None, IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port),
            (None, IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

// ---------------------------------------------------------------------------
// Host names

enum QueryHost<'a> {
    /// Normalised: lower case, no trailing dot.
    Name(String),
    IpLiteral,
    Invalid(&'a str),
}

fn classify_host(raw: &str) -> QueryHost<'_> {
    let unbracketed = raw.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(raw);
    if unbracketed.parse::<IpAddr>().is_ok() {
        return QueryHost::IpLiteral;
    }
    let name = raw.strip_suffix('.').unwrap_or(raw);
    let valid = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if valid {
        QueryHost::Name(name.to_ascii_lowercase())
    } else {
        QueryHost::Invalid(raw)
    }
}

/// Which rules' host conditions select a name. Rule indexes, not rules, so
/// one rule may sit under several keys.
struct HostIndex {
    exact: HashMap<Box<str>, Vec<usize>>,
    /// `*.example.com` is stored under `example.com`.
    subdomains: HashMap<Box<str>, Vec<usize>>,
    any: Vec<usize>,
    globs: GlobSet,
    /// Rule index of each glob in `globs`.
    glob_rules: Vec<usize>,
    /// Rules with no host condition: they are candidates for every query.
    unconditional: Vec<usize>,
}

struct HostIndexBuilder {
    exact: HashMap<Box<str>, Vec<usize>>,
    subdomains: HashMap<Box<str>, Vec<usize>>,
    any: Vec<usize>,
    globs: GlobSetBuilder,
    glob_rules: Vec<usize>,
    unconditional: Vec<usize>,
}

/// Globs see names with dots turned into '/', so globset's
/// `literal_separator` keeps `*` and `?` inside one label.
fn glob_form(name: &str) -> String {
    name.replace('.', "/")
}

impl HostIndexBuilder {
    fn new() -> Self {
        Self {
            exact: HashMap::new(),
            subdomains: HashMap::new(),
            any: Vec::new(),
            globs: GlobSetBuilder::new(),
            glob_rules: Vec::new(),
            unconditional: Vec::new(),
        }
    }

    fn add(&mut self, kind: &HostPatternKind, rule: usize) -> Result<(), String> {
        match kind {
            HostPatternKind::Any => self.any.push(rule),
            HostPatternKind::Exact(name) => {
                self.exact.entry(name.as_str().into()).or_default().push(rule);
            }
            HostPatternKind::Subdomains(suffix) => {
                self.subdomains.entry(suffix.as_str().into()).or_default().push(rule);
            }
            HostPatternKind::Glob(pattern) => {
                let glob = GlobBuilder::new(&glob_form(pattern))
                    .literal_separator(true)
                    .backslash_escape(false)
                    .build()
                    .map_err(|err| format!("invalid host pattern {pattern:?}: {err}"))?;
                self.globs.add(glob);
                self.glob_rules.push(rule);
            }
        }
        Ok(())
    }

    fn build(self) -> Result<HostIndex, String> {
        let globs = self.globs.build().map_err(|err| format!("cannot build host pattern set: {err}"))?;
        Ok(HostIndex {
            exact: self.exact,
            subdomains: self.subdomains,
            any: self.any,
            globs,
            glob_rules: self.glob_rules,
            unconditional: self.unconditional,
        })
    }
}

impl HostIndex {
    /// Rules whose host condition matches `name` (or that have none), in file
    /// order, each once. `None` means the name is unknown: only rules without
    /// a host condition apply.
    fn candidates(&self, name: Option<&str>) -> Vec<usize> {
        let Some(name) = name else {
            return self.unconditional.clone();
        };
        let mut found = self.unconditional.clone();
        found.extend_from_slice(&self.any);
        if let Some(rules) = self.exact.get(name) {
            found.extend_from_slice(rules);
        }
        // Every proper parent suffix: a.b.example.com -> b.example.com,
        // example.com, com. The name itself is not a strict subdomain.
        let mut rest = name;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(rules) = self.subdomains.get(parent) {
                found.extend_from_slice(rules);
            }
            rest = parent;
        }
        if !self.glob_rules.is_empty() {
            for glob in self.globs.matches(glob_form(name)) {
                found.push(self.glob_rules[glob]);
            }
        }
        found.sort_unstable();
        found.dedup();
        found
    }
}

// ---------------------------------------------------------------------------
// Address and port sets

/// Sorted, non-overlapping inclusive ranges with a binary-search lookup.
#[derive(Debug, Clone)]
struct RangeSet<T> {
    ranges: Vec<(T, T)>,
}

impl<T: Ord + Copy> RangeSet<T> {
    fn new(ranges: impl IntoIterator<Item = (T, T)>) -> Self {
        let mut sorted: Vec<(T, T)> = ranges.into_iter().collect();
        sorted.sort_unstable();
        let mut merged: Vec<(T, T)> = Vec::with_capacity(sorted.len());
        for (lo, hi) in sorted {
            match merged.last_mut() {
                Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        Self { ranges: merged }
    }

    fn contains(&self, value: T) -> bool {
        let after = self.ranges.partition_point(|&(lo, _)| lo <= value);
        after > 0 && value <= self.ranges[after - 1].1
    }
}

/// The destinations a rule's `ips` condition covers. The one place that knows
/// how CIDRs are looked up, so the representation can change alone.
#[derive(Debug, Clone)]
struct IpSet {
    v4: RangeSet<u32>,
    v6: RangeSet<u128>,
}

impl IpSet {
    fn new(patterns: &[IpPattern]) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for pattern in patterns {
            match pattern.net() {
                IpNet::V4(net) => v4.push((u32::from(net.network()), u32::from(net.broadcast()))),
                IpNet::V6(net) => v6.push((u128::from(net.network()), u128::from(net.broadcast()))),
            }
        }
        Self { v4: RangeSet::new(v4), v6: RangeSet::new(v6) }
    }

    /// `ip` must already be canonical (mapped IPv6 turned into IPv4).
    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.v4.contains(u32::from(ip)),
            IpAddr::V6(ip) => self.v6.contains(u128::from(ip)),
        }
    }
}
