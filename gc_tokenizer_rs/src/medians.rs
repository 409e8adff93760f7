//! Streaming, mergeable per-gene medians of the normalised expression `x`.
//!
//! Each cell is normalised exactly as for tokenisation (duplicates summed, optional library-size
//! scaling, only `c > 0`), and every `x` is recorded in a sparse log histogram of its token:
//! bin `floor(log2(x) * 256)` (bins 0.27 % wide), keeping per occupied bin its count, min and max.
//! The median of a token is its *lower* median (0-based rank `(n - 1) / 2` of its sorted non-zero
//! values): the bins are walked in order to the one holding that rank, whose value is exact when
//! the bin holds a single distinct value (`min == max`, e.g. small integer counts) and otherwise
//! interpolated linearly between the bin's min and max.
//!
//! # Memory
//!
//! The state is [`N_SHARDS`] hash maps (token `t` lives in shard `t % N_SHARDS`) from
//! `(token, bin)` to `(count, min, max)`: 32 bytes of payload per *occupied* bin, independent of
//! the number of cells seen. A token spans at most `256 × log2(max x / min x)` bins, so memory is
//! bounded by the vocabulary and the dynamic range of `x`, not by the corpus size.
//!
//! [`MedianAccumulator::add_chunk`] first validates the whole chunk (so it is all-or-nothing),
//! then works through windows of about [`WINDOW_NNZ`] stored entries: cell batches are normalised
//! in parallel into `(token, x)` buffers partitioned by shard, then the shards are updated in
//! parallel, each by one task, in place. The only transient memory is one window's buffers
//! (16 bytes per non-zero, about 64 MiB), and each shard task touches a map 1/[`N_SHARDS`] of
//! the total size, which keeps the updates more cache-friendly. Hash-table overhead included,
//! expect roughly 40-70 bytes per occupied bin.
//!
//! # Determinism
//!
//! A bin's state (sum of counts, min, max) does not depend on the order values arrive in, so the
//! accumulator — and the medians — are identical whatever the thread count, chunking or merge
//! order. On invalid input the accumulator is left unchanged and the error of the first
//! offending cell (in cell order) is returned.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::normalize::{
    check_gene_map, normalize_cell, validate_row, CellScratch, CsrChunk, NormParams,
};
use crate::tokenize::{build_pool, BATCH_CELLS};

/// Histogram bins per octave of `x`.
pub const BINS_PER_OCTAVE: f64 = 256.0;

/// Number of hash-map shards of the accumulator (token `t` lives in shard `t % N_SHARDS`).
pub const N_SHARDS: usize = 512;

/// Target number of stored entries per window of [`MedianAccumulator::add_chunk`].
pub const WINDOW_NNZ: usize = 1 << 22;

/// The histogram bin of a positive `x`: `floor(log2(x) * 256)`.
#[inline]
pub fn bin_of(x: f64) -> i32 {
    (x.log2() * BINS_PER_OCTAVE).floor() as i32
}

#[inline]
fn shard_of(token: u32) -> usize {
    token as usize % N_SHARDS
}

/// State of one occupied bin.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bin {
    count: u64,
    min: f64,
    max: f64,
}

impl Bin {
    #[inline]
    fn absorb(&mut self, other: &Bin) {
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }
}

/// `(token, bin)` packed so that sorting keys sorts by token, then bin (signed) ascending.
#[inline]
fn key(token: u32, bin: i32) -> u64 {
    (u64::from(token) << 32) | u64::from((bin as u32) ^ 0x8000_0000)
}

#[inline]
fn key_token(key: u64) -> usize {
    (key >> 32) as usize
}

/// Hasher for the packed `u64` keys (murmur3 finaliser; keys are not attacker-controlled).
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ u64::from(b));
        }
    }

    #[inline]
    fn write_u64(&mut self, k: u64) {
        let mut h = k ^ self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
        h ^= h >> 33;
        h = h.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
        h ^= h >> 33;
        self.0 = h;
    }
}

