//! The `edgelb` binary's allocator (mimalloc) and the two calls the node
//! makes about it: [`collect`], which gives pages emptied a while ago back
//! to the system, and [`no_transparent_huge_pages`], which keeps the
//! kernel from backing mimalloc's arenas with 2 MiB pages.
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
//! mimalloc also asks the kernel for transparent huge pages on the arenas
//! it reserves (`madvise(MADV_HUGEPAGE)`), and a 2 MiB page is resident as
//! a whole as soon as one byte of it is touched. Idle connections scatter
//! small live blocks over the arenas, so most of those pages hold little
//! (an idle HTTP/2 connection over TLS cost 54 KiB with them, 33 without;
//! the figures and the CPU checked are in the README's "No transparent
//! huge pages"). The binary therefore turns them off for itself at start
//! ([`no_transparent_huge_pages`]), as mimalloc does when
//! `MIMALLOC_ALLOW_THP=0` is set; `MIMALLOC_ALLOW_THP=1` keeps them.
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

/// Turns transparent huge pages off for this process (`prctl(PR_SET_THP_DISABLE)`),
/// unless the environment turns mimalloc's `allow_thp` option on
/// (`MIMALLOC_ALLOW_THP=1`, read as mimalloc reads it: see
/// `allows_huge_pages`); `0` has mimalloc turn them off itself. Call it
/// first thing in `main`: pages faulted in before keep their size. An
/// error is the kernel's refusal.
pub fn no_transparent_huge_pages() -> std::io::Result<()> {
    let asked = std::env::vars_os()
        .find(|(k, _)| k.eq_ignore_ascii_case("MIMALLOC_ALLOW_THP"))
        .is_some_and(|(_, v)| v.to_str().is_some_and(allows_huge_pages));
    if asked {
        return Ok(());
    }
    rustix::thread::disable_transparent_huge_pages(true).map_err(std::io::Error::from)
}

/// Whether a value of `MIMALLOC_ALLOW_THP` turns the option on, as mimalloc
/// reads a boolean option: empty, `1`, `true`, `yes`, `on` (any case) or
/// another integer than 0. A value mimalloc cannot read (it warns and keeps
/// its default) leaves them off here. (mimalloc also reads the variable's
/// name in any case, as [`no_transparent_huge_pages`] does.)
fn allows_huge_pages(value: &str) -> bool {
    ["", "1", "true", "yes", "on"]
        .iter()
        .any(|on| value.eq_ignore_ascii_case(on))
        || value.parse::<i64>().is_ok_and(|n| n != 0)
}

#[cfg(test)]
mod tests {
    use super::allows_huge_pages;

    #[test]
    fn the_option_is_read_as_mimalloc_reads_a_boolean() {
        for on in ["1", "", "TRUE", "yes", "On", "2", "-1", "+1"] {
            assert!(allows_huge_pages(on), "{on:?}");
        }
        for off in ["0", "false", "NO", "off", "00", "maybe", " 1"] {
            assert!(!allows_huge_pages(off), "{off:?}");
        }
    }
}
