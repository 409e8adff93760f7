"""Feeding the model: corpus items, token-budget batches (sharding, determinism, resume) and masking."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dist_helpers.synthetic import FakeReference, make_corpus

from genecompass.corpus import Corpus
from genecompass.data import CorpusDataset, MaskingCollator, TokenBudgetBatchSampler
from genecompass.errors import InputError
from genecompass.model import IGNORE_INDEX

REF = FakeReference()


@pytest.fixture(scope="module")
def corpus_path(tmp_path_factory):
    return make_corpus(
        tmp_path_factory.mktemp("data") / "c.zarr",
        REF,
        n_cells=300,
        min_genes=5,
        max_genes=60,
        mouse_fraction=0.4,
        seed=1,
    )


@pytest.fixture(scope="module")
def dataset(corpus_path):
    return CorpusDataset(
        corpus_path, max_length=33, species_token_ids=REF.species_token_ids, block_cells=16, cache_blocks=4
    )


# ---------------------------------------------------------------------------------------------- dataset


def test_items_are_species_token_then_top_genes(dataset, corpus_path):
    corpus = Corpus.open(corpus_path)
    offsets, genes, values = corpus.read_cells(0, corpus.n_cells)
    for index in (0, 1, 17, 150, 299):
        item = dataset[index]
        species = ("human", "mouse")[corpus.species[index]]
        n = min(offsets[index + 1] - offsets[index], 32)
        assert item["input_ids"][0] == REF.species_token_ids[species]
        assert item["values"][0] == 0.0
        assert np.array_equal(item["input_ids"][1:], genes[offsets[index] : offsets[index] + n])
        assert np.array_equal(item["values"][1:], values[offsets[index] : offsets[index] + n])
        assert len(item["input_ids"]) == dataset.lengths[index] <= 33
    assert len(dataset._cache) <= 4
    with pytest.raises(IndexError):
        dataset[300]


# ---------------------------------------------------------------------------------------------- sampler


def test_batches_respect_the_token_budget_and_cover_each_cell_once(dataset):
    sampler = TokenBudgetBatchSampler(dataset.lengths, max_tokens=200, seed=3)
    batches = list(sampler)
    for batch in batches:
        assert len(batch) * dataset.lengths[batch].max() <= 200
    seen = np.concatenate(batches)
    assert len(seen) == len(set(seen.tolist()))
    assert len(seen) > 0.9 * len(dataset)  # only a trimmed tail may be missing (none with one rank)
    assert sampler.epoch == 1 and sampler.position == 0  # a finished iteration moves to the next epoch


def test_length_grouping_uses_per_row_lengths_and_cuts_padding(dataset):
    def padding(sampler):
        batches = list(sampler)
        return sum(len(b) * dataset.lengths[b].max() - dataset.lengths[b].sum() for b in batches)

    grouped = TokenBudgetBatchSampler(dataset.lengths, max_tokens=200, seed=0)
    plain = TokenBudgetBatchSampler(dataset.lengths, max_tokens=200, seed=0, length_grouped=False)
    assert padding(grouped) < 0.5 * padding(plain)
    first = list(TokenBudgetBatchSampler(dataset.lengths, max_tokens=200, seed=0))[0]
    assert dataset.lengths[first].max() == dataset.lengths.max()  # the longest batch comes first


def test_sampler_is_deterministic_per_seed_and_epoch(dataset):
    def epoch(seed, number):
        sampler = TokenBudgetBatchSampler(dataset.lengths, max_tokens=200, seed=seed)
        sampler.set_epoch(number)
        return list(sampler)

    assert epoch(7, 0) == epoch(7, 0)
    assert epoch(7, 0) != epoch(7, 1)
    assert epoch(7, 0) != epoch(8, 0)


def test_ranks_get_disjoint_equal_shares_of_one_global_order(dataset):
    single = TokenBudgetBatchSampler(dataset.lengths, max_tokens=150, seed=5, grad_accum=2)
    ranks = [
        TokenBudgetBatchSampler(dataset.lengths, max_tokens=150, seed=5, rank=r, world_size=2)
        for r in range(2)
    ]
    shares = [list(s) for s in ranks]
    assert len(shares[0]) == len(shares[1]) == len(ranks[0])
    assert not set(np.concatenate(shares[0]).tolist()) & set(np.concatenate(shares[1]).tolist())
    # Rank r's p-th batch is the single process's batch 2p + r: 2 ranks = 1 process with 2-step accumulation.
    interleaved = [batch for pair in zip(*shares, strict=True) for batch in pair]
    assert interleaved == list(single)


def test_sampler_resumes_mid_epoch(dataset):
    sampler = TokenBudgetBatchSampler(dataset.lengths, max_tokens=200, seed=2, block_size=16)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(5)]
    state = sampler.state_dict()
    assert state["epoch"] == 3 and state["position"] == 5
    resumed = TokenBudgetBatchSampler(dataset.lengths, max_tokens=200, seed=2, block_size=16)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    with pytest.raises(InputError, match="world_size"):
        TokenBudgetBatchSampler(dataset.lengths, max_tokens=200, seed=2, world_size=2).load_state_dict(state)


def test_block_shuffling_keeps_reads_local(dataset):
    sampler = TokenBudgetBatchSampler(
        dataset.lengths, max_tokens=200, seed=2, block_size=16, mega_batch_mult=2
    )
    blocks_per_batch = [len(set((np.array(b) // 16).tolist())) for b in sampler]
    assert np.mean(blocks_per_batch) < 4  # a fully random order would touch ~len(batch) blocks


def test_sampler_rejects_impossible_budgets(dataset):
    with pytest.raises(InputError, match="longest cell"):
        TokenBudgetBatchSampler(dataset.lengths, max_tokens=10)
    with pytest.raises(InputError, match="fewer than one optimizer step"):
        list(TokenBudgetBatchSampler(dataset.lengths[:3], max_tokens=1000, world_size=2, rank=1))


# ---------------------------------------------------------------------------------------------- masking


def masked_batches(dataset, seed=0):
    collator = MaskingCollator(REF, seed=seed)
    for batch in TokenBudgetBatchSampler(dataset.lengths, max_tokens=400, seed=seed):
        padded = collator.pad([dataset[i] for i in batch])
        yield padded, collator.mask(padded)


def test_masking_statistics(dataset):
    selected = genes = masked = replaced = kept = 0
    mouse_genes = set(REF.species_tokens("mouse").tolist())
    human_genes = set(REF.species_tokens("human").tolist())
    for epoch in range(5):
        for padded, out in masked_batches(dataset, seed=epoch):
            is_gene = padded["attention_mask"].clone()
            is_gene[:, 0] = False
            chosen = out["labels"] != IGNORE_INDEX
            assert not (chosen & ~is_gene).any()  # never the species token, never padding
            assert torch.equal(out["labels"][chosen], padded["input_ids"][chosen])
            assert torch.equal(out["value_labels"][chosen], padded["values"][chosen])
            assert torch.equal(out["input_ids"][~chosen], padded["input_ids"][~chosen])
            assert torch.equal(out["values"][~chosen], padded["values"][~chosen])
            is_mask = chosen & (out["input_ids"] == REF.mask_id)
            is_same = chosen & (out["values"] != -1.0)  # real values are positive
            is_random = chosen & ~is_mask & ~is_same
            assert (out["values"][is_mask] == -1.0).all()
            assert torch.equal(out["input_ids"][is_same], padded["input_ids"][is_same])
            assert torch.equal(out["values"][is_same], padded["values"][is_same])
            for row, column in is_random.nonzero().tolist():
                is_mouse = padded["input_ids"][row, 0] == REF.species_token_ids["mouse"]
                pool = mouse_genes if is_mouse else human_genes
                assert int(out["input_ids"][row, column]) in pool  # same species, never a special token
            genes += int(is_gene.sum())
            selected += int(chosen.sum())
            masked += int(is_mask.sum())
            replaced += int(is_random.sum())
            kept += int(is_same.sum())
    assert genes > 30000
    assert abs(selected / genes - 0.15) < 0.01
    assert abs(masked / selected - 0.8) < 0.03
    assert abs(replaced / selected - 0.1) < 0.03
    assert abs(kept / selected - 0.1) < 0.03


def test_mouse_cells_draw_mouse_genes(dataset):
    collator = MaskingCollator(
        {3: np.array([200, 201]), 2: np.array([100])},
        pad_token_id=0,
        mask_token_id=1,
        mask_ratio=0.0,
        random_ratio=1.0,
    )
    batch = {
        "input_ids": torch.tensor([[3] + list(range(4, 104)), [2] + list(range(4, 104))]),
        "values": torch.ones(2, 101),
    }
    out = collator.mask(batch, torch.Generator().manual_seed(0))
    chosen = out["labels"] != IGNORE_INDEX
    assert set(out["input_ids"][0][chosen[0]].tolist()) <= {200, 201}
    assert set(out["input_ids"][1][chosen[1]].tolist()) == {100}


def test_masking_is_deterministic_given_a_generator(dataset):
    collator = MaskingCollator(REF)
    padded = collator.pad([dataset[i] for i in range(8)])
    first = collator.mask(padded, torch.Generator().manual_seed(11))
    second = collator.mask(padded, torch.Generator().manual_seed(11))
    third = collator.mask(padded, torch.Generator().manual_seed(12))
    for key in first:
        assert torch.equal(first[key], second[key])
    assert not torch.equal(first["labels"], third["labels"])


def test_padding(dataset):
    collator = MaskingCollator(REF)
    items = [dataset[i] for i in range(5)]
    padded = collator.pad(items)
    longest = max(len(item["input_ids"]) for item in items)
    assert padded["input_ids"].shape == (5, longest)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert padded["attention_mask"][row].sum() == n
        assert (padded["input_ids"][row, n:] == REF.pad_id).all()
        assert (padded["values"][row, n:] == 0).all()


def test_collator_rejects_bad_settings():
    with pytest.raises(InputError, match="mlm_probability"):
        MaskingCollator(REF, mlm_probability=0.0)
    with pytest.raises(InputError, match="mask_ratio"):
        MaskingCollator(REF, mask_ratio=0.9, random_ratio=0.2)
