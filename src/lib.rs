//! Portcullis: an egress filtering forward proxy.
//!
//! The request path, one module per stage: [`target`] parses the destination,
//! [`dns`] resolves names once, [`policy`] decides on every resolved address
//! and issues the [`policy::Permit`] that [`proxy`] needs to dial.
#![forbid(unsafe_code)]

pub mod policy;
pub mod target;
