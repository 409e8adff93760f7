"""Tokeniser benchmark, run by hand (`make bench-tokenize`); results go to bench/RESULTS.md.

In one run, on PBMC3k and on Kang 2018 concatenated to >= 100,000 cells (uncompressed CSR h5ad, built once
into the cache), each measurement in its own subprocess so peak RSS is its own:
  - read only: stream the matrix through gc's reader (and raw h5py, the floor);
  - gc tokenize (Rust core), medians pass included;
  - the original GeneCompass approach (preprocess.py): a dense matrix normalised and median-divided as a
    whole, then a per-cell Python loop (non-zero genes, argsort, a token-dictionary lookup per gene), measured
    on a prefix of cells and reported as cells/s; also this script's earlier variant (per-cell normalisation
    and a full argsort over every gene of the dense row);
  - peak RSS of gc tokenize at 1x and 10x input;
  - shuffled random access: the corpus training reader vs AnnData backed row access on the same cells.

Usage: python bench/bench_tokenize.py [--cache DIR] [--copies 8] [--python-cells 2000] [--random-cells 2000]

Every measurement also reports the CPU seconds (user + system, all threads) of its timed part, and of its
whole process (imports included), so that timings taken on a busy machine can be read against the CPU work
they needed (cells per CPU second).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def concatenated(source: Path, copies: int, out: Path) -> Path:
    """``copies`` × the cells of ``source`` as one uncompressed CSR h5ad, like a large corpus file."""
    if out.exists():
        return out
    import anndata as ad
    import scipy.sparse as sp

    adata = ad.read_h5ad(source)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    big = ad.AnnData(X=sp.vstack([X] * copies, format="csr"), var=adata.var)
    big.obs_names = [f"{name}-{i}" for i in range(copies) for name in adata.obs_names]
    tmp = out.with_name(out.name + ".partial")
    big.write_h5ad(tmp)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------- single measurements (run in a subprocess)


def measure_read(path: str) -> dict:
    """gc's reader as `gc tokenize` drives it (same chunk size, reused buffers), doing nothing else."""
    from genecompass.io import open_counts
    from genecompass.tokenize import _BUFFER_SETS, TokenizeOptions

    start, cpu = time.perf_counter(), _cpu_seconds()
    n = 0
    with open_counts(path) as source:
        for chunk in source.iter_chunks(TokenizeOptions().chunk_size, reuse=_BUFFER_SETS):
            n += chunk.stop - chunk.start
    return {"cells": n, "seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu}


def measure_h5py_floor(path: str) -> dict:
    import h5py

    start, cpu = time.perf_counter(), _cpu_seconds()
    with h5py.File(path, "r") as f:
        X = f["X"]
        indptr = X["indptr"][:]
        step = 4096
        for lo in range(0, len(indptr) - 1, step):
            hi = min(lo + step, len(indptr) - 1)
            X["indices"][indptr[lo] : indptr[hi]]
            X["data"][indptr[lo] : indptr[hi]]
    cells, seconds = len(indptr) - 1, time.perf_counter() - start
    return {"cells": cells, "seconds": seconds, "cpu_seconds": _cpu_seconds() - cpu}


def measure_rust(path: str, medians_file: str | None = None) -> dict:
    """gc tokenize end to end (opening, reading, Rust, Zarr writing); with ``medians_file`` the medians pass
    is skipped, as in a sharded run."""
    from genecompass.tokenize import tokenize

    with tempfile.TemporaryDirectory(dir=os.environ.get("GC_BENCH_TMP")) as tmp:
        cpu = _cpu_seconds()
        summary = tokenize([path], Path(tmp) / "c.zarr", medians=medians_file)
        cpu = _cpu_seconds() - cpu
    return {
        "cells": summary["n_cells_read"],
        "seconds": summary["seconds"],
        "cpu_seconds": cpu,
        "tokens": summary["n_tokens"],
    }


def measure_medians(path: str, out: str) -> dict:
    from genecompass.reference import load_reference
    from genecompass.tokenize import compute_medians

    start, cpu = time.perf_counter(), _cpu_seconds()
    medians = compute_medians([path])
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    medians.save(out, load_reference())
    return {"cells": None, "seconds": seconds, "cpu_seconds": cpu}


def _python_inputs(path: str, medians_file: str):
    from genecompass.io import open_counts
    from genecompass.medians import Medians
    from genecompass.reference import load_reference

    medians = Medians.load(medians_file).values
    with open_counts(path) as source:
        gene_map = source.gene_map(load_reference())
    in_vocab = gene_map.col_token != np.iinfo(np.uint32).max
    gene_ids = [g if ok else None for g, ok in zip(gene_map.gene_ids, in_vocab)]
    token_dict = {g: int(t) for g, t in zip(gene_ids, gene_map.col_token) if g is not None}
    gene_median = np.where(in_vocab, medians[np.minimum(gene_map.col_token, len(medians) - 1)], np.nan)
    return in_vocab, gene_ids, token_dict, gene_median


def measure_python_loop(path: str, n_cells: int, medians_file: str) -> dict:
    """The original preprocess.py: the cells as a dense matrix restricted to the genes of the token
    dictionary; normalisation (library size, as gc does by default; the original left that line commented
    out) and the median division over the whole matrix (genes without a median divide by 1, as there);
    log2(1 + x) over the whole matrix; then one cell at a time (``tokenize_cell``): the non-zero genes,
    ``argsort(-value)``, a token-dictionary lookup per gene, the top 2,048 into dense output arrays."""
    import anndata as ad

    in_vocab, gene_ids, token_dict, gene_median = _python_inputs(path, medians_file)
    columns = np.flatnonzero(in_vocab)
    gene_list = np.array([gene_ids[c] for c in columns], dtype=object)
    median = np.nan_to_num(gene_median[columns], nan=1.0)
    adata = ad.read_h5ad(path, backed="r")
    start, cpu = time.perf_counter(), _cpu_seconds()
    dense = adata.X[:n_cells].toarray()
    total = dense.sum(axis=1, keepdims=True)
    matrix = dense / np.where(total > 0, total, 1) * 1e4
    matrix = matrix[:, columns] / median
    matrix = np.log2(1 + matrix)
    input_ids = np.zeros((n_cells, 2048))
    values = np.zeros((n_cells, 2048))
    for index, row in enumerate(matrix):  # one cell at a time, as preprocess.py does
        nonzero = np.nonzero(row)[0]
        order = np.argsort(-row[nonzero])
        genes = gene_list[nonzero][order][:2048]
        ids = [token_dict[g] for g in genes]
        input_ids[index, : len(ids)] = ids
        values[index, : len(ids)] = row[nonzero][order][:2048]
    return {"cells": n_cells, "seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu}


def measure_python_loop_full_argsort(path: str, n_cells: int, medians_file: str) -> dict:
    """This script's earlier baseline (kept for comparison with older results): per-cell normalisation of the
    dense row and a full argsort over every gene of the row, then a token-dictionary lookup per kept gene."""
    import anndata as ad

    in_vocab, gene_ids, token_dict, gene_median = _python_inputs(path, medians_file)
    adata = ad.read_h5ad(path, backed="r")
    start, cpu = time.perf_counter(), _cpu_seconds()
    dense = adata.X[:n_cells].toarray()
    for row in dense:
        x = row / row.sum() * 1e4
        value = np.log2(1 + x / gene_median)
        value[~(row > 0) | ~np.isfinite(value)] = 0
        order = np.argsort(-value)
        order = order[value[order] > 0][:2048]
        _ = [token_dict[gene_ids[i]] for i in order], value[order].tolist()
    return {"cells": n_cells, "seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu}


def measure_random_access(corpus: str, h5ad: str, n: int) -> dict:
    """Shuffled access to n cells: the training reader (block-shuffled sampler order, block cache), single
    random cells straight from the corpus, and AnnData backed rows in the same orders."""
    import anndata as ad

    from genecompass.corpus import Corpus
    from genecompass.data import CorpusDataset, TokenBudgetBatchSampler

    corpus_obj = Corpus(corpus)
    dataset = CorpusDataset(corpus_obj, max_length=2049)
    sampler = TokenBudgetBatchSampler(
        dataset.lengths, max_tokens=16384, seed=0, block_size=dataset.block_cells
    )
    shuffled = [i for batch in sampler for i in batch][:n]
    uniform = np.random.default_rng(0).choice(corpus_obj.n_cells, size=n, replace=False)
    adata = ad.read_h5ad(h5ad, backed="r")
    result = {"cells": n}
    start = time.perf_counter()
    for i in shuffled:
        dataset[int(i)]
    result["training_reader_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    for i in shuffled:
        adata.X[int(i)]
    result["anndata_backed_same_order_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    for i in uniform:
        corpus_obj.read_cells(int(i), int(i) + 1)
    result["corpus_uniform_random_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    for i in uniform:
        adata.X[int(i)]
    result["anndata_backed_uniform_random_seconds"] = time.perf_counter() - start
    return result


MODES = {
    "read": measure_read,
    "h5py": measure_h5py_floor,
    "rust": measure_rust,
    "medians": measure_medians,
    "python": measure_python_loop,
    "python_full_argsort": measure_python_loop_full_argsort,
    "random": measure_random_access,
}


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM; unlike ru_maxrss it does not inherit the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads, imports included)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_with_rss(mode: str, *args) -> dict:
    """One measurement in a fresh interpreter, with that process's own peak RSS (MiB)."""
    code = (
        f"import json,sys; sys.path.insert(0, {str(REPO)!r}); import bench.bench_tokenize as b; "
        f"r = b.MODES[{mode!r}](*{list(args)!r}); r['peak_rss_mib'] = round(b._peak_rss_mib(), 1); "
        f"r['process_cpu_seconds'] = round(b._cpu_seconds(), 2); print(json.dumps(r))"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO, check=True
    ).stdout
    result = json.loads(output.strip().splitlines()[-1])
    if result.get("cells") and "seconds" in result:
        result["cells_per_s"] = round(result["cells"] / result["seconds"], 1)
    if result.get("cells") and result.get("cpu_seconds"):
        result["cells_per_cpu_s"] = round(result["cells"] / result["cpu_seconds"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_cache = Path(os.environ.get("GC_CACHE", Path.home() / ".cache/gc"))
    parser.add_argument("--cache", type=Path, default=default_cache)
    parser.add_argument("--copies", type=int, default=8, help="Kang copies (13,576 cells each)")
    parser.add_argument("--python-cells", type=int, default=2000)
    parser.add_argument("--random-cells", type=int, default=2000)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "scripts"))
    from fetch_kang import fetch_kang

    args.cache.mkdir(parents=True, exist_ok=True)
    kang = Path(fetch_kang(args.cache))
    kang_1x = concatenated(kang, 1, args.cache / "kang_x1.h5ad")
    kang_big = concatenated(kang, args.copies, args.cache / f"kang_x{args.copies}.h5ad")
    kang_10x = concatenated(kang, 10, args.cache / "kang_x10.h5ad")
    pbmc = str(REPO / "data/pbmc3k.h5ad")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in (("pbmc3k", pbmc), (f"kang_x{args.copies}", str(kang_big))):
            medians = str(Path(tmp) / f"{name}.medians.tsv")
            results[name] = {
                "h5py_floor": run_with_rss("h5py", path),
                "read": run_with_rss("read", path),
                "medians_pass": run_with_rss("medians", path, medians),
                "tokenize_with_medians": run_with_rss("rust", path, medians),
                "tokenize_end_to_end": run_with_rss("rust", path),
                "python_loop": run_with_rss("python", path, args.python_cells, medians),
                "python_loop_full_argsort": run_with_rss(
                    "python_full_argsort", path, args.python_cells, medians
                ),
            }
        results["rss_scaling"] = {
            "kang_x1": run_with_rss("rust", str(kang_1x)),
            "kang_x10": run_with_rss("rust", str(kang_10x)),
        }
        from genecompass.tokenize import tokenize

        corpus = Path(tmp) / "kang.zarr"
        tokenize([str(kang_big)], corpus)
        results["random_access"] = run_with_rss("random", str(corpus), str(kang_big), args.random_cells)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
