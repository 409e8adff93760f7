"""The `gc` command: one Typer app; each command group registers itself from its own module."""

from __future__ import annotations

import os
import sys

import typer

from genecompass import __version__
from genecompass.errors import GcError

from . import bench, corpus, data, embed, finetune, grn, knowledge, perturb, pretrain, qc, reference, tokenize
from .console import err_console

app = typer.Typer(
    name="gc",
    help="gc — the GeneCompass toolkit: raw counts → QC → Zarr corpus → pre-training → embeddings, "
    "perturbation and GRNs.\n\nExample: gc tokenize data/pbmc3k.h5ad --out pbmc3k.zarr",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
    local_rank: int | None = typer.Option(
        None,
        "--local_rank",
        "--local-rank",
        hidden=True,
        help="Set by the deepspeed launcher; gc reads ranks from the environment.",
    ),
) -> None:
    """gc — the GeneCompass toolkit."""


# In the order `gc --help` lists them: the pipeline's stages first.
COMMAND_GROUPS = (
    reference, data, qc, tokenize, corpus, knowledge, pretrain, embed, finetune, perturb, grn, bench,
)
for module in COMMAND_GROUPS:
    module.register(app)


def main() -> None:
    """Entry point: the project's own errors become one line on stderr and exit code 1
    (``GC_DEBUG=1`` shows the traceback)."""
    try:
        app()
    except GcError as exc:
        if os.environ.get("GC_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
