//! Leaving: one way to open an upstream connection for an admitted tunnel,
//! directly to a checked address or through the parent proxy; plain HTTP
//! forwarding with its pool; the parent proxy and its connection type.

pub mod dial;
pub mod forward;
pub mod parent;
pub mod pool;
pub mod upstream;

use std::net::SocketAddr;

use crate::proxy::admit::{Admitted, Ask};
use dial::dial;
use crate::proxy::error::UpstreamError;
use crate::proxy::upstream::Upstream;
use crate::proxy::Snapshot;
use crate::metrics::Metrics;
use crate::policy::RequestKind;

/// Opens the upstream of an admitted tunnel and says which address it
/// reached: through the parent when the parent carries this role's
/// request to this target, else straight to a permitted address. A
/// redirected TLS or TCP connection always leaves directly: the parent
/// is asked for names, and such a connection may carry none.
pub async fn open(snapshot: &Snapshot, metrics: &Metrics, ask: &Ask, admitted: &Admitted) -> Result<(Upstream, SocketAddr), UpstreamError> {
    let permit = &admitted.permit;
    let carried = matches!(ask.kind, RequestKind::Connect | RequestKind::Http | RequestKind::TransparentHttp);
    match &snapshot.parent {
        Some(parent) if carried && parent.applies(snapshot.policy.role(admitted.role).name(), &ask.target, permit) => {
            parent.tunnel(permit, &ask.target, snapshot.timeouts.upstream_connect.0).await
        }
        _ => dial(permit, &snapshot.timeouts, snapshot.upstream.mark(), metrics).await.map(|(stream, addr)| (Upstream::Tcp(stream), addr)),
    }
}
