"""`gc inspect`: what is in a count file, and how it maps to the gene reference."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .console import (
    JsonOption,
    SpeciesOption,
    TransposeOption,
    console,
    existing_paths,
    input_layer,
    print_json,
    progress_bar,
)


def inspect(
    path: Path = typer.Argument(
        ...,
        help="h5ad, 10x HDF5 (.h5), 10x MTX directory, AnnData zarr, loom, or a CSV/TSV count table "
        "(optionally gzipped).",
    ),
    species: str | None = SpeciesOption,
    layer: str | None = typer.Option(None, "--layer", help="Read counts from `raw` or layers/NAME."),
    transpose: bool | None = TransposeOption,
    as_json: bool = JsonOption,
) -> None:
    """Report cells, genes, gene-ID type, species, the fraction of genes in the vocabulary, whether counts are
    integers, and the obs columns.

    Example: gc inspect data/pbmc3k.h5ad --json

    Example (a table with one row per gene; the orientation is detected when --transpose is left out): gc
    inspect counts.tsv.gz --transpose
    """
    from genecompass.inspect import inspect_counts

    existing_paths([path])
    layer = input_layer(layer, transpose)
    if as_json:
        print_json(inspect_counts(path, species=species, layer=layer))
        return
    with progress_bar(f"inspect {path.name}") as progress:
        report = inspect_counts(path, species=species, layer=layer, progress=progress)
    table = Table(title=str(path), show_header=False)
    for key, value in report.items():
        table.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
