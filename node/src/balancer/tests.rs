use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

mod estimates;

use super::tree::tests::{CHI2_DF4_P999, chi_square};
use super::*;
use crate::series::InstanceMetrics;

fn backend(name: &str) -> Arc<Backend> {
    Arc::new(Backend::new(
        Uuid::new_v4(),
        name.to_owned(),
        format!("{name}.internal"),
        InstanceMetrics::new(),
    ))
}

fn group(n: usize, hard_limit: u32) -> (Arc<GroupBalancer>, Vec<Arc<Backend>>) {
    let backends: Vec<_> = (0..n).map(|i| backend(&format!("i-{i}"))).collect();
    let group = Arc::new(GroupBalancer::new(hard_limit));
    group.set_backends(backends.clone());
    (group, backends)
}

#[track_caller]
fn lease(pick: Pick) -> Lease {
    match pick {
        Pick::Selected(lease) => lease,
        other => panic!("expected a selection, got {other:?}"),
    }
}

fn name(lease: &Lease) -> &str {
    &lease.backend().name
}

/// Every tree key matches the backend's counts and down flag.
fn assert_consistent(group: &GroupBalancer) {
    let inner = group.lock();
    assert_eq!(inner.tree.len(), inner.slots.len());
    for (slot, s) in inner.slots.iter().enumerate() {
        let home = s
            .backend
            .home(None)
            .map(|(g, slot)| (Arc::as_ptr(&g), slot));
        assert_eq!(home, Some((std::ptr::from_ref(group), slot)));
        assert_eq!(s.down, s.backend.down());
        assert_eq!(
            inner.tree.get(slot),
            Some(tree::key(s.backend.load(), s.down.is_some()))
        );
    }
}

#[test]
fn no_instances_on_empty() {
    let mut rng = SmallRng::seed_from_u64(1);
    let now = Instant::now();
    let empty = Arc::new(GroupBalancer::new(10));
    assert!(matches!(empty.pick(now, &mut rng), Pick::NoInstances));
    let (emptied, _) = group(1, 10);
    emptied.set_backends(Vec::new());
    assert!(matches!(emptied.pick(now, &mut rng), Pick::NoInstances));
    assert!(emptied.backends().is_empty());
}

#[test]
fn hard_limit_refuses() {
    let (group, backends) = group(2, 2);
    let now = Instant::now();
    let mut rng = SmallRng::seed_from_u64(2);
    let held: Vec<Lease> = (0..4).map(|_| lease(group.pick(now, &mut rng))).collect();
    assert!(backends.iter().all(|b| b.local_inflight() == 2));
    assert!(matches!(group.pick(now, &mut rng), Pick::Overloaded));
    // Refusing counts nothing.
    assert!(backends.iter().all(|b| b.local_inflight() == 2));

    group.set_hard_limit(3);
    let extra = lease(group.pick(now, &mut rng));
    drop(extra);
    group.set_hard_limit(2);
    drop(held);
    let _one = lease(group.pick(now, &mut rng));

    // Peer load counts against the limit too.
    for b in &backends {
        group.set_peer_load(b, 2);
    }
    assert!(matches!(group.pick(now, &mut rng), Pick::Overloaded));

    group.set_hard_limit(0);
    for b in &backends {
        group.set_peer_load(b, 0);
    }
    assert!(matches!(group.pick(now, &mut rng), Pick::Overloaded));
    assert_consistent(&group);
}

