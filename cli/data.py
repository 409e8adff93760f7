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
    top_unmapped: int = typer.Option(
        20, "--top-unmapped", min=0, metavar="N",
        help="List the N genes without a token that hold the most counts (0: only their number and share).",
    ),
    as_json: bool = JsonOption,
) -> None:
    """Report cells, genes, gene-ID type, species, the fraction of genes in the vocabulary, whether counts are
    integers, the obs columns, and the genes that could not be mapped with the share of counts they hold.

    Example: gc inspect data/pbmc3k.h5ad --json

    Example (a table with one row per gene; the orientation is detected when --transpose is left out): gc
    inspect counts.tsv.gz --transpose
    """
    from genecompass.inspect import inspect_counts

    existing_paths([path])
    layer = input_layer(layer, transpose)
    if as_json:
        print_json(inspect_counts(path, species=species, layer=layer, top_unmapped=top_unmapped))
        return
    with progress_bar(f"inspect {path.name}") as progress:
        report = inspect_counts(
            path, species=species, layer=layer, progress=progress, top_unmapped=top_unmapped
        )
    unmapped = report.pop("unmapped_genes")
    table = Table(title=str(path), show_header=False)
    for key, value in report.items():
        table.add_row(key, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
    table.add_row(
        "unmapped_genes",
        f"{unmapped['n_genes']:,} ({unmapped['count_share']:.2%} of the counts): "
        f"{unmapped['n_unknown_name']:,} unknown names/IDs, {unmapped['n_known_not_in_vocab']:,} known genes "
        "outside the vocabulary",
    )
    console.print(table)
    if unmapped["top"]:
        top = Table(title=f"unmapped genes with the most counts (top {len(unmapped['top'])})")
        has_symbol = any(row["symbol"] is not None for row in unmapped["top"])
        for column in ("gene", *(("symbol",) if has_symbol else ()), "counts", "share", "why"):
            top.add_column(column, justify="right" if column in ("counts", "share") else "left")
        for row in unmapped["top"]:
            top.add_row(
                row["gene"], *((row["symbol"] or "",) if has_symbol else ()),
                f"{row['counts']:,.0f}", f"{row['share']:.3%}", row["reason"],
            )
        console.print(top)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
