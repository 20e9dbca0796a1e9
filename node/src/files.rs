//! The node's own small files in the data dir (the token, the TLS
//! identity, the founding marker), written so that a crash at any point
//! leaves either the old file or the new one, never a torn or empty one.
//!
//! ```text
//!  write_private(path): <path>.tmp (0600, O_TRUNC) ─write─▶ fsync ─rename─▶ <path> ─▶ fsync(dir)
//!  remove(path):        unlink <path> ─▶ fsync(dir)
//! ```

use std::fmt::Display;
use std::io::Write;
use std::path::Path;

/// An I/O error and what it was about (a file of the data dir, a
/// listener): the start-up errors' (`app`, `raft`, `bootstrap`) one way of
/// saying so.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct IoError {
    what: String,
    #[source]
    source: std::io::Error,
}

/// Makes an [`IoError`] about `what` from an `io::Error` (for `map_err`).
pub(crate) fn io_error(what: impl Display) -> impl FnOnce(std::io::Error) -> IoError {
    let what = what.to_string();
    move |source| IoError { what, source }
}

/// Writes `contents` and a newline to `path`, readable by the owner only,
/// replacing any file there atomically and durably.
pub(crate) fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = temp_path(path);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = (|| {
        let mut f = opts.open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_parent(path)
}

/// Removes `path` durably; a file that is not there is not an error.
pub(crate) fn remove(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Reads `path` as text; `None` when it is missing or empty (an empty file
/// is what a crash during a non-atomic write of an earlier version left).
pub(crate) fn read_nonempty(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) if s.trim().is_empty() => Ok(None),
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn temp_path(path: &Path) -> std::path::PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Makes durable what was renamed into or out of the directory that holds
/// `path` (its parent, not `path` itself: see [`sync_dir`]).
pub(crate) fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() => sync_dir(Path::new(".")),
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Makes durable what was renamed into or out of the directory `dir`.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_replaces_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("edgelb-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        write_private(&path, "one").unwrap();
        write_private(&path, "two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
        assert!(!temp_path(&path).exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "").unwrap();
        assert_eq!(read_nonempty(&path).unwrap(), None);
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(read_nonempty(&path).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
