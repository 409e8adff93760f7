"""Zero-shot evaluation of cell embeddings (``gc bench embed``) and untrained runs (``gc model init``).

``embed_benchmark`` scores cell embeddings of the same cells, without any fine-tuning, side by side:

- ``pretrained``: the pre-trained run's cell embeddings (``gc embed``; pooling: the run's default or
  ``pool``);
- ``untrained``: the same architecture, normaliser and knowledge tables with freshly initialised weights
  (``init_run``'s weights for the same seed; or a run given with ``untrained=``);
- ``pca``: library-size normalisation to 10,000, log1p, 2,000 highly variable genes (Seurat dispersion),
  scaling clipped at 10, PCA to 50 components, fitted on these cells;
- ``scvi``: scVI (scvi-tools, its default model: 10 latent dimensions, 1 hidden layer of 128, ZINB), trained
  on these cells' raw counts of the same highly variable genes, with the batch key as its batch covariate;
  ``scvi_epochs`` None is scvi-tools' own default (``min(400, round(20000 / n_cells × 400))``).

Columns: k-NN macro-F1 and accuracy (k = 15, cosine, stratified k-fold cross-validated prediction of every
scored cell's label from the other folds), the scib-metrics bio-conservation and batch-correction aggregates
(``Benchmarker`` defaults, unscaled: the mean of each family's metrics, so a row's score does not depend on
the other rows), scib's total (0.6 bio + 0.4 batch), the mean pairwise cosine similarity of the embeddings
(near 1: the cells sit in a narrow cone) and the seconds spent producing each embedding.

Output: ``results.json``, ``results.md`` and ``embed_benchmark.png``.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

ROWS = ("pretrained", "untrained", "pca", "scvi")
ROW_TITLES = {
    "pretrained": "GeneCompass pre-trained (zero-shot)",
    "untrained": "same architecture, untrained weights",
    "pca": "PCA (50) of log1p HVG (2,000)",
    "scvi": "scVI (scvi-tools defaults)",
}
Progress = Callable[[str], None] | None


@dataclass(frozen=True)
class EmbedBenchSettings:
    label_key: str = "cell_type"
    batch_key: str | None = "condition"  # scib batch-correction metrics and scVI's batch covariate
    cells_key: str | None = None  # evaluate only cells with obs[cells_key] == cells_value ...
    cells_value: str | None = None
    score_key: str | None = None  # ... and score k-NN only on those with obs[score_key] == score_value
    score_value: str | None = None
    max_cells: int | None = None  # seeded stratified subsample of the evaluated cells
    rows: tuple[str, ...] = ROWS
    pool: str | None = None  # None: the run's config.cell_embedding
    max_length: int | None = None  # tokens per cell for the model rows (None: the run's)
    n_hvg: int = 2000
    n_pcs: int = 50
    knn_k: int = 15
    folds: int = 5
    scvi_epochs: int | None = None  # None: scvi-tools' default
    scib: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rows) - set(ROWS))
        if unknown or not self.rows:
            raise InputError(
                f"--rows: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROWS)}"
            )
        for key, value, names in (
            (self.cells_key, self.cells_value, "--cells-key and --cells-value"),
            (self.score_key, self.score_value, "--score-key and --score-value"),
        ):
            if (key is None) != (value is None):
                raise InputError(f"{names} go together")
        if self.n_hvg < 2 or self.n_pcs < 1 or self.knn_k < 1 or self.folds < 2:
            raise InputError("--n-hvg must be >= 2, --n-pcs and --knn-k >= 1, --folds >= 2")
        if self.max_cells is not None and self.max_cells < 10:
            raise InputError(f"--max-cells must be at least 10, not {self.max_cells}")
        if self.scvi_epochs is not None and self.scvi_epochs < 1:
            raise InputError(f"--scvi-epochs must be positive, not {self.scvi_epochs}")


# ------------------------------------------------------------------------------------------------------
# Untrained runs


def init_run(
    corpus: str | Path,
    out: str | Path,
    *,
    config: Any = "tiny",
    knowledge_dir: str | Path | None = None,
    seed: int | None = None,
    overwrite: bool = False,
    reference: Any = None,
) -> dict:
    """Write a run directory (``out/model``: weights, ``config.json``, ``medians.tsv``, ``gc_run.json``) with
    freshly initialised weights, the corpus's medians and the knowledge tables of ``knowledge_dir``: the
    untrained copy of what ``gc pretrain`` with the same corpus, config and knowledge would train. The model
    is built as ``gc pretrain`` builds it (seeded with the config's seed, or ``seed``), so it holds the
    weights that run starts from. Usable by ``gc embed``, ``gc finetune``, ``gc bench``."""
    import torch

    from .corpus import Corpus, check_output_path, remove_path
    from .knowledge import load_knowledge
    from .model import GeneCompassForPretraining, parameter_counts
    from .run import quiet_transformers, write_run_info
    from .train import PretrainConfig

    if not isinstance(config, PretrainConfig):
        config = PretrainConfig.load(config)
    if seed is not None:
        config = config.replace(seed=seed)
    out = Path(out)
    check_output_path(out, overwrite)
    corpus = Corpus.open(corpus)
    if reference is None:
        from .reference import load_reference

        reference = load_reference()
    if corpus.reference_hash != reference.hash:
        from .errors import ReferenceMismatchError

        raise ReferenceMismatchError(
            f"{corpus.path}: corpus built for reference {corpus.reference_hash}, but the gene reference in "
            f"use is {reference.hash}; re-tokenise the data with this gc"
        )
    tables: dict = {}
    if knowledge_dir is not None:
        tables = load_knowledge(knowledge_dir, reference.hash, config.knowledge_tables)
    elif config.knowledge_tables:
        raise InputError(
            f"the config asks for knowledge tables {config.knowledge_tables}; pass --knowledge DIR"
        )
    from .train import corpus_gene_tokens, model_config_for

    head_genes = corpus_gene_tokens(corpus, reference) if config.id_head == "corpus" else None
    model_config = model_config_for(config, reference, tables, knowledge_dir, head_genes=head_genes)
    limit = model_config.max_sequence_length
    max_length = config.max_length or limit
    if max_length > limit:
        raise InputError(f"max_length {max_length} exceeds the model's {limit} positions")
    # As gc pretrain seeds before building the model (train._seed_everything): the same initial weights.
    import random

    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)
    model = GeneCompassForPretraining(model_config)
    if head_genes is not None:
        model.restrict_id_head(head_genes)
    if tables:
        model.attach_knowledge(tables)
    remove_path(out)
    model_dir = out / "model"
    model_dir.mkdir(parents=True)
    with quiet_transformers():
        model.save_pretrained(model_dir)
    written = write_run_info(
        model_dir,
        corpus,
        reference,
        max_length=max_length,
        extra={"initialised_only": True, "seed": config.seed},
    )
    if not written:
        remove_path(out)
        raise InputError(f"{corpus.path}: the corpus stores no gene medians; re-tokenise it with this gc")
    return {
        "out": str(out),
        "model_dir": str(model_dir),
        "preset": config.model,
        "seed": config.seed,
        "max_length": max_length,
        "knowledge_tables": list(tables),
        "parameters": parameter_counts(model),
    }


# ------------------------------------------------------------------------------------------------------
# Embeddings and their scores


def _stratified_subsample(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of about ``n`` cells, each label kept in proportion (at least one cell per label), sorted."""
    rng = np.random.default_rng(seed)
    if n >= len(labels):
        return np.arange(len(labels))
    chosen = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        take = max(1, int(round(n * len(members) / len(labels))))
        chosen.append(rng.choice(members, min(take, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def knn_cv(embeddings: np.ndarray, labels: np.ndarray, *, k: int = 15, folds: int = 5, seed: int = 0) -> dict:
    """Every cell's label predicted by the ``k`` nearest (cosine) cells of the other folds (stratified
    k-fold): macro-F1 and accuracy over all cells. Labels with fewer cells than folds still count."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels).astype(str)
    n_splits = min(folds, len(labels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members"
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        k_eff = max(1, min(k, len(labels) - len(labels) // n_splits - 1))
        predicted = cross_val_predict(
            KNeighborsClassifier(n_neighbors=k_eff, metric="cosine"), embeddings, labels, cv=splitter
        )
    values, counts = np.unique(labels, return_counts=True)
    return {
        "knn_macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "knn_accuracy": float(accuracy_score(labels, predicted)),
        "majority_class_rate": float(counts.max() / counts.sum()),
        "n_scored_cells": int(len(labels)),
    }


def mean_pairwise_cosine(embeddings: np.ndarray, *, max_cells: int = 2000, seed: int = 0) -> float:
    """Mean cosine similarity over distinct pairs of (at most ``max_cells`` sampled) cells: 1 = all one
    direction (a collapsed cone), about 0 = isotropic."""
    x = np.asarray(embeddings, np.float64)
    if len(x) > max_cells:
        x = x[np.random.default_rng(seed).choice(len(x), max_cells, replace=False)]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    n = len(x)
    if n < 2:
        return float("nan")
    total = np.linalg.norm(x.sum(0)) ** 2  # sum over all ordered pairs incl. i == j
    return float((total - n) / (n * (n - 1)))


def pca_of_hvgs(counts, *, n_hvg: int = 2000, n_pcs: int = 50, target_sum: float = 1e4, seed: int = 0):
    """(cells, n_pcs) PCA of scaled log1p HVGs and the chosen gene indices (the ``hvg-lr`` baseline's
    representation, fitted on the given cells)."""
    from sklearn.decomposition import PCA

    from .benchmark import highly_variable_genes, log_normalise

    lognorm = log_normalise(counts, target_sum)
    genes = highly_variable_genes(lognorm, n_hvg)
    x = lognorm[:, genes].toarray()
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    x = np.clip((x - mean) / std, None, 10.0)
    n_components = min(n_pcs, *x.shape)
    pca = PCA(
        n_components=n_components, random_state=seed, svd_solver="full" if x.shape[1] <= 3000 else "auto"
    )
    return pca.fit_transform(x).astype(np.float32), genes


def scvi_embedding(
    counts, obs, genes: np.ndarray, *, batch_key: str | None, max_epochs: int | None, seed: int
):
    """scVI's latent mean (scvi-tools defaults) trained on ``counts[:, genes]``; the batch key (if any)
    as its batch covariate. Raises InputError when scvi-tools is not installed."""
    try:
        import scvi
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise InputError("the scvi row needs scvi-tools: pip install -e '.[eval]'") from exc
    import logging

    import anndata as ad
    import scipy.sparse as sp

    for name in ("scvi", "lightning", "lightning.pytorch", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    adata = ad.AnnData(sp.csr_matrix(counts[:, genes], dtype=np.float32), obs=obs.copy())
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(adata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.train(
            max_epochs=max_epochs,
            accelerator="cpu",
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
    history = getattr(model, "history", None) or {}
    epochs = len(history["elbo_train"]) if "elbo_train" in history else max_epochs
    return np.asarray(model.get_latent_representation(), np.float32), epochs


def scib_scores(
    embeddings: dict[str, np.ndarray],
    labels: np.ndarray,
    batches: np.ndarray | None,
    pre_integrated: np.ndarray,
) -> dict[str, dict]:
    """scib-metrics' ``Benchmarker`` with its default metrics, unscaled. One batch (or none): the
    bio-conservation metrics only. Raises InputError when scib-metrics is not installed."""
    try:
        from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation
    except ImportError as exc:  # pragma: no cover
        raise InputError("scib metrics need scib-metrics: pip install -e '.[eval]'") from exc
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame({"label": np.asarray(labels).astype(str)})
    has_batches = batches is not None and len(np.unique(batches)) > 1
    obs["batch"] = np.asarray(batches).astype(str) if batches is not None else "all"
    adata = ad.AnnData(obs=obs)
    adata.obs_names = [str(i) for i in range(len(obs))]
    adata.obsm["X_pre"] = np.asarray(pre_integrated, np.float32)
    for name, x in embeddings.items():
        adata.obsm[name] = np.asarray(x, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bench = Benchmarker(
            adata,
            batch_key="batch",
            label_key="label",
            embedding_obsm_keys=list(embeddings),
            pre_integrated_embedding_obsm_key="X_pre",
            bio_conservation_metrics=BioConservation(),
            batch_correction_metrics=BatchCorrection() if has_batches else None,
            n_jobs=1,
            progress_bar=False,
        )
        bench.benchmark()
        frame = bench.get_results(min_max_scale=False)
    frame = frame.drop(index="Metric Type", errors="ignore")
    scores: dict[str, dict] = {}
    for name in embeddings:
        row = {str(k): float(v) for k, v in frame.loc[name].items()}
        scores[name] = {
            "bio_conservation": row.get("Bio conservation"),
            "batch_correction": row.get("Batch correction"),
            "scib_total": row.get("Total"),
            "scib_metrics": {
                k: v for k, v in row.items() if k not in ("Bio conservation", "Batch correction", "Total")
            },
        }
    return scores


def _load_cells(data, settings: EmbedBenchSettings, where: str):
    """The evaluated cells as an AnnData with CSR counts (a copy; the input is never changed)."""
    import anndata as ad
    import scipy.sparse as sp

    if isinstance(data, ad.AnnData):
        adata = data
    else:
        path = Path(data)
        if path.suffix != ".h5ad" or not path.is_file():
            raise InputError(f"{path}: the embedding benchmark reads an .h5ad file of raw counts")
        adata = ad.read_h5ad(path)
    keys = [settings.label_key] + [
        k for k in (settings.batch_key, settings.cells_key, settings.score_key) if k
    ]
    for key in keys:
        if key not in adata.obs.columns:
            raise InputError(
                f"{where}: no obs column {key!r}; available: {', '.join(adata.obs.columns) or 'none'}"
            )
    keep = adata.obs[settings.label_key].notna().to_numpy()
    if settings.cells_key is not None:
        keep &= (adata.obs[settings.cells_key].astype(str) == str(settings.cells_value)).to_numpy()
    rows = np.flatnonzero(keep)
    if settings.max_cells is not None and len(rows) > settings.max_cells:
        labels = adata.obs[settings.label_key].astype(str).to_numpy(object)[rows]
        rows = rows[_stratified_subsample(labels, settings.max_cells, settings.seed)]
    if len(rows) < 10:
        raise InputError(f"{where}: only {len(rows)} labelled cells to evaluate; need at least 10")
    X = adata.X[rows]
    counts = sp.csr_matrix(X, dtype=np.float32)
    cells = ad.AnnData(counts, obs=adata.obs.iloc[rows].copy(), var=adata.var.copy())
    return cells


def embed_benchmark(
    data,
    run=None,
    *,
    out: str | Path,
    settings: EmbedBenchSettings = EmbedBenchSettings(),
    untrained=None,
    overwrite: bool = False,
    progress: Progress = None,
) -> dict:
    """Score zero-shot cell embeddings of ``data`` (AnnData or .h5ad of raw counts) side by side; write
    ``out/results.json``, ``out/results.md`` and ``out/embed_benchmark.png``; return the results.

    ``run``: the pre-trained run (needed by the ``pretrained`` and ``untrained`` rows). ``untrained``: a run
    directory to use as the untrained row (default: a fresh ``untrained_copy`` of ``run``, seeded)."""
    from .corpus import check_output_path, remove_path
    from .embed import EMBEDDING_KEY, embed

    out = Path(out)
    check_output_path(out, overwrite)
    say = progress or (lambda message: None)
    model_rows = [r for r in settings.rows if r in ("pretrained", "untrained")]
    if model_rows and run is None and not (model_rows == ["untrained"] and untrained is not None):
        raise InputError(f"rows {', '.join(model_rows)} need --model RUN")
    where = "the AnnData" if hasattr(data, "obs") else str(data)
    cells = _load_cells(data, settings, where)
    labels = cells.obs[settings.label_key].astype(str).to_numpy(object)
    batches = cells.obs[settings.batch_key].astype(str).to_numpy(object) if settings.batch_key else None
    scored = np.ones(cells.n_obs, bool)
    if settings.score_key is not None:
        scored = (cells.obs[settings.score_key].astype(str) == str(settings.score_value)).to_numpy()
        if scored.sum() < settings.folds * 2:
            raise InputError(f"{where}: only {int(scored.sum())} cells match --score-key/--score-value")

    tmp = out.with_name(f".{out.name}.partial")
    remove_path(tmp)
    tmp.mkdir(parents=True)
    results: dict[str, Any] = {
        "data": where,
        "run": str(run) if run is not None else None,
        "settings": asdict(settings),
        "n_cells": int(cells.n_obs),
        "n_scored_cells": int(scored.sum()),
        "labels": {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))},
        "batches": {str(k): int(v) for k, v in zip(*np.unique(batches, return_counts=True))}
        if batches is not None
        else None,
        "rows": {},
    }
    embeddings: dict[str, np.ndarray] = {}
    try:
        pca, hvg = None, None
        for row in sorted(settings.rows, key=lambda r: r != "pca"):  # PCA first: scVI reuses its genes
            say(f"{row}: {ROW_TITLES[row]}")
            started = time.perf_counter()
            info: dict[str, Any] = {}
            if row == "pca":
                pca, hvg = pca_of_hvgs(
                    cells.X, n_hvg=settings.n_hvg, n_pcs=settings.n_pcs, seed=settings.seed
                )
                x = pca
            elif row == "scvi":
                if hvg is None:
                    from .benchmark import highly_variable_genes, log_normalise

                    hvg = highly_variable_genes(log_normalise(cells.X), settings.n_hvg)
                x, epochs = scvi_embedding(
                    cells.X,
                    cells.obs,
                    hvg,
                    batch_key=settings.batch_key,
                    max_epochs=settings.scvi_epochs,
                    seed=settings.seed,
                )
                info["epochs"] = epochs
            else:
                from .benchmark import untrained_copy
                from .run import load_run

                if row == "pretrained":
                    source = run
                elif untrained is not None:
                    source = untrained
                else:
                    source = untrained_copy(run, tmp / "untrained_run", seed=settings.seed)
                loaded = load_run(source)
                if settings.max_length is not None:
                    from dataclasses import replace

                    loaded = replace(loaded, max_length=min(settings.max_length, loaded.max_length))
                pool = settings.pool or loaded.model.config.cell_embedding
                embedded = embed(cells.copy(), loaded, pool=pool)
                x = np.asarray(embedded.obsm[EMBEDDING_KEY], np.float32)
                info.update(pool=pool, max_length=loaded.max_length, source=str(source))
            seconds = time.perf_counter() - started
            embeddings[row] = x
            metrics = knn_cv(
                x[scored], labels[scored], k=settings.knn_k, folds=settings.folds, seed=settings.seed
            )
            metrics["mean_cosine"] = mean_pairwise_cosine(x, seed=settings.seed)
            results["rows"][row] = {**metrics, "dims": int(x.shape[1]), "seconds": round(seconds, 1), **info}
            say(
                f"{row}: k-NN macro-F1 {metrics['knn_macro_f1']:.3f}, "
                f"mean cosine {metrics['mean_cosine']:.3f}"
            )
        if settings.scib:
            say("scib-metrics")
            started = time.perf_counter()
            pre = (
                pca
                if pca is not None
                else pca_of_hvgs(cells.X, n_hvg=settings.n_hvg, n_pcs=settings.n_pcs)[0]
            )
            for row, scores in scib_scores(embeddings, labels, batches, pre).items():
                results["rows"][row].update(scores)
            results["scib_seconds"] = round(time.perf_counter() - started, 1)
        shutil.rmtree(tmp / "untrained_run", ignore_errors=True)
        (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (tmp / "results.md").write_text(results_table(results) + "\n")
        plot_results(results, tmp / "embed_benchmark.png")
    except BaseException:
        remove_path(tmp)
        raise
    remove_path(out)
    tmp.rename(out)
    return results


def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.3f}"


def results_table(results: dict, rows: Sequence[str] | None = None) -> str:
    lines = [
        "| embedding | k-NN macro-F1 | k-NN accuracy | scib bio | scib batch | scib total | mean cosine "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows or results["rows"]:
        m = results["rows"][row]
        title = ROW_TITLES[row] + (f", {m['pool']} pooling" if "pool" in m else "")
        scores = " | ".join(
            _fmt(m.get(k))
            for k in (
                "knn_macro_f1",
                "knn_accuracy",
                "bio_conservation",
                "batch_correction",
                "scib_total",
                "mean_cosine",
            )
        )
        lines.append(f"| {title} | {scores} | {m['seconds']} |")
    first = next(iter(results["rows"].values()))
    lines.append(
        f"\n{results['n_cells']:,} cells; k-NN scored on {results['n_scored_cells']:,} "
        f"(majority-class rate {first['majority_class_rate']:.3f})."
    )
    return "\n".join(lines)


def plot_results(results: dict, path: str | Path) -> None:
    """Grouped bars: k-NN macro-F1, scib bio conservation and batch correction per embedding."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(results["rows"])
    metrics = [
        ("knn_macro_f1", "k-NN macro-F1"),
        ("bio_conservation", "scib bio"),
        ("batch_correction", "scib batch"),
    ]
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(rows)
    for i, row in enumerate(rows):
        values = [results["rows"][row].get(key) or 0.0 for key, _ in metrics]
        axis.bar(np.arange(len(metrics)) + i * width, values, width, label=ROW_TITLES[row])
    axis.set_xticks(np.arange(len(metrics)) + width * (len(rows) - 1) / 2)
    axis.set_xticklabels([title for _, title in metrics])
    axis.set_ylim(0, 1)
    axis.set_title(f"zero-shot cell embeddings, {results['n_cells']:,} cells")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
