//! Streaming, mergeable per-gene medians of the normalised expression `x`.
//!
//! Each cell is normalised exactly as for tokenisation (duplicates summed, optional library-size
//! scaling, only `c > 0`), and every `x` is recorded in a dense log histogram of its token: bin
//! `b` holds the values in `[2^(b/256), 2^((b+1)/256))` (256 bins per octave, each 0.27 % wide;
//! the edges are `2^(k/256)` rounded to f64, see [`bin_of`]). Per bin the state is its count and,
//! while every value that fell into it rounds to the same f32, that value (else NaN).
//!
//! The median of a token is its *lower* median (0-based rank `(n - 1) / 2` of its sorted
//! non-zero values): the bins are walked in order to the one holding that rank. When that bin
//! holds a single distinct value (as f32; e.g. small integer counts) the median is that value,
//! exactly; otherwise it is interpolated linearly between the bin's edges at
//! `(rank_in_bin + 0.5) / count`. **Precision:** the result is the exact lower median rounded to
//! f32, or within one bin width (relative error < 2^(1/256) - 1 ≈ 0.27 %) of it.
//!
//! # Memory
//!
//! Each token seen so far owns one dense array of bins covering the range of bins its values
//! have reached (grown with some slack when a value falls outside): 8 bytes per bin, about
//! `256 × log2(max x / min x)` bins per expressed gene (≈ 1,000 on average for 10x PBMC data,
//! i.e. ≈ 100 MB for 12,500 expressed genes). It depends on the genes present and the dynamic
//! range of `x`, never on the number of cells. Bin counts are u32: one bin of one gene saturates
//! at 4.29 × 10⁹ values.
//!
//! [`MedianAccumulator::add_chunk`] first validates the whole chunk (so it is all-or-nothing),
//! then works through windows of about [`WINDOW_NNZ`] stored entries: cell batches are normalised
//! in parallel into `(token, bin, value)` entries partitioned by shard (token `t` belongs to
//! shard `t % N_SHARDS`), then the shards are updated in parallel, each by one task. A shard's
//! histograms are 1/[`N_SHARDS`] of the state (a few hundred KiB), so the updates stay in cache.
//! The only transient memory is one window's entries (12 bytes per non-zero, about 48 MiB).
//!
//! # Determinism
//!
//! A bin's state (count, single value or NaN) does not depend on the order values arrive in, so
//! the medians are identical whatever the thread count, chunking or merge order (the allocated
//! bin ranges may differ; equality of accumulators compares the non-empty bins). On invalid
//! input the accumulator is left unchanged and the error of the first offending cell (in cell
//! order) is returned.

use std::ops::Range;
use std::sync::OnceLock;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::normalize::{
    check_gene_map, normalize_validated, validate_row, CellScratch, ColumnTokens, CsrChunk,
    NormParams,
};
use crate::tokenize::{build_pool, BATCH_CELLS};

/// Histogram bins per octave of `x`.
pub const BINS_PER_OCTAVE: u32 = 256;

/// Number of shards of the accumulator (token `t` lives in shard `t % N_SHARDS`).
pub const N_SHARDS: usize = 512;

/// Target number of stored entries per window of [`MedianAccumulator::add_chunk`].
pub const WINDOW_NNZ: usize = 1 << 22;

/// Extra bins allocated on each side when a token's histogram grows (1/8 octave).
const GROWTH_SLACK: i32 = 32;

/// Mantissa bits used to index the bin-start table (2^10 entries, narrower than any bin).
const LOOKUP_BITS: u32 = 10;

struct BinTables {
    /// `edges[k] = 2^(k/256)` rounded to f64, `k = 0..=256` (`edges[0] = 1`, `edges[256] = 2`).
    edges: [f64; BINS_PER_OCTAVE as usize + 1],
    /// `start[i]`: the bin within the octave of mantissa `1 + i / 2^LOOKUP_BITS`.
    start: [u16; 1 << LOOKUP_BITS],
}

