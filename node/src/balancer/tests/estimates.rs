//! Fractional peer loads from gossip estimates, and `hard_limit` on them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gossip::{Entry, GroupView, LOAD_ONE, LoadTable, PeerLoad, Report};
use rand::SeedableRng;
use rand::rngs::SmallRng;

use super::{group, lease};
use crate::balancer::{GroupBalancer, Pick};

fn load(select: f64, admit: f64) -> PeerLoad {
    PeerLoad {
        select: gossip::to_fixed(select),
        admit: gossip::to_fixed(admit),
    }
}

/// Fifty picks from `group` all select instance `name` (each released
/// before the next).
#[track_caller]
fn always_picks(group: &Arc<GroupBalancer>, rng: &mut SmallRng, name: &str) {
    for _ in 0..50 {
        let l = lease(group.pick(Instant::now(), rng));
        assert_eq!(l.backend().name, name);
    }
}

/// Loads listed out of slot order still reach each backend's key: one
/// not at its place in the list is re-keyed at its slot.
#[test]
fn loads_listed_out_of_slot_order_reach_their_backends() {
    let (group, b) = group(3, 1000);
    group.set_peer_loads([
        (b[2].as_ref(), load(5.0, 5.0)),
        (b[0].as_ref(), load(0.0, 0.0)),
        (b[1].as_ref(), load(5.0, 5.0)),
    ]);
    let mut rng = SmallRng::seed_from_u64(5);
    always_picks(&group, &mut rng, "i-0");
    // And a later change of the same backends, in slot order.
    group.set_peer_loads([
        (b[0].as_ref(), load(7.0, 7.0)),
        (b[1].as_ref(), load(6.0, 6.0)),
        (b[2].as_ref(), load(0.5, 0.5)),
    ]);
    always_picks(&group, &mut rng, "i-2");
}

/// A refresh that still holds an older balancer (a newer one adopted its
/// backends meanwhile) re-keys the backends in their new home too: the new
/// balancer selects by the new loads.
#[test]
fn loads_set_on_a_replaced_balancer_reach_the_new_home() {
    let (old, b) = group(2, 1000);
    let new = Arc::new(GroupBalancer::new(1000));
    new.set_backends(b.clone());
    old.set_peer_loads([
        (b[0].as_ref(), load(5.0, 5.0)),
        (b[1].as_ref(), load(0.0, 0.0)),
    ]);
    let mut rng = SmallRng::seed_from_u64(9);
    always_picks(&new, &mut rng, "i-1");
}

/// Estimates a fraction apart are not rounded together: 0.4 beats 0.6
/// every time (whole counts would tie them at 0 and 1 would win half the
/// picks, or round both to 1… or 0).
#[test]
fn fractions_steer_selection() {
    let (group, b) = group(2, 1000);
    group.set_peer_loads([
        (b[0].as_ref(), load(0.6, 0.6)),
        (b[1].as_ref(), load(0.4, 0.4)),
    ]);
    let mut rng = SmallRng::seed_from_u64(3);
    always_picks(&group, &mut rng, "i-1");
    // Whole loads still tie exactly (the rule with fresh reports).
    group.set_peer_loads([
        (b[0].as_ref(), load(2.0, 2.0)),
        (b[1].as_ref(), load(2.0, 2.0)),
    ]);
    let mut seen = [0u32; 2];
    for _ in 0..200 {
        let l = lease(group.pick(Instant::now(), &mut rng));
        seen[usize::from(l.backend().name == "i-1")] += 1;
    }
    assert!(seen[0] > 60 && seen[1] > 60, "{seen:?}");
    assert_eq!(b[0].peer_load(), 2);
    assert_eq!(b[0].peer_load_fixed(), 2 * LOAD_ONE);
}

