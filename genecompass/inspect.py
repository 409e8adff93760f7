"""``inspect_counts``: what is in a count file, and will ``gc`` accept it? (``gc inspect`` prints this.)"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .io import NOT_IN_VOCAB, open_counts

__all__ = ["inspect_counts"]


def inspect_counts(
    path: str | Path,
    *,
    species: str | None = None,
    layer: str | None = None,
    reference: Any = None,
    max_cells_checked: int | None = None,
    chunk_size: int = 4096,
    progress: Callable[[int, int], None] | None = None,
    top_unmapped: int = 20,
) -> dict[str, Any]:
    """Summarise a count file with one streaming pass over its cells.

    Unlike the readers used by ``qc``/``tokenize``, bad values (negative, NaN/inf, non-integer) are counted
    and reported, not raised. File-level problems (missing file, unknown genes, no species) still raise
    :class:`~genecompass.errors.InputError`.

    Args:
        path: any input ``open_counts`` reads.
        species: ``"human"`` / ``"mouse"``; overrides detection from the gene ids.
        layer: see ``open_counts``.
        reference: a ``GeneReference``; default the bundled one.
        max_cells_checked: scan only the first N cells (the per-cell statistics then describe those).
        chunk_size: cells per read.
        progress: called as ``progress(n_cells_done, n_cells_to_do)`` after each chunk.
        top_unmapped: how many of the genes without a token to list (those holding the most counts).

    Returns:
        dict with ``path``, ``format``, ``n_cells``, ``n_genes``, ``id_type``, ``species``,
        ``n_genes_in_vocab``, ``frac_genes_in_vocab``, ``n_duplicate_genes``, ``integer_counts`` (True when
        every scanned value is a finite, non-negative integer), ``n_negative``, ``n_non_finite``,
        ``n_non_integer`` (finite non-integer values), ``nnz`` (stored non-zeros scanned),
        ``n_cells_checked``, ``n_tokens_in_vocab`` (distinct tokens), for CSV/TSV tables ``orientation``,
        ``median_counts_per_cell``, ``median_genes_per_cell``, ``mito_fraction_median`` (median over cells
        with any counts of mito counts / total; NaN when no cell has counts), ``obs_columns``,
        ``unmapped_genes`` (the gene columns that get no token, see :func:`_unmapped`), ``reference_hash``
        and ``names_hash`` (the gene-name tables that mapped the symbols).
    """
    if top_unmapped < 0:
        from .errors import InputError

        raise InputError(f"top_unmapped must be 0 or more, not {top_unmapped}")
    if reference is None:
        from .reference import load_reference

        reference = load_reference()
    with open_counts(path, layer=layer) as src:
        gmap = src.gene_map(reference, species=species)
        n_todo = src.n_cells if max_cells_checked is None else min(max_cells_checked, src.n_cells)
        totals = np.zeros(n_todo, dtype=np.float64)
        n_genes = np.zeros(n_todo, dtype=np.int64)
        mito = np.zeros(n_todo, dtype=np.float64)
        gene_totals = np.zeros(src.n_genes, dtype=np.float64)
        is_mito = gmap.is_mito
        n_negative = n_non_finite = n_non_integer = nnz = 0
        for chunk in src.iter_chunks(chunk_size, 0, n_todo):
            data = chunk.data
            finite = np.isfinite(data)
            n_non_finite += int(data.size - finite.sum())
            n_negative += int((data < 0).sum())
            n_non_integer += int((finite & (data != np.rint(data))).sum())
            nnz += int(data.size)
            rows = np.repeat(np.arange(chunk.n_rows), np.diff(chunk.indptr))
            clean = np.where(finite, data, 0.0).astype(np.float64)
            sl = slice(chunk.start, chunk.stop)
            totals[sl] = np.bincount(rows, weights=clean, minlength=chunk.n_rows)
            n_genes[sl] = np.diff(chunk.indptr)
            mito[sl] = np.bincount(rows, weights=clean * is_mito[chunk.indices], minlength=chunk.n_rows)
            gene_totals += np.bincount(chunk.indices, weights=clean, minlength=src.n_genes)
            if progress is not None:
                progress(chunk.stop, n_todo)
        has_counts = totals > 0
        mito_frac = mito[has_counts] / totals[has_counts]
        return {
            "path": str(src.path),
            "format": src.format,
            **_orientation(src),
            "n_cells": src.n_cells,
            "n_genes": src.n_genes,
            "id_type": gmap.id_type,
            "species": gmap.species,
            "n_genes_in_vocab": gmap.n_in_vocab,
            "frac_genes_in_vocab": gmap.n_in_vocab / src.n_genes,
            "n_duplicate_genes": gmap.n_duplicate_columns,
            "n_tokens_in_vocab": int(np.unique(gmap.col_token[gmap.col_token != NOT_IN_VOCAB]).size),
            "integer_counts": n_negative == 0 and n_non_finite == 0 and n_non_integer == 0,
            "n_negative": n_negative,
            "n_non_finite": n_non_finite,
            "n_non_integer": n_non_integer,
            "nnz": nnz,
            "n_cells_checked": n_todo,
            "median_counts_per_cell": float(np.median(totals)) if n_todo else float("nan"),
            "median_genes_per_cell": float(np.median(n_genes)) if n_todo else float("nan"),
            "mito_fraction_median": float(np.median(mito_frac)) if mito_frac.size else float("nan"),
            "obs_columns": src.obs_columns(),
            "unmapped_genes": _unmapped(src, gmap, gene_totals, reference, top_unmapped),
            "reference_hash": reference.hash,
            "names_hash": getattr(reference, "names_hash", None),
        }


def _unmapped(src, gmap, gene_totals: np.ndarray, reference: Any, top: int) -> dict[str, Any]:
    """The gene columns without a token, and the share of the scanned counts they hold.

    ``n_genes``; ``count_share`` (their counts / all counts; 0.0 when there are no counts);
    ``n_unknown_name`` (names or IDs the reference does not know: a typo, a retired ID, another species,
    a name the reference has no previous-symbol or alias entry for) and ``n_known_not_in_vocab`` (genes the
    reference knows but whose biotype, e.g. a pseudogene, has no token); ``top``: up to ``top`` of them with
    the most counts, each ``{"gene", "symbol" (the file's symbol when its ids are not symbols, else None),
    "gene_id" (the reference gene, None when unknown), "counts", "share", "reason"}``, most counts first
    (ties: file order)."""
    unmapped = np.flatnonzero(gmap.col_token == NOT_IN_VOCAB)
    total = float(gene_totals.sum())
    # A known gene is one the reference has an ID for: an Ensembl column may hold a retired or made-up ID.
    biotypes = reference.biotypes_for_ids([gmap.gene_ids[i] or "" for i in unmapped], gmap.species)
    known = np.array([b is not None for b in biotypes], dtype=bool)
    order = np.argsort(-gene_totals[unmapped], kind="stable")[:top]
    names = [str(n) for n in src.var_names]
    symbols = src.gene_symbols if src.gene_symbols is not None and src.gene_symbols != src.var_names else None
    unknown = "unknown Ensembl ID (retired?)" if gmap.id_type == "ensembl" else "unknown name"
    rows = []
    for j in order:
        i = unmapped[j]
        rows.append({
            "gene": names[i],
            "symbol": None if symbols is None else str(symbols[i]),
            "gene_id": gmap.gene_ids[i] if known[j] else None,
            "counts": float(gene_totals[i]),
            "share": float(gene_totals[i] / total) if total > 0 else 0.0,
            "reason": f"biotype {biotypes[j]}: no token" if known[j] else unknown,
        })
    return {
        "n_genes": int(unmapped.size),
        "count_share": float(gene_totals[unmapped].sum() / total) if total > 0 else 0.0,
        "n_unknown_name": int((~known).sum()),
        "n_known_not_in_vocab": int(known.sum()),
        "top": rows,
    }


def _orientation(src) -> dict[str, Any]:
    """A text table's orientation (rows=cells or rows=genes) and whether it was detected or given."""
    if not hasattr(src, "orientation"):
        return {}
    how = "detected from the gene names" if src.orientation_detected else "given"
    return {"orientation": f"{src.orientation} ({how})"}
