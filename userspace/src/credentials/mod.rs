//! Credentials the sandbox never sees. The daemon holds secrets; each
//! sandbox gets a random placeholder per secret its profile binds, and sluice
//! swaps placeholder for secret in requests to the bound hosts only. A
//! placeholder going anywhere else is an exfiltration attempt and is blocked;
//! a response that echoes a secret is scrubbed back to the placeholder.
//!
//! Secret values live in zeroed-on-drop memory, print as `<redacted>`, and
//! never reach logs, decisions or error messages.

pub mod scrub;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::Path,
};

use zeroize::Zeroizing;

pub use scrub::ScrubBody;

use crate::policy::{CredentialSpec, HostPatternKind};

/// Every placeholder starts with this, so they can be found in requests.
pub const PLACEHOLDER_PREFIX: &str = "SLUICE_PLACEHOLDER_";
/// Random characters after the prefix (base32: 160 bits).
const PLACEHOLDER_RANDOM: usize = 32;
/// Environment variables `SLUICE_SECRET_<NAME>` of the daemon are secrets.
const ENV_PREFIX: &str = "SLUICE_SECRET_";

/// A secret value. Zeroed on drop; never printed.
#[derive(Clone)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secrets from {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} must be owned by root and not readable by others (chmod 600): it holds secrets")]
    Permissions { path: String },
    #[error("{path}:{line}: expected `name = \"value\"`")]
    Syntax { path: String, line: usize },
}

/// The daemon's secrets, by name. Replaced whole on reload.
#[derive(Debug, Default, Clone)]
pub struct SecretStore {
    secrets: HashMap<String, Secret>,
}

impl SecretStore {
    /// Loads, in increasing precedence: `SLUICE_SECRET_<NAME>` variables of
    /// the daemon, a secrets file (`name = "value"` lines), and a directory
    /// with one file per secret (e.g. a mounted secret volume).
    pub fn load(file: Option<&Path>, dir: Option<&Path>) -> Result<Self, SecretError> {
        let mut secrets = HashMap::new();
        for (key, value) in std::env::vars() {
            if let Some(name) = key.strip_prefix(ENV_PREFIX) {
                secrets.insert(name.to_ascii_lowercase(), Secret::new(value));
            }
        }
        if let Some(path) = file {
            check_private(path)?;
            let text = Zeroizing::new(read(path)?);
            for (number, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let syntax = || SecretError::Syntax { path: path.display().to_string(), line: number + 1 };
                let (name, value) = line.split_once('=').ok_or_else(syntax)?;
                let value = value.trim();
                let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).ok_or_else(syntax)?;
                secrets.insert(name.trim().to_owned(), Secret::new(value.to_owned()));
            }
        }
        if let Some(dir) = dir {
            let entries = std::fs::read_dir(dir)
                .map_err(|source| SecretError::Read { path: dir.display().to_string(), source })?;
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
                if name.starts_with('.') || !path.is_file() {
                    continue;
                }
                let value = Zeroizing::new(read(&path)?);
                secrets.insert(name, Secret::new(value.trim_end_matches(['\n', '\r']).to_owned()));
            }
        }
        Ok(Self { secrets })
    }

    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.secrets.get(name)
    }

    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }
}

fn read(path: &Path) -> Result<String, SecretError> {
    std::fs::read_to_string(path).map_err(|source| SecretError::Read { path: path.display().to_string(), source })
}

fn check_private(path: &Path) -> Result<(), SecretError> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(path).map_err(|source| SecretError::Read { path: path.display().to_string(), source })?;
    if meta.uid() != 0 || meta.mode() & 0o077 != 0 {
        return Err(SecretError::Permissions { path: path.display().to_string() });
    }
    Ok(())
}

