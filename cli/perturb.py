"""`gc perturb` (one perturbation vs random controls), `gc perturb screen` (every candidate gene, resumable,
shardable) and `gc perturb merge` (combine the shards of a screen)."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.core import TyperGroup

from . import checks
from .console import JsonOption, console, existing_paths, print_json, progress_bar, warn_unknown


class _DefaultRunGroup(TyperGroup):
    """`gc perturb --model RUN CORPUS …` runs the hidden `run`; `screen` and `merge` are subcommands."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


perturb_app = typer.Typer(
    cls=_DefaultRunGroup,
    no_args_is_help=True,
    help="In-silico perturbation: shift of source cells toward target states, with random-gene controls.\n\n"
    "Example: gc perturb --model runs/tiny pbmc3k.zarr --overexpress FCGR3A --level cell-max "
    "--cells-key cell_type --source 'CD14 Monocytes' --target 'FCGR3A Monocytes' --out perturb/\n\n"
    "Example: gc perturb screen --model runs/tiny pbmc3k.zarr --source 'CD14 Monocytes' "
    "--target 'FCGR3A Monocytes' "
    "--genes all --out screen/",
)

ModelOption = typer.Option(..., "--model", help="A `gc pretrain` run directory (or its model/ directory).")
CorpusArgument = typer.Argument(..., help="Tokenised corpus (.zarr) from `gc tokenize`.")
CellsKeyOption = typer.Option("cell_type", "--cells-key", help="Obs key holding the cell states.")
SourceOption = typer.Option(..., "--source", help="State of the cells to perturb (a value of --cells-key).")
TargetOption = typer.Option(..., "--target", help="Goal state(s), comma-separated values of --cells-key.")
MaxCellsOption = typer.Option(None, "--max-cells", min=1, help="At most this many cells per state (seeded).")
SeedOption = typer.Option(0, "--seed", min=0, help="Seed for cell sampling and control genes.")
MaxTokensOption = typer.Option(16384, "--max-tokens", min=64, help="Padded tokens per forward pass.")
MaxLengthOption = typer.Option(
    None,
    "--max-length",
    min=2,
    help="Tokens per cell incl. the species token (default: the model's maximum).",
)
KnowledgeOption = typer.Option(
    None, "--knowledge", help="Knowledge directory the model was trained with (default: the recorded one)."
)
LevelOption = typer.Option(
    "cell-max",
    "--level",
    help="Overexpression level: corpus-median, cell-max (the cell's highest value), a value, or fold:F.",
)
FractionOption = typer.Option(
    0.5,
    "--fraction",
    min=0.0,
    max=1.0,
    help="Knock-down: the fraction of the gene's value kept (0 removes the gene).",
)
NRandomOption = typer.Option(
    20, "--n-random", min=1, help="Random control genes, perturbed the same way: the null."
)
AnyRankOption = typer.Option(
    False,
    "--any-rank",
    help="Knock down in every cell carrying the gene (default: only where it ranks in the "
    "cell's top 50 %, as the paper).",
)


def _targets(spec: str) -> list[str]:
    from genecompass.errors import InputError

    targets = [t.strip() for t in spec.split(",") if t.strip()]
    if not targets:
        raise InputError("--target needs at least one value")
    return targets


