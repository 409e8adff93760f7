#!/usr/bin/env python
"""Why short pre-training runs make the model worse (issue 14): an instrumented pre-training loop.

The same model, data pipeline (``CorpusDataset``, ``TokenBudgetBatchSampler``, ``MaskingCollator``), loss,
optimiser (AdamW, weight decay on matrices only), gradient clipping and learning-rate schedule
(``train.lr_lambda``) as ``gc pretrain``, in a plain single-process torch loop (no DeepSpeed) so that every
``--eval-every`` steps (and at step 0, the untrained copy) it can measure, on a fixed set of held-out cells
(a tokenised corpus of cells never trained on, e.g. Kang IFN-beta-stimulated cells):

- cell embeddings, species token and mean of genes: k-NN macro-F1 (5-fold, k = 15, cosine), mean pairwise
  cosine (the cone), the spread of the species-token output across cells;
- on one training batch, the gradient norm of each loss term (ID cross-entropy x its weight, value MSE x
  its weight) over the encoder layers, the gene-ID embedding table and the knowledge projections, and both
  ID losses: over the full vocabulary and over the genes the corpus holds;
- the knowledge tables' share of the fusion input: the norm of each part's contribution to the first fusion
  layer's pre-activation (gene ID, value, each knowledge projection), averaged over tokens.

Variants (``--id-head corpus`` restricts the ID softmax to the corpus's genes; ``--id-weight`` /
``--value-weight``; any pre-training setting with ``--set key=value``) write one JSON per run.

    python bench/diagnose_pretrain.py --corpus pretrain.zarr --knowledge knowledge \
        --eval stim.zarr --config bench/configs/cpu_pretrain.yaml --steps 300 --out bench/diagnose/base.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_NUM_THREADS", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True)
    p.add_argument("--knowledge", default=None)
    p.add_argument("--eval", required=True, help="tokenised held-out cells with obs key --label-key")
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--eval-cells", type=int, default=1000)
    p.add_argument("--config", default="bench/configs/cpu_pretrain.yaml")
    p.add_argument("--set", action="append", default=[], help="pre-training setting override key=value")
    p.add_argument("--model-set", action="append", default=[], help="model config override key=value")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--id-head", choices=("full", "corpus"), default="full")
    p.add_argument("--id-weight", type=float, default=None)
    p.add_argument("--value-weight", type=float, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--save", default=None, help="also export the final model as a gc run directory here")
    return p.parse_args(argv)


def _value(text: str):
    import yaml

    return yaml.safe_load(text)


def stratified(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    chosen = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        take = max(1, int(round(n * len(members) / len(labels))))
        chosen.append(rng.choice(members, min(take, len(members)), replace=False))
    return np.sort(np.concatenate(chosen))


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from genecompass.corpus import Corpus
    from genecompass.data import CorpusDataset, MaskingCollator, TokenBudgetBatchSampler
    from genecompass.evaluate import knn_cv, mean_pairwise_cosine
    from genecompass.knowledge import load_knowledge
    from genecompass.model import (
        IGNORE_INDEX,
        GeneCompassForPretraining,
        pool_cells,
    )
    from genecompass.reference import load_reference
    from genecompass.train import (
        PretrainConfig,
        _parameter_groups,
        lr_lambda,
        mask_generator,
        model_config_for,
    )

    torch.set_num_threads(args.threads)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    config = PretrainConfig.load(args.config, **{k: _value(v) for k, v in overrides.items()})
    config = config.replace(max_steps=max(config.max_steps, 1))
    model_overrides = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.model_set)}
    reference = load_reference()
    corpus = Corpus.open(args.corpus)
    tables = load_knowledge(args.knowledge, reference.hash, config.knowledge_tables) if args.knowledge else {}
    model_config = model_config_for(config, reference, tables, args.knowledge, **model_overrides)
    id_w = model_config.id_loss_weight if args.id_weight is None else args.id_weight
    value_w = model_config.value_loss_weight if args.value_weight is None else args.value_weight
    max_length = config.max_length or model_config.max_position_embeddings
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    model = GeneCompassForPretraining(model_config)
    if tables:
        model.attach_knowledge(tables)
    encoder = model.genecompass

    # genes the corpus holds: the restricted ID head's classes
    corpus_genes = np.unique(np.asarray(corpus.genes[:]))
    corpus_genes = torch.as_tensor(corpus_genes.astype(np.int64))
    remap = torch.full((model_config.vocab_size,), -1, dtype=torch.long)
    remap[corpus_genes] = torch.arange(len(corpus_genes))

    dataset = CorpusDataset(corpus, max_length, species_token_ids=reference.species_token_ids)
    sampler = TokenBudgetBatchSampler(
        dataset.lengths, config.max_tokens, shuffle=True, seed=config.seed, rank=0, world_size=1,
        length_grouped=config.length_grouped, mega_batch_mult=config.mega_batch_mult,
        block_size=config.block_cells, grad_accum=1,
    )  # fmt: skip
    collator = MaskingCollator(
        reference, mlm_probability=config.mlm_probability, mask_ratio=config.mask_ratio,
        random_ratio=config.random_ratio, mask_value=model_config.mask_value, seed=config.seed,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collator.pad)

    # held-out cells
    held = Corpus.open(args.eval)
    labels_all = held.obs_labels(args.label_key).astype(str)
    eval_rows = stratified(labels_all, args.eval_cells)
    eval_set = CorpusDataset(held, max_length, species_token_ids=reference.species_token_ids)
    eval_items = [eval_set[int(i)] for i in eval_rows]
    eval_labels = labels_all[eval_rows]
    order = np.argsort([len(it["input_ids"]) for it in eval_items])

    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config.weight_decay), lr=config.lr, betas=config.adam_betas,
        eps=config.adam_eps,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))

    groups = {
        "layers": [p for n, p in model.named_parameters() if n.startswith("genecompass.layers")],
        "gene_embeddings": [encoder.embeddings.gene_embeddings.weight],
        "knowledge_proj": list(encoder.embeddings.knowledge_projections.parameters()),
        "fusion": list(encoder.embeddings.fusion.parameters()),
        "position": [encoder.embeddings.position_embeddings.weight],
    }
    initial_knowledge = [p.detach().clone() for p in groups["knowledge_proj"]]

    def losses(batch):
        hidden = encoder(batch["input_ids"], batch["values"], batch["attention_mask"]).last_hidden_state
        is_masked = batch["labels"] != IGNORE_INDEX
        masked = hidden[is_masked]
        transformed = model.id_transform(masked)
        weight, bias = model.id_decoder.weight, model.id_decoder.bias
        labels = batch["labels"][is_masked]
        full_logits = F.linear(transformed, weight, bias)
        species = torch.tensor(list(model_config.species_token_ids.values()))
        full_logits = full_logits.index_fill(-1, species, float("-inf"))
        id_full = F.cross_entropy(full_logits, labels)
        sub_logits = F.linear(transformed, weight[corpus_genes], bias[corpus_genes])
        id_corpus = F.cross_entropy(sub_logits, remap[labels])
        value_pred = model.value_decoder(model.value_transform(masked)).squeeze(-1)
        value = F.mse_loss(value_pred, batch["value_labels"][is_masked])
        id_loss = id_corpus if args.id_head == "corpus" else id_full
        return id_loss, id_full, id_corpus, value

    def grad_norms(batch) -> dict:
        out = {}
        id_loss, _, _, value = losses(batch)
        for name, term in (("id", id_w * id_loss), ("value", value_w * value)):
            model.zero_grad(set_to_none=True)
            term.backward(retain_graph=True)
            for group, params in groups.items():
                grads = [p.grad for p in params if p.grad is not None]
                norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)) if grads else 0.0
                out[f"{name}/{group}"] = float(norm)
        model.zero_grad(set_to_none=True)
        return out

    @torch.no_grad()
    def fusion_shares() -> dict:
        """Mean norm of each input part's contribution to the first fusion Linear, over held-out tokens."""
        emb = encoder.embeddings
        item = collator.pad([eval_items[i] for i in order[:64]])
        ids, vals = item["input_ids"][:, 1:], item["values"][:, 1:]
        mask = item["attention_mask"][:, 1:]
        gene = emb.gene_embeddings(ids)
        value = emb.value_encoder(vals) if emb.value_encoder is not None else vals.unsqueeze(-1)
        parts = {"gene_id": gene, "value": value}
        for table in emb.knowledge_tables:
            prior = F.embedding(ids, emb.knowledge(table))
            parts[f"knowledge:{table}"] = emb.knowledge_scale * emb.knowledge_projections[table](prior)
        W = emb.fusion[0].weight
        shares, start = {}, 0
        for name, part in parts.items():
            width = part.shape[-1]
            contribution = part @ W[:, start : start + width].T
            shares[name] = float(contribution.norm(dim=-1)[mask].mean())
            start += width
        return shares

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        species, mean = np.zeros((len(eval_items), model_config.hidden_size)), np.zeros(
            (len(eval_items), model_config.hidden_size)
        )
        for start in range(0, len(order), 32):
            rows = order[start : start + 32]
            batch = collator.pad([eval_items[i] for i in rows])
            out = encoder(batch["input_ids"], batch["values"], batch["attention_mask"])
            species[rows] = pool_cells(out.last_hidden_state, out.attention_mask, "species").numpy()
            mean[rows] = pool_cells(out.last_hidden_state, out.attention_mask, "mean").numpy()
        model.train()
        result = {}
        for name, x in (("species", species), ("mean", mean)):
            scores = knn_cv(x, eval_labels)
            result[f"{name}/knn_macro_f1"] = scores["knn_macro_f1"]
            result[f"{name}/mean_cosine"] = mean_pairwise_cosine(x)
            result[f"{name}/spread"] = float(x.std(0).mean() / (np.linalg.norm(x, axis=1).mean() + 1e-12))
        drift = [
            float((p - q).norm() / q.norm())
            for p, q in zip(groups["knowledge_proj"], initial_knowledge)
            if p.ndim >= 2
        ]
        result["knowledge_proj_rel_change"] = float(np.mean(drift)) if drift else None
        result.update({f"fusion/{k}": v for k, v in fusion_shares().items()})
        return result

    def batches():
        while True:
            yield from loader

    stream = batches()
    history, evals = [], []
    probe = collator.mask(next(iter(loader)), mask_generator(config.seed, 999, 0))
    t0 = time.perf_counter()
    tokens = 0
    ev = {"step": 0, **evaluate(), **grad_norms(probe)}
    evals.append(ev)
    print(json.dumps(ev), flush=True)
    model.train()
    for step in range(1, args.steps + 1):
        batch = collator.mask(next(stream), mask_generator(config.seed, 0, step))
        id_loss, id_full, id_corpus, value = losses(batch)
        loss = id_w * id_loss + value_w * value
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        else:
            total = torch.tensor(float("nan"))
        optimizer.step()
        scheduler.step()
        tokens += int(batch["attention_mask"].sum())
        row = {
            "step": step, "loss": loss.item(), "id_full": id_full.item(), "id_corpus": id_corpus.item(),
            "value": value.item(), "grad_norm": float(total), "lr": scheduler.get_last_lr()[0],
            "tokens": tokens, "elapsed": time.perf_counter() - t0,
        }  # fmt: skip
        history.append(row)
        if step % 10 == 0:
            print(json.dumps(row), flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            ev = {"step": step, **evaluate(), **grad_norms(probe)}
            evals.append(ev)
            print(json.dumps(ev), flush=True)
    if args.save:
        from genecompass.run import quiet_transformers, write_run_info

        model_dir = Path(args.save) / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            model.save_pretrained(model_dir)
        write_run_info(model_dir, corpus, reference, max_length=max_length)
    result = {
        "args": vars(args),
        "config": config.to_dict(),
        "id_weight": id_w,
        "value_weight": value_w,
        "n_corpus_genes": int(len(corpus_genes)),
        "vocab_size": model_config.vocab_size,
        "chance_id_full": math.log(model_config.vocab_size - len(model_config.species_token_ids)),
        "chance_id_corpus": math.log(len(corpus_genes)),
        "history": history,
        "evals": evals,
        "tokens_per_s": tokens / (time.perf_counter() - t0),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
