"""CSV/TSV count tables: both orientations, plain and gzipped, read as the h5ad they were written from.

The tables are written from the real PBMC3k data bundled in data/ (the first 80 cells, every gene), so the
check is end to end: the corpus tokenised from each table equals the corpus tokenised from the h5ad."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from genecompass import io as gio
from genecompass.errors import InputError
from genecompass.io import TEXT_ROWS_ARE_CELLS, TEXT_ROWS_ARE_GENES, open_counts

N_CELLS = 80


@pytest.fixture(scope="module")
def tables(pbmc3k_subset, tmp_path_factory):
    """The first 80 PBMC3k cells as an h5ad and as four text tables (orientation × compression)."""
    work = tmp_path_factory.mktemp("csv")
    adata = pbmc3k_subset[:N_CELLS].copy()
    h5ad = work / "cells.h5ad"
    adata.write_h5ad(h5ad)
    frame = pd.DataFrame(
        adata.X.toarray().astype(np.int64), index=adata.obs_names, columns=adata.var_names
    )
    paths = {
        "cells.csv": (frame, ","),
        "cells.csv.gz": (frame, ","),
        "genes.tsv": (frame.T, "\t"),
        "genes.tsv.gz": (frame.T, "\t"),
    }
    for name, (table, sep) in paths.items():
        table.to_csv(work / name, sep=sep)  # pandas gzips by the .gz suffix
    return {"h5ad": h5ad, "work": work, "adata": adata, **{name: work / name for name in paths}}


def _matrix(source) -> sp.csr_matrix:
    return sp.vstack([c.to_scipy(source.n_genes) for c in source.iter_chunks(64)]).tocsr()


@pytest.mark.parametrize(
    "name, fmt, orientation",
    [
        ("cells.csv", "csv", TEXT_ROWS_ARE_CELLS),
        ("cells.csv.gz", "csv", TEXT_ROWS_ARE_CELLS),
        ("genes.tsv", "tsv", TEXT_ROWS_ARE_GENES),
        ("genes.tsv.gz", "tsv", TEXT_ROWS_ARE_GENES),
    ],
)
def test_tables_read_as_the_h5ad_in_either_orientation(tables, name, fmt, orientation):
    with open_counts(tables["h5ad"]) as h5ad, open_counts(tables[name]) as table:
        assert (table.format, table.orientation, table.orientation_detected) == (fmt, orientation, True)
        assert (table.n_cells, table.n_genes) == (h5ad.n_cells, h5ad.n_genes)
        assert table.var_names == h5ad.var_names and table.obs_names() == h5ad.obs_names()
        expected = _matrix(h5ad)
        assert (_matrix(table) != expected).nnz == 0
        part = sp.vstack([c.to_scipy(table.n_genes) for c in table.iter_chunks(25, 20, 70)]).tocsr()
        assert (part != expected[20:70]).nnz == 0  # a later range after a full pass: read again
        assert table.gene_map().species == "human"


def test_small_blocks_and_buckets_give_the_same_matrix(tables, monkeypatch):
    """Block and bucket boundaries inside a 64-cell chunk: parse 13 rows at a time, transpose into 7-cell
    buckets."""
    monkeypatch.setattr(gio, "_DENSE_SLAB_BYTES", 13 * 4 * tables["adata"].n_vars)
    monkeypatch.setattr(gio, "_TEXT_BUCKET_CELLS", 7)
    with open_counts(tables["h5ad"]) as h5ad:
        expected = _matrix(h5ad)
    for name in ("cells.csv", "genes.tsv.gz"):
        with open_counts(tables[name]) as table:
            assert (_matrix(table) != expected).nnz == 0, name


def test_the_orientation_can_be_given(tables):
    with open_counts(tables["genes.tsv"], layer=TEXT_ROWS_ARE_GENES) as table:
        assert table.orientation == TEXT_ROWS_ARE_GENES and not table.orientation_detected
    with open_counts(tables["genes.tsv"], layer=TEXT_ROWS_ARE_CELLS) as table:  # wrong way round, as asked
        assert (table.n_cells, table.n_genes) == (tables["adata"].n_vars, N_CELLS)
    with open_counts(tables["h5ad"], layer=TEXT_ROWS_ARE_GENES) as h5ad:  # ignored for other formats
        assert h5ad.n_cells == N_CELLS


def test_tokenised_tables_equal_the_h5ad_corpus(tables):
    from genecompass.corpus import Corpus
    from genecompass.tokenize import TokenizeOptions, tokenize

    def arrays(path):
        corpus = Corpus(path)
        return corpus.offsets, corpus.species, corpus.genes[:], corpus.values[:]

    tokenize([tables["h5ad"]], tables["work"] / "h5ad.zarr", options=TokenizeOptions(threads=1))
    expected = arrays(tables["work"] / "h5ad.zarr")
    for name in ("cells.csv", "genes.tsv.gz"):
        out = tables["work"] / f"{name}.zarr"
        tokenize([tables[name]], out, options=TokenizeOptions(threads=1))
        for got, want in zip(arrays(out), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_cli_inspect_qc_tokenize_accept_tables(tables, tmp_path):
    from cli.app import app

    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(tables["genes.tsv.gz"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["orientation"] == "rows=genes (detected from the gene names)"
    assert report["n_cells"] == N_CELLS and report["integer_counts"]
    result = runner.invoke(app, ["inspect", str(tables["genes.tsv.gz"]), "--transpose", "--json"])
    assert json.loads(result.stdout)["orientation"] == "rows=genes (given)"
    result = runner.invoke(app, ["qc", str(tables["cells.csv.gz"]), "--out", str(tmp_path / "qc"), "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app, ["tokenize", str(tables["genes.tsv"]), "--transpose", "--out", str(tmp_path / "c.zarr")]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        app,
        ["tokenize", str(tables["genes.tsv"]), "--layer", "raw", "--transpose", "--out", str(tmp_path / "d")],
    )
    assert isinstance(result.exception, InputError) and "do not go together" in str(result.exception)


def test_symbol_header_as_celltypist_writes_it(tmp_path, tables):
    """celltypist's sample_cell_by_gene.csv: cell names, then gene symbols as columns."""
    adata = tables["adata"]
    symbols = adata.var["gene_symbols"].astype(str).tolist()
    frame = pd.DataFrame(adata.X[:20].toarray().astype(int), columns=symbols)
    frame.index = [f"cell{i}" for i in range(20)]
    path = tmp_path / "sample_cell_by_gene.csv"
    frame.to_csv(path)
    with open_counts(path) as table:
        assert table.orientation == TEXT_ROWS_ARE_CELLS and table.n_cells == 20
        gene_map = table.gene_map()
        assert gene_map.species == "human" and gene_map.id_type == "symbol" and gene_map.frac_in_vocab > 0.8


@pytest.mark.parametrize(
    "text, problem",
    [
        ("cell,A,B\nc1,1,2\nc2,1\n", "line 3 has 2 fields, line 2 has 3"),
        ("cell,TP53,ACTB\nc1,1,x\n", "a value that is not a number"),
        ("cell,TP53,ACTB\n", "no data rows under the header"),
        ("a,b,c,d\nc1,1,2\n", "the header has 4 fields but the rows have 3"),
        ("cell,x1,x2\nc1,1,2\nc2,3,4\n", "cannot tell whether rows are cells or genes"),
    ],
)
def test_bad_tables_are_one_clear_error(tmp_path, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputError, match=problem) as info:
        with open_counts(path) as table:
            _matrix(table)
    assert str(info.value).startswith(str(path))


def test_a_truncated_gzip_is_one_clear_error(tmp_path, tables):
    data = tables["cells.csv.gz"].read_bytes()
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.csv.gz: could not read the table"):
        open_counts(path)
    assert gzip.decompress(data)  # the fixture itself is whole
