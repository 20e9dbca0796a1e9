//! Back-off on wrong admin tokens, per client address.
//!
//! ```text
//!  request with a token ─▶ admin token? ── yes ─▶ forget(addr) ─▶ handler
//!                                  │ no
//!                                  ▼
//!                           failed(addr, now) ─▶ 401 (the `failures`-th within
//!                                                `window` starts a period)
//!
//!  either way, while slowed(addr, now): the answer waits SLOW_ANSWER (1 s)
//! ```
//!
//! As a login's failure delay (`pam_faildelay`, OpenSSH) grown by
//! fail2ban's `bantime.increment`: `failures` wrong tokens from one address
//! within `window` hold that address back for `block`; each further period
//! of the same address doubles, up to `block_max`. While held back, every
//! answer to its requests with a token waits [`super::guard::SLOW_ANSWER`],
//! right or wrong alike (a quick answer would tell a right guess). Every
//! answer stays what SPEC §6 says (401 for a missing or wrong token), and
//! the right token is still served, and clears the address's record:
//! refusing it would lock an operator out behind a script's wrong guesses.
//! Other addresses are never affected. IPv6 clients are counted per /64
//! (one host usually holds a whole /64).
//!
//! The table is bounded ([`MAX_ADDRESSES`]): when it is full, stale records
//! go first, then the eighth whose last failures are oldest (addresses held
//! back last). Only wrong tokens touch it; a request without a token is a
//! plain 401 and is not counted.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Addresses remembered at most (about 64 bytes each).
pub(crate) const MAX_ADDRESSES: usize = 16_384;

/// The back-off's settings (`admin_auth_*` config keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuthBackoff {
    /// Wrong tokens from one address within `window` that start a block;
    /// 0 turns the back-off off.
    pub failures: u32,
    /// The window the failures are counted in.
    pub window: Duration,
    /// The first block; each further block of the same address doubles.
    pub block: Duration,
    /// The longest block.
    pub block_max: Duration,
}

impl Default for AuthBackoff {
    fn default() -> Self {
        Self {
            failures: 10,
            window: Duration::from_secs(60),
            block: Duration::from_secs(10),
            block_max: Duration::from_secs(15 * 60),
        }
    }
}

/// What is known of one address.
#[derive(Clone, Copy, Debug)]
struct Record {
    /// Failures in the current window.
    failures: u32,
    /// Start of the current window.
    window_start: Instant,
    /// The last failure (for eviction and forgetting).
    last: Instant,
    /// Blocked until then.
    blocked_until: Option<Instant>,
    /// Blocks so far: the next one lasts `block * 2^blocks`.
    blocks: u32,
}

/// The table of addresses with recent wrong tokens.
#[derive(Debug)]
pub(crate) struct Backoff {
    settings: AuthBackoff,
    records: Mutex<HashMap<IpAddr, Record>>,
}

impl Backoff {
    pub(crate) fn new(settings: AuthBackoff) -> Self {
        Self {
            settings,
            records: Mutex::new(HashMap::new()),
        }
    }

    fn enabled(&self) -> bool {
        self.settings.failures > 0
    }

    /// How long `addr` is still held back at `now`, if it is.
    pub(crate) fn slowed(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        if !self.enabled() {
            return None;
        }
        let records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let until = records.get(&key(addr))?.blocked_until?;
        until.checked_duration_since(now).filter(|d| !d.is_zero())
    }

    /// Counts a wrong token from `addr`; returns the block it started, if
    /// this failure started one.
    pub(crate) fn failed(&self, addr: IpAddr, now: Instant) -> Option<Duration> {
        if !self.enabled() {
            return None;
        }
        let s = self.settings;
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let k = key(addr);
        if !records.contains_key(&k) && records.len() >= MAX_ADDRESSES {
            make_room(&mut records, &s, now);
        }
        let r = records.entry(k).or_insert(Record {
            failures: 0,
            window_start: now,
            last: now,
            blocked_until: None,
            blocks: 0,
        });
        if r.blocked_until.is_some_and(|until| until <= now) {
            // A block ended: a fresh window, the count of blocks kept.
            r.blocked_until = None;
            r.failures = 0;
            r.window_start = now;
        }
        if now.saturating_duration_since(r.window_start) > s.window {
            r.failures = 0;
            r.window_start = now;
        }
        r.failures = r.failures.saturating_add(1);
        r.last = now;
        if r.failures < s.failures || r.blocked_until.is_some() {
            return None;
        }
        let block = s
            .block
            .saturating_mul(1_u32.checked_shl(r.blocks).unwrap_or(u32::MAX))
            .min(s.block_max);
        r.blocked_until = Some(now + block);
        r.blocks = r.blocks.saturating_add(1);
        Some(block)
    }

    /// A right token from `addr`: its record is dropped.
    pub(crate) fn succeeded(&self, addr: IpAddr) {
        if !self.enabled() {
            return;
        }
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        if !records.is_empty() {
            records.remove(&key(addr));
        }
    }

