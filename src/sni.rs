//! Reading the server name (SNI, RFC 6066 section 3) out of the first bytes a
//! client sends through a CONNECT tunnel: the TLS ClientHello.
//!
//! Pure and allocation-light: [`server_name`] is called on the bytes read so
//! far and either answers, or asks for more with [`SniError::Incomplete`].
//! Only what is needed to reach the `server_name` extension is parsed, but
//! every length on the way is checked against its container, and the
//! ClientHello may span several TLS records (RFC 8446 section 5.1).

use std::fmt;

use crate::policy::DenyReason;

/// The largest ClientHello accepted (the handshake message body). Real ones,
/// post-quantum key shares included, are under 2 KiB.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// A fatal `access_denied` alert (RFC 8446 6.2): what a refused TLS client
/// is sent, so it reports a refusal rather than a bare reset.
pub const ACCESS_DENIED_ALERT: [u8; 7] = [21, 3, 3, 0, 2, 2, 49];

/// The most bytes a caller needs to buffer before [`server_name`] decides:
/// the largest ClientHello plus the headers of a few records around it.
pub const MAX_PEEK: usize = MAX_CLIENT_HELLO + 2 * 1024;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXTENSION_SERVER_NAME: u16 = 0;
/// `encrypted_client_hello` (RFC 9849, draft-ietf-tls-esni): the real
/// ClientHello travels encrypted, the SNI seen here is the outer one.
const EXTENSION_ECH: u16 = 0xfe0d;
const NAME_TYPE_HOST_NAME: u8 = 0;
/// The largest TLS plaintext record fragment (RFC 8446 section 5.1).
const MAX_FRAGMENT: usize = 1 << 14;

/// Why no server name could be taken from the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniError {
    /// Not enough bytes yet to decide; read more (up to [`MAX_PEEK`]).
    Incomplete,
    /// The bytes are not a TLS handshake record carrying a ClientHello.
    NotTls,
    /// A TLS ClientHello whose lengths do not add up, or that breaks a
    /// MUST of RFC 6066 / RFC 8446 on the way to the server name.
    Malformed(&'static str),
    /// The ClientHello is larger than [`MAX_CLIENT_HELLO`].
    TooLarge,
    /// A well-formed ClientHello without a `host_name` server name.
    Missing,
}

impl SniError {
    /// The deny reason a tunnel refused for this error is logged and counted under.
    pub const fn deny_reason(self) -> DenyReason {
        match self {
            SniError::Incomplete | SniError::Missing => DenyReason::SniMissing,
            SniError::NotTls | SniError::Malformed(_) | SniError::TooLarge => DenyReason::NotTls,
        }
    }
}

impl fmt::Display for SniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SniError::Incomplete => f.write_str("incomplete ClientHello"),
            SniError::NotTls => f.write_str("not a TLS ClientHello"),
            SniError::Malformed(what) => write!(f, "malformed ClientHello: {what}"),
            SniError::TooLarge => f.write_str("ClientHello too large"),
            SniError::Missing => f.write_str("no server name in the ClientHello"),
        }
    }
}

/// The server name of the ClientHello at the start of `buf`, lower-cased and
/// without a trailing dot. `Err(Incomplete)` means `buf` is a valid prefix
/// and more bytes are needed.
pub fn server_name(buf: &[u8]) -> Result<String, SniError> {
    read_hello(buf)?.name.ok_or(SniError::Missing)
}

/// True when the ClientHello at the start of `buf` offers Encrypted
/// ClientHello (its server name is then only the outer, public one).
pub fn offers_ech(buf: &[u8]) -> bool {
    read_hello(buf).is_ok_and(|hello| hello.ech)
}

/// What a ClientHello says about where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The server name, normalised as by [`server_name`]; `None` without one.
    pub name: Option<String>,
    /// It offers Encrypted ClientHello: `name` is the outer, public name.
    pub ech: bool,
}

/// The server name and the ECH offer of the ClientHello at the start of
/// `buf`; errors as for [`server_name`], except that a missing name is `None`.
pub fn read_hello(buf: &[u8]) -> Result<Hello, SniError> {
    let hello = client_hello(buf)?;
    let (name, ech) = find_server_name(hello)?;
    Ok(Hello { name: name.map(normalise).transpose()?, ech })
}

/// Reassembles the ClientHello handshake message body from the handshake
/// records at the start of `buf`.
fn client_hello(buf: &[u8]) -> Result<Vec<u8>, SniError> {
    let mut handshake = Vec::new();
    let mut rest = buf;
    loop {
        let fragment = match next_record(rest)? {
            Some((fragment, after)) => {
                rest = after;
                fragment
            }
            None => return Err(SniError::Incomplete),
        };
        handshake.extend_from_slice(fragment);
        if handshake[0] != HANDSHAKE_CLIENT_HELLO {
            return Err(SniError::NotTls);
        }
        let Some(len) = handshake.get(1..4).map(u24) else { continue };
        if len > MAX_CLIENT_HELLO {
            return Err(SniError::TooLarge);
        }
        if handshake.len() >= 4 + len {
            handshake.truncate(4 + len);
            handshake.drain(..4);
            return Ok(handshake);
        }
    }
}

