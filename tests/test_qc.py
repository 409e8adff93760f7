"""QC on the real PBMC3k counts: metrics against a direct computation, filters, report files."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from genecompass.errors import InputError, OutputExistsError
from genecompass.qc import QcParams, apply_filters, load_qc_masks, run_qc
from genecompass.reference import load_reference


@pytest.fixture(scope="module")
def pbmc_qc(pbmc3k_path):
    return run_qc([pbmc3k_path], chunk_size=512)


def test_metrics_match_direct_computation(pbmc_qc, pbmc3k_path):
    adata = ad.read_h5ad(pbmc3k_path)
    X = adata.X.tocsr()
    metrics = pbmc_qc.files[0].metrics
    np.testing.assert_allclose(metrics["total_counts"], np.asarray(X.sum(axis=1)).ravel())
    np.testing.assert_array_equal(metrics["n_genes"], np.diff(X.indptr))
    mito = load_reference().mito_mask_for_ids(list(adata.var_names), "human")
    assert mito.sum() == 13  # the 13 mitochondrial protein-coding genes of the 10x hg19 annotation
    expected = np.asarray(X[:, mito].sum(axis=1)).ravel() / np.asarray(X.sum(axis=1)).ravel()
    np.testing.assert_allclose(metrics["mito_fraction"], expected)
    assert 0.01 < metrics["mito_fraction"].median() < 0.04  # PBMC3k: about 2 % mitochondrial


def test_filters_are_applied_in_order_and_counted(pbmc_qc):
    file_qc = pbmc_qc.files[0]
    metrics = file_qc.metrics
    removed = file_qc.removed
    assert sum(removed.values()) == file_qc.n_cells - file_qc.passed.sum()
    assert removed["n_genes < 200"] == int((metrics["n_genes"] < 200).sum())
    assert removed["mito_fraction > 0.15"] > 0  # PBMC3k has a few dying cells
    kept = metrics[metrics["passed"]]
    assert (kept["n_genes"] >= 200).all() and (kept["mito_fraction"] <= 0.15).all()
    assert 2400 < file_qc.passed.sum() < 2700


def test_original_mode_uses_zscores(pbmc_qc):
    metrics = pbmc_qc.files[0].metrics[["total_counts", "n_genes", "n_coding_genes", "mito_fraction"]]
    passed, failed, removed = apply_filters(metrics, QcParams(mode="original"))
    z = (metrics["total_counts"] - metrics["total_counts"].mean()) / metrics["total_counts"].std(ddof=0)
    assert not passed[np.abs(z.to_numpy()) >= 3].any()
    assert set(failed[~passed]) <= set(removed)


def test_too_few_cells_drops_the_file():
    metrics = pd.DataFrame(
        {
            "total_counts": [1000.0] * 3,
            "n_genes": [500] * 3,
            "n_coding_genes": [400] * 3,
            "mito_fraction": [0.01] * 3,
        }
    )
    passed, _, removed = apply_filters(metrics, QcParams())
    assert not passed.any() and removed["file has < 4 passing cells"] == 3


def test_report_is_written_and_reloaded(pbmc_qc, pbmc3k_path, tmp_path):
    out = pbmc_qc.save(tmp_path / "qc")
    summary = json.loads((out / "qc.json").read_text())
    assert summary["n_passed"] == int(pbmc_qc.files[0].passed.sum())
    assert (out / "qc.png").stat().st_size > 10_000
    masks = load_qc_masks(out, [pbmc3k_path], [2700])
    np.testing.assert_array_equal(masks[0], pbmc_qc.files[0].passed)
    with pytest.raises(OutputExistsError):
        pbmc_qc.save(out)


def test_bad_mode_is_rejected():
    with pytest.raises(InputError, match="mode"):
        QcParams(mode="strict")


def test_plot_draws_every_threshold_where_the_filters_cut(pbmc_qc, tmp_path):
    from genecompass.qc import cutoffs, plot_qc

    metrics = pbmc_qc.files[0].metrics
    lines = cutoffs(metrics, QcParams())
    assert [v for v, _ in lines["n_genes"]][0] == 200 and lines["mito_fraction"] == [(0.15, "max 0.15")]
    low, high = sorted(v for v, label in lines["n_genes"] if "SD" in label)
    beyond = (metrics["n_genes"] < low) | (metrics["n_genes"] > high)
    _, _, removed = apply_filters(
        metrics.assign(mito_fraction=0.0, n_coding_genes=10**6), QcParams(min_genes=0)
    )
    assert removed["n_genes beyond mean ± 3.0 SD"] == int(beyond.sum())  # the drawn lines are the cut
    original = cutoffs(metrics, QcParams(mode="original"))
    assert len(original["total_counts"]) == 2 and len(original["mito_fraction"]) == 2
    plot_qc(pbmc_qc, tmp_path / "qc.png")
    assert (tmp_path / "qc.png").stat().st_size > 10_000
