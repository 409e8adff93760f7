//! Per-cell normalisation: CSR row access and validation, mapping input columns to vocabulary
//! tokens, summing duplicate genes, library-size scaling and the median ratio.
//!
//! For a cell with raw counts `c` (see `docs/corpus-format.md`):
//!
//! ```text
//! total = Σ data over all stored entries of the row (f64, index order; genes outside the vocabulary too)
//! x_t   = (c_t / total) * target_sum   if library_size and total > 0, else c_t   (f64)
//! r_t   = x_t / median_t
//! ```
//!
//! where `c_t` sums (in f64, index order) all columns that map to token `t`. Only tokens with
//! `c_t > 0` are emitted; explicit zeros are ignored (but still validated).

use crate::error::{Error, Result};
use crate::topk::Ranked;

/// Gene-map value meaning "this input column has no vocabulary token".
pub const NO_TOKEN: u32 = u32::MAX;

/// One chunk of a cell × gene matrix in CSR layout, borrowed.
///
/// `indptr` has `n_cells + 1` entries and may start at a non-zero base (it can be a slice of the
/// whole file's `indptr`); row `i` spans `indptr[i] - indptr[0] .. indptr[i+1] - indptr[0]` of
/// `indices` / `data`, which are the chunk's own slices.
#[derive(Debug, Clone, Copy)]
pub struct CsrChunk<'a> {
    pub indptr: &'a [i64],
    pub indices: &'a [u32],
    pub data: &'a [f32],
}

impl<'a> CsrChunk<'a> {
    /// Checks what can be checked without looking at rows: a non-empty `indptr` and equal
    /// `indices` / `data` lengths. Row bounds are checked per cell by [`CsrChunk::row`], so the
    /// first broken row is reported in cell order together with the other per-cell errors.
    pub fn new(indptr: &'a [i64], indices: &'a [u32], data: &'a [f32]) -> Result<Self> {
        if indptr.is_empty() {
            return Err(Error::EmptyIndptr);
        }
        if indices.len() != data.len() {
            return Err(Error::LengthMismatch {
                indices: indices.len(),
                data: data.len(),
            });
        }
        Ok(Self {
            indptr,
            indices,
            data,
        })
    }

    /// Number of cells (rows) in the chunk.
    pub fn n_cells(&self) -> usize {
        self.indptr.len() - 1
    }

    /// The stored entries of row `cell`, or [`Error::MalformedIndptr`] when `indptr` decreases
    /// there or points past the chunk's entries.
    pub fn row(&self, cell: usize) -> Result<(&'a [u32], &'a [f32])> {
        let base = self.indptr[0];
        let start = self.indptr[cell].wrapping_sub(base);
        let end = self.indptr[cell + 1].wrapping_sub(base);
        let nnz = self.indices.len();
        if start < 0 || end < start || end as u64 > nnz as u64 {
            return Err(Error::MalformedIndptr {
                cell,
                start,
                end,
                nnz,
            });
        }
        let (start, end) = (start as usize, end as usize);
        Ok((&self.indices[start..end], &self.data[start..end]))
    }
}

/// Checks that every gene-map entry is [`NO_TOKEN`] or a token id below `vocab_size`.
pub fn check_gene_map(col_token: &[u32], vocab_size: usize) -> Result<()> {
    match col_token
        .iter()
        .position(|&t| t != NO_TOKEN && t as usize >= vocab_size)
    {
        Some(column) => Err(Error::TokenOutOfRange {
            column,
            token: col_token[column],
            vocab_size,
        }),
        None => Ok(()),
    }
}

/// Normalisation settings shared by tokenisation and the median pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormParams {
    /// Scale counts by `target_sum / total` (`x = c / total * target_sum`).
    pub library_size: bool,
    /// Target library size (ignored without `library_size`).
    pub target_sum: f64,
    /// Accept non-integer counts (normalised input); otherwise they are an error.
    pub allow_non_integer: bool,
}

impl NormParams {
    /// `c -> x` for a cell whose counts sum to `total`: `(c / total) * target_sum` with library-size
    /// scaling (and `total > 0`), else `c`.
    #[inline]
    pub fn normaliser(&self, total: f64) -> impl Fn(f64) -> f64 {
        let scale = self.library_size && total > 0.0;
        let target_sum = self.target_sum;
        move |c| if scale { (c / total) * target_sum } else { c }
    }

