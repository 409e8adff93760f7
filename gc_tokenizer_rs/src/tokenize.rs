//! Chunk tokenisation: normalise, rank and truncate every cell of a CSR chunk, in parallel.
//!
//! Cells are processed in fixed batches of [`BATCH_CELLS`] consecutive cells; each rayon task
//! reuses one scratch (candidate buffers, sort keys and per-token sums, see `map_init`), so
//! there is no per-cell heap allocation. Each batch writes its tokens straight into its own
//! region of the chunk's output arrays (a cell keeps at most one token per stored entry, so the
//! regions follow `indptr`); the regions are then compacted in order, so 1 thread and N threads
//! give identical bytes. Ranking sorts packed `u64` keys
//! ([`crate::topk::rank_top_k`]) and is exactly the comparator order. On invalid input the error
//! of the first offending cell (in cell order) is returned, whatever the thread count.
//!
//! Counts reach the ranking through [`for_each_count`]: in canonical rows an entry is usually its
//! token's only count, and its median is then read from a per-column table, in column order.

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::normalize::{
    check_gene_map, for_each_count, median_is_known, validate_row, CellScratch, ColumnTokens,
    CsrChunk, NormParams,
};
use crate::topk::{rank_top_k, token_value, RankScratch};

/// Cells per parallel task. Fixed, so the work split never depends on the thread count.
pub const BATCH_CELLS: usize = 256;

/// Settings of [`tokenize_chunk`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenizeParams {
    /// Maximum genes kept per cell (>= 1).
    pub top_k: usize,
    /// Normalisation (library size, target sum, integer check).
    pub norm: NormParams,
    /// Threads of the rayon pool; 0 = rayon's default.
    pub n_threads: usize,
}

/// Statistics of one tokenised chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChunkStats {
    /// Vocabulary genes with a non-zero count that were dropped because their median is unknown
    /// (NaN or <= 0), summed over the chunk's cells.
    pub n_dropped_no_median: u64,
}

/// The tokens of one chunk, in the ragged corpus layout (see `docs/corpus-format.md`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizedChunk {
    /// `n_cells + 1` offsets into `genes` / `values`, starting at 0.
    pub offsets: Vec<i64>,
    /// Token ids, most highly expressed (relative to the median) first within each cell.
    pub genes: Vec<u32>,
    /// `log2(1 + x / median)` per token, rounded once to f32.
    pub values: Vec<f32>,
    /// Per cell: vocabulary genes with c > 0 and a known median, before truncation to `top_k`.
    pub n_expressed: Vec<u32>,
    /// Chunk statistics.
    pub stats: ChunkStats,
}

/// Builds the rayon pool for one call (0 = rayon's default size).
///
/// The pool is deliberately not cached: Python data loaders fork, and a cached pool's threads do
/// not survive a fork, so a child would block forever on it. Starting a few threads per chunk
/// costs far less than tokenising the chunk.
pub(crate) fn build_pool(n_threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n_threads)
        .thread_name(|i| format!("gc-tokenizer-{i}"))
        .build()
        .map_err(|e| Error::ThreadPool {
            n_threads,
            message: e.to_string(),
        })
}

/// Reusable buffers of one rayon task: a cell's candidates (`r`, token), its ranking, and the
/// buffers of [`for_each_count`].
#[derive(Default)]
struct Scratch {
    r: Vec<f64>,
    token: Vec<u32>,
    ranking: RankScratch,
    counts: CellScratch,
}

/// What a chunk's cells share: how columns map to tokens, and each column's median, read in
/// column order.
struct Columns<'a> {
    tokens: ColumnTokens<'a>,
    /// Per column: the median (f64, > 0) of its token; NaN when it has no token or no known median.
    median: Vec<f64>,
    /// Medians by token, for counts summed over several columns.
    token_median: &'a [f32],
}

/// A median as f64 when it is usable ([`median_is_known`]), else NaN.
#[inline]
fn usable(median: f32) -> f64 {
    if median_is_known(median) {
        f64::from(median)
    } else {
        f64::NAN
    }
}

