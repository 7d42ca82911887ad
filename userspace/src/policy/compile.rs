//! The compiled policy: indexes built once from a [`Profile`] so a decision
//! looks at the rules a host name could select rather than every rule.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use super::error::{Location, PolicyError, RuleRef};
use super::host_glob::{GlobIndex, HostGlob};
use super::model::{
    Action, HostPattern, HostPatternKind, IpPattern, PortRange, Profile, RuleSpec, Scheme, TlsMode, DEFAULT_DENY,
    MAX_NAME_LEN,
};

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
    pub scheme: Scheme,
    pub headers: Option<&'a hyper::HeaderMap>,
    /// Body length when known before it is read (Content-Length, or an
    /// empty body); `None` for a body streamed without a length.
    pub body_len: Option<u64>,
}

impl<'a> RequestInfo<'a> {
    /// A request with no headers and no body (tests, `policy explain`).
    pub fn simple(method: &'a str, path: &'a str, scheme: Scheme) -> Self {
        Self { method, path, scheme, headers: None, body_len: Some(0) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Held until an operator answers.
    Ask,
    Deny,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Ask => "ask",
            Verdict::Deny => "deny",
        }
    }
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
    /// Dry-run profile: this allow is a denial (or a hold) that was not
    /// enforced.
    pub would_deny: bool,
    /// The capability bundle the deciding rule came from.
    pub bundle: Option<Arc<str>>,
    /// Largest request body the deciding rule lets through.
    pub max_body: Option<u64>,
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
            bundle: None,
            max_body: None,
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
    /// Bundles in force (taken by the profile and not revoked).
    bundles: Vec<Arc<str>>,
    /// In file order; indexes below refer to positions here.
    rules: Vec<CompiledRule>,
    hosts: HostIndex,
    /// Some allow or ask rule in force has a host condition. Without one no
    /// name is resolved: names would only be a channel out.
    names_hosts: bool,
}

struct CompiledRule {
    action: Action,
    /// Ready-made for decisions so evaluation does not allocate.
    name: Arc<str>,
    reason: Arc<str>,
    bundle: Option<Arc<str>>,
    ips: Option<IpSet>,
    ports: Option<RangeSet<u16>>,
    /// Upper case.
    methods: Option<Vec<Box<str>>>,
    paths: Option<GlobSet>,
    schemes: Option<Vec<Scheme>>,
    /// Header name and value matcher (`None`: any value).
    headers: Option<HeaderMatchers>,
    max_body: Option<u64>,
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
        if !self.has_request_conditions() {
            return true;
        }
        let Some(request) = request else {
            return inspected && self.action != Action::Deny;
        };
        self.methods.as_ref().is_none_or(|methods| methods.iter().any(|m| m.eq_ignore_ascii_case(request.method)))
            && self.paths.as_ref().is_none_or(|paths| paths.is_match(request.path))
            && self.schemes.as_ref().is_none_or(|schemes| schemes.contains(&request.scheme))
            && self.headers.as_ref().is_none_or(|wanted| {
                wanted.iter().all(|(name, value)| {
                    request.headers.is_some_and(|headers| self.header_holds(headers, name, value.as_ref()))
                })
            })
            && self.max_body.is_none_or(|max| request.body_len.is_none_or(|len| len <= max))
    }

    /// One header condition. A header sent several times is read the
    /// strict way for this rule: a deny rule matches when any value does
    /// (read leniently, so odd bytes cannot dodge it); an allow or ask rule
    /// needs at least one value and every value to match.
    fn header_holds(
        &self,
        headers: &hyper::HeaderMap,
        name: &hyper::header::HeaderName,
        glob: Option<&globset::GlobMatcher>,
    ) -> bool {
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            return false;
        }
        let Some(glob) = glob else { return true };
        if self.action == Action::Deny {
            values.any(|value| glob.is_match(&*String::from_utf8_lossy(value.as_bytes())))
        } else {
            values.all(|value| value.to_str().is_ok_and(|text| glob.is_match(text)))
        }
    }

    fn has_request_conditions(&self) -> bool {
        self.methods.is_some()
            || self.paths.is_some()
            || self.schemes.is_some()
            || self.headers.is_some()
            || self.max_body.is_some()
    }

    fn decision(&self) -> Decision {
        Decision {
            verdict: match self.action {
                Action::Allow => Verdict::Allow,
                Action::Ask => Verdict::Ask,
                Action::Deny => Verdict::Deny,
            },
            rule: Arc::clone(&self.name),
            reason: Arc::clone(&self.reason),
            passthrough: self.passthrough,
            would_deny: false,
            bundle: self.bundle.clone(),
            max_body: self.max_body,
        }
    }
}

