//! A real ClientHello (rustls) with an `encrypted_client_hello` extension
//! added, shaped as a GREASE or real ECH offer: outer type, HPKE suite,
//! config id, encapsulated key and payload (RFC 9849 section 5).

/// rustls's ClientHello for `name` with an ECH extension appended.
pub fn with_ech(name: &str) -> Vec<u8> {
    let mut record = super::hostile::rustls_client_hello(name);
    // One record: the hello fits in one.
    assert_eq!(usize::from(u16::from_be_bytes([record[3], record[4]])) + 5, record.len(), "one record");
    let mut ext = vec![0xfe, 0x0d];
    let mut body = vec![0x00, 0x00, 0x01, 0x00, 0x01, 0x42]; // outer, HKDF-SHA256, AES-128-GCM, config 0x42
    body.extend_from_slice(&[0x00, 0x20]);
    body.extend_from_slice(&[0x11; 32]); // enc
    body.extend_from_slice(&[0x00, 0x40]);
    body.extend_from_slice(&[0x22; 64]); // payload
    ext.extend_from_slice(&(body.len() as u16).to_be_bytes());
    ext.extend_from_slice(&body);
    // Offsets: record header 5, handshake header 4, version 2, random 32.
    let mut at = 5 + 4 + 2 + 32;
    at += 1 + usize::from(record[at]); // session id
    at += 2 + usize::from(u16::from_be_bytes([record[at], record[at + 1]])); // cipher suites
    at += 1 + usize::from(record[at]); // compression methods
    let grow = |bytes: &mut Vec<u8>, at: usize, width: usize| {
        let mut n = 0usize;
        for b in &bytes[at..at + width] {
            n = n << 8 | usize::from(*b);
        }
        n += ext.len();
        for i in 0..width {
            bytes[at + width - 1 - i] = (n >> (8 * i)) as u8;
        }
    };
    grow(&mut record, at, 2); // extensions length
    grow(&mut record, 6, 3); // handshake length
    grow(&mut record, 3, 2); // record length
    record.extend_from_slice(&ext);
    record
}
