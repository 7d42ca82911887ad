//! The profile as written: serde types for the TOML file (and, later, the JSON
//! control API). Every leaf value that has a closed syntax (action, host
//! pattern, IP network, port range) is validated while it is deserialized, so
//! the parser can point at the offending value; cross-rule checks live in
//! [`Profile::check`].

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use schemars::JsonSchema;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Rule name the engine reports when nothing allowed a connection; a profile
/// may not use it, or audit records could not tell the two apart.
pub const DEFAULT_DENY: &str = crate::rules::DEFAULT_DENY;

/// A named set of rules. Deny by default; see the module docs for semantics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// `enforce` (default) or `dry-run`: in a dry run nothing is denied, but
    /// every decision that would have been a denial is logged as such.
    #[serde(default, skip_serializing_if = "Mode::is_enforce")]
    pub mode: Mode,
    /// Written as `[[rule]]` tables, hence the singular key.
    #[serde(default, rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
    /// Written as `[[credential]]` tables: secrets the daemon holds and
    /// injects for this sandbox, bound to hosts.
    #[serde(default, rename = "credential", skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<serde_json::Map<String, serde_json::Value>>")]
    pub credentials: Vec<CredentialSpec>,
    /// Other profile files whose rules, bundles, aliases and credentials this
    /// one adds to its own, relative to this file's directory. Resolved when
    /// the profile is loaded from a file ([`super::load_profile`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub include: Vec<String>,
    /// Capability bundles from sluice's library (`sluice policy bundles`
    /// lists them), e.g. `net.read.public` or `vcs.github.readonly`.
    /// Decisions made by a bundle's rules name the bundle.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bundles: Vec<String>,
    /// Host aliases: `@name` in a host list stands for these patterns.
    /// Bundles for package registries use them (`@pypi`, `@npm`, `@crates`),
    /// so the hosts of the index or mirror in use are the profile's choice.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub aliases: std::collections::BTreeMap<String, Vec<HostPattern>>,
}

/// One `[[credential]]`: the sandbox gets a placeholder for `secret` (in
/// the variable `env`, under `sluice run`), and sluice swaps the placeholder
/// for the real value in requests to `hosts` only. A placeholder seen going
/// to any other host is blocked as an exfiltration attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialSpec {
    /// Name of the secret in the daemon's secret store.
    pub secret: String,
    /// Hosts the secret may go to: exact names or `*.suffix`.
    pub hosts: Vec<HostPattern>,
    /// Environment variable that carries the placeholder into the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    /// Only requests with these methods get the secret (default any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Only requests to these path globs get the secret (default any);
    /// `*` stays within a segment, `**` crosses segments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<crate::credentials::PathScope>,
    /// How sluice puts the secret in every request in scope, whether or not
    /// the sandbox sent the placeholder (a header, basic auth, a query
    /// parameter, or an AWS `SigV4` signature). Without it, only placeholders
    /// the sandbox sends are swapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<crate::credentials::InjectSpec>,
}

