//! Oracles: what a node could do with better reports than gossip can give.
//!
//! An oracle skips the reports. At every pick it reads the peers' true
//! in-flight counts as they were `age` ago, straight from the simulation,
//! and turns them into the peers' part of the load by the estimator's
//! formula (`gossip::Estimator` docs): each count decayed by its instance's
//! expected completions since, plus the peers' expected new picks poured
//! onto the lowest instances. What it [`Knows`] besides replaces part of
//! that guess with the truth, which splits the estimate's error into the
//! part the completions cause and the part the picks cause.
//!
//! Nothing here is something a node can have: the counts are exact, dated
//! exactly, and read at every pick.
//!
//! Meant for the scenarios it is used on: one group (the peers' picks are
//! poured over all instances as one pool), no long-lived requests (all
//! work decays, where the estimator keeps the long-lived part) and no
//! faults (a peer that is down is left out with its requests still at the
//! instances, and the traffic it passed on is not added to the node that
//! took it). The oracle bounds what any reading of
//! reports `age` old can reach (`docs/gossip-sim.md`, "What reports of an
//! age can tell").

use std::collections::VecDeque;

use crate::engine::Ns;

/// What an oracle knows of the peers beyond their counts `age` ago.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Knows {
    /// Nothing: completions and picks since are the estimator's guess.
    Nothing,
    /// Which of the requests the peers had in flight `age` ago have
    /// completed since (their new picks, and how many of those are in
    /// flight still, are the estimator's guess).
    Completions,
    /// Where the peers sent their requests since (only completions are
    /// guessed: each request's chance to be in flight still, by its
    /// instance's mean time in flight).
    Picks,
}

impl Knows {
    pub fn label(self) -> &'static str {
        match self {
            Self::Nothing => "counts only",
            Self::Completions => "+ completions since",
            Self::Picks => "+ picks since",
        }
    }
}

/// Each node's true in-flight count per instance, and the picks and
/// completions of the last `keep` ns, oldest first.
pub(crate) struct History {
    keep: Ns,
    counts: Vec<Vec<i64>>,
    events: Vec<Vec<VecDeque<Event>>>,
    /// Per instance, the mean time a request spends in flight there
    /// (exponentially weighted over the last ~100 requests).
    flight: Vec<f64>,
}

/// A pick (at the time it was picked) or a completion.
#[derive(Clone, Copy, Debug)]
struct Event {
    at: Ns,
    /// When the request was picked (`at` for a pick).
    picked: Ns,
    done: bool,
}

/// Weight of the newest request in [`History`]'s mean time in flight.
const FLIGHT_WEIGHT: f64 = 0.01;

impl History {
    pub(crate) fn new(nodes: usize, instances: usize, keep: Ns, mean_service: f64) -> Self {
        Self {
            keep,
            counts: vec![vec![0; instances]; nodes],
            events: vec![vec![VecDeque::new(); instances]; nodes],
            flight: vec![mean_service; instances],
        }
    }

    pub(crate) fn picked(&mut self, node: usize, instance: usize, now: Ns) {
        self.counts[node][instance] += 1;
        let pick = Event {
            at: now,
            picked: now,
            done: false,
        };
        self.push(node, instance, pick);
    }

    /// A request picked by `node` at `picked` completed.
    pub(crate) fn completed(&mut self, node: usize, instance: usize, now: Ns, picked: Ns) {
        self.counts[node][instance] -= 1;
        let done = Event {
            at: now,
            picked,
            done: true,
        };
        self.push(node, instance, done);
        let flight = now.saturating_sub(picked) as f64 / 1e9;
        let mean = &mut self.flight[instance];
        *mean += (flight - *mean) * FLIGHT_WEIGHT;
    }

    fn push(&mut self, node: usize, instance: usize, event: Event) {
        let events = &mut self.events[node][instance];
        events.push_back(event);
        while events.front().is_some_and(|e| e.at + self.keep < event.at) {
            events.pop_front();
        }
    }

    /// The peers' part of each instance's load as `me` estimates it at
    /// `now` from their counts `age` ns ago; `rates` are the nodes' arrival
    /// rates (per second), `up` whether each takes traffic.
    pub(crate) fn peer_loads(
        &self,
        me: usize,
        now: Ns,
        age: Ns,
        knows: Knows,
        rates: &[f64],
        up: &[bool],
    ) -> Vec<f64> {
        let k = self.flight.len();
        let since = now.saturating_sub(age);
        let a = age as f64 / 1e9;
        let tau = self.flight.iter().sum::<f64>() / k.max(1) as f64;
        let mut load = vec![0.0f64; k];
        let mut pour = 0.0;
        for peer in (0..self.counts.len()).filter(|&p| p != me && up[p]) {
            for (i, load) in load.iter_mut().enumerate() {
                let tau_i = self.flight[i];
                // Since `since`: new picks, and completions of requests
                // picked before it (old) and after it (new).
                let (mut picks, mut old_done, mut new_done) = (0i64, 0i64, 0i64);
                // Σ over the new picks of their chance to be in flight still.
                let mut new_alive = 0.0;
                for e in self.events[peer][i].iter().filter(|e| e.at > since) {
                    match (e.done, e.picked > since) {
                        (false, _) => {
                            picks += 1;
                            let age = now.saturating_sub(e.at) as f64 / 1e9;
                            new_alive += (-age / tau_i).exp();
                        }
                        (true, true) => new_done += 1,
                        (true, false) => old_done += 1,
                    }
                }
                let now_count = self.counts[peer][i];
                let then = (now_count - picks + old_done + new_done) as f64;
                let survival = (-a / tau_i).exp();
                *load += match knows {
                    Knows::Nothing => then * survival,
                    // The old requests in flight now, exactly.
                    Knows::Completions => then - old_done as f64,
                    Knows::Picks => then * survival + new_alive,
                };
            }
            if knows != Knows::Picks {
                pour += rates[peer] * tau * (1.0 - (-a / tau).exp());
            }
        }
        if pour > 0.0 {
            let level = gossip::water_level(&load, pour);
            for l in &mut load {
                *l = l.max(level);
            }
        }
        load
    }
}
