"""In-silico perturbation: dose-aware edits of a cell's ranked gene tokens, batched embedding of the edited
cells, cell-level shifts toward target states with a random-gene null, and resumable candidate screens.

Token values are ``log2(1 + x / median)``, so a gene at its corpus median has value 1.0 and its expression
ratio is ``r = 2**v - 1``. The edits (pure numpy, one cell at a time, on genes *without* the species token):

- ``overexpress(genes, values, gene, level)``: set the gene to ``corpus-median`` (1.0, the paper's "low"),
  ``cell-max`` (the cell's top value, the paper's "high"), an explicit value, or ``fold:F`` (ratio × F;
  an absent gene is inserted at F × its corpus median, i.e. ``log2(1 + F)``). Absent genes are inserted.
- ``knockdown(genes, values, gene, fraction)``: ratio × fraction; 0 removes the gene (= ``delete``). As in
  the paper, by default only cells where the gene ranks in the top half are perturbed; others are skipped.
- ``delete(genes, values, gene)``: remove the gene; later genes move up one rank.

Only the perturbed gene moves: it is re-inserted at its new rank (value descending, ties by token id
ascending, the corpus rule) and the cell is re-truncated to ``k`` genes. Combinations apply edits in turn.

Cell embeddings are the run's own (``config.cell_embedding``: the mean of the gene outputs, or the species
token's output; ``GeneCompassModel.get_cell_embeddings``); a state's
embedding is the mean over that state's cells. Shift toward target t = cos(perturbed, t) − cos(original, t).
Unlike the original code (×10,000 value, cuda:1, goal states never wired), the dose is explicit and bounded,
and every effect is compared with random control genes at the same dose.

A p-value alone misleads here: a shift of 1e-8 can be "significant" against a null of other 1e-8 shifts.
Every effect therefore also carries its size against the null's spread (``z``), as a share of the
source→target cosine distance, a seeded bootstrap confidence interval over cells, and a numerical noise
floor (the same unperturbed cells re-embedded in other batch sizes; never below float32's resolution of a
cosine): an effect whose |mean shift| is below the floor is called "not distinguishable from zero",
whatever its p-value.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import FormatError, InputError

Progress = Callable[[int, int], None] | None
Cell = tuple[np.ndarray, np.ndarray]  # (gene token ids int64, values float32), rank order, no species token

MODES = ("overexpress", "knockdown", "delete")
NAMED_LEVELS = ("corpus-median", "cell-max")
CORPUS_MEDIAN_VALUE = 1.0  # log2(1 + median / median)


# ------------------------------------------------------------------------------------------ token edits
@dataclass(frozen=True)
class Level:
    """An overexpression level: ``kind`` in corpus-median | cell-max | value | fold."""

    kind: str
    amount: float = 0.0

    @classmethod
    def parse(cls, spec: str | float | Level) -> Level:
        if isinstance(spec, Level):
            return spec
        if isinstance(spec, int | float):
            return cls._value(float(spec), str(spec))
        text = str(spec).strip().lower()
        if text in NAMED_LEVELS:
            return cls(text)
        if text.startswith("fold:"):
            try:
                fold = float(text[5:])
            except ValueError:
                fold = -1.0
            if not math.isfinite(fold) or fold <= 0:
                raise InputError(f"level {spec!r}: fold:F needs a positive number F, e.g. fold:4")
            return cls("fold", fold)
        try:
            return cls._value(float(text), str(spec))
        except ValueError:
            raise InputError(
                f"level {spec!r} is not corpus-median, cell-max, a value (e.g. 3.5) or fold:F (e.g. fold:4)"
            ) from None

    @classmethod
    def _value(cls, value: float, spec: str) -> Level:
        if not math.isfinite(value) or value <= 0:
            raise InputError(
                f"level {spec!r}: an explicit value must be positive (values are log2(1 + x/median))"
            )
        return cls("value", value)

    def __str__(self) -> str:
        if self.kind == "value":
            return f"{self.amount:g}"
        if self.kind == "fold":
            return f"fold:{self.amount:g}"
        return self.kind


def _as_cell(genes: np.ndarray, values: np.ndarray) -> Cell:
    genes = np.asarray(genes, dtype=np.int64)
    values = np.asarray(values, dtype=np.float32)
    if genes.shape != values.shape or genes.ndim != 1:
        raise InputError(f"genes {genes.shape} and values {values.shape} must be 1-D arrays of one length")
    return genes, values


def _insert(genes: np.ndarray, values: np.ndarray, gene: int, value: float, k: int | None) -> Cell:
    """Insert ``gene`` at its rank among ``genes`` (which must not hold it): value descending, ties by token
    id ascending; the others keep their order. Then truncate to ``k``."""
    value = np.float32(value)
    position = int(np.count_nonzero((values > value) | ((values == value) & (genes < gene))))
    genes = np.insert(genes, position, gene)
    values = np.insert(values, position, value)
    if k is not None:
        genes, values = genes[:k], values[:k]
    return genes, values


def _remove(genes: np.ndarray, values: np.ndarray, gene: int) -> tuple[np.ndarray, np.ndarray, float | None]:
    where = np.flatnonzero(genes == gene)
    if len(where) == 0:
        return genes, values, None
    old = float(values[where[0]])
    return np.delete(genes, where), np.delete(values, where), old


def level_value(genes: np.ndarray, values: np.ndarray, gene: int, level: Level | str | float) -> float:
    """The token value ``gene`` gets in this cell at ``level``."""
    level = Level.parse(level)
    genes, values = _as_cell(genes, values)
    if level.kind == "corpus-median":
        return CORPUS_MEDIAN_VALUE
    if level.kind == "cell-max":
        return float(values.max()) if len(values) else CORPUS_MEDIAN_VALUE
    if level.kind == "value":
        return level.amount
    where = np.flatnonzero(genes == gene)
    ratio = float(2.0 ** values[where[0]] - 1.0) if len(where) else 1.0  # absent: fold of the median
    return float(np.log2(1.0 + level.amount * ratio))


def overexpress(
    genes: np.ndarray, values: np.ndarray, gene: int, level: Level | str | float, *, k: int | None = None
) -> Cell:
    """Set ``gene`` to ``level`` (inserting it if absent), re-rank it, re-truncate to ``k`` genes."""
    genes, values = _as_cell(genes, values)
    value = level_value(genes, values, gene, level)
    rest_genes, rest_values, _ = _remove(genes, values, int(gene))
    return _insert(rest_genes, rest_values, int(gene), value, k)


def delete(genes: np.ndarray, values: np.ndarray, gene: int) -> Cell:
    """Remove ``gene`` (unchanged cell if absent)."""
    genes, values = _as_cell(genes, values)
    genes, values, _ = _remove(genes, values, int(gene))
    return genes, values


def gene_rank_ok(genes: np.ndarray, gene: int, top_fraction: float | None) -> bool:
    """Whether ``gene`` is in the cell and (unless ``top_fraction`` is None) ranks in its top fraction."""
    where = np.flatnonzero(np.asarray(genes) == gene)
    if len(where) == 0:
        return False
    return top_fraction is None or where[0] < top_fraction * len(genes)


def knockdown(
    genes: np.ndarray,
    values: np.ndarray,
    gene: int,
    fraction: float,
    *,
    k: int | None = None,
    top_fraction: float | None = 0.5,
) -> Cell | None:
    """Multiply ``gene``'s ratio by ``fraction`` (0 removes it) and re-rank; None (skipped) when the gene is
    absent or, with ``top_fraction``, not ranked in the cell's top ``top_fraction``."""
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"knock-down fraction must lie in [0, 1], got {fraction}")
    genes, values = _as_cell(genes, values)
    if not gene_rank_ok(genes, int(gene), top_fraction):
        return None
    rest_genes, rest_values, old = _remove(genes, values, int(gene))
    if fraction == 0.0:
        return rest_genes, rest_values
    value = float(np.log2(1.0 + fraction * (2.0 ** float(old) - 1.0)))
    return _insert(rest_genes, rest_values, int(gene), value, k)