/// The rule name of a DNS query refused because the profile names no hosts.
pub const NO_HOSTS_NAMED: &str = "no-hosts-named";

/// The rule name of a request refused for a path that cannot be read.
pub const INVALID_PATH: &str = "invalid-path";

/// Of two decisions on readings of one request, the one to enforce: the
/// stricter verdict (a dry run's would-be denial counts as a denial); on a
/// tie the first, with the smaller body limit of the two.
fn stricter(first: Decision, second: Decision) -> Decision {
    let rank = |d: &Decision| match (d.verdict, d.would_deny) {
        (Verdict::Deny, _) | (_, true) => 2,
        (Verdict::Ask, false) => 1,
        (Verdict::Allow, false) => 0,
    };
    if rank(&second) > rank(&first) {
        return second;
    }
    let max_body = match (first.max_body, second.max_body) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Decision { max_body, ..first }
}

/// A rule to compile: the profile's own, or one a bundle brings.
struct Source<'a> {
    spec: &'a RuleSpec,
    name: String,
    bundle: Option<Arc<str>>,
    /// Position among the profile's own rules, for error locations.
    own_index: Option<usize>,
}

impl Policy {
    /// Validates `profile` (as the parser does) and builds its matchers.
    pub fn compile(profile: &Profile) -> Result<Policy, PolicyError> {
        Self::compile_for(profile, &Revoked::default(), &Labels::new())
    }

    /// `compile` without the rules of revoked bundles.
    pub fn compile_revoked(profile: &Profile, revoked: &Revoked) -> Result<Policy, PolicyError> {
        Self::compile_for(profile, revoked, &Labels::new())
    }

    /// The policy of a sandbox carrying `labels`: without the rules of
    /// revoked bundles, and without the rules whose `labels` it lacks.
    pub fn compile_for(profile: &Profile, revoked: &Revoked, labels: &Labels) -> Result<Policy, PolicyError> {
        Self::compile_located(profile, &format!("profile {:?}", profile.name), &|_| None, revoked, labels)
    }

