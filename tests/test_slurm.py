"""The SLURM recipes (containers/slurm/) run for real, under a real SLURM on localhost.

Under SLURM: each pre-training recipe is stopped the way a cluster stops jobs and continues from its
checkpoint, and the end result (losses, tokens, weights) equals one uninterrupted single-process run with
the same seed and global batch. The srun recipe gets `scancel --signal=TERM` and is resubmitted; the torchrun
recipe gets SIGUSR1 in its batch shell (what `--signal=B:USR1@300` sends before the time limit) and requeues
itself; the deepspeed recipe is stopped by `scontrol requeue`. The job array tokenises as one process does.

Where SLURM is not installed: tokenize-array.sbatch run as plain shell, phase by phase, with the variables
SLURM would set (prepare, each array task, the merge); the merged corpus is byte-identical to one unsharded
`gc tokenize` (with SLURM the same phases run under it instead). Bad input (a missing input, image, shard
count, corpus, config) fails in the first seconds with one line, as plain shell in any case.
"""

from __future__ import annotations

import filecmp
import os
import re
import shutil
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


def slurm_installed() -> bool:
    import shutil

    return all(Path(d).exists() for d in DAEMONS) and bool(shutil.which("sbatch")) and os.geteuid() == 0


def test_tokenize_array_phases_as_shell_give_the_unsharded_corpus(tmp_path, unsharded):
    if slurm_installed():
        pytest.skip("SLURM is installed: test_tokenize_array_under_slurm_... runs these phases under it")
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
AuthInfo=socket={root}/munge.sock,cred_expire=10
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
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MinJobAge=600
KillWait=30
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


FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"}


class Slurm:
    """A running localhost cluster: `env` for sbatch/scontrol; `submit`, `job`, `wait` and `sbatch`. Jobs are
    polled with scontrol every 0.3 s (`sbatch --wait` polls with a back-off of up to 32 s)."""

    def __init__(self, root: Path):
        self.root = root
        self.env = recipe_env(SLURM_CONF=str(root / "slurm.conf"))

    def run(self, *command: str) -> str:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{' '.join(command)}: {result.stderr}"
        return result.stdout

    def submit(self, script: Path, out: Path, *options: str, **settings: str) -> str:
        """sbatch (no waiting): the job id."""
        command = ["sbatch", "--parsable", "--time=15", f"--output={out}", *options, str(script)]
        result = subprocess.run(
            command, env={**self.env, **settings}, cwd=out.parent, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def wait(self, job_id: str, until=lambda job: job["JobState"] in FINISHED, timeout: float = 600):
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if until(job):
                return job
            assert time.monotonic() < deadline, f"job {job_id} still {job['JobState']} after {timeout} s"
            time.sleep(0.3)

    def sbatch(self, script: Path, out: Path, *options: str, timeout: int = 600, **settings: str):
        """Submit and wait: (exit code, the job's output, seconds)."""
        start = time.monotonic()
        job = self.wait(self.submit(script, out, *options, **settings), timeout=timeout)
        code = int(job["ExitCode"].split(":")[0]) or int(job["JobState"] != "COMPLETED")
        return code, out.read_text() if out.exists() else "", time.monotonic() - start


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
max_steps: 8
save_every: 4
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

    from genecompass.train import latest_checkpoint, read_log

    assert latest_checkpoint(run).name == "step_8"
    ours, theirs = read_log(run / "train_log.csv"), read_log(reference / "train_log.csv")
    assert [r["step"] for r in ours] == list(range(1, 9))
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
    # recipe: sbatch options for one 2-CPU node, the settings the recipe reads, and how it is stopped
    "pretrain-srun.sbatch": (["--ntasks-per-node=2", "--cpus-per-task=1"], {}, "scancel-TERM"),
    "pretrain-torchrun.sbatch": (
        ["--ntasks-per-node=1", "--cpus-per-task=2"],
        {"GPUS_PER_NODE": "2"},
        "batch-USR1",
    ),
    "pretrain-deepspeed.sbatch": (
        ["--ntasks-per-node=1", "--cpus-per-task=2"],
        {"GPUS_PER_NODE": "2"},
        "requeue",
    ),
}


def logged_steps(run: Path) -> int:
    try:
        return len((run / "train_log.csv").read_text().splitlines()) - 1
    except FileNotFoundError:
        return 0


