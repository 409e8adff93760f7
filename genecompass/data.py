"""Feeding a corpus to the model: cells as sequences, token-budget batches, and masking.

- ``CorpusDataset``: item *i* = ``[<species>, top genes of cell i]`` with their values (0 for the species
  token), read through ``Corpus.read_cells`` in blocks of consecutive cells kept in a small LRU cache.
- ``TokenBudgetBatchSampler``: shuffled, length-grouped batches whose padded size stays within a token
  budget; deterministic for (seed, epoch), resumable, and sharded so every rank gets the same number of
  batches. Rank r's p-th batch is batch ``p * world_size + r`` of one global sequence, so a run on W ranks
  sees exactly the batches a single process sees with W-fold gradient accumulation.
- ``MaskingCollator``: pads, then masks 15 % of gene positions (80 % <mask>, 10 % a random gene of the
  same species, 10 % unchanged); masked and replaced genes get the value sentinel.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .corpus import Corpus
from .errors import InputError, ReferenceMismatchError
from .model import IGNORE_INDEX

Item = dict[str, np.ndarray]


def species_token_map(corpus: Corpus, species_token_ids: Mapping[str, int]) -> np.ndarray:
    """Species code in the corpus (``cells/species``) → species token id."""
    names = list(corpus.attrs.get("species", []))
    missing = [n for n in names if n not in species_token_ids]
    if missing:
        raise InputError(f"{corpus.path}: species {missing} have no species token in the reference")
    return np.array([species_token_ids[n] for n in names], dtype=np.int64)


class CorpusDataset(torch.utils.data.Dataset):
    """Cells of a corpus as model inputs.

    Item ``i`` is ``{"input_ids": int64 [L], "values": float32 [L]}`` with
    ``L = 1 + min(n_genes, max_length - 1)``: the species token (value 0) followed by the cell's most
    expressed genes in rank order.

    ``species_token_ids`` maps species names to token ids (default: from the gene reference, whose hash must
    equal the corpus's). Tokens are read in blocks of ``block_cells`` consecutive cells and the last
    ``cache_blocks`` decoded blocks are kept, so a sampler that shuffles blocks (``TokenBudgetBatchSampler``
    with the same ``block_size``) decodes each block about once per epoch.
    """

    def __init__(
        self,
        corpus: Corpus | str | Path,
        max_length: int,
        *,
        species_token_ids: Mapping[str, int] | None = None,
        block_cells: int = 256,
        cache_blocks: int = 16,
    ):
        self.corpus = corpus if isinstance(corpus, Corpus) else Corpus.open(corpus)
        if max_length < 2:
            raise InputError(
                f"max_length must hold the species token and at least one gene, got {max_length}"
            )
        if species_token_ids is None:
            from .reference import load_reference

            reference = load_reference()
            if reference.hash != self.corpus.reference_hash:
                raise ReferenceMismatchError(
                    f"{self.corpus.path}: corpus built for reference {self.corpus.reference_hash}, "
                    f"the installed reference is {reference.hash}"
                )
            species_token_ids = reference.species_token_ids
        self.max_length = int(max_length)
        self.block_cells = int(block_cells)
        self.cache_blocks = int(cache_blocks)
        self.species_token = species_token_map(self.corpus, species_token_ids)
        # Sequence lengths including the species token, as the model sees them.
        self.lengths = np.minimum(self.corpus.lengths(), self.max_length - 1) + 1
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return self.corpus.n_cells

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers started by spawn reopen the store
        state = dict(self.__dict__)
        state["corpus"] = str(self.corpus.path)
        state["_cache"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.corpus = Corpus.open(state["corpus"])

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cached = self._cache.get(block)
        if cached is not None:
            self._cache.move_to_end(block)
            return cached
        start = block * self.block_cells
        stop = min(start + self.block_cells, len(self))
        cached = self.corpus.read_cells(start, stop)
        self._cache[block] = cached
        if len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return cached

    def __getitem__(self, index: int) -> Item:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"cell {index} out of range (corpus has {len(self)} cells)")
        offsets, genes, values = self._block(index // self.block_cells)
        row = index % self.block_cells
        lo = int(offsets[row])
        hi = min(int(offsets[row + 1]), lo + self.max_length - 1)
        input_ids = np.empty(hi - lo + 1, dtype=np.int64)
        input_ids[0] = self.species_token[self.corpus.species[index]]
        input_ids[1:] = genes[lo:hi]
        cell_values = np.zeros(hi - lo + 1, dtype=np.float32)
        cell_values[1:] = values[lo:hi]
        return {"input_ids": input_ids, "values": cell_values}


class TokenBudgetBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of cell indices whose padded size (cells x longest cell) stays within ``max_tokens``.

    Per epoch: shuffle (with ``block_size > 1``, shuffle blocks of consecutive cells, which keeps reads
    local); cut into mega-batches of about ``mega_batch_mult`` batches; sort each mega-batch by length
    (``length_grouped``; per-row lengths, the original's bug #1 fed sorted lengths); pack greedily; shuffle
    the batches within each mega-batch; put the batch holding the longest cell first (fail early on memory).
    The batch list is cut to a multiple of ``world_size x grad_accum`` (an optimizer step never straddles two
    epochs, so any split of the same W·A micro-batches per step sees the same batches) and rank r takes
    batches r, r + W, …

    Deterministic for (seed, epoch). Iteration starts at ``position`` (batches already consumed in this
    epoch, restored by ``load_state_dict``); a completed iteration moves to the next epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        length_grouped: bool = True,
        mega_batch_mult: int = 50,
        block_size: int = 1,
        grad_accum: int = 1,
    ):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) == 0:
            raise InputError("cannot batch an empty corpus")
        longest = int(self.lengths.max())
        if max_tokens < longest:
            raise InputError(
                f"max_tokens {max_tokens} is smaller than the longest cell ({longest} tokens); raise "
                "max_tokens or lower max_length"
            )
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is outside world_size {world_size}")
        self.max_tokens = int(max_tokens)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.grad_accum = max(1, int(grad_accum))
        self.length_grouped = length_grouped
        typical = max(1, self.max_tokens // max(1, int(np.median(self.lengths))))
        self.mega_batch_cells = max(1, mega_batch_mult * typical)
        self.block_size = max(1, int(block_size))
        self.epoch = 0
        self.position = 0
        self._cached_epoch: int | None = None
        self._cached_batches: tuple[np.ndarray, np.ndarray] = (np.empty(0, np.int64), np.zeros(1, np.int64))

    # -- batch construction -----------------------------------------------------------------------------
    def _order(self, rng: np.random.Generator) -> np.ndarray:
        n = len(self.lengths)
        if not self.shuffle:
            return np.arange(n)
        if self.block_size == 1:
            return rng.permutation(n)
        starts = rng.permutation(np.arange(0, n, self.block_size))
        return np.concatenate([np.arange(s, min(s + self.block_size, n)) for s in starts])

    def _pack(self, lengths: np.ndarray, grouped: bool) -> list[int]:
        """Start offsets of greedy batches over a run of cells (longest first when ``grouped``)."""
        starts: list[int] = []
        i, n = 0, len(lengths)
        if grouped:  # sorted descending: a batch's first cell is its longest, so each step is one division
            while i < n:
                starts.append(i)
                i += max(1, self.max_tokens // int(lengths[i]))
            return starts
        longest = 0
        for j, length in enumerate(lengths.tolist()):
            if j == 0 or (j - starts[-1] + 1) * max(longest, length) > self.max_tokens:
                starts.append(j)
                longest = 0
            longest = max(longest, length)
        return starts

    def global_batches(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """All batches of an epoch before sharding (the same on every rank), as ``(indices, bounds)``:
        batch b is ``indices[bounds[b]:bounds[b + 1]]``. Flat arrays keep a 100M-cell epoch in ~1 GB."""
        if self._cached_epoch == epoch:
            return self._cached_batches
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        order = self._order(rng)
        pieces: list[np.ndarray] = []
        for start in range(0, len(order), self.mega_batch_cells):
            mega = order[start : start + self.mega_batch_cells]
            if self.length_grouped:
                mega = mega[np.argsort(-self.lengths[mega], kind="stable")]
            starts = self._pack(self.lengths[mega], self.length_grouped)
            batches = np.split(mega, starts[1:])
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
            pieces.extend(batches)
        if self.shuffle and len(pieces) > 1:
            longest = int(np.argmax([self.lengths[b].max() for b in pieces]))
            pieces[0], pieces[longest] = pieces[longest], pieces[0]
        per_step = self.world_size * self.grad_accum
        usable = len(pieces) - len(pieces) % per_step
        if usable == 0:
            raise InputError(
                f"the corpus makes {len(pieces)} batch(es) of at most {self.max_tokens} tokens, fewer than "
                f"one optimizer step needs ({self.world_size} ranks x {self.grad_accum} accumulation); lower "
                "max_tokens, grad_accum or the number of ranks"
            )
        pieces = pieces[:usable]
        dtype = np.int32 if len(self.lengths) < np.iinfo(np.int32).max else np.int64
        indices = np.concatenate(pieces).astype(dtype)
        bounds = np.concatenate([[0], np.cumsum([len(b) for b in pieces])])
        self._cached_epoch, self._cached_batches = epoch, (indices, bounds)
        return self._cached_batches

    def global_index(self, position: int) -> int:
        """Index in the epoch's global batch list of this rank's batch number ``position``."""
        return position * self.world_size + self.rank

    # -- Sampler protocol ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return (len(self.global_batches(self.epoch)[1]) - 1) // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        indices, bounds = self.global_batches(self.epoch)
        per_rank = (len(bounds) - 1) // self.world_size
        while self.position < per_rank:
            b = self.global_index(self.position)
            self.position += 1
            yield indices[bounds[b] : bounds[b + 1]].tolist()
        self.epoch += 1
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for key in ("seed", "world_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise InputError(
                    f"sampler state was saved with {key}={state[key]}, this run has "
                    f"{key}={getattr(self, key)}; resume with the same settings"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class MaskingCollator:
    """Pad a list of items and mask genes for pre-training.

    ``species_tokens``: ``{species token id: array of that species' gene token ids}``, or a gene reference
    (anything with ``species_token_ids`` and ``species_tokens(name)``; its pad and mask ids are used too).
    Of the gene positions (never the species token, never padding) each is selected with probability
    ``mlm_probability``; a selected gene becomes ``<mask>`` with probability ``mask_ratio``, a random gene of
    the cell's own species with probability ``random_ratio``, and otherwise stays. Masked and replaced genes
    get ``mask_value``. ``labels`` hold the true gene at selected positions and -100 elsewhere;
    ``value_labels`` the true value (0 elsewhere).

    Randomness comes from the ``generator`` passed to ``mask``/``__call__``, else from the collator's own
    generator seeded with ``seed``: the same generator state gives the same masks.
    """

    def __init__(
        self,
        species_tokens: Mapping[int, np.ndarray] | Any,
        *,
        pad_token_id: int | None = None,
        mask_token_id: int | None = None,
        mlm_probability: float = 0.15,
        mask_ratio: float = 0.8,
        random_ratio: float = 0.1,
        mask_value: float = -1.0,
        seed: int = 0,
    ):
        if hasattr(species_tokens, "species_token_ids"):
            reference = species_tokens
            species_tokens = {
                token: np.asarray(reference.species_tokens(name))
                for name, token in reference.species_token_ids.items()
            }
            pad_token_id = reference.pad_id if pad_token_id is None else pad_token_id
            mask_token_id = reference.mask_id if mask_token_id is None else mask_token_id
        if pad_token_id is None or mask_token_id is None:
            raise InputError("MaskingCollator needs pad_token_id and mask_token_id (or a gene reference)")
        if not 0.0 < mlm_probability < 1.0:
            raise InputError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        if mask_ratio < 0 or random_ratio < 0 or mask_ratio + random_ratio > 1:
            raise InputError(f"mask_ratio {mask_ratio} + random_ratio {random_ratio} must lie in [0, 1]")
        self.species_tokens = {
            int(k): torch.as_tensor(np.asarray(v, dtype=np.int64)) for k, v in species_tokens.items()
        }
        empty = [k for k, v in self.species_tokens.items() if len(v) == 0]
        if empty:
            raise InputError(f"species tokens {empty} have no genes to draw random replacements from")
        self.pad_token_id = int(pad_token_id)
        self.mask_token_id = int(mask_token_id)
        self.mlm_probability = mlm_probability
        self.mask_ratio = mask_ratio
        self.random_ratio = random_ratio
        self.mask_value = mask_value
        self.generator = torch.Generator().manual_seed(seed)

    def pad(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest item: input_ids (B, T) long, values (B, T) float, attention_mask (B, T)
        bool."""
        longest = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), longest), self.pad_token_id, dtype=torch.long)
        values = torch.zeros((len(items), longest), dtype=torch.float32)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.as_tensor(item["input_ids"])
            values[row, :n] = torch.as_tensor(item["values"])
        return {"input_ids": input_ids, "values": values, "attention_mask": input_ids != self.pad_token_id}

    def mask(self, batch: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> dict:
        """Masked copy of a padded batch, plus ``labels`` and ``value_labels``."""
        generator = generator or self.generator
        input_ids, values = batch["input_ids"], batch["values"]
        attention_mask = batch.get("attention_mask", input_ids != self.pad_token_id)
        rows, length = input_ids.shape
        is_gene = attention_mask.bool().clone()
        is_gene[:, 0] = False  # the species token is never masked
        selected = (torch.rand((rows, length), generator=generator) < self.mlm_probability) & is_gene
        action = torch.rand((rows, length), generator=generator)
        to_mask = selected & (action < self.mask_ratio)
        to_random = selected & (action >= self.mask_ratio) & (action < self.mask_ratio + self.random_ratio)

        masked_ids = input_ids.clone()
        masked_ids[to_mask] = self.mask_token_id
        species = input_ids[:, 0]  # (B,)
        for species_token in species[to_random.any(1)].unique().tolist():
            genes = self.species_tokens.get(int(species_token))
            if genes is None:
                raise InputError(f"cell starts with token {species_token}, not a known species token")
            where = to_random & (species == species_token)[:, None]
            draws = torch.randint(len(genes), (int(where.sum()),), generator=generator)
            masked_ids[where] = genes[draws]
        masked_values = values.clone()
        masked_values[to_mask | to_random] = self.mask_value
        return {
            "input_ids": masked_ids,
            "values": masked_values,
            "attention_mask": attention_mask.bool(),
            "labels": torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX)),
            "value_labels": torch.where(selected, values, torch.zeros_like(values)),
        }

    def __call__(self, items: Sequence[Item], generator: torch.Generator | None = None) -> dict:
        return self.mask(self.pad(items), generator)
