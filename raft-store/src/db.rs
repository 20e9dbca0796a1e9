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
    /// A file in the data dir is damaged: truncated, overwritten, or its
    /// bytes contradict each other. Found at open, which then stops; what
    /// to do about it depends on the file (the node says).
    #[error("{} is corrupt: {problem}", path.display())]
    Corrupt {
        /// The damaged file.
        path: PathBuf,
        /// What is wrong with it, in plain words.
        problem: String,
    },
    /// The state machine cannot be rebuilt from what this data dir holds.
    #[error("cannot rebuild {}: {why}", path.display())]
    CannotRebuild {
        /// The state machine file.
        path: PathBuf,
        /// Why, in plain words.
        why: String,
    },
    /// The blocking task running a redb call panicked or was cancelled.
    #[error("storage task failed: {0}")]
    Task(String),
    /// An earlier write failed, and the file takes no more until the node
    /// restarts (the state machine's rows, written behind its batches).
    #[error("{0}")]
    Earlier(Arc<Self>),
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
    /// The file is open in another process (redb's lock): a node still
    /// running on the data dir.
    pub fn is_held_elsewhere(&self) -> bool {
        matches!(self, Self::Open { source, .. } if matches!(**source, redb::DatabaseError::DatabaseAlreadyOpen))
    }

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
            Self::Earlier(e) => e.cause(),
            other => other.to_string(),
        }
    }

    /// What a damaged file's bytes give when read: every error but an I/O
    /// error of the device (those are not the file's fault) or a newer
    /// format (a binary too old).
    pub(crate) fn is_damage(&self) -> bool {
        match self {
            Self::Db(e) => match e.as_ref() {
                redb::Error::Io(io) => damaged_io(io),
                redb::Error::PreviousIo | redb::Error::LockPoisoned(_) => false,
                // Corrupted, and what garbage read as a table gives.
                _ => true,
            },
            Self::Decode { .. } | Self::Inconsistent(_) | Self::Corrupt { .. } => true,
            _ => false,
        }
    }

    /// This error as [`StoreError::Corrupt`] of `path` when it is damage
    /// ([`is_damage`](Self::is_damage)), else unchanged.
    pub(crate) fn damage_of(self, path: &Path) -> Self {
        if !self.is_damage() {
            return self;
        }
        match self {
            Self::Corrupt { .. } => self,
            other => Self::Corrupt {
                path: path.to_path_buf(),
                problem: other.damage(),
            },
        }
    }

    /// What is wrong with the bytes, in plain words.
    fn damage(&self) -> String {
        match self {
            Self::Db(e) => match e.as_ref() {
                redb::Error::Corrupted(m) => format!("the database's checks fail ({m})"),
                redb::Error::Io(io) if damaged_io(io) => {
                    "it is shorter than its own header says (truncated)".into()
                }
                other => format!("the database does not read ({other})"),
            },
            Self::Decode { what, source } => format!("{what} does not decode ({source})"),
            Self::Inconsistent(m) => m.clone(),
            other => other.to_string(),
        }
    }

    /// The device is full (or the quota used up).
    pub fn is_no_space(&self) -> bool {
        let io = match self {
            Self::Earlier(e) => return e.is_no_space(),
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

/// An I/O error that a damaged file gives (reading past its end, bytes
/// that are not what they claim), not a failing device.
fn damaged_io(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidData
    )
}

/// Runs `f`, a read of a file that may be damaged: redb trusts its pages
/// once opened, and malformed ones can make it panic instead of failing.
/// A panic is the file's damage, reported as [`StoreError::Corrupt`] of
/// `path`; so is every error that [`StoreError::is_damage`].
pub(crate) fn guarded<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    quiet_panics();
    let outer = GUARDED.with(|g| g.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(outer));
    match result {
        Ok(r) => r.map_err(|e| e.damage_of(path)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let problem = if what.contains("raw_file_len") {
                "it is shorter than its own header says (truncated)".to_owned()
            } else {
                format!("its pages do not read as a database (redb: {what})")
            };
            Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                problem,
            })
        }
    }
}

thread_local! {
    /// Set while [`guarded`] runs a read on this thread.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Installs (once) a panic hook that stays silent for panics inside
/// [`guarded`], which are reported as a corrupt file instead, and passes
/// every other panic to the hook it replaces.
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(std::cell::Cell::get) {
                previous(info);
            }
        }));
    });
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
    // redb takes an empty file for a new database: one truncated to
    // nothing would start as if the node had never stored anything.
    match std::fs::metadata(&path) {
        Ok(m) if m.len() == 0 => {
            return Err(StoreError::Corrupt {
                path,
                problem: "the file is empty (truncated)".into(),
            });
        }
        _ => {}
    }
    let opened = guarded(&path, || {
        let opened = match faults {
            None => Database::create(&path),
            Some(f) => f
                .open(&path)
                .map_err(redb::DatabaseError::from)
                .and_then(|b| Database::builder().create_with_backend(b)),
        };
        opened.map_err(|source| match source {
            redb::DatabaseError::Storage(e @ redb::StorageError::Corrupted(_)) => e.into(),
            redb::DatabaseError::Storage(redb::StorageError::Io(io)) if damaged_io(&io) => {
                redb::StorageError::Io(io).into()
            }
            source => StoreError::Open {
                path: path.clone(),
                source: Box::new(source),
            },
        })
    })?;
    Ok(Arc::new(opened))
}

/// Readies one database file for its close: redb's close writes the
/// allocator state (a quick-repair commit, two fsyncs) when the last handle
/// drops, which at process exit happens one file after the other, late.
/// [`Seal::seal`] does it early, and files can be sealed side by side;
/// the drop then finds it done. A write after the seal only makes the
/// close do it again.
#[derive(Clone)]
pub struct Seal {
    db: Arc<Database>,
    /// The state machine's rows not yet written, written first.
    flusher: Option<Arc<crate::state_machine::Flusher>>,
}

impl fmt::Debug for Seal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seal").finish_non_exhaustive()
    }
}

impl Seal {
    pub(crate) fn new(db: &Arc<Database>) -> Self {
        Self {
            db: Arc::clone(db),
            flusher: None,
        }
    }

    /// A seal that first writes what `flusher` holds.
    pub(crate) fn flushing(
        db: &Arc<Database>,
        flusher: &Arc<crate::state_machine::Flusher>,
    ) -> Self {
        Self {
            db: Arc::clone(db),
            flusher: Some(Arc::clone(flusher)),
        }
    }

    /// Writes what is pending and the allocator state now (on the
    /// blocking pool).
    pub async fn seal(self) -> Result<(), StoreError> {
        let flusher = self.flusher;
        blocking(&self.db, move |db| {
            if let Some(f) = flusher {
                f.flush()?;
            }
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

/// The length of `value`'s JSON, as [`encode`] would make it (a log row
/// is an entry's), without building it; `None` if it does not serialise.
pub fn encoded_len<T: Serialize + ?Sized>(value: &T) -> Option<usize> {
    /// Counts what is written to it.
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).ok()?;
    Some(count.0)
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
