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
//! therefore calls [`collect`] once a second while it holds connections
//! and for three seconds after (`node/src/workers.rs`).
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
//! The allocator itself ([`MiMalloc`]) asks mimalloc for a plain block
//! (`mi_malloc`) whenever every block already has the alignment wanted,
//! which is nearly always. The `mimalloc` crate's allocator asks for an
//! aligned one every time (`mi_malloc_aligned`), and mimalloc serves an
//! aligned request over 1 KiB whose size is not a power of two (or any,
//! when the page's free list is empty) through its generic path,
//! over-allocating by the alignment: the future boxed for each kept-alive
//! request went that way (callgrind: 16,899
//! → 16,530 instructions per request on the worker with plain blocks;
//! `README.md`, "What the lean path still spent on itself").
//!
//! This crate holds the workspace's only `unsafe` code: these FFI calls;
//! the other crates forbid unsafe code.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// mimalloc as the global allocator.
#[derive(Clone, Copy, Debug, Default)]
pub struct MiMalloc;

/// The alignment every mimalloc block has: its size classes are multiples
/// of the word size, carved from word-aligned pages; mimalloc's own
/// `mi_realloc_aligned` takes the plain path up to this alignment too.
/// (Builds with guarded pages, `MI_GUARDED`, which needs the `debug`
/// feature, may place a block unaligned; this workspace never enables it.)
const BLOCK_ALIGN: usize = std::mem::size_of::<usize>();

/// Whether a plain block serves `layout`.
fn plain(align: usize) -> bool {
    align <= BLOCK_ALIGN
}

// SAFETY: each method hands mimalloc's own pointers back to it: `mi_free`
// and `mi_realloc*` accept any block mimalloc allocated, plain or aligned;
// a plain block is only used when its guaranteed alignment suffices, and
// `mi_realloc_aligned` keeps a block aligned as its layout asks.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: mimalloc's allocation calls take any size and alignment
        // (`Layout` makes the alignment a power of two).
        unsafe {
            if plain(layout.align()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe {
            if plain(layout.align()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`'s alignment,
        // which the new block keeps.
        unsafe {
            if plain(layout.align()) {
                mi::mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

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
    use super::{GlobalAlloc, Layout, MiMalloc, allows_huge_pages};

    #[test]
    #[allow(unsafe_code)]
    fn blocks_have_the_alignment_asked_and_keep_their_bytes() {
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in (1..=70).chain([100, 1000, 1800, 2049, 4000, 70_000, 3 << 20]) {
                let layout = Layout::from_size_align(size, align).expect("layout");
                // SAFETY: a non-zero size; each block is freed once, with
                // its layout.
                unsafe {
                    let zeroed = MiMalloc.alloc_zeroed(layout);
                    assert!(!zeroed.is_null());
                    assert_eq!(zeroed as usize % align, 0, "zeroed {size} aligned {align}");
                    assert!(
                        std::slice::from_raw_parts(zeroed, size)
                            .iter()
                            .all(|&b| b == 0)
                    );
                    let p = MiMalloc.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "{size} aligned {align}");
                    p.write_bytes(0xab, size);
                    let grown = MiMalloc.realloc(p, layout, size * 3);
                    assert!(!grown.is_null());
                    assert_eq!(grown as usize % align, 0, "grown {size} aligned {align}");
                    assert!(
                        std::slice::from_raw_parts(grown, size)
                            .iter()
                            .all(|&b| b == 0xab)
                    );
                    MiMalloc.dealloc(zeroed, layout);
                    let grown_layout = Layout::from_size_align(size * 3, align).expect("layout");
                    MiMalloc.dealloc(grown, grown_layout);
                }
            }
        }
    }

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
