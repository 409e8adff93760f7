"""Count-matrix readers (genecompass.io) and inspect_counts, on real PBMC3k / mouse Visium data.

Every reader must hand back, chunk by chunk, exactly the matrix anndata (or the raw arrays) hold.
"""

from __future__ import annotations

import gzip
import shutil
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from genecompass import io as gio
from genecompass.errors import InputError
from genecompass.inspect import inspect_counts
from genecompass.io import NOT_IN_VOCAB, open_counts, validate_counts


def assemble(src, chunk_size, start=0, stop=None):
    """Stack a source's chunks back into one CSR matrix, checking each chunk's invariants."""
    parts = []
    expected_start = start
    for c in src.iter_chunks(chunk_size, start, stop):
        assert c.start == expected_start and 0 < c.stop - c.start <= chunk_size
        assert c.indptr.dtype == np.int64 and c.indices.dtype == np.uint32 and c.data.dtype == np.float32
        assert c.indptr[0] == 0 and c.indptr.size == c.stop - c.start + 1 and c.indptr[-1] == c.data.size
        assert not (c.data == 0).any()
        parts.append(c.to_scipy(src.n_genes))
        expected_start = c.stop
    assert expected_start == (src.n_cells if stop is None else stop)
    return sp.vstack(parts, format="csr")


def same_matrix(a, b) -> bool:
    a, b = sp.csr_matrix(a, dtype=np.float32), sp.csr_matrix(b, dtype=np.float32)
    return a.shape == b.shape and (a != b).nnz == 0


def barcodes(adata):
    return list(adata.obs_names)


# ------------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pbmc3k_path, pbmc3k_adata, pbmc3k_subset, writers):
    """Every supported format written from real PBMC3k data: name -> (path, expected cells × genes matrix)."""
    d = tmp_path_factory.mktemp("inputs")
    sub = pbmc3k_subset
    X = sp.csr_matrix(sub.X)
    ids, names = list(sub.var_names), list(sub.var["gene_symbols"])
    out = {"h5ad_csr": (pbmc3k_path, pbmc3k_adata.X)}

    dense = sub.copy()
    dense.X = X.toarray()  # like Kang 2018, which ships a dense float32 X
    dense.write_h5ad(d / "dense.h5ad", compression="gzip")
    out["h5ad_dense"] = (d / "dense.h5ad", X)

    csc = sub.copy()
    csc.X = sp.csc_matrix(X)
    csc.write_h5ad(d / "csc.h5ad")
    out["h5ad_csc_small"] = (d / "csc.h5ad", X)

    n = 120  # zarr reads are slower per call than HDF5's: fewer cells keep chunk_size=1 quick
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's notice about the zarr v2 default
        sub[:n].write_zarr(d / "pbmc.zarr")
    out["anndata_zarr"] = (d / "pbmc.zarr", X[:n])
    with ad.settings.override(zarr_write_format=3), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr's notices about sharding / consolidated metadata
        sub[:n].write_zarr(d / "pbmc_v3.zarr")
    out["anndata_zarr_v3"] = (d / "pbmc_v3.zarr", X[:n])

    # CellRanger v3 with two antibody-capture features mixed in: they must be dropped
    rng = np.random.default_rng(0)
    adt = sp.csr_matrix(rng.integers(0, 50, size=(X.shape[0], 2)).astype(np.float32))
    mixed = sp.hstack([adt[:, :1], X, adt[:, 1:]], format="csr")
    types = ["Antibody Capture"] + ["Gene Expression"] * X.shape[1] + ["Antibody Capture"]
    writers.h5(
        d / "v3.h5",
        mixed,
        ["CD3_TotalSeqB", *ids, "CD19_TotalSeqB"],
        ["CD3", *names, "CD19"],
        barcodes(sub),
        feature_types=types,
    )
    out["10x_h5_v3"] = (d / "v3.h5", X)
    writers.h5(d / "v2.h5", X, ids, names, barcodes(sub), version=2, genome="hg19")
    out["10x_h5_v2"] = (d / "v2.h5", X)

    writers.mtx(d / "mtx_v2", X, ids, names, barcodes(sub), version=2)
    out["10x_mtx_v2"] = (d / "mtx_v2", X)
    writers.mtx(
        d / "mtx_v3",
        mixed,
        ["CD3_TotalSeqB", *ids, "CD19_TotalSeqB"],
        ["CD3", *names, "CD19"],
        barcodes(sub),
        version=3,
        feature_types=types,
    )
    out["10x_mtx_v3"] = (d / "mtx_v3", X)

    # loom is dense and read in column slabs: keep it small too
    writers.loom(
        d / "pbmc.loom", X[:n], ids, names, barcodes(sub)[:n], obs={"cell_type": sub.obs["cell_type"][:n]}
    )
    out["loom"] = (d / "pbmc.loom", X[:n])
    return out


