//! Closes a client connection on which nothing moved either way for a
//! while. hyper's HTTP/1 header timeout already ends idle kept-alive
//! HTTP/1 connections; this covers HTTP/2 (whose clients keep connections
//! open indefinitely) and anything else served through it, so idle
//! connections do not hold a sandbox's places and the daemon's descriptors.
//! Until the client's first byte the shorter header timeout applies: hyper
//! reads the first bytes to tell HTTP/1 from HTTP/2 before its own header
//! timeout starts, so a client silent after the TLS handshake is closed here.

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

pub struct Idle<S> {
    inner: S,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl<S> Idle<S> {
    /// `first` is how long the client has for its first byte, `timeout`
    /// how long anything may idle after that.
    pub fn new(inner: S, first: Duration, timeout: Duration) -> Self {
        Self { inner, timeout, deadline: Box::pin(tokio::time::sleep(first)) }
    }

    fn moved(&mut self) {
        self.deadline.as_mut().reset(Instant::now() + self.timeout);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Idle<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    self.moved();
                }
                Poll::Ready(result)
            }
            // A server always reads: the deadline is watched here.
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "client connection idle for too long")))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Idle<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_closed_after_idling_and_kept_while_bytes_move() {
        let (client, server) = tokio::io::duplex(64);
        let mut server = Idle::new(server, Duration::from_secs(3), Duration::from_secs(10));
        let mut client = client;
        let mut byte = [0u8; 1];
        tokio::time::advance(Duration::from_secs(2)).await;
        client.write_all(b"x").await.unwrap();
        server.read_exact(&mut byte).await.expect("the first byte within its timeout");
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(8)).await;
            client.write_all(b"x").await.unwrap();
            server.read_exact(&mut byte).await.expect("bytes within the timeout keep it open");
        }
        let started = Instant::now();
        let error = server.read(&mut byte).await.expect_err("idle: closed");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_silent_from_the_start_is_closed_after_the_first_timeout() {
        let (_client, server) = tokio::io::duplex(64);
        let mut server = Idle::new(server, Duration::from_secs(3), Duration::from_secs(10));
        let started = Instant::now();
        let error = server.read(&mut [0u8; 1]).await.expect_err("silent: closed");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }
}
