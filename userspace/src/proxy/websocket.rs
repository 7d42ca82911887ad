//! WebSocket connections after an upgrade sluice allowed. The two upgraded
//! streams are relayed frame by frame, not spliced, so the credential checks
//! still apply: a client frame carrying a placeholder that may not go to
//! this host (unbound, out of scope, another sandbox's) cuts the connection
//! before the frame leaves, a placeholder the binding allows is swapped for
//! its secret, and every secret that went upstream is scrubbed from the
//! server's frames. Extensions (permessage-deflate) are not offered
//! upstream, so payloads are never compressed; a frame with a reserved bit
//! set ends the connection.
//!
//! A placeholder split across two client frames is found too (the end of
//! each payload is kept to check the next one against); a secret the server
//! splits across frames is not.

use bytes::Bytes;
use memchr::memmem;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::credentials::{
    body::Swapper,
    inject::{is_placeholder, BodyRules, PLACEHOLDER_LEN},
    scrub::scrub,
    Leak, PLACEHOLDER_PREFIX,
};

/// Largest frame payload relayed; larger ones end the connection.
const MAX_PAYLOAD: u64 = 16 * 1024 * 1024;
/// Close code 1008: policy violation.
const POLICY_VIOLATION: [u8; 2] = 1008u16.to_be_bytes();

/// Why a WebSocket connection was cut by sluice (not by either peer).
#[derive(Debug, thiserror::Error)]
pub enum Cut {
    #[error("a client frame was cut: {0}")]
    Leak(Leak),
    #[error("{0}")]
    Protocol(&'static str),
}

impl Cut {
    pub fn rule(&self) -> &'static str {
        match self {
            Self::Leak(leak) => leak.rule(),
            Self::Protocol(_) => "websocket-refused",
        }
    }
}

/// What the frames of one connection are checked against.
pub struct FrameChecks {
    /// What a client frame may carry, decided for every placeholder of the
    /// sandbox when the upgrade was allowed.
    pub rules: BodyRules,
    /// (secret, placeholder) pairs scrubbed from server frames.
    pub scrub: Vec<(Vec<u8>, Vec<u8>)>,
}

struct Frame {
    /// FIN, RSV1-3 and opcode, as received.
    first: u8,
    payload: Vec<u8>,
    mask: Option<[u8; 4]>,
}

impl Frame {
    fn opcode(&self) -> u8 {
        self.first & 0x0f
    }
}

/// Relays until either side closes or a check cuts the connection; returns
/// why it was cut, if it was.
pub async fn relay<C, U>(client: C, upstream: U, checks: FrameChecks) -> Option<Cut>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut upstream_rx, mut upstream_tx) = tokio::io::split(upstream);
    let FrameChecks { rules, scrub: pairs } = checks;
    let outbound = async {
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let frame = match read_frame(&mut client_rx).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return None,
                Err(cut) => return Some(cut),
            };
            if frame.mask.is_none() {
                return Some(Cut::Protocol("a client frame was not masked"));
            }
            let last = frame.opcode() == 0x8;
            let payload = match check_outbound(&rules, &mut tail, frame.payload) {
                Ok(payload) => payload,
                Err(leak) => return Some(Cut::Leak(leak)),
            };
            let out = Frame { first: frame.first, payload, mask: frame.mask };
            if write_frame(&mut upstream_tx, &out).await.is_err() || last {
                return None;
            }
        }
    };
    let inbound = async {
        loop {
            let frame = match read_frame(&mut upstream_rx).await {
                Ok(Some(frame)) => frame,
                Ok(None) => return None,
                Err(cut) => return Some(cut),
            };
            let last = frame.opcode() == 0x8;
            let payload = if pairs.is_empty() { frame.payload } else { scrub(&frame.payload, &pairs) };
            let out = Frame { first: frame.first, payload, mask: None };
            if write_frame(&mut client_tx, &out).await.is_err() || last {
                return None;
            }
        }
    };
    // Whichever direction ends first ends both: the other stream is dropped.
    let cut = tokio::select! {
        cut = outbound => cut,
        cut = inbound => cut,
    };
    if let Some(cut) = &cut {
        let mut close = POLICY_VIOLATION.to_vec();
        close.extend_from_slice(format!("sluice: {}", cut.rule()).as_bytes());
        let _ = write_frame(&mut client_tx, &Frame { first: 0x88, payload: close, mask: None }).await;
        let _ = client_tx.shutdown().await;
    }
    cut
}