@dataclass(frozen=True)
class Perturbation:
    """One perturbation of one or more genes (a combination when several)."""

    mode: str
    genes: tuple[int, ...]
    level: Level | None = None  # overexpress
    fraction: float = 0.0  # knockdown
    top_fraction: float | None = 0.5  # knockdown: only cells where the gene ranks in this top fraction
    label: str = ""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"perturbation mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not self.genes:
            raise InputError("a perturbation needs at least one gene")
        if self.mode == "overexpress" and self.level is None:
            raise InputError("overexpression needs a level (corpus-median, cell-max, VALUE or fold:F)")

    def with_genes(self, genes: Sequence[int], label: str) -> Perturbation:
        return Perturbation(
            self.mode, tuple(int(g) for g in genes), self.level, self.fraction, self.top_fraction, label
        )

    def describe(self) -> str:
        if self.mode == "overexpress":
            return f"overexpress to {self.level}"
        if self.mode == "knockdown":
            return f"knock down to {self.fraction:g}x"
        return "delete"


def apply_perturbation(
    genes: np.ndarray, values: np.ndarray, perturbation: Perturbation, *, k: int | None = None
) -> Cell | None:
    """Apply every gene of ``perturbation`` in turn; None when the cell is skipped (knockdown or deletion of a
    gene the cell lacks, or a knock-down gene outside the cell's top fraction)."""
    cell: Cell | None = _as_cell(genes, values)
    for gene in perturbation.genes:
        assert cell is not None
        if perturbation.mode == "overexpress":
            cell = overexpress(*cell, gene, perturbation.level, k=k)  # type: ignore[arg-type]
        elif perturbation.mode == "knockdown":
            cell = knockdown(*cell, gene, perturbation.fraction, k=k, top_fraction=perturbation.top_fraction)
        else:
            if not gene_rank_ok(cell[0], gene, None):
                return None
            cell = delete(*cell, gene)
        if cell is None:
            return None
    assert cell is not None
    return cell if k is None else (cell[0][:k], cell[1][:k])


# ------------------------------------------------------------------------------------- model and cells
def model_directory(run: str | Path) -> Path:
    """A `gc pretrain` run directory (model in ``RUN/model``) or a model directory itself."""
    run = Path(run)
    for candidate in (run / "model", run):
        if (candidate / "config.json").is_file():
            return candidate
    raise InputError(f"{run}: no model found (expected {run / 'model' / 'config.json'}, from `gc pretrain`)")


