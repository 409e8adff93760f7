"""The steps of bench/gpu_check.sh, each run in its own process (fresh CUDA context, clean peak-memory
figures, one DeepSpeed process group per process). Run through the shell script, not by hand:

    bash bench/gpu_check.sh              # on a GPU machine, after `make setup` (about 8 minutes on one H100)
    bash bench/gpu_check.sh --dry-run    # CPU, tiny sizes: walks every code path up to the CUDA calls

Steps (each writes OUT/<step>.json):
  device      torch sees CUDA (name, capability, bf16, enabled SDPA kernels, nvcc for DeepSpeed's JIT)
  pretrain    `gc pretrain` (the CLI command, in-process) with the SDPA math fallback forbidden on CUDA, so
              that only the flash / memory-efficient / cuDNN kernels can run; real tokens/s from the run's
              train_log.csv (warm-up steps excluded), peak GPU memory
  geneformer  a Geneformer-style step at the same layer sizes: HF BertForMaskedLM, every cell padded to the
              full length, logits over the full vocabulary at every position, bf16 autocast, AdamW
  embed       `gc embed` (the CLI command, in-process) with the trained run: cells/s, peak GPU memory
  report      gathers the step files into OUT/gpu_check.json and OUT/gpu_check.md (a table)
  dry-run     --dry-run only: the tokenise and every step above, in the shell script's order, in this one
              process (on the CPU there is no CUDA context or peak memory to keep apart; one torch and
              DeepSpeed start-up instead of six)

In --dry-run every step runs on the CPU with the tiny model, few cells and few steps; the SDPA restriction
then also allows the math kernel (CPU attention with dropout has no other). Its figures are CPU figures
and say so.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---- helpers --------------------------------------------------------------------------------------------


def _write(out: Path, name: str, payload: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(json.dumps({name: payload}, default=str))


def _cuda():
    import torch

    return torch.cuda.is_available()


@contextlib.contextmanager
def fast_sdpa(dry_run: bool):
    """Forbid SDPA's math fallback on CUDA: a model that would need it fails with 'No available kernel'
    instead of silently running slowly. In a dry run the math kernel stays allowed (CPU)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        backends.append(SDPBackend.CUDNN_ATTENTION)
    if dry_run:
        backends.append(SDPBackend.MATH)
    with sdpa_kernel(backends):
        yield [b.name for b in backends]


def _reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def _run_gc(argv: list[str]) -> None:
    """Run one `gc` command in this process (the same Typer app as the console script)."""
    from cli.app import app

    try:
        app(argv, standalone_mode=False)
    except SystemExit as exc:  # typer.Exit
        if exc.code not in (0, None):
            raise RuntimeError(f"gc {' '.join(argv)} exited {exc.code}") from exc


# ---- steps -------------------------------------------------------------------------------------------