fn tables() -> &'static BinTables {
    static TABLES: OnceLock<BinTables> = OnceLock::new();
    TABLES.get_or_init(|| {
        let n = BINS_PER_OCTAVE as usize;
        let mut edges = [0.0f64; BINS_PER_OCTAVE as usize + 1];
        for (k, edge) in edges.iter_mut().enumerate() {
            *edge = (k as f64 / n as f64).exp2();
        }
        edges[0] = 1.0;
        edges[n] = 2.0;
        let mut start = [0u16; 1 << LOOKUP_BITS];
        for (i, s) in start.iter_mut().enumerate() {
            let m = 1.0 + i as f64 / f64::from(1u32 << LOOKUP_BITS);
            // The last edge <= m.
            *s = (edges.partition_point(|&e| e <= m) - 1) as u16;
        }
        BinTables { edges, start }
    })
}

/// The histogram bin of a positive, finite `x`: the `b` with `edge(b) <= x < edge(b + 1)`, where
/// `edge(256 e + k) = 2^e × 2^(k/256)` (≈ `floor(log2(x) × 256)`, computed exactly from the bits).
#[inline]
pub fn bin_of(x: f64) -> i32 {
    let t = tables();
    let bits = x.to_bits();
    let raw_exponent = ((bits >> 52) & 0x7ff) as i32;
    if raw_exponent == 0 {
        // Subnormal: scale into the normal range (exact), then shift the bin back.
        return bin_of(x * 2f64.powi(64)) - 64 * BINS_PER_OCTAVE as i32;
    }
    let mantissa = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | (1023u64 << 52));
    let k0 = t.start[((bits >> (52 - LOOKUP_BITS)) & ((1 << LOOKUP_BITS) - 1)) as usize] as usize;
    let k = k0 + usize::from(mantissa >= t.edges[k0 + 1]);
    (raw_exponent - 1023) * BINS_PER_OCTAVE as i32 + k as i32
}

/// The lower edge of bin `b` (see [`bin_of`]).
pub fn bin_edge(b: i32) -> f64 {
    let octave = b.div_euclid(BINS_PER_OCTAVE as i32);
    let k = b.rem_euclid(BINS_PER_OCTAVE as i32) as usize;
    tables().edges[k] * 2f64.powi(octave)
}

/// One histogram bin: its count, and the value (as f32) while all its values are equal, else NaN.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    count: u32,
    value: f32,
}

impl Slot {
    #[inline]
    fn add(&mut self, value: f32) {
        if self.count == 0 {
            self.value = value;
        } else if self.value != value {
            self.value = f32::NAN; // NaN != anything: stays NaN
        }
        self.count = self.count.saturating_add(1);
    }

    fn absorb(&mut self, other: &Slot) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        if self.value != other.value {
            self.value = f32::NAN;
        }
        self.count = self.count.saturating_add(other.count);
    }
}

/// The dense histogram of one token over bins `lo .. lo + slots.len()`.
#[derive(Debug, Clone, Default)]
struct TokenHist {
    lo: i32,
    slots: Vec<Slot>,
}

impl TokenHist {
    /// Makes the histogram cover bins `a..=b` (with slack when it has to grow).
    fn cover(&mut self, a: i32, b: i32) {
        if self.slots.is_empty() {
            self.lo = a;
            self.slots = vec![Slot::default(); (b - a + 1) as usize];
            return;
        }
        let hi = self.lo + self.slots.len() as i32; // exclusive
        if a >= self.lo && b < hi {
            return;
        }
        let new_lo = if a < self.lo {
            a - GROWTH_SLACK
        } else {
            self.lo
        };
        let new_hi = if b >= hi { b + 1 + GROWTH_SLACK } else { hi };
        let mut slots = vec![Slot::default(); (new_hi - new_lo) as usize];
        let at = (self.lo - new_lo) as usize;
        slots[at..at + self.slots.len()].copy_from_slice(&self.slots);
        self.lo = new_lo;
        self.slots = slots;
    }

    #[inline]
    fn add(&mut self, bin: i32, value: f32) {
        let mut i = bin.wrapping_sub(self.lo) as u32 as usize;
        if i >= self.slots.len() {
            self.cover(bin, bin);
            i = (bin - self.lo) as usize;
        }
        self.slots[i].add(value);
    }

    fn merge(&mut self, other: &TokenHist) {
        if other.slots.is_empty() {
            return;
        }
        self.cover(other.lo, other.lo + other.slots.len() as i32 - 1);
        let at = (other.lo - self.lo) as usize;
        for (dst, src) in self.slots[at..].iter_mut().zip(&other.slots) {
            dst.absorb(src);
        }
    }

