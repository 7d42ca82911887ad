//! Putting secrets into one request: what the sandbox's bindings allow for
//! this host, method and path, over this connection.
//!
//! Placeholders anywhere in the head (headers, query) are swapped for their
//! secrets when in scope, and refuse the request otherwise. Bindings with an
//! `inject` kind then set their header or query parameter whether or not
//! the sandbox sent a placeholder, replacing whatever it sent. Bodies and
//! `SigV4` signing are done by [`super::body`] and [`super::sigv4`] with what
//! this module decides.

use std::collections::BTreeMap;

use base64::Engine as _;
use hyper::{
    header::{HeaderValue, AUTHORIZATION},
    http::request::Parts,
    Uri,
};
use memchr::memmem;
use zeroize::Zeroizing;

use super::{
    binding::{Injection, SigV4Spec, SECRET_MARK},
    bound_to, Leak, Secret, SecretStore, PLACEHOLDER_PREFIX, PLACEHOLDER_RANDOM,
};
use crate::policy::CredentialSpec;

/// Length of a whole placeholder.
pub const PLACEHOLDER_LEN: usize = PLACEHOLDER_PREFIX.len() + PLACEHOLDER_RANDOM;

/// The request as bindings see it.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    /// Whether the upstream connection is TLS: secrets never go without it.
    pub tls: bool,
}

/// One sandbox's bindings, placeholders and the daemon's secrets, for one
/// request.
pub struct RequestCredentials<'a> {
    pub specs: &'a [CredentialSpec],
    pub placeholders: &'a BTreeMap<String, String>,
    pub secrets: &'a SecretStore,
    pub target: Target<'a>,
}

