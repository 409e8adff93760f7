"""A Base-shaped published GeneCompass checkpoint in gc: import time, and embedding throughput of `gc embed`'s
path against the original's way, side by side in one process.

The checkpoint is written in the original's layout (state-dict keys and shapes of GeneCompass-Base as the
original code writes them, `tests/data/genecompass_fixture/keys_base.json`) with random weights: speed does
not depend on them. Its token dictionary holds 50,558 real Ensembl IDs (the published vocabulary's size): the
genes of the input first, then other human and mouse genes of gc's reference. The medians are random.

Both methods embed the same cells, tokenised once by gc with the imported run's vocabulary and medians, with
the same imported model, mean of gene outputs (the original scripts' pooling), same batch size and threads:

- ``gc``: ``genecompass.embed.embed_tokens`` (what ``gc embed --pool mean`` runs): length-sorted batches
  padded to their longest cell, padding masked, inference mode;
- ``original_way``: cells in input order, fixed batches, every cell zero-padded to 2,048 genes and fed
  without an attention mask (``downstream_tasks/*/EmbeddingGenerator.py``), under ``no_grad``. Padding is
  attended to, so its embeddings differ from gc's: the difference is reported, not asserted.

    .venv/bin/python bench/bench_import.py --cells 12 --batch-size 4 > bench/results_import.json

The methods run A B B A and the mean of each pair is reported. With random weights of std 0.02 the
attention outputs are small, so the unmasked padding barely moves the embeddings here; with trained
weights it does.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "genecompass_fixture"


def write_base_checkpoint(directory: Path, genes: list[str], seed: int = 0) -> None:
    import torch

    directory.mkdir(parents=True)
    config = json.loads((FIXTURE / "config_base.json").read_text())
    shapes = json.loads((FIXTURE / "keys_base.json").read_text())
    kept = genes[: config["vocab_size"] - 2]
    token_dict = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(kept)}}
    assert len(token_dict) == config["vocab_size"], len(token_dict)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith(("position_ids", "homologous_index")):
            n = shape[-1]
            state[key] = torch.arange(n).reshape(shape)
        elif key == "emb_warmup.steps":
            state[key] = torch.tensor(0)
        elif key == "emb_warmup.alpha":
            state[key] = torch.tensor(1.0)
        else:
            state[key] = torch.randn(shape, generator=generator) * 0.02
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"]
    state["cls4value.predictions.decoder.bias"] = state["cls4value.predictions.bias"]
    for name in ("promoter", "co_exp", "gene_family", "peca_grn"):
        state[f"bert.embeddings.{name}_knowledge"][:2] = 0.0
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "token_dict.pickle").write_bytes(pickle.dumps(token_dict))
    rng = np.random.default_rng(seed)
    medians = {g: float(rng.uniform(0.5, 3.0)) for g in token_dict if not g.startswith("<")}
    (directory / "medians.pickle").write_bytes(pickle.dumps(medians))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default="data/pbmc3k.h5ad")
    parser.add_argument("--cells", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args()

    import anndata as ad
    import torch

    from genecompass.embed import TokenStream, embed_tokens, pad_batch
    from genecompass.formats import import_genecompass
    from genecompass.reference import load_reference
    from genecompass.run import load_run

    if args.threads:
        torch.set_num_threads(args.threads)
    reference = load_reference()
    adata = ad.read_h5ad(args.input, backed="r")
    ordered = dict.fromkeys(adata.var_names)  # the input's genes first, then the rest of the reference
    for species in ("human", "mouse"):
        table = reference.genes(species)
        ordered.update(dict.fromkeys(table.index[table["token_id"] >= 0]))
    genes = list(ordered)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_base_checkpoint(tmp / "ckpt", genes)
        began = time.perf_counter()
        import_genecompass(tmp / "ckpt", tmp / "ckpt" / "token_dict.pickle", tmp / "run",
                           medians_path=tmp / "ckpt" / "medians.pickle")
        import_seconds = time.perf_counter() - began
        run = load_run(tmp / "run")
        cells = adata[: args.cells].to_memory()
        with TokenStream(cells, run) as stream:
            tokens = stream.read_all()
    model = run.model
    hidden = model.config.hidden_size

    def gc_path() -> np.ndarray:
        return embed_tokens(model, tokens, pool="mean", batch_size=args.batch_size)

    def original_way() -> np.ndarray:  # EmbeddingGenerator: padded to 2,048 genes, no attention mask
        out = np.zeros((tokens.n_cells, hidden), np.float32)
        width = model.config.max_sequence_length
        with torch.no_grad():
            for start in range(0, tokens.n_cells, args.batch_size):
                rows = np.arange(start, min(start + args.batch_size, tokens.n_cells))
                ids, values, _ = pad_batch(tokens, rows)
                ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]))
                values = torch.nn.functional.pad(values, (0, width - values.shape[1]))
                states = model(ids, values, torch.ones_like(ids, dtype=torch.bool)).last_hidden_state
                lengths = torch.as_tensor(tokens.lengths[rows])[:, None]  # genes + species
                real = (torch.arange(width)[None, 1:] < lengths).unsqueeze(-1)
                out[rows] = ((states[:, 1:] * real).sum(1) / real.sum(1)).numpy()
        return out

    methods = {"original_way": original_way, "gc": gc_path}
    seconds, outputs = dict.fromkeys(methods, 0.0), {}
    # A B B A: load from other processes on a shared machine falls on both alike
    for name in ("original_way", "gc", "gc", "original_way"):
        began = time.perf_counter()
        outputs[name] = methods[name]()
        seconds[name] += (time.perf_counter() - began) / 2
        print(f"{name}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
    n = tokens.n_cells
    print(json.dumps({
        "input": args.input,
        "cells": int(n),
        "shape": "GeneCompass-Base (12 layers x 768, 12 heads, vocabulary 50,558, knowledge 4 x 768)",
        "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(),
        "genes_per_cell": {"mean": float(tokens.lengths.mean() - 1), "max": int(tokens.lengths.max() - 1)},
        "import_seconds": import_seconds,
        "seconds": seconds,
        "cells_per_s": {k: n / v for k, v in seconds.items()},
        "speedup_vs_original_way": seconds["original_way"] / seconds["gc"],
        "max_abs_diff_vs_original_way": float(np.abs(outputs["gc"] - outputs["original_way"]).max()),
    }, indent=2))


if __name__ == "__main__":
    main()
