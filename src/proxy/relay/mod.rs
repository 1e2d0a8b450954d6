//! Relays: moving bytes once the door has opened a tunnel, under one set
//! of lifetimes: the CONNECT tunnel, the copy and splice engines, and the
//! plain HTTP served inside a tunnel.

pub mod copy;
mod feed;
pub mod first_bytes;
mod http_frames;
#[cfg(target_os = "linux")]
pub(crate) mod splice;
pub mod start;
pub mod tunnel;
pub mod tunnel_http;
