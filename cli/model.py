"""`gc model import genecompass` / `gc model export`: published GeneCompass checkpoints ↔ gc runs."""

from __future__ import annotations

from pathlib import Path

import typer

from .console import JsonOption, console, existing_paths, print_json

import_app = typer.Typer(help="Import a model from another format as a gc run.", no_args_is_help=True)

FORMATS = ("genecompass",)


@import_app.command("genecompass")
def import_genecompass(
    checkpoint: Path = typer.Argument(
        ..., metavar="CKPT_DIR", help="Published GeneCompass folder: config.json + pytorch_model.bin "
        "(or model.safetensors)."
    ),
    token_dict: Path = typer.Option(
        ..., "--token-dict", metavar="FILE", help="The checkpoint's token dictionary pickle "
        "({Ensembl ID: token, '<pad>', '<mask>'})."
    ),
    medians: Path | None = typer.Option(
        None, "--medians", metavar="FILE", help="Its gene median dictionary pickle ({Ensembl ID: median}). "
        "Without it, compute medians on your own data with `gc corpus medians`."
    ),
    out: Path = typer.Option(..., "--out", metavar="RUN", help="The gc run to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing RUN."),
    as_json: bool = JsonOption,
) -> None:
    """Turn a published GeneCompass checkpoint into a gc run every command accepts (embed, finetune,
    predict, perturb, grn, pretrain --init). Weights are read without executing code; the pickles must be
    plain dicts.

    Example: gc model import genecompass GeneCompass_Base --token-dict human_mouse_tokens.pickle
    --medians human_gene_median_after_filter.pickle --out runs/genecompass_base
    """
    from genecompass.errors import OutputExistsError
    from genecompass.formats import import_genecompass as run_import
    from genecompass.formats import read_original

    existing_paths([checkpoint, token_dict, *([medians] if medians else [])])
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    read_original(checkpoint, token_dict, medians)  # every file checked before torch is imported
    summary = run_import(checkpoint, token_dict, out, medians_path=medians, overwrite=overwrite)
    if as_json:
        print_json(summary)
        return
    console.print(
        f"imported {checkpoint} → {out}: {summary['layers']} layers × {summary['hidden_size']}, "
        f"{summary['vocab_size']:,} tokens, knowledge {', '.join(summary['knowledge_tables']) or 'none'}; "
        f"medians: {summary['medians']}"
    )


def export(
    run: Path = typer.Argument(..., metavar="RUN", help="A run of the original architecture."),
    format: str = typer.Option("genecompass", "--format", metavar="FORMAT", help="genecompass"),
    out: Path = typer.Option(..., "--out", metavar="DIR", help="Folder to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing DIR."),
    as_json: bool = JsonOption,
) -> None:
    """Write a run back in another format: `genecompass` writes the original code's folder (config.json,
    pytorch_model.bin, token_dict.pickle, medians.pickle), loadable by its BertForMaskedLM.

    Example: gc model export --format genecompass runs/genecompass_base --out GeneCompass_Base_tuned
    """
    from genecompass.errors import InputError, OutputExistsError

    if format not in FORMATS:
        raise InputError(f"--format {format!r} is not one of {', '.join(FORMATS)}")
    existing_paths([run])
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    from genecompass.formats import export_genecompass

    summary = export_genecompass(run, out, overwrite=overwrite)
    if as_json:
        print_json(summary)
        return
    console.print(f"exported {run} → {out} ({summary['keys']} tensors, {summary['vocab_size']:,} tokens)")


def register(app: typer.Typer) -> None:
    """Adds `init`, `import` and `export` to the `gc model` group that `pretrain` registers."""
    from .bench import model_init
    from .pretrain import model_app

    model_app.command("init")(model_init)
    model_app.add_typer(import_app, name="import")
    model_app.command("export")(export)
