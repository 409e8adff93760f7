"""The gene reference bundle: vocabulary layout, real genes, aliases, mitochondrial genes, integrity checks,
and gene-ID detection on the bundled real data."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from genecompass.errors import FormatError, InputError
from genecompass.reference import DATA_FILES, NAME_FILES, GeneRecord, detect_gene_ids, load_reference

REPO = Path(__file__).resolve().parent.parent
BUNDLE = REPO / "genecompass" / "reference_data"
DATA = REPO / "data"

TP53 = "ENSG00000141510"
TRP53 = "ENSMUSG00000059552"
GAPDH = "ENSG00000111640"
MT_CO1 = "ENSG00000198804"
MT_CO1_MOUSE = "ENSMUSG00000064351"
PBSN = "ENSMUSG00000000003"  # probasin: a mouse core gene without a one-to-one human ortholog


@pytest.fixture(scope="module")
def ref():
    return load_reference()


def _read_tsv(name: str) -> pd.DataFrame:
    return pd.read_csv(BUNDLE / name, sep="\t", dtype=str, keep_default_na=False)


# ------------------------------------------------------------------------------------------- layout


def test_special_tokens(ref):
    assert ref.pad_id == 0
    assert ref.mask_id == 1
    assert ref.species_token_ids == {"human": 2, "mouse": 3}
    vocab = ref.vocab()
    assert list(vocab.loc[[0, 1, 2, 3], "token"]) == ["<pad>", "<mask>", "<human>", "<mouse>"]
    assert list(vocab.loc[[0, 1, 2, 3], "kind"]) == ["special", "special", "species", "species"]
    assert (vocab.loc[4:, "kind"] == "gene").all()
    assert ref.symbol_of_token(0) is None and ref.gene_id_of_token(2) is None


def test_vocab_size_consistent_across_files(ref):
    info = ref.info()
    counts = ref.manifest["counts"]
    vocab = _read_tsv("vocab.tsv.gz")
    assert ref.vocab_size == len(vocab) == info["vocab_size"] == counts["vocab_size"]
    assert list(vocab["token_id"].astype(int)) == list(range(ref.vocab_size))
    assert ref.vocab_size == 4 + info["n_human_genes"] + info["n_mouse_only_tokens"]
    assert info["n_mouse_genes"] == info["n_shared_homolog_tokens"] + info["n_mouse_only_tokens"]

    human, mouse = ref.genes("human"), ref.genes("mouse")
    human_tokens = human.loc[human.token_id >= 0, "token_id"]
    mouse_tokens = mouse.loc[mouse.token_id >= 0, "token_id"]
    assert len(human_tokens) == info["n_human_genes"] and human_tokens.is_unique
    assert len(mouse_tokens) == info["n_mouse_genes"] and mouse_tokens.is_unique
    assert human_tokens.min() == 4 and human_tokens.max() == 3 + info["n_human_genes"]
    assert mouse_tokens.max() == ref.vocab_size - 1
    # human core genes are numbered in Ensembl-ID order
    assert human_tokens.sort_index().is_monotonic_increasing
    # shared tokens are exactly the orthologs file, and the mouse table agrees
    orth = _read_tsv("orthologs.tsv.gz")
    assert len(orth) == info["n_shared_homolog_tokens"]
    assert (human.loc[orth.human_gene_id, "token_id"].to_numpy() == orth.token_id.astype(int)).all()
    assert (mouse.loc[orth.mouse_gene_id, "token_id"].to_numpy() == orth.token_id.astype(int)).all()
    assert int(mouse.human_gene_id.notna().sum()) == len(orth)
    # same-species replacement pools
    assert len(ref.species_tokens("human")) == info["n_human_genes"]
    assert len(ref.species_tokens("mouse")) == info["n_mouse_genes"]
    assert set(ref.species_tokens("mouse")) == set(mouse_tokens)


def test_non_core_genes_are_known_but_have_no_token(ref):
    human = ref.genes("human")
    core = human.biotype.isin(["protein_coding", "lncRNA", "miRNA"])
    assert (human.loc[core, "token_id"] >= 0).all()
    assert (human.loc[~core, "token_id"] == -1).all()
    pseudo = human.index[human.biotype == "processed_pseudogene"][0]
    [record] = ref.lookup(pseudo)
    assert record.token_id is None and record.biotype == "processed_pseudogene"
    assert ref.tokens_for_ids([pseudo], "human").tolist() == [-1]


# ------------------------------------------------------------------------------------------- genes


def test_tp53_and_trp53_share_a_token(ref):
    [human] = ref.lookup("TP53", "human")
    assert human == GeneRecord(token_id=human.token_id, gene_id=TP53, symbol="TP53", species="human",
                               biotype="protein_coding", is_mito=False, shared_with_human=False)
    [mouse] = ref.lookup("Trp53", "mouse")
    assert mouse.gene_id == TRP53 and mouse.shared_with_human
    assert mouse.token_id == human.token_id
    assert ref.gene_id_of_token(human.token_id) == TP53
    assert ref.gene_id_of_token(human.token_id, "mouse") == TRP53
    assert ref.symbol_of_token(human.token_id) == "TP53"
    # Ensembl IDs, versioned or not, either species
    assert ref.lookup("ENSG00000141510.18") == [human]
    assert ref.lookup(TRP53) == [mouse]
    assert ref.lookup(TRP53, "human") == []
    assert ref.tokens_for_ids(["ENSG00000141510.18", TP53], "human").tolist() == [human.token_id] * 2
    assert ref.tokens_for_ids([TRP53 + ".3"], "mouse").tolist() == [human.token_id]
    assert (ref.tokens_for_symbols(["TP53"], "human") == ref.tokens_for_symbols(["Trp53"], "mouse")).all()


def test_mouse_only_gene_keeps_its_own_token(ref):
    [pbsn] = ref.lookup("Pbsn")
    assert pbsn.gene_id == PBSN and not pbsn.shared_with_human
    assert pbsn.token_id >= 4 + ref.info()["n_human_genes"]
    assert ref.gene_id_of_token(pbsn.token_id, "mouse") == PBSN
    assert ref.gene_id_of_token(pbsn.token_id, "human") is None
    assert ref.gene_id_of_token(pbsn.token_id, None) == PBSN
    assert ref.gene_id_of_token(ref.lookup("Trp53")[0].token_id, None) == TP53
    assert ref.symbol_of_token(pbsn.token_id) == "Pbsn"
    assert pbsn.token_id in set(ref.species_tokens("mouse"))
    assert pbsn.token_id not in set(ref.species_tokens("human"))


def test_gapdh(ref):
    [gapdh] = ref.lookup("GAPDH")
    assert gapdh.gene_id == GAPDH and gapdh.species == "human" and gapdh.token_id is not None
    assert ref.gene_ids_for_symbols(["GAPDH", "gapdh", "not-a-gene"], "human") == [GAPDH, GAPDH, None]
    # case-insensitive fallback within the requested species; exact symbol of the other species wins first
    assert [r.species for r in ref.lookup("Gapdh")] == ["mouse"]


def test_aliases_resolve(ref):
    tp53_token = ref.lookup("TP53", "human")[0].token_id
    assert [r.gene_id for r in ref.lookup("p53")] == [TP53]  # NCBI synonym "P53", case-insensitive
    gapdh_token = ref.lookup("GAPDH")[0].token_id
    assert ref.tokens_for_symbols(["P53", "GAPD", "TP53", "nonsense-gene"], "human").tolist() == [
        tp53_token, gapdh_token, tp53_token, -1]
    assert ref.gene_ids_for_symbols(["GAPD"], "human") == [GAPDH]
    aliases = _read_tsv("aliases_human.tsv.gz")
    official = set(ref.genes("human").symbol.str.upper())
    assert not aliases.alias.str.upper().isin(official).any()
    assert aliases.groupby(aliases.alias.str.upper()).gene_id.nunique().max() == 1


def test_mitochondrial_genes(ref):
    [human] = ref.lookup("MT-CO1", "human")
    [mouse] = ref.lookup("mt-Co1", "mouse")
    assert human.gene_id == MT_CO1 and human.is_mito
    assert mouse.gene_id == MT_CO1_MOUSE and mouse.is_mito
    assert ref.mito_mask_for_ids([MT_CO1, TP53, "ENSG99999999999"], "human").tolist() == [True, False, False]
    for species, prefix in (("human", "MT-"), ("mouse", "mt-")):
        genes = ref.genes(species)
        assert genes.is_mito.sum() == 37
        assert genes.loc[genes.is_mito, "symbol"].str.startswith(prefix).all()
        assert (genes.loc[genes.is_mito, "chrom"] == "chrM").all()


def test_biotypes_and_unknown_ids(ref):
    out = ref.biotypes_for_ids([TP53, "ENSG99999999999", ""], "human")
    assert out.dtype == object and out.tolist() == ["protein_coding", None, None]
    assert ref.tokens_for_ids([], "human").dtype == np.int64
    assert ref.lookup("definitely-not-a-gene") == []
    with pytest.raises(InputError, match="rat"):
        ref.tokens_for_ids([TP53], "rat")


# ------------------------------------------------------------------------------------------- integrity


def test_default_bundle_is_cached(ref):
    assert load_reference() is ref
    assert ref.hash.startswith("ref-") and len(ref.hash) == 20
    assert ref.manifest["format"] == "gc-reference" and ref.manifest["format_version"] == 1


def test_copy_of_bundle_loads_with_same_hash(tmp_path, ref):
    shutil.copytree(BUNDLE, tmp_path / "ref")
    assert load_reference(tmp_path / "ref").hash == ref.hash


# The identity every corpus, medians file, knowledge table and checkpoint records. It changes only when the
# vocabulary files change, and then everything built with it must be rebuilt: change it deliberately.
IDENTITY = "ref-9e9d896ff9639540"


def test_identity_hash_is_the_one_corpora_and_checkpoints_record(ref):
    assert ref.hash == IDENTITY
    assert ref.names_hash is not None and ref.names_hash.startswith("names-")
    assert ref.manifest["name_files"] == list(NAME_FILES)


def _rewrite(path: Path, text: bytes, manifest_path: Path) -> dict:
    path.write_bytes(gzip.compress(text))
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return manifest


def test_name_tables_are_verified_but_outside_the_identity_hash(tmp_path, ref):
    from genecompass.reference import names_hash

    shutil.copytree(BUNDLE, tmp_path / "ref")
    path, manifest_path = tmp_path / "ref" / "names_human.tsv.gz", tmp_path / "ref" / "manifest.json"
    lines = gzip.decompress(path.read_bytes()).split(b"\n")
    text = b"\n".join(line for line in lines if not line.startswith(b"CD97\t"))
    manifest = _rewrite(path, text, manifest_path)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="names hash"):  # sha256 fixed, names_hash not
        load_reference(tmp_path / "ref")
    contents = {name: gzip.decompress((tmp_path / "ref" / name).read_bytes()) for name in NAME_FILES}
    manifest["names_hash"] = names_hash(contents)
    manifest_path.write_text(json.dumps(manifest))
    edited = load_reference(tmp_path / "ref")
    assert edited.hash == ref.hash and edited.names_hash != ref.names_hash
    assert edited.lookup("CD97", "human") == [] and ref.lookup("CD97", "human")[0].symbol == "ADGRE5"


def test_a_bundle_without_name_tables_resolves_with_its_alias_tables(tmp_path, ref):
    shutil.copytree(BUNDLE, tmp_path / "ref")
    manifest_path = tmp_path / "ref" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for name in manifest.pop("name_files"):
        (tmp_path / "ref" / name).unlink()
        del manifest["files"][name]
    del manifest["names_hash"]
    manifest_path.write_text(json.dumps(manifest))
    old = load_reference(tmp_path / "ref")
    assert old.hash == ref.hash and old.names_hash is None
    assert old.lookup("p53")[0].gene_id == TP53  # an NCBI synonym
    assert old.lookup("GARS", "human") == []  # previous symbols came with the name tables


def test_a_missing_name_table_is_named(tmp_path):
    shutil.copytree(BUNDLE, tmp_path / "ref")
    (tmp_path / "ref" / "names_mouse.tsv.gz").unlink()
    with pytest.raises(FormatError, match=r"names_mouse\.tsv\.gz: missing"):
        load_reference(tmp_path / "ref")


@pytest.mark.parametrize("name", DATA_FILES + NAME_FILES)
def test_one_altered_byte_is_detected(tmp_path, name):
    shutil.copytree(BUNDLE, tmp_path / "ref")
    path = tmp_path / "ref" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=name.replace(".", r"\.")):
        load_reference(tmp_path / "ref")


def test_missing_file_and_bad_manifest(tmp_path):
    shutil.copytree(BUNDLE, tmp_path / "ref")
    (tmp_path / "ref" / "orthologs.tsv.gz").unlink()
    with pytest.raises(FormatError, match=r"orthologs\.tsv\.gz"):
        load_reference(tmp_path / "ref")

    shutil.copytree(BUNDLE, tmp_path / "ref2")
    manifest = json.loads((tmp_path / "ref2" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "ref2" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="format_version 99"):
        load_reference(tmp_path / "ref2")

    with pytest.raises(FormatError):
        load_reference(tmp_path / "nowhere")


def test_edited_content_with_updated_checksum_is_still_caught(tmp_path):
    """Someone edits a table and fixes the per-file sha256, but not the bundle hash."""
    shutil.copytree(BUNDLE, tmp_path / "ref")
    path = tmp_path / "ref" / "genes_human.tsv.gz"
    text = gzip.decompress(path.read_bytes()).replace(b"\tTP53\t", b"\tTP53X\t")
    path.write_bytes(gzip.compress(text))
    manifest_path = tmp_path / "ref" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["genes_human.tsv.gz"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="bundle hash"):
        load_reference(tmp_path / "ref")


def test_import_is_lazy_and_torch_free():
    code = ("import sys, genecompass.reference as r; "
            "print('torch' in sys.modules, r._load_default.cache_info().currsize)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout.split()
    assert out == ["False", "0"]


# ------------------------------------------------------------------------------------------- detection


def test_detect_gene_ids_on_real_pbmc3k(ref):
    with h5py.File(DATA / "pbmc3k.h5ad", "r") as f:
        var = f["var"]
        index = [x.decode() for x in var[var.attrs["_index"]][:]]
        symbols = [x.decode() for x in var["gene_symbols"][:]]
    assert len(index) == 16634
    assert detect_gene_ids(index, ref) == ("ensembl", "human")
    assert detect_gene_ids(symbols, ref) == ("symbol", "human")
    tokens = ref.tokens_for_ids(index, "human")
    assert (tokens >= 0).mean() > 0.9


def test_detect_gene_ids_on_real_mouse_visium(ref):
    with h5py.File(DATA / "mouse_visium_100genes.h5", "r") as f:
        ids = [x.decode() for x in f["matrix/features/id"][:]]
        names = [x.decode() for x in f["matrix/features/name"][:]]
    assert detect_gene_ids(ids, ref) == ("ensembl", "mouse")
    assert detect_gene_ids([i + ".1" for i in ids], ref) == ("ensembl", "mouse")
    assert detect_gene_ids(names, ref) == ("symbol", "mouse")
    assert (ref.tokens_for_ids(ids, "mouse") >= 0).all()


def test_detect_gene_ids_edge_cases(ref):
    assert detect_gene_ids(["TP53", "GAPDH", "CD4", "MS4A1"], ref) == ("symbol", "human")
    assert detect_gene_ids(["Trp53", "Gapdh", "Cd4", "Ms4a1"], ref) == ("symbol", "mouse")
    assert detect_gene_ids(["foo1", "bar2", "baz3", "qux4", "TP53"], ref) == ("symbol", "human")  # 20 %
    assert detect_gene_ids(["x", "y", "z", "w", "v", "u", "TP53"], ref) == ("symbol", None)  # < 20 %
    assert detect_gene_ids([], ref) == ("symbol", None)
    assert detect_gene_ids(["ENSGXXXXXX"] * 3, ref) == ("symbol", None)  # the 10x v2 fixture's fake IDs


MITO_NCBI = ["COX1", "COX2", "COX3", "ND1", "ND2", "ND3", "ND4", "ND4L", "ND5", "ND6", "ATP6", "ATP8", "CYTB",
             "RNR1", "RNR2"]  # as in scirpy's wu2020 file: no MT- prefix


def test_ncbi_style_mitochondrial_names_map_to_the_mt_genes(ref):
    ids = ref.gene_ids_for_symbols(MITO_NCBI, "human")
    assert ids == ref.gene_ids_for_symbols(
        ["MT-CO1", "MT-CO2", "MT-CO3", "MT-ND1", "MT-ND2", "MT-ND3", "MT-ND4", "MT-ND4L", "MT-ND5", "MT-ND6",
         "MT-ATP6", "MT-ATP8", "MT-CYB", "MT-RNR1", "MT-RNR2"], "human")
    assert ref.mito_mask_for_ids(ids, "human").all()
    assert ref.lookup("cytb", "human")[0].symbol == "MT-CYB"
    mouse = dict(zip(MITO_NCBI, ref.gene_ids_for_symbols(MITO_NCBI, "mouse"), strict=True))
    assert mouse["COX1"] == ref.lookup("mt-Co1", "mouse")[0].gene_id
    assert mouse["CYTB"] == ref.lookup("mt-Cytb", "mouse")[0].gene_id
    # a name that already names another gene of the species keeps it: mouse ND2 is not mt-Nd2
    assert mouse["ND2"] == ref.gene_ids_for_symbols(["Nd2"], "mouse")[0] != ref.lookup("mt-Nd2")[0].gene_id


def test_gc_qc_counts_ncbi_style_mitochondrial_names(tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    from genecompass.qc import run_qc

    nuclear = ["ACTB", "GAPDH", "CD3E", "CD14", "LYZ", "MS4A1", "NKG7", "B2M", "MALAT1", "FTL", "TMSB4X",
               "EEF1A1", "RPL13", "RPS27", "S100A9", "HLA-DRA", "CST3", "TPT1", "FTH1", "CD74"]
    names = nuclear + MITO_NCBI
    counts = np.ones((6, len(names)), dtype=np.float32)
    counts[:, len(nuclear):] = 2.0  # 30 of 50 counts on chrM per cell
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.var_names = names
    adata.obs_names = [f"cell{i}" for i in range(6)]
    adata.write_h5ad(tmp_path / "ncbi_mito.h5ad")
    metrics = run_qc([tmp_path / "ncbi_mito.h5ad"]).files[0].metrics
    np.testing.assert_allclose(metrics["mito_fraction"], 30 / 50)