/// One `[[rule]]`. Every condition that is present must match; an absent
/// condition matches everything, so a rule with no conditions matches every
/// connection (legal: `action = "deny"` with no conditions blocks everything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Defaults to `rule-<n>` (1-based position in the file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<HostPattern>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ips: Option<Vec<IpPattern>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<PortRange>>,
    /// HTTP methods (`GET`, `POST`, ...); checked on every request of an
    /// inspected connection (plain HTTP, or intercepted TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Request path globs: `*` stays within one segment, `**` crosses
    /// segments (`/repos/**`). The query string is not part of the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
    /// `http` (plain) or `https` (intercepted TLS); checked per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schemes: Option<Vec<Scheme>>,
    /// Request headers that must be present, by name, with a value glob
    /// (`"*"`: any value, `"application/json*"`, ...); values are compared
    /// case-sensitively, names are not. Checked per request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<std::collections::BTreeMap<String, String>>,
    /// Largest request body, in bytes (`1048576`) or with a unit (`"1MiB"`,
    /// `"512KB"`), this allow or ask rule lets through. A body announced
    /// larger does not match; a streamed body that grows past it is cut off
    /// and the request fails with 413.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body: Option<ByteSize>,
    /// What an allowed TLS connection gets: `intercept` (default: terminated
    /// with the sandbox's CA, requests checked one by one) or `passthrough`
    /// (bytes spliced after the connect-level check; for pinned clients and
    /// mTLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsMode>,
    /// Labels the sandbox must carry (a container's labels), by name, with
    /// a value glob (`"*"`: any value). The rule is part of the policy of
    /// sandboxes that have them, and of no other: one profile can serve
    /// containers that differ by label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// Shown in decisions; a generic text is used when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl RuleSpec {
    /// Conditions only a request can answer: the rule decides requests on
    /// inspected connections, never opaque ones.
    pub fn has_request_conditions(&self) -> bool {
        self.methods.is_some()
            || self.paths.is_some()
            || self.schemes.is_some()
            || self.headers.is_some()
            || self.max_body.is_some()
    }

    /// The name decisions and errors use for the rule at 0-based `index`.
    pub fn effective_name(&self, index: usize) -> String {
        match &self.name {
            Some(name) => name.clone(),
            None => default_rule_name(index),
        }
    }
}

pub(crate) fn default_rule_name(index: usize) -> String {
    format!("rule-{}", index + 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    Enforce,
    DryRun,
}

impl Mode {
    #[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
    pub fn is_enforce(&self) -> bool {
        *self == Mode::Enforce
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    Intercept,
    Passthrough,
}

/// What a matching rule does. When several rules match, deny wins over
/// allow, and allow over ask: `ask` is for what no rule allows outright, and
/// an operator's "always" answer becomes an allow rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    /// Hold the request (or connection) until an operator answers
    /// (`sluice approve` / `sluice deny`); no answer in time means deny.
    Ask,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Ask => "ask",
            Action::Deny => "deny",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A size in bytes, written as an integer or a string with a unit
/// (`B`, `KB`/`KiB`, `MB`/`MiB`, `GB`/`GiB`; KB = 1000, KiB = 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let text = raw.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits.parse().map_err(|_| format!("{raw:?} is not a size such as 1048576 or \"1MiB\""))?;
        let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "kib" => 1 << 10,
            "mb" => 1_000_000,
            "mib" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            other => {
                return Err(format!("size {raw:?} has unknown unit {other:?}; use B, KB, KiB, MB, MiB, GB or GiB"))
            }
        };
        number.checked_mul(scale).map(ByteSize).ok_or_else(|| format!("size {raw:?} is too large"))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;

        impl de::Visitor<'_> for SizeVisitor {
            type Value = ByteSize;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size in bytes or a string such as \"1MiB\"")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom(format!("size {v} is negative")))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }

        d.deserialize_any(SizeVisitor)
    }
}

/// Problems found after deserialization, in the profile as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProfileProblem {
    EmptyProfileName,
    Profile(String),
    Rule { index: usize, name: String, problem: String },
}

