//! Load gossip between edge nodes: each node reports its in-flight counts per
//! instance to its peers so that every node can estimate the global load.
//!
//! The wire format, the per-peer load table and the QUIC transport live here;
//! the node's balancer reads the merged estimates.
