"""Shared pytest fixtures: the bundled real data sets, and writers for small real-format input files.

Real fixtures (``data/``): ``pbmc3k_path`` (10x PBMC3k h5ad, 2,700 human cells, raw UMI, Ensembl var_names),
``mouse_h5_path`` (a real CellRanger HDF5 file, mouse Visium, 100 genes × 2,695 spots). Tests that need one
are skipped when it is missing.

Writers (plain functions, also exposed as fixtures) turn a cells × genes matrix into the on-disk formats gc
reads: ``write_10x_h5`` (CellRanger v3 or v2 HDF5), ``write_10x_mtx`` (CellRanger v2/v3 MTX directory) and
``write_loom``; the ``writers`` fixture hands them to tests.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"fixture {path.relative_to(REPO)} is not present")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def pbmc3k_path() -> Path:
    """``data/pbmc3k.h5ad``: 2,700 cells, raw integer UMI (CSR float32), Ensembl var_names,
    ``var["gene_symbols"]``, ``obs["cell_type"]``."""
    return _require(DATA / "pbmc3k.h5ad")


@pytest.fixture(scope="session")
def mouse_h5_path() -> Path:
    """``data/mouse_visium_100genes.h5``: a real CellRanger HDF5 file, mouse (ENSMUSG ids), 100 genes."""
    return _require(DATA / "mouse_visium_100genes.h5")


@pytest.fixture(scope="session")
def pbmc3k_adata(pbmc3k_path):
    """PBMC3k read fully into memory with anndata (the ground truth for readers). Do not modify."""
    import anndata as ad

    return ad.read_h5ad(pbmc3k_path)


@pytest.fixture(scope="session")
def pbmc3k_subset(pbmc3k_adata):
    """The first 300 PBMC3k cells as an in-memory AnnData (CSR float32). Do not modify; ``.copy()`` it."""
    return pbmc3k_adata[:300].copy()


@pytest.fixture(scope="session")
def pbmc3k_corpus(pbmc3k_path, tmp_path_factory) -> Path:
    """PBMC3k tokenised with the real gene reference (2,700 cells, ``cell_type`` carried). Do not modify."""
    from genecompass.tokenize import TokenizeOptions, tokenize

    out = tmp_path_factory.mktemp("pbmc3k") / "pbmc3k.zarr"
    tokenize([pbmc3k_path], out, options=TokenizeOptions(obs_keys=("cell_type",)))
    return out


@pytest.fixture
def tmp(tmp_path) -> Path:
    """A fresh per-test directory (alias of ``tmp_path``)."""
    return tmp_path


def copy_truncated(src: Path, dst: Path, fraction: float = 0.5) -> Path:
    """Copy ``src`` to ``dst`` keeping only the first ``fraction`` of its bytes (a damaged download)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(fin.read(int(src.stat().st_size * fraction)))
    return dst


def write_10x_h5(
    path: Path,
    counts,
    gene_ids: Sequence[str],
    gene_names: Sequence[str],
    barcodes: Sequence[str],
    *,
    feature_types: Sequence[str] | None = None,
    genome: str = "GRCh38",
    version: int = 3,
) -> Path:
    """Write a cells × genes matrix as a CellRanger HDF5 file (v3: ``matrix/``; v2: ``GENOME/``)."""
    import h5py
    import scipy.sparse as sp

    m = sp.csr_matrix(counts)  # cells × genes CSR == genes × cells CSC, as CellRanger stores it
    n_cells, n_genes = m.shape
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix" if version >= 3 else genome)
        g.create_dataset("data", data=m.data.astype(np.int32), compression="gzip")
        g.create_dataset("indices", data=m.indices.astype(np.int64), compression="gzip")
        g.create_dataset("indptr", data=m.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array([n_genes, n_cells], dtype=np.int32))
        g.create_dataset("barcodes", data=np.array(barcodes, dtype="S"))
        if version >= 3:
            feats = g.create_group("features")
            types = feature_types if feature_types is not None else ["Gene Expression"] * n_genes
            feats.create_dataset("id", data=np.array(gene_ids, dtype="S"))
            feats.create_dataset("name", data=np.array(gene_names, dtype="S"))
            feats.create_dataset("feature_type", data=np.array(types, dtype="S"))
            feats.create_dataset("genome", data=np.array([genome] * n_genes, dtype="S"))
            f.attrs["library_ids"] = np.array([b"lib"])
        else:
            g.create_dataset("genes", data=np.array(gene_ids, dtype="S"))
            g.create_dataset("gene_names", data=np.array(gene_names, dtype="S"))
    return path


