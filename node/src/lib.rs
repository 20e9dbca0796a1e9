//! edgelb node library.

pub mod balancer;
pub mod metrics;
