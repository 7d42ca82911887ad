//! Unit tests of the policy: parsing and its errors (line and column),
//! compilation, evaluation, explanation and the shipped schema.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;

fn policy(text: &str) -> Policy {
    let profile = parse_profile(text, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    Policy::compile(&profile).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `(verdict, rule)` for a connection, for compact assertions.
fn eval(p: &Policy, host: Option<&str>, addr: &str, port: u16) -> (Verdict, String) {
    let d = p.evaluate(&ConnectQuery { host, ip: ip(addr), port });
    (d.verdict, d.rule.to_string())
}

fn allow(rule: &str) -> (Verdict, String) {
    (Verdict::Allow, rule.to_owned())
}

fn deny(rule: &str) -> (Verdict, String) {
    (Verdict::Deny, rule.to_owned())
}

fn parse_err(text: &str) -> String {
    parse_profile(text, "bad.toml").unwrap_err().to_string()
}

// --- parsing ----------------------------------------------------------

#[test]
fn parses_a_full_profile() {
    let profile = parse_profile(
        r#"
name = "default"
description = "optional text"

[[rule]]
name = "deny-private-networks"
action = "deny"
ips = ["10.0.0.0/8", "fd00::/8", "192.0.2.7"]
reason = "private"

[[rule]]
action = "allow"
hosts = ["example.com", "*.github.com", "*"]
ports = [80, 443, "8000-8100"]
"#,
        "p.toml",
    )
    .unwrap();
    assert_eq!(profile.name, "default");
    assert_eq!(profile.description.as_deref(), Some("optional text"));
    assert_eq!(profile.rules.len(), 2);
    assert_eq!(profile.rules[0].action, Action::Deny);
    assert_eq!(profile.rules[0].reason.as_deref(), Some("private"));
    assert_eq!(profile.rules[1].effective_name(1), "rule-2");
    assert_eq!(profile.rules[1].ports.as_ref().unwrap()[2], PortRange::new(8000, 8100).unwrap());
    assert_eq!(profile.rules[1].hosts.as_ref().unwrap().len(), 3);
}

#[test]
fn unknown_field_reports_line_column_and_rule() {
    let err = parse_err("name = \"p\"\n\n[[rule]]\nname = \"web\"\naction = \"allow\"\n  hostz = [\"a\"]\n");
    assert!(err.starts_with("bad.toml:6:3: rule 1 (\"web\"): unknown field `hostz`"), "{err}");
    let top = parse_err("name = \"p\"\ncolour = 1\n");
    assert!(top.starts_with("bad.toml:2:1: unknown field `colour`"), "{top}");
}

#[test]
fn syntax_error_reports_line_and_column() {
    let err = parse_err("name = \"p\"\n[[rule]\n");
    assert!(err.starts_with("bad.toml:2:"), "{err}");
}

#[test]
fn bad_values_name_the_rule() {
    let base = "name = \"p\"\n[[rule]]\naction = \"allow\"\n[[rule]]\nname = \"second\"\n";
    let cases = [
        ("action = \"deny\"\nips = [\"10.0.0.0/33\"]\n", "bad.toml:7:8: rule 2 (\"second\"): ", "10.0.0.0/33"),
        ("action = \"deny\"\nhosts = [\"bad host\"]\n", "bad.toml:7:10: rule 2 (\"second\"): ", "whitespace"),
        ("action = \"deny\"\nhosts = [\"\"]\n", "bad.toml:7:10: rule 2 (\"second\"): ", "empty"),
        ("action = \"deny\"\nhosts = [\"a/b\"]\n", "rule 2 (\"second\"): ", "'/'"),
        ("action = \"deny\"\nports = [443, 0]\n", "bad.toml:7:15: rule 2 (\"second\"): ", "port 0"),
        ("action = \"deny\"\nports = [\"9-8\"]\n", "bad.toml:7:10: rule 2 (\"second\"): ", "reversed"),
        ("action = \"deny\"\nports = [70000]\n", "rule 2 (\"second\"): ", "out of range"),
        ("action = \"permit\"\n", "bad.toml:6:10: rule 2 (\"second\"): ", "unknown variant `permit`"),
        ("ports = [1]\n", "bad.toml:4:1: rule 2 (\"second\"): ", "missing field `action`"),
    ];
    for (tail, prefix, needle) in cases {
        let err = parse_err(&format!("{base}{tail}"));
        assert!(err.contains(prefix) && err.contains(needle), "{tail:?} gave {err}");
    }
}

#[test]
fn inline_rule_tables_are_located_too() {
    let err = parse_err("name = \"p\"\nrule = [{ action = \"allow\" }, { name = \"x\", action = \"nope\" }]\n");
    assert!(err.starts_with("bad.toml:2:"), "{err}");
    assert!(err.contains("rule 2 (\"x\")"), "{err}");
}

#[test]
fn cross_rule_problems_name_rule_and_its_line() {
    let err = parse_err(
        "name = \"p\"\n[[rule]]\nname = \"a\"\naction = \"allow\"\n\n[[rule]]\nname = \"a\"\naction = \"deny\"\n",
    );
    assert!(err.starts_with("bad.toml:6:1: rule 2 (\"a\"): "), "{err}");
    assert!(err.contains("already used by rule 1"), "{err}");
    let reserved = parse_err("name = \"p\"\n[[rule]]\nname = \"default-deny\"\naction = \"deny\"\n");
    assert!(reserved.contains("rule 1 (\"default-deny\")"), "{reserved}");
}

#[test]
fn compile_rejects_invalid_profiles_built_in_code() {
    let mut profile = parse_profile("name = \"p\"\n[[rule]]\naction = \"allow\"\n", "p").unwrap();
    profile.rules.push(profile.rules[0].clone());
    profile.rules[1].name = Some("rule-1".into());
    let err = Policy::compile(&profile).unwrap_err().to_string();
    assert!(err.contains("rule 2 (\"rule-1\")"), "{err}");
    profile.rules.pop();
    profile.rules[0].hosts = Some(Vec::new());
    let err = Policy::compile(&profile).unwrap_err().to_string();
    assert!(err.contains("`hosts` is empty"), "{err}");
}

#[test]
fn load_profile_reads_files_and_reports_missing_ones() {
    let dir = std::env::temp_dir().join(format!("sluice-policy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("web.toml");
    std::fs::write(&path, "name = \"web\"\n[[rule]]\naction = \"allow\"\nports = [1]\nportz = 2\n").unwrap();
    let err = load_profile(&path).unwrap_err().to_string();
    assert!(err.starts_with(&format!("{}:5:1: rule 1 (\"rule-1\")", path.display())), "{err}");
    std::fs::write(&path, "name = \"web\"\n").unwrap();
    assert_eq!(load_profile(&path).unwrap().name, "web");
    let missing = load_profile(&dir.join("missing.toml")).unwrap_err();
    assert!(matches!(missing, PolicyError::Read { .. }), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// --- semantics --------------------------------------------------------

#[test]
fn deny_by_default() {
    let p = policy("name = \"empty\"\n");
    assert_eq!(p.name(), "empty");
    let d = p.evaluate(&ConnectQuery { host: Some("Example.org."), ip: ip("198.18.0.1"), port: 22 });
    assert_eq!(d.verdict, Verdict::Deny);
    assert_eq!(&*d.rule, "default-deny");
    assert_eq!(&*d.reason, "no rule allows example.org:22");
    let d = p.evaluate(&ConnectQuery { host: None, ip: ip("2001:db8::1"), port: 22 });
    assert_eq!(&*d.reason, "no rule allows [2001:db8::1]:22");
}

#[test]
fn forbid_wins_regardless_of_order() {
    let deny_rule = "[[rule]]\nname = \"no-ten\"\naction = \"deny\"\nips = [\"10.0.0.0/8\"]\nreason = \"nope\"\n";
    let allow_rule = "[[rule]]\nname = \"all\"\naction = \"allow\"\n";
    for text in [format!("name = \"p\"\n{deny_rule}{allow_rule}"), format!("name = \"p\"\n{allow_rule}{deny_rule}")] {
        let p = policy(&text);
        assert_eq!(eval(&p, Some("a.com"), "10.9.9.9", 443), deny("no-ten"));
        assert_eq!(&*p.evaluate(&ConnectQuery { host: None, ip: ip("10.0.0.1"), port: 1 }).reason, "nope");
        assert_eq!(eval(&p, Some("a.com"), "11.0.0.1", 443), allow("all"));
    }
}

#[test]
fn first_matching_deny_and_allow_are_named() {
    let p = policy(
        r#"name = "p"
[[rule]]
name = "a1"
action = "allow"
ports = [443]
[[rule]]
name = "a2"
action = "allow"
[[rule]]
name = "d1"
action = "deny"
ports = [25]
[[rule]]
name = "d2"
action = "deny"
ports = ["20-30"]
"#,
    );
    assert_eq!(eval(&p, None, "1.1.1.1", 443), allow("a1"));
    assert_eq!(eval(&p, None, "1.1.1.1", 80), allow("a2"));
    assert_eq!(eval(&p, None, "1.1.1.1", 25), deny("d1"));
    assert_eq!(eval(&p, None, "1.1.1.1", 22), deny("d2"));
    let reason = p.evaluate(&ConnectQuery { host: None, ip: ip("1.1.1.1"), port: 443 }).reason;
    assert_eq!(&*reason, "allowed by rule a1");
}

#[test]
fn all_conditions_must_match() {
    let p = policy(
            "name = \"p\"\n[[rule]]\nname = \"r\"\naction = \"allow\"\nhosts = [\"a.com\"]\nips = [\"1.0.0.0/8\"]\nports = [443]\n",
        );
    assert_eq!(eval(&p, Some("a.com"), "1.2.3.4", 443), allow("r"));
    assert_eq!(eval(&p, Some("b.com"), "1.2.3.4", 443), deny("default-deny"));
    assert_eq!(eval(&p, Some("a.com"), "2.2.3.4", 443), deny("default-deny"));
    assert_eq!(eval(&p, Some("a.com"), "1.2.3.4", 444), deny("default-deny"));
}

#[test]
fn host_pattern_shapes() {
    let p = policy(
        r#"name = "p"
[[rule]]
name = "exact"
action = "allow"
hosts = ["example.com"]
[[rule]]
name = "subs"
action = "allow"
hosts = ["*.github.com"]
[[rule]]
name = "glob"
action = "allow"
hosts = ["api-*.svc.test"]
"#,
    );
    let host = |name: &str| eval(&p, Some(name), "198.18.0.1", 443);
    assert_eq!(host("example.com"), allow("exact"));
    assert_eq!(host("www.example.com"), deny("default-deny"));
    assert_eq!(host("notexample.com"), deny("default-deny"));
    assert_eq!(host("github.com"), deny("default-deny"));
    assert_eq!(host("a.github.com"), allow("subs"));
    assert_eq!(host("a.b.github.com"), allow("subs"));
    assert_eq!(host("agithub.com"), deny("default-deny"));
    assert_eq!(host("api-v1.svc.test"), allow("glob"));
    assert_eq!(host("api-.svc.test"), allow("glob"));
    assert_eq!(host("api-v1.x.svc.test"), deny("default-deny"), "* must not cross a dot");
    assert_eq!(host("x.api-v1.svc.test"), deny("default-deny"));

    let any = policy("name = \"p\"\n[[rule]]\nname = \"any\"\naction = \"allow\"\nhosts = [\"*\"]\n");
    assert_eq!(eval(&any, Some("x"), "198.18.0.1", 1), allow("any"));
    assert_eq!(eval(&any, Some("a.b.c.d.e"), "198.18.0.1", 1), allow("any"));
}

#[test]
fn host_case_and_trailing_dot_are_ignored() {
    let p = policy(
        "name = \"p\"\n[[rule]]\nname = \"r\"\naction = \"allow\"\nhosts = [\"Example.COM.\", \"*.Git.Test\"]\n",
    );
    for name in ["example.com", "EXAMPLE.com", "example.com.", "Example.Com.", "A.git.test.", "a.GIT.test"] {
        assert_eq!(eval(&p, Some(name), "198.18.0.1", 443), allow("r"), "{name}");
    }
}

#[test]
fn host_condition_never_matches_without_a_name() {
    let p = policy(
        "name = \"p\"\n[[rule]]\nname = \"no-evil\"\naction = \"deny\"\nhosts = [\"*\"]\nports = [22]\n\
             [[rule]]\nname = \"named\"\naction = \"allow\"\nhosts = [\"*\"]\n",
    );
    assert_eq!(eval(&p, None, "198.18.0.1", 443), deny("default-deny"));
    assert_eq!(eval(&p, None, "198.18.0.1", 22), deny("default-deny"));
    // An IP literal is an address, not a name.
    assert_eq!(eval(&p, Some("198.18.0.1"), "198.18.0.1", 443), deny("default-deny"));
    assert_eq!(eval(&p, Some("[2001:db8::1]"), "2001:db8::1", 443), deny("default-deny"));
    assert_eq!(eval(&p, Some("a.test"), "198.18.0.1", 443), allow("named"));
    assert_eq!(eval(&p, Some("a.test"), "198.18.0.1", 22), deny("no-evil"));
}

#[test]
fn invalid_host_names_are_denied() {
    let p = policy("name = \"p\"\n[[rule]]\nname = \"all\"\naction = \"allow\"\n");
    for name in ["", ".", "a..b", "a b", "evil.test/x", "é.test", &"a".repeat(64)] {
        let d = p.evaluate(&ConnectQuery { host: Some(name), ip: ip("198.18.0.1"), port: 443 });
        assert_eq!((d.verdict, &*d.rule), (Verdict::Deny, "default-deny"), "{name:?}");
    }
    assert_eq!(eval(&p, Some("under_score.test"), "198.18.0.1", 443), allow("all"));
}

#[test]
fn mapped_ipv6_is_matched_as_ipv4() {
    let p = policy(
        "name = \"p\"\n[[rule]]\nname = \"ten\"\naction = \"deny\"\nips = [\"10.0.0.0/8\"]\n\
             [[rule]]\nname = \"v6\"\naction = \"deny\"\nips = [\"::ffff:192.0.2.0/120\"]\n\
             [[rule]]\nname = \"all\"\naction = \"allow\"\n",
    );
    assert_eq!(eval(&p, None, "::ffff:10.1.2.3", 80), deny("ten"));
    assert_eq!(eval(&p, None, "10.1.2.3", 80), deny("ten"));
    assert_eq!(eval(&p, None, "192.0.2.9", 80), deny("v6"));
    assert_eq!(eval(&p, None, "::ffff:11.1.2.3", 80), allow("all"));
    // Only the mapped form is IPv4; an IPv4-compatible or NAT64 address is not.
    assert_eq!(eval(&p, None, "::10.1.2.3", 80), allow("all"));
}

#[test]
fn ipv6_networks() {
    let p =
        policy("name = \"p\"\n[[rule]]\nname = \"ula\"\naction = \"allow\"\nips = [\"fd00::/8\", \"2001:db8::1\"]\n");
    assert_eq!(eval(&p, None, "fd12::1", 1), allow("ula"));
    assert_eq!(eval(&p, None, "2001:db8::1", 1), allow("ula"));
    assert_eq!(eval(&p, None, "2001:db8::2", 1), deny("default-deny"));
    assert_eq!(eval(&p, None, "fe00::1", 1), deny("default-deny"));
}

#[test]
fn port_range_edges() {
    let p = policy(
        "name = \"p\"\n[[rule]]\nname = \"r\"\naction = \"allow\"\nports = [\"8000-8100\", 1, 65535, \"443\"]\n",
    );
    let port = |n: u16| eval(&p, None, "198.18.0.1", n).0;
    for open in [1, 443, 8000, 8001, 8099, 8100, 65535] {
        assert_eq!(port(open), Verdict::Allow, "{open}");
    }
    for closed in [0, 2, 442, 444, 7999, 8101, 65534] {
        assert_eq!(port(closed), Verdict::Deny, "{closed}");
    }
}

#[test]
fn rule_without_conditions_matches_everything() {
    let p = policy("name = \"p\"\n[[rule]]\nname = \"all\"\naction = \"allow\"\n");
    assert_eq!(eval(&p, None, "::1", 1), allow("all"));
    assert_eq!(eval(&p, Some("x.test"), "127.0.0.1", 65535), allow("all"));
}

#[test]
fn many_rules_are_indexed_by_host() {
    let mut text = String::from("name = \"big\"\n");
    for i in 0..2000 {
        writeln!(text, "[[rule]]\nname = \"r{i}\"\naction = \"allow\"\nhosts = [\"h{i}.test\", \"*.s{i}.test\"]")
            .unwrap();
    }
    let p = policy(&text);
    assert_eq!(eval(&p, Some("h1234.test"), "198.18.0.1", 1), allow("r1234"));
    assert_eq!(eval(&p, Some("a.b.s1999.test"), "198.18.0.1", 1), allow("r1999"));
    assert_eq!(eval(&p, Some("s7.test"), "198.18.0.1", 1), deny("default-deny"));
    let clone = p.clone();
    assert_eq!(clone.name(), "big");
}

// --- may_resolve ------------------------------------------------------

#[test]
fn may_resolve_follows_allow_rules_and_host_only_denies() {
    let p = policy(
        r#"name = "p"
[[rule]]
name = "block-tracker"
action = "deny"
hosts = ["*.tracker.test"]
reason = "tracking"
[[rule]]
name = "block-ten"
action = "deny"
hosts = ["*.corp.test"]
ips = ["10.0.0.0/8"]
[[rule]]
name = "block-ssh"
action = "deny"
hosts = ["*.ssh.test"]
ports = [22]
[[rule]]
name = "web"
action = "allow"
hosts = ["*.test"]
ports = [443]
"#,
    );
    let resolve = |name: &str| {
        let d = p.may_resolve(name);
        (d.verdict, d.rule.to_string())
    };
    assert_eq!(resolve("a.corp.test"), allow("web"), "deny with an IP condition does not block resolution");
    assert_eq!(resolve("x.tracker.test"), deny("block-tracker"));
    assert_eq!(resolve("a.ssh.test"), allow("web"), "nor does one with a port condition");
    assert_eq!(&*p.may_resolve("x.tracker.test").reason, "tracking");
    assert_eq!(resolve("X.Example.TEST."), allow("web"));
    assert_eq!(resolve("example.org"), deny("default-deny"));
    assert_eq!(&*p.may_resolve("example.org").reason, "no rule allows connections to example.org");
    assert_eq!(resolve("bad name"), deny("default-deny"));

    // An allow rule without a host condition could match any name, in a
    // profile that names hosts.
    let open = policy(
        "name = \"p\"\n[[rule]]\nname = \"ips\"\naction = \"allow\"\nips = [\"198.18.0.0/15\"]\n\
             [[rule]]\nname = \"api\"\naction = \"allow\"\nhosts = [\"api.test\"]\n",
    );
    assert_eq!(open.may_resolve("anything.test").verdict, Verdict::Allow);

    // A profile whose rules name no hosts resolves no names.
    for text in [
        "name = \"p\"\n[[rule]]\nname = \"ips\"\naction = \"allow\"\nips = [\"198.18.0.0/15\"]\n",
        "name = \"p\"\n[[rule]]\nname = \"ssh\"\naction = \"ask\"\nports = [22]\n",
        "name = \"p\"\n[[rule]]\nname = \"all\"\naction = \"allow\"\n\
             [[rule]]\nname = \"no-x\"\naction = \"deny\"\nhosts = [\"x.test\"]\n",
        "name = \"p\"\n",
    ] {
        let d = policy(text).may_resolve("anything.test");
        assert_eq!((d.verdict, d.rule.as_ref()), (Verdict::Deny, NO_HOSTS_NAMED), "{text}");
        assert!(d.reason.contains("names no hosts"), "{}", d.reason);
    }

    // A deny rule with no conditions denies every connection, so every name.
    let closed = policy(
        "name = \"p\"\n[[rule]]\nname = \"web\"\naction = \"allow\"\nhosts = [\"*\"]\n\
             [[rule]]\nname = \"nothing\"\naction = \"deny\"\n",
    );
    assert_eq!(closed.may_resolve("a.test").rule.as_ref(), "nothing");
}

// --- built-in default -------------------------------------------------

#[test]
fn builtin_default_is_safe_web_access() {
    let profile = builtin_default();
    assert_eq!(profile.name, "default");
    let p = Policy::compile(&profile).unwrap();
    assert_eq!(eval(&p, None, "10.1.2.3", 443), deny("deny-internal-networks"));
    assert_eq!(eval(&p, Some("metadata.test"), "169.254.169.254", 80), deny("deny-internal-networks"));
    assert_eq!(eval(&p, None, "::ffff:127.0.0.1", 80), deny("deny-internal-networks"));
    assert_eq!(eval(&p, None, "::1", 443), deny("deny-internal-networks"));
    assert_eq!(eval(&p, None, "fd00::1", 443), deny("deny-internal-networks"));
    assert_eq!(eval(&p, None, "0.0.0.0", 80), deny("deny-internal-networks"));
    assert_eq!(eval(&p, None, "198.18.0.10", 443), allow("web"));
    assert_eq!(eval(&p, Some("example.org"), "198.18.0.10", 80), allow("web"));
    assert_eq!(eval(&p, Some("example.org"), "198.18.0.10", 22), deny("default-deny"));
    assert_eq!(eval(&p, Some("mail.example.org"), "198.18.0.10", 25), deny("default-deny"));
    let reason = p.evaluate(&ConnectQuery { host: None, ip: ip("169.254.169.254"), port: 80 }).reason;
    assert!(reason.contains("never reachable"), "{reason}");
    assert_eq!(p.may_resolve("example.org").verdict, Verdict::Allow);
}

#[test]
fn builtin_default_leaves_demo_and_documentation_ranges_alone() {
    let p = Policy::compile(&builtin_default()).unwrap();
    for addr in ["198.18.0.1", "198.19.255.254", "192.0.2.1", "203.0.113.1", "2001:db8::1"] {
        assert_eq!(eval(&p, None, addr, 443), allow("web"), "{addr}");
    }
}

#[test]
fn profile_serializes_for_the_control_api() {
    let profile = builtin_default();
    let text = toml::to_string(&profile).unwrap();
    assert_eq!(parse_profile(&text, "round-trip").unwrap(), profile);
}

#[test]
fn label_rules_belong_only_to_sandboxes_with_those_labels() {
    let text = r#"
name = "shared"
[[rule]]
name = "ml-models"
action = "allow"
hosts = ["models.test"]
labels = { team = "ml", tier = "*" }
[[rule]]
name = "no-prod-writes"
action = "deny"
hosts = ["*.test"]
methods = ["POST"]
labels = { env = "prod*" }
[[rule]]
name = "everyone"
action = "allow"
hosts = ["*.test"]
"#;
    let profile = parse_profile(text, "t.toml").unwrap();
    let for_labels = |pairs: &[(&str, &str)]| {
        let labels: Labels = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        Policy::compile_for(&profile, &Revoked::new(), &labels).unwrap()
    };
    let post = |p: &Policy| {
        let q = ConnectQuery { host: Some("api.test"), ip: ip("198.18.0.1"), port: 443 };
        p.evaluate_request(&q, &RequestInfo::simple("POST", "/", Scheme::Https)).rule.to_string()
    };
    let ml = for_labels(&[("team", "ml"), ("tier", "gpu"), ("env", "production")]);
    assert_eq!(eval(&ml, Some("models.test"), "198.18.0.1", 443), allow("ml-models"));
    assert_eq!(post(&ml), "no-prod-writes");
    // `tier` missing: the ml rule is not theirs; the shared one decides.
    let no_tier = for_labels(&[("team", "ml")]);
    assert_eq!(eval(&no_tier, Some("models.test"), "198.18.0.1", 443), allow("everyone"));
    assert_eq!(post(&no_tier), "everyone");
    let unlabelled = Policy::compile(&profile).unwrap();
    assert_eq!(eval(&unlabelled, Some("models.test"), "198.18.0.1", 443), allow("everyone"));
    let staging = for_labels(&[("team", "web"), ("env", "staging")]);
    assert_eq!(post(&staging), "everyone");
    // A rule for other labels is still checked.
    let error = parse_profile(
        "name = \"b\"\n[[rule]]\naction = \"allow\"\nhosts = [\"a.test\"]\nlabels = { team = \"[ml\" }\n",
        "b.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("b.toml:2:1") && error.contains("label \"team\""), "{error}");
}

// --- properties -------------------------------------------------------

fn label() -> impl Strategy<Value = String> {
    "[a-z0-9_-]{1,8}"
}

fn name_from(labels: &[String]) -> String {
    labels.join(".")
}

/// Independent oracle for host globs: `*` and `?` never take a '.'.
fn glob_oracle(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, _) => name.is_empty(),
        (Some(b'*'), _) => {
            glob_oracle(&pattern[1..], name)
                || (name.first().is_some_and(|&c| c != b'.') && glob_oracle(pattern, &name[1..]))
        }
        (Some(b'?'), Some(&c)) => c != b'.' && glob_oracle(&pattern[1..], &name[1..]),
        (Some(&p), Some(&c)) => p == c && glob_oracle(&pattern[1..], &name[1..]),
        (Some(_), None) => false,
    }
}

proptest! {
    #[test]
    fn host_glob_rule_matches_exactly_what_it_says(
        pattern in prop::collection::vec("[ab*?-]{1,4}", 1..4),
        name in prop::collection::vec("[ab-]{1,5}", 1..4),
        among_others in 0usize..300,
    ) {
        let mut pattern = pattern.join(".");
        while pattern.contains("**") {
            pattern = pattern.replace("**", "*");
        }
        let name = name.join(".");
        let expected = match pattern.strip_prefix("*.") {
            _ if pattern == "*" => true,
            // `*.suffix` with a literal suffix: subdomains at any depth.
            Some(suffix) if !suffix.contains(['*', '?']) => name.ends_with(&format!(".{suffix}")),
            _ => glob_oracle(pattern.as_bytes(), name.as_bytes()),
        };
        // The rule sits among other globs (sharing prefixes and
        // suffixes with it) that deny, so the index must pick it out.
        let mut text = format!("name = \"p\"\n[[rule]]\nname = \"r\"\naction = \"allow\"\nhosts = [\"{pattern}\"]\n");
        for i in 0..among_others {
            text.push_str(&format!("[[rule]]\naction = \"deny\"\nhosts = [\"a{i}*.b\", \"*{i}-b.a\"]\n"));
        }
        let p = policy(&text);
        let got = p.evaluate(&ConnectQuery { host: Some(&name), ip: IpAddr::V4(Ipv4Addr::LOCALHOST), port: 1 });
        prop_assert_eq!(got.verdict == Verdict::Allow, expected, "{} vs {}: {}", name, pattern, got.rule);
    }

    #[test]
    fn subdomain_rule_matches_exactly_names_under_the_suffix(
        suffix in prop::collection::vec(label(), 1..3),
        // Names share the suffix's labels often, so near misses are common.
        name in prop::collection::vec(prop_oneof![label(), Just("a".to_owned()), Just("b".to_owned())], 1..5),
        tail_of_suffix in any::<bool>(),
    ) {
        let suffix = name_from(&suffix);
        let mut name = name_from(&name);
        if tail_of_suffix {
            name = format!("{name}.{suffix}");
        }
        let p = policy(&format!(
            "name = \"p\"\n[[rule]]\nname = \"r\"\naction = \"allow\"\nhosts = [\"*.{suffix}\"]\n"
        ));
        let expected = name.ends_with(&format!(".{suffix}"));
        let got = p.evaluate(&ConnectQuery { host: Some(&name), ip: IpAddr::V4(Ipv4Addr::LOCALHOST), port: 1 });
        prop_assert_eq!(got.verdict == Verdict::Allow, expected, "{} vs *.{}", name, suffix);
        let upper = name.to_ascii_uppercase() + ".";
        let got = p.evaluate(&ConnectQuery { host: Some(&upper), ip: IpAddr::V4(Ipv4Addr::LOCALHOST), port: 1 });
        prop_assert_eq!(got.verdict == Verdict::Allow, expected);
    }

    #[test]
    fn cidr_rule_matches_exactly_addresses_in_the_network(
        v4 in any::<bool>(),
        net_bits in any::<u128>(),
        prefix in 0u8..=128,
        addr_bits in any::<u128>(),
        near in any::<bool>(),
        ask_mapped in any::<bool>(),
        write_mapped in any::<bool>(),
    ) {
        let (net, addr): (ipnet::IpNet, IpAddr) = if v4 {
            let net = ipnet::Ipv4Net::new(Ipv4Addr::from(net_bits as u32), prefix % 33).unwrap().trunc();
            // Half the time, land close to the network so both sides of
            // its edges are hit.
            let flip = (addr_bits as u32) >> ((addr_bits >> 120) as u32 % 32);
            let raw = if near { u32::from(net.network()) ^ flip } else { addr_bits as u32 };
            (net.into(), IpAddr::V4(Ipv4Addr::from(raw)))
        } else {
            let net = ipnet::Ipv6Net::new(Ipv6Addr::from(net_bits), prefix).unwrap().trunc();
            let raw = if near { u128::from(net.network()) ^ (addr_bits >> (addr_bits % 128)) } else { addr_bits };
            (net.into(), IpAddr::V6(Ipv6Addr::from(raw)))
        };
        // The rule may spell an IPv4 network in its mapped IPv6 form, and
        // the query may carry an IPv4 address mapped into IPv6.
        let written = match net {
            ipnet::IpNet::V4(n) if write_mapped => {
                format!("{}/{}", n.network().to_ipv6_mapped(), n.prefix_len() + 96)
            }
            _ => net.to_string(),
        };
        let query = match addr {
            IpAddr::V4(a) if ask_mapped => IpAddr::V6(a.to_ipv6_mapped()),
            other => other,
        };
        // Independent oracle: ipnet on the canonical (IPv4) address. A
        // random IPv6 network is in the mapped range only by chance, and
        // then ipnet cannot contain a canonicalised IPv4 address; the
        // engine reads it as IPv4, so skip that vanishingly rare case.
        prop_assume!(!matches!(net, ipnet::IpNet::V6(n) if n.prefix_len() >= 96 && n.network().to_ipv4_mapped().is_some()));
        let expected = net.contains(&query.to_canonical());
        let p = policy(&format!(
            "name = \"p\"\n[[rule]]\nname = \"r\"\naction = \"allow\"\nips = [\"{written}\"]\n"
        ));
        let got = p.evaluate(&ConnectQuery { host: None, ip: query, port: 1 });
        prop_assert_eq!(got.verdict == Verdict::Allow, expected, "{} in {}", query, written);
    }
}

const API: &str = r#"
name = "api"
[[rule]]
name = "no-admin"
action = "deny"
hosts = ["api.test"]
paths = ["/admin/**"]
[[rule]]
name = "read-repos"
action = "allow"
hosts = ["api.test"]
methods = ["get", "HEAD"]
paths = ["/repos/*", "/repos/*/**"]
[[rule]]
name = "pinned"
action = "allow"
hosts = ["pinned.test"]
tls = "passthrough"
"#;

fn request(p: &Policy, method: &str, path: &str) -> (Verdict, String) {
    let q = ConnectQuery { host: Some("api.test"), ip: ip("198.18.0.1"), port: 443 };
    let d = p.evaluate_request(&q, &RequestInfo::simple(method, path, Scheme::Https));
    (d.verdict, d.rule.to_string())
}

#[test]
fn methods_and_paths_decide_requests() {
    let p = policy(API);
    assert_eq!(request(&p, "GET", "/repos/sluice"), (Verdict::Allow, "read-repos".into()));
    assert_eq!(request(&p, "HEAD", "/repos/sluice/pulls/1"), (Verdict::Allow, "read-repos".into()));
    assert_eq!(request(&p, "POST", "/repos/sluice").1, "default-deny");
    assert_eq!(request(&p, "GET", "/users").1, "default-deny");
    // `*` stays inside one segment; `**` crosses.
    assert_eq!(request(&p, "GET", "/admin/users/1"), (Verdict::Deny, "no-admin".into()));
    let reason = p
        .evaluate_request(
            &ConnectQuery { host: Some("api.test"), ip: ip("198.18.0.1"), port: 443 },
            &RequestInfo::simple("DELETE", "/repos/x", Scheme::Https),
        )
        .reason;
    assert_eq!(&*reason, "no rule allows DELETE /repos/x on api.test:443");
}

#[test]
fn paths_are_matched_as_the_upstream_reads_them() {
    let allow_acme = policy(
        "name = \"p\"\n[[rule]]\nname = \"acme\"\naction = \"allow\"\npaths = [\"/repos/acme/**\"]\nmax_body = 100\n",
    );
    let on = |p: &Policy, path: &str| decide(p, "api.test", &req("GET", path, None, Some(0)));
    for inside in ["/repos/acme/x", "/repos/acme/./x", "/repos/%61cme/x", "/repos//acme/x"] {
        assert_eq!(on(&allow_acme, inside), allow("acme"), "{inside}");
    }
    for outside in [
        "/repos/acme/../other/x",
        "/repos/acme/%2e%2e/other",
        "/repos/acme/%2E%2E/other",
        "/repos/acme/.%2e/other",
        "/repos/acme%2F..%2Fother/x",
        "/repos/acme/..;/other/x",
        "/repos/acme/..%5Cother/x",
        "/repos/acme//../../other/x",
    ] {
        assert_eq!(on(&allow_acme, outside).1, "default-deny", "{outside}");
    }
    let no_admin = policy(
        "name = \"p\"\n[[rule]]\nname = \"no-admin\"\naction = \"deny\"\npaths = [\"/admin/**\"]\n\
             [[rule]]\nname = \"rest\"\naction = \"allow\"\npaths = [\"/**\"]\n",
    );
    for denied in [
        "/admin/x",
        "//admin/x",
        "/%61dmin/x",
        "/admin;x/y",
        "/./admin/x",
        "/x/../admin/x",
        "/admin%2Fx",
        "/admin%2fx",
        "/admin\\x",
        "/%2e/admin/x",
    ] {
        assert_eq!(on(&no_admin, denied), deny("no-admin"), "{denied}");
    }
    assert_eq!(on(&no_admin, "/administrator"), allow("rest"));
    let bad = on(&no_admin, "/admin%zz");
    assert_eq!(bad, deny(INVALID_PATH));
    // The reason names the path as it was matched.
    let d = allow_acme.evaluate_request(
        &ConnectQuery { host: Some("api.test"), ip: ip("198.18.0.1"), port: 443 },
        &req("GET", "/repos/acme/../other", None, Some(0)),
    );
    assert!(d.reason.contains("/repos/other"), "{}", d.reason);
    let limited = allow_acme.evaluate_request(
        &ConnectQuery { host: Some("api.test"), ip: ip("198.18.0.1"), port: 443 },
        &req("POST", "/repos/acme/a;b", None, None),
    );
    assert_eq!((limited.verdict, limited.max_body), (Verdict::Allow, Some(100)));
}

#[test]
fn header_conditions_fold_case_where_http_does_and_read_duplicates_strictly() {
    let p = policy(
        r#"name = "p"
[[rule]]
name = "no-debug"
action = "deny"
headers = { "X-Debug" = "on" }
[[rule]]
name = "json"
action = "allow"
headers = { "content-type" = "application/json*", "X-Agent" = "a?" }
"#,
    );
    let mut headers = hyper::HeaderMap::new();
    headers.insert("Content-Type", "Application/JSON; charset=utf-8".parse().unwrap());
    headers.insert("x-agent", "a1".parse().unwrap());
    assert_eq!(decide(&p, "a.test", &req("POST", "/", Some(&headers), Some(1))), allow("json"));
    // Values of other headers keep their case.
    headers.insert("x-agent", "A1".parse().unwrap());
    assert_eq!(decide(&p, "a.test", &req("POST", "/", Some(&headers), Some(1))).1, "default-deny");
    headers.insert("x-agent", "a1".parse().unwrap());
    // A second value that does not match: the allow rule does not hold.
    headers.append("content-type", "text/plain".parse().unwrap());
    assert_eq!(decide(&p, "a.test", &req("POST", "/", Some(&headers), Some(1))).1, "default-deny");
    headers.remove("content-type");
    headers.insert("content-type", "application/json".parse().unwrap());
    assert_eq!(decide(&p, "a.test", &req("POST", "/", Some(&headers), Some(1))), allow("json"));
    // A deny rule matches on any one value.
    headers.insert("x-debug", "off".parse().unwrap());
    headers.append("x-debug", "on".parse().unwrap());
    assert_eq!(decide(&p, "a.test", &req("POST", "/", Some(&headers), Some(1))), deny("no-debug"));
}

#[test]
fn request_rules_only_open_connections_that_are_inspected() {
    let p = policy(API);
    let q = ConnectQuery { host: Some("api.test"), ip: ip("198.18.0.1"), port: 443 };
    assert_eq!(p.evaluate_inspected(&q).rule.as_ref(), "read-repos");
    // Spliced bytes could carry any request: no request-scoped allow.
    assert_eq!(p.evaluate(&q).rule.as_ref(), "default-deny");
    let pinned = p.evaluate(&ConnectQuery { host: Some("pinned.test"), ip: ip("198.18.0.2"), port: 443 });
    assert!(pinned.is_allowed() && pinned.passthrough);
    assert!(!p.evaluate_inspected(&q).passthrough);
}

#[test]
fn request_conditions_are_validated() {
    for (body, expected) in [
        ("methods = [\"GET /\"]", "not an HTTP method"),
        ("paths = [\"repos\"]", "must start with '/'"),
        ("methods = []", "`methods` is empty"),
        ("tls = \"passthrough\"\npaths = [\"/x\"]", "cannot have `methods`, `paths`"),
    ] {
        let text = format!("name = \"x\"\n[[rule]]\naction = \"allow\"\n{body}\n");
        let error = parse_profile(&text, "bad.toml").and_then(|p| Policy::compile(&p).map(|_| p)).unwrap_err();
        assert!(error.to_string().contains(expected), "{body}: {error}");
    }
}

#[test]
fn a_dry_run_lets_denials_through_and_marks_them() {
    let p =
        policy("name = \"trial\"\nmode = \"dry-run\"\n[[rule]]\nname = \"web\"\naction = \"allow\"\nports = [443]\n");
    let d = p.evaluate(&ConnectQuery { host: Some("example.org"), ip: ip("198.18.0.1"), port: 22 });
    assert!(d.is_allowed() && d.would_deny);
    assert_eq!(d.rule.as_ref(), "default-deny");
    let d = p.evaluate(&ConnectQuery { host: Some("example.org"), ip: ip("198.18.0.1"), port: 443 });
    assert!(d.is_allowed() && !d.would_deny);
    let enforced = policy("name = \"x\"\n");
    let d = enforced.evaluate(&ConnectQuery { host: None, ip: ip("198.18.0.1"), port: 22 });
    assert!(!d.is_allowed() && !d.would_deny);
}

// --- ask, request conditions, bundles, includes -------------------------

fn req<'a>(method: &'a str, path: &'a str, headers: Option<&'a hyper::HeaderMap>, len: Option<u64>) -> RequestInfo<'a> {
    RequestInfo { method, path, scheme: Scheme::Https, headers, body_len: len }
}

fn decide(p: &Policy, host: &str, request: &RequestInfo<'_>) -> (Verdict, String) {
    let d = p.evaluate_request(&ConnectQuery { host: Some(host), ip: ip("198.18.0.1"), port: 443 }, request);
    (d.verdict, d.rule.to_string())
}

#[test]
fn deny_wins_over_allow_and_allow_over_ask() {
    let p = policy(
        r#"name = "p"
[[rule]]
name = "reads"
action = "allow"
methods = ["GET"]
[[rule]]
name = "ask-the-rest"
action = "ask"
[[rule]]
name = "no-admin"
action = "deny"
paths = ["/admin/**"]
"#,
    );
    assert_eq!(decide(&p, "a.test", &req("GET", "/", None, Some(0))), allow("reads"));
    assert_eq!(decide(&p, "a.test", &req("POST", "/x", None, Some(0))), (Verdict::Ask, "ask-the-rest".into()));
    assert_eq!(decide(&p, "a.test", &req("POST", "/admin/x", None, Some(0))), deny("no-admin"));
    assert_eq!(decide(&p, "a.test", &req("GET", "/admin/x", None, Some(0))), deny("no-admin"));
    // The connection goes ahead; its requests are asked about.
    let q = ConnectQuery { host: Some("a.test"), ip: ip("198.18.0.1"), port: 443 };
    assert_eq!(p.evaluate_inspected(&q).verdict, Verdict::Allow);
    // An ask rule with no request conditions holds opaque connections.
    let opaque = policy("name = \"p\"\n[[rule]]\nname = \"ssh\"\naction = \"ask\"\nports = [22]\n");
    let d = opaque.evaluate(&ConnectQuery { host: None, ip: ip("198.18.0.1"), port: 22 });
    assert_eq!((d.verdict, d.rule.as_ref()), (Verdict::Ask, "ssh"));
    let asked =
        policy("name = \"p\"\n[[rule]]\nname = \"ssh\"\naction = \"ask\"\nhosts = [\"*.test\"]\nports = [22]\n");
    assert_eq!(asked.may_resolve("x.test").verdict, Verdict::Allow, "asked-about names resolve");
    assert_eq!(opaque.may_resolve("x.test").rule.as_ref(), NO_HOSTS_NAMED, "a profile naming no hosts resolves none");
}

#[test]
fn header_scheme_and_body_size_conditions() {
    let p = policy(
        r#"name = "p"
[[rule]]
name = "json-uploads"
action = "allow"
methods = ["POST"]
schemes = ["https"]
headers = { "Content-Type" = "application/json*", "x-agent" = "*" }
max_body = "1KiB"
"#,
    );
    let mut headers = hyper::HeaderMap::new();
    headers.insert("content-type", "application/json; charset=utf-8".parse().unwrap());
    headers.insert("x-agent", "a1".parse().unwrap());
    assert_eq!(decide(&p, "a.test", &req("POST", "/", Some(&headers), Some(1024))), allow("json-uploads"));
    assert_eq!(decide(&p, "a.test", &req("POST", "/", Some(&headers), Some(1025))).1, "default-deny");
    let streamed = p.evaluate_request(
        &ConnectQuery { host: Some("a.test"), ip: ip("198.18.0.1"), port: 443 },
        &req("POST", "/", Some(&headers), None),
    );
    assert_eq!((streamed.verdict, streamed.max_body), (Verdict::Allow, Some(1024)), "the proxy enforces it");
    let plain = RequestInfo { scheme: Scheme::Http, ..req("POST", "/", Some(&headers), Some(1)) };
    assert_eq!(decide(&p, "a.test", &plain).1, "default-deny");
    headers.insert("content-type", "text/plain".parse().unwrap());
    assert_eq!(decide(&p, "a.test", &req("POST", "/", Some(&headers), Some(1))).1, "default-deny");
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.remove("x-agent");
    assert_eq!(decide(&p, "a.test", &req("POST", "/", Some(&headers), Some(1))).1, "default-deny");
    assert_eq!(decide(&p, "a.test", &req("POST", "/", None, Some(1))).1, "default-deny");

    for (body, expected) in [
        ("action = \"deny\"\nmax_body = 10", "deny rule cannot have it"),
        ("action = \"allow\"\nheaders = { \"bad header\" = \"*\" }", "not an HTTP header name"),
        ("action = \"allow\"\nschemes = [\"gopher\"]", "unknown variant `gopher`"),
        ("action = \"allow\"\nmax_body = \"1 parsec\"", "unknown unit"),
        ("action = \"allow\"\ntls = \"passthrough\"\nheaders = { a = \"*\" }", "passthrough rule cannot"),
    ] {
        let err = parse_err(&format!("name = \"x\"\n[[rule]]\n{body}\n"));
        assert!(err.contains(expected), "{body}: {err}");
    }
}

#[test]
fn bundles_name_their_decisions_need_their_aliases_and_can_be_revoked() {
    let text = r#"name = "agent"
bundles = ["vcs.github.readonly", "pkg.pypi"]
[aliases]
pypi = ["pypi.mirror.test", "*.files.mirror.test"]
"#;
    let p = policy(text);
    let d = p.evaluate_request(
        &ConnectQuery { host: Some("github.com"), ip: ip("198.18.0.1"), port: 443 },
        &req("POST", "/sluice/sluice.git/git-upload-pack", None, Some(10)),
    );
    assert_eq!((d.verdict, d.rule.as_ref()), (Verdict::Allow, "vcs.github.readonly/fetch"));
    assert_eq!(d.bundle.as_deref(), Some("vcs.github.readonly"));
    assert_eq!(
        decide(&p, "github.com", &req("POST", "/sluice/sluice.git/git-receive-pack", None, Some(1))).1,
        "default-deny"
    );
    assert_eq!(decide(&p, "a.files.mirror.test", &req("GET", "/p.whl", None, Some(0))), allow("pkg.pypi/download"));
    assert_eq!(p.bundles().len(), 2);

    let mut revoked = Revoked::new();
    revoked.insert("pkg.pypi".to_owned());
    let cut = Policy::compile_revoked(&parse_profile(text, "t").unwrap(), &revoked).unwrap();
    assert_eq!(decide(&cut, "a.files.mirror.test", &req("GET", "/p.whl", None, Some(0))).1, "default-deny");
    assert_eq!(decide(&cut, "github.com", &req("GET", "/", None, Some(0))), allow("vcs.github.readonly/read"));

    let missing = parse_err("name = \"x\"\nbundles = [\"pkg.npm\"]\n");
    assert!(missing.contains("bundle pkg.npm uses host alias @npm") && missing.contains("[aliases]"), "{missing}");
    let unknown = parse_err("name = \"x\"\nbundles = [\"pkg.cobol\"]\n");
    assert!(unknown.contains("no such capability bundle"), "{unknown}");
    let public = policy("name = \"x\"\nbundles = [\"net.read.public\"]\n");
    assert_eq!(decide(&public, "a.test", &req("GET", "/", None, Some(0))), allow("net.read.public/read"));
    let private = public.evaluate_request(
        &ConnectQuery { host: Some("a.test"), ip: ip("10.0.0.1"), port: 443 },
        &req("GET", "/", None, Some(0)),
    );
    assert_eq!(private.rule.as_ref(), "default-deny");
}

#[test]
fn includes_merge_files_and_refuse_cycles_and_clashes() {
    let dir = std::env::temp_dir().join(format!("sluice-include-test-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("shared")).unwrap();
    std::fs::write(
            dir.join("shared/base.toml"),
            "name = \"base\"\nbundles = [\"net.read.public\"]\n[[rule]]\nname = \"no-ssh\"\naction = \"deny\"\nports = [22]\n",
        )
        .unwrap();
    std::fs::write(
            dir.join("agent.toml"),
            "name = \"agent\"\ninclude = [\"shared/base.toml\"]\n[[rule]]\nname = \"api\"\naction = \"allow\"\nhosts = [\"api.test\"]\n",
        )
        .unwrap();
    let profile = load_profile(&dir.join("agent.toml")).unwrap();
    assert_eq!(profile.name, "agent");
    assert!(profile.include.is_empty());
    assert_eq!(profile.bundles, ["net.read.public"]);
    let p = Policy::compile(&profile).unwrap();
    assert_eq!(eval(&p, Some("api.test"), "198.18.0.1", 22), deny("no-ssh"));
    assert_eq!(eval(&p, Some("api.test"), "198.18.0.1", 8443), allow("api"));
    // The merged profile travels as text (control API, state file).
    assert_eq!(parse_profile(&toml::to_string(&profile).unwrap(), "merged").unwrap(), profile);

    std::fs::write(dir.join("shared/base.toml"), "name = \"base\"\ninclude = [\"../agent.toml\"]\n").unwrap();
    let cycle = load_profile(&dir.join("agent.toml")).unwrap_err().to_string();
    assert!(cycle.contains("cycle"), "{cycle}");
    std::fs::write(dir.join("shared/base.toml"), "name = \"base\"\n[[rule]]\nname = \"api\"\naction = \"deny\"\n")
        .unwrap();
    let clash = load_profile(&dir.join("agent.toml")).unwrap_err().to_string();
    assert!(clash.contains("\"api\"") && clash.contains("base.toml"), "{clash}");
    std::fs::write(dir.join("shared/base.toml"), "name = \"base\"\n[[rule]]\naction = \"maybe\"\n").unwrap();
    let broken = load_profile(&dir.join("agent.toml")).unwrap_err().to_string();
    assert!(broken.contains("base.toml:3:10"), "errors point into the included file: {broken}");
    let text_only = parse_err("name = \"x\"\ninclude = [\"a.toml\"]\n");
    assert!(text_only.contains("`include` is resolved when a profile is loaded from its file"), "{text_only}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn profiles_others_could_change_are_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("sluice-trust-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("shared")).unwrap();
    let set_mode = |path: &Path, mode: u32| std::fs::set_permissions(path, PermissionsExt::from_mode(mode)).unwrap();
    set_mode(&dir, 0o755);
    set_mode(&dir.join("shared"), 0o755);
    let base = dir.join("shared/base.toml");
    let agent = dir.join("agent.toml");
    std::fs::write(&base, "name = \"base\"\n").unwrap();
    std::fs::write(&agent, "name = \"agent\"\ninclude = [\"shared/base.toml\"]\n").unwrap();
    set_mode(&base, 0o644);
    set_mode(&agent, 0o644);
    load_profile(&agent).unwrap();

    set_mode(&agent, 0o664);
    let err = load_profile(&agent).unwrap_err().to_string();
    assert!(err.contains(&agent.display().to_string()) && err.contains("writable by its group"), "{err}");
    assert!(err.contains(&format!("chmod go-w {}", agent.display())), "{err}");
    // Tools that only report on a file still read it.
    assert_eq!(load_profile_untrusted(&agent).unwrap().name, "agent");
    set_mode(&agent, 0o644);

    // An include is held to the same standard.
    set_mode(&base, 0o646);
    let err = load_profile(&agent).unwrap_err().to_string();
    assert!(err.contains("base.toml") && err.contains("writable by others"), "{err}");
    set_mode(&base, 0o644);

    // A directory others can write lets them replace the file.
    set_mode(&dir.join("shared"), 0o777);
    let err = load_profile(&agent).unwrap_err().to_string();
    assert!(err.contains("its directory") && err.contains("chmod go-w"), "{err}");
    set_mode(&dir.join("shared"), 0o755);

    // SAFETY: geteuid has no arguments.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(&base, Some(65534), None).unwrap();
        let err = load_profile(&agent).unwrap_err().to_string();
        assert!(err.contains("owned by uid 65534") && err.contains("chown root"), "{err}");
    } else {
        eprintln!("SKIPPED: the ownership case needs root");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The profile fuzz target's committed corpus: parsing never panics, and
/// a profile that parses compiles and survives a round trip.
#[test]
fn the_profile_fuzz_corpus_replays() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/profile");
    let mut parsed = 0;
    for entry in std::fs::read_dir(dir).expect("fuzz/corpus/profile") {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let Ok(text) = std::str::from_utf8(&bytes) else { continue };
        if let Ok(profile) = parse_profile(text, "corpus.toml") {
            Policy::compile(&profile).unwrap();
            parse_profile(&toml::to_string(&profile).unwrap(), "again.toml").unwrap();
            parsed += 1;
        }
    }
    assert!(parsed >= 1, "no corpus profile parsed");
}

#[test]
fn the_json_schema_describes_the_format() {
    let schema = json_schema();
    let text = schema.to_string();
    for needle in ["\"rule\"", "\"bundles\"", "\"include\"", "\"max_body\"", "\"ask\"", "HostPattern"] {
        assert!(text.contains(needle), "schema lacks {needle}");
    }
    // The copy in the repository is what editors and CI read.
    let shipped: serde_json::Value =
        serde_json::from_str(include_str!("../../../docs/profile.schema.json")).expect("docs/profile.schema.json");
    assert_eq!(shipped, schema, "docs/profile.schema.json is stale: regenerate it with `sluice policy schema`");
}
