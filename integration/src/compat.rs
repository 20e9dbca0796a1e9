//! The `edgelb` binary of an earlier release, built from the repository's
//! own history, for the upgrade tests (`tests/upgrade`).
//!
//! ```text
//!   git archive <commit> | tar -x   →  <target>/compat/src-<short>/   (once)
//!   bin renamed edgelb-<short>, own packages versioned 0.0.0-compat.<short>, then
//!   cargo build -p edgelb --bin edgelb-<short> --target-dir <target>  →  <target>/<profile>/edgelb-<short>
//! ```
//!
//! The old source is built into the test's own target dir, so the
//! dependencies it shares with the current tree (same versions, same
//! features) are compiled once; only its own crates are new. Its own
//! packages get another version and its binary another name, so that none
//! of its artifacts replaces a current one (Cargo would otherwise take the
//! old `edgelb` for the current one: same name, version and relative path). A file
//! lock (`<target>/compat/lock`) makes parallel test processes wait for one
//! build instead of racing; a built binary is reused as is (the commit never
//! changes).
//!
//! A checkout without that commit (a shallow clone, a source tarball) cannot
//! build it: [`edgelb_at`] then returns `None` after printing why, and the
//! tests skip — unless `EDGELB_REQUIRE_OLD_BINARY=1` (set by `.ci/run`)
//! turns that into a failure.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context, bail, ensure};

use crate::process::Layout;

/// The last commit whose data dir and cluster formats are "format 1": the
/// state machine as one JSON record in redb. Data dirs written by it must
/// start on every later binary, and a cluster of it must upgrade one node
/// at a time.
pub const FORMAT1_COMMIT: &str = "7495552b41558c0400347a78dc374bb23f5d2e15";

/// Serialises the builds of one test process (the file lock serialises
/// processes).
static BUILDING: Mutex<()> = Mutex::new(());

