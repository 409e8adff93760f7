"""The tokenised corpus: a Zarr v3 group in the ragged, cell-major layout of ``docs/corpus-format.md``.

``CorpusWriter`` streams cells into a store under a temporary name and renames it when complete, so a
killed run never leaves something that looks like a corpus. ``Corpus`` reads one, ``validate_corpus``
checks every invariant of the format, and ``merge_corpora`` concatenates shard outputs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from . import __version__
from .errors import FormatError, OutputExistsError

FORMAT_NAME = "gc-corpus"
FORMAT_VERSION = 1
SPECIES = ("human", "mouse")
# Token arrays: small chunks (256 KiB of uint32) so a random cell decodes little, packed into shards
# (one file of 4 MiB) so a large corpus is not millions of files. Writes are whole shards.
TOKEN_CHUNK = 1 << 16
TOKEN_SHARD = 1 << 20
CELL_CHUNK = 1 << 16
# Blosc (a core Zarr v3 codec) with byte shuffle and LZ4: on Kang 2018 tokens it encodes at about 2.4 GB/s
# on one core, 3.5x faster than Blosc-Zstd level 1, for 5 % more bytes (1.71x vs 1.80x), so compressing is a
# small part of `gc tokenize`; decoding for training is faster too. Stores written with Zstd read the same.
def _compressor() -> BloscCodec:
    return BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")


MISSING_CODE = -1  # obs code for a missing label

# Fill values that no valid store contains, so a chunk lost on disk shows up as invalid content.
_FILL = {
    "cells/offsets": -1,
    "cells/species": 255,
    "cells/source": 65535,
    "cells/n_expressed": 0,
    "tokens/gene": np.iinfo(np.uint32).max,
    "tokens/value": np.nan,
}
_DTYPES = {
    "cells/offsets": np.int64,
    "cells/species": np.uint8,
    "cells/source": np.uint16,
    "cells/n_expressed": np.uint32,
    "tokens/gene": np.uint32,
    "tokens/value": np.float32,
}


def _plain(setting: object) -> object:
    """A codec setting as its plain value: zarr < 3.2 gives enums (``ShardingCodecIndexLocation.end``),
    later releases the strings themselves ("end")."""
    return getattr(setting, "value", setting)


def temporary_path(path: Path) -> Path:
    """The name a store is written under until it is complete (same directory, so rename is atomic)."""
    return path.with_name(f".{path.name}.partial")


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing output unless asked to."""
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite to replace it")


