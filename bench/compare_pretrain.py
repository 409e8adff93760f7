"""Pre-training throughput of two source trees side by side, alternating, in the same minutes (run by hand).

The pre-training sibling of ``bench/compare_trees.py``. Each round runs ``gc pretrain`` from each tree in a
fresh interpreter (the tree first on ``sys.path``) for ``--steps`` steps on the same corpus, knowledge and
config, then reads the run's ``train_log.csv``: real (unpadded) tokens per second between the first log row
and the last, so start-up, DeepSpeed's op build and the first steps are not counted. Config keys a tree does
not know (e.g. ``id_head`` in a tree older than it) are dropped for that tree and reported, so each tree
runs the recipe as far as it can express it. A tree without a compiled extension gets a copy of this
tree's (pre-training does not call it).

    git worktree add /tmp/old 18784b5      # the tree issue 14 was filed against
    python bench/compare_pretrain.py /tmp/old . pretrain.zarr bench/configs/cpu_pretrain.yaml \\
        --knowledge knowledge --steps 40 --rounds 2

Prints one JSON line per tree and round.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import dataclasses, json, sys
import yaml
tree, config_path, out_config = sys.argv[1:4]
sys.path.insert(0, tree)
import genecompass
assert genecompass.__file__.startswith(tree), genecompass.__file__
from genecompass.train import PretrainConfig
from genecompass.model import GeneCompassConfig
known = {f.name for f in dataclasses.fields(PretrainConfig)}
model_known = set(GeneCompassConfig().to_dict())
config = yaml.safe_load(open(config_path))
dropped = sorted(k for k in config if k not in known)
overrides = config.get("model_overrides", {})
dropped += sorted(f"model_overrides.{k}" for k in overrides if k not in model_known)
config = {k: v for k, v in config.items() if k in known}
if "model_overrides" in config:
    config["model_overrides"] = {k: v for k, v in overrides.items() if k in model_known}
yaml.safe_dump(config, open(out_config, "w"))
print(json.dumps(dropped))
"""

PRETRAIN = """
import sys
tree = sys.argv.pop(1)
sys.path.insert(0, tree)
from cli.app import main
sys.argv[0] = "gc"
main()
"""


def real_tokens_per_second(log: Path) -> tuple[float, int]:
    rows = list(csv.DictReader(log.open()))
    if len(rows) < 2:
        raise SystemExit(f"{log}: fewer than two log rows; ask for more --steps")
    first, last = rows[0], rows[-1]
    tokens = float(last["tokens"]) - float(first["tokens"])
    return tokens / (float(last["elapsed"]) - float(first["elapsed"])), int(last["step"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("corpus")
    parser.add_argument("config")
    parser.add_argument("--knowledge", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trees = [Path(tree).resolve() for tree in (args.old, args.new)]
    here = Path(__file__).resolve().parents[1]
    for tree in trees:
        if not list((tree / "genecompass").glob("_rust*.so")):
            for so in (here / "genecompass").glob("_rust*.so"):
                shutil.copy2(so, tree / "genecompass" / so.name)
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for index, tree in enumerate(trees):
                config = Path(tmp) / f"config_{index}.yaml"
                dropped = (
                    subprocess.run(
                        [sys.executable, "-c", RUN, str(tree), args.config, str(config)],
                        cwd=tree,
                        stdout=subprocess.PIPE,
                        text=True,
                        check=True,
                    )
                    .stdout.strip()
                    .splitlines()[-1]
                )
                out = Path(tmp) / f"run_{index}_{round_}"
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        PRETRAIN,
                        str(tree),
                        "pretrain",
                        "--corpus",
                        str(Path(args.corpus).resolve()),
                        "--config",
                        str(config),
                        "--knowledge",
                        str(Path(args.knowledge).resolve()),
                        "--out",
                        str(out),
                        "--max-steps",
                        str(args.steps),
                    ],
                    cwd=tree,
                    stdout=subprocess.DEVNULL,
                    check=True,
                )
                rate, steps = real_tokens_per_second(out / "train_log.csv")
                row = {
                    "tree": str(tree),
                    "round": round_,
                    "steps": steps,
                    "real_tokens_per_s": round(rate, 1),
                    "dropped_config_keys": json.loads(dropped),
                }
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
