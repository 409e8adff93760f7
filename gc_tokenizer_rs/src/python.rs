//! Python bindings: module `genecompass._rust` (built by maturin with the `python` feature).
//!
//! Each binding only converts: NumPy arrays are borrowed as slices, the GIL is released around
//! one core call, and the result is converted back. Core errors map to one exception class per
//! [`ErrorKind`]; all data errors subclass `ValueError`.

use numpy::{Element, IntoPyArray, PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use crate::error::{Error, ErrorKind};
use crate::medians::MedianAccumulator;
use crate::normalize::NormParams;
use crate::tokenize::TokenizeParams;

create_exception!(
    genecompass._rust,
    InvalidCountError,
    PyValueError,
    "A count is negative, NaN, infinite, or not an integer where raw counts are required."
);
create_exception!(
    genecompass._rust,
    MalformedMatrixError,
    PyValueError,
    "The CSR matrix is broken: indptr decreasing or past the data, column index out of range, \
     or indices/data of different lengths."
);
create_exception!(
    genecompass._rust,
    InvalidArgumentError,
    PyValueError,
    "A non-matrix argument is unusable: gene map token outside the vocabulary, top_k < 1, \
     target_sum <= 0, or merging accumulators with different settings."
);

fn to_py_err(e: Error) -> PyErr {
    let message = e.to_string();
    match e.kind() {
        ErrorKind::InvalidCount => InvalidCountError::new_err(message),
        ErrorKind::MalformedMatrix => MalformedMatrixError::new_err(message),
        ErrorKind::InvalidArgument => InvalidArgumentError::new_err(message),
        ErrorKind::ThreadPool => PyRuntimeError::new_err(message),
    }
}

/// Borrows a contiguous 1-D array as a slice.
fn slice<'a, T: Element>(array: &'a PyReadonlyArray1<'_, T>, name: &str) -> PyResult<&'a [T]> {
    array
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be a C-contiguous 1-D array")))
}

type TokenizeOutput<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<u32>>,
    u64,
);

/// tokenize_chunk(indptr, indices, data, col_token, medians, top_k, library_size, target_sum,
/// allow_non_integer, n_threads, genes_out=None, values_out=None)
/// -> (offsets, genes, values, n_expressed, n_dropped_no_median)
///
/// Tokenises one CSR chunk (int64 indptr, uint32 indices, float32 data; uint32 col_token with
/// 2**32-1 = not in vocabulary; float32 medians per token, NaN or <= 0 = unknown). `genes` and
/// `values` have at least one slot per stored entry (`genes_out` / `values_out` when given and
/// large enough); the tokens are their first `offsets[-1]` entries.
#[pyfunction]
#[pyo3(signature = (
    indptr, indices, data, col_token, medians, top_k, library_size, target_sum,
    allow_non_integer, n_threads, genes_out=None, values_out=None
))]
#[allow(clippy::too_many_arguments)]
fn tokenize_chunk<'py>(
    py: Python<'py>,
    indptr: PyReadonlyArray1<'py, i64>,
    indices: PyReadonlyArray1<'py, u32>,
    data: PyReadonlyArray1<'py, f32>,
    col_token: PyReadonlyArray1<'py, u32>,
    medians: PyReadonlyArray1<'py, f32>,
    top_k: usize,
    library_size: bool,
    target_sum: f64,
    allow_non_integer: bool,
    n_threads: usize,
    genes_out: Option<Bound<'py, PyArray1<u32>>>,
    values_out: Option<Bound<'py, PyArray1<f32>>>,
) -> PyResult<TokenizeOutput<'py>> {
    let params = TokenizeParams {
        top_k,
        norm: NormParams {
            library_size,
            target_sum,
            allow_non_integer,
        },
        n_threads,
    };
    let indptr = slice(&indptr, "indptr")?;
    let indices = slice(&indices, "indices")?;
    let data = slice(&data, "data")?;
    let col_token = slice(&col_token, "col_token")?;
    let medians = slice(&medians, "medians")?;
    // Token buffers: the caller's when given and large enough (reused across chunks), else new
    // ones from numpy's allocator (huge pages for large arrays); one slot per entry.
    let n = indices.len();
    let genes = genes_out
        .filter(|a| a.len().is_ok_and(|len| len >= n))
        .unwrap_or_else(|| PyArray1::<u32>::zeros(py, n, false));
    let values = values_out
        .filter(|a| a.len().is_ok_and(|len| len >= n))
        .unwrap_or_else(|| PyArray1::<f32>::zeros(py, n, false));
    let cells = {
        let writable = |_| PyValueError::new_err("genes_out / values_out must be writable");
        let mut genes_rw = genes.try_readwrite().map_err(writable)?;
        let mut values_rw = values.try_readwrite().map_err(writable)?;
        let contiguous = |_| PyValueError::new_err("genes_out / values_out must be contiguous");
        let genes_out = genes_rw.as_slice_mut().map_err(contiguous)?;
        let values_out = values_rw.as_slice_mut().map_err(contiguous)?;
        py.detach(|| {
            crate::tokenize::tokenize_chunk_into(
                indptr, indices, data, col_token, medians, &params, genes_out, values_out,
            )
        })
        .map_err(to_py_err)?
    };
    Ok((
        cells.offsets.into_pyarray(py),
        genes,
        values,
        cells.n_expressed.into_pyarray(py),
        cells.stats.n_dropped_no_median,
    ))
}

