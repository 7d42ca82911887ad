//! A response body that replaces secret values with their placeholders as it
//! streams, including values split across frames.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

pub struct ScrubBody<B> {
    inner: B,
    /// (secret value, placeholder) pairs.
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes held back because they could be the start of a secret.
    carry: Vec<u8>,
    /// How many bytes to hold back: the longest secret less one.
    keep: usize,
    ended: bool,
    pending_trailers: Option<Frame<Bytes>>,
}

impl<B> ScrubBody<B> {
    pub fn new(inner: B, pairs: Vec<(Vec<u8>, Vec<u8>)>) -> Self {
        let keep = pairs.iter().map(|(secret, _)| secret.len()).max().unwrap_or(1).saturating_sub(1);
        Self { inner, pairs, carry: Vec::new(), keep, ended: false, pending_trailers: None }
    }
}

/// Replaces every occurrence of each secret in `data`.
pub fn scrub(data: &[u8], pairs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = data.to_vec();
    for (secret, placeholder) in pairs {
        if secret.is_empty() {
            continue;
        }
        let mut result = Vec::with_capacity(out.len());
        let mut i = 0;
        while i < out.len() {
            if out[i..].starts_with(secret) {
                result.extend_from_slice(placeholder);
                i += secret.len();
            } else {
                result.push(out[i]);
                i += 1;
            }
        }
        out = result;
    }
    out
}

impl<B> Body for ScrubBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(trailers) = this.pending_trailers.take() {
                return Poll::Ready(Some(Ok(trailers)));
            }
            if this.ended {
                if this.carry.is_empty() {
                    return Poll::Ready(None);
                }
                let rest = scrub(&std::mem::take(&mut this.carry), &this.pairs);
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.ended = true,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.carry.extend_from_slice(&data);
                        let scrubbed = scrub(&this.carry, &this.pairs);
                        // Hold back a tail that may be the start of a secret.
                        let emit = scrubbed.len().saturating_sub(this.keep);
                        this.carry = scrubbed[emit..].to_vec();
                        if emit > 0 {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::copy_from_slice(&scrubbed[..emit])))));
                        }
                    }
                    Err(trailers) => {
                        // Everything held back goes out before the trailers.
                        this.pending_trailers = Some(trailers);
                        if !this.carry.is_empty() {
                            let rest = scrub(&std::mem::take(&mut this.carry), &this.pairs);
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                        }
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.carry.is_empty() && self.pending_trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        // Placeholders and secrets differ in length: no exact size.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};

    use super::*;

    #[tokio::test]
    async fn secrets_split_across_frames_are_scrubbed() {
        let pairs = vec![(b"s3cr3t-value".to_vec(), b"SLUICE_PLACEHOLDER_X".to_vec())];
        let chunks = ["echo: s3c", "r3t-val", "ue and again s3cr3t-value", " end"];
        let frames = chunks.map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(c))));
        let body = ScrubBody::new(StreamBody::new(futures_util::stream::iter(frames)), pairs);
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], b"echo: SLUICE_PLACEHOLDER_X and again SLUICE_PLACEHOLDER_X end");
    }

    #[test]
    fn scrub_replaces_every_occurrence() {
        let pairs = vec![(b"ab".to_vec(), b"X".to_vec())];
        assert_eq!(scrub(b"abcabab", &pairs), b"XcXX");
        assert_eq!(scrub(b"a", &pairs), b"a");
    }
}
