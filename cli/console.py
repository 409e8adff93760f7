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

console = Console()
err_console = Console(stderr=True)

SpeciesOption = typer.Option(
    None, "--species", help="human or mouse; detected from the gene IDs when omitted."
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")
OverwriteOption = typer.Option(False, "--overwrite", help="Replace the output if it already exists.")
ThreadsOption = typer.Option(0, "--threads", min=0, help="Worker threads for the Rust core (0 = all cores).")


def print_json(payload: object) -> None:
    typer.echo(json.dumps(payload, indent=2, default=str))


def existing_paths(paths: list[Path]) -> list[Path]:
    """Check inputs exist up front so the error names the file before any work starts."""
    from genecompass.errors import InputError

    for path in paths:
        if not path.exists():
            raise InputError(f"{path}: no such file or directory")
    return paths


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
