//! Sandbox-controlled text made safe for a terminal.
//!
//! A decision names things the sandbox chose: a TLS server name, a Host
//! header, a path, a DNS name, a label. Printed raw, an ESC sequence in one
//! of them could clear the operator's screen, rewrite the line above, set
//! the window title or hide a denial. Everything a person reads (`sluice
//! run`'s live lines, `sluice log`) goes through [`terminal_safe`]; JSON
//! output is escaped by the JSON encoder already.

use std::borrow::Cow;
use std::fmt::Write as _;

/// `text` with every character a terminal could act on written as an
/// escape: C0 controls and DEL as `\xHH`, C1 controls, bidirectional
/// overrides, zero-width characters and other format characters as
/// `\u{H}`. A backslash is written as `\\` only when it could be mistaken
/// for one of these escapes, so DNS names' `\DDD` read as before.
pub fn terminal_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| needs_escape(c) || c == '\\') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            // `\x` and `\u` would read as one of our escapes.
            let ambiguous = matches!(chars.peek(), Some('x' | 'u' | '\\'));
            out.push_str(if ambiguous { "\\\\" } else { "\\" });
        } else if !needs_escape(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            let _ = write!(out, "\\x{:02x}", c as u32);
        } else {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c as u32,
            // Zero-width and joiner characters, line and paragraph separators,
            // bidirectional embeddings, overrides and isolates, the BOM.
            0x200b..=0x200f | 0x2028..=0x202e | 0x2060..=0x2069 | 0xfeff
            // Soft hyphen, interlinear annotation, specials that can hide text.
            | 0xad | 0xfff9..=0xfffb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_left_alone() {
        for text in ["files.demo.test", "/repos/acme/x?y", "caf\u{e9}.test", "a\\055b.test", ""] {
            assert!(matches!(terminal_safe(text), Cow::Borrowed(_)) || terminal_safe(text) == text, "{text}");
            assert_eq!(terminal_safe(text), text);
        }
    }

    #[test]
    fn control_and_format_characters_are_escaped() {
        assert_eq!(terminal_safe("evil\x1b[2J.test"), "evil\\x1b[2J.test");
        assert_eq!(terminal_safe("a\u{9b}31m"), "a\\u{9b}31m");
        assert_eq!(terminal_safe("x\ny\rz\t\x07\x7f"), "x\\x0ay\\x0dz\\x09\\x07\\x7f");
        assert_eq!(terminal_safe("admin\u{202e}txt.exe"), "admin\\u{202e}txt.exe");
        assert_eq!(terminal_safe("a\u{200b}b"), "a\\u{200b}b");
        // A literal backslash-x cannot be forged into looking like an escape.
        assert_eq!(terminal_safe("\\x1b"), "\\\\x1b");
    }

    #[test]
    fn no_output_byte_is_a_control_byte() {
        let every: String = (0u32..0x3000).filter_map(char::from_u32).collect();
        let safe = terminal_safe(&every);
        assert!(safe.chars().all(|c| !needs_escape(c)));
        assert!(!safe.bytes().any(|b| b < 0x20 || b == 0x7f));
    }
}
