"""Embedding throughput: gc's length-sorted batches vs a naive loop (cells in input order, each batch padded
to the model's maximum length, as the original GeneCompass pads to 2048).

Both embed the same tokenised cells with the same model (``small`` preset, untrained: speed does not depend
on the weights) in one process; prints JSON (cells/s of each, the ratio, and the largest difference between
the two sets of embeddings, which must be ~0).

    .venv/bin/python bench/bench_embed.py --input data/pbmc3k.h5ad --cells 1000
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()

    import anndata as ad
    import torch

    from genecompass.embed import TokenStream, embed_tokens, pad_batch
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
    started = time.perf_counter()
    sorted_out = embed_tokens(model, tokens, batch_size=args.batch_size)
    sorted_s = time.perf_counter() - started

    # Naive: input order, every batch padded to the model's maximum length.
    naive_out = np.zeros_like(sorted_out)
    width = config.max_position_embeddings
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, tokens.n_cells, args.batch_size):
            rows = np.arange(start, min(start + args.batch_size, tokens.n_cells))
            ids, values, mask = pad_batch(tokens, rows)
            pad = width - ids.shape[1]
            ids = torch.nn.functional.pad(ids, (0, pad))
            values = torch.nn.functional.pad(values, (0, pad))
            mask = torch.nn.functional.pad(mask, (0, pad))
            naive_out[rows] = model(ids, values, mask).last_hidden_state[:, 0].numpy()
    naive_s = time.perf_counter() - started

    print(
        json.dumps(
            {
                "input": args.input,
                "cells": int(tokens.n_cells),
                "preset": args.preset,
                "batch_size": args.batch_size,
                "torch_threads": torch.get_num_threads(),
                "tokens_per_cell": {"mean": float(lengths.mean()), "max": int(lengths.max())},
                "gc_sorted_cells_per_s": tokens.n_cells / sorted_s,
                "naive_padded_cells_per_s": tokens.n_cells / naive_s,
                "speedup": naive_s / sorted_s,
                "max_abs_diff": float(np.abs(sorted_out - naive_out).max()),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