def write_10x_mtx(
    directory: Path,
    counts,
    gene_ids: Sequence[str],
    gene_names: Sequence[str],
    barcodes: Sequence[str],
    *,
    version: int = 3,
    feature_types: Sequence[str] | None = None,
) -> Path:
    """Write a cells × genes matrix as a CellRanger MTX directory (v3: gzipped, ``features.tsv.gz`` with a
    type column; v2: plain ``matrix.mtx`` + ``genes.tsv`` + ``barcodes.tsv``)."""
    import scipy.io
    import scipy.sparse as sp

    directory.mkdir(parents=True, exist_ok=True)
    m = sp.coo_matrix(sp.csr_matrix(counts).T)  # MatrixMarket holds genes × cells
    m.data = np.rint(m.data).astype(np.int64)
    if version >= 3:
        types = feature_types if feature_types is not None else ["Gene Expression"] * len(gene_ids)
        genes_lines = [f"{i}\t{n}\t{t}\n" for i, n, t in zip(gene_ids, gene_names, types, strict=True)]
        scipy.io.mmwrite(directory / "matrix.mtx", m, field="integer")
        with (
            open(directory / "matrix.mtx", "rb") as fin,
            gzip.open(directory / "matrix.mtx.gz", "wb") as fout,
        ):
            shutil.copyfileobj(fin, fout)
        (directory / "matrix.mtx").unlink()
        with gzip.open(directory / "features.tsv.gz", "wt") as fh:
            fh.writelines(genes_lines)
        with gzip.open(directory / "barcodes.tsv.gz", "wt") as fh:
            fh.writelines(f"{b}\n" for b in barcodes)
    else:
        scipy.io.mmwrite(directory / "matrix.mtx", m, field="integer")
        (directory / "genes.tsv").write_text(
            "".join(f"{i}\t{n}\n" for i, n in zip(gene_ids, gene_names, strict=True))
        )
        (directory / "barcodes.tsv").write_text("".join(f"{b}\n" for b in barcodes))
    return directory


def write_loom(
    path: Path,
    counts,
    gene_ids: Sequence[str],
    gene_names: Sequence[str],
    barcodes: Sequence[str],
    obs: dict[str, Sequence] | None = None,
) -> Path:
    """Write a cells × genes matrix as a loom 3 file (``matrix`` genes × cells, dense)."""
    import h5py
    import scipy.sparse as sp

    dense = sp.csr_matrix(counts).T.toarray().astype(np.float32)
    with h5py.File(path, "w") as f:
        f.attrs["LOOM_SPEC_VERSION"] = "3.0.0"
        f.create_dataset(
            "matrix",
            data=dense,
            chunks=(min(64, dense.shape[0]), min(64, dense.shape[1])),
            compression="gzip",
        )
        ra, ca = f.create_group("row_attrs"), f.create_group("col_attrs")
        for g in ("layers", "row_graphs", "col_graphs"):
            f.create_group(g)
        ra.create_dataset("Accession", data=np.array(gene_ids, dtype=object), dtype=h5py.string_dtype())
        ra.create_dataset("Gene", data=np.array(gene_names, dtype=object), dtype=h5py.string_dtype())
        ca.create_dataset("CellID", data=np.array(barcodes, dtype=object), dtype=h5py.string_dtype())
        for key, values in (obs or {}).items():
            values = np.asarray(values)
            if values.dtype.kind in "OUS":
                ca.create_dataset(key, data=values.astype(object), dtype=h5py.string_dtype())
            else:
                ca.create_dataset(key, data=values)
    return path


@pytest.fixture(scope="session")
def writers() -> SimpleNamespace:
    """The file writers above: ``writers.h5`` (10x HDF5), ``writers.mtx`` (10x MTX directory),
    ``writers.loom``, ``writers.truncated`` (damaged copy of a file)."""
    return SimpleNamespace(h5=write_10x_h5, mtx=write_10x_mtx, loom=write_loom, truncated=copy_truncated)
