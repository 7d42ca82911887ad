//! What a client sent first: a TLS `ClientHello` (and its SNI), an HTTP/1
//! request (and its Host), or something else. Pure, so it can be unit
//! tested and fuzzed on captured bytes.

use tls_parser::{
    parse_tls_extensions, parse_tls_raw_record, parse_tls_record_with_header, TlsExtension, TlsMessage,
    TlsMessageHandshake,
};

/// Largest prefix sluice reads before deciding: a `ClientHello` record (16 KiB
/// plus header) or an HTTP/1 request head.
pub const MAX_PREFIX: usize = 16 * 1024 + 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Classified {
    /// Not enough bytes yet to tell.
    NeedMore,
    Tls {
        sni: Option<String>,
        /// ALPN protocols the client offered, in its order of preference.
        alpn: Vec<Vec<u8>>,
    },
    Http {
        host: Option<String>,
    },
    /// Some other protocol, or a malformed TLS/HTTP start.
    Opaque,
    /// Looked like TLS or HTTP but is malformed; the reason says how.
    Malformed(&'static str),
}

impl Classified {
    pub fn protocol(&self) -> &'static str {
        match self {
            Self::Tls { .. } => "tls",
            Self::Http { .. } => "http",
            Self::NeedMore | Self::Opaque => "opaque",
            Self::Malformed(_) => "malformed",
        }
    }
}

pub fn classify(prefix: &[u8]) -> Classified {
    match prefix.first() {
        None => Classified::NeedMore,
        Some(0x16) => classify_tls(prefix),
        Some(b'A'..=b'Z') => classify_http(prefix),
        Some(_) => Classified::Opaque,
    }
}

fn classify_tls(prefix: &[u8]) -> Classified {
    if prefix.len() < 5 {
        return Classified::NeedMore;
    }
    let record_len = usize::from(u16::from_be_bytes([prefix[3], prefix[4]]));
    if prefix[1] != 3 || record_len == 0 || record_len > 16 * 1024 + 256 {
        return Classified::Malformed("not a TLS handshake record");
    }
    if prefix.len() < 5 + record_len {
        return Classified::NeedMore;
    }
    let Ok((_, raw)) = parse_tls_raw_record(&prefix[..5 + record_len]) else {
        return Classified::Malformed("unparsable TLS record");
    };
    let Ok((_, messages)) = parse_tls_record_with_header(raw.data, &raw.hdr) else {
        // A ClientHello split over several records is legal but rare; the
        // first record must at least hold the start of a handshake.
        return Classified::Malformed("unparsable TLS handshake");
    };
    let Some(TlsMessage::Handshake(TlsMessageHandshake::ClientHello(hello))) = messages.first() else {
        return Classified::Malformed("first TLS message is not a ClientHello");
    };
    let Some(ext) = hello.ext else {
        return Classified::Tls { sni: None, alpn: Vec::new() };
    };
    let Ok((_, extensions)) = parse_tls_extensions(ext) else {
        return Classified::Malformed("unparsable ClientHello extensions");
    };
    let sni = extensions.iter().find_map(|extension| match extension {
        TlsExtension::SNI(names) => names
            .iter()
            .find(|(kind, _)| kind.0 == 0)
            .and_then(|(_, name)| std::str::from_utf8(name).ok())
            .map(str::to_ascii_lowercase),
        _ => None,
    });
    let alpn = extensions
        .iter()
        .find_map(|extension| match extension {
            TlsExtension::ALPN(protocols) => Some(protocols.iter().map(|p| p.to_vec()).collect()),
            _ => None,
        })
        .unwrap_or_default();
    Classified::Tls { sni, alpn }
}

fn classify_http(prefix: &[u8]) -> Classified {
    let method_end = prefix.iter().take(16).position(|&b| b == b' ');
    match method_end {
        None if prefix.len() < 16 => {
            return if prefix.iter().all(u8::is_ascii_uppercase) { Classified::NeedMore } else { Classified::Opaque };
        }
        None => return Classified::Opaque,
        Some(n) if !prefix[..n].iter().all(u8::is_ascii_uppercase) => return Classified::Opaque,
        Some(_) => {}
    }
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(prefix) {
        Ok(httparse::Status::Partial) => {
            if prefix.len() >= MAX_PREFIX {
                Classified::Malformed("HTTP request head larger than 16 KiB")
            } else {
                Classified::NeedMore
            }
        }
        Ok(httparse::Status::Complete(_)) => {
            let mut hosts = request.headers.iter().filter(|h| h.name.eq_ignore_ascii_case("host"));
            let host = hosts.next().and_then(|h| std::str::from_utf8(h.value).ok()).map(|v| strip_port(v.trim()));
            if hosts.next().is_some() {
                return Classified::Malformed("more than one Host header");
            }
            // CONNECT names its target in the request line.
            let host =
                host.or_else(|| (request.method == Some("CONNECT")).then(|| request.path.map(strip_port)).flatten());
            Classified::Http { host: host.filter(|h| !h.is_empty()) }
        }
        Err(httparse::Error::TooManyHeaders) => Classified::Malformed("more than 96 HTTP headers"),
        Err(_) => Classified::Malformed("malformed HTTP/1 request head"),
    }
}

