//! Errors from reading and compiling profiles. Messages are for the person
//! who wrote the profile: where (file, line, column) and which rule.

use std::fmt;
use std::path::PathBuf;

use super::model::ProfileProblem;

/// A 1-based position in a profile's text (column counts characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl Location {
    /// The position of byte `offset` in `text`.
    pub(crate) fn of_offset(text: &str, offset: usize) -> Self {
        let before = text.get(..offset).unwrap_or(text);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Self { line: before.matches('\n').count() + 1, column: before[line_start..].chars().count() + 1 }
    }
}

/// Which rule an error is about: its 1-based position and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub index: usize,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read profile {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The text is not valid TOML, or a value has the wrong type or shape
    /// (bad CIDR, host pattern, port, action, unknown field).
    #[error("{origin}{}: {}{message}", At(*location), In(rule.as_ref()))]
    Parse { origin: String, location: Option<Location>, rule: Option<RuleRef>, message: String },

    /// A rule is well-formed on its own but not in this profile (duplicate or
    /// reserved name, empty condition list).
    #[error("{origin}{}: {}{message}", At(*location), In(Some(rule)))]
    Rule { origin: String, location: Option<Location>, rule: RuleRef, message: String },

    /// A problem with the profile as a whole.
    #[error("{origin}: {message}")]
    Profile { origin: String, message: String },

    /// A profile file (or one it includes, or their directory) that someone
    /// other than root could change: a sandbox could write its own policy.
    #[error("refusing profile {}: {problem}, so someone other than root could change this sandbox's policy; fix: {fix}", path.display())]
    Untrusted { path: PathBuf, problem: String, fix: String },
}

impl PolicyError {
    pub(crate) fn from_problem(
        origin: &str,
        locate_rule: impl Fn(usize) -> Option<Location>,
        problem: ProfileProblem,
    ) -> Self {
        match problem {
            ProfileProblem::EmptyProfileName => {
                PolicyError::Profile { origin: origin.to_owned(), message: "profile name is empty".into() }
            }
            ProfileProblem::Profile(message) => PolicyError::Profile { origin: origin.to_owned(), message },
            ProfileProblem::Rule { index, name, problem } => PolicyError::Rule {
                origin: origin.to_owned(),
                location: locate_rule(index),
                rule: RuleRef { index: index + 1, name },
                message: problem,
            },
        }
    }
}

struct At(Option<Location>);

impl fmt::Display for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(Location { line, column }) => write!(f, ":{line}:{column}"),
            None => Ok(()),
        }
    }
}

struct In<'a>(Option<&'a RuleRef>);

impl fmt::Display for In<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(RuleRef { index, name }) => write!(f, "rule {index} ({name:?}): "),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_counts_lines_and_characters() {
        let text = "a\nbé c\n";
        assert_eq!(Location::of_offset(text, 0), Location { line: 1, column: 1 });
        assert_eq!(Location::of_offset(text, 2), Location { line: 2, column: 1 });
        // 'é' is two bytes but one column.
        assert_eq!(Location::of_offset(text, 6), Location { line: 2, column: 4 });
        assert_eq!(Location::of_offset(text, 999), Location { line: 3, column: 1 });
    }

    #[test]
    fn display_has_origin_position_and_rule() {
        let err = PolicyError::Parse {
            origin: "p.toml".into(),
            location: Some(Location { line: 3, column: 7 }),
            rule: Some(RuleRef { index: 2, name: "web".into() }),
            message: "bad".into(),
        };
        assert_eq!(err.to_string(), "p.toml:3:7: rule 2 (\"web\"): bad");
    }
}
