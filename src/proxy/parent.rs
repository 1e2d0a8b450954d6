//! A parent proxy: allowed requests of the chosen roles leave through it,
//! `CONNECT` for tunnels and absolute-form for plain HTTP. The decision is
//! still made here, on the name and on this proxy's own resolution; the
//! parent is only the next hop. It is dialed as configured, never through
//! the policy (it is not a destination), and it is told the checked
//! address, not the name, so it cannot resolve the name to somewhere else.

use std::net::SocketAddr;
use std::time::Duration;

use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::error::UpstreamError;
use crate::config::UpstreamProxyConfig;
use crate::policy::cidr::CidrTable;
use crate::policy::domain::DomainMatcher;
use crate::policy::Permit;
use crate::target::{Host, Target};

/// Longest response head accepted from the parent for a `CONNECT`.
const MAX_CONNECT_HEAD: usize = 8 * 1024;

/// A compiled `upstream_proxy`.
pub struct Parent {
    /// `host:port` as configured.
    authority: String,
    /// `Proxy-Authorization` sent to the parent, if credentials are set.
    auth: Option<HeaderValue>,
    /// Roles that use the parent; empty means every role.
    roles: Vec<String>,
    except_domains: DomainMatcher<()>,
    except_cidrs: CidrTable<()>,
}

impl Parent {
    /// Compiles the config; credentials are read from the environment now.
    pub fn compile(config: &UpstreamProxyConfig) -> Result<Parent, String> {
        // `config.url` was validated by `ParentUrl::parse` while parsing.
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
            authority: config.url.authority.clone(),
            auth,
            roles: config.roles.clone(),
            except_domains: DomainMatcher::new(config.except.domains.iter().map(|d| (d.0.clone(), ()))),
            except_cidrs: CidrTable::new(config.except.cidrs.iter().map(|c| (c.0, ()))),
        })
    }

    /// True when a request of `role` to `target` at the permitted `addrs`
    /// leaves through the parent.
    pub fn applies(&self, role: &str, target: &Target, addrs: &[SocketAddr]) -> bool {
        let role_uses = self.roles.is_empty() || self.roles.iter().any(|r| r == role);
        let name_excepted = matches!(&target.host, Host::Name(n) if self.except_domains.lookup(n.as_str()).is_some());
        let addr_excepted = addrs.iter().any(|a| self.except_cidrs.lookup(a.ip()).is_some());
        role_uses && !name_excepted && !addr_excepted
    }

    /// The credentials for the parent, if any.
    pub fn auth(&self) -> Option<&HeaderValue> {
        self.auth.as_ref()
    }

    /// Opens a TCP connection to the parent within `timeout`.
    pub async fn dial(&self, timeout: Duration) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let connected = tokio::time::timeout(timeout, async {
            let mut last = None;
            for addr in tokio::net::lookup_host(&self.authority).await? {
                match TcpStream::connect(addr).await {
                    Ok(stream) => return Ok((stream, addr)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| std::io::Error::other("the parent's name has no address")))
        })
        .await;
        match connected {
            Ok(Ok((stream, addr))) => {
                let _ = stream.set_nodelay(true);
                Ok((stream, addr))
            }
            Ok(Err(e)) => Err(UpstreamError::ParentUnreachable(e)),
            Err(_) => Err(UpstreamError::ConnectTimeout),
        }
    }

    /// A tunnel through the parent to the first permitted address: dials
    /// the parent, asks it to `CONNECT`, and returns the stream once it
    /// answered 2xx (with nothing of the tunnel read yet).
    pub async fn tunnel(&self, permit: &Permit, timeout: Duration) -> Result<(TcpStream, SocketAddr), UpstreamError> {
        let (mut stream, parent) = self.dial(timeout).await?;
        let target = permit.addrs()[0];
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(auth) = &self.auth {
            head.push_str("Proxy-Authorization: ");
            head.push_str(auth.to_str().unwrap_or_default());
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let answered = tokio::time::timeout(timeout, async {
            stream.write_all(head.as_bytes()).await?;
            read_head(&mut stream).await
        })
        .await;
        let status = match answered {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => return Err(UpstreamError::ParentError(e.to_string())),
            Err(_) => return Err(UpstreamError::ParentError(format!("no answer to CONNECT from {parent} in time"))),
        };
        match status {
            200..=299 => Ok((stream, target)),
            407 => Err(UpstreamError::ParentAuthFailed),
            other => Err(UpstreamError::ParentRefused(other)),
        }
    }
}

/// Reads a response head byte by byte (so no byte of the tunnel behind it
/// is consumed) and returns its status code.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<u16> {
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

/// The parent's `host:port`, from an `http://host:port` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentUrl {
    pub authority: String,
}

impl ParentUrl {
    /// Parses `http://host[:port]` (port 3128 when omitted).
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = match text.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => return Err(format!("upstream_proxy.url {text:?}: TLS to the parent is not supported yet; use http://")),
            _ => return Err(format!("upstream_proxy.url {text:?}: expected http://host:port")),
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
            return Err(format!("upstream_proxy.url {text:?}: expected http://host:port with no path or credentials"));
        }
        let target = Target::parse_authority_with_default(authority, Some(3128)).map_err(|e| format!("upstream_proxy.url {text:?}: {e}"))?;
        Ok(ParentUrl { authority: target.to_string() })
    }
}
