"""In-silico perturbation: token edits checked on the tokens, batched = one-at-a-time embeddings, `gc perturb`
end to end on PBMC3k with a tiny pre-trained model, and a screen that resumes to the same table."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gc" / "torch_extensions"))

from genecompass.errors import InputError  # noqa: E402
from genecompass.perturb import (  # noqa: E402
    Level,
    Perturbation,
    apply_perturbation,
    bh_fdr,
    delete,
    knockdown,
    level_value,
    overexpress,
    resolve_genes,
)

SOURCE, TARGET = "CD14 Monocytes", "FCGR3A Monocytes"


# ------------------------------------------------------------------------------------ token edits
def cell():
    genes = np.array([50, 10, 30, 20, 40, 60], dtype=np.int64)
    values = np.array([5.0, 3.0, 2.0, 2.0, 1.0, 0.5], dtype=np.float32)
    return genes, values


def test_overexpress_inserts_an_absent_gene_at_its_rank_and_truncates():
    genes, values = cell()
    g, v = overexpress(genes, values, 25, "corpus-median")  # value 1.0, ties with token 40: 25 < 40 first
    assert g.tolist() == [50, 10, 30, 20, 25, 40, 60] and v[4] == 1.0
    g, v = overexpress(genes, values, 25, "corpus-median", k=6)  # re-truncated: the last gene drops out
    assert g.tolist() == [50, 10, 30, 20, 25, 40] and len(v) == 6
    g, v = overexpress(genes, values, 99, "cell-max")  # ties with the top gene (50 < 99): second
    assert g.tolist()[:2] == [50, 99] and v[1] == 5.0
    g, v = overexpress(genes, values, 5, "cell-max")  # token 5 < 50: first
    assert g.tolist()[:2] == [5, 50]


def test_overexpress_moves_a_present_gene_and_leaves_the_others_in_order():
    genes, values = cell()
    g, v = overexpress(genes, values, 60, 2.5)
    assert g.tolist() == [50, 10, 60, 30, 20, 40] and v[2] == np.float32(2.5)
    assert sorted(g.tolist()) == sorted(genes.tolist())
    # ties among the untouched genes (30, 20 at 2.0) keep their stored order
    assert g.tolist().index(30) < g.tolist().index(20)


def test_fold_levels():
    genes, values = cell()
    ratio = 2.0**1.0 - 1.0  # gene 40 sits at its median
    assert level_value(genes, values, 40, "fold:4") == pytest.approx(np.log2(1 + 4 * ratio))
    assert level_value(genes, values, 99, "fold:4") == pytest.approx(np.log2(5.0))  # absent: 4 × median
    assert Level.parse("corpus-median").kind == "corpus-median"
    for bad in ("fold:0", "fold:x", "-1", "huge"):
        with pytest.raises(InputError):
            Level.parse(bad)


def test_knockdown_scales_the_ratio_and_respects_the_top_half_rule():
    genes, values = cell()
    g, v = knockdown(genes, values, 10, 0.25)  # rank 1 of 6: in the top half
    expected = np.log2(1 + 0.25 * (2.0**3 - 1))
    assert v[g.tolist().index(10)] == pytest.approx(expected, rel=1e-6)
    assert g.tolist() == [50, 30, 20, 10, 40, 60]  # 1.45 falls below the 2.0s
    assert knockdown(genes, values, 40, 0.5) is None  # rank 4 of 6: skipped
    assert knockdown(genes, values, 40, 0.5, top_fraction=None) is not None
    assert knockdown(genes, values, 99, 0.5, top_fraction=None) is None  # absent: skipped
    g0, v0 = knockdown(genes, values, 10, 0.0)
    gd, vd = delete(genes, values, 10)
    assert np.array_equal(g0, gd) and np.array_equal(v0, vd)  # knock-down to 0 = deletion
    assert g0.tolist() == [50, 30, 20, 40, 60]


def test_combinations_apply_every_gene():
    genes, values = cell()
    both = Perturbation("delete", (10, 40))
    g, _ = apply_perturbation(genes, values, both)
    assert g.tolist() == [50, 30, 20, 60]
    assert apply_perturbation(genes, values, Perturbation("delete", (10, 99))) is None  # a gene is absent
    up = Perturbation("overexpress", (7, 8), level=Level.parse("cell-max"))
    g, v = apply_perturbation(genes, values, up, k=6)
    assert g.tolist() == [7, 8, 50, 10, 30, 20] and v[:3].tolist() == [5.0, 5.0, 5.0]


def test_bh_fdr_matches_the_textbook_example():
    p = [0.01, 0.04, 0.03, 0.005, np.nan]
    expected = [0.02, 0.04, 0.04, 0.02, np.nan]
    np.testing.assert_allclose(bh_fdr(p), expected)


def test_a_tiny_significant_shift_reads_as_not_distinguishable_from_zero():
    """The demo's case: a +4.8e-08 shift that beats a null of ~1e-8 shifts (tiny p) is still below the
    noise floor, so it is reported as not distinguishable from zero, with its size beside it."""
    from genecompass.perturb import FLOAT32_RESOLUTION, NOT_DISTINGUISHABLE, effect_size, rank_sum_p

    rng = np.random.default_rng(0)
    shifts = 4.8e-8 + 1e-9 * rng.standard_normal(100)
    null_cells = 1e-9 * rng.standard_normal(500)
    assert rank_sum_p(shifts, null_cells) < 1e-10  # "significant"
    null_genes = 1e-9 * rng.standard_normal(20)
    size = effect_size(shifts, null_genes, distance=0.02, noise_floor=FLOAT32_RESOLUTION, seed=0)
    assert size["call"] == NOT_DISTINGUISHABLE
    assert size["z"] > 10 and size["fraction_of_distance"] == pytest.approx(size["mean_shift"] / 0.02)
    assert size["ci_low"] < size["mean_shift"] < size["ci_high"]


def test_effect_size_of_a_real_shift_and_a_seeded_interval():
    from genecompass.perturb import ABOVE_NOISE, bootstrap_ci, effect_size

    rng = np.random.default_rng(1)
    shifts = 0.01 + 0.002 * rng.standard_normal(50)
    nulls = np.array([0.0, 0.001, -0.001, 0.0005])
    size = effect_size(shifts, nulls, distance=0.05, noise_floor=1e-6, seed=3)
    assert size["call"] == ABOVE_NOISE
    assert size["z"] == pytest.approx((shifts.mean() - nulls.mean()) / nulls.std(ddof=1))
    assert size["fraction_of_distance"] == pytest.approx(shifts.mean() / 0.05)
    low, high = size["ci_low"], size["ci_high"]
    assert low < shifts.mean() < high and high - low < 0.003  # ~ ±1.96 × 0.002/√50
    assert bootstrap_ci(shifts, seed=3) == (low, high)  # seeded: the same interval again
    assert bootstrap_ci(shifts, seed=4) != (low, high)
    # undefined sizes are NaN, never a number that looks meaningful
    one = effect_size(shifts, nulls[:1], distance=float("nan"), noise_floor=1e-6, seed=0)
    assert np.isnan(one["z"]) and np.isnan(one["fraction_of_distance"])
    unresolved = effect_size(shifts, nulls, distance=1e-8, noise_floor=1e-7, seed=0)  # states not resolved
    assert np.isnan(unresolved["fraction_of_distance"])
    # a negative shift as large as the floor is above it too: the call is about |shift|
    assert effect_size(-shifts, nulls, distance=0.05, noise_floor=1e-6, seed=0)["call"] == ABOVE_NOISE


def test_unknown_gene_says_so_and_points_to_lookup():
    with pytest.raises(InputError, match=r"unknown gene 'NOTAGENE1'.*gc reference lookup"):
        resolve_genes(["NOTAGENE1"])
    human, mouse, ensembl = resolve_genes(["FCGR3A", "Trp53", "ENSG00000141510"])
    assert mouse == ensembl  # Trp53 shares TP53's token
    assert human > 3


def test_gene_list_skips_unknown_names_but_not_all_of_them():
    from genecompass.perturb import resolve_gene_list

    # CCL4L1: a current NCBI symbol with no gene in GRCh38 Ensembl/GENCODE (only GRCh37 had one)
    tokens, unknown = resolve_gene_list(["STAT1", "CCL4L1", "IRF7", "NOTAGENE1"], source="tfs.txt")
    assert tokens == resolve_genes(["STAT1", "IRF7"]) and unknown == ["CCL4L1", "NOTAGENE1"]
    with pytest.raises(InputError, match=r"tfs.txt: none of its 2 genes is in the vocabulary"):
        resolve_gene_list(["CCL4L1", "NOTAGENE1"], source="tfs.txt")


# ---------------------------------------------------------------------------- tiny model, real data
def tiny_run_dir(pbmc3k_corpus, tmp_path_factory) -> Path:
    """A tiny model pre-trained briefly on PBMC3k, shared by this module and test_grn (built once)."""
    from genecompass.train import PretrainConfig, pretrain

    run = tmp_path_factory.getbasetemp() / "gc_tiny_perturb_run"
    if not (run / "model" / "config.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        config = PretrainConfig.load("tiny").replace(
            max_steps=12, max_length=129, max_tokens=1024, warmup_steps=2, log_every=4, save_every=1000
        )
        pretrain(pbmc3k_corpus, config, run)
    return run


@pytest.fixture(scope="module")
def tiny_run(pbmc3k_corpus, tmp_path_factory) -> Path:
    return tiny_run_dir(pbmc3k_corpus, tmp_path_factory)


@pytest.fixture(scope="module")
def encoder(tiny_run):
    import torch

    from genecompass.perturb import load_model

    torch.manual_seed(0)
    return load_model(tiny_run, device="cpu")


def test_batched_and_one_at_a_time_embeddings_agree(encoder, pbmc3k_corpus):
    from genecompass.corpus import Corpus
    from genecompass.perturb import Embedder, cell_species_tokens, read_cells

    corpus = Corpus.open(pbmc3k_corpus)
    indices = np.arange(0, 400, 17)
    cells = read_cells(corpus, indices)
    up = Perturbation("overexpress", (resolve_genes(["FCGR3A"])[0],), level=Level.parse("cell-max"))
    embedder = Embedder(encoder, max_tokens=4096, max_length=129)
    perturbed = [apply_perturbation(g, v, up, k=embedder.k) for g, v in cells]
    species = cell_species_tokens(corpus, indices, dict(encoder.config.species_token_ids))
    batched = embedder.cell_embeddings(perturbed, species)
    single = Embedder(encoder, max_tokens=1, max_length=129)  # one cell per forward pass
    one_by_one = single.cell_embeddings(perturbed, species)
    assert batched.shape == (len(indices), encoder.config.hidden_size)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    # and the cells' own tokens really changed
    assert all(p[0][0] == up.genes[0] or p[1][0] == c[1][0] for p, c in zip(perturbed, cells, strict=True))


def _app() -> typer.Typer:
    from cli import grn, perturb

    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """gc"""

    perturb.register(app)
    grn.register(app)
    return app


def invoke(*args):
    result = CliRunner().invoke(_app(), [str(a) for a in args], terminal_width=200)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.mark.parametrize(
    "command", [("perturb",), ("perturb", "run"), ("perturb", "screen"), ("perturb", "merge")]
)
def test_help_has_an_example(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert "Example: gc " + " ".join(command) in " ".join(result.output.split())


def test_gc_perturb_end_to_end(tiny_run, pbmc3k_corpus, tmp_path):
    out = tmp_path / "oe"
    result_args = (
        "perturb",
        "--model",
        tiny_run,
        pbmc3k_corpus,
        "--overexpress",
        "FCGR3A,CD14+LYZ",
        "--level",
        "cell-max",
        "--cells-key",
        "cell_type",
        "--source",
        SOURCE,
        "--target",
        f"{TARGET},B",
        "--n-random",
        4,
        "--max-cells",
        40,
        "--max-length",
        129,
        "--out",
        out,
        "--json",
    )
    result = invoke(*result_args)
    assert result.exit_code == 0, result.output
    cells = pd.read_parquet(out / "cells.parquet")
    for column in [
        "cell",
        "perturbation",
        "control",
        "cos_source_before",
        "cos_source_after",
        "shift_source",
        f"cos_target:{TARGET}_before",
        f"cos_target:{TARGET}_after",
        f"shift_target:{TARGET}",
        "shift_target:B",
    ]:
        assert column in cells.columns
    assert set(cells.loc[~cells["control"], "perturbation"]) == {"FCGR3A", "CD14+LYZ"}
    assert (cells["perturbation"] == "FCGR3A").sum() == 40  # overexpression skips no cell
    assert cells["control"].sum() == 4 * 40
    np.testing.assert_allclose(
        cells[f"shift_target:{TARGET}"],
        cells[f"cos_target:{TARGET}_after"] - cells[f"cos_target:{TARGET}_before"],
    )
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["mode"] == "overexpress" and summary["level"] == "cell-max" and len(summary["controls"]) == 4
    )
    rows = pd.read_csv(out / "summary.csv")
    assert set(rows["state"]) == {"source", TARGET, "B"} and len(rows) == 6
    assert rows["p_value"].between(0, 1).all() and rows["fdr"].between(0, 1).all()
    assert (rows["fdr"] >= rows["p_value"] - 1e-12).all()
    # sizes beside the p-values; the call follows the noise floor, whatever the p-value
    from genecompass.perturb import FLOAT32_RESOLUTION, NOT_DISTINGUISHABLE

    assert (rows["noise_floor"] >= FLOAT32_RESOLUTION).all()
    below = rows["mean_shift"].abs() < rows["noise_floor"]
    assert ((rows["call"] == NOT_DISTINGUISHABLE) == below).all()
    assert ((rows["ci_low"] <= rows["mean_shift"]) & (rows["mean_shift"] <= rows["ci_high"])).all()
    assert rows["z"].notna().all()
    target_rows = rows[rows["state"] != "source"]
    assert (target_rows["distance"] > 0).all()
    assert rows.loc[rows["state"] == "source", "distance"].isna().all()
    resolved = target_rows["distance"] > target_rows["noise_floor"]  # else no share of it is given
    assert target_rows.loc[~resolved, "fraction_of_distance"].isna().all()
    np.testing.assert_allclose(
        target_rows.loc[resolved, "fraction_of_distance"],
        (target_rows["mean_shift"] / target_rows["distance"])[resolved],
    )
    assert set(summary["noise_floor"]) == {"source", TARGET, "B"}
    text = " ".join(invoke(*[a for a in result_args if a != "--json"]).output.split())  # unwrap lines
    assert "z " in text and "95 % CI" in text and "source→target distance" in text
    if not resolved.all():
        assert "is itself below the noise floor" in text
    assert text.count("not distinguishable from zero") == int(below.sum())
    assert (out / "shifts.png").stat().st_size > 1000


def test_knockdown_skips_cells_and_deletion_gene_effects(tiny_run, pbmc3k_corpus, tmp_path):
    out = tmp_path / "kd"
    result = invoke(
        "perturb",
        "--model",
        tiny_run,
        pbmc3k_corpus,
        "--knockdown",
        "LYZ",
        "--fraction",
        0.25,
        "--source",
        SOURCE,
        "--target",
        TARGET,
        "--n-random",
        2,
        "--max-cells",
        30,
        "--max-length",
        129,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "summary.csv")
    assert (rows["n_cells"] + rows["n_skipped"] == 30).all()

    targets = tmp_path / "targets.txt"
    targets.write_text("S100A8\nS100A9\nFTL\n")
    out = tmp_path / "del"
    result = invoke(
        "perturb",
        "--model",
        tiny_run,
        pbmc3k_corpus,
        "--delete",
        "LYZ",
        "--gene-effects",
        "--targets",
        targets,
        "--source",
        SOURCE,
        "--target",
        TARGET,
        "--n-random",
        2,
        "--max-cells",
        20,
        "--max-length",
        129,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    effects = pd.read_parquet(out / "gene_effects.parquet")
    assert list(effects.columns) == ["perturbation", "token", "gene", "mean_cosine", "n_cells"]
    assert effects["mean_cosine"].between(-1, 1 + 1e-9).all() and "LYZ" not in set(effects["gene"])
    assert effects["token"].is_unique
    test = json.loads((out / "summary.json").read_text())["gene_effect_tests"][0]
    assert test["n_targets"] >= 2 and 0 <= test["p_value"] <= 1


def test_unknown_gene_on_the_command_line(tiny_run, pbmc3k_corpus, tmp_path):
    with pytest.raises(InputError, match="unknown gene 'NOTAGENE1'"):
        invoke(
            "perturb",
            "--model",
            tiny_run,
            pbmc3k_corpus,
            "--overexpress",
            "NOTAGENE1",
            "--source",
            SOURCE,
            "--target",
            TARGET,
            "--out",
            tmp_path / "x",
        )
    with pytest.raises(InputError, match="no cells with cell_type = 'Nope'"):
        invoke(
            "perturb",
            "--model",
            tiny_run,
            pbmc3k_corpus,
            "--overexpress",
            "FCGR3A",
            "--source",
            "Nope",
            "--target",
            TARGET,
            "--out",
            tmp_path / "x",
        )


def test_screen_resumes_to_the_same_table(encoder, pbmc3k_corpus, tmp_path):
    from genecompass.perturb import ScreenSettings, merge_screen, screen

    genes = ["FCGR3A", "CD14", "LYZ", "S100A8", "MS4A7", "CST3", "FCER1G"]
    settings = ScreenSettings(
        source=SOURCE, targets=[TARGET, "B"], n_random=2, max_cells=10, batch_genes=2, max_length=129
    )
    full = screen(encoder, pbmc3k_corpus, tmp_path / "full", settings=settings, genes=genes)
    assert full["complete"] and full["batches_written"] == 4
    reference = pd.read_parquet(full["table"])

    part = screen(
        encoder, pbmc3k_corpus, tmp_path / "killed", settings=settings, genes=genes, stop_after_batches=2
    )  # as if killed after two batches
    assert not part["complete"] and part["genes_done"] == 4
    (tmp_path / "killed" / "batches" / ".leftover.parquet.123.tmp").write_bytes(b"partial")  # a torn write
    again = screen(encoder, pbmc3k_corpus, tmp_path / "killed", settings=settings, genes=genes)
    assert again["batches_skipped"] == 2 and again["batches_written"] == 2 and again["complete"]
    pd.testing.assert_frame_equal(pd.read_parquet(again["table"]), reference)

    # two shards, then merge: the same table
    for i in range(2):
        screen(encoder, pbmc3k_corpus, tmp_path / "sharded", settings=settings, genes=genes, shard=(i, 2))
    merged = merge_screen(tmp_path / "sharded")
    pd.testing.assert_frame_equal(pd.read_parquet(merged["table"]), reference)

    assert len(reference) == len(genes) and set(reference["gene"]) == set(genes)
    assert reference["rank_all_targets"].is_monotonic_increasing
    for column in [
        "mean_shift_source",
        f"mean_shift_target:{TARGET}",
        f"fdr_target:{TARGET}",
        "rank_away_from_source",
        f"z_target:{TARGET}",
        f"ci_low_shift_target:{TARGET}",
        f"ci_high_shift_target:{TARGET}",
        f"fraction_of_distance_target:{TARGET}",
        f"noise_floor_target:{TARGET}",
        f"call_target:{TARGET}",
        "call_source",
    ]:
        assert column in reference.columns
    below = reference[f"mean_shift_target:{TARGET}"].abs() < reference[f"noise_floor_target:{TARGET}"]
    assert ((reference[f"call_target:{TARGET}"] == "not distinguishable from zero") == below).all()
    with pytest.raises(InputError, match="other settings"):
        screen(encoder, pbmc3k_corpus, tmp_path / "full", settings=settings, genes=genes[:3])
