#!/usr/bin/env python
"""Pre-training step time, full-vocabulary ID head (the paper) vs the corpus-restricted head, side by side.

Same model (a preset with the given knowledge tables), same masked batches (``gc pretrain``'s sampler and
collator), forward + backward + AdamW step, the two heads interleaved in rounds in one process, so machine
load affects both alike. Prints JSON: real tokens/s of each and the ratio.

    python bench/bench_id_head.py --corpus pretrain.zarr --knowledge knowledge --batches 6 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", required=True)
    p.add_argument("--knowledge", default=None)
    p.add_argument("--model", default="tiny")
    p.add_argument("--max-length", type=int, default=513)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--batches", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    from genecompass.corpus import Corpus
    from genecompass.data import CorpusDataset, MaskingCollator, TokenBudgetBatchSampler
    from genecompass.knowledge import load_knowledge
    from genecompass.model import GeneCompassConfig, GeneCompassForPretraining
    from genecompass.reference import load_reference
    from genecompass.train import _parameter_groups, corpus_gene_tokens, mask_generator

    torch.set_num_threads(args.threads)
    reference = load_reference()
    corpus = Corpus.open(args.corpus)
    tables = load_knowledge(args.knowledge, reference.hash, None) if args.knowledge else {}
    genes = corpus_gene_tokens(corpus, reference)
    common = dict(
        vocab_size=reference.vocab_size, pad_token_id=reference.pad_id, mask_token_id=reference.mask_id,
        species_token_ids=dict(reference.species_token_ids), reference_hash=reference.hash,
        knowledge_tables=list(tables), knowledge_dims={n: int(t[0].shape[1]) for n, t in tables.items()},
    )  # fmt: skip
    models = {}
    for head in ("full", "corpus"):
        torch.manual_seed(0)
        config = GeneCompassConfig.from_preset(
            args.model, **common, **({"id_head_size": len(genes)} if head == "corpus" else {})
        )
        model = GeneCompassForPretraining(config)
        if head == "corpus":
            model.restrict_id_head(genes)
        if tables:
            model.attach_knowledge(tables)
        optimizer = torch.optim.AdamW(_parameter_groups(model, 0.01), lr=1e-3)
        models[head] = (model.train(), optimizer)
    dataset = CorpusDataset(corpus, args.max_length, species_token_ids=reference.species_token_ids)
    sampler = TokenBudgetBatchSampler(dataset.lengths, args.max_tokens, shuffle=True, seed=0)
    collator = MaskingCollator(reference)
    batches = []
    for i, rows in enumerate(sampler):
        if i == args.batches:
            break
        batches.append(collator.mask(collator.pad([dataset[r] for r in rows]), mask_generator(0, 0, i)))
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    seconds = {head: [] for head in models}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for head, (model, optimizer) in models.items():
            start = time.perf_counter()
            for batch in batches:
                loss = model(**batch).loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            if round_:
                seconds[head].append(time.perf_counter() - start)
    result = {
        "vocab_size": reference.vocab_size,
        "corpus_genes": int(len(genes)),
        "tokens_per_round": tokens,
        "seconds": seconds,
        "tokens_per_s": {h: tokens / float(np.median(s)) for h, s in seconds.items()},
    }
    result["ratio_corpus_over_full"] = result["tokens_per_s"]["corpus"] / result["tokens_per_s"]["full"]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