impl Profile {
    /// Checks what single values cannot: names are unique and not reserved,
    /// condition lists are not empty. Run by both the parser and
    /// `Policy::compile`, because a `Profile` may also be built in code or
    /// arrive as JSON.
    pub(crate) fn check(&self) -> Result<(), ProfileProblem> {
        if self.name.trim().is_empty() {
            return Err(ProfileProblem::EmptyProfileName);
        }
        for (alias, hosts) in &self.aliases {
            if !alias_name_ok(alias) {
                return Err(ProfileProblem::Profile(format!(
                    "alias name {alias:?} must be letters, digits, '-', '_' or '.'"
                )));
            }
            if hosts.is_empty() {
                return Err(ProfileProblem::Profile(format!("alias @{alias} names no hosts")));
            }
            if hosts.iter().any(|h| matches!(h.kind(), HostPatternKind::Alias(_))) {
                return Err(ProfileProblem::Profile(format!("alias @{alias} refers to another alias")));
            }
        }
        let mut seen = std::collections::HashMap::new();
        for (index, rule) in self.rules.iter().enumerate() {
            self.check_rule(index, rule, &mut seen)?;
        }
        for (index, credential) in self.credentials.iter().enumerate() {
            let fail = |problem: String| ProfileProblem::Rule {
                index: self.rules.len() + index,
                name: format!("credential {}", credential.secret),
                problem,
            };
            let name_ok = |name: &str| {
                !name.is_empty()
                    && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
            };
            if !name_ok(&credential.secret) {
                return Err(fail(format!(
                    "secret name {:?} must be letters, digits, '_', '-' or '.'",
                    credential.secret
                )));
            }
            if credential.hosts.is_empty() {
                return Err(fail("`hosts` is empty: a credential must be bound to at least one host".into()));
            }
            if credential.hosts.iter().any(|h| {
                matches!(h.kind(), HostPatternKind::Glob(_) | HostPatternKind::Any | HostPatternKind::Alias(_))
            }) {
                return Err(fail(
                    "credential hosts must be exact names or `*.suffix`, never `*`, other globs or aliases".into(),
                ));
            }
            if let Some(env) = &credential.env {
                let valid = env.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                    && env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !valid {
                    return Err(fail(format!("{env:?} is not an environment variable name")));
                }
            }
            if credential.methods.as_ref().is_some_and(Vec::is_empty) {
                return Err(fail("`methods` is empty, so the secret could never be used; omit it for any".into()));
            }
            for method in credential.methods.iter().flatten() {
                if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
                    return Err(fail(format!("method {method:?} is not an HTTP method token")));
                }
            }
            if let Some(inject) = &credential.inject {
                inject.check().map_err(fail)?;
            }
        }
        Ok(())
    }

    fn check_rule(
        &self,
        index: usize,
        rule: &RuleSpec,
        seen: &mut std::collections::HashMap<String, usize>,
    ) -> Result<(), ProfileProblem> {
        let name = rule.effective_name(index);
        let fail = |problem: String| ProfileProblem::Rule { index, name: name.clone(), problem };
        if name.trim().is_empty() {
            return Err(fail("rule name is empty".into()));
        }
        if name == DEFAULT_DENY {
            return Err(fail(format!("`{DEFAULT_DENY}` is reserved for connections no rule allows")));
        }
        if let Some(first) = seen.insert(name.clone(), index) {
            return Err(fail(format!("rule name is already used by rule {}; decisions must name one rule", first + 1)));
        }
        // An empty list would make the rule match nothing, which is never
        // what was meant; "absent" is how to say "any".
        for (field, empty) in [
            ("hosts", rule.hosts.as_ref().is_some_and(Vec::is_empty)),
            ("ips", rule.ips.as_ref().is_some_and(Vec::is_empty)),
            ("ports", rule.ports.as_ref().is_some_and(Vec::is_empty)),
            ("methods", rule.methods.as_ref().is_some_and(Vec::is_empty)),
            ("paths", rule.paths.as_ref().is_some_and(Vec::is_empty)),
            ("schemes", rule.schemes.as_ref().is_some_and(Vec::is_empty)),
            ("headers", rule.headers.as_ref().is_some_and(std::collections::BTreeMap::is_empty)),
        ] {
            if empty {
                return Err(fail(format!("`{field}` is empty, so the rule could never match; omit it to match any")));
            }
        }
        for method in rule.methods.iter().flatten() {
            if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic() || b == b'-') {
                return Err(fail(format!("method {method:?} is not an HTTP method token")));
            }
        }
        for path in rule.paths.iter().flatten() {
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                return Err(fail(format!("path {path:?} must start with '/' and contain no spaces")));
            }
        }
        for header in rule.headers.iter().flat_map(|h| h.keys()) {
            if hyper::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
                return Err(fail(format!("{header:?} is not an HTTP header name")));
            }
        }
        if rule.max_body.is_some() && rule.action == Action::Deny {
            return Err(fail(
                "`max_body` limits what an allow or ask rule lets through; a deny rule cannot have it".into(),
            ));
        }
        for host in rule.hosts.iter().flatten() {
            if let HostPatternKind::Alias(alias) = host.kind() {
                if !self.aliases.contains_key(alias) {
                    return Err(fail(format!(
                        "host alias @{alias} is not defined; add it to the profile's [aliases] table"
                    )));
                }
            }
        }
        if rule.tls == Some(TlsMode::Passthrough) {
            if rule.action != Action::Allow {
                return Err(fail("`tls = \"passthrough\"` only makes sense on an allow rule".into()));
            }
            if rule.has_request_conditions() {
                return Err(fail(
                    "a passthrough rule cannot have `methods`, `paths`, `schemes`, `headers` or `max_body`: \
                     its requests are never seen"
                        .into(),
                ));
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Host patterns

/// What a host pattern matches, after normalisation (lower case, no trailing dot).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPatternKind {
    /// `*`: any name.
    Any,
    /// `example.com`: that name only.
    Exact(String),
    /// `*.example.com`: strict subdomains at any depth; holds `example.com`.
    Subdomains(String),
    /// Other shapes with `*` or `?`, where a wildcard never crosses a dot.
    Glob(String),
    /// `@name`: the patterns the profile's `[aliases]` table gives `name`.
    Alias(String),
}

/// A validated host pattern. Written as a string in profiles.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPattern {
    kind: HostPatternKind,
}

