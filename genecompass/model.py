"""The GeneCompass model: a BERT-style encoder over ranked genes with a knowledge-informed input embedding.

A cell is a sequence ``[<species>, g_1, …, g_n]`` of token ids (genes ranked by normalised expression, most
expressed first) with one value per token (``log2(1 + x / median)``; 0 for the species token; the mask
sentinel at masked genes). Each token's input vector is built from

    gene-ID embedding ⊕ value encoding ⊕ Linear_k(knowledge_k[token])  for each enabled knowledge table k
    → concat → MLP to hidden → + rank-position embedding → LayerNorm → dropout

and goes through a post-LayerNorm transformer encoder using ``scaled_dot_product_attention``. The species
token is an ordinary token at position 0 (its own ID embedding, value 0, zero knowledge), so it receives the
position embedding, LayerNorm and dropout like every gene (the original prepended it after the embedding
layer: its bug #9). The original GeneCompass architecture is a configuration of this model
(``species_embedding="prepended"``, ``value_encoding="scalar"``, ``fusion_activation="quick_gelu"``,
``type_vocab_size=2``, ``knowledge_lookup="homologous"``; see ``formats.py``). Knowledge tables are
frozen, non-persistent buffers: they never receive gradients and are never written into checkpoints; a
model re-attaches them from its knowledge directory, checked by hash.

Classes: ``GeneCompassConfig``, ``GeneCompassModel``, ``GeneCompassForPretraining`` (ID + value heads, logits
only at masked positions), ``GeneCompassForCellClassification``, ``GeneCompassForGeneClassification``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configs import MODEL_PRESETS
from .errors import FormatError, InputError, ReferenceMismatchError
from .knowledge import KNOWLEDGE_TABLES, MANIFEST_NAME, load_knowledge
from .run import KNOWLEDGE_BESIDE_WEIGHTS, REFERENCE_BESIDE_WEIGHTS

IGNORE_INDEX = -100  # label of positions that carry no loss (PyTorch's cross-entropy default)
VALUE_ENCODINGS = ("mlp", "scalar")
CELL_EMBEDDINGS = ("species", "mean")
SPECIES_EMBEDDINGS = ("token", "prepended")
FUSION_ACTIVATIONS = ("gelu", "quick_gelu")
KNOWLEDGE_LOOKUPS = ("token", "homologous")


class GeneCompassConfig(PretrainedConfig):
    """Everything needed to rebuild a GeneCompass model (and its heads) from ``config.json``."""

    model_type = "genecompass"

    vocab_size: int = 4  # set from the gene reference; the default holds only the special tokens
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 2049  # top-2048 genes + the species token
    hidden_dropout_prob: float = 0.02  # the original's value (low: the corpus is large, the task hard)
    attention_probs_dropout_prob: float = 0.02  # > 0 makes SDPA use its math path on CPU; 0 is ~2x faster
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    # "mlp": continuous-value encoder (clamped scalar → MLP; masked values get a learned vector), which fixes
    # the original's unbounded raw-scalar input (bug #6). "scalar": the raw value as one input column, for
    # parity with released GeneCompass checkpoints.
    value_encoding: str = "mlp"
    # Upper clamp of the value fed to the "mlp" encoder. log2(1 + x/median) = 16 is 65,000x the gene's median,
    # beyond anything a measured cell shows; in-silico overexpression cannot push the input off-distribution.
    value_clamp_max: float = 16.0
    mask_value: float = -1.0  # value given to masked genes (the original's sentinel; outside the value range)

    # How the species token enters. "token": an ordinary token at position 0 (its ID embedding, value 0, no
    # knowledge) that gets the position embedding, LayerNorm and dropout like every gene. "prepended": the
    # original GeneCompass (its bug #9, kept for parity): the species token's ID-embedding row is prepended
    # after the embedding LayerNorm, untouched; genes take positions 0..L-1.
    species_embedding: str = "token"
    # Activation and LayerNorm eps inside the fusion MLP; the original uses QuickGELU (x·σ(1.702x)) and
    # nn.LayerNorm's default eps 1e-5. None: layer_norm_eps.
    fusion_activation: str = "gelu"
    fusion_layer_norm_eps: float | None = None
    # BERT's token-type embeddings (the original keeps them: row 0 is added to every gene). 0: none.
    type_vocab_size: int = 0
    # Scale of the projected knowledge vectors before fusion (the original's emb_warmup.alpha).
    knowledge_scale: float = 1.0
    # "token": knowledge rows are looked up by token id. "homologous": the original's separate human and
    # mouse tokens; mouse cells look knowledge up through their human homologue's token
    # (``embeddings.homologous_index``, a persistent buffer saved with the weights).
    knowledge_lookup: str = "token"

    # Knowledge tables in use (a subset of KNOWLEDGE_TABLES, concatenated in that order), their widths and the
    # sha256 of each table file, so a loaded model refuses tables other than the ones it was trained with.
    knowledge_tables: list[str] = field(default_factory=list)
    knowledge_dims: dict[str, int] = field(default_factory=dict)
    knowledge_sha256: dict[str, str] = field(default_factory=dict)
    knowledge_dir: str | None = None  # where the tables were loaded from; from_pretrained re-attaches them

    # 0: the ID head scores every token of the vocabulary (the paper). K > 0: only the K genes in the
    # persistent buffer ``id_head_index`` of GeneCompassForPretraining (sorted token ids; `gc pretrain` with
    # ``id_head: corpus`` fills it with the corpus's genes): a K-way softmax, 6x cheaper for PBMC3k + Kang.
    id_head_size: int = 0
    id_loss_weight: float = 0.2  # the original's weights; the paper's beta
    value_loss_weight: float = 0.8

    pad_token_id: int = 0
    mask_token_id: int = 1
    species_token_ids: dict[str, int] = field(default_factory=lambda: {"human": 2, "mouse": 3})
    reference_hash: str = ""  # gene reference the token ids belong to

    # "mean": the mean over gene positions; "species": the output at the species token (the paper). Mean is
    # the default because masked-gene pre-training sends no loss to position 0: its output stays nearly the
    # same for every cell (bench/RESULTS.md, "Pre-training diagnosis").
    cell_embedding: str = "mean"
    classifier_dropout: float | None = None  # None: use hidden_dropout_prob
    tie_word_embeddings: bool = True  # the ID decoder shares the gene-ID embedding matrix

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        def fail(message: str) -> None:
            raise InputError(f"invalid GeneCompass config: {message}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            fail(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.species_embedding not in SPECIES_EMBEDDINGS:
            fail(
                f"species_embedding {self.species_embedding!r} is not one of {', '.join(SPECIES_EMBEDDINGS)}"
            )
        if self.fusion_activation not in FUSION_ACTIVATIONS:
            fail(
                f"fusion_activation {self.fusion_activation!r} is not one of {', '.join(FUSION_ACTIVATIONS)}"
            )
        if self.knowledge_lookup not in KNOWLEDGE_LOOKUPS:
            fail(f"knowledge_lookup {self.knowledge_lookup!r} is not one of {', '.join(KNOWLEDGE_LOOKUPS)}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 0:
            fail(f"type_vocab_size must be a non-negative integer, got {self.type_vocab_size!r}")
        if self.max_sequence_length < 2:
            fail("max_position_embeddings must leave room for the species token and at least one gene")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                fail(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.value_encoding not in VALUE_ENCODINGS:
            fail(f"value_encoding {self.value_encoding!r} is not one of {', '.join(VALUE_ENCODINGS)}")
        if self.value_clamp_max <= 0:
            fail(f"value_clamp_max must be positive, got {self.value_clamp_max!r}")
        if not isinstance(self.id_head_size, int) or not 0 <= self.id_head_size <= self.vocab_size:
            fail(f"id_head_size must be an integer in [0, vocab_size], got {self.id_head_size!r}")
        if self.cell_embedding not in CELL_EMBEDDINGS:
            fail(f"cell_embedding {self.cell_embedding!r} is not one of {', '.join(CELL_EMBEDDINGS)}")
        unknown = [t for t in self.knowledge_tables if t not in KNOWLEDGE_TABLES]
        if unknown:
            fail(f"unknown knowledge tables {unknown}; expected a subset of {', '.join(KNOWLEDGE_TABLES)}")
        if len(set(self.knowledge_tables)) != len(self.knowledge_tables):
            fail(f"knowledge_tables lists a table twice: {self.knowledge_tables}")
        for table in self.knowledge_tables:
            dim = self.knowledge_dims.get(table)
            if not isinstance(dim, int) or dim < 1:
                fail(f"knowledge table {table!r} is enabled but knowledge_dims has no positive width for it")
        if (
            self.id_loss_weight < 0
            or self.value_loss_weight < 0
            or (self.id_loss_weight + self.value_loss_weight == 0)
        ):
            fail("loss weights must be non-negative and not both zero")
        special = [self.pad_token_id, self.mask_token_id, *self.species_token_ids.values()]
        if len(set(special)) != len(special):
            fail(
                f"special token ids collide: pad {self.pad_token_id}, mask {self.mask_token_id}, "
                f"species {self.species_token_ids}"
            )
        if any(not 0 <= t < self.vocab_size for t in special):
            fail(f"special token ids {special} must lie inside the vocabulary (size {self.vocab_size})")

    @property
    def max_sequence_length(self) -> int:
        """Longest input, species token included: with a prepended species token it takes no position."""
        return self.max_position_embeddings + (self.species_embedding == "prepended")

    @property
    def special_token_ids(self) -> list[int]:
        return [self.pad_token_id, self.mask_token_id, *self.species_token_ids.values()]

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GeneCompassConfig:
        """A config of size ``tiny``, ``small`` or ``base``; any field can be overridden."""
        if name not in MODEL_PRESETS:
            raise InputError(f"unknown model preset {name!r}; expected one of {', '.join(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------------------
# Building blocks


class ValueEncoder(nn.Module):
    """Continuous expression value → vector: clamp to [0, value_clamp_max], Linear(1, H) → GELU → Linear.
    Masked genes (value == mask_value) get one learned vector instead, so the sentinel never has to be
    interpreted as an expression level."""

    def __init__(self, config: GeneCompassConfig):
        super().__init__()
        self.clamp_max = config.value_clamp_max
        self.mask_value = config.mask_value
        self.mlp = nn.Sequential(
            nn.Linear(1, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
        )
        self.mask_embedding = nn.Parameter(torch.zeros(config.hidden_size))

    def forward(self, values: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, H)
        is_masked = (values == self.mask_value).unsqueeze(-1)
        encoded = self.mlp(values.clamp(0.0, self.clamp_max).unsqueeze(-1))
        return torch.where(is_masked, self.mask_embedding.to(encoded.dtype), encoded)


class QuickGELU(nn.Module):
    """x·σ(1.702x): CLIP's GELU approximation, the original GeneCompass fusion activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class GeneCompassEmbeddings(nn.Module):
    """Token ids + values → input vectors (see the module docstring for the recipe)."""

    def __init__(self, config: GeneCompassConfig):
        super().__init__()
        hidden = config.hidden_size
        self.vocab_size = config.vocab_size
        self.special_token_ids = config.special_token_ids
        self.gene_embeddings = nn.Embedding(config.vocab_size, hidden, padding_idx=config.pad_token_id)
        self.value_encoder = ValueEncoder(config) if config.value_encoding == "mlp" else None
        value_width = hidden if self.value_encoder is not None else 1
        self.knowledge_tables = list(config.knowledge_tables)
        for table in self.knowledge_tables:
            # Placeholder (0 rows) until attach_knowledge; non-persistent: never saved in a state dict.
            self.register_buffer(
                f"knowledge_{table}", torch.zeros(0, config.knowledge_dims[table]), persistent=False
            )
        self.knowledge_projections = nn.ModuleDict(
            {table: nn.Linear(config.knowledge_dims[table], hidden) for table in self.knowledge_tables}
        )
        self.knowledge_scale = config.knowledge_scale
        if config.knowledge_lookup == "homologous":
            # token → the token whose knowledge rows a mouse cell reads (identity but for mouse genes)
            self.register_buffer("homologous_index", torch.arange(config.vocab_size))
        else:
            self.homologous_index = None
        self.mouse_token_id = config.species_token_ids.get("mouse")
        fused_width = hidden + value_width + hidden * len(self.knowledge_tables)
        fusion_eps = config.fusion_layer_norm_eps
        self.fusion = nn.Sequential(
            nn.Linear(fused_width, hidden),
            nn.LayerNorm(hidden, eps=config.layer_norm_eps if fusion_eps is None else fusion_eps),
            QuickGELU() if config.fusion_activation == "quick_gelu" else nn.GELU(),
            nn.Linear(hidden, hidden),
        )
        self.prepend_species = config.species_embedding == "prepended"
        self.max_length = config.max_sequence_length
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = (
            nn.Embedding(config.type_vocab_size, hidden) if config.type_vocab_size else None
        )
        self.layer_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def knowledge(self, table: str) -> torch.Tensor:
        return getattr(self, f"knowledge_{table}")

    @property
    def knowledge_attached(self) -> bool:
        return all(self.knowledge(t).shape[0] == self.vocab_size for t in self.knowledge_tables)

    @torch.no_grad()
    def attach_knowledge(self, tables: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Install frozen tables ``{name: (embedding [V, dim], covered [V])}``; rows not covered and the
        special tokens' rows are zero, so <pad>, <mask> and the species tokens carry no knowledge."""
        for table in self.knowledge_tables:
            if table not in tables:
                raise FormatError(f"the model needs knowledge table {table!r}, which was not provided")
            embedding, covered = tables[table]
            expected = (self.vocab_size, self.knowledge(table).shape[1])
            if tuple(embedding.shape) != expected:
                raise FormatError(
                    f"knowledge table {table!r} has shape {tuple(embedding.shape)}, the model expects "
                    f"{expected}"
                )
            buffer = self.knowledge(table)
            embedding = embedding.to(device=buffer.device, dtype=buffer.dtype).clone()
            embedding[~covered.to(embedding.device)] = 0.0
            embedding[self.special_token_ids] = 0.0
            setattr(self, f"knowledge_{table}", embedding)

    def forward(self, input_ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:  # (B, T) → (B, T, H)
        if input_ids.shape[1] > self.max_length:
            raise InputError(
                f"sequence of {input_ids.shape[1]} tokens exceeds the model's {self.max_length} (species "
                "token included); truncate cells to fewer genes"
            )
        if not self.knowledge_attached:
            raise FormatError(
                f"the model uses knowledge tables {self.knowledge_tables} but none are attached; load it "
                "with from_pretrained(..., knowledge_dir=DIR) or call attach_knowledge"
            )
        knowledge_ids = input_ids
        if self.homologous_index is not None:
            is_mouse = input_ids[:, :1] == self.mouse_token_id  # (B, 1): the species token says
            knowledge_ids = torch.where(is_mouse, self.homologous_index[input_ids], input_ids)
        if not self.prepend_species:
            return self._embed(input_ids, values, knowledge_ids)
        species = self.gene_embeddings(input_ids[:, :1])  # (B, 1, H): no position, LayerNorm or dropout
        genes = self._embed(input_ids[:, 1:], values[:, 1:], knowledge_ids[:, 1:])  # (B, T-1, H)
        return torch.cat([species, genes], dim=1)

    def _embed(
        self, input_ids: torch.Tensor, values: torch.Tensor, knowledge_ids: torch.Tensor
    ) -> torch.Tensor:  # (B, T) → (B, T, H), positions 0..T-1
        gene = self.gene_embeddings(input_ids)  # (B, T, H)
        values = values.to(gene.dtype)
        value = self.value_encoder(values) if self.value_encoder is not None else values.unsqueeze(-1)
        parts = [gene, value]
        for table in self.knowledge_tables:
            prior = F.embedding(knowledge_ids, self.knowledge(table))  # (B, T, dim), frozen: a buffer
            projected = self.knowledge_projections[table](prior)  # (B, T, H)
            parts.append(projected if self.knowledge_scale == 1.0 else self.knowledge_scale * projected)
        embedded = self.fusion(torch.cat(parts, dim=-1))  # (B, T, H)
        if self.token_type_embeddings is not None:
            embedded = embedded + self.token_type_embeddings.weight[0]  # every gene is of type 0
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.dropout(self.layer_norm(embedded + self.position_embeddings(positions)))


class SelfAttention(nn.Module):
    def __init__(self, config: GeneCompassConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        # x (B, T, H); key_mask (B, 1, 1, T) bool, True where a key may be attended to.
        batch, length, hidden = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, head_dim)
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.dropout_p if self.training else 0.0
        )  # (B, heads, T, head_dim)
        return self.out(attended.transpose(1, 2).reshape(batch, length, hidden))


class EncoderLayer(GradientCheckpointingLayer):
    """Post-LayerNorm transformer block (BERT): x = LN(x + attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: GeneCompassConfig):
        super().__init__()
        self.attention = SelfAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            nn.GELU(),
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
        self.feed_forward_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention(x, key_mask)))
        return self.feed_forward_norm(x + self.dropout(self.feed_forward(x)))


class PredictionTransform(nn.Module):
    """BERT's head transform: Linear → GELU → LayerNorm."""

    def __init__(self, config: GeneCompassConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


# --------------------------------------------------------------------------------------------------------
# Outputs


@dataclass
class GeneCompassOutput(ModelOutput):
    """last_hidden_state (B, T, H); hidden_states: embeddings + each layer's output when requested;
    attention_mask (B, T) bool, the mask that was used."""

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attention_mask: torch.Tensor | None = None


@dataclass
class GeneCompassPretrainingOutput(ModelOutput):
    """Losses are means over masked genes (or sums / num_items_in_batch when given). ``id_logits`` (N, V) and
    ``value_predictions`` (N,) exist only for the N masked positions, listed by ``masked_positions`` (N, 2)
    as (row, column) pairs."""

    loss: torch.Tensor | None = None
    id_loss: torch.Tensor | None = None
    value_loss: torch.Tensor | None = None
    n_masked: int | None = None
    id_logits: torch.Tensor | None = None
    value_predictions: torch.Tensor | None = None
    masked_positions: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


@dataclass
class GeneCompassClassifierOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None  # what the classifier saw: (B, H) cells or (B, T, H) genes


# --------------------------------------------------------------------------------------------------------
# Models


class GeneCompassPreTrainedModel(PreTrainedModel):
    config_class = GeneCompassConfig
    config: GeneCompassConfig
    base_model_prefix = "genecompass"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ValueEncoder):
            init.normal_(module.mask_embedding, mean=0.0, std=self.config.initializer_range)

    # -- knowledge -------------------------------------------------------------------------------------
    def _embeddings(self) -> GeneCompassEmbeddings:
        return self.genecompass.embeddings if hasattr(self, "genecompass") else self.embeddings

    def attach_knowledge(self, tables: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self._embeddings().attach_knowledge(tables)

    def load_knowledge(self, knowledge_dir: str | Path | None = None) -> None:
        """Attach the frozen tables from ``knowledge_dir`` (default: the one recorded in the config), checking
        the reference hash and that each table is byte-identical to the one used at training time."""
        if not self.config.knowledge_tables:
            return
        beside = Path(getattr(self, "name_or_path", "") or ".") / KNOWLEDGE_BESIDE_WEIGHTS
        if knowledge_dir is None and self.config.knowledge_dir is None and (beside / MANIFEST_NAME).is_file():
            knowledge_dir = beside  # an imported run keeps its checkpoint's tables beside the weights
        directory = knowledge_dir or self.config.knowledge_dir
        if directory is None:
            raise FormatError(
                f"this model uses knowledge tables {self.config.knowledge_tables}; pass knowledge_dir=DIR "
                "(the directory built by `gc knowledge build` that it was trained with)"
            )
        tables = load_knowledge(
            directory,
            self.config.reference_hash,
            self.config.knowledge_tables,
            expected_sha256=self.config.knowledge_sha256 or None,
        )
        self.attach_knowledge(tables)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *args: Any,
        knowledge_dir: str | Path | None = None,
        reference_hash: str | None = None,
        **kwargs: Any,
    ):
        """``PreTrainedModel.from_pretrained`` plus re-attaching the knowledge tables (from ``knowledge_dir``
        or the directory recorded in the config). With ``reference_hash``, refuse a model built for another
        gene reference."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if reference_hash is not None and model.config.reference_hash != reference_hash:
            raise ReferenceMismatchError(
                f"{pretrained_model_name_or_path}: model built for reference {model.config.reference_hash}, "
                f"expected {reference_hash}"
            )
        model.load_knowledge(knowledge_dir)
        return model

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained`` (safetensors, knowledge excluded) plus a copy of the knowledge
        manifest, so the exported directory says which tables (by sha256) it needs."""
        super().save_pretrained(save_directory, *args, **kwargs)
        source = Path(getattr(self, "name_or_path", "") or ".")
        if source.resolve() != Path(save_directory).resolve():
            # an imported run's own gene reference and knowledge tables travel with its weights
            for beside in (REFERENCE_BESIDE_WEIGHTS, KNOWLEDGE_BESIDE_WEIGHTS):
                if (source / beside).is_dir():
                    shutil.copytree(source / beside, Path(save_directory) / beside, dirs_exist_ok=True)
        if self.config.knowledge_dir:
            manifest = Path(self.config.knowledge_dir) / MANIFEST_NAME
            if manifest.is_file():
                shutil.copyfile(manifest, Path(save_directory) / MANIFEST_NAME)


class GeneCompassModel(GeneCompassPreTrainedModel):
    """The encoder: ``(input_ids, values[, attention_mask]) → hidden states``."""

    def __init__(self, config: GeneCompassConfig):
        super().__init__(config)
        self.embeddings = GeneCompassEmbeddings(config)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.gene_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings.gene_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **kwargs: Any,
    ) -> GeneCompassOutput:
        """input_ids (B, T) long, values (B, T) float, attention_mask (B, T) (default: ids != <pad>)."""
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        attention_mask = attention_mask.bool()
        key_mask = attention_mask[:, None, None, :]  # (B, 1, 1, T): broadcast over heads and queries
        hidden = self.embeddings(input_ids, values)  # (B, T, H)
        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.layers:
            hidden = layer(hidden, key_mask)
            if all_hidden is not None:
                all_hidden.append(hidden)
        return GeneCompassOutput(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            attention_mask=attention_mask,
        )

    def get_cell_embeddings(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        method: str | None = None,
    ) -> torch.Tensor:
        """One vector per cell (B, H): the species token's output (``"species"``, the paper) or the mean over
        gene positions (``"mean"``); default ``config.cell_embedding``."""
        output = self(input_ids, values, attention_mask)
        method = method or self.config.cell_embedding
        return pool_cells(output.last_hidden_state, output.attention_mask, method)

    def get_gene_outputs(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-gene outputs without the species token: (hidden (B, T-1, H), gene ids (B, T-1), mask (B, T-1)).
        Average by gene id across cells (never by position) to get gene embeddings."""
        output = self(input_ids, values, attention_mask)
        return output.last_hidden_state[:, 1:], input_ids[:, 1:], output.attention_mask[:, 1:]


def pool_cells(hidden: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
    """(B, T, H) → (B, H): the species token (position 0) or the mean of real gene positions."""
    if method == "species":
        return hidden[:, 0]
    if method == "mean":
        genes = attention_mask[:, 1:].unsqueeze(-1).to(hidden.dtype)  # (B, T-1, 1)
        return (hidden[:, 1:] * genes).sum(1) / genes.sum(1).clamp(min=1.0)
    raise InputError(f"cell embedding method {method!r} is not one of {', '.join(CELL_EMBEDDINGS)}")


class GeneCompassForPretraining(GeneCompassPreTrainedModel):
    """Masked-gene pre-training: predict each masked gene's ID (cross-entropy over the vocabulary, decoder
    tied to the gene-ID embedding) and its value (MSE); loss = w_id · CE + w_value · MSE."""

    _tied_weights_keys = {"id_decoder.weight": "genecompass.embeddings.gene_embeddings.weight"}

    def __init__(self, config: GeneCompassConfig):
        super().__init__(config)
        self.genecompass = GeneCompassModel(config)
        self.id_transform = PredictionTransform(config)
        self.id_decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.value_transform = PredictionTransform(config)
        self.value_decoder = nn.Linear(config.hidden_size, 1)
        if config.id_head_size:
            self.register_buffer("id_head_index", torch.zeros(config.id_head_size, dtype=torch.long))
        else:
            self.id_head_index = None
        self.post_init()

    @torch.no_grad()
    def restrict_id_head(self, token_ids) -> None:
        """Score only these genes in the ID head (``config.id_head_size`` of them; stored sorted)."""
        index = torch.tensor([int(t) for t in token_ids], dtype=torch.long).unique()  # sorted
        if self.id_head_index is None or len(index) != len(self.id_head_index):
            raise InputError(
                f"restrict_id_head got {len(index)} distinct genes, the config's id_head_size is "
                f"{self.config.id_head_size}"
            )
        if int(index.min()) < 0 or int(index.max()) >= self.config.vocab_size:
            raise InputError("restrict_id_head: token ids outside the vocabulary")
        self.id_head_index.copy_(index.to(self.id_head_index.device))

    def get_output_embeddings(self) -> nn.Linear:
        return self.id_decoder

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.id_decoder = value

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        value_labels: torch.Tensor | None = None,
        num_items_in_batch: float | torch.Tensor | None = None,
        **kwargs: Any,
    ) -> GeneCompassPretrainingOutput:
        """``labels`` (B, T): the true gene id at masked positions, -100 elsewhere; ``value_labels`` (B, T):
        the true value there. ``num_items_in_batch``: divide the summed losses by this instead of the local
        number of masked genes (the trainer passes the global count so that ranks and accumulation steps weigh
        every masked gene equally)."""
        hidden = self.genecompass(input_ids, values, attention_mask).last_hidden_state  # (B, T, H)
        if labels is None:
            return GeneCompassPretrainingOutput(last_hidden_state=hidden)
        if value_labels is None:
            raise InputError("value_labels are required with labels (the true values of the masked genes)")
        is_masked = labels != IGNORE_INDEX  # (B, T)
        masked_hidden = hidden[is_masked]  # (N, H): gather first, so logits exist only where needed
        id_targets = labels[is_masked]
        if self.id_head_index is None:
            id_logits = self.id_decoder(self.id_transform(masked_hidden))  # (N, V)
            # A masked position always holds a gene: the species tokens are never an answer.
            species = torch.tensor(list(self.config.species_token_ids.values()), device=id_logits.device)
            id_logits = id_logits.index_fill(-1, species, float("-inf"))
        else:  # (N, K): only the head's genes; targets become positions in id_head_index
            index = self.id_head_index
            weight, bias = self.id_decoder.weight[index], self.id_decoder.bias[index]
            id_logits = F.linear(self.id_transform(masked_hidden), weight, bias)
            position = torch.searchsorted(index, id_targets).clamp(max=len(index) - 1)
            id_targets = torch.where(index[position] == id_targets, position, IGNORE_INDEX)
        value_predictions = self.value_decoder(self.value_transform(masked_hidden)).squeeze(-1)  # (N,)
        n_masked = int(is_masked.sum())
        id_sum = F.cross_entropy(id_logits.float(), id_targets, reduction="sum")
        value_sum = F.mse_loss(value_predictions.float(), value_labels[is_masked].float(), reduction="sum")
        denominator = num_items_in_batch if num_items_in_batch is not None else max(n_masked, 1)
        id_loss, value_loss = id_sum / denominator, value_sum / denominator
        loss = self.config.id_loss_weight * id_loss + self.config.value_loss_weight * value_loss
        return GeneCompassPretrainingOutput(
            loss=loss,
            id_loss=id_loss,
            value_loss=value_loss,
            n_masked=n_masked,
            id_logits=id_logits,
            value_predictions=value_predictions,
            masked_positions=is_masked.nonzero(),
            last_hidden_state=hidden,
        )


# Loading a pre-training checkpoint into a classifier drops the pre-training heads; that is expected.
_PRETRAINING_HEADS = [
    r"^id_transform\.", r"^id_decoder\.", r"^value_transform\.", r"^value_decoder\.", r"^id_head_index$"
]


class GeneCompassForCellClassification(GeneCompassPreTrainedModel):
    """Cell-level labels (e.g. cell type) from the cell embedding (``config.cell_embedding``)."""

    _keys_to_ignore_on_load_unexpected = _PRETRAINING_HEADS

    def __init__(self, config: GeneCompassConfig):
        super().__init__(config)
        self.genecompass = GeneCompassModel(config)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> GeneCompassClassifierOutput:
        """labels (B,) class indices."""
        output = self.genecompass(input_ids, values, attention_mask)
        cells = pool_cells(output.last_hidden_state, output.attention_mask, self.config.cell_embedding)
        logits = self.classifier(self.dropout(cells))  # (B, num_labels)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return GeneCompassClassifierOutput(loss=loss, logits=logits, embeddings=cells)


class GeneCompassForGeneClassification(GeneCompassPreTrainedModel):
    """Gene-level labels (e.g. dosage sensitivity) from each gene token's output."""

    _keys_to_ignore_on_load_unexpected = _PRETRAINING_HEADS

    def __init__(self, config: GeneCompassConfig):
        super().__init__(config)
        self.genecompass = GeneCompassModel(config)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> GeneCompassClassifierOutput:
        """labels (B, T): class index per token, -100 where there is none (species token, padding, unlabelled
        genes)."""
        hidden = self.genecompass(input_ids, values, attention_mask).last_hidden_state  # (B, T, H)
        logits = self.classifier(self.dropout(hidden))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        return GeneCompassClassifierOutput(loss=loss, logits=logits, embeddings=hidden)


# --------------------------------------------------------------------------------------------------------
# Introspection


def parameter_counts(model: nn.Module) -> dict[str, Any]:
    """Trainable and frozen parameter counts, by component, for ``gc model info``.

    Frozen knowledge tables count as frozen (vocab_size x dim each, from the config, whether attached or not).
    """
    config = getattr(model, "config", None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_params = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    knowledge = 0
    if isinstance(config, GeneCompassConfig):
        knowledge = sum(config.vocab_size * config.knowledge_dims[t] for t in config.knowledge_tables)

    components: dict[str, int] = {}
    seen: set[int] = set()  # tied weights count once, under the first component that owns them
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        parts = name.split(".")
        if parts[0] == "genecompass":
            parts = parts[1:]
        if parts[0] == "embeddings":
            component = f"embeddings.{parts[1]}"
        elif parts[0] == "layers":
            component = "encoder"
        else:
            component = "head"
        components[component] = components.get(component, 0) + parameter.numel()
    if knowledge:
        components["knowledge_tables (frozen)"] = knowledge
    return {
        "trainable": trainable,
        "frozen": frozen_params + knowledge,
        "total": trainable + frozen_params + knowledge,
        "by_component": components,
    }
