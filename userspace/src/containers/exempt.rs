//! Containers the daemon does not enforce: with `--enforce-label KEY=VALUE`
//! a container its runtime reports without that label is exempted. Its
//! cgroup goes into the kernel's `EXEMPT` map, which every program consults
//! in its walk of the caller's cgroup ancestors, so its traffic goes direct,
//! untouched. A record of each exemption is kept in the runtime directory: a
//! restarted daemon checks the pinned map against it, and discovery then
//! recomputes every exemption from the runtime's labels.
//!
//! Only discovery exempts, from labels the runtime reports: labels are fixed
//! when a container is created, so nothing a process inside a container does
//! changes them. Until discovery has seen a container it is enforced (denied
//! as an unknown sandbox), so an unlabelled container may be refused for its
//! first moments: fail closed.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{Datapath, DatapathError},
    sandbox::{cgroup, ContainerInfo},
};

/// `--enforce-label KEY=VALUE`: only containers labelled so are enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnforceLabel {
    pub key: String,
    pub value: String,
}

impl std::str::FromStr for EnforceLabel {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (key, value) = text.split_once('=').ok_or("expected KEY=VALUE, e.g. sluice.enforce=true")?;
        if key.is_empty() {
            return Err("the label key is empty".to_owned());
        }
        Ok(Self { key: key.to_owned(), value: value.to_owned() })
    }
}

impl std::fmt::Display for EnforceLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

impl EnforceLabel {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        labels.get(&self.key) == Some(&self.value)
    }
}

/// An exempted container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exemption {
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub container: ContainerInfo,
}

/// The exemptions in force, by cgroup id, mirrored to the kernel's map and
/// to a file: the one place that changes either.
pub struct Exemptions {
    path: PathBuf,
    datapath: Arc<Datapath>,
    held: Mutex<BTreeMap<u64, Exemption>>,
}

impl Exemptions {
    /// Those recorded at `path` by an earlier daemon, checked against the
    /// pinned map: an exemption whose cgroup is gone (or is another one now)
    /// is dropped, and so is every exemption when the daemon no longer
    /// enforces by label (`label_mode` false). Map entries without a record
    /// are removed: nothing is exempted that discovery did not exempt.
    pub fn readopt(path: PathBuf, datapath: Arc<Datapath>, label_mode: bool) -> Self {
        let recorded: Vec<Exemption> =
            std::fs::read(&path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default();
        let mut held = BTreeMap::new();
        for exemption in recorded {
            if label_mode && cgroup::id(&exemption.cgroup).ok() == Some(exemption.cgroup_id) {
                held.insert(exemption.cgroup_id, exemption);
            }
        }
        for cgroup_id in datapath.exempted() {
            if !held.contains_key(&cgroup_id) {
                if let Err(error) = datapath.unexempt(cgroup_id) {
                    tracing::error!(cgroup_id, %error, "could not remove a stale exemption");
                }
            }
        }
        // Records of exemptions the map lost are put back: the container
        // is still there, and discovery would exempt it again.
        for cgroup_id in held.keys() {
            let _ = datapath.exempt(*cgroup_id);
        }
        let exemptions = Self { path, datapath, held: Mutex::new(held) };
        exemptions.persist(&exemptions.held.lock().expect("lock poisoned"));
        exemptions
    }

    /// Exempts a container's cgroup in the kernel and records it; false if
    /// it was exempted already.
    pub fn add(&self, exemption: Exemption) -> Result<bool, DatapathError> {
        let mut held = self.held.lock().expect("lock poisoned");
        if held.contains_key(&exemption.cgroup_id) {
            return Ok(false);
        }
        self.datapath.exempt(exemption.cgroup_id)?;
        held.insert(exemption.cgroup_id, exemption);
        self.persist(&held);
        Ok(true)
    }

    /// Enforces an exempted cgroup again; what was exempted, if anything.
    pub fn lift(&self, cgroup_id: u64) -> Result<Option<Exemption>, DatapathError> {
        let mut held = self.held.lock().expect("lock poisoned");
        if !held.contains_key(&cgroup_id) {
            return Ok(None);
        }
        self.datapath.unexempt(cgroup_id)?;
        let lifted = held.remove(&cgroup_id);
        self.persist(&held);
        Ok(lifted)
    }

    /// The exemption of a container by runtime and id.
    pub fn of_container(&self, runtime: &str, namespace: &str, id: &str) -> Option<Exemption> {
        let held = self.held.lock().expect("lock poisoned");
        held.values()
            .find(|e| e.container.runtime == runtime && e.container.namespace == namespace && e.container.id == id)
            .cloned()
    }

    pub fn list(&self) -> Vec<Exemption> {
        self.held.lock().expect("lock poisoned").values().cloned().collect()
    }

    fn persist(&self, held: &BTreeMap<u64, Exemption>) {
        let result = (|| {
            if let Some(dir) = self.path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = self.path.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&held.values().collect::<Vec<_>>())?)?;
            std::fs::rename(tmp, &self.path)
        })();
        if let Err(error) = result {
            tracing::error!(%error, path = %self.path.display(), "could not save the exempted containers");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforce_label_parses_and_matches_key_and_value() {
        let label: EnforceLabel = "sluice.enforce=true".parse().unwrap();
        assert_eq!(label.to_string(), "sluice.enforce=true");
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        assert!(label.matches(&labels(&[("sluice.enforce", "true"), ("team", "a")])));
        assert!(!label.matches(&labels(&[("sluice.enforce", "false")])));
        assert!(!label.matches(&labels(&[("team", "a")])));
        assert!("sluice.enforce".parse::<EnforceLabel>().is_err());
        assert!("=true".parse::<EnforceLabel>().is_err());
        // An empty value is a value like any other.
        assert!("k=".parse::<EnforceLabel>().unwrap().matches(&labels(&[("k", "")])));
    }
}
