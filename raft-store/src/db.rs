//! What the log store and the state machine share: opening a redb file,
//! running a blocking redb call off the async runtime, the JSON codec and
//! [`StoreError`].
//!
//! Every redb call goes through [`blocking`]: commits with
//! `Durability::Immediate` fsync, which can take milliseconds, and the Raft
//! core and the data plane share the runtime's two worker threads. A panic
//! inside a blocking call (which would be a bug in redb or here) becomes an
//! error like any other storage failure.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageIOError};
use redb::Database;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::types::{NodeId, StorageError};

/// Why the Raft storage could not be opened or read.
#[derive(thiserror::Error, Debug)]
pub enum StoreError {
    /// The data dir could not be created.
    #[error("cannot create {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The database file could not be opened (missing permissions, held by
    /// another process, not a redb file, ...).
    #[error("cannot open {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<redb::DatabaseError>,
    },
    /// A file outside redb (a snapshot) could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// What was done, e.g. `writing <path>`.
        what: String,
        /// The cause.
        source: io::Error,
    },
    /// A redb transaction failed.
    #[error("database: {0}")]
    Db(Box<redb::Error>),
    /// Stored bytes do not decode: the file is corrupt or was written by an
    /// incompatible version.
    #[error("{what} does not decode: {source}")]
    Decode {
        /// What was read, e.g. `log entry 17`.
        what: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// A value could not be encoded.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was written.
        what: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// Stored or received bytes are in a format newer than this release
    /// reads. Run a release that reads it; never edit the file.
    #[error(
        "{what} is in format {found}, newer than this release reads (up to {supported}); run a release that reads format {found}"
    )]
    NewerFormat {
        /// What was read, e.g. `the state machine`.
        what: String,
        /// The format found.
        found: u32,
        /// The newest format this release reads.
        supported: u32,
    },
    /// Stored values decode but contradict each other.
    #[error("inconsistent storage: {0}")]
    Inconsistent(String),
    /// The blocking task running a redb call panicked or was cancelled.
    #[error("storage task failed: {0}")]
    Task(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {
        $(impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                Self::Db(Box::new(e.into()))
            }
        })*
    };
}
from_redb!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl StoreError {
    /// As openraft's error, saying what was being done and why it failed in
    /// plain words (`appending to the Raft log: no space left on device`),
    /// never a type path: the message reaches operators and API clients.
    pub(crate) fn into_storage(
        self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
    ) -> StorageError {
        let what = operation(&subject, verb);
        let message = format!("{what}: {}", self.cause());
        tracing::error!(operation = %what, cause = %self.cause(), "storage failed");
        StorageIOError::new(subject, verb, AnyError::error(message)).into()
    }

    /// Why it failed, in plain words.
    pub fn cause(&self) -> String {
        match self {
            Self::Db(e) => match e.as_ref() {
                redb::Error::Io(io) => io_cause(io),
                redb::Error::PreviousIo => {
                    "an earlier write to the file failed; it takes no more writes until the node restarts"
                        .into()
                }
                redb::Error::Corrupted(m) => format!("the file is corrupted ({m})"),
                redb::Error::ValueTooLarge(n) => format!("a value of {n} bytes is too large"),
                other => other.to_string(),
            },
            Self::Io { what, source } => format!("{what}: {}", io_cause(source)),
            Self::CreateDir { path, source } => {
                format!("cannot create {}: {}", path.display(), io_cause(source))
            }
            Self::Task(_) => "the storage task stopped unexpectedly".into(),
            other => other.to_string(),
        }
    }

    /// The device is full (or the quota used up).
    pub fn is_no_space(&self) -> bool {
        let io = match self {
            Self::Db(e) => match e.as_ref() {
                redb::Error::Io(io) => io,
                _ => return false,
            },
            Self::Io { source, .. } | Self::CreateDir { source, .. } => source,
            _ => return false,
        };
        no_space(io)
    }
}

fn no_space(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull
        || e.kind() == io::ErrorKind::QuotaExceeded
        || e.raw_os_error() == Some(libc::ENOSPC)
}

