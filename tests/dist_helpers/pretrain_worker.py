"""Run ``genecompass.train.pretrain`` on a synthetic corpus, for tests that need their own processes.

Launched as ``python pretrain_worker.py ...``, under ``torchrun`` or under the ``deepspeed`` launcher (which
adds ``--local_rank``). ``--kill-at-step N`` SIGKILLs the process right after step N, as a crash would.
Each rank writes ``summary_rank{R}.json`` into the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root (genecompass/)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (dist_helpers/)

from dist_helpers.synthetic import FakeReference  # noqa: E402
from genecompass.train import PretrainConfig, pretrain  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--knowledge")
    parser.add_argument("--settings", default="{}", help="JSON object of PretrainConfig overrides")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int)
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank=N

    config = PretrainConfig.load("tiny").replace(**json.loads(args.settings))

    def progress(step: int, total: int, metrics: dict) -> None:
        if args.kill_at_step is not None and step == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    summary = pretrain(
        args.corpus,
        config,
        args.out,
        knowledge_dir=args.knowledge,
        resume=args.resume,
        progress=progress,
        reference=FakeReference(),
    )
    rank = int(os.environ.get("RANK", "0"))
    Path(args.out, f"summary_rank{rank}.json").write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
