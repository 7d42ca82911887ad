//! A DNS message as the sandbox's resolver reads it: header, whole-message
//! parse, the refusal reply, name canonicalisation and the shape check.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(Ok(name)) = sluice::dns::fuzzing::judge_query(data) {
        // A name that passes the shape check is plain hostname bytes.
        assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)), "{name:?}");
    }
});