def load_model(run: str | Path, *, knowledge_dir: str | Path | None = None, device: str | None = None):
    """The encoder of a pre-trained run, in eval mode on ``device`` (default: CUDA if available)."""
    import torch

    from .model import GeneCompassModel
    from .run import quiet_transformers

    with quiet_transformers():  # the pre-training heads an encoder does not load are expected
        model = GeneCompassModel.from_pretrained(model_directory(run), knowledge_dir=knowledge_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def read_cells(corpus, indices: Iterable[int], block: int = 256) -> list[Cell]:
    """Full token lists (all stored genes, rank order) of corpus cells ``indices``, in that order."""
    indices = np.asarray(list(indices), dtype=np.int64)
    out: list[Cell | None] = [None] * len(indices)
    order = np.argsort(indices, kind="stable")
    i = 0
    while i < len(order):
        start = int(indices[order[i]])
        stop = min(start + block, corpus.n_cells)
        offsets, genes, values = corpus.read_cells(start, stop)
        genes, values = np.asarray(genes, np.int64), np.asarray(values, np.float32)
        while i < len(order) and indices[order[i]] < stop:
            row = int(indices[order[i]]) - start
            out[order[i]] = (
                genes[offsets[row] : offsets[row + 1]].copy(),
                values[offsets[row] : offsets[row + 1]].copy(),
            )
            i += 1
    return out  # type: ignore[return-value]


def cell_species_tokens(corpus, indices: Sequence[int], species_token_ids: dict[str, int]) -> np.ndarray:
    from .data import species_token_map

    return species_token_map(corpus, species_token_ids)[corpus.species[np.asarray(indices, np.int64)]]


class Embedder:
    """Runs many cells through the encoder in length-sorted, token-budget batches (eval, no grad).

    A batch holds at most ``max_tokens`` padded tokens; padding is masked, so a cell's embedding does not
    depend on its batch-mates (batched = one at a time within float tolerance)."""

    def __init__(self, model, *, max_tokens: int = 16384, max_length: int | None = None):
        self.model = model
        self.config = model.config
        self.max_tokens = int(max_tokens)
        self.max_length = int(max_length or self.config.max_sequence_length)
        self.k = self.max_length - 1  # genes per cell the model sees
        self.device = next(model.parameters()).device

    def _batches(self, lengths: np.ndarray) -> list[np.ndarray]:
        order = np.argsort(-lengths, kind="stable")
        batches, start = [], 0
        while start < len(order):
            rows = max(1, self.max_tokens // int(lengths[order[start]]))
            batches.append(order[start : start + rows])
            start += rows
        return batches

    def _tensors(self, cells: Sequence[Cell], species: Sequence[int]):
        import torch

        longest = max(min(len(g), self.k) for g, _ in cells) + 1
        ids = torch.full((len(cells), longest), self.config.pad_token_id, dtype=torch.long)
        vals = torch.zeros((len(cells), longest), dtype=torch.float32)
        for row, ((genes, values), sp) in enumerate(zip(cells, species, strict=True)):
            n = min(len(genes), self.k)
            ids[row, 0] = int(sp)
            ids[row, 1 : n + 1] = torch.as_tensor(genes[:n])
            vals[row, 1 : n + 1] = torch.as_tensor(values[:n])
        mask = ids != self.config.pad_token_id
        return ids.to(self.device), vals.to(self.device), mask.to(self.device)

    def cell_embeddings(
        self, cells: Sequence[Cell], species: Sequence[int], progress: Progress = None
    ) -> np.ndarray:
        """(N, H) float32: each cell's embedding, pooled as the run's ``cell_embedding`` says."""
        import torch

        from .model import pool_cells

        out = np.zeros((len(cells), self.config.hidden_size), dtype=np.float32)
        if not cells:
            return out
        lengths = np.array([min(len(g), self.k) + 1 for g, _ in cells])
        done = 0
        with torch.no_grad():
            for batch in self._batches(lengths):
                tensors = self._tensors([cells[i] for i in batch], [species[i] for i in batch])
                output = self.model(*tensors)
                pool = self.config.cell_embedding
                hidden = pool_cells(output.last_hidden_state, output.attention_mask, pool)
                out[batch] = hidden.float().cpu().numpy()
                done += len(batch)
                if progress:
                    progress(done, len(cells))
        return out

    def gene_outputs(self, cells: Sequence[Cell], species: Sequence[int], consume: Callable) -> None:
        """Calls ``consume(index, gene_ids (B, T-1) tensor, hidden (B, T-1, H) tensor, mask (B, T-1))`` per
        batch, with ``index`` the cells' positions in ``cells``. Match genes by id, never by position."""
        import torch

        if not cells:
            return
        lengths = np.array([min(len(g), self.k) + 1 for g, _ in cells])
        with torch.no_grad():
            for batch in self._batches(lengths):
                tensors = self._tensors([cells[i] for i in batch], [species[i] for i in batch])
                hidden, ids, mask = self.model.get_gene_outputs(*tensors)
                consume(batch, ids, hidden.float(), mask)


# ------------------------------------------------------------------------------------ gene resolution
def resolve_genes(names: Iterable[str], reference=None, species: Sequence[str] | None = None) -> list[int]:
    """Token ids for gene symbols, aliases or Ensembl IDs of either species (``species`` first)."""
    from .reference import load_reference

    reference = reference or load_reference()
    tokens = []
    for name in names:
        name = str(name).strip()
        records = []
        for sp in list(species or []) + [None]:
            records = [r for r in reference.lookup(name, sp) if r.token_id is not None] if name else []
            if records:
                break
        if not records:
            known = bool(name) and bool(reference.lookup(name))
            why = (
                "is in the reference but has no token in the vocabulary"
                if known
                else ("is not a gene symbol, alias or Ensembl ID of human or mouse")
            )
            raise InputError(f"unknown gene {name!r}: it {why}; search with `gc reference lookup {name}`")
        tokens.append(int(records[0].token_id))
    return tokens


def resolve_gene_list(
    names: Sequence[str], reference=None, species: Sequence[str] | None = None, *, source: str = "gene list"
) -> tuple[list[int], list[str]]:
    """Token ids for a gene list (a file of candidates, TFs, ...) and the names that have no token.

    Curated lists routinely hold a few names the vocabulary lacks (renamed or unplaced genes), so unknown
    names are returned, for the caller to report, rather than fatal; a list where no name resolves is an
    error naming ``source``."""
    from .reference import load_reference

    reference = reference or load_reference()  # once, not once per name
    tokens, unknown = [], []
    for name in names:
        try:
            tokens.extend(resolve_genes([name], reference, species))
        except InputError:
            unknown.append(str(name))
    if not tokens:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise InputError(f"{source}: none of its {len(unknown)} genes is in the vocabulary ({shown})")
    return tokens, unknown


def parse_gene_groups(spec: str) -> list[list[str]]:
    """``"A,B+C"`` → [["A"], ["B", "C"]]: commas separate perturbations, ``+`` joins a combination."""
    groups = [[g.strip() for g in part.split("+") if g.strip()] for part in spec.split(",")]
    groups = [g for g in groups if g]
    if not groups:
        raise InputError(f"no genes in {spec!r}; give GENE[,GENE] (and GENE+GENE for a combination)")
    return groups


def read_gene_file(path: str | Path) -> list[str]:
    """One gene per line (first whitespace/tab-separated field); blank lines and ``#`` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such gene list file")
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    if not names:
        raise InputError(f"{path}: the gene list is empty")
    return names


# ------------------------------------------------------------------------------------------ statistics
def bh_fdr(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (NaN stays NaN)."""
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if len(ok) == 0:
        return out
    order = ok[np.argsort(p[ok])]
    ranked = p[order] * len(ok) / np.arange(1, len(ok) + 1)
    out[order] = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    return out


def rank_sum_p(sample: np.ndarray, null: np.ndarray, alternative: str = "two-sided") -> float:
    """Wilcoxon rank-sum (Mann–Whitney U) p-value of ``sample`` vs ``null``; NaN when either is empty."""
    from scipy.stats import mannwhitneyu

    sample, null = np.asarray(sample, float), np.asarray(null, float)
    if len(sample) == 0 or len(null) == 0:
        return float("nan")
    return float(mannwhitneyu(sample, null, alternative=alternative).pvalue)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of (N, H) with (H,) → (N,)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a @ b) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b), 1e-12)


# Cosines of float32 embeddings are not resolved below float32's machine epsilon, whatever re-embedding shows.
FLOAT32_RESOLUTION = float(np.finfo(np.float32).eps)
NOT_DISTINGUISHABLE = "not distinguishable from zero"
ABOVE_NOISE = "above the noise floor"
N_BOOTSTRAP = 1000  # resamples of the cells for the confidence interval
CI_LEVEL = 0.95


