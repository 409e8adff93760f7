"""The gene reference bundle: the one source of truth for genes, tokens, symbols, aliases and orthologs.

The bundle ships in ``genecompass/reference_data/`` (built by ``scripts/build_reference.py`` from pinned
GENCODE / Ensembl / NCBI tables; see ``docs/data-sources.md``). Nothing is read at import time:
``load_reference()`` reads and verifies the files on first use and caches the result.

Vocabulary: ``<pad>`` = 0, ``<mask>`` = 1, ``<human>`` = 2, ``<mouse>`` = 3, then the human core genes
(protein-coding, lncRNA, miRNA) sorted by Ensembl ID, then the mouse core genes without a one-to-one human
ortholog, sorted by Ensembl ID. A mouse gene with a one-to-one core human ortholog shares the human token.

Every corpus, knowledge table and checkpoint records ``GeneReference.hash`` and checks it on load. The
hash is the bundle's identity (DATA_FILES). The name tables (NAME_FILES: previous symbols and aliases) are
verified too but are outside it (``GeneReference.names_hash``): a better name table maps more input genes
without changing what any token means, so it does not invalidate what was built with the old one.

Gene names resolve, per species, at the first tier that has them: official symbol (exact, then
case-insensitive where unique), previous name, alias, NCBI-style mitochondrial name. Without a species,
an exact official symbol of either species wins; otherwise human is tried before mouse, so a human name
never resolves to a mouse gene when a human gene has it.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import FormatError, InputError

__all__ = [
    "SPECIES",
    "GeneRecord",
    "GeneReference",
    "load_reference",
    "detect_gene_ids",
]

SPECIES = ("human", "mouse")
FORMAT = "gc-reference"
FORMAT_VERSION = 1
DATA_FILES = (
    "vocab.tsv.gz",
    "genes_human.tsv.gz",
    "genes_mouse.tsv.gz",
    "aliases_human.tsv.gz",
    "aliases_mouse.tsv.gz",
    "orthologs.tsv.gz",
)
# Outside the identity hash; optional (a bundle without them resolves names with its alias tables).
NAME_FILES = ("names_human.tsv.gz", "names_mouse.tsv.gz")

# An Ensembl gene ID, versioned or not; GENCODE marks the chrY copy of a PAR gene with "_PAR_Y".
_ENSEMBL_RE = re.compile(r"^(ENS(?:MUS)?G\d{11})(?:\.\d+)?(?:_PAR_Y)?$", re.IGNORECASE)
_HUMAN_ID_RE = r"^ENSG\d{11}(?:\.\d+)?(?:_PAR_Y)?$"
_MOUSE_ID_RE = r"^ENSMUSG\d{11}(?:\.\d+)?$"
_VERSION_SUFFIX_RE = r"(?:\.\d+)?(?:_PAR_Y)?$"
# Fraction of a gene list that must be Ensembl IDs / known symbols to call its type / species.
_ENSEMBL_FRACTION = 0.5
_SYMBOL_FRACTION = 0.2

# NCBI-style names of the mitochondrially encoded genes, as some labs' files carry them (no "MT-" prefix;
# e.g. scirpy's wu2020 data), and the GENCODE symbols they stand for. Applied after every other rule and only
# where the name resolves to no gene of that species: the bundle (and its hash) is not touched. In mouse,
# ND2-ND6, ATP6 and ATP8 already resolve (case-insensitively) to nuclear genes and so keep doing so.
_MITO_PARTS = ("CO1", "CO2", "CO3", "ND1", "ND2", "ND3", "ND4", "ND4L", "ND5", "ND6", "ATP6", "ATP8")
NCBI_MITO_NAMES: dict[str, dict[str, str]] = {
    "human": {
        **{f"COX{i}": f"MT-CO{i}" for i in (1, 2, 3)},
        **{part: f"MT-{part}" for part in _MITO_PARTS if not part.startswith("CO")},
        "CYTB": "MT-CYB",
        "RNR1": "MT-RNR1",
        "RNR2": "MT-RNR2",
    },
    "mouse": {
        **{f"COX{i}": f"mt-Co{i}" for i in (1, 2, 3)},
        **{part: f"mt-{part.capitalize()}" for part in _MITO_PARTS if not part.startswith("CO")},
        "CYTB": "mt-Cytb",
        "RNR1": "mt-Rnr1",
        "RNR2": "mt-Rnr2",
    },
}


@dataclass(frozen=True)
class GeneRecord:
    """One gene of one species, as ``GeneReference.lookup`` returns it."""

    token_id: int | None  # None: a known gene outside the vocabulary (e.g. a pseudogene)
    gene_id: str  # unversioned Ensembl gene ID
    symbol: str  # GENCODE gene name (unnamed genes carry their Ensembl ID)
    species: str
    biotype: str
    is_mito: bool
    shared_with_human: bool  # a mouse gene whose token is its one-to-one human ortholog's token
    # how the query matched: ensembl_id, symbol, symbol_case_insensitive, previous (a former official
    # name), alias, ncbi_mito_name. Informative only: two records of the same gene compare equal.
    match: str = field(default="", compare=False)


def _files_hash(contents: dict[str, bytes], names: Sequence[str], prefix: str) -> str:
    h = hashlib.sha256()
    for name in names:
        data = contents[name]
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return prefix + h.hexdigest()[:16]


def bundle_hash(contents: dict[str, bytes]) -> str:
    """sha256 over (name, NUL, length, NUL, uncompressed bytes) of each data file, in DATA_FILES order.

    Over the *uncompressed* content, so that a rebuild with another zlib gives the same identity."""
    return _files_hash(contents, DATA_FILES, "ref-")


def names_hash(contents: dict[str, bytes]) -> str:
    """As :func:`bundle_hash`, over the name tables (NAME_FILES), prefixed ``names-``."""
    return _files_hash(contents, NAME_FILES, "names-")


def tsv_bytes(df: pd.DataFrame) -> bytes:
    """A bundle table's uncompressed bytes: tab-separated, header, no index, ``\n`` line ends, no quoting."""
    import csv
    import io

    buffer = io.StringIO()
    df.to_csv(buffer, sep="\t", index=False, lineterminator="\n", quoting=csv.QUOTE_NONE)
    return buffer.getvalue().encode("utf-8")


