//! Connect-level policy: which connections a sandbox may make.
//!
//! This module owns the profile format (TOML, [`Profile`]), its validation,
//! and the compiled [`Policy`] the proxy asks for a [`Decision`] on every
//! redirected `connect()`. It does no IO beyond reading a profile file.
//!
//! Semantics:
//! - Deny by default: with no matching allow rule the verdict is Deny by
//!   `default-deny`.
//! - A rule matches when each condition it has (`hosts`, `ips`, `ports`)
//!   matches; an absent condition matches anything, so a rule with no
//!   conditions matches every connection.
//! - Forbid wins: any matching deny rule (the first in file order) decides,
//!   even when allow rules also match; otherwise the first matching allow rule.
//! - Hosts are compared case-insensitively without a trailing dot.
//!   `example.com` is exact, `*.example.com` matches subdomains at any depth but
//!   not `example.com`, `*` matches any name, and other `*`/`?` globs never
//!   cross a dot. A host condition never matches a connection whose name is
//!   unknown; an IP literal given as the name counts as unknown. A name that is
//!   not a valid DNS name is denied outright.
//! - IPs are the real destination, with IPv4-mapped IPv6 treated as IPv4.
//! - Request paths are matched as an upstream would read them (see
//!   [`path`]): normalised (escapes of unreserved characters decoded, dot
//!   segments removed, duplicate slashes merged), and decided on every
//!   reading a server may apply (`%2F` as `/`, `;params` cut); the strictest
//!   outcome stands. A malformed path is refused (`invalid-path`).
//! - Header conditions: names compare case-insensitively; the values of
//!   media-type headers (`Content-Type`, `Accept`) too, others exactly. A
//!   header sent more than once is read strictly: an allow or ask rule's
//!   condition needs every value to match, a deny rule's any value.
//!
//! ```toml
//! name = "example"
//! [[rule]]
//! name = "web"
//! action = "allow"
//! hosts = ["*.example.com"]
//! ports = [443, "8000-8100"]
//! ```

pub mod bundles;
mod compile;
mod error;
mod explain;
mod host_glob;
mod model;
pub mod path;

use std::path::Path;

use serde::Deserialize;

pub use compile::{
    ConnectQuery, Decision, Labels, Policy, RequestInfo, Revoked, Verdict, INVALID_PATH, NO_HOSTS_NAMED,
};
pub use error::{Location, PolicyError, RuleRef};
pub use explain::{explain_url, parse_verdict, Explanation, ASSUMED_IP};
pub use model::{
    Action, ByteSize, CredentialSpec, HostPattern, HostPatternKind, IpPattern, Mode, PortRange, Profile, RuleSpec,
    Scheme, TlsMode, DEFAULT_DENY, PRIVATE_NETWORKS,
};

/// Text of the built-in default profile (`sluice policy default` prints it).
pub const BUILTIN_DEFAULT_TOML: &str = include_str!("default.toml");

/// Parses and validates a profile; `origin` (usually the file name) prefixes
/// error messages. A profile returned here always compiles. A profile with
/// `include` must be read with [`load_profile`], which resolves it.
pub fn parse_profile(text: &str, origin: &str) -> Result<Profile, PolicyError> {
    let profile = parse_unresolved(text, origin)?;
    // Compiling is cheap and is the only way to be sure every check ran.
    Policy::compile_located(&profile, origin, &|index| locate_rule(text, index), &Revoked::default(), &Labels::new())?;
    Ok(profile)
}

/// The TOML parse and the profile's own checks, with `include` left as it is.
fn parse_unresolved(text: &str, origin: &str) -> Result<Profile, PolicyError> {
    let profile: Profile = toml::from_str(text).map_err(|err| {
        let offset = err.span().map(|span| span.start);
        PolicyError::Parse {
            origin: origin.to_owned(),
            location: offset.map(|offset| Location::of_offset(text, offset)),
            rule: offset.and_then(|offset| RuleHeaders::read(text).rule_at(text, offset)),
            message: err.message().trim_end().to_owned(),
        }
    })?;
    profile.check().map_err(|problem| PolicyError::from_problem(origin, |index| locate_rule(text, index), problem))?;
    Ok(profile)
}

