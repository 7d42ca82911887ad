//! Host globs (`api-*.example.com`, `cdn?.*.example.com`) and an index that
//! finds the few that can match a name without trying them all.
//!
//! A host glob is a sequence of labels; `*` matches any run of characters and
//! `?` one character, both within a label, so a glob matches only names with
//! as many labels as it has. The pattern language is checked when a profile
//! is parsed (`HostPattern`): letters, digits, `-`, `_`, `.`, `*`, `?`.
//!
//! The index files each glob under its literal prefix (the text before its
//! first wildcard) or its literal suffix (the text after its last), whichever
//! fewer globs share, so `api-7-*.g.test` among thousands of `api-N-*.g.test`
//! is filed under `api-7-`, and `*.*.example.com` under `.example.com`. A
//! lookup probes the name's prefixes and suffixes of the lengths in use and
//! matches only the globs found there; globs with neither (`*-api.*`) are
//! tried on every name.

use std::collections::{BTreeSet, HashMap};

/// One host glob, matched label by label.
#[derive(Debug, Clone)]
pub(super) struct HostGlob {
    pattern: Box<str>,
}

impl HostGlob {
    pub(super) fn new(pattern: &str) -> Self {
        Self { pattern: pattern.into() }
    }

    pub(super) fn is_match(&self, name: &str) -> bool {
        let mut pattern = self.pattern.split('.');
        let mut labels = name.split('.');
        loop {
            match (pattern.next(), labels.next()) {
                (None, None) => return true,
                (Some(p), Some(l)) if label_matches(p.as_bytes(), l.as_bytes()) => {}
                _ => return false,
            }
        }
    }

    fn literal_prefix(&self) -> &str {
        let end = self.pattern.find(['*', '?']).unwrap_or(self.pattern.len());
        &self.pattern[..end]
    }

    fn literal_suffix(&self) -> &str {
        let start = self.pattern.rfind(['*', '?']).map_or(0, |i| i + 1);
        &self.pattern[start..]
    }
}