impl<'a> Columns<'a> {
    fn new(col_token: &'a [u32], medians: &'a [f32]) -> Self {
        let median = col_token
            .iter()
            // NO_TOKEN is past the end of `medians`
            .map(|&token| medians.get(token as usize).map_or(f64::NAN, |&m| usable(m)))
            .collect();
        Self {
            tokens: ColumnTokens::new(col_token, medians.len()),
            median,
            token_median: medians,
        }
    }
}

/// One batch of consecutive cells and the disjoint parts of the chunk's output arrays it fills.
/// A cell keeps at most as many tokens as it has stored entries, so the batch's tokens fit in the
/// region of its entries (`genes` / `values`); they are written from its start and compacted
/// after all batches are done.
struct Job<'a> {
    cells: Range<usize>,
    region_start: usize,
    genes: &'a mut [u32],
    values: &'a mut [f32],
    lens: &'a mut [u32],
    n_expressed: &'a mut [u32],
}

/// What one batch wrote: tokens (from its region's start) and genes dropped for lack of a median.
struct BatchDone {
    region_start: usize,
    n_tokens: usize,
    n_dropped: u64,
}

/// Tokenises one cell (the rules of [`tokenize_chunk`]) into `genes` / `values` (which must have
/// room for one token per stored entry of the row). Returns (tokens written, candidates before
/// truncation, genes dropped for lack of a median).
///
/// Same arithmetic as [`crate::normalize::normalize_cell`] and [`crate::normalize::ratios`]
/// (f64, duplicates summed in index order).
#[allow(clippy::too_many_arguments)]
fn tokenize_cell(
    cell: usize,
    indices: &[u32],
    data: &[f32],
    columns: &Columns<'_>,
    params: &TokenizeParams,
    scratch: &mut Scratch,
    genes: &mut [u32],
    values: &mut [f32],
) -> Result<(usize, u32, u64)> {
    let norm = &params.norm;
    let total = validate_row(
        cell,
        indices,
        data,
        columns.tokens.token.len(),
        norm.allow_non_integer,
    )?;
    let Scratch {
        r,
        token,
        ranking,
        counts,
    } = scratch;
    let x_of = norm.normaliser(total);
    r.clear();
    token.clear();
    let mut dropped = 0u64;
    for_each_count(indices, data, &columns.tokens, counts, |t, c, column| {
        let median = match column {
            Some(column) => columns.median[column],
            None => usable(columns.token_median[t as usize]),
        };
        if median.is_nan() {
            dropped += 1;
        } else {
            r.push(x_of(c) / median);
            token.push(t);
        }
    });
    rank_top_k(r, token, params.top_k, ranking);
    // Equal r are adjacent: one log2 per distinct value.
    let (mut last_r, mut last_value) = (f64::NAN, 0.0f32);
    let mut written = 0;
    for ((i, gene), value) in ranking.order().zip(genes.iter_mut()).zip(values.iter_mut()) {
        let ri = r[i];
        if ri.to_bits() != last_r.to_bits() {
            last_r = ri;
            last_value = token_value(ri);
        }
        *gene = token[i];
        *value = last_value;
        written += 1;
    }
    Ok((written, r.len() as u32, dropped))
}

#[allow(clippy::too_many_arguments)]
fn tokenize_batch(
    matrix: &CsrChunk<'_>,
    job: Job<'_>,
    columns: &Columns<'_>,
    params: &TokenizeParams,
    scratch: &mut Scratch,
) -> Result<BatchDone> {
    let mut done = BatchDone {
        region_start: job.region_start,
        n_tokens: 0,
        n_dropped: 0,
    };
    let first = job.cells.start;
    for cell in job.cells {
        let (indices, data) = matrix.row(cell)?;
        let at = done.n_tokens;
        let end = at + indices.len();
        let (written, n_expressed, dropped) = tokenize_cell(
            cell,
            indices,
            data,
            columns,
            params,
            scratch,
            &mut job.genes[at..end],
            &mut job.values[at..end],
        )?;
        job.lens[cell - first] = written as u32;
        job.n_expressed[cell - first] = n_expressed;
        done.n_tokens += written;
        done.n_dropped += dropped;
    }
    Ok(done)
}

