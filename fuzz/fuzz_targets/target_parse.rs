//! Strict target parsing on arbitrary text: never panics, and whatever is
//! accepted prints back to text that parses to the same target.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::target::{DomainName, Host, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Host::parse(text);
    let _ = Host::parse_bare(text);
    if let Ok(name) = DomainName::parse(text) {
        assert_eq!(DomainName::parse(name.as_str()).as_ref(), Ok(&name), "a normalised name is a fixed point");
    }
    if let Ok(target) = Target::parse_authority(text) {
        let again = Target::parse_authority(&format!("{}:{}", target.host, target.port));
        assert_eq!(again.as_ref(), Ok(&target), "round trip of {text:?}");
    }
    if let Ok(uri) = text.parse::<http::Uri>() {
        if let Ok(target) = Target::parse_absolute(&uri) {
            let again = Target::parse_authority(&format!("{}:{}", target.host, target.port));
            assert_eq!(again.as_ref(), Ok(&target), "round trip of URI {text:?}");
        }
    }
});