#[test]
fn hard_limit_admits_on_reported_work_only() {
    let (group, b) = group(2, 2);
    let mut rng = SmallRng::seed_from_u64(4);
    // Predicted picks put both at 2.5 for selection; reported work is 1.5
    // on the second: admitted, there.
    group.set_peer_loads([
        (b[0].as_ref(), load(2.5, 2.0)),
        (b[1].as_ref(), load(2.5, 1.5)),
    ]);
    let l = lease(group.pick(Instant::now(), &mut rng));
    assert_eq!(l.backend().name, "i-1");
    // Now it is at 2.5 for admission too (its own lease counts): refused.
    assert!(matches!(
        group.pick(Instant::now(), &mut rng),
        Pick::Overloaded
    ));
    drop(l);
    // Below the limit on the estimate: the rule as usual.
    group.set_peer_loads([
        (b[0].as_ref(), load(0.5, 0.5)),
        (b[1].as_ref(), load(1.5, 1.5)),
    ]);
    assert_eq!(
        lease(group.pick(Instant::now(), &mut rng)).backend().name,
        "i-0"
    );
}

/// Near the limit the pick goes by reported work, and instances tied on
/// it are drawn uniformly, as the rule's ties are (the first of them took
/// every such pick before).
#[test]
fn ties_at_the_limit_are_drawn_uniformly() {
    let (group, b) = group(6, 2);
    let mut rng = SmallRng::seed_from_u64(9);
    // Predicted picks put every instance at the limit; reported work ties
    // five of them at 1 and the sixth at 1.5.
    group.set_peer_loads(b.iter().enumerate().map(|(i, b)| {
        let admit = if i == 0 { 1.5 } else { 1.0 };
        (b.as_ref(), load(2.5, admit))
    }));
    let mut seen = [0_u32; 6];
    for _ in 0..5_000 {
        let l = lease(group.pick(Instant::now(), &mut rng));
        seen[b
            .iter()
            .position(|x| x.name == l.backend().name)
            .expect("one of the group")] += 1;
    }
    assert_eq!(seen[0], 0, "{seen:?}");
    let tied: Vec<u64> = seen[1..].iter().map(|&n| u64::from(n)).collect();
    assert!(
        crate::balancer::tree::tests::chi_square(&tied)
            < crate::balancer::tree::tests::CHI2_DF4_P999,
        "{seen:?}"
    );
}

/// A peer that picked hard and then crashed: its predicted picks grow in
/// the estimate until its report expires, and never refuse a request while
/// what the instances really carry (here: nothing) is under the limit.
#[test]
fn a_crashed_peers_phantom_load_never_refuses() {
    let t0 = Instant::now();
    let config = gossip::Config::default();
    let (group, b) = group(4, 3);
    let ids: Vec<[u8; 16]> = b.iter().map(|b| b.uuid.into_bytes()).collect();
    let mut table = LoadTable::new(config.ttl);
    // 2 000 picks/s over the group, 100 ms each; 2 in flight per instance.
    let entries = {
        let mut e: Vec<Entry> = ids
            .iter()
            .map(|&instance| Entry {
                instance,
                inflight: 2,
                long_inflight: 0,
                arrival_rate_milli: 500_000,
                mean_service_us: 100_000,
            })
            .collect();
        e.sort_by_key(|e| e.instance);
        e
    };
    let report = Report {
        node_id: 9,
        incarnation: 1,
        seq: 1,
        sent_at_ms: 0,
        entries,
    };
    table.insert(report, t0);
    let mut view = GroupView::new(&ids);
    let mut out = Vec::new();
    let mut rng = SmallRng::seed_from_u64(5);
    let mut phantom = 0;
    let step = Duration::from_millis(10);
    let mut now = t0;
    while now <= t0 + config.ttl {
        view.estimate(&config, &table.snapshot(), now, &mut out);
        group.set_peer_loads(b.iter().map(AsRef::as_ref).zip(out.iter().copied()));
        let estimated = out.iter().map(|l| l.select).min().unwrap_or(0);
        if estimated >= 3 * LOAD_ONE {
            phantom += 1;
        }
        // At most 2 reported per instance, decaying: always room for one.
        let l = lease(group.pick(now, &mut rng));
        drop(l);
        now += step;
    }
    assert!(
        phantom > 50,
        "the estimate was at the limit in {phantom} steps"
    );
}
