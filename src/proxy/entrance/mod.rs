//! Entrances: how requests come in. Each parses what it was given into an
//! [`Ask`](super::admit::Ask) and takes it through the one door; the strict
//! framing check at the edge is shared by all of them.

pub mod explicit;
pub mod framing;
pub mod head_timer;
pub mod transparent;
