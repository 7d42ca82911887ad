//! The capability bundle library: named, reviewed sets of rules a profile
//! takes by name (`bundles = ["vcs.github.readonly"]`). They ship inside the
//! binary, one TOML file each under `bundles/`, written like profiles.
//!
//! A bundle's rules keep the bundle's name: decisions they make name the rule
//! as `<bundle>/<rule>` and carry the bundle, so the decision log says which
//! capability let a request through, and revoking a bundle (on every sandbox
//! at once, through the control API) takes exactly those rules away.

use super::error::PolicyError;
use super::model::Profile;

/// (name, text) of every bundle, sorted by name.
const LIBRARY: &[(&str, &str)] = &[
    ("llm.anthropic", include_str!("bundles/llm.anthropic.toml")),
    ("llm.openai", include_str!("bundles/llm.openai.toml")),
    ("net.read.public", include_str!("bundles/net.read.public.toml")),
    ("pkg.crates", include_str!("bundles/pkg.crates.toml")),
    ("pkg.npm", include_str!("bundles/pkg.npm.toml")),
    ("pkg.pypi", include_str!("bundles/pkg.pypi.toml")),
    ("vcs.github.readonly", include_str!("bundles/vcs.github.readonly.toml")),
    ("vcs.github.write", include_str!("bundles/vcs.github.write.toml")),
];

/// Names of every bundle in the library.
pub fn names() -> impl Iterator<Item = &'static str> {
    LIBRARY.iter().map(|(name, _)| *name)
}

/// The bundle's text, as shipped.
pub fn text(name: &str) -> Option<&'static str> {
    LIBRARY.iter().find(|(n, _)| *n == name).map(|(_, text)| *text)
}

/// The bundle, parsed. Its rules may use host aliases (`@pypi`) that the
/// profile taking the bundle defines.
pub fn get(name: &str) -> Result<Profile, PolicyError> {
    let Some(text) = text(name) else {
        return Err(PolicyError::Profile {
            origin: format!("bundle {name:?}"),
            message: format!("no such capability bundle; the library has {}", names().collect::<Vec<_>>().join(", ")),
        });
    };
    let bundle: Profile = toml::from_str(text)
        .map_err(|e| PolicyError::Profile { origin: format!("bundle {name}"), message: e.message().to_owned() })?;
    Ok(bundle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bundle_parses_and_is_named_after_its_file() {
        let mut previous = "";
        for name in names() {
            assert!(name > previous, "library must stay sorted: {name}");
            previous = name;
            let bundle = get(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(bundle.name, name);
            assert!(bundle.description.is_some(), "{name} needs a description");
            assert!(!bundle.rules.is_empty(), "{name} has no rules");
            assert!(bundle.credentials.is_empty() && bundle.bundles.is_empty() && bundle.include.is_empty());
            for rule in &bundle.rules {
                assert!(rule.name.is_some(), "{name}: bundle rules must be named");
            }
        }
        assert!(get("nope").unwrap_err().to_string().contains("net.read.public"));
    }
}