def stopped_step(output: str) -> int:
    found = re.findall(r"gc pretrain: stopped by SIG(?:TERM|USR1) after step (\d+)/8; checkpoint", output)
    assert len(found) == 1, output[-5000:]
    return int(found[0])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_under_slurm_stopped_and_resumed_matches_one_process(slurm, pretrain_data, recipe):
    """Each recipe is stopped once it has logged a step, as a cluster stops jobs, and continues from the
    checkpoint gc writes on the signal; the whole run then equals the uninterrupted single-process run."""
    options, settings, stop = RECIPES[recipe]
    name = recipe.removesuffix(".sbatch")
    run, out = pretrain_data / "runs" / name, pretrain_data / f"{name}.out"
    settings = dict(
        DATA_DIR=str(pretrain_data),
        CONFIG=str(pretrain_data / "ranks.yaml"),
        RUN_NAME=name,
        MASTER_PORT=str(_free_port()),
        RDZV_PORT=str(_free_port()),
        **settings,
    )
    job_id = slurm.submit(SLURM_DIR / recipe, out, "--nodes=1", "--gpus-per-node=0", *options, **settings)
    slurm.wait(job_id, until=lambda job: logged_steps(run) >= 1 or job["JobState"] in FINISHED)
    assert slurm.job(job_id)["JobState"] == "RUNNING", out.read_text()[-5000:]
    if stop == "scancel-TERM":  # every process of the job's steps (not the batch shell) gets SIGTERM
        slurm.run("scancel", "--signal=TERM", job_id)
        job = slurm.wait(job_id)
        assert (job["JobState"], job["ExitCode"]) == ("FAILED", "75:0"), out.read_text()[-5000:]
        step = stopped_step(out.read_text())
        assert step < 8 and not (run / "model").exists()
        assert logged_steps(run) == step
        # resubmitted as it was: the recipe finds the checkpoints and passes --resume
        settings.update(MASTER_PORT=str(_free_port()))
        job_id = slurm.submit(SLURM_DIR / recipe, out, "--nodes=1", "--gpus-per-node=0", *options, **settings)
    elif stop == "batch-USR1":  # the batch shell alone gets SIGUSR1: the job stops and requeues itself
        slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    else:  # SLURM's own requeue (as preemption with PreemptMode=REQUEUE): SIGTERM to every process
        slurm.run("scontrol", "requeue", job_id)
    job = slurm.wait(job_id)
    output = out.read_text()
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), output[-5000:]
    if stop != "scancel-TERM":
        assert job["Restarts"] == "1", output[-5000:]
        assert stopped_step(output) < 8
    if stop == "batch-USR1":
        assert f"gc-pretrain: time limit near: requeueing job {job_id}" in output
    assert "note: resumed from step_" in output, output[-5000:]
    assert len(re.findall(r"on 2\s+rank\(s\)", output)) == 1, output[-3000:]
    assert_run_matches_reference(run, pretrain_data / "runs" / "single")


