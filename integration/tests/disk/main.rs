//! A node and its disk: a full disk refuses writes with 507 and recovers by
//! itself ([`full`]), and seeded storage faults lose no acknowledged write
//! and leave no node alive but unable to write ([`faults`]); corrupted files
//! stop the start with the way out, which recovers every write ([`corrupt`]).

mod corrupt;
mod faults;
mod floor;
mod full;
mod harness;
