"""`gc pretrain` (DeepSpeed pre-training) and `gc model info` (parameter counts of a configuration)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import checks
from .console import (
    JsonOption,
    OverwriteOption,
    console,
    err_console,
    positional,
    print_json,
)

model_app = typer.Typer(help="Inspect GeneCompass model configurations.", no_args_is_help=True)

ConfigOption = typer.Option(
    "tiny", "--config", help="A preset (tiny, small, base) or a YAML file of pre-training settings."
)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def step_line(step: int, total: int, metrics: dict, per_step: float, elapsed: float) -> str:
    """One progress line for logs: step, losses, tokens/s, seconds per step (over the steps since the last
    line), time since the command started (setup included) and the time the remaining steps will take."""
    return (
        f"pretrain step {step}/{total} · loss {metrics['loss']:.4f} (id {metrics['id_loss']:.4f}, value "
        f"{metrics['value_loss']:.4f}) · {metrics['tokens_per_s']:,.0f} tokens/s · {per_step:.2f} s/step · "
        f"{elapsed:.0f} s since start, ~{per_step * (total - step):.0f} s left"
    )


def _write_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")  # unwrapped and flushed at once: a log line per report
    sys.stderr.flush()


def log_lines(every: int, write, clock=None):
    """The progress callback for a non-interactive stderr (a log, a pipe, a batch job): no bar frames, but
    one ``write(step_line(...))`` every ``every`` steps and at the last step. Seconds per step are timed
    from the first step reported, so setup (DeepSpeed's op build, data loading) does not count as steps."""
    import time

    clock = clock or time.perf_counter
    start = clock()
    window: list[float] = []  # [time, step] of the previous report (or of the first step)

    def update(step: int, total: int, metrics: dict) -> None:
        now = clock()
        if not window:
            window[:] = [now, step]
            if step != total and step % every != 0:
                return
        if step % every == 0 or step == total:
            steps = step - window[1]
            per_step = (now - window[0]) / steps if steps > 0 else now - start
            write(step_line(step, total, metrics, per_step, now - start))
            window[:] = [now, step]

    return update


def pretrain(
    corpus: Path | None = typer.Argument(
        None, metavar="CORPUS", help="The tokenised corpus (.zarr) from `gc tokenize`. Required."
    ),
    corpus_option: Path | None = typer.Option(None, "--corpus", hidden=True, help="Old spelling of CORPUS."),
    config: str = ConfigOption,
    out: Path = typer.Option(..., "--out", help="Run directory: checkpoints, logs, loss curve, final model."),
    knowledge: Path | None = typer.Option(
        None, "--knowledge", help="Prior-knowledge directory from `gc knowledge build` (omit: no knowledge)."
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, help="Optimizer steps (overrides the config)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in --out."),
    init: Path | None = typer.Option(
        None,
        "--init",
        metavar="RUN",
        help="Continue pre-training this run (e.g. an imported GeneCompass checkpoint): its architecture, "
        "weights, vocabulary and knowledge replace the config's model; tokenise with `gc tokenize --model`.",
    ),
    overwrite: bool = OverwriteOption,
    seed: int | None = typer.Option(None, "--seed", min=0, help="Random seed (overrides the config)."),
    zero_stage: int | None = typer.Option(
        None, "--zero-stage", min=0, max=3, help="DeepSpeed ZeRO stage 0-3 (overrides the config)."
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=1, help="Padded tokens per micro-batch per rank (overrides the config)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Pre-train GeneCompass on a corpus with DeepSpeed: masked-gene ID + value prediction.

    Runs as a single process without a launcher, or one process per GPU under torchrun, the deepspeed
    launcher or SLURM srun (rank 0 prints). A killed run continues with --resume. SIGTERM or SIGUSR1
    (preemption, scancel, a SLURM time limit) stops it after the current step with a checkpoint, exit code 75.

    Example: gc pretrain pbmc3k.zarr --config tiny --out runs/tiny --max-steps 200

    Example (continue an imported checkpoint): gc pretrain my.zarr --init runs/gc_base --out runs/gc_base_more

    Multi-GPU: torchrun --nproc_per_node 8 $(which gc) pretrain c.zarr --config small --out runs/s;
    deepspeed --no_local_rank --num_gpus 8 $(which gc) pretrain ...; srun --ntasks-per-node 8 gc pretrain ...
    """
    from genecompass.errors import InputError
    from genecompass.train import PretrainConfig

    # Everything a user can get wrong is checked before the model stack (torch, DeepSpeed) is imported.
    corpus = positional(corpus, corpus_option, "CORPUS", "--corpus")
    init_reference = None
    if init is not None:
        from genecompass.run import run_reference

        checks.trained_run(init)
        init_reference = run_reference(init)
    checks.corpus(corpus, same_reference=True, model=init)
    checks.knowledge(knowledge, reference=init_reference)
    checks.training_output(out, resume=resume, overwrite=overwrite)
    # PretrainConfig validates its model preset against genecompass.model, which imports torch: last.
    settings = PretrainConfig.load(
        config, max_steps=max_steps, seed=seed, zero_stage=zero_stage, max_tokens=max_tokens
    )
    if knowledge is not None:
        checks.knowledge(knowledge, settings.knowledge_tables, reference=init_reference)
    elif settings.knowledge_tables and init is None:
        raise InputError(
            f"the config asks for knowledge tables {settings.knowledge_tables}; pass --knowledge DIR"
        )
    from genecompass.train import EXIT_STOPPED
    from genecompass.train import pretrain as run_pretraining

    is_main = _rank() == 0
    interactive = err_console.is_terminal
    with Progress(
        TextColumn("[bold]pretrain"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps · loss {task.fields[loss]} · {task.fields[rate]} tokens/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not (is_main and interactive),
    ) as bar:
        task = bar.add_task("pretrain", total=settings.max_steps, loss="-", rate="-")

        def draw(step: int, total: int, metrics: dict) -> None:
            bar.update(
                task,
                completed=step,
                total=total,
                loss=f"{metrics['loss']:.4f}",
                rate=f"{metrics['tokens_per_s']:,.0f}",
            )

        # In a log (stderr not a terminal) a line every log_every steps instead of bar frames.
        update = draw if interactive else log_lines(settings.log_every, _write_stderr)

        summary = run_pretraining(
            corpus,
            settings,
            out,
            knowledge_dir=knowledge,
            resume=resume,
            overwrite=overwrite,
            progress=update,
            init_from=init,
        )
    if summary["stopped"]:
        # SIGTERM / SIGUSR1 (preemption, scancel, the time limit): every rank saved the same checkpoint.
        if is_main:
            if as_json:
                print_json(summary)
            _write_stderr(
                f"gc pretrain: stopped by {summary['stopped']} after step {summary['steps']}/"
                f"{summary['max_steps']}; checkpoint {summary['checkpoint']}; continue with --resume "
                f"(exit code {EXIT_STOPPED})"
            )
        raise typer.Exit(EXIT_STOPPED)
    if not is_main:
        return
    if as_json:
        print_json(summary)
        return
    for note in summary["notes"]:
        err_console.print(f"[yellow]note:[/] {note}")
    if summary["loss"] is None:  # resumed a run that had already reached --max-steps
        console.print(f"nothing to do: the run is already at step {summary['steps']}")
        return
    console.print(
        f"{summary['steps']} steps · loss {summary['loss']:.4f} (id {summary['id_loss']:.4f}, value "
        f"{summary['value_loss']:.4f}) · {summary['tokens']:,} tokens at {summary['tokens_per_s']:,.0f}/s "
        f"on {summary['world_size']} rank(s)"
    )
    console.print(f"model: {summary['model_dir']}  ·  log: {Path(summary['out_dir']) / 'train_log.csv'}")


@model_app.command("info")
def info(
    config: str = ConfigOption,
    knowledge: Path | None = typer.Option(
        None, "--knowledge", help="Count the projections and frozen tables of this knowledge directory."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Parameter counts (trainable, frozen, by component) of a model configuration.

    Example: gc model info --config small --knowledge knowledge/
    """
    from genecompass.reference import load_reference
    from genecompass.train import PretrainConfig

    settings = PretrainConfig.load(config)
    reference = load_reference()
    manifest = checks.knowledge(knowledge)
    tables = {name: entry["dim"] for name, entry in manifest["tables"].items()} if manifest else {}
    import torch

    from genecompass.model import GeneCompassConfig, GeneCompassForPretraining, parameter_counts

    model_config = GeneCompassConfig.from_preset(
        settings.model,
        vocab_size=reference.vocab_size,
        pad_token_id=reference.pad_id,
        mask_token_id=reference.mask_id,
        species_token_ids=dict(reference.species_token_ids),
        knowledge_tables=list(tables),
        knowledge_dims=tables,
        **settings.model_overrides,
    )
    with torch.device("meta"):  # shapes only: counting needs no memory for the weights
        counts = parameter_counts(GeneCompassForPretraining(model_config))
    summary = {"preset": settings.model, "vocab_size": reference.vocab_size, **counts}
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"GeneCompass {settings.model} (vocabulary {reference.vocab_size:,})")
    table.add_column("component")
    table.add_column("parameters", justify="right")
    for component, count in counts["by_component"].items():
        table.add_row(component, f"{count:,}")
    table.add_row("[bold]trainable", f"[bold]{counts['trainable']:,}")
    table.add_row("[bold]frozen", f"[bold]{counts['frozen']:,}")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("pretrain")(pretrain)
    app.add_typer(model_app, name="model")