/// Secrets put into a request: names for the audit record (with where they
/// went), and (value, placeholder) pairs to scrub from the response.
#[derive(Debug, Default)]
pub struct Applied {
    pub names: Vec<String>,
    pub scrub: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Applied {
    pub fn add(&mut self, name: &str, secret: &Secret, placeholder: Option<&String>) {
        self.add_values(name, &[secret.expose()], placeholder);
    }

    /// Records `name` and scrubs each of `values` (pieces of its secret).
    pub fn add_values(&mut self, name: &str, values: &[&str], placeholder: Option<&String>) {
        if !self.names.iter().any(|n| n == name) {
            self.names.push(name.to_owned());
        }
        let placeholder = placeholder.map_or_else(|| b"<secret>".to_vec(), |p| p.as_bytes().to_vec());
        for value in values.iter().map(|v| v.as_bytes()) {
            if !value.is_empty() && !self.scrub.iter().any(|(v, _)| v == value) {
                self.scrub.push((value.to_vec(), placeholder.clone()));
            }
        }
    }

    pub fn merge(&mut self, other: Applied) {
        for name in other.names {
            if !self.names.contains(&name) {
                self.names.push(name);
            }
        }
        self.scrub.extend(other.scrub);
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Whether `token` (exactly [`PLACEHOLDER_LEN`] bytes) has a placeholder's shape.
pub fn is_placeholder(token: &[u8]) -> bool {
    token.len() == PLACEHOLDER_LEN
        && token.starts_with(PLACEHOLDER_PREFIX.as_bytes())
        && token[PLACEHOLDER_PREFIX.len()..].iter().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(b))
}

impl<'a> RequestCredentials<'a> {
    /// Whether `spec` applies to this request (host, method and path).
    fn in_scope(&self, spec: &CredentialSpec) -> bool {
        bound_to(spec, self.target.host)
            && spec.methods.as_ref().is_none_or(|m| m.iter().any(|m| m.eq_ignore_ascii_case(self.target.method)))
            && spec.paths.as_ref().is_none_or(|paths| paths.matches(self.target.path))
    }

    /// Whether `secret` may go into this request.
    fn permit(&self, secret: &str) -> Result<(), Leak> {
        let bound: Vec<&CredentialSpec> =
            self.specs.iter().filter(|s| s.secret == secret && bound_to(s, self.target.host)).collect();
        if bound.is_empty() {
            return Err(Leak::Unbound { secret: secret.to_owned(), host: self.target.host.to_owned() });
        }
        if !bound.iter().any(|spec| self.in_scope(spec)) {
            return Err(Leak::OutOfScope {
                secret: secret.to_owned(),
                method: self.target.method.to_owned(),
                path: self.target.path.to_owned(),
            });
        }
        if !self.target.tls {
            return Err(Leak::Cleartext { host: self.target.host.to_owned() });
        }
        Ok(())
    }

    /// The secret a placeholder stands for, if it may go into this request.
    pub fn resolve(&self, token: &[u8]) -> Result<(&'a str, &'a Secret), Leak> {
        let (name, _) = self.placeholders.iter().find(|(_, p)| p.as_bytes() == token).ok_or(Leak::Foreign)?;
        self.permit(name)?;
        Ok((name.as_str(), self.secrets.lookup(name)?))
    }

    /// `data` with every placeholder swapped, or `None` when it holds none.
    pub fn swap(&self, data: &[u8], applied: &mut Applied) -> Result<Option<Vec<u8>>, Leak> {
        let mut out = Vec::new();
        let mut copied = 0;
        for start in memmem::find_iter(data, PLACEHOLDER_PREFIX.as_bytes()) {
            let Some(token) = data.get(start..start + PLACEHOLDER_LEN).filter(|t| is_placeholder(t)) else {
                continue;
            };
            if start < copied {
                continue;
            }
            let (name, secret) = self.resolve(token)?;
            out.extend_from_slice(&data[copied..start]);
            out.extend_from_slice(secret.expose().as_bytes());
            copied = start + PLACEHOLDER_LEN;
            applied.add(name, secret, self.placeholders.get(name));
        }
        if copied == 0 {
            return Ok(None);
        }
        out.extend_from_slice(&data[copied..]);
        Ok(Some(out))
    }

    /// Swaps placeholders in the head and applies `inject` bindings in scope.
    pub fn apply_to_head(&self, parts: &mut Parts, applied: &mut Applied) -> Result<(), Leak> {
        for value in parts.headers.values_mut() {
            if memmem::find(value.as_bytes(), PLACEHOLDER_PREFIX.as_bytes()).is_none() {
                continue;
            }
            if let Some(swapped) = self.swap(value.as_bytes(), applied)? {
                *value = HeaderValue::from_bytes(&swapped).map_err(|_| unusable(applied, "not valid in a header"))?;
            }
        }
        if let Some(pq) = parts.uri.path_and_query().map(|pq| pq.as_str().to_owned()) {
            if let Some(swapped) = self.swap(pq.as_bytes(), applied)? {
                let swapped = String::from_utf8(swapped).map_err(|_| unusable(applied, "not valid in a URL"))?;
                set_path_and_query(&mut parts.uri, &swapped).map_err(|()| unusable(applied, "not valid in a URL"))?;
            }
        }
        for spec in self.specs.iter().filter(|spec| self.in_scope(spec)) {
            let Some(kind) = spec.inject.as_ref().and_then(super::InjectSpec::kind) else { continue };
            if matches!(kind, Injection::SigV4(_)) {
                continue;
            }
            if !self.target.tls {
                return Err(Leak::Cleartext { host: self.target.host.to_owned() });
            }
            let secret = self.secrets.lookup(&spec.secret)?;
            let invalid = |why: &str| Leak::Unusable { secret: spec.secret.clone(), why: why.to_owned() };
            match kind {
                Injection::Header { name, format } => {
                    let value = Zeroizing::new(format.replace(SECRET_MARK, secret.expose()));
                    let value = HeaderValue::from_str(&value).map_err(|_| invalid("not valid in a header"))?;
                    parts.headers.remove(&name);
                    parts.headers.insert(name, sensitive(value));
                }
                Injection::Basic { user } => {
                    let pair = Zeroizing::new(format!("{user}:{}", secret.expose()));
                    let encoded = base64::engine::general_purpose::STANDARD.encode(pair.as_bytes());
                    let value = HeaderValue::from_str(&format!("Basic {encoded}"))
                        .map_err(|_| invalid("not valid in a header"))?;
                    parts.headers.insert(AUTHORIZATION, sensitive(value));
                }
                Injection::Query { name, format } => {
                    let value = Zeroizing::new(format.replace(SECRET_MARK, secret.expose()));
                    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str()).to_owned();
                    let replaced = replace_query_param(&path_and_query, name, &value);
                    set_path_and_query(&mut parts.uri, &replaced).map_err(|()| invalid("not valid in a URL"))?;
                    // Upstreams echo URLs as they got them: scrub the encoded form too.
                    let encoded: String = percent_encoding::utf8_percent_encode(secret.expose(), QUERY_VALUE).collect();
                    let encoded = Zeroizing::new(encoded);
                    applied.add_values(&spec.secret, &[&encoded], self.placeholders.get(&spec.secret));
                }
                Injection::SigV4(_) => unreachable!("skipped above"),
            }
            applied.add(&spec.secret, secret, self.placeholders.get(&spec.secret));
        }
        Ok(())
    }

    /// The `SigV4` binding in scope for this request, with its secret.
    pub fn sigv4(&self) -> Result<Option<(&'a str, &'a SigV4Spec, &'a Secret)>, Leak> {
        for spec in self.specs.iter().filter(|spec| self.in_scope(spec)) {
            if let Some(sigv4) = spec.inject.as_ref().and_then(|inject| inject.sigv4.as_ref()) {
                if !self.target.tls {
                    return Err(Leak::Cleartext { host: self.target.host.to_owned() });
                }
                return Ok(Some((spec.secret.as_str(), sigv4, self.secrets.lookup(&spec.secret)?)));
            }
        }
        Ok(None)
    }

    /// What a body may carry, decided now for every placeholder of the
    /// sandbox (owned: the body streams after this request's head is gone).
    pub fn body_rules(&self) -> BodyRules {
        let table = self
            .placeholders
            .values()
            .map(|placeholder| {
                let outcome =
                    self.resolve(placeholder.as_bytes()).map(|(name, secret)| (name.to_owned(), secret.clone()));
                (placeholder.clone(), outcome)
            })
            .collect();
        BodyRules { table }
    }
}

/// For each of the sandbox's placeholders: its secret, or why a body may
/// not carry it here. Any other placeholder is foreign.
#[derive(Clone)]
pub struct BodyRules {
    table: Vec<(String, Verdict)>,
}

/// A placeholder's secret (name and value), or why it may not go.
type Verdict = Result<(String, Secret), Leak>;

impl BodyRules {
    pub fn resolve(&self, token: &[u8]) -> Result<(&str, &Secret), Leak> {
        match self.table.iter().find(|(placeholder, _)| placeholder.as_bytes() == token) {
            Some((_, Ok((name, secret)))) => Ok((name, secret)),
            Some((_, Err(leak))) => Err(leak.clone()),
            None => Err(Leak::Foreign),
        }
    }

