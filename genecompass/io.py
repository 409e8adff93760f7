"""Streaming readers for single-cell count matrices.

``open_counts(path)`` opens one input and returns a :class:`CountSource`: a context manager that holds file
handles (never the whole matrix) and hands out cells × genes CSR chunks of float32 counts with
:meth:`CountSource.iter_chunks`. Every later stage (qc, tokenize, inspect) reads its input through here, so
memory is bounded by the chunk size, not by the file size.

Formats (``CountSource.format``) and their limits:

``h5ad``
    Read with h5py directly; ``obs``/``var`` columns through ``anndata.io.read_elem`` (legacy pre-0.7 files
    with ``__categories`` are handled too). ``X`` stored as CSR streams ``indptr`` → ``indices``/``data``
    ranges per chunk; dense ``X`` streams row slabs converted to CSR. CSC ``X`` cannot be read by rows: it is
    converted in memory when its stored arrays are at most ``CSC_IN_MEMORY_LIMIT_BYTES`` (200 MiB), otherwise
    an :class:`~genecompass.errors.InputError` explains how to rewrite the file as CSR.
    ``layer="raw"`` reads ``raw/X`` with ``raw/var``; ``layer=NAME`` reads ``layers/NAME``.
``anndata_zarr``
    An AnnData Zarr store (v2 or v3, a directory written by ``adata.write_zarr``), read array by array with
    zarr-python exactly like ``h5ad`` (same layers, same CSC policy).
``10x_h5``
    CellRanger HDF5 (``filtered_feature_bc_matrix.h5``): v3+ ``matrix/`` layout (only ``Gene Expression``
    features are kept) and v2 ``GENOME/`` layout (``layer=GENOME`` picks one genome when there are several).
    The stored genes × cells CSC is a cells × genes CSR, so it streams like an h5ad. Gzipped files are refused
    with a hint to ``gunzip`` them first.
``10x_mtx``
    A CellRanger MatrixMarket directory: ``matrix.mtx(.gz)`` with ``genes.tsv(.gz)`` (v2) or
    ``features.tsv(.gz)`` (v3) and ``barcodes.tsv(.gz)``; GEO-style name prefixes (``GSM1_matrix.mtx.gz``)
    are accepted. MatrixMarket cannot be read by rows, so the whole matrix is loaded into memory once (about
    16 bytes per non-zero) and then chunked; convert big MTX inputs to h5ad for streaming.
``loom``
    Loom via h5py: ``matrix`` (genes × cells, dense) is read in column slabs; gene ids from
    ``row_attrs/Accession`` (else ``row_attrs/Gene``), symbols from ``row_attrs/Gene``, obs from
    ``col_attrs``.
``csv`` / ``tsv``
    A dense count table as text (``.csv``, ``.tsv``, ``.tab``, ``.txt``, each optionally gzipped): a header
    row, then one row per cell (cells × genes) or per gene (genes × cells), the first field naming the row.
    The orientation is detected from which of the header and the first column holds gene names
    (``CountSource.orientation``; ``layer="rows=cells"`` or ``layer="rows=genes"`` sets it instead, the CLI's
    ``--no-transpose`` / ``--transpose``). Opening scans the file once (row names, field counts); cells ×
    genes tables then stream in row blocks of about ``_DENSE_SLAB_BYTES``; genes × cells tables are
    transposed once on disk (non-zeros bucketed by cell into a temporary directory, 12 bytes each) and
    stream from there, so memory stays bounded either way. No obs columns.

Chunks (:class:`CsrChunk`) never hold explicit zeros; their column indices refer to the source's genes
(``var_names``), i.e. after non-expression features of a 10x file have been dropped.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import InputError

__all__ = [
    "CountSource",
    "CsrChunk",
    "GeneMap",
    "NOT_IN_VOCAB",
    "open_counts",
    "validate_counts",
    "strip_ensembl_version",
    "TEXT_ROWS_ARE_CELLS",
    "TEXT_ROWS_ARE_GENES",
]

#: ``GeneMap.col_token`` value of a column whose gene is not in the vocabulary.
NOT_IN_VOCAB = int(np.iinfo(np.uint32).max)
#: CSC matrices up to this many stored bytes (data + indices + indptr) are converted to CSR in memory.
CSC_IN_MEMORY_LIMIT_BYTES = 200 * 2**20
#: Fewer genes than this fraction in the vocabulary means the ids were not understood: refuse the file.
MIN_FRACTION_IN_VOCAB = 0.01
#: HDF5 chunk cache per open file, large enough to hold a full row band of a chunked dense matrix.
_H5_CACHE_BYTES = 64 * 2**20
#: Dense matrices are read (and converted to CSR) in slabs of about this many bytes.
_DENSE_SLAB_BYTES = 32 * 2**20

_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{6,})(?:\.\d+)?(?:_PAR_Y)?$", re.IGNORECASE)
_ENSEMBL_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_gene_id", "feature_id", "gene_ids-0")
_SYMBOL_COLUMNS = ("gene_symbols", "feature_name", "symbol", "gene_symbol", "gene_name", "gene_names")
_GENE_EXPRESSION = "Gene Expression"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class CsrChunk:
    """Cells ``[start, stop)`` of a file as CSR: row ``i`` of the chunk is cell ``start + i``."""

    start: int
    stop: int
    indptr: np.ndarray  # int64, len stop - start + 1, indptr[0] == 0
    indices: np.ndarray  # uint32, gene column in the source (index into CountSource.var_names)
    data: np.ndarray  # float32 counts, no explicit zeros

    @property
    def n_rows(self) -> int:
        return self.stop - self.start

    def to_scipy(self, n_genes: int):
        """This chunk as a ``scipy.sparse.csr_matrix`` of shape (n_rows, n_genes)."""
        import scipy.sparse as sp

        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=(self.n_rows, n_genes))


@dataclass(frozen=True)
class GeneMap:
    """How a source's gene columns map onto the gene reference (one entry per column)."""

    species: str  # "human" | "mouse"
    id_type: str  # "ensembl" | "symbol"
    gene_ids: list[str | None]  # Ensembl id per column, version stripped (None: symbol not mapped)
    col_token: np.ndarray  # uint32 per column; NOT_IN_VOCAB = not in the vocabulary
    is_mito: np.ndarray  # bool per column
    is_coding_or_mirna: np.ndarray  # bool per column (biotype protein_coding or miRNA), for QC
    n_in_vocab: int
    n_duplicate_columns: int  # in-vocabulary columns whose token another column also has (summed downstream)

    @property
    def frac_in_vocab(self) -> float:
        return self.n_in_vocab / max(len(self.col_token), 1)


def strip_ensembl_version(gene_id: str) -> str:
    """``ENSG00000141510.17`` → ``ENSG00000141510`` (also drops GENCODE's ``_PAR_Y``); other ids unchanged."""
    m = _ENSEMBL_RE.match(gene_id)
    return m.group(1) if m else gene_id


