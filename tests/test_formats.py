"""Published GeneCompass checkpoints: import, parity with the original code, export, bad input.

The fixture under tests/data/genecompass_fixture/ was made by the original code itself
(scripts/make_genecompass_fixture.py): a small random checkpoint, its token dictionary and medians, raw
count files, and the original's tokenisation and outputs on them. gc starts from the raw counts.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genecompass.errors import FormatError, OutputExistsError
from genecompass.formats import (
    check_state_dict,
    convert_state_dict,
    expected_shapes,
    export_genecompass,
    gc_config_kwargs,
    import_genecompass,
    read_original,
    read_plain_dict,
)

FIXTURE = Path(__file__).parent / "data" / "genecompass_fixture"
CHECKPOINT = FIXTURE / "checkpoint"
TOKENS = FIXTURE / "token_dict.pickle"
MEDIANS = FIXTURE / "medians.pickle"
ATOL = 1e-5


@pytest.fixture(scope="module")
def original_outputs():
    return dict(np.load(FIXTURE / "outputs.npz"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "run"
    import_genecompass(CHECKPOINT, TOKENS, out, medians_path=MEDIANS)
    return out


@pytest.fixture(scope="module")
def imported_corpus(imported, tmp_path_factory):
    """The fixture's raw counts, tokenised by gc with the run's vocabulary, medians and normalisation."""
    from genecompass.run import load_run
    from genecompass.tokenize import TokenizeOptions, tokenize

    run = load_run(imported)
    options = TokenizeOptions(
        top_k=run.top_k,
        library_size=run.normalisation["library_size"],
        target_sum=run.normalisation["target_sum"],
        min_vocab_fraction=0.0,  # the fixture's vocabulary holds 294 genes; PBMC3k has thousands
        obs_keys=(),
    )
    corpora = {}
    for species in ("human", "mouse"):
        corpora[species] = tmp_path_factory.mktemp("corpus") / f"{species}.zarr"
        tokenize([FIXTURE / f"{species}.h5ad"], corpora[species], options=options, medians=run.medians,
                 reference=run.reference)
    return corpora


def _cells(corpus_path, species_token):
    from genecompass.corpus import Corpus

    corpus = Corpus.open(corpus_path)
    offsets, genes, values = corpus.read_cells(0, corpus.n_cells)
    for i in range(corpus.n_cells):
        a, b = offsets[i], offsets[i + 1]
        yield (np.concatenate([[species_token], np.asarray(genes[a:b], np.int64)]),
               np.concatenate([[0.0], np.asarray(values[a:b], np.float32)]).astype(np.float32))


def test_gc_equals_the_original_from_raw_counts(imported, imported_corpus, original_outputs):
    from genecompass.model import GeneCompassForPretraining
    from genecompass.run import load_run

    run = load_run(imported, model_class=GeneCompassForPretraining)
    model = run.model.eval()
    V = len(pickle.loads(TOKENS.read_bytes()))
    out = original_outputs
    genes_at, hidden_at = out["gene_offsets"], out["hidden_offsets"]
    cell = 0
    for species in ("human", "mouse"):
        token = run.reference.species_token_ids[species]
        for ids, values in _cells(imported_corpus[species], token):
            assert out["cell_species"][cell] == (species == "mouse")
            g = slice(genes_at[cell], genes_at[cell + 1])
            # tokenisation: same genes in the same order, same values (log2 vs log1p/ln2: 1 ulp)
            np.testing.assert_array_equal(ids[1:], out["input_ids"][g])
            np.testing.assert_allclose(values[1:], out["values"][g], rtol=1e-6, atol=0)
            with torch.no_grad():
                inputs = torch.tensor(ids)[None], torch.tensor(values)[None]
                hidden = model.genecompass(*inputs).last_hidden_state
                genes_hidden = hidden[0, 1:]
                logits = model.id_decoder(model.id_transform(genes_hidden))[:, :V]
                value_pred = model.value_decoder(model.value_transform(genes_hidden)).squeeze(-1)
            expected = out["last_hidden_state"][hidden_at[cell]:hidden_at[cell + 1]]
            np.testing.assert_allclose(hidden[0].numpy(), expected, atol=ATOL, rtol=0)  # species + genes
            np.testing.assert_allclose(logits.numpy(), out["logits"][g], atol=ATOL, rtol=0)
            np.testing.assert_allclose(value_pred.numpy(), out["value_pred"][g], atol=ATOL, rtol=0)
            cell += 1
    assert cell == len(out["cell_species"]) == 16


def test_padding_is_masked_so_batches_equal_single_cells(imported, imported_corpus):
    """gc masks padding (the original's embedding script feeds padded rows without a mask)."""
    from genecompass.run import load_run

    run = load_run(imported)
    cells = list(_cells(imported_corpus["mouse"], run.reference.species_token_ids["mouse"]))
    width = max(len(ids) for ids, _ in cells)
    ids = torch.zeros(len(cells), width, dtype=torch.long)
    values = torch.zeros(len(cells), width)
    for i, (c_ids, c_values) in enumerate(cells):
        ids[i, : len(c_ids)], values[i, : len(c_values)] = torch.tensor(c_ids), torch.tensor(c_values)
    with torch.no_grad():
        batched = run.model(ids, values).last_hidden_state
        for i, (c_ids, c_values) in enumerate(cells):
            alone = run.model(torch.tensor(c_ids)[None], torch.tensor(c_values)[None]).last_hidden_state[0]
            torch.testing.assert_close(batched[i, : len(c_ids)], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", ["small", "base"])
def test_every_published_key_is_consumed(size):
    """At the published Small and Base shapes (key lists written by the original code), the importer
    expects exactly the original's keys and fills every parameter of gc's model (meta tensors: no memory)."""
    from genecompass.model import GeneCompassConfig, GeneCompassForPretraining

    shapes = json.loads((FIXTURE / f"keys_{size}.json").read_text())
    config = json.loads((FIXTURE / f"config_{size}.json").read_text())
    state = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    V = config["vocab_size"]
    token_dict = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i for i in range(2, V)}}

    class Checkpoint:  # what read_original returns, without files
        pass

    checkpoint = Checkpoint()
    checkpoint.config, checkpoint.token_dict, checkpoint.vocab_size = config, token_dict, V
    checkpoint.knowledge = ["promoter", "co_exp", "gene_family", "peca_grn"]
    dims = check_state_dict(Path(f"keys_{size}.json"), state, checkpoint)
    optional = {"bert.embeddings.position_ids", "cls.predictions.decoder.weight",
                "cls.predictions.decoder.bias", "cls4value.predictions.decoder.bias"}
    assert set(expected_shapes(config, dims)) == set(shapes) - optional
    state["bert.embeddings.homologous_index"] = torch.empty(V, dtype=torch.long, device="meta")
    converted = convert_state_dict(state, checkpoint, dims)
    with torch.device("meta"):
        model = GeneCompassForPretraining(GeneCompassConfig(**gc_config_kwargs(checkpoint, dims, 1.0)))
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
    assert missing == [] and unexpected == []
    assert model.config.num_hidden_layers == config["num_hidden_layers"]


