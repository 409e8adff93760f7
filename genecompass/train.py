"""Pre-training with DeepSpeed: one code path for a laptop CPU, one GPU, many GPUs and many nodes.

``pretrain(corpus, config, out_dir)`` always runs a DeepSpeed engine (ZeRO 0–3, bf16 on GPUs, gradient
accumulation, warm-up + linear/cosine decay). It works without a launcher (it fills in the rendezvous
variables itself) and under ``torchrun``, the ``deepspeed`` launcher and SLURM ``srun`` (one task per GPU:
``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS`` become ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``).

Guarantees:
- Every masked gene in a step weighs the same, whatever the number of ranks and accumulation steps: the
  masked-gene count is all-reduced before the forward passes and each loss is the sum over its genes divided
  by that global count (times world size x accumulation, which DeepSpeed divides out again). W ranks with
  accumulation A see the same batches and masks as one process with accumulation W·A.
- Checkpoints (``out/checkpoints/step_N``) are written under a temporary name and renamed when every rank
  is done; they hold the engine state plus sampler position, RNG states per rank, the step and the config,
  so a run killed at any moment and resumed with ``resume=True`` continues the same trajectory.
- SIGTERM or SIGUSR1 (SLURM preemption, ``scancel``, the time limit, ``--signal=B:USR1@N`` forwarded by the
  recipes) stops a run cleanly: the ranks agree on stopping through the per-step all-reduce, finish the
  optimizer step, write a checkpoint and return a summary with ``stopped`` set (``gc pretrain`` exits with
  ``EXIT_STOPPED``); the run continues with ``resume=True``.
- The final model is exported unwrapped with ``save_pretrained`` to ``out/model`` (safetensors, the
  reference hash and a copy of the knowledge manifest in it; the knowledge tables themselves are not copied).

Outputs: ``out/train_log.csv`` (step, loss, id_loss, value_loss, lr, tokens, tokens_per_s, elapsed),
TensorBoard events in ``out/tensorboard`` if TensorBoard is installed, ``out/loss_curve.png``,
``out/pretrain_config.yaml``. The library reports progress through a callback and never imports rich.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from .errors import InputError, OutputExistsError, ReferenceMismatchError

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
PRESETS = ("tiny", "small", "base")
LOG_COLUMNS = ("step", "loss", "id_loss", "value_loss", "lr", "tokens", "tokens_per_s", "elapsed")
DECAYS = ("linear", "cosine")
ID_HEADS = ("full", "corpus")
# Settings a resumed run may change without changing the trajectory.
RESUMABLE_CHANGES = ("max_steps", "save_every", "keep_checkpoints", "log_every", "num_workers")
_MASK_STREAM = 0x6D61736B  # separates the masking seed stream from other uses of (seed, epoch, batch)
# Signals that stop a run after the current step with a checkpoint; `gc pretrain` then exits with
# EXIT_STOPPED (sysexits' EX_TEMPFAIL: "try again later", i.e. resume).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_STOPPED = 75

ProgressCallback = Callable[[int, int, dict], None]


@dataclass
class PretrainConfig:
    """Pre-training settings; ``genecompass/configs/{tiny,small,base}.yaml`` are the presets."""

    model: str = "tiny"  # model size preset (see genecompass.configs.MODEL_PRESETS)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # any GeneCompassConfig field
    knowledge_tables: list[str] | None = None  # None: every table in the knowledge directory
    max_length: int | None = None  # tokens per cell incl. the species token; None: the model's maximum

    lr: float = 1e-3
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    warmup_steps: int = 100
    decay: str = "linear"  # "linear" | "cosine", from the end of warm-up to max_steps
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    max_steps: int = 1000  # optimizer steps
    max_tokens: int = 8192  # padded tokens per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step per rank
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    bf16: bool = False  # GPU only; on CPU it falls back to fp32 with a warning
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30 % slower
    seed: int = 0
    save_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 2  # older checkpoints are deleted
    log_every: int = 10  # steps between log rows
    num_workers: int = 0  # DataLoader worker processes per rank

    # "full": the ID head scores the whole vocabulary (the paper); "corpus": only the genes the corpus holds
    # (finite median), a much smaller softmax (bench/RESULTS.md, "Pre-training diagnosis").
    id_head: str = "full"
    mlm_probability: float = 0.15
    mask_ratio: float = 0.8  # of the selected genes, replaced by <mask>
    random_ratio: float = 0.1  # replaced by a random gene of the same species (the rest stay unchanged)

    length_grouped: bool = True  # sort cells by length within mega-batches to cut padding
    mega_batch_mult: int = 50  # batches per length-sorting group
    block_cells: int = 256  # consecutive cells shuffled as a unit (keeps reads local on large corpora)

    def __post_init__(self) -> None:
        self.adam_betas = tuple(float(b) for b in self.adam_betas)  # YAML gives a list
        self.validate()

    def validate(self) -> None:
        def fail(message: str) -> None:
            raise InputError(f"invalid pre-training config: {message}")

        from .configs import MODEL_PRESETS

        if self.model not in MODEL_PRESETS:
            fail(f"model {self.model!r} is not one of {', '.join(MODEL_PRESETS)}")
        positive = (
            "max_steps",
            "max_tokens",
            "grad_accum",
            "save_every",
            "log_every",
            "keep_checkpoints",
            "mega_batch_mult",
            "block_cells",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        for name in ("warmup_steps", "num_workers", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                fail(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.lr <= 0:
            fail(f"lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.id_head not in ID_HEADS:
            fail(f"id_head {self.id_head!r} is not one of {', '.join(ID_HEADS)}")
        if self.decay not in DECAYS:
            fail(f"decay {self.decay!r} is not one of {', '.join(DECAYS)}")
        if self.zero_stage not in (0, 1, 2, 3):
            fail(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        if self.max_length is not None and self.max_length < 2:
            fail(f"max_length must be at least 2 (species token + one gene), got {self.max_length}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            fail("weight_decay and grad_clip must be non-negative")

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> PretrainConfig:
        unknown = sorted(set(values) - set(cls.fields()))
        if unknown:
            raise InputError(
                f"{source}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(cls.fields())}"
            )
        return cls(**values)

    @classmethod
    def load(cls, name_or_path: str | Path, **overrides: Any) -> PretrainConfig:
        """A preset (``tiny``, ``small``, ``base``) or a YAML file; ``overrides`` win (None: ignored)."""
        path = CONFIG_DIR / f"{name_or_path}.yaml" if str(name_or_path) in PRESETS else Path(name_or_path)
        if not path.is_file():
            raise InputError(f"{path}: no such config; use one of {', '.join(PRESETS)} or a YAML file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path}: invalid YAML ({exc})") from exc
        if not isinstance(values, dict):
            raise InputError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values, source=str(path))

    def replace(self, **overrides: Any) -> PretrainConfig:
        return self.from_dict({**self.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["adam_betas"] = list(self.adam_betas)
        return values


# --------------------------------------------------------------------------------------------------------
# Distributed setup


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _slurm_master_addr() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        hosts = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return nodelist if "[" not in nodelist and "," not in nodelist else None
    return hosts[0] if hosts else None


@contextlib.contextmanager
def distributed_environment() -> Iterator[dict[str, int]]:
    """Make sure RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set.

    Launchers (torchrun, deepspeed) set them. Under SLURM ``srun`` with one task per GPU they are derived
    from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and the first host of the job. Without any launcher it
    is a single process on 127.0.0.1 and a free port. Variables added here are removed on exit.
    """
    env = os.environ
    added: dict[str, str] = {}
    if "RANK" not in env:
        if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            added.update(
                RANK=env["SLURM_PROCID"],
                LOCAL_RANK=env.get("SLURM_LOCALID", "0"),
                WORLD_SIZE=env["SLURM_NTASKS"],
            )
            if "MASTER_ADDR" not in env:
                master = _slurm_master_addr()
                if master is None and int(env["SLURM_NTASKS"]) > 1:
                    raise InputError(
                        "under SLURM, set MASTER_ADDR to the first node's address "
                        "(scontrol is not available to find it)"
                    )
                added["MASTER_ADDR"] = master or "127.0.0.1"
            if "MASTER_PORT" not in env:  # all tasks must agree, so derive it from the job id
                added["MASTER_PORT"] = str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 1000)
        else:
            added.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if "LOCAL_RANK" not in env and "LOCAL_RANK" not in added:
        added["LOCAL_RANK"] = "0"
    if "MASTER_ADDR" not in env and "MASTER_ADDR" not in added:
        added["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" not in env and "MASTER_PORT" not in added:
        added["MASTER_PORT"] = str(_free_port())
    old_path = env.get("PATH", "")
    interpreter_bin = Path(sys.executable).parent
    if shutil.which("ninja") is None and (interpreter_bin / "ninja").exists():
        # DeepSpeed JIT-compiles its CPU communication op with ninja, which pip installs next to python;
        # a venv used without activation does not have it on PATH.
        env["PATH"] = f"{interpreter_bin}{os.pathsep}{old_path}"
    env.update(added)
    try:
        yield {
            "rank": int(env["RANK"]),
            "local_rank": int(env["LOCAL_RANK"]),
            "world_size": int(env["WORLD_SIZE"]),
        }
    finally:
        for key in added:
            env.pop(key, None)
        env["PATH"] = old_path


# --------------------------------------------------------------------------------------------------------
# Pieces of the training loop


def model_config_for(
    config: PretrainConfig,
    reference: Any,
    tables: dict[str, Any],
    knowledge_dir: str | Path | None,
    *,
    head_genes: np.ndarray | None = None,
    **overrides: Any,
):
    """The ``GeneCompassConfig`` a fresh pre-training run of ``config`` builds: the preset's sizes, the gene
    reference's vocabulary and special tokens, the knowledge ``tables`` loaded from ``knowledge_dir`` (their
    sha256 from its manifest), the corpus ID head's size, then ``config.model_overrides``, ``overrides``."""
    from .knowledge import read_manifest
    from .model import GeneCompassConfig

    manifest = read_manifest(knowledge_dir) if knowledge_dir is not None else None
    return GeneCompassConfig.from_preset(
        config.model,
        vocab_size=reference.vocab_size,
        pad_token_id=reference.pad_id,
        mask_token_id=reference.mask_id,
        species_token_ids=dict(reference.species_token_ids),
        reference_hash=reference.hash,
        knowledge_tables=list(tables),
        knowledge_dims={name: int(t[0].shape[1]) for name, t in tables.items()},
        knowledge_sha256={name: manifest["tables"][name]["sha256"] for name in tables} if manifest else {},
        knowledge_dir=str(Path(knowledge_dir).resolve()) if knowledge_dir is not None else None,
        **({"id_head_size": len(head_genes)} if head_genes is not None else {}),
        **{**config.model_overrides, **overrides},
    )


