//! Config parsing and compiling on arbitrary YAML: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = Config::from_yaml_str(text, "fuzz.yaml") {
        let _ = config.compile();
    }
});
