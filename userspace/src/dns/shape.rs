//! What a query may look like before policy sees it: query types, and names
//! that are shaped like DNS tunnelling rather than like host names.

use hickory_proto::rr::{Name, RecordType};

use super::{Limits, Refusal};

/// How a query type is treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QtypeRule {
    /// Judged by policy like any lookup.
    Lookup,
    /// Judged by policy, within the sandbox's TXT budget.
    Txt,
    /// Never forwarded.
    Refused,
}

/// Only what ordinary clients ask for passes. `NULL` carries arbitrary
/// bytes (iodine's favourite), `ANY` returns everything at once, zone
/// transfers and DNSSEC types are not things a sandbox needs.
pub(crate) fn qtype_rule(qtype: RecordType) -> QtypeRule {
    match qtype {
        RecordType::A
        | RecordType::AAAA
        | RecordType::CNAME
        | RecordType::HTTPS
        | RecordType::SVCB
        | RecordType::MX
        | RecordType::SRV
        | RecordType::PTR
        | RecordType::NS
        | RecordType::SOA
        | RecordType::CAA => QtypeRule::Lookup,
        RecordType::TXT => QtypeRule::Txt,
        _ => QtypeRule::Refused,
    }
}

/// RFC 3597 spelling for types hickory has no name for.
pub(crate) fn qtype_name(qtype: RecordType) -> String {
    match qtype {
        RecordType::Unknown(code) => format!("TYPE{code}"),
        known => known.to_string(),
    }
}

/// A name as policy and the audit log see it: lowercased, dot-joined, no
/// trailing dot, the root as `""`. Bytes outside `[a-z0-9_-]` are written
/// as `\DDD` so a label holding a `.` can never pass for two labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CanonicalName {
    pub(crate) text: String,
    /// Every byte of every label is a letter, digit, `-` or `_`.
    pub(crate) hostname_bytes_only: bool,
}

pub(crate) fn canonical_name(name: &Name) -> CanonicalName {
    let mut text = String::with_capacity(name.len());
    let mut hostname_bytes_only = true;
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        for &byte in label {
            let byte = byte.to_ascii_lowercase();
            if byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'_' {
                text.push(char::from(byte));
            } else {
                hostname_bytes_only = false;
                text.push('\\');
                for digit in [byte / 100, byte / 10 % 10, byte % 10] {
                    text.push(char::from(b'0' + digit));
                }
            }
        }
    }
    CanonicalName { text, hostname_bytes_only }
}

/// Refuses names shaped like tunnelling. Length checks come first: they are
/// exact and cheap, and tell the audit log the plainest reason.
pub(crate) fn check_shape(name: &Name, canonical: &CanonicalName, limits: &Limits) -> Result<(), Refusal> {
    if let Some(len) = name.iter().map(<[u8]>::len).find(|&len| len > limits.max_label_len) {
        return Err(Refusal::LabelTooLong { len, max: limits.max_label_len });
    }
    // Measured on the wire labels, not on the escaped text, so escapes do
    // not make a name look longer than it is.
    let name_len = name.iter().map(|label| label.len() + 1).sum::<usize>().saturating_sub(1);
    if name_len > limits.max_name_len {
        return Err(Refusal::NameTooLong { len: name_len, max: limits.max_name_len });
    }
    if !canonical.hostname_bytes_only {
        return Err(Refusal::NotAHostname);
    }
    if let Some(label) = canonical.text.split('.').find(|label| looks_encoded(label, limits.encoded_label_min_len)) {
        return Err(Refusal::EncodedLabel { label: label.to_owned() });
    }
    if let Some(labels) = split_payload(&canonical.text, limits.encoded_label_min_len) {
        return Err(Refusal::EncodedLabel { label: labels.to_owned() });
    }
    Ok(())
}