/// An I/O error in plain words: what the OS said, without its number.
fn io_cause(e: &io::Error) -> String {
    match e.raw_os_error() {
        _ if no_space(e) => "no space left on device".into(),
        Some(libc::EIO) => "input/output error (the device failed to read or write)".into(),
        Some(libc::EROFS) => "the file system is read-only".into(),
        _ => {
            let s = e.to_string();
            let s = match s.rfind(" (os error ") {
                Some(at) => &s[..at],
                None => &s,
            };
            let mut c = s.chars();
            match c.next() {
                Some(first) => first.to_lowercase().chain(c).collect(),
                None => "unknown I/O error".into(),
            }
        }
    }
}

/// What openraft was doing, in words.
fn operation(subject: &ErrorSubject<NodeId>, verb: ErrorVerb) -> &'static str {
    use ErrorSubject as S;
    use ErrorVerb as V;
    match (subject, verb) {
        (S::Logs | S::Log(_) | S::LogIndex(_), V::Read | V::Seek) => "reading the Raft log",
        (S::Logs | S::Log(_) | S::LogIndex(_), V::Write) => "appending to the Raft log",
        (S::Logs | S::Log(_) | S::LogIndex(_), V::Delete) => "removing entries from the Raft log",
        (S::Vote, V::Write) => "saving the vote",
        (S::Vote, _) => "reading the vote",
        (S::Store, V::Write) => "saving the commit index",
        (S::Store, _) => "reading the commit index",
        (S::StateMachine | S::Apply(_), V::Write) => "applying entries to the state machine",
        (S::StateMachine | S::Apply(_), _) => "reading the state machine",
        (S::Snapshot(_), V::Write) => "writing a snapshot",
        (S::Snapshot(_), _) => "reading a snapshot",
        (_, V::Write | V::Delete) => "writing the Raft storage",
        (_, _) => "reading the Raft storage",
    }
}

/// Creates `dir` if needed and opens (or creates) the redb file `name` in
/// it; through `faults` when given (tests).
pub(crate) fn open(
    dir: &Path,
    name: &str,
    faults: Option<&Arc<crate::faults::Faults>>,
) -> Result<Arc<Database>, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(name);
    let opened = match faults {
        None => Database::create(&path),
        Some(f) => f
            .open(&path)
            .map_err(redb::DatabaseError::from)
            .and_then(|b| Database::builder().create_with_backend(b)),
    };
    let db = opened.map_err(|source| StoreError::Open {
        path,
        source: Box::new(source),
    })?;
    Ok(Arc::new(db))
}

/// Readies one database file for its close: redb's close writes the
/// allocator state (a quick-repair commit, two fsyncs) when the last handle
/// drops, which at process exit happens one file after the other, late.
/// [`Seal::seal`] does it early, and files can be sealed side by side;
/// the drop then finds it done. A write after the seal only makes the
/// close do it again.
#[derive(Clone)]
pub struct Seal(Arc<Database>);

impl fmt::Debug for Seal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seal").finish_non_exhaustive()
    }
}

impl Seal {
    pub(crate) fn new(db: &Arc<Database>) -> Self {
        Self(Arc::clone(db))
    }

    /// Writes the allocator state now (on the blocking pool).
    pub async fn seal(self) -> Result<(), StoreError> {
        blocking(&self.0, |db| {
            let mut txn = db.begin_write()?;
            txn.set_quick_repair(true);
            txn.commit()?;
            Ok(())
        })
        .await
    }
}

/// Runs `f` on tokio's blocking pool.
pub(crate) async fn blocking<T, F>(db: &Arc<Database>, f: F) -> Result<T, StoreError>
where
    F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    T: Send + 'static,
{
    let db = Arc::clone(db);
    match tokio::task::spawn_blocking(move || f(&db)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "storage task failed");
            Err(StoreError::Task(e.to_string()))
        }
    }
}

/// Encodes `value` as JSON.
pub(crate) fn encode<T: Serialize + ?Sized>(
    value: &T,
    what: impl fmt::Display,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        what: what.to_string(),
        source,
    })
}

/// Decodes JSON `bytes`, naming `what` in the error.
pub(crate) fn decode<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl fmt::Display,
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode {
        what: what.to_string(),
        source,
    })
}
