//! Snapshot bytes as files: `<data_dir>/snapshots/<snapshot id>.json`, the
//! current one named by the meta row in the `snapshot` table.
//!
//! A snapshot is written to `<name>.tmp`, fsync'd, renamed into place (and
//! the directory fsync'd) before the meta row naming it commits, and older
//! files are removed after; so a crash leaves at worst a file no row names,
//! removed at the next open. Building streams the JSON from the state into
//! the file; installing copies the received bytes into a file and decodes
//! the state from it, so neither holds the document in memory. One lock
//! orders builds, installs and the clean-up between them.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use redb::{Database, Durability, ReadableTable, WriteTransaction};

use super::{DATA, META, SNAPSHOT, SNAPSHOT_FORMAT, SmRecord, decode};
use crate::db::{self, StoreError};
use crate::rows;
use crate::state::State;
use crate::types::SnapshotMeta;

/// Where a snapshot being received is written.
const RECEIVING: &str = "receiving.tmp";

/// The snapshot directory of one state machine.
#[derive(Debug)]
pub(crate) struct Files {
    dir: PathBuf,
    lock: Mutex<()>,
}

fn io_error(what: String) -> impl FnOnce(io::Error) -> StoreError {
    move |source| StoreError::Io { what, source }
}

/// Fsyncs the directory `dir`, so that a rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error(format!("syncing {}", dir.display())))
}

/// The current snapshot's meta, if there is one.
fn read_meta(txn: &WriteTransaction) -> Result<Option<SnapshotMeta>, StoreError> {
    let table = txn.open_table(SNAPSHOT)?;
    let meta = match table.get(META)? {
        Some(v) => Some(db::decode(v.value(), "snapshot meta")?),
        None => None,
    };
    Ok(meta)
}

/// Records `meta` as the current snapshot inside `txn`, with the length
/// and CRC-32 of its file's bytes as written.
pub(crate) fn write_meta(
    txn: &WriteTransaction,
    meta: &SnapshotMeta,
    written: Crc32,
) -> Result<(), StoreError> {
    let bytes = db::encode(meta, "snapshot meta")?;
    let check = Check {
        snapshot_id: meta.snapshot_id.clone(),
        len: written.len,
        crc32: written.value(),
    };
    let check = db::encode(&check, "snapshot check")?;
    let mut table = txn.open_table(SNAPSHOT)?;
    table.insert(META, bytes.as_slice())?;
    table.insert(CHECK, check.as_slice())?;
    table.remove(DATA)?;
    Ok(())
}

/// Forgets the current snapshot inside `txn`.
pub(crate) fn remove_meta(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut table = txn.open_table(SNAPSHOT)?;
    table.remove(META)?;
    table.remove(CHECK)?;
    Ok(())
}

/// Key of the current snapshot file's [`Check`] in the `snapshot` table
/// (absent in data dirs written before it: the file is then parsed).
const CHECK: &str = "check";

/// What the current snapshot's file held when it was written, to find it
/// damaged at open without parsing it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Check {
    snapshot_id: String,
    len: u64,
    crc32: u32,
}

/// CRC-32 (IEEE, `crc32fast`) and length of bytes written or read.
#[derive(Clone, Debug, Default)]
pub(crate) struct Crc32 {
    hasher: crc32fast::Hasher,
    len: u64,
}

impl Crc32 {
    pub(crate) fn update(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    pub(crate) fn value(&self) -> u32 {
        self.hasher.clone().finalize()
    }

    /// Of the whole of `path`.
    pub(crate) fn of_file(path: &Path) -> io::Result<Self> {
        let mut file = File::open(path)?;
        let mut crc = Self::default();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match io::Read::read(&mut file, &mut buf)? {
                0 => return Ok(crc),
                n => crc.update(&buf[..n]),
            }
        }
    }
}

