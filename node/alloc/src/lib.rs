//! The `edgelb` binary's allocator (mimalloc) and the one call the node
//! makes to it: [`collect`], which gives pages emptied a while ago back to
//! the system.
//!
//! mimalloc returns an emptied page to the system only after a delay (1 s),
//! and checks that delay when the thread that owns the page next works in
//! the allocator, not by a timer. A data-plane worker that goes quiet after
//! a burst of connections would keep every page the burst emptied: 8,000
//! idle keep-alive clients cost 24.0 KiB each of resident memory that way
//! (`bench/idle.sh`), most of it pages that hold nothing. Each worker
//! therefore calls [`collect`] once a second (`node/src/workers.rs`).
//! Setting the delay to zero instead returns the memory too, but on every
//! `free` that empties a page: a `madvise` and page faults when the page is
//! used again, about 6 % more CPU per new connection in one A/B run.
//!
//! This crate holds the workspace's only `unsafe` code, that one FFI call;
//! the other crates forbid unsafe code.

pub use mimalloc::MiMalloc;

/// Frees the calling thread's empty mimalloc pages and returns to the
/// system those emptied longer than mimalloc's purge delay ago
/// (`MIMALLOC_PURGE_DELAY`, milliseconds). Cheap when there is nothing to
/// free: it visits the thread's pages, not their blocks. Harmless where
/// mimalloc is not the global allocator (its heaps are then empty).
pub fn collect() {
    // SAFETY: `mi_collect` takes no pointer and works on the calling
    // thread's own heap; mimalloc allows it at any time on any thread.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(false);
    }
}
