"""bench/gpu_check.sh --dry-run: the GPU check walks every step (device probe, `gc pretrain` under the
fast-SDPA restriction, the Geneformer-style step, `gc embed`, ZeRO-2, the report) on the CPU with tiny sizes,
so that a broken step is found here and not in the few minutes of a lent GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


@pytest.mark.slow
def test_gpu_check_dry_run_walks_every_step(tmp_path):
    env = dict(os.environ, VENV=str(Path(sys.executable).parent.parent), DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gc" / "torch_extensions"))
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True and report["figures"].startswith("CPU dry run")
    for step in ("device", "pretrain", "geneformer", "zero2", "embed"):
        assert "missing" not in report[step], step
    assert report["pretrain"]["zero_stage"] == 0 and report["zero2"]["zero_stage"] == 2
    assert report["pretrain"]["sdpa_backends_allowed"][:2] == ["FLASH_ATTENTION", "EFFICIENT_ATTENTION"]
    for step in ("pretrain", "zero2", "geneformer"):
        assert report[step]["tokens_per_s"] > 0 and report[step]["real_tokens_timed"] > 0
    assert report["embed"]["cells"] == 40 and report["embed"]["cells_per_s"] > 0
    assert report["ratio_gc_over_geneformer_style"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN on CPU" in table and "| gc embed | ok |" in table


def test_gpu_check_refuses_unknown_arguments():
    result = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown argument --bogus" in result.stderr


def test_gpu_check_without_a_gpu_fails_in_one_line(tmp_path):
    """Without --dry-run on a machine where torch sees no CUDA device the check stops at step 1."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = dict(os.environ, VENV=str(Path(sys.executable).parent.parent))
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "device", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("gpu_check: torch does not see a CUDA device")
