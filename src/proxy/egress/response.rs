//! An upstream response body on its way to the client: bytes counted, the
//! upstream connection returned to the pool once the body is read, and the
//! request's decision line written when the body is done with.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::pool::{PoolKey, PoolLimits, Sender};
use super::upload::Upload;
use crate::access_log::AccessRecord;
use crate::proxy::Shared;
use crate::target::Target;

/// Where a finished upstream connection goes back to.
pub(super) struct PoolReturn {
    pub(super) shared: Arc<Shared>,
    pub(super) key: PoolKey,
    pub(super) target: Target,
    pub(super) sender: Sender,
    pub(super) limits: PoolLimits,
}

/// An upstream response body on its way to the client. When it ends, the
/// upstream connection goes back to the pool; when it is dropped (ended or
/// abandoned), the request's log line is written.
pub struct UpstreamBody {
    pub(super) inner: Incoming,
    pub(super) return_to: Option<PoolReturn>,
    pub(super) upload: Arc<Upload>,
    pub(super) received: u64,
    pub(super) record: AccessRecord,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                self.received += data.len() as u64;
            }
        }
        // hyper stops polling once `is_end_stream` is true (a body with a
        // known length), so the end is detected here, not only at `None`.
        if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
            self.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl UpstreamBody {
    /// Returns the upstream connection to the pool; called once the whole
    /// response has been read, so the connection is ready for another request.
    fn release(&mut self) {
        if let Some(r) = self.return_to.take() {
            r.shared.pool.checkin(r.key, r.target, r.sender, r.limits);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // An empty body (204, 304, HEAD) may never be polled at all.
        if self.inner.is_end_stream() {
            self.release();
        }
        self.record.bytes_in = self.upload.bytes();
        self.record.bytes_out = self.received;
        self.record.emit();
    }
}
