//! Hot reload: on SIGHUP and when the content of the config file or of a
//! file it refers to (a bearer token file, a certificate, a key, a CA
//! bundle) changes, parse, validate and compile off the hot path, then swap
//! the snapshot. A config that fails is refused and logged; the old
//! snapshot keeps serving.

use std::hash::{Hash, Hasher};
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::proxy::error::UpstreamError;
use crate::snapshot::{Snapshot, SnapshotHandle};

/// What can trigger a reload, for the log.
#[derive(Debug, Clone, Copy)]
pub enum Trigger {
    Signal,
    FileChange,
}

impl Trigger {
    const fn as_str(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::FileChange => "file-change",
        }
    }
}

/// Reloads one config file into one snapshot handle.
pub struct Reloader {
    path: PathBuf,
    handle: SnapshotHandle,
    metrics: Arc<Metrics>,
    /// Settings that only take effect at start.
    fixed: Fixed,
    /// The listeners' addresses as bound at start.
    bound: Bound,
    generation: AtomicU64,
    /// What the last load read, so an unchanged (or unchanged broken)
    /// config is not reloaded again and again. Held through a reload.
    last_seen: Mutex<Seen>,
}

/// Fingerprints of the config file's content and of each file it refers to.
#[derive(Debug, Default)]
struct Seen {
    config: u64,
    files: Vec<(PathBuf, u64)>,
}

impl Seen {
    /// The files `config` refers to, read now.
    fn files_of(config: &Config) -> Vec<(PathBuf, u64)> {
        config.referenced_files().into_iter().map(|path| (path.to_path_buf(), file_fingerprint(path))).collect()
    }
}

impl Reloader {
    /// Creates a reloader for the config `initial` loaded from `path`.
    pub fn new(path: PathBuf, initial: &Config, bound: Bound, handle: SnapshotHandle, metrics: Arc<Metrics>) -> Self {
        let seen = Seen { config: file_fingerprint(&path), files: Seen::files_of(initial) };
        Reloader {
            path,
            handle,
            metrics,
            fixed: fixed_settings(initial),
            bound,
            generation: AtomicU64::new(1),
            last_seen: Mutex::new(seen),
        }
    }

    /// Loads the file and, if it is valid, publishes it. Blocking (file I/O
    /// and compilation): call from a blocking context.
    pub fn reload(&self, trigger: Trigger) -> Result<u64, ConfigError> {
        let mut last_seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
        let file = self.path.display().to_string();
        // One read serves both the fingerprint and the parse: a file being
        // rewritten in place cannot be fingerprinted whole and parsed
        // truncated, which would pin the old policy until the next change.
        let read = crate::input::read(&self.path, crate::input::CONFIG).map_err(ConfigError::from);
        if let Ok(text) = &read {
            last_seen.config = fingerprint(text.as_bytes());
        }
        let compiled = read.and_then(|text| Config::from_yaml_str(&text, &file)).and_then(|config| {
            // Read before the compile reads them: a file rotated meanwhile
            // differs on the next look and is loaded then.
            last_seen.files = Seen::files_of(&config);
            if let Some(nofile) = crate::host::nofile_limit() {
                crate::snapshot::check_descriptors(&config, nofile)?;
            }
            let generation = self.generation.load(Ordering::SeqCst) + 1;
            let fixed = fixed_settings(&config);
            let snapshot = Snapshot::compile(&self.bound.apply(config), generation)?;
            Ok((fixed, snapshot))
        });
        let (fixed, snapshot) = match compiled {
            Ok(ok) => ok,
            Err(e) => {
                self.metrics.count_reload(false, 0);
                tracing::error!(trigger = trigger.as_str(), error = %e, "config reload refused; the previous policy stays in force");
                return Err(e);
            }
        };
        if fixed != self.fixed {
            tracing::warn!(
                trigger = trigger.as_str(),
                "listen, admin_listen, transparent_listen, dns_listen and reload settings changed in the file; they take effect only after a restart"
            );
        }
        let generation = snapshot.generation;
        let transparent = self.fixed.transparent_listen.is_some();
        self.metrics.start_series(&snapshot.policy, transparent, &UpstreamError::CODES);
        // Counted before it is published: whoever observes the new policy
        // then also reads its generation in the metrics.
        self.metrics.count_reload(true, generation);
        self.handle.store(Arc::new(snapshot));
        self.generation.store(generation, Ordering::SeqCst);
        tracing::info!(trigger = trigger.as_str(), generation, config = %file, "config reloaded");
        Ok(generation)
    }

    /// True when the content of the config file, or of a file it refers
    /// to, differs from what was last loaded or tried. False while a
    /// reload runs (the next look sees what it missed).
    fn changed(&self) -> bool {
        let Ok(seen) = self.last_seen.try_lock() else { return false };
        let Ok(bytes) = std::fs::read(&self.path) else { return false };
        fingerprint(&bytes) != seen.config || seen.files.iter().any(|(path, fp)| file_fingerprint(path) != *fp)
    }

    /// Reloads in a blocking task so compilation never stalls a worker thread.
    pub async fn reload_async(self: &Arc<Self>, trigger: Trigger) {
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.reload(trigger)).await;
    }

    /// Polls the files every `interval` and reloads when a content changes.
    /// Reading the content (rather than watching an inode) also follows a
    /// Kubernetes ConfigMap, whose file is a symlink swapped atomically.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.changed() {
                self.reload_async(Trigger::FileChange).await;
            }
        }
    }

    /// Reloads on every SIGHUP.
    #[cfg(unix)]
    pub async fn on_sighup(self: Arc<Self>, mut hup: tokio::signal::unix::Signal) {
        while hup.recv().await.is_some() {
            self.reload_async(Trigger::Signal).await;
        }
    }
}

/// The addresses the listeners were bound to at start. The policy's own
/// listeners are these, not the file's: a file that says port 0 leaves the
/// port to the kernel, and the proxy must still refuse requests to itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
}

impl Bound {
    /// `config` with the bound listener addresses in place of the file's.
    pub fn apply(&self, mut config: Config) -> Config {
        config.listen = self.listen;
        config.admin_listen = self.admin_listen;
        config
    }
}

/// The settings that take effect only at start: the listeners and how
/// reloads are triggered.
#[derive(Debug, PartialEq, Eq)]
struct Fixed {
    listen: SocketAddr,
    admin_listen: SocketAddr,
    transparent_listen: Option<SocketAddr>,
    dns_listen: Option<SocketAddr>,
    watch: bool,
    interval: Duration,
}

fn fixed_settings(c: &Config) -> Fixed {
    Fixed {
        listen: c.listen,
        admin_listen: c.admin_listen,
        transparent_listen: c.transparent_listen,
        dns_listen: c.dns_listen,
        watch: c.reload.watch,
        interval: c.reload.interval.0,
    }
}

/// The fingerprint of a file's content (at most its first 16 MiB); 0 when
/// it cannot be read, so that its appearing counts as a change.
fn file_fingerprint(path: &Path) -> u64 {
    let mut bytes = Vec::new();
    match std::fs::File::open(path).and_then(|f| f.take(16 << 20).read_to_end(&mut bytes)) {
        Ok(_) => fingerprint(&bytes),
        Err(_) => 0,
    }
}

fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}
