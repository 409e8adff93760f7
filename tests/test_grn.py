"""GRN inference from gene embeddings (averaged by gene id) and its evaluation (AUPRC, early precision)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import typer
from test_perturb import invoke, tiny_run_dir

from genecompass.errors import InputError
from genecompass.grn import average_precision, evaluate, infer_edges, write_edges

GENES = [
    "LYZ",
    "CST3",
    "S100A8",
    "S100A9",
    "FCGR3A",
    "MS4A7",
    "CD14",
    "FTL",
    "FTH1",
    "TYROBP",
    "FCER1G",
    "CD74",
    "HLA-DRA",
    "B2M",
    "MALAT1",
    "TMSB4X",
    "ACTB",
    "CD3D",
    "IL7R",
    "NKG7",
]


def test_average_precision_matches_hand_computed_values():
    # sklearn's doc example: y = [0, 0, 1, 1], scores = [0.1, 0.4, 0.35, 0.8] → 0.8333
    assert average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(5 / 6)
    # ties form one threshold: all tied → AP = prevalence
    assert average_precision(np.array([1, 0, 0, 1]), np.zeros(4)) == pytest.approx(0.5)
    assert average_precision(np.array([1, 1, 0, 0]), np.array([4.0, 3, 2, 1])) == pytest.approx(1.0)


def test_infer_edges_threshold_topk_and_tfs():
    tokens = np.array([10, 20, 30, 40])
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [-1, 0]], dtype=np.float32)
    ref = type("R", (), {"symbol_of_token": staticmethod(lambda t: f"g{t}")})()
    edges = infer_edges(tokens, emb, threshold=0.4, reference=ref)
    assert edges[["tf_token", "target_token"]].values.tolist() == [[10, 20]]
    top1 = infer_edges(tokens, emb, threshold=None, top_k=1, reference=ref)
    assert {(a, b) for a, b in top1[["tf_token", "target_token"]].values} == {(10, 20), (20, 30), (30, 40)}
    assert top1["tf_token"].lt(top1["target_token"]).all()  # undirected pairs, once each
    every = infer_edges(tokens, emb, threshold=None, reference=ref)
    assert len(every) == 6 and every["score"].is_monotonic_decreasing
    tf = infer_edges(tokens, emb, threshold=None, tf_tokens=[30], reference=ref)
    assert len(tf) == 3 and (tf["tf_token"] == 30).all()  # the TF first


def test_evaluate_counts_unlisted_pairs_as_negatives(tmp_path):
    edges = pd.DataFrame(
        {
            "tf": list("ab"),
            "target": list("cd"),
            "tf_token": [1, 2],
            "target_token": [3, 4],
            "score": [0.9, 0.5],
        }
    )
    write_edges(edges, tmp_path / "e.tsv", np.array([1, 2, 3, 4]))
    pd.DataFrame({"tf_token": [1, 3, 99], "target_token": [3, 2, 1]}).to_csv(tmp_path / "r.tsv", sep="\t")
    metrics = evaluate(tmp_path / "e.tsv", tmp_path / "r.tsv")
    assert metrics["candidate_pairs"] == 6 and metrics["reference_edges"] == 2  # 99 is outside the universe
    assert metrics["auprc_random"] == pytest.approx(2 / 6) == metrics["early_precision_random"]
    # ranking: (1,3)=hit, (2,4)=miss, then 4 tied unlisted pairs holding the other hit
    assert metrics["auprc"] == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 6))
    assert metrics["early_precision"] == pytest.approx(0.5)
    with pytest.raises(InputError, match="lacks columns"):
        evaluate(tmp_path / "r.tsv", tmp_path / "e.tsv")

    # the prior's training edge (2,4) leaves the candidates: 5 pairs, the miss at rank 2 is gone
    pd.DataFrame({"tf_token": [4], "target_token": [2]}).to_csv(tmp_path / "train.tsv", sep="\t")
    excluded = evaluate(tmp_path / "e.tsv", tmp_path / "r.tsv", tmp_path / "train.tsv")
    assert excluded["candidate_pairs"] == 5 and excluded["excluded_pairs"] == 1
    assert excluded["auprc_random"] == pytest.approx(2 / 5)
    assert excluded["auprc"] == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 5))


@pytest.fixture(scope="module")
def tiny_run(pbmc3k_corpus, tmp_path_factory):
    return tiny_run_dir(pbmc3k_corpus, tmp_path_factory)


def test_grn_infer_and_eval_on_pbmc3k(tiny_run, pbmc3k_corpus, tmp_path):
    from genecompass.perturb import resolve_genes

    genes = tmp_path / "genes.txt"
    genes.write_text("\n".join(GENES) + "\n")
    edges_path = tmp_path / "edges.tsv"
    result = invoke(
        "grn",
        "infer",
        "--model",
        tiny_run,
        pbmc3k_corpus,
        "--out",
        edges_path,
        "--genes",
        genes,
        "--all-pairs",
        "--max-cells",
        200,
        "--min-cells",
        5,
        "--max-length",
        129,
        "--json",
    )
    assert result.exit_code == 0, result.output
    edges = pd.read_csv(edges_path, sep="\t")
    assert list(edges.columns) == ["tf", "target", "tf_token", "target_token", "score"]
    n = json.loads(result.stdout)["genes"]
    assert 10 <= n <= len(GENES) and len(edges) == n * (n - 1) // 2
    assert edges["score"].between(-1 - 1e-9, 1 + 1e-9).all()

    tokens = dict(zip(GENES, resolve_genes(GENES), strict=True))
    reference = pd.DataFrame({"tf": ["S100A8", "CD74", "LYZ"], "target": ["S100A9", "HLA-DRA", "CST3"]})
    reference["tf_token"] = reference["tf"].map(tokens)
    reference["target_token"] = reference["target"].map(tokens)
    reference["source"] = "test"
    reference.to_csv(tmp_path / "held_out.tsv", sep="\t", index=False)
    result = invoke("grn", "eval", "--edges", edges_path, "--reference", tmp_path / "held_out.tsv", "--json")
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert 0.0 <= metrics["auprc"] <= 1.0 and 0.0 <= metrics["early_precision"] <= 1.0
    assert metrics["auprc_random"] == pytest.approx(metrics["reference_edges"] / metrics["candidate_pairs"])

    thresholded = tmp_path / "t.tsv"
    result = invoke(
        "grn",
        "infer",
        "--model",
        tiny_run,
        pbmc3k_corpus,
        "--out",
        thresholded,
        "--genes",
        genes,
        "--threshold",
        0.9,
        "--max-cells",
        200,
        "--min-cells",
        5,
        "--max-length",
        129,
    )
    assert result.exit_code == 0, result.output
    kept = pd.read_csv(thresholded, sep="\t")
    assert (kept["score"] >= 0.9).all() and len(kept) == (edges["score"] >= 0.9).sum()


def test_gene_embeddings_average_by_gene_id_not_position(tiny_run, pbmc3k_corpus):
    import torch

    from genecompass.corpus import Corpus
    from genecompass.grn import gene_embeddings
    from genecompass.perturb import Embedder, cell_species_tokens, load_model, read_cells

    model = load_model(tiny_run, device="cpu")
    corpus = Corpus.open(pbmc3k_corpus)
    tokens, emb, counts = gene_embeddings(model, corpus, max_cells=6, min_cells=1, max_length=65)
    cells = np.sort(np.random.default_rng(0).choice(corpus.n_cells, size=6, replace=False))
    embedder = Embedder(model, max_length=65)
    sums: dict[int, list[np.ndarray]] = {}
    for index in cells:  # one cell at a time, genes matched by id
        (genes, values), species = (
            read_cells(corpus, [index])[0],
            cell_species_tokens(corpus, [index], {"human": 2, "mouse": 3}),
        )
        ids, vals, mask = embedder._tensors([(genes, values)], species)
        with torch.no_grad():
            hidden = model(ids, vals, mask).last_hidden_state[0, 1:]
        for token, vector in zip(ids[0, 1:].tolist(), hidden.numpy(), strict=True):
            sums.setdefault(token, []).append(vector)
    assert sorted(sums) == tokens.tolist()
    for token, vector, count in zip(tokens, emb, counts, strict=True):
        assert count == len(sums[token])
        np.testing.assert_allclose(vector, np.mean(sums[token], axis=0), atol=1e-5)


@pytest.mark.parametrize("command", [("grn", "infer"), ("grn", "eval")])
def test_help_has_an_example(command):
    result = invoke(*command, "--help")
    assert "Example: gc " + " ".join(command) in " ".join(result.output.split())


def test_register_adds_the_group():
    from cli import grn

    app = typer.Typer()
    grn.register(app)
    assert any(g.name == "grn" for g in app.registered_groups)
