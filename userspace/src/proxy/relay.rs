//! Relaying an allowed connection. Bytes move between the two sockets with
//! splice(2) through a pipe per direction, so they are never copied through
//! user space; where a pipe cannot be had, tokio's buffered copy does it.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use tokio::{io::Interest, net::TcpStream};

/// Bytes moved per splice call, and the pipe size asked for.
const CHUNK: usize = 1 << 20;
/// Buffer per direction for the copying fallback.
const COPY_BUFFER: usize = 64 * 1024;

/// Relays until both directions have ended; returns bytes (client to
/// upstream, upstream to client).
pub async fn relay(client: &mut TcpStream, upstream: &mut TcpStream) -> io::Result<(u64, u64)> {
    let (Ok(up), Ok(down)) = (Pipe::new(), Pipe::new()) else {
        return tokio::io::copy_bidirectional_with_sizes(client, upstream, COPY_BUFFER, COPY_BUFFER).await;
    };
    tokio::try_join!(pump(client, upstream, &up), pump(upstream, client, &down))
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills both fds on success; we own them from here.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let pipe = unsafe { Self { read: OwnedFd::from_raw_fd(fds[0]), write: OwnedFd::from_raw_fd(fds[1]) } };
        // A larger pipe moves more per call; the default (64 KiB) still works.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
        Ok(pipe)
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: plain syscall on fds we hold open.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One direction: socket -> pipe -> socket until `from` ends, then a
/// half-close of `to` so the other side sees the end too.
async fn pump(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let mut in_pipe = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)) {
                Ok(n) => break n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        };
        if in_pipe == 0 {
            // SAFETY: plain syscall; the half-close tells the peer we are done.
            unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            return Ok(total);
        }
        while in_pipe > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), to.as_raw_fd(), in_pipe)) {
                Ok(n) => {
                    in_pipe -= n;
                    total += n as u64;
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let connect = TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, connected) = tokio::join!(listener.accept(), connect);
        (accepted.unwrap().0, connected.unwrap())
    }

    #[tokio::test]
    async fn relays_large_streams_both_ways_and_half_closes() {
        let (mut client, mut proxy_client_side) = pair().await;
        let (mut proxy_upstream_side, mut upstream) = pair().await;
        let relay = tokio::spawn(async move { relay(&mut proxy_client_side, &mut proxy_upstream_side).await });

        let up: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 241) as u8).collect();
        let (up_sent, down_sent) = (up.clone(), down.clone());
        let client_task = tokio::spawn(async move {
            let (mut read, mut write) = client.split();
            let writer = async {
                write.write_all(&up_sent).await.unwrap();
                write.shutdown().await.unwrap();
            };
            let mut received = Vec::new();
            let reader = read.read_to_end(&mut received);
            let ((), n) = tokio::join!(writer, reader);
            n.unwrap();
            received
        });
        let mut received = Vec::new();
        upstream.read_to_end(&mut received).await.unwrap();
        assert!(received == up, "client to upstream bytes changed");
        upstream.write_all(&down_sent).await.unwrap();
        upstream.shutdown().await.unwrap();
        assert!(client_task.await.unwrap() == down, "upstream to client bytes changed");
        let (to_upstream, to_client) = relay.await.unwrap().unwrap();
        assert_eq!((to_upstream, to_client), (up.len() as u64, down.len() as u64));
    }
}
