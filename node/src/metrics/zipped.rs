//! `GET /metrics` gzip-compressed from pieces compressed once.
//!
//! At 100,000 instances the text is about 280 MB, and compressing it is
//! most of a scrape's cost, while between two scrapes most instances'
//! samples do not change. So the per-instance samples are cut into blocks
//! of rows, each block of each section (one run of samples over every
//! instance, see [`Section`]) is compressed on its own, and a scrape reuses
//! the compressed bytes of every block whose text would be the same as at
//! the previous scrape: only changed blocks are rendered and compressed
//! again.
//!
//! A gzip member's deflate stream may be cut into pieces that each start
//! with an empty window and end on a byte boundary (a sync flush, without
//! the final bit): such pieces concatenate into one valid stream, closed by
//! an empty final block. The CRC-32 of the whole text is combined from the
//! pieces'. So the body is one ordinary gzip member, byte for byte what any
//! gzip reader expects.
//!
//! A block is known by a keyed hash (SipHash with this process's random
//! keys) of its section, its rows' labels and the values its samples
//! show, read once: the text is rendered from those same values, so a
//! piece always holds the text of its key. Block boundaries follow the
//! labels (a row ends a block when its labels' hash says so), so attaching
//! or detaching an instance changes only the block it falls in, not every
//! block after it. The cache keeps the pieces of the last scrape (about the
//! size of the compressed body); two concurrent scrapes each render what
//! the other holds.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io::{self, Write};
use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use flate2::{Compress, Compression, Crc, FlushCompress};

use super::instance::{FAMILIES, Scrape, Section, header};

/// A gzip header: deflate, no name, no time, unknown OS.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// An empty final block with fixed codes: what zlib writes to finish a
/// stream after a sync flush.
const LAST_BLOCK: [u8; 2] = [0x03, 0x00];

/// Rows per block of the histogram section on average (about 140 KB of
/// text); a power of two.
const HISTOGRAM_ROWS: u64 = 64;
/// Rows per block of the other sections on average (about 45 KB of text).
const OTHER_ROWS: u64 = 512;

/// A compressed piece of the body and the CRC of its text.
#[derive(Debug)]
struct Piece {
    deflated: Vec<u8>,
    crc: Crc,
}

/// How many blocks a compressed scrape reused and compressed anew.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Blocks {
    pub(super) reused: usize,
    pub(super) compressed: usize,
}

/// The compressed blocks of the last scrape.
#[derive(Debug, Default)]
pub(super) struct Zipper {
    keys: RandomState,
    cache: Mutex<HashMap<u64, Arc<Piece>>>,
}

impl Zipper {
    /// Writes one gzip member holding `head`, the per-instance families of
    /// `scrape`, then `tail`.
    pub(super) fn write(
        &self,
        scrape: &Scrape<'_>,
        head: &[u8],
        tail: &[u8],
        out: &mut dyn Write,
    ) -> io::Result<Blocks> {
        let old = std::mem::take(&mut *self.cache.lock().unwrap_or_else(PoisonError::into_inner));
        let mut kept = HashMap::with_capacity(old.len());
        let result = self.write_with(scrape, head, tail, &old, &mut kept, out);
        *self.cache.lock().unwrap_or_else(PoisonError::into_inner) = kept;
        result
    }

    fn write_with(
        &self,
        scrape: &Scrape<'_>,
        head: &[u8],
        tail: &[u8],
        old: &HashMap<u64, Arc<Piece>>,
        kept: &mut HashMap<u64, Arc<Piece>>,
        out: &mut dyn Write,
    ) -> io::Result<Blocks> {
        let mut count = Blocks::default();
        let mut body = Body {
            out,
            crc: Crc::new(),
            deflater: Compress::new(Compression::fast(), false),
        };
        body.out.write_all(&HEADER)?;
        body.fresh(head)?;
        if scrape.len() > 0 {
            let hashes: Vec<u64> = (0..scrape.len())
                .map(|i| self.keys.hash_one(scrape.labels(i)))
                .collect();
            let histogram_blocks = blocks(&hashes, HISTOGRAM_ROWS);
            let other_blocks = blocks(&hashes, OTHER_ROWS);
            let (mut text, mut values) = (Vec::new(), Vec::new());
            let mut id = 0_u8;
            for family in FAMILIES {
                text.clear();
                header(&mut text, family);
                body.fresh(&text)?;
                for &section in Section::of(family.0) {
                    id += 1;
                    let blocks = match section {
                        Section::Duration => &histogram_blocks,
                        _ => &other_blocks,
                    };
                    for rows in blocks {
                        values.clear();
                        scrape.values(section, rows.clone(), &mut values);
                        let mut key = self.keys.build_hasher();
                        key.write_u8(id);
                        key.write_usize(rows.len());
                        for hash in &hashes[rows.clone()] {
                            key.write_u64(*hash);
                        }
                        for value in &values {
                            key.write_u64(*value);
                        }
                        let key = key.finish();
                        let piece = match old.get(&key) {
                            Some(piece) => {
                                count.reused += 1;
                                Arc::clone(piece)
                            }
                            None => {
                                count.compressed += 1;
                                text.clear();
                                scrape.write_rows(section, rows.clone(), &values, &mut text);
                                Arc::new(deflate(&mut body.deflater, &text)?)
                            }
                        };
                        body.piece(&piece)?;
                        kept.insert(key, piece);
                    }
                }
            }
        }
        body.fresh(tail)?;
        body.finish()?;
        Ok(count)
    }
}