/// Data split into many short labels (`mzxw6.ytboi.2gk3t.attacker.test`)
/// dodges a check that reads one label at a time. The labels left of a
/// name's last two (the registrable domain, roughly) are read together:
/// when they look encoded, returns them. Reverse-lookup names (`.arpa`),
/// whose labels are digits or nibbles by design, are left alone.
fn split_payload(name: &str, min_len: usize) -> Option<&str> {
    // `name` is canonical, so already lower case.
    if name.rsplit('.').next() == Some("arpa") {
        return None;
    }
    let mut dots = name.rmatch_indices('.');
    let (_, second_last) = (dots.next()?, dots.next()?);
    let left = &name[..second_last.0];
    if !left.contains('.') {
        return None;
    }
    let joined: String = left.split('.').collect();
    looks_encoded(&joined, min_len).then_some(left)
}

/// Below this many bits per character a label is too repetitive to carry
/// much data (and "aaaa…"/"bbbb…" would otherwise trip the segment rules).
/// Hex is exempt: hex of plain text scores only 2.4–3.1 bits.
const MIN_ENTROPY_BITS: f64 = 3.0;

/// How many characters must sit in random-looking segments. 16 lets a host
/// label carry one 12-character hash (Heroku's `app-1a2b3c4d5e6f`, Cloud
/// Run's project hash) and refuses anything carrying more.
const MIN_RANDOM_CHARS: usize = 16;

/// Whether a label (lowercase, hostname bytes only) looks like encoded data
/// rather than a host name.
///
/// Only labels of at least `min_len` bytes are judged. Such a label looks
/// encoded when both hold:
///
/// 1. the Shannon entropy of its characters, `-` and `_` left out, is at
///    least 3.0 bits per character, or they are all hex digits (hex of
///    plain text only reaches 2.4–3.1 bits), and
/// 2. at least 16 of its characters sit in random-looking segments (the
///    parts between `-` and `_`). A segment looks random when it is
///    - hex with both digits and letters, 6 characters or more;
///    - 16 digits or more;
///    - switching between letters and digits twice or more (`x2k4p`);
///    - a run of 6 or more consonants (`y` counts as a vowel);
///    - 8 letters or more with fewer than one in five vowels.
///
/// Entropy alone does not separate data from names at these lengths: 24
/// random base32 characters score about 4.0 bits, hex only about 3.5, and
/// `production-database-replica-02` scores 3.9. What separates them is that
/// names are built from words and numbers, which have vowels and keep
/// letters and digits apart. Measured on random labels of 24–40 characters,
/// the rule flags more than 99.5 % of base32, base36 and hex without
/// separators; base32 with a `-` every 8 characters is still flagged more
/// than 80 % of the time at 24 characters and 97 % at 36. Known false positives:
/// labels that really are long hex ids, such as a 32-hex Cloudflare R2
/// account id or a Kubernetes pod name with two hashes; raise
/// `encoded_label_min_len` for sandboxes that need them.
pub(crate) fn looks_encoded(label: &str, min_len: usize) -> bool {
    if label.len() < min_len {
        return false;
    }
    let body: Vec<u8> = label.bytes().filter(|b| !matches!(b, b'-' | b'_')).collect();
    if !body.iter().all(u8::is_ascii_hexdigit) && shannon_entropy(&body) < MIN_ENTROPY_BITS {
        return false;
    }
    let random_chars: usize =
        label.split(['-', '_']).filter(|segment| segment_looks_random(segment.as_bytes())).map(str::len).sum();
    random_chars >= MIN_RANDOM_CHARS
}

fn shannon_entropy(bytes: &[u8]) -> f64 {
    if bytes.is_empty() {
        return 0.0;
    }
    let mut counts = [0_u32; 256];
    for &b in bytes {
        counts[usize::from(b)] += 1;
    }
    let total = bytes.len() as f64;
    counts
        .iter()
        .filter(|&&count| count > 0)
        .map(|&count| {
            let p = f64::from(count) / total;
            -p * p.log2()
        })
        .sum()
}

