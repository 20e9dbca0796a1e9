//! The data dir is private (issue 12, finding 10): keys, token and Raft
//! state are readable by the node's user only.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use integration::process::Process;
use integration::{Subnet, TempDir, patient};

fn collect(dir: &Path, out: &mut Vec<(String, u32)>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        out.push((
            entry.path().display().to_string(),
            meta.permissions().mode() & 0o777,
        ));
        if meta.is_dir() {
            collect(&entry.path(), out)?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_files_are_readable_by_the_node_user_only() -> anyhow::Result<()> {
    let cwd = TempDir::new("private");
    let ip = Subnet::allocate().node_ip();
    let admin = format!("{ip}:0");
    let cluster = format!("{ip}:0");
    let listen = ip.to_string();
    let args = [
        "--admin-addr",
        &admin,
        "--cluster-addr",
        &cluster,
        "--listen-ip",
        &listen,
    ];
    let mut p = Process::spawn(&args, cwd.path()).await?;
    p.wait_stdout("admin API on", patient(Duration::from_secs(30)))
        .await?;
    p.terminate().await?;
    assert_eq!(p.wait(Duration::from_secs(30)).await?.code(), Some(0));

    let data = cwd.path().join("edgelb-data");
    let mut files = Vec::new();
    collect(&data, &mut files)?;
    assert!(files.len() >= 3, "the data dir holds {files:?}");
    let open: Vec<_> = files.iter().filter(|(_, mode)| mode & 0o077 != 0).collect();
    assert!(
        open.is_empty(),
        "readable by others than the node's user: {open:?}"
    );
    Ok(())
}
