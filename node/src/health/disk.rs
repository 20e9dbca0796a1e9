//! The free-space floor of the data dir (`data_dir_min_free`), as etcd's
//! quota: below it writes are refused before they reach the Raft log, so a
//! filling disk costs refused writes, never a stopped Raft core.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// `data_dir_min_free`: how much of the data dir's file system must stay
/// free for writes to be accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum MinFree {
    /// A share of the file system's size, in percent (`5%`).
    Share(f64),
    /// An absolute size in bytes (`512MiB`, `1GB`, `0` turns the floor off).
    Bytes(u64),
    /// The default: 5 % of the file system, at most 1 GiB.
    #[default]
    Default,
}

/// The default floor: this share of the file system…
const DEFAULT_SHARE: f64 = 5.0;
/// …but never more than this.
const DEFAULT_CAP: u64 = 1 << 30;

impl MinFree {
    /// The floor in bytes on a file system of `total` bytes.
    pub fn floor(self, total: u64) -> u64 {
        let share = |pct: f64| (total as f64 * pct / 100.0).ceil() as u64;
        match self {
            Self::Share(pct) => share(pct),
            Self::Bytes(b) => b,
            Self::Default => share(DEFAULT_SHARE).min(DEFAULT_CAP),
        }
    }
}

impl fmt::Display for MinFree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Share(p) => write!(f, "{p}%"),
            Self::Bytes(b) => write!(f, "{}", Size(*b)),
            Self::Default => write!(f, "{DEFAULT_SHARE}% up to {}", Size(DEFAULT_CAP)),
        }
    }
}

impl FromStr for MinFree {
    type Err = String;

    /// `5%`, `0.5%`, or a size: `1048576`, `64KiB`, `512MiB`, `1GiB`, `1GB`
    /// (powers of 1024 with `i`, of 1000 without).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(pct) = s.strip_suffix('%') {
            return match pct.trim().parse::<f64>() {
                Ok(p) if (0.0..100.0).contains(&p) => Ok(Self::Share(p)),
                _ => Err(format!(
                    "{s:?}: a share must be a percentage from 0% to below 100%"
                )),
            };
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let unit_bytes: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or %)"
                ));
            }
        };
        digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_bytes))
            .map(Self::Bytes)
            .ok_or_else(|| format!("{s:?} is not a size such as 512MiB or a share such as 5%"))
    }
}

/// A byte count for people: `1.5 MiB`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Size(pub(crate) u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0 as f64;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{v:.1} {}", UNITS[unit])
        }
    }
}

/// The data dir's file system now.
#[derive(Clone, Copy, Debug)]
pub(super) struct Space {
    /// Bytes an unprivileged writer may still use.
    pub(super) free: u64,
    /// The floor in bytes.
    pub(super) floor: u64,
    min_free: MinFree,
}

impl Space {
    /// The refusal, when below the floor.
    pub(super) fn full(self, dir: &Path) -> Option<DiskFull> {
        (self.free < self.floor).then(|| DiskFull {
            message: format!(
                "{REFUSED} {} has {} free, below its floor of {} \
                 (data_dir_min_free = {}); free space there or lower data_dir_min_free, \
                 and writes resume by themselves",
                dir.display(),
                Size(self.free),
                Size(self.floor),
                self.min_free,
            ),
        })
    }
}

/// Measures the file system of `dir`; `None` when it cannot be asked (the
/// write goes ahead, and fails on its own if the disk is gone).
pub(super) fn measure(dir: &Path, min_free: MinFree) -> Option<Space> {
    match rustix::fs::statvfs(dir) {
        Ok(s) => {
            let total = s.f_blocks.saturating_mul(s.f_frsize);
            Some(Space {
                free: s.f_bavail.saturating_mul(s.f_frsize),
                floor: min_free.floor(total),
                min_free,
            })
        }
        Err(e) => {
            tracing::debug!(dir = %dir.display(), error = %e, "statvfs of the data dir failed");
            None
        }
    }
}

/// How every refusal's message starts (it crosses the cluster inside
/// `ForwardError::Failed`: [`is_disk_full`] finds it there).
const REFUSED: &str = "writes refused: the data dir";

/// Whether `message` (of a node, perhaps prefixed with `node N: `) is a
/// refusal below the free-space floor.
pub(crate) fn is_disk_full(message: &str) -> bool {
    let message = match message.split_once(": ") {
        Some((node, rest)) if node.starts_with("node ") => rest,
        _ => message,
    };
    message.starts_with(REFUSED)
}

/// A write refused because the data dir is below its free-space floor
/// (507 Insufficient Storage).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DiskFull {
    message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shares_and_sizes() {
        assert_eq!("5%".parse(), Ok(MinFree::Share(5.0)));
        assert_eq!(" 0.5 % ".parse(), Ok(MinFree::Share(0.5)));
        assert_eq!("0".parse(), Ok(MinFree::Bytes(0)));
        assert_eq!("1048576".parse(), Ok(MinFree::Bytes(1 << 20)));
        assert_eq!("512MiB".parse(), Ok(MinFree::Bytes(512 << 20)));
        assert_eq!("1 GB".parse(), Ok(MinFree::Bytes(1_000_000_000)));
        for bad in [
            "",
            "100%",
            "-1%",
            "5 parsecs",
            "MiB",
            "99999999999999TiB",
            "1.5GiB",
        ] {
            assert!(bad.parse::<MinFree>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_default_is_a_share_with_a_cap() {
        assert_eq!(MinFree::Default.floor(100 << 20), 5 << 20);
        assert_eq!(MinFree::Default.floor(1 << 40), 1 << 30);
        assert_eq!(MinFree::Share(10.0).floor(1000), 100);
        assert_eq!(MinFree::Bytes(7).floor(1000), 7);
    }

    #[test]
    fn a_refusal_names_the_dir_the_space_and_the_key() {
        let space = Space {
            free: 3 << 20,
            floor: 64 << 20,
            min_free: MinFree::Bytes(64 << 20),
        };
        let msg = space
            .full(Path::new("/var/lib/edgelb"))
            .unwrap()
            .to_string();
        for part in [
            "/var/lib/edgelb",
            "3.0 MiB free",
            "64.0 MiB",
            "data_dir_min_free",
        ] {
            assert!(msg.contains(part), "{part:?} missing from {msg:?}");
        }
        let roomy = Space {
            free: 65 << 20,
            ..space
        };
        assert!(roomy.full(Path::new("/x")).is_none());
    }

    #[test]
    fn measures_a_real_directory() {
        let space = measure(&std::env::temp_dir(), MinFree::Bytes(0)).unwrap();
        assert!(space.full(Path::new("/tmp")).is_none());
        let huge = measure(&std::env::temp_dir(), MinFree::Bytes(u64::MAX)).unwrap();
        assert!(huge.full(Path::new("/tmp")).is_some());
    }
}
