//! A data dir on a 3 MiB tmpfs, filled up: writes get 507, the health
//! probes say why, traffic flows, and writes work again once space is
//! freed, without a restart. Needs root (to mount); skipped otherwise.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use http::{Method, StatusCode};
use integration::TestNode;
use integration::addr::TempDir;
use integration::client;
use integration::node::NodeOptions;
use serde_json::json;

const PORT: u16 = 8080;
const BACKEND_PORT: u16 = 9000;
/// The port of the groups the test writes (another than `PORT`, whose one
/// group takes every host name).
const OTHER_PORT: u16 = 8081;

/// A tmpfs mounted on a temp dir, unmounted on drop.
struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `3m`); `Err` says why it cannot.
    fn mount(size: &str) -> Result<Self, String> {
        let dir = TempDir::new("tmpfs");
        std::fs::create_dir_all(dir.path()).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily when still busy (a test that failed before its node
        // stopped): detached now, freed once the node's files close.
        let quiet = || std::process::Stdio::null();
        let done = Command::new("umount")
            .arg(self.dir.path())
            .stderr(quiet())
            .status()
            .is_ok_and(|s| s.success());
        if !done {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Writes `path` until the file system is full, then gives `back` bytes
/// back (still far below the floor the test sets).
fn fill(path: &Path, back: u64) -> std::io::Result<u64> {
    let mut f = std::fs::File::create(path)?;
    let chunk = vec![0u8; 16 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => return Err(e),
        }
    }
    let _ = f.sync_all();
    f.set_len(written.saturating_sub(back))?;
    Ok(written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_with_507_and_recovers_without_a_restart() -> anyhow::Result<()>
{
    let tmpfs = match Tmpfs::mount("3m") {
        Ok(t) => t,
        Err(why) => {
            eprintln!("skipped: needs root to mount a tmpfs ({why})");
            return Ok(());
        }
    };
    let data_dir: PathBuf = tmpfs.path().join("data");
    let node = TestNode::start_with(NodeOptions {
        data_dir: Some(data_dir.clone()),
        data_dir_min_free: Some("1MiB".parse().map_err(anyhow::Error::msg)?),
        ..NodeOptions::default()
    })
    .await?;
    let backends = node.http_backends(&["a"], BACKEND_PORT).await?;
    node.http_group("web", PORT, BACKEND_PORT, &backends)
        .await?;
    let serving = || async {
        let r = client::get(node.addr(PORT), "web.test", "/").await?;
        anyhow::ensure!(r.status == StatusCode::OK, "traffic: {}", r.status);
        Ok(())
    };
    serving().await?;

    let filler = tmpfs.path().join("fill");
    let path = filler.clone();
    tokio::task::spawn_blocking(move || fill(&path, 256 * 1024)).await??;

    // A write is refused up front, naming the data dir, the space and the key.
    let create = |name: &str| json!({"name": name, "services": [{"port": OTHER_PORT, "destination_port": BACKEND_PORT, "handlers": ["http"]}]});
    let r = node
        .admin(Method::POST, "/v1/services", Some(&create("refused")))
        .await?;
    assert_eq!(r.status, StatusCode::INSUFFICIENT_STORAGE, "{}", r.text());
    let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
    for part in [
        data_dir.to_string_lossy().as_ref(),
        "free",
        "data_dir_min_free",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message:?}");
    }
    assert!(!message.contains("::"), "a type path in {message:?}");

    // The probes tell the truth; traffic, reads and metrics go on.
    for probe in ["/healthz", "/readyz"] {
        let r = node.admin(Method::GET, probe, None).await?;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{probe}");
        assert!(
            r.text().contains("data_dir_min_free"),
            "{probe}: {}",
            r.text()
        );
    }
    serving().await?;
    let (status, _) = node.get("/v1/services/web").await?;
    assert_eq!(status, StatusCode::OK);
    let scrape = node.scrape().await?;
    assert_eq!(scrape.sum("edgelb_data_dir_below_min_free", &[]), 1.0);
    assert!(scrape.sum("edgelb_writes_refused_total", &[("reason", "disk_full")]) >= 1.0);

    // Space back: the next write works, without a restart (the floor is
    // checked on every write, not on a timer).
    std::fs::remove_file(&filler)?;
    let freed = Instant::now();
    let r = node
        .admin(Method::POST, "/v1/services", Some(&create("after")))
        .await?;
    assert!(
        r.status.is_success(),
        "after freeing: {} {}",
        r.status,
        r.text()
    );
    eprintln!(
        "first write after freeing the space answered after {:?}",
        freed.elapsed()
    );
    for probe in ["/healthz", "/readyz"] {
        let r = node.admin(Method::GET, probe, None).await?;
        assert_eq!(r.status, StatusCode::OK, "{probe}: {}", r.text());
    }
    serving().await?;
    node.stop().await?;
    drop(tmpfs);
    Ok(())
}
