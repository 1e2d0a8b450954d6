//! The connection to a parent proxy: a TCP socket to an `http://` parent,
//! or TLS over one to an `https://` parent.
//!
//! The relay and the forwarder are generic over their upstream stream, and
//! a TCP connection is handed to them as the bare socket (see
//! [`Upstream::Tcp`]), so direct connections and an `http://` parent keep
//! the zero-copy splice and pay nothing for TLS; only the TLS session is
//! boxed and relayed by copying.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A connection to the parent proxy.
pub enum Upstream {
    Tcp(TcpStream),
    /// Boxed: a TLS session is large, and only an `https://` parent has one.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Upstream {
    /// The local address of the TCP socket under it.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        match self {
            Upstream::Tcp(s) => s.local_addr(),
            Upstream::Tls(s) => s.get_ref().0.local_addr(),
        }
    }
}

impl AsyncRead for Upstream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Upstream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Upstream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Upstream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