def corpus_gene_tokens(corpus: Any, reference: Any) -> np.ndarray:
    """Token ids of the genes a corpus holds (those with a finite median: expressed somewhere in it; a corpus
    without medians is read through once), special tokens excluded: the classes of the ``id_head: corpus``
    ID head."""
    medians = corpus.gene_medians()
    if medians is not None:
        tokens = np.flatnonzero(np.isfinite(medians))
    else:
        seen = np.zeros(reference.vocab_size, bool)
        step = 1 << 22  # gene ids only, in bounded chunks: the values are not needed
        for start in range(0, corpus.n_tokens, step):
            seen[corpus.genes[start : start + step]] = True
        tokens = np.flatnonzero(seen)
    special = [reference.pad_id, reference.mask_id, *reference.species_token_ids.values()]
    return tokens[~np.isin(tokens, special)].astype(np.int64)


def lr_lambda(config: PretrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``step``: linear warm-up, then linear or cosine decay to
    ``min_lr_ratio`` at ``max_steps``."""
    warmup, total, floor = config.warmup_steps, config.max_steps, config.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 1.0 - progress if config.decay == "linear" else 0.5 * (1.0 + np.cos(np.pi * progress))
        return floor + (1.0 - floor) * float(shape)

    return multiplier


def deepspeed_config(config: PretrainConfig, *, on_cpu: bool, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for a PretrainConfig. Batches are token-budgeted, so DeepSpeed's
    micro-batch size (1) only matters for its own batch arithmetic."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": config.grad_accum,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": config.lr,
                "betas": list(config.adam_betas),
                "eps": config.adam_eps,
                "weight_decay": config.weight_decay,
                # torch.optim.AdamW: no JIT-compiled fused kernel on CPU (saves ~50 s per fresh machine)
                "torch_adam": on_cpu,
            },
        },
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**62,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def _parameter_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (BERT's rule: not on biases, LayerNorm weights or other vectors)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def mask_generator(seed: int, epoch: int, global_batch: int) -> Any:
    """The torch.Generator that masks global batch ``global_batch`` of ``epoch``: independent of rank and
    accumulation, so the same batch gets the same masks in any layout."""
    import torch

    state = np.random.SeedSequence([seed, epoch, global_batch, _MASK_STREAM]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _rng_state() -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (``checkpoints/step_N``; partial ones have a dotted temporary name)."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [(step, p) for p in root.iterdir() if (step := _checkpoint_step(p)) is not None and p.is_dir()]
    return max(done)[1] if done else None


class _Log:
    """Rank 0's CSV log (+ TensorBoard when installed)."""

    def __init__(self, out_dir: Path, resume_step: int | None):
        self.path = out_dir / "train_log.csv"
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
        self.handle = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=LOG_COLUMNS)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.handle.flush()
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # TensorBoard is optional
            pass

    def write(self, row: dict[str, float]) -> None:
        self.writer.writerow({k: row[k] for k in LOG_COLUMNS})
        self.handle.flush()
        if self.tensorboard is not None:
            for key in ("loss", "id_loss", "value_loss", "lr", "tokens_per_s"):
                self.tensorboard.add_scalar(f"train/{key}", row[key], int(row["step"]))

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_log(path: str | Path) -> list[dict[str, float]]:
    with open(path, newline="") as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def plot_loss_curve(
    log_path: str | Path,
    png_path: str | Path,
    *,
    id_weight: float | None = None,
    value_weight: float | None = None,
    title: str = "GeneCompass pre-training",
) -> None:
    """ID loss (cross-entropy over the vocabulary) and value loss (MSE of the masked values) against step,
    each on its own axis: their scales differ by orders of magnitude. The title states how they are
    weighted into the total that is optimised (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    steps = [r["step"] for r in rows]
    figure, (id_axis, value_axis) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    id_axis.plot(steps, [r["id_loss"] for r in rows], color="#4c72b0", marker=".")
    id_axis.set_ylabel("ID loss (cross-entropy)")
    id_axis.set_title("gene-ID prediction", fontsize=10)
    value_axis.plot(steps, [r["value_loss"] for r in rows], color="#dd8452", marker=".")
    value_axis.set_ylabel("value loss (MSE)")
    value_axis.set_title("expression-value prediction", fontsize=10)
    for axis in (id_axis, value_axis):
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    if id_weight is not None and value_weight is not None:
        last = rows[-1] if rows else None
        total = f"; last total {last['loss']:.4g}" if last else ""
        weighting = f"loss = {id_weight:g} × ID loss + {value_weight:g} × value loss{total}"
    else:
        weighting = "loss = weighted sum of ID and value loss (weights in the model config)"
    figure.suptitle(f"{title}\n{weighting}", fontsize=10)
    figure.tight_layout()
    figure.savefig(png_path, dpi=120)
    plt.close(figure)


# --------------------------------------------------------------------------------------------------------
# The entry point


def pretrain(
    corpus_path: str | Path,
    config: PretrainConfig | str | Path,
    out_dir: str | Path,
    *,
    knowledge_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    reference: Any = None,
    init_from: str | Path | None = None,
) -> dict[str, Any]:
    """Pre-train a GeneCompass model on a corpus; returns a summary dict (the same on every rank).

    ``config``: a PretrainConfig, a preset name or a YAML path. ``knowledge_dir``: prior-knowledge tables
    (``gc knowledge build``); without it the model trains without prior knowledge. ``resume``: continue from
    the newest checkpoint in ``out_dir`` (a fresh start if there is none). ``overwrite``: replace an existing
    run. ``progress(step, max_steps, metrics)`` is called on rank 0 after every step. ``reference``: the gene
    reference (default: the installed one; its hash must match the corpus). ``init_from``: continue
    pre-training a run (e.g. an imported GeneCompass checkpoint): its architecture, weights, gene reference
    and knowledge tables replace the preset's; the corpus must be tokenised for it (`gc tokenize --model`).
    """
    if not isinstance(config, PretrainConfig):
        config = PretrainConfig.load(config)
    with distributed_environment() as ranks, _stop_on_signals() as stop:
        return _pretrain(
            Path(corpus_path),
            config,
            Path(out_dir),
            ranks,
            knowledge_dir=knowledge_dir,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            reference=reference,
            init_from=init_from,
            stop=stop,
        )


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[dict[str, str | None]]:
    """While training, SIGTERM / SIGUSR1 only record that a stop was asked for (``stop["signal"]``); the
    loop acts on it at the next step boundary. Outside the main thread (no handlers possible) nothing is
    installed. The previous handlers come back on exit."""
    stop: dict[str, str | None] = {"signal": None}
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        stop["signal"] = stop["signal"] or signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers: SLURM signals every process of a step; the training process decides, and a
    worker that died of SIGTERM would fail the step that is still to finish."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _pretrain(
    corpus_path: Path,
    config: PretrainConfig,
    out_dir: Path,
    ranks: dict[str, int],
    *,
    knowledge_dir: str | Path | None,
    resume: bool,
    overwrite: bool,
    progress: ProgressCallback | None,
    reference: Any,
    init_from: str | Path | None = None,
    stop: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from .corpus import Corpus
    from .data import CorpusDataset, MaskingCollator, TokenBudgetBatchSampler
    from .knowledge import load_knowledge
    from .model import IGNORE_INDEX, GeneCompassForPretraining, parameter_counts

    if not os.environ.get("GC_DEBUG"):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rank, local_rank, world_size = ranks["rank"], ranks["local_rank"], ranks["world_size"]
    is_main = rank == 0
    notes: list[str] = []

    # -- inputs and their hashes, checked before any process group exists -------------------------------
    corpus = Corpus.open(corpus_path)
    init_dir = None
    if init_from is not None:
        from .run import KNOWLEDGE_BESIDE_WEIGHTS, model_dir_of, run_reference

        init_dir = model_dir_of(init_from)
        reference = reference or run_reference(init_dir)
        beside = init_dir / KNOWLEDGE_BESIDE_WEIGHTS
        knowledge_dir = knowledge_dir or (beside if beside.is_dir() else None)
    if reference is None:
        from .reference import load_reference

        reference = load_reference()
    if corpus.reference_hash != reference.hash:
        raise ReferenceMismatchError(
            f"{corpus_path}: corpus built for reference {corpus.reference_hash}, but the gene reference in "
            f"use is {reference.hash}; re-tokenise the data with this gc"
        )
    tables: dict[str, Any] = {}
    if init_dir is not None:
        pass  # the run brings its own architecture and knowledge tables
    elif knowledge_dir is not None:
        tables = load_knowledge(knowledge_dir, reference.hash, config.knowledge_tables)
    elif config.knowledge_tables:
        raise InputError(
            f"the config asks for knowledge tables {config.knowledge_tables}; pass --knowledge DIR"
        )
    else:
        notes.append("no knowledge directory given: training without prior knowledge")

    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    bf16 = config.bf16
    if bf16 and on_cpu:
        bf16 = False
        notes.append("bf16 needs a GPU; training in fp32 on CPU")
        warnings.warn("bf16 needs a GPU; training in fp32 on CPU", stacklevel=2)

    # -- process group -----------------------------------------------------------------------------------
    owns_group = not dist.is_initialized()
    if not on_cpu:
        accelerator.set_device(local_rank)
    deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False)
    comm_device = torch.device(accelerator.current_device_name())  # gloo: CPU tensors; nccl: this GPU
    try:
        if dist.get_world_size() != world_size:
            raise InputError(f"process group has {dist.get_world_size()} ranks, WORLD_SIZE says {world_size}")

        # -- output directory (rank 0 decides; every rank raises the same error) ---------------------------
        checkpoint_root = out_dir / "checkpoints"
        problem = _prepare_out_dir(out_dir, resume=resume, overwrite=overwrite) if is_main else None
        refused = torch.tensor([problem is not None], dtype=torch.int32, device=comm_device)
        dist.broadcast(refused, src=0)
        if refused.item():
            raise OutputExistsError(problem or f"{out_dir} already holds a training run (see rank 0)")
        dist.barrier()

        checkpoint = latest_checkpoint(out_dir) if resume else None
        saved: dict[str, Any] = {}
        if checkpoint is not None:
            saved = json.loads((checkpoint / "client_state.json").read_text())
            _check_resumable(config, saved, world_size, checkpoint)

        # -- model --------------------------------------------------------------------------------------
        initial = None
        head_genes = corpus_gene_tokens(corpus, reference) if config.id_head == "corpus" else None
        if init_dir is not None:
            from .run import quiet_transformers

            with quiet_transformers():
                initial = GeneCompassForPretraining.from_pretrained(init_dir, knowledge_dir=knowledge_dir)
            model_config = initial.config
        else:
            model_config = model_config_for(config, reference, tables, knowledge_dir, head_genes=head_genes)
        max_length = config.max_length or model_config.max_sequence_length
        if max_length > model_config.max_sequence_length:
            raise InputError(
                f"max_length {max_length} exceeds the model's {model_config.max_sequence_length} "
                "positions"
            )
        if saved and saved["model_config"].get("knowledge_sha256") != model_config.knowledge_sha256:
            raise ReferenceMismatchError(
                f"{checkpoint}: the run was trained with other knowledge tables "
                f"({sorted(saved['model_config'].get('knowledge_sha256') or {})}); resume with the same "
                "--knowledge directory"
            )
        _seed_everything(config.seed)  # identical initial weights on every rank
        model = initial if initial is not None else GeneCompassForPretraining(model_config)
        if head_genes is not None and initial is None:
            model.restrict_id_head(head_genes)
        if tables:
            model.attach_knowledge(tables)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        counts = parameter_counts(model)

        # -- data ---------------------------------------------------------------------------------------
        dataset = CorpusDataset(
            corpus, max_length, species_token_ids=reference.species_token_ids, block_cells=config.block_cells
        )
        sampler = TokenBudgetBatchSampler(
            dataset.lengths,
            config.max_tokens,
            shuffle=True,
            seed=config.seed,
            rank=rank,
            world_size=world_size,
            length_grouped=config.length_grouped,
            mega_batch_mult=config.mega_batch_mult,
            block_size=config.block_cells,
            grad_accum=config.grad_accum,
        )
        collator = MaskingCollator(
            reference,
            pad_token_id=reference.pad_id,
            mask_token_id=reference.mask_id,
            mlm_probability=config.mlm_probability,
            mask_ratio=config.mask_ratio,
            random_ratio=config.random_ratio,
            mask_value=model_config.mask_value,
            seed=config.seed,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator.pad,
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed),  # worker seeds never touch the global RNG
            pin_memory=not on_cpu,
            worker_init_fn=_ignore_stop_signals if config.num_workers else None,
        )

        # -- engine -------------------------------------------------------------------------------------
        schedule = lr_lambda(config)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=_parameter_groups(model, config.weight_decay),
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
            config=deepspeed_config(config, on_cpu=on_cpu, bf16=bf16),
        )
        device = engine.device
        _seed_everything(config.seed + rank)  # dropout streams differ per rank
        step, tokens_seen, elapsed_before = 0, 0, 0.0
        if checkpoint is not None:
            load_path, _ = engine.load_checkpoint(str(checkpoint), tag="engine")
            if load_path is None:
                raise InputError(f"{checkpoint}: DeepSpeed could not load this checkpoint")
            step, tokens_seen, elapsed_before = saved["step"], saved["tokens"], saved["elapsed"]
            sampler.load_state_dict(saved["sampler"])
            _set_rng_state(torch.load(checkpoint / f"rng_rank{rank}.pt", weights_only=False))
            notes.append(f"resumed from {checkpoint.name}")
        log = _Log(out_dir, step if checkpoint is not None else None) if is_main else None
        if is_main:
            (out_dir / "pretrain_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

        # -- loop ---------------------------------------------------------------------------------------
        position = {"epoch": sampler.epoch, "position": sampler.position}

        def micro_batches() -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
            while True:
                epoch, start = sampler.epoch, sampler.position
                for offset, batch in enumerate(loader):
                    position.update(epoch=epoch, position=start + offset + 1)
                    yield epoch, start + offset, batch

        stream = micro_batches()
        engine.train()
        start_time = time.perf_counter()
        window_tokens, window_start = 0, start_time
        last: dict[str, float] = {}
        saved_at: int | None = step if checkpoint is not None else None
        stop = stop if stop is not None else {"signal": None}
        stopped: str | None = None
        while step < config.max_steps:
            micro = []
            for _ in range(config.grad_accum):
                epoch, batch_position, batch = next(stream)
                generator = mask_generator(config.seed, epoch, sampler.global_index(batch_position))
                micro.append(collator.mask(batch, generator))
            n_local = sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in micro)
            n_global = _all_reduce(torch.tensor([n_local], dtype=torch.float64, device=device))[0]
            normaliser = max(n_global, 1.0) / (world_size * config.grad_accum)
            sums = torch.zeros(3, dtype=torch.float64, device=device)  # summed id loss, value loss, tokens
            for batch in micro:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                output = engine(**batch, num_items_in_batch=normaliser)
                engine.backward(output.loss)
                engine.step()
                sums += torch.stack(
                    [output.id_loss.detach(), output.value_loss.detach(), batch["attention_mask"].sum()]
                ).double() * torch.tensor([normaliser, normaliser, 1.0], dtype=torch.float64, device=device)
            # The stop votes ride on this all-reduce: every rank sees the same count and stops at the same
            # step, whichever rank (or all) got the signal.
            votes = torch.tensor([stop["signal"] is not None], dtype=torch.float64, device=device)
            id_sum, value_sum, step_tokens, stop_votes = _all_reduce(torch.cat([sums, votes]))
            step += 1
            if stop_votes and step < config.max_steps:
                stopped = stop["signal"] or "a signal to another rank"
            tokens_seen += int(step_tokens)
            window_tokens += int(step_tokens)
            denominator = max(n_global, 1.0)
            id_loss, value_loss = id_sum / denominator, value_sum / denominator
            now = time.perf_counter()
            last = {
                "step": step,
                "loss": model_config.id_loss_weight * id_loss + model_config.value_loss_weight * value_loss,
                "id_loss": id_loss,
                "value_loss": value_loss,
                "lr": engine.get_lr()[0],
                "tokens": tokens_seen,
                "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                "elapsed": elapsed_before + now - start_time,
            }
            if is_main and (step % config.log_every == 0 or step == config.max_steps):
                log.write(last)
                window_tokens, window_start = 0, now
            if step % config.save_every == 0 or step == config.max_steps or stopped:
                client = {
                    "step": step,
                    "tokens": tokens_seen,
                    "elapsed": last["elapsed"],
                    "sampler": {**sampler.state_dict(), **position},
                    "config": config.to_dict(),
                    "world_size": world_size,
                    "model_config": model_config.to_dict(),
                    "stopped": stopped,  # the signal that stopped the run here (the recipes read it)
                }
                _save_checkpoint(
                    engine, checkpoint_root, step, client, rank, is_main, config.keep_checkpoints
                )
                saved_at = step
            if is_main and progress is not None:
                progress(step, config.max_steps, last)
            if stopped:
                break

        if stopped:  # no final model: the run is not finished
            if is_main:
                log.close()
            dist.barrier()
            return {
                "steps": step,
                "max_steps": config.max_steps,
                "stopped": stopped,
                "loss": last.get("loss"),
                "tokens": tokens_seen,
                "world_size": world_size,
                "out_dir": str(out_dir),
                "checkpoint": str(checkpoint_root / f"step_{saved_at}"),
                "resumed_from": str(checkpoint) if checkpoint is not None else None,
                "notes": notes,
            }

        # -- export -------------------------------------------------------------------------------------
        model_dir = out_dir / "model"
        _export(
            model,
            model_dir,
            config.zero_stage,
            is_main,
            corpus=corpus,
            reference=reference,
            max_length=max_length,
        )
        if is_main:
            log.close()
            plot_loss_curve(
                out_dir / "train_log.csv",
                out_dir / "loss_curve.png",
                id_weight=model_config.id_loss_weight,
                value_weight=model_config.value_loss_weight,
            )
        dist.barrier()
        return {
            "steps": step,
            "stopped": None,
            "loss": last.get("loss"),
            "id_loss": last.get("id_loss"),
            "value_loss": last.get("value_loss"),
            "tokens": tokens_seen,
            "tokens_per_s": tokens_seen / max(last.get("elapsed", 0.0), 1e-9),
            "elapsed_s": last.get("elapsed", elapsed_before),
            "world_size": world_size,
            "bf16": bf16,
            "out_dir": str(out_dir),
            "model_dir": str(model_dir),
            "checkpoint": str(checkpoint_root / f"step_{saved_at}") if saved_at is not None else None,
            "resumed_from": str(checkpoint) if checkpoint is not None else None,
            "parameters": counts,
            "notes": notes,
        }
    finally:
        if owns_group and dist.is_initialized():
            # An explicit teardown: without it 2-rank gloo runs abort at exit now and then.
            with contextlib.suppress(Exception):
                dist.barrier()
            dist.destroy_process_group()
            _forget_deepspeed_groups()


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals (e.g. its clone of the world group); once the
    process group is destroyed they dangle, and a second ``pretrain`` in the same process (a notebook, the
    tests) fails with "Group ... is not registered". Reset them to their import-time values."""
    from deepspeed.utils import groups

    for name in (
        "_WORLD_GROUP",
        "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
        "_TENSOR_MODEL_PARALLEL_GROUP",
        "_MODEL_PARALLEL_GROUP",
        "_DATA_PARALLEL_GROUP",
        "mesh_device",
    ):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in (
        "_EXPERT_PARALLEL_GROUP",
        "_EXPERT_PARALLEL_GROUP_RANKS",
        "_EXPERT_DATA_PARALLEL_GROUP",
        "_EXPERT_DATA_PARALLEL_GROUP_RANKS",
        "_ALL_TO_ALL_GROUP",
    ):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


