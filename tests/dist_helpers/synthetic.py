"""Small synthetic fixtures: a fake gene reference, corpora with learnable structure, knowledge tables.

Synthetic data is for edge cases and multi-process plumbing; the evidence that pre-training learns comes
from the real PBMC3k corpus (``tests/test_train.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genecompass.corpus import CorpusWriter
from genecompass.knowledge import write_knowledge_table


@dataclass
class FakeReference:
    """The slice of ``GeneReference`` the model stack uses: human genes, mouse genes sharing the first
    ``n_shared`` human tokens (one-to-one homologs), and mouse-only genes with their own tokens."""

    n_human: int = 96
    n_shared: int = 64
    n_mouse_only: int = 32
    hash: str = "fake-reference-v1"
    pad_id: int = 0
    mask_id: int = 1
    species_token_ids: dict[str, int] = field(default_factory=lambda: {"human": 2, "mouse": 3})

    n_special: int = 4

    @property
    def vocab_size(self) -> int:
        return self.n_special + self.n_human + self.n_mouse_only

    def species_tokens(self, species: str) -> np.ndarray:
        human = np.arange(self.n_special, self.n_special + self.n_human)
        if species == "human":
            return human
        mouse_only = np.arange(self.n_special + self.n_human, self.vocab_size)
        return np.concatenate([human[: self.n_shared], mouse_only])


def make_corpus(
    path: str | Path,
    reference: FakeReference,
    *,
    n_cells: int = 64,
    min_genes: int = 8,
    max_genes: int = 40,
    mouse_fraction: float = 0.25,
    n_programs: int = 4,
    seed: int = 0,
) -> Path:
    """A corpus whose cells express one of ``n_programs`` gene programs (plus noise), so gene identity and
    rank are learnable. Cell types go to ``obs/cell_type``."""
    rng = np.random.default_rng(seed)
    species = (rng.random(n_cells) < mouse_fraction).astype(np.uint8)
    programs = rng.integers(n_programs, size=n_cells)
    pools = {s: reference.species_tokens(name) for s, name in enumerate(("human", "mouse"))}
    lengths, genes, values = [], [], []
    for cell in range(n_cells):
        pool = pools[int(species[cell])]
        weights = np.ones(len(pool))
        program = pool[programs[cell] :: n_programs]
        weights[np.isin(pool, program)] = 8.0  # program genes dominate
        n = int(rng.integers(min_genes, max_genes + 1))
        chosen = rng.choice(pool, size=min(n, len(pool)), replace=False, p=weights / weights.sum())
        level = np.where(np.isin(chosen, program), 3.0, 0.5) + rng.random(len(chosen))
        order = np.lexsort((chosen, -level))  # value descending, ties by token id
        lengths.append(len(chosen))
        genes.append(chosen[order].astype(np.uint32))
        values.append(level[order].astype(np.float32))
    attrs = {
        "reference_hash": reference.hash,
        "medians_hash": "synthetic",
        "normalisation": {"library_size": True, "target_sum": 10000.0, "log_base": 2},
        "top_k": max_genes,
        "inputs": [{"path": "synthetic", "size": 0, "n_cells": n_cells}],
    }
    with CorpusWriter(path, attrs=attrs, obs_keys=["cell_type"], overwrite=True) as writer:
        labels = [f"type_{p}" for p in programs]
        writer.append(
            lengths=np.array(lengths),
            genes=np.concatenate(genes),
            values=np.concatenate(values),
            species=species,
            source=np.zeros(n_cells, np.uint16),
            n_expressed=np.array(lengths, np.uint32),
            obs_codes={"cell_type": writer.encode_labels("cell_type", labels)},
        )
    return Path(path)


def make_knowledge(
    directory: str | Path, reference: FakeReference, *, dims: dict[str, int] | None = None, seed: int = 0
) -> Path:
    """Random knowledge tables covering ~80 % of the gene tokens (special tokens never covered)."""
    rng = np.random.default_rng(seed)
    dims = dims or {"grn": 8, "promoter": 12, "gene_family": 6, "coexpression": 10}
    for name, dim in dims.items():
        covered = rng.random(reference.vocab_size) < 0.8
        covered[: reference.n_special] = False
        write_knowledge_table(
            directory,
            name,
            rng.normal(size=(reference.vocab_size, dim)).astype(np.float32),
            covered,
            source="synthetic",
            description=f"random {name} vectors for tests",
            reference_hash=reference.hash,
        )
    return Path(directory)
