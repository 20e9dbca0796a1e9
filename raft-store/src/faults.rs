//! A redb storage backend that fails on demand, for tests: the paths a
//! full or failing disk takes run in `cargo test`, without root and
//! without filling a real disk.
//!
//! ```text
//!  LogStore::open_with / StateMachineStore::open_with(dir, Some(&faults))
//!        │
//!        ▼
//!  FaultyBackend(file) ── write / set_len / sync_data ──▶ Faults::hit? ──no──▶ the file
//!                                                            │yes
//!                                                            ▼
//!                        ENOSPC or EIO (a torn write: the first half reaches the file)
//! ```
//!
//! A [`Plan`] says which operation fails, how, after how many matching
//! operations and how often (a full disk stays full until
//! [`Faults::clear`]); [`Plan::from_seed`] draws one from a seed, so that a
//! failing run is replayed by its seed. redb, like the kernel after a failed
//! fsync, trusts nothing written after an I/O error: the database answers
//! every later operation with an error until it is opened again (in the
//! node: until the process restarts).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use redb::StorageBackend;
use redb::backends::FileBackend;

/// The storage operation a fault hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Writing bytes (`pwrite`).
    Write,
    /// Growing or shrinking the file (`ftruncate`, where a full disk shows).
    SetLen,
    /// `fdatasync`.
    Sync,
}

/// How the operation fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// ENOSPC: no space left on device.
    NoSpace,
    /// EIO: the device failed.
    Io,
    /// The first half of the bytes reach the file, then EIO (a write cut
    /// short). Acts as [`Fault::Io`] on other operations.
    Torn,
}

/// When and how the backend fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The operation that fails.
    pub op: Op,
    /// How it fails.
    pub fault: Fault,
    /// Matching operations that succeed before the first failure.
    pub after: u64,
    /// Failures in a row from then on; `None`: until [`Faults::clear`].
    pub times: Option<u64>,
    /// Only this file of the data dir (e.g. `raft-log.redb`); `None`: any.
    pub file: Option<String>,
}

impl Plan {
    /// A plan drawn from `seed`: any operation and fault, after 0 to
    /// `max_after` matching operations, once, a few times or until cleared,
    /// on either file.
    pub fn from_seed(seed: u64, max_after: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let op = [Op::Write, Op::SetLen, Op::Sync][rng.random_range(0..3)];
        let fault = match (op, rng.random_range(0..3)) {
            (Op::Write, 2) => Fault::Torn,
            (_, 0) => Fault::NoSpace,
            _ => Fault::Io,
        };
        let after = rng.random_range(0..=max_after);
        let times = match rng.random_range(0..3) {
            0 => Some(1),
            1 => Some(rng.random_range(2..10)),
            _ => None,
        };
        let file = match rng.random_range(0..3) {
            0 => Some(crate::log_store::FILE.to_owned()),
            1 => Some(crate::state_machine::FILE.to_owned()),
            _ => None,
        };
        Self {
            op,
            fault,
            after,
            times,
            file,
        }
    }
}

/// One injected failure, for the test to compare with what the node said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injected {
    /// The file's name in the data dir.
    pub file: String,
    pub op: Op,
    pub fault: Fault,
}

/// The switchboard of the faulty backends of one data dir; shared by the
/// test and the backends it opened.
#[derive(Debug, Default)]
pub struct Faults {
    plan: Mutex<Option<Armed>>,
    injected: Mutex<Vec<Injected>>,
    /// Operations that passed through, for tests that size their plans.
    ops: AtomicU64,
}

#[derive(Debug)]
struct Armed {
    plan: Plan,
    /// Matching operations seen since armed.
    seen: u64,
    /// Failures injected since armed.
    failed: u64,
}

impl Faults {
    /// No plan armed: every operation goes through.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Fails operations as `plan` says, from now on (replacing any plan).
    pub fn arm(&self, plan: Plan) {
        *lock(&self.plan) = Some(Armed {
            plan,
            seen: 0,
            failed: 0,
        });
    }

    /// Lets every operation through again (the disk was freed or fixed).
    pub fn clear(&self) {
        *lock(&self.plan) = None;
    }

    /// The failures injected so far.
    pub fn injected(&self) -> Vec<Injected> {
        lock(&self.injected).clone()
    }

