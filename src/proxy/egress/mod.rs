//! Leaving: one way to open an upstream connection for an admitted tunnel,
//! directly to a checked address or through the parent proxy; plain HTTP
//! forwarding with its pool; the parent proxy and its connection type.

pub mod dial;
pub mod forward;
pub mod parent;
pub mod pool;
pub mod response;
pub mod upload;
pub mod upstream;

use std::net::SocketAddr;

use dial::dial;
use crate::proxy::error::UpstreamError;
use crate::proxy::egress::upstream::Upstream;
use crate::snapshot::Snapshot;
use crate::metrics::Metrics;
use crate::policy::{Permit, RequestKind, RoleId};
use crate::target::Target;

/// Opens the upstream of a tunnel admitted for `role` with `permit`, and
/// says which address it reached: through the parent when the parent
/// carries this role's request of `kind` to `target`, else straight to a
/// permitted address. A redirected TLS or TCP connection always leaves
/// directly: the parent is asked for names, and such a connection may
/// carry none.
pub async fn open(
    snapshot: &Snapshot,
    metrics: &Metrics,
    kind: RequestKind,
    target: &Target,
    role: RoleId,
    permit: &Permit,
) -> Result<(Upstream, SocketAddr), UpstreamError> {
    let carried = matches!(kind, RequestKind::Connect | RequestKind::Http | RequestKind::TransparentHttp);
    match &snapshot.parent {
        Some(parent) if carried && parent.applies(snapshot.policy.role(role).name(), target, permit) => {
            parent.tunnel(permit, target, snapshot.timeouts.upstream_connect.0).await
        }
        _ => dial(permit, &snapshot.timeouts, snapshot.upstream.mark(), metrics).await.map(|(stream, addr)| (Upstream::Tcp(stream), addr)),
    }
}