/// Where the rule at `index` starts; only read on the error path.
fn locate_rule(text: &str, index: usize) -> Option<Location> {
    RuleHeaders::read(text).rule.get(index).map(|rule| Location::of_offset(text, rule.span().start))
}

/// Reads a profile file, with the files it includes (relative to its
/// directory, at most 8 deep, no cycles) merged in: their rules follow its
/// own, and bundles, aliases and credentials are added. Rule names must stay
/// unique across all of them.
///
/// Every file read must be one only root can change (see
/// [`check_trusted`]); this is the load the daemon and `sluice run` use.
pub fn load_profile(path: &Path) -> Result<Profile, PolicyError> {
    load_checked(path, Trust::Required)
}

/// [`load_profile`] without the ownership checks, for tools that only read
/// a profile to report on it (`sluice policy check`, `test`, `replay`).
pub fn load_profile_untrusted(path: &Path) -> Result<Profile, PolicyError> {
    load_checked(path, Trust::NotRequired)
}

/// Whether profile files must pass [`check_trusted`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Trust {
    Required,
    NotRequired,
}

/// Refuses a profile file that anyone but root (or the user sluice runs
/// as) could change: the file must be owned by root and not writable by
/// group or others, and its directory not writable by group or others (a
/// writable directory lets the file be replaced). The error names the file
/// and the command that fixes it.
pub fn check_trusted(path: &Path) -> Result<(), PolicyError> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: plain syscall without arguments.
    let own_uid = unsafe { libc::geteuid() };
    let untrusted = |problem: String, fix: String| PolicyError::Untrusted { path: path.to_owned(), problem, fix };
    let meta = std::fs::metadata(path).map_err(|source| PolicyError::Read { path: path.to_owned(), source })?;
    if meta.uid() != 0 && meta.uid() != own_uid {
        return Err(untrusted(
            format!("it is owned by uid {}, not root", meta.uid()),
            format!("`chown root {}`", path.display()),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(
            format!("it is writable by {} (mode {:o})", writable_by(meta.mode()), meta.mode() & 0o7777),
            format!("`chmod go-w {}`", path.display()),
        ));
    }
    // The directory the name is in, and the one the file really is in.
    let parent = |p: &Path| match p.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    let mut dirs = vec![parent(path)];
    if let Ok(real) = path.canonicalize() {
        let real_dir = parent(&real);
        if !dirs.contains(&real_dir) {
            dirs.push(real_dir);
        }
    }
    for dir in &dirs {
        let dir_meta = std::fs::metadata(dir).map_err(|source| PolicyError::Read { path: dir.clone(), source })?;
        if dir_meta.mode() & 0o022 == 0 {
            continue;
        }
        return Err(untrusted(
            format!(
                "its directory {} is writable by {} (mode {:o}), so the file can be replaced",
                dir.display(),
                writable_by(dir_meta.mode()),
                dir_meta.mode() & 0o7777
            ),
            format!("`chmod go-w {}` or move the profile to a directory only root can write", dir.display()),
        ));
    }
    Ok(())
}

fn writable_by(mode: u32) -> &'static str {
    match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (true, true) => "group and others",
        (true, false) => "its group",
        _ => "others",
    }
}

fn load_checked(path: &Path, trust: Trust) -> Result<Profile, PolicyError> {
    let mut chain = Vec::new();
    let profile = load_resolved(path, &mut chain, trust)?;
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    Policy::compile_located(
        &profile,
        &origin,
        &|index| locate_rule(&text, index),
        &Revoked::default(),
        &Labels::new(),
    )?;
    Ok(profile)
}

const MAX_INCLUDE_DEPTH: usize = 8;

