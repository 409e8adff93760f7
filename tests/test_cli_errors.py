"""Bad input fails early: every model command checks its arguments, paths and gene names before torch,
transformers or DeepSpeed is imported, with one line naming the file and the problem, exit code 1 and
nothing written. Without the ``train`` extra, a command that needs the model stack says which extra to
install instead of a ModuleNotFoundError traceback.

The calls run in fresh processes through the real entry point (``cli.app.main``); one process runs a whole
batch of calls and records, after each, whether torch had been imported (a batch stops being useful after the
first import, so each call is checked on its own and the first offender is named)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE, TARGET = "CD14 Monocytes", "FCGR3A Monocytes"
MODEL_STACK = ("torch", "transformers", "deepspeed")

# Runs each argv of a JSON list through cli.app.main in this process; prints one JSON record per call.
_BATCH = r"""
import contextlib, io, json, os, sys
calls = json.loads(sys.argv[1])
if os.environ.get("GC_TEST_BLOCK_TORCH"):
    class _Block:  # the train extra is not installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers", "deepspeed"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, _Block())
from cli.app import main
records = []
for argv in calls:
    err, out = io.StringIO(), io.StringIO()
    sys.argv = ["gc", *argv]
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            main()
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # a traceback: recorded, the test fails on it
            import traceback
            err.write(traceback.format_exc())
            code = "exception"
    loaded = [m for m in ("torch", "transformers", "deepspeed") if m in sys.modules]
    records.append({"argv": argv, "code": code, "stderr": err.getvalue(), "loaded": loaded})
