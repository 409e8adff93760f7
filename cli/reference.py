"""`gc reference`: the gene reference bundle (vocabulary, symbols, orthologs)."""

from __future__ import annotations

import dataclasses

import typer
from rich.table import Table

from .console import JsonOption, console, print_json

reference_app = typer.Typer(
    help="The gene reference bundle: vocabulary, symbols, aliases, orthologs.", no_args_is_help=True
)


@reference_app.command("info")
def info(as_json: bool = JsonOption) -> None:
    """Summarise the gene reference bundle: vocabulary size, genes per species, shared homolog tokens, hash.

    Example: gc reference info --json
    """
    from genecompass.reference import load_reference

    summary = load_reference().info()
    if as_json:
        print_json(summary)
        return
    table = Table(title="gene reference", show_header=False)
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)


@reference_app.command("lookup")
def lookup(
    genes: list[str] = typer.Argument(
        ..., help="Symbols, previous symbols, aliases or Ensembl IDs (versioned or not)."
    ),
    species: str | None = typer.Option(None, "--species", help="human or mouse; both when omitted."),
    as_json: bool = JsonOption,
) -> None:
    """Look up genes: token id, Ensembl ID, symbol, species, and how the name matched (symbol, previous
    symbol, alias, ...). A mouse gene with a one-to-one human ortholog shares the human gene's token.
    Without --species an exact official symbol of either species wins (Gapdh is mouse); otherwise human is
    searched before mouse.

    Example: gc reference lookup TP53 Trp53 --json
    """
    from genecompass.errors import InputError
    from genecompass.reference import load_reference

    if species is not None and species not in ("human", "mouse"):
        raise InputError(f"--species must be human or mouse, not {species!r}")
    reference = load_reference()
    rows = []
    for query in genes:
        records = reference.lookup(query, species)
        if not records:
            rows.append({"query": query, "found": False})
        for record in records:
            rows.append({"query": query, "found": True, **dataclasses.asdict(record)})
    if as_json:
        print_json(rows)
    else:
        table = Table("query", "token", "gene id", "symbol", "species", "biotype", "matched as")
        for row in rows:
            if not row["found"]:
                table.add_row(row["query"], "-", "not found", "", "", "", "")
            else:
                token = "-" if row["token_id"] is None else str(row["token_id"])
                table.add_row(
                    row["query"], token, row["gene_id"], row["symbol"], row["species"], row["biotype"],
                    row["match"].replace("_", " "),
                )
        console.print(table)
    if not any(row["found"] for row in rows):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(reference_app, name="reference")
