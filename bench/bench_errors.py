"""Time and peak memory of `gc` calls that fail on bad input (issue 15: the error within 3 s and 300 MB).

Each call runs in a fresh process through the real entry point (``python -m cli.app``); wall time and peak
RSS come from ``os.wait4`` for that process alone (this script imports nothing heavy itself: Linux carries a
parent's peak RSS into a forked child). Inputs: the bundled PBMC3k, a corpus tokenised from it, and a run
directory that passes every torch-free check (``gc_run.json`` for the installed reference, medians, config)
but holds no weights: what these calls measure is how soon the error arrives.

    python bench/bench_errors.py                      # this tree
    python bench/bench_errors.py --tree /tmp/old_tree  # another checkout (e.g. `git archive` of a commit)
    python bench/bench_errors.py --json bench/results_errors.json
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

REPO = Path(__file__).resolve().parents[1]
PBMC3K = REPO / "data" / "pbmc3k.h5ad"
SOURCE, TARGET = "CD14 Monocytes", "FCGR3A Monocytes"


def fake_run(directory: Path) -> Path:
    from genecompass.reference import load_reference
    from genecompass.run import FORMAT_NAME, FORMAT_VERSION, MEDIANS_FILE, RUN_INFO

    model = directory / "run" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / MEDIANS_FILE).write_text("")
    (model / RUN_INFO).write_text(
        json.dumps(
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "reference_hash": load_reference().hash,
                "medians_hash": "0",
                "normalisation": {"library_size": True, "target_sum": 1e4},
                "top_k": 2048,
                "max_length": 129,
            }
        )
    )
    return model.parent


def calls(work: Path, run: Path, corpus: Path) -> list[tuple[str, list[str]]]:
    (work / "notmodel").mkdir(exist_ok=True)
    (work / "unknown.txt").write_text("NOTAGENE1\nNOTAGENE2\n")
    states = ["--source", SOURCE, "--target", TARGET]
    return [
        (
            "embed --model notmodel/",
            ["embed", "--model", work / "notmodel", PBMC3K, "--out", work / "e.h5ad"],
        ),
        (
            "perturb --overexpress NOTAGENE1",
            ["perturb", "--model", run, corpus, "--overexpress", "NOTAGENE1", *states, "--out", work / "p"],
        ),
        ("pretrain --corpus pbmc3k.h5ad", ["pretrain", "--corpus", PBMC3K, "--out", work / "r"]),
        (
            "perturb screen --genes unknown.txt",
            ["perturb", "screen", "--model", run, corpus, *states, "--genes", work / "unknown.txt",
             "--out", work / "s"],
        ),
        (
            "finetune celltype --label-key nokey",
            ["finetune", "celltype", "--model", run, "--train", PBMC3K, "--label-key", "nokey",
             "--out", work / "f"],
        ),
        (
            "predict --model notmodel/",
            ["predict", "--model", work / "notmodel", PBMC3K, "--out", work / "x.h5ad"],
        ),
        (
            "grn infer --genes unknown.txt",
            ["grn", "infer", "--model", run, corpus, "--genes", work / "unknown.txt",
             "--out", work / "g.tsv"],
        ),
    ]


def measure(tree: Path, argv: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "DS_ACCELERATOR": "cpu"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.app", *map(str, argv)],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stderr = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
        "stderr_lines": len(lines),
        "last_line": lines[-1] if lines else "",
    }


def prepare(work: Path) -> None:
    """The corpus and the run directory (in a child process, so that this one stays small)."""
    from genecompass.tokenize import TokenizeOptions, tokenize

    tokenize([PBMC3K], work / "pbmc3k.zarr", options=TokenizeOptions(obs_keys=("cell_type",)))
    fake_run(work)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", type=Path, default=REPO, help="The gc source tree to run (PYTHONPATH).")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    with tempfile.TemporaryDirectory(prefix="gc-bench-errors-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, __file__, "--prepare", str(work)], check=True, env=env)
        rows = []
        for name, argv in calls(work, work / "run", work / "pbmc3k.zarr"):
            row = {"call": f"gc {name}", **measure(args.tree.resolve(), argv, work)}
            rows.append(row)
            print(
                f"| `{row['call']}` | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} | {row['exit_code']} | "
                f"{row['stderr_lines']} | {row['last_line'][:90]} |",
                flush=True,
            )
    if args.json:
        payload = {"tree": str(args.tree), "cpus": os.cpu_count(), "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")

if __name__ == "__main__":
    main()