/// The `edgelb` binary built from `commit` (a full hash), building it on
/// first use; `None` (with a message on stderr) when this checkout's history
/// lacks the commit and `EDGELB_REQUIRE_OLD_BINARY` is not `1`.
pub fn edgelb_at(commit: &str) -> anyhow::Result<Option<PathBuf>> {
    ensure!(
        commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
        "{commit:?} is not a full commit hash"
    );
    let layout = Layout::of_current_exe().map_err(anyhow::Error::msg)?;
    let short = &commit[..7];
    let bin_name = format!("edgelb-{short}");
    let bin = layout
        .profile_dir
        .join(format!("{bin_name}{}", std::env::consts::EXE_SUFFIX));
    if bin.is_file() {
        return Ok(Some(bin));
    }
    if let Err(why) = has_commit(&layout.workspace, commit) {
        let msg = format!(
            "the upgrade tests need edgelb as of commit {commit}, which this checkout cannot \
             provide ({why}); use a full clone (git fetch --unshallow)"
        );
        if std::env::var("EDGELB_REQUIRE_OLD_BINARY").is_ok_and(|v| v == "1") {
            bail!("{msg}");
        }
        eprintln!("\n*** SKIPPED: {msg} ***\n");
        return Ok(None);
    }

    let _one = BUILDING.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = layout.target_dir.join("compat");
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let lock = File::create(dir.join("lock")).context("compat build lock")?;
    lock.lock().context("taking the compat build lock")?;
    // Another process may have built it while this one waited.
    if bin.is_file() {
        return Ok(Some(bin));
    }
    let src = dir.join(format!("src-{short}"));
    extract(&layout.workspace, commit, &src, &bin_name)?;
    let started = Instant::now();
    let out = layout
        .cargo_build(&src, &["--locked", "-p", "edgelb", "--bin", &bin_name])
        .stdin(Stdio::null())
        .output()
        .context("running cargo build for the old binary")?;
    ensure!(
        out.status.success(),
        "cargo build of edgelb at {commit} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(bin.is_file(), "{} missing after cargo build", bin.display());
    eprintln!(
        "built edgelb at {short} in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        bin.display()
    );
    Ok(Some(bin))
}

/// Whether `commit` is in the history of the checkout at `workspace`.
fn has_commit(workspace: &Path, commit: &str) -> Result<(), String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(workspace)
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running git: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "git cat-file: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `commit`'s tree in `src` (replaced if a previous extraction did not
/// finish), with its `edgelb` binary renamed `bin_name`.
fn extract(workspace: &Path, commit: &str, src: &Path, bin_name: &str) -> anyhow::Result<()> {
    let done = src.join(".extracted");
    if done.is_file() {
        return Ok(());
    }
    if src.exists() {
        std::fs::remove_dir_all(src).with_context(|| src.display().to_string())?;
    }
    std::fs::create_dir_all(src)?;
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(workspace)
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .context("running git archive")?;
    let tar_in = archive.stdout.take().context("git archive stdout")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(src)
        .stdin(tar_in)
        .status()
        .context("running tar")?;
    let archived = archive.wait().context("git archive")?;
    ensure!(
        archived.success() && tar.success(),
        "git archive {commit} | tar -x failed ({archived}, {tar})"
    );
    rename_bin(&src.join("node/Cargo.toml"), bin_name)?;
    set_members_version(src, &format!("0.0.0-compat.{}", &commit[..7]))?;
    std::fs::write(done, commit)?;
    Ok(())
}

/// Renames the `edgelb` binary of the manifest at `manifest` to `bin_name`,
/// so that it never replaces the current `edgelb` in the target dir.
fn rename_bin(manifest: &Path, bin_name: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(manifest).with_context(|| manifest.display().to_string())?;
    let bin_section = "[[bin]]\nname = \"edgelb\"\n";
    ensure!(
        text.contains(bin_section),
        "{} has no [[bin]] named edgelb",
        manifest.display()
    );
    let renamed = text.replacen(bin_section, &format!("[[bin]]\nname = \"{bin_name}\"\n"), 1);
    std::fs::write(manifest, renamed)?;
    Ok(())
}

/// Gives the old workspace's own packages version `version`, in its
/// `Cargo.toml` and `Cargo.lock` alike (so `--locked` still holds).
///
/// Cargo tells artifacts apart by package name, version and source, and a
/// path source counts relative to its workspace: the old `edgelb`,
/// `raft-store` and `gossip` would otherwise share their artifacts with the
/// current ones in the same target dir and overwrite them. Registry
/// packages keep their versions and so are built once for both.
fn set_members_version(src: &Path, version: &str) -> anyhow::Result<()> {
    let manifest = src.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)?;
    let header = "[workspace.package]\n";
    let at = text
        .find(header)
        .context("Cargo.toml has no [workspace.package]")?
        + header.len();
    let line_end = text[at..]
        .find('\n')
        .context("[workspace.package] is empty")?
        + at;
    let line = &text[at..line_end];
    ensure!(
        line.starts_with("version = \""),
        "the first key of [workspace.package] is not the version: {line}"
    );
    let old_line = line.to_owned();
    let new_line = format!("version = \"{version}\"");
    std::fs::write(
        &manifest,
        format!("{}{new_line}{}", &text[..at], &text[line_end..]),
    )?;

    // Cargo.lock: the packages without a `source` are the workspace's.
    let lock = src.join("Cargo.lock");
    let text = std::fs::read_to_string(&lock)?;
    let mut changed = 0;
    let blocks: Vec<String> = text
        .split("\n\n")
        .map(|block| {
            if block.starts_with("[[package]]")
                && !block.contains("\nsource = ")
                && block.contains(&old_line)
            {
                changed += 1;
                block.replacen(&old_line, &new_line, 1)
            } else {
                block.to_owned()
            }
        })
        .collect();
    ensure!(
        changed > 0,
        "Cargo.lock lists no workspace package at {old_line}"
    );
    std::fs::write(&lock, blocks.join("\n\n"))?;
    Ok(())
}
