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
//! exactly, and read at every pick. The oracle bounds what any reading of
//! reports `age` old can reach (`docs/gossip-sim.md`, "What reports of an
//! age can tell").

use std::collections::VecDeque;

use crate::engine::Ns;

/// What an oracle knows of the peers beyond their counts `age` ago.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Knows {
    /// Nothing: completions and picks since are the estimator's guess.
    Nothing,
    /// Which of the peers' requests completed since (only their new picks
    /// are guessed).
    Completions,
    /// Where the peers sent their requests since (only the completions are
    /// guessed).
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

/// Each node's true in-flight count per instance, and the picks (+1) and
/// completions (−1) of the last `keep` ns, oldest first.
pub(crate) struct History {
    keep: Ns,
    counts: Vec<Vec<i64>>,
    events: Vec<Vec<VecDeque<(Ns, i8)>>>,
    /// Per instance, the mean time a request spends in flight there
    /// (exponentially weighted over the last ~100 requests).
    flight: Vec<f64>,
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
        self.push(node, instance, now, 1);
    }

    /// A request picked by `node` completed after `flight` seconds.
    pub(crate) fn completed(&mut self, node: usize, instance: usize, now: Ns, flight: f64) {
        self.counts[node][instance] -= 1;
        self.push(node, instance, now, -1);
        let mean = &mut self.flight[instance];
        *mean += (flight - *mean) * FLIGHT_WEIGHT;
    }

    fn push(&mut self, node: usize, instance: usize, now: Ns, step: i8) {
        let events = &mut self.events[node][instance];
        events.push_back((now, step));
        while events.front().is_some_and(|&(t, _)| t + self.keep < now) {
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
                let (mut picks, mut completions) = (0i64, 0i64);
                for &(_, step) in self.events[peer][i].iter().filter(|(t, _)| *t > since) {
                    if step > 0 {
                        picks += 1;
                    } else {
                        completions += 1;
                    }
                }
                let now_count = self.counts[peer][i];
                let then = (now_count - picks + completions) as f64;
                let survival = (-a / self.flight[i]).exp();
                *load += match knows {
                    Knows::Nothing => then * survival,
                    Knows::Completions => (now_count - picks) as f64,
                    Knows::Picks => then * survival + picks as f64,
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