/// The seed document's example: in flight i-0:4, i-1:1, i-2:2, i-3:1; the
/// next two picks go to i-1 and i-3, in either order, each first half of the
/// time.
#[test]
fn seed_example() {
    let now = Instant::now();
    let mut first_i1 = 0;
    let runs = 2_000;
    for seed in 0..runs {
        let mut rng = SmallRng::seed_from_u64(seed);
        let (group, b) = group(4, 65_535);
        // Build the table by attaching step by step.
        group.set_backends(vec![b[0].clone()]);
        let mut held: Vec<Lease> = (0..4).map(|_| lease(group.pick(now, &mut rng))).collect();
        group.set_backends(vec![b[0].clone(), b[2].clone()]);
        held.extend((0..2).map(|_| lease(group.pick(now, &mut rng))));
        group.set_backends(b.clone());
        held.extend((0..2).map(|_| lease(group.pick(now, &mut rng))));
        let table: Vec<u64> = b.iter().map(|b| b.local_inflight()).collect();
        assert_eq!(table, [4, 1, 2, 1]);

        let first = lease(group.pick(now, &mut rng));
        let second = lease(group.pick(now, &mut rng));
        let mut names = [name(&first), name(&second)];
        if names[0] == "i-1" {
            first_i1 += 1;
        }
        names.sort_unstable();
        assert_eq!(names, ["i-1", "i-3"]);
        // Now 4, 2, 2, 2: the next one is any of i-1, i-2, i-3.
        let third = lease(group.pick(now, &mut rng));
        assert_ne!(name(&third), "i-0");
        assert_consistent(&group);
    }
    // Binomial(2000, 1/2): 4.5 standard deviations is ±100.
    assert!((900..=1100).contains(&first_i1), "{first_i1}");
}

/// Ties spread uniformly through the whole wrapper (pick + release).
#[test]
fn ties_are_uniform() {
    let (group, backends) = group(5, 65_535);
    let now = Instant::now();
    let mut rng = SmallRng::seed_from_u64(0xba1a);
    let mut hits = [0u64; 5];
    for _ in 0..40_000 {
        let l = lease(group.pick(now, &mut rng));
        let i = backends
            .iter()
            .position(|b| Arc::ptr_eq(b, l.backend()))
            .unwrap();
        hits[i] += 1;
    }
    let stat = chi_square(&hits);
    assert!(stat < CHI2_DF4_P999, "chi-square {stat} for {hits:?}");
    for (b, &h) in backends.iter().zip(&hits) {
        assert_eq!(b.metrics.selected.get(), h);
    }
}

#[test]
fn lease_drop_releases() {
    let (group, b) = group(2, 65_535);
    let now = Instant::now();
    let mut rng = SmallRng::seed_from_u64(3);
    let first = lease(group.pick(now, &mut rng));
    let second = lease(group.pick(now, &mut rng));
    assert_ne!(name(&first), name(&second));
    let freed = Arc::clone(first.backend());
    drop(first);
    assert_eq!(freed.local_inflight(), 0);
    assert_eq!(group.load(&freed), 0);
    let third = lease(group.pick(now, &mut rng));
    assert!(Arc::ptr_eq(third.backend(), &freed));
    drop((second, third));
    assert!(b.iter().all(|b| b.local_inflight() == 0));
    assert_consistent(&group);
}

#[test]
fn peer_load_steers_selection() {
    let (group, b) = group(3, 65_535);
    let now = Instant::now();
    let mut rng = SmallRng::seed_from_u64(4);
    group.set_peer_load(&b[0], 3);
    group.set_peer_load(&b[2], 1);
    assert_eq!(group.load(&b[0]), 3);
    assert_eq!(b[0].peer_load(), 3);
    let l = lease(group.pick(now, &mut rng));
    assert!(Arc::ptr_eq(l.backend(), &b[1]));
    // Now b1 and b2 are at 1.
    let l2 = lease(group.pick(now, &mut rng));
    assert!(!Arc::ptr_eq(l2.backend(), &b[0]));
    assert_consistent(&group);
}