    /// Non-empty bins as `(bin, count, value bits)`, for comparisons.
    fn occupied(&self) -> impl Iterator<Item = (i32, u32, u32)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.count > 0)
            .map(|(i, s)| (self.lo + i as i32, s.count, s.value.to_bits()))
    }

    fn n_values(&self) -> u64 {
        self.slots.iter().map(|s| u64::from(s.count)).sum()
    }

    /// The lower median (see the module docs); NaN when empty.
    fn median(&self) -> f32 {
        let n = self.n_values();
        if n == 0 {
            return f32::NAN;
        }
        let rank = (n - 1) / 2;
        let mut before = 0u64;
        for (i, slot) in self.slots.iter().enumerate() {
            let count = u64::from(slot.count);
            if before + count > rank {
                if !slot.value.is_nan() {
                    return slot.value;
                }
                let bin = self.lo + i as i32;
                let (lo, hi) = (bin_edge(bin), bin_edge(bin + 1));
                let position = ((rank - before) as f64 + 0.5) / count as f64;
                return (lo + (hi - lo) * position) as f32;
            }
            before += count;
        }
        unreachable!("rank < n")
    }
}

/// One normalised value, ready for its shard.
#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    token: u32,
    bin: i32,
    value: f32,
}

#[inline]
fn shard_of(token: u32) -> usize {
    token as usize % N_SHARDS
}

/// The entries of one batch of cells, partitioned by shard: the entries of shard `s` are
/// `entries[offsets[s]..offsets[s + 1]]`. Kept in the accumulator and reused from window to
/// window and chunk to chunk (a few MiB per batch: fresh ones would be page-faulted in each time).
#[derive(Debug, Clone, Default)]
struct BatchValues {
    unsorted: Vec<Entry>,
    entries: Vec<Entry>,
    offsets: Vec<usize>,
}

/// Reusable buffers of one rayon task of [`MedianAccumulator::add_chunk`].
#[derive(Default)]
struct Scratch {
    cell: CellScratch,
    normalized: Vec<(u32, f64)>,
}

/// Splits `cells` into windows of about [`WINDOW_NNZ`] stored entries (at least one cell each).
/// Rows must have been validated.
fn windows(matrix: &CsrChunk<'_>, window_nnz: usize) -> Vec<Range<usize>> {
    let (indptr, n_cells) = (matrix.indptr, matrix.n_cells());
    let mut out = Vec::new();
    let mut start = 0;
    while start < n_cells {
        let limit = indptr[start].saturating_add(window_nnz as i64);
        // Rows whose end stays within the limit (indptr is non-decreasing), at least one.
        let fit = indptr[start + 1..=n_cells].partition_point(|&p| p <= limit);
        let end = start + fit.max(1);
        out.push(start..end);
        start = end;
    }
    out
}

/// Normalises one batch of cells into `out`, its entries partitioned by shard.
fn normalize_batch(
    matrix: &CsrChunk<'_>,
    cells: Range<usize>,
    columns: &ColumnTokens<'_>,
    params: &NormParams,
    scratch: &mut Scratch,
    out: &mut BatchValues,
) -> Result<()> {
    out.unsorted.clear();
    for cell in cells {
        // Every row was validated before (step 1 of `add_chunk_windowed`): skip the checks.
        let (indices, data) = matrix.row(cell)?;
        let total = data.iter().map(|&v| f64::from(v)).sum::<f64>(); // as `validate_row` sums
        normalize_validated(
            total,
            indices,
            data,
            columns,
            params,
            &mut scratch.cell,
            &mut scratch.normalized,
        );
        out.unsorted
            .extend(scratch.normalized.iter().map(|&(token, x)| Entry {
                token,
                bin: bin_of(x),
                value: x as f32,
            }));
    }
    // Counting sort by shard (stable, so the layout is deterministic too).
    let offsets = &mut out.offsets;
    offsets.clear();
    offsets.resize(N_SHARDS + 1, 0);
    for e in &out.unsorted {
        offsets[shard_of(e.token) + 1] += 1;
    }
    for s in 0..N_SHARDS {
        offsets[s + 1] += offsets[s];
    }
    let mut next = offsets.clone();
    out.entries.clear();
    out.entries.resize(out.unsorted.len(), Entry::default());
    for &e in &out.unsorted {
        let slot = &mut next[shard_of(e.token)];
        out.entries[*slot] = e;
        *slot += 1;
    }
    Ok(())
}

