//! A parent proxy: allowed requests of the chosen roles leave through it,
//! `CONNECT` for tunnels and absolute-form for plain HTTP, over TCP or TLS.
//! The decision is still made here; the parent is only the next hop. It is
//! dialed as configured, never through the policy (it is not a
//! destination). With `resolve: local` it is told the checked address, not
//! the name, so it cannot resolve the name to somewhere else; with
//! `resolve: parent` it is told the name, which was decided on alone.

use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderValue;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::proxy::error::UpstreamError;
use crate::proxy::egress::upstream::Upstream;
use crate::config::{ParentResolve, UpstreamProxyConfig};
use crate::policy::cidr::CidrTable;
use crate::policy::domain::DomainMatcher;
use crate::policy::{Permit, RequestKind};
use crate::target::{DomainName, Host, Target};
use crate::tls::ParentTls;

/// Longest response head accepted from the parent for a `CONNECT`.
const MAX_CONNECT_HEAD: usize = 8 * 1024;

/// A compiled `upstream_proxy`.
pub struct Parent {
    /// `host:port` as configured.
    authority: String,
    /// Present for an `https://` parent.
    tls: Option<ParentTls>,
    resolve: ParentResolve,
    /// `Proxy-Authorization` sent to the parent, if credentials are set.
    auth: Option<HeaderValue>,
    /// Roles that use the parent; empty means every role.
    roles: Vec<String>,
    except_domains: DomainMatcher<()>,
    except_cidrs: CidrTable<()>,
    /// `upstream.mark`, set on the socket to the parent too.
    mark: Option<u32>,
}

impl Parent {
    /// Compiles the config; credentials are read from the environment and
    /// the CA bundle from its file now.
    pub fn compile(config: &UpstreamProxyConfig) -> Result<Parent, String> {
        let tls = crate::tls::parent_tls(config).map_err(|e| e.to_string())?;
        Self::with_tls(config, tls)
    }

    /// [`Parent::compile`] with the TLS side already built (by
    /// [`crate::tls::parent_tls`]), so a caller that needed its structured
    /// error does not read the CA bundle twice.
    pub fn with_tls(config: &UpstreamProxyConfig, tls: Option<ParentTls>) -> Result<Parent, String> {
        let auth = match &config.credentials_env {
            None => None,
            Some(var) => {
                let value = std::env::var(var).map_err(|_| format!("upstream_proxy.credentials_env: variable {var} is not set"))?;
                if !value.contains(':') {
                    return Err(format!("upstream_proxy.credentials_env: {var} must hold user:password"));
                }
                use base64::Engine as _;
                let encoded = base64::engine::general_purpose::STANDARD.encode(value.as_bytes());
                let header = HeaderValue::try_from(format!("Basic {encoded}")).map_err(|e| format!("upstream_proxy: {e}"))?;
                Some(header)
            }
        };
        Ok(Parent {
            authority: config.url.target.to_string(),
            tls,
            resolve: config.resolve,
            auth,
            roles: config.roles.clone(),
            except_domains: DomainMatcher::new(config.except.domains.iter().map(|d| (d.0.clone(), ()))),
            except_cidrs: CidrTable::new(config.except.cidrs.iter().map(|c| (c.0, ()))),
            mark: None,
        })
    }

    /// The same parent, dialed with `SO_MARK` `mark`.
    pub fn with_mark(self, mark: Option<u32>) -> Parent {
        Parent { mark, ..self }
    }

    /// What decisions need of a parent (which roles and names it carries,
    /// which names it resolves), without its credentials or TLS: for
    /// `portcullis test`, which models the parent's part in a decision and
    /// never dials it.
    pub fn for_decisions(config: &UpstreamProxyConfig) -> Parent {
        Parent {
            authority: config.url.target.to_string(),
            tls: None,
            resolve: config.resolve,
            auth: None,
            roles: config.roles.clone(),
            except_domains: DomainMatcher::new(config.except.domains.iter().map(|d| (d.0.clone(), ()))),
            except_cidrs: CidrTable::new(config.except.cidrs.iter().map(|c| (c.0, ()))),
            mark: None,
        }
    }

    fn role_uses(&self, role: &str) -> bool {
        self.roles.is_empty() || self.roles.iter().any(|r| r == role)
    }

    fn name_excepted(&self, name: &DomainName) -> bool {
        self.except_domains.lookup(name.as_str()).is_some()
    }

