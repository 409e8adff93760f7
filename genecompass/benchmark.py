"""Cell-type annotation benchmark (``gc bench annotate``): the fine-tuned model beside the baselines that
single-cell foundation models are often found not to beat.

Every row is scored on the same test cells (a held-out ``obs[test_key] == test_value`` condition, or a seeded
stratified fraction) with the same metrics (``genecompass.finetune.classification_metrics``):

- ``pretrained``: ``finetune_celltype`` from the pre-trained run;
- ``scratch``: the same architecture, tokenisation and fine-tuning, from freshly initialised weights;
- ``hvg-lr``: library-size normalisation to 10,000, log1p, 2,000 highly variable genes (Seurat dispersion
  flavour, chosen on training cells only), scaling (clipped at 10), PCA to 50 components, logistic regression;
- ``knn``: k-nearest neighbours (cosine) on the pre-trained model's zero-shot cell embeddings.

Output directory: ``results.json`` (every row's metrics and cost), ``results.md`` (the table), and one
sub-directory per fine-tuned row (``finetune_celltype``'s outputs).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .finetune import FinetuneOptions, classification_metrics, finetune_celltype, stratified_split

ROWS = ("pretrained", "scratch", "hvg-lr", "knn")
ROW_TITLES = {
    "pretrained": "GeneCompass pre-trained, fine-tuned",
    "scratch": "same architecture, no pre-training, fine-tuned",
    "hvg-lr": "HVG (2,000) + PCA (50) + logistic regression",
    "knn": "k-NN on zero-shot GeneCompass embeddings",
}
SPLIT_KEY = "gc_benchmark_split"
Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class AnnotateSettings:
    label_key: str = "cell_type"
    test_key: str | None = None  # hold out every cell with obs[test_key] == test_value ...
    test_value: str | None = None
    test_fraction: float = 0.2  # ... or, without test_key, this stratified fraction
    rows: tuple[str, ...] = ROWS
    n_hvg: int = 2000
    n_pcs: int = 50
    knn_k: int = 15
    target_sum: float = 1e4
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rows) - set(ROWS))
        if unknown or not self.rows:
            given = ", ".join(unknown) or "(none given)"
            raise InputError(f"--rows: unknown {given}; choose from {', '.join(ROWS)}")
        if (self.test_key is None) != (self.test_value is None):
            raise InputError("--test-key and --test-value go together")
        if self.test_key is None and not 0.0 < self.test_fraction < 1.0:
            raise InputError(f"--test-fraction must be in (0, 1), not {self.test_fraction}")
        if self.n_hvg < 2 or self.n_pcs < 1 or self.knn_k < 1:
            raise InputError("--n-hvg must be >= 2, --n-pcs and --knn-k >= 1")


# ------------------------------------------------------------------------------------------------------
# Baselines


def log_normalise(counts, target_sum: float = 1e4):
    """CSR counts → log1p(counts / library size × target_sum), as scanpy's normalize_total + log1p."""
    import scipy.sparse as sp

    counts = sp.csr_matrix(counts, dtype=np.float32)
    library = np.asarray(counts.sum(1)).ravel()
    scale = np.divide(target_sum, library, out=np.zeros_like(library), where=library > 0)
    normalised = sp.diags(scale.astype(np.float32)) @ counts
    normalised.data = np.log1p(normalised.data)
    return normalised.tocsr()


def highly_variable_genes(lognorm, n_top: int, n_bins: int = 20) -> np.ndarray:
    """Indices of the ``n_top`` genes with the highest normalised dispersion (scanpy's ``flavor="seurat"``:
    mean and variance of expm1 of the log data, log dispersion z-scored within 20 mean bins)."""
    data = lognorm.copy()
    data.data = np.expm1(data.data)
    mean = np.asarray(data.mean(0)).ravel().astype(np.float64)
    mean_sq = np.asarray(data.multiply(data).mean(0)).ravel().astype(np.float64)
    n = data.shape[0]
    var = (mean_sq - mean**2) * n / max(n - 1, 1)
    mean[mean == 0] = 1e-12
    dispersion = np.log(np.maximum(var / mean, 1e-300))
    log_mean = np.log1p(mean)
    bins = pd.cut(log_mean, bins=n_bins)
    frame = pd.DataFrame({"dispersion": dispersion, "bin": bins})
    stats = frame.groupby("bin", observed=False)["dispersion"].agg(["mean", "std"])
    bin_mean = stats["mean"].reindex(bins).to_numpy()
    bin_std = stats["std"].reindex(bins).to_numpy()
    # a bin with a single gene has no spread: scanpy sets that gene's normalised dispersion to 1
    single = ~np.isfinite(bin_std)
    bin_std = np.where(single, 1.0, bin_std)
    normalised = np.where(single, 1.0, (dispersion - bin_mean) / np.where(bin_std == 0, 1.0, bin_std))
    normalised[~np.isfinite(normalised) | (var <= 0)] = -np.inf
    order = np.lexsort((np.arange(len(normalised)), -normalised))
    return np.sort(order[: min(n_top, int(np.isfinite(normalised).sum()))])


