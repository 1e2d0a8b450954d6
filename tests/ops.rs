//! Operations through real sockets: metrics, health, reload, shutdown, limits.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use portcullis::app::App;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("portcullis-ops-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a config via a temporary file and rename, as editors and
/// ConfigMaps do, so a watcher never sees half a file.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn policy_yaml(ports: &[u16], extra: &str) -> String {
    let ports = ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    format!(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n{extra}allow_ranges: [127.0.0.1/32]\nroles:\n  default:\n    allow:\n      cidrs: [127.0.0.1/32]\n      http_ports: [{ports}]\n      connect_ports: [{ports}]\n"
    )
}

/// Starts the whole app in-process; dropping the returned sender shuts it down.
async fn start_app(path: &Path) -> (SocketAddr, SocketAddr, oneshot::Sender<()>) {
    let app = App::start(path).await.expect("app starts");
    let (proxy, admin) = (app.proxy_addr().unwrap(), app.admin_addr().unwrap());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(app.run(async move {
        let _ = rx.await;
    }));
    (proxy, admin, tx)
}

/// One sample per line of the text exposition: (name, labels) -> value.
fn parse_metrics(text: &str) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (series, value) = line.rsplit_once(' ').unwrap();
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => {
                let labels = rest
                    .trim_end_matches('}')
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|pair| {
                        let (k, v) = pair.split_once('=').unwrap();
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (name.to_string(), labels)
            }
            None => (series.to_string(), BTreeMap::new()),
        };
        out.insert((name, labels), value.parse().unwrap());
    }
    out
}

async fn scrape(admin: SocketAddr) -> BTreeMap<(String, BTreeMap<String, String>), f64> {
    let resp = send_raw(admin, "GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").await;
    assert_eq!(resp.status, 200);
    assert!(resp.header("content-type").unwrap().starts_with("text/plain; version=0.0.4"));
    parse_metrics(&resp.text())
}

fn sample(m: &BTreeMap<(String, BTreeMap<String, String>), f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    let labels: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    m.get(&(name.to_string(), labels.clone())).copied().unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
}

