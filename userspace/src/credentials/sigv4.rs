//! AWS Signature Version 4 as an injection kind. The sandbox sends its
//! request unsigned, or signed with placeholder credentials; sluice drops
//! whatever signature it carries and signs it with the real key.
//!
//! The secret's value is `ACCESS_KEY_ID:SECRET_ACCESS_KEY`, with
//! `:SESSION_TOKEN` for temporary credentials.
//!
//! Payload hash: when the client declared one in `x-amz-content-sha256`
//! (a hex SHA-256, or `UNSIGNED-PAYLOAD` as S3 clients do over TLS), that is
//! what is signed and the body streams; the upstream checks a declared hash
//! against the body itself. Otherwise sluice reads the whole body (up to
//! [`MAX_SIGNED_BODY`]) and signs its SHA-256.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::{
    http_request::{
        sign, PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
        UriPathNormalizationMode,
    },
    sign::v4,
};
use hyper::Request;

use super::{binding::SigV4Spec, Secret};

/// Largest body sluice reads to hash when the client declared no hash.
pub const MAX_SIGNED_BODY: usize = 8 * 1024 * 1024;

pub const CONTENT_SHA256: &str = "x-amz-content-sha256";

/// Headers and query parameters of a signature the sandbox made (with
/// placeholders): dropped before sluice signs.
const SIGNATURE_HEADERS: [&str; 3] = ["authorization", "x-amz-date", "x-amz-security-token"];
const SIGNATURE_PARAMS: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// What the signature covers of the body.
pub enum Payload<'a> {
    /// The client's `x-amz-content-sha256` (hex hash or `UNSIGNED-PAYLOAD`).
    Declared(String),
    /// The whole body, hashed here.
    Bytes(&'a [u8]),
}

/// The client's declared payload hash, if it is one sluice can sign.
pub fn declared_payload(request: &Request<impl Sized>) -> Option<String> {
    let value = request.headers().get(CONTENT_SHA256)?.to_str().ok()?;
    let hex = value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit());
    if value == "UNSIGNED-PAYLOAD" {
        return Some(value.to_owned());
    }
    hex.then(|| value.to_ascii_lowercase())
}

/// The access key id and secret key (and session token) of a secret value.
fn split_secret(secret: &Secret) -> Result<(&str, &str, Option<&str>), String> {
    let mut parts = secret.expose().splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(id), Some(key), token) if !id.is_empty() && !key.is_empty() => Ok((id, key, token)),
        _ => Err("the secret must be ACCESS_KEY_ID:SECRET_ACCESS_KEY[:SESSION_TOKEN]".into()),
    }
}

/// The pieces of a `SigV4` secret that must never reach the sandbox.
pub fn secret_parts(secret: &Secret) -> Vec<&str> {
    match split_secret(secret) {
        Ok((_, key, token)) => std::iter::once(key).chain(token).collect(),
        Err(_) => vec![secret.expose()],
    }
}

