//! A request body on its way upstream: counted as it moves, and whether it
//! broke its own framing, shared with the request that sent it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// What became of a request body on its way upstream, shared between the
/// body and the request that sent it.
#[derive(Debug, Default)]
pub struct Upload {
    bytes: AtomicU64,
    broken: AtomicBool,
}

impl Upload {
    /// Data bytes relayed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether reading the client's body failed (hyper could not decode
    /// its framing, or the client went away mid-body): a failed upstream
    /// send is then the client's doing, not the upstream's.
    pub fn broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed)
    }
}

/// A request body streamed to the upstream, counting the bytes it carries
/// and noting a failure to read it.
pub struct CountedBody {
    inner: Incoming,
    upload: Arc<Upload>,
}

impl CountedBody {
    /// Wraps `inner`, recording into `upload`.
    pub fn new(inner: Incoming, upload: Arc<Upload>) -> Self {
        CountedBody { inner, upload }
    }
}

impl Body for CountedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.upload.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(Some(Err(_))) => self.upload.broken.store(true, Ordering::Relaxed),
            _ => {}
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
