//! Credentials the sandbox never sees. The daemon holds secrets; each
//! sandbox gets a random placeholder per secret its profile binds, and sluice
//! swaps placeholder for secret in requests to the bound hosts only. A
//! placeholder going anywhere else is an exfiltration attempt and is blocked;
//! a response that echoes a secret is scrubbed back to the placeholder.
//!
//! Secret values live in zeroed-on-drop memory, print as `<redacted>`, and
//! never reach logs, decisions or error messages.

pub mod binding;
pub mod body;
pub mod inject;
pub mod scrub;
pub mod sigv4;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    path::Path,
};

use zeroize::Zeroizing;

pub use binding::{InjectSpec, Injection, PathScope, SigV4Spec};
pub use body::SwapBody;
pub use inject::{Applied, RequestCredentials, Target};
pub use scrub::ScrubBody;

use crate::{
    policy::{CredentialSpec, HostPatternKind},
    rules,
};

/// Every placeholder starts with this, so they can be found in requests.
pub const PLACEHOLDER_PREFIX: &str = "SLUICE_PLACEHOLDER_";
/// Random characters after the prefix (base32: 160 bits).
pub(crate) const PLACEHOLDER_RANDOM: usize = 32;
/// Environment variables `SLUICE_SECRET_<NAME>` of the daemon are secrets.
const ENV_PREFIX: &str = "SLUICE_SECRET_";

/// `SLUICE_SECRET_<NAME>` values taken out of the environment at start-up.
static ENV_SECRETS: std::sync::OnceLock<Vec<(String, Secret)>> = std::sync::OnceLock::new();

/// Whether an environment variable holds a secret for the daemon.
pub fn is_secret_variable(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().starts_with(ENV_PREFIX.as_bytes())
}

/// Takes the `SLUICE_SECRET_<NAME>` variables out of the process: their
/// values are kept for [`SecretStore::load`] (reloads included), the bytes
/// of the original environment block are overwritten (so not even
/// `/proc/<pid>/environ`, which reads that block, shows them), and the
/// variables are removed, so no child inherits them.
///
/// # Safety
/// Must run before any other thread exists (`main`, before the runtime):
/// changing the environment races with every reader of it.
pub unsafe fn take_env_secrets() {
    let mut taken = Vec::new();
    let mut names = Vec::new();
    for (key, value) in std::env::vars_os() {
        if is_secret_variable(&key) {
            if let (Some(key), Some(value)) = (key.to_str(), value.to_str()) {
                if let Some(name) = key.strip_prefix(ENV_PREFIX) {
                    taken.push((name.to_ascii_lowercase(), Secret::new(value.to_owned())));
                }
            }
            names.push(key);
        }
    }
    // SAFETY: single-threaded (the caller's promise); `environ` is the C
    // library's NULL-terminated array of NUL-terminated strings, which we
    // only overwrite within their own lengths.
    unsafe {
        let mut entry = libc_environ();
        while !entry.is_null() && !(*entry).is_null() {
            let text = std::ffi::CStr::from_ptr(*entry).to_bytes();
            if text.starts_with(ENV_PREFIX.as_bytes()) {
                if let Some(equals) = text.iter().position(|b| *b == b'=') {
                    let value = (*entry).add(equals + 1);
                    std::ptr::write_bytes(value, b'x', text.len() - equals - 1);
                }
            }
            entry = entry.add(1);
        }
    }
    for name in names {
        std::env::remove_var(name);
    }
    let _ = ENV_SECRETS.set(taken);
}

/// The C library's environment array.
fn libc_environ() -> *mut *mut libc::c_char {
    extern "C" {
        static mut environ: *mut *mut libc::c_char;
    }
    // SAFETY: reading the pointer value; callers are single-threaded.
    unsafe { environ }
}

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

/// Where a secret's value came from (listed by the control API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    Env,
    File,
    Dir,
    /// Set through the control API (lives in the daemon's memory only).
    Api,
}

#[derive(Debug, Clone)]
struct Held {
    secret: Secret,
    origin: Origin,
}

/// A secret as the control API lists it: never its value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretInfo {
    pub name: String,
    /// Absent for a revoked secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    #[serde(default)]
    pub revoked: bool,
}

/// The daemon's secrets, by name. Replaced whole on reload and on every
/// change through the control API.
#[derive(Debug, Default, Clone)]
pub struct SecretStore {
    secrets: HashMap<String, Held>,
    /// Revoked through the control API: never used, whatever the sources hold.
    revoked: BTreeSet<String>,
}

