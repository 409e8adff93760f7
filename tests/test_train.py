"""Pre-training: config presets, the DeepSpeed loop, outputs, determinism, crash-resume, multi-rank
equivalence, and learning on real data (PBMC3k)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed picks its accelerator at import; keep it on CPU even on a GPU machine, and cache its JIT op.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gc" / "torch_extensions"))

from dist_helpers.synthetic import FakeReference, make_corpus, make_knowledge  # noqa: E402

from genecompass.errors import InputError, OutputExistsError, ReferenceMismatchError  # noqa: E402
from genecompass.train import (  # noqa: E402
    PretrainConfig,
    deepspeed_config,
    distributed_environment,
    latest_checkpoint,
    lr_lambda,
    pretrain,
    read_log,
)

REF = FakeReference()
WORKER = REPO / "tests" / "dist_helpers" / "pretrain_worker.py"
BIN = Path(sys.executable).parent
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
# Small, fast runs: ~10 micro-batches per epoch of 200 synthetic cells.
QUICK = {"max_tokens": 512, "warmup_steps": 2, "log_every": 1}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "corpus": make_corpus(root / "corpus.zarr", REF, n_cells=200, seed=0),
        "knowledge": make_knowledge(root / "knowledge", REF),
    }


def quick_config(**settings) -> PretrainConfig:
    return PretrainConfig.load("tiny").replace(**{**QUICK, **settings})


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        TORCH_EXTENSIONS_DIR=os.environ["TORCH_EXTENSIONS_DIR"],
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # ninja (DeepSpeed's JIT) and the launchers
        PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
    )
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_worker(
    launcher: list[str], synthetic, out: Path, settings: dict, *extra: str
) -> subprocess.CompletedProcess:
    command = [
        *launcher,
        str(WORKER),
        "--corpus",
        str(synthetic["corpus"]),
        "--out",
        str(out),
        "--knowledge",
        str(synthetic["knowledge"]),
        "--settings",
        json.dumps({**QUICK, **settings}),
        *extra,
    ]
    return subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=300)


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )


def model_weights(out: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(out / "model" / "model.safetensors")


def max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


# ---------------------------------------------------------------------------------------------- config


def test_presets_load_and_validate(tmp_path):
    for name in ("tiny", "small", "base"):
        config = PretrainConfig.load(name)
        assert config.model == name
    base = PretrainConfig.load("base")
    assert (base.lr, base.weight_decay, base.decay) == (5e-5, 0.01, "linear")  # the original's settings
    assert PretrainConfig.load("tiny", max_steps=7, seed=None).max_steps == 7  # None = keep the preset's
    custom = tmp_path / "mine.yaml"
    custom.write_text("model: tiny\nlr: 3.0e-4\nzero_stage: 2\nmodel_overrides: {hidden_dropout_prob: 0.0}\n")
    assert PretrainConfig.load(custom).zero_stage == 2
    custom.write_text("model: tiny\nlearning_rate: 3.0e-4\n")
    with pytest.raises(InputError, match="unknown setting.*learning_rate"):
        PretrainConfig.load(custom)
    with pytest.raises(InputError, match="no such config"):
        PretrainConfig.load("medium")
    for bad, message in [
        ({"zero_stage": 4}, "zero_stage"),
        ({"decay": "step"}, "decay"),
        ({"max_steps": 0}, "max_steps"),
        ({"model": "huge"}, "model"),
    ]:
        with pytest.raises(InputError, match=message):
            PretrainConfig.load("tiny").replace(**bad)


def test_learning_rate_schedule():
    config = PretrainConfig(warmup_steps=10, max_steps=110, decay="linear", min_lr_ratio=0.1)
    multiplier = lr_lambda(config)
    assert multiplier(0) < multiplier(5) < multiplier(9) < 1.0
    assert multiplier(10) == pytest.approx(1.0)
    assert multiplier(60) == pytest.approx(0.55)
    assert multiplier(110) == pytest.approx(0.1)
    cosine = lr_lambda(PretrainConfig(warmup_steps=0, max_steps=100, decay="cosine"))
    assert cosine(50) == pytest.approx(0.5) and cosine(100) == pytest.approx(0.0)


def test_deepspeed_config_uses_torch_adam_on_cpu():
    config = PretrainConfig(zero_stage=2, grad_accum=4, lr=2e-4, grad_clip=0.5)
    ds = deepspeed_config(config, on_cpu=True, bf16=False)
    assert ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["zero_optimization"]["stage"] == 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert deepspeed_config(config, on_cpu=False, bf16=True)["optimizer"]["params"]["torch_adam"] is False


def test_distributed_environment_without_launcher_and_under_slurm(monkeypatch):
    for key in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_NTASKS",
        "SLURM_LOCALID",
        "SLURM_JOB_NODELIST",
        "SLURM_NODELIST",
        "SLURM_JOB_ID",
    ):
        monkeypatch.delenv(key, raising=False)
    with distributed_environment() as ranks:
        assert ranks == {"rank": 0, "local_rank": 0, "world_size": 1}
        assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    assert "RANK" not in os.environ and "MASTER_PORT" not in os.environ  # restored

    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu017")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    with distributed_environment() as ranks:
        assert ranks == {"rank": 5, "local_rank": 1, "world_size": 8}
        assert os.environ["MASTER_ADDR"] == "gpu017"
        assert os.environ["MASTER_PORT"] == str(29500 + 4242 % 1000)

    monkeypatch.setenv("RANK", "1")  # a launcher (torchrun inside srun) wins over SLURM's variables
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with distributed_environment() as ranks:
        assert ranks == {"rank": 1, "local_rank": 1, "world_size": 2}


# ------------------------------------------------------------------------------------------- single process


SIX_STEPS = {"max_steps": 6, "save_every": 4, "keep_checkpoints": 1}


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, synthetic):
    """A 6-step single-process run with knowledge (dropout on): (run directory, summary, progress calls)."""
    out = tmp_path_factory.mktemp("six_steps") / "a"
    seen = []
    summary = pretrain(
        synthetic["corpus"],
        quick_config(**SIX_STEPS),
        out,
        knowledge_dir=synthetic["knowledge"],
        reference=REF,
        progress=lambda step, total, metrics: seen.append((step, total)),
    )
    return out, summary, seen


def test_pretrain_outputs_and_determinism(tmp_path, synthetic, six_steps):
    from genecompass.model import GeneCompassForPretraining

    config = quick_config(**SIX_STEPS)
    out, summary, seen = six_steps
    assert seen == [(s, 6) for s in range(1, 7)]
    assert summary["steps"] == 6 and summary["world_size"] == 1 and summary["tokens"] > 0
    rows = read_log(out / "train_log.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(rows[0]) == {
        "step",
        "loss",
        "id_loss",
        "value_loss",
        "lr",
        "tokens",
        "tokens_per_s",
        "elapsed",
    }
    for row in rows:
        assert row["loss"] == pytest.approx(0.2 * row["id_loss"] + 0.8 * row["value_loss"])
    assert (out / "loss_curve.png").stat().st_size > 0
    assert latest_checkpoint(out).name == "step_6"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_6"]  # keep_checkpoints=1

    model = GeneCompassForPretraining.from_pretrained(out / "model")  # knowledge from the recorded dir
    assert model.config.reference_hash == REF.hash
    assert set(model.config.knowledge_tables) == {"grn", "promoter", "gene_family", "coexpression"}
    assert (out / "model" / "knowledge.json").is_file()

    again = pretrain(
        synthetic["corpus"], config, tmp_path / "b", knowledge_dir=synthetic["knowledge"], reference=REF
    )
    assert [r["loss"] for r in read_log(tmp_path / "b" / "train_log.csv")] == [r["loss"] for r in rows]
    assert again["loss"] == summary["loss"]
    assert max_difference(model_weights(out), model_weights(tmp_path / "b")) == 0.0


def test_stop_signal_saves_after_the_step_and_resume_continues_the_same_trajectory(
    tmp_path, synthetic, six_steps
):
    """SIGUSR1 (the recipes' --signal=B:USR1@N; SIGTERM takes the same path) during step 2: the run finishes
    step 3 (the stop vote rides on the next step's all-reduce), checkpoints it, says so and writes no final
    model; resuming gives the uninterrupted run's losses and weights (dropout on: RNG state restored)."""
    import signal

    config = quick_config(**{**SIX_STEPS, "save_every": 100})  # no checkpoint but the stop's before step 6
    corpus, knowledge = synthetic["corpus"], synthetic["knowledge"]
    straight = six_steps[0]

    def signal_at_step_2(step: int, total: int, metrics: dict) -> None:
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
    run = tmp_path / "stopped"
    stopped = pretrain(corpus, config, run, knowledge_dir=knowledge, reference=REF, progress=signal_at_step_2)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)) == before
    assert stopped["stopped"] == "SIGUSR1" and stopped["steps"] == 3
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_3"]
    assert not (run / "model").exists()
    resumed = pretrain(corpus, config, run, knowledge_dir=knowledge, reference=REF, resume=True)
    assert resumed["stopped"] is None and resumed["resumed_from"].endswith("step_3")
    ours = read_log(run / "train_log.csv")
    assert [r["step"] for r in ours] == list(range(1, 7))
    for a, b in zip(read_log(straight / "train_log.csv"), ours, strict=True):
        for key in ("loss", "id_loss", "value_loss", "lr", "tokens"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    assert max_difference(model_weights(straight), model_weights(run)) <= 1e-6


def test_pretrain_refuses_bad_inputs(tmp_path, synthetic):
    config = quick_config(max_steps=1)
    pretrain(synthetic["corpus"], config, tmp_path / "run", reference=REF)  # no knowledge: allowed
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite"):
        pretrain(synthetic["corpus"], config, tmp_path / "run", reference=REF)
    with pytest.raises(ReferenceMismatchError, match="re-tokenise"):
        pretrain(synthetic["corpus"], config, tmp_path / "other", reference=FakeReference(hash="another"))
    with pytest.raises(InputError, match="longest cell"):
        pretrain(synthetic["corpus"], config.replace(max_tokens=8), tmp_path / "small", reference=REF)


# ---------------------------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_same_trajectory(tmp_path, synthetic):
    settings = {"max_steps": 14, "save_every": 5}  # dropout on: the RNG state must be restored too
    python = [sys.executable]
    check(run_worker(python, synthetic, tmp_path / "straight", settings))

    crashed = tmp_path / "crashed"
    result = run_worker(python, synthetic, crashed, settings, "--kill-at-step", "8")
    assert result.returncode == -9, result.stderr[-3000:]  # SIGKILL, after the checkpoint at step 5
    assert latest_checkpoint(crashed).name == "step_5"
    (crashed / "checkpoints" / ".step_10.partial").mkdir()  # as if killed while writing a checkpoint
    check(run_worker(python, synthetic, crashed, settings, "--resume"))

    summary = json.loads((crashed / "summary_rank0.json").read_text())
    assert summary["resumed_from"].endswith("step_5")
    straight, resumed = read_log(tmp_path / "straight" / "train_log.csv"), read_log(crashed / "train_log.csv")
    assert [r["step"] for r in resumed] == list(range(1, 15))
    for a, b in zip(straight, resumed, strict=True):
        for key in ("loss", "id_loss", "value_loss", "lr", "tokens"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    assert max_difference(model_weights(tmp_path / "straight"), model_weights(crashed)) <= 1e-6
    assert not (crashed / "checkpoints" / ".step_10.partial").exists()


@pytest.fixture(scope="module")
def single_process_reference(tmp_path_factory, synthetic):
    """One process with 2-step accumulation: the same global batches as 2 ranks without accumulation."""
    out = tmp_path_factory.mktemp("reference") / "run"
    check(
        run_worker(
            [sys.executable], synthetic, out, {"max_steps": 4, "grad_accum": 2, "model_overrides": NO_DROPOUT}
        )
    )
    return out


def assert_matches_reference(out: Path, reference: Path) -> None:
    for rank in (0, 1):
        assert json.loads((out / f"summary_rank{rank}.json").read_text())["world_size"] == 2
    ours, theirs = read_log(out / "train_log.csv"), read_log(reference / "train_log.csv")
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["tokens"] == b["tokens"]
    assert max_difference(model_weights(out), model_weights(reference)) <= 1e-5


@pytest.mark.slow
def test_two_ranks_under_torchrun_with_zero2_match_one_process(tmp_path, synthetic, single_process_reference):
    """Also when stopped through one rank: SIGTERM to rank 1 alone after step 1; the stop vote on the
    per-step all-reduce makes both ranks stop after the same step with one checkpoint, and the resumed run
    equals the single process."""
    launcher = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    out = tmp_path / "torchrun"
    settings = {"max_steps": 4, "zero_stage": 2, "model_overrides": NO_DROPOUT}
    check(run_worker(launcher, synthetic, out, settings, "--term-rank1-at-step", "1"))
    ranks = [json.loads((out / f"summary_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["stopped"] for r in ranks] == ["a signal to another rank", "SIGTERM"]
    assert ranks[0]["steps"] == ranks[1]["steps"] < 4
    assert latest_checkpoint(out).name == f"step_{ranks[0]['steps']}" and not (out / "model").exists()
    check(run_worker(launcher, synthetic, out, settings, "--resume"))
    assert_matches_reference(out, single_process_reference)


@pytest.mark.slow
def test_two_ranks_under_deepspeed_launcher_with_zero2_match_one_process(
    tmp_path, synthetic, single_process_reference
):
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port())]
    out = tmp_path / "deepspeed"
    check(
        run_worker(launcher, synthetic, out, {"max_steps": 4, "zero_stage": 2, "model_overrides": NO_DROPOUT})
    )
    assert_matches_reference(out, single_process_reference)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_tiny_model_learns_on_pbmc3k(tmp_path, pbmc3k_corpus):
    """Both losses fall on real cells: gene identity (CE over the corpus's genes, the tiny preset's ID head)
    and value (MSE). Cells are truncated to their top 128 genes to keep the run short on CPU."""
    config = PretrainConfig.load("tiny").replace(
        max_steps=100, max_length=129, max_tokens=1024, lr=2e-3, warmup_steps=10, log_every=1, save_every=100
    )
    summary = pretrain(pbmc3k_corpus, config, tmp_path / "run")
    rows = read_log(tmp_path / "run" / "train_log.csv")
    assert len(rows) == 100 and summary["steps"] == 100

    def mean(key, part):
        return float(np.mean([r[key] for r in part]))

    first, last = rows[:15], rows[-15:]
    chance = np.log(json.loads((tmp_path / "run" / "model" / "config.json").read_text())["id_head_size"])
    # Measured: id 9.5 → 8.1 (chance: ln of the head's ~16k genes = 9.7; it learns which genes are
    # expressed); value 1.15 → 0.11
    assert mean("id_loss", last) < chance - 1.0 and mean("id_loss", last) < mean("id_loss", first) - 1.0
    assert mean("value_loss", last) < 0.5 * mean("value_loss", first)
