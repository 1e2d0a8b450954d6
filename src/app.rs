//! The whole process: proxy listener, admin listener, reload triggers and
//! graceful shutdown, wired together from one config file.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::admin::{self, Health};
use crate::config::{Config, ConfigError, ReloadConfig};
use crate::dns_listen::DnsListener;
use crate::metrics::Metrics;
use crate::proxy::entrance::transparent::TransparentServer;
use crate::proxy::error::UpstreamError;
use crate::proxy::Server;
use crate::snapshot::Snapshot;
use crate::reload::{Bound, Reloader};

/// Why the process could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind { what: &'static str, addr: SocketAddr, source: io::Error },
}

/// The address `listener` was bound to.
fn local_addr(listener: &TcpListener, what: &'static str) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind { what, addr: SocketAddr::from(([0, 0, 0, 0], 0)), source })
}

/// A started (bound) Portcullis process.
pub struct App {
    server: Server,
    /// Present when `transparent_listen` is set.
    transparent: Option<TransparentServer>,
    /// Present when `dns_listen` is set.
    dns: Option<DnsListener>,
    admin: TcpListener,
    reloader: Arc<Reloader>,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    /// The reload settings (they take effect only at start).
    reload: ReloadConfig,
    /// SIGHUP, listened for from start: a signal sent once the process
    /// says it is listening must reload it, never kill it.
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl App {
    /// Loads the config file and binds both listeners.
    pub async fn start(path: &Path) -> Result<App, StartError> {
        let file_config = Config::load(path)?;
        if let Some(nofile) = crate::host::raise_nofile_limit() {
            crate::snapshot::check_descriptors(&file_config, nofile)?;
        }
        let proxy = TcpListener::bind(file_config.listen)
            .await
            .map_err(|source| StartError::Bind { what: "proxy", addr: file_config.listen, source })?;
        let admin = TcpListener::bind(file_config.admin_listen)
            .await
            .map_err(|source| StartError::Bind { what: "admin", addr: file_config.admin_listen, source })?;
        // The policy refuses requests to the listeners as `self`: it must
        // know the ports actually bound, which port 0 leaves to the kernel.
        let bound = Bound { listen: local_addr(&proxy, "proxy")?, admin_listen: local_addr(&admin, "admin")? };
        let config = bound.apply(file_config.clone());
        let snapshot = Snapshot::compile(&config, 1)?;
        let metrics = Arc::new(Metrics::new());
        metrics.start_series(&snapshot.policy, config.transparent_listen.is_some(), &UpstreamError::CODES);
        metrics.count_reload(true, 1);
        let server = Server::on_listener(proxy, snapshot, metrics.clone());
        let transparent = match config.transparent_listen {
            Some(addr) => {
                // The loop guard's list; a bound listener always has an address.
                let others: Vec<SocketAddr> =
                    [server.local_addr(), admin.local_addr()].into_iter().filter_map(Result::ok).collect();
                let bound = server.bind_transparent(addr, &others).await;
                Some(bound.map_err(|source| StartError::Bind { what: "transparent", addr, source })?)
            }
            None => None,
        };
        let dns = match config.dns_listen {
            Some(addr) => Some(
                DnsListener::bind(addr, server.snapshot_handle(), &metrics)
                    .await
                    .map_err(|source| StartError::Bind { what: "dns", addr, source })?,
            ),
            None => None,
        };
        let reloader = Arc::new(Reloader::new(PathBuf::from(path), &file_config, bound, server.snapshot_handle(), metrics.clone()));
        #[cfg(unix)]
        let hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hup) => Some(hup),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload on signal disabled");
                None
            }
        };
        Ok(App {
            server,
            transparent,
            dns,
            admin,
            reloader,
            health: Arc::new(Health::default()),
            metrics,
            reload: config.reload,
            #[cfg(unix)]
            hup,
        })
    }

    /// The proxy listener's address.
    pub fn proxy_addr(&self) -> io::Result<SocketAddr> {
        self.server.local_addr()
    }

    /// The transparent listener's address, when it is enabled.
    pub fn transparent_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.transparent.as_ref().map(TransparentServer::local_addr)
    }

    /// The DNS listener's address (UDP and TCP), when it is enabled.
    pub fn dns_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.dns.as_ref().map(DnsListener::local_addr)
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// The reloader, to trigger a reload directly.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Serves until `shutdown` completes, then drains (see [`Server::run_until`]).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let serving = self.server.snapshot_handle();
        let mut background = vec![tokio::spawn(admin::serve(self.admin, self.metrics.clone(), self.health.clone(), serving))];
        if self.reload.watch {
            background.push(tokio::spawn(self.reloader.clone().watch(self.reload.interval.0)));
        }
        #[cfg(unix)]
        if let Some(hup) = self.hup {
            background.push(tokio::spawn(self.reloader.clone().on_sighup(hup)));
        }
        // One shutdown for both entrances: the transparent listener stops
        // accepting with the proxy's, and the proxy's drain waits for both.
        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        if let Some(dns) = self.dns {
            let mut stop_rx = stop_rx.clone();
            background.push(tokio::spawn(dns.run_until(async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            })));
        }
        if let Some(transparent) = self.transparent {
            background.push(tokio::spawn(transparent.run_until(async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            })));
        }
        self.health.set_accepting(true);
        let health = self.health.clone();
        let snapshot = self.server.snapshot_handle();
        self.server
            .run_until(async move {
                shutdown.await;
                // Not ready from here on, but still accepting for the
                // delay: endpoint removal lags SIGTERM by a few seconds,
                // and a closed listener would refuse the stragglers.
                health.set_accepting(false);
                let delay = snapshot.load().timeouts.shutdown_delay.0;
                if !delay.is_zero() {
                    tracing::info!(delay_secs = delay.as_secs_f64(), "shutting down: not ready, still accepting");
                    tokio::time::sleep(delay).await;
                }
                let _ = stop_tx.send(true);
            })
            .await;
        for task in background {
            task.abort();
        }
    }
}