def test_export_restores_the_original_checkpoint(imported, tmp_path):
    exported = tmp_path / "exported"
    export_genecompass(imported, exported)
    original = torch.load(CHECKPOINT / "pytorch_model.bin", weights_only=True)
    written = torch.load(exported / "pytorch_model.bin", weights_only=True)
    assert set(written) == set(original)
    for key, tensor in original.items():
        assert written[key].dtype == tensor.dtype, key
        assert torch.equal(written[key], tensor), key
    assert read_plain_dict(exported / "token_dict.pickle", value_type=int, what="t") == \
        pickle.loads(TOKENS.read_bytes())
    config = json.loads((exported / "config.json").read_text())
    assert config["emb_warmup_steps"] > 0 and config["use_cls_token"] and config["vocab_size"] == 294

    again = tmp_path / "again"
    import_genecompass(exported, exported / "token_dict.pickle", again,
                       medians_path=exported / "medians.pickle")
    from genecompass.run import load_run

    a, b = load_run(imported), load_run(again)
    assert a.medians_hash == b.medians_hash
    ids = torch.tensor([[a.reference.species_token_ids["human"], 5, 17, 40]])
    values = torch.tensor([[0.0, 3.0, 2.0, 0.5]])
    with torch.no_grad():
        assert torch.equal(a.model(ids, values).last_hidden_state, b.model(ids, values).last_hidden_state)