/// A fresh, unguessable placeholder.
pub fn new_placeholder() -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut random = [0u8; PLACEHOLDER_RANDOM];
    // SAFETY: getrandom fills the buffer; failure leaves zeros, checked below.
    let filled = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    assert_eq!(filled, random.len() as isize, "the kernel's random source failed");
    let mut placeholder = String::from(PLACEHOLDER_PREFIX);
    placeholder.extend(random.iter().map(|b| ALPHABET[usize::from(b & 31)] as char));
    placeholder
}

/// Keeps the placeholders of the secrets `specs` name, making new ones for
/// secrets that have none yet (secret name -> placeholder).
pub fn placeholders_for(specs: &[CredentialSpec], existing: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    specs
        .iter()
        .map(|spec| {
            let placeholder = existing.get(&spec.secret).cloned().unwrap_or_else(new_placeholder);
            (spec.secret.clone(), placeholder)
        })
        .collect()
}

/// The variables a sandbox's commands get (variable -> placeholder).
pub fn environment(specs: &[CredentialSpec], placeholders: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    specs.iter().filter_map(|spec| Some((spec.env.clone()?, placeholders.get(&spec.secret)?.clone()))).collect()
}

/// Placeholders found in a piece of a request.
pub fn find_placeholders(text: &str) -> impl Iterator<Item = &str> {
    text.match_indices(PLACEHOLDER_PREFIX).filter_map(move |(start, _)| {
        let end = start + PLACEHOLDER_PREFIX.len() + PLACEHOLDER_RANDOM;
        text.get(start..end).filter(|token| {
            token[PLACEHOLDER_PREFIX.len()..].bytes().all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        })
    })
}

/// Whether `host` is one the credential is bound to.
pub fn bound_to(spec: &CredentialSpec, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    spec.hosts.iter().any(|pattern| match pattern.kind() {
        HostPatternKind::Exact(name) => *name == host,
        HostPatternKind::Subdomains(parent) => {
            host.len() > parent.len() + 1
                && host.ends_with(parent.as_str())
                && host[..host.len() - parent.len()].ends_with('.')
        }
        // Refused when the profile is checked.
        HostPatternKind::Any | HostPatternKind::Glob(_) | HostPatternKind::Alias(_) => false,
    })
}

/// Why a request may not go out as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Leak {
    /// A placeholder of this sandbox, for a secret not bound to the host.
    Unbound { secret: String, host: String },
    /// A placeholder that is not this sandbox's (another sandbox's, or
    /// retired).
    Foreign,
    /// The secret is bound here but the daemon does not hold it.
    Missing { secret: String },
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unbound { secret, host } => {
                write!(f, "the placeholder of secret {secret:?} was sent to {host}, which it is not bound to")
            }
            Self::Foreign => f.write_str("a placeholder that does not belong to this sandbox was sent"),
            Self::Missing { secret } => {
                write!(f, "secret {secret:?} is bound to this host but the daemon does not hold it")
            }
        }
    }
}

