//! Request paths as an upstream would read them, for rule `paths` and
//! credential `paths` scopes.
//!
//! A path glob is written against a clean path (`/repos/acme/**`), but a
//! sandbox chooses the bytes it sends, and upstreams differ in how they read
//! them. This module owns the one answer to "which paths does this request
//! mean":
//!
//! - [`normalize`] gives the canonical reading (RFC 3986 section 6.2.2):
//!   escapes of unreserved characters decoded (`%61` is `a`, `%2e` is `.`),
//!   other escapes kept with upper-case hex, dot segments removed (`/a/../b`
//!   is `/b`, `/./` is `/`), duplicate slashes merged. It never contains a
//!   `.` or `..` segment or `//`, and normalising it again changes nothing.
//! - [`readings`] adds the other readings that real servers apply, when the
//!   raw path gives them room: every escape decoded (`%2F` and `%5C` and a
//!   raw `\` become `/`, `%40` becomes `@`), `;` parameters cut from each
//!   segment (servlet containers read `/admin;x/y` as `/admin/y`), and dot
//!   segments removed before duplicate slashes are merged (RFC 3986 reads
//!   `/a//../b` as `/a/b`). Each reading is normalised as above.
//!
//! The policy decides a request on every reading and keeps the strictest
//! outcome, so a path that some upstream reads as outside an allow rule, or
//! inside a deny rule, is treated that way: matching is never looser than
//! the upstream. A path that is not a well-formed request path (a bad
//! escape, raw control or non-ASCII bytes, not starting with `/`) is refused.

use std::fmt;

/// Why a path cannot be matched at all; the request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// Neither `/...` nor `*`.
    NotAbsolute,
    /// A `%` not followed by two hex digits, at this byte offset.
    BadEscape(usize),
    /// A raw byte no request target may carry (control, space, non-ASCII).
    BadByte(u8),
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAbsolute => f.write_str("the request path does not start with '/'"),
            Self::BadEscape(at) => write!(f, "the request path has a malformed %-escape at byte {at}"),
            Self::BadByte(byte) => write!(f, "the request path contains the raw byte 0x{byte:02x}"),
        }
    }
}

impl std::error::Error for PathError {}

/// How much of the path's escaping a reading decodes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Decode {
    /// Unreserved characters only (RFC 3986 normalisation).
    Unreserved,
    /// Every escape of a printable ASCII character, `\` as `/`.
    Printable,
}

#[derive(Clone, Copy)]
struct Reading {
    decode: Decode,
    /// Cut `;params` from each segment.
    strip_params: bool,
    /// Remove dot segments before merging duplicate slashes.
    keep_empty: bool,
}

const CANONICAL: Reading = Reading { decode: Decode::Unreserved, strip_params: false, keep_empty: false };

/// The canonical reading of `raw` (a request path without its query).
pub fn normalize(raw: &str) -> Result<String, PathError> {
    check(raw)?;
    Ok(read(raw, CANONICAL))
}

/// Every distinct way an upstream may read `raw`, the canonical reading
/// first. Most paths have exactly one.
pub fn readings(raw: &str) -> Result<Vec<String>, PathError> {
    check(raw)?;
    let bytes = raw.as_bytes();
    let decodes: &[Decode] = if bytes.iter().any(|&b| b == b'%' || b == b'\\') {
        &[Decode::Unreserved, Decode::Printable]
    } else {
        &[Decode::Unreserved]
    };
    // Decoding may reveal `;` or `//` that the raw bytes only had escaped.
    let params = bytes.contains(&b';') || decodes.len() > 1;
    let empties = raw.contains("//") || decodes.len() > 1;
    let mut out: Vec<String> = Vec::with_capacity(1);
    for &decode in decodes {
        for strip_params in [false, true].into_iter().take(if params { 2 } else { 1 }) {
            for keep_empty in [false, true].into_iter().take(if empties { 2 } else { 1 }) {
                let reading = read(raw, Reading { decode, strip_params, keep_empty });
                if !out.contains(&reading) {
                    out.push(reading);
                }
            }
        }
    }
    Ok(out)
}

