//! What can go wrong, as one line for the operator and an exit code for
//! scripts.
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | ok |
//! | 1 | the admin API answered with an error (4xx/5xx) |
//! | 2 | usage error: bad flags (clap), a bad port spec, a missing token |
//! | 3 | cannot connect to the admin API, or its TLS certificate is refused |
//! | 4 | local error: files, certificates, starting local nodes |

use std::fmt;

/// Exit code: the API answered with an error.
pub const EXIT_API: u8 = 1;
/// Exit code: bad usage (clap exits with the same code).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the admin API could not be reached (or not over TLS).
pub const EXIT_CONNECT: u8 = 3;
/// Exit code: a local error (files, certificates, processes).
pub const EXIT_LOCAL: u8 = 4;

/// The exit codes as `edgectl --help` lists them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok
  1  the admin API answered with an error (4xx/5xx)
  2  usage error (bad flags, bad port spec, no token)
  3  cannot connect to the admin API (also: its TLS certificate is refused)
  4  local error (files, certificates, local cluster)";

/// A failed command. `Display` is the one line printed after `edgectl: `.
#[derive(Debug)]
pub enum Failure {
    /// The API answered `status` with the error envelope's `message`.
    Api {
        /// HTTP status.
        status: u16,
        /// The envelope's message (or a summary of a body that is not one).
        message: String,
    },
    /// Bad usage that clap could not see.
    Usage(String),
    /// The admin API at `url` could not be reached.
    Connect {
        /// The admin URL tried.
        url: String,
        /// Why, in a few words (`connection refused`).
        reason: String,
    },
    /// TLS with the admin API at `url` failed: its certificate was refused
    /// (`--cacert`) or it does not speak TLS.
    Tls {
        /// The admin URL tried.
        url: String,
        /// Why, in a few words.
        reason: String,
    },
    /// Files, certificates, processes.
    Local(String),
    /// Several failures of one command (`service rm a b`), one line each;
    /// the exit code is the first one's.
    Many(Vec<Self>),
}

impl Failure {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Api { .. } => EXIT_API,
            Self::Usage(_) => EXIT_USAGE,
            Self::Connect { .. } | Self::Tls { .. } => EXIT_CONNECT,
            Self::Local(_) => EXIT_LOCAL,
            Self::Many(all) => all.first().map_or(EXIT_API, Self::exit_code),
        }
    }

    /// A local error with context.
    pub fn local(what: impl fmt::Display) -> Self {
        Self::Local(what.to_string())
    }

    /// The lines to print, one per failure, without the `edgectl: ` prefix.
    pub fn lines(&self) -> Vec<String> {
        match self {
            Self::Many(all) => all.iter().flat_map(Self::lines).collect(),
            other => vec![other.to_string()],
        }
    }

    /// A usage error.
    pub fn usage(what: impl fmt::Display) -> Self {
        Self::Usage(what.to_string())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Api { status, message } => write!(f, "{message} (HTTP {status})"),
            Self::Usage(m) | Self::Local(m) => f.write_str(m),
            Self::Connect { url, reason } => write!(
                f,
                "cannot reach the admin API at {url}: {reason} (is edgelb running? set --api or EDGELB_API)"
            ),
            Self::Tls { url, reason } => {
                write!(f, "no TLS connection to the admin API at {url}: {reason}")
            }
            Self::Many(_) => f.write_str(&self.lines().join("; ")),
        }
    }
}

impl std::error::Error for Failure {}

/// What every command returns.
pub type Outcome<T = ()> = Result<T, Failure>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_codes() {
        let api = Failure::Api {
            status: 409,
            message: "service group \"web\" has 1 instance attached".into(),
        };
        assert_eq!(
            api.to_string(),
            "service group \"web\" has 1 instance attached (HTTP 409)"
        );
        assert_eq!(api.exit_code(), 1);
        let c = Failure::Connect {
            url: "http://127.0.0.1:7070".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(
            c.to_string(),
            "cannot reach the admin API at http://127.0.0.1:7070: connection refused (is edgelb running? set --api or EDGELB_API)"
        );
        assert_eq!(c.exit_code(), 3);
        assert_eq!(Failure::usage("x").exit_code(), 2);
        assert_eq!(Failure::local("x").exit_code(), 4);
    }
}