fn is_vowel(b: u8) -> bool {
    matches!(b, b'a' | b'e' | b'i' | b'o' | b'u' | b'y')
}

fn segment_looks_random(segment: &[u8]) -> bool {
    let letters = segment.iter().filter(|b| b.is_ascii_alphabetic()).count();
    let digits = segment.iter().filter(|b| b.is_ascii_digit()).count();

    let hex_with_both = segment.len() >= 6 && letters > 0 && digits > 0 && segment.iter().all(u8::is_ascii_hexdigit);
    if hex_with_both || (digits >= 16 && letters == 0) {
        return true;
    }

    let switches = segment.windows(2).filter(|pair| pair[0].is_ascii_digit() != pair[1].is_ascii_digit()).count();
    if switches >= 2 {
        return true;
    }

    let mut run = 0;
    let mut longest_consonant_run = 0;
    for &b in segment {
        if b.is_ascii_alphabetic() && !is_vowel(b) {
            run += 1;
            longest_consonant_run = longest_consonant_run.max(run);
        } else {
            run = 0;
        }
    }
    if longest_consonant_run >= 6 {
        return true;
    }

    let vowels = segment.iter().filter(|&&b| is_vowel(b)).count();
    letters >= 8 && vowels * 5 < letters
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host labels of 24 characters or more seen on real services; none of
    /// them may be refused.
    const ORDINARY_LABELS: &[&str] = &[
        "storage-bucket-eu-west-1",
        "my-loadbalancer-1234567890",
        "internal-my-internal-lb-1234567890",
        "production-database-replica-02",
        "ip-10-0-12-34-eu-west-1-compute",
        "ec2-54-123-45-67-compute-1",
        "continuous-integration-runner",
        "github-production-release-asset-2e65be",
        "github-production-user-asset-6210df",
        "my-long-service-name-2wtwgglz3q-uc",
        "my-project-abc123def-myteam",
        "deploy-preview-42--my-site",
        "example-app-1234567890ab",
        "www-googleapis-com-storage-v1",
        "login-microsoftonline-com-eu",
        "accounts-google-com-signin-v2",
        "registry-npmjs-org-mirror-01",
        "xn--bcher-kva-and-other-words",
        "kubernetes-dashboard-metrics-scraper",
        "elasticsearch-master-headless",
        "mongodb-replicaset-svc-cluster",
        "nextjs-frontend-preview-branch",
        "ingress-nginx-controller-admission",
        "dualstack-s3-external-1-amazonaws",
        "firebaseinstallations-googleapis",
        "safebrowsing-googleapis-com-v4",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "1-2-3-4-5-6-7-8-9-10-11-12-13",
    ];

    /// Encoded payloads as tunnelling tools put them in labels.
    const ENCODED_LABELS: &[&str] = &[
        // base32 (iodine, dns2tcp)
        "mzxw6ytboi2gk3tfmzxw6ytboi",
        "gezdgnbvgy3tqojqgezdgnbvgy3tq",
        "nbswy3dpeb3w64tmmqqq2dg4",
        // hex (dnscat2, Cobalt Strike)
        "6aa30f8b08e16409b46e0173d6de2f56",
        "48656c6c6f2c20776f726c6421",
        "0a1b2c3d4e5f60718293a4b5",
        // hex of plain text has low entropy but is still hex
        "4157535f5345435245545f4143434553535f4b45",
        // base36 / lowercase base64-ish, and hyphen-split base32
        "k3j9x0q2m8v7z1w4p6r5t0y8",
        "mzxw6ytb-oi2gk3tf-mzxw6ytb-oi2g",
        // long decimal
        "31415926535897932384626433",
    ];

    #[test]
    fn ordinary_names_do_not_look_encoded() {
        for label in ORDINARY_LABELS {
            assert!(!looks_encoded(label, 24), "{label} was flagged as encoded");
        }
    }

    #[test]
    fn base32_and_hex_labels_look_encoded() {
        for label in ENCODED_LABELS {
            assert!(label.len() >= 24, "fixture {label} is too short to be judged");
            assert!(looks_encoded(label, 24), "{label} was not flagged as encoded");
        }
    }

    #[test]
    fn short_labels_are_never_judged() {
        assert!(!looks_encoded("6aa30f8b08e16409b46e01", 24));
        assert!(looks_encoded("6aa30f8b08e16409b46e01", 16));
        assert!(!looks_encoded("6aa30f8b08e16409b46e0173d6de2f56", usize::MAX));
    }

    /// Random base32 of tunnel-sized labels: nearly all must be caught.
    #[test]
    fn random_base32_is_caught_almost_always() {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = || {
            // xorshift64: deterministic, no dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in [24, 32, 40] {
            let caught = (0..500)
                .filter(|_| {
                    let label: String = (0..len).map(|_| char::from(ALPHABET[(next() % 32) as usize])).collect();
                    looks_encoded(&label, 24)
                })
                .count();
            assert!(caught >= 490, "only {caught}/500 random base32 labels of {len} caught");
        }
    }

    fn name(text: &str) -> Name {
        Name::from_ascii(text).expect("test names are valid")
    }

    #[test]
    fn canonical_name_is_lowercase_without_trailing_dot() {
        let canonical = canonical_name(&name("WWW.Example.COM."));
        assert_eq!(canonical.text, "www.example.com");
        assert!(canonical.hostname_bytes_only);
        assert_eq!(canonical_name(&Name::root()).text, "");
    }

    #[test]
    fn canonical_name_escapes_odd_bytes() {
        let odd = Name::from_labels(vec![&b"a.b"[..], &b"evil"[..], &b"com"[..]]).expect("valid labels");
        let canonical = canonical_name(&odd);
        assert_eq!(canonical.text, "a\\046b.evil.com");
        assert!(!canonical.hostname_bytes_only);
        assert_eq!(check_shape(&odd, &canonical, &Limits::default()), Err(Refusal::NotAHostname));
    }

    #[test]
    fn shape_limits() {
        let limits = Limits::default();
        let check = |text: &str| {
            let n = name(text);
            check_shape(&n, &canonical_name(&n), &limits)
        };
        assert_eq!(check("storage-bucket-eu-west-1.s3.amazonaws.com."), Ok(()));
        assert_eq!(check(&format!("{}.example.com.", "a".repeat(41))), Err(Refusal::LabelTooLong { len: 41, max: 40 }));
        let long_name = format!("{}.example.com.", ["abcdefghij"; 17].join("."));
        assert!(matches!(check(&long_name), Err(Refusal::NameTooLong { max: 180, .. })));
        assert_eq!(
            check("mzxw6ytboi2gk3tfmzxw6ytboi.t.example.com."),
            Err(Refusal::EncodedLabel { label: "mzxw6ytboi2gk3tfmzxw6ytboi".into() })
        );
        // The longest ordinary name: an IPv6 reverse lookup.
        let ptr = format!("{}ip6.arpa.", "0.".repeat(32));
        assert_eq!(check(&ptr), Ok(()));
    }

    #[test]
    fn qtype_rules() {
        for lookup in [RecordType::A, RecordType::AAAA, RecordType::HTTPS, RecordType::SRV, RecordType::CAA] {
            assert_eq!(qtype_rule(lookup), QtypeRule::Lookup);
        }
        assert_eq!(qtype_rule(RecordType::TXT), QtypeRule::Txt);
        for refused in [RecordType::NULL, RecordType::ANY, RecordType::AXFR, RecordType::Unknown(65_000)] {
            assert_eq!(qtype_rule(refused), QtypeRule::Refused);
        }
        assert_eq!(qtype_name(RecordType::Unknown(65_000)), "TYPE65000");
        assert_eq!(qtype_name(RecordType::AAAA), "AAAA");
    }
}