@perturb_app.command("run")
def run(
    model: Path = ModelOption,
    corpus: Path = CorpusArgument,
    out: Path = typer.Option(
        ..., "--out", help="Output directory (cells.parquet, summary.json/csv, shifts.png)."
    ),
    overexpress: str | None = typer.Option(
        None, "--overexpress", help="Genes (symbol or Ensembl ID), comma-separated; A+B = a combination."
    ),
    level: str = LevelOption,
    knockdown: str | None = typer.Option(None, "--knockdown", help="Genes to knock down (as --overexpress)."),
    fraction: float = FractionOption,
    delete: str | None = typer.Option(None, "--delete", help="Genes to delete (as --overexpress)."),
    any_rank: bool = AnyRankOption,
    cells_key: str = CellsKeyOption,
    source: str = SourceOption,
    target: str = TargetOption,
    n_random: int = NRandomOption,
    seed: int = SeedOption,
    max_cells: int | None = MaxCellsOption,
    gene_effects: bool = typer.Option(
        False, "--gene-effects", help="Per-gene embedding change (cosine before/after, matched by gene)."
    ),
    targets_file: Path | None = typer.Option(
        None, "--targets", help="With --gene-effects: gene list tested against the other genes (Wilcoxon)."
    ),
    max_tokens: int = MaxTokensOption,
    max_length: int | None = MaxLengthOption,
    knowledge: Path | None = KnowledgeOption,
    as_json: bool = JsonOption,
) -> None:
    """Perturb genes in the source cells; measure the shift toward target states vs random control genes.

    Example: gc perturb --model runs/tiny pbmc3k.zarr --overexpress FCGR3A --level cell-max --cells-key cell_type --source 'CD14 Monocytes' --target 'FCGR3A Monocytes' --out perturb/
    Example: gc perturb run --model runs/tiny pbmc3k.zarr --delete CEBPB --gene-effects --source 'CD14 Monocytes' --target 'FCGR3A Monocytes' --out del/ (`run` may be omitted)
    """  # noqa: E501
    from genecompass.errors import InputError
    from genecompass.perturb import Level, Perturbation, load_model, parse_gene_groups
    from genecompass.perturb import run_perturbation as run_library

    # Everything a user can get wrong is checked before the model stack (torch) is imported.
    given = {"overexpress": overexpress, "knockdown": knockdown, "delete": delete}
    chosen = [(mode, spec) for mode, spec in given.items() if spec]
    if len(chosen) != 1:
        raise InputError("give exactly one of --overexpress, --knockdown, --delete")
    mode, spec = chosen[0]
    if gene_effects and mode != "delete":
        raise InputError("--gene-effects applies to --delete")
    if targets_file is not None and not gene_effects:
        raise InputError("--targets applies to --gene-effects")
    perturbation = Perturbation(
        mode,
        (0,),
        level=Level.parse(level) if mode == "overexpress" else None,
        fraction=fraction if mode == "knockdown" else 0.0,
        top_fraction=None if any_rank else 0.5,
    )
    targets = _targets(target)
    reference = checks.model(model)
    checks.genes(spec, f"--{mode}", reference)
    checks.knowledge(knowledge, reference=reference)
    checks.corpus(corpus, cells_key=cells_key, states=[source, *targets])
    effect_targets = checks.gene_file(targets_file, reference)
    encoder = load_model(model, knowledge_dir=knowledge)
    with progress_bar("perturb", unit="perturbations") as update:
        summary = run_library(
            encoder,
            corpus,
            out,
            perturbation=perturbation,
            gene_groups=parse_gene_groups(spec),
            cells_key=cells_key,
            source=source,
            targets=targets,
            n_random=n_random,
            seed=seed,
            max_cells=max_cells,
            max_tokens=max_tokens,
            max_length=max_length,
            gene_effects=gene_effects,
            effect_targets=effect_targets,
            progress=update,
        )
    if as_json:
        print_json(summary)
        return
    for row in summary["results"]:
        console.print(_effect_line(row))
    console.print(f"written: {out}/cells.parquet, summary.json, summary.csv, shifts.png")


def _number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _effect_line(row: dict) -> str:
    """One effect, its size first: shift [CI], z vs the random genes, share of the source→target distance,
    FDR, and "not distinguishable from zero" below the noise floor whatever the FDR."""
    parts = [
        f"shift {_number(row['mean_shift'], '+.3g')} [95 % CI {_number(row['ci_low'], '+.2g')}, "
        f"{_number(row['ci_high'], '+.2g')}]",
        f"z {_number(row['z'], '+.2f')} vs random genes (mean {_number(row['null_mean_shift'], '+.2g')})",
    ]
    if row.get("fraction_of_distance") is not None:
        parts.append(f"{_number(row['fraction_of_distance'], '.2%')} of the source→target distance")
    elif row.get("distance") is not None:
        parts.append(f"source→target distance {row['distance']:.2g} is itself below the noise floor")
    parts.append(f"FDR {_number(row['fdr'], '.3g')}")
    parts.append(f"{row['n_cells']} cells, {row['n_skipped']} skipped")
    line = f"{row['perturbation']} → {row['state']}: " + " · ".join(parts)
    if row["call"] == "not distinguishable from zero":
        line += f" · [bold]not distinguishable from zero[/] (|shift| < noise floor {row['noise_floor']:.2g})"
    return line