    /// Whether any placeholder would be swapped (so a body may change length).
    pub fn may_swap(&self) -> bool {
        self.table.iter().any(|(_, outcome)| outcome.is_ok())
    }

    /// (secret, placeholder) pairs of every placeholder that would be
    /// swapped here: what a stream carrying them must scrub on the way back.
    pub fn swappable(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.table
            .iter()
            .filter_map(|(placeholder, outcome)| {
                let (_, secret) = outcome.as_ref().ok()?;
                Some((secret.expose().as_bytes().to_vec(), placeholder.as_bytes().to_vec()))
            })
            .collect()
    }

    pub fn placeholder_of(&self, name: &str) -> Option<&String> {
        self.table.iter().find(|(_, o)| o.as_ref().is_ok_and(|(n, _)| n == name)).map(|(p, _)| p)
    }
}

/// Header values that carry secrets are marked so HPACK never indexes them.
fn sensitive(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

fn unusable(applied: &Applied, why: &str) -> Leak {
    Leak::Unusable { secret: applied.names.join(", "), why: why.to_owned() }
}

fn set_path_and_query(uri: &mut Uri, path_and_query: &str) -> Result<(), ()> {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().map_err(|_| ())?);
    *uri = Uri::from_parts(parts).map_err(|_| ())?;
    Ok(())
}

/// Characters left as they are in a query value: RFC 3986 unreserved.
const QUERY_VALUE: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// `path?query` with every `name=...` parameter (however its name is
/// percent-encoded) replaced by one `name=value`.
pub fn replace_query_param(path_and_query: &str, name: &str, value: &str) -> String {
    let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or("");
            !pair.is_empty() && percent_encoding::percent_decode_str(&key.replace('+', " ")).decode_utf8_lossy() != name
        })
        .map(str::to_owned)
        .collect();
    pairs.push(format!("{name}={}", percent_encoding::utf8_percent_encode(value, QUERY_VALUE)));
    format!("{path}?{}", pairs.join("&"))
}