#[test]
fn set_backends_keeps_survivors_and_drops_the_rest() {
    let (group, b) = group(3, 65_535);
    let now = Instant::now();
    let mut rng = SmallRng::seed_from_u64(5);
    let held: Vec<Lease> = (0..6).map(|_| lease(group.pick(now, &mut rng))).collect();
    assert!(b.iter().all(|b| b.local_inflight() == 2));
    group.mark_down(&b[1], now);

    // Keep b1 and b2 (in another order), drop b0, add b3.
    let b3 = backend("i-3");
    group.set_backends(vec![b[2].clone(), b[1].clone(), b3.clone()]);
    let names: Vec<String> = group.backends().iter().map(|b| b.name.clone()).collect();
    assert_eq!(names, ["i-2", "i-1", "i-3"]);
    assert_eq!(b[1].local_inflight(), 2);
    assert_eq!(b[1].state(now), BackendState::Down);
    assert_consistent(&group);

    // b3 (0) first, then b3 and b2 tie; b0 is never chosen again, b1 is down.
    for _ in 0..2 {
        let l = lease(group.pick(now, &mut rng));
        assert!(Arc::ptr_eq(l.backend(), &b3));
        std::mem::forget(l);
    }
    for _ in 0..20 {
        let l = lease(group.pick(now, &mut rng));
        assert!(Arc::ptr_eq(l.backend(), &b3) || Arc::ptr_eq(l.backend(), &b[2]));
    }

    // Leases of the removed backend still decrement its count.
    drop(held);
    assert_eq!(b[0].local_inflight(), 0);
    assert_eq!(b[1].local_inflight(), 0);
    assert_eq!(b[2].local_inflight(), 0);
    assert_consistent(&group);
}

#[test]
fn set_backends_skips_duplicates_and_draining() {
    let (group, b) = group(2, 65_535);
    let draining = backend("gone");
    start_drain(&draining, Duration::from_secs(30));
    group.set_backends(vec![b[0].clone(), b[1].clone(), b[0].clone(), draining]);
    assert_eq!(group.backends().len(), 2);
    assert_consistent(&group);
}

#[test]
fn down_instances_are_skipped_until_all_are_down() {
    let (group, b) = group(3, 65_535);
    let now = Instant::now();
    let mut rng = SmallRng::seed_from_u64(6);
    group.mark_down(&b[0], now);
    group.mark_down(&b[2], now);
    for _ in 0..10 {
        let l = lease(group.pick(now, &mut rng));
        assert!(Arc::ptr_eq(l.backend(), &b[1]));
        std::mem::forget(l); // b1 climbs to 10 while the others stay at 0
    }
    // All down: the minimum over all of them (b0 and b2 at 0).
    group.mark_down(&b[1], now);
    for _ in 0..10 {
        let l = lease(group.pick(now, &mut rng));
        assert!(!Arc::ptr_eq(l.backend(), &b[1]));
    }
    assert_consistent(&group);
}

#[test]
fn down_period_expires_at_now() {
    let (group, b) = group(2, 65_535);
    let t0 = Instant::now();
    let mut rng = SmallRng::seed_from_u64(7);
    let busy = lease(group.pick(t0, &mut rng));
    let (busy_b, idle_b) = if Arc::ptr_eq(busy.backend(), &b[0]) {
        (&b[0], &b[1])
    } else {
        (&b[1], &b[0])
    };
    group.mark_down(idle_b, t0);
    let just_before = t0 + Duration::from_millis(999);
    assert_eq!(idle_b.state(just_before), BackendState::Down);
    let l = lease(group.pick(just_before, &mut rng));
    assert!(Arc::ptr_eq(l.backend(), busy_b));
    drop(l);
    let at = t0 + INITIAL_BACKOFF;
    assert_eq!(idle_b.state(at), BackendState::Up);
    let l = lease(group.pick(at, &mut rng));
    assert!(Arc::ptr_eq(l.backend(), idle_b));
    assert_consistent(&group);
}

