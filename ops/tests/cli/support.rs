//! Test support: loopback addresses, temp dirs, an in-process node, running
//! `edgectl`, and the real `edgelb` binary.
//!
//! Each test process owns the loopback block `127.B.0.0/16` with
//! `B = 210 + pid % 40` (the integration harness uses 10..=209, `cluster
//! local`'s default 127.0.0.11), one `/24` per [`Net`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edgelb::app::NodeHandle;
use edgelb::config::Config;
use edgelb::dataplane::Settings;

/// The token of every test node.
pub(crate) const TOKEN: &str = "edgectl-test-token-0123456789";

static NEXT_NET: AtomicU8 = AtomicU8::new(1);
static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// Multiplier for every deadline, from `EDGELB_TEST_PATIENCE` (default 1).
pub(crate) fn patient(base: Duration) -> Duration {
    let p = std::env::var("EDGELB_TEST_PATIENCE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|p| p.is_finite() && *p > 0.0)
        .unwrap_or(1.0);
    base.mul_f64(p)
}

/// A `/24` of loopback addresses owned by one test.
#[derive(Debug)]
pub(crate) struct Net {
    third: u8,
}

impl Net {
    /// The next unused `/24` of this process.
    pub(crate) fn allocate() -> Self {
        Self {
            third: NEXT_NET.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// `127.B.N.host`.
    pub(crate) fn ip(&self, host: u8) -> Ipv4Addr {
        let block = 210 + u8::try_from(std::process::id() % 40).unwrap_or(0);
        Ipv4Addr::new(127, block, self.third, host)
    }
}

/// A directory removed on drop.
#[derive(Debug)]
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory named after `label`.
    pub(crate) fn new(label: &str) -> Self {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("edgectl-test-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        Self(path)
    }

    /// Its path.
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An in-process node on its own loopback address.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) ip: Ipv4Addr,
    /// `http://IP:PORT` of the admin API.
    pub(crate) url: String,
    handle: Option<NodeHandle>,
    _dir: TempDir,
}

impl Node {
    /// A one-node cluster with the test token on `net`'s `.1`.
    pub(crate) async fn start(net: &Net) -> anyhow::Result<Self> {
        Self::start_with(net.ip(1), |_| {}).await
    }

    /// A node on `ip`; `tweak` adjusts the configuration (ports default to
    /// 0, the token to [`TOKEN`]).
    pub(crate) async fn start_with(
        ip: Ipv4Addr,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let dir = TempDir::new("node");
        let ip_addr = IpAddr::V4(ip);
        let mut config = Config::embedded_default();
        config.data_dir = dir.path().join("data");
        config.admin_addr = SocketAddr::new(ip_addr, 0);
        config.cluster_addr = SocketAddr::new(ip_addr, 0);
        config.listen_ip = ip_addr;
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
    let cwd = TempDir::new("cwd");
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

/// Polls `probe` until it returns `Ok`; fails with the last reason after
/// `timeout` (scaled by `EDGELB_TEST_PATIENCE`).
pub(crate) async fn poll<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut probe: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + patient(timeout);
    loop {
        let last = match probe().await {
            Ok(t) => return Ok(t),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!("timed out waiting for {what}; last: {last:#}");
        }
        // A bounded settle between polls, never a wait for the outcome itself.
        tokio::time::sleep(Duration::from_millis(50)).await;
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
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    ))
}

/// An up-to-date `edgelb` binary of the test's profile (built once per
/// test process; the integration harness's helper).
pub(crate) fn edgelb_bin() -> anyhow::Result<PathBuf> {
    integration::process::edgelb_bin()
}