/// Replaces this sandbox's placeholders in `text` with their secrets when
/// bound to `host`. Returns the names of the secrets put in, or why the text
/// may not leave. `text` is untouched on error.
pub fn swap(
    text: &str,
    host: &str,
    specs: &[CredentialSpec],
    placeholders: &BTreeMap<String, String>,
    secrets: &SecretStore,
) -> Result<Option<(String, Vec<String>)>, Leak> {
    let found: Vec<&str> = find_placeholders(text).collect();
    if found.is_empty() {
        return Ok(None);
    }
    let mut out = text.to_owned();
    let mut used = Vec::new();
    for token in found {
        let Some((secret, _)) = placeholders.iter().find(|(_, placeholder)| placeholder.as_str() == token) else {
            return Err(Leak::Foreign);
        };
        let bound = specs.iter().any(|spec| spec.secret == *secret && bound_to(spec, host));
        if !bound {
            return Err(Leak::Unbound { secret: secret.clone(), host: host.to_owned() });
        }
        let value = secrets.get(secret).ok_or_else(|| Leak::Missing { secret: secret.clone() })?;
        out = out.replace(token, value.expose());
        if !used.contains(secret) {
            used.push(secret.clone());
        }
    }
    Ok(Some((out, used)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::parse_profile;

    fn specs() -> Vec<CredentialSpec> {
        parse_profile(
            "name = \"c\"\n[[credential]]\nsecret = \"gh\"\nhosts = [\"api.gh.test\", \"*.uploads.test\"]\nenv = \"GH_TOKEN\"\n",
            "c.toml",
        )
        .unwrap()
        .credentials
    }

    fn store(value: &str) -> SecretStore {
        SecretStore { secrets: HashMap::from([("gh".to_owned(), Secret::new(value.to_owned()))]) }
    }

    #[test]
    fn placeholders_are_unique_findable_and_carried_by_env() {
        let (a, b) = (new_placeholder(), new_placeholder());
        assert_ne!(a, b);
        assert_eq!(a.len(), PLACEHOLDER_PREFIX.len() + PLACEHOLDER_RANDOM);
        let text = format!("Bearer {a}, and {b}x");
        assert_eq!(find_placeholders(&text).collect::<Vec<_>>(), [a.as_str(), b.as_str()]);
        assert_eq!(find_placeholders("SLUICE_PLACEHOLDER_short").count(), 0);
        let placeholders = placeholders_for(&specs(), &BTreeMap::new());
        let kept = placeholders_for(&specs(), &placeholders);
        assert_eq!(placeholders, kept, "existing placeholders must be kept");
        assert_eq!(environment(&specs(), &placeholders)["GH_TOKEN"], placeholders["gh"]);
    }

    #[test]
    fn swaps_only_on_bound_hosts() {
        let specs = specs();
        let placeholders = placeholders_for(&specs, &BTreeMap::new());
        let header = format!("Bearer {}", placeholders["gh"]);
        let (out, used) = swap(&header, "api.gh.test", &specs, &placeholders, &store("s3cr3t")).unwrap().unwrap();
        assert_eq!(out, "Bearer s3cr3t");
        assert_eq!(used, ["gh"]);
        assert!(swap(&header, "a.uploads.test", &specs, &placeholders, &store("x")).unwrap().is_some());
        for host in ["uploads.test", "evil.test", "api.gh.test.evil.test"] {
            assert_eq!(
                swap(&header, host, &specs, &placeholders, &store("x")),
                Err(Leak::Unbound { secret: "gh".into(), host: host.into() }),
                "{host}"
            );
        }
        let foreign = format!("Bearer {}", new_placeholder());
        assert_eq!(swap(&foreign, "api.gh.test", &specs, &placeholders, &store("x")), Err(Leak::Foreign));
        assert_eq!(swap("no placeholder", "evil.test", &specs, &placeholders, &store("x")), Ok(None));
        let empty = SecretStore::default();
        assert_eq!(
            swap(&header, "api.gh.test", &specs, &placeholders, &empty),
            Err(Leak::Missing { secret: "gh".into() })
        );
    }

    #[test]
    fn secrets_never_print_and_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let secret = Secret::new("hunter2".into());
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert!(!format!("{:?}", store("hunter2")).contains("hunter2"));
        let dir = std::env::temp_dir().join(format!("sluice-secrets-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secrets");
        std::fs::write(&file, "# comment\ngh = \"from-file\"\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(SecretStore::load(Some(&file), None), Err(SecretError::Permissions { .. })));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        // SAFETY-free check: only meaningful as root, which owns the file.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(SecretStore::load(Some(&file), None).unwrap().get("gh").unwrap().expose(), "from-file");
        }
        std::fs::write(&file, "gh: nope\n").unwrap();
        if unsafe { libc::geteuid() } == 0 {
            let error = SecretStore::load(Some(&file), None).unwrap_err().to_string();
            assert!(error.ends_with(":1: expected `name = \"value\"`"), "{error}");
            assert!(!error.contains("nope"));
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
