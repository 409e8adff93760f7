"""The corpus-restricted ID head (``id_head: corpus``): the same cross-entropy as the full head over the
restricted genes, trained by `gc pretrain`, exported and reloaded with its gene list."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F


def _tiny(**overrides):
    from genecompass.model import GeneCompassConfig, GeneCompassForPretraining

    config = GeneCompassConfig.from_preset(
        "tiny", vocab_size=60, max_position_embeddings=17, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    return GeneCompassForPretraining(config).eval()


def test_restricted_head_is_the_softmax_over_its_genes():
    from genecompass.errors import InputError

    genes = np.arange(10, 40)
    model = _tiny(id_head_size=len(genes))
    with pytest.raises(InputError):
        model.restrict_id_head(genes[:5])
    model.restrict_id_head(genes[::-1])  # any order: stored sorted
    assert model.id_head_index.tolist() == genes.tolist()
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(np.concatenate([[[2]] * 4, rng.choice(genes, (4, 12))], axis=1))
    values = torch.rand(ids.shape)
    values[:, 0] = 0
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    labels[:, 7] = ids[:, 7]
    masked_ids = ids.clone()
    masked_ids[labels != -100] = 1
    out = model(masked_ids, values, labels=labels, value_labels=values)
    assert out.id_logits.shape == (8, len(genes))
    hidden = model.genecompass(masked_ids, values).last_hidden_state[labels != -100]
    full = model.id_decoder(model.id_transform(hidden))  # (8, V)
    targets = torch.searchsorted(torch.as_tensor(genes), labels[labels != -100])
    expected = F.cross_entropy(full[:, genes], targets)
    assert out.id_loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_pretrain_with_corpus_id_head(tmp_path, pbmc3k_corpus):
    from genecompass.corpus import Corpus
    from genecompass.model import GeneCompassForPretraining
    from genecompass.reference import load_reference
    from genecompass.run import load_run
    from genecompass.train import PretrainConfig, corpus_gene_tokens, pretrain

    config = PretrainConfig.load("tiny").replace(
        max_steps=3, max_length=33, max_tokens=512, warmup_steps=1, log_every=1, save_every=100,
        id_head="corpus",
    )
    summary = pretrain(pbmc3k_corpus, config, tmp_path / "run", overwrite=True)
    assert np.isfinite(summary["loss"])
    genes = corpus_gene_tokens(Corpus.open(pbmc3k_corpus), load_reference())
    assert 10_000 < len(genes) < 40_000
    model = GeneCompassForPretraining.from_pretrained(tmp_path / "run" / "model")
    assert model.config.id_head_size == len(genes) and model.id_head_index.tolist() == genes.tolist()
    assert load_run(tmp_path / "run").model.config.id_head_size == len(genes)  # the encoder loads too
