//! The ClientHello parser on arbitrary bytes: never panics, a name is
//! always normalised, and a decision never changes with more bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::sni::{server_name, SniError};

fuzz_target!(|data: &[u8]| {
    let full = server_name(data);
    if let Ok(name) = &full {
        assert!(!name.is_empty() && !name.ends_with('.'));
        assert!(!name.bytes().any(|b| b.is_ascii_uppercase()));
    }
    // Any prefix either asks for more or already gave the same answer.
    let prefix = server_name(&data[..data.len() / 2]);
    if prefix != Err(SniError::Incomplete) {
        assert_eq!(prefix, full, "decided early, then changed its mind");
    }
});