impl HostPattern {
    pub fn kind(&self) -> &HostPatternKind {
        &self.kind
    }
}

impl FromStr for HostPattern {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        if raw.is_empty() {
            return Err("host pattern is empty".into());
        }
        if raw.chars().any(char::is_whitespace) {
            return Err(format!("host pattern {raw:?} contains whitespace"));
        }
        let lower = raw.to_ascii_lowercase();
        if let Some(alias) = lower.strip_prefix('@') {
            if !alias_name_ok(alias) {
                return Err(format!("host alias {raw:?} must be '@' and letters, digits, '-', '_' or '.'"));
            }
            return Ok(Self { kind: HostPatternKind::Alias(alias.to_owned()) });
        }
        let pattern = lower.strip_suffix('.').unwrap_or(&lower);
        if pattern == "*" {
            return Ok(Self { kind: HostPatternKind::Any });
        }
        if let Some(bad) =
            pattern.chars().find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*' | '?')))
        {
            return Err(format!(
                "host pattern {raw:?} contains {bad:?}; only letters, digits, '-', '_', '.' \
                 and the wildcards '*' and '?' are allowed (write IDNs in punycode)"
            ));
        }
        if pattern.split('.').any(str::is_empty) {
            return Err(format!("host pattern {raw:?} has an empty label"));
        }
        if pattern.contains("**") {
            return Err(format!("host pattern {raw:?} uses '**'; write '*.{{domain}}' for subdomains at any depth"));
        }
        if pattern.len() > MAX_NAME_LEN {
            return Err(format!("host pattern {raw:?} is longer than {MAX_NAME_LEN} characters"));
        }
        let has_wildcard = |s: &str| s.contains(['*', '?']);
        let kind = match pattern.strip_prefix("*.") {
            Some(suffix) if !has_wildcard(suffix) => HostPatternKind::Subdomains(suffix.to_owned()),
            _ if has_wildcard(pattern) => HostPatternKind::Glob(pattern.to_owned()),
            _ => HostPatternKind::Exact(pattern.to_owned()),
        };
        Ok(Self { kind })
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            HostPatternKind::Any => f.write_str("*"),
            HostPatternKind::Exact(name) | HostPatternKind::Glob(name) => f.write_str(name),
            HostPatternKind::Subdomains(suffix) => write!(f, "*.{suffix}"),
            HostPatternKind::Alias(name) => write!(f, "@{name}"),
        }
    }
}

