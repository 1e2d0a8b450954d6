//! The `portcullis` command: run the proxy, check a URL against a policy,
//! or validate a config file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use portcullis::config::Config;
use portcullis::policy::{Decision, PreResolution, RequestKind};
use portcullis::app::App;
use portcullis::proxy::Snapshot;
use portcullis::target::Target;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "An egress filtering forward proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Decide a URL against a config without starting a server.
    /// Exit code 0: allowed, 1: denied, 2: error.
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Evaluate as this role (default: the `default` role).
        #[arg(long)]
        role: Option<String>,
        /// `http://host[:port]/...` (forwarded), `https://host[:port]/...` or `host:port` (CONNECT).
        url: String,
    },
    /// Validate a config file. Exit code 0: valid, 2: refused.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run { config } => runtime.block_on(run(config)),
        Command::Check { config, role, url } => runtime.block_on(check(config, role.as_deref(), &url)),
        Command::Validate { config } => validate(config),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// JSON lines on stdout, written in batches by a dedicated thread (see
/// `portcullis::logging`). The returned guard writes what is pending when
/// dropped.
fn init_logging() -> anyhow::Result<portcullis::logging::LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (sink, guard) = portcullis::logging::LogSink::install(std::io::stdout())?;
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(portcullis::logging::SinkWriter(sink))
        .init();
    Ok(guard)
}

async fn run(path: PathBuf) -> anyhow::Result<ExitCode> {
    let _log = init_logging()?;
    let app = App::start(&path).await?;
    tracing::info!(
        listen = %app.proxy_addr()?,
        admin = %app.admin_addr()?,
        transparent = %app.transparent_addr().transpose()?.map_or("off".to_string(), |a| a.to_string()),
        config = %path.display(),
        "portcullis listening"
    );
    app.run(shutdown_signal()).await;
    tracing::info!("portcullis stopped");
    Ok(ExitCode::SUCCESS)
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
                    _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "shutting down"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the proxy gracefully");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

fn validate(path: PathBuf) -> anyhow::Result<ExitCode> {
    match Config::load(&path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::from(2))
        }
    }
}

/// Parses what an operator types: an http(s) URL or a bare `host:port`.
fn parse_check_target(url: &str) -> Result<(RequestKind, Target), String> {
    let lower = url.to_ascii_lowercase();
    let (kind, parsed) = if lower.starts_with("https://") {
        let uri: http::Uri = format!("http://{}", &url[8..]).parse().map_err(|e| format!("{e}"))?;
        let authority = uri.authority().ok_or("missing host")?.as_str();
        let with_port = if uri.port().is_some() { authority.to_string() } else { format!("{authority}:443") };
        (RequestKind::Connect, Target::parse_authority(&with_port))
    } else if lower.starts_with("http://") {
        let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
        (RequestKind::Http, Target::parse_absolute(&uri))
    } else {
        (RequestKind::Connect, Target::parse_authority(url))
    };
    parsed.map(|t| (kind, t)).map_err(|e| format!("invalid-target: {e}"))
}

async fn check(path: PathBuf, role: Option<&str>, url: &str) -> anyhow::Result<ExitCode> {
    let config = Config::load(&path)?;
    let snapshot = Snapshot::from_config(&config, 1).map_err(anyhow::Error::msg)?;
    let (kind, target) = match parse_check_target(url) {
        Ok(parsed) => parsed,
        Err(e) => {
            println!("deny {url}: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    let policy = &snapshot.policy;
    let role = match role {
        Some(name) => policy.role_id(name).with_context(|| format!("role {name:?} is not defined in {}", path.display()))?,
        None => policy.default_role(),
    };
    let decision = match policy.pre_resolution(role, kind, &target) {
        PreResolution::Decided(d) => d,
        PreResolution::Resolve(name) => {
            let addrs = snapshot.resolver.resolve(name).await.with_context(|| format!("resolve-failed: {name}"))?;
            policy.decide(role, kind, &target, &addrs)
        }
    };
    let role_name = policy.role(role).name();
    match decision {
        Decision::Deny(reason) => {
            println!("deny {} {target} role={role_name} reason={reason}", kind.as_str());
            Ok(ExitCode::from(1))
        }
        Decision::Allow(permit) => {
            let addrs: Vec<String> = permit.addrs().iter().map(|a| a.to_string()).collect();
            match permit.would_deny() {
                Some(reason) => println!(
                    "allow {} {target} role={role_name} (report mode: would deny, reason={reason}) addrs={}",
                    kind.as_str(),
                    addrs.join(",")
                ),
                None => println!(
                    "allow {} {target} role={role_name} rule={} addrs={}",
                    kind.as_str(),
                    permit.rule().as_str(),
                    addrs.join(",")
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