/// A record's fragment and the bytes after the record.
type RecordSplit<'a> = (&'a [u8], &'a [u8]);

/// One complete handshake record's fragment and the bytes after it, or
/// `None` when the record is not complete yet. Refuses as early as possible,
/// so non-TLS bytes are rejected on their first byte.
fn next_record(buf: &[u8]) -> Result<Option<RecordSplit<'_>>, SniError> {
    match buf.first() {
        None => return Ok(None),
        Some(&CONTENT_HANDSHAKE) => {}
        Some(_) => return Err(SniError::NotTls),
    }
    // legacy_record_version is 0x03XX (SSL 3.0 to TLS 1.3 all use major 3).
    if buf.get(1).is_some_and(|&major| major != 3) {
        return Err(SniError::NotTls);
    }
    let Some(len) = buf.get(3..5).map(u16) else { return Ok(None) };
    if len == 0 {
        return Err(SniError::Malformed("empty handshake record"));
    }
    if len > MAX_FRAGMENT {
        return Err(SniError::Malformed("record longer than 2^14"));
    }
    match buf.get(RECORD_HEADER..RECORD_HEADER + len) {
        Some(fragment) => Ok(Some((fragment, &buf[RECORD_HEADER + len..]))),
        None => Ok(None),
    }
}

/// The raw `host_name` of a complete ClientHello body, if it has one, and
/// whether it carries the `encrypted_client_hello` extension.
fn find_server_name(hello: Vec<u8>) -> Result<(Option<Vec<u8>>, bool), SniError> {
    let mut r = Reader(&hello);
    r.take(2).ok_or(SniError::Malformed("legacy_version"))?;
    r.take(32).ok_or(SniError::Malformed("random"))?;
    let session_id = r.vec8().ok_or(SniError::Malformed("session id"))?;
    if session_id.len() > 32 {
        return Err(SniError::Malformed("session id longer than 32"));
    }
    let suites = r.vec16().ok_or(SniError::Malformed("cipher suites"))?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("cipher suites"));
    }
    let compression = r.vec8().ok_or(SniError::Malformed("compression methods"))?;
    if compression.is_empty() {
        return Err(SniError::Malformed("compression methods"));
    }
    if r.0.is_empty() {
        // A ClientHello without extensions (TLS 1.2 allows it): no SNI.
        return Ok((None, false));
    }
    let mut extensions = Reader(r.vec16().ok_or(SniError::Malformed("extensions"))?);
    if !r.0.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    let mut found = None;
    let mut seen = false;
    let mut ech = false;
    while !extensions.0.is_empty() {
        let kind = extensions.u16().ok_or(SniError::Malformed("extension type"))?;
        let body = extensions.vec16().ok_or(SniError::Malformed("extension length"))?;
        ech |= kind == EXTENSION_ECH;
        if kind != EXTENSION_SERVER_NAME {
            continue;
        }
        // RFC 8446 4.2: no extension type may appear twice; a second
        // server_name could be read differently by the origin, even when
        // the first one carries no host_name.
        if seen {
            return Err(SniError::Malformed("duplicate server_name extension"));
        }
        seen = true;
        found = host_name(body)?;
    }
    Ok((found.map(<[u8]>::to_vec), ech))
}

/// The `host_name` entry of a server_name extension body.
fn host_name(body: &[u8]) -> Result<Option<&[u8]>, SniError> {
    let mut ext = Reader(body);
    let mut list = Reader(ext.vec16().ok_or(SniError::Malformed("server name list"))?);
    if !ext.0.is_empty() || list.0.is_empty() {
        return Err(SniError::Malformed("server name list"));
    }
    let mut name = None;
    while !list.0.is_empty() {
        let kind = list.u8().ok_or(SniError::Malformed("server name type"))?;
        let value = list.vec16().ok_or(SniError::Malformed("server name"))?;
        if kind != NAME_TYPE_HOST_NAME {
            continue;
        }
        // RFC 6066 3: at most one name of each type.
        if name.is_some() {
            return Err(SniError::Malformed("two host_name entries"));
        }
        name = Some(value);
    }
    Ok(name)
}

