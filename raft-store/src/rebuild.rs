//! Rebuilding what the Raft log determines: the state machine and its
//! snapshot, when their files are corrupt
//! ([`StateMachineStore::open_rebuilding`]).
//!
//! The state machine is a function of the committed log, so a corrupt
//! `state-machine.redb` loses nothing as long as the log still holds every
//! entry after some state this node can read:
//!
//! ```text
//!  snapshots/<id>.json readable, up to S ≥ last_purged ─▶ rows of S, meta of S,
//!                                                          openraft re-applies (S, committed]
//!  no readable snapshot, log never purged             ─▶ empty state, the whole log re-applied
//!  no readable snapshot, log purged up to P           ─▶ refused (CannotRebuild): the entries
//!                                                          up to P exist only in snapshots elsewhere
//! ```
//!
//! openraft starts from what the store reports: `applied_state()` says S,
//! the log says it was purged up to P ≤ S, and it re-applies the committed
//! entries after S (the commit index a leader repeats covers the rest).
//! Nothing is invented: every row comes from a snapshot document this
//! node wrote or installed, or from the log. The corrupt file is moved
//! aside (`state-machine.redb.corrupt-<unix time>`), never deleted.
//!
//! A corrupt current snapshot file with an intact state machine is moved
//! aside the same way and forgotten; openraft builds a new snapshot from
//! the state machine at start when the log was purged (it holds the state
//! up to at least the old snapshot), and the next one comes on schedule.

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::Durability;

use crate::db::{self, StoreError};
use crate::rows;
use crate::snapshot::{self, SmRecord, files};
use crate::state::State;
use crate::state_machine::{FILE, StateMachineStore};
use crate::types::{LogId, SnapshotMeta};

/// What [`StateMachineStore::open_rebuilding`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    /// The corrupt file that made it rebuild, and what was wrong with it.
    pub corrupt: PathBuf,
    /// Where the corrupt files were moved to.
    pub moved_aside: Vec<PathBuf>,
    /// What the state machine starts from.
    pub from: RebuiltFrom,
}

/// Where a rebuilt state machine's state came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebuiltFrom {
    /// The snapshot document up to this log id; the log after it is
    /// re-applied.
    Snapshot(Option<LogId>),
    /// Nothing: the whole log (never purged) is re-applied.
    Empty,
    /// The state machine was intact; only its corrupt snapshot was dropped
    /// (a new one is built from the state machine).
    StateMachine,
}

impl StateMachineStore {
    /// [`StateMachineStore::open_with`], rebuilding the state machine when
    /// its file is corrupt and dropping its snapshot when that file is (see
    /// the [module](self)). `last_purged` is the log's
    /// ([`crate::LogStore::last_purged`]): the state machine must restart
    /// at or after it. An intact store opens as it is (`None`).
    pub fn open_rebuilding(
        dir: &Path,
        faults: Option<&Arc<crate::faults::Faults>>,
        last_purged: Option<LogId>,
    ) -> Result<(Self, Option<Rebuilt>), StoreError> {
        let missing = !dir.join(FILE).exists();
        if missing && last_purged.is_some() {
            // Opened as it is, it would start empty above a purged log.
            tracing::warn!(path = %dir.join(FILE).display(), "the state machine is missing: rebuilding");
            let rebuilt = rebuild_state_machine(dir, faults, last_purged)?;
            let sm = Self::open_with(dir, faults)?;
            return Ok((sm, Some(rebuilt)));
        }
        let path = match Self::open_with(dir, faults) {
            Ok(sm) => return Ok((sm, None)),
            Err(StoreError::Corrupt { path, problem }) => {
                tracing::warn!(path = %path.display(), %problem, "rebuilding");
                path
            }
            Err(e) => return Err(e),
        };
        let snapshots = dir.join("snapshots");
        let rebuilt = if path == dir.join(FILE) {
            rebuild_state_machine(dir, faults, last_purged)?
        } else if path.starts_with(&snapshots) {
            drop_snapshot(dir, faults, &path)?
        } else {
            return Err(StoreError::CannotRebuild {
                path: dir.join(FILE),
                why: format!("{} is not the state machine's", path.display()),
            });
        };
        let sm = Self::open_with(dir, faults)?;
        Ok((sm, Some(rebuilt)))
    }
}

/// `<data_dir>/<file name>.corrupt-<unix time>` for `path`, not taken yet.
fn aside(dir: &Path, path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut candidate = dir.join(format!("{name}.corrupt-{now}"));
    let mut n = 1;
    while candidate.exists() {
        candidate = dir.join(format!("{name}.corrupt-{now}-{n}"));
        n += 1;
    }
    candidate
}

fn move_aside(dir: &Path, path: &Path) -> Result<PathBuf, StoreError> {
    let to = aside(dir, path);
    fs::rename(path, &to).map_err(|source| StoreError::Io {
        what: format!("moving {} to {}", path.display(), to.display()),
        source,
    })?;
    tracing::warn!(from = %path.display(), to = %to.display(), "moved a corrupt file aside");
    Ok(to)
}

