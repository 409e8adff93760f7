"""Tokeniser of two source trees side by side, alternating, in the same minutes (run by hand).

Each tree's round runs in a fresh interpreter with the tree first on ``sys.path``: the gene mapping of the
input (first, so it includes building the reference's lookup tables), the minor page faults of one `--medians`
run, then `gc tokenize --medians` and `gc tokenize` end to end (``bench_tokenize.measure_rust``, which times
the whole call, start-up included) and the medians pass. The other tree needs its
own compiled extension, e.g. for session 2's tree:

    git worktree add /tmp/old fd0e18d
    (cd /tmp/old && maturin build --release -o /tmp/oldwheel)
    unzip -o -j /tmp/oldwheel/*.whl 'genecompass/_rust*.so' -d /tmp/old/genecompass

Usage: python bench/compare_trees.py OLD_TREE NEW_TREE INPUT.h5ad MEDIANS.tsv [--rounds 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

MEASURE = """
import json, os, resource, sys, tempfile, time
tree, path, medians = sys.argv[1:4]
sys.path.insert(0, tree)
import bench.bench_tokenize as b
import genecompass
assert genecompass.__file__.startswith(tree), genecompass.__file__
from genecompass.io import open_counts
from genecompass.reference import load_reference
from genecompass.tokenize import tokenize
out = {"tree": tree}
reference = load_reference()
with open_counts(path) as source:  # first: the reference's lookup tables are built on first use
    start = time.perf_counter()
    source.gene_map(reference)
    out["gene_map_seconds"] = round(time.perf_counter() - start, 2)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
with tempfile.TemporaryDirectory() as tmp:
    tokenize([path], os.path.join(tmp, "c.zarr"), medians=medians, reference=reference)
out["page_faults_with_medians"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
for name, args in (("tokenize_with_medians", (path, medians)), ("tokenize_end_to_end", (path,))):
    r = b.measure_rust(*args)
    out[name] = {"seconds": round(r["seconds"], 2), "cpu_seconds": round(r["cpu_seconds"], 2)}
with tempfile.TemporaryDirectory() as tmp:
    r = b.measure_medians(path, os.path.join(tmp, "m.tsv"))
out["medians_pass"] = {"seconds": round(r["seconds"], 2), "cpu_seconds": round(r["cpu_seconds"], 2)}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("input")
    parser.add_argument("medians")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trees = [str(Path(tree).resolve()) for tree in (args.old, args.new)]
    for _ in range(args.rounds):
        for tree in trees:
            result = subprocess.run(
                [sys.executable, "-c", MEASURE, tree, args.input, args.medians],
                cwd=tree, stdout=subprocess.PIPE, text=True, check=True,
            )
            print(result.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