pub(crate) fn alias_name_ok(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// DNS limit on a full name in text form (without the trailing dot).
pub(crate) const MAX_NAME_LEN: usize = 253;

// ---------------------------------------------------------------------------
// IP patterns

/// A validated IP network. Written as `"10.0.0.0/8"`, `"fd00::/8"` or a bare
/// address (a /32 or /128). IPv4-mapped IPv6 networks (`::ffff:a.b.c.d/n`,
/// n >= 96) are stored as the IPv4 network they mean, because destinations are
/// canonicalised the same way before matching. Two words name address
/// classes: `"private"` (loopback, unspecified, RFC 1918, carrier-grade NAT,
/// link-local and the metadata service, unique-local, multicast and reserved
/// space: [`PRIVATE_NETWORKS`]) and `"public"` (every other address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpPattern {
    kind: IpKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum IpKind {
    Net(IpNet),
    Private,
    Public,
}

/// What `"private"` means in an `ips` list: the address space a sandbox
/// should never reach by accident. Benchmarking (198.18.0.0/15) and
/// documentation ranges are not in it.
pub const PRIVATE_NETWORKS: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// Inclusive ranges, IPv4 and IPv6, an `ips` pattern covers.
pub(crate) struct IpRanges {
    pub v4: Vec<(u32, u32)>,
    pub v6: Vec<(u128, u128)>,
}

impl IpPattern {
    /// The network, for a pattern that is one.
    pub fn net(&self) -> Option<IpNet> {
        match self.kind {
            IpKind::Net(net) => Some(net),
            IpKind::Private | IpKind::Public => None,
        }
    }

    pub(crate) fn ranges(&self) -> IpRanges {
        let mut ranges = IpRanges { v4: Vec::new(), v6: Vec::new() };
        let mut add = |net: IpNet| match net {
            IpNet::V4(net) => ranges.v4.push((u32::from(net.network()), u32::from(net.broadcast()))),
            IpNet::V6(net) => ranges.v6.push((u128::from(net.network()), u128::from(net.broadcast()))),
        };
        match self.kind {
            IpKind::Net(net) => add(net),
            IpKind::Private | IpKind::Public => {
                for net in PRIVATE_NETWORKS {
                    add(net.parse().expect("valid built-in network"));
                }
            }
        }
        if self.kind == IpKind::Public {
            ranges.v4 = complement(ranges.v4, u32::MAX);
            ranges.v6 = complement(ranges.v6, u128::MAX);
        }
        ranges
    }
}

/// The ranges of `0..=max` not covered by `ranges`.
fn complement<T>(mut ranges: Vec<(T, T)>, max: T) -> Vec<(T, T)>
where
    T: Copy + Ord + From<u8> + std::ops::Add<Output = T> + std::ops::Sub<Output = T>,
{
    ranges.sort_unstable();
    let one = T::from(1);
    let mut out = Vec::new();
    let mut next = Some(T::from(0));
    for (lo, hi) in ranges {
        if let Some(start) = next {
            if lo > start {
                out.push((start, lo - one));
            }
            if hi >= start {
                next = (hi < max).then(|| hi + one);
            }
        }
    }
    if let Some(start) = next {
        out.push((start, max));
    }
    out
}

impl FromStr for IpPattern {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        match raw {
            "private" => return Ok(Self { kind: IpKind::Private }),
            "public" => return Ok(Self { kind: IpKind::Public }),
            _ => {}
        }
        let net = if raw.contains('/') {
            let net: IpNet = raw.parse().map_err(|_| format!("{raw:?} is not an IP network in CIDR notation"))?;
            // A set host part is usually a typo for a different network; refusing
            // is safer than guessing which one was meant.
            if net.trunc() != net {
                return Err(format!("{raw:?} has host bits set; did you mean \"{}\"?", net.trunc()));
            }
            net
        } else {
            let addr: IpAddr = raw
                .parse()
                .map_err(|_| format!("{raw:?} is not an IP address, a CIDR network, \"private\" or \"public\""))?;
            IpNet::from(addr)
        };
        Ok(Self { kind: IpKind::Net(canonical_net(net)) })
    }
}

fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

impl fmt::Display for IpPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Single addresses print bare, as they are usually written.
        match self.kind {
            IpKind::Private => f.write_str("private"),
            IpKind::Public => f.write_str("public"),
            IpKind::Net(IpNet::V4(n)) if n.prefix_len() == 32 => n.addr().fmt(f),
            IpKind::Net(IpNet::V6(n)) if n.prefix_len() == 128 => n.addr().fmt(f),
            IpKind::Net(net) => net.fmt(f),
        }
    }
}

impl From<IpNet> for IpPattern {
    fn from(net: IpNet) -> Self {
        Self { kind: IpKind::Net(canonical_net(net.trunc())) }
    }
}

impl From<Ipv4Net> for IpPattern {
    fn from(net: Ipv4Net) -> Self {
        Self { kind: IpKind::Net(IpNet::V4(net.trunc())) }
    }
}

impl From<Ipv6Net> for IpPattern {
    fn from(net: Ipv6Net) -> Self {
        Self { kind: IpKind::Net(canonical_net(IpNet::V6(net.trunc()))) }
    }
}

// ---------------------------------------------------------------------------
// Port ranges

/// An inclusive range of destination ports within 1..=65535. Written as an
/// integer (`443`) or a string (`"8000-8100"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    lo: u16,
    hi: u16,
}

impl PortRange {
    pub fn new(lo: u16, hi: u16) -> Result<Self, String> {
        if lo == 0 || hi == 0 {
            return Err("port 0 is not a destination port; ports are 1-65535".into());
        }
        if lo > hi {
            return Err(format!("port range {lo}-{hi} is reversed"));
        }
        Ok(Self { lo, hi })
    }

    pub fn single(port: u16) -> Result<Self, String> {
        Self::new(port, port)
    }

    pub fn lo(&self) -> u16 {
        self.lo
    }

    pub fn hi(&self) -> u16 {
        self.hi
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.lo..=self.hi).contains(&port)
    }
}

fn port_number(value: i64) -> Result<u16, String> {
    u16::try_from(value).map_err(|_| format!("port {value} is out of range 1-65535"))
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, String> {
        let number = |s: &str| {
            let s = s.trim();
            s.parse::<i64>()
                .map_err(|_| format!("port range {raw:?} is not \"lo-hi\" or a port number"))
                .and_then(port_number)
        };
        match raw.split_once('-') {
            Some((lo, hi)) => Self::new(number(lo)?, number(hi)?),
            None => Self::single(number(raw)?),
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

// ---------------------------------------------------------------------------
// Serde for the validated leaf types: strings (or ints, for ports) on the wire.

impl Serialize for HostPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for IpPattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.lo == self.hi {
            s.serialize_u16(self.lo)
        } else {
            s.collect_str(self)
        }
    }
}

/// Deserializes any `FromStr<Err = String>` type from a string, keeping the
/// parse message so the TOML error can point at the value.
struct FromStrVisitor<T>(std::marker::PhantomData<T>, &'static str);

impl<T: FromStr<Err = String>> de::Visitor<'_> for FromStrVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor(std::marker::PhantomData, "a host name pattern string"))
    }
}

impl<'de> Deserialize<'de> for IpPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(FromStrVisitor(std::marker::PhantomData, "an IP address or CIDR string"))
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;

        impl de::Visitor<'_> for PortVisitor {
            type Value = PortRange;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a \"lo-hi\" range string")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                port_number(v).and_then(PortRange::single).map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
                v.parse().map_err(E::custom)
            }
        }

        d.deserialize_any(PortVisitor)
    }
}

