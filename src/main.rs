//! The `portcullis` command: run the proxy, check a URL against a policy,
//! run policy test cases, or validate a config file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use portcullis::config::Config;
use portcullis::policy::Decision;
use portcullis::policytest::{self, CaseFile, PolicyUnderTest};
use portcullis::app::App;
use portcullis::snapshot::Snapshot;

/// `portcullis --version`: the crate version and the git revision it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("PORTCULLIS_GIT_REV"), ")");

#[derive(Parser)]
#[command(name = "portcullis", version = VERSION, about = "An egress filtering forward proxy")]
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
    /// Why was I refused? Lists this client's recent denials, newest first,
    /// from the proxy's admin port (`GET /v1/denials`): by source address,
    /// or by credentials when given. Exit code 0, or 2 when the admin port
    /// cannot be asked.
    Why {
        /// The admin listener (default: $PORTCULLIS_ADMIN, else 127.0.0.1:9128).
        #[arg(long)]
        admin: Option<String>,
        /// `user:password` to ask as (default: the userinfo of
        /// $https_proxy, $HTTPS_PROXY, $http_proxy or $HTTP_PROXY, if any).
        #[arg(long)]
        proxy_user: Option<String>,
        /// Print the endpoint's JSON as it came.
        #[arg(long)]
        json: bool,
    },
    /// Check workflow files (Argo, Kestra) and any text for destinations the
    /// policy would deny: every URL, host:port and IP literal, in any
    /// spelling. Exit code 0: none, 1: some (each printed as file:line), 2: bad input.
    Scan {
        #[arg(long, short)]
        config: PathBuf,
        /// Decide as this role (default: the `default` role).
        #[arg(long)]
        role: Option<String>,
        /// Files or directories (read recursively).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
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
        Command::Test { config, junit, cases } => runtime.block_on(test(config, junit, &cases)),
        Command::Suggest { config, log, role } => suggest(config, log, role.as_deref()),
        Command::Import { from: ImportFrom::Smokescreen { acl } } => import_smokescreen(acl),
        Command::Validate { config } => validate(config),
        Command::Why { admin, proxy_user, json } => why(admin, proxy_user, json),
        Command::Scan { config, role, paths } => scan(config, role.as_deref(), &paths),
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
    // Listened for before the process says it is listening, so a SIGTERM
    // sent on that line drains instead of killing.
    let shutdown = shutdown_signal();
    tracing::info!(
        listen = %app.proxy_addr()?,
        admin = %app.admin_addr()?,
        transparent = %app.transparent_addr().transpose()?.map_or("off".to_string(), |a| a.to_string()),
        dns = %app.dns_addr().transpose()?.map_or("off".to_string(), |a| a.to_string()),
        config = %path.display(),
        "portcullis listening"
    );
    app.run(shutdown).await;
    tracing::info!("portcullis stopped");
    Ok(ExitCode::SUCCESS)
}