@perturb_app.command("screen")
def screen(
    model: Path = ModelOption,
    corpus: Path = CorpusArgument,
    out: Path = typer.Option(..., "--out", help="Screen directory (resumable: re-run to continue)."),
    source: str = SourceOption,
    target: str = TargetOption,
    genes: str = typer.Option(
        "all", "--genes", help="all (genes expressed in ≥10 % of source cells) or a FILE."
    ),
    mode: str = typer.Option("overexpress", "--mode", help="overexpress or knockdown."),
    level: str = LevelOption,
    fraction: float = FractionOption,
    any_rank: bool = AnyRankOption,
    cells_key: str = CellsKeyOption,
    n_random: int = NRandomOption,
    max_cells: int | None = typer.Option(200, "--max-cells", min=1, help="Source cells perturbed (seeded)."),
    shard: str | None = typer.Option(None, "--shard", help="i/n: this process screens candidates i, i+n, …"),
    batch_genes: int = typer.Option(16, "--batch-genes", min=1, help="Genes per result file (resume unit)."),
    seed: int = SeedOption,
    max_tokens: int = MaxTokensOption,
    max_length: int | None = MaxLengthOption,
    knowledge: Path | None = KnowledgeOption,
    as_json: bool = JsonOption,
) -> None:
    """Screen candidate genes: rank by shift toward the target state(s) and away from the source, vs a null.

    Example: gc perturb screen --model runs/tiny pbmc3k.zarr --source 'CD14 Monocytes' --target 'FCGR3A Monocytes' --genes all --out screen/
    """  # noqa: E501
    from genecompass.errors import InputError
    from genecompass.perturb import Level, ScreenSettings, load_model, parse_shard
    from genecompass.perturb import screen as run_screen

    # Everything a user can get wrong is checked before the model stack (torch) is imported.
    if mode not in ("overexpress", "knockdown"):
        raise InputError(f"--mode must be overexpress or knockdown, not {mode!r}")
    if mode == "overexpress":
        Level.parse(level)
    parse_shard(shard)
    targets = _targets(target)
    reference = checks.model(model)
    names = None if genes == "all" else checks.gene_file(Path(genes), reference)
    checks.knowledge(knowledge, reference=reference)
    checks.corpus(corpus, cells_key=cells_key, states=[source, *targets])
    settings = ScreenSettings(
        mode=mode,
        level=level,
        fraction=fraction,
        top_fraction=None if any_rank else 0.5,
        cells_key=cells_key,
        source=source,
        targets=targets,
        n_random=n_random,
        max_cells=max_cells,
        seed=seed,
        max_length=max_length,
        batch_genes=batch_genes,
    )
    encoder = load_model(model, knowledge_dir=knowledge)
    with progress_bar("screen", unit="genes") as update:
        result = run_screen(
            encoder,
            corpus,
            out,
            settings=settings,
            genes=names,
            shard=parse_shard(shard),
            max_tokens=max_tokens,
            progress=update,
        )
    warn_unknown(result["unknown_genes"], Path(genes))
    if as_json:
        print_json(result)
        return
    console.print(
        f"shard {result['shard']}: {result['batches_written']} batches written, {result['batches_skipped']} "
        f"already done, of {result['batches_total']} · {result['genes_done']}/{result['genes_total']} genes"
    )
    if result["table"]:
        _print_top(result["table"], settings.targets)
        console.print(f"table: {result['table']} (and screen.csv)")
    else:
        console.print("other shards are still running or missing; `gc perturb merge DIR` when all are done")


def _print_top(table_path: str, targets: list[str], n: int = 10) -> None:
    """The head of the ranking: mean shift toward each target and its FDR against the random-gene null."""
    import pandas as pd
    from rich.table import Table

    table = pd.read_parquet(table_path).head(n)
    view = Table(title=f"top {len(table)} of the screen (rank over all targets)")
    view.add_column("rank", justify="right")
    view.add_column("gene")
    for target in targets:
        view.add_column(f"shift → {target}", justify="right")
        view.add_column("z", justify="right")
        view.add_column("FDR", justify="right")
        view.add_column("vs noise floor")
    below = 0
    for _, row in table.iterrows():
        cells = [f"{row['rank_all_targets']:.0f}", str(row["gene"])]
        for target in targets:
            fdr, z = row.get(f"fdr_target:{target}"), row.get(f"z_target:{target}")
            call = row.get(f"call_target:{target}", "")
            below += call == "not distinguishable from zero"
            cells += [
                f"{row[f'mean_shift_target:{target}']:+.3g}",
                "-" if pd.isna(z) else f"{z:+.2f}",
                "-" if pd.isna(fdr) else f"{fdr:.3g}",
                "not distinguishable from zero" if call == "not distinguishable from zero" else "above",
            ]
        view.add_row(*cells)
    console.print(view)
    if below:
        console.print(
            f"{below} of these effects are below the noise floor (unperturbed cells re-embedded in other "
            "batches): not distinguishable from zero, whatever the FDR"
        )


@perturb_app.command("merge")
def merge(
    directory: Path = typer.Argument(..., help="A screen directory written by `gc perturb screen`."),
    as_json: bool = JsonOption,
) -> None:
    """Merge the shards of a screen into screen.parquet / screen.csv (ranks, FDR).

    Example: gc perturb merge screen/
    """
    from genecompass.perturb import merge_screen

    existing_paths([directory])
    info = merge_screen(directory)
    if as_json:
        print_json(info)
        return
    console.print(f"{info['genes_done']} genes · table: {info['table']}")


def register(app: typer.Typer) -> None:
    app.add_typer(perturb_app, name="perturb")