class _ShardWriter:
    """Writes whole shards of a 1-D sharded array straight to its files in a local store.

    The bytes are exactly those zarr-python writes (inner chunks: little-endian bytes then Blosc, in
    order, an inner chunk equal to the fill value left out; then the index of (offset, nbytes) uint64
    pairs with its crc32c; see the sharding codec of the Zarr v3 spec), but without zarr's per-chunk
    asyncio machinery, which costs more CPU than the compression itself. ``for_array`` returns None for any
    other layout, and the caller falls back to zarr.
    """

    def __init__(self, array: zarr.Array, directory: Path, blosc, inner: int):
        self.array, self.directory, self.blosc, self.inner = array, directory, blosc, inner
        fill = np.asarray(array.metadata.fill_value, dtype=array.dtype)
        self.fill_is_nan = bool(np.isnan(fill)) if fill.dtype.kind == "f" else False
        self.fill = fill

    @classmethod
    def for_array(cls, array: zarr.Array, root: Path) -> _ShardWriter | None:
        import sys

        from numcodecs import Blosc
        from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec
        from zarr.storage import LocalStore

        codecs = array.metadata.codecs
        if (
            sys.byteorder != "little"
            or not isinstance(array.store, LocalStore)
            or len(codecs) != 1
            or not isinstance(codecs[0], ShardingCodec)
            or _plain(codecs[0].index_location) != "end"
            or len(array.shape) != 1
        ):
            return None
        sharding = codecs[0]
        inner, index = sharding.codecs, sharding.index_codecs
        if not (
            len(inner) == 2
            and isinstance(inner[0], BytesCodec)
            and _plain(inner[0].endian) in (None, "little")
            and isinstance(inner[1], BloscCodec)
            and len(index) == 2
            and isinstance(index[0], BytesCodec)
            and _plain(index[0].endian) in (None, "little")
            and isinstance(index[1], Crc32cCodec)
        ):
            return None
        codec = inner[1]
        blosc = Blosc(
            cname=_plain(codec.cname),
            clevel=codec.clevel,
            shuffle={"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[_plain(codec.shuffle)],
            blocksize=codec.blocksize,
            typesize=codec.typesize,
        )
        return cls(array, root / array.path, blosc, sharding.chunk_shape[0])

    def _is_fill(self, chunk: np.ndarray) -> bool:
        if self.fill_is_nan:
            return bool(np.isnan(chunk[0])) and bool(np.isnan(chunk).all())
        return bool(chunk[0] == self.fill) and bool((chunk == self.fill).all())

    def write(self, shard: int, values: np.ndarray) -> None:
        """Shard number ``shard``, whose values (a whole shard) are ``values``."""
        import google_crc32c

        n_inner = len(values) // self.inner
        index = np.full((n_inner, 2), np.iinfo(np.uint64).max, dtype="<u8")
        parts, offset = [], 0
        for i in range(n_inner):
            chunk = np.ascontiguousarray(values[i * self.inner : (i + 1) * self.inner])
            if self._is_fill(chunk):
                continue
            encoded = self.blosc.encode(chunk)
            parts.append(encoded)
            index[i] = (offset, len(encoded))
            offset += len(encoded)
        path = self.directory / self.array.metadata.encode_chunk_key((shard,))
        if not parts:  # zarr stores nothing for an all-fill shard
            path.unlink(missing_ok=True)
            return
        index_bytes = index.tobytes()
        parts.append(index_bytes)
        parts.append(np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes())
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.writelines(parts)  # no joined copy of the shard


class _ChunkedAppender:
    """Appends to a 1-D Zarr array in whole chunks; the tail is written by ``close``.

    Values short of a whole chunk wait in one staging array, allocated once and reused, so streaming
    allocates no new memory per block (a fresh multi-MiB array per block costs more in page faults
    than its compression). Whole shards of a sharded array go through ``_ShardWriter`` when a
    ``root`` directory is given. Nothing refers to the caller's arrays once ``add`` returns.
    """

    def __init__(self, array: zarr.Array, chunk: int, root: Path | None = None):
        self.array = array
        self.chunk = chunk
        self.staging = np.empty(chunk, dtype=array.dtype)
        self.staged = 0
        self.written = 0
        self.shards = _ShardWriter.for_array(array, root) if root is not None else None
        if self.shards is not None and chunk != array.metadata.chunk_grid.chunk_shape[0]:
            self.shards = None

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.staging.dtype)
        used = 0
        if self.staged:  # complete the staged chunk first
            used = min(self.chunk - self.staged, len(values))
            self.staging[self.staged : self.staged + used] = values[:used]
            self.staged += used
            if self.staged < self.chunk:
                return
            self._write(self.staging)
            self.staged = 0
        whole = (len(values) - used) // self.chunk * self.chunk
        if whole:  # whole chunks straight from ``values``
            self._write(values[used : used + whole])
            used += whole
        rest = len(values) - used
        self.staging[:rest] = values[used:]
        self.staged = rest

    def close(self) -> None:
        if self.staged:
            self._write(self.staging[: self.staged])
            self.staged = 0
        if self.array.shape[0] != self.written:
            self.array.resize((self.written,))

    def _write(self, values: np.ndarray) -> None:
        # Whole shards go straight to their files and the array's shape is set once, in ``close``
        # (every resize is a metadata write through zarr's event loop); zarr's own writes need it now.
        end = self.written + len(values)
        start = self.written
        if self.shards is not None and start % self.chunk == 0:
            while end - start >= self.chunk:
                offset = start - self.written
                self.shards.write(start // self.chunk, values[offset : offset + self.chunk])
                start += self.chunk
        if start < end:
            self.array.resize((end,))
            self.array[start:end] = values[start - self.written :]
        self.written = end


class CorpusWriter:
    """Streams tokenised cells into a new corpus store.

    Usage: ``with CorpusWriter(path, attrs=..., obs_keys=...) as w: w.append(...)``; the store appears at
    ``path`` only when the block exits without an exception (temporary name, then rename).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        attrs: dict,
        obs_keys: Sequence[str] = (),
        gene_medians: np.ndarray | None = None,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        check_output_path(self.path, overwrite)
        self.overwrite = overwrite
        self.tmp = temporary_path(self.path)
        remove_path(self.tmp)
        self.attrs = dict(attrs)
        self.obs_keys = list(obs_keys)
        self.root = zarr.open_group(self.tmp, mode="w", zarr_format=3)
        self.appenders = {
            name: _ChunkedAppender(
                self._create(name),
                TOKEN_SHARD if name.startswith("tokens/") else CELL_CHUNK,
                root=self.tmp,
            )
            for name in _DTYPES
        }
        for key in self.obs_keys:
            array = self.root.create_array(
                f"cells/obs/{key}",
                shape=(0,),
                chunks=(CELL_CHUNK,),
                dtype=np.int32,
                fill_value=MISSING_CODE,
                compressors=_compressor(),
            )
            self.appenders[f"cells/obs/{key}"] = _ChunkedAppender(array, CELL_CHUNK)
        if gene_medians is not None:  # the normaliser travels with the corpus (``gc embed`` reuses it)
            self.root.create_array(
                "genes/median",
                data=np.asarray(gene_medians, np.float32),
                chunks=(len(gene_medians),),
                compressors=_compressor(),
            )
        self.categories: dict[str, list[str]] = {key: [] for key in self.obs_keys}
        self._category_index: dict[str, dict[str, int]] = {key: {} for key in self.obs_keys}
        self.n_cells = 0
        self.n_tokens = 0
        self.appenders["cells/offsets"].add(np.zeros(1, np.int64))

    def _create(self, name: str) -> zarr.Array:
        tokens = name.startswith("tokens/")
        return self.root.create_array(
            name,
            shape=(0,),
            chunks=(TOKEN_CHUNK if tokens else CELL_CHUNK,),
            shards=(TOKEN_SHARD,) if tokens else None,
            dtype=_DTYPES[name],
            fill_value=_FILL[name],
            compressors=_compressor(),
        )

    def encode_labels(self, key: str, labels: Sequence[object]) -> np.ndarray:
        """Map labels to int32 codes; categories are numbered in order of first appearance."""
        index = self._category_index[key]
        codes = np.empty(len(labels), np.int32)
        for i, label in enumerate(labels):
            if label is None or (isinstance(label, float) and np.isnan(label)):
                codes[i] = MISSING_CODE
                continue
            text = str(label)
            if text not in index:
                index[text] = len(index)
                self.categories[key].append(text)
            codes[i] = index[text]
        return codes

    def append(
        self,
        *,
        lengths: np.ndarray,
        genes: np.ndarray,
        values: np.ndarray,
        species: np.ndarray,
        source: np.ndarray,
        n_expressed: np.ndarray,
        obs_codes: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Append a block of cells. ``lengths`` are tokens per cell; ``obs_codes`` from ``encode_labels``."""
        lengths = np.asarray(lengths, np.int64)
        if int(lengths.sum()) != len(genes) or len(genes) != len(values):
            raise ValueError("lengths, genes and values disagree")
        self.appenders["cells/offsets"].add(self.n_tokens + np.cumsum(lengths))
        self.appenders["tokens/gene"].add(genes)
        self.appenders["tokens/value"].add(values)
        self.appenders["cells/species"].add(species)
        self.appenders["cells/source"].add(source)
        self.appenders["cells/n_expressed"].add(n_expressed)
        for key in self.obs_keys:
            self.appenders[f"cells/obs/{key}"].add((obs_codes or {})[key])
        self.n_cells += len(lengths)
        self.n_tokens += len(genes)

    def finish(self) -> Path:
        for appender in self.appenders.values():
            appender.close()
        for key in self.obs_keys:
            self.root[f"cells/obs/{key}"].attrs["categories"] = self.categories[key]
        attrs = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            **self.attrs,
            "species": list(SPECIES),
            "obs_keys": self.obs_keys,
            "n_cells": self.n_cells,
            "n_tokens": self.n_tokens,
            "tool": {"name": "gc", "version": __version__},
        }
        self.root.attrs.update(attrs)
        self.root.attrs["complete"] = True  # written last: a store without it is incomplete
        if self.path.exists():  # only reachable with overwrite=True (checked in __init__)
            remove_path(self.path)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        remove_path(self.tmp)

    def __enter__(self) -> CorpusWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()


