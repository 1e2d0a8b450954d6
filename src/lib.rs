//! Portcullis: an egress filtering forward proxy.
//!
//! The request path, one module per stage: [`target`] parses the destination,
//! [`dns`] resolves names once, [`policy`] decides on every resolved address
//! and issues the [`policy::Permit`] that [`proxy`] needs to dial, and
//! [`access_log`] writes one decision line per request.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod config;
pub mod denials;
pub mod dns;
pub mod dns_listen;
pub mod host;
pub mod identity;
pub mod import;
pub mod input;
pub mod lint;
pub mod logging;
pub mod metrics;
pub mod orig_dst;
pub mod policy;
pub mod policytest;
pub mod proxy;
pub mod refusal;
pub mod reload;
pub mod scan;
pub mod snapshot;
pub mod sni;
pub mod source_lines;
pub mod suggest;
pub mod target;
pub mod tls;