    /// Mutating operations (writes, resizes, syncs) seen so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Opens (or creates) `path` as a redb backend under these faults.
    pub(crate) fn open(self: &Arc<Self>, path: &Path) -> io::Result<FaultyBackend> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        FaultyBackend::new(file, name, Arc::clone(self))
    }

    /// Whether `op` on `file` fails now, and how.
    fn hit(&self, file: &str, op: Op) -> Option<Fault> {
        self.ops.fetch_add(1, Ordering::Relaxed);
        let mut plan = lock(&self.plan);
        let armed = plan.as_mut()?;
        let p = &armed.plan;
        if p.op != op || p.file.as_deref().is_some_and(|f| f != file) {
            return None;
        }
        armed.seen += 1;
        if armed.seen <= p.after || p.times.is_some_and(|t| armed.failed >= t) {
            return None;
        }
        armed.failed += 1;
        let fault = p.fault;
        drop(plan);
        tracing::debug!(file, ?op, ?fault, "injected a storage fault");
        lock(&self.injected).push(Injected {
            file: file.to_owned(),
            op,
            fault,
        });
        Some(fault)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn error(fault: Fault) -> io::Error {
    match fault {
        Fault::NoSpace => io::Error::from_raw_os_error(libc::ENOSPC),
        Fault::Io | Fault::Torn => io::Error::from_raw_os_error(libc::EIO),
    }
}

/// redb's file backend, failing as its [`Faults`] say.
pub(crate) struct FaultyBackend {
    inner: FileBackend,
    file: String,
    faults: Arc<Faults>,
}

impl FaultyBackend {
    fn new(file: File, name: String, faults: Arc<Faults>) -> io::Result<Self> {
        let inner = FileBackend::new(file).map_err(|e| match e {
            redb::DatabaseError::Storage(redb::StorageError::Io(io)) => io,
            other => io::Error::other(other.to_string()),
        })?;
        Ok(Self {
            inner,
            file: name,
            faults,
        })
    }
}

impl fmt::Debug for FaultyBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyBackend")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, io::Error> {
        self.inner.read(offset, len)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        match self.faults.hit(&self.file, Op::SetLen) {
            Some(fault) => Err(error(fault)),
            None => self.inner.set_len(len),
        }
    }

    fn sync_data(&self, eventual: bool) -> Result<(), io::Error> {
        match self.faults.hit(&self.file, Op::Sync) {
            Some(fault) => Err(error(fault)),
            None => self.inner.sync_data(eventual),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        match self.faults.hit(&self.file, Op::Write) {
            Some(Fault::Torn) => {
                self.inner.write(offset, &data[..data.len() / 2])?;
                Err(error(Fault::Torn))
            }
            Some(fault) => Err(error(fault)),
            None => self.inner.write(offset, data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_fails_the_matching_operations_it_names() {
        let faults = Faults::new();
        faults.arm(Plan {
            op: Op::Sync,
            fault: Fault::NoSpace,
            after: 2,
            times: Some(2),
            file: Some("a".into()),
        });
        let hits: Vec<_> = (0..6).map(|_| faults.hit("a", Op::Sync)).collect();
        assert_eq!(
            hits,
            [
                None,
                None,
                Some(Fault::NoSpace),
                Some(Fault::NoSpace),
                None,
                None
            ]
        );
        assert_eq!(faults.hit("b", Op::Sync), None);
        assert_eq!(faults.hit("a", Op::Write), None);
        assert_eq!(faults.injected().len(), 2);
        faults.clear();
        assert_eq!(faults.hit("a", Op::Sync), None);
    }

    #[test]
    fn plans_from_the_same_seed_are_the_same() {
        assert_eq!(Plan::from_seed(7, 50), Plan::from_seed(7, 50));
        let plans: std::collections::HashSet<_> = (0..100)
            .map(|s| format!("{:?}", Plan::from_seed(s, 50)))
            .collect();
        assert!(plans.len() > 50, "seeds draw varied plans");
    }
}

/// Damage to a file at rest, for tests of corrupted data dirs: garbage
/// over its bytes (never plain ASCII, so no text line survives it) and
/// truncation, each synced to disk.
pub mod damage {
    use std::collections::BTreeSet;
    use std::fs::OpenOptions;
    use std::io::{self, Read, Seek, SeekFrom, Write};
    use std::path::Path;

    /// Overwrites `len` bytes of `path` at `at` with garbage.
    pub fn garble(path: &Path, at: u64, len: u64) -> io::Result<()> {
        let mut f = OpenOptions::new().read(true).write(true).open(path)?;
        // xorshift, seeded by the offset: the same damage on every run.
        let mut x: u32 = 0x2545_f491 ^ (at as u32);
        let garbage: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0] | 0x80
            })
            .collect();
        f.seek(SeekFrom::Start(at))?;
        f.write_all(&garbage)?;
        f.sync_all()
    }

    /// Garbage over every 4 KiB page of `path` that holds `needle` (a
    /// row's bytes): a damaged disk block where the reader goes. An error
    /// when `needle` is not in the file.
    pub fn garble_pages(path: &Path, needle: &str) -> io::Result<()> {
        let mut bytes = Vec::new();
        OpenOptions::new()
            .read(true)
            .open(path)?
            .read_to_end(&mut bytes)?;
        let pages: BTreeSet<usize> = bytes
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle.as_bytes())
            .map(|(at, _)| at / 4096)
            .collect();
        if pages.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{needle:?} is not in {}", path.display()),
            ));
        }
        for page in pages {
            garble(path, (page * 4096) as u64, 4096)?;
        }
        Ok(())
    }

    /// Garbage over `len` bytes in the middle of `path` (at most half of it).
    pub fn garble_middle(path: &Path, len: u64) -> io::Result<()> {
        let size = std::fs::metadata(path)?.len();
        let len = len.min(size / 2).max(1);
        garble(path, (size - len) / 2, len)
    }

    /// Cuts `path` to `to(its length)` bytes.
    pub fn truncate(path: &Path, to: impl FnOnce(u64) -> u64) -> io::Result<()> {
        let f = OpenOptions::new().write(true).open(path)?;
        let len = f.metadata()?.len();
        f.set_len(to(len))?;
        f.sync_all()
    }
}
