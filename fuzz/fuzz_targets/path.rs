//! Request path normalisation: the canonical reading is idempotent and
//! clean, and every reading is clean.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::policy::path::{normalize, readings};

fn clean(path: &str) {
    assert!(path == "*" || path.starts_with('/'), "{path:?}");
    assert!(!path.contains("//"), "{path:?}");
    assert!(path.split('/').all(|segment| segment != "." && segment != ".."), "{path:?}");
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    match (normalize(raw), readings(raw)) {
        (Ok(once), Ok(all)) => {
            clean(&once);
            assert_eq!(normalize(&once).as_deref(), Ok(once.as_str()), "not idempotent for {raw:?}");
            assert_eq!(all[0], once);
            all.iter().for_each(|reading| clean(reading));
        }
        (Err(a), Err(b)) => assert_eq!(a, b),
        (a, b) => panic!("normalize and readings disagree on {raw:?}: {a:?} {b:?}"),
    }
});