    /// Rejects a non-finite or non-positive `target_sum` when library-size scaling is on.
    pub fn validate(&self) -> Result<()> {
        if self.library_size && !(self.target_sum.is_finite() && self.target_sum > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "target_sum must be finite and > 0, got {}",
                self.target_sum
            )));
        }
        Ok(())
    }
}

/// How a chunk's input columns map to tokens: each column's token, and whether another column
/// maps to the same token (gene aliases; a few per file), whose counts are then summed per token.
#[derive(Debug, Clone)]
pub struct ColumnTokens<'a> {
    /// Token of each input column, [`NO_TOKEN`] = not in the vocabulary.
    pub token: &'a [u32],
    shared: Vec<bool>,
    vocab_size: usize,
}

impl<'a> ColumnTokens<'a> {
    /// `col_token` must have passed [`check_gene_map`] for `vocab_size`.
    pub fn new(col_token: &'a [u32], vocab_size: usize) -> Self {
        let mut n_columns = vec![0u8; vocab_size];
        for &token in col_token.iter().filter(|&&t| t != NO_TOKEN) {
            n_columns[token as usize] = n_columns[token as usize].saturating_add(1);
        }
        let shared = col_token
            .iter()
            .map(|&t| t != NO_TOKEN && n_columns[t as usize] > 1)
            .collect();
        Self {
            token: col_token,
            shared,
            vocab_size,
        }
    }
}

/// Reusable per-task buffers of [`for_each_count`]: sums of shared tokens, and for rows that
/// repeat a column a dense per-token accumulator (all zeros between cells; allocated by the first
/// such row) with the tokens the row touched.
#[derive(Debug, Clone, Default)]
pub struct CellScratch {
    shared_sums: Vec<(u32, f64)>,
    acc: Vec<f64>,
    touched: Vec<u32>,
}

/// Calls `emit(token, c, column)` once for every vocabulary token of a validated row whose summed
/// count `c` (f64, added in index order) is > 0; `column` is the token's single column when the
/// count is one entry's, else None.
///
/// In a row whose columns increase, an entry is its token's only count unless its column is
/// shared: such entries are emitted directly, in column order, then the shared tokens' sums (a
/// short list). Rows with a repeated or unsorted column go through the dense accumulator, in order
/// of first occurrence. The same counts either way.
#[inline]
pub fn for_each_count(
    indices: &[u32],
    data: &[f32],
    columns: &ColumnTokens<'_>,
    scratch: &mut CellScratch,
    mut emit: impl FnMut(u32, f64, Option<usize>),
) {
    let CellScratch {
        shared_sums,
        acc,
        touched,
    } = scratch;
    if columns_increasing(indices) {
        shared_sums.clear();
        for (&column, &value) in indices.iter().zip(data) {
            let column = column as usize;
            let token = columns.token[column];
            if token == NO_TOKEN || value <= 0.0 {
                continue;
            }
            if !columns.shared[column] {
                emit(token, f64::from(value), Some(column));
            } else {
                match shared_sums.iter_mut().find(|(t, _)| *t == token) {
                    Some((_, sum)) => *sum += f64::from(value),
                    None => shared_sums.push((token, f64::from(value))),
                }
            }
        }
        for &(token, c) in shared_sums.iter() {
            emit(token, c, None);
        }
    } else {
        if acc.is_empty() {
            acc.resize(columns.vocab_size, 0.0);
        }
        touched.clear();
        for (&column, &value) in indices.iter().zip(data) {
            let token = columns.token[column as usize];
            if token == NO_TOKEN || value <= 0.0 {
                continue;
            }
            let slot = &mut acc[token as usize];
            if *slot == 0.0 {
                touched.push(token);
            }
            *slot += f64::from(value);
        }
        for &token in touched.iter() {
            emit(token, std::mem::take(&mut acc[token as usize]), None);
        }
    }
}

/// Whether a finite `value` is a whole number (without a libm call: every f32 of magnitude
/// >= 2^23 is whole, and smaller ones convert to i32 exactly when they are).
#[inline]
fn is_integer(value: f32) -> bool {
    value.abs() >= 8_388_608.0 || (value as i32) as f32 == value
}

