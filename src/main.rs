//! The `portcullis` command: run the proxy, check a URL against a policy,
//! run policy test cases, or validate a config file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use portcullis::config::Config;
use portcullis::policy::{Decision, PreResolution};
use portcullis::policytest::{self, CaseFile, PolicyUnderTest};
use portcullis::app::App;
use portcullis::proxy::Snapshot;

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
        /// `http://host[:port]/...` (forwarded), `https://host[:port]/...` or `host:port` (CONNECT),
        /// or `dns:NAME[/TYPE]`: a query to the DNS listener (type A by default).
        url: String,
        /// List every rule consulted, in order, before the decision.
        #[arg(long)]
        explain: bool,
    },
    /// Run policy test cases against a config, without DNS or a server.
    /// Exit code 0: all pass, 1: any fails, 2: bad input.
    Test {
        #[arg(long, short)]
        config: PathBuf,
        /// Write the results as JUnit XML to this file.
        #[arg(long)]
        junit: Option<PathBuf>,
        /// Case files (YAML: `resolve:` and `cases:`).
        #[arg(required = true)]
        cases: Vec<PathBuf>,
    },
    /// Propose allow-list additions from a decision log (would_deny and
    /// deny lines). Exit code 0, or 2 for bad input.
    Suggest {
        #[arg(long, short)]
        config: PathBuf,
        /// The decision log (JSON lines, as `portcullis run` writes them).
        #[arg(long)]
        log: PathBuf,
        /// Only this role's lines.
        #[arg(long)]
        role: Option<String>,
    },
    /// Convert another proxy's egress policy into Portcullis roles (YAML on
    /// stdout; what does not translate follows as comments). Exit code 0, or 2.
    Import {
        #[command(subcommand)]
        from: ImportFrom,
    },
    /// Validate a config file. Exit code 0: valid, 2: refused.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ImportFrom {
    /// A Smokescreen egress ACL (v1: services, global allow and deny lists, default).
    Smokescreen {
        /// The ACL file.
        acl: PathBuf,
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
        Command::Check { config, role, url, explain } => runtime.block_on(check(config, role.as_deref(), &url, explain)),
        Command::Test { config, junit, cases } => test(config, junit, &cases),
        Command::Suggest { config, log, role } => suggest(config, log, role.as_deref()),
        Command::Import { from: ImportFrom::Smokescreen { acl } } => import_smokescreen(acl),
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
        dns = %app.dns_addr().transpose()?.map_or("off".to_string(), |a| a.to_string()),
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

async fn check(path: PathBuf, role: Option<&str>, url: &str, explain: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(&path)?;
    let snapshot = Snapshot::from_config(&config, 1).map_err(anyhow::Error::msg)?;
    if let Some(query) = url.strip_prefix("dns:") {
        return check_dns(&snapshot, &path, role, query).await;
    }
    let (kind, target) = match policytest::parse_request(url) {
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
    let (decision, addrs) = match policy.pre_resolution(role, kind, &target) {
        PreResolution::Decided(d) => (d, literal_addr(&target.host).into_iter().collect()),
        // As the proxy does: no local DNS for a name the parent resolves.
        PreResolution::Resolve(name) if snapshot.parent_resolves(role, kind, &target, name) => {
            (policy.decide_name_only(role, kind, &target), Vec::new())
        }
        PreResolution::Resolve(name) => {
            let addrs = snapshot.resolver.resolve(name).await.with_context(|| format!("resolve-failed: {name}"))?;
            (policy.decide(role, kind, &target, &addrs), addrs)
        }
    };
    if explain {
        // Decided before resolution: the walk over the same rules, with the
        // addresses there were (none for a name denied outright).
        let (_, steps) = policy.explain(role, kind, &target, &addrs);
        for (i, step) in steps.iter().enumerate() {
            println!("{:>3}. {}", i + 1, policy.catalog().describe_step(*step));
        }
    }
    let role_name = policy.role(role).name();
    let rule = policy.describe(decision.rule());
    match decision {
        Decision::Deny { reason, .. } => {
            println!("deny {} {target} role={role_name} reason={reason} rule={rule}", kind.as_str());
            Ok(ExitCode::from(1))
        }
        Decision::Allow(permit) => {
            let mut addrs: Vec<String> = permit.addrs().iter().map(|a| a.to_string()).collect();
            if permit.name_only() {
                addrs.push("resolved-by-parent".to_string());
            }
            match permit.would_deny() {
                Some(reason) => println!(
                    "allow {} {target} role={role_name} (report mode: would deny, reason={reason}) rule={rule} addrs={}",
                    kind.as_str(),
                    addrs.join(",")
                ),
                None => println!(
                    "allow {} {target} role={role_name} by={} rule={rule} addrs={}",
                    kind.as_str(),
                    permit.rule().as_str(),
                    addrs.join(",")
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Decides `NAME[/TYPE]` as the DNS listener would for `role`: refused
/// questions are never asked; admitted ones are asked upstream and their
/// answer judged. Exit code 0: answered, 1: refused or failed.
async fn check_dns(snapshot: &Snapshot, path: &std::path::Path, role: Option<&str>, query: &str) -> anyhow::Result<ExitCode> {
    use portcullis::dns_listen::decide::Question;
    let policy = &snapshot.policy;
    let role = match role {
        Some(name) => policy.role_id(name).with_context(|| format!("role {name:?} is not defined in {}", path.display()))?,
        None => policy.default_role(),
    };
    let role_name = policy.role(role).name();
    let (name, qtype) = query.split_once('/').unwrap_or((query, "A"));
    let qtype: hickory_proto::rr::RecordType = qtype.to_ascii_uppercase().parse().map_err(|_| anyhow::anyhow!("{qtype:?} is not a DNS record type"))?;
    let name = match portcullis::target::DomainName::parse(name) {
        Ok(name) => name,
        Err(e) => {
            println!("deny dns {query} role={role_name} reason=invalid-target ({e})");
            return Ok(ExitCode::from(1));
        }
    };
    let question = Question { name, qtype };
    let shown = format!("{}/{}", question.name, question.qtype);
    match portcullis::dns_listen::ask(policy, &snapshot.dns, role, &question, None).await {
        Ok((by, judged)) => {
            let answers: Vec<String> = judged.answers.iter().map(|r| r.data().to_string()).collect();
            let decision = if by == portcullis::dns_listen::decide::AdmittedBy::ReportOnly { "allow (report mode: would deny)" } else { "allow" };
            println!("{decision} dns {shown} role={role_name} by={} rcode={} answers={}", by.as_str(), portcullis::dns_listen::rcode_name(judged.rcode), answers.join(","));
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => {
            println!("deny dns {shown} role={role_name} reason={}", reason.as_str());
            Ok(ExitCode::from(1))
        }
    }
}

/// The config's policy and identity rules, or `None` once the refusal
/// (file, line, reason) is printed.
fn policy_under_test(config: &std::path::Path) -> Option<PolicyUnderTest> {
    let loaded = Config::load(config).map_err(|e| e.to_string()).and_then(|c| PolicyUnderTest::new(&c));
    loaded.map_err(|e| eprintln!("{e}")).ok()
}

/// Runs case files; bad input (config or cases) is exit code 2.
fn test(config: PathBuf, junit: Option<PathBuf>, case_paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let Some(put) = policy_under_test(&config) else { return Ok(ExitCode::from(2)) };
    let mut files = Vec::with_capacity(case_paths.len());
    for path in case_paths {
        match CaseFile::load(path) {
            Ok(file) => files.push(file),
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    let results = put.run_all(&files);
    for r in &results {
        match &r.failure {
            None => println!("PASS {}: {}", r.case, r.got),
            Some(failure) => println!("FAIL {}: {failure}", r.case),
        }
    }
    let failed = results.iter().filter(|r| r.failure.is_some()).count();
    println!("{} cases: {} passed, {failed} failed", results.len(), results.len() - failed);
    if let Some(path) = junit {
        std::fs::write(&path, policytest::junit_xml(&results)).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn suggest(config: PathBuf, log: PathBuf, role: Option<&str>) -> anyhow::Result<ExitCode> {
    let Some(put) = policy_under_test(&config) else { return Ok(ExitCode::from(2)) };
    let text = std::fs::read_to_string(&log).with_context(|| format!("{}: cannot read", log.display()))?;
    match portcullis::suggest::suggest(put.policy(), &text, &log.display().to_string(), role) {
        Ok(suggestion) => {
            print!("{suggestion}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::from(2))
        }
    }
}

fn import_smokescreen(path: PathBuf) -> anyhow::Result<ExitCode> {
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", path.display());
            return Ok(ExitCode::from(2));
        }
    };
    match portcullis::import::smokescreen(&text, &path.display().to_string()) {
        Ok(imported) => {
            print!("{imported}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{e}");
            Ok(ExitCode::from(2))
        }
    }
}

/// The address of an IP-literal target.
fn literal_addr(host: &portcullis::target::Host) -> Option<std::net::IpAddr> {
    match host {
        portcullis::target::Host::Ip(ip) => Some(*ip),
        portcullis::target::Host::Name(_) => None,
    }
}