/// `*` and `?` over one label, greedy with backtracking to the last `*`:
/// linear in practice, quadratic at worst in a label's 63 bytes.
fn label_matches(pattern: &[u8], label: &[u8]) -> bool {
    let (mut p, mut l) = (0, 0);
    // Where the last `*` was and how much of the label it has taken.
    let mut star: Option<(usize, usize)> = None;
    while l < label.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, l));
                p += 1;
            }
            Some(&c) if c == b'?' || c == label[l] => {
                p += 1;
                l += 1;
            }
            _ => match star {
                Some((star_p, star_l)) => {
                    p = star_p + 1;
                    l = star_l + 1;
                    star = Some((star_p, l));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Globs filed by literal prefix or suffix; each glob carries its rule.
#[derive(Debug, Default)]
pub(super) struct GlobIndex {
    by_prefix: HashMap<Box<str>, Vec<(HostGlob, usize)>>,
    by_suffix: HashMap<Box<str>, Vec<(HostGlob, usize)>>,
    /// Distinct key lengths, so a lookup probes only those.
    prefix_lengths: Vec<usize>,
    suffix_lengths: Vec<usize>,
    unkeyed: Vec<(HostGlob, usize)>,
}

impl GlobIndex {
    pub(super) fn new(globs: Vec<(HostGlob, usize)>) -> Self {
        let mut prefix_count: HashMap<String, usize> = HashMap::new();
        let mut suffix_count: HashMap<String, usize> = HashMap::new();
        for (glob, _) in &globs {
            *prefix_count.entry(glob.literal_prefix().to_owned()).or_default() += 1;
            *suffix_count.entry(glob.literal_suffix().to_owned()).or_default() += 1;
        }
        let mut index = Self::default();
        let (mut prefix_lengths, mut suffix_lengths) = (BTreeSet::new(), BTreeSet::new());
        for (glob, rule) in globs {
            let (prefix, suffix) = (glob.literal_prefix().to_owned(), glob.literal_suffix().to_owned());
            // Fewer globs share it, or as many and it is longer.
            let prefix_rarer = (prefix_count[&prefix], std::cmp::Reverse(prefix.len()))
                <= (suffix_count[&suffix], std::cmp::Reverse(suffix.len()));
            if !prefix.is_empty() && (suffix.is_empty() || prefix_rarer) {
                prefix_lengths.insert(prefix.len());
                index.by_prefix.entry(prefix.into()).or_default().push((glob, rule));
            } else if !suffix.is_empty() {
                suffix_lengths.insert(suffix.len());
                index.by_suffix.entry(suffix.into()).or_default().push((glob, rule));
            } else {
                index.unkeyed.push((glob, rule));
            }
        }
        index.prefix_lengths = prefix_lengths.into_iter().collect();
        index.suffix_lengths = suffix_lengths.into_iter().collect();
        index
    }

    /// Pushes the rule of every glob that matches `name`.
    pub(super) fn matches(&self, name: &str, out: &mut Vec<usize>) {
        let mut check = |globs: Option<&Vec<(HostGlob, usize)>>| {
            for (glob, rule) in globs.into_iter().flatten() {
                if glob.is_match(name) {
                    out.push(*rule);
                }
            }
        };
        for &len in self.prefix_lengths.iter().take_while(|&&len| len <= name.len()) {
            check(name.get(..len).and_then(|key| self.by_prefix.get(key)));
        }
        for &len in self.suffix_lengths.iter().take_while(|&&len| len <= name.len()) {
            check(name.get(name.len() - len..).and_then(|key| self.by_suffix.get(key)));
        }
        check(Some(&self.unkeyed));
    }
}

#[cfg(test)]
mod tests {
    use globset::GlobBuilder;
    use proptest::prelude::*;

    use super::*;

    fn index(patterns: &[&str]) -> GlobIndex {
        GlobIndex::new(patterns.iter().enumerate().map(|(i, p)| (HostGlob::new(p), i)).collect())
    }

    fn found(index: &GlobIndex, name: &str) -> Vec<usize> {
        let mut out = Vec::new();
        index.matches(name, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn wildcards_stay_within_a_label() {
        let glob = HostGlob::new("api-*.example.com");
        assert!(glob.is_match("api-1.example.com"));
        assert!(glob.is_match("api-.example.com"));
        assert!(!glob.is_match("api-1.eu.example.com"));
        assert!(!glob.is_match("x.api-1.example.com"));
        assert!(HostGlob::new("*.*.example.com").is_match("a.b.example.com"));
        assert!(!HostGlob::new("*.*.example.com").is_match("b.example.com"));
        assert!(HostGlob::new("cdn?.test").is_match("cdn7.test"));
        assert!(!HostGlob::new("cdn?.test").is_match("cdn.test"));
        assert!(HostGlob::new("a*b*c.test").is_match("aXbYbZc.test"));
        assert!(!HostGlob::new("a*b*c.test").is_match("aXbYbZ.test"));
    }

    #[test]
    fn globs_are_filed_where_they_are_rare() {
        let mut patterns: Vec<String> = (0..100).map(|i| format!("api-{i}-*.g.test")).collect();
        patterns.push("*.*.example.com".into());
        patterns.push("*-edge.*".into());
        let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let index = index(&refs);
        assert_eq!(index.by_prefix.len(), 100, "each api-N- prefix is its own key");
        assert_eq!(index.by_suffix.keys().map(|k| &**k).collect::<Vec<_>>(), [".example.com"]);
        assert_eq!(index.unkeyed.len(), 1);
        assert_eq!(found(&index, "api-42-v2.g.test"), [42]);
        assert_eq!(found(&index, "a.b.example.com"), [100]);
        assert_eq!(found(&index, "eu-edge.net"), [101]);
        assert_eq!(found(&index, "api-42.g.test"), Vec::<usize>::new());
    }

    fn pattern_label() -> impl Strategy<Value = String> {
        "[ab*?-]{1,5}"
    }

    fn name_label() -> impl Strategy<Value = String> {
        "[ab-]{1,6}"
    }

    proptest! {
        /// The index with its own matcher finds exactly the globs that
        /// globset (with `.` as the separator) says match.
        #[test]
        fn index_agrees_with_globset(
            patterns in prop::collection::vec(prop::collection::vec(pattern_label(), 1..4), 1..8),
            name in prop::collection::vec(name_label(), 1..4),
        ) {
            // Profiles refuse `**` (globset would let it cross labels).
            let collapse = |mut p: String| {
                while p.contains("**") {
                    p = p.replace("**", "*");
                }
                p
            };
            let patterns: Vec<String> = patterns.iter().map(|labels| collapse(labels.join("."))).collect();
            let name = name.join(".");
            let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
            let expected: Vec<usize> = patterns
                .iter()
                .enumerate()
                .filter(|(_, p)| {
                    GlobBuilder::new(&p.replace('.', "/"))
                        .literal_separator(true)
                        .build()
                        .unwrap()
                        .compile_matcher()
                        .is_match(name.replace('.', "/"))
                })
                .map(|(i, _)| i)
                .collect();
            prop_assert_eq!(found(&index(&refs), &name), expected, "{:?} against {:?}", name, patterns);
        }
    }
}