    /// True when a request of `role` to `target`, allowed by `permit`,
    /// leaves through the parent. A name-only permit always does: nothing
    /// else could reach it.
    pub fn applies(&self, role: &str, target: &Target, permit: &Permit) -> bool {
        let name_excepted = matches!(&target.host, Host::Name(n) if self.name_excepted(n));
        let addr_excepted = permit.addrs().iter().any(|a| self.except_cidrs.lookup(a.ip()).is_some());
        permit.name_only() || (self.role_uses(role) && !name_excepted && !addr_excepted)
    }

    /// True when `name`, requested by `role` as `kind`, is left for the
    /// parent to resolve: `resolve: parent`, and the request would leave
    /// through the parent (redirected TLS and TCP connections never do;
    /// `except.cidrs` cannot except a name that is not resolved).
    pub fn resolves(&self, role: &str, kind: RequestKind, name: &DomainName) -> bool {
        let carried = matches!(kind, RequestKind::Http | RequestKind::Connect | RequestKind::TransparentHttp);
        self.resolve == ParentResolve::Parent && carried && self.role_uses(role) && !self.name_excepted(name)
    }

    /// What the parent is asked to reach: the first checked address, or
    /// the name for a name-only permit.
    pub fn destination(permit: &Permit, target: &Target) -> String {
        match permit.addrs().first() {
            Some(addr) => addr.to_string(),
            None => target.to_string(),
        }
    }

    /// The credentials for the parent, if any.
    pub fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }

    /// Opens a connection to the parent, TCP and for an `https://` parent
    /// the TLS handshake, within `timeout` in all.
    pub async fn dial(&self, timeout: Duration) -> Result<(Upstream, SocketAddr), UpstreamError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let connected = tokio::time::timeout_at(deadline, async {
            let mut last = None;
            for addr in tokio::net::lookup_host(&self.authority).await? {
                match super::dial::connect_marked(addr, self.mark).await {
                    Ok(stream) => return Ok((stream, addr)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| std::io::Error::other("the parent's name has no address")))
        })
        .await;
        let (stream, addr) = match connected {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => return Err(UpstreamError::ParentUnreachable(e)),
            Err(_) => return Err(UpstreamError::ConnectTimeout),
        };
        let _ = stream.set_nodelay(true);
        let Some(tls) = &self.tls else { return Ok((Upstream::Tcp(stream), addr)) };
        match tokio::time::timeout_at(deadline, tls.connector.connect(tls.server_name.clone(), stream)).await {
            Ok(Ok(stream)) => Ok((Upstream::Tls(Box::new(stream)), addr)),
            Ok(Err(e)) => Err(UpstreamError::ParentTlsFailed(e)),
            Err(_) => Err(UpstreamError::ParentTlsFailed(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no TLS handshake with {addr} in time"),
            ))),
        }
    }

    /// A tunnel through the parent to `target`: dials the parent, asks it
    /// to `CONNECT` to the first permitted address (or the name, for a
    /// name-only permit), and returns the stream once it answered 2xx (with
    /// nothing of the tunnel read yet) and the address to log as dialed:
    /// the checked one, or the parent's when the parent resolved the name.
    pub async fn tunnel(&self, permit: &Permit, target: &Target, timeout: Duration) -> Result<(Upstream, SocketAddr), UpstreamError> {
        let (mut stream, parent) = self.dial(timeout).await?;
        let destination = Self::destination(permit, target);
        let mut head = format!("CONNECT {destination} HTTP/1.1\r\nHost: {destination}\r\n");
        if let Some(auth) = &self.auth {
            head.push_str("Proxy-Authorization: ");
            head.push_str(auth.to_str().unwrap_or_default());
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let answered = tokio::time::timeout(timeout, async {
            stream.write_all(head.as_bytes()).await?;
            stream.flush().await?;
            read_head(&mut stream).await
        })
        .await;
        let status = match answered {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return Err(UpstreamError::ParentError(e.to_string())),
            Err(_) => return Err(UpstreamError::ParentError(format!("no answer to CONNECT from {parent} in time"))),
        };
        match status {
            200..=299 => Ok((stream, permit.addrs().first().copied().unwrap_or(parent))),
            407 => Err(UpstreamError::ParentAuthFailed),
            other => Err(UpstreamError::ParentRefused(other)),
        }
    }
}

/// Reads a response head byte by byte (so no byte of the tunnel behind it
/// is consumed) and returns its status code.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<u16> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_CONNECT_HEAD {
            return Err(std::io::Error::other("the parent's response head is too large"));
        }
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::other("the parent closed the connection"));
        }
        head.push(byte[0]);
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let status = std::str::from_utf8(line).ok().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok());
    status.ok_or_else(|| std::io::Error::other("the parent's answer is not HTTP"))
}