def test_cli_import_then_embed_raw_counts_both_pools(tmp_path):
    import anndata as ad

    env = {**os.environ, "GC_DEBUG": ""}
    gc = [sys.executable, "-m", "cli.app"]
    run = tmp_path / "run"
    command = [*gc, "model", "import", "genecompass", str(CHECKPOINT), "--token-dict", str(TOKENS),
               "--medians", str(MEDIANS), "--out", str(run)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stderr
    for pool in ("species", "mean"):
        out = tmp_path / f"emb_{pool}.h5ad"
        done = subprocess.run([*gc, "embed", "--model", str(run), str(FIXTURE / "mouse.h5ad"), "--pool", pool,
                               "--out", str(out)], capture_output=True, text=True, env=env,
                              cwd=Path(__file__).parents[1])
        assert done.returncode == 0, done.stderr
        embedded = ad.read_h5ad(out)
        assert embedded.obsm["X_genecompass"].shape == (8, 32)
        assert np.isfinite(embedded.obsm["X_genecompass"]).all()


def test_import_without_medians_says_where_they_come_from(tmp_path):
    from genecompass.run import load_run

    run = tmp_path / "run"
    import_genecompass(CHECKPOINT, TOKENS, run)
    with pytest.raises(FormatError, match="gc corpus medians"):
        load_run(run)


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "payload, problem",
    [
        (_Boom(), "asks for"),
        ([1, 2, 3], "not a dict"),
        ({"ENSG00000000003": "x"}, "not a int"),
        ({1: 2}, "non-string key"),
    ],
)
def test_pickles_other_than_plain_dicts_are_refused(tmp_path, payload, problem):
    path = tmp_path / "bad.pickle"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(FormatError, match=problem):
        read_plain_dict(path, value_type=int, what="token dictionary")


def test_numpy_number_medians_are_plain_enough(tmp_path):
    path = tmp_path / "medians.pickle"
    path.write_bytes(pickle.dumps({"ENSG00000000003": np.float64(1.5), "ENSG00000000005": np.float32(2)}))
    assert read_plain_dict(path, value_type=float, what="medians") == {"ENSG00000000003": 1.5,
                                                                        "ENSG00000000005": 2.0}


def _copy_checkpoint(tmp_path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(CHECKPOINT, copy)
    return copy


def _broken(tmp_path, edit) -> Path:
    copy = _copy_checkpoint(tmp_path)
    state = torch.load(copy / "pytorch_model.bin", weights_only=True)
    edit(state)
    torch.save(state, copy / "pytorch_model.bin")
    return copy


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda s: s.pop("bert.encoder.layer.1.output.dense.weight"), "missing 1 key"),
        (lambda s: s.__setitem__("bert.pooler.dense.weight", torch.zeros(32, 32)), "unexpected 1 key"),
        (lambda s: s.__setitem__("cls4value.predictions.bias", torch.zeros(2)), "has shape"),
        (lambda s: s.__setitem__("cls.predictions.decoder.weight", torch.zeros(294, 32)), "tied"),
    ],
)
def test_bad_checkpoints_fail_cleanly_and_write_nothing(tmp_path, edit, problem):
    checkpoint = _broken(tmp_path, edit)
    out = tmp_path / "run"
    with pytest.raises(FormatError, match=problem):
        import_genecompass(checkpoint, TOKENS, out, medians_path=MEDIANS)
    assert not out.exists() and not list(tmp_path.glob(".run*"))


def test_bad_token_dictionaries_and_configs(tmp_path):
    tokens = pickle.loads(TOKENS.read_bytes())
    small = tmp_path / "small.pickle"
    small.write_bytes(pickle.dumps({k: v for k, v in tokens.items() if v < 100}))
    with pytest.raises(FormatError, match="vocab_size"):
        read_original(CHECKPOINT, small)
    alien = tmp_path / "alien.pickle"
    renamed = {("FBgn0000001" if v == 10 else k): v for k, v in tokens.items()}
    alien.write_bytes(pickle.dumps(renamed))
    with pytest.raises(FormatError, match="unknown species"):
        read_original(CHECKPOINT, alien)
    copy = _copy_checkpoint(tmp_path)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "use_cls_token": False}))
    with pytest.raises(FormatError, match="use_cls_token"):
        read_original(copy, TOKENS)


def test_existing_output_is_not_overwritten(imported):
    with pytest.raises(OutputExistsError):
        import_genecompass(CHECKPOINT, TOKENS, imported, medians_path=MEDIANS)


def _write_original_checkpoint(directory: Path, genes: list[str], seed: int = 0) -> None:
    """A checkpoint in the original's layout (keys and shapes as the fixture's original code writes them),
    random weights, over ``genes``: for exercising every command on real data with a larger vocabulary."""
    directory.mkdir(parents=True)
    token_dict = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(genes)}}
    config = {**json.loads((CHECKPOINT / "config.json").read_text()), "vocab_size": len(token_dict)}
    dims = {name: 16 for name in ("promoter", "co_exp", "gene_family", "peca_grn")}
    generator = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(s, generator=generator) * 0.1 for k, s in expected_shapes(config, dims).items()}
    for name in dims:
        state[f"bert.embeddings.{name}_knowledge"][:2] = 0.0
    state["bert.embeddings.homologous_index"] = torch.arange(len(token_dict))
    state["emb_warmup.alpha"], state["emb_warmup.steps"] = torch.tensor(1.0), torch.tensor(0)
    torch.save(state, directory / "pytorch_model.bin")
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "token_dict.pickle").write_bytes(pickle.dumps(token_dict))


