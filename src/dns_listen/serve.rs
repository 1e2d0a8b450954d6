//! The listener's TCP transport (the UDP one is [`super::forwarder`]).
//! TCP (RFC 7766): length-prefixed messages, answered as they finish (out
//! of order), at most `max_tcp_pipeline` at a time per connection; a bad
//! frame closes the connection, a bad message gets its FORMERR.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::{handle, Shared};

/// Accepts TCP connections within `max_tcp_connections`.
pub(super) async fn tcp(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "DNS listener: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Over the limit the connection is closed at once.
        let limits = shared.snapshot.load().dns.limits.clone();
        let Some(permit) = shared.limits.admit_tcp(&limits) else {
            shared.metrics.dropped.with_label_values(&["over-limit"]).inc();
            continue;
        };
        let client = SocketAddr::new(client.ip().to_canonical(), client.port());
        let shared = shared.clone();
        tokio::spawn(async move {
            connection(stream, client, shared).await;
            drop(permit);
        });
    }
}

/// Serves one TCP connection: reads frames until EOF, a bad frame or the
/// idle limit, answering each within the pipelining depth.
async fn connection(stream: TcpStream, client: SocketAddr, shared: Arc<Shared>) {
    let (mut reader, mut writer) = stream.into_split();
    // The pipelining depth is the one in force when the connection opened;
    // every other bound is read again for each frame.
    let depth = shared.snapshot.load().dns.limits.max_tcp_pipeline;
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(depth);
    let write = tokio::spawn(async move {
        while let Some(reply) = rx.recv().await {
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&(reply.len() as u16).to_be_bytes());
            framed.extend_from_slice(&reply);
            if writer.write_all(&framed).await.is_err() {
                return;
            }
        }
        let _ = writer.shutdown().await;
    });
    let pipeline = Arc::new(Semaphore::new(depth));
    loop {
        let limits = shared.snapshot.load().dns.limits.clone();
        let frame = tokio::time::timeout(limits.tcp_idle.0, read_frame(&mut reader, limits.max_message_bytes)).await;
        let Ok(Some(query)) = frame else { break };
        // Back-pressure: the next frame is read only when a slot is free.
        let Ok(in_pipeline) = pipeline.clone().acquire_owned().await else { break };
        let Some(slot) = shared.limits.admit(client.ip(), &limits, Instant::now()) else {
            shared.metrics.dropped.with_label_values(&["over-limit"]).inc();
            continue;
        };
        let (tx, shared) = (tx.clone(), shared.clone());
        tokio::spawn(async move {
            if let Some(reply) = handle(&shared, client, &query, true).await {
                let _ = tx.send(reply).await;
            }
            drop((slot, in_pipeline));
        });
    }
    drop(tx);
    let _ = write.await;
}

/// One length-prefixed message, or `None` at EOF, on an error, or for a
/// frame that is empty or longer than `max` (the connection is then closed:
/// its framing can no longer be trusted).
async fn read_frame(reader: &mut (impl AsyncReadExt + Unpin), max: u16) -> Option<Vec<u8>> {
    let len = reader.read_u16().await.ok()?;
    if len == 0 || len > max {
        return None;
    }
    let mut buf = vec![0u8; usize::from(len)];
    reader.read_exact(&mut buf).await.ok()?;
    Some(buf)
}