/// Lower-cases and strips one trailing dot; refuses what cannot be a DNS
/// name in A-label form (RFC 6066: ASCII, no IP literals are sent as SNI,
/// but they are simply compared and never match a name).
fn normalise(raw: Vec<u8>) -> Result<String, SniError> {
    if raw.is_empty() || !raw.iter().all(|b| b.is_ascii_graphic()) {
        return Err(SniError::Malformed("host_name is not printable ASCII"));
    }
    let mut name = String::from_utf8(raw).map_err(|_| SniError::Malformed("host_name is not ASCII"))?;
    name.make_ascii_lowercase();
    if name.ends_with('.') {
        name.pop();
    }
    // Found by fuzzing: "." and "a.." would leave an empty name or a dot.
    if name.is_empty() || name.ends_with('.') {
        return Err(SniError::Malformed("host_name is empty or ends in an empty label"));
    }
    Ok(name)
}

fn u16(b: &[u8]) -> usize {
    usize::from(b[0]) << 8 | usize::from(b[1])
}

fn u24(b: &[u8]) -> usize {
    usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2])
}

/// A cursor over a byte slice; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
}

/// Builds ClientHello bytes for tests: one handshake message, optionally
/// split over several records.
#[cfg(test)]
pub(crate) mod testing {
    /// A minimal TLS 1.2-style ClientHello carrying `extensions` (raw bytes).
    pub fn client_hello_with_extensions(extensions: Option<&[u8]>) -> Vec<u8> {
        let mut body = vec![0x03, 0x03];
        body.extend_from_slice(&[0x42; 32]);
        body.push(0); // empty session id
        body.extend_from_slice(&[0x00, 0x02, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[0x01, 0x00]); // null compression
        if let Some(ext) = extensions {
            body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
            body.extend_from_slice(ext);
        }
        let mut msg = vec![super::HANDSHAKE_CLIENT_HELLO];
        msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    /// The server_name extension naming `name` as `host_name`.
    pub fn sni_extension(name: &[u8]) -> Vec<u8> {
        let mut entry = vec![super::NAME_TYPE_HOST_NAME];
        entry.extend_from_slice(&(name.len() as u16).to_be_bytes());
        entry.extend_from_slice(name);
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend_from_slice(&entry);
        let mut ext = vec![0x00, 0x00];
        ext.extend_from_slice(&(list.len() as u16).to_be_bytes());
        ext.extend_from_slice(&list);
        ext
    }

    /// Wraps a handshake message in records of at most `fragment` bytes.
    pub fn records(handshake: &[u8], fragment: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in handshake.chunks(fragment.max(1)) {
            out.extend_from_slice(&[super::CONTENT_HANDSHAKE, 0x03, 0x01]);
            out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
            out.extend_from_slice(chunk);
        }
        out
    }

    /// A complete one-record ClientHello with SNI `name`.
    pub fn hello_for(name: &str) -> Vec<u8> {
        // An unrelated extension first, so the parser has to skip one.
        let mut ext = vec![0x00, 0x0b, 0x00, 0x02, 0x01, 0x00];
        ext.extend_from_slice(&sni_extension(name.as_bytes()));
        records(&client_hello_with_extensions(Some(&ext)), 1 << 14)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn hello_with(ext: &[u8]) -> Vec<u8> {
        records(&client_hello_with_extensions(Some(ext)), 1 << 14)
    }

    #[test]
    fn table() {
        let two_sni = [sni_extension(b"a.test"), sni_extension(b"b.test")].concat();
        let mut two_names = sni_extension(b"a.test");
        // Append a second host_name entry inside the same list.
        two_names.extend_from_slice(&[0, 0, 1, b'x']);
        let list_len = (two_names.len() - 6) as u16;
        two_names[4..6].copy_from_slice(&list_len.to_be_bytes());
        let ext_len = (two_names.len() - 4) as u16;
        two_names[2..4].copy_from_slice(&ext_len.to_be_bytes());
        // A first server_name listing only a non-host_name entry (type 1),
        // then a second one with the name: the origin may read the first.
        let no_host_then_sni = [&[0x00, 0x00, 0x00, 0x06, 0x00, 0x04, 0x01, 0x00, 0x01, b'x'][..], &sni_extension(b"evil.test")].concat();
        let mut bad_version = hello_for("a.test");
        bad_version[1] = 2;
        let mut not_hello = hello_for("a.test");
        not_hello[5] = 2; // ServerHello
        let mut huge = hello_for("a.test");
        huge[6..9].copy_from_slice(&[0x01, 0x00, 0x00]);
        let cases: Vec<(&str, Vec<u8>, Result<String, SniError>)> = vec![
            ("plain", hello_for("Example.COM."), Ok("example.com".into())),
            ("split over 7-byte records", records(&client_hello_with_extensions(Some(&sni_extension(b"a.test"))), 7), Ok("a.test".into())),
            ("split over 1-byte records", records(&client_hello_with_extensions(Some(&sni_extension(b"a.test"))), 1), Ok("a.test".into())),
            ("no extensions", records(&client_hello_with_extensions(None), 1 << 14), Err(SniError::Missing)),
            ("other extensions only", hello_with(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]), Err(SniError::Missing)),
            ("empty", Vec::new(), Err(SniError::Incomplete)),
            ("header only", vec![22, 3, 1], Err(SniError::Incomplete)),
            ("http", b"GET / HTTP/1.1\r\n\r\n".to_vec(), Err(SniError::NotTls)),
            ("one http byte", b"G".to_vec(), Err(SniError::NotTls)),
            ("sslv2", vec![0x80, 0x2e, 0x01, 0x03, 0x01], Err(SniError::NotTls)),
            ("bad major version", bad_version, Err(SniError::NotTls)),
            ("not a ClientHello", not_hello, Err(SniError::NotTls)),
            ("too large", huge, Err(SniError::TooLarge)),
            ("alert record", vec![21, 3, 3, 0, 2, 2, 40], Err(SniError::NotTls)),
            ("empty record", vec![22, 3, 1, 0, 0], Err(SniError::Malformed("empty handshake record"))),
            ("two server_name extensions", hello_with(&two_sni), Err(SniError::Malformed("duplicate server_name extension"))),
            ("second server_name after one without host_name", hello_with(&no_host_then_sni), Err(SniError::Malformed("duplicate server_name extension"))),
            ("two host_names", hello_with(&two_names), Err(SniError::Malformed("two host_name entries"))),
            ("extension overruns", hello_with(&[0x00, 0x00, 0x00, 0x09, 0x00]), Err(SniError::Malformed("extension length"))),
            ("root name", hello_with(&sni_extension(b".")), Err(SniError::Malformed("host_name is empty or ends in an empty label"))),
            ("two trailing dots (fuzz crash-d5b4e50f)", hello_with(&sni_extension(b"allowed.examp..")), Err(SniError::Malformed("host_name is empty or ends in an empty label"))),
            ("empty name", hello_with(&sni_extension(b"")), Err(SniError::Malformed("host_name is not printable ASCII"))),
            ("name with NUL", hello_with(&sni_extension(b"a.test\0.evil")), Err(SniError::Malformed("host_name is not printable ASCII"))),
            ("utf-8 name", hello_with(&sni_extension("bücher.test".as_bytes())), Err(SniError::Malformed("host_name is not printable ASCII"))),
        ];
        for (name, bytes, want) in cases {
            assert_eq!(server_name(&bytes), want, "{name}");
        }
    }

    /// Every strict prefix of a valid ClientHello asks for more bytes; none
    /// is refused and none yields a name early.
    #[test]
    fn every_prefix_is_incomplete() {
        for fragment in [1, 5, 100, 1 << 14] {
            let full = records(&client_hello_with_extensions(Some(&sni_extension(b"a.test"))), fragment);
            for end in 0..full.len() {
                assert_eq!(server_name(&full[..end]), Err(SniError::Incomplete), "fragment {fragment}, prefix {end}");
            }
            assert_eq!(server_name(&full), Ok("a.test".into()));
        }
    }

    /// A ClientHello as a real TLS client writes it.
    #[test]
    fn rustls_client_hello() {
        let bytes = rustls_hello("Allowed.Example");
        assert_eq!(server_name(&bytes), Ok("allowed.example".into()));
        // Re-split its handshake message over small records.
        let handshake = &bytes[RECORD_HEADER..];
        assert_eq!(server_name(&records(handshake, 3)), Ok("allowed.example".into()));
    }

    fn rustls_hello(name: &str) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("valid name");
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).expect("write to a Vec");
        }
        out
    }

    /// The `encrypted_client_hello` extension is reported beside the outer name.
    #[test]
    fn ech_offer_is_seen() {
        let mut ext = sni_extension(b"public.example");
        ext.extend_from_slice(&[0xfe, 0x0d, 0x00, 0x03, 0x00, 0x00, 0x01]);
        let want = Hello { name: Some("public.example".into()), ech: true };
        assert_eq!(read_hello(&hello_with(&ext)), Ok(want));
        assert_eq!(read_hello(&hello_for("a.test")), Ok(Hello { name: Some("a.test".into()), ech: false }));
        let ech_only = hello_with(&[0xfe, 0x0d, 0x00, 0x00]);
        assert_eq!(read_hello(&ech_only), Ok(Hello { name: None, ech: true }));
    }

    /// Bytes after the ClientHello (early data, a second record) do not matter.
    #[test]
    fn trailing_bytes_are_ignored() {
        let mut bytes = hello_for("a.test");
        bytes.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(server_name(&bytes), Ok("a.test".into()));
    }
}
