//! [`ApiUrl`]: where a node's admin API is, as operators write it.

use std::fmt;
use std::net::SocketAddr;

/// An admin API URL that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url:?} {problem}")]
pub struct UrlError {
    /// The URL as given.
    pub url: String,
    /// What is wrong with it (`is not an http:// or https:// URL`).
    pub problem: &'static str,
}

/// An admin API URL: `http[s]://HOST[:PORT][/PREFIX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiUrl {
    /// `https://`.
    tls: bool,
    host: String,
    port: u16,
    prefix: String,
}

impl ApiUrl {
    /// Parses an admin URL; a missing scheme means `http://`, a missing
    /// port 80 (443 with `https://`).
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let bad = |problem| UrlError {
            url: url.to_owned(),
            problem,
        };
        let (tls, rest) = match url.split_once("://") {
            Some(("http", rest)) => (false, rest),
            Some(("https", rest)) => (true, rest),
            Some(_) => return Err(bad("is not an http:// or https:// URL")),
            None => (false, url),
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("has an unclosed [ in its host"))?;
            match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None if after.is_empty() => (host, None),
                None => return Err(bad("has junk after its IPv6 host")),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let port = match port {
            None if tls => 443,
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("has a bad port"))?,
        };
        Ok(Self {
            tls,
            host: host.to_owned(),
            port,
            prefix: prefix.to_owned(),
        })
    }

    /// `http://addr`.
    pub fn http(addr: SocketAddr) -> Self {
        Self {
            tls: false,
            host: addr.ip().to_string(),
            port: addr.port(),
            prefix: String::new(),
        }
    }

    /// Whether the URL is `https://`.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// The host: a name or an IP address (IPv6 without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path before every route (`/edge`), or empty.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `host:port`, with an IPv6 host in brackets: the `Host` header.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl std::str::FromStr for ApiUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// `http[s]://host:port[/prefix]`, as shown in messages.
impl fmt::Display for ApiUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority(), self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = ApiUrl::parse("http://127.0.0.1:7070").unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.1:7070");
        assert_eq!(u.authority(), "127.0.0.1:7070");
        let u = ApiUrl::parse("127.0.0.11:7070/").unwrap();
        assert_eq!(u.to_string(), "http://127.0.0.11:7070");
        let u = ApiUrl::parse("http://[::1]:7070/edge/").unwrap();
        assert_eq!(u.to_string(), "http://[::1]:7070/edge");
        assert_eq!(u.host(), "::1");
        assert_eq!(u.prefix(), "/edge");
        assert_eq!(ApiUrl::parse("http://lb.example").unwrap().port(), 80);
        let u = ApiUrl::parse("https://127.0.0.1").unwrap();
        assert!(u.is_tls());
        assert_eq!(u.to_string(), "https://127.0.0.1:443");
        let addr: SocketAddr = "[::1]:7070".parse().unwrap();
        assert_eq!(
            ApiUrl::http(addr),
            ApiUrl::parse("http://[::1]:7070").unwrap()
        );
        for bad in [
            "ftp://x",
            "http://:7070",
            "http://x:0",
            "http://x:port",
            "http://[::1",
            "http://[::1]x",
        ] {
            let e = ApiUrl::parse(bad).unwrap_err();
            assert_eq!(e.url, bad);
            assert!(e.to_string().contains(bad), "{e}");
        }
    }
}
