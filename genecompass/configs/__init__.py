"""Pre-training presets (``tiny.yaml``, ``small.yaml``, ``base.yaml``), read by
``genecompass.train.PretrainConfig``, and the model sizes they name (torch-free, so configs are checked
before the model stack is imported)."""

from __future__ import annotations

# Model sizes. `small` is the paper's ablation size (and Geneformer's); `base` is the released GeneCompass.
# Positions: top-k genes plus one for the species token at position 0.
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(
        num_hidden_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=513,
    ),
    "small": dict(
        num_hidden_layers=6,
        hidden_size=256,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=2049,
    ),
    "base": dict(
        num_hidden_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=3072,
        max_position_embeddings=2049,
    ),
}

