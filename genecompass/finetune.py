"""Cell-type fine-tuning (``gc finetune celltype``) and prediction (``gc predict``).

A classification head on the species-token output (``GeneCompassForCellClassification``, encoder initialised
from the pre-trained run). Cells are tokenised with the run's own medians (see ``genecompass.embed``). The
data are split into test cells (a stratified fraction, or every cell whose ``obs[test_key] == test_value``)
and training cells, from which a stratified validation fraction is held out; the checkpoint with the best
validation macro-F1 is kept. A plain PyTorch loop on the CPU (or the GPU when there is one).

Output directory::

    metrics.json            macro-F1, accuracy, majority-class rate, per-class report, split sizes, history
    confusion_matrix.png    test cells: true (rows) x predicted (columns), row-normalised
    predictions.csv         test cells: cell, true label, predicted label
    model/                  save_pretrained (label names in config.id2label) + labels.json + the run's
                            medians.tsv and gc_run.json, so ``gc predict`` / ``gc embed`` load it as a run
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .embed import CellTokens, TokenStream, length_sorted_batches, pad_batch
from .errors import InputError

Progress = Callable[[int, int, dict], None]
PROBA_KEY = "genecompass_proba"
LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class FinetuneOptions:
    epochs: int = 10
    lr: float = 1e-3  # fine for tiny/small models; use ~5e-5 for base
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1  # of all steps, then linear decay to 0
    freeze_layers: int = 0  # freeze the input embedding and the first N encoder layers (0: train everything)
    val_fraction: float = 0.1  # of the training cells, stratified, for choosing the best epoch
    max_length: int | None = None  # tokens per cell incl. the species token; None: the run's training length
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise InputError("--epochs and --batch-size must be at least 1")
        if self.lr <= 0:
            raise InputError(f"--lr must be positive, not {self.lr}")
        if not 0.0 < self.val_fraction < 1.0:
            raise InputError(f"validation fraction must be in (0, 1), not {self.val_fraction}")
        if self.freeze_layers < 0:
            raise InputError(f"--freeze-layers must be >= 0, not {self.freeze_layers}")
        if self.max_length is not None and self.max_length < 2:
            raise InputError(f"max_length must be at least 2, not {self.max_length}")


# ------------------------------------------------------------------------------------------------------
# Splits and metrics (NumPy; no scikit-learn dependency)


def stratified_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask selecting ``fraction`` of each class (rounded; at least one cell of every class with two
    or more cells, never a class's last cell)."""
    chosen = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        n = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        chosen[rng.permutation(members)[:n]] = True
    return chosen


def classification_metrics(truth: np.ndarray, predicted: np.ndarray, majority_label: str) -> dict:
    """Accuracy, macro-F1 (over the labels seen in truth or predictions, as scikit-learn does), the
    majority-class rate (accuracy of always predicting ``majority_label``) and a per-class report."""
    truth, predicted = np.asarray(truth, object), np.asarray(predicted, object)
    labels = sorted(set(truth.tolist()) | set(predicted.tolist()))
    report = {}
    for label in labels:
        tp = int(np.sum((truth == label) & (predicted == label)))
        n_pred, n_true = int(np.sum(predicted == label)), int(np.sum(truth == label))
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_true if n_true else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[str(label)] = {"precision": precision, "recall": recall, "f1": f1, "support": n_true}
    return {
        "macro_f1": float(np.mean([r["f1"] for r in report.values()])) if report else 0.0,
        "accuracy": float(np.mean(truth == predicted)) if len(truth) else 0.0,
        "majority_class": str(majority_label),
        "majority_class_rate": float(np.mean(truth == majority_label)) if len(truth) else 0.0,
        "n_cells": int(len(truth)),
        "per_class": report,
    }


def plot_confusion(truth, predicted, labels: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(list(labels) + sorted(set(map(str, truth)) - set(labels))))
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), np.int64)
    for t, p in zip(truth, predicted):
        counts[index[str(t)], index[str(p)]] += 1
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = 2.5 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if counts[i, j]:
                color = "white" if rates[i, j] > 0.5 else "black"
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------
# Model helpers


def _truncate(tokens: CellTokens, max_length: int) -> CellTokens:
    keep = np.minimum(np.diff(tokens.offsets), max_length - 1)
    if np.array_equal(keep, np.diff(tokens.offsets)):
        return tokens
    take = np.concatenate([np.arange(a, a + k) for a, k in zip(tokens.offsets[:-1], keep)])
    offsets = np.concatenate([[0], np.cumsum(keep)]).astype(np.int64)
    return CellTokens(offsets, tokens.genes[take], tokens.values[take], tokens.species_token)


