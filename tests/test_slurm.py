"""The SLURM recipes (containers/slurm/) run for real.

Without a scheduler: tokenize-array.sbatch run as plain shell, phase by phase, with the variables SLURM would
set (prepare, each array task, the merge); the merged corpus is byte-identical to one unsharded `gc tokenize`.
Bad input (a missing input, image, shard count) fails in the first seconds with one line.
"""

from __future__ import annotations

import filecmp
import os
import re
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


# ---- a real SLURM on localhost ------------------------------------------------------------------------
# Debian's slurm-wlm and munge (`make system-deps` installs them): munged, slurmctld and slurmd started here
# in a temporary directory with their own slurm.conf, state directories and munge key (no systemd), one
# node with 2 CPUs, and stopped at the end of the session. Each recipe is submitted with `sbatch --wait`.

DAEMONS = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd")
SLURM_CONF = """\
ClusterName=gctest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
StateSaveLocation={root}/ctld
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=600
FirstJobId={first_job}
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 State=UNKNOWN
PartitionName=gc Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def _stop(pid: int | None, timeout: float = 20) -> None:
    import signal

    if pid is None or not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


class Slurm:
    """A running localhost cluster: `env` for sbatch/scontrol, `sbatch(...)` to submit and wait."""

    def __init__(self, root: Path):
        self.root = root
        self.env = recipe_env(SLURM_CONF=str(root / "slurm.conf"))

    def sbatch(self, script: Path | None, out: Path, *options: str, timeout: int = 600, **settings: str):
        """sbatch --wait: (return code, the job's output, seconds). No script: give --wrap in options."""
        env = {**self.env, **settings}
        command = [
            "sbatch",
            "--wait",
            "--time=15",
            f"--output={out}",
            *options,
            *([str(script)] if script else []),
        ]
        start = time.monotonic()
        result = subprocess.run(
            command, env=env, cwd=out.parent, capture_output=True, text=True, timeout=timeout
        )
        text = out.read_text() if out.exists() else ""
        return result.returncode, text + result.stderr, time.monotonic() - start


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    import random
    import shutil

    missing = [d for d in DAEMONS if not Path(d).exists()] + [t for t in ("sbatch",) if not shutil.which(t)]
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)}): `make system-deps` installs slurm-wlm, munge"
        )
    if os.geteuid() != 0:
        pytest.skip("the localhost SLURM needs root (slurmd starts jobs as their users)")
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("ctld", "spool"):
        (root / sub).mkdir()
    host = subprocess.run(["hostname", "-s"], capture_output=True, text=True, check=True).stdout.strip()
    (root / "slurm.conf").write_text(
        SLURM_CONF.format(
            host=host,
            root=root,
            ctld_port=_free_port(),
            d_port=_free_port(),
            first_job=random.randint(1000, 60000),
        )
    )
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    conf = str(root / "slurm.conf")
    try:
        subprocess.run(
            [
                DAEMONS[0],
                "--force",
                f"--socket={root}/munge.sock",
                f"--key-file={key}",
                f"--pid-file={root}/munged.pid",
                f"--log-file={root}/munged.log",
                f"--seed-file={root}/munge.seed",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        subprocess.run([DAEMONS[1], "-f", conf, "-i"], check=True, capture_output=True, timeout=30)
        subprocess.run([DAEMONS[2], "-f", conf], check=True, capture_output=True, timeout=30)
        cluster = Slurm(root)
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], env=cluster.env, capture_output=True, text=True
            ).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        logs = "".join(
            (root / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log") if (root / f).exists()
        )
        assert state == "idle", f"the localhost SLURM did not come up (node state {state!r})\n{logs}"
        yield cluster
    finally:
        subprocess.run(
            ["scancel", "--full", "--quiet", "--user", "root"],
            env=recipe_env(SLURM_CONF=conf),
            capture_output=True,
            timeout=30,
        )
        for name in ("slurmd", "slurmctld", "munged"):
            _stop(_pid(root / f"{name}.pid"))


# ---- the pre-training recipes under SLURM ---------------------------------------------------------------

RECIPE_CONFIG = """\
model: tiny
max_length: 129
max_tokens: 512
warmup_steps: 2
log_every: 1
max_steps: 4
save_every: 2
zero_stage: {zero}
grad_accum: {accum}
model_overrides: {{hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}}
"""


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory):
    """DATA_DIR with a 270-cell PBMC3k corpus, the 2-rank config (ZeRO-2, no accumulation) and the
    single-process reference run: the same global batches through 2-step gradient accumulation."""
    data = tmp_path_factory.mktemp("slurm_data")
    gc = str(BIN / "gc")
    subprocess.run(
        [gc, "corpus", "medians", str(PBMC3K), "--out", str(data / "medians.tsv")],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            gc,
            "tokenize",
            str(PBMC3K),
            "--medians",
            str(data / "medians.tsv"),
            "--shard",
            "0/10",
            "--out",
            str(data / "corpus.zarr"),
        ],
        check=True,
        capture_output=True,
    )
    (data / "ranks.yaml").write_text(RECIPE_CONFIG.format(zero=2, accum=1))
    (data / "single.yaml").write_text(RECIPE_CONFIG.format(zero=0, accum=2))
    reference = data / "runs" / "single"
    result = subprocess.run(
        [
            gc,
            "pretrain",
            str(data / "corpus.zarr"),
            "--config",
            str(data / "single.yaml"),
            "--out",
            str(reference),
        ],
        env=recipe_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return data


def assert_run_matches_reference(run: Path, reference: Path) -> None:
    from safetensors.numpy import load_file

    from genecompass.train import read_log

    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step_2", "step_4"]
    ours, theirs = read_log(run / "train_log.csv"), read_log(reference / "train_log.csv")
    assert [r["step"] for r in ours] == [1, 2, 3, 4]
    for a, b in zip(ours, theirs, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["tokens"] == b["tokens"]
    weights, expected = (
        load_file(run / "model" / "model.safetensors"),
        load_file(reference / "model" / "model.safetensors"),
    )
    assert weights.keys() == expected.keys()
    assert max(float(abs(weights[k] - expected[k]).max()) for k in weights) <= 1e-5


RECIPES = {
    # recipe: sbatch options for one 2-CPU node, and the settings the recipe reads
    "pretrain-srun.sbatch": (["--ntasks-per-node=2", "--cpus-per-task=1"], {}),
    "pretrain-torchrun.sbatch": (["--ntasks-per-node=1", "--cpus-per-task=2"], {"GPUS_PER_NODE": "2"}),
    "pretrain-deepspeed.sbatch": (["--ntasks-per-node=1", "--cpus-per-task=2"], {"GPUS_PER_NODE": "2"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_under_slurm_matches_one_process(slurm, pretrain_data, recipe):
    options, settings = RECIPES[recipe]
    name = recipe.removesuffix(".sbatch")
    code, output, _ = slurm.sbatch(
        SLURM_DIR / recipe,
        pretrain_data / f"{name}.out",
        "--nodes=1",
        "--gpus-per-node=0",
        *options,
        DATA_DIR=str(pretrain_data),
        CONFIG=str(pretrain_data / "ranks.yaml"),
        RUN_NAME=name,
        MASTER_PORT=str(_free_port()),
        RDZV_PORT=str(_free_port()),
        **settings,
    )
    assert code == 0, output[-5000:]
    assert re.search(r"on 2\s+rank\(s\)", output), output[-3000:]
    assert_run_matches_reference(pretrain_data / "runs" / name, pretrain_data / "runs" / "single")


BAD_PRETRAIN_INPUT = [
    ({"CORPUS": "/nonexistent/corpus.zarr"}, "gc-pretrain: corpus /nonexistent/corpus.zarr not found"),
    ({"CONFIG": "/nonexistent/c.yaml"}, "gc-pretrain: config /nonexistent/c.yaml not found"),
    ({"SIF": "/nonexistent/gc.sif"}, "gc-pretrain: image /nonexistent/gc.sif not found"),
    ({"GC": "/nonexistent/gc"}, "gc-pretrain: /nonexistent/gc not found on PATH"),
]


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize(("settings", "message"), BAD_PRETRAIN_INPUT)
def test_recipe_with_bad_input_fails_at_once_in_one_line(tmp_path, recipe, settings, message):
    """As plain shell (the checks come before any srun): every recipe, every kind of bad input."""
    corpus = tmp_path / "data" / "corpus.zarr"
    corpus.mkdir(parents=True)
    base = {"DATA_DIR": str(tmp_path / "data"), "CONFIG": "tiny", "SLURM_JOB_ID": "7"}
    start = time.monotonic()
    result = run_plain(SLURM_DIR / recipe, recipe_env(**{**base, **settings}), tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert time.monotonic() - start < 10
    assert not (tmp_path / "data" / "runs").exists()


@pytest.mark.slow
def test_recipe_under_slurm_with_a_missing_corpus_fails_at_once_in_one_line(slurm, pretrain_data, tmp_path):
    code, output, seconds = slurm.sbatch(
        SLURM_DIR / "pretrain-srun.sbatch",
        tmp_path / "bad.out",
        "--nodes=1",
        "--gpus-per-node=0",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--time=5",
        DATA_DIR=str(pretrain_data),
        CONFIG=str(pretrain_data / "ranks.yaml"),
        RUN_NAME="bad",
        CORPUS=str(tmp_path / "missing.zarr"),
    )
    assert code != 0
    assert output.strip().splitlines() == [f"gc-pretrain: corpus {tmp_path / 'missing.zarr'} not found"], (
        output
    )
    assert seconds < 30
    assert not (pretrain_data / "runs" / "bad").exists()


@pytest.mark.slow
def test_tokenize_array_under_slurm_gives_the_unsharded_corpus(slurm, tmp_path, unsharded):
    out = tmp_path / "corpus.zarr"
    code, output, _ = slurm.sbatch(
        TOKENIZE,
        tmp_path / "prepare.out",
        "--cpus-per-task=1",
        INPUTS=str(PBMC3K),
        OUT_CORPUS=str(out),
        SHARDS="3",
        SUBMIT_ARGS="--cpus-per-task=1 --time=15",
    )
    assert code == 0, output
    merge_id = (tmp_path / "corpus.work" / "merge.jobid").read_text().strip()
    # Wait for the merge (it waits for the whole array): a job that depends on it.
    code, output, _ = slurm.sbatch(
        None, tmp_path / "wait.out", f"--dependency=afterany:{merge_id}", "--wrap=true"
    )
    assert code == 0, output
    merge_out = tmp_path / f"gc-tokenize-merge-{merge_id}.out"
    assert merge_out.exists() and "merging 3 shards" in merge_out.read_text(), sorted(tmp_path.iterdir())
    assert len(list(tmp_path.glob("gc-tokenize-shard-*_*.out"))) == 3
    assert_same_tree(out, unsharded)