/// A writer that keeps the [`Crc32`] of what passes through it.
struct Hashing<W> {
    inner: W,
    crc: Crc32,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Files {
    /// Opens `<data_dir>/snapshots`: creates it, moves the bytes of a
    /// snapshot stored in the `snapshot` table (format 1) into a file, and
    /// removes files no meta row names.
    pub(crate) fn open(data_dir: &Path, db: &Database) -> Result<Self, StoreError> {
        let dir = data_dir.join("snapshots");
        fs::create_dir_all(&dir).map_err(|source| StoreError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let files = Self {
            dir,
            lock: Mutex::new(()),
        };
        let txn = db.begin_write()?;
        let meta = read_meta(&txn)?;
        let data = txn
            .open_table(SNAPSHOT)?
            .get(DATA)?
            .map(|v| v.value().to_vec());
        match (&meta, data) {
            (Some(meta), Some(data)) => {
                let path = files.path(meta);
                let written = files.write_file(&path, |w| w.write_all(&data))?;
                let mut txn = txn;
                txn.set_durability(Durability::Immediate);
                write_meta(&txn, meta, written)?;
                txn.commit()?;
                tracing::info!(path = %path.display(), "moved the snapshot into its own file");
            }
            _ => txn.abort()?,
        }
        files.clean(meta.as_ref())?;
        Ok(files)
    }

    fn path(&self, meta: &SnapshotMeta) -> PathBuf {
        self.dir.join(file_name(meta))
    }

    /// Reads the current snapshot's file through, at open: a truncated or
    /// overwritten one stops the start with the file named (it is sent to
    /// new and lagging members, and read nowhere else). Its state is only
    /// parsed, not built: O(size), no more memory than a read buffer.
    pub(crate) fn verify(&self, db: &Database) -> Result<(), StoreError> {
        let meta = {
            let txn = db.begin_read()?;
            let table = txn.open_table(SNAPSHOT)?;
            let Some(meta) = table.get(META)? else {
                return Ok(());
            };
            let check = match table.get(CHECK)? {
                Some(c) => Some(db::decode::<Check>(c.value(), "snapshot check")?),
                None => None,
            };
            (
                db::decode::<SnapshotMeta>(meta.value(), "snapshot meta")?,
                check,
            )
        };
        let (meta, check) = meta;
        let path = self.path(&meta);
        let corrupt = |problem: String| StoreError::Corrupt {
            path: path.clone(),
            problem,
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(corrupt(format!(
                    "the file is missing (the state machine names it as its current snapshot, {})",
                    meta.snapshot_id
                )));
            }
            Err(e) => return Err(io_error(format!("opening {}", path.display()))(e)),
        };
        if let Some(check) = check.filter(|c| c.snapshot_id == meta.snapshot_id) {
            drop(file);
            let read =
                Crc32::of_file(&path).map_err(io_error(format!("reading {}", path.display())))?;
            if read.len != check.len {
                return Err(corrupt(format!(
                    "it is {} bytes long, {} were written{}",
                    read.len,
                    check.len,
                    if read.len < check.len {
                        " (truncated)"
                    } else {
                        ""
                    }
                )));
            }
            if read.value() != check.crc32 {
                return Err(corrupt(
                    "its bytes are not those written (their checksum differs)".into(),
                ));
            }
            return Ok(());
        }
        // Written before checksums were kept: it must at least parse.
        let record: SmRecord<serde::de::IgnoredAny> = serde_json::from_reader(BufReader::new(file))
            .map_err(|e| {
                if e.is_io() {
                    io_error(format!("reading {}", path.display()))(io::Error::from(e))
                } else if e.is_eof() {
                    corrupt(format!("the document ends early (truncated): {e}"))
                } else {
                    corrupt(format!("the document does not decode: {e}"))
                }
            })?;
        if record.format.unwrap_or(1) > SNAPSHOT_FORMAT
            || record.last_applied != meta.last_log_id
            || record.membership != meta.last_membership
        {
            return Err(corrupt(format!(
                "it holds the state up to {:?}, but the state machine names it as the snapshot up to {:?}",
                record.last_applied.map(|l| l.index),
                meta.last_log_id.map(|l| l.index)
            )));
        }
        Ok(())
    }
}

/// The file name of the snapshot `meta` in the snapshot directory.
pub(crate) fn file_name(meta: &SnapshotMeta) -> String {
    let name: String = meta
        .snapshot_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{name}.json")
}

impl Files {
    /// Writes `path` through `<path>.tmp`: write, fsync, rename, fsync dir.
    /// Answers the CRC-32 of what was written.
    fn write_file(
        &self,
        path: &Path,
        write: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> Result<Crc32, StoreError> {
        let tmp = path.with_extension("tmp");
        let fail = io_error(format!("writing {}", tmp.display()));
        let result = File::create(&tmp).and_then(|file| {
            let mut w = Hashing {
                inner: BufWriter::new(&file),
                crc: Crc32::default(),
            };
            write(&mut w)?;
            w.flush()?;
            let crc = std::mem::take(&mut w.crc);
            drop(w);
            file.sync_all()?;
            fs::rename(&tmp, path)?;
            Ok(crc)
        });
        let crc = match result {
            Ok(crc) => crc,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(fail(e));
            }
        };
        sync_dir(&self.dir)?;
        Ok(crc)
    }