impl SecretStore {
    /// Loads, in increasing precedence: `SLUICE_SECRET_<NAME>` variables of
    /// the daemon, a secrets file (`name = "value"` lines), and a directory
    /// with one file per secret (e.g. a mounted secret volume).
    pub fn load(file: Option<&Path>, dir: Option<&Path>) -> Result<Self, SecretError> {
        let mut secrets = HashMap::new();
        let mut hold = |name: String, value: String, origin: Origin| {
            secrets.insert(name, Held { secret: Secret::new(value), origin });
        };
        match ENV_SECRETS.get() {
            Some(taken) => {
                for (name, secret) in taken {
                    hold(name.clone(), secret.expose().to_owned(), Origin::Env);
                }
            }
            // Not taken at start-up (the library used on its own): read them.
            None => {
                for (key, value) in std::env::vars() {
                    if let Some(name) = key.strip_prefix(ENV_PREFIX) {
                        hold(name.to_ascii_lowercase(), value, Origin::Env);
                    }
                }
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
                hold(name.trim().to_owned(), value.to_owned(), Origin::File);
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
                hold(name, value.trim_end_matches(['\n', '\r']).to_owned(), Origin::Dir);
            }
        }
        Ok(Self { secrets, revoked: BTreeSet::new() })
    }

    /// The secret in force under `name` (none if revoked).
    pub fn get(&self, name: &str) -> Option<&Secret> {
        self.secrets.get(name).map(|held| &held.secret)
    }

    /// The secret in force, or why there is none.
    pub fn lookup(&self, name: &str) -> Result<&Secret, Leak> {
        if self.revoked.contains(name) {
            return Err(Leak::Revoked { secret: name.to_owned() });
        }
        self.get(name).ok_or_else(|| Leak::Missing { secret: name.to_owned() })
    }

    /// Whether the value of any secret (revoked ones too) occurs in `text`.
    pub fn appears_in(&self, text: &str) -> bool {
        self.secrets.values().any(|held| !held.secret.expose().is_empty() && text.contains(held.secret.expose()))
    }

    pub fn len(&self) -> usize {
        self.secrets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Names, origins and revocations; never values.
    pub fn list(&self) -> Vec<SecretInfo> {
        let mut list: Vec<SecretInfo> = self
            .secrets
            .iter()
            .map(|(name, held)| SecretInfo { name: name.clone(), origin: Some(held.origin), revoked: false })
            .chain(self.revoked.iter().map(|name| SecretInfo { name: name.clone(), origin: None, revoked: true }))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }
}

/// Changes made through the control API, laid over what the sources hold:
/// values set there win, revoked names are never used. They outlive
/// reloads; a new value for a revoked name lifts the revocation.
#[derive(Debug, Default)]
pub struct SecretEdits {
    set: HashMap<String, Secret>,
    revoked: BTreeSet<String>,
}

impl SecretEdits {
    /// Edits that start with these revoked names (kept across restarts).
    pub fn with_revoked(names: impl IntoIterator<Item = String>) -> Self {
        Self { set: HashMap::new(), revoked: names.into_iter().collect() }
    }

    pub fn set(&mut self, name: &str, value: Secret) {
        self.revoked.remove(name);
        self.set.insert(name.to_owned(), value);
    }

    pub fn revoke(&mut self, name: &str) {
        self.set.remove(name);
        self.revoked.insert(name.to_owned());
    }

    pub fn revoked(&self) -> impl Iterator<Item = &String> {
        self.revoked.iter()
    }

