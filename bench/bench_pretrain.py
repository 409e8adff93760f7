"""Pre-training throughput, run by hand: `python bench/bench_pretrain.py`; results go to bench/RESULTS.md.

In one run, on one corpus (PBMC3k, tokenised here) and the same layer sizes (the `small` preset: 6 layers,
256 hidden, 4 heads, 2,048 genes per cell), real (non-padding) tokens per second of:
  - `gc pretrain` (DeepSpeed engine, token-budget length-grouped batches, logits only at masked positions);
  - a Geneformer-style step: HF `BertForMaskedLM`, every cell padded to 2,048, logits over the full vocabulary
    at every position, AdamW.
Both run single-process on this machine's CPU threads; the first steps are warm-up and are not timed.

Usage: python bench/bench_pretrain.py [--steps 6] [--cells-per-batch 4]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gc" / "torch_extensions"))

SEQ = 2048  # genes per cell (+1 species token for gc)


def gc_tokens_per_s(corpus: Path, out: Path, steps: int, max_tokens: int) -> dict:
    from genecompass.train import PretrainConfig, pretrain

    config = PretrainConfig.load("small").replace(
        max_steps=steps,
        max_tokens=max_tokens,
        log_every=1,
        save_every=10_000,
        warmup_steps=1,
        max_length=SEQ + 1,
    )
    pretrain(corpus, config, out)
    with open(out / "train_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    # The log's tokens and elapsed are cumulative; steps 1-2 are warm-up.
    timed = rows[2:]
    tokens = int(rows[-1]["tokens"]) - int(rows[1]["tokens"])
    seconds = float(rows[-1]["elapsed"]) - float(rows[1]["elapsed"])
    return {
        "steps_timed": len(timed),
        "real_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


def geneformer_style_tokens_per_s(corpus: Path, steps: int, cells_per_batch: int, vocab_size: int) -> dict:
    import numpy as np
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from genecompass.corpus import Corpus

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=SEQ,
        hidden_act="relu",
        attention_probs_dropout_prob=0.02,
        hidden_dropout_prob=0.02,
    )
    model = BertForMaskedLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = Corpus(corpus)
    rng = np.random.default_rng(0)
    tokens = seconds = 0.0
    for step in range(steps):
        cells = rng.choice(data.n_cells, cells_per_batch, replace=False)
        ids = torch.zeros(cells_per_batch, SEQ, dtype=torch.long)  # every cell padded to 2,048
        for row, cell in enumerate(cells):
            _, genes, _ = data.read_cells(int(cell), int(cell) + 1)
            genes = torch.as_tensor(genes[:SEQ].astype(np.int64))
            ids[row, : len(genes)] = genes
        attention = (ids != 0).long()
        labels = ids.clone()
        chosen = (torch.rand(ids.shape) < 0.15) & (attention == 1)
        labels[~chosen] = -100
        start = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= 2:  # warm-up
            seconds += time.perf_counter() - start
            tokens += int(attention.sum())
    return {
        "steps_timed": steps - 2,
        "real_tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cells-per-batch", type=int, default=4)
    args = parser.parse_args()
    import torch

    from genecompass.reference import load_reference
    from genecompass.tokenize import tokenize

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "pbmc3k.zarr"
        tokenize([REPO / "data/pbmc3k.h5ad"], corpus)
        results = {
            "torch_threads": torch.get_num_threads(),
            "gc_pretrain": gc_tokens_per_s(corpus, Path(tmp) / "run", args.steps, SEQ * args.cells_per_batch),
            "geneformer_style": geneformer_style_tokens_per_s(
                corpus, args.steps, args.cells_per_batch, load_reference().vocab_size
            ),
        }
    results["ratio"] = results["gc_pretrain"]["tokens_per_s"] / results["geneformer_style"]["tokens_per_s"]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