def bootstrap_ci(
    shifts: np.ndarray, *, seed: int, n_boot: int = N_BOOTSTRAP, level: float = CI_LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``shifts`` over cells (seeded); NaNs when empty."""
    x = np.asarray(shifts, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng([seed, 2])
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def effect_size(
    shifts: np.ndarray,
    null_gene_means: np.ndarray,
    *,
    distance: float,
    noise_floor: float,
    seed: int,
) -> dict[str, Any]:
    """The size of one effect (per-cell ``shifts`` toward one state), not only its p-value.

    Returns mean_shift; null_sd (SD of the random genes' mean shifts) and z = (mean − null mean) / null_sd
    (NaN with fewer than 2 random genes); fraction_of_distance = mean / ``distance`` (the source→target
    cosine distance; NaN when the distance itself is below the noise floor); ci_low/ci_high (bootstrap over
    cells); noise_floor; and
    call: "not distinguishable from zero" when |mean| < noise_floor, else "above the noise floor"."""
    x = np.asarray(shifts, dtype=np.float64)
    nulls = np.asarray(null_gene_means, dtype=np.float64)
    nulls = nulls[~np.isnan(nulls)]
    mean = float(x.mean()) if len(x) else float("nan")
    null_sd = float(nulls.std(ddof=1)) if len(nulls) >= 2 else float("nan")
    z = (mean - float(nulls.mean())) / null_sd if len(nulls) >= 2 and null_sd > 0 else float("nan")
    low, high = bootstrap_ci(x, seed=seed)
    above = bool(abs(mean) >= noise_floor) if len(x) else False
    return {
        "mean_shift": mean,
        "null_sd": null_sd,
        "z": z,
        # a distance under the noise floor is not resolved: a share of it would only look meaningful
        "fraction_of_distance": mean / distance if distance > noise_floor else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "noise_floor": float(noise_floor),
        "call": ABOVE_NOISE if above else NOT_DISTINGUISHABLE,
    }


# ----------------------------------------------------------------------------------- state embeddings
@dataclass
class Setup:
    """Everything a perturbation run needs: the model, the cells, the states."""

    corpus: Any
    embedder: Embedder
    reference: Any
    source: str
    targets: list[str]
    source_cells: np.ndarray  # corpus indices of the (sampled) source cells
    cells: list[Cell]  # their full token lists
    species: np.ndarray  # their species tokens
    original: np.ndarray  # (N, H) their unperturbed embeddings
    states: dict[str, np.ndarray]  # "source" and each target → (H,) mean embedding
    species_names: list[str] = field(default_factory=list)


def select_cells(
    labels: np.ndarray, value: str, key: str, max_cells: int | None, rng: np.random.Generator, where: str
) -> np.ndarray:
    cells = np.flatnonzero(labels == value)
    if len(cells) == 0:
        present = sorted({str(v) for v in labels if v is not None})
        raise InputError(f"{where}: no cells with {key} = {value!r}; values present: {', '.join(present)}")
    if max_cells is not None and len(cells) > max_cells:
        cells = np.sort(rng.choice(cells, size=max_cells, replace=False))
    return cells


def prepare(
    model,
    corpus,
    *,
    cells_key: str,
    source: str,
    targets: Sequence[str],
    max_cells: int | None = None,
    seed: int = 0,
    max_tokens: int = 16384,
    max_length: int | None = None,
    reference=None,
    progress: Progress = None,
) -> Setup:
    """Select source cells (seeded sample of at most ``max_cells``), embed them, and compute the source and
    target state embeddings (mean over each state's cells, at most ``max_cells`` per state)."""
    from .corpus import Corpus
    from .run import model_reference

    corpus = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    reference = reference or model_reference(model)
    if not targets:
        raise InputError("give at least one target state (--target VALUE)")
    labels = corpus.obs_labels(cells_key)
    rng = np.random.default_rng(seed)
    where = str(corpus.path)
    source_cells = select_cells(labels, source, cells_key, max_cells, rng, where)
    embedder = Embedder(model, max_tokens=max_tokens, max_length=max_length)
    species_ids = dict(model.config.species_token_ids)
    state_cells = {t: select_cells(labels, t, cells_key, max_cells, rng, where) for t in targets}
    total = len(source_cells) + sum(len(c) for c in state_cells.values())
    done = 0

    def embed(indices: np.ndarray) -> tuple[list[Cell], np.ndarray, np.ndarray]:
        nonlocal done
        cells = read_cells(corpus, indices)
        species = cell_species_tokens(corpus, indices, species_ids)
        base = done
        emb = embedder.cell_embeddings(cells, species, progress and (lambda d, _t: progress(base + d, total)))
        done += len(indices)
        return cells, species, emb

    cells, species, original = embed(source_cells)
    states = {"source": original.mean(0)}
    for target, indices in state_cells.items():
        states[target] = embed(indices)[2].mean(0)
    return Setup(
        corpus,
        embedder,
        reference,
        source,
        list(targets),
        source_cells,
        cells,
        species,
        original,
        states,
        list(corpus.attrs.get("species", [])),
    )


def shifts(setup: Setup, perturbation: Perturbation, progress: Progress = None) -> pd.DataFrame:
    """Per source cell (skipped cells left out): cosine to the source and each target before and after."""
    k = setup.embedder.k
    kept, perturbed = [], []
    for i, (genes, values) in enumerate(setup.cells):
        cell = apply_perturbation(genes, values, perturbation, k=k)
        if cell is not None:
            kept.append(i)
            perturbed.append(cell)
    kept_arr = np.asarray(kept, dtype=np.int64)
    after = setup.embedder.cell_embeddings(perturbed, setup.species[kept_arr] if kept else [], progress)
    before = setup.original[kept_arr]
    table: dict[str, Any] = {
        "cell": setup.source_cells[kept_arr].astype(np.int64),
        "perturbation": np.full(len(kept), perturbation.label, dtype=object),
    }
    for name in ["source", *setup.targets]:
        prefix = "source" if name == "source" else f"target:{name}"
        table[f"cos_{prefix}_before"] = _cosine(before, setup.states[name]) if kept else np.empty(0)
        table[f"cos_{prefix}_after"] = _cosine(after, setup.states[name]) if kept else np.empty(0)
        table[f"shift_{prefix}"] = table[f"cos_{prefix}_after"] - table[f"cos_{prefix}_before"]
    frame = pd.DataFrame(table)
    frame.attrs["n_skipped"] = len(setup.cells) - len(kept)
    return frame


def shift_columns(targets: Sequence[str]) -> list[str]:
    return ["shift_source"] + [f"shift_target:{t}" for t in targets]


def state_distances(setup: Setup) -> dict[str, float]:
    """Per shift column: the source→target cosine distance 1 − cos(source mean, target mean); NaN for the
    source column (it has no distance of its own)."""
    out = {"shift_source": float("nan")}
    for target in setup.targets:
        cos = _cosine(setup.states["source"][None, :], setup.states[target])[0]
        out[f"shift_target:{target}"] = float(1.0 - cos)
    return out


def noise_floor(setup: Setup) -> dict[str, float]:
    """Per shift column: the numerical noise floor of a shift.

    The unperturbed source cells are re-embedded one cell per forward pass and in batches of a quarter of
    the token budget (other batch compositions and sizes); each cell's "shift" then is pure arithmetic
    noise. The floor is the largest |shift| seen, and never below float32's resolution of a cosine."""
    floors = dict.fromkeys(shift_columns(setup.targets), FLOAT32_RESOLUTION)
    embedder = setup.embedder
    for max_tokens in (1, max(1, embedder.max_tokens // 4)):
        other = Embedder(embedder.model, max_tokens=max_tokens, max_length=embedder.max_length)
        again = other.cell_embeddings(setup.cells, setup.species)
        for name in ["source", *setup.targets]:
            column = "shift_source" if name == "source" else f"shift_target:{name}"
            state = setup.states[name]
            noise = _cosine(again, state) - _cosine(setup.original, state)
            floors[column] = max(floors[column], float(np.abs(noise).max()) if len(noise) else 0.0)
    return floors


def expressed_genes(cells: Sequence[Cell], min_fraction: float = 0.1) -> np.ndarray:
    """Tokens present in at least ``min_fraction`` of ``cells`` (at least one cell), sorted."""
    if not cells:
        return np.empty(0, dtype=np.int64)
    tokens, counts = np.unique(np.concatenate([g for g, _ in cells]), return_counts=True)
    return tokens[counts >= max(1, math.ceil(min_fraction * len(cells)))]


def random_controls(
    setup: Setup, exclude: Iterable[int], n: int, seed: int, min_fraction: float = 0.1
) -> np.ndarray:
    """``n`` control genes drawn with ``seed`` from the genes expressed in the source cells."""
    pool = np.setdiff1d(expressed_genes(setup.cells, min_fraction), np.asarray(list(exclude), np.int64))
    if n > len(pool):
        raise InputError(f"only {len(pool)} genes are expressed in the source cells; ask for fewer controls")
    rng = np.random.default_rng([seed, 1])
    return np.sort(rng.choice(pool, size=n, replace=False))


def symbol(reference, token: int) -> str:
    return reference.symbol_of_token(int(token)) or str(int(token))


# ------------------------------------------------------------------------------------ `gc perturb` run
def run_perturbation(
    model,
    corpus,
    out_dir: str | Path,
    *,
    perturbation: Perturbation,
    gene_groups: Sequence[Sequence[str]],
    cells_key: str,
    source: str,
    targets: Sequence[str],
    n_random: int = 20,
    seed: int = 0,
    max_cells: int | None = None,
    max_tokens: int = 16384,
    max_length: int | None = None,
    gene_effects: bool = False,
    effect_targets: Sequence[str] | None = None,
    progress: Progress = None,
) -> dict:
    """Perturb each gene group in the source cells and compare the shifts with random control genes.

    Writes to ``out_dir``: ``cells.parquet`` (per cell and perturbation, controls included: cell,
    perturbation, control, cos_source_before/after, shift_source and, per target t,
    cos_target:t_before/after and
    shift_target:t), ``summary.json`` and ``summary.csv`` (per perturbation and state: n_cells, n_skipped,
    mean_shift, ci_low/ci_high (95 % bootstrap over cells, seeded), null_mean_shift, null_sd (SD of the
    control genes' mean shifts), z = (mean_shift − mean of the control genes' means) / null_sd, distance
    (source→target cosine distance; NaN for the source row), fraction_of_distance = mean_shift / distance
    (NaN where the distance is below the noise floor: source and target not resolved),
    noise_floor (see :func:`noise_floor`), call ("not distinguishable from zero" when |mean_shift| is below
    the noise floor, whatever the p-value), p_value (rank-sum vs the pooled control cells), empirical_p
    (share of control genes with a mean shift at least as large), fdr (BH over perturbations)),
    ``shifts.png`` (titled with the genes, the cell groups and n), and
    with ``gene_effects`` (deletions) ``gene_effects.parquet`` (+ a target-vs-rest test in the summary).
    Returns the summary."""
    from .corpus import Corpus
    from .run import model_reference

    corpus = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    reference = model_reference(model)
    species = list(corpus.attrs.get("species", []))
    groups = [resolve_genes(names, reference, species) for names in gene_groups]  # fail fast on a typo
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup = prepare(
        model,
        corpus,
        cells_key=cells_key,
        source=source,
        targets=targets,
        max_cells=max_cells,
        seed=seed,
        max_tokens=max_tokens,
        max_length=max_length,
        reference=reference,
    )
    labels = ["+".join(names) for names in gene_groups]
    perts = [perturbation.with_genes(g, label) for g, label in zip(groups, labels, strict=True)]
    controls = random_controls(setup, [t for g in groups for t in g], n_random, seed) if n_random else []
    control_perts = [perturbation.with_genes([int(t)], symbol(setup.reference, t)) for t in controls]
    total = len(perts) + len(control_perts)
    frames = []
    for i, pert in enumerate(perts + control_perts):
        frame = shifts(setup, pert)
        frame.insert(2, "control", i >= len(perts))
        frames.append(frame)
        if progress:
            progress(i + 1, total)
    cells = pd.concat(frames, ignore_index=True)
    cells.to_parquet(out_dir / "cells.parquet", index=False)

    columns = shift_columns(setup.targets)
    null_cells = cells[cells["control"]]
    null_means = {c: np.array([f[c].mean() for f in frames[len(perts) :]]) for c in columns}
    distances = state_distances(setup)
    floors = noise_floor(setup)
    rows = []
    for pert, frame in zip(perts, frames[: len(perts)], strict=True):
        for column in columns:
            mean = float(frame[column].mean()) if len(frame) else float("nan")
            nulls = null_means[column][~np.isnan(null_means[column])]
            size = effect_size(
                frame[column].to_numpy(),
                nulls,
                distance=distances[column],
                noise_floor=floors[column],
                seed=seed,
            )
            rows.append(
                {
                    "perturbation": pert.label,
                    "state": column.removeprefix("shift_").removeprefix("target:"),
                    "n_cells": int(len(frame)),
                    "n_skipped": int(frame.attrs["n_skipped"]),
                    "mean_shift": mean,
                    "ci_low": size["ci_low"],
                    "ci_high": size["ci_high"],
                    "null_mean_shift": float(null_cells[column].mean()) if len(null_cells) else float("nan"),
                    "null_sd": size["null_sd"],
                    "z": size["z"],
                    "distance": distances[column],
                    "fraction_of_distance": size["fraction_of_distance"],
                    "noise_floor": size["noise_floor"],
                    "call": size["call"],
                    "p_value": rank_sum_p(frame[column].to_numpy(), null_cells[column].to_numpy()),
                    "empirical_p": float((1 + np.sum(nulls >= mean)) / (1 + len(nulls)))
                    if len(nulls)
                    else float("nan"),
                }
            )
    table = pd.DataFrame(rows)
    table["fdr"] = np.nan
    for _state, part in table.groupby("state"):
        table.loc[part.index, "fdr"] = bh_fdr(part["p_value"].to_numpy())
    table.to_csv(out_dir / "summary.csv", index=False)
    summary: dict[str, Any] = {
        "perturbation": perturbation.describe(),
        "mode": perturbation.mode,
        "level": str(perturbation.level) if perturbation.level else None,
        "fraction": perturbation.fraction if perturbation.mode == "knockdown" else None,
        "cells_key": cells_key,
        "source": source,
        "targets": list(targets),
        "n_source_cells": int(len(setup.source_cells)),
        "controls": [symbol(setup.reference, t) for t in controls],
        "seed": seed,
        "noise_floor": {c.removeprefix("shift_").removeprefix("target:"): v for c, v in floors.items()},
        "results": table.replace({np.nan: None}).to_dict(orient="records"),
        "files": {"cells": "cells.parquet", "summary_csv": "summary.csv", "plot": "shifts.png"},
    }
    if gene_effects:
        effects = deletion_gene_effects(setup, perts, progress=None)
        effects.to_parquet(out_dir / "gene_effects.parquet", index=False)
        summary["files"]["gene_effects"] = "gene_effects.parquet"
        if effect_targets:
            summary["gene_effect_tests"] = target_effect_tests(
                effects, resolve_targets(effect_targets, setup)
            )
    n_cells = ", ".join(f"{p.label} n={len(f)}" for p, f in zip(perts, frames, strict=False))
    title = (
        f"{', '.join(labels)}: {perturbation.describe()} in {source} cells ({n_cells}; "
        f"{len(controls)} random genes) → {', '.join(targets)}"
    )
    plot_shifts(cells, setup.targets, out_dir / "shifts.png", title=title, source=source, noise_floor=floors)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def resolve_targets(names: Sequence[str], setup: Setup) -> np.ndarray:
    """Tokens of a target gene list; names the reference does not know are skipped (a TF target list often
    holds a few)."""
    tokens = []
    for name in names:
        try:
            tokens.extend(resolve_genes([name], setup.reference, setup.species_names))
        except InputError:
            continue
    return np.asarray(sorted(set(tokens)), dtype=np.int64)


def plot_shifts(
    cells: pd.DataFrame,
    targets: Sequence[str],
    path: Path,
    title: str = "",
    *,
    source: str = "source",
    noise_floor: dict[str, float] | None = None,
) -> None:
    """Fig. 6b-style: per state, the distribution of per-cell shifts for each perturbation vs the controls,
    each box labelled with its n; the noise floor (when given) is a grey band around zero."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = shift_columns(targets)
    fig, axes = plt.subplots(1, len(columns), figsize=(3.4 * len(columns) + 1, 4.0), squeeze=False)
    genes = list(dict.fromkeys(cells.loc[~cells["control"], "perturbation"]))
    for ax, column in zip(axes[0], columns, strict=True):
        data = [cells.loc[cells["perturbation"] == g, column].to_numpy() for g in genes]
        data.append(cells.loc[cells["control"], column].to_numpy())
        names = [*genes, "random genes"]
        keep = [i for i, d in enumerate(data) if len(d)]
        if keep:
            ax.boxplot([data[i] for i in keep], showfliers=False)
            n_random = cells.loc[cells["control"], "perturbation"].nunique()
            names[-1] = f"{n_random} random genes"  # the pooled null: cells of every random gene
            labels = [f"{names[i]}\nn={len(data[i])} cells" for i in keep]
            ax.set_xticks(range(1, len(keep) + 1), labels, rotation=45, ha="right", fontsize=8)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        if noise_floor and column in noise_floor:
            floor = noise_floor[column]
            ax.axhspan(-floor, floor, color="grey", alpha=0.25, lw=0, label=f"noise floor ±{floor:.2g}")
            ax.legend(fontsize=7, loc="best")
        state = column.removeprefix("shift_").removeprefix("target:")
        ax.set_title(
            f"toward {state}" if column != "shift_source" else f"toward {source} (source)", fontsize=9
        )
        ax.set_ylabel("cosine shift (per cell)")
    fig.suptitle(title, fontsize=9, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------- gene-level effects
def deletion_gene_effects(
    setup: Setup, perturbations: Sequence[Perturbation], progress: Progress = None
) -> pd.DataFrame:
    """Per perturbation and gene: mean over cells of the cosine between the gene's output embedding before
    and after the perturbation, matched by token id (never by position). Columns: perturbation, token,
    gene, mean_cosine, n_cells."""
    import torch

    rows = []
    for pert in perturbations:
        kept, perturbed = [], []
        for i, (genes, values) in enumerate(setup.cells):
            cell = apply_perturbation(genes, values, pert, k=setup.embedder.k)
            if cell is not None:
                kept.append(i)
                perturbed.append(cell)
        before: dict[int, dict[int, np.ndarray]] = {}  # cell → token → (H,)

        def collect(into: dict, cell_ids: Sequence[int]):
            def consume(batch, ids, hidden, mask):
                for row, index in enumerate(batch):
                    valid = mask[row]
                    tokens = ids[row][valid].cpu().numpy()
                    vectors = hidden[row][valid].cpu().numpy()
                    into[cell_ids[index]] = dict(zip(tokens.tolist(), vectors, strict=True))

            return consume

        after: dict[int, dict[int, np.ndarray]] = {}
        species = setup.species[np.asarray(kept, np.int64)] if kept else []
        setup.embedder.gene_outputs([setup.cells[i] for i in kept], species, collect(before, kept))
        setup.embedder.gene_outputs(perturbed, species, collect(after, kept))
        sums: dict[int, list[float]] = {}
        for cell in kept:
            old, new = before[cell], after[cell]
            shared = [t for t in new if t in old and t not in pert.genes]
            if not shared:
                continue
            a = torch.as_tensor(np.stack([old[t] for t in shared]))
            b = torch.as_tensor(np.stack([new[t] for t in shared]))
            cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1).numpy()
            for t, c in zip(shared, cos, strict=True):
                sums.setdefault(t, []).append(float(c))
        for token, values in sorted(sums.items()):
            rows.append(
                {
                    "perturbation": pert.label,
                    "token": int(token),
                    "gene": symbol(setup.reference, token),
                    "mean_cosine": float(np.mean(values)),
                    "n_cells": len(values),
                }
            )
    return pd.DataFrame(rows, columns=["perturbation", "token", "gene", "mean_cosine", "n_cells"])


def target_effect_tests(effects: pd.DataFrame, target_tokens: np.ndarray) -> list[dict]:
    """Per perturbation: do the target genes' embeddings move more (lower cosine) than the other genes'?
    One-sided Wilcoxon rank-sum."""
    out = []
    for label, part in effects.groupby("perturbation", sort=False):
        is_target = part["token"].isin(target_tokens).to_numpy()
        targets, others = (
            part["mean_cosine"].to_numpy()[is_target],
            part["mean_cosine"].to_numpy()[~is_target],
        )
        out.append(
            {
                "perturbation": label,
                "n_targets": int(is_target.sum()),
                "n_others": int((~is_target).sum()),
                "mean_cosine_targets": float(targets.mean()) if len(targets) else None,
                "mean_cosine_others": float(others.mean()) if len(others) else None,
                "p_value": rank_sum_p(targets, others, alternative="less"),
            }
        )
    return out


# ------------------------------------------------------------------------------------------- screening
SCREEN_FORMAT = "gc-perturb-screen"
SCREEN_VERSION = 2  # 2: effect sizes, confidence intervals, noise floor


@dataclass
class ScreenSettings:
    mode: str = "overexpress"
    level: str = "cell-max"
    fraction: float = 0.0
    top_fraction: float | None = 0.5
    cells_key: str = "cell_type"
    source: str = ""
    targets: list[str] = field(default_factory=list)
    n_random: int = 20
    max_cells: int | None = 200
    seed: int = 0
    max_length: int | None = None  # tokens per cell incl. the species token (None: the model's maximum)
    batch_genes: int = 16  # genes per result file: the unit of resumption


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` (0-based i) → (i, n); None → (0, 1)."""
    if spec is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(spec).split("/"))
    except ValueError:
        raise InputError(f"--shard {spec!r}: expected i/n, e.g. 0/4 (shards 0..n-1)") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _check_screen_dir(out_dir: Path, settings: ScreenSettings, genes: np.ndarray) -> None:
    manifest = out_dir / "screen.json"
    payload = {
        "format": SCREEN_FORMAT,
        "format_version": SCREEN_VERSION,
        "settings": asdict(settings),
        "genes": [int(g) for g in genes],
    }
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if found.get("format_version") != SCREEN_VERSION:
            raise FormatError(
                f"{manifest}: screen format version {found.get('format_version')!r} is not "
                f"{SCREEN_VERSION}; start a new --out directory"
            )
        if found.get("settings") != payload["settings"] or found.get("genes") != payload["genes"]:
            raise InputError(
                f"{out_dir}: holds a screen with other settings or genes; resume with the same "
                "arguments or use a new --out directory"
            )
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name(f".screen.json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, manifest)


def _screen_rows(
    setup: Setup,
    perturbation: Perturbation,
    tokens: Sequence[int],
    null_cells: pd.DataFrame | None,
    *,
    floors: dict[str, float] | None = None,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-gene rows, per-cell shifts) for candidate ``tokens``; with the null, each effect's size too."""
    columns = shift_columns(setup.targets)
    distances = state_distances(setup)
    null_gene_means = (
        {c: null_cells.groupby("token")[c].mean().to_numpy() for c in columns}
        if null_cells is not None
        else {}
    )
    rows, cell_frames = [], []
    for token in tokens:
        frame = shifts(setup, perturbation.with_genes([int(token)], symbol(setup.reference, token)))
        row: dict[str, Any] = {
            "token": int(token),
            "gene": symbol(setup.reference, token),
            "n_cells": int(len(frame)),
            "n_skipped": int(frame.attrs["n_skipped"]),
        }
        for column in columns:
            name = column.removeprefix("shift_")
            row[f"mean_{column}"] = float(frame[column].mean()) if len(frame) else float("nan")
            if null_cells is not None:
                size = effect_size(
                    frame[column].to_numpy(),
                    null_gene_means[column],
                    distance=distances[column],
                    noise_floor=(floors or {}).get(column, FLOAT32_RESOLUTION),
                    seed=seed,
                )
                row[f"ci_low_{column}"] = size["ci_low"]
                row[f"ci_high_{column}"] = size["ci_high"]
                row[f"z_{name}"] = size["z"]
                if column != "shift_source":
                    row[f"fraction_of_distance_{name}"] = size["fraction_of_distance"]
                row[f"noise_floor_{name}"] = size["noise_floor"]
                row[f"call_{name}"] = size["call"]
                # toward targets: greater; for the source: moving away = a negative shift
                alternative = "less" if column == "shift_source" else "greater"
                row[f"p_{name}"] = rank_sum_p(
                    frame[column].to_numpy(), null_cells[column].to_numpy(), alternative
                )
        rows.append(row)
        frame.insert(0, "token", int(token))
        cell_frames.append(frame)
    return pd.DataFrame(rows), pd.concat(cell_frames, ignore_index=True) if cell_frames else pd.DataFrame()


def screen(
    model,
    corpus,
    out_dir: str | Path,
    *,
    settings: ScreenSettings,
    genes: Sequence[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    max_tokens: int = 16384,
    stop_after_batches: int | None = None,
    progress: Progress = None,
) -> dict:
    """Perturb every candidate gene in the source cells; resumable and shardable.

    Candidates: ``genes`` (names) or, when None, every gene expressed in ≥ 10 % of the source cells. Shard
    ``(i, n)`` takes candidates ``i, i+n, …``. Results are written in batches of ``settings.batch_genes``
    genes to ``out_dir/batches/shard-i-of-n-batch-BBBBB.parquet`` (temp file + rename); a re-run skips batches
    already written. The null (``null.parquet``, per-cell shifts of ``n_random`` random expressed genes) is
    computed once, and so is the noise floor (``noise_floor.json``, see :func:`noise_floor`).
    ``stop_after_batches`` stops early (for tests of resumption). When all batches of all shards are present,
    the merged table is written (see :func:`merge_screen`). Returns a summary."""
    out_dir = Path(out_dir)
    if settings.mode not in ("overexpress", "knockdown"):
        raise InputError(f"screen mode {settings.mode!r} is not overexpress or knockdown")
    from .corpus import Corpus
    from .run import model_reference

    corpus = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
    reference = model_reference(model)
    named, unknown = None, []
    if genes is not None:  # resolve before any model work
        tokens, unknown = resolve_gene_list(
            genes, reference, list(corpus.attrs.get("species", [])), source="screen candidates"
        )
        named = np.unique(np.asarray(tokens, np.int64))
    setup = prepare(
        model,
        corpus,
        cells_key=settings.cells_key,
        source=settings.source,
        targets=settings.targets,
        max_cells=settings.max_cells,
        seed=settings.seed,
        max_tokens=max_tokens,
        max_length=settings.max_length,
        reference=reference,
    )
    candidates = expressed_genes(setup.cells, 0.1) if named is None else named
    _check_screen_dir(out_dir, settings, candidates)
    base = Perturbation(
        settings.mode,
        (0,),
        Level.parse(settings.level) if settings.mode == "overexpress" else None,
        settings.fraction,
        settings.top_fraction,
    )
    null_path = out_dir / "null.parquet"
    if null_path.is_file():
        null_cells = pd.read_parquet(null_path)
    else:
        controls = random_controls(setup, [], settings.n_random, settings.seed)
        _, null_cells = _screen_rows(setup, base, controls, None)
        _atomic_parquet(null_cells, null_path)
    noise_path = out_dir / "noise_floor.json"  # measured once, so every shard and resumption uses the same
    if noise_path.is_file():
        floors = json.loads(noise_path.read_text())
    else:
        floors = noise_floor(setup)
        tmp = noise_path.with_name(f".{noise_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(floors, indent=1))
        os.replace(tmp, noise_path)
    index, n_shards = shard
    mine = candidates[index::n_shards]
    batches = [mine[s : s + settings.batch_genes] for s in range(0, len(mine), settings.batch_genes)]
    batch_dir = out_dir / "batches"
    batch_dir.mkdir(exist_ok=True)
    written = skipped = 0
    for b, tokens in enumerate(batches):
        path = batch_dir / f"shard-{index}-of-{n_shards}-batch-{b:05d}.parquet"
        if path.is_file():
            skipped += 1
        else:
            if stop_after_batches is not None and written >= stop_after_batches:
                break
            rows, _ = _screen_rows(setup, base, tokens, null_cells, floors=floors, seed=settings.seed)
            _atomic_parquet(rows, path)
            written += 1
        if progress:
            progress(sum(len(t) for t in batches[: b + 1]), len(mine))
    result = {
        "out_dir": str(out_dir),
        "candidates": int(len(candidates)),
        "unknown_genes": unknown,  # named candidates without a token: not screened
        "shard": f"{index}/{n_shards}",
        "batches_written": written,
        "batches_skipped": skipped,
        "batches_total": len(batches),
    }
    merged = merge_screen(out_dir, require_complete=False)
    result.update(merged)
    return result


def merge_screen(out_dir: str | Path, *, require_complete: bool = True) -> dict:
    """Merge all batch files into ``screen.parquet`` / ``screen.csv``: per gene the mean shift toward each
    target (``mean_shift_target:T``) and of the source (``mean_shift_source``), rank per target (1 = largest
    shift), ``rank_all_targets`` (worst rank over targets: the rankings' intersection), rank away from the
    source, rank-sum p-values vs the null's cells and BH-FDR per column, and per state the effect's size
    (:func:`effect_size`): ``ci_low_``/``ci_high_`` + shift column, ``z_``, ``fraction_of_distance_``
    (targets), ``noise_floor_`` and ``call_`` ("not distinguishable from zero" below the noise floor).
    Returns {"complete", "genes_done", "table"}; the table is written only when every candidate is done."""
    out_dir = Path(out_dir)
    manifest = out_dir / "screen.json"
    if not manifest.is_file():
        raise InputError(f"{out_dir}: not a screen directory (no screen.json); run `gc perturb screen` first")
    meta = json.loads(manifest.read_text())
    files = sorted((out_dir / "batches").glob("shard-*.parquet"))
    table = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame()
    if len(table):
        table = table.drop_duplicates("token").sort_values("token").reset_index(drop=True)
    complete = len(table) == len(meta["genes"])
    info = {
        "complete": complete,
        "genes_done": int(len(table)),
        "genes_total": len(meta["genes"]),
        "table": None,
    }
    if not complete:
        if require_complete:
            raise InputError(
                f"{out_dir}: {len(table)} of {len(meta['genes'])} genes done; run the remaining "
                "shards (same arguments) first"
            )
        return info
    targets = meta["settings"]["targets"]
    for column in [c for c in table.columns if c.startswith("p_")]:
        table[f"fdr_{column[2:]}"] = bh_fdr(table[column].to_numpy())
    ranks = []
    for target in targets:
        column = f"rank_target:{target}"
        table[column] = table[f"mean_shift_target:{target}"].rank(ascending=False, method="min")
        ranks.append(column)
    table["rank_away_from_source"] = table["mean_shift_source"].rank(ascending=True, method="min")
    table["rank_all_targets"] = table[ranks].max(axis=1)
    table = table.sort_values(["rank_all_targets", "token"], kind="stable").reset_index(drop=True)
    _atomic_parquet(table, out_dir / "screen.parquet")
    tmp = out_dir / f".screen.csv.{os.getpid()}.tmp"
    table.to_csv(tmp, index=False)
    os.replace(tmp, out_dir / "screen.csv")
    info["table"] = str(out_dir / "screen.parquet")
    return info
