//! What a `[[credential]]` says beyond its hosts: how the secret goes into
//! a request (`inject`) and which requests may carry it (`methods`, `paths`).
//!
//! ```toml
//! inject = { header = "Authorization", format = "Bearer {secret}" }
//! inject = { header = "x-api-key" }                       # the secret as is
//! inject = { basic = "x-access-token" }                   # basic auth, this user
//! inject = { query = "key" }                              # ?key=<secret>
//! inject = { sigv4 = { region = "us-east-1", service = "s3" } }
//! ```

use std::fmt;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use hyper::header::HeaderName;
use serde::{Deserialize, Serialize};

/// Where `format` puts the secret.
pub const SECRET_MARK: &str = "{secret}";

/// Headers that frame the message: never a credential's.
const RESERVED_HEADERS: [&str; 7] =
    ["host", "content-length", "transfer-encoding", "connection", "upgrade", "te", "keep-alive"];

/// `inject = { ... }`: exactly one of `header`, `basic`, `query`, `sigv4`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InjectSpec {
    /// Set this header (any value the sandbox sent is replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Basic auth: `Authorization: Basic base64(user:secret)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<String>,
    /// Set this query parameter (any the sandbox sent is replaced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Sign the request with AWS Signature Version 4. The secret's value is
    /// `ACCESS_KEY_ID:SECRET_ACCESS_KEY` or `...:SESSION_TOKEN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sigv4: Option<SigV4Spec>,
    /// For `header` and `query`: the value, with `{secret}` where the secret
    /// goes (default `{secret}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigV4Spec {
    pub region: String,
    pub service: String,
}

/// An [`InjectSpec`] that passed [`InjectSpec::check`], as one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection<'a> {
    Header { name: HeaderName, format: &'a str },
    Basic { user: &'a str },
    Query { name: &'a str, format: &'a str },
    SigV4(&'a SigV4Spec),
}

impl InjectSpec {
    /// Why this is not a usable injection, if it is not.
    pub fn check(&self) -> Result<(), String> {
        let kinds = [self.header.is_some(), self.basic.is_some(), self.query.is_some(), self.sigv4.is_some()];
        if kinds.iter().filter(|set| **set).count() != 1 {
            return Err("`inject` needs exactly one of `header`, `basic`, `query` or `sigv4`".into());
        }
        if let Some(format) = &self.format {
            if self.header.is_none() && self.query.is_none() {
                return Err("`format` only applies to `header` and `query` injections".into());
            }
            if format.matches(SECRET_MARK).count() != 1 {
                return Err(format!("`format` {format:?} must contain {SECRET_MARK} exactly once"));
            }
            if format.bytes().any(|b| b.is_ascii_control()) {
                return Err(format!("`format` {format:?} contains control characters"));
            }
        }
        if let Some(header) = &self.header {
            let name = HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| format!("{header:?} is not an HTTP header name"))?;
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(format!("the {header:?} header cannot carry a credential"));
            }
        }
        if let Some(user) = &self.basic {
            if user.contains(':') || user.bytes().any(|b| b.is_ascii_control()) {
                return Err(format!("basic auth user {user:?} may not contain ':' or control characters"));
            }
        }
        if let Some(query) = &self.query {
            if query.is_empty() || !query.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)) {
                return Err(format!("query parameter {query:?} must be letters, digits, '-', '_', '.' or '~'"));
            }
        }
        if let Some(sigv4) = &self.sigv4 {
            for (field, value) in [("region", &sigv4.region), ("service", &sigv4.service)] {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                    return Err(format!("sigv4 {field} {value:?} must be letters, digits and '-'"));
                }
            }
        }
        Ok(())
    }

    /// The kind; `None` only for a spec that fails [`InjectSpec::check`].
    pub fn kind(&self) -> Option<Injection<'_>> {
        let format = self.format.as_deref().unwrap_or(SECRET_MARK);
        if let Some(header) = &self.header {
            return Some(Injection::Header { name: HeaderName::from_bytes(header.as_bytes()).ok()?, format });
        }
        if let Some(user) = &self.basic {
            return Some(Injection::Basic { user });
        }
        if let Some(name) = &self.query {
            return Some(Injection::Query { name, format });
        }
        self.sigv4.as_ref().map(Injection::SigV4)
    }
}

impl fmt::Display for Injection<'_> {
    /// How audit records describe where a secret went (never the value).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Header { name, .. } => write!(f, "header {name}"),
            Self::Basic { .. } => f.write_str("basic auth"),
            Self::Query { name, .. } => write!(f, "query {name}"),
            Self::SigV4(spec) => write!(f, "sigv4 {}/{}", spec.region, spec.service),
        }
    }
}

/// `paths = [...]` of a credential: path globs, compiled when the profile is
/// read. `*` stays within one segment, `**` crosses segments, as in rules.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct PathScope {
    globs: Vec<String>,
    set: GlobSet,
}

