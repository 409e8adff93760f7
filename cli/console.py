"""Shared console objects, option types and the progress bar used by every command."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import _TyperParameter

console = Console()
err_console = Console(stderr=True)

# Help shows what to type, in words, not Python types: Typer labels a parameter's value with its annotation
# (`<list[Path]>`, `<bool>`, `<str>`); an argument's label ignores its metavar. One table for every command.
_TYPE_WORDS = {
    "bool": "",  # a flag takes no value
    "int": "INTEGER",
    "int range": "INTEGER",
    "float": "NUMBER",
    "float range": "NUMBER",
    "str": "TEXT",
    "path": "PATH",
    "file": "FILE",
    "directory": "DIR",
    "list[Path]": "PATH...",
    "list[str]": "TEXT...",
}


def _words_not_types(display_type):
    def display(self, ctx):
        label = display_type(self, ctx)
        if not (isinstance(label, str) and label.startswith("<") and label.endswith(">")):
            return label
        return _TYPE_WORDS.get(label[1:-1], label[1:-1].upper())

    return display


_TyperParameter.display_type = _words_not_types(_TyperParameter.display_type)

SpeciesOption = typer.Option(
    None, "--species", help="human or mouse; detected from the gene IDs when omitted."
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")
OverwriteOption = typer.Option(False, "--overwrite", help="Replace the output if it already exists.")
TransposeOption = typer.Option(
    None,
    "--transpose/--no-transpose",
    help="CSV/TSV count tables: rows are genes (--transpose) or cells (--no-transpose); detected from "
    "where the gene names are when omitted.",
)
ThreadsOption = typer.Option(0, "--threads", min=0, help="Worker threads for the Rust core (0 = all cores).")


def input_layer(layer: str | None, transpose: bool | None) -> str | None:
    """The ``layer`` that ``genecompass.io.open_counts`` takes: ``--layer``, or a text table's orientation."""
    from genecompass.errors import InputError
    from genecompass.io import TEXT_ROWS_ARE_CELLS, TEXT_ROWS_ARE_GENES

    if transpose is None:
        return layer
    if layer is not None:
        raise InputError("--layer and --transpose/--no-transpose do not go together (a table has no layers)")
    return TEXT_ROWS_ARE_GENES if transpose else TEXT_ROWS_ARE_CELLS


def print_json(payload: object) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def existing_paths(paths: list[Path]) -> list[Path]:
    """Check inputs exist up front so the error names the file before any work starts."""
    from genecompass.errors import InputError

    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
    return paths


def one_of(value, alias, name: str, alias_name: str):
    """The value of an option given under its name or under its old (hidden) spelling, not both."""
    from genecompass.errors import InputError

    if value is not None and alias is not None:
        raise InputError(f"give {name} (or its old spelling {alias_name}), not both")
    return value if value is not None else alias


def positional(value: Path | None, alias: Path | None, metavar: str, alias_name: str) -> Path:
    """A data file given as the positional argument ``metavar`` or, as before, with ``alias_name``."""
    from genecompass.errors import InputError

    if value is not None and alias is not None:
        raise InputError(f"give {metavar} once: as the argument or with {alias_name}, not both")
    if value is None and alias is None:
        raise InputError(f"missing argument {metavar} (see --help)")
    return value if value is not None else alias


def warn_unknown(names: list[str], source: Path) -> None:
    """One line on stderr for genes of a list file that have no token (they are skipped)."""
    if names:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        err_console.print(
            f"[yellow]warning:[/] {source}: {len(names)} gene(s) not in the vocabulary, skipped: {shown}",
            highlight=False,
        )


@contextmanager
def progress_bar(description: str, unit: str = "cells") -> Iterator[Callable[[int, int], None]]:
    """A rich progress bar; yields the ``(done, total)`` callback the library functions accept."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{unit} · {{task.fields[rate]}}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not err_console.is_terminal,  # no bar frames in logs and pipes
    ) as progress:
        task = progress.add_task(description, total=None, rate="")

        def update(done: int, total: int) -> None:
            elapsed = progress.tasks[0].elapsed or 0.0
            rate = f"{done / elapsed:,.0f}/s" if elapsed > 0 else ""
            progress.update(task, completed=done, total=total, rate=rate)

        yield update