    /// Addresses held back at `now`.
    pub(crate) fn slowed_count(&self, now: Instant) -> usize {
        let records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        records
            .values()
            .filter(|r| r.blocked_until.is_some_and(|u| u > now))
            .count()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Drops stale records (not blocked, nothing within the window or the
/// longest block); if that freed nothing, the eighth of the records whose
/// last failure is oldest, blocked ones last. Either way the next
/// `MAX_ADDRESSES / 8` new addresses find room without another pass, so a
/// flood from many addresses costs O(1) per wrong token, amortized.
fn make_room(records: &mut HashMap<IpAddr, Record>, s: &AuthBackoff, now: Instant) {
    let memory = s.window.max(s.block_max);
    let blocked = |r: &Record| r.blocked_until.is_some_and(|u| u > now);
    records.retain(|_, r| blocked(r) || now.saturating_duration_since(r.last) <= memory);
    if records.len() < MAX_ADDRESSES {
        return;
    }
    let mut order: Vec<(bool, Instant)> = records.values().map(|r| (blocked(r), r.last)).collect();
    let evict = MAX_ADDRESSES / 8;
    let (_, cutoff, _) = order.select_nth_unstable(evict - 1);
    let cutoff = *cutoff;
    let mut left = evict;
    records.retain(|_, r| {
        let goes = left > 0 && (blocked(r), r.last) <= cutoff;
        left -= usize::from(goes);
        !goes
    });
}

/// The table key: an IPv4 address (also when written as IPv4-mapped IPv6),
/// or an IPv6 address's /64 (one host usually holds a whole /64). The
/// admin port's per-address connection limit counts by it too.
pub(crate) fn key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1_u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

    fn backoff() -> Backoff {
        Backoff::new(AuthBackoff {
            failures: 3,
            window: Duration::from_secs(60),
            block: Duration::from_secs(10),
            block_max: Duration::from_secs(35),
        })
    }

    #[test]
    fn the_nth_failure_within_the_window_blocks_that_address_only() {
        let b = backoff();
        let t = Instant::now();
        assert_eq!(b.failed(A, t), None);
        assert_eq!(b.failed(A, t + Duration::from_secs(1)), None);
        assert_eq!(b.slowed(A, t + Duration::from_secs(1)), None);
        let third = t + Duration::from_secs(2);
        assert_eq!(b.failed(A, third), Some(Duration::from_secs(10)));
        assert_eq!(
            b.slowed(A, third + Duration::from_secs(4)),
            Some(Duration::from_secs(6))
        );
        assert_eq!(b.slowed(B, third), None);
        assert_eq!(b.slowed_count(third), 1);
        // Failures while blocked do not extend the block.
        assert_eq!(b.failed(A, third + Duration::from_secs(1)), None);
        assert_eq!(b.slowed(A, third + Duration::from_secs(10)), None);
        assert_eq!(b.slowed_count(third + Duration::from_secs(10)), 0);
    }

    #[test]
    fn failures_spread_over_more_than_the_window_do_not_block() {
        let b = backoff();
        let t = Instant::now();
        for i in 0..10 {
            assert_eq!(b.failed(A, t + Duration::from_secs(31 * i)), None, "{i}");
        }
    }

    #[test]
    fn blocks_double_up_to_the_longest() {
        let b = backoff();
        let mut t = Instant::now();
        let mut blocks = Vec::new();
        for _ in 0..4 {
            let mut started = None;
            for _ in 0..3 {
                started = b.failed(A, t);
            }
            let block = started.expect("a block");
            blocks.push(block.as_secs());
            t += block;
        }
        assert_eq!(blocks, [10, 20, 35, 35]);
    }

    #[test]
    fn a_right_token_clears_the_record() {
        let b = backoff();
        let t = Instant::now();
        b.failed(A, t);
        b.failed(A, t);
        b.succeeded(A);
        assert_eq!(b.failed(A, t), None);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn off_when_failures_is_zero() {
        let b = Backoff::new(AuthBackoff {
            failures: 0,
            ..AuthBackoff::default()
        });
        let t = Instant::now();
        for _ in 0..100 {
            assert_eq!(b.failed(A, t), None);
        }
        assert_eq!(b.slowed(A, t), None);
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn the_table_is_bounded_and_keeps_blocked_addresses() {
        let b = backoff();
        let t = Instant::now();
        for _ in 0..3 {
            b.failed(A, t);
        }
        for i in 0..(MAX_ADDRESSES as u32 + 100) {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            b.failed(ip, t + Duration::from_millis(1));
        }
        assert!(b.len() <= MAX_ADDRESSES, "{}", b.len());
        assert!(b.len() > MAX_ADDRESSES / 2, "{}", b.len());
        assert!(b.slowed(A, t + Duration::from_secs(1)).is_some());
    }

    #[test]
    fn ipv6_is_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let z: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(key(x), key(y));
        assert_ne!(key(x), key(z));
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(key(mapped), A);
    }
}
