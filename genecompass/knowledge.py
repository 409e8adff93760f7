"""Prior-knowledge tables: one frozen vector per vocabulary token, per kind of knowledge.

A knowledge directory holds a manifest ``knowledge.json`` and one safetensors file per table::

    knowledge/
      knowledge.json          {"format": "gc-knowledge", "format_version": 1, "reference_hash": ...,
                               "tables": {name: {file, dim, n_covered, sha256, source, description}}}
      grn.safetensors         embedding float32 [vocab_size, dim], covered bool [vocab_size]
      promoter.safetensors
      ...

Rows are indexed by token id of the gene reference whose hash the manifest records, so mouse-only genes
have their own rows and shared human–mouse homologs (one token) share one row; no remapping is needed at
lookup time. A row that a table does not cover is all zeros, and so are the special tokens' rows.

This module is the one reader and the one writer of that layout: the builder (``gc knowledge build``),
the model and the tests all go through ``write_knowledge_table`` / ``load_knowledge``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import FormatError, InputError, ReferenceMismatchError

if TYPE_CHECKING:
    import torch

KNOWLEDGE_FORMAT = "gc-knowledge"
KNOWLEDGE_FORMAT_VERSION = 1
MANIFEST_NAME = "knowledge.json"
# The four kinds of prior knowledge of the paper, in the order the model concatenates them.
KNOWLEDGE_TABLES = ("grn", "promoter", "gene_family", "coexpression")
_HASH_BLOCK = 1 << 22  # bytes read per hashing step (4 MiB)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in blocks so large tables never sit in memory twice."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextmanager
def _manifest_lock(directory: Path) -> Iterator[None]:
    """Serialise manifest updates when several builder processes write tables into one directory."""
    with open(directory / f".{MANIFEST_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check ``knowledge.json`` (format name and version); raise ``FormatError`` naming it."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise FormatError(
            f"{path}: no knowledge manifest; build a knowledge directory with `gc knowledge build`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: unreadable knowledge manifest ({exc})") from exc
    if manifest.get("format") != KNOWLEDGE_FORMAT:
        raise FormatError(f"{path}: format {manifest.get('format')!r} is not {KNOWLEDGE_FORMAT!r}")
    if manifest.get("format_version") != KNOWLEDGE_FORMAT_VERSION:
        raise FormatError(
            f"{path}: knowledge format version {manifest.get('format_version')!r} is not supported "
            f"(this gc reads version {KNOWLEDGE_FORMAT_VERSION}); rebuild it with `gc knowledge build`"
        )
    if not isinstance(manifest.get("tables"), dict) or not isinstance(manifest.get("reference_hash"), str):
        raise FormatError(f"{path}: manifest lacks 'tables' or 'reference_hash'")
    return manifest


def write_knowledge_table(
    directory: str | Path,
    name: str,
    embedding: np.ndarray | torch.Tensor,
    covered: np.ndarray | torch.Tensor,
    source: str,
    description: str,
    reference_hash: str,
) -> Path:
    """Write one table (``NAME.safetensors``, temporary name then rename) and record it in the manifest.

    ``embedding`` is [vocab_size, dim] (stored float32), ``covered`` [vocab_size] bool; rows not covered
    are stored as zeros. The manifest is created if absent; an existing one must carry the same
    ``reference_hash`` (``ReferenceMismatchError`` otherwise). Returns the table's path.
    """
    if name not in KNOWLEDGE_TABLES:
        raise InputError(f"unknown knowledge table {name!r}; expected one of {', '.join(KNOWLEDGE_TABLES)}")
    from safetensors.numpy import save

    embedding = np.array(_to_numpy(embedding), dtype=np.float32)  # a copy: zeroing must not touch the input
    covered = np.asarray(_to_numpy(covered), dtype=bool)
    if embedding.ndim != 2 or covered.shape != (embedding.shape[0],):
        raise InputError(
            f"knowledge table {name!r}: embedding must be [vocab_size, dim] and covered [vocab_size]; "
            f"got {embedding.shape} and {covered.shape}"
        )
    if not np.all(np.isfinite(embedding)):
        raise InputError(f"knowledge table {name!r}: embedding holds non-finite values")
    embedding[~covered] = 0.0

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    table_path = directory / f"{name}.safetensors"
    with _manifest_lock(directory):
        manifest_path = directory / MANIFEST_NAME
        if manifest_path.exists():
            manifest = read_manifest(directory)
            if manifest["reference_hash"] != reference_hash:
                raise ReferenceMismatchError(
                    f"{manifest_path}: built for reference {manifest['reference_hash']}, but table {name!r} "
                    f"is for {reference_hash}; use a fresh knowledge directory"
                )
        else:
            manifest = {
                "format": KNOWLEDGE_FORMAT,
                "format_version": KNOWLEDGE_FORMAT_VERSION,
                "reference_hash": reference_hash,
                "tables": {},
            }
        payload = save(
            {"embedding": embedding, "covered": covered},
            # One key: safetensors writes several metadata keys in a random order, changing the bytes.
            metadata={
                "gc": json.dumps(
                    {"format": KNOWLEDGE_FORMAT, "reference_hash": reference_hash, "table": name},
                    sort_keys=True,
                )
            },
        )
        _atomic_write_bytes(table_path, payload)
        manifest["tables"][name] = {
            "file": table_path.name,
            "dim": int(embedding.shape[1]),
            "vocab_size": int(embedding.shape[0]),
            "n_covered": int(covered.sum()),
            "sha256": hashlib.sha256(payload).hexdigest(),
            "source": source,
            "description": description,
        }
        _atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    return table_path


def load_knowledge(
    directory: str | Path,
    reference_hash: str,
    names: Sequence[str] | None = None,
    *,
    expected_sha256: dict[str, str] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Load knowledge tables as ``{name: (embedding float32 [V, dim], covered bool [V])}``.

    ``names`` selects tables (default: all in the manifest, in ``KNOWLEDGE_TABLES`` order). Checks the
    manifest's reference hash (``ReferenceMismatchError``), each file's sha256 and shapes (``FormatError``
    naming the file), and, when ``expected_sha256`` is given (e.g. from a model config), that the tables are
    the very ones a model was trained with.
    """
    import torch
    from safetensors.torch import load as load_bytes

    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest["reference_hash"] != reference_hash:
        raise ReferenceMismatchError(
            f"{directory / MANIFEST_NAME}: knowledge built for reference {manifest['reference_hash']}, "
            f"expected {reference_hash}; rebuild it with `gc knowledge build` for this reference"
        )
    tables = manifest["tables"]
    if names is None:
        names = [n for n in KNOWLEDGE_TABLES if n in tables]
    result: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        if name not in tables:
            raise FormatError(
                f"{directory / MANIFEST_NAME}: no table {name!r} (has: {', '.join(tables) or 'none'})"
            )
        entry = tables[name]
        path = directory / entry["file"]
        if not path.is_file():
            raise FormatError(f"{path}: knowledge table file is missing")
        payload = path.read_bytes()
        digest = hashlib.sha256(payload).hexdigest()
        if digest != entry["sha256"]:
            raise FormatError(
                f"{path}: sha256 {digest} does not match the manifest ({entry['sha256']}); the file is "
                "damaged or was replaced; rebuild the knowledge directory"
            )
        if expected_sha256 is not None and name in expected_sha256 and expected_sha256[name] != digest:
            raise ReferenceMismatchError(
                f"{path}: table {name!r} differs from the one the model was trained with "
                f"(sha256 {digest}, expected {expected_sha256[name]}); pass the model's knowledge directory"
            )
        try:
            tensors = load_bytes(payload)
            embedding, covered = tensors["embedding"], tensors["covered"]
        except Exception as exc:  # safetensors raises several types for malformed files
            raise FormatError(f"{path}: unreadable knowledge table ({exc})") from exc
        if (
            embedding.dtype != torch.float32
            or covered.dtype != torch.bool
            or embedding.ndim != 2
            or embedding.shape[1] != entry["dim"]
            or covered.shape != (embedding.shape[0],)
            or int(covered.sum()) != entry["n_covered"]
        ):
            raise FormatError(
                f"{path}: expected embedding float32 [V, {entry['dim']}] and covered bool [V] with "
                f"{entry['n_covered']} covered rows; got {tuple(embedding.shape)} {embedding.dtype}, "
                f"{tuple(covered.shape)} {covered.dtype}"
            )
        result[name] = (embedding, covered)
    return result


def _to_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor; imported lazily so the builder needs no torch
        return array.detach().cpu().numpy()
    return np.asarray(array)