fn check(raw: &str) -> Result<(), PathError> {
    if !(raw.is_empty() || raw == "*" || raw.starts_with('/')) {
        return Err(PathError::NotAbsolute);
    }
    let bytes = raw.as_bytes();
    for (at, &byte) in bytes.iter().enumerate() {
        if !(0x21..=0x7e).contains(&byte) {
            return Err(PathError::BadByte(byte));
        }
        if byte == b'%' && !(hex(bytes.get(at + 1)).is_some() && hex(bytes.get(at + 2)).is_some()) {
            return Err(PathError::BadEscape(at));
        }
    }
    Ok(())
}

fn hex(byte: Option<&u8>) -> Option<u8> {
    let byte = *byte?;
    char::from(byte).to_digit(16).map(|d| d as u8)
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

/// `raw` must have passed [`check`].
fn read(raw: &str, reading: Reading) -> String {
    if raw == "*" {
        return raw.to_owned();
    }
    let decoded = decode(raw.as_bytes(), reading.decode);
    let segments = decoded.split('/').skip(1).map(|segment| match segment.split_once(';') {
        Some((kept, _)) if reading.strip_params => kept,
        _ => segment,
    });
    let mut stack: Vec<&str> = Vec::new();
    let mut segments = segments.peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." => {}
            ".." => {
                stack.pop();
            }
            "" if !reading.keep_empty => {}
            other => stack.push(other),
        }
        // A path that ends in a dot segment or a slash names a directory.
        if last && matches!(segment, "" | "." | "..") && stack.last() != Some(&"") {
            stack.push("");
        }
    }
    // With `keep_empty`, empty segments survive dot removal; merge them now
    // so that no reading contains `//`.
    let mut path = String::with_capacity(decoded.len() + 1);
    path.push('/');
    for (index, segment) in stack.iter().enumerate() {
        if segment.is_empty() {
            if index + 1 == stack.len() && !path.ends_with('/') {
                path.push('/');
            }
            continue;
        }
        if !path.ends_with('/') {
            path.push('/');
        }
        path.push_str(segment);
    }
    path
}

