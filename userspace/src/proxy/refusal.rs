//! The one refusal type of the proxy and the one place it becomes what the
//! sandbox sees. Every phase that stops a connection or a request returns a
//! [`Refusal`] (status, rule, reason); the phase runner records it (unless
//! the phase already did) and answers with [`Refusal::response`], or, for a
//! plain HTTP connection refused before any request was parsed, with the
//! same response written out by [`Refusal::write_http1`].

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    header::{self, HeaderName, HeaderValue},
    Response, StatusCode,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::rules;

/// Why a connection or a request goes nowhere, and how the sandbox is told.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: StatusCode,
    /// A profile rule's name or one of [`crate::rules`].
    pub rule: String,
    pub reason: String,
    /// The phase that refused already wrote the decision record (a held
    /// request an operator denied, a streamed body cut for a placeholder):
    /// only the answer remains.
    recorded: bool,
}

impl Refusal {
    pub fn new(status: StatusCode, rule: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { status, rule: rule.into(), reason: reason.into(), recorded: false }
    }

    /// 403: a rule says no.
    pub fn forbidden(rule: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, rule, reason)
    }

    /// 502: the upstream could not be used.
    pub fn upstream(reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, rules::UPSTREAM_FAILED, reason)
    }

    /// The same refusal, its decision record already written.
    #[must_use]
    pub fn recorded(mut self) -> Self {
        self.recorded = true;
        self
    }

    pub fn is_recorded(&self) -> bool {
        self.recorded
    }

    fn body(&self) -> String {
        format!("sluice denied this request\nrule: {}\nreason: {}\n", self.rule, self.reason)
    }

    fn rule_header(&self) -> HeaderValue {
        HeaderValue::from_str(&header_safe(&self.rule)).unwrap_or(HeaderValue::from_static("sluice"))
    }

    /// The answer a sandbox gets for a request sluice does not forward.
    pub fn response<E>(&self) -> Response<BoxBody<Bytes, E>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body())).map_err(|never| match never {}).boxed());
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
        headers.insert(HeaderName::from_static("x-sluice-rule"), self.rule_header());
        response
    }

    /// Writes [`Self::response`] as HTTP/1.1 on a connection no request of
    /// which will be read (refused at connect level), then closes it.
    pub async fn write_http1<W: AsyncWrite + Unpin>(&self, client: &mut W) {
        let body = self.body();
        let head = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nx-sluice-rule: {}\r\nconnection: close\r\n\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            body.len(),
            header_safe(&self.rule)
        );
        let _ = client.write_all(head.as_bytes()).await;
        let _ = client.write_all(body.as_bytes()).await;
        let _ = client.shutdown().await;
    }
}

/// What of a sandbox-controlled value may go into a header: printable ASCII.
pub fn header_safe(value: &str) -> String {
    value.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refusal_reads_the_same_as_a_response_and_on_the_wire() {
        let refusal = Refusal::forbidden("no-\r\nsmuggle", "because");
        let response = refusal.response::<std::convert::Infallible>();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(response.headers()["x-sluice-rule"], "no-smuggle");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"sluice denied this request\nrule: no-\r\nsmuggle\nreason: because\n");

        let mut wire = Vec::new();
        refusal.write_http1(&mut wire).await;
        let wire = String::from_utf8(wire).unwrap();
        assert!(wire.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{wire}");
        assert!(wire.contains("\r\nx-sluice-rule: no-smuggle\r\nconnection: close\r\n\r\n"), "{wire}");
        assert!(wire.ends_with(std::str::from_utf8(&body).unwrap()), "{wire}");
    }

    #[test]
    fn recorded_is_carried() {
        let refusal = Refusal::upstream("gone");
        assert_eq!((refusal.status, refusal.rule.as_str()), (StatusCode::BAD_GATEWAY, rules::UPSTREAM_FAILED));
        assert!(!refusal.is_recorded());
        assert!(refusal.recorded().is_recorded());
    }
}