#[cfg(test)]
mod tests {
    use hyper::Request;

    use super::*;
    use crate::{
        credentials::{placeholders_for, SecretEdits},
        policy::parse_profile,
    };

    const PROFILE: &str = r#"
name = "c"
[[credential]]
secret = "gh"
hosts = ["api.gh.test", "*.uploads.test"]
env = "GH_TOKEN"
[[credential]]
secret = "llm"
hosts = ["llm.test"]
methods = ["POST"]
paths = ["/v1/**"]
inject = { header = "Authorization", format = "Bearer {secret}" }
[[credential]]
secret = "key"
hosts = ["key.test"]
inject = { header = "x-api-key" }
[[credential]]
secret = "basic"
hosts = ["git.test"]
inject = { basic = "x-access-token" }
[[credential]]
secret = "maps"
hosts = ["maps.test"]
inject = { query = "key" }
"#;

    struct Fixture {
        specs: Vec<CredentialSpec>,
        placeholders: BTreeMap<String, String>,
        secrets: SecretStore,
    }

    fn fixture() -> Fixture {
        let specs = parse_profile(PROFILE, "c.toml").unwrap().credentials;
        let placeholders = placeholders_for(&specs, &BTreeMap::new());
        let mut edits = SecretEdits::default();
        for (name, value) in [("gh", "s3cr3t"), ("llm", "sk-llm"), ("key", "k-123"), ("basic", "pat"), ("maps", "m&=1")]
        {
            edits.set(name, Secret::new(value.to_owned()));
        }
        let secrets = edits.apply(&SecretStore::default());
        Fixture { specs, placeholders, secrets }
    }

    impl Fixture {
        fn request<'a>(&'a self, host: &'a str, method: &'a str, path: &'a str) -> RequestCredentials<'a> {
            let target = Target { host, method, path, tls: true };
            RequestCredentials { specs: &self.specs, placeholders: &self.placeholders, secrets: &self.secrets, target }
        }
    }

    fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn placeholders_swap_only_on_bound_hosts() {
        let f = fixture();
        let header = format!("Bearer {}", f.placeholders["gh"]);
        let mut applied = Applied::default();
        let out = f.request("api.gh.test", "GET", "/").swap(header.as_bytes(), &mut applied).unwrap();
        assert_eq!(out.as_deref(), Some(&b"Bearer s3cr3t"[..]));
        assert_eq!(applied.names, ["gh"]);
        assert_eq!(applied.scrub, [(b"s3cr3t".to_vec(), f.placeholders["gh"].as_bytes().to_vec())]);
        assert!(f.request("a.uploads.test", "GET", "/").swap(header.as_bytes(), &mut Applied::default()).is_ok());
        for host in ["uploads.test", "evil.test", "api.gh.test.evil.test"] {
            assert_eq!(
                f.request(host, "GET", "/").swap(header.as_bytes(), &mut Applied::default()),
                Err(Leak::Unbound { secret: "gh".into(), host: host.into() }),
                "{host}"
            );
        }
        let foreign = format!("Bearer {}", crate::credentials::new_placeholder());
        let leak = f.request("api.gh.test", "GET", "/").swap(foreign.as_bytes(), &mut Applied::default());
        assert_eq!(leak, Err(Leak::Foreign));
        assert_eq!(f.request("evil.test", "GET", "/").swap(b"nothing here", &mut Applied::default()), Ok(None));
        let mut cleartext = f.request("api.gh.test", "GET", "/");
        cleartext.target.tls = false;
        assert_eq!(
            cleartext.swap(header.as_bytes(), &mut Applied::default()),
            Err(Leak::Cleartext { host: "api.gh.test".into() })
        );
    }

    #[test]
    fn missing_and_revoked_secrets_are_told_apart() {
        let mut f = fixture();
        let header = format!("Bearer {}", f.placeholders["gh"]);
        let mut edits = SecretEdits::default();
        edits.revoke("gh");
        f.secrets = edits.apply(&f.secrets);
        let leak = f.request("api.gh.test", "GET", "/").swap(header.as_bytes(), &mut Applied::default());
        assert_eq!(leak, Err(Leak::Revoked { secret: "gh".into() }));
        assert_eq!(leak.unwrap_err().rule(), "credential-revoked");
        f.secrets = SecretStore::default();
        let leak = f.request("api.gh.test", "GET", "/").swap(header.as_bytes(), &mut Applied::default());
        assert_eq!(leak, Err(Leak::Missing { secret: "gh".into() }));
    }

