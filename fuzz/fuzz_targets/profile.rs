//! Profile text: the TOML parse, validation and compilation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(profile) = sluice::policy::parse_profile(text, "fuzz.toml") {
        // A profile that parses always compiles, and survives a round trip.
        let policy = sluice::policy::Policy::compile(&profile).expect("a parsed profile compiles");
        let _ = policy.may_resolve("example.test");
        if let Ok(again) = toml::to_string(&profile) {
            assert!(sluice::policy::parse_profile(&again, "again.toml").is_ok(), "{again}");
        }
    }
});
