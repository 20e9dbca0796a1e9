//! What a directed link between two nodes does to a datagram: the plain
//! decision behind the [`crate::relay::Relay`] (no sockets, no clock; the
//! caller passes the RNG).
//!
//! A [`Link`] is cut (`up == false`: everything dropped), lossy (each
//! datagram dropped with probability `loss`) and slow (each datagram held for
//! `delay` ± `jitter`, drawn uniformly per datagram, so a jitter larger than
//! the gap between two datagrams reorders them, as a real network does).

use std::time::Duration;

use rand::Rng;

/// The behaviour of one directed link (from → to).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// One-way delay.
    pub delay: Duration,
    /// Each datagram's delay is drawn from `delay ± jitter`.
    pub jitter: Duration,
    /// Probability (0 to 1) that a datagram is dropped.
    pub loss: f64,
    /// `false`: the link is cut and drops everything.
    pub up: bool,
}

impl Default for Link {
    /// A perfect link: up, no delay, no loss.
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            up: true,
        }
    }
}

/// What happens to one datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Delivered after this long (zero: at once).
    Deliver(Duration),
    /// Dropped because the link is cut.
    Cut,
    /// Dropped by the loss probability.
    Lost,
}

impl Link {
    /// A link delayed by `delay` ± `jitter`, otherwise perfect.
    pub fn delayed(delay: Duration, jitter: Duration) -> Self {
        Self {
            delay,
            jitter,
            ..Self::default()
        }
    }

    /// Decides one datagram's fate.
    pub fn fate(&self, rng: &mut impl Rng) -> Fate {
        if !self.up {
            return Fate::Cut;
        }
        if self.loss > 0.0 && rng.random_bool(self.loss.clamp(0.0, 1.0)) {
            return Fate::Lost;
        }
        if self.jitter.is_zero() {
            return Fate::Deliver(self.delay);
        }
        let lo = self.delay.saturating_sub(self.jitter);
        let hi = self.delay + self.jitter;
        let nanos = rng.random_range(lo.as_nanos()..=hi.as_nanos());
        Fate::Deliver(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX),
        ))
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::SmallRng;

    use super::*;

    #[test]
    fn a_cut_link_drops_everything() {
        let mut rng = SmallRng::seed_from_u64(1);
        let link = Link {
            up: false,
            ..Link::default()
        };
        assert!((0..100).all(|_| link.fate(&mut rng) == Fate::Cut));
    }

    #[test]
    fn loss_drops_about_that_share() {
        let mut rng = SmallRng::seed_from_u64(2);
        let link = Link {
            loss: 0.3,
            ..Link::default()
        };
        let lost = (0..10_000)
            .filter(|_| link.fate(&mut rng) == Fate::Lost)
            .count();
        assert!((2_700..3_300).contains(&lost), "{lost}");
    }

    #[test]
    fn delays_stay_within_the_jitter() {
        let mut rng = SmallRng::seed_from_u64(3);
        let link = Link::delayed(Duration::from_millis(100), Duration::from_millis(20));
        let mut seen = Vec::new();
        for _ in 0..1_000 {
            let Fate::Deliver(d) = link.fate(&mut rng) else {
                panic!("a delayed link delivers")
            };
            assert!(d >= Duration::from_millis(80) && d <= Duration::from_millis(120));
            seen.push(d);
        }
        // Not one fixed value: the jitter is drawn per datagram.
        assert!(seen.iter().any(|d| *d < Duration::from_millis(90)));
        assert!(seen.iter().any(|d| *d > Duration::from_millis(110)));
        let exact = Link::delayed(Duration::from_millis(5), Duration::ZERO);
        assert_eq!(
            exact.fate(&mut rng),
            Fate::Deliver(Duration::from_millis(5))
        );
    }
}