    #[test]
    fn every_injection_kind_replaces_what_the_sandbox_sent() {
        let f = fixture();
        let mut applied = Applied::default();
        let mut parts = head("POST", "/v1/chat", &[("authorization", "Bearer sandbox-made-this-up")]);
        f.request("llm.test", "POST", "/v1/chat").apply_to_head(&mut parts, &mut applied).unwrap();
        assert_eq!(parts.headers.get_all(AUTHORIZATION).iter().collect::<Vec<_>>(), ["Bearer sk-llm"]);
        assert!(parts.headers[AUTHORIZATION].is_sensitive());
        assert_eq!(applied.names, ["llm"]);

        let mut parts = head("GET", "/x", &[("x-api-key", "one"), ("x-api-key", "two")]);
        f.request("key.test", "GET", "/x").apply_to_head(&mut parts, &mut Applied::default()).unwrap();
        assert_eq!(parts.headers.get_all("x-api-key").iter().collect::<Vec<_>>(), ["k-123"]);

        let mut parts = head("GET", "/repo.git/info/refs", &[]);
        f.request("git.test", "GET", "/repo.git/info/refs").apply_to_head(&mut parts, &mut Applied::default()).unwrap();
        let expected = base64::engine::general_purpose::STANDARD.encode("x-access-token:pat");
        assert_eq!(parts.headers[AUTHORIZATION], format!("Basic {expected}").as_str());

        let mut parts = head("GET", "/geo?key=mine&k%65y=again&q=1", &[]);
        f.request("maps.test", "GET", "/geo").apply_to_head(&mut parts, &mut Applied::default()).unwrap();
        assert_eq!(parts.uri.path_and_query().unwrap().as_str(), "/geo?q=1&key=m%26%3D1");
    }

    #[test]
    fn methods_and_paths_limit_injection_and_placeholders() {
        let f = fixture();
        for (method, path) in [("GET", "/v1/chat"), ("POST", "/v2/chat"), ("POST", "/")] {
            let mut parts = head(method, path, &[("authorization", "Bearer mine")]);
            let mut applied = Applied::default();
            f.request("llm.test", method, path).apply_to_head(&mut parts, &mut applied).unwrap();
            assert_eq!(parts.headers[AUTHORIZATION], "Bearer mine", "{method} {path}");
            assert!(applied.is_empty());
            // The placeholder outside the scope is refused, not swapped.
            let header = format!("Bearer {}", f.placeholders["llm"]);
            let leak = f.request("llm.test", method, path).swap(header.as_bytes(), &mut Applied::default());
            assert_eq!(leak, Err(Leak::OutOfScope { secret: "llm".into(), method: method.into(), path: path.into() }));
        }
        // Other hosts never get it, and cleartext is refused rather than injected.
        let mut parts = head("POST", "/v1/chat", &[]);
        f.request("other.test", "POST", "/v1/chat").apply_to_head(&mut parts, &mut Applied::default()).unwrap();
        assert!(parts.headers.is_empty());
        let mut cleartext = f.request("llm.test", "POST", "/v1/chat");
        cleartext.target.tls = false;
        assert_eq!(
            cleartext.apply_to_head(&mut head("POST", "/v1/chat", &[]), &mut Applied::default()),
            Err(Leak::Cleartext { host: "llm.test".into() })
        );
    }

    #[test]
    fn body_rules_decide_every_placeholder_up_front() {
        let f = fixture();
        let rules = f.request("api.gh.test", "POST", "/").body_rules();
        assert!(rules.may_swap());
        assert_eq!(rules.resolve(f.placeholders["gh"].as_bytes()).unwrap().0, "gh");
        assert!(matches!(rules.resolve(f.placeholders["llm"].as_bytes()), Err(Leak::Unbound { .. })));
        assert_eq!(rules.resolve(crate::credentials::new_placeholder().as_bytes()).err(), Some(Leak::Foreign));
        let elsewhere = f.request("evil.test", "POST", "/").body_rules();
        assert!(!elsewhere.may_swap());
    }
}