class Corpus:
    """A read-only view of a corpus store. Cell offsets and species sit in memory (9 bytes per cell);
    tokens are read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise FormatError(f"{self.path}: not a gc corpus (no zarr.json); create one with `gc tokenize`")
        try:
            self.root = zarr.open_group(self.path, mode="r", zarr_format=3)
        except Exception as exc:  # zarr raises several types for malformed metadata
            raise FormatError(f"{self.path}: unreadable Zarr group: {exc}") from exc
        self.attrs = dict(self.root.attrs)
        if self.attrs.get("format") != FORMAT_NAME:
            raise FormatError(f"{self.path}: format {self.attrs.get('format')!r} is not {FORMAT_NAME!r}")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise FormatError(
                f"{self.path}: corpus format version {self.attrs.get('format_version')!r} is not supported "
                f"(this gc reads version {FORMAT_VERSION}); re-tokenise with this version of gc"
            )
        if self.attrs.get("complete") is not True:
            raise FormatError(f"{self.path}: corpus is incomplete (the writing run did not finish)")
        try:
            self.offsets = np.asarray(self.root["cells/offsets"][:], np.int64)
            self.species = np.asarray(self.root["cells/species"][:], np.uint8)
            self.genes = self.root["tokens/gene"]
            self.values = self.root["tokens/value"]
        except (KeyError, FileNotFoundError) as exc:
            raise FormatError(f"{self.path}: missing array {exc}") from exc

    @classmethod
    def open(cls, path: str | Path) -> Corpus:
        return cls(path)

    @property
    def n_cells(self) -> int:
        return int(self.attrs["n_cells"])

    @property
    def n_tokens(self) -> int:
        return int(self.attrs["n_tokens"])

    @property
    def reference_hash(self) -> str:
        return self.attrs["reference_hash"]

    @property
    def top_k(self) -> int:
        return int(self.attrs["top_k"])

    @property
    def obs_keys(self) -> list[str]:
        return list(self.attrs.get("obs_keys", []))

    def gene_medians(self) -> np.ndarray | None:
        """The per-token medians the corpus was normalised with (NaN = unknown), if stored."""
        return np.asarray(self.root["genes/median"][:], np.float32) if "genes" in self.root else None

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def read_cells(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens of cells ``[start, stop)``: (offsets relative to the block, genes, values)."""
        lo, hi = int(self.offsets[start]), int(self.offsets[stop])
        return self.offsets[start : stop + 1] - lo, self.genes[lo:hi], self.values[lo:hi]

    def iter_blocks(self, block_cells: int = CELL_CHUNK) -> Iterator[tuple[int, int]]:
        for start in range(0, self.n_cells, block_cells):
            yield start, min(start + block_cells, self.n_cells)

    def obs(self, key: str) -> tuple[np.ndarray, list[str]]:
        if key not in self.obs_keys:
            raise FormatError(
                f"{self.path}: no obs key {key!r}; available: {', '.join(self.obs_keys) or 'none'}"
            )
        array = self.root[f"cells/obs/{key}"]
        return np.asarray(array[:], np.int32), list(array.attrs["categories"])

    def obs_labels(self, key: str) -> np.ndarray:
        """Labels of ``key`` per cell as an object array (None where missing)."""
        codes, categories = self.obs(key)
        labels = np.array(categories + [None], dtype=object)
        return labels[np.where(codes < 0, len(categories), codes)]

    def info(self) -> dict:
        lengths = self.lengths()
        return {
            "path": str(self.path),
            "format_version": self.attrs["format_version"],
            "n_cells": self.n_cells,
            "n_tokens": self.n_tokens,
            "top_k": self.top_k,
            "tokens_per_cell_median": float(np.median(lengths)) if len(lengths) else 0.0,
            "tokens_per_cell_max": int(lengths.max()) if len(lengths) else 0,
            "cells_per_species": {
                name: int((self.species == i).sum()) for i, name in enumerate(self.attrs["species"])
            },
            "reference_hash": self.reference_hash,
            "medians_hash": self.attrs.get("medians_hash"),
            "normalisation": self.attrs.get("normalisation"),
            "inputs": self.attrs.get("inputs"),
            "obs_keys": self.obs_keys,
            "tool": self.attrs.get("tool"),
        }