@pytest.mark.slow
def test_every_command_accepts_an_imported_run(pbmc3k_adata, tmp_path):
    """tokenize, embed, finetune celltype, predict, perturb run and screen, grn infer, gene-class and
    continued pre-training on an imported run, through the CLI, on real PBMC3k cells."""
    cells = pbmc3k_adata[pbmc3k_adata.obs["cell_type"].isin(["CD14 Monocytes", "FCGR3A Monocytes"])]
    cells = cells[:60]
    expressed = np.asarray((cells.X > 0).sum(0)).ravel()
    order = np.argsort(-expressed)
    cells = cells[:, order[:1200]].copy()  # half of these genes are in the vocabulary
    genes = list(cells.var_names[:600])
    from genecompass.reference import load_reference

    mouse = list(load_reference().genes("mouse").index[:20])  # the published vocabularies hold both species
    _write_original_checkpoint(tmp_path / "ckpt", genes + mouse)
    data = tmp_path / "cells.h5ad"
    cells.write_h5ad(data)
    from typer.testing import CliRunner

    from cli.app import app

    def gc(*args: str) -> None:  # in-process: the model stack is imported once, not per command
        result = CliRunner().invoke(app, list(args))
        assert result.exit_code == 0, f"gc {' '.join(args)}\n{result.output[-2000:]}\n{result.exception!r}"

    run, t = str(tmp_path / "run"), str(tmp_path)
    gc("model", "import", "genecompass", f"{t}/ckpt", "--token-dict", f"{t}/ckpt/token_dict.pickle",
       "--out", f"{t}/bare")
    gc("corpus", "medians", str(data), "--model", f"{t}/bare", "--out", f"{t}/medians.tsv")
    gc("model", "import", "genecompass", f"{t}/ckpt", "--token-dict", f"{t}/ckpt/token_dict.pickle",
       "--medians", f"{t}/medians.tsv", "--out", run)
    gc("tokenize", str(data), "--model", run, "--obs-keys", "cell_type", "--out", f"{t}/cells.zarr")
    gc("embed", "--model", run, str(data), "--out", f"{t}/emb.h5ad")
    gc("finetune", "celltype", str(data), "--model", run, "--label-key", "cell_type", "--epochs", "1",
       "--max-length", "65", "--out", f"{t}/ft")
    gc("predict", "--model", f"{t}/ft", str(data), "--out", f"{t}/pred.h5ad")
    gene = genes[0]
    gc("perturb", "run", "--model", run, f"{t}/cells.zarr", "--overexpress", gene, "--cells-key", "cell_type",
       "--source", "CD14 Monocytes", "--target", "FCGR3A Monocytes", "--max-cells", "8", "--n-random", "2",
       "--out", f"{t}/perturb")
    (tmp_path / "candidates.txt").write_text("\n".join(genes[:3]) + "\n")
    gc("perturb", "screen", "--model", run, f"{t}/cells.zarr", "--cells-key", "cell_type", "--source",
       "CD14 Monocytes", "--target", "FCGR3A Monocytes", "--genes", f"{t}/candidates.txt", "--max-cells", "8",
       "--n-random", "2", "--out", f"{t}/screen")
    gc("grn", "infer", "--model", run, f"{t}/cells.zarr", "--neighbours", "3", "--out", f"{t}/edges.tsv")
    (tmp_path / "labels.tsv").write_text("".join(f"{g}\t{i % 2}\n" for i, g in enumerate(genes[:40])))
    gc("finetune", "gene-class", f"{t}/cells.zarr", "--model", run, "--labels", f"{t}/labels.tsv",
       "--folds", "2", "--out", f"{t}/geneclass")
    gc("pretrain", f"{t}/cells.zarr", "--init", run, "--config", "tiny", "--max-steps", "2", "--max-tokens",
       "2048", "--out", f"{t}/more")
    gc("embed", "--model", f"{t}/more", str(data), "--out", f"{t}/emb_more.h5ad")
    from genecompass.run import load_run

    before, after = load_run(run), load_run(f"{t}/more")
    assert after.reference.hash == before.reference.hash
    assert after.model.config.species_embedding == "prepended"
    moved = [not torch.equal(p, q) for p, q in zip(before.model.parameters(), after.model.parameters())]
    assert any(moved)  # the steps trained the imported weights