#[test]
fn backoff_doubles_caps_and_resets() {
    let (group, b) = group(1, 65_535);
    let b = &b[0];
    let mut now = Instant::now();
    let mut rng = SmallRng::seed_from_u64(8);
    let expect = [1, 2, 4, 8, 16, 30, 30];
    for secs in expect {
        group.mark_down(b, now);
        let until = b.down_until().unwrap();
        assert_eq!(until - now, Duration::from_secs(secs));
        // A failure during the same down period does not double again.
        group.mark_down(b, now + Duration::from_millis(10));
        assert_eq!(b.down_until(), Some(until));
        assert_eq!(b.state(until - Duration::from_nanos(1)), BackendState::Down);
        now = until;
        assert_eq!(b.state(now), BackendState::Up);
        // A pick at expiry clears the down flag in the tree.
        drop(lease(group.pick(now, &mut rng)));
        assert_consistent(&group);
    }
    group.mark_up(b);
    assert_eq!(b.state(now), BackendState::Up);
    group.mark_down(b, now);
    assert_eq!(b.down_until().unwrap() - now, INITIAL_BACKOFF);
    // A success also ends a down period at once.
    group.mark_up(b);
    assert_eq!(b.state(now), BackendState::Up);
    assert_consistent(&group);
    // Detached backends take marks without touching the group.
    let other = backend("other");
    group.mark_down(&other, now);
    group.mark_up(&other);
    group.set_peer_load(&other, 4);
    assert_consistent(&group);
}

/// The health check's hold: out of selection until the check says up,
/// whatever time passes and however many connects succeed meanwhile, and
/// nothing waited for in the group's expiry heap however often it flaps.
#[test]
fn a_checked_down_backend_is_held_until_the_check_says_up() {
    let (group, b) = group(2, 65_535);
    let mut rng = SmallRng::seed_from_u64(9);
    let now = Instant::now();
    for _ in 0..100 {
        set_checked(&b[0], false);
        assert_eq!(b[0].state(now), BackendState::Down);
        assert_eq!(b[0].down(), Some(Down::Held));
        // A successful connect does not end the hold.
        group.mark_up(&b[0]);
        let later = now + Duration::from_secs(3600);
        assert_eq!(b[0].state(later), BackendState::Down);
        for _ in 0..8 {
            assert_eq!(name(&lease(group.pick(later, &mut rng))), "i-1");
        }
        assert_consistent(&group);
        set_checked(&b[0], true);
        assert_eq!(b[0].state(now), BackendState::Up);
        assert_consistent(&group);
    }
    assert!(
        group.lock().expiries.is_empty(),
        "a hold is never waited for: {} entries",
        group.lock().expiries.len()
    );
}

#[test]
fn drain_without_runtime_fires_at_once() {
    let b = backend("i-0");
    assert!(!b.drain_token().is_cancelled());
    start_drain(&b, Duration::from_secs(30));
    assert!(b.is_draining());
    assert_eq!(b.state(Instant::now()), BackendState::Draining);
    assert!(b.drain_token().is_cancelled());
}

/// On the paused clock: the token fires exactly at the first call's
/// timeout, which a second call neither shortens nor extends.
#[tokio::test(start_paused = true)]
async fn drain_fires_after_timeout() {
    let b = backend("i-0");
    let started = tokio::time::Instant::now();
    start_drain(&b, Duration::from_millis(50));
    start_drain(&b, Duration::from_millis(10)); // no effect
    start_drain(&b, Duration::from_secs(3600)); // no effect
    assert!(b.is_draining());
    assert!(!b.drain_token().is_cancelled());
    b.drained().await;
    assert_eq!(started.elapsed(), Duration::from_millis(50));
}

