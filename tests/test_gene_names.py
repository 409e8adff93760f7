"""Gene names as labs write them: previous HGNC symbols and aliases (the name tables of the reference
bundle), their precedence, species precedence, and `gc inspect`'s list of the genes it could not map."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genecompass.inspect import inspect_counts
from genecompass.io import open_counts
from genecompass.reference import load_reference

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "genecompass" / "reference_data"

# Symbols labs still write (issue 15) -> (Ensembl ID, GENCODE v48 symbol). Every one is a previous
# symbol (HGNC) or a former Ensembl gene name of that gene.
PREVIOUS = {
    "CD97": ("ENSG00000123146", "ADGRE5"),
    "GARS": ("ENSG00000106105", "GARS1"),
    "SARS": ("ENSG00000031698", "SARS1"),  # also an HGNC alias of SARS2: the previous symbol wins
    "GBA": ("ENSG00000177628", "GBA1"),
    "SHFM1": ("ENSG00000127922", "SEM1"),
    "APITD1": ("ENSG00000175279", "CENPS"),
    "AGPAT9": ("ENSG00000138678", "GPAT3"),  # also an HGNC alias of LPCAT1
    "ARNTL": ("ENSG00000133794", "BMAL1"),
    "C11orf31": ("ENSG00000211450", "SELENOH"),
    "KIAA1522": ("ENSG00000162522", "NHSL3"),
    "HSPB11": ("ENSG00000081870", "IFT25"),
}
# CCL4L1 is a current NCBI Gene symbol (Entrez 388372), but no GRCh38 annotation in the sources has the gene
# (GENCODE v48, Ensembl 84, 93, 100), nor lists CCL4L1 as a previous symbol or alias; only GRCh37 had it
# (ENSG00000205020, an ID GENCODE v48 does not have). It cannot map, and mapping it to its paralog CCL4L2
# would be wrong.
NOT_IN_GENCODE = "CCL4L1"


@pytest.fixture(scope="module")
def ref():
    return load_reference()


def test_previous_symbols_map_to_the_human_gene(ref):
    for name, (gene_id, symbol) in PREVIOUS.items():
        for species in (None, "human"):
            [record] = ref.lookup(name, species)
            assert (record.species, record.gene_id, record.symbol, record.match) == (
                "human", gene_id, symbol, "previous"), name
            assert record.token_id is not None
        assert ref.lookup(name.lower(), "human")[0].gene_id == gene_id  # case-insensitive
    names = list(PREVIOUS)
    assert ref.gene_ids_for_symbols(names, "human") == [g for g, _ in PREVIOUS.values()]
    assert ref.lookup(NOT_IN_GENCODE) == [] and ref.gene_ids_for_symbols([NOT_IN_GENCODE], "human") == [None]


def test_an_official_symbol_wins_over_previous_names_and_aliases(ref):
    # MARCH1 was MARCHF1's symbol; "SEPT7" SEPTIN7's. The official symbol itself never goes through the table.
    assert ref.lookup("MARCH1")[0].symbol == "MARCHF1"
    assert ref.lookup("SARS1", "human")[0].match == "symbol"
    names = pd.read_csv(BUNDLE / "names_human.tsv.gz", sep="\t", dtype=str, keep_default_na=False)
    official = set(ref.genes("human").symbol.str.upper())
    assert not names.name.str.upper().isin(official).any()
    # one gene per name, case-insensitively, and previous names are never also entered as aliases
    upper = names.name.str.upper()
    assert names.groupby(upper).gene_id.nunique().max() == 1
    assert names.groupby(upper).kind.nunique().max() == 1
    assert set(names.kind) == {"previous", "alias"}


def test_previous_name_beats_an_ncbi_alias(ref):
    # HN1 was JPT1's symbol; NCBI also lists "hN1" as a synonym of NOTCH1. AIM1 was CRYBG1's symbol; NCBI
    # lists it for CD5L ("apoptosis inhibitor of macrophages"). A previous symbol names one gene's history.
    assert ref.lookup("HN1", "human")[0].symbol == "JPT1"
    assert ref.lookup("AIM1", "human")[0].symbol == "CRYBG1"
    # hg19-era clone names (10x hg19 references) are GRCh37/Ensembl names of the same Ensembl gene
    assert ref.lookup("RP11-34P13.3", "human")[0].gene_id == "ENSG00000243485"


def test_a_name_ambiguous_at_its_tier_is_dropped(ref):
    # ACC1 is an alias of ACACA and of other genes: no answer rather than a wrong one
    assert ref.lookup("ACC1", "human") == []


def test_ncbi_mito_names_beat_an_hgnc_alias_of_a_nuclear_gene(ref):
    # RNR1 is NCBI's symbol for MT-RNR1 and an HGNC alias of NR4A2; files keyed by NCBI GeneIDs mean MT-RNR1
    [record] = ref.lookup("RNR1", "human")
    assert record.symbol == "MT-RNR1" and record.is_mito
    assert ref.gene_ids_for_symbols(["RNR1", "COX1", "ND2"], "human") == [
        ref.lookup(s, "human")[0].gene_id for s in ("MT-RNR1", "MT-CO1", "MT-ND2")]


# Real names where human has a previous symbol and mouse an official symbol that differs only in case.
# Before the species rule, a lookup without a species gave the mouse gene (another token) for each.
HUMAN_FIRST = {"ANK": "ANK1", "PABPC2": "PABPC1", "MIR544": "MIR544A", "ACAT3": "SOAT1"}


def test_a_human_name_never_resolves_to_a_mouse_gene(ref):
    for name, symbol in HUMAN_FIRST.items():
        mouse = ref.lookup(name, "mouse")
        [human] = ref.lookup(name)
        assert (human.species, human.symbol) == ("human", symbol), name
        assert mouse and mouse[0].token_id != human.token_id  # the other answer was a different gene
    # an exact official symbol of either species still wins: a mouse symbol written as mouse writes it
    assert [r.species for r in ref.lookup("Pabpc2")] == ["mouse"]
    assert [r.species for r in ref.lookup("Gapdh")] == ["mouse"]


def _human_symbol_file(path: Path) -> Path:
    """A human h5ad keyed by symbols as a lab writes them: current symbols, previous ones, CCL4L1."""
    import anndata as ad
    import scipy.sparse as sp

    current = ["ACTB", "GAPDH", "CD3E", "CD14", "LYZ", "MS4A1", "NKG7", "B2M", "MALAT1", "FTL"]
    names = current + list(PREVIOUS) + list(HUMAN_FIRST) + [NOT_IN_GENCODE, "NOTAGENE1"]
    counts = np.ones((4, len(names)), dtype=np.float32)
    counts[:, names.index(NOT_IN_GENCODE)] = 5.0
    counts[:, names.index("NOTAGENE1")] = 3.0
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = names
    adata.obs_names = [f"cell{i}" for i in range(4)]
    adata.write_h5ad(path)
    return path


def test_a_human_file_maps_previous_symbols_to_human_tokens(tmp_path, ref):
    path = _human_symbol_file(tmp_path / "lab.h5ad")
    with open_counts(path) as src:
        gmap = src.gene_map(ref)
        names = list(src.var_names)
    assert gmap.species == "human"
    expected = {**{n: ref.lookup(g, "human")[0].token_id for n, (g, _) in PREVIOUS.items()},
                **{n: ref.lookup(s, "human")[0].token_id for n, s in HUMAN_FIRST.items()}}
    assert {n: int(gmap.col_token[names.index(n)]) for n in expected} == expected


def test_inspect_lists_the_unmapped_genes_and_their_share(tmp_path, ref):
    path = _human_symbol_file(tmp_path / "lab.h5ad")
    report = inspect_counts(path, reference=ref, top_unmapped=1)
    unmapped = report["unmapped_genes"]
    n_genes = report["n_genes"]
    total = 4 * (n_genes - 2) + 4 * 5 + 4 * 3
    assert unmapped["n_genes"] == 2 and unmapped["n_unknown_name"] == 2
    assert unmapped["count_share"] == pytest.approx((4 * 5 + 4 * 3) / total)
    assert unmapped["top"] == [{"gene": NOT_IN_GENCODE, "symbol": None, "gene_id": None, "counts": 20.0,
                                "share": pytest.approx(20 / total), "reason": "unknown name"}]
    assert inspect_counts(path, reference=ref, top_unmapped=0)["unmapped_genes"]["top"] == []

    out = subprocess.run([sys.executable, "-m", "cli.app", "inspect", str(path), "--json"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)["unmapped_genes"]["top"]
    assert [row["gene"] for row in listed] == [NOT_IN_GENCODE, "NOTAGENE1"]

    out = subprocess.run([sys.executable, "-m", "cli.app", "inspect", str(path)], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "unmapped_genes" in out.stdout and "2 (" in out.stdout and "CCL4L1" in out.stdout

    bad = subprocess.run([sys.executable, "-m", "cli.app", "inspect", str(path), "--top-unmapped", "-1"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and "--top-unmapped" in bad.stderr


def test_inspect_names_known_genes_outside_the_vocabulary(ref):
    report = inspect_counts(REPO / "data" / "pbmc3k.h5ad", reference=ref, max_cells_checked=300)
    unmapped = report["unmapped_genes"]
    assert unmapped["n_genes"] == report["n_genes"] - report["n_genes_in_vocab"]
    assert unmapped["n_unknown_name"] + unmapped["n_known_not_in_vocab"] == unmapped["n_genes"]
    assert 0 < unmapped["count_share"] < 0.02 and len(unmapped["top"]) == 20
    shares = [row["share"] for row in unmapped["top"]]
    assert shares == sorted(shares, reverse=True)
    # hg19 IDs retired since (CCL5's old ID) and pseudogenes (no token) are told apart
    reasons = {row["symbol"]: row["reason"] for row in unmapped["top"]}
    assert reasons["CCL5"] == "unknown Ensembl ID (retired?)"
    assert any(r.startswith("biotype ") and r.endswith("no token") for r in reasons.values())


# ------------------------------------------------------------------------------------- the build rule


def _build_script():
    spec = importlib.util.spec_from_file_location("build_reference", REPO / "scripts" / "build_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_build_names_precedence_and_ambiguity():
    build = _build_script()
    genes = pd.DataFrame({"gene_id": ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"],
                          "symbol": ["AAA1", "BBB1", "ENSG00000000003"]})
    rows = [
        ("AAA", "ENSG00000000001", "previous", "hgnc-previous"),  # previous of one gene
        ("aaa", "ENSG00000000002", "alias", "ncbi"),  # an alias of another: the previous name decides
        ("DUP", "ENSG00000000001", "previous", "ensembl84"),  # a previous name of two genes: dropped, and
        ("DUP", "ENSG00000000002", "previous", "ensembl93"),
        ("DUP", "ENSG00000000003", "alias", "hgnc-alias"),  # it does not fall through to the alias tier
        ("BBB1", "ENSG00000000001", "alias", "ncbi"),  # an official symbol (BBB1): never entered
        ("X9", "ENSG00000000003", "alias", "hgnc-alias"),  # an unnamed gene may have an alias
        ("X9", "ENSG00000000003", "alias", "ncbi"),  # the same fact twice: one row, the first source
        ("ENSG00000000002", "ENSG00000000001", "previous", "ensembl84"),  # an ID is not a name
        ("GONE", "ENSG00000099999", "previous", "ensembl84"),  # a gene GENCODE no longer has
    ]
    cand = pd.DataFrame(rows, columns=["name", "gene_id", "kind", "source"])
    names, stats = build.build_names(cand, genes)
    assert names.values.tolist() == [
        ["AAA", "ENSG00000000001", "previous", "hgnc-previous"],
        ["X9", "ENSG00000000003", "alias", "hgnc-alias"],
    ]
    assert stats["previous_ambiguous_dropped"] == 1 and stats["alias_ambiguous_dropped"] == 0
    with pytest.raises(build.BuildError, match="tab or newline"):
        build.build_names(pd.DataFrame([("A\tB", "ENSG00000000001", "alias", "ncbi")], columns=cand.columns),
                          genes)