FORMATS = {
    "h5ad_csr": "h5ad",
    "h5ad_dense": "h5ad",
    "h5ad_csc_small": "h5ad",
    "anndata_zarr": "anndata_zarr",
    "anndata_zarr_v3": "anndata_zarr",
    "10x_h5_v3": "10x_h5",
    "10x_h5_v2": "10x_h5",
    "10x_mtx_v2": "10x_mtx",
    "10x_mtx_v3": "10x_mtx",
    "loom": "loom",
}


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_chunks_reassemble_the_matrix(inputs, pbmc3k_adata, name, chunk_size):
    path, expected = inputs[name]
    with open_counts(path) as src:
        assert src.format == FORMATS[name]
        assert (src.n_cells, src.n_genes) == expected.shape
        assert src.var_names == list(pbmc3k_adata.var_names)  # Ensembl ids, antibody features dropped
        assert src.gene_symbols == list(pbmc3k_adata.var["gene_symbols"])
        assert src.obs_names() == list(pbmc3k_adata.obs_names[: src.n_cells])
        assert same_matrix(assemble(src, chunk_size), expected)


@pytest.mark.parametrize("name", ["h5ad_csr", "h5ad_dense", "anndata_zarr", "10x_h5_v3", "loom"])
def test_partial_range(inputs, name):
    path, expected = inputs[name]
    with open_counts(path) as src:
        assert same_matrix(assemble(src, 5, start=10, stop=23), expected[10:23])
        assert list(src.iter_chunks(5, start=4, stop=4)) == []
        with pytest.raises(ValueError, match="outside"):
            src.iter_chunks(5, start=0, stop=src.n_cells + 1)
        with pytest.raises(ValueError, match="chunk_size"):
            src.iter_chunks(0)


