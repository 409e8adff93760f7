"""`gc bench annotate` and its baselines on real data (PBMC3k), with the session's tiny pre-trained model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_embed import train_tiny_run


def cli_app(args: list[str]):
    from typer.testing import CliRunner

    from cli.app import app

    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, pbmc3k_corpus) -> Path:
    return train_tiny_run(tmp_path_factory, pbmc3k_corpus)


@pytest.fixture(scope="module")
def cells_h5ad(pbmc3k_adata, tmp_path_factory) -> Path:
    rows = np.sort(np.random.default_rng(1).choice(pbmc3k_adata.n_obs, 500, replace=False))
    path = tmp_path_factory.mktemp("bench") / "pbmc500.h5ad"
    pbmc3k_adata[rows].copy().write_h5ad(path)
    return path


def test_highly_variable_genes_prefers_overdispersed_genes():
    import scipy.sparse as sp

    from genecompass.benchmark import highly_variable_genes, log_normalise

    rng = np.random.default_rng(0)
    n_cells, n_genes = 500, 300
    mean = np.geomspace(0.5, 20.0, n_genes)  # every mean bin populated
    counts = rng.poisson(mean, size=(n_cells, n_genes)).astype(np.float32)
    bursty = [60, 150, 240]  # the same mean as their neighbours, but zero in 90 % of cells
    for gene in bursty:
        on = rng.random(n_cells) < 0.1
        counts[:, gene] = np.where(on, rng.poisson(mean[gene] * 10, n_cells), 0)
    chosen = highly_variable_genes(log_normalise(sp.csr_matrix(counts)), n_top=3)
    assert sorted(chosen.tolist()) == bursty


def test_hvg_logistic_regression_beats_majority_on_pbmc3k(pbmc3k_adata):
    from genecompass.benchmark import hvg_logistic_regression
    from genecompass.finetune import classification_metrics, stratified_split

    labels = pbmc3k_adata.obs["cell_type"].astype(str).to_numpy(object)
    is_test = stratified_split(labels, 0.25, np.random.default_rng(0))
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    predicted = hvg_logistic_regression(pbmc3k_adata.X, labels, train, test, n_hvg=500, n_pcs=20)
    metrics = classification_metrics(labels[test], predicted, "CD4 T")
    assert metrics["accuracy"] > metrics["majority_class_rate"] + 0.3
    assert metrics["macro_f1"] > 0.6


def test_untrained_copy_keeps_architecture_not_weights(run_dir, tmp_path):
    from genecompass.benchmark import untrained_copy
    from genecompass.run import load_run

    trained, fresh = load_run(run_dir), load_run(untrained_copy(run_dir, tmp_path / "fresh"))
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "max_position_embeddings", "knowledge_tables")
    for key in sizes:
        assert getattr(trained.model.config, key) == getattr(fresh.model.config, key), key
    assert trained.medians_hash == fresh.medians_hash
    a = trained.model.embeddings.gene_embeddings.weight
    b = fresh.model.embeddings.gene_embeddings.weight
    assert a.shape == b.shape and not np.allclose(a.detach().numpy(), b.detach().numpy())


def test_bench_annotate_cli_all_rows_on_one_split(run_dir, cells_h5ad, tmp_path):
    out = tmp_path / "annotate"
    args = ["bench", "annotate", str(cells_h5ad), "--model", str(run_dir), "--out", str(out),
            "--epochs", "1", "--max-length", "33", "--n-hvg", "300", "--n-pcs", "10", "--json"]
    result = cli_app(args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["pretrained", "scratch", "hvg-lr", "knn"]
    n_test = {row["n_cells"] for row in results["rows"].values()}
    assert n_test == {results["n_test_cells"]} and 0 < results["n_test_cells"] < 500
    assert results["rows"]["hvg-lr"]["accuracy"] > results["rows"]["hvg-lr"]["majority_class_rate"]
    for row in results["rows"].values():
        assert 0.0 <= row["macro_f1"] <= 1.0 and 0.0 <= row["accuracy"] <= 1.0
    assert "| HVG (2,000) + PCA (50) + logistic regression |" in (out / "results.md").read_text()
    assert not list(tmp_path.glob(".annotate*"))  # no temporary left behind

    again = cli_app(args)  # the output exists: refused without --overwrite
    assert again.exit_code != 0


def test_bench_annotate_rejects_unknown_row_and_missing_key(run_dir, cells_h5ad, tmp_path):
    bad_row = cli_app(["bench", "annotate", str(cells_h5ad), "--model", str(run_dir),
                       "--out", str(tmp_path / "a"), "--rows", "pretrained,magic"])
    assert bad_row.exit_code != 0 and "magic" in str(bad_row.exception or bad_row.output)
    bad_key = cli_app(["bench", "annotate", str(cells_h5ad), "--model", str(run_dir),
                       "--out", str(tmp_path / "b"), "--label-key", "nope", "--rows", "hvg-lr"])
    message = str(bad_key.exception or bad_key.output)
    assert bad_key.exit_code != 0 and "nope" in message and str(cells_h5ad) in message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