/// `example.com:8080` -> `example.com`; `[::1]:80` -> `::1`.
fn strip_port(authority: &str) -> String {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else if authority.matches(':').count() == 1 {
        authority.split(':').next().unwrap_or(authority)
    } else {
        authority
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `ClientHello` for `files.demo.test` as `openssl s_client` sends it,
    /// trimmed to the fields the parser needs.
    fn client_hello(sni: Option<&str>) -> Vec<u8> {
        client_hello_with_alpn(sni, &[])
    }

    fn client_hello_with_alpn(sni: Option<&str>, alpn: &[&[u8]]) -> Vec<u8> {
        let mut ext = Vec::new();
        if !alpn.is_empty() {
            let list: Vec<u8> =
                alpn.iter().flat_map(|p| std::iter::once(p.len() as u8).chain(p.iter().copied())).collect();
            ext.extend_from_slice(&[0x00, 0x10]);
            ext.extend_from_slice(&((list.len() + 2) as u16).to_be_bytes());
            ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
            ext.extend_from_slice(&list);
        }
        if let Some(name) = sni {
            let name = name.as_bytes();
            let list_len = name.len() + 3;
            ext.extend_from_slice(&[0x00, 0x00]);
            ext.extend_from_slice(&((list_len + 2) as u16).to_be_bytes());
            ext.extend_from_slice(&(list_len as u16).to_be_bytes());
            ext.push(0);
            ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
            ext.extend_from_slice(name);
        }
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut handshake = vec![0x01, 0, 0, 0];
        handshake[1..4].copy_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![0x16, 0x03, 0x01];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn tls_sni_is_found_and_lowercased() {
        let hello = client_hello(Some("Files.Demo.Test"));
        assert_eq!(classify(&hello), Classified::Tls { sni: Some("files.demo.test".into()), alpn: Vec::new() });
        assert_eq!(classify(&client_hello(None)), Classified::Tls { sni: None, alpn: Vec::new() });
    }

    #[test]
    fn tls_alpn_is_found_in_order() {
        let hello = client_hello_with_alpn(Some("a.test"), &[b"h2", b"http/1.1"]);
        assert_eq!(
            classify(&hello),
            Classified::Tls { sni: Some("a.test".into()), alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()] }
        );
    }

    #[test]
    fn partial_tls_needs_more_at_every_cut() {
        let hello = client_hello(Some("a.test"));
        for cut in 1..hello.len() {
            assert_eq!(classify(&hello[..cut]), Classified::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn garbage_after_a_tls_byte_is_malformed() {
        assert!(matches!(classify(&[0x16, 0x03, 0x01, 0x00, 0x04, 1, 2, 3, 4]), Classified::Malformed(_)));
        assert!(matches!(classify(&[0x16, 0x09, 0x09, 0x00, 0x04]), Classified::Malformed(_)));
    }

    #[test]
    fn http_host_is_found() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: Docs.Demo.Test:8080\r\nAccept: */*\r\n\r\n"),
            Classified::Http { host: Some("docs.demo.test".into()) }
        );
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: [fd00::1]:80\r\n\r\n"),
            Classified::Http { host: Some("fd00::1".into()) }
        );
        assert_eq!(classify(b"GET / HTTP/1.0\r\n\r\n"), Classified::Http { host: None });
        assert_eq!(classify(b"GET / HTTP/1.1\r\nHost: a"), Classified::NeedMore);
        assert_eq!(classify(b"GE"), Classified::NeedMore);
    }

    #[test]
    fn smuggling_shapes_and_oversize_are_malformed() {
        assert!(matches!(
            classify(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"),
            Classified::Malformed("more than one Host header")
        ));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_PREFIX, b'a');
        assert!(matches!(classify(&big), Classified::Malformed(_)));
    }

    #[test]
    fn other_protocols_are_opaque() {
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2\r\n"), Classified::Opaque);
        assert_eq!(classify(&[0, 1, 2, 3]), Classified::Opaque);
    }
}
