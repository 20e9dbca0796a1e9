//! Loopback addresses and temporary directories that never collide between
//! parallel tests.
//!
//! A test process owns the loopback block `127.A.0.0/16` with
//! `A = 10 + pid % 200`; each [`Subnet`] is one `/24` of it, handed out from
//! a process-wide counter. The node of a subnet binds `.1`, backends and
//! client source addresses take `.2` to `.250`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};

static NEXT_SUBNET: AtomicU32 = AtomicU32::new(1);
static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// The second octet of this process's loopback block.
fn block() -> u8 {
    // 10..=209, so 127.0.0.0/16 (the usual 127.0.0.1) is never used.
    10 + u8::try_from(std::process::id() % 200).unwrap_or(0)
}

/// A `/24` of loopback addresses owned by one test.
#[derive(Debug)]
pub struct Subnet {
    third: u8,
    next_host: AtomicU8,
}

impl Subnet {
    /// The next unused subnet of this process.
    ///
    /// # Panics
    /// After 255 subnets in one process (far more than a test binary needs).
    pub fn allocate() -> Self {
        let n = NEXT_SUBNET.fetch_add(1, Ordering::Relaxed);
        let third = u8::try_from(n).expect("more than 255 test subnets in one process");
        Self {
            third,
            next_host: AtomicU8::new(2),
        }
    }

    /// `127.A.N.host`.
    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, block(), self.third, host))
    }

    /// The node's address (`.1`).
    pub fn node_ip(&self) -> IpAddr {
        self.ip(1)
    }

    /// A fresh address for a backend or a client (`.2` to `.250`).
    ///
    /// # Panics
    /// When the subnet is exhausted.
    pub fn next_ip(&self) -> IpAddr {
        let host = self.next_host.fetch_add(1, Ordering::Relaxed);
        assert!(
            (2..=250).contains(&host),
            "subnet 127.{}.{}.0/24 exhausted",
            block(),
            self.third
        );
        self.ip(host)
    }
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// A new empty directory under the system temp dir, named after `label`,
    /// this process and a counter.
    ///
    /// # Panics
    /// If the directory cannot be created.
    pub fn new(label: &str) -> Self {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("edgelb-it-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        Self { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_are_distinct_and_hosts_start_at_two() {
        let a = Subnet::allocate();
        let b = Subnet::allocate();
        assert_ne!(a.node_ip(), b.node_ip());
        let first = a.next_ip();
        assert_eq!(first, a.ip(2));
        assert_ne!(a.next_ip(), first);
        let IpAddr::V4(v4) = a.node_ip() else {
            panic!("v4")
        };
        assert_eq!(v4.octets()[0], 127);
        assert!((10..210).contains(&v4.octets()[1]));
    }

    #[test]
    fn temp_dirs_are_removed() {
        let d = TempDir::new("unit");
        let p = d.path().to_owned();
        assert!(p.is_dir());
        drop(d);
        assert!(!p.exists());
    }
}
