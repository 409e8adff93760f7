"""`gc embed` on real data (PBMC3k) with a tiny model pre-trained once per session: output shapes and
provenance, batch-size invariance, pooling, gene embeddings averaged by gene id, reference checks, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "gc" / "torch_extensions"))

REPO = Path(__file__).resolve().parents[1]


def train_tiny_run(tmp_path_factory, corpus: Path) -> Path:
    """A tiny model pre-trained for 20 steps on PBMC3k (top 64 genes), trained once per session and shared by
    test_embed and test_finetune (cached under the session's base temp directory)."""
    from genecompass.train import PretrainConfig, pretrain

    run = tmp_path_factory.getbasetemp() / "gc_tiny_run"
    if not (run / "model" / "gc_run.json").is_file():
        config = PretrainConfig.load("tiny").replace(
            max_steps=20,
            max_length=65,
            max_tokens=1024,
            lr=2e-3,
            warmup_steps=5,
            log_every=5,
            save_every=1000,
        )
        pretrain(corpus, config, run, overwrite=True)
    return run


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: the test machine's two cores are shared, and oversubscription is slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, pbmc3k_corpus, one_thread):
    from genecompass.run import load_run

    path = train_tiny_run(tmp_path_factory, pbmc3k_corpus)
    return load_run(path)


@pytest.fixture(scope="module")
def cells_h5ad(pbmc3k_subset, tmp_path_factory) -> Path:
    """The first 300 PBMC3k cells as an h5ad file."""
    path = tmp_path_factory.mktemp("embed") / "pbmc300.h5ad"
    pbmc3k_subset.write_h5ad(path)
    return path


def cli_app():
    import typer

    from cli import embed, finetune

    app = typer.Typer()
    app.callback()(lambda: None)
    embed.register(app)
    finetune.register(app)
    return app


def test_run_export_writes_the_normaliser(tiny_run, pbmc3k_corpus):
    from genecompass.corpus import Corpus

    corpus = Corpus(pbmc3k_corpus)
    assert tiny_run.medians.hash == corpus.attrs["medians_hash"]  # the same numbers the corpus used
    assert tiny_run.top_k == corpus.top_k and tiny_run.max_length == 65
    assert tiny_run.normalisation == corpus.attrs["normalisation"]


def test_gc_embed_writes_an_h5ad_with_embeddings_and_a_plot(tiny_run, cells_h5ad, tmp_path):
    import anndata as ad
    from typer.testing import CliRunner

    out = tmp_path / "emb.h5ad"
    args = ["embed", "--model", str(tiny_run.path.parent), str(cells_h5ad), "--out", str(out)]
    result = CliRunner().invoke(cli_app(), [*args, "--plot", "cell_type", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["plot_method"] == "umap"  # umap-learn comes with the train extra; 300 cells suffice
    assert Path(summary["plot"]).stat().st_size > 1000
    adata = ad.read_h5ad(out)
    embedding = adata.obsm["X_genecompass"]
    assert embedding.shape == (300, tiny_run.model.config.hidden_size) and embedding.dtype == np.float32
    assert np.isfinite(embedding).all()
    assert list(adata.obs["cell_type"]) == list(ad.read_h5ad(cells_h5ad).obs["cell_type"])  # input order
    provenance = adata.uns["genecompass"]
    assert provenance["reference_hash"] == tiny_run.reference_hash
    assert provenance["medians_hash"] == tiny_run.medians_hash
    assert provenance["pool"] == tiny_run.model.config.cell_embedding == "mean"  # the run's own default
    again = CliRunner().invoke(cli_app(), args)  # no silent replacement
    assert again.exit_code != 0 and "already exists" in str(again.exception)
    assert not list(tmp_path.glob(".*partial*"))


def test_zarr_output_is_streamed_and_equals_the_h5ad_output(tiny_run, cells_h5ad, tmp_path, monkeypatch):
    import anndata as ad
    import pandas as pd
    from typer.testing import CliRunner

    from genecompass import embed as embed_module

    written = []
    original = embed_module.ZarrEmbeddingWriter.write

    def spy(self, start, block):
        assert self.tmp.is_dir()  # written under a temporary name, renamed when whole
        written.append((start, len(block)))
        original(self, start, block)

    monkeypatch.setattr(embed_module.ZarrEmbeddingWriter, "write", spy)
    zarr_path, h5ad_path = tmp_path / "emb.zarr", tmp_path / "emb.h5ad"
    summary = embed_module.embed_to_zarr(cells_h5ad, tiny_run, out=zarr_path, genes=True, chunk_size=128)
    assert written == [(0, 128), (128, 128), (256, 44)]  # one input chunk at a time, in order
    assert zarr_path.is_dir() and not list(tmp_path.glob(".*partial*"))
    embed_module.embed(cells_h5ad, tiny_run, out=h5ad_path, genes=True, chunk_size=128)
    streamed, whole = ad.read_zarr(zarr_path), ad.read_h5ad(h5ad_path)
    hidden = tiny_run.model.config.hidden_size
    assert streamed.shape == whole.shape == (300, 0)
    assert streamed.obsm["X_genecompass"].shape == (300, hidden) == tuple(summary["embedding_shape"])
    np.testing.assert_array_equal(streamed.obsm["X_genecompass"], whole.obsm["X_genecompass"])
    pd.testing.assert_frame_equal(streamed.obs, whole.obs)
    assert streamed.uns["genecompass"] == whole.uns["genecompass"]
    for key, value in whole.uns["genecompass_genes"].items():
        np.testing.assert_array_equal(streamed.uns["genecompass_genes"][key], value)
    assert summary["n_genes_embedded"] == len(whole.uns["genecompass_genes"]["token_id"])

    args = ["embed", "--model", str(tiny_run.path), str(cells_h5ad), "--out", str(zarr_path), "--json"]
    refused = CliRunner().invoke(cli_app(), args)
    assert refused.exit_code != 0 and "already exists" in str(refused.exception)
    replaced = CliRunner().invoke(cli_app(), [*args, "--overwrite", "--pool", "mean"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads(replaced.output)["embedding_shape"] == [300, hidden]
    assert ad.read_zarr(zarr_path).uns["genecompass"]["pool"] == "mean"
    assert not list(tmp_path.glob(".*partial*"))


def test_embeddings_do_not_depend_on_batch_size(tiny_run, pbmc3k_subset):
    from genecompass.embed import embed

    adata = pbmc3k_subset[:64].copy()
    for pool in ("mean", "species"):
        one = embed(adata.copy(), tiny_run, batch_size=1, pool=pool).obsm["X_genecompass"]
        many = embed(adata.copy(), tiny_run, batch_size=64, pool=pool).obsm["X_genecompass"]
        budget = embed(adata.copy(), tiny_run, batch_size=64, max_tokens=300, pool=pool).obsm["X_genecompass"]
        assert np.abs(one - many).max() < 1e-5
        assert np.abs(budget - many).max() < 1e-5


def test_species_shortcut_equals_the_full_forward(tiny_run, pbmc3k_subset):
    """The species pool skips the last layer's work at gene positions; the output must not change."""
    import torch

    from genecompass.embed import TokenStream, pad_batch, species_outputs

    with TokenStream(pbmc3k_subset[:12].copy(), tiny_run) as stream:
        tokens = stream.read_all()
    ids, values, mask = pad_batch(tokens, np.arange(12))
    mask[1::2, 40:] = False  # every other cell shorter: padding must stay masked
    ids[~mask], values[~mask] = 0, 0.0
    with torch.no_grad():
        full = tiny_run.model(ids, values, mask).last_hidden_state[:, 0]
        fast = species_outputs(tiny_run.model, ids, values, mask)
    assert fast.shape == full.shape
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_mean_pool_differs_from_species_pool(tiny_run, pbmc3k_subset):
    from genecompass.embed import embed

    adata = pbmc3k_subset[:32].copy()
    species = embed(adata.copy(), tiny_run, pool="species").obsm["X_genecompass"]
    mean = embed(adata.copy(), tiny_run, pool="mean")
    assert mean.uns["genecompass"]["pool"] == "mean"
    assert np.abs(species - mean.obsm["X_genecompass"]).max() > 1e-3


def test_gene_embeddings_are_averaged_by_gene_id(tiny_run, pbmc3k_subset):
    """Check one gene by hand: its output in every cell that carries it (at whatever rank), averaged."""
    import torch

    from genecompass.embed import TokenStream, embed, pad_batch

    adata = pbmc3k_subset[:24].copy()
    result = embed(adata.copy(), tiny_run, genes=True, batch_size=5)
    table = result.uns["genecompass_genes"]
    with TokenStream(adata, tiny_run) as stream:
        tokens = stream.read_all()
    # A gene found in several cells at different ranks (a per-position average would mix it with others).
    positions: dict[int, list[tuple[int, int]]] = {}
    for cell in range(tokens.n_cells):
        for rank, gene in enumerate(tokens.genes[tokens.offsets[cell] : tokens.offsets[cell + 1]]):
            positions.setdefault(int(gene), []).append((cell, rank))
    gene = next(g for g, seen in positions.items() if len({r for _, r in seen}) >= 3)
    outputs = []
    with torch.no_grad():
        for cell, rank in positions[gene]:
            ids, values, mask = pad_batch(tokens, np.array([cell]))
            hidden = tiny_run.model(ids, values, mask).last_hidden_state[0]
            assert int(ids[0, rank + 1]) == gene
            outputs.append(hidden[rank + 1].numpy())
    row = int(np.flatnonzero(table["token_id"] == gene)[0])
    assert table["n_cells"][row] == len(positions[gene])
    np.testing.assert_allclose(table["embedding"][row], np.mean(outputs, 0), atol=1e-5)
    assert set(table["token_id"].tolist()) == set(positions)
    assert table["embedding"].shape == (len(positions), tiny_run.model.config.hidden_size)
    assert table["symbol"][row] != ""


def test_a_run_for_another_gene_reference_is_refused(tiny_run, tmp_path, pbmc3k_subset):
    from genecompass.embed import embed
    from genecompass.errors import FormatError, ReferenceMismatchError
    from genecompass.run import load_run

    other = tmp_path / "other"
    shutil.copytree(tiny_run.path, other / "model")
    info = json.loads((other / "model" / "gc_run.json").read_text())
    info["reference_hash"] = "ref-0000000000000000"
    (other / "model" / "gc_run.json").write_text(json.dumps(info))
    with pytest.raises(ReferenceMismatchError, match="ref-0000000000000000.*installed reference"):
        embed(pbmc3k_subset[:4].copy(), other)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copyfile(tiny_run.path / "config.json", bare / "config.json")
    with pytest.raises(FormatError, match="gc_run.json"):
        load_run(bare)


def test_every_new_command_has_help_with_an_example():
    from typer.testing import CliRunner

    for command in (["embed"], ["finetune", "celltype"], ["finetune", "gene-class"], ["predict"]):
        result = CliRunner().invoke(cli_app(), [*command, "--help"], terminal_width=200)
        assert result.exit_code == 0, result.output
        assert "Example: gc " + " ".join(command) in " ".join(result.output.split())


def test_embed_help_through_the_gc_app():
    result = subprocess.run(
        [sys.executable, "-m", "cli.app", "embed", "--help"], cwd=REPO, capture_output=True, text=True
    )
    if "No such command" in result.stderr:
        pytest.skip("`embed` is not registered in cli/app.py yet")
    assert result.returncode == 0, result.stderr
    assert "Example: gc embed" in " ".join(result.stdout.split())