impl PathScope {
    /// Whether a request for `path` (raw, as the sandbox sent it) is in
    /// scope: every way an upstream may read the path must match
    /// ([`crate::policy::path::readings`]), so `/repos/acme/../other` is
    /// not in a `/repos/acme/**` scope. A malformed path is in no scope.
    pub fn matches(&self, path: &str) -> bool {
        crate::policy::path::readings(path)
            .is_ok_and(|readings| readings.iter().all(|reading| self.set.is_match(reading.as_str())))
    }
}

impl TryFrom<Vec<String>> for PathScope {
    type Error = String;

    fn try_from(globs: Vec<String>) -> Result<Self, String> {
        if globs.is_empty() {
            return Err("`paths` is empty, so the secret could never be used; omit it for any path".into());
        }
        let mut set = GlobSetBuilder::new();
        for glob in &globs {
            if !glob.starts_with('/') || glob.contains(char::is_whitespace) {
                return Err(format!("path {glob:?} must start with '/' and contain no spaces"));
            }
            let compiled = GlobBuilder::new(glob)
                .literal_separator(true)
                .build()
                .map_err(|e| format!("path {glob:?} is not a valid glob: {e}"))?;
            set.add(compiled);
        }
        let set = set.build().map_err(|e| format!("path globs: {e}"))?;
        Ok(Self { globs, set })
    }
}

impl From<PathScope> for Vec<String> {
    fn from(scope: PathScope) -> Self {
        scope.globs
    }
}

impl PartialEq for PathScope {
    fn eq(&self, other: &Self) -> bool {
        self.globs == other.globs
    }
}

impl Eq for PathScope {}

impl fmt::Debug for PathScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.globs).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject(toml_text: &str) -> InjectSpec {
        #[derive(Deserialize)]
        struct Wrap {
            inject: InjectSpec,
        }
        toml::from_str::<Wrap>(toml_text).unwrap().inject
    }

    #[test]
    fn every_kind_parses_and_bad_ones_are_refused() {
        let spec = inject(r#"inject = { header = "Authorization", format = "Bearer {secret}" }"#);
        assert!(spec.check().is_ok());
        assert_eq!(
            spec.kind(),
            Some(Injection::Header { name: HeaderName::from_static("authorization"), format: "Bearer {secret}" })
        );
        let spec = inject(r#"inject = { header = "x-api-key" }"#);
        assert_eq!(
            spec.kind(),
            Some(Injection::Header { name: HeaderName::from_static("x-api-key"), format: "{secret}" })
        );
        assert_eq!(inject(r#"inject = { basic = "bot" }"#).kind(), Some(Injection::Basic { user: "bot" }));
        assert_eq!(
            inject(r#"inject = { query = "key" }"#).kind(),
            Some(Injection::Query { name: "key", format: "{secret}" })
        );
        let spec = inject(r#"inject = { sigv4 = { region = "eu-west-1", service = "s3" } }"#);
        assert!(spec.check().is_ok());
        assert_eq!(spec.kind().unwrap().to_string(), "sigv4 eu-west-1/s3");

        for (bad, why) in [
            (r#"inject = { header = "a", query = "b" }"#, "exactly one"),
            (r#"inject = { format = "{secret}" }"#, "exactly one"),
            (r#"inject = { header = "x", format = "Bearer" }"#, "exactly once"),
            (r#"inject = { basic = "u", format = "{secret}" }"#, "only applies"),
            (r#"inject = { header = "bad header" }"#, "not an HTTP header name"),
            (r#"inject = { header = "Host" }"#, "cannot carry"),
            (r#"inject = { basic = "a:b" }"#, "may not contain"),
            (r#"inject = { query = "a&b" }"#, "must be letters"),
            (r#"inject = { sigv4 = { region = "", service = "s3" } }"#, "region"),
        ] {
            let error = inject(bad).check().unwrap_err();
            assert!(error.contains(why), "{bad}: {error}");
        }
    }

    #[test]
    fn path_scopes_use_rule_glob_semantics() {
        let scope = PathScope::try_from(vec!["/repos/*/issues".to_owned(), "/v1/**".to_owned()]).unwrap();
        assert!(scope.matches("/repos/x/issues"));
        assert!(!scope.matches("/repos/x/y/issues"));
        assert!(scope.matches("/v1/a/b/c"));
        assert!(!scope.matches("/v2/a"));
        assert!(PathScope::try_from(vec!["nope".to_owned()]).is_err());
        assert!(PathScope::try_from(Vec::new()).is_err());
        // Matched as the upstream reads the path, never looser.
        let acme = PathScope::try_from(vec!["/repos/acme/**".to_owned()]).unwrap();
        assert!(acme.matches("/repos/acme/x"));
        assert!(acme.matches("/repos/acme/./x"));
        assert!(acme.matches("/repos/%61cme/x"));
        for outside in [
            "/repos/acme/../other/x",
            "/repos/acme/%2e%2e/other/x",
            "/repos/acme%2F..%2Fother/x",
            "/repos/acme/..;/other/x",
            "/repos/acme//../../other/x",
            "/repos/acme/%zz",
        ] {
            assert!(!acme.matches(outside), "{outside}");
        }
        let back: Vec<String> = scope.into();
        assert_eq!(back, ["/repos/*/issues", "/v1/**"]);
    }
}
