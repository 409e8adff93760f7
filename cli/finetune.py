"""`gc finetune celltype` (cell-type classifier on the species-token output), `gc finetune gene-class`
(token-level gene classifier, cross-validated by gene) and `gc predict`."""

from __future__ import annotations

from pathlib import Path

import typer

from . import checks
from .console import (
    JsonOption,
    OverwriteOption,
    console,
    err_console,
    existing_paths,
    positional,
    print_json,
)

finetune_app = typer.Typer(
    help="Fine-tune a pre-trained GeneCompass run on a labelled task.", no_args_is_help=True
)

# Fine-tuning options shared with `gc bench annotate` (which fine-tunes the same way).
LrOption = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW, warm-up then linear decay).")
CellEpochsOption = typer.Option(10, "--epochs", min=1, help="Passes over the training cells.")
CellBatchSizeOption = typer.Option(32, "--batch-size", min=1, help="Cells per optimizer step.")
MaxLengthOption = typer.Option(
    None, "--max-length", min=2, help="Tokens per cell incl. the species token (default: the run's)."
)


@finetune_app.command("celltype")
def celltype(
    train: Path | None = typer.Argument(
        None,
        metavar="DATA",
        help="Raw counts with a label column in obs (.h5ad, 10x, .zarr, .loom). Required.",
    ),
    train_option: Path | None = typer.Option(None, "--train", hidden=True, help="Old spelling of DATA."),
    model: Path = typer.Option(..., "--model", help="A run directory from `gc pretrain` (or its model/)."),
    label_key: str = typer.Option(..., "--label-key", help="The obs column holding the cell types."),
    out: Path = typer.Option(..., "--out", help="Output directory: metrics.json, confusion matrix, model/."),
    test_key: str | None = typer.Option(None, "--test-key", help="Hold out cells by this obs column ..."),
    test_value: str | None = typer.Option(
        None, "--test-value", help="... whose value is this (e.g. stimulated)."
    ),
    test_fraction: float = typer.Option(
        0.2, "--test-fraction", min=0.0, max=1.0, help="Otherwise: a stratified fraction of cells held out."
    ),
    freeze_layers: int = typer.Option(
        0, "--freeze-layers", min=0, help="Freeze the input embedding and the first N encoder layers."
    ),
    epochs: int = CellEpochsOption,
    lr: float = LrOption,
    batch_size: int = CellBatchSizeOption,
    max_length: int | None = MaxLengthOption,
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for the splits, shuffling and the head."),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    """Fine-tune a cell-type classifier (head on the species-token output); keep the best epoch by
    validation macro-F1 and report test macro-F1 and accuracy beside the majority-class rate.

    Example: gc finetune celltype data/pbmc3k.h5ad --model runs/tiny --label-key cell_type --out ft/
    """
    from genecompass.errors import InputError
    from genecompass.finetune import FinetuneOptions, finetune_celltype

    # Everything a user can get wrong is checked before the model stack (torch) is imported.
    train = positional(train, train_option, "DATA", "--train")
    if test_key is not None and test_value is None:
        raise InputError("--test-key needs --test-value (the obs value whose cells are held out)")
    if test_key is None:
        checks.fraction(test_fraction, "--test-fraction")
    checks.trained_run(model)
    checks.count_file(train, obs_keys=[label_key, test_key])
    checks.output(out, overwrite)
    options = FinetuneOptions(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        freeze_layers=freeze_layers,
        max_length=max_length,
        seed=seed,
    )

    def report(epoch: int, total: int, row: dict) -> None:
        if not as_json:
            err_console.print(
                f"epoch {epoch}/{total}: loss {row['train_loss']:.4f} · "
                f"val macro-F1 {row['val_macro_f1']:.3f}"
            )

    metrics = finetune_celltype(
        train,
        model,
        label_key=label_key,
        out=out,
        test_key=test_key,
        test_value=test_value,
        test_fraction=test_fraction,
        options=options,
        overwrite=overwrite,
        progress=report,
    )
    if as_json:
        print_json(metrics)
        return
    console.print(
        f"test ({metrics['split']['n_test']} cells): macro-F1 {metrics['macro_f1']:.3f} · accuracy "
        f"{metrics['accuracy']:.3f} · majority-class rate {metrics['majority_class_rate']:.3f} "
        f"(best epoch {metrics['best_epoch']}) → {out}"
    )


@finetune_app.command("gene-class")
def gene_class(
    corpus: Path | None = typer.Argument(
        None, metavar="CORPUS", help="A tokenised corpus (`gc tokenize`) whose cells are used. Required."
    ),
    corpus_option: Path | None = typer.Option(None, "--corpus", hidden=True, help="Old spelling of CORPUS."),
    model: Path = typer.Option(..., "--model", help="A run directory from `gc pretrain` (or its model/)."),
    labels: Path = typer.Option(
        ...,
        "--labels",
        help="Gene labels: TSV 'gene<TAB>label' (label 1/0, true/false, yes/no; optional header), or one "
        "gene per line (positives) with --negatives rest-expressed. Symbols, aliases or Ensembl IDs, human "
        "or mouse.",
    ),
    out: Path = typer.Option(..., "--out", help="Output directory: metrics.json, roc.png, scores.tsv."),
    negatives: str = typer.Option(
        "labels",
        "--negatives",
        help="labels: negatives are the file's label-0 genes; rest-expressed: every other gene expressed in "
        "the cells used is a negative.",
    ),
    folds: int = typer.Option(5, "--folds", min=2, help="Cross-validation folds, split by gene."),
    max_cells: int | None = typer.Option(
        None, "--max-cells", min=1, help="Use at most this many corpus cells (drawn at random, seeded)."
    ),
    freeze_layers: int = typer.Option(
        0, "--freeze-layers", min=0, help="Freeze the input embedding and the first N encoder layers."
    ),
    epochs: int = typer.Option(2, "--epochs", min=1, help="Passes over the training cells, per fold."),
    lr: float = LrOption,
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Cells per optimizer step."),
    max_length: int | None = MaxLengthOption,
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for the folds, cell sampling, shuffling, heads."),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    """Classify genes (e.g. dosage-sensitive vs not, TF vs other) with a token-level head on the pre-trained
    encoder, by k-fold cross-validation split by gene: ROC AUC per fold, out-of-fold score per gene.

    Example: gc finetune gene-class pbmc3k.zarr --model runs/tiny --labels tfs.txt
    --negatives rest-expressed --folds 5 --out tf_vs_rest/

    (tfs.txt: one gene per line, e.g. the Lambert 2018 human TFs from `python scripts/fetch_tf_list.py`.
    A labelled file instead: lines like 'TP53<TAB>1' and 'ACTB<TAB>0', with the default --negatives labels.)
    """
    from genecompass.finetune import FinetuneOptions, finetune_gene_class, read_gene_labels

    # Everything a user can get wrong is checked before the model stack (torch) is imported.
    corpus = positional(corpus, corpus_option, "CORPUS", "--corpus")
    checks.trained_run(model)
    checks.corpus(corpus, same_reference=True, model=model)
    existing_paths([labels])
    read_gene_labels(labels, negatives=negatives)
    checks.output(out, overwrite)
    options = FinetuneOptions(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        freeze_layers=freeze_layers,
        max_length=max_length,
        seed=seed,
    )

    def report(fold: int, total: int, row: dict) -> None:
        if not as_json:
            err_console.print(
                f"fold {fold}/{total}: AUC {row['auc']:.3f} on {row['n_test_genes']} genes "
                f"({row['n_test_positive']} positive) · train loss {row['train_loss'][-1]:.4f}"
            )

    metrics = finetune_gene_class(
        corpus,
        model,
        labels=labels,
        out=out,
        negatives=negatives,
        folds=folds,
        max_cells=max_cells,
        options=options,
        overwrite=overwrite,
        progress=report,
    )
    if as_json:
        print_json(metrics)
        return
    auc = metrics["auc"]
    console.print(
        f"{metrics['n_positive']} positive vs {metrics['n_negative']} negative genes in "
        f"{metrics['n_cells']:,} cells: ROC AUC {auc['mean']:.3f} ± {auc['sd']:.3f} over {folds} folds "
        f"({', '.join(f'{a:.3f}' for a in auc['per_fold'])}); expressing-cell-count baseline "
        f"{metrics['baseline_n_cells_auc']['mean']:.3f} → {out}"
    )


def predict(
    data: Path = typer.Argument(..., help="Raw counts to label (.h5ad, 10x, .zarr, .loom)."),
    model: Path = typer.Option(..., "--model", help="The --out directory of `gc finetune celltype`."),
    out: Path = typer.Option(
        ..., "--out", help="Output .h5ad: obs['predicted_<key>'], obsm['genecompass_proba']."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Cells per batch."),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    """Label cells with a fine-tuned classifier: predicted labels and class probabilities.

    Example: gc predict --model ft/ data/pbmc3k.h5ad --out pbmc3k_pred.h5ad
    """
    from genecompass.finetune import predict as run_predict

    # Everything a user can get wrong is checked before the model stack (torch) is imported.
    checks.classifier(model)
    checks.count_file(data)
    checks.output(out, overwrite)
    result = run_predict(data, model, batch_size=batch_size, out=out, overwrite=overwrite)
    key = f"predicted_{result.uns['genecompass_predict']['label_key']}"
    counts = result.obs[key].value_counts()
    summary = {"out": str(out), "n_cells": int(result.n_obs), "key": key, "counts": counts.to_dict()}
    if as_json:
        print_json(summary)
        return
    console.print(f"{result.n_obs:,} cells labelled → {out} (obs[{key!r}])")
    for label, n in counts.items():
        console.print(f"  {label}: {n}")


def register(app: typer.Typer) -> None:
    app.add_typer(finetune_app, name="finetune")
    app.command("predict")(predict)