def step_device(args) -> None:
    import shutil

    import torch

    info: dict = {
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "nvcc": shutil.which("nvcc"),
        "cuda_home": os.environ.get("CUDA_HOME"),
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError as exc:
        info["deepspeed"] = f"not importable: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=torch.cuda.get_device_name(0),
            capability=".".join(map(str, torch.cuda.get_device_capability(0))),
            memory_gib=round(props.total_memory / 2**30, 1),
            bf16_supported=torch.cuda.is_bf16_supported(),
            flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled(),
            mem_efficient_sdp_enabled=torch.backends.cuda.mem_efficient_sdp_enabled(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
        # One masked attention call under the fast-kernel restriction: the kernels the model needs exist.
        q = torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
        mask = torch.ones(2, 1, 1, 128, device="cuda", dtype=torch.bool)
        with fast_sdpa(False):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask, dropout_p=0.02)
        info["fast_sdpa_with_mask_and_dropout"] = True
    else:
        info["device"] = "cpu"
    _write(args.out, "device", info)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: torch does not see a CUDA device (torch.cuda.is_available() is False)")


def _train_config(args, path: Path, *, zero_stage: int, steps: int) -> dict:
    """The pre-training settings: the `base` preset (dry run: `tiny`) with the benchmark's step count."""
    import yaml

    from genecompass.train import PretrainConfig

    preset = "tiny" if args.dry_run else "base"
    config = PretrainConfig.load(preset).replace(
        max_steps=steps,
        warmup_steps=2,
        log_every=1,
        save_every=10**9,  # no checkpoints inside the timed steps (the final save happens after them)
        zero_stage=zero_stage,
        bf16=True,  # falls back to fp32 on the CPU (a dry run), with a warning
        num_workers=0 if args.dry_run else 2,
        **({"max_tokens": 1024} if args.dry_run else {}),
    )
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    return config.to_dict()


def step_pretrain(args) -> None:
    name = args.name or "pretrain"
    run = args.out / f"run_{name}"
    config_path = args.out / f"{name}_config.yaml"
    config = _train_config(args, config_path, zero_stage=args.zero_stage, steps=args.steps)
    argv = ["pretrain", str(args.corpus), "--config", str(config_path), "--out", str(run), "--overwrite"]
    argv.append("--json")
    _reset_peak()
    start = time.perf_counter()
    with fast_sdpa(args.dry_run) as backends:
        _run_gc(argv)
    wall = time.perf_counter() - start
    with open(run / "train_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    warm = min(args.warmup, len(rows) - 1)  # cumulative tokens/elapsed: time steps warm+1..N only
    tokens = int(float(rows[-1]["tokens"])) - int(float(rows[warm - 1]["tokens"])) if warm else int(
        float(rows[-1]["tokens"])
    )
    seconds = float(rows[-1]["elapsed"]) - (float(rows[warm - 1]["elapsed"]) if warm else 0.0)
    _write(
        args.out,
        name,
        {
            "command": "gc " + " ".join(argv),
            "preset": "tiny" if args.dry_run else "base",
            "zero_stage": args.zero_stage,
            "bf16_requested": True,
            "sdpa_backends_allowed": backends,
            "max_tokens": config["max_tokens"],
            "grad_accum": config["grad_accum"],
            "steps": len(rows),
            "steps_timed": len(rows) - warm,
            "real_tokens_timed": tokens,
            "seconds_timed": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "final_loss": float(rows[-1]["loss"]),
            "peak_gpu_mem_gib": _peak_gib(),
            "wall_s": wall,
            "run": str(run),
        },
    )


def step_geneformer(args) -> None:
    import numpy as np
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from genecompass.corpus import Corpus
    from genecompass.model import MODEL_PRESETS
    from genecompass.reference import load_reference
    from genecompass.train import PretrainConfig

    preset = "tiny" if args.dry_run else "base"
    train = PretrainConfig.load(preset)
    sizes = MODEL_PRESETS[train.model]
    seq = train.max_length - 1  # genes per cell (gc adds a species token)
    cells = args.cells_per_batch or max(1, (1024 if args.dry_run else train.max_tokens) // seq)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=load_reference().vocab_size,
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_attention_heads"],
        intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=seq,
        hidden_act="relu",
        attention_probs_dropout_prob=0.02,
        hidden_dropout_prob=0.02,
        attn_implementation="sdpa",
    )
    model = BertForMaskedLM(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    data = Corpus.open(args.corpus)
    rng = np.random.default_rng(0)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    tokens = 0
    seconds = 0.0
    _reset_peak()
    with fast_sdpa(args.dry_run) as backends:
        for step in range(args.steps):
            ids = torch.zeros(cells, seq, dtype=torch.long)  # every cell padded to the full length
            for row, cell in enumerate(rng.choice(data.n_cells, cells, replace=False)):
                _, genes, _ = data.read_cells(int(cell), int(cell) + 1)
                genes = torch.as_tensor(np.asarray(genes[:seq], dtype=np.int64))
                ids[row, : len(genes)] = genes
            attention = (ids != 0).long()
            labels = ids.clone()
            labels[~((torch.rand(ids.shape) < 0.15) & (attention == 1))] = -100
            ids, attention, labels = ids.to(device), attention.to(device), labels.to(device)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast:
                loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                seconds += time.perf_counter() - start
                tokens += int(attention.sum())
    _write(
        args.out,
        "geneformer",
        {
            "model": f"BertForMaskedLM {sizes['num_hidden_layers']}L {sizes['hidden_size']}H "
            f"{sizes['num_attention_heads']}A, vocab {config.vocab_size}",
            "padded_length": seq,
            "cells_per_batch": cells,
            "bf16_autocast": device == "cuda",
            "sdpa_backends_allowed": backends,
            "steps_timed": max(args.steps - args.warmup, 0),
            "real_tokens_timed": tokens,
            "seconds_timed": seconds,
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "final_loss": float(loss),
            "peak_gpu_mem_gib": _peak_gib(),
        },
    )


def step_embed(args) -> None:
    import anndata as ad

    data = args.out / "embed_input.h5ad"
    adata = ad.read_h5ad(REPO / "data" / "pbmc3k.h5ad")
    if args.cells:
        adata = adata[: args.cells].copy()
    adata.write_h5ad(data)
    out = args.out / "embedded.h5ad"
    argv = ["embed", str(data), "--model", str(args.run), "--out", str(out), "--overwrite", "--json"]
    _reset_peak()
    with fast_sdpa(args.dry_run) as backends:
        start = time.perf_counter()
        _run_gc(argv)
        wall = time.perf_counter() - start
    _write(
        args.out,
        "embed",
        {
            "command": "gc " + " ".join(argv),
            "cells": adata.n_obs,
            "seconds": wall,
            "cells_per_s": adata.n_obs / max(wall, 1e-9),
            "note": "whole command: reading, tokenising, model load and the forward passes",
            "sdpa_backends_allowed": backends,
            "peak_gpu_mem_gib": _peak_gib(),
        },
    )


def _fmt(value, digits=0) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def step_report(args) -> None:
    parts = {}
    for name in ("device", "pretrain", "geneformer", "zero2", "embed"):
        path = args.out / f"{name}.json"
        parts[name] = json.loads(path.read_text()) if path.exists() else {"missing": True}
    device = parts["device"]
    pre, gf = parts["pretrain"], parts["geneformer"]
    ratio = None
    if pre.get("tokens_per_s") and gf.get("tokens_per_s"):
        ratio = pre["tokens_per_s"] / gf["tokens_per_s"]
    result = {
        "dry_run": device.get("dry_run"),
        "figures": "CPU dry run (tiny sizes): not GPU figures" if device.get("dry_run") else "GPU",
        "ratio_gc_over_geneformer_style": ratio,
        **parts,
    }
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    where = device.get("device", "?")
    lines = [
        f"# gc GPU check{' (DRY RUN on CPU: not GPU figures)' if device.get('dry_run') else ''}",
        "",
        f"device: {where} · torch {device.get('torch')} (CUDA {device.get('torch_cuda')}) · "
        f"deepspeed {device.get('deepspeed')} · nvcc {device.get('nvcc') or 'not found'}",
        "",
        "| check | result | tokens/s or cells/s | peak GPU memory (GiB) | notes |",
        "|---|---|---|---|---|",
        f"| torch sees CUDA | {device.get('cuda_available')} | | | "
        f"capability {device.get('capability', '—')}, "
        f"bf16 {device.get('bf16_supported', '—')}, fast SDPA with mask+dropout "
        f"{device.get('fast_sdpa_with_mask_and_dropout', '—')} |",
    ]
    for key, label in (("pretrain", "gc pretrain (bf16, ZeRO 0)"), ("zero2", "gc pretrain ZeRO-2, 1 GPU")):
        p = parts[key]
        ok = "missing" not in p
        lines.append(
            f"| {label} | {'ok' if ok else 'not run'} | {_fmt(p.get('tokens_per_s'))} tok/s | "
            f"{_fmt(p.get('peak_gpu_mem_gib'), 1)} | {p.get('preset', '')} preset, "
            f"{p.get('steps_timed', '—')} timed steps, final loss {_fmt(p.get('final_loss'), 3)} |"
        )
    lines.append(
        "| Geneformer-style step (padded, full-vocab logits) | "
        f"{'ok' if 'missing' not in gf else 'not run'} | "
        f"{_fmt(gf.get('tokens_per_s'))} tok/s | {_fmt(gf.get('peak_gpu_mem_gib'), 1)} | "
        f"{gf.get('model', '')}, {gf.get('cells_per_batch', '—')} cells × {gf.get('padded_length', '—')} |"
    )
    lines.append(f"| ratio gc / Geneformer-style | {_fmt(ratio, 2)} | | | real tokens per second |")
    em = parts["embed"]
    lines.append(
        f"| gc embed | {'ok' if 'missing' not in em else 'not run'} | "
        f"{_fmt(em.get('cells_per_s'))} cells/s | "
        f"{_fmt(em.get('peak_gpu_mem_gib'), 1)} | {em.get('cells', '—')} cells, whole command |"
    )
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def step_dry_run(args) -> None:
    if not args.dry_run:
        sys.exit("gpu_check: the dry-run step runs with --dry-run only")
    corpus = args.out / "pbmc3k.zarr"
    _run_gc(["tokenize", str(REPO / "data" / "pbmc3k.h5ad"), "--out", str(corpus), "--overwrite"])

    def with_(**changes) -> argparse.Namespace:
        return argparse.Namespace(**{**vars(args), "corpus": corpus, **changes})

    step_device(with_())
    step_pretrain(with_(name="pretrain", zero_stage=0))
    step_geneformer(with_(steps=args.gen_steps))
    step_embed(with_(run=args.out / "run_pretrain"))
    step_pretrain(with_(name="zero2", zero_stage=2, steps=args.zero2_steps))
    step_report(with_())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["device", "pretrain", "geneformer", "embed", "report", "dry-run"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--run", type=Path, help="embed: the run directory to embed with")
    parser.add_argument("--name", help="pretrain: the step's name (pretrain, zero2)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--cells", type=int, default=0, help="embed: first N cells of PBMC3k (0 = all)")
    parser.add_argument("--cells-per-batch", type=int, default=0, help="geneformer (0: max_tokens / length)")
    parser.add_argument("--gen-steps", type=int, default=3, help="dry-run: the geneformer step's steps")
    parser.add_argument("--zero2-steps", type=int, default=3, help="dry-run: the ZeRO-2 run's steps")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["DS_ACCELERATOR"] = "cpu"
    {
        "device": step_device,
        "pretrain": step_pretrain,
        "geneformer": step_geneformer,
        "embed": step_embed,
        "report": step_report,
        "dry-run": step_dry_run,
    }[args.step](args)


if __name__ == "__main__":
    main()