// ---------------------------------------------------------------------------
// JSON Schema for the validated leaf types (`sluice policy schema`).

impl JsonSchema for HostPattern {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "HostPattern".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A host name (`example.com`), its subdomains at any depth (`*.example.com`), \
                any name (`*`), a glob whose wildcards stay inside one label (`api-*.example.com`), or an \
                alias from [aliases] (`@name`).",
            "pattern": "^(@[A-Za-z0-9._-]+|[A-Za-z0-9._*?-]+\\.?)$"
        })
    }
}

impl JsonSchema for IpPattern {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "IpPattern".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "An IP address, a CIDR network (`10.0.0.0/8`, `fd00::/8`), or the address \
                classes `private` and `public`."
        })
    }
}

impl JsonSchema for PortRange {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortRange".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A port (443) or an inclusive range (\"8000-8100\").",
            "oneOf": [
                { "type": "integer", "minimum": 1, "maximum": 65535 },
                { "type": "string", "pattern": "^[0-9]{1,5}(-[0-9]{1,5})?$" }
            ]
        })
    }
}

impl JsonSchema for ByteSize {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ByteSize".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A size in bytes (1048576) or with a unit (\"1MiB\", \"512KB\").",
            "oneOf": [
                { "type": "integer", "minimum": 0 },
                { "type": "string", "pattern": "^[0-9]+ ?([KMG]i?B|B)?$" }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_pattern_kinds() {
        let kind = |s: &str| s.parse::<HostPattern>().unwrap().kind;
        assert_eq!(kind("*"), HostPatternKind::Any);
        assert_eq!(kind("*."), HostPatternKind::Any);
        assert_eq!(kind("Example.COM."), HostPatternKind::Exact("example.com".into()));
        assert_eq!(kind("*.Example.com"), HostPatternKind::Subdomains("example.com".into()));
        assert_eq!(kind("api-*.example.com"), HostPatternKind::Glob("api-*.example.com".into()));
        assert_eq!(kind("*.*.example.com"), HostPatternKind::Glob("*.*.example.com".into()));
        assert_eq!(kind("@PyPI"), HostPatternKind::Alias("pypi".into()));
        assert!("@".parse::<HostPattern>().is_err());
        assert!("@a b".parse::<HostPattern>().is_err());
    }

    #[test]
    fn byte_sizes() {
        let size = |s: &str| s.parse::<ByteSize>().map(|b| b.0);
        assert_eq!(size("1048576"), Ok(1_048_576));
        assert_eq!(size("1MiB"), Ok(1 << 20));
        assert_eq!(size("2 KB"), Ok(2000));
        assert_eq!(size("3gib"), Ok(3 << 30));
        assert!(size("1 parsec").unwrap_err().contains("unknown unit"));
        assert!(size("MiB").is_err());
        assert!(size("99999999999999GiB").unwrap_err().contains("too large"));
    }

    #[test]
    fn address_classes_split_the_address_space() {
        let ranges = |s: &str| s.parse::<IpPattern>().unwrap().ranges();
        let (private, public) = (ranges("private"), ranges("public"));
        let covered = |r: &[(u32, u32)]| r.iter().map(|(lo, hi)| u64::from(hi - lo) + 1).sum::<u64>();
        assert_eq!(covered(&private.v4) + covered(&public.v4), 1 << 32, "v4 classes must tile the space");
        let inside = |r: &[(u32, u32)], a: &str| {
            let a = u32::from(a.parse::<std::net::Ipv4Addr>().unwrap());
            r.iter().any(|&(lo, hi)| (lo..=hi).contains(&a))
        };
        for a in ["10.1.2.3", "127.0.0.1", "169.254.169.254", "0.0.0.0", "255.255.255.255", "100.64.0.1"] {
            assert!(inside(&private.v4, a) && !inside(&public.v4, a), "{a}");
        }
        for a in ["1.1.1.1", "198.18.0.1", "9.255.255.255", "11.0.0.0", "223.255.255.255"] {
            assert!(inside(&public.v4, a) && !inside(&private.v4, a), "{a}");
        }
        assert!(public
            .v6
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&u128::from("2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap()))));
        assert_eq!("public".parse::<IpPattern>().unwrap().to_string(), "public");
    }

    #[test]
    fn host_pattern_rejects_bad_shapes() {
        for bad in ["", " ", "exa mple.com", "a..b", ".a", "**.a", "a/b", "[ab].c", "é.com"] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn ip_pattern_forms() {
        let net = |s: &str| s.parse::<IpPattern>().unwrap().net().unwrap().to_string();
        assert_eq!(net("192.0.2.7"), "192.0.2.7/32");
        assert_eq!(net("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(net("fd00::/8"), "fd00::/8");
        assert_eq!(net("::1"), "::1/128");
        assert_eq!(net("::ffff:10.0.0.0/104"), "10.0.0.0/8");
        assert_eq!(net("::ffff:0:0/96"), "0.0.0.0/0");
        assert!("10.0.0.1/8".parse::<IpPattern>().unwrap_err().contains("10.0.0.0/8"));
        assert!("10.0.0.0/33".parse::<IpPattern>().is_err());
        assert!("example.com".parse::<IpPattern>().is_err());
    }

    #[test]
    fn port_range_forms() {
        assert_eq!("443".parse::<PortRange>(), PortRange::single(443));
        assert_eq!("8000-8100".parse::<PortRange>(), PortRange::new(8000, 8100));
        assert!("0".parse::<PortRange>().is_err());
        assert!("0-10".parse::<PortRange>().is_err());
        assert!("10-9".parse::<PortRange>().is_err());
        assert!("1-65536".parse::<PortRange>().is_err());
        assert!("http".parse::<PortRange>().is_err());
    }

    #[test]
    fn profile_round_trips_through_serde() {
        let text = r#"
            name = "p"
            [[rule]]
            action = "allow"
            hosts = ["*.example.com", "a.b"]
            ips = ["10.0.0.0/8", "192.0.2.7"]
            ports = [443, "8000-8100"]
        "#;
        let profile: Profile = toml::from_str(text).unwrap();
        let again: Profile = toml::from_str(&toml::to_string(&profile).unwrap()).unwrap();
        assert_eq!(profile, again);
        let rule = toml::to_string(&profile.rules[0]).unwrap();
        assert!(rule.contains(r#"ports = [443, "8000-8100"]"#), "{rule}");
        assert!(rule.contains(r#""192.0.2.7""#), "{rule}");
    }

    #[test]
    fn check_rejects_duplicate_reserved_and_empty() {
        let parse = |text: &str| toml::from_str::<Profile>(text).unwrap().check();
        let dup = parse("name='p'\n[[rule]]\nname='rule-2'\naction='allow'\n[[rule]]\naction='deny'\n");
        assert!(matches!(&dup, Err(ProfileProblem::Rule { index: 1, name, .. }) if name == "rule-2"), "{dup:?}");
        let reserved = parse("name='p'\n[[rule]]\nname='default-deny'\naction='deny'\n");
        assert!(matches!(reserved, Err(ProfileProblem::Rule { index: 0, .. })));
        let empty = parse("name='p'\n[[rule]]\naction='allow'\nports=[]\n");
        assert!(matches!(empty, Err(ProfileProblem::Rule { problem, .. }) if problem.contains("ports")));
        assert_eq!(parse("name=' '\n"), Err(ProfileProblem::EmptyProfileName));
        assert_eq!(parse("name='p'\n[[rule]]\naction='deny'\n"), Ok(()));
    }
}