/// Threads pick, hold and release leases while the set changes, instances go
/// down and up and peer loads move; afterwards every count is back to zero
/// and the tree agrees with the backends.
#[test]
fn concurrent_picks_and_releases_balance_out() {
    let (group, backends) = group(16, 40);
    let backends = Arc::new(backends);
    let start = Instant::now();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let group = Arc::clone(&group);
            let backends = Arc::clone(&backends);
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t);
                let mut held = VecDeque::new();
                for i in 0..20_000u32 {
                    let now = start + Duration::from_millis(u64::from(i));
                    if let Pick::Selected(l) = group.pick(now, &mut rng) {
                        held.push_back(l);
                    }
                    if held.len() > rng.random_range(0..12) {
                        held.pop_front();
                    }
                    let b = &backends[rng.random_range(0..backends.len())];
                    match rng.random_range(0..200) {
                        0 => group.mark_down(b, now),
                        1 => group.mark_up(b),
                        2 => group.set_peer_load(b, rng.random_range(0..5)),
                        3 if t == 0 => {
                            let keep = rng.random_range(8..=backends.len());
                            group.set_backends(backends[..keep].to_vec());
                        }
                        _ => {}
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    group.set_backends(backends.to_vec());
    assert!(backends.iter().all(|b| b.local_inflight() == 0));
    assert_consistent(&group);
    let selected: u64 = backends.iter().map(|b| b.metrics.selected.get()).sum();
    assert!(selected > 0);
}

/// A balancer built for a new routing table touches nothing until adopted;
/// then work picked from the old one (releases, down marks) keeps the new
/// tree exact, and the old one stops offering a backend that was detached.
#[test]
fn a_new_balancer_takes_over_from_the_old() {
    let (old, b) = group(3, 65_535);
    let now = Instant::now();
    let mut rng = SmallRng::seed_from_u64(9);
    let held: Vec<Lease> = (0..6).map(|_| lease(old.pick(now, &mut rng))).collect();

    // b0 leaves, b3 arrives.
    let b3 = backend("i-3");
    let new = Arc::new(GroupBalancer::over(
        65_535,
        None,
        vec![b[1].clone(), b[2].clone(), b3.clone()],
    ));
    // Pure: the old balancer is still every backend's home.
    assert_consistent(&old);
    assert_eq!(new.backends().len(), 3);

    new.adopt();
    start_drain(&b[0], Duration::from_secs(30));
    // Releases and a down mark of work picked from the old balancer.
    drop(old.pick(now, &mut rng)); // a pick and a release
    let down = held.iter().position(|l| Arc::ptr_eq(l.backend(), &b[2]));
    if let Some(i) = down {
        held[i].mark_down(now);
    }
    drop(held);
    assert!(b.iter().all(|b| b.local_inflight() == 0));
    assert_consistent(&new);
    assert_eq!(b[2].state(now), BackendState::Down);

    // The old balancer never offers the drained b0 again.
    for _ in 0..50 {
        let l = lease(old.pick(now, &mut rng));
        assert!(!Arc::ptr_eq(l.backend(), &b[0]));
    }
    // The new one prefers b1 and b3 (up, idle) over the down b2.
    for _ in 0..20 {
        let l = lease(new.pick(now, &mut rng));
        assert!(Arc::ptr_eq(l.backend(), &b[1]) || Arc::ptr_eq(l.backend(), &b3));
    }
    assert_consistent(&new);
}

/// Threads pick and release through whichever balancer they last saw while
/// another thread keeps replacing it with a new one over a changing set (as
/// the routing table does). Work still held at the end, picked from older
/// balancers, is released after the newest was adopted: its tree must still
/// agree with the backends.
#[test]
fn balancers_replaced_under_load_end_exact() {
    let backends: Arc<Vec<Arc<Backend>>> =
        Arc::new((0..12).map(|i| backend(&format!("i-{i}"))).collect());
    let first = Arc::new(GroupBalancer::over(30, None, backends.to_vec()));
    first.adopt();
    let current = Arc::new(arc_swap::ArcSwap::new(first));
    let start = Instant::now();
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let current = Arc::clone(&current);
            let backends = Arc::clone(&backends);
            std::thread::spawn(move || {
                let mut rng = SmallRng::seed_from_u64(t);
                let mut held = VecDeque::new();
                for i in 0..20_000u32 {
                    let now = start + Duration::from_millis(u64::from(i));
                    let group = current.load_full();
                    if let Pick::Selected(l) = group.pick(now, &mut rng) {
                        match rng.random_range(0..200) {
                            0 => l.mark_down(now),
                            1..=20 => l.mark_up(),
                            _ => {}
                        }
                        held.push_back(l);
                    }
                    if held.len() > rng.random_range(0..12) {
                        held.pop_front();
                    }
                    if rng.random_range(0..100) == 0 {
                        let b = &backends[rng.random_range(0..backends.len())];
                        group.set_peer_load(b, rng.random_range(0..5));
                    }
                }
                held
            })
        })
        .collect();
    let mut rng = SmallRng::seed_from_u64(99);
    while !workers.iter().all(std::thread::JoinHandle::is_finished) {
        let keep = rng.random_range(6..=backends.len());
        let next = Arc::new(GroupBalancer::over(30, None, backends[..keep].to_vec()));
        current.store(Arc::clone(&next));
        next.adopt();
        std::thread::yield_now();
    }
    let held: Vec<Lease> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    let last = Arc::new(GroupBalancer::over(30, None, backends.to_vec()));
    current.store(Arc::clone(&last));
    last.adopt();
    let older = held
        .iter()
        .filter(|l| !Arc::ptr_eq(&l.group, &last))
        .count();
    assert!(older > 0, "no work held from an older balancer");
    drop(held);
    assert!(backends.iter().all(|b| b.local_inflight() == 0));
    // End every down period (a pick expires them first), then compare.
    drop(last.pick(start + Duration::from_secs(3600), &mut rng));
    assert_consistent(&last);
}