def gzip_bytes(content: bytes) -> bytes:
    """Deterministic gzip of a bundle file (no name, mtime 0, level 9): same content, same bytes."""
    import io

    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(content)
    return buffer.getvalue()


def _read_table(data: bytes, ints: Sequence[str] = ()) -> Any:
    """A bundle table as a pyarrow Table: tab-separated, no quoting, every column a string (empty fields
    stay "") except ``ints`` (int64). pyarrow parses these files several times faster than pandas, which
    matters because every `gc tokenize` starts by mapping its genes."""
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    header = data[: data.index(b"\n")].decode().split("\t")
    return pa_csv.read_csv(
        pa.py_buffer(data),
        read_options=pa_csv.ReadOptions(use_threads=False),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pa_csv.ConvertOptions(
            column_types={col: (pa.int64() if col in ints else pa.string()) for col in header},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )


def _table_to_frame(table: Any) -> pd.DataFrame:
    """A bundle table (:func:`_read_table`) as a DataFrame: int64 columns, strings as object columns."""
    return pd.DataFrame({
        name: column.to_numpy(zero_copy_only=False).astype(object if column.type == "string" else np.int64)
        for name, column in zip(table.column_names, table.columns)
    })


def _empty_to_none(col: pd.Series) -> pd.Series:
    values = col.to_numpy(dtype=object).copy()
    values[values == ""] = None
    return pd.Series(values, index=col.index, name=col.name, dtype=object)


def _check_species(species: str) -> str:
    if species not in SPECIES:
        raise InputError(f"species must be one of {SPECIES}, not {species!r}")
    return species


def _strip_versions(ids: Sequence[str]) -> pd.Index:
    values = [str(g).strip() for g in ids]
    if any("." in v or "_" in v for v in values):  # the regex only where a version suffix can be
        return pd.Index(pd.Series(values, dtype=object).str.replace(_VERSION_SUFFIX_RE, "", regex=True))
    return pd.Index(values, dtype=object)


class _PerSpecies(dict):
    """species -> a table built by ``build(species)`` on first access, then kept."""

    def __init__(self, build):
        super().__init__()
        self._build = build

    def __missing__(self, species: str):
        value = self[species] = self._build(_check_species(species))
        return value


class GeneReference:
    """A loaded, verified gene reference bundle. Create it with :func:`load_reference`."""

    def __init__(self, source: str, manifest: dict[str, Any], contents: dict[str, bytes]):
        self.source = source
        self.manifest = manifest
        self.hash: str = manifest["hash"]
        # None: a bundle without name tables (names resolve with its alias tables).
        self.names_hash: str | None = manifest.get("names_hash") if NAME_FILES[0] in contents else None
        self.vocab_size: int = int(manifest["counts"]["vocab_size"])
        specials = manifest["special_tokens"]
        self.pad_id: int = int(specials["<pad>"])
        self.mask_id: int = int(specials["<mask>"])
        self.species_token_ids: dict[str, int] = {s: int(specials[f"<{s}>"]) for s in SPECIES}
        self._contents = contents

    def __repr__(self) -> str:
        return f"GeneReference(hash={self.hash!r}, vocab_size={self.vocab_size}, source={self.source!r})"

    # ------------------------------------------------------------------------------------ tables (lazy)

    @functools.cached_property
    def _vocab(self) -> pd.DataFrame:
        df = _table_to_frame(_read_table(self._contents["vocab.tsv.gz"], ints=("token_id",)))
        if len(df) != self.vocab_size or not np.array_equal(df["token_id"].to_numpy(), np.arange(len(df))):
            raise FormatError(f"{self.source}/vocab.tsv.gz: token ids are not 0..{self.vocab_size - 1}")
        for col in ("human_gene_id", "mouse_gene_id"):
            df[col] = _empty_to_none(df[col])
        return df.set_index("token_id")

    # Every table is built per species on first use (a human-only input never parses the mouse tables).

    @functools.cached_property
    def _gene_table(self) -> _PerSpecies:
        return _PerSpecies(lambda species: _read_table(self._contents[f"genes_{species}.tsv.gz"],
                                                       ints=("token_id", "is_mito", "symbol_primary")))

    @functools.cached_property
    def _genes(self) -> _PerSpecies:
        def build(species: str) -> pd.DataFrame:
            df = _table_to_frame(self._gene_table[species])
            df["is_mito"] = df["is_mito"].astype(bool)
            df["symbol_primary"] = df["symbol_primary"].astype(bool)
            for col in ("ortholog_type", "human_gene_id"):
                if col in df:
                    df[col] = _empty_to_none(df[col])
            return df.set_index("gene_id")

        return _PerSpecies(build)

    @functools.cached_property
    def _alias_table(self) -> _PerSpecies:
        """Per species: the names other than official symbols (columns name, gene_id, kind): the name table,
        or in a bundle without one the alias table (every row an alias)."""
        def build(species: str) -> Any:
            if f"names_{species}.tsv.gz" in self._contents:
                return _read_table(self._contents[f"names_{species}.tsv.gz"])
            import pyarrow as pa

            table = _read_table(self._contents[f"aliases_{species}.tsv.gz"])
            table = table.rename_columns(["name", "gene_id"])
            return table.append_column("kind", pa.array(["alias"] * table.num_rows, pa.string()))

        return _PerSpecies(build)

    @functools.cached_property
    def _aliases(self) -> _PerSpecies:
        """Per species: "upper": name.upper() -> gene_id (the builder made these unambiguous), and
        "exact": the set of names as written (for species detection)."""
        def build(species: str) -> dict[str, Any]:
            table = self._alias_table[species]
            return {
                "upper": dict(zip((name.upper() for name in table.column("name").to_pylist()),
                                  table.column("gene_id").to_pylist(), strict=True)),
                "exact": self._alias_names[species],
            }

        return _PerSpecies(build)

    @functools.cached_property
    def _alias_kinds(self) -> _PerSpecies:
        """Per species: name.upper() -> kind (previous | alias); only ``lookup`` reports it."""
        def build(species: str) -> dict[str, str]:
            table = self._alias_table[species]
            return dict(zip((name.upper() for name in table.column("name").to_pylist()),
                            table.column("kind").to_pylist(), strict=True))

        return _PerSpecies(build)

    @functools.cached_property
    def _alias_names(self) -> _PerSpecies:
        """Per species: the set of previous names and aliases as written (species detection needs only
        this)."""
        return _PerSpecies(lambda species: frozenset(self._alias_table[species].column("name").to_pylist()))

    @functools.cached_property
    def _named_genes(self) -> _PerSpecies:
        """Per species: the genes with a symbol of their own (GENCODE names unnamed genes by their ID), as
        (all: (symbols, gene_ids, primary flags), primary: (symbols, gene_ids)) lists in table order."""
        def build(species: str) -> dict[str, tuple[list, ...]]:
            import pyarrow.compute as pc

            table = self._gene_table[species]
            named = table.filter(pc.not_equal(table.column("symbol"), table.column("gene_id")))
            primary = named.filter(pc.equal(named.column("symbol_primary"), 1))
            return {
                "all": tuple(named.column(c).to_pylist() for c in ("symbol", "gene_id", "symbol_primary")),
                "primary": tuple(primary.column(c).to_pylist() for c in ("symbol", "gene_id")),
            }

        return _PerSpecies(build)

    @functools.cached_property
    def _symbol_names(self) -> _PerSpecies:
        """Per species: the set of official (primary) symbols, the keys of ``_symbols[species]["exact"]``."""
        return _PerSpecies(lambda species: frozenset(self._named_genes[species]["primary"][0]))

    @functools.cached_property
    def _symbols(self) -> _PerSpecies:
        """Per species: "exact": symbol -> primary gene; "dups": symbol -> all its genes, primary first (only
        symbols carried by several genes); "upper": symbol.upper() -> primary gene where that is unique;
        "upper_multi": symbol.upper() -> primary genes where several symbols differ only in case."""
        def build(species: str) -> dict[str, Any]:
            from collections import Counter

            symbols, gene_ids, primary = self._named_genes[species]["all"]
            repeated = {symbol for symbol, n in Counter(symbols).items() if n > 1}
            carriers: dict[str, list[tuple[bool, str]]] = {}
            for symbol, gene_id, is_primary in zip(symbols, gene_ids, primary, strict=True):
                if symbol in repeated:
                    carriers.setdefault(symbol, []).append((not is_primary, gene_id))
            primary_symbols, primary_ids = self._named_genes[species]["primary"]
            uppers = [symbol.upper() for symbol in primary_symbols]
            n_upper = Counter(uppers)
            upper_multi: dict[str, list[str]] = {}
            for key, gene_id in zip(uppers, primary_ids, strict=True):
                if n_upper[key] > 1:
                    upper_multi.setdefault(key, []).append(gene_id)
            return {
                "exact": dict(zip(primary_symbols, primary_ids, strict=True)),
                # stable sort: the primary gene first, the others in table order
                "dups": {s: [g for _, g in sorted(gs, key=lambda e: e[0])] for s, gs in carriers.items()},
                "upper": {k: g for k, g in zip(uppers, primary_ids, strict=True) if n_upper[k] == 1},
                "upper_multi": upper_multi,
            }

        return _PerSpecies(build)

    def _symbol_genes(self, symbol: str, species: str) -> list[str]:
        syms = self._symbols[species]
        if symbol in syms["dups"]:
            return syms["dups"][symbol]
        gid = syms["exact"].get(symbol)
        return [] if gid is None else [gid]

    def _upper_genes(self, symbol: str, species: str) -> list[str]:
        syms = self._symbols[species]
        key = symbol.upper()
        if key in syms["upper_multi"]:
            return syms["upper_multi"][key]
        gid = syms["upper"].get(key)
        return [] if gid is None else [gid]

    @functools.cached_property
    def _species_tokens(self) -> dict[str, np.ndarray]:
        out = {}
        for species in SPECIES:
            tokens = self._genes[species]["token_id"].to_numpy()
            out[species] = np.sort(tokens[tokens >= 0]).astype(np.int64)
        return out

    # ------------------------------------------------------------------------------------ tables (public)

    def genes(self, species: str) -> pd.DataFrame:
        """The gene table of ``species``, indexed by unversioned Ensembl ID.

        Columns: symbol, biotype, chrom, is_mito (bool), token_id (int64, -1 = not in the vocabulary),
        symbol_primary (bool: the gene a duplicated symbol resolves to); mouse also ortholog_type
        (one2one / one2many / many2many / None) and human_gene_id (the partner whose token it shares).
        Every GENCODE gene is present, so "known gene, not in the vocabulary" is distinguishable."""
        return self._genes[_check_species(species)].copy()

    def vocab(self) -> pd.DataFrame:
        """The vocabulary, indexed by token_id: token, kind (special|species|gene), human_gene_id,
        mouse_gene_id (None where absent)."""
        return self._vocab.copy()

    # ------------------------------------------------------------------------------------ lookups

    def _record(self, gene_id: str, species: str, match: str = "") -> GeneRecord:
        row = self._genes[species].loc[gene_id]
        token = int(row["token_id"])
        return GeneRecord(
            token_id=None if token < 0 else token,
            gene_id=gene_id,
            symbol=str(row["symbol"]),
            species=species,
            biotype=str(row["biotype"]),
            is_mito=bool(row["is_mito"]),
            shared_with_human=species == "mouse" and row.get("human_gene_id") is not None,
            match=match,
        )

    def _fuzzy_genes(self, query: str, species: str) -> tuple[list[str], str]:
        """The genes a name other than an exact official symbol resolves to in ``species``, and how: a
        case-insensitive official symbol, a previous name or alias, an NCBI-style chrM name."""
        genes = self._upper_genes(query, species)
        if genes:
            return genes, "symbol_case_insensitive"
        key = query.upper()
        gid = self._aliases[species]["upper"].get(key)
        if gid is not None:
            return [gid], self._alias_kinds[species][key]
        mito = NCBI_MITO_NAMES[species].get(key)  # last: never shadows a gene the name already names
        if mito and (gid := self._symbols[species]["exact"].get(mito)):
            return [gid], "ncbi_mito_name"
        return [], ""

    def lookup(self, query: str, species: str | None = None) -> list[GeneRecord]:
        """Find genes by Ensembl ID (versioned or not), official symbol, previous name or alias.

        Tiers, the first that matches wins: Ensembl ID; exact official symbol (all genes that carry it,
        the primary one first); case-insensitive symbol; previous name or alias (case-insensitive; the
        name table has at most one gene per name); an NCBI-style mitochondrial name (COX1, ND4L, CYTB,
        ...: ``NCBI_MITO_NAMES``). With ``species`` None, an exact official symbol of either species wins
        (``Gapdh`` is the mouse gene); for every other tier human is searched completely before mouse,
        so a name that human has never resolves to a mouse gene. ``GeneRecord.match`` says which tier
        matched. Returns [] when nothing matches."""
        species_list = SPECIES if species is None else (_check_species(species),)
        q = str(query).strip()
        if not q:
            return []
        m = _ENSEMBL_RE.match(q)
        if m:
            gid = m.group(1).upper()
            sp = "mouse" if gid.startswith("ENSMUSG") else "human"
            if sp in species_list and gid in self._genes[sp].index:
                return [self._record(gid, sp, "ensembl_id")]
            return []
        found = [self._record(gid, sp, "symbol") for sp in species_list for gid in self._symbol_genes(q, sp)]
        if found:
            return found
        for sp in species_list:  # human first
            genes, match = self._fuzzy_genes(q, sp)
            if genes:
                return [self._record(gid, sp, match) for gid in genes]
        return []

    def _resolve_symbol(self, symbol: str, species: str) -> str | None:
        s = str(symbol).strip()
        syms = self._symbols[species]
        gid = syms["exact"].get(s)
        if gid is not None:
            return gid
        key = s.upper()
        gid = syms["upper"].get(key)  # unique case-insensitive match only
        if gid is not None:
            return gid
        gid = self._aliases[species]["upper"].get(key)  # a previous name or an alias
        if gid is not None:
            return gid
        mito = NCBI_MITO_NAMES[species].get(key)  # last: never shadows a gene the name already names
        return syms["exact"].get(mito) if mito is not None else None

    def gene_ids_for_symbols(self, symbols: Sequence[str], species: str) -> list[str | None]:
        """Ensembl IDs for symbols: exact official symbol, then a case-insensitive symbol match (only if
        unique), then a previous name or alias (case-insensitive), then an NCBI-style mitochondrial name
        (``NCBI_MITO_NAMES``: COX1 → MT-CO1, CYTB → MT-CYB, ...); None where unmapped."""
        _check_species(species)
        return [self._resolve_symbol(s, species) for s in symbols]

    def tokens_for_symbols(self, symbols: Sequence[str], species: str) -> np.ndarray:
        """Token ids (int64) for symbols, resolved as in :meth:`gene_ids_for_symbols`; -1 where the symbol
        is unknown or its gene is not in the vocabulary."""
        ids = self.gene_ids_for_symbols(symbols, species)
        return self.tokens_for_ids([g if g is not None else "" for g in ids], species)

    def _positions(self, gene_ids: Sequence[str], species: str) -> np.ndarray:
        table = self._genes[_check_species(species)]
        if len(gene_ids) == 0:
            return np.empty(0, dtype=np.int64)
        # Mapping one gene list asks for tokens, mito flags and biotypes in turn: resolve it once.
        key = (species, tuple(gene_ids))
        cached = self.__dict__.get("_last_positions")
        if cached is not None and cached[0] == key:
            return cached[1]
        positions = table.index.get_indexer(_strip_versions(gene_ids).str.upper())
        positions.setflags(write=False)
        self.__dict__["_last_positions"] = (key, positions)
        return positions

    def tokens_for_ids(self, gene_ids: Sequence[str], species: str) -> np.ndarray:
        """Token ids (int64) for Ensembl IDs (versions stripped); -1 where not in the vocabulary."""
        pos = self._positions(gene_ids, species)
        tokens = self._genes[species]["token_id"].to_numpy()
        return np.where(pos >= 0, tokens[pos], -1).astype(np.int64)

    def mito_mask_for_ids(self, gene_ids: Sequence[str], species: str) -> np.ndarray:
        """True for mitochondrially encoded genes (chrM); False for others and unknown IDs."""
        pos = self._positions(gene_ids, species)
        mito = self._genes[species]["is_mito"].to_numpy()
        return np.where(pos >= 0, mito[pos], False).astype(bool)

    def biotypes_for_ids(self, gene_ids: Sequence[str], species: str) -> np.ndarray:
        """GENCODE biotypes (object array); None for unknown IDs."""
        pos = self._positions(gene_ids, species)
        biotypes = self._genes[species]["biotype"].to_numpy(dtype=object)
        out = np.full(len(pos), None, dtype=object)
        out[pos >= 0] = biotypes[pos[pos >= 0]]
        return out

    def _vocab_row(self, token_id: int) -> pd.Series | None:
        token_id = int(token_id)
        if not 0 <= token_id < self.vocab_size:
            return None
        return self._vocab.loc[token_id]

    def gene_id_of_token(self, token_id: int, species: str | None = "human") -> str | None:
        """The ``species`` gene behind a token: for a shared token the human or the mouse ortholog; None
        for special tokens, out-of-range ids, and tokens that have no gene in that species.
        ``species=None``: the token's own gene (the human one if it has one, else the mouse one)."""
        row = self._vocab_row(token_id)
        if row is None:
            return None
        if species is None:
            return row["human_gene_id"] if row["human_gene_id"] is not None else row["mouse_gene_id"]
        return row[f"{_check_species(species)}_gene_id"]

    def symbol_of_token(self, token_id: int) -> str | None:
        """The symbol of a gene token (the human symbol for a shared token); None for non-gene tokens."""
        row = self._vocab_row(token_id)
        if row is None or row["kind"] != "gene":
            return None
        if row["human_gene_id"] is not None:
            return str(self._genes["human"].at[row["human_gene_id"], "symbol"])
        return str(self._genes["mouse"].at[row["mouse_gene_id"], "symbol"])

    def species_tokens(self, species: str) -> np.ndarray:
        """All gene token ids that occur in ``species`` (sorted int64): human = the human genes; mouse = the
        shared tokens plus the mouse-only ones. Used for same-species random replacement in masking."""
        return self._species_tokens[_check_species(species)].copy()

    def info(self) -> dict[str, Any]:
        counts = self.manifest["counts"]
        return {
            "vocab_size": self.vocab_size,
            "n_human_genes": int(counts["n_human_genes"]),
            "n_mouse_genes": int(counts["n_mouse_genes"]),
            "n_shared_homolog_tokens": int(counts["n_shared_homolog_tokens"]),
            "n_mouse_only_tokens": int(counts["n_mouse_only_tokens"]),
            "hash": self.hash,
            "names_hash": self.names_hash,
            "sources": [f"{s['package']}=={s['version']}" for s in self.manifest["sources"]],
        }


# ---------------------------------------------------------------------------------------------- loading


def _default_root():
    return resources.files("genecompass") / "reference_data"


def _read(root, name: str, where: str) -> bytes:
    try:
        return root.joinpath(name).read_bytes()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise FormatError(f"{where}/{name}: missing from the gene reference bundle; reinstall gc or rebuild "
                          "it with `python scripts/build_reference.py`") from exc


def _load(root, where: str) -> GeneReference:
    raw_manifest = _read(root, "manifest.json", where)
    try:
        manifest = json.loads(raw_manifest)
    except ValueError as exc:
        raise FormatError(f"{where}/manifest.json: not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise FormatError(f"{where}/manifest.json: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version")
        raise FormatError(f"{where}/manifest.json: format_version {found!r}; this gc reads version "
                          f"{FORMAT_VERSION}. Upgrade gc or rebuild the bundle.")
    name_files = manifest.get("name_files", [])
    if name_files and list(name_files) != list(NAME_FILES):
        raise FormatError(f"{where}/manifest.json: name_files {name_files!r}; this gc reads "
                          f"{list(NAME_FILES)}. Upgrade gc or rebuild the bundle.")
    contents: dict[str, bytes] = {}
    for name in (*DATA_FILES, *name_files):
        data = _read(root, name, where)
        expected = manifest.get("files", {}).get(name, {}).get("sha256")
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise FormatError(f"{where}/{name}: sha256 {actual[:16]}… does not match the manifest "
                              f"({str(expected)[:16]}…); the file is corrupt or was edited. Reinstall gc or "
                              "rebuild with `python scripts/build_reference.py`.")
        try:
            contents[name] = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise FormatError(f"{where}/{name}: not a valid gzip file ({exc})") from exc
    actual_hash = bundle_hash(contents)
    if actual_hash != manifest.get("hash"):
        raise FormatError(f"{where}/manifest.json: bundle hash {manifest.get('hash')!r} does not match the "
                          f"files' content ({actual_hash!r}); rebuild with "
                          "`python scripts/build_reference.py`.")
    if name_files and (actual_names := names_hash(contents)) != manifest.get("names_hash"):
        raise FormatError(f"{where}/manifest.json: names hash {manifest.get('names_hash')!r} does not match "
                          f"the name tables' content ({actual_names!r}); rebuild with "
                          "`python scripts/build_reference.py`.")
    return GeneReference(where, manifest, contents)


@functools.lru_cache(maxsize=1)
def _load_default() -> GeneReference:
    root = _default_root()
    return _load(root, str(root))


def load_reference(path: str | Path | None = None) -> GeneReference:
    """Load and verify a gene reference bundle (default: the one packaged with gc, cached per process).

    Every data file's sha256 is checked against ``manifest.json`` and the bundle hash is recomputed;
    a missing, corrupt or edited file raises :class:`~genecompass.errors.FormatError` naming it."""
    if path is None:
        return _load_default()
    root = Path(path)
    if not root.is_dir():
        raise FormatError(f"{root}: not a gene reference bundle directory (expected manifest.json and "
                          f"{', '.join(DATA_FILES)})")
    return _load(root, str(root))


def detect_gene_ids(ids: Sequence[str], reference: GeneReference | None = None) -> tuple[str, str | None]:
    """Guess what a gene list holds: ("ensembl" | "symbol", "human" | "mouse" | None).

    Ensembl when at least half are Ensembl gene IDs (ENSG… → human, ENSMUSG… → mouse, versioned or not;
    the more frequent prefix wins). Otherwise symbols: the species whose official symbols and aliases
    (case-sensitive) match the larger fraction, if that fraction is at least 20 %; else species None."""
    values = pd.Series(np.asarray(list(ids), dtype=object), dtype=object).astype(str).str.strip()
    values = values[values != ""]
    if values.empty:
        return "symbol", None
    n_human = int(values.str.match(_HUMAN_ID_RE).sum())
    n_mouse = int(values.str.match(_MOUSE_ID_RE).sum())
    if n_human + n_mouse >= _ENSEMBL_FRACTION * len(values):
        return "ensembl", "human" if n_human >= n_mouse else "mouse"
    ref = reference if reference is not None else load_reference()
    fractions = {}
    for species in SPECIES:
        symbols, aliases = ref._symbol_names[species], ref._alias_names[species]
        fractions[species] = sum(1 for v in values if v in symbols or v in aliases) / len(values)
    best = max(SPECIES, key=lambda s: fractions[s])
    other = "mouse" if best == "human" else "human"
    if fractions[best] < _SYMBOL_FRACTION or fractions[best] == fractions[other]:
        return "symbol", None
    return "symbol", best