    /// `compile` with errors that name the file the profile came from and
    /// where each rule starts in it.
    pub(crate) fn compile_located(
        profile: &Profile,
        origin: &str,
        locate_rule: &dyn Fn(usize) -> Option<Location>,
        revoked: &Revoked,
        labels: &Labels,
    ) -> Result<Policy, PolicyError> {
        profile.check().map_err(|problem| PolicyError::from_problem(origin, locate_rule, problem))?;
        if !profile.include.is_empty() {
            return Err(PolicyError::Profile {
                origin: origin.to_owned(),
                message: "`include` is resolved when a profile is loaded from its file; \
                          hand the daemon the file (`--profile FILE`), not its text"
                    .into(),
            });
        }

        let bundles: Vec<(Arc<str>, Profile)> = profile
            .bundles
            .iter()
            .filter(|name| !revoked.contains(*name))
            .map(|name| super::bundles::get(name).map(|bundle| (Arc::from(name.as_str()), bundle)))
            .collect::<Result<_, _>>()
            .map_err(|e| PolicyError::Profile { origin: origin.to_owned(), message: e.to_string() })?;
        let mut sources: Vec<Source<'_>> = profile
            .rules
            .iter()
            .enumerate()
            .map(|(index, spec)| Source {
                spec,
                name: spec.effective_name(index),
                bundle: None,
                own_index: Some(index),
            })
            .collect();
        for (bundle_name, bundle) in &bundles {
            for (index, spec) in bundle.rules.iter().enumerate() {
                sources.push(Source {
                    spec,
                    name: format!("{bundle_name}/{}", spec.effective_name(index)),
                    bundle: Some(bundle_name.clone()),
                    own_index: None,
                });
            }
        }

        let mut rules = Vec::with_capacity(sources.len());
        let mut hosts = HostIndexBuilder::new();
        let mut names_hosts = false;
        for (index, source) in sources.iter().enumerate() {
            let spec = source.spec;
            let name = source.name.clone();
            let rule_error = |message: String| match source.own_index {
                Some(own) => PolicyError::Rule {
                    origin: origin.to_owned(),
                    location: locate_rule(own),
                    rule: RuleRef { index: own + 1, name: name.clone() },
                    message,
                },
                None => PolicyError::Profile { origin: origin.to_owned(), message: format!("rule {name}: {message}") },
            };
            let reason = spec.reason.clone().unwrap_or_else(|| match spec.action {
                Action::Allow => format!("allowed by rule {name}"),
                Action::Ask => format!("rule {name} asks an operator"),
                Action::Deny => format!("denied by rule {name}"),
            });
            // A rule for other labels is still checked, but never a
            // candidate: no index knows it.
            let applies = match &spec.labels {
                Some(wanted) => labels_match(wanted, labels).map_err(&rule_error)?,
                None => true,
            };
            names_hosts |= applies && spec.action != Action::Deny && spec.hosts.is_some();
            match &spec.hosts {
                _ if !applies => {}
                None => match spec.ips.as_deref() {
                    // Indexed by address, so that many IP rules are not each
                    // checked on every decision.
                    Some(ips) => hosts.by_address.add(index, &IpSet::new(ips)),
                    None => hosts.unconditional.push(index),
                },
                Some(patterns) => {
                    for pattern in resolve_aliases(patterns, profile, source.bundle.as_ref()).map_err(&rule_error)? {
                        hosts.add(pattern.kind(), index).map_err(&rule_error)?;
                    }
                }
            }
            let paths = spec.paths.as_deref().map(compile_paths).transpose().map_err(&rule_error)?;
            let headers = spec.headers.as_ref().map(compile_headers).transpose().map_err(&rule_error)?;
            rules.push(CompiledRule {
                action: spec.action,
                methods: spec
                    .methods
                    .as_ref()
                    .map(|m| m.iter().map(|m| m.to_ascii_uppercase().into_boxed_str()).collect()),
                paths,
                schemes: spec.schemes.clone(),
                headers,
                max_body: spec.max_body.map(|size| size.0),
                passthrough: spec.tls == Some(TlsMode::Passthrough),
                name: Arc::from(name),
                reason: Arc::from(reason),
                bundle: source.bundle.clone(),
                ips: spec.ips.as_deref().map(IpSet::new),
                ports: spec
                    .ports
                    .as_deref()
                    .map(|ports| RangeSet::new(ports.iter().map(|p: &PortRange| (p.lo(), p.hi())))),
            });
        }
        let hosts = hosts.build();
        Ok(Policy {
            inner: Arc::new(Compiled {
                name: profile.name.clone(),
                dry_run: profile.mode == super::model::Mode::DryRun,
                credentials: profile.credentials.clone(),
                bundles: bundles.into_iter().map(|(name, _)| name).collect(),
                rules,
                hosts,
                names_hosts,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Bundles whose rules are in force.
    pub fn bundles(&self) -> &[Arc<str>] {
        &self.inner.bundles
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

    /// One request on an inspected connection. The path is decided on
    /// every way an upstream may read it ([`super::path::readings`]) and the
    /// strictest outcome stands: deny over ask over allow. A path no
    /// upstream could read cleanly is refused as `invalid-path`.
    pub fn evaluate_request(&self, q: &ConnectQuery<'_>, request: &RequestInfo<'_>) -> Decision {
        let readings = match super::path::readings(request.path) {
            Ok(readings) => readings,
            Err(error) => {
                let reason = format!("{error}; sluice cannot tell which path the upstream would read");
                return self.dry_run(Decision { rule: Arc::from(INVALID_PATH), ..Decision::default_deny(reason) });
            }
        };
        let mut strictest: Option<Decision> = None;
        for path in &readings {
            let decision = self.decide(q, Some(&RequestInfo { path, ..*request }), true);
            strictest = Some(match strictest {
                None => decision,
                Some(so_far) => stricter(so_far, decision),
            });
        }
        strictest.unwrap_or_else(|| self.decide(q, Some(request), true))
    }

    fn decide(&self, q: &ConnectQuery<'_>, request: Option<&RequestInfo<'_>>, inspected: bool) -> Decision {
        let decision = self.decide_enforced(q, request, inspected);
        if decision.verdict == Verdict::Ask && request.is_none() && inspected {
            // Each request of an inspected connection is asked about on its
            // own; the connection itself goes ahead.
            let reason = format!("each request is held for an operator (rule {})", decision.rule);
            return self.dry_run(Decision { verdict: Verdict::Allow, reason: Arc::from(reason), ..decision });
        }
        self.dry_run(decision)
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
        let mut first_ask = None;
        for index in inner.hosts.candidates(host.as_deref(), Some(ip)) {
            let rule = &inner.rules[index];
            if !rule.matches_addr(ip, q.port) || !rule.matches_request(request, inspected) {
                continue;
            }
            match rule.action {
                // Candidates come in file order, so this is the first deny.
                Action::Deny => return rule.decision(),
                Action::Ask => {
                    first_ask.get_or_insert(index);
                }
                Action::Allow => {
                    first_allow.get_or_insert(index);
                }
            }
        }
        match first_allow.or(first_ask) {
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

    /// Every rule that matches (for `policy explain`), in file order, with
    /// its action and bundle; the decision itself comes from the evaluate
    /// functions.
    pub fn matching_rules(
        &self,
        q: &ConnectQuery<'_>,
        request: Option<&RequestInfo<'_>>,
    ) -> Vec<(Arc<str>, Action, Option<Arc<str>>)> {
        let host = match q.host.map(classify_host) {
            Some(QueryHost::Name(name)) => Some(name),
            _ => None,
        };
        let ip = q.ip.to_canonical();
        let path = request.map(|r| super::path::normalize(r.path).unwrap_or_else(|_| r.path.to_owned()));
        let request = request.zip(path.as_deref()).map(|(r, path)| RequestInfo { path, ..*r });
        let request = request.as_ref();
        self.inner
            .hosts
            .candidates(host.as_deref(), Some(ip))
            .into_iter()
            .map(|index| &self.inner.rules[index])
            .filter(|rule| rule.matches_addr(ip, q.port) && rule.matches_request(request, request.is_none()))
            .map(|rule| (rule.name.clone(), rule.action, rule.bundle.clone()))
            .collect()
    }

    /// May the sandbox resolve this name through sluice's resolver? Allowed
    /// when some allow rule could match a connection to this name (its host
    /// condition matches, or it has none), unless a deny rule that depends on
    /// the host alone (no `ips`, no `ports`; a rule with no conditions counts)
    /// matches the name, since every connection to it would be denied anyway.
    /// A profile whose allow and ask rules name no hosts at all resolves no
    /// names (`no-hosts-named`): its connections go to addresses, and every
    /// query would only carry data out to some name server.
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
        if !inner.names_hosts {
            return Decision {
                rule: Arc::from(NO_HOSTS_NAMED),
                ..Decision::default_deny(format!(
                    "profile {:?} names no hosts, so no name is resolved (asked for {name}); \
                     give a rule a `hosts` condition to resolve names",
                    inner.name
                ))
            };
        }
        let mut first_allow = None;
        for index in inner.hosts.candidates(host.as_deref(), None) {
            let rule = &inner.rules[index];
            match rule.action {
                Action::Deny if rule.ips.is_none() && rule.ports.is_none() && !rule.has_request_conditions() => {
                    return rule.decision();
                }
                Action::Deny => {}
                // A name an ask rule covers may be resolved: the connection
                // or request is what an operator is asked about.
                Action::Allow | Action::Ask => {
                    first_allow.get_or_insert(index);
                }
            }
        }
        match first_allow {
            Some(index) => Decision { verdict: Verdict::Allow, ..inner.rules[index].decision() },
            None => Decision::default_deny(format!("no rule allows connections to {name}")),
        }
    }
}

fn compile_paths(globs: &[String]) -> Result<GlobSet, String> {
    let mut set = GlobSetBuilder::new();
    for glob in globs {
        set.add(
            GlobBuilder::new(glob)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("path {glob:?} is not a valid glob: {e}"))?,
        );
    }
    set.build().map_err(|e| format!("path globs: {e}"))
}

type HeaderMatchers = Vec<(hyper::header::HeaderName, Option<globset::GlobMatcher>)>;

/// `"*"` matches any value; anything else is a glob over the value.
fn compile_headers(wanted: &std::collections::BTreeMap<String, String>) -> Result<HeaderMatchers, String> {
    wanted
        .iter()
        .map(|(name, value)| {
            let header = hyper::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not an HTTP header name"))?;
            // Media types are case-insensitive (RFC 9110 section 8.3.1).
            let fold_case = MEDIA_TYPE_HEADERS.contains(&header.as_str());
            Ok((header, value_glob(value, fold_case, || "header value".to_owned())?))
        })
        .collect()
}

/// Headers whose values are media types, compared case-insensitively.
const MEDIA_TYPE_HEADERS: [&str; 2] = ["content-type", "accept"];

/// A header or label value condition: `"*"` (None) matches any value;
/// anything else is a glob over the value, ignoring ASCII case when
/// `fold_case`. `what` names it in errors.
fn value_glob(glob: &str, fold_case: bool, what: impl Fn() -> String) -> Result<Option<globset::GlobMatcher>, String> {
    match glob {
        "*" => Ok(None),
        glob => Ok(Some(
            GlobBuilder::new(glob)
                .case_insensitive(fold_case)
                .build()
                .map_err(|e| format!("{} {glob:?}: {e}", what()))?
                .compile_matcher(),
        )),
    }
}

/// Bundles taken away from every sandbox (`sluice policy revoke`).
pub type Revoked = std::collections::BTreeSet<String>;

/// A sandbox's labels (a container's labels), for rules' `labels`.
pub type Labels = std::collections::BTreeMap<String, String>;

/// Whether `labels` has every wanted label, its value matching the glob
/// (`"*"`: any value).
fn labels_match(wanted: &Labels, labels: &Labels) -> Result<bool, String> {
    for (name, glob) in wanted {
        let matcher = value_glob(glob, false, || format!("label {name:?} value"))?;
        let value_matches = |value: &String| matcher.as_ref().is_none_or(|m| m.is_match(value));
        if !labels.get(name).is_some_and(value_matches) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// A host list with `@alias` entries replaced by the profile's patterns.
fn resolve_aliases<'p>(
    patterns: &'p [HostPattern],
    profile: &'p Profile,
    bundle: Option<&Arc<str>>,
) -> Result<Vec<&'p HostPattern>, String> {
    let mut out = Vec::with_capacity(patterns.len());
    for pattern in patterns {
        let HostPatternKind::Alias(alias) = pattern.kind() else {
            out.push(pattern);
            continue;
        };
        let Some(hosts) = profile.aliases.get(alias) else {
            let by = bundle.map_or_else(String::new, |b| format!("bundle {b} "));
            return Err(format!(
                "{by}uses host alias @{alias}, which the profile does not define: \
                 add `{alias} = [\"host\", ...]` to its [aliases] table"
            ));
        };
        out.extend(hosts);
    }
    Ok(out)
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
    globs: GlobIndex,
    /// Rules with no host condition and no address condition: they are
    /// candidates for every query.
    unconditional: Vec<usize>,
    /// Rules with no host condition but an `ips` one, by address.
    by_address: AddressIndex,
}

/// Rules by the addresses their `ips` condition covers: each range is filed
/// under the smallest of /24, /16 and /8 (IPv4) or /32 (IPv6) that holds it,
/// so a lookup is a few hash probes whatever the number of rules.
#[derive(Default)]
struct AddressIndex {
    v4: [HashMap<u32, Vec<usize>>; 3],
    wide4: Vec<usize>,
    v6: HashMap<u32, Vec<usize>>,
    wide6: Vec<usize>,
    all: Vec<usize>,
}

impl AddressIndex {
    fn add(&mut self, rule: usize, set: &IpSet) {
        self.all.push(rule);
        for &(lo, hi) in &set.v4.ranges {
            match [8, 16, 24].iter().position(|&shift| lo >> shift == hi >> shift) {
                Some(level) => self.v4[level].entry(lo >> [8, 16, 24][level]).or_default().push(rule),
                None => self.wide4.push(rule),
            }
        }
        for &(lo, hi) in &set.v6.ranges {
            if lo >> 96 == hi >> 96 {
                self.v6.entry((lo >> 96) as u32).or_default().push(rule);
            } else {
                self.wide6.push(rule);
            }
        }
    }

    /// Rules whose ranges may hold `ip` (canonical); `None`: every rule.
    fn candidates(&self, ip: Option<IpAddr>, out: &mut Vec<usize>) {
        let empty = Vec::new();
        match ip {
            None => out.extend_from_slice(&self.all),
            Some(IpAddr::V4(ip)) => {
                let ip = u32::from(ip);
                for (level, shift) in [8, 16, 24].into_iter().enumerate() {
                    out.extend_from_slice(self.v4[level].get(&(ip >> shift)).unwrap_or(&empty));
                }
                out.extend_from_slice(&self.wide4);
            }
            Some(IpAddr::V6(ip)) => {
                out.extend_from_slice(self.v6.get(&((u128::from(ip) >> 96) as u32)).unwrap_or(&empty));
                out.extend_from_slice(&self.wide6);
            }
        }
    }
}

struct HostIndexBuilder {
    by_address: AddressIndex,
    exact: HashMap<Box<str>, Vec<usize>>,
    subdomains: HashMap<Box<str>, Vec<usize>>,
    any: Vec<usize>,
    globs: Vec<(HostGlob, usize)>,
    unconditional: Vec<usize>,
}

impl HostIndexBuilder {
    fn new() -> Self {
        Self {
            exact: HashMap::new(),
            subdomains: HashMap::new(),
            any: Vec::new(),
            globs: Vec::new(),
            unconditional: Vec::new(),
            by_address: AddressIndex::default(),
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
            HostPatternKind::Alias(alias) => return Err(format!("host alias @{alias} was not resolved")),
            HostPatternKind::Glob(pattern) => self.globs.push((HostGlob::new(pattern), rule)),
        }
        Ok(())
    }

    fn build(self) -> HostIndex {
        HostIndex {
            exact: self.exact,
            subdomains: self.subdomains,
            any: self.any,
            globs: GlobIndex::new(self.globs),
            unconditional: self.unconditional,
            by_address: self.by_address,
        }
    }
}

impl HostIndex {
    /// Rules whose host condition matches `name` (or that have none), in file
    /// order, each once. `None` means the name is unknown: only rules without
    /// a host condition apply. Rules with only an address condition are
    /// those that may hold `ip` (all of them when `ip` is `None`).
    fn candidates(&self, name: Option<&str>, ip: Option<IpAddr>) -> Vec<usize> {
        let mut found = self.unconditional.clone();
        self.by_address.candidates(ip, &mut found);
        let Some(name) = name else {
            found.sort_unstable();
            found.dedup();
            return found;
        };
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
        self.globs.matches(name, &mut found);
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
            let ranges = pattern.ranges();
            v4.extend(ranges.v4);
            v6.extend(ranges.v6);
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