@pytest.mark.parametrize("name", ["h5ad_csr", "h5ad_dense", "anndata_zarr", "10x_h5_v3", "loom"])
def test_reused_read_buffers_give_the_same_chunks(inputs, name):
    """With ``reuse=n`` a chunk is a view of buffers the chunk n places later overwrites: each chunk, copied
    when yielded, equals the plain read; for HDF5 CSR the buffers are really shared."""
    path, _ = inputs[name]
    with open_counts(path) as src:
        size = max(src.n_cells // 4, 1)
        plain = [(c.indptr.copy(), c.indices.copy(), c.data.copy()) for c in src.iter_chunks(size)]
        reused = list(src.iter_chunks(size, reuse=2))
        copies = [(c.indptr.copy(), c.indices.copy(), c.data.copy()) for c in src.iter_chunks(size, reuse=2)]
    assert len(copies) == len(plain) >= 3
    for got, expected in zip(copies, plain, strict=True):
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
    if name == "h5ad_csr":  # float32 CSR read in place: the first chunk now holds part of the third
        assert np.shares_memory(reused[0].data, reused[2].data)


def test_reused_read_buffers_convert_other_dtypes(tmp_path, pbmc3k_subset):
    """float64 counts and int64 indices (common in public h5ad files) go through the reused buffers too,
    converted in place exactly as a plain read converts them."""
    sub = pbmc3k_subset.copy()
    X = sp.csr_matrix(sub.X, dtype=np.float64)
    X.indices, X.indptr = X.indices.astype(np.int64), X.indptr.astype(np.int64)
    sub.X = X
    sub.write_h5ad(tmp_path / "wide.h5ad")
    with h5py.File(tmp_path / "wide.h5ad") as f:
        assert (f["X/data"].dtype, f["X/indices"].dtype) == (np.float64, np.int64)
    with open_counts(tmp_path / "wide.h5ad") as src:
        size = max(src.n_cells // 4, 1)
        plain = [(c.indices.copy(), c.data.copy()) for c in src.iter_chunks(size)]
        copies = [(c.indices.copy(), c.data.copy()) for c in src.iter_chunks(size, reuse=2)]
        reused = list(src.iter_chunks(size, reuse=2))
    for (indices, data), (expected_indices, expected_data) in zip(copies, plain, strict=True):
        assert indices.dtype == np.uint32 and data.dtype == np.float32
        np.testing.assert_array_equal(indices, expected_indices)
        np.testing.assert_array_equal(data, expected_data)
    assert np.shares_memory(reused[0].data, reused[2].data)


def test_pbmc3k_h5ad_and_gene_map(pbmc3k_path, pbmc3k_adata):
    with open_counts(pbmc3k_path) as src:
        assert (src.n_cells, src.n_genes) == (2700, pbmc3k_adata.n_vars)
        assert src.obs_columns() == ["cell_type"]
        obs = src.read_obs(["cell_type"])
        assert list(obs.index) == list(pbmc3k_adata.obs_names)
        assert (obs["cell_type"].astype(str) == pbmc3k_adata.obs["cell_type"].astype(str)).all()
        with pytest.raises(InputError, match=r"pbmc3k\.h5ad.*'celltype'.*available: cell_type"):
            src.read_obs(["celltype"])
        gmap = src.gene_map()
    assert (gmap.species, gmap.id_type) == ("human", "ensembl")
    assert gmap.col_token.dtype == np.uint32 and gmap.col_token.shape == (src.n_genes,)
    assert gmap.n_in_vocab == int((gmap.col_token != NOT_IN_VOCAB).sum())
    assert gmap.n_in_vocab / src.n_genes > 0.85  # hg19-era ids: most still in GENCODE v48
    symbols = np.array(src.gene_symbols)
    assert set(symbols[gmap.is_mito]) == {s for s in symbols if s.startswith("MT-")}
    assert gmap.is_mito.sum() == 13
    assert (
        gmap.is_coding_or_mirna[symbols == "CD3E"].all()
        and not gmap.is_coding_or_mirna[symbols == "MALAT1"].any()
    )


def test_gene_map_symbols_and_species_override(inputs, pbmc3k_subset, tmp):
    sub = pbmc3k_subset[:, :3000].copy()
    sub.var_names = sub.var["gene_symbols"].astype(str).to_numpy()  # symbols only, like Kang 2018
    del sub.var["gene_symbols"]
    sub.write_h5ad(tmp / "symbols.h5ad")
    with open_counts(tmp / "symbols.h5ad") as src:
        assert src.gene_symbols == list(sub.var_names)
        gmap = src.gene_map()
    assert (gmap.species, gmap.id_type) == ("human", "symbol")
    idx = list(sub.var_names).index("NOC2L")
    assert gmap.gene_ids[idx] == pbmc3k_subset.var_names[idx]

    # symbols in the index, Ensembl ids in var["gene_ids"] (the PBMC3k layout of scanpy / roma): ids win
    sub.var["gene_ids"] = list(pbmc3k_subset.var_names[:3000])
    sub.write_h5ad(tmp / "both.h5ad")
    with open_counts(tmp / "both.h5ad") as src:
        assert src.var_names == list(pbmc3k_subset.var_names[:3000])
        assert src.gene_symbols == list(sub.var_names)
        assert src.gene_map().id_type == "ensembl"

    with (
        open_counts(inputs["10x_h5_v3"][0]) as src,
        pytest.raises(InputError, match=r"v3\.h5.*mouse ensembl"),
    ):
        src.gene_map(species="mouse")  # human ids looked up as mouse: nothing matches


def test_versioned_ids_and_duplicates(pbmc3k_subset, tmp):
    sub = pbmc3k_subset[:, :2000].copy()
    symbols = list(sub.var["gene_symbols"])
    ids = [f"{g}.7" for g in sub.var_names]
    cd3e = "ENSG00000198851"
    ids[0], ids[1] = f"{cd3e}.1", f"{cd3e}.12"  # the same gene twice, two Ensembl versions
    sub.var_names = ids
    sub.write_h5ad(tmp / "versioned.h5ad")
    with open_counts(tmp / "versioned.h5ad") as src:
        gmap = src.gene_map()
    assert gmap.gene_ids[0] == gmap.gene_ids[1] == cd3e
    assert gmap.col_token[0] == gmap.col_token[1] != NOT_IN_VOCAB
    assert gmap.n_duplicate_columns == 2
    i = symbols.index("NOC2L")
    assert gmap.gene_ids[i] == pbmc3k_subset.var_names[i] and gmap.col_token[i] != NOT_IN_VOCAB
    ids[i] = "NOC2L"  # a symbol among Ensembl ids is mapped as a symbol
    sub.var_names = ids
    sub.write_h5ad(tmp / "mixed.h5ad")
    with open_counts(tmp / "mixed.h5ad") as src:
        mixed = src.gene_map()
    assert mixed.id_type == "ensembl" and mixed.gene_ids[i] == gmap.gene_ids[i]
    assert mixed.col_token[i] == gmap.col_token[i]


def test_layers(pbmc3k_subset, tmp):
    sub = pbmc3k_subset.copy()
    X = sp.csr_matrix(sub.X)
    sub.layers["counts"] = X.copy()
    sub.raw = sub
    norm = sub[:, :500].copy()  # X normalised and gene-filtered, counts kept in raw and layers
    norm.X = sp.csr_matrix(norm.X.multiply(1 / (norm.X.sum(axis=1) + 1)))
    norm.write_h5ad(tmp / "layers.h5ad")
    with open_counts(tmp / "layers.h5ad") as src:
        assert src.n_genes == 500
    with open_counts(tmp / "layers.h5ad", layer="raw") as src:
        assert src.n_genes == X.shape[1] and src.var_names == list(pbmc3k_subset.var_names)
        assert same_matrix(assemble(src, 64), X)
    with open_counts(tmp / "layers.h5ad", layer="counts") as src:
        assert same_matrix(assemble(src, 64), X[:, :500])
    with pytest.raises(InputError, match=r"layers\.h5ad: no layer 'spliced'; available: X, raw, counts"):
        open_counts(tmp / "layers.h5ad", layer="spliced")


def test_mouse_10x_h5(mouse_h5_path):
    with h5py.File(mouse_h5_path) as f:
        g = f["matrix"]
        n_genes, n_cells = g["shape"][()]
        expected = sp.csc_matrix(
            (g["data"][()], g["indices"][()], g["indptr"][()]), shape=(n_genes, n_cells)
        ).T
    with open_counts(mouse_h5_path) as src:
        assert src.format == "10x_h5" and (src.n_cells, src.n_genes) == (n_cells, n_genes) == (2695, 100)
        assert all(v.startswith("ENSMUSG") for v in src.var_names)
        for chunk_size in (1, 7, 1000):
            assert same_matrix(assemble(src, chunk_size), expected)
        gmap = src.gene_map()
    assert (gmap.species, gmap.id_type) == ("mouse", "ensembl") and gmap.n_in_vocab > 50


def test_bundled_mtx_dirs(data_dir):
    v2, v3 = data_dir / "testdata" / "10x_v2_mtx", data_dir / "testdata" / "10x_v3_mtx"
    if not (v2.exists() and v3.exists()):
        pytest.skip("data/testdata MTX fixtures not present")
    with open_counts(v2) as src:  # Seurat's test data: ids are all the placeholder "ENSGXXXXXX"
        assert (src.format, src.n_cells, src.n_genes) == ("10x_mtx", 80, 240)
        assert same_matrix(assemble(src, 1), assemble(src, 7))
        assert assemble(src, 1000).nnz == 4814
        gmap = src.gene_map()
        assert (gmap.species, gmap.id_type) == ("human", "symbol")  # fell back to the symbols column
        assert gmap.gene_ids[src.gene_symbols.index("MS4A1")] == "ENSG00000156738"
    with open_counts(v3) as src:  # Cell Ranger 3: 3 gene-expression + 2 antibody-capture features
        assert (src.n_cells, src.n_genes) == (5, 3)
        assert src.gene_symbols == ["RP11-34P13.3", "FAM138A", "FAM231B"]
        m = assemble(src, 2)
        assert m.nnz == 4 and m.sum() == 110 + 1000 + 500 + 4000  # antibody counts (70000, 5, 3332) dropped
        assert len(src.obs_names()) == 5


# ------------------------------------------------------------------------------------------- bad inputs


def test_missing_file(tmp):
    with pytest.raises(InputError, match=r"nope\.h5ad: no such file"):
        open_counts(tmp / "nope.h5ad")


def test_truncated_h5ad(pbmc3k_path, tmp, writers):
    bad = writers.truncated(pbmc3k_path, tmp / "truncated.h5ad")
    with pytest.raises(InputError, match=r"truncated\.h5ad: file is truncated or not HDF5"):
        open_counts(bad)


def test_not_hdf5_and_gzip(mouse_h5_path, tmp):
    (tmp / "notes.h5ad").write_text("cell,gene,count\n")
    with pytest.raises(InputError, match=r"notes\.h5ad: file is truncated or not HDF5"):
        open_counts(tmp / "notes.h5ad")
    (tmp / "table.json").write_text('{"cell": 1}\n')
    with pytest.raises(InputError, match=r"table\.json: unrecognised input.*CSV/TSV count table"):
        open_counts(tmp / "table.json")
    (tmp / "table.csv").write_text("cell,gene,count\n")  # a CSV table is read; this one has no rows
    with pytest.raises(InputError, match=r"table\.csv: no data rows under the header"):
        open_counts(tmp / "table.csv")
    with open(mouse_h5_path, "rb") as fin, gzip.open(tmp / "filtered.h5.gz", "wb") as fout:
        shutil.copyfileobj(fin, fout)
    with pytest.raises(InputError, match=r"filtered\.h5\.gz: file is gzip-compressed.*gunzip"):
        open_counts(tmp / "filtered.h5.gz")
    (tmp / "empty_dir").mkdir()
    with pytest.raises(InputError, match=r"empty_dir: directory is neither"):
        open_counts(tmp / "empty_dir")


def test_incomplete_mtx_dir(inputs, tmp):
    d = tmp / "mtx"
    shutil.copytree(inputs["10x_mtx_v3"][0], d)
    (d / "barcodes.tsv.gz").unlink()
    with pytest.raises(InputError, match=r"mtx: not a 10x matrix directory.*barcodes\.tsv"):
        open_counts(d)


def test_no_x_and_empty(pbmc3k_subset, tmp):
    no_x = pbmc3k_subset.copy()
    no_x.layers["counts"] = no_x.X
    no_x.X = None
    no_x.write_h5ad(tmp / "nox.h5ad")
    with pytest.raises(InputError, match=r"nox\.h5ad: no X matrix; available: counts"):
        open_counts(tmp / "nox.h5ad")
    pbmc3k_subset[:0].copy().write_h5ad(tmp / "nocells.h5ad")
    with pytest.raises(InputError, match=r"nocells\.h5ad: empty matrix \(0 cells"):
        open_counts(tmp / "nocells.h5ad")
    pbmc3k_subset[:, :0].copy().write_h5ad(tmp / "nogenes.h5ad")
    with pytest.raises(InputError, match=r"nogenes\.h5ad: empty matrix .* 0 genes"):
        open_counts(tmp / "nogenes.h5ad")


def test_large_csc_is_refused(inputs, monkeypatch):
    monkeypatch.setattr(gio, "CSC_IN_MEMORY_LIMIT_BYTES", 1000)
    with pytest.raises(InputError, match=r"csc\.h5ad: X is stored as CSC.*tocsr\(\)"):
        open_counts(inputs["h5ad_csc_small"][0])


def test_unknown_gene_ids(pbmc3k_subset, tmp):
    sub = pbmc3k_subset[:, :300].copy()
    sub.var_names = [f"gene_{i}" for i in range(sub.n_vars)]
    del sub.var["gene_symbols"]
    sub.write_h5ad(tmp / "unknown.h5ad")
    with open_counts(tmp / "unknown.h5ad") as src:
        with pytest.raises(InputError, match=r"unknown\.h5ad: could not tell the species.*--species"):
            src.gene_map()
        with pytest.raises(
            InputError, match=r"unknown\.h5ad: only 0 of 300 genes.*human symbol.*gene_0, gene_1"
        ):
            src.gene_map(species="human")
        with pytest.raises(InputError, match="unknown species"):
            src.gene_map(species="zebrafish")


def _bad_counts_file(pbmc3k_subset, tmp, name, row, value):
    sub = pbmc3k_subset[:20].copy()
    X = sp.csr_matrix(sub.X)
    X.data[X.indptr[row] + 3] = value  # the 4th stored value of cell `row`
    sub.X = X
    sub.write_h5ad(tmp / name)
    return tmp / name


@pytest.mark.parametrize(
    ("value", "what"),
    [
        (-2.0, "a negative count"),
        (np.nan, "a non-finite count"),
        (np.inf, "a non-finite count"),
        (2.5, "a non-integer"),
    ],
)
def test_bad_values_are_refused(pbmc3k_subset, tmp, value, what):
    path = _bad_counts_file(pbmc3k_subset, tmp, "bad.h5ad", row=13, value=value)
    with open_counts(path) as src:
        chunks = list(src.iter_chunks(7))
    validate_counts(chunks[0], path)  # rows 0-6 are clean
    with pytest.raises(InputError, match=rf"bad\.h5ad: cell row 13, gene column \d+ has {what}"):
        for c in chunks:
            validate_counts(c, path)
    if value == 2.5:
        for c in chunks:
            validate_counts(c, path, allow_non_integer=True)
    else:
        with pytest.raises(InputError, match="cell row 13"):
            validate_counts(chunks[1], path, allow_non_integer=True)


def test_dense_nan_is_kept_for_validation(pbmc3k_subset, tmp):
    sub = pbmc3k_subset[:10].copy()
    X = sub.X.toarray()
    X[4, 0] = np.nan  # a zero position in CSR terms
    sub.X = X
    sub.write_h5ad(tmp / "dense_nan.h5ad")
    with open_counts(tmp / "dense_nan.h5ad") as src:
        (chunk,) = src.iter_chunks(100)
    with pytest.raises(InputError, match=r"dense_nan\.h5ad: cell row 4, gene column 0 has a non-finite"):
        validate_counts(chunk, tmp / "dense_nan.h5ad")


# ------------------------------------------------------------------------------------------- inspect


def test_inspect_pbmc3k(pbmc3k_path, pbmc3k_adata):
    calls = []
    r = inspect_counts(pbmc3k_path, chunk_size=1000, progress=lambda done, total: calls.append((done, total)))
    X = sp.csr_matrix(pbmc3k_adata.X)
    assert calls == [(1000, 2700), (2000, 2700), (2700, 2700)]
    assert (r["format"], r["n_cells"], r["n_genes"]) == ("h5ad", 2700, pbmc3k_adata.n_vars)
    assert (r["species"], r["id_type"], r["integer_counts"]) == ("human", "ensembl", True)
    assert r["nnz"] == X.nnz
    assert r["median_counts_per_cell"] == np.median(np.asarray(X.sum(axis=1)).ravel()) == 2197
    assert r["median_genes_per_cell"] == np.median(np.diff(X.indptr)) == 817
    assert 0.01 < r["mito_fraction_median"] < 0.04
    assert r["obs_columns"] == ["cell_type"] and r["frac_genes_in_vocab"] > 0.85
    assert r["reference_hash"].startswith("ref-")


def test_inspect_mouse(mouse_h5_path):
    r = inspect_counts(mouse_h5_path, max_cells_checked=500)
    assert (r["format"], r["species"], r["n_genes"], r["n_cells"]) == ("10x_h5", "mouse", 100, 2695)
    assert r["n_cells_checked"] == 500 and r["integer_counts"]


def test_inspect_reports_bad_values(pbmc3k_subset, tmp):
    path = _bad_counts_file(pbmc3k_subset, tmp, "normalised.h5ad", row=2, value=0.25)
    r = inspect_counts(path)
    assert r["integer_counts"] is False and r["n_non_integer"] == 1 and r["n_negative"] == 0


def test_read_obs_formats(inputs, pbmc3k_subset):
    with open_counts(inputs["loom"][0]) as src:
        assert src.obs_columns() == ["cell_type"]
        obs = src.read_obs(["cell_type"])
        assert list(obs["cell_type"]) == list(pbmc3k_subset.obs["cell_type"].astype(str)[:120])
    with open_counts(inputs["anndata_zarr"][0]) as src:
        obs = src.read_obs(["cell_type"])
        assert isinstance(obs, pd.DataFrame) and list(obs.index) == list(pbmc3k_subset.obs_names[:120])
    with open_counts(inputs["10x_h5_v3"][0]) as src:
        assert src.obs_columns() == [] and src.read_obs([]).shape == (src.n_cells, 0)
        with pytest.raises(
            InputError, match=r"v3\.h5: obs column\(s\) 'cell_type' not found; available: \(none\)"
        ):
            src.read_obs(["cell_type"])


def test_legacy_h5ad(tmp, pbmc3k_subset):
    """anndata < 0.7 files: no encoding attributes, categories behind an object reference."""
    sub = pbmc3k_subset[:30]
    X = sp.csr_matrix(sub.X)
    with h5py.File(tmp / "legacy.h5ad", "w") as f:
        x = f.create_group("X")
        x.attrs["h5sparse_format"] = "csr"
        x.attrs["h5sparse_shape"] = X.shape
        for k in ("data", "indices", "indptr"):
            x.create_dataset(k, data=getattr(X, k))
        obs, var = f.create_group("obs"), f.create_group("var")
        obs.create_dataset("index", data=np.array(sub.obs_names, dtype="S"))
        cats = sub.obs["cell_type"].cat
        cat_ds = f.create_dataset("obs_cats", data=np.array(cats.categories, dtype="S"))
        codes = obs.create_dataset("cell_type", data=cats.codes.to_numpy())
        codes.attrs["categories"] = cat_ds.ref
        obs.attrs["_index"] = "index"
        var.create_dataset("index", data=np.array(sub.var_names, dtype="S"))
        var.attrs["_index"] = "index"
    with open_counts(tmp / "legacy.h5ad") as src:
        assert same_matrix(assemble(src, 7), X)
        assert src.var_names == list(sub.var_names)
        assert list(src.read_obs(["cell_type"])["cell_type"]) == list(sub.obs["cell_type"])


@pytest.mark.parametrize("name", ["h5ad_csr", "10x_h5_v3"])
def test_sparse_arrays_read_through_a_small_chunk_cache(inputs, name):
    """Stored CSR arrays are read sequentially: each gets a 1 MiB HDF5 chunk cache, not the file's 64 MiB."""
    path, expected = inputs[name]
    with open_counts(path) as src:
        for dataset in (src._rows.indices, src._rows.data):
            assert dataset.id.get_access_plist().get_chunk_cache()[1] == gio._H5_SPARSE_CACHE_BYTES
        assert same_matrix(assemble(src, 100), expected)