    /// `sources` with these edits applied.
    pub fn apply(&self, sources: &SecretStore) -> SecretStore {
        let mut store = sources.clone();
        for (name, secret) in &self.set {
            store.secrets.insert(name.clone(), Held { secret: secret.clone(), origin: Origin::Api });
        }
        for name in &self.revoked {
            store.secrets.remove(name);
        }
        store.revoked.clone_from(&self.revoked);
        store
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
    /// Bound to the host, but not for this method or path.
    OutOfScope { secret: String, method: String, path: String },
    /// A placeholder that is not this sandbox's (another sandbox's, or
    /// retired).
    Foreign,
    /// A secret for this request, but the connection is not TLS.
    Cleartext { host: String },
    /// The secret is bound here but the daemon does not hold it.
    Missing { secret: String },
    /// The secret was revoked through the control API.
    Revoked { secret: String },
    /// The request cannot carry the secret (not valid in a header or URL,
    /// or a body too large to sign).
    Unusable { secret: String, why: String },
}

impl Leak {
    /// The rule name decisions and refusals carry.
    pub fn rule(&self) -> &'static str {
        match self {
            Self::Unbound { .. } | Self::Foreign => rules::CREDENTIAL_EXFILTRATION,
            Self::OutOfScope { .. } => rules::CREDENTIAL_SCOPE,
            Self::Cleartext { .. } => rules::CREDENTIAL_CLEARTEXT,
            Self::Missing { .. } => rules::CREDENTIAL_MISSING,
            Self::Revoked { .. } => rules::CREDENTIAL_REVOKED,
            Self::Unusable { .. } => rules::CREDENTIAL_INVALID,
        }
    }
}

impl fmt::Display for Leak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unbound { secret, host } => {
                write!(f, "the placeholder of secret {secret:?} was sent to {host}, which it is not bound to")
            }
            Self::OutOfScope { secret, method, path } => write!(
                f,
                "secret {secret:?} is bound to this host but not for {method} {path} (see its `methods` and `paths`)"
            ),
            Self::Foreign => f.write_str("a placeholder that does not belong to this sandbox was sent"),
            Self::Cleartext { host } => {
                write!(f, "a credential for {host} would travel without TLS; secrets are only injected over TLS")
            }
            Self::Missing { secret } => {
                write!(f, "secret {secret:?} is bound to this host but the daemon does not hold it")
            }
            Self::Revoked { secret } => write!(
                f,
                "secret {secret:?} was revoked; requests needing it are refused until it is set again \
                 (sluice secrets set {secret})"
            ),
            Self::Unusable { secret, why } => write!(f, "secret {secret:?} cannot be put in this request: {why}"),
        }
    }
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

    #[test]
    fn placeholders_are_unique_and_carried_by_env() {
        let (a, b) = (new_placeholder(), new_placeholder());
        assert_ne!(a, b);
        assert!(inject::is_placeholder(a.as_bytes()));
        assert!(!inject::is_placeholder(b"SLUICE_PLACEHOLDER_short"));
        let placeholders = placeholders_for(&specs(), &BTreeMap::new());
        let kept = placeholders_for(&specs(), &placeholders);
        assert_eq!(placeholders, kept, "existing placeholders must be kept");
        assert_eq!(environment(&specs(), &placeholders)["GH_TOKEN"], placeholders["gh"]);
    }

    #[test]
    fn api_edits_outlive_reloads_and_revocation_wins_until_set_again() {
        let mut sources = SecretStore::default();
        sources.secrets.insert("gh".into(), Held { secret: Secret::new("from-file".into()), origin: Origin::File });
        let mut edits = SecretEdits::default();
        edits.set("llm", Secret::new("from-api".into()));
        edits.revoke("gh");
        let store = edits.apply(&sources);
        assert_eq!(store.lookup("gh").unwrap_err(), Leak::Revoked { secret: "gh".into() });
        assert_eq!(store.lookup("llm").unwrap().expose(), "from-api");
        assert_eq!(store.lookup("none").unwrap_err(), Leak::Missing { secret: "none".into() });
        let listed = store.list();
        assert_eq!(listed.len(), 2);
        assert!(listed[0].revoked && listed[0].name == "gh");
        assert_eq!(listed[1].origin, Some(Origin::Api));
        assert!(!serde_json::to_string(&listed).unwrap().contains("from-"));
        edits.set("gh", Secret::new("rotated".into()));
        assert_eq!(edits.apply(&sources).lookup("gh").unwrap().expose(), "rotated");
    }

    #[test]
    fn secrets_never_print_and_files_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let secret = Secret::new("hunter2".into());
        assert_eq!(format!("{secret:?}"), "<redacted>");
        let mut edits = SecretEdits::default();
        edits.set("gh", secret);
        assert!(!format!("{:?} {edits:?}", edits.apply(&SecretStore::default())).contains("hunter2"));
        let dir = std::env::temp_dir().join(format!("sluice-secrets-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("secrets");
        std::fs::write(&file, "# comment\ngh = \"from-file\"\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(SecretStore::load(Some(&file), None), Err(SecretError::Permissions { .. })));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Only meaningful as root, which owns the file.
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
