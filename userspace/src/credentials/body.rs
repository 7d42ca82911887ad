//! Placeholders in request bodies. A [`Swapper`] sees the body in pieces,
//! swaps each placeholder the bindings allow for its secret, and fails on
//! any other (unbound, out of scope, foreign), so that placeholder never
//! leaves. It holds back at most one placeholder's length less one byte
//! between pieces, so a placeholder split across frames is found too.
//!
//! [`SwapBody`] streams a body through a swapper. A body that fails is cut:
//! the upstream never sees the rest, and [`Outcome`] tells the proxy why.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use memchr::memmem;

use super::{
    inject::{is_placeholder, Applied, BodyRules, PLACEHOLDER_LEN},
    Leak, PLACEHOLDER_PREFIX,
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub struct Swapper {
    rules: BodyRules,
    carry: Vec<u8>,
    pub applied: Applied,
}

impl Swapper {
    pub fn new(rules: BodyRules) -> Self {
        Self { rules, carry: Vec::new(), applied: Applied::default() }
    }

    /// The next piece of the body to send. `last`: nothing follows, so
    /// nothing is held back.
    pub fn feed(&mut self, chunk: Bytes, last: bool) -> Result<Bytes, Leak> {
        let prefix = PLACEHOLDER_PREFIX.as_bytes();
        if self.carry.is_empty() && memmem::find(&chunk, prefix).is_none() {
            let hold = if last { 0 } else { partial_prefix_at_end(&chunk) };
            if hold == 0 {
                return Ok(chunk);
            }
            self.carry = chunk[chunk.len() - hold..].to_vec();
            return Ok(chunk.slice(..chunk.len() - hold));
        }
        let mut data = std::mem::take(&mut self.carry);
        data.extend_from_slice(&chunk);
        let mut out = Vec::with_capacity(data.len());
        let mut copied = 0;
        let mut held = None;
        for start in memmem::find_iter(&data, prefix) {
            if start < copied {
                continue;
            }
            let Some(token) = data.get(start..start + PLACEHOLDER_LEN) else {
                if !last {
                    held = Some(start);
                }
                break;
            };
            if !is_placeholder(token) {
                continue;
            }
            let (name, secret) = self.rules.resolve(token)?;
            out.extend_from_slice(&data[copied..start]);
            out.extend_from_slice(secret.expose().as_bytes());
            copied = start + PLACEHOLDER_LEN;
            let placeholder = self.rules.placeholder_of(name).cloned();
            self.applied.add(name, &secret.clone(), placeholder.as_ref());
        }
        let end = match held {
            Some(start) => start,
            None if last => data.len(),
            None => (data.len() - partial_prefix_at_end(&data)).max(copied),
        };
        out.extend_from_slice(&data[copied..end]);
        self.carry = data[end..].to_vec();
        Ok(Bytes::from(out))
    }
}

/// How many bytes at the end of `data` could begin a placeholder.
fn partial_prefix_at_end(data: &[u8]) -> usize {
    let prefix = PLACEHOLDER_PREFIX.as_bytes();
    (1..prefix.len().min(data.len() + 1)).rev().find(|&k| data.ends_with(&prefix[..k])).unwrap_or(0)
}

/// What happened to a streamed body, read by the proxy once the upstream
/// answered (or failed).
#[derive(Debug, Default)]
pub struct Outcome {
    pub leak: Option<Leak>,
    pub applied: Applied,
}

pub struct SwapBody<B> {
    inner: B,
    swapper: Swapper,
    outcome: Arc<Mutex<Outcome>>,
    /// Whether swapping can change the length (else the size hint stands).
    may_swap: bool,
    ended: bool,
    pending_trailers: Option<Frame<Bytes>>,
    /// Called once when the body is cut (the proxy records the refusal).
    on_leak: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl<B> SwapBody<B> {
    /// Calls `report` once if the body is cut, after [`Outcome`] says why.
    #[must_use]
    pub fn on_leak(mut self, report: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.on_leak = Some(Box::new(report));
        self
    }

    pub fn new(inner: B, rules: BodyRules) -> (Self, Arc<Mutex<Outcome>>) {
        let outcome = Arc::new(Mutex::new(Outcome::default()));
        let may_swap = rules.may_swap();
        let body = Self {
            inner,
            swapper: Swapper::new(rules),
            outcome: outcome.clone(),
            may_swap,
            ended: false,
            pending_trailers: None,
            on_leak: None,
        };
        (body, outcome)
    }

    fn record(&mut self, leak: Option<Leak>) {
        let mut outcome = self.outcome.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        outcome.applied = std::mem::take(&mut self.swapper.applied);
        if leak.is_some() {
            outcome.leak = leak;
        }
    }
}

impl<B> Body for SwapBody<B>
where
    B: Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if let Some(trailers) = this.pending_trailers.take() {
                return Poll::Ready(Some(Ok(trailers)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let (chunk, last) = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => {
                    this.ended = true;
                    (Bytes::new(), true)
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => (data, false),
                    Err(trailers) => {
                        this.ended = true;
                        this.pending_trailers = Some(trailers);
                        (Bytes::new(), true)
                    }
                },
            };
            match this.swapper.feed(chunk, last) {
                Ok(out) => {
                    if last {
                        this.record(None);
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Err(leak) => {
                    let message = leak.to_string();
                    this.record(Some(leak));
                    if let Some(report) = this.on_leak.take() {
                        report();
                    }
                    this.ended = true;
                    this.pending_trailers = None;
                    return Poll::Ready(Some(Err(message.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.pending_trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.may_swap {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http_body_util::{BodyExt, StreamBody};

    use super::*;
    use crate::{
        credentials::{placeholders_for, RequestCredentials, Secret, SecretEdits, SecretStore, Target},
        policy::parse_profile,
    };

    fn rules(host: &str) -> (BodyRules, String, String) {
        let specs = parse_profile(
            "name = \"c\"\n[[credential]]\nsecret = \"gh\"\nhosts = [\"api.gh.test\"]\n[[credential]]\nsecret = \"other\"\nhosts = [\"x.test\"]\n",
            "c.toml",
        )
        .unwrap()
        .credentials;
        let placeholders = placeholders_for(&specs, &BTreeMap::new());
        let mut edits = SecretEdits::default();
        edits.set("gh", Secret::new("REAL-secret".into()));
        edits.set("other", Secret::new("OTHER".into()));
        let secrets = edits.apply(&SecretStore::default());
        let target = Target { host, method: "POST", path: "/", tls: true };
        let request = RequestCredentials { specs: &specs, placeholders: &placeholders, secrets: &secrets, target };
        (request.body_rules(), placeholders["gh"].clone(), placeholders["other"].clone())
    }

    /// Feeds `text` in pieces of every size from 1 to its length.
    fn every_split(rules: impl Fn() -> BodyRules, text: &str) -> Vec<Result<String, Leak>> {
        (1..=text.len())
            .map(|size| {
                let mut swapper = Swapper::new(rules());
                let mut out = Vec::new();
                let pieces: Vec<&[u8]> = text.as_bytes().chunks(size).collect();
                for piece in pieces {
                    out.extend_from_slice(&swapper.feed(Bytes::copy_from_slice(piece), false)?);
                }
                out.extend_from_slice(&swapper.feed(Bytes::new(), true)?);
                Ok(String::from_utf8(out).unwrap())
            })
            .collect()
    }

    #[test]
    fn placeholders_split_anywhere_are_swapped() {
        let (rules, gh, _) = rules("api.gh.test");
        let text =
            format!("{{\"token\":\"{gh}\",\"again\":\"{gh}\",\"near\":\"SLUICE_PLACEHOLDER_\",\"end\":\"SLUICE_PLA");
        let expected = text.replace(&gh, "REAL-secret");
        for (size, result) in every_split(|| rules.clone(), &text).into_iter().enumerate() {
            assert_eq!(result.as_deref(), Ok(expected.as_str()), "pieces of {}", size + 1);
        }
    }

    #[test]
    fn unbound_and_foreign_placeholders_fail_the_body_wherever_they_are_split() {
        let (rules, _, other) = rules("api.gh.test");
        let text = format!("aaaa{other}bbbb");
        for result in every_split(|| rules.clone(), &text) {
            assert!(matches!(result, Err(Leak::Unbound { .. })), "{result:?}");
        }
        let foreign = format!("x{}y", crate::credentials::new_placeholder());
        for result in every_split(|| rules.clone(), &foreign) {
            assert_eq!(result, Err(Leak::Foreign));
        }
    }

    #[tokio::test]
    async fn a_leaking_stream_is_cut_before_the_placeholder() {
        let (rules, gh, _) = rules("evil.test");
        let chunks = vec!["first part, ".to_owned(), format!("then {}", &gh[..10]), format!("{} end", &gh[10..])];
        let frames = chunks.into_iter().map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from(c))));
        let (mut body, outcome) = SwapBody::new(StreamBody::new(futures_util::stream::iter(frames)), rules);
        let mut sent = Vec::new();
        let mut failed = false;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                failed = true;
                break;
            };
            sent.extend_from_slice(&frame.into_data().unwrap());
        }
        assert!(failed);
        assert!(!String::from_utf8_lossy(&sent).contains("SLUICE_PLACEHOLDER_"), "{sent:?}");
        assert!(matches!(outcome.lock().unwrap().leak, Some(Leak::Unbound { .. })));
    }
}