def _prepare_out_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> str | None:
    """Create (or clear, with ``overwrite``) the run directory; the refusal message if it holds a run."""
    checkpoint_root = out_dir / "checkpoints"
    has_run = (out_dir / "train_log.csv").exists() or checkpoint_root.exists()
    if has_run and not resume and not overwrite:
        return (
            f"{out_dir} already holds a training run; pass --resume to continue it or --overwrite to "
            "replace it"
        )
    if overwrite and not resume and out_dir.exists():
        shutil.rmtree(out_dir)
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    for partial in checkpoint_root.glob(".step_*.partial"):  # left by a run killed while saving
        shutil.rmtree(partial, ignore_errors=True)
    return None


def _all_reduce(tensor: Any) -> list[float]:
    """Sum over ranks (float64, on the communication device) → Python floats."""
    import torch.distributed as dist

    dist.all_reduce(tensor)
    return tensor.tolist()


def _check_resumable(
    config: PretrainConfig, saved: dict[str, Any], world_size: int, checkpoint: Path
) -> None:
    before = saved["config"]
    now = config.to_dict()
    changed = [k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k]]
    if changed:
        raise InputError(
            f"{checkpoint}: cannot resume with different settings ({', '.join(changed)}); only "
            f"{', '.join(RESUMABLE_CHANGES)} may change"
        )
    if saved["world_size"] != world_size:
        raise InputError(
            f"{checkpoint}: saved by {saved['world_size']} ranks, resuming with {world_size}; resume with "
            "the same number of ranks (batches are sharded per rank)"
        )