def _missing_chunk_files(array: zarr.Array, array_dir: Path) -> list[str]:
    """Chunk (or shard) files a complete store must hold (all of ours are non-empty, see ``_FILL``)."""
    n_chunks = -(-array.shape[0] // (array.shards or array.chunks)[0])
    return [f"c/{i}" for i in range(n_chunks) if not (array_dir / "c" / str(i)).is_file()]


def validate_corpus(
    path: str | Path,
    *,
    vocab_size: int | None = None,
    n_special: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Check every invariant of the format; raise ``FormatError`` naming the store and the first problem.

    Catches truncated stores (missing or corrupt chunks), inconsistent lengths, non-monotone offsets,
    token ids outside the gene vocabulary, non-finite values and obs codes out of range.
    """
    corpus = Corpus(path)
    path = corpus.path

    def fail(problem: str) -> FormatError:
        return FormatError(f"{path}: {problem}; the corpus is damaged, re-create it with `gc tokenize`")

    n_cells, n_tokens = corpus.n_cells, corpus.n_tokens
    arrays = {name: corpus.root[name] for name in _DTYPES}
    arrays.update({f"cells/obs/{k}": corpus.root[f"cells/obs/{k}"] for k in corpus.obs_keys})
    for name, array in arrays.items():
        expected = n_tokens if name.startswith("tokens/") else n_cells + (name == "cells/offsets")
        if array.shape != (expected,):
            raise fail(f"{name} has shape {array.shape}, expected ({expected},)")
        missing = _missing_chunk_files(array, path / name)
        if missing:
            raise fail(f"{name} is missing chunk file(s) {', '.join(missing[:3])}")
    offsets = corpus.offsets
    if offsets[0] != 0 or offsets[-1] != n_tokens or np.any(np.diff(offsets) < 0):
        raise fail("cells/offsets is not a non-decreasing sequence from 0 to n_tokens")
    if np.any(np.diff(offsets) > corpus.top_k):
        raise fail(f"a cell holds more than top_k={corpus.top_k} tokens")
    if np.any(corpus.species >= len(corpus.attrs["species"])):
        raise fail("cells/species holds an unknown species code")
    sources = np.asarray(corpus.root["cells/source"][:])
    if np.any(sources >= len(corpus.attrs.get("inputs", []))):
        raise fail("cells/source refers to an input not listed in the attributes")
    for key in corpus.obs_keys:
        codes, categories = corpus.obs(key)
        if np.any((codes < MISSING_CODE) | (codes >= len(categories))):
            raise fail(f"cells/obs/{key} holds codes outside its {len(categories)} categories")
    step = TOKEN_SHARD
    for lo in range(0, n_tokens, step):
        hi = min(lo + step, n_tokens)
        try:
            genes, values = corpus.genes[lo:hi], corpus.values[lo:hi]
        except Exception as exc:  # a corrupt chunk fails to decode
            raise fail(f"tokens [{lo}, {hi}) cannot be decoded ({exc})") from exc
        if np.any(genes < n_special) or (vocab_size is not None and np.any(genes >= vocab_size)):
            raise fail(f"tokens/gene in [{lo}, {hi}) holds ids outside the gene vocabulary")
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise fail(f"tokens/value in [{lo}, {hi}) holds non-finite or non-positive values")
        if progress:
            progress(hi, n_tokens)
    return corpus.info()


def merge_corpora(
    parts: Sequence[str | Path],
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Concatenate corpora written with the same reference, medians, normalisation and top-k (e.g. the
    ``--shard i/n`` outputs of one tokenisation) into one store, in the order given."""
    corpora = [Corpus(p) for p in parts]
    if not corpora:
        raise FormatError("nothing to merge")
    first = corpora[0]
    for key in ("reference_hash", "medians_hash", "normalisation", "top_k", "obs_keys"):
        for other in corpora[1:]:
            if other.attrs.get(key) != first.attrs.get(key):
                raise FormatError(
                    f"cannot merge {other.path} with {first.path}: {key} differs "
                    f"({other.attrs.get(key)!r} vs {first.attrs.get(key)!r})"
                )
    attrs = {k: first.attrs[k] for k in ("reference_hash", "medians_hash", "normalisation", "top_k")}
    # Consecutive shards of one file become one entry again, so that merging the `--shard i/n` outputs in
    # order gives the same store, byte for byte, as tokenising without shards.
    attrs["inputs"] = []
    source_maps = []
    for corpus in corpora:
        mapping = []
        for entry in corpus.attrs["inputs"]:
            prev = attrs["inputs"][-1] if attrs["inputs"] else None
            if prev is not None and _continues(prev, entry):
                prev["cells"] = [prev["cells"][0], entry["cells"][1]]
                prev["n_cells"] = prev["n_cells"] + entry["n_cells"]
            else:
                attrs["inputs"].append(dict(entry))
            mapping.append(len(attrs["inputs"]) - 1)
        source_maps.append(np.asarray(mapping, np.int64))
    if len(attrs["inputs"]) > np.iinfo(np.uint16).max:
        raise FormatError("too many inputs to merge into one corpus (max 65535)")
    total = sum(c.n_cells for c in corpora)
    done = 0
    with CorpusWriter(
        out, attrs=attrs, obs_keys=first.obs_keys, gene_medians=first.gene_medians(), overwrite=overwrite
    ) as writer:
        for corpus, mapping in zip(corpora, source_maps, strict=True):
            sources = mapping[np.asarray(corpus.root["cells/source"][:], np.int64)]
            n_expressed = np.asarray(corpus.root["cells/n_expressed"][:])
            labels = {key: corpus.obs_labels(key) for key in corpus.obs_keys}
            for start, stop in corpus.iter_blocks():
                rel, genes, values = corpus.read_cells(start, stop)
                writer.append(
                    lengths=np.diff(rel),
                    genes=genes,
                    values=values,
                    species=corpus.species[start:stop],
                    source=sources[start:stop].astype(np.uint16),
                    n_expressed=n_expressed[start:stop],
                    obs_codes={k: writer.encode_labels(k, v[start:stop]) for k, v in labels.items()},
                )
                done += stop - start
                if progress:
                    progress(done, total)
    return Path(out)


def _continues(prev: dict, entry: dict) -> bool:
    """Whether input ``entry`` is the next slice of the same file as ``prev`` (adjacent shards)."""
    same = all(prev.get(k) == entry.get(k) for k in set(prev) | set(entry) if k not in ("cells", "n_cells"))
    cells_prev, cells_next = prev.get("cells"), entry.get("cells")
    return same and cells_prev is not None and cells_next is not None and cells_prev[1] == cells_next[0]