#[test]
fn the_sender_samples_the_backends_ever_picked_while_they_stay_attached() {
    let changes = Arc::new(LoadChanged::default());
    let b: Vec<Arc<Backend>> = (0..4).map(|i| backend(&format!("b{i}"))).collect();
    let g = Arc::new(GroupBalancer::over(
        1_000,
        Some(Arc::clone(&changes)),
        b.clone(),
    ));
    assert!(changes.picked().is_empty(), "nothing picked yet");
    let mut rng = SmallRng::seed_from_u64(7);
    let now = Instant::now();
    // Two picks held: two distinct backends (least loaded first), each
    // registered once however often it is picked.
    let held: Vec<Pick> = (0..2).map(|_| g.pick(now, &mut rng)).collect();
    for _ in 0..20 {
        drop(g.pick(now, &mut rng));
    }
    let ids = |v: Vec<Arc<Backend>>| {
        let mut ids: Vec<Uuid> = v.iter().map(|b| b.uuid).collect();
        ids.sort();
        ids
    };
    let picked = ids(changes.picked());
    let mut all = ids(b.clone());
    all.dedup();
    assert_eq!(picked, all, "every backend was picked once at least");
    assert_eq!(changes.picked().len(), 4, "registered once each");

    // A detached backend (draining) is forgotten; so is one dropped.
    start_drain(&b[0], Duration::from_secs(30));
    drop(held);
    assert_eq!(ids(changes.picked()), ids(b[1..].to_vec()));
    drop(g);
    let survivors = b[1..3].to_vec();
    drop(b);
    assert_eq!(ids(changes.picked()), ids(survivors));
}

#[test]
fn detached_backends_leave_the_registry_without_a_sender() {
    // A node with no peer sends no report, so nothing asks for the picked
    // backends: registrations alone keep the list bounded under churn.
    let changes = Arc::new(LoadChanged::default());
    let mut rng = SmallRng::seed_from_u64(11);
    for _ in 0..1_000 {
        let b = backend("churned");
        let g = Arc::new(GroupBalancer::over(
            1_000,
            Some(Arc::clone(&changes)),
            vec![Arc::clone(&b)],
        ));
        drop(g.pick(Instant::now(), &mut rng));
        start_drain(&b, Duration::from_secs(30));
    }
    let len = changes.picked_list().list.len();
    assert!(
        len <= 64,
        "{len} registrations kept for 0 attached backends"
    );
    assert!(changes.picked().is_empty());
}