/// Tokenises one CSR chunk of a cell × gene count matrix.
///
/// * `indptr` (n_cells + 1, any base), `indices` (input column per entry), `data` (counts);
/// * `col_token[column]`: vocabulary token of each input column, `u32::MAX` = not in vocabulary;
/// * `medians[token]`: non-zero median of `x` per token (NaN or <= 0 = unknown; the vocabulary
///   size is `medians.len()`).
///
/// Per cell: duplicates summed, library-size scaled (optional), genes without a known median
/// dropped, ordered by `x / median` descending then token id, truncated to `top_k`, valued
/// `log2(1 + x / median)`.
pub fn tokenize_chunk(
    indptr: &[i64],
    indices: &[u32],
    data: &[f32],
    col_token: &[u32],
    medians: &[f32],
    params: &TokenizeParams,
) -> Result<TokenizedChunk> {
    let mut genes = vec![0u32; indices.len()];
    let mut values = vec![0f32; indices.len()];
    let cells = tokenize_chunk_into(
        indptr,
        indices,
        data,
        col_token,
        medians,
        params,
        &mut genes,
        &mut values,
    )?;
    let n_tokens = cells.n_tokens();
    genes.truncate(n_tokens);
    values.truncate(n_tokens);
    if n_tokens < genes.capacity() / 4 * 3 {
        // Many entries outside the vocabulary: give the unused room back.
        genes.shrink_to_fit();
        values.shrink_to_fit();
    }
    Ok(TokenizedChunk {
        offsets: cells.offsets,
        genes,
        values,
        n_expressed: cells.n_expressed,
        stats: cells.stats,
    })
}

/// The per-cell part of a tokenised chunk whose tokens went to caller-provided buffers
/// ([`tokenize_chunk_into`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChunkCells {
    /// `n_cells + 1` offsets into the token buffers, starting at 0.
    pub offsets: Vec<i64>,
    /// As [`TokenizedChunk::n_expressed`].
    pub n_expressed: Vec<u32>,
    /// Chunk statistics.
    pub stats: ChunkStats,
}

impl ChunkCells {
    /// Tokens written: the first `n_tokens()` entries of the buffers.
    pub fn n_tokens(&self) -> usize {
        self.offsets.last().map_or(0, |&end| end as usize)
    }
}