print(json.dumps(records))
"""


def run_batch(calls: list[list[str]], cwd: Path, block_torch: bool = False) -> list[dict]:
    env = {"GC_TEST_BLOCK_TORCH": "1"} if block_torch else {}
    import os

    result = subprocess.run(
        [sys.executable, "-c", _BATCH, json.dumps([[str(a) for a in c] for c in calls])],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400", **env},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory) -> Path:
    """A run directory that passes every torch-free check (format, reference hash, medians, config): what
    happens after the checks is not exercised here, so no weights are needed."""
    from genecompass.finetune import LABELS_FILE
    from genecompass.reference import load_reference
    from genecompass.run import FORMAT_NAME, FORMAT_VERSION, MEDIANS_FILE, RUN_INFO

    run = tmp_path_factory.mktemp("fake") / "run"
    model = run / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / MEDIANS_FILE).write_text("")
    (model / LABELS_FILE).write_text(json.dumps({"label_key": "cell_type", "labels": ["a", "b"]}))
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "reference_hash": load_reference().hash,
        "medians_hash": "0",
        "normalisation": {"library_size": True, "target_sum": 1e4},
        "top_k": 2048,
        "max_length": 129,
    }
    (model / RUN_INFO).write_text(json.dumps(info))
    return run


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, fake_run, pbmc3k_corpus, pbmc3k_path) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("errors")
    (work / "notmodel").mkdir()
    (work / "not_h5.h5ad").write_text("this is not HDF5\n")
    (work / "unknown_genes.txt").write_text("NOTAGENE1\nNOTAGENE2\n")
    (work / "genes.txt").write_text("LYZ\nS100A8\n")
    (work / "labels.tsv").write_text("LYZ\t1\nS100A8\t1\nACTB\t0\nGAPDH\t0\n")
    (work / "existing.h5ad").write_text("")
    (work / "old_run").mkdir()
    (work / "old_run" / "train_log.csv").write_text("step\n")
    (work / "notknowledge").mkdir()
    return {
        "work": work,
        "run": fake_run,
        "corpus": pbmc3k_corpus,
        "h5ad": pbmc3k_path,
    }


def _cases(p: dict[str, Path]) -> list[tuple[str, list[str], str]]:
    """(name, argv, a fragment the one error line must hold). Every --out is `out*` under the work dir."""
    run, corpus, h5ad, w = p["run"], p["corpus"], p["h5ad"], p["work"]
    states = ["--source", SOURCE, "--target", TARGET]
    return [
        ("embed: not a run", ["embed", "--model", w / "notmodel", h5ad, "--out", w / "out1.h5ad"],
         "notmodel: not a gc run"),
        ("embed: missing run", ["embed", "--model", w / "nothing", h5ad, "--out", w / "out2.h5ad"],
         "nothing: no such file or directory"),
        ("embed: not a count file", ["embed", "--model", run, w / "not_h5.h5ad", "--out", w / "out3.h5ad"],
         "not_h5.h5ad: file is truncated or not HDF5"),
        ("embed: plot key", ["embed", "--model", run, h5ad, "--plot", "nokey", "--out", w / "out4.h5ad"],
         "no obs column 'nokey'"),
        ("embed: output exists", ["embed", "--model", run, h5ad, "--out", w / "existing.h5ad"],
         "existing.h5ad already exists"),
        ("perturb: unknown gene",
         ["perturb", "--model", run, corpus, "--overexpress", "FCGR3A,NOTAGENE1", *states,
          "--out", w / "out5"],
         "unknown gene 'NOTAGENE1'"),
        ("perturb run: unknown state",
         ["perturb", "run", "--model", run, corpus, "--delete", "LYZ", "--source", "Nope", "--target", TARGET,
          "--out", w / "out6"],
         "no cells with cell_type = 'Nope'"),
        ("perturb: cells key",
         ["perturb", "--model", run, corpus, "--knockdown", "LYZ", "--cells-key", "nokey", *states,
          "--out", w / "out7"],
         "no obs key 'nokey'"),
        ("perturb: not a model",
         ["perturb", "--model", w / "notmodel", corpus, "--delete", "LYZ", *states, "--out", w / "out8"],
         "notmodel: no model found"),
        ("perturb: not a corpus",
         ["perturb", "--model", run, h5ad, "--delete", "LYZ", *states, "--out", w / "out9"],
         "not a gc corpus"),
        ("screen: unknown genes",
         ["perturb", "screen", "--model", run, corpus, *states, "--genes", w / "unknown_genes.txt",
          "--out", w / "out10"],
         "none of its 2 genes is in the vocabulary"),
        ("screen: mode", ["perturb", "screen", "--model", run, corpus, *states, "--mode", "bogus",
                          "--out", w / "out11"],
         "--mode must be overexpress or knockdown"),
        ("screen: shard", ["perturb", "screen", "--model", run, corpus, *states, "--shard", "3/2",
                           "--out", w / "out12"],
         "--shard '3/2'"),
        ("pretrain: not a corpus", ["pretrain", h5ad, "--out", w / "out13"], "not a gc corpus"),
        ("pretrain --corpus: not a corpus", ["pretrain", "--corpus", h5ad, "--out", w / "out14"],
         "not a gc corpus"),
        ("pretrain: run exists", ["pretrain", corpus, "--out", w / "old_run"],
         "already holds a training run"),
        ("pretrain: knowledge", ["pretrain", corpus, "--knowledge", w / "notknowledge", "--out", w / "out15"],
         "no knowledge manifest"),
        ("pretrain: no corpus", ["pretrain", "--out", w / "out16"], "missing argument CORPUS"),
        ("finetune celltype: label key",
         ["finetune", "celltype", h5ad, "--model", run, "--label-key", "nokey", "--out", w / "out17"],
         "no obs column 'nokey'"),
        ("finetune celltype --train: not a run",
         ["finetune", "celltype", "--train", h5ad, "--model", w / "notmodel", "--label-key", "cell_type",
          "--out", w / "out18"],
         "not a gc run"),
        ("finetune celltype: test key without value",
         ["finetune", "celltype", h5ad, "--model", run, "--label-key", "cell_type", "--test-key", "cell_type",
          "--out", w / "out19"],
         "--test-key needs --test-value"),
        ("finetune gene-class: labels",
         ["finetune", "gene-class", corpus, "--model", run, "--labels", w / "unknown_genes.txt",
          "--out", w / "out20"],
         "unknown_genes.txt"),
        ("finetune gene-class --corpus: not a corpus",
         ["finetune", "gene-class", "--corpus", h5ad, "--model", run, "--labels", w / "labels.tsv",
          "--out", w / "out21"],
         "not a gc corpus"),
        ("predict: not a classifier dir", ["predict", "--model", w / "notmodel", h5ad, "--out", w / "out22"],
         "not a gc run"),
        ("predict: not a count file", ["predict", "--model", run, w / "not_h5.h5ad", "--out", w / "out23"],
         "not HDF5"),
        ("grn infer: unknown genes",
         ["grn", "infer", "--model", run, corpus, "--genes", w / "unknown_genes.txt", "--out", w / "out24"],
         "none of its 2 genes"),
        ("grn infer: neighbours twice",
         ["grn", "infer", "--model", run, corpus, "--neighbours", "5", "--top-k", "5", "--out", w / "out25"],
         "not both"),
        ("grn infer: not a corpus", ["grn", "infer", "--model", run, h5ad, "--out", w / "out26"],
         "not a gc corpus"),
        ("grn eval: no edges", ["grn", "eval", w / "none.tsv", "--reference", w / "genes.txt"],
         "none.tsv: no such file or directory"),
    ]


@pytest.fixture(scope="module")
def bad_calls(inputs) -> dict[str, dict]:
    cases = _cases(inputs)
    records = run_batch([argv for _, argv, _ in cases], cwd=inputs["work"])
    return {name: {**record, "expected": fragment} for (name, _, fragment), record in zip(cases, records)}


@pytest.mark.parametrize("name", [name for name, _, _ in _cases({k: Path(k) for k in
                                                                   ("run", "corpus", "h5ad", "work")})])
def test_bad_input_fails_in_one_line_before_the_model_stack_loads(name, bad_calls, inputs):
    record = bad_calls[name]
    lines = record["stderr"].strip().splitlines()
    assert record["code"] == 1, record
    assert len(lines) == 1 and lines[0].startswith("error: "), record["stderr"]
    assert record["expected"] in lines[0], lines[0]
    assert not record["loaded"], f"{name}: imported {record['loaded']} before failing"
    written = sorted(p.name for p in inputs["work"].glob("out*"))
    assert not written, f"left behind: {written}"


def test_the_real_entry_point_fails_fast_in_one_line(inputs):
    """Through the installed console script path (python -m cli.app), as a user sees it."""
    result = subprocess.run(
        [sys.executable, "-m", "cli.app", "embed", "--model", str(inputs["work"] / "notmodel"),
         str(inputs["h5ad"]), "--out", str(inputs["work"] / "out.h5ad")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {inputs['work'] / 'notmodel'}: not a gc run (no model/config.json); pass the --out of "
        "`gc pretrain`"
    ]


# -------------------------------------------------------------------------------- without the train extra
def _valid_calls(p: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """Calls whose inputs pass every check, so that they reach the model stack."""
    run, corpus, h5ad, w = p["run"], p["corpus"], p["h5ad"], p["work"]
    states = ["--source", SOURCE, "--target", TARGET]
    return [
        ("gc model info", ["model", "info"]),
        ("gc pretrain", ["pretrain", corpus, "--out", w / "noextra1"]),
        ("gc embed", ["embed", "--model", run, h5ad, "--out", w / "noextra2.h5ad"]),
        ("gc perturb", ["perturb", "--model", run, corpus, "--overexpress", "FCGR3A", *states,
                        "--out", w / "noextra3"]),
        ("gc perturb screen", ["perturb", "screen", "--model", run, corpus, *states, "--genes",
                               w / "genes.txt", "--out", w / "noextra4"]),
        ("gc finetune celltype", ["finetune", "celltype", h5ad, "--model", run, "--label-key", "cell_type",
                                  "--out", w / "noextra5"]),
        ("gc finetune gene-class", ["finetune", "gene-class", corpus, "--model", run, "--labels",
                                    w / "labels.tsv", "--out", w / "noextra6"]),
        ("gc predict", ["predict", "--model", run, h5ad, "--out", w / "noextra7.h5ad"]),
        ("gc grn infer", ["grn", "infer", "--model", run, corpus, "--out", w / "noextra8.tsv"]),
    ]


def test_without_the_train_extra_each_model_command_names_the_extra(inputs):
    calls = _valid_calls(inputs)
    records = run_batch([argv for _, argv in calls], cwd=inputs["work"], block_torch=True)
    for (command, _), record in zip(calls, records):
        lines = record["stderr"].strip().splitlines()
        assert record["code"] == 1, record
        assert len(lines) == 1, record["stderr"]
        # whichever module of the (absent) model stack the command imports first is named
        assert lines[0] in [
            f"error: `{command}` needs the model stack of the train extra ({module} is not installed): "
            "pip install 'genecompass-gc[train]'"
            for module in MODEL_STACK
        ], record["stderr"]
    assert not list(inputs["work"].glob("noextra*"))
