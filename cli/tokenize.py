"""`gc tokenize`: raw count files → Zarr corpus (the Rust core does the work)."""

from __future__ import annotations

from pathlib import Path

import typer

from .console import (
    JsonOption,
    OverwriteOption,
    SpeciesOption,
    ThreadsOption,
    TransposeOption,
    console,
    existing_paths,
    input_layer,
    print_json,
    progress_bar,
)


def tokenize(
    inputs: list[Path] = typer.Argument(
        ...,
        metavar="FILES...",
        help="Count files (h5ad, 10x .h5, 10x MTX dir, AnnData zarr, loom, CSV/TSV tables).",
    ),
    out: Path = typer.Option(..., "--out", help="The corpus to write (a .zarr directory)."),
    top_k: int = typer.Option(
        2048, "--top-k", help="Genes kept per cell, highest normalised expression first."
    ),
    medians: Path | None = typer.Option(
        None,
        "--medians",
        help="Reuse per-gene medians from "
        "`gc corpus medians` (required with --shard); computed when omitted.",
    ),
    no_library_size: bool = typer.Option(
        False,
        "--no-library-size",
        help="Skip the per-cell scaling to 10,000 counts (the original GeneCompass code's behaviour).",
    ),
    obs_keys: str | None = typer.Option(
        None, "--obs-keys", help="Comma-separated obs columns to carry, e.g. cell_type,condition."
    ),
    qc: bool = typer.Option(False, "--qc", help="Run `gc qc` with its default filters first."),
    qc_from: Path | None = typer.Option(None, "--qc-from", help="Apply the pass flags of a `gc qc` output."),
    shard: str | None = typer.Option(
        None,
        "--shard",
        help="i/n: tokenise the i-th of n slices of the cells "
        "(one process per shard; join with `gc corpus merge`).",
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        metavar="RUN",
        help="Tokenise for this run: its vocabulary (e.g. an imported GeneCompass checkpoint's), medians, "
        "normalisation and top-k.",
    ),
    species: str | None = SpeciesOption,
    layer: str | None = typer.Option(None, "--layer", help="Read counts from `raw` or layers/NAME."),
    transpose: bool | None = TransposeOption,
    allow_non_integer: bool = typer.Option(False, "--allow-non-integer", help="Accept non-integer counts."),
    chunk_size: int = typer.Option(4096, "--chunk-size", help="Cells per chunk; bounds memory."),
    threads: int = ThreadsOption,
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    """Normalise, rank and keep the top-k genes of every cell; write a Zarr corpus (docs/corpus-format.md).
    A re-run after an interruption resumes finished inputs.

    Example: gc tokenize data/pbmc3k.h5ad --out pbmc3k.zarr --obs-keys cell_type --qc

    Example (for an imported checkpoint): gc tokenize raw.h5ad --model runs/genecompass_base --out raw.zarr
    """
    from genecompass.qc import QcParams
    from genecompass.tokenize import TokenizeOptions, parse_shard
    from genecompass.tokenize import tokenize as run_tokenize

    existing_paths(inputs)
    layer = input_layer(layer, transpose)
    if qc and qc_from is not None:
        raise typer.BadParameter("give --qc or --qc-from, not both")
    reference = None
    library_size, target_sum = not no_library_size, 1e4
    if model is not None:
        from genecompass.run import run_tokenisation

        existing_paths([model])
        settings = run_tokenisation(model)
        reference, top_k = settings.reference, settings.top_k
        library_size, target_sum = settings.library_size, settings.target_sum
        medians = medians or settings.medians
    options = TokenizeOptions(
        top_k=top_k,
        library_size=library_size,
        target_sum=target_sum,
        chunk_size=chunk_size,
        threads=threads,
        allow_non_integer=allow_non_integer,
        species=species,
        layer=layer,
        obs_keys=tuple(k.strip() for k in obs_keys.split(",") if k.strip()) if obs_keys else (),
    )
    with progress_bar("tokenize") as progress:
        summary = run_tokenize(
            inputs,
            out,
            options=options,
            medians=medians,
            qc=qc_from if qc_from is not None else (QcParams() if qc else None),
            shard=parse_shard(shard),
            overwrite=overwrite,
            reference=reference,
            progress=progress,
        )
    if as_json:
        print_json(summary)
    else:
        console.print(
            f"wrote {summary['out']}: {summary['n_cells']:,} cells ({summary['n_cells_read']:,} read), "
            f"{summary['n_tokens']:,} tokens in {summary['seconds']:.1f} s "
            f"({summary['cells_per_s']:,.0f} cells/s)"
        )


def register(app: typer.Typer) -> None:
    app.command("tokenize")(tokenize)
