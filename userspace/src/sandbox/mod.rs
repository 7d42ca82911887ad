//! Sandboxes: what sluice knows about each enforced cgroup, and the registry
//! the proxy and resolver look flows up in.

pub mod cgroup;
pub mod confine;
pub mod init;
mod names;
pub mod seccomp;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::SystemTime,
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use sluice_common::MAX_SANDBOX_SLOTS;

pub use names::NameMemory;

use crate::{
    dns::SandboxResolver,
    policy::Policy,
    tls::{LeafMinter, SandboxCa},
};

/// Where a sandbox's profile came from; kept so a restarted daemon can
/// compile it again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProfileSource {
    /// The built-in default profile.
    Builtin,
    /// Profile text handed over at registration or through the API.
    Inline { origin: String, text: String },
    /// A profile file the daemon reads itself (`sluice run --profile FILE`),
    /// and reads again when it changes or on SIGHUP. `text` is the last good
    /// version (includes merged), used when the file is gone or broken.
    File {
        path: PathBuf,
        #[serde(default)]
        text: String,
    },
}

impl ProfileSource {
    pub fn describe(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Self::Builtin => "builtin:default".into(),
            Self::Inline { origin, .. } => origin.as_str().into(),
            Self::File { path, .. } => path.display().to_string().into(),
        }
    }

    /// The profile this source holds now: the built-in one, the text, or
    /// the file as it is now (includes resolved).
    pub fn load(&self) -> Result<crate::policy::Profile, crate::policy::PolicyError> {
        match self {
            Self::Builtin => Ok(crate::policy::builtin_default()),
            Self::Inline { origin, text } => crate::policy::parse_profile(text, origin),
            Self::File { path, .. } => crate::policy::load_profile(path),
        }
    }

    /// `load`, but a file that cannot be read or parsed falls back to the
    /// last good text it had (a restarted daemon keeps enforcing what was
    /// in force).
    pub fn load_or_last_good(&self) -> Result<crate::policy::Profile, crate::policy::PolicyError> {
        match (self.load(), self) {
            (Err(error), Self::File { path, text }) if !text.is_empty() => {
                tracing::error!(path = %path.display(), error = %error, "profile file unusable; keeping its last good version");
                crate::policy::parse_profile(text, &format!("{} (last good)", path.display()))
            }
            (result, _) => result,
        }
    }
}

/// Where a sandbox's processes live, which decides the address the kernel
/// sends them to: loopback for the host's network namespace, the daemon's
/// container address for containers in namespaces of their own.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    #[default]
    Host,
    Container,
}

/// The container a sandbox stands for, as its runtime describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerInfo {
    /// `docker` or `containerd`.
    pub runtime: String,
    pub id: String,
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// containerd namespace (empty for Docker).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
}

impl ContainerInfo {
    /// `docker 3f2a1b0c9d8e (agent, image busybox:1)`: for logs and audit.
    pub fn describe(&self) -> String {
        let short = self.id.get(..12).unwrap_or(&self.id);
        format!("{} container {short} ({}, image {})", self.runtime, self.name, self.image)
    }
}

/// What a restarted daemon needs to take a sandbox over again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub name: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub slot: u32,
    pub dns_port: u16,
    pub profile: ProfileSource,
    /// Whether sluice made the cgroup (and so removes it).
    pub owns_cgroup: bool,
    /// PEM file with the roots the sandbox should trust: the system roots
    /// and the sandbox's own CA.
    #[serde(default)]
    pub ca_bundle: PathBuf,
    /// Placeholder per secret its profile binds (secret name -> placeholder).
    /// Not secret: they are worth nothing outside this sandbox.
    #[serde(default)]
    pub placeholders: std::collections::BTreeMap<String, String>,
    pub created: SystemTime,
    #[serde(default)]
    pub placement: Placement,
    /// The container this sandbox enforces, once its runtime reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerInfo>,
}

/// A sandbox's TLS identity: its CA (the key never leaves the daemon) and
/// the leaves minted from it.
pub struct SandboxTls {
    pub ca: Arc<SandboxCa>,
    pub minter: Arc<LeafMinter>,
}

/// A registered sandbox.
pub struct Sandbox {
    pub record: SandboxRecord,
    pub policy: ArcSwap<Policy>,
    /// Names this sandbox resolved through sluice, by address.
    pub names: NameMemory,
    pub tls: SandboxTls,
    /// Where the policy in force came from (it changes at runtime).
    profile: Mutex<ProfileSource>,
    placeholders: arc_swap::ArcSwap<std::collections::BTreeMap<String, String>>,
    resolvers: Mutex<Vec<SandboxResolver>>,
    container: Mutex<Option<ContainerInfo>>,
}

