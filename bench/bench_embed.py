"""Embedding throughput: gc's embedding path vs a naive loop (cells in input order, each batch padded to
the model's maximum length, as the original GeneCompass pads to 2048).

Three methods embed the same tokenised cells (species-token output) with the same model (``small`` preset,
untrained: speed does not depend on the weights) in one process, same batch size, same torch threads:

- ``gc``: ``genecompass.embed.embed_tokens``, what ``gc embed`` runs: length-sorted batches padded to their
  longest cell, inference mode, and the species shortcut (the last layer computed at the species token only);
- ``sorted_full_forward``: length-sorted batches, full forward (the gc path before the shortcut);
- ``naive_padded``: input order, every batch padded to the model's maximum length (2,049), full forward.

Tokenisation is not timed. The cells are processed in blocks (``--block``), each block by every method in
turn, so that load from other processes on a shared machine falls on all methods alike. Prints progress to
stderr and JSON to stdout: seconds, cells/s, speed-up over the naive loop, and the largest difference from
the naive embeddings (must be ~0).

    .venv/bin/python bench/bench_embed.py --input data/pbmc3k.h5ad --cells 1000 > bench/results_embed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="data/pbmc3k.h5ad")
    parser.add_argument("--cells", type=int, default=1000, help="first N cells (0 = all)")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--block", type=int, default=250, help="cells timed per method in turn")
    args = parser.parse_args()

    import anndata as ad
    import torch

    from genecompass.embed import TokenStream, embed_tokens, length_sorted_batches, pad_batch
    from genecompass.medians import Medians
    from genecompass.model import GeneCompassConfig, GeneCompassModel
    from genecompass.reference import load_reference
    from genecompass.run import LoadedRun
    from genecompass.tokenize import TokenizeOptions, compute_medians

    if args.threads:
        torch.set_num_threads(args.threads)
    reference = load_reference()
    adata = ad.read_h5ad(args.input)
    if args.cells:
        adata = adata[: args.cells].copy()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cells.h5ad"
        adata.write_h5ad(path)
        medians: Medians = compute_medians([path], options=TokenizeOptions(), reference=reference)
        config = GeneCompassConfig.from_preset(
            args.preset,
            vocab_size=reference.vocab_size,
            pad_token_id=reference.pad_id,
            mask_token_id=reference.mask_id,
            species_token_ids=dict(reference.species_token_ids),
            reference_hash=reference.hash,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        torch.manual_seed(0)
        model = GeneCompassModel(config).eval()
        run = LoadedRun(
            reference=reference,
            model=model,
            medians=medians,
            top_k=2048,
            normalisation=TokenizeOptions().normalisation(),
            reference_hash=reference.hash,
            path=Path(tmp),
            max_length=config.max_position_embeddings,
            info={},
        )
        with TokenStream(path, run, reference=reference) as stream:
            tokens = stream.read_all()

    lengths = tokens.lengths

    def gc_path(part):  # what `gc embed` runs: length-sorted batches, species shortcut, inference mode
        return embed_tokens(model, part, pool="species", batch_size=args.batch_size)

    def sorted_full(part):  # length-sorted batches, full forward under no_grad (gc embed before this change)
        out = np.zeros((part.n_cells, config.hidden_size), np.float32)
        with torch.no_grad():
            for rows in length_sorted_batches(part.lengths, args.batch_size, None):
                out[rows] = model(*pad_batch(part, rows)).last_hidden_state[:, 0].numpy()
        return out

    def naive(part):  # input order, every batch padded to the model's maximum length
        out = np.zeros((part.n_cells, config.hidden_size), np.float32)
        width = config.max_position_embeddings
        with torch.no_grad():
            for start in range(0, part.n_cells, args.batch_size):
                rows = np.arange(start, min(start + args.batch_size, part.n_cells))
                ids, values, mask = pad_batch(part, rows)
                pad = width - ids.shape[1]
                ids = torch.nn.functional.pad(ids, (0, pad))
                values = torch.nn.functional.pad(values, (0, pad))
                mask = torch.nn.functional.pad(mask, (0, pad))
                out[rows] = model(ids, values, mask).last_hidden_state[:, 0].numpy()
        return out

    methods = {"gc": gc_path, "sorted_full_forward": sorted_full, "naive_padded": naive}
    seconds = dict.fromkeys(methods, 0.0)
    outputs = {name: np.zeros((tokens.n_cells, config.hidden_size), np.float32) for name in methods}
    # Blocks of cells in input order, each embedded by every method in turn (rotating which goes first), so
    # that load from other processes on a shared machine falls on all of them alike.
    for i, start in enumerate(range(0, tokens.n_cells, args.block)):
        rows = np.arange(start, min(start + args.block, tokens.n_cells))
        part = tokens.subset(rows)
        names = list(methods)
        for name in names[i % 3 :] + names[: i % 3]:
            began = time.perf_counter()
            outputs[name][rows] = methods[name](part)
            seconds[name] += time.perf_counter() - began
        print(
            f"{rows[-1] + 1} cells: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
            file=sys.stderr,
        )

    n = tokens.n_cells
    print(
        json.dumps(
            {
                "input": args.input,
                "cells": int(n),
                "preset": args.preset,
                "batch_size": args.batch_size,
                "block": args.block,
                "torch_threads": torch.get_num_threads(),
                "tokens_per_cell": {"mean": float(lengths.mean()), "max": int(lengths.max())},
                "seconds": seconds,
                "cells_per_s": {name: n / s for name, s in seconds.items()},
                "speedup_vs_naive": {name: seconds["naive_padded"] / s for name, s in seconds.items()},
                "max_abs_diff_vs_naive": {
                    name: float(np.abs(outputs[name] - outputs["naive_padded"]).max()) for name in methods
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
