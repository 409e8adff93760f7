"""The plots say what they show: loss curve axes and weighting, UMAP legend title and model provenance."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd


def test_loss_curve_has_id_and_value_losses_on_their_own_axes(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from genecompass.train import LOG_COLUMNS, plot_loss_curve

    rows = [
        {
            "step": s,
            "loss": 9.0 / s + 0.1,
            "id_loss": 9.0 / s,
            "value_loss": 0.1,
            "lr": 1e-4,
            "tokens": s,
            "tokens_per_s": 1.0,
            "elapsed": s,
        }
        for s in (10, 20, 30)
    ]
    pd.DataFrame(rows, columns=list(LOG_COLUMNS)).to_csv(tmp_path / "train_log.csv", index=False)
    saved = []
    monkeypatch.setattr(plt, "close", lambda fig=None: saved.append(fig))
    plot_loss_curve(tmp_path / "train_log.csv", tmp_path / "loss.png", id_weight=1.0, value_weight=0.5)
    figure = saved[-1]
    id_axis, value_axis = figure.axes
    assert "ID loss" in id_axis.get_ylabel() and "value loss" in value_axis.get_ylabel()
    assert list(id_axis.lines[0].get_ydata()) == [0.9, 0.45, 0.3]
    assert "loss = 1 × ID loss + 0.5 × value loss" in figure._suptitle.get_text()
    assert (tmp_path / "loss.png").stat().st_size > 5_000


def test_embedding_plot_has_a_legend_title_and_the_models_provenance(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from genecompass.embed import plot_embedding

    rng = np.random.default_rng(0)
    adata = ad.AnnData(obs=pd.DataFrame({"cell_type": ["B", "T"] * 10}, index=[f"c{i}" for i in range(20)]))
    adata.obsm["X_genecompass"] = rng.standard_normal((20, 8)).astype(np.float32)
    adata.uns["genecompass"] = {"run": "runs/tiny", "reference_hash": "abcdef0123456789", "pool": "species"}
    saved = []
    monkeypatch.setattr(plt, "close", lambda fig=None: saved.append(fig))
    assert plot_embedding(adata, "cell_type", tmp_path / "umap.png") == "pca"  # 20 cells: PCA
    figure = saved[-1]
    assert figure.axes[0].get_legend().get_title().get_text() == "cell_type (cells)"
    footer = " ".join(t.get_text() for t in figure.texts)
    assert "model: runs/tiny" in footer and "reference abcdef012345" in footer