/// The gzip body being written.
struct Body<'w> {
    out: &'w mut dyn Write,
    crc: Crc,
    deflater: Compress,
}

impl Body<'_> {
    fn piece(&mut self, piece: &Piece) -> io::Result<()> {
        self.out.write_all(&piece.deflated)?;
        self.crc.combine(&piece.crc);
        Ok(())
    }

    /// Compresses `text` (not kept) into the body.
    fn fresh(&mut self, text: &[u8]) -> io::Result<()> {
        let piece = deflate(&mut self.deflater, text)?;
        self.piece(&piece)
    }

    /// The final block and the gzip trailer: CRC-32 and length mod 2^32.
    fn finish(self) -> io::Result<()> {
        self.out.write_all(&LAST_BLOCK)?;
        self.out.write_all(&self.crc.sum().to_le_bytes())?;
        self.out.write_all(&self.crc.amount().to_le_bytes())
    }
}

/// `text` compressed from an empty window and sync-flushed to a byte
/// boundary, not final.
fn deflate(deflater: &mut Compress, text: &[u8]) -> io::Result<Piece> {
    deflater.reset();
    let mut deflated = Vec::with_capacity(text.len() / 8 + 64);
    let start = deflater.total_in();
    loop {
        if deflated.capacity() - deflated.len() < 64 {
            deflated.reserve(deflated.capacity().max(4096));
        }
        let consumed = usize::try_from(deflater.total_in() - start).unwrap_or(text.len());
        deflater
            .compress_vec(&text[consumed..], &mut deflated, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        let consumed = usize::try_from(deflater.total_in() - start).unwrap_or(text.len());
        // Done once every byte went in and the flush left output room.
        if consumed >= text.len() && deflated.len() < deflated.capacity() {
            break;
        }
    }
    let mut crc = Crc::new();
    crc.update(text);
    Ok(Piece { deflated, crc })
}

/// Cuts rows into blocks of about `average` rows (a power of two): a row
/// whose label hash is a multiple of `average` ends its block, and so does
/// the `4 × average`-th row of a block.
fn blocks(hashes: &[u64], average: u64) -> Vec<Range<usize>> {
    let longest = usize::try_from(average * 4).unwrap_or(usize::MAX);
    let mut blocks = Vec::with_capacity(hashes.len() / 16 + 1);
    let mut start = 0;
    for (i, hash) in hashes.iter().enumerate() {
        if hash % average == 0 || i + 1 - start == longest {
            blocks.push(start..i + 1);
            start = i + 1;
        }
    }
    if start < hashes.len() {
        blocks.push(start..hashes.len());
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_every_row_once_in_order() {
        let hashes: Vec<u64> = (0..10_000_u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let cut = blocks(&hashes, 64);
        assert_eq!(cut.first().map(|r| r.start), Some(0));
        assert_eq!(cut.last().map(|r| r.end), Some(10_000));
        for pair in cut.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        assert!(cut.iter().all(|r| !r.is_empty() && r.len() <= 256));
        assert!(blocks(&[], 64).is_empty());
    }

    #[test]
    fn an_inserted_row_changes_only_its_block() {
        let hashes: Vec<u64> = (0..5_000_u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i >> 3))
            .collect();
        let before = blocks(&hashes, 64);
        let mut more = hashes.clone();
        more.insert(2_500, 12_345);
        let after = blocks(&more, 64);
        let shifted: Vec<Range<usize>> = after
            .iter()
            .map(|r| {
                let shift = |i: usize| if i > 2_500 { i - 1 } else { i };
                shift(r.start)..shift(r.end)
            })
            .collect();
        let changed = before.iter().filter(|b| !shifted.contains(b)).count();
        assert!(changed <= 2, "{changed} blocks changed");
    }
}
