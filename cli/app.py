"""The `gc` command: one Typer app; each command group registers itself from its own module."""

from __future__ import annotations

import os
import sys

import typer
from rich.markup import escape

from genecompass import __version__
from genecompass.errors import GcError

from . import (
    bench,
    corpus,
    data,
    embed,
    finetune,
    grn,
    knowledge,
    model,
    perturb,
    pretrain,
    qc,
    reference,
    tokenize,
)
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
    reference, data, qc, tokenize, corpus, knowledge, pretrain, model, embed, finetune, perturb, grn, bench,
)
for module in COMMAND_GROUPS:
    module.register(app)


#: Modules of the ``train`` extra (pyproject.toml): a command that needs one says which extra to install.
TRAIN_EXTRA_MODULES = frozenset(
    {"torch", "transformers", "deepspeed", "safetensors", "sklearn", "umap", "accelerate"}
)
TRAIN_EXTRA_HINT = "pip install 'genecompass-gc[train]'"


def _command_name(argv: list[str]) -> str:
    """``gc GROUP COMMAND`` as the user called it (options and data paths left out)."""
    words, group = ["gc"], typer.main.get_command(app)
    for word in argv:
        commands = getattr(group, "commands", None)
        if commands is None or word not in commands:
            break
        words.append(word)
        group = commands[word]
    return " ".join(words)


def main() -> None:
    """Entry point: the project's own errors become one line on stderr and exit code 1, as does a command
    that needs the ``train`` extra where it is not installed (``GC_DEBUG=1`` shows the traceback)."""
    try:
        app()
    except GcError as exc:
        if os.environ.get("GC_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if os.environ.get("GC_DEBUG") or missing not in TRAIN_EXTRA_MODULES:
            raise
        err_console.print(
            f"[bold red]error:[/] `{_command_name(sys.argv[1:])}` needs the model stack of the train extra "
            f"({missing} is not installed): {escape(TRAIN_EXTRA_HINT)}",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