/// One client payload as it may go upstream: placeholders swapped where
/// bound, a refusal otherwise. `tail` holds the end of the previous
/// payload, so a placeholder split across frames is found.
fn check_outbound(rules: &BodyRules, tail: &mut Vec<u8>, payload: Vec<u8>) -> Result<Vec<u8>, Leak> {
    let prefix = PLACEHOLDER_PREFIX.as_bytes();
    if !tail.is_empty() {
        let mut joined = std::mem::take(tail);
        let seam = joined.len();
        joined.extend_from_slice(&payload[..payload.len().min(PLACEHOLDER_LEN)]);
        for start in memmem::find_iter(&joined, prefix).take_while(|&start| start < seam) {
            if let Some(token) = joined.get(start..start + PLACEHOLDER_LEN).filter(|t| is_placeholder(t)) {
                // Half of it has gone already: it cannot be swapped, only refused
                // where it may not go.
                rules.resolve(token)?;
            }
        }
    }
    let mut swapper = Swapper::new(rules.clone());
    let out = swapper.feed(Bytes::from(payload), true)?.to_vec();
    let keep = PLACEHOLDER_LEN - 1;
    *tail = out[out.len().saturating_sub(keep)..].to_vec();
    Ok(out)
}

/// The next frame, `None` at a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin>(io: &mut R) -> Result<Option<Frame>, Cut> {
    let mut head = [0u8; 2];
    match io.read_exact(&mut head).await {
        Ok(_) => {}
        Err(_) => return Ok(None),
    }
    if head[0] & 0x70 != 0 {
        return Err(Cut::Protocol("a WebSocket frame used an extension (reserved bits set)"));
    }
    let truncated = |_| Cut::Protocol("a WebSocket frame was truncated");
    let len = match head[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            io.read_exact(&mut ext).await.map_err(truncated)?;
            u64::from(u16::from_be_bytes(ext))
        }
        127 => {
            let mut ext = [0u8; 8];
            io.read_exact(&mut ext).await.map_err(truncated)?;
            u64::from_be_bytes(ext)
        }
        n => u64::from(n),
    };
    if len > MAX_PAYLOAD {
        return Err(Cut::Protocol("a WebSocket frame was larger than 16 MiB"));
    }
    let mask = if head[1] & 0x80 == 0 {
        None
    } else {
        let mut key = [0u8; 4];
        io.read_exact(&mut key).await.map_err(truncated)?;
        Some(key)
    };
    let mut payload = vec![0u8; usize::try_from(len).unwrap_or(0)];
    io.read_exact(&mut payload).await.map_err(truncated)?;
    if let Some(key) = mask {
        apply_mask(&mut payload, key);
    }
    Ok(Some(Frame { first: head[0], payload, mask }))
}

async fn write_frame<W: AsyncWrite + Unpin>(io: &mut W, frame: &Frame) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(frame.payload.len() + 14);
    out.push(frame.first);
    let mask_bit = if frame.mask.is_some() { 0x80 } else { 0 };
    let len = frame.payload.len();
    if len < 126 {
        out.push(mask_bit | u8::try_from(len).unwrap_or(0));
    } else if let Ok(short) = u16::try_from(len) {
        out.push(mask_bit | 0x7e);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(mask_bit | 0x7f);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    let mut payload = frame.payload.clone();
    if let Some(key) = frame.mask {
        out.extend_from_slice(&key);
        apply_mask(&mut payload, key);
    }
    out.extend_from_slice(&payload);
    io.write_all(&out).await?;
    io.flush().await
}

fn apply_mask(payload: &mut [u8], key: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_with_and_without_a_mask() {
        for (payload, mask) in
            [(vec![b'a'; 5], Some([1, 2, 3, 4])), (vec![b'b'; 300], None), (vec![b'c'; 70_000], Some([9, 9, 9, 9]))]
        {
            let frame = Frame { first: 0x81, payload: payload.clone(), mask };
            let mut wire = Vec::new();
            write_frame(&mut wire, &frame).await.unwrap();
            let read = read_frame(&mut wire.as_slice()).await.unwrap().unwrap();
            assert_eq!((read.first, read.payload, read.mask), (0x81, payload, mask));
        }
    }

    #[tokio::test]
    async fn extensions_and_oversized_frames_are_refused() {
        let compressed = [0xc1u8, 0x01, b'x'];
        assert!(matches!(read_frame(&mut &compressed[..]).await, Err(Cut::Protocol(_))));
        let mut huge = vec![0x82u8, 127];
        huge.extend_from_slice(&(MAX_PAYLOAD + 1).to_be_bytes());
        assert!(matches!(read_frame(&mut huge.as_slice()).await, Err(Cut::Protocol(_))));
        assert!(read_frame(&mut &[][..]).await.unwrap().is_none());
    }
}
