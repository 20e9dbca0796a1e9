//! `edgectl`, the edgelb operator CLI, as a library: the thin `main.rs`
//! parses the command line and calls [`run`].
//!
//! ```text
//!  Cli (clap) ─▶ run ─┬─ service / instance / cluster status|add-node|remove-node
//!                     │      └─▶ Client (edgelb_api's, bearer token) ─▶ admin API ─▶ output (table|list|json)
//!                     ├─ certs init|node ─▶ edgelb_client::pki ─▶ PEM files
//!                     ├─ cluster local ─▶ N edgelb processes on 127.0.0.11, .12, … until Ctrl-C
//!                     │      └─ cluster local --data-dir DIR start-node K ─▶ DIR/control.sock ─▶ node K again
//!                     └─ completions ─▶ clap_complete
//!  any failure ─▶ Failure ─▶ "edgectl: <one line>" and its exit code (error.rs)
//! ```
//!
//! Modules: [`cli`] (the flags), [`client`] (`edgelb-api`'s admin client,
//! its failures worded for operators), [`output`]
//! (formats), [`services`] (services and instances), [`cluster`]
//! (membership), [`certs`] (own PKI), [`local`] (a local cluster),
//! [`error`] (one-line failures and exit codes).

pub mod certs;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod error;
pub mod local;
pub mod output;
pub mod services;
pub mod tls;

use std::io::Write as _;
use std::path::PathBuf;

use clap::CommandFactory;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cli::{Cli, ClusterCmd, Command, Global};
use crate::client::{ApiUrl, Client};
use crate::error::{Failure, Outcome};
use crate::output::Format;

/// What commands run with: the global flags and the clock.
#[derive(Debug)]
pub struct Ctx {
    /// `--api`, `--token`, `-o`.
    pub global: Global,
    /// "Now", for relative times: `EDGECTL_NOW` (RFC 3339) when set, so
    /// that output is reproducible in tests and scripts.
    pub now: OffsetDateTime,
}

impl Ctx {
    /// A context reading the clock (or `EDGECTL_NOW`).
    pub fn new(global: Global) -> Outcome<Self> {
        let now = match std::env::var("EDGECTL_NOW") {
            Ok(v) => OffsetDateTime::parse(&v, &Rfc3339)
                .map_err(|e| Failure::usage(format!("EDGECTL_NOW {v:?} is not RFC 3339: {e}")))?,
            Err(_) => OffsetDateTime::now_utc(),
        };
        Ok(Self { global, now })
    }

    /// The output format chosen with `-o`, else `default`.
    pub fn format(&self, default: Format) -> Format {
        self.global.output.unwrap_or(default)
    }

    /// A client of `--api` with the admin token.
    pub fn client(&self) -> Outcome<Client> {
        let url = ApiUrl::parse(&self.global.api)?;
        let tls = match (&self.global.cacert, url.is_tls()) {
            (Some(ca), true) => Some(tls::client_config(ca)?),
            (None, true) => {
                return Err(Failure::usage(format!(
                    "--api {url} is https: pass the CA that signed its certificate with --cacert (the cluster CA is <data dir>/tls/ca.pem)"
                )));
            }
            (Some(_), false) => {
                return Err(Failure::usage(format!(
                    "--cacert needs an https:// --api URL, not {url}"
                )));
            }
            (None, false) => None,
        };
        let token = match &self.global.token {
            Some(t) => t.clone(),
            None => token_from_file()?,
        };
        let client = Client::new(url, Some(token));
        Ok(match (tls, &self.global.cacert) {
            (Some(config), Some(ca)) => client.with_tls(config, ca.clone()),
            _ => client,
        })
    }
}

/// The data dir's token file: `$EDGELB_DATA_DIR/token`, else
/// `./edgelb-data/token` (where `edgelb` with no arguments keeps it).
fn token_from_file() -> Outcome<String> {
    let dir = std::env::var_os("EDGELB_DATA_DIR")
        .map_or_else(|| PathBuf::from("./edgelb-data"), PathBuf::from);
    let path = dir.join("token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(t.trim().to_owned()),
        Ok(_) => Err(Failure::local(format!("{} is empty", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Failure::usage(format!(
            "no admin token: pass --token or set EDGELB_TOKEN (edgelb saves it in <data dir>/token; {} does not exist)",
            path.display()
        ))),
        Err(e) => Err(Failure::local(format!("reading {}: {e}", path.display()))),
    }
}

/// Writes `text` to stdout; a closed pipe (`edgectl … | head`) is not an
/// error.
pub fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Runs one command line.
pub async fn run(cli: Cli) -> Outcome {
    let ctx = Ctx::new(cli.global)?;
    match cli.command {
        Command::Service(cmd) => services::service(&ctx, cmd).await,
        Command::Instance(cmd) => services::instance(&ctx, cmd).await,
        Command::Cluster(ClusterCmd::Local(args)) => local::run(&ctx, args).await,
        Command::Cluster(cmd) => cluster::run(&ctx, cmd).await,
        Command::Certs(cmd) => certs::run(cmd),
        Command::Completions { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "edgectl", &mut buf);
            emit(&String::from_utf8_lossy(&buf));
            Ok(())
        }
    }
}