/// Listens for SIGTERM and SIGINT now; the future completes on either.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
                    _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
                }
            }
            (term, int) => {
                let e = term.err().or(int.err()).map(|e| e.to_string()).unwrap_or_default();
                tracing::warn!(error = %e, "cannot listen for SIGTERM or SIGINT; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Parses and compiles the config exactly as start-up does (certificate
/// files are read); the descriptor budget is checked at start, against the
/// limit the process then has.
fn validate(path: PathBuf) -> anyhow::Result<ExitCode> {
    match Config::load(&path).and_then(|config| Snapshot::compile(&config, 1).map(|snapshot| (config, snapshot))) {
        Ok((config, snapshot)) => {
            // The warnings name rules that never match.
            for warning in portcullis::lint::lint(&config, &snapshot.policy) {
                eprintln!("warning: {}: {warning}", path.display());
            }
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
    let snapshot = Snapshot::compile(&config, 1)?;
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
    // The proxy's own decision, on the real resolver.
    let decided = snapshot.rules().decide(role, kind, &target, None, &snapshot.resolver).await;
    let (decision, addrs) = match decided {
        Ok(decided) if decided.addrs.is_empty() => (decided.decision, literal_addr(&target.host).into_iter().collect()),
        Ok(decided) => (decided.decision, decided.addrs),
        Err(unresolved) => {
            let name = target.host.to_text();
            return Err(anyhow::Error::new(unresolved.error).context(format!("resolve-failed: {name}")));
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
async fn test(config: PathBuf, junit: Option<PathBuf>, case_paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let Some(put) = policy_under_test(&config) else { return Ok(ExitCode::from(2)) };
    let mut files = Vec::with_capacity(case_paths.len());
    for path in case_paths {
        match CaseFile::load(path).and_then(|file| put.check_decidable(&file).map(|()| file)) {
            Ok(file) => files.push(file),
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    let results = put.run_all(&files).await;
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

/// Prints each would-deny as `file:line: ...`; bad input is exit code 2.
fn scan(config: PathBuf, role: Option<&str>, paths: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let loaded = Config::load(&config).map_err(|e| e.to_string()).and_then(|c| PolicyUnderTest::new(&c).map(|put| (c, put)));
    let (loaded, put) = match loaded {
        Ok(both) => both,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let policy = put.policy();
    let role = match role {
        Some(name) => match policy.role_id(name) {
            Some(id) => id,
            None => {
                eprintln!("role {name:?} is not defined in {}", config.display());
                return Ok(ExitCode::from(2));
            }
        },
        None => policy.default_role(),
    };
    let report = match portcullis::scan::Scanner::new(policy, role, &loaded.dns.pinned).scan_paths(paths) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    for d in &report.denied {
        println!("{}:{}: {}", d.file, d.line, d.verdict);
    }
    for skipped in &report.skipped {
        eprintln!("{skipped}: binary, not scanned");
    }
    println!("{} files, {} destinations, {} would be denied", report.files, report.targets, report.denied.len());
    Ok(if report.denied.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn suggest(config: PathBuf, log: PathBuf, role: Option<&str>) -> anyhow::Result<ExitCode> {
    let Some(put) = policy_under_test(&config) else { return Ok(ExitCode::from(2)) };
    let text = match portcullis::input::read(&log, portcullis::input::DECISION_LOG) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
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
    let text = match portcullis::input::read(&path, portcullis::input::IMPORT) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{e}");
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

/// Asks the admin port for this client's denials and prints them.
fn why(admin: Option<String>, proxy_user: Option<String>, json: bool) -> anyhow::Result<ExitCode> {
    use std::io::{Read, Write};
    let admin = admin.or_else(|| std::env::var("PORTCULLIS_ADMIN").ok()).unwrap_or_else(|| "127.0.0.1:9128".to_string());
    let admin = admin.trim_start_matches("http://").trim_end_matches('/').to_string();
    let user = proxy_user.or_else(proxy_userinfo);
    let mut request = format!("GET /v1/denials HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n");
    if let Some(user) = user {
        use base64::Engine;
        let encoded = base64::engine::general_purpose::STANDARD.encode(user.as_bytes());
        request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
    }
    request.push_str("\r\n");
    let timeout = std::time::Duration::from_secs(10);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&admin)
        .with_context(|| format!("admin address {admin:?}"))?
        .next()
        .with_context(|| format!("admin address {admin:?} resolves to nothing"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("cannot reach the admin port {admin}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(request.as_bytes())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).with_context(|| format!("reading from the admin port {admin}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default();
    if !status.starts_with("HTTP/1.1 200") {
        anyhow::bail!("the admin port {admin} answered {status:?}: {}", body.trim());
    }
    if json {
        print!("{body}");
        return Ok(ExitCode::SUCCESS);
    }
    let value: serde_json::Value = serde_json::from_str(body).context("the admin port's answer is not JSON")?;
    print!("{}", render_denials(&value));
    Ok(ExitCode::SUCCESS)
}

/// The `user:password` of the first proxy variable that carries one.
fn proxy_userinfo() -> Option<String> {
    ["https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"].iter().find_map(|name| {
        let url = std::env::var(name).ok()?;
        let rest = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
        let authority = rest.split('/').next()?;
        let (userinfo, _) = authority.rsplit_once('@')?;
        Some(percent_decode(userinfo))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok()).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One block per denial: time, kind, target and reason, then the rule and
/// the fix (indented, as many lines as it has).
fn render_denials(value: &serde_json::Value) -> String {
    let field = |v: &serde_json::Value, name: &str| v.get(name).and_then(|f| f.as_str()).unwrap_or_default().to_string();
    let caller = field(value, "caller");
    let denials = value.get("denials").and_then(|d| d.as_array()).cloned().unwrap_or_default();
    if denials.is_empty() {
        return format!("no recent denials for {caller}\n");
    }
    let mut out = format!("recent denials for {caller}, newest first:\n");
    for d in &denials {
        let port = d.get("port").and_then(|p| p.as_u64()).unwrap_or_default();
        out.push_str(&format!(
            "{}  {} {}:{port}  {}  role={}\n  rule: {}\n",
            field(d, "time"),
            field(d, "kind"),
            field(d, "host"),
            field(d, "reason"),
            field(d, "role"),
            field(d, "rule")
        ));
        let fix = field(d, "fix");
        let mut lines = fix.lines();
        if let Some(first) = lines.next() {
            out.push_str(&format!("  fix:  {first}\n"));
        }
        for line in lines {
            out.push_str(&format!("        {line}\n"));
        }
    }
    out
}
