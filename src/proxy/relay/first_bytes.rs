//! What a connection's first bytes are: the one classifier and the one
//! ClientHello reader for every path (a redirected connection, and the
//! first bytes of a CONNECT tunnel). A TLS handshake record is read up to
//! [`sni::MAX_PEEK`] bytes for its server name; an HTTP/1 request is
//! known by its request line (`METHOD SP target SP HTTP/1.x`, any method
//! token, RFC 9112 section 3); anything else is other bytes.

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::sni::{self, SniError};

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstBytes {
    /// A TLS handshake record: the ClientHello's server name, or why none
    /// could be read (`Missing`: a well-formed ClientHello without one).
    Tls(Result<String, SniError>),
    /// An HTTP/1.x request line.
    Http,
    /// Anything else.
    Other,
}

/// What `buf` is, or `None` when more bytes are needed to tell. A request
/// line is waited for up to `max_line` bytes; with 0, only a TLS record is
/// waited for and other bytes are told apart at once.
pub fn judge(buf: &[u8], max_line: usize) -> Option<FirstBytes> {
    let first = *buf.first()?;
    if first == 0x16 {
        return match sni::server_name(buf) {
            Err(SniError::Incomplete) if buf.len() < sni::MAX_PEEK => None,
            Err(SniError::Incomplete) => Some(FirstBytes::Tls(Err(SniError::TooLarge))),
            read => Some(FirstBytes::Tls(read)),
        };
    }
    if !first.is_ascii_uppercase() {
        return Some(FirstBytes::Other);
    }
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(end) if is_http1_request_line(&buf[..end]) => Some(FirstBytes::Http),
        Some(_) => Some(FirstBytes::Other),
        None if buf.len() >= max_line => Some(FirstBytes::Other),
        None => None,
    }
}

/// `METHOD SP request-target SP HTTP/1.x` (RFC 9112 section 3).
fn is_http1_request_line(line: &[u8]) -> bool {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !method.is_empty()
        && method.iter().all(|b| b.is_ascii_uppercase() || *b == b'-')
        && !target.is_empty()
        && (version == b"HTTP/1.1" || version == b"HTTP/1.0")
}

/// Reads from `stream` into `buf` (which may already hold bytes) until
/// [`judge`] tells what they are; `None` when the stream ends first. The
/// caller bounds the time. A ClientHello is never read past
/// [`sni::MAX_PEEK`] bytes.
pub async fn read<S>(stream: &mut S, buf: &mut Vec<u8>, max_line: usize) -> Option<FirstBytes>
where
    S: AsyncRead + Unpin,
{
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(decided) = judge(buf, max_line) {
            return Some(decided);
        }
        let room = match buf.first() {
            Some(0x16) => (sni::MAX_PEEK - buf.len()).min(chunk.len()),
            _ => chunk.len(),
        };
        match stream.read(&mut chunk[..room]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One table for every path: the transparent listener's cases and the
    /// tunnel's, which used to disagree on methods such as `PROPFIND`.
    #[test]
    fn first_bytes_are_judged() {
        let hello = crate::sni::testing::hello_for("allowed.test");
        let tls = |name: &str| Some(FirstBytes::Tls(Ok(name.to_string())));
        let cases: Vec<(Vec<u8>, usize, Option<FirstBytes>)> = vec![
            (hello.clone(), 64, tls("allowed.test")),
            (hello.clone(), 0, tls("allowed.test")),
            (hello[..hello.len() - 3].to_vec(), 64, None),
            (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00".to_vec(), 64, Some(FirstBytes::Tls(Err(SniError::NotTls)))),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec(), 64, Some(FirstBytes::Http)),
            (b"POST /x?y=1 HTTP/1.0\r\n".to_vec(), 64, Some(FirstBytes::Http)),
            (b"OPTIONS * HTTP/1.1\r\n".to_vec(), 64, Some(FirstBytes::Http)),
            (b"M-SEARCH * HTTP/1.1\r\n".to_vec(), 64, Some(FirstBytes::Http)),
            (b"PROPFIND / HTTP/1.1\r\n".to_vec(), 64, Some(FirstBytes::Http)),
            (b"GET / HTTP/1.1".to_vec(), 64, None),
            (b"GE".to_vec(), 64, None),
            (b"GET / HTTP/1.1".to_vec(), 0, Some(FirstBytes::Other)),
            (b"GET / HTTP/2.0\r\n".to_vec(), 64, Some(FirstBytes::Other)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), 64, Some(FirstBytes::Other)),
            (b"SSH-2.0-OpenSSH_9.2\r\n".to_vec(), 64, Some(FirstBytes::Other)),
            (b"GET  / HTTP/1.1\r\n".to_vec(), 64, Some(FirstBytes::Other)),
            (b"get / HTTP/1.1\r\n".to_vec(), 64, Some(FirstBytes::Other)),
            (b"round 0".to_vec(), 64, Some(FirstBytes::Other)),
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f".to_vec(), 64, Some(FirstBytes::Other)),
            (vec![b'G'; 100], 64, Some(FirstBytes::Other)),
            (Vec::new(), 64, None),
        ];
        for (bytes, max_line, want) in cases {
            assert_eq!(judge(&bytes, max_line), want, "{:?} (max_line {max_line})", String::from_utf8_lossy(&bytes));
        }
    }

    #[tokio::test]
    async fn a_clienthello_is_read_in_pieces_and_no_further() {
        use tokio::io::AsyncWriteExt;
        let hello = crate::sni::testing::hello_for("allowed.test");
        let (mut client, mut proxy_side) = tokio::io::duplex(64);
        let sent = hello.clone();
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(7) {
                client.write_all(piece).await.unwrap();
            }
            client.write_all(b"application data").await.unwrap();
            client
        });
        let mut buf = Vec::new();
        let seen = read(&mut proxy_side, &mut buf, 1024).await;
        assert_eq!(seen, Some(FirstBytes::Tls(Ok("allowed.test".to_string()))));
        assert!(buf.starts_with(&hello) && buf.len() <= sni::MAX_PEEK);
        drop(writer.await.unwrap());
    }
}