fn load_resolved(path: &Path, chain: &mut Vec<std::path::PathBuf>, trust: Trust) -> Result<Profile, PolicyError> {
    if trust == Trust::Required {
        check_trusted(path)?;
    }
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read { path: path.to_owned(), source })?;
    let origin = path.display().to_string();
    let mut profile = parse_unresolved(&text, &origin)?;
    if profile.include.is_empty() {
        return Ok(profile);
    }
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    if chain.contains(&canonical) || chain.len() >= MAX_INCLUDE_DEPTH {
        let route: Vec<String> = chain.iter().map(|p| p.display().to_string()).collect();
        return Err(PolicyError::Profile {
            origin,
            message: format!("includes go round in a cycle or deeper than {MAX_INCLUDE_DEPTH}: {}", route.join(" -> ")),
        });
    }
    chain.push(canonical);
    let dir = path.parent().unwrap_or(Path::new("."));
    for include in std::mem::take(&mut profile.include) {
        let included_path = dir.join(&include);
        let included = load_resolved(&included_path, chain, trust)?;
        merge(&mut profile, included, &origin, &included_path.display().to_string())?;
    }
    chain.pop();
    Ok(profile)
}

/// Adds `included` to `profile`, refusing anything that would make a
/// decision ambiguous.
fn merge(profile: &mut Profile, included: Profile, origin: &str, from: &str) -> Result<(), PolicyError> {
    let fail = |message: String| PolicyError::Profile { origin: origin.to_owned(), message };
    let own_names: std::collections::HashSet<String> =
        profile.rules.iter().enumerate().map(|(i, r)| r.effective_name(i)).collect();
    let offset = profile.rules.len();
    for (index, mut rule) in included.rules.into_iter().enumerate() {
        let name = rule.effective_name(index);
        if own_names.contains(&name) {
            return Err(fail(format!("rule {name:?} from {from} has the name of a rule already in the profile")));
        }
        // Unnamed rules would be renumbered; keep the name they had.
        rule.name = Some(name);
        profile.rules.push(rule);
    }
    debug_assert!(profile.rules.len() >= offset);
    for bundle in included.bundles {
        if !profile.bundles.contains(&bundle) {
            profile.bundles.push(bundle);
        }
    }
    for (alias, hosts) in included.aliases {
        match profile.aliases.get(&alias) {
            Some(existing) if *existing != hosts => {
                return Err(fail(format!("alias @{alias} from {from} differs from the profile's own")));
            }
            _ => {
                profile.aliases.insert(alias, hosts);
            }
        }
    }
    for credential in included.credentials {
        if profile.credentials.iter().any(|c| c.secret == credential.secret) {
            return Err(fail(format!("secret {:?} from {from} is already bound by the profile", credential.secret)));
        }
        profile.credentials.push(credential);
    }
    Ok(())
}

/// The JSON Schema of the profile format (TOML files map onto it one to
/// one), for editors and for checking profiles in CI.
pub fn json_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Profile)).expect("a schema is JSON")
}

/// The profile `sluice run` uses without `--profile`: web ports to public
/// addresses, nothing internal. See `default.toml`.
pub fn builtin_default() -> Profile {
    // The file ships inside the binary and a test parses it, so failing here
    // is a build defect, not bad input.
    parse_profile(BUILTIN_DEFAULT_TOML, "builtin default.toml").expect("the built-in default profile is valid")
}

/// Where each `[[rule]]` starts, read leniently so that an error found by
/// the strict parse can say which rule it is in.
#[derive(Deserialize, Default)]
struct RuleHeaders {
    #[serde(default)]
    rule: Vec<toml::Spanned<toml::Table>>,
}

impl RuleHeaders {
    fn read(text: &str) -> Self {
        toml::from_str(text).unwrap_or_default()
    }

    /// The rule whose text contains byte `offset`, if any. A `[[rule]]`
    /// table's span is its header, so it runs until the next table header;
    /// an inline table's span is the whole table.
    fn rule_at(&self, text: &str, offset: usize) -> Option<RuleRef> {
        let index = self.rule.iter().rposition(|rule| rule.span().start <= offset)?;
        let span = self.rule[index].span();
        let body = text.get(span.clone())?;
        let inside = if offset < span.end {
            true
        } else if body.starts_with('{') {
            false
        } else {
            text.get(span.end..offset)
                .is_some_and(|between| !between.lines().any(|line| line.trim_start().starts_with('[')))
        };
        if !inside {
            return None;
        }
        let name = match self.rule[index].get_ref().get("name") {
            Some(toml::Value::String(name)) => name.clone(),
            _ => model::default_rule_name(index),
        };
        Some(RuleRef { index: index + 1, name })
    }
}

#[cfg(test)]
mod tests;