def _save_checkpoint(
    engine: Any, root: Path, step: int, client: dict[str, Any], rank: int, is_main: bool, keep: int
) -> None:
    """engine state + client state into ``.step_N.partial``, renamed to ``step_N`` once every rank is done."""
    import torch
    import torch.distributed as dist

    partial = root / f".step_{step}.partial"
    if is_main:
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(partial), tag="engine", client_state={"gc": True}, save_latest=True)
    torch.save(_rng_state(), partial / f"rng_rank{rank}.pt")
    dist.barrier()
    if is_main:
        (partial / "client_state.json").write_text(json.dumps(client, indent=2, default=str))
        final = root / f"step_{step}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        done = sorted((s, p) for p in root.iterdir() if (s := _checkpoint_step(p)) is not None)
        for _, old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _export(
    model: Any,
    model_dir: Path,
    zero_stage: int,
    is_main: bool,
    *,
    corpus: Any = None,
    reference: Any = None,
    max_length: int | None = None,
) -> None:
    """Save the unwrapped model with save_pretrained (fp32 safetensors). Under ZeRO-3 the partitioned
    parameters are gathered first. With ``corpus``, also write the run's normaliser beside it
    (``medians.tsv`` + ``gc_run.json``, see ``genecompass.run``) so embedding tokenises as training did."""
    import deepspeed
    import torch

    gather = (
        deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        if zero_stage == 3
        else contextlib.nullcontext()
    )
    with gather:
        if is_main:
            converted: dict[int, torch.Tensor] = {}  # by storage, so tied weights stay tied (saved once)
            state = {}
            for key, tensor in model.state_dict().items():
                if tensor.data_ptr() not in converted:
                    converted[tensor.data_ptr()] = tensor.detach().to("cpu", torch.float32)
                state[key] = converted[tensor.data_ptr()]
            if model_dir.exists():
                shutil.rmtree(model_dir)
            from .run import quiet_transformers, write_run_info

            with quiet_transformers():  # no "Writing model shards" bar in the run's output
                model.save_pretrained(model_dir, state_dict=state)
            if corpus is not None:

                write_run_info(model_dir, corpus, reference, max_length=max_length)
