"""GRN inference from gene embeddings, and its evaluation against held-out reference edges.

Gene embeddings are each gene's last-layer output averaged **by gene id** across cells (the original
averaged by position, upstream issue #18). Edges are gene pairs whose embedding cosine is at least a
threshold (the paper: 0.4) or each gene's top-k neighbours. ``evaluate`` scores the edges as undirected
pairs against a reference (``grn_holdout.tsv`` from ``gc knowledge build``: tf, target, tf_token,
target_token, …) restricted to the inferred gene universe, with the random baseline (edge density).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .perturb import Embedder, Progress, cell_species_tokens, read_cells, symbol

EDGE_COLUMNS = ["tf", "target", "tf_token", "target_token", "score"]


def gene_embeddings(
    model,
    corpus,
    *,
    max_cells: int | None = 1000,
    min_cells: int = 10,
    genes: Sequence[int] | None = None,
    seed: int = 0,
    max_tokens: int = 16384,
    max_length: int | None = None,
    progress: Progress = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens (G,), embeddings (G, H) float32, cell counts (G,)) for genes present in ≥ ``min_cells`` of
    a seeded sample of ``max_cells`` cells (optionally only ``genes``)."""
    import torch

    from .corpus import Corpus

    corpus = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    cells = np.arange(corpus.n_cells)
    if max_cells is not None and len(cells) > max_cells:
        cells = np.sort(np.random.default_rng(seed).choice(cells, size=max_cells, replace=False))
    embedder = Embedder(model, max_tokens=max_tokens, max_length=max_length)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    sums = torch.zeros((vocab, hidden), dtype=torch.float64, device=embedder.device)
    counts = torch.zeros(vocab, dtype=torch.float64, device=embedder.device)
    chunk = 512
    for start in range(0, len(cells), chunk):
        indices = cells[start : start + chunk]
        batch_cells = read_cells(corpus, indices)
        species = cell_species_tokens(corpus, indices, dict(model.config.species_token_ids))

        def consume(_batch, ids, hidden_states, mask):
            flat = ids[mask]
            sums.index_add_(0, flat, hidden_states[mask].double())
            counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))

        embedder.gene_outputs(batch_cells, species, consume)
        if progress:
            progress(min(start + chunk, len(cells)), len(cells))
    counts_np = counts.cpu().numpy()
    keep = np.flatnonzero(counts_np >= max(1, min_cells))
    if genes is not None:
        keep = np.intersect1d(keep, np.asarray(genes, np.int64))
    embeddings = (
        (sums[keep] / counts[keep, None]).float().cpu().numpy() if len(keep) else np.zeros((0, hidden))
    )
    return keep.astype(np.int64), embeddings.astype(np.float32), counts_np[keep].astype(np.int64)


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    x = embeddings.astype(np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x @ x.T


def infer_edges(
    tokens: np.ndarray,
    embeddings: np.ndarray,
    *,
    threshold: float | None = 0.4,
    top_k: int | None = None,
    tf_tokens: Sequence[int] | None = None,
    reference=None,
) -> pd.DataFrame:
    """Edges (tf, target, tf_token, target_token, score = cosine) sorted by score descending.

    Pairs are undirected: each appears once, the TF first when ``tf_tokens`` is given (only pairs with at
    least one TF are kept), else the lower token first. ``top_k``: each gene's k most similar genes;
    otherwise pairs with cosine ≥ ``threshold`` (None: all pairs)."""
    from .reference import load_reference

    reference = reference or load_reference()
    sim = cosine_matrix(embeddings)
    n = len(tokens)
    np.fill_diagonal(sim, -np.inf)
    is_tf = np.isin(tokens, np.asarray(tf_tokens, np.int64)) if tf_tokens is not None else np.ones(n, bool)
    if top_k is not None:
        if top_k < 1:
            raise InputError(f"--top-k must be at least 1, got {top_k}")
        masked = np.where(is_tf[None, :] | is_tf[:, None], sim, -np.inf)
        k = min(top_k, max(n - 1, 0))
        nbrs = np.argpartition(-masked, k - 1, axis=1)[:, :k] if k else np.zeros((n, 0), int)
        i = np.repeat(np.arange(n), k)
        j = nbrs.ravel()
        ok = np.isfinite(masked[i, j])
        i, j = i[ok], j[ok]
    else:
        i, j = np.triu_indices(n, 1)
        ok = is_tf[i] | is_tf[j]
        if threshold is not None:
            ok &= sim[i, j] >= threshold
        i, j = i[ok], j[ok]
    # orient: TF first (when only one is a TF), else lower token first; then de-duplicate
    swap = (is_tf[j] & ~is_tf[i]) | ((is_tf[i] == is_tf[j]) & (tokens[j] < tokens[i]))
    a, b = np.where(swap, j, i), np.where(swap, i, j)
    pairs = np.unique(np.stack([a, b], 1), axis=0) if len(a) else np.zeros((0, 2), int)
    a, b = pairs[:, 0], pairs[:, 1]
    names = np.array([symbol(reference, t) for t in tokens], dtype=object)
    frame = pd.DataFrame(
        {
            "tf": names[a],
            "target": names[b],
            "tf_token": tokens[a],
            "target_token": tokens[b],
            "score": sim[a, b],
        }
    )
    return frame.sort_values(
        ["score", "tf_token", "target_token"], ascending=[False, True, True], ignore_index=True
    )


def write_edges(edges: pd.DataFrame, path: str | Path, universe: np.ndarray) -> Path:
    """Edge TSV plus ``<path>.genes.txt``: the gene universe (tokens) the inference considered, so that
    evaluation counts pairs without an edge as negatives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    edges.to_csv(path, sep="\t", index=False)
    Path(f"{path}.genes.txt").write_text("".join(f"{int(t)}\n" for t in universe))
    return path


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision–recall curve as sklearn's ``average_precision_score``: Σ (R_n − R_{n−1}) P_n
    over distinct score thresholds."""
    y_true = np.asarray(y_true, bool)
    scores = np.asarray(scores, np.float64)
    if y_true.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    y, s = y_true[order], scores[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each distinct threshold
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / y_true.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _read_tsv(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file")
    frame = pd.read_csv(path, sep="\t")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputError(f"{path}: {what} file lacks columns {missing} (has {list(frame.columns)})")
    return frame


def evaluate(
    edges_path: str | Path, reference_path: str | Path, exclude_path: str | Path | None = None
) -> dict:
    """AUPRC and early precision of the edges against a reference edge file (columns tf_token, target_token;
    e.g. ``grn_holdout.tsv``), both as undirected pairs, over all pairs of the inferred gene universe
    (``<edges>.genes.txt`` if present, else the genes in the edge file); unlisted pairs rank last.
    ``exclude_path`` (same columns, e.g. ``grn_train.tsv``): pairs the model was given as prior knowledge,
    removed from the candidates (neither hits nor misses). Early precision = precision of the top-k edges,
    k = number of reference edges among the candidates. The random baseline of both is the reference's edge
    density among the candidates."""
    edges_path, reference_path = Path(edges_path), Path(reference_path)
    edges = _read_tsv(edges_path, ["tf_token", "target_token", "score"], "edge")
    ref = _read_tsv(reference_path, ["tf_token", "target_token"], "reference edge")
    excluded = None
    if exclude_path is not None:
        excluded = _read_tsv(Path(exclude_path), ["tf_token", "target_token"], "excluded edge")
    genes_file = Path(f"{edges_path}.genes.txt")
    if genes_file.is_file():
        universe = np.array([int(x) for x in genes_file.read_text().split()], np.int64)
    else:
        universe = np.unique(edges[["tf_token", "target_token"]].to_numpy().ravel())
    universe = np.unique(universe)
    n = len(universe)
    n_pairs = n * (n - 1) // 2
    if n_pairs == 0:
        raise InputError(f"{edges_path}: fewer than two genes; nothing to evaluate")

    def pair_index(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ia, ib = np.searchsorted(universe, a), np.searchsorted(universe, b)
        ia, ib = np.clip(ia, 0, n - 1), np.clip(ib, 0, n - 1)
        ok = (universe[ia] == a) & (universe[ib] == b) & (ia != ib)
        lo, hi = np.minimum(ia, ib), np.maximum(ia, ib)
        index = lo * n - lo * (lo + 1) // 2 + (hi - lo - 1)  # position in the upper triangle, row-major
        return np.where(ok, index, -1)

    candidate = np.ones(n_pairs, bool)
    if excluded is not None:
        tfs, targets = (excluded[c].to_numpy(np.int64) for c in ("tf_token", "target_token"))
        drop = pair_index(tfs, targets)
        candidate[drop[drop >= 0]] = False
    ref_idx = pair_index(ref["tf_token"].to_numpy(np.int64), ref["target_token"].to_numpy(np.int64))
    ref_idx = np.unique(ref_idx[ref_idx >= 0])
    ref_idx = ref_idx[candidate[ref_idx]]
    if len(ref_idx) == 0:
        raise InputError(
            f"{reference_path}: no reference edge joins two genes of the inferred set ({n} genes); "
            "infer on more genes or check that both files use the same gene reference"
        )
    scores = np.full(n_pairs, -np.inf)
    edge_idx = pair_index(edges["tf_token"].to_numpy(np.int64), edges["target_token"].to_numpy(np.int64))
    ok = edge_idx >= 0
    np.maximum.at(scores, edge_idx[ok], edges["score"].to_numpy(np.float64)[ok])
    truth = np.zeros(n_pairs, bool)
    truth[ref_idx] = True
    scores, truth = scores[candidate], truth[candidate]
    n_candidates = int(candidate.sum())
    finite_min = scores[np.isfinite(scores)].min() if np.isfinite(scores).any() else 0.0
    ranked = np.where(np.isfinite(scores), scores, finite_min - 1.0)
    k = len(ref_idx)
    top = np.argsort(-ranked, kind="stable")[:k]
    top = top[np.isfinite(scores[top])]  # unlisted pairs are not predictions
    density = k / n_candidates
    auprc = average_precision(truth, ranked)
    early = float(truth[top].sum() / k)
    return {
        "edges": str(edges_path),
        "reference": str(reference_path),
        "genes": int(n),
        "candidate_pairs": n_candidates,
        "excluded_pairs": int(n_pairs - n_candidates),
        "excluded": str(exclude_path) if exclude_path else None,
        "predicted_edges": int(ok.sum()),
        "reference_edges": int(k),
        "auprc": auprc,
        "auprc_random": density,
        "auprc_ratio": auprc / density,
        "early_precision": early,
        "early_precision_random": density,
        "early_precision_ratio": early / density,
    }
