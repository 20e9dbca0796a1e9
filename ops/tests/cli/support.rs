//! Test support: an in-process node, running `edgectl`, and the real
//! `edgelb` binary. Loopback addresses ([`Subnet`]), temp dirs
//! ([`TempDir`]), deadlines ([`patient`]) and polling ([`poll`]) are the
//! integration harness's, so these tests and the integration tests never
//! take the same addresses.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use edgelb::app::NodeHandle;
use edgelb::config::Config;
use edgelb::dataplane::Settings;
pub(crate) use integration::{Subnet, TempDir, patient, poll};

/// The token of every test node.
pub(crate) const TOKEN: &str = "edgectl-test-token-0123456789";

/// An in-process node on its own loopback address.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) ip: IpAddr,
    /// `http://IP:PORT` of the admin API.
    pub(crate) url: String,
    handle: Option<NodeHandle>,
    _dir: TempDir,
}

impl Node {
    /// A one-node cluster with the test token on `net`'s `.1`.
    pub(crate) async fn start(net: &Subnet) -> anyhow::Result<Self> {
        Self::start_with(net.node_ip(), |_| {}).await
    }

    /// A node on `ip`; `tweak` adjusts the configuration (ports default to
    /// 0, the token to [`TOKEN`]).
    pub(crate) async fn start_with(
        ip: IpAddr,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let dir = TempDir::new("edgectl-node");
        let mut config = Config::embedded_default();
        config.data_dir = dir.path().join("data");
        config.admin_addr = SocketAddr::new(ip, 0);
        config.cluster_addr = SocketAddr::new(ip, 0);
        config.listen_ip = ip;
        config.token = Some(TOKEN.to_owned());
        config.settings = Settings {
            drain_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            ..Settings::default()
        };
        tweak(&mut config);
        let mut handle = edgelb::app::start(config)
            .await
            .context("starting the node")?;
        tokio::time::timeout(patient(Duration::from_secs(20)), handle.ready())
            .await
            .context("the node did not become ready")?;
        Ok(Self {
            ip,
            url: format!("http://{}", handle.admin_addr),
            handle: Some(handle),
            _dir: dir,
        })
    }

    /// The node's data directory.
    pub(crate) fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// `https://IP:PORT` of the admin API (when it serves TLS).
    pub(crate) fn https_url(&self) -> String {
        self.url.replacen("http://", "https://", 1)
    }

    /// Graceful shutdown.
    /// Starts a node that must refuse to start, with its admin address
    /// held by `taken` (so that a check made only after the bind fails on
    /// the bind instead): the error, with its context, which must contain
    /// each of `says`.
    pub(crate) async fn refused(
        ip: IpAddr,
        taken: &std::net::TcpListener,
        tweak: impl FnOnce(&mut Config),
        says: &[&str],
    ) {
        let admin = taken.local_addr().expect("bound");
        let started = Self::start_with(ip, |c| {
            tweak(c);
            c.admin_addr = admin;
        })
        .await;
        let refused = match started {
            Ok(node) => {
                node.stop().await;
                panic!("the node started");
            }
            Err(e) => format!("{e:#}"),
        };
        for s in says {
            assert!(refused.contains(s), "{s:?} not in: {refused}");
        }
    }

    pub(crate) async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            let _ = tokio::time::timeout(patient(Duration::from_secs(30)), h.shutdown()).await;
        }
    }
}

/// What one `edgectl` run produced.
#[derive(Debug)]
pub(crate) struct Run {
    /// The exit code (-1 when killed by a signal).
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Run {
    /// Fails unless the run exited 0.
    pub(crate) fn ok(self) -> anyhow::Result<Self> {
        if self.code != 0 {
            bail!(
                "edgectl exited {}\nstdout:\n{}\nstderr:\n{}",
                self.code,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }

    /// Asserts a failure with `code` and exactly one stderr line, which
    /// starts with `edgectl: ` and contains `needle`; returns the line.
    pub(crate) fn fails(&self, code: i32, needle: &str) -> String {
        assert_eq!(self.code, code, "exit code; {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr; {self:?}");
        let line = lines[0];
        assert!(line.starts_with("edgectl: "), "{line}");
        assert!(line.contains(needle), "{line:?} lacks {needle:?}");
        line.to_owned()
    }
}

/// The `edgectl` binary under test.
pub(crate) fn edgectl_bin() -> &'static str {
    env!("CARGO_BIN_EXE_edgectl")
}

/// Runs `edgectl args…` in an empty directory, with no `EDGELB_*` or
/// `EDGECTL_*` variable but those in `env`.
pub(crate) async fn edgectl_env(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Run> {
    let cwd = TempDir::new("edgectl-cwd");
    edgectl_in(args, env, cwd.path()).await
}

/// [`edgectl_env`] with no variables.
pub(crate) async fn edgectl(args: &[&str]) -> anyhow::Result<Run> {
    edgectl_env(args, &[]).await
}

/// [`edgectl_env`] in `cwd`.
pub(crate) async fn edgectl_in(
    args: &[&str],
    env: &[(&str, &str)],
    cwd: &Path,
) -> anyhow::Result<Run> {
    let mut cmd = tokio::process::Command::new(edgectl_bin());
    clean_env(&mut cmd);
    cmd.args(args)
        .envs(env.iter().copied())
        .current_dir(cwd)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(patient(Duration::from_secs(60)), cmd.output())
        .await
        .with_context(|| format!("edgectl {args:?} did not finish"))??;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Removes every `EDGELB_*` and `EDGECTL_*` variable from `cmd`'s
/// environment.
pub(crate) fn clean_env(cmd: &mut tokio::process::Command) {
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|k| k.starts_with("EDGELB_") || k.starts_with("EDGECTL_"))
        {
            cmd.env_remove(key);
        }
    }
}

/// `GET base+path` without a token → (status, body).
pub(crate) async fn http_get(base: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let url = ops::client::ApiUrl::parse(base).map_err(|e| anyhow::anyhow!("{e}"))?;
    let answer = ops::client::Client::new(url, None)
        .request(http::Method::GET, path, None)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((
        answer.status.as_u16(),
        String::from_utf8_lossy(&answer.body).into_owned(),
    ))
}

/// An up-to-date `edgelb` binary of the test's profile (built once per
/// test process; the integration harness's helper).
pub(crate) fn edgelb_bin() -> anyhow::Result<PathBuf> {
    integration::process::edgelb_bin()
}