/// Validates the stored entries of row `cell` and returns its library size (the sum of all its
/// counts, f64, index order). Checks, first offending entry in index order: column out of range
/// (`>= n_columns`), non-finite count, negative count, non-integer count (unless
/// `allow_non_integer`).
pub fn validate_row(
    cell: usize,
    indices: &[u32],
    data: &[f32],
    n_columns: usize,
    allow_non_integer: bool,
) -> Result<f64> {
    let mut total = 0.0f64;
    for (&column, &value) in indices.iter().zip(data) {
        if column as usize >= n_columns {
            return Err(Error::ColumnOutOfRange {
                cell,
                column,
                n_columns,
            });
        }
        if !value.is_finite() {
            return Err(Error::NonFiniteCount {
                cell,
                column,
                value,
            });
        }
        if value < 0.0 {
            return Err(Error::NegativeCount {
                cell,
                column,
                value,
            });
        }
        if !allow_non_integer && !is_integer(value) {
            return Err(Error::NonIntegerCount {
                cell,
                column,
                value,
            });
        }
        total += f64::from(value);
    }
    Ok(total)
}

/// Validates row `cell` (see [`validate_row`]) and writes `(token, x)` for every vocabulary token
/// with a summed count `c > 0` into `out` (cleared first; order as [`for_each_count`]).
pub fn normalize_cell(
    cell: usize,
    indices: &[u32],
    data: &[f32],
    columns: &ColumnTokens<'_>,
    params: &NormParams,
    scratch: &mut CellScratch,
    out: &mut Vec<(u32, f64)>,
) -> Result<()> {
    out.clear();
    // Pass 1: validate and compute the library size (all genes, index order, f64).
    let total = validate_row(
        cell,
        indices,
        data,
        columns.token.len(),
        params.allow_non_integer,
    )?;
    normalize_validated(total, indices, data, columns, params, scratch, out);
    Ok(())
}

/// Whether a row's column indices strictly increase (canonical CSR: no column twice).
#[inline]
pub fn columns_increasing(indices: &[u32]) -> bool {
    // A fold without early exit: branch-free, so it compiles to a vector loop.
    indices
        .windows(2)
        .fold(true, |increasing, pair| increasing & (pair[0] < pair[1]))
}

/// [`normalize_cell`] for a row that [`validate_row`] has accepted, whose sum it returned as
/// `total` (so the checks are not repeated).
pub fn normalize_validated(
    total: f64,
    indices: &[u32],
    data: &[f32],
    columns: &ColumnTokens<'_>,
    params: &NormParams,
    scratch: &mut CellScratch,
    out: &mut Vec<(u32, f64)>,
) {
    out.clear();
    let x_of = params.normaliser(total);
    for_each_count(indices, data, columns, scratch, |token, c, _| {
        out.push((token, x_of(c)))
    });
}

/// Whether a median is usable: finite and > 0 (NaN, inf, 0 and negatives mean "unknown").
#[inline]
pub fn median_is_known(median: f32) -> bool {
    median.is_finite() && median > 0.0
}

