"""Fine-tuning: cell types (``gc finetune celltype``, ``gc predict``) and genes (``gc finetune gene-class``).

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

Gene classification (``finetune_gene_class``, the paper's dosage-sensitivity task) is a token-level head on
a tokenised corpus, cross-validated by gene (k folds; no gene is in a fold's training labels and its test
set); see its docstring for the outputs (metrics.json with ROC AUC per fold, roc.png, scores.tsv). Both tasks
share the head loading (``load_classifier``), the optimisation loop (``Trainer``) and the atomic output
directory (``atomic_directory``).
"""

from __future__ import annotations

import contextlib
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


def load_classifier(
    run, model_class, classes: list[str], options: FinetuneOptions, device, *, seed: int, **config
):
    """A classification head (``model_class``) on the run's pre-trained encoder, ``len(classes)`` outputs,
    seeded (the head's initialisation), on ``device``, with ``options.freeze_layers`` frozen."""
    import torch

    from .run import quiet_transformers

    torch.manual_seed(seed)
    with quiet_transformers():
        model = model_class.from_pretrained(
            run.path,
            num_labels=len(classes),
            id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)},
            reference_hash=run.reference_hash,
            **config,
        )
    model.to(device)
    _freeze(model, options.freeze_layers)
    return model


class Trainer:
    """AdamW on the trainable parameters, linear warm-up then linear decay to 0 over ``total_steps``,
    gradient clipping at 1. ``epoch`` runs one pass of optimizer steps, one per batch of cells."""

    def __init__(self, model, options: FinetuneOptions, *, total_steps: int, device):
        import torch

        self.model, self.device = model, device
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=options.lr, weight_decay=options.weight_decay)
        warmup = max(1, int(options.warmup_fraction * total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: (
                (s + 1) / warmup if s < warmup else max(0.0, (total_steps - s) / max(1, total_steps - warmup))
            ),
        )

    def epoch(self, tokens: CellTokens, batches, labels_for: Callable) -> list[float]:
        """One optimizer step per batch (cell indices into ``tokens``); ``labels_for(rows, input_ids)`` gives
        the batch's label tensor. Returns the losses."""
        import torch

        self.model.train()
        losses = []
        for rows in batches:
            input_ids, values, mask = (t.to(self.device) for t in pad_batch(tokens, rows))
            labels = labels_for(rows, input_ids).to(self.device)
            loss = self.model(input_ids, values, mask, labels=labels).loss
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
            self.optimizer.step()
            self.scheduler.step()
            losses.append(loss.item())
        return losses


@contextlib.contextmanager
def atomic_directory(out: Path):
    """Yield a temporary sibling directory of ``out``; when the block finishes, replace ``out`` with it
    (an existing ``out`` was already allowed by the caller's --overwrite check). On error, nothing changes
    at ``out`` and the temporary directory is removed."""
    from .corpus import remove_path

    tmp = out.with_name(f".{out.name}.partial")
    remove_path(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    remove_path(out)
    os.replace(tmp, out)


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

    from .corpus import check_output_path
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
    max_length = min(options.max_length or run.max_length, run.model.config.max_sequence_length)
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

    device = _device()
    model = load_classifier(
        run,
        GeneCompassForCellClassification,
        classes,
        options,
        device,
        seed=options.seed,
    )
    steps_per_epoch = -(-len(train) // options.batch_size)
    trainer = Trainer(model, options, total_steps=steps_per_epoch * options.epochs, device=device)
    train_tokens, val_tokens = tokens.subset(train), tokens.subset(val)
    y_train = torch.from_numpy(y[train])
    best = (-1.0, -1, None)
    history = []
    for epoch in range(options.epochs):
        losses = trainer.epoch(
            train_tokens,
            np.array_split(rng.permutation(len(train)), steps_per_epoch),
            lambda rows, input_ids: y_train[rows],
        )
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

    with atomic_directory(out) as tmp:
        model_dir = tmp / "model"
        model.to("cpu")
        with quiet_transformers():  # no "Writing model shards" bar
            model.save_pretrained(model_dir)
        shutil.copyfile(run.path / "medians.tsv", model_dir / "medians.tsv")
        info = {**run.info, "max_length": max_length, "task": "celltype", "label_key": label_key}
        (model_dir / "gc_run.json").write_text(json.dumps(info, indent=2) + "\n")
        (model_dir / LABELS_FILE).write_text(
            json.dumps({"label_key": label_key, "labels": classes}, indent=2)
        )
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


# ------------------------------------------------------------------------------------------------------
# Gene classification (``gc finetune gene-class``)

NEGATIVES = ("labels", "rest-expressed")
_TRUE = {"1", "true", "yes", "positive", "pos", "t", "y"}
_FALSE = {"0", "false", "no", "negative", "neg", "f", "n"}
_GENE_HEADERS = {"gene", "genes", "gene_id", "gene_symbol", "symbol", "ensembl", "ensembl_id", "name"}


@dataclass
class GeneLabels:
    """Labelled genes resolved to vocabulary tokens: ``tokens`` int64 (G,) sorted, ``labels`` int64 (G,)
    (1 positive, 0 negative), and a summary of the file (rows, unresolved and conflicting names)."""

    tokens: np.ndarray
    labels: np.ndarray
    summary: dict


def read_gene_labels(path: str | Path, *, negatives: str = "labels", reference=None) -> GeneLabels:
    """Read a gene label file: tab- (or whitespace-) separated, ``#`` comments and blank lines ignored.

    - two columns ``gene<TAB>label`` (an optional header row naming them): label 1/0, true/false, yes/no or
      positive/negative;
    - one column: a list of positive genes; needs ``negatives="rest-expressed"``.

    Genes are symbols, aliases or Ensembl IDs of human or mouse, resolved with the gene reference (mouse genes
    with a one-to-one human ortholog share the human token). With ``negatives="rest-expressed"`` only the
    positives are kept here; the caller adds every other gene expressed in the corpus as a negative. Names
    that resolve to no vocabulary token are counted and skipped; a token labelled both ways is dropped.
    Raises InputError (naming the file) when nothing in it resolves."""
    from .reference import load_reference

    path = Path(path)
    if negatives not in NEGATIVES:
        raise InputError(f"--negatives must be one of {', '.join(NEGATIVES)}, not {negatives!r}")
    if not path.is_file():
        raise InputError(f"{path}: no such labels file")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split("\t" if "\t" in line else None)
        fields = [f.strip() for f in fields if f.strip()]
        if fields:
            rows.append((number, fields))
    if rows and rows[0][1][0].lower() in _GENE_HEADERS:
        rows = rows[1:]  # a header row
    if not rows:
        raise InputError(f"{path}: no genes in the labels file")
    widths = {len(fields) >= 2 for _, fields in rows}
    if widths == {False}:
        if negatives != "rest-expressed":
            raise InputError(
                f"{path}: one column (a list of positive genes) but no label column; pass --negatives "
                "rest-expressed (every other gene expressed in the corpus is a negative), or add a label "
                "column"
            )
        named = [(fields[0], 1) for _, fields in rows]
    else:
        named = []
        for number, fields in rows:
            if len(fields) < 2:
                raise InputError(f"{path}:{number}: a gene without a label ({fields[0]!r})")
            value = fields[1].lower()
            if value not in _TRUE | _FALSE:
                raise InputError(
                    f"{path}:{number}: label {fields[1]!r} is not binary; use 1/0, true/false, yes/no or "
                    "positive/negative"
                )
            named.append((fields[0], int(value in _TRUE)))
        if negatives == "rest-expressed":
            named = [(gene, label) for gene, label in named if label == 1]

    reference = reference or load_reference()
    by_token: dict[int, set[int]] = {}
    unresolved = []
    for name, label in named:
        records = [r for r in reference.lookup(name) if r.token_id is not None]
        if not records:
            unresolved.append(name)
            continue
        by_token.setdefault(int(records[0].token_id), set()).add(label)
    conflicting = sorted(t for t, labels in by_token.items() if len(labels) > 1)
    kept = sorted(t for t, labels in by_token.items() if len(labels) == 1)
    if not kept:
        example = ", ".join(repr(name) for name, _ in named[:5])
        raise InputError(
            f"{path}: none of its {len(named)} genes is in the gene vocabulary (first: {example}); the first "
            "column must hold gene symbols or Ensembl IDs (human or mouse); check with `gc reference lookup`"
        )
    tokens = np.array(kept, np.int64)
    labels = np.array([next(iter(by_token[t])) for t in kept], np.int64)
    summary = {
        "file": str(path),
        "negatives": negatives,
        "n_rows": len(named),
        "n_tokens": int(len(tokens)),
        "n_unresolved": len(unresolved),
        "unresolved_examples": unresolved[:10],
        "n_conflicting": len(conflicting),
    }
    return GeneLabels(tokens, labels, summary)


def gene_folds(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold (0..k-1) of each gene: stratified by label (each class dealt round-robin over the folds in a
    random order), so every gene is in exactly one test fold and each fold holds both classes."""
    folds = np.empty(len(labels), np.int64)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = np.arange(len(members)) % k
    return folds


def roc_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney U statistic, ties counted half); NaN with one class."""
    from scipy.stats import rankdata

    truth = np.asarray(truth).astype(bool)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) at every distinct score threshold, from (0, 0)."""
    truth = np.asarray(truth).astype(bool)
    order = np.argsort(-np.asarray(scores), kind="stable")
    sorted_scores, sorted_truth = np.asarray(scores)[order], truth[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(order) - 1]
    tp, fp = np.cumsum(sorted_truth)[last_of_tie], np.cumsum(~sorted_truth)[last_of_tie]
    return np.r_[0.0, fp / max(1, (~truth).sum())], np.r_[0.0, tp / max(1, truth.sum())]


def _cells_with(tokens: CellTokens, genes: np.ndarray) -> np.ndarray:
    """Indices of the cells holding at least one of ``genes``."""
    cell_of_token = np.repeat(np.arange(tokens.n_cells), np.diff(tokens.offsets))
    hits = np.isin(tokens.genes, genes)
    return np.flatnonzero(np.bincount(cell_of_token[hits], minlength=tokens.n_cells) > 0)


def read_corpus_tokens(corpus, species_token_ids: dict, max_length: int) -> CellTokens:
    """Every cell of a corpus, truncated to ``max_length - 1`` genes (the species token is the other one)."""
    from .data import species_token_map

    species = species_token_map(corpus, species_token_ids)[corpus.species]
    parts = []
    for start, stop in corpus.iter_blocks():
        offsets, genes, values = corpus.read_cells(start, stop)
        block = CellTokens(
            np.asarray(offsets, np.int64),
            np.asarray(genes, np.uint32),
            np.asarray(values, np.float32),
            species[start:stop],
        )
        parts.append(_truncate(block, max_length))
    return CellTokens.concatenate(parts)


def check_corpus_reference(run, corpus) -> None:
    from .errors import ReferenceMismatchError

    if corpus.reference_hash != run.reference_hash:
        raise ReferenceMismatchError(
            f"{corpus.path}: tokenised with gene reference {corpus.reference_hash}, but the model {run.path} "
            f"was trained on {run.reference_hash}; token ids would not mean the same genes. Re-tokenise the "
            "counts with the gc the model was trained with"
        )


def gene_scores(model, tokens: CellTokens, genes: np.ndarray, *, batch_size: int = 64):
    """Mean positive-class probability of each of ``genes`` over every position where it occurs in
    ``tokens`` (matched by gene id, never by position), and the number of occurrences. Eval, no gradients."""
    import torch

    device = next(model.parameters()).device
    lookup = torch.full((int(max(genes.max(), tokens.genes.max())) + 1,), -1, dtype=torch.long)
    lookup[torch.from_numpy(genes)] = torch.arange(len(genes))
    sums = torch.zeros(len(genes), dtype=torch.float64)
    counts = torch.zeros(len(genes), dtype=torch.long)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for rows in length_sorted_batches(tokens.lengths, batch_size, None):
                input_ids, values, mask = pad_batch(tokens, rows)
                logits = model(input_ids.to(device), values.to(device), mask.to(device)).logits  # (B, T, 2)
                positive = torch.softmax(logits.float(), -1)[..., 1].cpu()
                slots = lookup[input_ids[:, 1:]]  # (B, T-1): -1 where not a scored gene (or padding)
                chosen = (slots >= 0) & mask[:, 1:]
                sums.index_add_(0, slots[chosen], positive[:, 1:][chosen].double())
                counts.index_add_(0, slots[chosen], torch.ones_like(slots[chosen]))
    finally:
        model.train(was_training)
    return (sums / counts.clamp(min=1)).numpy(), counts.numpy()


def finetune_gene_class(
    corpus,
    run,
    *,
    labels: str | Path,
    out: str | Path,
    negatives: str = "labels",
    folds: int = 5,
    max_cells: int | None = None,
    options: FinetuneOptions = FinetuneOptions(epochs=2),
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Gene classification by k-fold cross-validation split by gene (the paper's dosage-sensitivity task).

    A token-level head (``GeneCompassForGeneClassification``) on the run's pre-trained encoder is trained on
    the corpus cells holding labelled genes: every position of a training-fold gene carries its label, every
    other position (test-fold genes, unlabelled genes, the species token, padding) none. For each of the
    ``folds`` folds a fresh head is trained from the pre-trained weights; its test genes (never in that fold's
    training labels) are scored by the mean positive-class probability over all their positions in the cells,
    and the fold's ROC AUC is computed over genes. ``negatives="rest-expressed"``: the file's genes are the
    positives and every other gene found in the cells is a negative.

    Writes ``out/`` atomically: ``metrics.json`` (AUC per fold, mean and sd, fold sizes, training losses,
    label-file summary, options, and a no-model baseline: the AUC of each gene's number of expressing cells),
    ``roc.png`` (one curve per fold) and ``scores.tsv`` (per gene: token_id, gene_id, symbol, label, fold,
    out-of-fold score, n_cells expressing it). Returns the metrics."""
    import pandas as pd
    import torch

    from .corpus import Corpus, check_output_path
    from .model import IGNORE_INDEX, GeneCompassForGeneClassification
    from .run import LoadedRun, load_run

    out = Path(out)
    check_output_path(out, overwrite)
    if folds < 2:
        raise InputError(f"--folds must be at least 2, not {folds}")
    if max_cells is not None and max_cells < 1:
        raise InputError(f"--max-cells must be at least 1, not {max_cells}")
    if not isinstance(run, LoadedRun):
        run = load_run(run)
    started = time.perf_counter()
    reference = run.reference
    gene_labels = read_gene_labels(labels, negatives=negatives, reference=reference)
    corpus = corpus if isinstance(corpus, Corpus) else Corpus(corpus)
    check_corpus_reference(run, corpus)
    max_length = min(options.max_length or run.max_length, run.model.config.max_sequence_length)
    tokens = read_corpus_tokens(corpus, run.model.config.species_token_ids, max_length)
    labelled = gene_labels.tokens
    if negatives == "rest-expressed":
        labelled = labelled[gene_labels.labels == 1]
    rng = np.random.default_rng(options.seed)
    cells = _cells_with(tokens, labelled)
    if max_cells is not None and len(cells) > max_cells:
        cells = np.sort(rng.choice(cells, max_cells, replace=False))
    tokens = tokens.subset(cells)
    expressed = np.unique(tokens.genes).astype(np.int64)
    if negatives == "rest-expressed":
        gene_tokens = expressed
        gene_y = np.isin(expressed, labelled).astype(np.int64)
    else:
        present = np.isin(gene_labels.tokens, expressed)
        gene_tokens, gene_y = gene_labels.tokens[present], gene_labels.labels[present]
    if len(gene_tokens) == 0:
        raise InputError(
            f"{labels}: none of its {len(gene_labels.tokens)} vocabulary genes occurs in {corpus.path}"
        )
    n_pos, n_neg = int(gene_y.sum()), int((gene_y == 0).sum())
    if min(n_pos, n_neg) < folds:
        raise InputError(
            f"{labels}: {n_pos} positive and {n_neg} negative genes occur in {corpus.path}; {folds}-fold "
            "cross-validation needs at least one of each class per fold"
        )
    fold_of = gene_folds(gene_y, folds, rng)
    vocab_size = run.model.config.vocab_size

    device = _device()
    fold_rows, scores, occurrences = (
        [],
        np.full(len(gene_tokens), np.nan),
        np.zeros(len(gene_tokens), np.int64),
    )
    for fold in range(folds):
        train_genes, test_genes = gene_tokens[fold_of != fold], gene_tokens[fold_of == fold]
        lookup = torch.full((vocab_size,), IGNORE_INDEX, dtype=torch.long)
        lookup[torch.from_numpy(train_genes)] = torch.from_numpy(gene_y[fold_of != fold])
        assert not (lookup[torch.from_numpy(test_genes)] != IGNORE_INDEX).any()  # disjoint by gene
        lookup = lookup.to(device)
        train_cells = _cells_with(tokens, train_genes)
        model = load_classifier(
            run,
            GeneCompassForGeneClassification,
            ["negative", "positive"],
            options,
            device,
            seed=options.seed + fold,
        )
        steps = -(-len(train_cells) // options.batch_size)
        trainer = Trainer(model, options, total_steps=steps * options.epochs, device=device)
        train_tokens = tokens.subset(train_cells)
        fold_rng = np.random.default_rng([options.seed, fold])
        losses = []
        for _ in range(options.epochs):
            epoch_losses = trainer.epoch(
                train_tokens,
                np.array_split(fold_rng.permutation(len(train_cells)), steps),
                lambda rows, input_ids: lookup[input_ids],  # noqa: B023 (used within this iteration)
            )
            losses.append(float(np.mean(epoch_losses)))
        test_cells = _cells_with(tokens, test_genes)
        in_fold = np.flatnonzero(fold_of == fold)
        scores[in_fold], occurrences[in_fold] = gene_scores(
            model, tokens.subset(test_cells), test_genes, batch_size=max(options.batch_size, 64)
        )
        row = {
            "fold": fold,
            "auc": roc_auc(gene_y[in_fold], scores[in_fold]),
            "baseline_n_cells_auc": roc_auc(gene_y[in_fold], occurrences[in_fold]),
            "n_test_genes": int(len(in_fold)),
            "n_test_positive": int(gene_y[in_fold].sum()),
            "n_train_genes": int(len(train_genes)),
            "n_train_positive": int(gene_y[fold_of != fold].sum()),
            "n_train_cells": int(len(train_cells)),
            "n_test_cells": int(len(test_cells)),
            "train_loss": losses,
        }
        fold_rows.append(row)
        if progress is not None:
            progress(fold + 1, folds, row)
        del model, trainer

    aucs = np.array([row["auc"] for row in fold_rows])
    metrics = {
        "task": "gene-class",
        "auc": {
            "per_fold": aucs.tolist(),
            "mean": float(np.mean(aucs)),
            "sd": float(np.std(aucs, ddof=1)),
            "pooled_out_of_fold": roc_auc(gene_y, scores),
        },
        # No model: a gene's score is the number of cells expressing it (below 0.5: positives are rarer).
        "baseline_n_cells_auc": {
            "per_fold": [row["baseline_n_cells_auc"] for row in fold_rows],
            "mean": float(np.mean([row["baseline_n_cells_auc"] for row in fold_rows])),
        },
        "folds": fold_rows,
        "n_genes": int(len(gene_tokens)),
        "n_positive": n_pos,
        "n_negative": n_neg,
        "n_cells": int(tokens.n_cells),
        "n_cells_in_corpus": int(corpus.n_cells),
        "labels_file": gene_labels.summary,
        "options": {**asdict(options), "max_length": max_length, "folds": folds, "max_cells": max_cells},
        "run": str(run.path),
        "corpus": str(corpus.path),
        "medians_match_run": corpus.attrs.get("medians_hash") == run.medians_hash,
        "seconds": time.perf_counter() - started,
    }
    table = pd.DataFrame(
        {
            "token_id": gene_tokens,
            "gene_id": [reference.gene_id_of_token(int(t), None) or "" for t in gene_tokens],
            "symbol": [reference.symbol_of_token(int(t)) or "" for t in gene_tokens],
            "label": gene_y,
            "fold": fold_of,
            "score": scores,
            "n_cells": occurrences,
        }
    )
    with atomic_directory(out) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        table.to_csv(tmp / "scores.tsv", sep="\t", index=False, float_format="%.6g")
        plot_roc(
            gene_y, scores, fold_of, tmp / "roc.png", title=f"{Path(labels).name}: {n_pos} vs {n_neg} genes"
        )
    return metrics


def plot_roc(truth: np.ndarray, scores: np.ndarray, folds: np.ndarray, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    aucs = []
    for fold in np.unique(folds):
        chosen = folds == fold
        fpr, tpr = roc_curve(truth[chosen], scores[chosen])
        aucs.append(roc_auc(truth[chosen], scores[chosen]))
        ax.plot(fpr, tpr, lw=1, label=f"fold {fold + 1}: AUC {aucs[-1]:.3f}")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(f"{title}\nmean AUC {np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
