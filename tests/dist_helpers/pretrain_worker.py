"""Run ``genecompass.train.pretrain`` on a synthetic corpus, for tests that need their own processes.

Launched as ``python pretrain_worker.py ...``, under ``torchrun`` or under the ``deepspeed`` launcher (which
adds ``--local_rank``). ``--kill-at-step N`` SIGKILLs the process right after step N, as a crash would;
``--term-rank1-at-step N`` has rank 0 send SIGTERM to rank 1 alone after step N (a stop only one rank sees).
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
    parser.add_argument("--term-rank1-at-step", type=int)
    args, _ = parser.parse_known_args()  # the deepspeed launcher adds --local_rank=N

    config = PretrainConfig.load("tiny").replace(**json.loads(args.settings))
    rank = int(os.environ.get("RANK", "0"))
    pid_file = Path(args.out).parent / f"{Path(args.out).name}.pid_rank{rank}"
    pid_file.write_text(str(os.getpid()))

    def progress(step: int, total: int, metrics: dict) -> None:  # rank 0 only
        if args.kill_at_step is not None and step == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.term_rank1_at_step is not None and step == args.term_rank1_at_step:
            os.kill(int(pid_file.with_name(f"{Path(args.out).name}.pid_rank1").read_text()), signal.SIGTERM)

    summary = pretrain(
        args.corpus,
        config,
        args.out,
        knowledge_dir=args.knowledge,
        resume=args.resume,
        progress=progress,
        reference=FakeReference(),
    )
    Path(args.out, f"summary_rank{rank}.json").write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