/// Turns normalised `(token, x)` pairs into ranking entries `r = x / median` (f64), written to
/// `out` (cleared first). Tokens without a known median are dropped; returns how many.
pub fn ratios(normalized: &[(u32, f64)], medians: &[f32], out: &mut Vec<Ranked>) -> u32 {
    out.clear();
    let mut dropped = 0u32;
    for &(token, x) in normalized {
        let median = medians[token as usize];
        if median_is_known(median) {
            out.push(Ranked {
                r: x / f64::from(median),
                token,
            });
        } else {
            dropped += 1;
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAW: NormParams = NormParams {
        library_size: false,
        target_sum: 1e4,
        allow_non_integer: false,
    };

    fn norm(
        indices: &[u32],
        data: &[f32],
        col_token: &[u32],
        params: &NormParams,
    ) -> Result<Vec<(u32, f64)>> {
        let vocab = col_token
            .iter()
            .filter(|&&t| t != NO_TOKEN)
            .max()
            .map_or(0, |&t| t as usize + 1);
        let columns = ColumnTokens::new(col_token, vocab);
        let mut scratch = CellScratch::default();
        let mut out = Vec::new();
        normalize_cell(3, indices, data, &columns, params, &mut scratch, &mut out)?;
        assert!(scratch.acc.iter().all(|&v| v == 0.0), "scratch not reset");
        Ok(out)
    }

    #[test]
    fn canonical_and_other_rows_give_the_same_counts() {
        // Columns 0 and 2 share token 1. Canonical row: direct entries, then the shared sum.
        // The same counts unsorted, and with column 4 split over two entries: dense accumulator.
        let col_token = [1, 0, 1, NO_TOKEN, 2];
        let sorted = |mut v: Vec<(u32, f64)>| {
            v.sort_by_key(|e| e.0);
            v
        };
        let canonical = norm(
            &[0, 1, 2, 3, 4],
            &[2.0, 1.0, 3.0, 5.0, 4.0],
            &col_token,
            &RAW,
        );
        let expected = vec![(0, 1.0), (2, 4.0), (1, 5.0)];
        assert_eq!(canonical.unwrap(), expected);
        let unsorted = norm(
            &[4, 2, 1, 3, 0],
            &[4.0, 3.0, 1.0, 5.0, 2.0],
            &col_token,
            &RAW,
        );
        assert_eq!(sorted(unsorted.unwrap()), sorted(expected.clone()));
        let repeated = norm(
            &[0, 1, 2, 3, 4, 4],
            &[2.0, 1.0, 3.0, 5.0, 1.0, 3.0],
            &col_token,
            &RAW,
        );
        assert_eq!(sorted(repeated.unwrap()), sorted(expected));
    }

    #[test]
    fn duplicates_are_summed_and_zeros_ignored() {
        // columns 0 and 2 both map to token 1; column 1 is an explicit zero; column 3 unmapped.
        let col_token = [1, 0, 1, NO_TOKEN];
        let out = norm(&[0, 1, 2, 3], &[2.0, 0.0, 3.0, 5.0], &col_token, &RAW).unwrap();
        assert_eq!(out, vec![(1, 5.0)]);
    }

    #[test]
    fn library_size_uses_all_genes() {
        let col_token = [0, 1, NO_TOKEN];
        let p = NormParams {
            library_size: true,
            target_sum: 10.0,
            ..RAW
        };
        let out = norm(&[0, 1, 2], &[1.0, 3.0, 6.0], &col_token, &p).unwrap();
        assert_eq!(
            out,
            vec![(0, (1.0 / 10.0) * 10.0), (1, (3.0 / 10.0) * 10.0)]
        );
        // Library size off: raw counts.
        let out = norm(&[0, 1, 2], &[1.0, 3.0, 6.0], &col_token, &RAW).unwrap();
        assert_eq!(out, vec![(0, 1.0), (1, 3.0)]);
    }

    #[test]
    fn empty_and_all_zero_cells() {
        let col_token = [0, 1];
        let p = NormParams {
            library_size: true,
            ..RAW
        };
        assert!(norm(&[], &[], &col_token, &p).unwrap().is_empty());
        assert!(norm(&[0, 1], &[0.0, 0.0], &col_token, &p)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn validation_errors() {
        let col_token = [0, 1];
        let e = norm(&[0, 1], &[1.0, -3.0], &col_token, &RAW).unwrap_err();
        assert_eq!(
            e,
            Error::NegativeCount {
                cell: 3,
                column: 1,
                value: -3.0
            }
        );
        let e = norm(&[1], &[f32::NAN], &col_token, &RAW).unwrap_err();
        assert!(matches!(e, Error::NonFiniteCount { cell: 3, column: 1, value } if value.is_nan()));
        let e = norm(&[0], &[f32::INFINITY], &col_token, &RAW).unwrap_err();
        assert!(matches!(e, Error::NonFiniteCount { column: 0, .. }));
        let e = norm(&[0], &[f32::NEG_INFINITY], &col_token, &RAW).unwrap_err();
        assert!(matches!(e, Error::NonFiniteCount { column: 0, .. }));
        let e = norm(&[0, 1], &[1.0, 0.5], &col_token, &RAW).unwrap_err();
        assert_eq!(
            e,
            Error::NonIntegerCount {
                cell: 3,
                column: 1,
                value: 0.5
            }
        );
        let ok = NormParams {
            allow_non_integer: true,
            ..RAW
        };
        assert_eq!(
            norm(&[0, 1], &[1.0, 0.5], &col_token, &ok).unwrap(),
            vec![(0, 1.0), (1, 0.5)]
        );
        // An explicit zero in an out-of-range column is still malformed.
        let e = norm(&[0, 2], &[1.0, 0.0], &col_token, &RAW).unwrap_err();
        assert_eq!(
            e,
            Error::ColumnOutOfRange {
                cell: 3,
                column: 2,
                n_columns: 2
            }
        );
    }

    #[test]
    fn error_leaves_scratch_clean() {
        let col_token = [0, 1];
        let columns = ColumnTokens::new(&col_token, 2);
        let mut scratch = CellScratch::default();
        let mut out = Vec::new();
        let r = normalize_cell(
            0,
            &[0, 1],
            &[2.0, -1.0],
            &columns,
            &RAW,
            &mut scratch,
            &mut out,
        );
        assert!(r.is_err());
        normalize_cell(1, &[1], &[4.0], &columns, &RAW, &mut scratch, &mut out).unwrap();
        assert_eq!(out, vec![(1, 4.0)]);
    }

    #[test]
    fn integer_check() {
        for v in [
            0.0f32,
            -0.0,
            1.0,
            3.0,
            8_388_607.0,
            8_388_608.0,
            1e20,
            -5.0,
            f32::MAX,
        ] {
            assert!(is_integer(v), "{v}");
            assert_eq!(is_integer(v), v.fract() == 0.0);
        }
        for v in [0.5f32, 1.25, 8_388_607.5, -0.1, 1e-30, f32::MIN_POSITIVE] {
            assert!(!is_integer(v), "{v}");
            assert_eq!(is_integer(v), v.fract() == 0.0);
        }
    }

    #[test]
    fn csr_rows_with_base_offset() {
        let indptr = [10, 12, 12, 13];
        let indices = [0, 1, 2];
        let data = [1.0, 2.0, 3.0];
        let m = CsrChunk::new(&indptr, &indices, &data).unwrap();
        assert_eq!(m.n_cells(), 3);
        assert_eq!(m.row(0).unwrap(), (&indices[0..2], &data[0..2]));
        assert_eq!(m.row(1).unwrap().0.len(), 0);
        assert_eq!(m.row(2).unwrap(), (&indices[2..3], &data[2..3]));
    }

    #[test]
    fn malformed_csr() {
        assert_eq!(
            CsrChunk::new(&[], &[], &[]).unwrap_err(),
            Error::EmptyIndptr
        );
        assert!(matches!(
            CsrChunk::new(&[0, 1], &[0], &[]).unwrap_err(),
            Error::LengthMismatch {
                indices: 1,
                data: 0
            }
        ));
        let indices = [0, 1];
        let data = [1.0, 1.0];
        let m = CsrChunk::new(&[0, 2, 1], &indices, &data).unwrap();
        assert!(m.row(0).is_ok());
        assert!(matches!(
            m.row(1).unwrap_err(),
            Error::MalformedIndptr { cell: 1, .. }
        ));
        let m = CsrChunk::new(&[0, 1, 3], &indices, &data).unwrap();
        assert!(matches!(
            m.row(1).unwrap_err(),
            Error::MalformedIndptr {
                cell: 1,
                end: 3,
                nnz: 2,
                ..
            }
        ));
        let m = CsrChunk::new(&[5, 4], &indices, &data).unwrap();
        assert!(matches!(
            m.row(0).unwrap_err(),
            Error::MalformedIndptr { cell: 0, .. }
        ));
    }

    #[test]
    fn gene_map_check() {
        assert!(check_gene_map(&[0, NO_TOKEN, 2], 3).is_ok());
        assert_eq!(
            check_gene_map(&[0, 3], 3).unwrap_err(),
            Error::TokenOutOfRange {
                column: 1,
                token: 3,
                vocab_size: 3
            }
        );
    }

    #[test]
    fn ratios_drop_unknown_medians() {
        let medians = [2.0, f32::NAN, 0.0, -1.0, f32::INFINITY, 0.5];
        let normalized: Vec<(u32, f64)> = (0..6).map(|t| (t, 1.0)).collect();
        let mut out = Vec::new();
        let dropped = ratios(&normalized, &medians, &mut out);
        assert_eq!(dropped, 4);
        assert_eq!(
            out,
            vec![Ranked { r: 0.5, token: 0 }, Ranked { r: 2.0, token: 5 }]
        );
    }

    #[test]
    fn target_sum_validation() {
        let bad = NormParams {
            library_size: true,
            target_sum: 0.0,
            ..RAW
        };
        assert!(matches!(bad.validate(), Err(Error::InvalidArgument(_))));
        let off = NormParams {
            library_size: false,
            target_sum: f64::NAN,
            ..RAW
        };
        assert!(off.validate().is_ok());
    }
}
