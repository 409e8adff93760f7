"""The SLURM recipes (containers/slurm/) run for real.

Without a scheduler: tokenize-array.sbatch run as plain shell, phase by phase, with the variables SLURM would
set (prepare, each array task, the merge); the merged corpus is byte-identical to one unsharded `gc tokenize`.
Bad input (a missing input, image, shard count) fails in the first seconds with one line.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "containers" / "slurm"
TOKENIZE = SLURM_DIR / "tokenize-array.sbatch"
PBMC3K = REPO / "data" / "pbmc3k.h5ad"
BIN = Path(sys.executable).parent


def recipe_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(DS_ACCELERATOR="cpu", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    env.update(settings)
    return env


def run_plain(script: Path, env: dict[str, str], cwd: Path, timeout: int = 300):
    command = ["bash", str(script)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def assert_same_tree(a: Path, b: Path) -> None:
    """Every file under a and b exists in both with identical bytes."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files_a], shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("unsharded") / "corpus.zarr"
    command = [str(BIN / "gc"), "tokenize", str(PBMC3K), "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True)
    return out


# ---- tokenize-array.sbatch as plain shell runs ----------------------------------------------------------


def test_tokenize_array_phases_as_shell_give_the_unsharded_corpus(tmp_path, unsharded):
    out = tmp_path / "corpus.zarr"
    settings = dict(INPUTS=str(PBMC3K), OUT_CORPUS=str(out), SHARDS="3", SLURM_SUBMIT_DIR=str(tmp_path))
    prepare = run_plain(TOKENIZE, recipe_env(**settings, SUBMIT="0"), tmp_path)
    assert prepare.returncode == 0, prepare.stderr
    work = tmp_path / "corpus.work"
    assert (work / "medians.tsv").is_file()
    for task in range(3):
        shard = run_plain(TOKENIZE, recipe_env(**settings, SLURM_ARRAY_TASK_ID=str(task)), tmp_path)
        assert shard.returncode == 0, shard.stderr
        assert (work / "shards" / f"part-{task}.zarr").is_dir()
    merge = run_plain(TOKENIZE, recipe_env(**settings, PHASE="merge"), tmp_path)
    assert merge.returncode == 0, merge.stderr
    assert_same_tree(out, unsharded)
    assert not (work / "shards").exists()  # removed after the merge (KEEP_SHARDS=1 keeps them)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"INPUTS": "/nonexistent/raw.h5ad"}, "gc-tokenize: input /nonexistent/raw.h5ad not found"),
        ({"INPUTS": ""}, "gc-tokenize: no INPUTS given"),
        ({"SIF": "/nonexistent/gc.sif"}, "gc-tokenize: image /nonexistent/gc.sif not found"),
        ({"SHARDS": "0"}, "gc-tokenize: SHARDS must be a positive integer"),
        ({"SLURM_ARRAY_TASK_ID": "1"}, "gc-tokenize: medians"),
        ({"PHASE": "merge"}, "gc-tokenize: shard"),
    ],
)
def test_tokenize_array_bad_input_fails_at_once_in_one_line(tmp_path, settings, message):
    base = dict(INPUTS=str(PBMC3K), OUT_CORPUS=str(tmp_path / "c.zarr"), SHARDS="2", SUBMIT="0")
    start = time.monotonic()
    result = run_plain(TOKENIZE, recipe_env(**{**base, **settings}), tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert time.monotonic() - start < 10