def predict_proba(model, tokens: CellTokens, *, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (n, num_labels) float32, in input order (length-sorted batches, no gradients)."""
    import torch

    out = np.zeros((tokens.n_cells, model.config.num_labels), np.float32)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for rows in length_sorted_batches(tokens.lengths, batch_size, None):
                input_ids, values, mask = (t.to(device) for t in pad_batch(tokens, rows))
                logits = model(input_ids, values, mask).logits
                out[rows] = torch.softmax(logits.float(), -1).cpu().numpy()
    finally:
        model.train(was_training)
    return out


def _freeze(model, n_layers: int) -> None:
    if n_layers == 0:
        return
    encoder = model.genecompass
    if n_layers > len(encoder.layers):
        raise InputError(f"--freeze-layers {n_layers}: the model has only {len(encoder.layers)} layers")
    for module in [encoder.embeddings, *encoder.layers[:n_layers]]:
        for parameter in module.parameters():
            parameter.requires_grad_(False)


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ------------------------------------------------------------------------------------------------------
# Fine-tuning


def finetune_celltype(
    data,
    run,
    *,
    label_key: str,
    out: str | Path,
    test_key: str | None = None,
    test_value: str | None = None,
    test_fraction: float = 0.2,
    options: FinetuneOptions = FinetuneOptions(),
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Fine-tune a cell-type classifier on ``data`` (AnnData or path with raw counts and ``obs[label_key]``)
    starting from ``run`` (a run directory or ``LoadedRun``). Returns the metrics written to
    ``out/metrics.json``; see the module docstring for the output directory."""
    import torch

    from .corpus import check_output_path, remove_path
    from .model import GeneCompassForCellClassification
    from .run import LoadedRun, load_run, quiet_transformers

    out = Path(out)
    check_output_path(out, overwrite)
    if test_key is not None and test_value is None:
        raise InputError("--test-key needs --test-value (the obs value whose cells are held out)")
    if test_key is None and not 0.0 < test_fraction < 1.0:
        raise InputError(f"--test-fraction must be in (0, 1), not {test_fraction}")
    if not isinstance(run, LoadedRun):
        run = load_run(run)
    started = time.perf_counter()
    with TokenStream(data, run) as stream:
        obs = stream.obs
        for key in [label_key] + ([test_key] if test_key else []):
            if key not in obs.columns:
                raise InputError(
                    f"{stream.path}: no obs column {key!r}; available: {', '.join(obs.columns) or 'none'}"
                )
        tokens = stream.read_all()
    max_length = min(options.max_length or run.max_length, run.model.config.max_position_embeddings)
    tokens = _truncate(tokens, max_length)
    raw_labels = obs[label_key]
    has_label = raw_labels.notna().to_numpy()
    labels = raw_labels.astype(str).to_numpy(object)
    rng = np.random.default_rng(options.seed)
    if test_key is not None:
        is_test = (obs[test_key].astype(str) == str(test_value)).to_numpy()
        if not is_test.any() or is_test.all():
            raise InputError(
                f"--test-key {test_key} --test-value {test_value}: holds out {int(is_test.sum())} of "
                f"{len(is_test)} cells; need some cells on each side"
            )
    else:
        is_test = stratified_split(np.where(has_label, labels, ""), test_fraction, rng) & has_label
    train_pool = np.flatnonzero(~is_test & has_label)
    test = np.flatnonzero(is_test & has_label)
    is_val = stratified_split(labels[train_pool], options.val_fraction, rng)
    train, val = train_pool[~is_val], train_pool[is_val]
    classes = sorted(set(labels[train].tolist()))
    if len(classes) < 2:
        raise InputError(f"obs[{label_key!r}] has {len(classes)} class(es) among training cells; need 2+")
    class_index = {c: i for i, c in enumerate(classes)}
    y = np.array([class_index.get(label, -1) for label in labels], np.int64)
    counts = np.bincount(y[train], minlength=len(classes))
    majority = classes[int(np.argmax(counts))]

    torch.manual_seed(options.seed)
    device = _device()
    with quiet_transformers():
        model = GeneCompassForCellClassification.from_pretrained(
            run.path,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id=class_index,
            cell_embedding="species",
            reference_hash=run.reference_hash,
        )
    model.to(device)
    _freeze(model, options.freeze_layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = -(-len(train) // options.batch_size)
    total_steps = steps_per_epoch * options.epochs
    warmup = max(1, int(options.warmup_fraction * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
        ),
    )
    train_tokens, val_tokens = tokens.subset(train), tokens.subset(val)
    y_train = torch.from_numpy(y[train])
    best = (-1.0, -1, None)
    history = []
    step = 0
    for epoch in range(options.epochs):
        model.train()
        losses = []
        for rows in np.array_split(rng.permutation(len(train)), steps_per_epoch):
            input_ids, values, mask = (t.to(device) for t in pad_batch(train_tokens, rows))
            loss = model(input_ids, values, mask, labels=y_train[rows].to(device)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            step += 1
        val_pred = np.array(classes, object)[predict_proba(model, val_tokens).argmax(1)]
        val_metrics = classification_metrics(labels[val], val_pred, majority)
        row = {
            "epoch": epoch + 1,
            "train_loss": float(np.mean(losses)),
            "val_macro_f1": val_metrics["macro_f1"],
            "val_accuracy": val_metrics["accuracy"],
        }
        history.append(row)
        if val_metrics["macro_f1"] > best[0]:
            best = (val_metrics["macro_f1"], epoch + 1, copy.deepcopy(model.state_dict()))
        if progress is not None:
            progress(epoch + 1, options.epochs, row)
    model.load_state_dict(best[2])

    proba = predict_proba(model, tokens.subset(test))
    predicted = np.array(classes, object)[proba.argmax(1)]
    metrics = classification_metrics(labels[test], predicted, majority)
    metrics.update(
        {
            "label_key": label_key,
            "labels": classes,
            "split": {
                "test": f"obs[{test_key!r}] == {test_value!r}" if test_key else f"stratified {test_fraction}",
                "n_train": int(len(train)),
                "n_val": int(len(val)),
                "n_test": int(len(test)),
                "n_test_unseen_label": int(np.sum(y[test] < 0)),
            },
            "best_epoch": best[1],
            "best_val_macro_f1": best[0],
            "history": history,
            "options": {**asdict(options), "max_length": max_length},
            "run": str(run.path),
            "seconds": time.perf_counter() - started,
        }
    )

    tmp = out.with_name(f".{out.name}.partial")
    remove_path(tmp)
    tmp.mkdir(parents=True)
    model_dir = tmp / "model"
    model.to("cpu")
    model.save_pretrained(model_dir)
    shutil.copyfile(run.path / "medians.tsv", model_dir / "medians.tsv")
    info = {**run.info, "max_length": max_length, "task": "celltype", "label_key": label_key}
    (model_dir / "gc_run.json").write_text(json.dumps(info, indent=2) + "\n")
    (model_dir / LABELS_FILE).write_text(json.dumps({"label_key": label_key, "labels": classes}, indent=2))
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    obs_names = obs.index.to_numpy()[test]
    import pandas as pd

    pd.DataFrame({"cell": obs_names, "true": labels[test], "predicted": predicted}).to_csv(
        tmp / "predictions.csv", index=False
    )
    plot_confusion(
        labels[test],
        predicted,
        classes,
        tmp / "confusion_matrix.png",
        f"{label_key}: macro-F1 {metrics['macro_f1']:.3f}, accuracy {metrics['accuracy']:.3f} "
        f"(majority {metrics['majority_class_rate']:.3f})",
    )
    remove_path(out)
    os.replace(tmp, out)
    return metrics


def predict(
    data,
    model_dir: str | Path,
    *,
    batch_size: int = 64,
    out: str | Path | None = None,
    overwrite: bool = False,
):
    """Predict labels with a fine-tuned model (``gc finetune celltype`` output dir or its ``model/``).

    Returns an AnnData (the input AnnData, modified in place, or for a path a new one with the input's obs)
    with ``obs["predicted_<label_key>"]`` (categorical), ``obs["predicted_<label_key>_proba"]`` (the
    winning probability), ``obsm["genecompass_proba"]`` float32 (n_cells, n_labels; columns in the order of
    ``uns["genecompass_predict"]["labels"]``) and provenance in ``uns["genecompass_predict"]``. With ``out``,
    also written as h5ad (atomically; an existing file needs ``overwrite``).
    """
    import anndata as ad
    import pandas as pd

    from .corpus import check_output_path
    from .embed import write_h5ad_atomic
    from .model import GeneCompassForCellClassification
    from .run import load_run, model_dir_of

    if out is not None:
        out = Path(out)
        check_output_path(out, overwrite)
    directory = model_dir_of(model_dir)
    if not (directory / LABELS_FILE).is_file():
        raise InputError(
            f"{model_dir}: not a fine-tuned classifier (no {LABELS_FILE}); pass the --out of "
            "`gc finetune celltype`"
        )
    label_info = json.loads((directory / LABELS_FILE).read_text())
    run = load_run(directory, model_class=GeneCompassForCellClassification)
    classes = list(label_info["labels"])
    with TokenStream(data, run) as stream:
        tokens = _truncate(stream.read_all(), run.max_length)
        result = (
            ad.AnnData(obs=stream.obs, var=pd.DataFrame(index=pd.Index([], dtype=str)))
            if isinstance(data, (str, Path))
            else data
        )
    proba = predict_proba(run.model.to(_device()), tokens, batch_size=batch_size)
    key = f"predicted_{label_info['label_key']}"
    result.obs[key] = pd.Categorical(np.array(classes, object)[proba.argmax(1)], categories=classes)
    result.obs[f"{key}_proba"] = proba.max(1)
    result.obsm[PROBA_KEY] = proba
    result.uns["genecompass_predict"] = {
        "model": str(directory),
        "label_key": label_info["label_key"],
        "labels": np.array(classes, dtype=str),
        "reference_hash": run.reference_hash,
        "medians_hash": run.medians_hash,
    }
    if out is not None:
        write_h5ad_atomic(result, out)
    return result