/// Signs `request` for `authority` (the host, and port if not the
/// scheme's default), replacing any signature it carries.
pub fn sign_request<B>(
    request: &mut Request<B>,
    authority: &str,
    spec: &SigV4Spec,
    secret: &Secret,
    payload: Payload<'_>,
) -> Result<(), String> {
    let (access_key_id, secret_key, session_token) = split_secret(secret)?;
    for name in SIGNATURE_HEADERS.iter().chain(&[CONTENT_SHA256]) {
        request.headers_mut().remove(*name);
    }
    strip_signature_params(request);

    let s3 = spec.service == "s3";
    let mut settings = SigningSettings::default();
    if s3 {
        // S3 signs the path as sent, encoded once.
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
    }
    let body = match payload {
        Payload::Declared(hash) => {
            settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
            if hash == "UNSIGNED-PAYLOAD" {
                SignableBody::UnsignedPayload
            } else {
                SignableBody::Precomputed(hash)
            }
        }
        Payload::Bytes(bytes) => {
            if s3 {
                settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
            }
            SignableBody::Bytes(bytes)
        }
    };
    let identity = Credentials::new(access_key_id, secret_key, session_token.map(str::to_owned), None, "sluice").into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(&spec.region)
        .name(&spec.service)
        .time(SystemTime::now())
        .settings(settings)
        .build()
        .map_err(|e| format!("signing parameters: {e}"))?
        .into();

    let path_and_query = request.uri().path_and_query().map_or("/", |pq| pq.as_str()).to_owned();
    let uri = format!("https://{authority}{path_and_query}");
    let mut headers = Vec::new();
    for (name, value) in request.headers() {
        let value = value.to_str().map_err(|_| format!("header {name} is not text and cannot be signed"))?;
        headers.push((name.as_str(), value));
    }
    let signable = SignableRequest::new(request.method().as_str(), uri, headers.into_iter(), body)
        .map_err(|e| format!("the request cannot be signed: {e}"))?;
    let (instructions, _signature) = sign(signable, &params).map_err(|e| format!("signing failed: {e}"))?.into_parts();
    instructions.apply_to_request_http1x(request);
    Ok(())
}

fn strip_signature_params<B>(request: &mut Request<B>) {
    let Some(query) = request.uri().query() else { return };
    let is_signature = |pair: &str| {
        let key = pair.split('=').next().unwrap_or("");
        SIGNATURE_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(key))
    };
    if !query.split('&').any(is_signature) {
        return;
    }
    let kept: Vec<&str> = query.split('&').filter(|pair| !pair.is_empty() && !is_signature(pair)).collect();
    let path = request.uri().path();
    let path_and_query = if kept.is_empty() { path.to_owned() } else { format!("{path}?{}", kept.join("&")) };
    let mut parts = request.uri().clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = hyper::Uri::from_parts(parts) {
            *request.uri_mut() = uri;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(service: &str) -> SigV4Spec {
        SigV4Spec { region: "us-east-1".into(), service: service.into() }
    }

    #[test]
    fn a_placeholder_signature_is_replaced_by_a_real_one() {
        let mut request = Request::builder()
            .method("GET")
            .uri("/bucket/key?X-Amz-Signature=abc&list-type=2&X-Amz-Credential=SLUICE_PLACEHOLDER_X")
            .header("host", "s3.test")
            .header("authorization", "AWS4-HMAC-SHA256 Credential=SLUICE_PLACEHOLDER_X/...")
            .header("x-amz-date", "20000101T000000Z")
            .header(CONTENT_SHA256, "UNSIGNED-PAYLOAD")
            .body(())
            .unwrap();
        let declared = declared_payload(&request).unwrap();
        let secret = Secret::new("AKIDEXAMPLE:wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into());
        sign_request(&mut request, "s3.test", &spec("s3"), &secret, Payload::Declared(declared)).unwrap();
        let auth = request.headers()["authorization"].to_str().unwrap();
        assert!(auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/"), "{auth}");
        assert!(auth.contains("/us-east-1/s3/aws4_request"), "{auth}");
        assert!(!auth.contains("wJalr"));
        assert_eq!(request.headers()[CONTENT_SHA256], "UNSIGNED-PAYLOAD");
        assert_ne!(request.headers()["x-amz-date"], "20000101T000000Z");
        assert_eq!(request.uri().query(), Some("list-type=2"));
    }

    #[test]
    fn malformed_secrets_are_refused_without_printing_them() {
        let mut request = Request::builder().uri("/").header("host", "h.test").body(()).unwrap();
        let error =
            sign_request(&mut request, "h.test", &spec("sts"), &Secret::new("nocolon".into()), Payload::Bytes(b""))
                .unwrap_err();
        assert!(!error.contains("nocolon"));
        assert_eq!(secret_parts(&Secret::new("id:key:token".into())), ["key", "token"]);
    }
}
