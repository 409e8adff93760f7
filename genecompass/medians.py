"""Per-gene non-zero medians of normalised expression: the divisor in ``v = log2(1 + x / median)``.

Computed once over a corpus in a streaming pass (Rust ``MedianAccumulator``) and stored as a small TSV so
shards and later runs (``gc embed``) normalise exactly as the corpus did.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import FormatError, ReferenceMismatchError

FORMAT_NAME = "gc-medians"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Medians:
    """Median per vocabulary token (NaN where the gene was never expressed) and how it was computed."""

    values: np.ndarray  # float32 (vocab_size,)
    n_nonzero: np.ndarray  # uint64 (vocab_size,): cells in which the gene was expressed
    reference_hash: str
    library_size: bool
    target_sum: float

    @property
    def hash(self) -> str:
        """Identifies the numbers, not the file's formatting: the same medians hash the same everywhere."""
        digest = hashlib.sha256()
        digest.update(np.ascontiguousarray(self.values, dtype="<f4").tobytes())
        digest.update(f"{self.reference_hash}|{self.library_size}|{self.target_sum!r}".encode())
        return "med-" + digest.hexdigest()[:16]

    def check_compatible(
        self, *, reference_hash: str, library_size: bool, target_sum: float, source=""
    ) -> None:
        if self.reference_hash != reference_hash:
            raise ReferenceMismatchError(
                f"{source or 'medians'}: computed for gene reference {self.reference_hash}, but this run "
                f"uses {reference_hash}; recompute them with `gc corpus medians`"
            )
        if self.library_size != library_size or self.target_sum != target_sum:
            raise FormatError(
                f"{source or 'medians'}: computed with library_size={self.library_size}, "
                f"target_sum={self.target_sum}, but this run uses library_size={library_size}, "
                f"target_sum={target_sum}"
            )

    def save(self, path: str | Path, reference) -> Path:
        """Write the TSV (genes with a median only) under a temporary name, then rename."""
        path = Path(path)
        tokens = np.flatnonzero(np.isfinite(self.values))
        vocab = reference.vocab().loc[tokens]
        human, mouse = reference.genes("human")["symbol"], reference.genes("mouse")["symbol"]
        table = pd.DataFrame(
            {
                "token_id": tokens,
                "gene_id": vocab["human_gene_id"].fillna(vocab["mouse_gene_id"]).fillna("").to_numpy(),
                "symbol": vocab["human_gene_id"]
                .map(human)
                .fillna(vocab["mouse_gene_id"].map(mouse))
                .fillna("")
                .to_numpy(),
                "median": [repr(float(v)) for v in self.values[tokens]],
                "n_cells": self.n_nonzero[tokens],
            }
        )
        header = (
            f"# format={FORMAT_NAME}\n# format_version={FORMAT_VERSION}\n"
            f"# reference_hash={self.reference_hash}\n# vocab_size={len(self.values)}\n"
            f"# library_size={str(self.library_size).lower()}\n# target_sum={self.target_sum!r}\n"
        )
        tmp = path.with_name(f".{path.name}.partial")
        with open(tmp, "w") as handle:
            handle.write(header)
            table.to_csv(handle, sep="\t", index=False)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Medians:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise FormatError(f"{path}: cannot read medians file ({exc.strerror})") from exc
        meta = {}
        lines = text.splitlines()
        for line in lines:
            if not line.startswith("#"):
                break
            key, _, value = line[1:].strip().partition("=")
            meta[key] = value
        if meta.get("format") != FORMAT_NAME or meta.get("format_version") != str(FORMAT_VERSION):
            raise FormatError(
                f"{path}: not a gc medians file (expected '# format={FORMAT_NAME}' and version "
                f"{FORMAT_VERSION}); write one with `gc corpus medians`"
            )
        try:
            vocab_size = int(meta["vocab_size"])
            table = pd.read_csv(
                io.StringIO(text), sep="\t", comment="#", dtype={"gene_id": str, "symbol": str}
            )
            tokens = table["token_id"].to_numpy(np.int64)
            medians = table["median"].to_numpy(np.float64)
        except (KeyError, ValueError, pd.errors.ParserError) as exc:
            raise FormatError(f"{path}: malformed medians file ({exc})") from exc
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise FormatError(f"{path}: token ids outside the vocabulary of size {vocab_size}")
        if not np.all(np.isfinite(medians)) or np.any(medians <= 0):
            raise FormatError(f"{path}: medians must be finite and positive")
        values = np.full(vocab_size, np.nan, np.float32)
        values[tokens] = medians
        n_nonzero = np.zeros(vocab_size, np.uint64)
        n_nonzero[tokens] = table["n_cells"].to_numpy(np.uint64)
        return cls(
            values,
            n_nonzero,
            meta["reference_hash"],
            meta["library_size"] == "true",
            float(meta["target_sum"]),
        )
