//! Config parsing and compiling on arbitrary YAML: errors, never panics.
//!
//! Hermetic: the text is first deserialised without validation, and a
//! config that names a file (`tls.cert`, `tls.key`, `tls.client_ca`,
//! `identity.credentials[].token_file`) or an environment variable
//! (`identity.credentials[].token_env`) is dropped before the validating
//! parse and the compile, which would read them (`/dev/zero` would never
//! end, `/dev/stdin` would block).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;
use portcullis::snapshot::Snapshot;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(raw) = serde_yaml_ng::from_str::<Config>(text) else { return };
    if names_a_file_or_variable(&raw) {
        return;
    }
    // `from_yaml_str` parses again and checks each value; `compile` runs
    // every check the proxy runs at start, and builds what it serves.
    let Ok(config) = Config::from_yaml_str(text, "fuzz.yaml") else { return };
    if let Ok(snapshot) = Snapshot::compile(&config, 1) {
        let policy = &snapshot.policy;
        assert!(policy.role_id(portcullis::config::DEFAULT_ROLE).is_some(), "a valid config has the default role");
    }
});

/// True when validating `config` would read a file or the environment.
fn names_a_file_or_variable(config: &Config) -> bool {
    config.tls.is_some()
        || config.identity.credentials.iter().any(|c| c.token_file.is_some() || c.token_env.is_some())
}