/// The snapshot documents in `snapshots` that read through, newest first,
/// and those that do not.
type Documents = (Vec<(PathBuf, SmRecord<State>)>, Vec<PathBuf>);

fn documents(snapshots: &Path) -> Result<Documents, StoreError> {
    let mut readable = Vec::new();
    let mut unreadable = Vec::new();
    let entries = match fs::read_dir(snapshots) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((readable, unreadable)),
        Err(source) => {
            return Err(StoreError::Io {
                what: format!("reading {}", snapshots.display()),
                source,
            });
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let record = File::open(&path)
            .map_err(|source| StoreError::Io {
                what: format!("opening {}", path.display()),
                source,
            })
            .and_then(|f| snapshot::decode(BufReader::new(f)));
        match record {
            Ok(r) => readable.push((path, r)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e.cause(), "snapshot does not read");
                unreadable.push(path);
            }
        }
    }
    readable.sort_by_key(|r| std::cmp::Reverse(r.1.last_applied));
    Ok((readable, unreadable))
}

fn rebuild_state_machine(
    dir: &Path,
    faults: Option<&Arc<crate::faults::Faults>>,
    last_purged: Option<LogId>,
) -> Result<Rebuilt, StoreError> {
    let path = dir.join(FILE);
    let snapshots = dir.join("snapshots");
    let (readable, unreadable) = documents(&snapshots)?;
    let newest = readable.into_iter().next();
    let reaches = |s: &Option<LogId>| match last_purged {
        None => true,
        Some(p) => s.is_some_and(|s| s.index >= p.index),
    };
    let start = match newest {
        Some((file, record)) if reaches(&record.last_applied) => Some((file, record)),
        _ if last_purged.is_none() => None,
        newest => {
            let found = match newest {
                Some((f, r)) => format!(
                    "the newest readable snapshot, {}, ends at index {}",
                    f.display(),
                    r.last_applied.map_or(0, |l| l.index)
                ),
                None if unreadable.is_empty() => {
                    format!("{} holds no snapshot", snapshots.display())
                }
                None => format!(
                    "no snapshot in {} reads ({})",
                    snapshots.display(),
                    unreadable
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            return Err(StoreError::CannotRebuild {
                path,
                why: format!(
                    "the Raft log was purged up to index {}, and {found}; the entries up to it \
                     are only in other members' snapshots",
                    last_purged.map_or(0, |p| p.index)
                ),
            });
        }
    };
    let mut moved_aside = Vec::new();
    if path.exists() {
        moved_aside.push(move_aside(dir, &path)?);
    }
    for p in &unreadable {
        moved_aside.push(move_aside(dir, p)?);
    }
    files::sync_dir(dir)?;
    let db = db::open(dir, FILE, faults)?;
    let from = match start {
        None => {
            // A fresh file: `rows::load` initialises it at open.
            RebuiltFrom::Empty
        }
        Some((file, record)) => {
            let meta = SnapshotMeta {
                last_log_id: record.last_applied,
                last_membership: record.membership.clone(),
                snapshot_id: snapshot::snapshot_id(record.last_applied),
            };
            let named = snapshots.join(files::file_name(&meta));
            if named != file {
                fs::rename(&file, &named).map_err(|source| StoreError::Io {
                    what: format!("renaming {} to {}", file.display(), named.display()),
                    source,
                })?;
                files::sync_dir(&snapshots)?;
            }
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate);
            rows::write_all(&txn, &record.state, record.last_applied, &record.membership)?;
            let written = files::Crc32::of_file(&named).map_err(|source| StoreError::Io {
                what: format!("reading {}", named.display()),
                source,
            })?;
            files::write_meta(&txn, &meta, written)?;
            txn.commit()?;
            RebuiltFrom::Snapshot(record.last_applied)
        }
    };
    drop(db);
    tracing::warn!(path = %path.display(), from = ?from, "rebuilt the state machine");
    Ok(Rebuilt {
        corrupt: path,
        moved_aside,
        from,
    })
}

fn drop_snapshot(
    dir: &Path,
    faults: Option<&Arc<crate::faults::Faults>>,
    path: &Path,
) -> Result<Rebuilt, StoreError> {
    let mut moved_aside = Vec::new();
    if path.exists() {
        moved_aside.push(move_aside(dir, path)?);
        files::sync_dir(dir)?;
    }
    let db = db::open(dir, FILE, faults)?;
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate);
    files::remove_meta(&txn)?;
    txn.commit()?;
    drop(db);
    tracing::warn!(path = %path.display(), "dropped the corrupt snapshot; a new one is built from the state machine");
    Ok(Rebuilt {
        corrupt: path.to_path_buf(),
        moved_aside,
        from: RebuiltFrom::StateMachine,
    })
}
