"""The `gc` command line: every --help carries an example; the README's commands; errors are one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cli.app import app

REPO = Path(__file__).resolve().parents[1]


def gc(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `gc` as a user would: a fresh process through the real entry point."""
    return subprocess.run(
        [sys.executable, "-m", "cli.app", *map(str, args)], cwd=cwd, capture_output=True, text=True
    )


def _commands(group, prefix: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a command group
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name)


ALL_COMMANDS = sorted(_commands(typer.main.get_command(app)))


def test_the_command_set_is_complete():
    expected = {
        ("reference", "info"),
        ("reference", "lookup"),
        ("inspect",),
        ("qc",),
        ("tokenize",),
        ("corpus", "info"),
        ("corpus", "validate"),
        ("corpus", "merge"),
        ("corpus", "medians"),
    }
    assert expected <= set(ALL_COMMANDS)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command):
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "Example: gc " + " ".join(command) in " ".join(result.output.split())


def test_version():
    from genecompass import __version__

    result = gc("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"gc {__version__}"


def test_lookup_tp53_and_trp53_share_a_token():
    result = gc("reference", "lookup", "TP53", "Trp53", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["query"]: row for row in json.loads(result.stdout)}
    assert rows["TP53"]["gene_id"] == "ENSG00000141510" and rows["TP53"]["species"] == "human"
    assert rows["Trp53"]["species"] == "mouse" and rows["Trp53"]["gene_id"].startswith("ENSMUSG")
    assert rows["TP53"]["token_id"] == rows["Trp53"]["token_id"]


def test_reference_info_reports_counts():
    info = json.loads(gc("reference", "info", "--json").stdout)
    assert {"vocab_size", "n_human_genes", "n_mouse_genes", "n_shared_homolog_tokens", "hash"} <= set(info)
    assert (
        info["vocab_size"]
        == 4 + info["n_human_genes"] + info["n_mouse_genes"] - info["n_shared_homolog_tokens"]
    )
    assert 15_000 < info["n_shared_homolog_tokens"] < 18_000


@pytest.mark.parametrize(
    "path, n_cells, n_genes, species",
    [
        ("data/pbmc3k.h5ad", 2700, 16634, "human"),
        ("data/mouse_visium_100genes.h5", 2695, 100, "mouse"),
        ("data/testdata/10x_v2_mtx", 80, 240, "human"),
    ],
)
def test_inspect_real_files(path, n_cells, n_genes, species):
    result = gc("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["n_cells"], report["n_genes"], report["species"]) == (n_cells, n_genes, species)
    assert report["integer_counts"] is True


def test_readme_pipeline_runs_end_to_end(tmp_path):
    """The README walk-through: qc → tokenize (with the QC flags) → validate → info."""
    assert gc("qc", "data/pbmc3k.h5ad", "--out", tmp_path / "qc").returncode == 0
    result = gc(
        "tokenize",
        "data/pbmc3k.h5ad",
        "--out",
        tmp_path / "c.zarr",
        "--qc-from",
        tmp_path / "qc",
        "--obs-keys",
        "cell_type",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    qc = json.loads((tmp_path / "qc" / "qc.json").read_text())
    assert summary["n_cells"] == qc["n_passed"] < 2700
    assert gc("corpus", "validate", tmp_path / "c.zarr").returncode == 0
    info = json.loads(gc("corpus", "info", tmp_path / "c.zarr", "--json").stdout)
    assert info["n_cells"] == qc["n_passed"] and info["obs_keys"] == ["cell_type"]


def _one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_input_is_one_line_error(tmp_path):
    _one_line_error(gc("tokenize", tmp_path / "nope.h5ad", "--out", tmp_path / "o.zarr"), "nope.h5ad")
    assert not (tmp_path / "o.zarr").exists()


def test_truncated_h5ad_is_one_line_error(tmp_path):
    damaged = tmp_path / "damaged.h5ad"
    damaged.write_bytes((REPO / "data/pbmc3k.h5ad").read_bytes()[:1_000_000])
    _one_line_error(gc("inspect", damaged), "damaged.h5ad")
    _one_line_error(gc("tokenize", damaged, "--out", tmp_path / "o.zarr"), "damaged.h5ad")
    assert list(tmp_path.iterdir()) == [damaged]  # nothing half-written


def test_damaged_corpus_fails_validation(tmp_path):
    out = tmp_path / "c.zarr"
    assert gc("tokenize", "data/pbmc3k.h5ad", "--out", out).returncode == 0
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(out, damaged)
    next((damaged / "tokens" / "gene" / "c").iterdir()).unlink()
    _one_line_error(gc("corpus", "validate", damaged), "damaged.zarr", "missing chunk")
    _one_line_error(gc("tokenize", "data/pbmc3k.h5ad", "--out", out), "--overwrite")


def test_debug_env_shows_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cli.app", "inspect", str(tmp_path / "nope.h5ad")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "GC_DEBUG": "1"},
    )
    assert result.returncode != 0 and "Traceback" in result.stderr
