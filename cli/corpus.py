"""`gc corpus`: inspect, validate, merge corpora; compute medians."""

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

corpus_app = typer.Typer(
    help="Inspect, validate and merge tokenised corpora; compute gene medians.", no_args_is_help=True
)


def _print_info(info: dict) -> None:
    table = Table(title=info["path"], show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)


@corpus_app.command("info")
def info(corpus: Path = typer.Argument(..., help="A corpus (.zarr)."), as_json: bool = JsonOption) -> None:
    """Summarise a corpus: cells, tokens, species, reference and medians hashes, inputs.

    Example: gc corpus info pbmc3k.zarr
    """
    from genecompass.corpus import Corpus

    existing_paths([corpus])
    summary = Corpus(corpus).info()
    print_json(summary) if as_json else _print_info(summary)


@corpus_app.command("validate")
def validate(
    corpus: Path = typer.Argument(..., help="A corpus (.zarr)."), as_json: bool = JsonOption
) -> None:
    """Check every invariant of the corpus format (truncated or inconsistent stores fail with the reason).

    Example: gc corpus validate pbmc3k.zarr
    """
    from genecompass.corpus import validate_corpus
    from genecompass.reference import load_reference

    existing_paths([corpus])
    with progress_bar("validate", unit="tokens") as progress:
        summary = validate_corpus(corpus, vocab_size=load_reference().vocab_size, progress=progress)
    if as_json:
        print_json(summary)
    else:
        console.print(f"[green]valid[/]: {summary['n_cells']:,} cells, {summary['n_tokens']:,} tokens")


@corpus_app.command("merge")
def merge(
    parts: list[Path] = typer.Argument(
        ..., metavar="CORPORA...", help="Corpora to concatenate, in order (e.g. shard outputs)."
    ),
    out: Path = typer.Option(..., "--out", help="The merged corpus."),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    """Concatenate corpora made with the same reference, medians, normalisation and top-k.

    Example: gc corpus merge shards/part-0.zarr shards/part-1.zarr --out corpus.zarr
    """
    from genecompass.corpus import Corpus, merge_corpora

    existing_paths(parts)
    with progress_bar("merge") as progress:
        merge_corpora(parts, out, overwrite=overwrite, progress=progress)
    summary = Corpus(out).info()
    if as_json:
        print_json({**summary, "parts": [str(p) for p in parts]})
        return
    console.print(
        f"wrote {out}: {summary['n_cells']:,} cells, {summary['n_tokens']:,} tokens from {len(parts)} parts"
    )


@corpus_app.command("medians")
def medians(
    inputs: list[Path] = typer.Argument(..., help="Count files the medians are computed over."),
    out: Path = typer.Option(..., "--out", help="Medians file (TSV) for `gc tokenize --medians`."),
    no_library_size: bool = typer.Option(False, "--no-library-size", help="As in `gc tokenize`."),
    qc: bool = typer.Option(False, "--qc", help="Only cells passing the default `gc qc` filters."),
    qc_from: Path | None = typer.Option(None, "--qc-from", help="Only cells passing a `gc qc` output."),
    species: str | None = SpeciesOption,
    allow_non_integer: bool = typer.Option(False, "--allow-non-integer", help="Accept non-integer counts."),
    transpose: bool | None = TransposeOption,
    model: Path | None = typer.Option(
        None, "--model", metavar="RUN", help="For this run's vocabulary and normalisation (e.g. an imported "
        "checkpoint without medians; pass the result to `gc model import genecompass --medians`)."
    ),
    overwrite: bool = OverwriteOption,
) -> None:
    """Compute per-gene non-zero medians of normalised expression in one streaming pass, to share across
    `gc tokenize --shard` processes.

    Example: gc corpus medians raw/*.h5ad --out medians.tsv
    """
    from genecompass.corpus import check_output_path
    from genecompass.qc import QcParams
    from genecompass.reference import load_reference
    from genecompass.tokenize import TokenizeOptions, compute_medians

    existing_paths(inputs)
    check_output_path(out, overwrite)
    reference, library_size, target_sum = load_reference(), not no_library_size, 1e4
    if model is not None:
        from genecompass.run import run_tokenisation

        existing_paths([model])
        settings = run_tokenisation(model)
        reference, library_size, target_sum = settings.reference, settings.library_size, settings.target_sum
    options = TokenizeOptions(
        library_size=library_size,
        target_sum=target_sum,
        species=species,
        allow_non_integer=allow_non_integer,
        layer=input_layer(None, transpose),
    )
    with progress_bar("medians") as progress:
        result = compute_medians(
            inputs,
            options=options,
            progress=progress,
            qc=qc_from if qc_from is not None else (QcParams() if qc else None),
            reference=reference,
        )
    result.save(out, reference)
    console.print(f"wrote {out}: {int((result.n_nonzero > 0).sum()):,} genes, {result.hash}")


def register(app: typer.Typer) -> None:
    app.add_typer(corpus_app, name="corpus")
