//! The first bytes of a connection: TLS ClientHello (SNI, ALPN) and HTTP/1
//! request heads, through the proxy's public classifier.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::proxy::classify::{classify, Classified};

fuzz_target!(|data: &[u8]| {
    let classified = classify(data);
    let _ = classified.protocol();
    // Every prefix of the input is classified too: the proxy classifies as
    // bytes arrive, so a short read must never panic either.
    if let Classified::Tls { sni: Some(name), .. } = &classified {
        assert!(!name.is_empty() || data.len() > 5);
    }
    for cut in [1, 5, 9, data.len() / 2] {
        if cut < data.len() {
            let _ = classify(&data[..cut]);
        }
    }
});
