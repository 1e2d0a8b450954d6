//! A decision is not forever, through the real binary: a reload closes the
//! pooled upstream connections the new policy denies (seen closing at the
//! origin), and `timeouts.tunnel_max_lifetime` ends a busy CONNECT tunnel.
//! (A reload closing open tunnels: tests/resources.rs.)

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One entry per accepted connection: whether the peer has closed it.
type Conns = Arc<Mutex<Vec<bool>>>;

/// Accepts connections and records each one's end (EOF or error) in the log.
async fn start_origin<F, Fut>(serve: F) -> (SocketAddr, Conns)
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns: Conns = Arc::default();
    let log = conns.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let index = {
                let mut log = log.lock().unwrap();
                log.push(false);
                log.len() - 1
            };
            let (log, served) = (log.clone(), serve(stream));
            tokio::spawn(async move {
                served.await;
                log.lock().unwrap()[index] = true;
            });
        }
    });
    (addr, conns)
}

/// HTTP/1.1 with keep-alive: `ok` to every request head, until the peer closes.
async fn serve_keep_alive(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).await {
            Ok(0) | Err(_) => return,
            Ok(_) => head.push(byte[0]),
        }
        if head.ends_with(b"\r\n\r\n") {
            head.clear();
            if stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.is_err() {
                return;
            }
        }
    }
}

/// Echoes bytes until the peer closes.
async fn serve_echo(stream: TcpStream) {
    let (mut r, mut w) = stream.into_split();
    let _ = tokio::io::copy(&mut r, &mut w).await;
}

fn http_policy(ports: &str) -> String {
    format!(
        "reload:\n  interval: 100ms\nallow_ranges: [127.0.0.1/32]\n\
         roles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      http_ports: [{ports}]\n"
    )
}

/// Pooled connections are kept and reused while allowed; a reload that
/// denies one destination closes its pooled socket (the origin sees it
/// close) and counts `revoked_total{kind="pooled"}`; the other destination's
/// pooled connection stays open and is reused.
#[tokio::test]
async fn a_reload_closes_pooled_upstream_connections_it_denies() {
    let (denied, denied_conns) = start_origin(serve_keep_alive).await;
    let (kept, kept_conns) = start_origin(serve_keep_alive).await;
    let path = temp_file("revocation", "pooled.yaml", "");
    let proxy = BinaryProxy::spawn(&path, &http_policy(&format!("{}, {}", denied.port(), kept.port()))).await;
    let url = |origin: SocketAddr| format!("http://{origin}/");
    for origin in [denied, kept, denied, kept] {
        let resp = get(proxy.addr, &url(origin)).await;
        assert_eq!((resp.status, resp.text().as_str()), (200, "ok"), "GET {origin}");
    }
    // Each origin saw one connection, used twice: the second request came
    // from the pool, so the socket that follows is a pooled one.
    assert_eq!(*denied_conns.lock().unwrap(), [false], "one pooled connection, still open");
    assert_eq!(*kept_conns.lock().unwrap(), [false], "one pooled connection, still open");

    proxy.rewrite(&http_policy(&kept.port().to_string()));
    let pooled = "portcullis_revoked_total{kind=\"pooled\"}";
    let metrics = wait_until("the reload's revocation is counted", || async {
        let m = proxy.metrics().await;
        (metric_value(&m, pooled) > 0.0).then_some(m)
    })
    .await;
    assert_eq!(metric_value(&metrics, pooled), 1.0, "exactly the denied destination's connection");
    wait_until("the origin sees its pooled connection closed", || async {
        (*denied_conns.lock().unwrap() == [true]).then_some(())
    })
    .await;

    let resp = get(proxy.addr, &url(denied)).await;
    assert_eq!((resp.status, resp.header("x-portcullis-deny")), (403, Some("port-not-allowed")));
    let resp = get(proxy.addr, &url(kept)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(*kept_conns.lock().unwrap(), [false], "the allowed pooled connection stayed open and was reused");
    assert_eq!(denied_conns.lock().unwrap().len(), 1, "the denied origin was not dialed again");
}

/// A tunnel that is never idle is still closed once its lifetime is over:
/// the client and the origin both see the close, not before the lifetime,
/// and the decision line says `tunnel-lifetime`.
#[tokio::test]
async fn tunnel_max_lifetime_ends_a_busy_connect_tunnel() {
    const LIFETIME: Duration = Duration::from_secs(1);
    let (echo, conns) = start_origin(serve_echo).await;
    let yaml = format!(
        "timeouts:\n  tunnel_max_lifetime: 1s\nallow_ranges: [127.0.0.1/32]\n\
         roles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      connect_ports: [{}]\n",
        echo.port()
    );
    let proxy = BinaryProxy::spawn(&temp_file("revocation", "lifetime.yaml", ""), &yaml).await;
    let (resp, mut tunnel) = connect(proxy.addr, &echo.to_string()).await;
    assert_eq!(resp.status, 200);
    let opened = Instant::now();
    // Keep bytes moving every 100 ms until the tunnel ends (bounded by STEP).
    let mut echoed = [0u8; 4];
    let ended = loop {
        assert!(opened.elapsed() < STEP, "the tunnel outlived its lifetime by far");
        if tunnel.write_all(b"busy").await.is_err() {
            break opened.elapsed();
        }
        match tokio::time::timeout(STEP, tunnel.read_exact(&mut echoed)).await.expect("an echo or the end") {
            Ok(_) => assert_eq!(&echoed, b"busy"),
            Err(_) => break opened.elapsed(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(ended >= LIFETIME, "closed after {ended:?}, before the lifetime");
    wait_until("the origin sees the tunnel closed", || async { (*conns.lock().unwrap() == [true]).then_some(()) }).await;
    let lines = proxy.lines_with(&["\"reason\":\"tunnel-lifetime\""], 1).await;
    assert_eq!(lines.len(), 1, "{:#?}", proxy.log.lock().unwrap());
    assert!(lines[0].contains(&format!("\"port\":{}", echo.port())) && lines[0].contains("\"kind\":\"connect\""), "{}", lines[0]);
}