/// MedianAccumulator(vocab_size, library_size, target_sum)
///
/// Streaming, mergeable per-token lower median of the normalised expression over the cells where
/// the token is non-zero (dense per-token log histogram, 256 bins per octave: the exact median
/// rounded to f32, or within 0.27 % of it; see `medians.rs`).
#[pyclass(name = "MedianAccumulator", module = "genecompass._rust")]
struct PyMedianAccumulator {
    inner: MedianAccumulator,
}

#[pymethods]
impl PyMedianAccumulator {
    #[new]
    #[pyo3(signature = (vocab_size, library_size, target_sum))]
    fn new(vocab_size: usize, library_size: bool, target_sum: f64) -> Self {
        Self {
            inner: MedianAccumulator::new(vocab_size, library_size, target_sum),
        }
    }

    /// add_chunk(indptr, indices, data, col_token, allow_non_integer, n_threads)
    ///
    /// Adds the cells of one CSR chunk. All-or-nothing: on error the state is unchanged.
    #[pyo3(signature = (indptr, indices, data, col_token, allow_non_integer, n_threads))]
    #[allow(clippy::too_many_arguments)]
    fn add_chunk(
        &mut self,
        py: Python<'_>,
        indptr: PyReadonlyArray1<'_, i64>,
        indices: PyReadonlyArray1<'_, u32>,
        data: PyReadonlyArray1<'_, f32>,
        col_token: PyReadonlyArray1<'_, u32>,
        allow_non_integer: bool,
        n_threads: usize,
    ) -> PyResult<()> {
        let indptr = slice(&indptr, "indptr")?;
        let indices = slice(&indices, "indices")?;
        let data = slice(&data, "data")?;
        let col_token = slice(&col_token, "col_token")?;
        let inner = &mut self.inner;
        py.detach(|| {
            inner.add_chunk(
                indptr,
                indices,
                data,
                col_token,
                n_threads,
                allow_non_integer,
            )
        })
        .map_err(to_py_err)
    }

    /// merge(other): adds another accumulator's state (same settings required).
    fn merge(&mut self, py: Python<'_>, other: PyRef<'_, Self>) -> PyResult<()> {
        let other = &other.inner;
        let inner = &mut self.inner;
        py.detach(|| inner.merge(other)).map_err(to_py_err)
    }

    /// medians() -> float32[vocab_size]: lower median per token, NaN where never seen.
    fn medians<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f32>> {
        let inner = &self.inner;
        py.detach(|| inner.medians()).into_pyarray(py)
    }

    /// n_nonzero() -> uint64[vocab_size]: cells where each token had a non-zero count.
    fn n_nonzero<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        let inner = &self.inner;
        py.detach(|| inner.n_nonzero()).into_pyarray(py)
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    #[getter]
    fn library_size(&self) -> bool {
        self.inner.library_size()
    }

    #[getter]
    fn target_sum(&self) -> f64 {
        self.inner.target_sum()
    }

    /// Allocated histogram bins over all tokens; memory is 8 bytes per bin.
    #[getter]
    fn n_bins(&self) -> usize {
        self.inner.n_bins()
    }

    fn __repr__(&self) -> String {
        format!(
            "MedianAccumulator(vocab_size={}, library_size={}, target_sum={}, n_bins={})",
            self.inner.vocab_size(),
            if self.inner.library_size() {
                "True"
            } else {
                "False"
            },
            self.inner.target_sum(),
            self.inner.n_bins()
        )
    }
}

#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", crate::VERSION)?;
    m.add_function(wrap_pyfunction!(tokenize_chunk, m)?)?;
    m.add_class::<PyMedianAccumulator>()?;
    m.add("InvalidCountError", py.get_type::<InvalidCountError>())?;
    m.add(
        "MalformedMatrixError",
        py.get_type::<MalformedMatrixError>(),
    )?;
    m.add(
        "InvalidArgumentError",
        py.get_type::<InvalidArgumentError>(),
    )?;
    Ok(())
}