/// Polls `check` until it is true, for at most 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + STEP;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn metrics_count_a_scripted_mix_exactly() {
    let origin = start_http_origin().await;
    let (refused, _held_port) = refusing_addr();
    let refused = refused.port();
    let dir = temp_dir("metrics");
    let path = dir.join("portcullis.yaml");
    std::fs::write(&path, policy_yaml(&[origin.port(), refused], "")).unwrap();
    let (proxy, admin, _stop) = start_app(&path).await;

    for _ in 0..2 {
        assert_eq!(get(proxy, &format!("http://127.0.0.1:{}/bytes/1000", origin.port())).await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(get(proxy, "http://169.254.169.254/latest/meta-data/").await.status, 403);
    }
    assert_eq!(connect(proxy, "8.8.8.8:443").await.0.status, 403);
    assert_eq!(connect(proxy, "127.1:443").await.0.status, 400);
    assert_eq!(get(proxy, &format!("http://127.0.0.1:{refused}/")).await.status, 502);

    eventually("connections closed", || async {
        sample(&scrape(admin).await, "portcullis_active_connections", &[]) == 0.0
    })
    .await;
    let m = scrape(admin).await;
    let req = |kind, decision, reason| {
        sample(&m, "portcullis_requests_total", &[("kind", kind), ("decision", decision), ("reason", reason), ("role", "default")])
    };
    assert_eq!(req("http", "allow", "none"), 2.0);
    assert_eq!(req("http", "deny", "denied-range:metadata"), 3.0);
    assert_eq!(req("connect", "deny", "port-not-allowed"), 1.0);
    assert_eq!(req("connect", "deny", "invalid-target"), 1.0);
    assert_eq!(req("http", "error", "upstream-refused"), 1.0);
    assert_eq!(sample(&m, "portcullis_upstream_errors_total", &[("kind", "upstream-refused")]), 1.0);
    assert_eq!(sample(&m, "portcullis_relayed_bytes_total", &[("direction", "upstream_to_client")]), 2000.0);
    assert_eq!(sample(&m, "portcullis_upstream_connect_duration_seconds_count", &[]), 2.0, "one pooled reuse, one refused");
    assert_eq!(sample(&m, "portcullis_active_tunnels", &[]), 0.0);
    assert_eq!(sample(&m, "portcullis_policy_generation", &[]), 1.0);
    assert_eq!(sample(&m, "portcullis_config_reloads_total", &[("result", "success")]), 1.0);
    assert_eq!(sample(&m, "portcullis_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    assert!(sample(&m, "portcullis_config_last_reload_success_timestamp_seconds", &[]) > 1.7e9);
    // No label carries a host or a client address.
    for (name, labels) in m.keys() {
        for value in labels.values() {
            assert!(!value.contains("127.0.0.1") && !value.contains("169.254"), "{name}{labels:?}");
        }
    }
}

#[tokio::test]
async fn admin_endpoints_and_nothing_else() {
    let dir = temp_dir("admin");
    let path = dir.join("portcullis.yaml");
    std::fs::write(&path, policy_yaml(&[80], "")).unwrap();
    let (_proxy, admin, _stop) = start_app(&path).await;
    let cases = [
        ("GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        ("GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        ("GET /nope HTTP/1.1\r\nHost: a\r\n\r\n", 404),
        ("POST /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", 404),
        ("GET http://127.0.0.1:80/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
        ("CONNECT 127.0.0.1:80 HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n", 404),
    ];
    for (request, status) in cases {
        assert_eq!(send_raw(admin, request).await.status, status, "{request}");
    }
}

/// The decision changes after the file changes; a tunnel opened before the
/// reload keeps working; a broken file is refused and the old policy stays.
#[tokio::test]
async fn reload_on_file_change_keeps_tunnels_and_refuses_bad_configs() {
    let origin = start_http_origin().await;
    let echo = start_tcp_echo().await;
    let dir = temp_dir("reload");
    let path = dir.join("portcullis.yaml");
    let watch = "reload:\n  interval: 100ms\n";
    std::fs::write(&path, policy_yaml(&[echo.port()], watch)).unwrap();
    let (proxy, admin, _stop) = start_app(&path).await;
    let url = format!("http://127.0.0.1:{}/headers", origin.port());
    assert_eq!(get(proxy, &url).await.header("x-portcullis-deny"), Some("port-not-allowed"));
    let (resp, mut tunnel) = connect(proxy, &format!("127.0.0.1:{}", echo.port())).await;
    assert_eq!(resp.status, 200);

    write_atomically(&path, &policy_yaml(&[echo.port(), origin.port()], watch));
    eventually("the new policy allows the origin", || async { get(proxy, &url).await.status == 200 }).await;
    assert_eq!(sample(&scrape(admin).await, "portcullis_policy_generation", &[]), 2.0);

    tunnel.write_all(b"still open").await.unwrap();
    let mut buf = [0u8; 10];
    tokio::time::timeout(STEP, tunnel.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"still open");

    write_atomically(&path, "roles:\n  default:\n    allow:\n      domainz: [x]\n");
    eventually("the broken config is counted", || async {
        sample(&scrape(admin).await, "portcullis_config_reloads_total", &[("result", "failure")]) == 1.0
    })
    .await;
    assert_eq!(get(proxy, &url).await.status, 200, "the last good policy keeps serving");
    assert_eq!(sample(&scrape(admin).await, "portcullis_policy_generation", &[]), 2.0);
}

/// A Kubernetes ConfigMap mount: the config path is a symlink into a
/// directory that is replaced by swapping another symlink.
#[cfg(unix)]
#[tokio::test]
async fn reload_follows_a_configmap_symlink_swap() {
    let origin = start_http_origin().await;
    let dir = temp_dir("configmap");
    let watch = "reload:\n  interval: 100ms\n";
    std::fs::create_dir_all(dir.join("v1")).unwrap();
    std::fs::write(dir.join("v1/portcullis.yaml"), policy_yaml(&[1], watch)).unwrap();
    std::os::unix::fs::symlink("v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/portcullis.yaml", dir.join("portcullis.yaml")).unwrap();
    let (proxy, _admin, _stop) = start_app(&dir.join("portcullis.yaml")).await;
    let url = format!("http://127.0.0.1:{}/headers", origin.port());
    assert_eq!(get(proxy, &url).await.status, 403);

    std::fs::create_dir_all(dir.join("v2")).unwrap();
    std::fs::write(dir.join("v2/portcullis.yaml"), policy_yaml(&[origin.port()], watch)).unwrap();
    std::os::unix::fs::symlink("v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    eventually("the swapped ConfigMap is loaded", || async { get(proxy, &url).await.status == 200 }).await;
}

#[tokio::test]
async fn per_client_limit_refuses_only_that_client() {
    let dir = temp_dir("limits");
    let path = dir.join("portcullis.yaml");
    std::fs::write(&path, policy_yaml(&[80], "limits:\n  max_connections: 100\n  max_connections_per_client: 2\n")).unwrap();
    let (proxy, admin, _stop) = start_app(&path).await;
    let from = |ip: &str| {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        async move {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip, 0)).unwrap();
            socket.connect(proxy).await.unwrap()
        }
    };
    let held = [from("127.0.0.2").await, from("127.0.0.2").await];
    eventually("both held connections are counted", || async {
        sample(&scrape(admin).await, "portcullis_active_connections", &[]) >= 2.0
    })
    .await;
    let mut third = from("127.0.0.2").await;
    third.write_all(b"GET http://169.254.169.254/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let resp = read_response(&mut third).await;
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (503, Some("over-limit")));

    let mut other = from("127.0.0.3").await;
    other.write_all(b"GET http://169.254.169.254/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut other).await.status, 403, "another client still gets through");
    let m = scrape(admin).await;
    assert_eq!(sample(&m, "portcullis_connections_refused_total", &[("reason", "per_client_limit")]), 1.0);

    drop(held);
    drop(third);
    eventually("slots are released", || async {
        let mut again = from("127.0.0.2").await;
        again.write_all(b"GET http://169.254.169.254/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        read_response(&mut again).await.status == 403
    })
    .await;
}

#[tokio::test]
async fn global_limit_refuses_with_503() {
    let dir = temp_dir("global");
    let path = dir.join("portcullis.yaml");
    std::fs::write(&path, policy_yaml(&[80], "limits:\n  max_connections: 1\n")).unwrap();
    let (proxy, admin, _stop) = start_app(&path).await;
    let _held = TcpStream::connect(proxy).await.unwrap();
    eventually("the held connection is counted", || async {
        sample(&scrape(admin).await, "portcullis_active_connections", &[]) == 1.0
    })
    .await;
    let resp = get(proxy, "http://169.254.169.254/").await;
    assert_eq!((resp.status, resp.header("x-portcullis-error")), (503, Some("over-limit")));
    assert_eq!(sample(&scrape(admin).await, "portcullis_connections_refused_total", &[("reason", "global_limit")]), 1.0);
}

/// The real binary on loopback port 0, its stdout drained in a thread.
struct Proxy {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Proxy {
    async fn spawn(path: &Path, body: &str) -> Proxy {
        std::fs::write(path, body).unwrap();
        let (child, lines, (proxy, admin)) = run_binary(path);
        std::thread::spawn(move || for _ in lines {});
        // Signals are sent only once it serves: its handlers are installed
        // as it starts serving, after the startup line.
        eventually("ready", || async { send_raw(admin, "GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n").await.status == 200 }).await;
        Proxy { child, proxy, admin }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most 10 s, letting the in-process
    /// origins keep running meanwhile.
    async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "process did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn sighup_reloads_the_running_binary() {
    let origin = start_http_origin().await;
    let dir = temp_dir("sighup");
    let path = dir.join("portcullis.yaml");
    // A short poll interval: were `watch: false` ignored, the change below
    // would be picked up many times over during the wait.
    let no_watch = "reload:\n  watch: false\n  interval: 50ms\n";
    let proxy = Proxy::spawn(&path, &policy_yaml(&[1], no_watch)).await;
    let url = format!("http://127.0.0.1:{}/headers", origin.port());
    assert_eq!(get(proxy.proxy, &url).await.header("x-portcullis-deny"), Some("port-not-allowed"));
    write_atomically(&path, &policy_yaml(&[origin.port()], no_watch));
    // Watching is off: nothing changes until the signal (ten intervals).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(proxy.proxy, &url).await.status, 403);
    assert_eq!(sample(&scrape(proxy.admin).await, "portcullis_policy_generation", &[]), 1.0, "not reloaded");
    proxy.signal("-HUP");
    eventually("SIGHUP reloads", || async { get(proxy.proxy, &url).await.status == 200 }).await;
    assert_eq!(sample(&scrape(proxy.admin).await, "portcullis_policy_generation", &[]), 2.0);
}

#[tokio::test]
async fn sigterm_drains_open_tunnels_then_exits_zero() {
    let echo = start_tcp_echo().await;
    let dir = temp_dir("sigterm");
    let path = dir.join("portcullis.yaml");
    let mut proxy = Proxy::spawn(&path, &policy_yaml(&[echo.port()], "timeouts:\n  shutdown_grace: 20s\n")).await;
    let (resp, mut tunnel) = connect(proxy.proxy, &format!("127.0.0.1:{}", echo.port())).await;
    assert_eq!(resp.status, 200);
    assert_eq!(send_raw(proxy.admin, "GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n").await.status, 200);

    proxy.signal("-TERM");
    eventually("not ready while draining", || async {
        send_raw(proxy.admin, "GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n").await.status == 503
    })
    .await;
    assert!(TcpStream::connect(proxy.proxy).await.is_err(), "new connections are refused while draining");
    for round in 0..3 {
        let msg = format!("round {round}");
        tunnel.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(STEP, tunnel.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(buf, msg.as_bytes(), "the tunnel keeps relaying during the drain");
    }
    assert!(proxy.child.try_wait().unwrap().is_none(), "still draining while the tunnel is open");
    drop(tunnel);
    let status = proxy.wait_exit().await;
    assert_eq!(status.code(), Some(0));
}

/// Rolling updates: during `shutdown_delay` after SIGTERM, /readyz answers
/// 503 while new connections are still accepted and served; once the
/// delay is over the listener closes and the process drains as usual.
#[tokio::test]
async fn sigterm_keeps_serving_during_the_shutdown_delay() {
    let origin = start_http_origin().await;
    let dir = temp_dir("shutdown-delay");
    let path = dir.join("portcullis.yaml");
    // Requests are sent during the first 2 s of a 5 s delay: a 3 s margin
    // before the listener closes, so a slow CI machine cannot overrun it.
    let mut proxy = Proxy::spawn(&path, &policy_yaml(&[origin.port()], "timeouts:\n  shutdown_delay: 5s\n")).await;
    let url = format!("http://127.0.0.1:{}/headers", origin.port());
    proxy.signal("-TERM");
    let terminated = Instant::now();
    eventually("not ready once SIGTERM arrives", || async {
        send_raw(proxy.admin, "GET /readyz HTTP/1.1\r\nHost: a\r\n\r\n").await.status == 503
    })
    .await;
    let mut served = 0;
    while terminated.elapsed() < Duration::from_millis(2000) {
        assert_eq!(get(proxy.proxy, &url).await.status, 200, "a new connection during the delay is served");
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served >= 3, "only {served} requests during the delay");
    let status = proxy.wait_exit().await;
    let exited = terminated.elapsed();
    assert!(exited >= Duration::from_secs(5), "the listener stays open for the whole delay: {status:?} after {exited:?}");
    assert_eq!(status.code(), Some(0));
    assert!(TcpStream::connect(proxy.proxy).await.is_err(), "closed after the delay");
}

/// Many concurrent keep-alive clients of one origin keep reusing upstream
/// connections: never more upstream connections than requests in flight
/// at once, however many requests they send.
#[tokio::test]
async fn concurrent_clients_reuse_upstream_connections() {
    const CLIENTS: usize = 64;
    const REQUESTS: usize = 20;
    let origin = start_http_origin().await;
    let dir = temp_dir("reuse-concurrent");
    let path = dir.join("portcullis.yaml");
    std::fs::write(&path, policy_yaml(&[origin.port()], "")).unwrap();
    let (proxy, admin, _stop) = start_app(&path).await;
    let request = format!("GET http://127.0.0.1:{0}/headers HTTP/1.1\r\nHost: 127.0.0.1:{0}\r\n\r\n", origin.port());
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let request = request.clone();
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(proxy).await.unwrap();
                for _ in 0..REQUESTS {
                    stream.write_all(request.as_bytes()).await.unwrap();
                    assert_eq!(read_response(&mut stream).await.status, 200);
                }
            })
        })
        .collect();
    for client in clients {
        tokio::time::timeout(STEP, client).await.expect("clients finish in time").unwrap();
    }
    let m = scrape(admin).await;
    let connects = sample(&m, "portcullis_upstream_connect_duration_seconds_count", &[]);
    assert!(connects <= CLIENTS as f64, "{connects} upstream connections for {CLIENTS} clients");
    eventually("every request counted", || async {
        let m = scrape(admin).await;
        let labels = [("kind", "http"), ("decision", "allow"), ("reason", "none"), ("role", "default")];
        sample(&m, "portcullis_requests_total", &labels) == (CLIENTS * REQUESTS) as f64
    })
    .await;
}

/// Responses with a known length (hyper stops polling at the last byte)
/// still return the upstream connection to the pool: three requests from
/// three clients need one upstream connection.
#[tokio::test]
async fn upstream_connections_are_reused_for_sized_and_empty_bodies() {
    let origin = start_http_origin().await;
    let dir = temp_dir("reuse");
    let path = dir.join("portcullis.yaml");
    std::fs::write(&path, policy_yaml(&[origin.port()], "")).unwrap();
    let (proxy, admin, _stop) = start_app(&path).await;
    for _ in 0..3 {
        let resp = get(proxy, &format!("http://127.0.0.1:{}/headers", origin.port())).await;
        assert_eq!(resp.status, 200);
        assert!(resp.header("content-length").is_some(), "a sized body");
    }
    let resp = get(proxy, &format!("http://127.0.0.1:{}/bytes/0", origin.port())).await;
    assert_eq!(resp.status, 200);
    let resp = get(proxy, &format!("http://127.0.0.1:{}/headers", origin.port())).await;
    assert_eq!(resp.status, 200);
    let m = scrape(admin).await;
    assert_eq!(sample(&m, "portcullis_upstream_connect_duration_seconds_count", &[]), 1.0);
}