/// Streaming per-token lower median of the normalised expression over cells where it is non-zero.
#[derive(Debug, Clone)]
pub struct MedianAccumulator {
    vocab_size: usize,
    library_size: bool,
    target_sum: f64,
    /// `shards[s][i]` is the histogram of token `i * N_SHARDS + s`.
    shards: Vec<Vec<TokenHist>>,
    /// Scratch of `add_chunk` (not part of the state).
    batch_buffers: Vec<BatchValues>,
}

impl PartialEq for MedianAccumulator {
    /// Same settings and the same non-empty bins (allocated ranges may differ).
    fn eq(&self, other: &Self) -> bool {
        self.vocab_size == other.vocab_size
            && self.library_size == other.library_size
            && self.target_sum.to_bits() == other.target_sum.to_bits()
            && self
                .shards
                .iter()
                .zip(&other.shards)
                .all(|(a, b)| a.iter().zip(b).all(|(x, y)| x.occupied().eq(y.occupied())))
    }
}

impl MedianAccumulator {
    /// An empty accumulator for tokens `0..vocab_size`, normalising like the tokeniser will
    /// (`library_size`, `target_sum`).
    pub fn new(vocab_size: usize, library_size: bool, target_sum: f64) -> Self {
        let shards = (0..N_SHARDS)
            .map(|s| vec![TokenHist::default(); vocab_size.saturating_sub(s).div_ceil(N_SHARDS)])
            .collect();
        Self {
            vocab_size,
            library_size,
            target_sum,
            shards,
            batch_buffers: Vec::new(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn library_size(&self) -> bool {
        self.library_size
    }

    pub fn target_sum(&self) -> f64 {
        self.target_sum
    }

    /// Allocated histogram bins over all tokens (8 bytes each): the accumulator's memory.
    pub fn n_bins(&self) -> usize {
        self.shards
            .iter()
            .flat_map(|shard| shard.iter().map(|h| h.slots.len()))
            .sum()
    }

    fn hist(&self, token: usize) -> &TokenHist {
        &self.shards[token % N_SHARDS][token / N_SHARDS]
    }

    /// Adds every cell of one CSR chunk (same layout and validation as
    /// [`crate::tokenize::tokenize_chunk`]). All-or-nothing: on error the state is unchanged.
    pub fn add_chunk(
        &mut self,
        indptr: &[i64],
        indices: &[u32],
        data: &[f32],
        col_token: &[u32],
        n_threads: usize,
        allow_non_integer: bool,
    ) -> Result<()> {
        self.add_chunk_windowed(
            indptr,
            indices,
            data,
            col_token,
            n_threads,
            allow_non_integer,
            WINDOW_NNZ,
        )
    }

    /// [`MedianAccumulator::add_chunk`] with a given window size (tests use tiny windows).
    #[allow(clippy::too_many_arguments)]
    fn add_chunk_windowed(
        &mut self,
        indptr: &[i64],
        indices: &[u32],
        data: &[f32],
        col_token: &[u32],
        n_threads: usize,
        allow_non_integer: bool,
        window_nnz: usize,
    ) -> Result<()> {
        let params = NormParams {
            library_size: self.library_size,
            target_sum: self.target_sum,
            allow_non_integer,
        };
        params.validate()?;
        let matrix = CsrChunk::new(indptr, indices, data)?;
        check_gene_map(col_token, self.vocab_size)?;
        let columns = ColumnTokens::new(col_token, self.vocab_size);
        let n_cells = matrix.n_cells();
        let shards = &mut self.shards;
        let buffers = &mut self.batch_buffers;

        let pool = build_pool(n_threads)?;
        pool.install(|| {
            // 1. Validate everything first, so that a bad cell leaves the state untouched;
            //    `find_map_first` returns the error of the first offending batch.
            let n_batches = n_cells.div_ceil(BATCH_CELLS);
            let first_error = (0..n_batches).into_par_iter().find_map_first(|b| {
                (b * BATCH_CELLS..((b + 1) * BATCH_CELLS).min(n_cells)).find_map(|cell| {
                    matrix
                        .row(cell)
                        .and_then(|(indices, data)| {
                            validate_row(cell, indices, data, col_token.len(), allow_non_integer)
                        })
                        .err()
                })
            });
            if let Some(e) = first_error {
                return Err(e);
            }
            // 2. Window by window: normalise batches of cells in parallel, then update every
            //    shard from all batches of the window, one task per shard.
            for window in windows(&matrix, window_nnz) {
                let batches: Vec<Range<usize>> = window
                    .clone()
                    .step_by(BATCH_CELLS)
                    .map(|a| a..(a + BATCH_CELLS).min(window.end))
                    .collect();
                if buffers.len() < batches.len() {
                    buffers.resize_with(batches.len(), BatchValues::default);
                }
                let values = &mut buffers[..batches.len()];
                values.par_iter_mut().zip(batches).try_for_each_init(
                    Scratch::default,
                    |scratch, (out, cells)| {
                        normalize_batch(&matrix, cells, &columns, &params, scratch, out)
                    },
                )?;
                let values = &*values;
                shards.par_iter_mut().enumerate().for_each(|(s, hists)| {
                    for batch in values {
                        for e in &batch.entries[batch.offsets[s]..batch.offsets[s + 1]] {
                            hists[e.token as usize / N_SHARDS].add(e.bin, e.value);
                        }
                    }
                });
            }
            Ok(())
        })
    }

    /// Merges another accumulator (e.g. of another file or worker) into this one.
    pub fn merge(&mut self, other: &MedianAccumulator) -> Result<()> {
        if other.vocab_size != self.vocab_size
            || other.library_size != self.library_size
            || other.target_sum.to_bits() != self.target_sum.to_bits()
        {
            return Err(Error::InvalidArgument(format!(
                "cannot merge median accumulators with different settings: \
                 (vocab_size {}, library_size {}, target_sum {}) vs ({}, {}, {})",
                self.vocab_size,
                self.library_size,
                self.target_sum,
                other.vocab_size,
                other.library_size,
                other.target_sum
            )));
        }
        for (dst, src) in self.shards.iter_mut().zip(&other.shards) {
            for (d, s) in dst.iter_mut().zip(src) {
                d.merge(s);
            }
        }
        Ok(())
    }

    /// The lower median of the non-zero `x` per token (`vocab_size` values; NaN where a token
    /// was never seen with a non-zero count).
    pub fn medians(&self) -> Vec<f32> {
        (0..self.vocab_size)
            .map(|t| self.hist(t).median())
            .collect()
    }

    /// Per token, the number of cells where its summed count was non-zero.
    pub fn n_nonzero(&self) -> Vec<u64> {
        (0..self.vocab_size)
            .map(|t| self.hist(t).n_values())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::NO_TOKEN;
    use crate::tokenize::tests::{random_csr, Rng};

    /// Exact lower median of the non-zero x per token, computed naively.
    fn exact_medians(
        indptr: &[i64],
        indices: &[u32],
        data: &[f32],
        col_token: &[u32],
        vocab: usize,
        library_size: bool,
    ) -> (Vec<f64>, Vec<u64>) {
        let base = indptr[0];
        let mut values: Vec<Vec<f64>> = vec![Vec::new(); vocab];
        for i in 0..indptr.len() - 1 {
            let (a, b) = ((indptr[i] - base) as usize, (indptr[i + 1] - base) as usize);
            let total: f64 = data[a..b].iter().map(|&v| f64::from(v)).sum();
            let mut c = vec![0.0f64; vocab];
            for k in a..b {
                let t = col_token[indices[k] as usize];
                if t != NO_TOKEN {
                    c[t as usize] += f64::from(data[k]);
                }
            }
            for t in 0..vocab {
                if c[t] > 0.0 {
                    values[t].push(if library_size {
                        c[t] / total * 1e4
                    } else {
                        c[t]
                    });
                }
            }
        }
        let n = values.iter().map(|v| v.len() as u64).collect();
        let med = values
            .into_iter()
            .map(|mut v| {
                if v.is_empty() {
                    return f64::NAN;
                }
                v.sort_by(f64::total_cmp);
                v[(v.len() - 1) / 2]
            })
            .collect();
        (med, n)
    }

    struct Fixture {
        indptr: Vec<i64>,
        indices: Vec<u32>,
        data: Vec<f32>,
        col_token: Vec<u32>,
        vocab: usize,
    }

    fn fixture(seed: u64, n_cells: usize) -> Fixture {
        let mut rng = Rng::new(seed);
        let n_cols = 150;
        let vocab = 120;
        let (indptr, indices, data) = random_csr(&mut rng, n_cells, n_cols, 60);
        let col_token = (0..n_cols)
            .map(|c| {
                if c % 13 == 5 {
                    NO_TOKEN
                } else {
                    (c % vocab) as u32
                }
            })
            .collect();
        Fixture {
            indptr,
            indices,
            data,
            col_token,
            vocab,
        }
    }

    fn accumulate(f: &Fixture, library_size: bool, threads: usize) -> MedianAccumulator {
        let mut acc = MedianAccumulator::new(f.vocab + 5, library_size, 1e4);
        acc.add_chunk(&f.indptr, &f.indices, &f.data, &f.col_token, threads, false)
            .unwrap();
        acc
    }

    #[test]
    fn integer_counts_give_exact_median() {
        let f = fixture(1, 3000);
        let acc = accumulate(&f, false, 2);
        let (exact, n) = exact_medians(
            &f.indptr,
            &f.indices,
            &f.data,
            &f.col_token,
            f.vocab + 5,
            false,
        );
        let med = acc.medians();
        assert_eq!(acc.n_nonzero(), n);
        for t in 0..f.vocab + 5 {
            if exact[t].is_nan() {
                assert!(med[t].is_nan(), "token {t}");
            } else {
                assert_eq!(med[t], exact[t] as f32, "token {t}");
            }
        }
        // Tokens 120..125 never occur.
        assert!(med[f.vocab..].iter().all(|m| m.is_nan()));
    }

    #[test]
    fn continuous_values_within_bin_precision() {
        // Library-size scaling makes x continuous.
        let f = fixture(2, 4000);
        let acc = accumulate(&f, true, 2);
        let (exact, n) = exact_medians(
            &f.indptr,
            &f.indices,
            &f.data,
            &f.col_token,
            f.vocab + 5,
            true,
        );
        assert_eq!(acc.n_nonzero(), n);
        let med = acc.medians();
        for t in 0..f.vocab {
            if exact[t].is_nan() {
                assert!(med[t].is_nan(), "token {t}");
                continue;
            }
            let rel = (f64::from(med[t]) - exact[t]).abs() / exact[t];
            assert!(
                rel < (1.0f64 / 256.0).exp2() - 1.0,
                "token {t}: {} vs {}",
                med[t],
                exact[t]
            );
        }

        // Raw continuous values spanning 10 octaves.
        let mut rng = Rng::new(3);
        let n_cells = 5000;
        let indptr: Vec<i64> = (0..=n_cells as i64).map(|i| i * 4).collect();
        let indices: Vec<u32> = (0..n_cells * 4).map(|k| (k % 4) as u32).collect();
        let data: Vec<f32> = (0..n_cells * 4)
            .map(|_| {
                (2.0f64.powf(rng.below(1 << 20) as f64 / (1 << 20) as f64 * 10.0 - 5.0)) as f32
            })
            .collect();
        let col_token = [0, 1, 2, 3];
        let mut acc = MedianAccumulator::new(4, false, 1e4);
        acc.add_chunk(&indptr, &indices, &data, &col_token, 2, true)
            .unwrap();
        let (exact, _) = exact_medians(&indptr, &indices, &data, &col_token, 4, false);
        for (t, m) in acc.medians().iter().enumerate() {
            let rel = (f64::from(*m) - exact[t]).abs() / exact[t];
            assert!(
                rel < (1.0f64 / 256.0).exp2() - 1.0,
                "token {t}: {m} vs {}",
                exact[t]
            );
        }
        // Non-integer input is rejected unless allowed.
        let mut strict = MedianAccumulator::new(4, false, 1e4);
        let e = strict
            .add_chunk(&indptr, &indices, &data, &col_token, 1, false)
            .unwrap_err();
        assert!(matches!(e, Error::NonIntegerCount { .. }));
    }

    #[test]
    fn merge_of_halves_equals_one_pass() {
        let f = fixture(4, 2500);
        for library_size in [false, true] {
            let whole = accumulate(&f, library_size, 1);
            let cut = 1234;
            let cut_pos = (f.indptr[cut] - f.indptr[0]) as usize;
            let mut first = MedianAccumulator::new(f.vocab + 5, library_size, 1e4);
            first
                .add_chunk(
                    &f.indptr[..=cut],
                    &f.indices[..cut_pos],
                    &f.data[..cut_pos],
                    &f.col_token,
                    2,
                    false,
                )
                .unwrap();
            let mut second = MedianAccumulator::new(f.vocab + 5, library_size, 1e4);
            second
                .add_chunk(
                    &f.indptr[cut..],
                    &f.indices[cut_pos..],
                    &f.data[cut_pos..],
                    &f.col_token,
                    3,
                    false,
                )
                .unwrap();
            // Merging in either direction gives the same state as one pass.
            let mut ab = first.clone();
            ab.merge(&second).unwrap();
            let mut ba = second.clone();
            ba.merge(&first).unwrap();
            assert_eq!(ab, whole);
            assert_eq!(ba, whole);
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(bits(ab.medians()), bits(whole.medians()));
            assert_eq!(ab.n_nonzero(), whole.n_nonzero());
            // Sequential chunks into one accumulator too.
            let mut seq = first.clone();
            seq.add_chunk(
                &f.indptr[cut..],
                &f.indices[cut_pos..],
                &f.data[cut_pos..],
                &f.col_token,
                1,
                false,
            )
            .unwrap();
            assert_eq!(seq, whole);
        }
    }

    #[test]
    fn thread_count_invariance() {
        let f = fixture(5, 3000);
        for library_size in [false, true] {
            let one = accumulate(&f, library_size, 1);
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            for threads in [0, 2, 4, 7] {
                let other = accumulate(&f, library_size, threads);
                assert_eq!(one, other);
                assert_eq!(bits(one.medians()), bits(other.medians()));
            }
        }
    }

    #[test]
    fn lower_median_and_interpolation() {
        // Token 0: values 1, 2, 3, 4 -> lower median 2 (rank 1), exact (one value per bin).
        // Token 1: 1000 and 1001 share bin 2551 -> interpolated.
        let indptr = [0i64, 2, 4, 6, 7];
        let indices = [0u32, 1, 0, 1, 0, 1, 0];
        let data = [1.0f32, 1000.0, 2.0, 1001.0, 3.0, 1000.0, 4.0];
        let mut acc = MedianAccumulator::new(3, false, 1e4);
        acc.add_chunk(&indptr, &indices, &data, &[0, 1], 1, false)
            .unwrap();
        assert_eq!(bin_of(1000.0), bin_of(1001.0));
        let med = acc.medians();
        assert_eq!(med[0], 2.0);
        // Token 1: n = 3, rank 1, one bin of count 3 holding two distinct values -> interpolated
        // between the bin's edges at (1 + 0.5) / 3.
        let b = bin_of(1000.0);
        let (lo, hi) = (bin_edge(b), bin_edge(b + 1));
        assert_eq!(med[1], (lo + (hi - lo) * 0.5) as f32);
        assert!((f64::from(med[1]) - 1000.0).abs() / 1000.0 < 0.0027);
        assert!(med[2].is_nan());
        assert_eq!(acc.n_nonzero(), vec![4, 3, 0]);
    }

    #[test]
    fn duplicates_summed_before_binning() {
        // Columns 0 and 1 map to token 0: the cell contributes one value 5, not 2 and 3.
        let mut acc = MedianAccumulator::new(1, false, 1e4);
        acc.add_chunk(&[0, 3], &[0, 1, 2], &[2.0, 3.0, 0.0], &[0, 0, 0], 1, false)
            .unwrap();
        assert_eq!(acc.n_nonzero(), vec![1]);
        assert_eq!(acc.medians(), vec![5.0]);
    }

    #[test]
    fn failed_chunk_leaves_state_unchanged() {
        let f = fixture(6, 1500);
        let mut acc = accumulate(&f, true, 2);
        let before = acc.clone();
        let mut data = f.data.clone();
        let pos = data.len() / 2;
        data[pos] = -1.0;
        let n = data.len();
        data[n - 3] = f32::NAN;
        for threads in [1, 2, 5] {
            let e = acc
                .add_chunk(&f.indptr, &f.indices, &data, &f.col_token, threads, false)
                .unwrap_err();
            assert!(matches!(e, Error::NegativeCount { value, .. } if value == -1.0));
            assert_eq!(acc, before);
        }
    }

    #[test]
    fn argument_errors() {
        let mut acc = MedianAccumulator::new(2, true, 1e4);
        assert!(matches!(
            acc.add_chunk(&[0], &[], &[], &[0, 2], 1, false),
            Err(Error::TokenOutOfRange { .. })
        ));
        assert!(matches!(
            acc.add_chunk(&[0, 1], &[0], &[1.0, 2.0], &[0, 1], 1, false),
            Err(Error::LengthMismatch { .. })
        ));
        let other = MedianAccumulator::new(3, true, 1e4);
        assert!(matches!(acc.merge(&other), Err(Error::InvalidArgument(_))));
        let mut bad = MedianAccumulator::new(2, true, -1.0);
        assert!(matches!(
            bad.add_chunk(&[0], &[], &[], &[0, 1], 1, false),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn windows_cover_all_cells() {
        let indptr = [5i64, 5, 9, 10, 30, 31, 31, 33];
        let indices = [0u32; 28];
        let data = [1.0f32; 28];
        let m = CsrChunk::new(&indptr, &indices, &data).unwrap();
        assert_eq!(windows(&m, 4), vec![0..2, 2..3, 3..4, 4..7]);
        assert_eq!(windows(&m, 1000), vec![0..7]);
        assert_eq!(
            windows(&m, 0),
            vec![0..1, 1..2, 2..3, 3..4, 4..5, 5..6, 6..7]
        );
        let empty = CsrChunk::new(&[3], &[], &[]).unwrap();
        assert!(windows(&empty, 4).is_empty());
    }

    #[test]
    fn window_size_does_not_change_state() {
        let f = fixture(8, 1000);
        let whole = accumulate(&f, true, 2);
        for (window, threads) in [(1, 1), (37, 2), (500, 3)] {
            let mut acc = MedianAccumulator::new(f.vocab + 5, true, 1e4);
            acc.add_chunk_windowed(
                &f.indptr,
                &f.indices,
                &f.data,
                &f.col_token,
                threads,
                false,
                window,
            )
            .unwrap();
            assert_eq!(acc, whole, "window {window}");
        }
    }

    #[test]
    fn bins_are_log2_times_256() {
        assert_eq!(bin_of(1.0), 0);
        assert_eq!(bin_of(2.0), 256);
        assert_eq!(bin_of(0.5), -256);
        assert_eq!(bin_of(3.0), 405); // log2(3) * 256 = 405.7
        assert_eq!(bin_edge(0), 1.0);
        assert_eq!(bin_edge(256), 2.0);
        assert_eq!(bin_edge(-256), 0.5);
        // Edges increase, and every edge starts its own bin.
        let t = tables();
        assert!(t.edges.windows(2).all(|w| w[0] < w[1]));
        for b in -3000..3000 {
            let lo = bin_edge(b);
            assert_eq!(bin_of(lo), b, "edge of bin {b}");
            assert_eq!(
                bin_of(f64::from_bits(lo.to_bits() - 1)),
                b - 1,
                "below bin {b}"
            );
            // Agrees with floor(log2(x) * 256) away from the edges.
            let mid = lo * (0.5f64 / 256.0).exp2();
            assert_eq!(bin_of(mid), (mid.log2() * 256.0).floor() as i32);
        }
        // Subnormal and extreme values.
        let tiny = f64::from_bits(1);
        assert_eq!(bin_of(tiny), -1074 * 256);
        assert_eq!(bin_of(f64::MAX), 1024 * 256 - 1);
        assert_eq!(bin_of(3e-310), (3e-310f64.log2() * 256.0).floor() as i32);
    }

    #[test]
    fn state_is_small_and_covers_only_seen_bins() {
        let mut acc = MedianAccumulator::new(3, false, 1e4);
        acc.add_chunk(&[0, 2, 3], &[0, 1, 1], &[1.0, 4.0, 1.0], &[0, 1], 1, false)
            .unwrap();
        // Token 0: one bin; token 1: bins 0..=512 (values 1 and 4), token 2: nothing.
        assert_eq!(acc.hist(0).slots.len(), 1);
        assert_eq!(acc.hist(2).slots.len(), 0);
        assert!(acc.n_bins() > 513);
        assert_eq!(acc.medians()[1], 1.0);
    }
}
