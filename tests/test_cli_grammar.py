"""One grammar across commands: data files positional (old option spellings kept as hidden aliases), one
default and one range per shared option, help in words rather than Python types, `--json` everywhere a
summary is printed."""

from __future__ import annotations

import json
import re

import pytest
import typer
from typer.testing import CliRunner

from cli.app import app
from genecompass.errors import InputError

COMMAND = typer.main.get_command(app)


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


ALL = dict(_commands(COMMAND))


def _help(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def _params(command: tuple[str, ...]) -> dict[str, object]:
    return {opt: param for param in ALL[command].params for opt in param.opts}


@pytest.mark.parametrize(
    "command, positional, alias",
    [
        (("pretrain",), "CORPUS", "--corpus"),
        (("finetune", "celltype"), "DATA", "--train"),
        (("finetune", "gene-class"), "CORPUS", "--corpus"),
        (("grn", "eval"), "EDGES", "--edges"),
        (("grn", "infer"), "--neighbours", "--top-k"),
    ],
)
def test_old_spellings_are_hidden_aliases(command, positional, alias):
    params = _params(command)
    assert params[alias].hidden
    text = _help(*command)
    assert positional in text
    assert not re.search(rf"{re.escape(alias)}\b(?!-)", text.replace(f"{alias}-", "")), text


def test_aliases_still_work(tmp_path):
    """Given under its old spelling, the value is taken (the call gets past the missing-argument check and
    fails on the value itself); left out altogether, the argument is reported missing."""
    from genecompass.errors import GcError

    runner = CliRunner()
    missing = str(tmp_path / "missing.zarr")
    for argv, alias in (
        (["pretrain", "--out", str(tmp_path / "r")], ["--corpus", missing]),
        (["finetune", "gene-class", "--model", str(tmp_path), "--labels", "x", "--out", str(tmp_path / "o")],
         ["--corpus", missing]),
        (["finetune", "celltype", "--model", str(tmp_path), "--label-key", "y", "--out", str(tmp_path / "o")],
         ["--train", missing]),
        (["grn", "eval", "--reference", missing], ["--edges", missing]),
    ):
        without = runner.invoke(app, argv)
        assert "missing argument" in str(without.exception), (argv, without.output)
        result = runner.invoke(app, [*argv, *alias])
        assert isinstance(result.exception, GcError), (argv, result.output)
        assert "missing argument" not in str(result.exception) and "not both" not in str(result.exception)
    result = runner.invoke(app, ["pretrain", missing, "--corpus", missing, "--out", "r"])
    assert isinstance(result.exception, InputError) and "not both" in str(result.exception)


def test_perturb_help_shows_run():
    text = _help("perturb")
    assert re.search(r"\brun\b\s+Perturb genes", text)


def test_shared_options_have_one_default_and_one_range():
    run, screen = _params(("perturb", "run")), _params(("perturb", "screen"))
    for option in ("--fraction", "--n-random", "--level", "--cells-key", "--seed", "--max-tokens"):
        a, b = run[option], screen[option]
        assert (a.default, a.min, a.max, a.help) == (b.default, b.min, b.max, b.help), option


@pytest.mark.parametrize("command", sorted(ALL), ids=" ".join)
def test_help_shows_words_not_python_types(command):
    text = _help(*command)
    assert not re.search(r"<(list\[|bool|str|int|float|path)", text), text


def test_corpus_merge_prints_json(pbmc3k_subset, tmp_path):
    from genecompass.tokenize import TokenizeOptions, tokenize

    h5ad = tmp_path / "cells.h5ad"
    pbmc3k_subset[:100].write_h5ad(h5ad)
    tokenize([h5ad], tmp_path / "a.zarr", options=TokenizeOptions(threads=1))
    result = CliRunner().invoke(
        app, ["corpus", "merge", str(tmp_path / "a.zarr"), "--out", str(tmp_path / "m.zarr"), "--json"]
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n_cells"] == 100 and summary["parts"] == [str(tmp_path / "a.zarr")]