type BinMap = HashMap<u64, Bin, BuildHasherDefault<KeyHasher>>;

/// Records one value `x` of `token` in its shard.
#[inline]
fn record(map: &mut BinMap, token: u32, x: f64) {
    map.entry(key(token, bin_of(x)))
        .and_modify(|bin| {
            bin.count += 1;
            bin.min = bin.min.min(x);
            bin.max = bin.max.max(x);
        })
        .or_insert(Bin {
            count: 1,
            min: x,
            max: x,
        });
}

/// The normalised values of one batch of cells, partitioned by shard: the values of shard `s`
/// are `entries[offsets[s]..offsets[s + 1]]`.
struct BatchValues {
    entries: Vec<(u32, f64)>,
    offsets: Vec<usize>,
}

/// Reusable buffers of one rayon task of [`MedianAccumulator::add_chunk`].
struct Scratch {
    cell: CellScratch,
    normalized: Vec<(u32, f64)>,
    batch: Vec<(u32, f64)>,
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

/// Normalises one batch of cells and partitions the `(token, x)` values by shard.
fn normalize_batch(
    matrix: &CsrChunk<'_>,
    cells: Range<usize>,
    col_token: &[u32],
    params: &NormParams,
    scratch: &mut Scratch,
) -> Result<BatchValues> {
    scratch.batch.clear();
    for cell in cells {
        let (indices, data) = matrix.row(cell)?;
        normalize_cell(
            cell,
            indices,
            data,
            col_token,
            params,
            &mut scratch.cell,
            &mut scratch.normalized,
        )?;
        scratch.batch.extend_from_slice(&scratch.normalized);
    }
    // Counting sort by shard (stable, so the layout is deterministic too).
    let mut offsets = vec![0usize; N_SHARDS + 1];
    for &(token, _) in &scratch.batch {
        offsets[shard_of(token) + 1] += 1;
    }
    for s in 0..N_SHARDS {
        offsets[s + 1] += offsets[s];
    }
    let mut next = offsets.clone();
    let mut entries = vec![(0u32, 0.0f64); scratch.batch.len()];
    for &(token, x) in &scratch.batch {
        let slot = &mut next[shard_of(token)];
        entries[*slot] = (token, x);
        *slot += 1;
    }
    Ok(BatchValues { entries, offsets })
}

/// Streaming per-token lower median of the normalised expression over cells where it is non-zero.
#[derive(Debug, Clone, PartialEq)]
pub struct MedianAccumulator {
    vocab_size: usize,
    library_size: bool,
    target_sum: f64,
    /// `shards[s]` holds the bins of tokens `t` with `t % N_SHARDS == s`.
    shards: Vec<BinMap>,
}

impl MedianAccumulator {
    /// An empty accumulator for tokens `0..vocab_size`, normalising like the tokeniser will
    /// (`library_size`, `target_sum`).
    pub fn new(vocab_size: usize, library_size: bool, target_sum: f64) -> Self {
        Self {
            vocab_size,
            library_size,
            target_sum,
            shards: vec![BinMap::default(); N_SHARDS],
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

    /// Number of occupied `(token, bin)` pairs: the accumulator's memory is proportional to it.
    pub fn n_bins(&self) -> usize {
        self.shards.iter().map(HashMap::len).sum()
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
        let n_cells = matrix.n_cells();
        let vocab_size = self.vocab_size;
        let shards = &mut self.shards;

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
                let values = batches
                    .into_par_iter()
                    .map_init(
                        || Scratch {
                            cell: CellScratch::new(vocab_size),
                            normalized: Vec::new(),
                            batch: Vec::new(),
                        },
                        |scratch, cells| {
                            normalize_batch(&matrix, cells, col_token, &params, scratch)
                        },
                    )
                    .collect::<Result<Vec<BatchValues>>>()?;
                shards.par_iter_mut().enumerate().for_each(|(s, map)| {
                    for batch in &values {
                        let part = &batch.entries[batch.offsets[s]..batch.offsets[s + 1]];
                        for &(token, x) in part {
                            record(map, token, x);
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
            dst.reserve(src.len().saturating_sub(dst.capacity() - dst.len()));
            for (&k, b) in src {
                dst.entry(k).and_modify(|d| d.absorb(b)).or_insert(*b);
            }
        }
        Ok(())
    }

    /// Occupied bins sorted by (token, bin).
    fn sorted_bins(&self) -> Vec<(u64, Bin)> {
        let mut v: Vec<(u64, Bin)> = Vec::with_capacity(self.n_bins());
        for map in &self.shards {
            v.extend(map.iter().map(|(&k, &b)| (k, b)));
        }
        v.sort_unstable_by_key(|&(k, _)| k);
        v
    }

    /// The lower median of the non-zero `x` per token (`vocab_size` values; NaN where a token
    /// was never seen with a non-zero count).
    pub fn medians(&self) -> Vec<f32> {
        let mut out = vec![f32::NAN; self.vocab_size];
        let bins = self.sorted_bins();
        let mut start = 0;
        while start < bins.len() {
            let token = key_token(bins[start].0);
            let end = start + bins[start..].partition_point(|&(k, _)| key_token(k) == token);
            let group = &bins[start..end];
            let n: u64 = group.iter().map(|(_, b)| b.count).sum();
            let rank = (n - 1) / 2;
            let mut before = 0u64;
            for (_, bin) in group {
                if before + bin.count > rank {
                    let median = if bin.min == bin.max {
                        bin.min
                    } else {
                        let rank_in_bin = rank - before;
                        bin.min
                            + (bin.max - bin.min) * (rank_in_bin as f64 / (bin.count - 1) as f64)
                    };
                    out[token] = median as f32;
                    break;
                }
                before += bin.count;
            }
            start = end;
        }
        out
    }

    /// Per token, the number of cells where its summed count was non-zero.
    pub fn n_nonzero(&self) -> Vec<u64> {
        let mut out = vec![0u64; self.vocab_size];
        for map in &self.shards {
            for (&k, b) in map {
                out[key_token(k)] += b.count;
            }
        }
        out
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
            assert!(rel < 0.003, "token {t}: {} vs {}", med[t], exact[t]);
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
            assert!(rel < 0.003, "token {t}: {m} vs {}", exact[t]);
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
        // Token 1: 1000 and 1001 share bin 2551 -> interpolated between min and max.
        let indptr = [0i64, 2, 4, 6, 7];
        let indices = [0u32, 1, 0, 1, 0, 1, 0];
        let data = [1.0f32, 1000.0, 2.0, 1001.0, 3.0, 1000.0, 4.0];
        let mut acc = MedianAccumulator::new(3, false, 1e4);
        acc.add_chunk(&indptr, &indices, &data, &[0, 1], 1, false)
            .unwrap();
        assert_eq!(bin_of(1000.0), bin_of(1001.0));
        let med = acc.medians();
        assert_eq!(med[0], 2.0);
        // Token 1: n = 3, rank 1, one bin of count 3 min 1000 max 1001 -> 1000 + 1 * 1/2.
        assert_eq!(med[1], 1000.5);
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
    fn keys_sort_by_token_then_signed_bin() {
        let mut keys = vec![
            key(1, 5),
            key(0, 3),
            key(1, -7),
            key(0, -1),
            key(0, i32::MIN),
        ];
        keys.sort_unstable();
        assert_eq!(
            keys,
            vec![
                key(0, i32::MIN),
                key(0, -1),
                key(0, 3),
                key(1, -7),
                key(1, 5)
            ]
        );
        assert_eq!(key_token(key(77, -3)), 77);
        assert_eq!(bin_of(1.0), 0);
        assert_eq!(bin_of(2.0), 256);
        assert_eq!(bin_of(0.5), -256);
    }
}