/// [`tokenize_chunk`] writing the tokens into `genes` / `values` (each at least `indices.len()`
/// long; their first [`ChunkCells::n_tokens`] entries are the result, the rest is scratch). The
/// caller owns the buffers, so bindings can hand over memory the consumer allocates (numpy
/// backs large arrays with huge pages, far fewer page faults than fresh 4 KiB pages).
#[allow(clippy::too_many_arguments)]
pub fn tokenize_chunk_into(
    indptr: &[i64],
    indices: &[u32],
    data: &[f32],
    col_token: &[u32],
    medians: &[f32],
    params: &TokenizeParams,
    genes: &mut [u32],
    values: &mut [f32],
) -> Result<ChunkCells> {
    if params.top_k == 0 {
        return Err(Error::InvalidArgument("top_k must be >= 1".into()));
    }
    if genes.len() < indices.len() || values.len() < indices.len() {
        return Err(Error::InvalidArgument(format!(
            "output buffers hold {} and {} tokens, need {} (one per stored entry)",
            genes.len(),
            values.len(),
            indices.len()
        )));
    }
    params.norm.validate()?;
    let matrix = CsrChunk::new(indptr, indices, data)?;
    let vocab_size = medians.len();
    check_gene_map(col_token, vocab_size)?;

    let columns = Columns::new(col_token, medians);
    // Rows before the first malformed one (if any) are processed; that row's error is returned
    // unless an earlier cell has one (errors come in cell order).
    let n_cells = matrix.n_cells();
    let valid = (0..n_cells)
        .find(|&i| matrix.row(i).is_err())
        .unwrap_or(n_cells);
    let base = indptr[0];
    let entry = |cell: usize| (indptr[cell] - base) as usize; // well-formed for cell <= valid
    let mut lens = vec![0u32; valid];
    let mut n_expressed = vec![0u32; valid];
    let mut jobs = Vec::with_capacity(valid.div_ceil(BATCH_CELLS));
    {
        let (mut g, mut v, mut l, mut e) = (
            &mut genes[..entry(valid)],
            &mut values[..entry(valid)],
            lens.as_mut_slice(),
            n_expressed.as_mut_slice(),
        );
        for start in (0..valid).step_by(BATCH_CELLS) {
            let end = (start + BATCH_CELLS).min(valid);
            let size = entry(end) - entry(start);
            let (g1, g2) = std::mem::take(&mut g).split_at_mut(size);
            let (v1, v2) = std::mem::take(&mut v).split_at_mut(size);
            let (l1, l2) = std::mem::take(&mut l).split_at_mut(end - start);
            let (e1, e2) = std::mem::take(&mut e).split_at_mut(end - start);
            (g, v, l, e) = (g2, v2, l2, e2);
            jobs.push(Job {
                cells: start..end,
                region_start: entry(start),
                genes: g1,
                values: v1,
                lens: l1,
                n_expressed: e1,
            });
        }
    }
    let pool = build_pool(params.n_threads)?;
    let results: Vec<Result<BatchDone>> = pool.install(|| {
        jobs.into_par_iter()
            .map_init(Scratch::default, |scratch, job| {
                tokenize_batch(&matrix, job, &columns, params, scratch)
            })
            .collect()
    });
    // The first error in batch order is the first offending cell.
    let done = results.into_iter().collect::<Result<Vec<_>>>()?;
    if valid < n_cells {
        return Err(matrix
            .row(valid)
            .expect_err("row `valid` is the first malformed one"));
    }
    // Close the gaps between the batches' regions (in order, so nothing is overwritten early).
    let mut n_tokens = 0;
    let mut stats = ChunkStats::default();
    for batch in &done {
        let region = batch.region_start..batch.region_start + batch.n_tokens;
        genes.copy_within(region.clone(), n_tokens);
        values.copy_within(region, n_tokens);
        n_tokens += batch.n_tokens;
        stats.n_dropped_no_median += batch.n_dropped;
    }
    let mut offsets = Vec::with_capacity(n_cells + 1);
    let mut offset = 0i64;
    offsets.push(offset);
    for &len in &lens {
        offset += i64::from(len);
        offsets.push(offset);
    }
    Ok(ChunkCells {
        offsets,
        n_expressed,
        stats,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::normalize::NO_TOKEN;

    /// Tiny deterministic PRNG (splitmix64).
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Self {
            Self(seed)
        }
        pub(crate) fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        pub(crate) fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
    }

    /// A random CSR matrix of small integer counts, with sorted column indices per row,
    /// explicit zeros, empty rows and an `indptr` base of 1000.
    pub(crate) fn random_csr(
        rng: &mut Rng,
        n_cells: usize,
        n_cols: usize,
        max_per_row: usize,
    ) -> (Vec<i64>, Vec<u32>, Vec<f32>) {
        let base = 1000i64;
        let mut indptr = vec![base];
        let mut indices = Vec::new();
        let mut data = Vec::new();
        for _ in 0..n_cells {
            let nnz = rng.below(max_per_row as u64 + 1) as usize;
            let mut cols: Vec<u32> = (0..nnz).map(|_| rng.below(n_cols as u64) as u32).collect();
            cols.sort_unstable();
            cols.dedup();
            for c in cols {
                indices.push(c);
                // Mostly small counts (many ties), some zeros, a few large.
                let v = match rng.below(10) {
                    0 => 0.0,
                    1 => rng.below(500) as f32,
                    _ => (1 + rng.below(6)) as f32,
                };
                data.push(v);
            }
            indptr.push(base + indices.len() as i64);
        }
        (indptr, indices, data)
    }

    fn params(top_k: usize, library_size: bool, n_threads: usize) -> TokenizeParams {
        TokenizeParams {
            top_k,
            norm: NormParams {
                library_size,
                target_sum: 1e4,
                allow_non_integer: false,
            },
            n_threads,
        }
    }

    fn cell(chunk: &TokenizedChunk, i: usize) -> (Vec<u32>, Vec<f32>) {
        let (a, b) = (chunk.offsets[i] as usize, chunk.offsets[i + 1] as usize);
        (chunk.genes[a..b].to_vec(), chunk.values[a..b].to_vec())
    }

    #[test]
    fn small_example_by_hand() {
        // 3 cells, 5 columns -> tokens: col0->2, col1->0, col2->2 (duplicate), col3->1, col4->none.
        let col_token = [2, 0, 2, 1, NO_TOKEN];
        let medians = [1.0f32, 2.0, 1.0];
        let indptr = [0i64, 4, 4, 6];
        let indices = [0u32, 1, 2, 3, 3, 4];
        let data = [1.0f32, 2.0, 1.0, 4.0, 0.0, 5.0];
        let out = tokenize_chunk(
            &indptr,
            &indices,
            &data,
            &col_token,
            &medians,
            &params(10, false, 1),
        )
        .unwrap();
        // Cell 0: token2 c=2 r=2; token0 c=2 r=2; token1 c=4 r=2 -> all tie, order by token id.
        assert_eq!(out.offsets, vec![0, 3, 3, 3]);
        assert_eq!(cell(&out, 0).0, vec![0, 1, 2]);
        assert_eq!(cell(&out, 0).1, vec![(3.0f64).log2() as f32; 3]);
        // Cell 1 empty; cell 2: explicit zero and an unmapped gene only.
        assert_eq!(out.n_expressed, vec![3, 0, 0]);
        assert_eq!(out.stats.n_dropped_no_median, 0);
    }

    #[test]
    fn library_size_on_and_off() {
        let col_token = [0, 1, NO_TOKEN];
        let medians = [1.0f32, 1.0];
        let indptr = [0i64, 3];
        let indices = [0u32, 1, 2];
        let data = [1.0f32, 3.0, 4.0];
        let on = tokenize_chunk(
            &indptr,
            &indices,
            &data,
            &col_token,
            &medians,
            &params(10, true, 1),
        )
        .unwrap();
        assert_eq!(on.genes, vec![1, 0]);
        let r1 = (3.0f64 / 8.0) * 1e4;
        let r0 = (1.0f64 / 8.0) * 1e4;
        assert_eq!(
            on.values,
            vec![(1.0 + r1).log2() as f32, (1.0 + r0).log2() as f32]
        );
        let off = tokenize_chunk(
            &indptr,
            &indices,
            &data,
            &col_token,
            &medians,
            &params(10, false, 1),
        )
        .unwrap();
        assert_eq!(off.genes, vec![1, 0]);
        assert_eq!(off.values, vec![2.0, 1.0]);
    }

    #[test]
    fn cell_with_total_zero_and_empty_chunk() {
        let col_token = [0, 1];
        let medians = [1.0f32, 1.0];
        let out = tokenize_chunk(
            &[5, 7],
            &[0, 1],
            &[0.0, 0.0],
            &col_token,
            &medians,
            &params(4, true, 1),
        )
        .unwrap();
        assert_eq!(out.offsets, vec![0, 0]);
        assert_eq!(out.n_expressed, vec![0]);
        let out =
            tokenize_chunk(&[3], &[], &[], &col_token, &medians, &params(4, true, 2)).unwrap();
        assert_eq!(out.offsets, vec![0]);
        assert!(out.genes.is_empty() && out.n_expressed.is_empty());
    }

    #[test]
    fn top_k_truncation_and_n_expressed() {
        let col_token: Vec<u32> = (0..6).collect();
        let medians = [1.0f32; 6];
        let indptr = [0i64, 6];
        let indices: Vec<u32> = (0..6).collect();
        let data = [1.0f32, 6.0, 2.0, 5.0, 3.0, 4.0];
        let out = tokenize_chunk(
            &indptr,
            &indices,
            &data,
            &col_token,
            &medians,
            &params(3, false, 1),
        )
        .unwrap();
        assert_eq!(out.genes, vec![1, 3, 5]);
        assert_eq!(out.n_expressed, vec![6]);
        assert_eq!(out.offsets, vec![0, 3]);
    }

    #[test]
    fn unknown_medians_dropped_and_counted() {
        let col_token = [0, 1, 2, 3];
        let medians = [1.0f32, f32::NAN, 0.0, 2.0];
        let indptr = [0i64, 4, 6];
        let indices = [0u32, 1, 2, 3, 1, 3];
        let data = [1.0f32, 1.0, 1.0, 1.0, 1.0, 4.0];
        let out = tokenize_chunk(
            &indptr,
            &indices,
            &data,
            &col_token,
            &medians,
            &params(10, false, 1),
        )
        .unwrap();
        assert_eq!(out.stats.n_dropped_no_median, 3);
        assert_eq!(out.n_expressed, vec![2, 1]);
        assert_eq!(cell(&out, 0).0, vec![0, 3]);
        assert_eq!(cell(&out, 1).0, vec![3]);
    }

    #[test]
    fn first_error_in_cell_order_whatever_the_threads() {
        let mut rng = Rng::new(7);
        let n_cells = 2000;
        let (indptr, indices, mut data) = random_csr(&mut rng, n_cells, 50, 20);
        let col_token: Vec<u32> = (0..50).collect();
        let medians = vec![1.0f32; 50];
        // Poison one entry in an early and one in a late batch.
        let row_of = |pos: usize| indptr.partition_point(|&p| p - 1000 <= pos as i64) - 1;
        let early = indices.len() / 5;
        let late = indices.len() * 4 / 5;
        data[late] = f32::NAN;
        data[early] = -2.0;
        for threads in [1, 2, 4] {
            let e = tokenize_chunk(
                &indptr,
                &indices,
                &data,
                &col_token,
                &medians,
                &params(8, true, threads),
            )
            .unwrap_err();
            assert_eq!(
                e,
                Error::NegativeCount {
                    cell: row_of(early),
                    column: indices[early],
                    value: -2.0
                }
            );
        }
    }

    #[test]
    fn every_validation_error() {
        let col_token = [0, 1];
        let medians = [1.0f32, 1.0];
        let p = params(4, true, 1);
        let run = |indptr: &[i64], indices: &[u32], data: &[f32]| {
            tokenize_chunk(indptr, indices, data, &col_token, &medians, &p).unwrap_err()
        };
        assert!(matches!(
            run(&[0, 1, 2], &[0, 1], &[1.0, -1.0]),
            Error::NegativeCount {
                cell: 1,
                column: 1,
                ..
            }
        ));
        assert!(matches!(
            run(&[0, 1, 2], &[0, 1], &[f32::NAN, 1.0]),
            Error::NonFiniteCount {
                cell: 0,
                column: 0,
                ..
            }
        ));
        assert!(matches!(
            run(&[0, 1, 2], &[0, 1], &[1.0, f32::INFINITY]),
            Error::NonFiniteCount {
                cell: 1,
                column: 1,
                ..
            }
        ));
        assert!(matches!(
            run(&[0, 1, 2], &[0, 1], &[1.0, 2.5]),
            Error::NonIntegerCount {
                cell: 1,
                column: 1,
                ..
            }
        ));
        assert!(matches!(
            run(&[0, 1, 2], &[0, 7], &[1.0, 2.0]),
            Error::ColumnOutOfRange {
                cell: 1,
                column: 7,
                n_columns: 2
            }
        ));
        assert!(matches!(
            run(&[0, 2, 1], &[0, 1], &[1.0, 2.0]),
            Error::MalformedIndptr { cell: 1, .. }
        ));
        assert!(matches!(
            run(&[0, 1, 3], &[0, 1], &[1.0, 2.0]),
            Error::MalformedIndptr {
                cell: 1,
                end: 3,
                nnz: 2,
                ..
            }
        ));
        assert_eq!(run(&[], &[], &[]), Error::EmptyIndptr);
        assert!(matches!(
            run(&[0, 1], &[0], &[]),
            Error::LengthMismatch { .. }
        ));
        // Argument errors.
        let e = tokenize_chunk(&[0], &[], &[], &[0, 2], &medians, &p).unwrap_err();
        assert!(matches!(
            e,
            Error::TokenOutOfRange {
                column: 1,
                token: 2,
                ..
            }
        ));
        let e =
            tokenize_chunk(&[0], &[], &[], &col_token, &medians, &params(0, true, 1)).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        // Non-integer values pass when allowed.
        let mut ok = p;
        ok.norm.allow_non_integer = true;
        assert!(tokenize_chunk(&[0, 1], &[0], &[2.5], &col_token, &medians, &ok).is_ok());
    }

    #[test]
    fn malformed_indptr_reported_after_earlier_errors() {
        let col_token: Vec<u32> = (0..50).collect();
        let medians = vec![1.0f32; 50];
        let mut rng = Rng::new(3);
        let (mut indptr, indices, mut data) = random_csr(&mut rng, 1200, 50, 20);
        // indptr decreases at cell 900 (a later batch than the bad count below).
        indptr[901] = indptr[900] - 1;
        for threads in [1, 3] {
            let e = tokenize_chunk(
                &indptr,
                &indices,
                &data,
                &col_token,
                &medians,
                &params(8, true, threads),
            )
            .unwrap_err();
            assert!(
                matches!(e, Error::MalformedIndptr { cell: 900, .. }),
                "{e:?}"
            );
        }
        let row = (300..900).find(|&i| indptr[i + 1] > indptr[i]).unwrap();
        data[(indptr[row] - 1000) as usize] = -1.0;
        for threads in [1, 3] {
            let e = tokenize_chunk(
                &indptr,
                &indices,
                &data,
                &col_token,
                &medians,
                &params(8, true, threads),
            )
            .unwrap_err();
            assert!(
                matches!(e, Error::NegativeCount { cell, .. } if cell == row),
                "{e:?}"
            );
        }
    }

    #[test]
    fn thread_count_invariance() {
        let mut rng = Rng::new(12345);
        let n_cols = 300;
        let (indptr, indices, data) = random_csr(&mut rng, 3000, n_cols, 120);
        // Gene map with duplicates and unmapped columns; vocabulary of 200 tokens.
        let col_token: Vec<u32> = (0..n_cols)
            .map(|_| match rng.below(10) {
                0 => NO_TOKEN,
                _ => rng.below(200) as u32,
            })
            .collect();
        let medians: Vec<f32> = (0..200)
            .map(|_| match rng.below(20) {
                0 => f32::NAN,
                _ => (1 + rng.below(8)) as f32 / 2.0,
            })
            .collect();
        for library_size in [false, true] {
            let reference = tokenize_chunk(
                &indptr,
                &indices,
                &data,
                &col_token,
                &medians,
                &params(16, library_size, 1),
            )
            .unwrap();
            assert!(reference.stats.n_dropped_no_median > 0);
            for threads in [0, 2, 3, 8] {
                let other = tokenize_chunk(
                    &indptr,
                    &indices,
                    &data,
                    &col_token,
                    &medians,
                    &params(16, library_size, threads),
                )
                .unwrap();
                assert_eq!(reference, other, "threads {threads}");
                assert_eq!(
                    reference
                        .values
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    other.values.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
            }
        }
    }

    /// A random chunk whose `n_cols` columns map onto `n_tokens < n_cols` tokens (column `c` to
    /// token `c % n_tokens`, so some tokens have two columns, like gene aliases), with medians.
    #[allow(clippy::type_complexity)]
    fn aliased_chunk(
        seed: u64,
        n_cells: usize,
        n_cols: usize,
        n_tokens: usize,
        max_per_row: usize,
    ) -> (Vec<i64>, Vec<u32>, Vec<f32>, Vec<u32>, Vec<f32>) {
        let mut rng = Rng::new(seed);
        let (indptr, indices, data) = random_csr(&mut rng, n_cells, n_cols, max_per_row);
        let col_token = (0..n_cols).map(|c| (c % n_tokens) as u32).collect();
        let medians = (0..n_tokens).map(|t| 0.25 + (t % 7) as f32).collect();
        (indptr, indices, data, col_token, medians)
    }

    #[test]
    fn matches_naive_full_sort() {
        let (indptr, indices, data, col_token, medians) = aliased_chunk(99, 700, 80, 50, 60);
        let p = params(10, true, 2);
        let out = tokenize_chunk(&indptr, &indices, &data, &col_token, &medians, &p).unwrap();
        for i in 0..700 {
            let (a, b) = ((indptr[i] - 1000) as usize, (indptr[i + 1] - 1000) as usize);
            let total: f64 = data[a..b].iter().map(|&v| f64::from(v)).sum();
            let mut c = [0.0f64; 50];
            for k in a..b {
                c[col_token[indices[k] as usize] as usize] += f64::from(data[k]);
            }
            let mut all: Vec<(f64, u32)> = (0..50u32)
                .filter(|&t| c[t as usize] > 0.0)
                .map(|t| {
                    let x = c[t as usize] / total * 1e4;
                    (x / f64::from(medians[t as usize]), t)
                })
                .collect();
            all.sort_by(|p, q| q.0.partial_cmp(&p.0).unwrap().then(p.1.cmp(&q.1)));
            assert_eq!(out.n_expressed[i] as usize, all.len());
            all.truncate(10);
            let (genes, values) = cell(&out, i);
            assert_eq!(genes, all.iter().map(|e| e.1).collect::<Vec<_>>());
            assert_eq!(
                values,
                all.iter()
                    .map(|e| (1.0 + e.0).log2() as f32)
                    .collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn unsorted_and_repeated_columns_match_canonical_rows() {
        // The same counts as canonical CSR (direct path, shared tokens summed in a list) and with
        // each row's entries reversed and its first count split over two entries of one column
        // (dense accumulator path): identical tokens and values.
        let (indptr, indices, data, col_token, medians) = aliased_chunk(5, 300, 90, 60, 70);
        let (mut indptr2, mut indices2, mut data2) = (vec![0i64], Vec::new(), Vec::new());
        for i in 0..300 {
            let (a, b) = ((indptr[i] - 1000) as usize, (indptr[i + 1] - 1000) as usize);
            for k in (a..b).rev() {
                if k == a && data[k] >= 2.0 {
                    let half = (data[k] / 2.0).floor();
                    indices2.extend([indices[k], indices[k]]);
                    data2.extend([half, data[k] - half]);
                } else {
                    indices2.push(indices[k]);
                    data2.push(data[k]);
                }
            }
            indptr2.push(indices2.len() as i64);
        }
        let p = params(2048, true, 2);
        let canonical = tokenize_chunk(&indptr, &indices, &data, &col_token, &medians, &p).unwrap();
        let shuffled =
            tokenize_chunk(&indptr2, &indices2, &data2, &col_token, &medians, &p).unwrap();
        assert_eq!(canonical.offsets, shuffled.offsets);
        assert_eq!(canonical.genes, shuffled.genes);
        assert_eq!(canonical.values, shuffled.values);
        assert_eq!(canonical.n_expressed, shuffled.n_expressed);
    }
}
