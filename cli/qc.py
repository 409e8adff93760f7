"""`gc qc`: the paper's cell filters; records which cells pass, copies nothing."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .console import (
    JsonOption,
    OverwriteOption,
    SpeciesOption,
    TransposeOption,
    console,
    existing_paths,
    input_layer,
    print_json,
    progress_bar,
)


def qc(
    inputs: list[Path] = typer.Argument(
        ...,
        metavar="FILES...",
        help="Count files (h5ad, 10x .h5, 10x MTX dir, AnnData zarr, loom, CSV/TSV tables).",
    ),
    out: Path = typer.Option(..., "--out", help="Output directory: qc.json, per-cell tables, qc.png."),
    mode: str = typer.Option(
        "paper",
        "--mode",
        help="paper (defaults below) or original (±3 z-scores, as the original GeneCompass code).",
    ),
    min_genes: int = typer.Option(200, "--min-genes", help="Minimum expressed genes per cell."),
    min_coding_genes: int = typer.Option(
        7, "--min-coding-genes", help="Minimum expressed protein-coding or miRNA genes per cell."
    ),
    max_mito_fraction: float = typer.Option(
        0.15, "--max-mito-fraction", help="Maximum mitochondrial fraction."
    ),
    gene_count_sd: float = typer.Option(
        3.0, "--gene-count-sd", help="Drop cells whose expressed-gene count is beyond mean ± k SD."
    ),
    min_cells_per_file: int = typer.Option(
        4, "--min-cells-per-file", help="Drop files with fewer passing cells."
    ),
    species: str | None = SpeciesOption,
    layer: str | None = typer.Option(None, "--layer", help="Read counts from `raw` or layers/NAME."),
    transpose: bool | None = TransposeOption,
    allow_non_integer: bool = typer.Option(False, "--allow-non-integer", help="Accept non-integer counts."),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    """Quality-control cells: count how many each filter removes, per file; write a JSON report, per-cell
    tables and a PNG of the distributions with thresholds. Apply with `gc tokenize --qc-from DIR`.

    Example: gc qc data/pbmc3k.h5ad --out qc/
    """
    from genecompass.qc import QcParams, run_qc

    existing_paths(inputs)
    layer = input_layer(layer, transpose)
    params = QcParams(
        mode=mode,
        min_genes=min_genes,
        min_coding_genes=min_coding_genes,
        max_mito_fraction=max_mito_fraction,
        gene_count_sd=gene_count_sd,
        min_cells_per_file=min_cells_per_file,
    )
    with progress_bar("qc") as progress:
        report = run_qc(
            inputs,
            params=params,
            species=species,
            layer=layer,
            allow_non_integer=allow_non_integer,
            progress=progress,
        )
    report.save(out, overwrite=overwrite)
    summary = report.summary()
    if as_json:
        print_json(summary)
        return
    table = Table("file", "filter", "cells removed")
    for entry in summary["files"]:
        for name, removed in entry["removed"].items():
            table.add_row(Path(entry["path"]).name, name, str(removed))
        table.add_row(
            Path(entry["path"]).name, "[bold]passed", f"[bold]{entry['n_passed']} / {entry['n_cells']}"
        )
    console.print(table)
    console.print(f"report: {out / 'qc.json'}  plot: {out / 'qc.png'}")


def register(app: typer.Typer) -> None:
    app.command("qc")(qc)