impl Sandbox {
    pub fn new(record: SandboxRecord, policy: Policy, resolvers: Vec<SandboxResolver>, tls: SandboxTls) -> Self {
        Self {
            profile: Mutex::new(record.profile.clone()),
            container: Mutex::new(record.container.clone()),
            placeholders: arc_swap::ArcSwap::from_pointee(record.placeholders.clone()),
            record,
            policy: ArcSwap::from_pointee(policy),
            names: NameMemory::default(),
            tls,
            resolvers: Mutex::new(resolvers),
        }
    }

    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// The record as it is now, with the profile in force.
    pub fn current_record(&self) -> SandboxRecord {
        SandboxRecord {
            profile: self.profile.lock().expect("lock poisoned").clone(),
            placeholders: (**self.placeholders.load()).clone(),
            container: self.container(),
            ..self.record.clone()
        }
    }

    /// The container this sandbox enforces, if its runtime reported one.
    pub fn container(&self) -> Option<ContainerInfo> {
        self.container.lock().expect("lock poisoned").clone()
    }

    /// Ties the sandbox to a container its runtime reported.
    pub fn set_container(&self, info: ContainerInfo) {
        *self.container.lock().expect("lock poisoned") = Some(info);
    }

    /// This sandbox's placeholders (secret name -> placeholder).
    pub fn placeholders(&self) -> Arc<std::collections::BTreeMap<String, String>> {
        self.placeholders.load_full()
    }

    /// Puts a new policy in force. Atomic for every reader: the next
    /// decision, on a new connection or a kept-alive one, uses it.
    /// Placeholders of secrets the new profile still binds are kept.
    pub fn replace_policy(&self, source: ProfileSource, policy: Policy) {
        let mut current = self.profile.lock().expect("lock poisoned");
        let placeholders = crate::credentials::placeholders_for(policy.credentials(), &self.placeholders.load());
        self.placeholders.store(Arc::new(placeholders));
        self.policy.store(Arc::new(policy));
        *current = source;
    }

    /// Stops the sandbox's resolvers.
    pub fn shut_down(&self) {
        for resolver in self.resolvers.lock().expect("lock poisoned").drain(..) {
            resolver.stop();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("a sandbox named {0:?} already exists")]
    NameTaken(String),
    #[error("cgroup {0} is already registered as sandbox {1:?}")]
    CgroupTaken(PathBuf, String),
    #[error("no room for more sandboxes ({MAX_SANDBOX_SLOTS} at most)")]
    Full,
}

/// All registered sandboxes, by cgroup id and by name.
#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    by_cgroup: HashMap<u64, Arc<Sandbox>>,
    by_name: HashMap<String, u64>,
}

impl Registry {
    pub fn by_cgroup(&self, cgroup_id: u64) -> Option<Arc<Sandbox>> {
        self.inner.read().expect("lock poisoned").by_cgroup.get(&cgroup_id).cloned()
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<Sandbox>> {
        let inner = self.inner.read().expect("lock poisoned");
        inner.by_name.get(name).and_then(|id| inner.by_cgroup.get(id)).cloned()
    }

    /// Checks that a sandbox could be added, and picks its counter slot.
    pub fn reserve(&self, name: &str, cgroup_id: u64) -> Result<u32, RegistryError> {
        let inner = self.inner.read().expect("lock poisoned");
        if inner.by_name.contains_key(name) {
            return Err(RegistryError::NameTaken(name.to_owned()));
        }
        if let Some(existing) = inner.by_cgroup.get(&cgroup_id) {
            return Err(RegistryError::CgroupTaken(existing.record.cgroup.clone(), existing.name().to_owned()));
        }
        // Slot 0 counts unregistered cgroups.
        let used: std::collections::HashSet<u32> = inner.by_cgroup.values().map(|s| s.record.slot).collect();
        (1..MAX_SANDBOX_SLOTS).find(|slot| !used.contains(slot)).ok_or(RegistryError::Full)
    }

    pub fn insert(&self, sandbox: Arc<Sandbox>) -> Result<(), RegistryError> {
        let mut inner = self.inner.write().expect("lock poisoned");
        if inner.by_name.contains_key(sandbox.name()) {
            return Err(RegistryError::NameTaken(sandbox.name().to_owned()));
        }
        inner.by_name.insert(sandbox.name().to_owned(), sandbox.record.cgroup_id);
        inner.by_cgroup.insert(sandbox.record.cgroup_id, sandbox);
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Option<Arc<Sandbox>> {
        let mut inner = self.inner.write().expect("lock poisoned");
        let id = inner.by_name.remove(name)?;
        inner.by_cgroup.remove(&id)
    }

    /// Every sandbox, sorted by name.
    pub fn list(&self) -> Vec<Arc<Sandbox>> {
        let mut all: Vec<_> = self.inner.read().expect("lock poisoned").by_cgroup.values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    pub fn records(&self) -> Vec<SandboxRecord> {
        self.list().iter().map(|s| s.current_record()).collect()
    }
}

/// Sandbox names become cgroup directory names and log fields: keep them
/// short and plain.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid sandbox name {name:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("agent-1.test_a").is_ok());
        for bad in ["", "..", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