BAD_PRETRAIN_INPUT = [
    ({"CORPUS": "/nonexistent/corpus.zarr"}, "gc-pretrain: corpus /nonexistent/corpus.zarr not found"),
    ({"CONFIG": "/nonexistent/c.yaml"}, "gc-pretrain: config /nonexistent/c.yaml not found"),
    ({"SIF": "/nonexistent/gc.sif"}, "gc-pretrain: image /nonexistent/gc.sif not found"),
    ({"GC": "/nonexistent/gc"}, "gc-pretrain: /nonexistent/gc not found on PATH"),
    ({"SIF": "/x/gc.sif", "IMAGE": "localhost/gc:cpu"}, "gc-pretrain: set SIF (Apptainer) or IMAGE (podman)"),
    (
        {"IMAGE": "localhost/gc:nonexistent"},
        "gc-pretrain: image localhost/gc:nonexistent not found by podman"
        if shutil.which("podman")
        else "gc-pretrain: IMAGE is set but podman is not on PATH",
    ),
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
    merge = slurm.wait(merge_id)  # it starts once the whole array succeeded
    assert merge["JobState"] == "COMPLETED", merge
    merge_out = tmp_path / f"gc-tokenize-merge-{merge_id}.out"
    assert merge_out.exists() and "merging 3 shards" in merge_out.read_text(), sorted(tmp_path.iterdir())
    assert len(list(tmp_path.glob("gc-tokenize-shard-*_*.out"))) == 3
    assert_same_tree(out, unsharded)
    work = tmp_path / "corpus.work"
    assert (work / "medians.tsv").is_file()
    assert not (work / "shards").exists()  # removed after the merge (KEEP_SHARDS=1 keeps them)


# ---- gc inside the image, through podman, under SLURM ---------------------------------------------------
# The image is built by `make container-check` (containers/check.sh: buildah, minutes; never by `make test`),
# which then runs this test with GC_TEST_IMAGE set. In `make test` it runs whenever that image is in
# containers/check.sh's podman storage (cache/container/), and skips, saying how to build it, when it is not.

PODMAN_STORAGE_CONF = REPO / "cache" / "container" / "conf" / "storage.conf"
# What this kind of machine needs (as in containers/check.sh): runc, since crun refuses the hybrid cgroup
# v1/v2 layout, and lowered nofile/nproc limits, since the sandbox lacks CAP_SYS_RESOURCE.
PODMAN_ARGS = "--runtime runc --ulimit nofile=16384:16384 --ulimit nproc=16384:16384"


@pytest.fixture(scope="session")
def podman_image() -> dict[str, str]:
    """The settings that give a recipe the image (IMAGE, PODMAN_ARGS, the podman storage), or a skip."""
    image = os.environ.get("GC_TEST_IMAGE", "localhost/gc:cpu")
    how = "`make container-check` builds it (buildah, minutes) and runs this test in it"
    if not shutil.which("podman"):
        pytest.skip(f"no image: podman is not installed; {how}")
    settings = {"IMAGE": image, "PODMAN_ARGS": os.environ.get("GC_TEST_PODMAN_ARGS", PODMAN_ARGS)}
    conf = os.environ.get("CONTAINERS_STORAGE_CONF") or (
        str(PODMAN_STORAGE_CONF) if PODMAN_STORAGE_CONF.exists() else ""
    )
    if conf:
        settings["CONTAINERS_STORAGE_CONF"] = conf
    found = subprocess.run(["podman", "image", "exists", image], env={**os.environ, **settings})
    if found.returncode != 0:
        pytest.skip(f"no image {image} in podman's storage ({conf or 'podman default'}): {how}")
    return settings


@pytest.mark.slow
def test_recipe_under_slurm_runs_gc_in_the_image_with_podman(podman_image, slurm, tmp_path):
    """pretrain-srun.sbatch with IMAGE=...: 2 SLURM tasks, each a `podman run` of the image's gc (ZeRO-2 over
    gloo on the host network), with DATA_DIR bound at /data; the run lands on the host, owned by the user."""
    data = tmp_path / "data"
    data.mkdir()
    subprocess.run(
        [str(BIN / "gc"), "tokenize", str(PBMC3K), "--out", str(data / "corpus.zarr")],
        check=True,
        capture_output=True,
    )
    (data / "ranks.yaml").write_text(RECIPE_CONFIG.format(zero=2, accum=1))
    code, output, seconds = slurm.sbatch(
        SLURM_DIR / "pretrain-srun.sbatch",
        tmp_path / "podman.out",
        "--nodes=1",
        "--gpus-per-node=0",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--time=30",
        timeout=1500,  # each task's `podman run` copies the 3 GB image first with vfs storage (1-3 min here)
        DATA_DIR=str(data),
        CONFIG="/data/ranks.yaml",  # paths inside the image
        RUN_NAME="podman",
        MASTER_PORT=str(_free_port()),
        **podman_image,
    )
    assert code == 0, output[-5000:]
    run = data / "runs" / "podman"
    assert len(re.findall(r"on 2\s+rank\(s\)", output)) == 1, output[-3000:]
    from genecompass.train import latest_checkpoint, read_log

    rows = read_log(run / "train_log.csv")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(0 < r["loss"] < 100 for r in rows), rows
    assert latest_checkpoint(run).name == "step_8"
    # gc ran inside the image: it recorded the corpus by its path there
    import json

    assert json.loads((run / "model" / "gc_run.json").read_text())["corpus"] == "/data/corpus.zarr"
    assert (run / "model" / "model.safetensors").stat().st_uid == os.getuid()
    print(f"podman job: {seconds:.0f} s")
