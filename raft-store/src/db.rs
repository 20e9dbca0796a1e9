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
    /// As openraft's error, saying what was being done to what.
    pub(crate) fn into_storage(
        self,
        subject: ErrorSubject<NodeId>,
        verb: ErrorVerb,
    ) -> StorageError {
        StorageIOError::new(subject, verb, AnyError::new(&self)).into()
    }
}

/// Creates `dir` if needed and opens (or creates) the redb file `name` in it.
pub(crate) fn open(dir: &Path, name: &str) -> Result<Arc<Database>, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(name);
    let db = Database::create(&path).map_err(|source| StoreError::Open {
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