fn decode(bytes: &[u8], level: Decode) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        if byte == b'%' {
            // `check` made sure two hex digits follow.
            let (Some(hi), Some(lo)) = (hex(bytes.get(at + 1)), hex(bytes.get(at + 2))) else {
                out.push(char::from(byte));
                at += 1;
                continue;
            };
            let value = hi << 4 | lo;
            let keep_decoded = match level {
                Decode::Unreserved => is_unreserved(value),
                Decode::Printable => (0x21..=0x7e).contains(&value),
            };
            if keep_decoded {
                out.push(if level == Decode::Printable && value == b'\\' { '/' } else { char::from(value) });
            } else {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
                out.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
            }
            at += 3;
            continue;
        }
        out.push(if level == Decode::Printable && byte == b'\\' { '/' } else { char::from(byte) });
        at += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_canonical_reading_follows_rfc_3986() {
        for (raw, expected) in [
            ("", "/"),
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/../b", "/b"),
            ("/a/./b", "/a/b"),
            ("/./a", "/a"),
            ("/../../a", "/a"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/", "/a/"),
            ("//admin/x", "/admin/x"),
            ("/a//b///c", "/a/b/c"),
            ("/%61dmin/x", "/admin/x"),
            ("/repos/acme/%2e%2e/other", "/repos/other"),
            ("/repos/acme/%2E%2e/other", "/repos/other"),
            ("/repos/acme/.%2e/other", "/repos/other"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%40b", "/a%40b"),
            ("/a%7e", "/a~"),
            ("/admin;x/y", "/admin;x/y"),
            ("*", "*"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(expected), "{raw:?}");
        }
    }

    #[test]
    fn other_readings_cover_what_servers_do() {
        let all = |raw: &str| readings(raw).unwrap();
        assert_eq!(all("/repos/acme/x"), ["/repos/acme/x"], "a plain path has one reading");
        assert!(all("/admin;x/y").contains(&"/admin/y".to_owned()));
        assert!(all("/repos/acme/..;/other").contains(&"/repos/other".to_owned()));
        assert!(all("/admin%2Fx").contains(&"/admin/x".to_owned()));
        assert!(all("/repos/acme%2F..%2Fother/x").contains(&"/repos/other/x".to_owned()));
        assert!(all("/admin\\x").contains(&"/admin/x".to_owned()));
        assert!(all("/admin%5cx").contains(&"/admin/x".to_owned()));
        assert!(all("/users/%40me").contains(&"/users/@me".to_owned()));
        // RFC 3986 without merging slashes first: `..` eats the empty segment.
        let both = all("/repos/acme//../other");
        assert_eq!(both[0], "/repos/other");
        assert!(both.contains(&"/repos/acme/other".to_owned()), "{both:?}");
        // Escapes of bytes that are not printable stay escaped in every reading.
        assert!(all("/a%00b").iter().all(|r| r == "/a%00b"));
    }

    #[test]
    fn malformed_paths_are_refused() {
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%4"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a b"), Err(PathError::BadByte(b' ')));
        assert_eq!(normalize("/a\x1b[31m"), Err(PathError::BadByte(0x1b)));
        assert_eq!(normalize("/caf\u{e9}"), Err(PathError::BadByte(0xc3)));
        assert_eq!(normalize("admin"), Err(PathError::NotAbsolute));
        assert!(readings("/a%g0").is_err());
    }

    fn path_strategy() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_owned()),
            Just("//".to_owned()),
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%2e".to_owned()),
            Just("%2E".to_owned()),
            Just("%2f".to_owned()),
            Just("%5C".to_owned()),
            Just("\\".to_owned()),
            Just(";".to_owned()),
            Just("%25".to_owned()),
            Just("%3b".to_owned()),
            "[a-z]{1,3}",
            "%[0-9a-fA-F]{2}",
        ];
        prop::collection::vec(piece, 0..12).prop_map(|pieces| format!("/{}", pieces.concat()))
    }

    fn clean(path: &str) {
        assert!(path.starts_with('/'), "{path:?}");
        assert!(!path.contains("//"), "{path:?}");
        assert!(path.split('/').all(|segment| segment != ".." && segment != "."), "{path:?}");
    }

    /// The fuzz target's committed corpus (and any crash added to it).
    #[test]
    fn the_fuzz_corpus_replays_clean() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/corpus/path");
        let mut replayed = 0;
        for entry in std::fs::read_dir(dir).expect("fuzz/corpus/path") {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let Ok(raw) = std::str::from_utf8(&bytes) else { continue };
            match (normalize(raw), readings(raw)) {
                (Ok(once), Ok(all)) => {
                    if once != "*" {
                        clean(&once);
                    }
                    assert_eq!(normalize(&once).as_deref(), Ok(once.as_str()), "{raw:?}");
                    assert_eq!(all[0], once);
                    all.iter().filter(|r| *r != "*").for_each(|r| clean(r));
                }
                (Err(a), Err(b)) => assert_eq!(a, b, "{raw:?}"),
                (a, b) => panic!("{raw:?}: {a:?} {b:?}"),
            }
            replayed += 1;
        }
        assert!(replayed >= 10, "only {replayed} corpus files");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn normalising_is_idempotent_and_leaves_no_dot_segments(raw in path_strategy()) {
            let once = normalize(&raw).unwrap();
            clean(&once);
            prop_assert_eq!(normalize(&once).unwrap(), once.clone());
            let all = readings(&raw).unwrap();
            prop_assert_eq!(&all[0], &once);
            for reading in &all {
                clean(reading);
            }
        }

        #[test]
        fn no_reading_escapes_the_prefix_unless_a_dot_segment_climbs(tail in path_strategy()) {
            // Without `..` (raw or escaped), every reading stays under the
            // prefix, so a rule for the prefix sees every reading.
            let raw = format!("/repos/acme{tail}");
            let climbs = raw.to_ascii_lowercase().contains("..")
                || raw.to_ascii_lowercase().contains("%2e");
            for reading in readings(&raw).unwrap() {
                if !climbs {
                    prop_assert!(reading.starts_with("/repos/acme"), "{} read as {}", raw, reading);
                }
            }
        }
    }
}