def _looks_ensembl(names: Sequence[str], min_fraction: float = 0.5) -> bool:
    if len(names) == 0:
        return False
    step = max(len(names) // 2000, 1)  # a sample is enough to decide
    sample = [str(n) for n in names[::step]]
    return sum(bool(_ENSEMBL_RE.match(n)) for n in sample) >= min_fraction * len(sample)


# --------------------------------------------------------------------------------------------------------
# Row readers: (start, stop) -> (indptr int64 from 0, indices uint32, data float32), before column selection


def _as_f32(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == np.float32 else a.astype(np.float32)


def _as_u32(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint32:
        return a
    if a.dtype == np.int32:
        return a.view(np.uint32)  # negative indices wrap to huge values and fail the range check
    return a.astype(np.uint32)


def _dense_to_csr(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_rows, n_cols = block.shape
    flat = np.flatnonzero(block)  # NaN is non-zero, so NaNs are kept and caught by validate_counts
    data = _as_f32(block.ravel()[flat])
    indptr = np.searchsorted(flat, np.arange(0, (n_rows + 1) * n_cols, n_cols, dtype=np.int64)).astype(
        np.int64
    )
    return indptr, (flat % max(n_cols, 1)).astype(np.uint32), data


#: HDF5 chunk cache of each stored CSR array: they are read in long sequential ranges, so a cache only needs
#: to hold the chunk a range ends in (the file-wide default, sized for dense row bands, would let every
#: sparse array hold 64 MiB of chunks it will never read again).
_H5_SPARSE_CACHE_BYTES = 1 << 20


def _sequential(group: Any, name: str) -> Any:
    """``group[name]``; for an h5py group, opened with a small chunk cache (HDF5 fixes a dataset's cache when
    the file first opens it, so this must be the first access)."""
    if not type(group).__module__.startswith("h5py"):
        return group[name]
    import h5py

    access = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
    access.set_chunk_cache(521, _H5_SPARSE_CACHE_BYTES, 0.75)
    try:
        return h5py.Dataset(h5py.h5d.open(group.id, name.encode(), access))
    except (KeyError, TypeError, ValueError):  # not a plain dataset: let the usual access report it
        return group[name]


class _SparseRows:
    """CSR arrays (h5py datasets, zarr arrays or numpy arrays) read by row ranges."""

    def __init__(self, indptr: Any, indices: Any, data: Any, n_rows: int, n_cols: int):
        self.indptr, self.indices, self.data = indptr, indices, data
        self.n_rows, self.n_cols = n_rows, n_cols
        # h5py/zarr return fresh arrays; slices of in-memory arrays are views, copied so chunks never alias
        self._in_memory = isinstance(data, np.ndarray)

    def read(
        self, start: int, stop: int, buffers: ReadBuffers | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        indptr = np.array(self.indptr[start : stop + 1], dtype=np.int64)  # always a copy
        lo, hi = int(indptr[0]), int(indptr[-1])
        indptr -= lo
        if buffers is not None and buffers.fits(self.indices, self.data):
            indices, data = buffers.read(self.indices, self.data, lo, hi)
        else:
            indices, data = np.asarray(self.indices[lo:hi]), np.asarray(self.data[lo:hi])
            if self._in_memory:
                indices, data = indices.copy(), data.copy()
        return indptr, _as_u32(indices), _as_f32(data)


class ReadBuffers:
    """Arrays that HDF5 reads of ``indices`` / ``data`` go into, reused from chunk to chunk.

    Fresh arrays for every chunk cost more than the read itself here: each large allocation is new
    memory that the kernel must fault in and zero. A chunk read into these buffers is a view of them,
    valid until the same buffers are read into again (see :meth:`CountSource.iter_chunks`). Stored dtypes
    other than uint32/int32 indices and float32 data (int64 indices, float64 or integer counts) are read
    into a second reused buffer and converted in place, as ``_as_u32`` / ``_as_f32`` would.
    """

    def __init__(self) -> None:
        self._arrays: dict[tuple[str, np.dtype], np.ndarray] = {}

    @staticmethod
    def fits(indices: Any, data: Any) -> bool:
        """Whether these datasets can be read into the buffers: h5py, integer indices, numeric data."""
        return (
            hasattr(indices, "read_direct")
            and hasattr(data, "read_direct")
            and indices.dtype.kind in "iu"
            and data.dtype.kind in "iuf"
        )

    def _array(self, role: str, dtype: np.dtype, n: int) -> np.ndarray:
        """The first ``n`` elements of this role's ``dtype`` buffer (grown with headroom when too small)."""
        key = (role, np.dtype(dtype))
        array = self._arrays.get(key)
        if array is None or len(array) < n:
            array = self._arrays[key] = np.empty(n + n // 4, dtype)
        return array[:n]

    def _read(self, role: str, dataset: Any, lo: int, hi: int, target: np.dtype) -> np.ndarray:
        n = hi - lo
        stored = dataset.dtype
        # uint32 indices may be stored as int32: same bits, read straight in (negative ones fail later).
        direct = stored == target or (target == np.uint32 and stored == np.int32)
        raw = self._array(role, stored, n)
        if n:
            dataset.read_direct(raw, np.s_[lo:hi], np.s_[0:n])
        if direct:
            return raw if stored == target else raw.view(target)
        out = self._array(role, target, n)
        np.copyto(out, raw, casting="unsafe")
        return out

    def read(self, indices: Any, data: Any, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return (
            self._read("indices", indices, lo, hi, np.dtype(np.uint32)),
            self._read("data", data, lo, hi, np.dtype(np.float32)),
        )


class _DenseRows:
    """A dense 2-D array read in row slabs (``transposed``: the array is genes × cells, read column slabs)."""

    def __init__(self, array: Any, transposed: bool = False):
        self.array, self.transposed = array, transposed
        shape = array.shape
        self.n_rows, self.n_cols = (shape[1], shape[0]) if transposed else (shape[0], shape[1])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Read in slabs of about _DENSE_SLAB_BYTES so that a dense chunk never holds chunk_size full rows.
        step = max(1, _DENSE_SLAB_BYTES // max(self.n_cols * self.array.dtype.itemsize, 1))
        parts = []
        for a in range(start, stop, step):
            b = min(a + step, stop)
            block = self.array[:, a:b].T if self.transposed else self.array[a:b]
            parts.append(_dense_to_csr(np.asarray(block)))
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [p[0][-1] for p in parts[:-1]])
        indptr = np.concatenate(
            [parts[0][0][:1]] + [p[0][1:] + o for p, o in zip(parts, offsets, strict=True)]
        )
        return indptr, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def _drop_entries(indptr: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """New indptr after keeping only entries where ``keep`` is true."""
    kept = np.zeros(keep.size + 1, dtype=np.int64)
    np.cumsum(keep, out=kept[1:])
    return kept[indptr]


# --------------------------------------------------------------------------------------------------------
# Count sources


class CountSource:
    """An opened count matrix (cells × genes). Use as a context manager, or call :meth:`close`.

    Attributes: ``path``, ``format`` (see the module docstring), ``n_cells``, ``n_genes``, ``var_names``
    (gene ids per column: Ensembl ids when the file has them, else symbols), ``gene_symbols`` (or None).
    """

    path: Path
    format: str
    n_cells: int
    n_genes: int
    var_names: list[str]
    gene_symbols: list[str] | None

    def __init__(self, path: Path, fmt: str):
        self.path = path
        self.format = fmt
        self._rows: Any = None  # a _SparseRows / _DenseRows
        self._colmap: np.ndarray | None = None  # file column -> source column (-1: dropped)
        self._closers: list[Callable[[], None]] = []

    # -- life cycle
    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    def __enter__(self) -> CountSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CountSource {self.format} {self.n_cells} cells × {self.n_genes} genes: {self.path}>"

    def _fail(self, problem: str) -> InputError:
        return InputError(f"{self.path}: {problem}")

    # -- obs
    def obs_columns(self) -> list[str]:
        """Names of the per-cell metadata columns the file holds."""
        return []

    def obs_names(self) -> list[str]:
        """Cell names (barcodes), one per row."""
        raise NotImplementedError

    def _read_obs_column(self, key: str) -> Any:
        raise NotImplementedError

    def read_obs(self, keys: Sequence[str]) -> pd.DataFrame:
        """Only the requested obs columns, indexed by cell name. A missing key raises InputError."""
        keys = list(keys)
        available = self.obs_columns()
        missing = [k for k in keys if k not in available]
        if missing:
            raise self._fail(
                f"obs column(s) {', '.join(map(repr, missing))} not found; available: "
                f"{', '.join(available) if available else '(none)'}"
            )
        columns = {k: self._read_obs_column(k) for k in keys}
        for k, v in columns.items():
            if len(v) != self.n_cells:
                raise self._fail(f"obs column {k!r} has {len(v)} values for {self.n_cells} cells")
        return pd.DataFrame(columns, index=pd.Index(self.obs_names(), name=None))

    # -- counts
    def iter_chunks(
        self, chunk_size: int = 4096, start: int = 0, stop: int | None = None, *, reuse: int = 0
    ) -> Iterator[CsrChunk]:
        """Yield cells ``[start, stop)`` as :class:`CsrChunk` of at most ``chunk_size`` cells, in order.

        ``reuse=n`` (n >= 1) reads HDF5 sparse matrices into ``n`` sets of :class:`ReadBuffers` in turn:
        a chunk's ``indices`` / ``data`` are then overwritten by the chunk ``n`` places later, so a
        consumer must be done with a chunk (or copy it) by then. Streaming passes use it to avoid
        faulting in fresh memory for every chunk. Arguments are checked at once (ValueError), not at
        the first ``next()``.
        """
        stop = self.n_cells if stop is None else stop
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not 0 <= start <= stop <= self.n_cells:
            raise ValueError(f"cell range [{start}, {stop}) is outside [0, {self.n_cells}]")
        return self._iter_chunks(chunk_size, start, stop, [ReadBuffers() for _ in range(reuse)])

    def _iter_chunks(
        self, chunk_size: int, start: int, stop: int, buffers: list[ReadBuffers]
    ) -> Iterator[CsrChunk]:
        for k, a in enumerate(range(start, stop, chunk_size)):
            b = min(a + chunk_size, stop)
            try:
                if buffers and isinstance(self._rows, _SparseRows):
                    indptr, indices, data = self._rows.read(a, b, buffers[k % len(buffers)])
                else:
                    indptr, indices, data = self._rows.read(a, b)
            except (OSError, RuntimeError, ValueError, KeyError) as e:
                raise self._fail(f"could not read cells {a}–{b - 1} (file damaged?): {e}") from e
            yield self._finish(a, b, indptr, indices, data)

    def _finish(self, a: int, b: int, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> CsrChunk:
        if indptr.size != b - a + 1 or indices.size != data.size or int(indptr[-1]) != data.size:
            raise self._fail(f"inconsistent sparse arrays at cells {a}–{b - 1} (indptr/indices/data sizes)")
        n_file_cols = self._rows.n_cols
        if indices.size and int(indices.max()) >= n_file_cols:
            raise self._fail(
                f"column index out of range at cells {a}–{b - 1} (file has {n_file_cols} columns)"
            )
        if self._colmap is not None:
            new_cols = self._colmap[indices]
            keep = new_cols >= 0
            if not keep.all():
                indptr = _drop_entries(indptr, keep)
                new_cols, data = new_cols[keep], data[keep]
            indices = new_cols.astype(np.uint32)
        if data.size and not data.all():  # explicit zeros
            keep = data != 0
            indptr = _drop_entries(indptr, keep)
            indices, data = indices[keep], data[keep]
        return CsrChunk(a, b, indptr, indices, data)

    def _check_nonempty(self) -> None:
        if self.n_cells == 0 or self.n_genes == 0:
            raise self._fail(f"empty matrix ({self.n_cells} cells × {self.n_genes} genes)")

    # -- genes
    def gene_map(self, reference: Any = None, species: str | None = None) -> GeneMap:
        """Map this file's gene columns onto ``reference`` (default: the bundled one).

        Ids are detected with ``detect_gene_ids`` (Ensembl versions stripped); ``species`` overrides the
        detected species. Raises InputError when the species cannot be told or when fewer than 1 % of the
        genes are in the vocabulary.
        """
        from .reference import detect_gene_ids, load_reference

        ref = load_reference() if reference is None else reference
        if species is not None and species not in ("human", "mouse"):
            raise InputError(f"unknown species {species!r}; expected 'human' or 'mouse'")
        names = [strip_ensembl_version(str(n)) for n in self.var_names]
        id_type, detected = detect_gene_ids(names, ref)
        if id_type == "symbol" and self.gene_symbols is not None and self.gene_symbols != self.var_names:
            # var_names are not Ensembl ids (symbols, or placeholders such as 10x's "ENSGXXXXXX"): map symbols
            names = [str(n) for n in self.gene_symbols]
            id_type, detected = detect_gene_ids(names, ref)
        species = species or detected
        if species is None:
            raise self._fail(
                f"could not tell the species from the gene {'ids' if id_type == 'ensembl' else 'symbols'} "
                f"(e.g. {', '.join(names[:3])}); pass --species human or --species mouse"
            )
        if id_type == "ensembl":
            gene_ids: list[str | None] = list(names)
            other = [i for i, n in enumerate(names) if not _ENSEMBL_RE.match(n)]
            if other:  # a few symbols among Ensembl ids (some pipelines fall back to them): map as symbols
                other_names = [names[i] for i in other]
                for i, g in zip(other, ref.gene_ids_for_symbols(other_names, species), strict=True):
                    gene_ids[i] = g
        else:
            gene_ids = list(ref.gene_ids_for_symbols(names, species))
        # Every column resolved to an Ensembl id ("" = unmapped) once; tokens, mito flags and biotypes are
        # then looked up for that one list (the reference resolves it to table positions only once).
        resolved = [g if g is not None else "" for g in gene_ids]
        tokens = np.asarray(ref.tokens_for_ids(resolved, species), dtype=np.int64)
        in_vocab = tokens >= 0
        col_token = np.where(in_vocab, tokens, NOT_IN_VOCAB).astype(np.uint32)
        n_in_vocab = int(in_vocab.sum())
        if n_in_vocab < MIN_FRACTION_IN_VOCAB * len(names):
            examples = ", ".join(names[i] for i in np.flatnonzero(~in_vocab)[:5])
            raise self._fail(
                f"only {n_in_vocab} of {len(names)} genes are in the gene reference as {species} {id_type} "
                f"ids (examples not found: {examples}); expected human or mouse Ensembl ids (ENSG…/ENSMUSG…) "
                "or gene symbols. If the species is wrong, pass --species."
            )

        is_mito = np.asarray(ref.mito_mask_for_ids(resolved, species), dtype=bool)
        symbols = (
            self.gene_symbols if self.gene_symbols is not None else (names if id_type == "symbol" else None)
        )
        if symbols is not None:  # the usual QC rule, also for genes the reference does not know
            is_mito |= np.array([str(s).upper().startswith("MT-") for s in symbols], dtype=bool)
        biotypes = np.asarray(ref.biotypes_for_ids(resolved, species), dtype=object)
        is_coding = np.isin(biotypes, ["protein_coding", "miRNA"])

        tok_in = tokens[in_vocab]
        _, inverse, counts = np.unique(tok_in, return_inverse=True, return_counts=True)
        n_dup = int((counts[inverse] > 1).sum())
        return GeneMap(
            species=species,
            id_type=id_type,
            gene_ids=gene_ids,
            col_token=col_token,
            is_mito=is_mito,
            is_coding_or_mirna=is_coding,
            n_in_vocab=n_in_vocab,
            n_duplicate_columns=n_dup,
        )


# -- helpers for h5py / zarr nodes


def _is_array(node: Any) -> bool:
    return hasattr(node, "shape") and hasattr(node, "dtype")


def _attr(node: Any, key: str, default: Any = None) -> Any:
    value = node.attrs.get(key, default)
    if isinstance(value, bytes):
        value = value.decode()
    return value


def _read_strings(node: Any) -> np.ndarray:
    """A 1-D string array from an h5py dataset or a zarr array, as an object array of ``str``."""
    if hasattr(node, "asstr") and node.dtype.kind in "OS":
        values = node.asstr()[()]
    else:
        values = node[()]
    values = np.asarray(values)
    if values.dtype.kind == "S":
        values = np.char.decode(values, "utf-8")
    return values.astype(object)


def _read_df_column(group: Any, key: str) -> Any:
    """One column (or the index) of an AnnData dataframe group, any anndata version."""
    node = group[key]
    encoding = _attr(node, "encoding-type")
    if encoding is not None and type(node).__module__.startswith("h5py"):
        # The common encodings are read with h5py directly (importing anndata costs ~0.3 s at start-up).
        if encoding == "string-array":
            return _read_strings(node)
        if encoding == "array" and node.dtype.kind not in "OSU":
            return np.asarray(node[()])
        if encoding == "categorical" and "codes" in node and "categories" in node:
            categories = node["categories"]
            if _attr(categories, "encoding-type") == "string-array" or categories.dtype.kind not in "OSU":
                values = _read_strings(categories) if categories.dtype.kind in "OSU" else categories[()]
                return pd.Categorical.from_codes(
                    np.asarray(node["codes"][()]).astype(np.int64),
                    pd.Index(values),
                    ordered=bool(node.attrs.get("ordered", False)),
                )
    if encoding is not None:
        try:
            from anndata.io import read_elem
        except ImportError:  # anndata < 0.11
            from anndata.experimental import read_elem

        return read_elem(node)
    # anndata < 0.7: plain datasets, categories behind an object reference or in __categories/
    values = _read_strings(node) if node.dtype.kind in "OSU" else np.asarray(node[()])
    categories = None
    ref = node.attrs.get("categories")
    if ref is not None and hasattr(node, "file"):
        categories = _read_strings(node.file[ref])
    elif "__categories" in group and key in group["__categories"]:
        categories = _read_strings(group["__categories"][key])
    if categories is not None:
        return pd.Categorical.from_codes(values.astype(np.int64), categories)
    return values


def _df_columns(group: Any) -> list[str]:
    order = group.attrs.get("column-order")
    if order is not None and np.size(order) > 0:
        return [c.decode() if isinstance(c, bytes) else str(c) for c in np.atleast_1d(order)]
    index_key = _attr(group, "_index", "_index")
    return [k for k in group.keys() if k not in (index_key, "__categories")]


def _df_index(group: Any) -> list[str]:
    index_key = _attr(group, "_index", "_index")
    if index_key not in group:
        raise KeyError(index_key)
    return [str(v) for v in np.asarray(_read_df_column(group, index_key))]


class _AnnDataSource(CountSource):
    """h5ad (h5py) and AnnData Zarr (zarr-python): the same on-disk layout behind two array libraries."""

    def __init__(self, path: Path, fmt: str, root: Any, layer: str | None):
        super().__init__(path, fmt)
        self._root = root
        if layer in (None, "X"):
            x_key, var_key = "X", "var"
        elif layer == "raw":
            x_key, var_key = "raw/X", "raw/var"
        else:
            x_key, var_key = f"layers/{layer}", "var"
        if x_key not in root:
            choices = self._layer_choices()
            what = "no X matrix" if x_key == "X" else f"no layer {layer!r}"
            raise self._fail(f"{what}; available: {', '.join(choices) if choices else '(none)'}")
        self._rows = self._open_matrix(root[x_key], x_key)
        self.n_cells = self._rows.n_rows
        self.n_genes = self._rows.n_cols
        self._check_nonempty()

        if var_key not in root or "obs" not in root:
            raise self._fail(f"no {var_key!r} or 'obs' group; not an AnnData file")
        var = root[var_key]
        try:
            index = _df_index(var)
        except KeyError as e:
            raise self._fail(f"{var_key!r} has no index") from e
        if len(index) != self.n_genes:
            raise self._fail(f"{x_key} has {self.n_genes} columns but {var_key} has {len(index)} genes")
        var_cols = _df_columns(var)
        index_is_ensembl = _looks_ensembl(index)
        self.var_names = index
        self.gene_symbols = None
        if not index_is_ensembl:
            for col in _ENSEMBL_COLUMNS:
                if col in var_cols:
                    ids = [str(v) for v in np.asarray(_read_df_column(var, col))]
                    if _looks_ensembl(ids):
                        self.var_names = ids
                        break
        for col in _SYMBOL_COLUMNS:
            if col in var_cols:
                self.gene_symbols = [str(v) for v in np.asarray(_read_df_column(var, col))]
                break
        if self.gene_symbols is None and not index_is_ensembl:
            self.gene_symbols = index

    def _layer_choices(self) -> list[str]:
        root = self._root
        choices = ["X"] if "X" in root else []
        if "raw" in root and "X" in root["raw"]:
            choices.append("raw")
        if "layers" in root:
            choices += list(root["layers"].keys())
        return choices

    def _open_matrix(self, node: Any, key: str) -> Any:
        if _is_array(node):
            if len(node.shape) != 2:
                raise self._fail(f"{key} is a {len(node.shape)}-D array; expected a 2-D cells × genes matrix")
            return _DenseRows(node)
        encoding = _attr(node, "encoding-type") or {"csr": "csr_matrix", "csc": "csc_matrix"}.get(
            _attr(node, "h5sparse_format", ""), ""
        )
        shape = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
        if encoding not in ("csr_matrix", "csc_matrix") or shape is None:
            raise self._fail(f"{key} has an unsupported layout (encoding {encoding or 'unknown'!r})")
        n_rows, n_cols = (int(s) for s in shape)
        if encoding == "csr_matrix":
            return _SparseRows(
                node["indptr"], _sequential(node, "indices"), _sequential(node, "data"), n_rows, n_cols
            )
        stored = sum(node[k].size * node[k].dtype.itemsize for k in ("indptr", "indices", "data"))
        if stored > CSC_IN_MEMORY_LIMIT_BYTES:
            raise self._fail(
                f"{key} is stored as CSC ({stored / 2**20:.0f} MiB), which cannot be read cell by cell; "
                "rewrite it as CSR: adata = anndata.read_h5ad(path); adata.X = adata.X.tocsr(); "
                "adata.write_h5ad(path) "
                f"(CSC inputs up to {CSC_IN_MEMORY_LIMIT_BYTES // 2**20} MiB are converted in memory)"
            )
        import scipy.sparse as sp

        csc = sp.csc_matrix(
            (np.asarray(node["data"][()]), np.asarray(node["indices"][()]), np.asarray(node["indptr"][()])),
            shape=(n_rows, n_cols),
        )
        csr = csc.tocsr()
        return _SparseRows(csr.indptr, csr.indices, csr.data, n_rows, n_cols)

    def obs_columns(self) -> list[str]:
        return _df_columns(self._root["obs"])

    def obs_names(self) -> list[str]:
        return _df_index(self._root["obs"])

    def _read_obs_column(self, key: str) -> Any:
        return _read_df_column(self._root["obs"], key)


class _TenxH5Source(CountSource):
    """CellRanger HDF5: v3+ (``matrix/`` with ``features/``) or v2 (one group per genome)."""

    def __init__(self, path: Path, f: Any, layer: str | None):
        super().__init__(path, "10x_h5")
        if "matrix" in f:
            if layer is not None:
                raise self._fail(f"layer={layer!r} is not meaningful for a CellRanger v3 HDF5 file")
            g = f["matrix"]
            feats = g["features"]
            ids = _read_strings(feats["id"])
            names = _read_strings(feats["name"]) if "name" in feats else ids
            types = _read_strings(feats["feature_type"]) if "feature_type" in feats else None
        else:
            genomes = [k for k in f.keys() if hasattr(f[k], "keys") and "indptr" in f[k]]
            if not genomes:
                raise self._fail("HDF5 file is neither a CellRanger (10x) matrix, an h5ad nor a loom file")
            if layer is not None:
                if layer not in genomes:
                    raise self._fail(f"no genome {layer!r}; available: {', '.join(genomes)}")
                genomes = [layer]
            if len(genomes) > 1:
                raise self._fail(f"several genomes ({', '.join(genomes)}); choose one with layer=GENOME")
            g = f[genomes[0]]
            ids = _read_strings(g["genes"])
            names = _read_strings(g["gene_names"]) if "gene_names" in g else ids
            types = None
        n_features, n_barcodes = (int(s) for s in g["shape"][()])
        if len(ids) != n_features or g["indptr"].shape[0] != n_barcodes + 1:
            raise self._fail(
                f"inconsistent 10x matrix: shape {n_features} × {n_barcodes}, {len(ids)} features, "
                f"indptr of {g['indptr'].shape[0]}"
            )
        self._group = g
        self._rows = _SparseRows(
            g["indptr"], _sequential(g, "indices"), _sequential(g, "data"), n_barcodes, n_features
        )
        keep = np.ones(n_features, dtype=bool) if types is None else types == _GENE_EXPRESSION
        if not keep.all():
            self._colmap = np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int64)
        self.var_names = [str(v) for v in ids[keep]]
        self.gene_symbols = [str(v) for v in names[keep]]
        self.n_cells, self.n_genes = n_barcodes, int(keep.sum())
        if n_features > 0 and self.n_genes == 0:
            raise self._fail(f"no {_GENE_EXPRESSION!r} features (feature types: {sorted(set(types))})")
        self._check_nonempty()

    def obs_names(self) -> list[str]:
        return [str(b) for b in _read_strings(self._group["barcodes"])]


def _find_mtx_file(directory: Path, stems: Sequence[str]) -> Path | None:
    for stem in stems:
        for suffix in ("", ".gz"):
            p = directory / f"{stem}{suffix}"
            if p.is_file():
                return p
    for stem in stems:  # GEO style: GSMxxx_matrix.mtx.gz
        hits = sorted(p for p in directory.glob(f"*{stem}*") if p.name.endswith((stem, stem + ".gz")))
        if len(hits) == 1:
            return hits[0]
    return None


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


class _MtxSource(CountSource):
    """A 10x MatrixMarket directory, loaded into memory once (MTX cannot be read by rows)."""

    def __init__(self, path: Path):
        super().__init__(path, "10x_mtx")
        mtx = _find_mtx_file(path, ["matrix.mtx"])
        feats = _find_mtx_file(path, ["features.tsv", "genes.tsv"])
        barcodes = _find_mtx_file(path, ["barcodes.tsv"])
        if mtx is None or feats is None or barcodes is None:
            found = ", ".join(sorted(p.name for p in path.iterdir()))
            raise self._fail(
                "not a 10x matrix directory: expected matrix.mtx(.gz), features.tsv(.gz) or genes.tsv(.gz), "
                f"and barcodes.tsv(.gz); found {found or 'nothing'}"
            )
        try:
            table = pd.read_csv(feats, sep="\t", header=None, dtype=str, quoting=3)
            bc = pd.read_csv(barcodes, sep="\t", header=None, dtype=str, quoting=3)
        except (OSError, ValueError, EOFError, pd.errors.ParserError) as e:
            raise self._fail(f"could not read {feats.name} / {barcodes.name}: {e}") from e
        import scipy.io
        import scipy.sparse as sp

        try:
            with gzip.open(mtx, "rb") if mtx.suffix == ".gz" else open(mtx, "rb") as fh:
                m = scipy.io.mmread(fh)
        except (OSError, ValueError, EOFError) as e:
            raise self._fail(f"could not read {mtx.name} as MatrixMarket: {e}") from e
        m = sp.csr_matrix(m.T)  # genes × cells -> cells × genes
        if m.shape != (len(bc), len(table)):
            raise self._fail(
                f"{mtx.name} is {m.shape[1]} genes × {m.shape[0]} cells but {feats.name} lists {len(table)} "
                f"genes and {barcodes.name} {len(bc)} barcodes"
            )
        keep = np.ones(len(table), dtype=bool)
        if table.shape[1] >= 3:
            keep = (table[2] == _GENE_EXPRESSION).to_numpy()
            if not keep.any():
                raise self._fail(f"no {_GENE_EXPRESSION!r} features in {feats.name}")
            if not keep.all():
                m = m[:, keep]
        m.sort_indices()
        self._rows = _SparseRows(m.indptr, m.indices, m.data, m.shape[0], m.shape[1])
        self.var_names = table[0][keep].tolist()
        self.gene_symbols = table[1][keep].tolist() if table.shape[1] >= 2 else None
        self._barcodes = bc[0].tolist()
        self.n_cells, self.n_genes = m.shape
        self._check_nonempty()

    def obs_names(self) -> list[str]:
        return list(self._barcodes)


class _LoomSource(CountSource):
    """Loom via h5py: ``matrix`` is genes × cells, read in column slabs."""

    def __init__(self, path: Path, f: Any, layer: str | None):
        super().__init__(path, "loom")
        self._f = f
        if layer in (None, "", "X", "matrix"):
            node = f["matrix"]
        elif "layers" in f and layer in f["layers"]:
            node = f["layers"][layer]
        else:
            choices = ["matrix"] + (list(f["layers"].keys()) if "layers" in f else [])
            raise self._fail(f"no layer {layer!r}; available: {', '.join(choices)}")
        self._rows = _DenseRows(node, transposed=True)
        self.n_cells, self.n_genes = self._rows.n_rows, self._rows.n_cols
        self._check_nonempty()
        ra = f["row_attrs"] if "row_attrs" in f else {}
        symbols = _read_strings(ra["Gene"]) if "Gene" in ra else None
        accession = _read_strings(ra["Accession"]) if "Accession" in ra else None
        if accession is not None and _looks_ensembl(list(accession)):
            self.var_names = [str(v) for v in accession]
        elif symbols is not None:
            self.var_names = [str(v) for v in symbols]
        else:
            raise self._fail("no gene names (row_attrs/Gene or row_attrs/Accession)")
        self.gene_symbols = [str(v) for v in symbols] if symbols is not None else None
        self._cell_key = next(
            (k for k in ("CellID", "obs_names", "cell_names") if k in f.get("col_attrs", {})), None
        )

    def _col_attrs(self) -> Any:
        return self._f["col_attrs"] if "col_attrs" in self._f else {}

    def obs_columns(self) -> list[str]:
        ca = self._col_attrs()
        return [k for k in ca.keys() if k != self._cell_key and len(ca[k].shape) == 1]

    def obs_names(self) -> list[str]:
        if self._cell_key is None:
            return [str(i) for i in range(self.n_cells)]
        return [str(v) for v in _read_strings(self._col_attrs()[self._cell_key])]

    def _read_obs_column(self, key: str) -> Any:
        node = self._col_attrs()[key]
        return _read_strings(node) if node.dtype.kind in "OSU" else np.asarray(node[()])


# --------------------------------------------------------------------------------------------------------
# CSV / TSV count tables

#: ``layer`` values that set a text table's orientation (the CLI's ``--no-transpose`` / ``--transpose``).
TEXT_ROWS_ARE_CELLS = "rows=cells"
TEXT_ROWS_ARE_GENES = "rows=genes"
_TEXT_SUFFIXES = (".csv", ".tsv", ".tab", ".txt")
#: Cells per temporary bucket file when a genes × cells table is transposed on disk.
_TEXT_BUCKET_CELLS = 4096
#: Rows sampled from the first column to tell gene names from cell names.
_ORIENTATION_SAMPLE = 2000
_ENTRY = np.dtype([("cell", "<u4"), ("gene", "<u4"), ("value", "<f4")])


def _is_text_table(name: str) -> bool:
    name = name.lower()
    return (name[:-3] if name.endswith(".gz") else name).endswith(_TEXT_SUFFIXES)


def _unquote(field: str) -> str:
    field = field.strip()
    if len(field) >= 2 and field[0] == field[-1] and field[0] in "\"'":
        return field[1:-1]
    return field


class _TextScan:
    """One pass over a text table: separator, header fields, the first field of every row."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as fh:
            self.gzipped = fh.read(2) == _GZIP_MAGIC
        name = path.name.lower().removesuffix(".gz")
        try:
            with self.open() as fh:
                header = fh.readline().decode("utf-8-sig").rstrip("\r\n")
                if name.endswith((".tsv", ".tab")) or (not name.endswith(".csv") and "\t" in header):
                    self.sep = "\t"
                else:
                    self.sep = ","
                sep = self.sep.encode()
                self.header = [_unquote(f) for f in header.split(self.sep)]
                self.row_names: list[str] = []
                n_fields = None
                for number, line in enumerate(fh, start=2):
                    line = line.rstrip(b"\r\n")
                    if not line:
                        continue
                    fields = line.count(sep) + 1
                    if n_fields is None:
                        n_fields = fields
                    elif fields != n_fields:
                        raise InputError(
                            f"{path}: line {number} has {fields} fields, line 2 has {n_fields}; every row "
                            "needs the same number of values"
                        )
                    self.row_names.append(_unquote(line.split(sep, 1)[0].decode("utf-8", "replace")))
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
            raise InputError(f"{path}: could not read the table ({type(e).__name__}: {e})") from e
        if n_fields is None:
            raise InputError(f"{path}: no data rows under the header")
        if len(self.header) == n_fields - 1:  # R's write.table: no corner field above the row names
            self.header = ["", *self.header]
        if len(self.header) != n_fields or n_fields < 2:
            raise InputError(
                f"{path}: the header has {len(self.header)} fields but the rows have {n_fields}; expected a "
                "header row (a corner field, then one name per column) and rows that start with their name"
            )
        self.column_names = self.header[1:]

    def open(self):
        return gzip.open(self.path, "rb") if self.gzipped else open(self.path, "rb")

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 block of ``block_rows`` rows × the value columns), in order."""
        n_cols = len(self.column_names)
        try:
            reader = pd.read_csv(
                self.path,
                sep=self.sep,
                header=None,
                skiprows=1,
                usecols=range(1, n_cols + 1),
                dtype=np.float32,
                chunksize=block_rows,
                compression="gzip" if self.gzipped else None,
                skip_blank_lines=True,
                engine="c",
            )
            row = 0
            with reader:
                for frame in reader:
                    values = frame.to_numpy(np.float32)
                    yield row, values
                    row += len(values)
        except (ValueError, pd.errors.ParserError) as e:
            raise InputError(f"{self.path}: a value that is not a number ({e})") from e


def _gene_likeness(names: Sequence[str], reference: Any) -> float:
    """The fraction of ``names`` that are Ensembl ids or known human/mouse symbols or aliases."""
    from .reference import SPECIES, load_reference

    values = [str(n).strip() for n in names if str(n).strip()]
    if not values:
        return 0.0
    if _looks_ensembl(values):
        return 1.0
    ref = reference if reference is not None else load_reference()
    best = 0
    for species in SPECIES:
        symbols, aliases = ref._symbol_names[species], ref._alias_names[species]
        best = max(best, sum(1 for v in values if v in symbols or v in aliases))
    return best / len(values)


class _TextRows:
    """Cells × genes table rows read in order from a streaming parser (reopened to go back)."""

    def __init__(self, scan: _TextScan, n_rows: int, n_cols: int):
        self.scan, self.n_rows, self.n_cols = scan, n_rows, n_cols
        self.block_rows = max(1, _DENSE_SLAB_BYTES // max(n_cols * 4, 1))
        self._blocks: Iterator[tuple[int, np.ndarray]] | None = None
        self._pending: tuple[int, np.ndarray] | None = None  # the block the next read starts in
        self._next_row = 0  # first row of the parser's next block

    def _next_block(self) -> tuple[int, np.ndarray]:
        if self._pending is not None:
            block, self._pending = self._pending, None
            return block
        assert self._blocks is not None
        first, block = next(self._blocks)
        self._next_row = first + len(block)
        return first, block

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        available = self._pending[0] if self._pending is not None else self._next_row
        if self._blocks is None or start < available:  # (re)start the parser at the top
            self._blocks, self._pending, self._next_row = self.scan.blocks(self.block_rows), None, 0
        parts = []
        row = start
        while row < stop:
            first, block = self._next_block()
            last = first + len(block)
            if last <= row:  # wholly before the range
                continue
            take = block[row - first : min(stop, last) - first]
            parts.append(_dense_to_csr(take))
            row += len(take)
            if last > stop:  # the rest of the block belongs to the next range
                self._pending = (first, block)
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [p[0][-1] for p in parts[:-1]])
        indptr = np.concatenate(
            [parts[0][0][:1]] + [p[0][1:] + o for p, o in zip(parts, offsets, strict=True)]
        )
        return indptr, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


class _TransposedTextRows:
    """A genes × cells table read by cells: transposed once on disk, its non-zeros bucketed by cell."""

    def __init__(self, scan: _TextScan, n_rows: int, n_cols: int):
        self.scan, self.n_rows, self.n_cols = scan, n_rows, n_cols
        self._dir: Any = None

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _bucket(self, b: int) -> Path:
        return Path(self._dir.name) / f"{b}.bin"

    def _transpose(self) -> None:
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="gc-transpose-")
        n_buckets = -(-self.n_rows // _TEXT_BUCKET_CELLS)
        for b in range(n_buckets):
            self._bucket(b).touch()
        block_rows = max(1, _DENSE_SLAB_BYTES // max(self.n_rows * 4, 1))  # a block: genes × all cells
        for first_gene, block in self.scan.blocks(block_rows):
            genes, cells = np.nonzero(block)  # NaN counts as non-zero: validate_counts reports it
            entries = np.empty(len(cells), _ENTRY)
            entries["cell"], entries["gene"] = cells, genes + first_gene
            entries["value"] = block[genes, cells]
            entries = entries[np.argsort(entries["cell"], kind="stable")]
            bounds = np.searchsorted(
                entries["cell"], np.arange(0, n_buckets + 1) * _TEXT_BUCKET_CELLS, side="left"
            )
            for b in np.flatnonzero(np.diff(bounds)):
                with open(self._bucket(int(b)), "ab") as fh:
                    entries[bounds[b] : bounds[b + 1]].tofile(fh)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._dir is None:
            self._transpose()
        first, last = start // _TEXT_BUCKET_CELLS, (stop - 1) // _TEXT_BUCKET_CELLS
        entries = np.concatenate(
            [np.fromfile(self._bucket(b), _ENTRY) for b in range(first, last + 1)]
        ) if stop > start else np.empty(0, _ENTRY)
        entries = entries[(entries["cell"] >= start) & (entries["cell"] < stop)]
        entries = entries[np.argsort(entries["cell"], kind="stable")]  # genes stay ascending per cell
        counts = np.bincount(entries["cell"] - start, minlength=stop - start)
        indptr = np.zeros(stop - start + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        return indptr, entries["gene"].astype(np.uint32), entries["value"].astype(np.float32)


class _TextTableSource(CountSource):
    """A dense CSV/TSV count table, cells × genes or genes × cells (see the module docstring)."""

    orientation: str  # TEXT_ROWS_ARE_CELLS or TEXT_ROWS_ARE_GENES
    orientation_detected: bool

    def __init__(self, path: Path, layer: str | None, reference: Any = None):
        scan = _TextScan(path)
        super().__init__(path, "tsv" if scan.sep == "\t" else "csv")
        if layer is None:
            header = _gene_likeness(scan.column_names, reference)
            step = max(len(scan.row_names) // _ORIENTATION_SAMPLE, 1)
            first_column = _gene_likeness(scan.row_names[::step], reference)
            if max(header, first_column) < 0.2 or abs(header - first_column) < 0.1:
                raise self._fail(
                    f"cannot tell whether rows are cells or genes ({header:.0%} of the header and "
                    f"{first_column:.0%} of the first column are known gene names); pass --no-transpose "
                    "(rows are cells) or --transpose (rows are genes)"
                )
            layer = TEXT_ROWS_ARE_CELLS if header > first_column else TEXT_ROWS_ARE_GENES
            self.orientation_detected = True
        else:
            self.orientation_detected = False
        self.orientation = layer
        if layer == TEXT_ROWS_ARE_CELLS:
            self._cell_names, self.var_names = scan.row_names, scan.column_names
            self._rows = _TextRows(scan, len(scan.row_names), len(scan.column_names))
        else:
            self._cell_names, self.var_names = scan.column_names, scan.row_names
            rows = _TransposedTextRows(scan, len(scan.column_names), len(scan.row_names))
            self._rows = rows
            self._closers.append(rows.close)
        self.gene_symbols = None
        self.n_cells, self.n_genes = len(self._cell_names), len(self.var_names)
        self._check_nonempty()

    def obs_names(self) -> list[str]:
        return list(self._cell_names)



# --------------------------------------------------------------------------------------------------------
# open_counts


def _open_h5(path: Path) -> Any:
    import h5py

    try:
        return h5py.File(path, "r", rdcc_nbytes=_H5_CACHE_BYTES)
    except OSError as e:
        raise InputError(f"{path}: file is truncated or not HDF5 ({e})") from e


def open_counts(path: str | Path, *, layer: str | None = None) -> CountSource:
    """Open a count matrix (h5ad, 10x HDF5, 10x MTX directory, AnnData Zarr, loom or a CSV/TSV table) for
    streaming.

    ``layer``: h5ad/zarr ``"raw"`` (``raw/X``) or a ``layers/`` name; loom a ``layers/`` name; 10x v2 HDF5
    a genome name; a text table its orientation (``"rows=cells"`` or ``"rows=genes"``; default: detected).
    Raises :class:`~genecompass.errors.InputError` naming the file for anything it cannot use.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if layer in (TEXT_ROWS_ARE_CELLS, TEXT_ROWS_ARE_GENES) and not (
        path.is_file() and _is_text_table(path.name)
    ):
        layer = None  # an orientation concerns text tables only (one setting may cover mixed inputs)
    if path.is_dir():
        if (path / "zarr.json").is_file() or (path / ".zgroup").is_file() or (path / ".zattrs").is_file():
            return _open_zarr(path, layer)
        if _find_mtx_file(path, ["matrix.mtx"]) is not None:
            _no_layer(path, layer, "10x MTX directory")
            return _MtxSource(path)
        raise InputError(
            f"{path}: directory is neither a 10x matrix directory (matrix.mtx + features/genes.tsv + "
            "barcodes.tsv) nor an AnnData Zarr store"
        )
    name = path.name.lower()
    if name.endswith((".mtx", ".mtx.gz")):  # the matrix file of a 10x directory: open the directory
        _no_layer(path, layer, "10x MTX directory")
        return _MtxSource(path.parent)
    if _is_text_table(name):
        if layer not in (None, TEXT_ROWS_ARE_CELLS, TEXT_ROWS_ARE_GENES):
            raise InputError(
                f"{path}: layer={layer!r} is not meaningful for a text table; the orientation is "
                f"{TEXT_ROWS_ARE_CELLS!r} or {TEXT_ROWS_ARE_GENES!r}"
            )
        return _TextTableSource(path, layer)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:2] == _GZIP_MAGIC:
        raise InputError(f"{path}: file is gzip-compressed; decompress it first (gunzip {path.name})")
    if name.endswith((".zarr.zip", ".zip")):
        raise InputError(f"{path}: zipped Zarr stores are not supported; unzip to a directory first")
    if head != _HDF5_MAGIC and not name.endswith((".h5ad", ".h5", ".hdf5", ".loom")):
        raise InputError(
            f"{path}: unrecognised input; expected .h5ad, a 10x .h5 file or matrix directory, an AnnData "
            ".zarr directory, .loom, or a CSV/TSV count table (.csv, .tsv, .txt, optionally .gz)"
        )
    f = _open_h5(path)
    try:
        source: CountSource
        if "matrix" in f and "row_attrs" in f:
            source = _LoomSource(path, f, layer)
        elif ("matrix" in f and "features" in f["matrix"]) or (
            "X" not in f and "obs" not in f and not name.endswith(".h5ad")
        ):
            source = _TenxH5Source(path, f, layer)
        elif "X" in f or "obs" in f or "layers" in f or name.endswith(".h5ad"):
            source = _AnnDataSource(path, "h5ad", f, layer)
        else:
            raise InputError(f"{path}: HDF5 file is neither h5ad, 10x nor loom (top-level: {list(f.keys())})")
    except InputError:
        f.close()
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        f.close()
        raise InputError(f"{path}: could not read the file ({type(e).__name__}: {e})") from e
    source._closers.append(f.close)
    return source


def _no_layer(path: Path, layer: str | None, what: str) -> None:
    if layer is not None:
        raise InputError(f"{path}: layer={layer!r} is not meaningful for a {what}")


def _open_zarr(path: Path, layer: str | None) -> CountSource:
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as e:  # zarr raises several unrelated types for a broken store
        raise InputError(f"{path}: could not open as a Zarr store ({type(e).__name__}: {e})") from e
    if "X" not in root and "obs" not in root:
        raise InputError(
            f"{path}: Zarr store is not an AnnData store (no X / obs); a gc corpus is read otherwise"
        )
    try:
        return _AnnDataSource(path, "anndata_zarr", root, layer)
    except InputError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise InputError(f"{path}: could not read the Zarr store ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------------------
# validation


def _first_bad(chunk: CsrChunk, allow_non_integer: bool) -> tuple[int, str] | None:
    data = chunk.data
    if data.size == 0:
        return None
    lo, hi = data.min(), data.max()
    if not (lo >= 0 and hi < np.inf):  # NaN fails both comparisons
        bad = ~np.isfinite(data)
        if bad.any():
            return int(np.argmax(bad)), "a non-finite count (NaN or infinity)"
        return int(np.argmax(data < 0)), "a negative count"
    if not allow_non_integer:
        frac = data != np.rint(data)
        if frac.any():
            return int(np.argmax(frac)), "a non-integer count"
    return None


def validate_counts(chunk: CsrChunk, path: str | Path, *, allow_non_integer: bool = False) -> None:
    """Refuse negative, NaN/infinite and (unless ``allow_non_integer``) non-integer counts.

    Vectorised over the chunk; the InputError names the file, the cell row, the gene column and the value.
    """
    bad = _first_bad(chunk, allow_non_integer)
    if bad is None:
        return
    k, what = bad
    row = chunk.start + int(np.searchsorted(chunk.indptr, k, side="right")) - 1
    value = chunk.data[k]
    hint = "counts must be raw, non-negative UMI or read counts"
    if what == "a non-integer count":
        hint = (
            "expected raw integer counts; this looks normalised or log-transformed: use the raw counts "
            "(e.g. layer='raw' or a counts layer), or allow non-integer counts explicitly "
            "(--allow-non-integer)"
        )
    raise InputError(
        f"{path}: cell row {row}, gene column {int(chunk.indices[k])} has {what} ({value:g}); {hint}"
    )
