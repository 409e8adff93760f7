"""`gc bench annotate`: fine-tuned GeneCompass beside a no-pre-training control and two baselines."""

from __future__ import annotations

from pathlib import Path

import typer

from .console import JsonOption, OverwriteOption, console, err_console, existing_paths, print_json
from .finetune import CellBatchSizeOption, CellEpochsOption, LrOption, MaxLengthOption

bench_app = typer.Typer(help="Benchmarks against baselines, on the same cells.", no_args_is_help=True)


@bench_app.command("annotate")
def annotate(
    data: Path = typer.Argument(..., help="Raw counts with a cell-type column in obs (.h5ad)."),
    model: Path = typer.Option(..., "--model", help="A run directory from `gc pretrain` (or its model/)."),
    out: Path = typer.Option(..., "--out", help="Output directory: results.json, results.md, fine-tunes."),
    label_key: str = typer.Option("cell_type", "--label-key", help="The obs column holding the cell types."),
    test_key: str | None = typer.Option(None, "--test-key", help="Hold out cells by this obs column ..."),
    test_value: str | None = typer.Option(None, "--test-value", help="... whose value is this."),
    test_fraction: float = typer.Option(
        0.2, "--test-fraction", help="Without --test-key: this stratified fraction is the test set."
    ),
    rows: str = typer.Option(
        "pretrained,scratch,hvg-lr,knn", "--rows", help="Which methods to run (comma-separated)."
    ),
    epochs: int = CellEpochsOption,
    lr: float = LrOption,
    batch_size: int = CellBatchSizeOption,
    max_length: int | None = MaxLengthOption,
    n_hvg: int = typer.Option(2000, "--n-hvg", min=2, help="Highly variable genes for the baseline."),
    n_pcs: int = typer.Option(50, "--n-pcs", min=1, help="Principal components for the baseline."),
    knn_k: int = typer.Option(15, "--knn-k", min=1, help="Neighbours for k-NN on zero-shot embeddings."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for splits, initialisation and shuffling."),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    """Cell-type annotation: macro-F1 and accuracy of the fine-tuned pre-trained model, the same architecture
    without pre-training, HVG + PCA + logistic regression, and k-NN on zero-shot embeddings — all on the same
    held-out cells.

    Example: gc bench annotate kang2018.h5ad --model runs/bench --test-key condition --test-value stimulated
    --out bench_annotate   (train on control cells, test on stimulated cells)
    """
    from genecompass.benchmark import AnnotateSettings, annotate_benchmark, results_table
    from genecompass.finetune import FinetuneOptions

    existing_paths([data, model])
    settings = AnnotateSettings(
        label_key=label_key,
        test_key=test_key,
        test_value=test_value,
        test_fraction=test_fraction,
        rows=tuple(r.strip() for r in rows.split(",") if r.strip()),
        n_hvg=n_hvg,
        n_pcs=n_pcs,
        knn_k=knn_k,
        finetune=FinetuneOptions(
            epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed
        ),
    )
    results = annotate_benchmark(
        data, model, out=out, settings=settings, overwrite=overwrite,
        progress=lambda message: err_console.print(f"[dim]{message}[/]", highlight=False),
    )
    if as_json:
        print_json(results)
        return
    console.print(results_table(results), highlight=False)
    console.print(f"wrote {out}/results.json and results.md")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