def hvg_logistic_regression(
    counts, labels: np.ndarray, train: np.ndarray, test: np.ndarray, *, n_hvg: int = 2000, n_pcs: int = 50,
    target_sum: float = 1e4, seed: int = 0,
) -> np.ndarray:
    """The standard baseline: predicted labels for ``test`` cells from HVG + PCA + logistic regression fitted
    on ``train`` cells only (genes, scaling and components never see a test cell)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    lognorm = log_normalise(counts, target_sum)
    genes = highly_variable_genes(lognorm[train], n_hvg)
    x_train = lognorm[train][:, genes].toarray()
    x_test = lognorm[test][:, genes].toarray()
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0
    x_train = np.clip((x_train - mean) / std, None, 10.0)
    x_test = np.clip((x_test - mean) / std, None, 10.0)
    pca = PCA(n_components=min(n_pcs, *x_train.shape), random_state=seed, svd_solver="full").fit(x_train)
    classifier = LogisticRegression(max_iter=2000).fit(pca.transform(x_train), labels[train])
    return classifier.predict(pca.transform(x_test))


def knn_predict(embeddings: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, k: int):
    """Majority label of the ``k`` nearest training cells by cosine similarity (distance-tied votes broken
    by scikit-learn's deterministic order)."""
    from sklearn.neighbors import KNeighborsClassifier

    classifier = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine")
    return classifier.fit(embeddings[train], labels[train]).predict(embeddings[test])


def untrained_copy(run, out: str | Path, *, seed: int = 0) -> Path:
    """A run directory with ``run``'s architecture, normaliser and knowledge tables but freshly initialised
    weights (the "no pre-training" control). Returns its path."""
    import torch

    from .model import GeneCompassConfig, GeneCompassForPretraining
    from .run import MEDIANS_FILE, RUN_INFO, model_dir_of, quiet_transformers

    source = model_dir_of(run)
    target = Path(out) / "model"
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = GeneCompassForPretraining(GeneCompassConfig.from_pretrained(source))
    with quiet_transformers():
        model.save_pretrained(target)
    for name in (RUN_INFO, MEDIANS_FILE):
        shutil.copyfile(source / name, target / name)
    return Path(out)


# ------------------------------------------------------------------------------------------------------
# The benchmark


def _truncated_run(loaded, max_length: int | None):
    """The loaded run, embedding at most ``max_length`` tokens per cell (as its fine-tuning rows see them)."""
    from dataclasses import replace

    if max_length is None:
        return loaded
    return replace(loaded, max_length=min(max_length, loaded.max_length))


def _load_counts(data):
    import anndata as ad

    if isinstance(data, ad.AnnData):
        return data.copy()
    path = Path(data)
    if path.suffix != ".h5ad" or not path.is_file():
        raise InputError(f"{path}: the annotation benchmark reads an .h5ad file of raw counts")
    return ad.read_h5ad(path)


def _split(obs: pd.DataFrame, settings: AnnotateSettings, where: str) -> np.ndarray:
    """Boolean test mask over cells with a label."""
    for key in [settings.label_key] + ([settings.test_key] if settings.test_key else []):
        if key not in obs.columns:
            available = ", ".join(obs.columns) or "none"
            raise InputError(f"{where}: no obs column {key!r}; available: {available}")
    has_label = obs[settings.label_key].notna().to_numpy()
    if settings.test_key is not None:
        is_test = (obs[settings.test_key].astype(str) == str(settings.test_value)).to_numpy()
    else:
        labels = obs[settings.label_key].astype(str).to_numpy(object)
        rng = np.random.default_rng(settings.finetune.seed)
        is_test = stratified_split(np.where(has_label, labels, ""), settings.test_fraction, rng)
    is_test &= has_label
    if not is_test.any() or not (has_label & ~is_test).any():
        raise InputError(
            f"{where}: the split holds out {int(is_test.sum())} of {int(has_label.sum())} labelled cells; "
            "need cells on both sides"
        )
    return is_test


def annotate_benchmark(
    data,
    run,
    *,
    out: str | Path,
    settings: AnnotateSettings = AnnotateSettings(),
    overwrite: bool = False,
    progress: Progress = None,
) -> dict:
    """Run the annotation benchmark on ``data`` (AnnData or .h5ad of raw counts with ``obs[label_key]``)
    with the pre-trained ``run``; write ``out/results.json`` and ``out/results.md``; return the results."""
    from .corpus import check_output_path, remove_path
    from .embed import EMBEDDING_KEY, embed
    from .run import load_run

    out = Path(out)
    check_output_path(out, overwrite)
    say = progress or (lambda message: None)
    loaded = load_run(run)  # once, for every row
    adata = _load_counts(data)
    where = "the AnnData" if hasattr(data, "obs") else str(data)
    is_test = _split(adata.obs, settings, where)
    adata.obs[SPLIT_KEY] = np.where(is_test, "test", "train")
    has_label = adata.obs[settings.label_key].notna().to_numpy()
    labels = adata.obs[settings.label_key].astype(str).to_numpy(object)
    train, test = np.flatnonzero(has_label & ~is_test), np.flatnonzero(is_test)
    train_labels = labels[train]
    values, counts = np.unique(train_labels, return_counts=True)
    majority = str(values[np.argmax(counts)])

    tmp = out.with_name(f".{out.name}.partial")
    remove_path(tmp)
    tmp.mkdir(parents=True)
    results: dict = {
        "data": where,
        "run": str(run),
        "settings": {**asdict(settings), "finetune": asdict(settings.finetune)},
        "n_train_cells": int(len(train)),
        "n_test_cells": int(len(test)),
        "rows": {},
    }
    try:
        for row in settings.rows:
            say(f"{row}: {ROW_TITLES[row]}")
            started = time.perf_counter()
            if row in ("pretrained", "scratch"):
                start_from = loaded if row == "pretrained" else untrained_copy(
                    loaded.path, tmp / "untrained_run", seed=settings.finetune.seed
                )
                metrics = finetune_celltype(
                    adata, start_from, label_key=settings.label_key, out=tmp / row, test_key=SPLIT_KEY,
                    test_value="test", options=settings.finetune,
                )
                metrics = {k: metrics[k] for k in ("macro_f1", "accuracy", "majority_class_rate", "n_cells")}
            else:
                if row == "hvg-lr":
                    predicted = hvg_logistic_regression(
                        adata.X, labels, train, test, n_hvg=settings.n_hvg, n_pcs=settings.n_pcs,
                        target_sum=settings.target_sum, seed=settings.finetune.seed,
                    )
                else:
                    # adata is this function's own copy: embed may add its keys to it
                    embedded = embed(adata, _truncated_run(loaded, settings.finetune.max_length))
                    predicted = knn_predict(embedded.obsm[EMBEDDING_KEY], labels, train, test, settings.knn_k)
                full = classification_metrics(labels[test], predicted, majority)
                metrics = {k: full[k] for k in ("macro_f1", "accuracy", "majority_class_rate", "n_cells")}
            metrics["seconds"] = round(time.perf_counter() - started, 1)
            results["rows"][row] = metrics
            say(f"{row}: macro-F1 {metrics['macro_f1']:.3f}, accuracy {metrics['accuracy']:.3f}")
        shutil.rmtree(tmp / "untrained_run", ignore_errors=True)
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (tmp / "results.md").write_text(results_table(results) + "\n")
    except BaseException:
        remove_path(tmp)
        raise
    remove_path(out)
    tmp.rename(out)
    return results


def results_table(results: dict, rows: Sequence[str] | None = None) -> str:
    """The results as a Markdown table (one line per row, in benchmark order)."""
    lines = ["| method | macro-F1 | accuracy | seconds |", "|---|---|---|---|"]
    for row in rows or results["rows"]:
        metrics = results["rows"][row]
        scores = f"{metrics['macro_f1']:.3f} | {metrics['accuracy']:.3f}"
        lines.append(f"| {ROW_TITLES[row]} | {scores} | {metrics['seconds']} |")
    first = next(iter(results["rows"].values()))
    lines.append(f"\nMajority-class rate on the {results['n_test_cells']:,} test cells: "
                 f"{first['majority_class_rate']:.3f}.")
    return "\n".join(lines)