    /// Removes every file but the one of `keep` (a snapshot being received
    /// has no name, see [`Files::receiving`]): at open, and after with the
    /// lock held.
    fn clean(&self, keep: Option<&SnapshotMeta>) -> Result<(), StoreError> {
        let keep = keep.map(|m| self.path(m));
        let entries =
            fs::read_dir(&self.dir).map_err(io_error(format!("reading {}", self.dir.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if Some(&path) == keep.as_ref() {
                continue;
            }
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an old snapshot file");
            }
        }
        Ok(())
    }

    /// Writes `state` as the snapshot `meta` and makes it current unless a
    /// newer one was installed meanwhile. Answers the snapshot's file.
    pub(crate) fn build(
        &self,
        db: &Database,
        meta: &SnapshotMeta,
        state: &State,
    ) -> Result<File, StoreError> {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let record = SmRecord {
            format: Some(SNAPSHOT_FORMAT),
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state,
        };
        let path = self.path(meta);
        // Written before the transaction: holding redb's write lock while
        // serialising would hold up every apply meanwhile.
        let written = self.write_file(&path, |w| {
            serde_json::to_writer(w, &record).map_err(io::Error::from)
        })?;
        let file = File::open(&path).map_err(io_error(format!("opening {}", path.display())))?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        let newer = read_meta(&txn)?.is_some_and(|m| m.last_log_id > meta.last_log_id);
        if newer {
            // Keep the newer one; hand out this one from its unlinked file.
            txn.abort()?;
            let _ = fs::remove_file(&path);
            return Ok(file);
        }
        write_meta(&txn, meta, written)?;
        txn.commit()?;
        self.clean(Some(meta))?;
        Ok(file)
    }

    /// The current snapshot's meta and file, if there is one.
    pub(crate) fn current(
        &self,
        db: &Database,
    ) -> Result<Option<(SnapshotMeta, File)>, StoreError> {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let txn = db.begin_read()?;
        let table = txn.open_table(SNAPSHOT)?;
        let Some(meta) = table.get(META)? else {
            return Ok(None);
        };
        let meta: SnapshotMeta = db::decode(meta.value(), "snapshot meta")?;
        let path = self.path(&meta);
        let file = File::open(&path).map_err(io_error(format!("opening {}", path.display())))?;
        Ok(Some((meta, file)))
    }

    /// A new, empty file to receive a snapshot into, of its own: created
    /// and unlinked at once, so that a snapshot received next (another
    /// leader's, started before this one's install read it) gets another
    /// file instead of truncating this one, and a crash leaves no half
    /// file behind. Its space is freed when the handle is dropped.
    pub(crate) fn receiving(&self) -> Result<File, StoreError> {
        // Not while a build or an install cleans the directory.
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let path = self.dir.join(RECEIVING);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(io_error(format!("creating {}", path.display())))?;
        fs::remove_file(&path).map_err(io_error(format!("unlinking {}", path.display())))?;
        Ok(file)
    }

    /// Installs the snapshot `meta` whose bytes are in `data`: keeps them
    /// as the current snapshot's file, and replaces the state machine's
    /// rows with its state, in one transaction. Answers the record.
    pub(crate) fn install(
        &self,
        db: &Database,
        meta: &SnapshotMeta,
        mut data: File,
    ) -> Result<SmRecord<State>, StoreError> {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let path = self.path(meta);
        let tmp = path.with_extension("tmp");
        let mut written = Crc32::default();
        let copied = (|| {
            data.seek(SeekFrom::Start(0))?;
            let out = File::create(&tmp)?;
            let mut hashing = Hashing {
                inner: &out,
                crc: Crc32::default(),
            };
            io::copy(&mut data, &mut hashing)?;
            written = hashing.crc;
            out.sync_all()?;
            File::open(&tmp)
        })();
        let result = copied
            .map_err(io_error(format!("writing {}", tmp.display())))
            .and_then(|file| {
                let record = decode(BufReader::new(file))?;
                if record.last_applied != meta.last_log_id
                    || record.membership != meta.last_membership
                {
                    return Err(StoreError::Inconsistent(format!(
                        "snapshot {} holds state up to {:?}, its meta says {:?}",
                        meta.snapshot_id, record.last_applied, meta.last_log_id
                    )));
                }
                Ok(record)
            });
        let record = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        fs::rename(&tmp, &path).map_err(io_error(format!("renaming {}", tmp.display())))?;
        sync_dir(&self.dir)?;
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        rows::write_all(&txn, &record.state, record.last_applied, &record.membership)?;
        write_meta(&txn, meta, written)?;
        txn.commit()?;
        self.clean(Some(meta))?;
        Ok(record)
    }
}
