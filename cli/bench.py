"""`gc bench annotate` (fine-tuned GeneCompass beside a no-pre-training control and two baselines),
`gc bench embed` (zero-shot cell embeddings beside an untrained copy, PCA and scVI) and `model_init`
(`gc model init`: an untrained run; cli/model.py registers it in the `model` group)."""

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


@bench_app.command("embed")
def embed_bench(
    data: Path = typer.Argument(..., help="Raw counts with a cell-type column in obs (.h5ad)."),
    model: Path | None = typer.Option(None, "--model", help="The pre-trained run (`gc pretrain --out`)."),
    out: Path = typer.Option(..., "--out", help="Output directory: results.json, results.md, the plot."),
    untrained: Path | None = typer.Option(
        None, "--untrained", help="Run to use as the untrained row (default: a fresh copy of --model)."
    ),
    label_key: str = typer.Option("cell_type", "--label-key", help="The obs column holding the cell types."),
    batch_key: str | None = typer.Option(
        "condition", "--batch-key", help="Batch column for scib batch correction and scVI ('' for none)."
    ),
    cells_key: str | None = typer.Option(
        None, "--cells-key", help="Evaluate only cells whose obs column ..."
    ),
    cells_value: str | None = typer.Option(None, "--cells-value", help="... has this value."),
    score_key: str | None = typer.Option(
        None, "--score-key", help="Score k-NN only on cells whose column ..."
    ),
    score_value: str | None = typer.Option(None, "--score-value", help="... has this value."),
    max_cells: int | None = typer.Option(
        None, "--max-cells", help="Stratified subsample of this many cells."
    ),
    rows: str = typer.Option(
        "pretrained,untrained,pca,scvi", "--rows", help="Which embeddings (comma-separated)."
    ),
    pool: str | None = typer.Option(None, "--pool", help="species | mean (default: the run's own)."),
    max_length: int | None = typer.Option(None, "--max-length", help="Tokens per cell for the model rows."),
    scvi_epochs: int | None = typer.Option(None, "--scvi-epochs", help="scVI epochs (default: scvi-tools')."),
    no_scib: bool = typer.Option(False, "--no-scib", help="Skip the scib-metrics scores."),
    n_hvg: int = typer.Option(2000, "--n-hvg", min=2, help="Highly variable genes (PCA and scVI rows)."),
    n_pcs: int = typer.Option(50, "--n-pcs", min=1, help="Principal components for the PCA row."),
    knn_k: int = typer.Option(15, "--knn-k", min=1, help="Neighbours for k-NN."),
    folds: int = typer.Option(5, "--folds", min=2, help="Cross-validation folds for k-NN."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed for subsampling, folds, initialisation, scVI."),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    """Zero-shot cell embeddings side by side: the pre-trained run, its untrained copy, PCA of HVGs and
    scVI, on the same cells: k-NN macro-F1 (cross-validated), scib-metrics bio conservation and batch
    correction, mean pairwise cosine, seconds; a plot.

    Example: gc bench embed ~/.cache/gc/kang2018.h5ad --model run --cells-key condition
    --cells-value stimulated --batch-key '' --out bench_embed   (cells the model never saw)
    """
    from genecompass.evaluate import EmbedBenchSettings, embed_benchmark, results_table

    existing_paths([data] + [p for p in (model, untrained) if p is not None])
    settings = EmbedBenchSettings(
        label_key=label_key,
        batch_key=batch_key or None,
        cells_key=cells_key,
        cells_value=cells_value,
        score_key=score_key,
        score_value=score_value,
        max_cells=max_cells,
        rows=tuple(r.strip() for r in rows.split(",") if r.strip()),
        pool=pool,
        max_length=max_length,
        scvi_epochs=scvi_epochs,
        scib=not no_scib,
        n_hvg=n_hvg,
        n_pcs=n_pcs,
        knn_k=knn_k,
        folds=folds,
        seed=seed,
    )
    results = embed_benchmark(
        data, model, out=out, settings=settings, untrained=untrained, overwrite=overwrite,
        progress=lambda message: err_console.print(f"[dim]{message}[/]", highlight=False),
    )
    if as_json:
        print_json(results)
        return
    console.print(results_table(results), highlight=False)
    console.print(f"wrote {out}/results.json, results.md and embed_benchmark.png")


def model_init(
    corpus: Path = typer.Argument(..., help="The corpus the run would be trained on (its medians are kept)."),
    out: Path = typer.Option(..., "--out", help="Run directory to write (RUN/model)."),
    config: str = typer.Option("tiny", "--config", help="Preset (tiny, small, base) or pre-training YAML."),
    knowledge: Path | None = typer.Option(
        None, "--knowledge", help="Knowledge directory (gc knowledge build)."
    ),
    seed: int | None = typer.Option(
        None, "--seed", min=0, help="Initialisation seed (default: the config's)."
    ),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    """An untrained run: the architecture, normaliser and knowledge tables `gc pretrain` would train, with
    the weights that run starts from. Usable wherever a run is (`gc embed`, `gc finetune`, `gc bench`).

    Example: gc model init pretrain.zarr --config tiny --knowledge knowledge/ --out runs/untrained
    """
    from genecompass.evaluate import init_run

    existing_paths([corpus] + ([knowledge] if knowledge is not None else []))
    summary = init_run(corpus, out, config=config, knowledge_dir=knowledge, seed=seed, overwrite=overwrite)
    if as_json:
        print_json(summary)
        return
    console.print(
        f"untrained {summary['preset']} model (seed {summary['seed']}, "
        f"{summary['parameters']['trainable']:,} trainable parameters) → {summary['model_dir']}"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
