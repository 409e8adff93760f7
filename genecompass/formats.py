"""Published GeneCompass checkpoints ↔ gc runs.

The original code (xCompass-AI/GeneCompass, commit 8323757) saves a transformers-4.30 ``BertForMaskedLM``
folder: ``config.json`` (a BertConfig plus ``use_values``, ``use_promoter``, ``use_co_exp``,
``use_gene_family``, ``use_peca_grn``, ``use_cls_token``, ``warmup_steps``, ``emb_warmup_steps``) and
``pytorch_model.bin``, with its token dictionary (``{Ensembl ID: token, '<pad>', '<mask>'}``) and gene
median dictionary as pickles beside it. ``import_genecompass`` turns that into an ordinary gc run:

    RUN/model/config.json, model.safetensors   gc's model, configured as the original architecture
    RUN/model/reference/                       a gene reference bundle whose vocabulary is the checkpoint's
                                               token dictionary (+ <human>, <mouse> appended), with gc's
                                               gene tables, symbols, aliases and orthologs
    RUN/model/knowledge/                       the four frozen knowledge tables taken from the checkpoint
    RUN/model/medians.tsv, gc_run.json         the original's normalisation (no library-size scaling)

so every gc command (tokenize, embed, finetune, predict, perturb, grn, pretrain --init) works on it.
``export_genecompass`` writes the original's layout back.

What maps where (original key → gc parameter):
- ``bert.embeddings.word_embeddings`` [V, H] → gene embeddings rows 0..V-1; ``bert.cls_embedding`` [2, H]
  → rows V (<human>) and V+1 (<mouse>): the species token's embedding is its ID-embedding row, prepended
  after the embedding LayerNorm (``species_embedding="prepended"``).
- ``{promoter,co_exp,gene_family,peca_grn}_knowledge`` buffers → knowledge tables promoter,
  coexpression, gene_family, grn (the original's concatenation order is kept in the config);
  ``homologous_index`` → ``embeddings.homologous_index``; ``emb_warmup.alpha`` → ``knowledge_scale``.
- ``concat_embeddings.cat_fc / cat_ln / cat_proj`` → ``fusion.0 / 1 / 3`` (QuickGELU between).
- ``encoder.layer.N.attention.self.{query,key,value}`` → ``layers.N.attention.qkv`` (stacked).
- ``cls.predictions`` (decoder tied to the word embeddings) → ID head; ``cls4value.predictions`` → value
  head.

Pickles from elsewhere go through a restricted unpickler that builds only dicts of str → int/float
(NumPy number scalars included); weights are read with ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, InputError, OutputExistsError

# The original's knowledge tables, in its concatenation order, and gc's names for them.
ORIGINAL_KNOWLEDGE = {"promoter": "promoter", "co_exp": "coexpression", "gene_family": "gene_family",
                      "peca_grn": "grn"}
_USE_FLAG = {"promoter": "use_promoter", "co_exp": "use_co_exp", "gene_family": "use_gene_family",
             "peca_grn": "use_peca_grn"}
_KNOWLEDGE_DESCRIPTION = {
    "promoter": "promoter sequence embeddings (published GeneCompass checkpoint)",
    "co_exp": "gene co-expression embeddings (published GeneCompass checkpoint)",
    "gene_family": "gene family embeddings (published GeneCompass checkpoint)",
    "peca_grn": "PECA2vec GRN embeddings (published GeneCompass checkpoint)",
}
FUSION_LAYER_NORM_EPS = 1e-5  # the original's cat_ln: nn.LayerNorm's default
# The original's value: log2(1 + count / non-zero median), with the library-size line commented out.
ORIGINAL_NORMALISATION = {"library_size": False, "target_sum": 1e4, "log_base": 2}
ORIGINAL_TOP_K = 2048
MISSING_MEDIAN = 1.0  # preprocess.Normalized: a gene absent from the median dictionary is divided by 1
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@contextlib.contextmanager
def _atomic_directory(out: Path):
    """A temporary sibling of ``out`` to write into: it replaces ``out`` on success, vanishes on failure."""
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------------------------------------
# Pickles from elsewhere


def _numpy_dtype(*args: Any) -> Any:
    dtype = np.dtype(*args)
    if dtype.kind not in "iuf":
        raise pickle.UnpicklingError(f"NumPy dtype {dtype} is not a plain number")
    return dtype


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "iuf" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("only NumPy int/float scalars are accepted")
    return np.frombuffer(data, dtype=dtype, count=1)[0].item()


# NumPy number scalars (e.g. a median stored as np.float64) pickle through these two callables.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}")
        return allowed


def read_plain_dict(path: str | Path, *, value_type: type, what: str) -> dict[str, Any]:
    """A pickle holding a plain ``{str: value_type}`` dict (int or float), read without executing code."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
            handle.seek(0)
            if head.startswith(b"version https://git-lfs"):
                raise FormatError(f"{path}: a Git LFS pointer, not the {what}; fetch the real file")
            data = _PlainUnpickler(handle).load()
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from exc
    except FormatError:
        raise
    except Exception as exc:  # any unpickling failure is the file's fault
        raise FormatError(
            f"{path}: not a plain pickled dict ({exc}); the {what} must hold only str keys and "
            f"{value_type.__name__} values"
        ) from exc
    if not isinstance(data, dict):
        raise FormatError(f"{path}: the {what} is a pickled {type(data).__name__}, not a dict")
    for key, value in data.items():
        if not isinstance(key, str):
            raise FormatError(f"{path}: the {what} has a non-string key {key!r}")
        ok = isinstance(value, int) if value_type is int else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            raise FormatError(f"{path}: the {what} maps {key!r} to {value!r}, not a {value_type.__name__}")
    return data


# --------------------------------------------------------------------------------------------------------
# Inputs, checked before torch is imported


def _is_gc_medians(path: str | Path) -> bool:
    from .medians import FORMAT_NAME

    try:
        with open(path, "rb") as handle:
            return handle.read(64).startswith(f"# format={FORMAT_NAME}".encode())
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the medians ({exc.strerror})") from exc


@dataclass
class OriginalCheckpoint:
    """A published GeneCompass folder, its token dictionary and (optionally) its medians, checked."""

    directory: Path
    config: dict[str, Any]
    weights: Path
    token_dict: dict[str, int]
    medians: dict[str, float] | Path | None  # the original's pickle, or a gc medians file
    knowledge: list[str]  # original table names in use, in the original's concatenation order

    @property
    def vocab_size(self) -> int:
        return len(self.token_dict)


def read_original(
    checkpoint_dir: str | Path, token_dict_path: str | Path, medians_path: str | Path | None = None
) -> OriginalCheckpoint:
    """Open and check everything but the weights themselves (no torch needed)."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        raise InputError(f"{directory}: no such checkpoint directory")
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError:
        raise FormatError(f"{config_path}: missing; a GeneCompass checkpoint holds config.json") from None
    except (OSError, ValueError) as exc:
        raise FormatError(f"{config_path}: unreadable ({exc})") from exc
    weights = next((directory / name for name in WEIGHT_FILES if (directory / name).is_file()), None)
    if weights is None:
        raise FormatError(f"{directory}: holds neither {' nor '.join(WEIGHT_FILES)}")

    def refuse(problem: str) -> None:
        raise FormatError(f"{config_path}: {problem}")

    if config.get("model_type") != "bert":
        refuse(f"model_type {config.get('model_type')!r}; a GeneCompass checkpoint is a 'bert' model")
    if not config.get("use_cls_token"):
        refuse("use_cls_token is not true; gc imports the published architecture (species token prepended)")
    if not config.get("use_values"):
        refuse("use_values is not true; gc imports the published architecture (expression values as input)")
    if config.get("hidden_act", "gelu") != "gelu":
        refuse(f"hidden_act {config.get('hidden_act')!r}; gc's encoder uses exact GELU, as the original")
    if config.get("position_embedding_type", "absolute") != "absolute":
        refuse(f"position_embedding_type {config.get('position_embedding_type')!r} is not 'absolute'")
    if config.get("is_decoder"):
        refuse("is_decoder is true; GeneCompass is a bidirectional encoder")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings"):
        if not isinstance(config.get(key), int):
            refuse(f"{key} is missing or not an integer")
    knowledge = [name for name in ORIGINAL_KNOWLEDGE if config.get(_USE_FLAG[name])]

    token_dict = read_plain_dict(token_dict_path, value_type=int, what="token dictionary")
    where = Path(token_dict_path)
    for special in ("<pad>", "<mask>"):
        if special not in token_dict:
            raise FormatError(f"{where}: the token dictionary has no {special!r} entry")
    ids = sorted(token_dict.values())
    if ids != list(range(len(ids))):
        raise FormatError(f"{where}: token ids are not 0..{len(ids) - 1}, each once")
    if len(token_dict) != config["vocab_size"]:
        raise FormatError(
            f"{where}: {len(token_dict):,} tokens, but {config_path} says vocab_size "
            f"{config['vocab_size']:,}; use the token dictionary the checkpoint was trained with"
        )
    if token_dict["<pad>"] != config.get("pad_token_id", 0):
        raise FormatError(f"{where}: <pad> is token {token_dict['<pad>']}, the config's pad_token_id is "
                          f"{config.get('pad_token_id', 0)}")
    for key in token_dict:
        if key not in ("<pad>", "<mask>") and not key.startswith(("ENSG", "ENSMUSG")):
            raise FormatError(f"{where}: token {key!r} is neither a human (ENSG…) nor a mouse (ENSMUSG…) "
                              "Ensembl gene ID; unknown species")
    medians = None
    if medians_path is not None and _is_gc_medians(medians_path):
        medians = Path(medians_path)  # `gc corpus medians --model RUN`: checked once the vocabulary is built
    elif medians_path is not None:
        medians = read_plain_dict(medians_path, value_type=float, what="gene median dictionary")
        bad = [k for k, v in medians.items() if not (np.isfinite(v) and v > 0)]
        if bad:
            raise FormatError(f"{medians_path}: median of {bad[0]!r} is {medians[bad[0]]!r}; medians must be "
                              "finite and positive")
    return OriginalCheckpoint(directory, config, weights, token_dict, medians, knowledge)


# --------------------------------------------------------------------------------------------------------
# Key mapping


def _layer_map(n_layers: int) -> dict[str, str]:
    """Original encoder keys → gc keys, except q/k/v which are stacked into one qkv."""
    mapping = {}
    for i in range(n_layers):
        src, dst = f"bert.encoder.layer.{i}.", f"genecompass.layers.{i}."
        for part in ("weight", "bias"):
            mapping[f"{src}attention.output.dense.{part}"] = f"{dst}attention.out.{part}"
            mapping[f"{src}attention.output.LayerNorm.{part}"] = f"{dst}attention_norm.{part}"
            mapping[f"{src}intermediate.dense.{part}"] = f"{dst}feed_forward.0.{part}"
            mapping[f"{src}output.dense.{part}"] = f"{dst}feed_forward.2.{part}"
            mapping[f"{src}output.LayerNorm.{part}"] = f"{dst}feed_forward_norm.{part}"
    return mapping


def _direct_map(n_layers: int, knowledge: list[str]) -> dict[str, str]:
    """Original → gc keys for tensors copied unchanged."""
    e, g = "bert.embeddings.", "genecompass.embeddings."
    mapping = {
        f"{e}position_embeddings.weight": f"{g}position_embeddings.weight",
        f"{e}token_type_embeddings.weight": f"{g}token_type_embeddings.weight",
    }
    for part in ("weight", "bias"):
        mapping[f"{e}LayerNorm.{part}"] = f"{g}layer_norm.{part}"
        for src, dst in (("cat_fc", "0"), ("cat_ln", "1"), ("cat_proj", "3")):
            mapping[f"{e}concat_embeddings.{src}.{part}"] = f"{g}fusion.{dst}.{part}"
        for name in knowledge:
            mapping[f"{e}{name}_embeddings.linear1.{part}"] = (
                f"{g}knowledge_projections.{ORIGINAL_KNOWLEDGE[name]}.{part}"
            )
        for head, gc_head in (("cls", "id"), ("cls4value", "value")):
            mapping[f"{head}.predictions.transform.dense.{part}"] = f"{gc_head}_transform.dense.{part}"
            mapping[f"{head}.predictions.transform.LayerNorm.{part}"] = f"{gc_head}_transform.norm.{part}"
    mapping["cls4value.predictions.decoder.weight"] = "value_decoder.weight"
    mapping["cls4value.predictions.bias"] = "value_decoder.bias"
    mapping.update(_layer_map(n_layers))
    return mapping


def _qkv_keys(n_layers: int) -> dict[str, list[str]]:
    return {
        f"genecompass.layers.{i}.attention.qkv.{part}": [
            f"bert.encoder.layer.{i}.attention.self.{p}.{part}" for p in ("query", "key", "value")
        ]
        for i in range(n_layers)
        for part in ("weight", "bias")
    }


# Keys the original writes that carry no information of their own: aliases of tied tensors, a constant
# index buffer, the warm-up step counter (recorded in gc_run.json for export).
_ALIASES = {
    "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
    "cls4value.predictions.decoder.bias": "cls4value.predictions.bias",
}


def expected_shapes(config: dict[str, Any], knowledge_dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """The state-dict keys (and shapes) a published checkpoint of ``config`` must hold."""
    V, H, inter = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    e = "bert.embeddings."
    shapes: dict[str, tuple[int, ...]] = {
        f"{e}word_embeddings.weight": (V, H),
        f"{e}position_embeddings.weight": (config["max_position_embeddings"], H),
        f"{e}token_type_embeddings.weight": (config.get("type_vocab_size", 2), H),
        f"{e}LayerNorm.weight": (H,), f"{e}LayerNorm.bias": (H,),
        f"{e}concat_embeddings.cat_fc.weight": (H, H * (1 + len(knowledge_dims)) + 1),
        f"{e}concat_embeddings.cat_fc.bias": (H,),
        "bert.cls_embedding.weight": (2, H),
        "cls.predictions.bias": (V,),
        "cls4value.predictions.decoder.weight": (1, H), "cls4value.predictions.bias": (1,),
        "emb_warmup.alpha": (), "emb_warmup.steps": (),
    }
    for ln in ("cat_ln", "cat_proj"):
        shapes[f"{e}concat_embeddings.{ln}.bias"] = (H,)
    shapes[f"{e}concat_embeddings.cat_ln.weight"] = (H,)
    shapes[f"{e}concat_embeddings.cat_proj.weight"] = (H, H)
    if knowledge_dims:
        shapes[f"{e}homologous_index"] = (V,)
    for name, dim in knowledge_dims.items():
        shapes[f"{e}{name}_knowledge"] = (V, dim)
        shapes[f"{e}{name}_embeddings.linear1.weight"] = (H, dim)
        shapes[f"{e}{name}_embeddings.linear1.bias"] = (H,)
    for head in ("cls", "cls4value"):
        shapes[f"{head}.predictions.transform.dense.weight"] = (H, H)
        for part in ("dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
            shapes[f"{head}.predictions.transform.{part}"] = (H,)
    for i in range(config["num_hidden_layers"]):
        p = f"bert.encoder.layer.{i}."
        for name, (rows, cols) in {
            "attention.self.query": (H, H), "attention.self.key": (H, H), "attention.self.value": (H, H),
            "attention.output.dense": (H, H), "intermediate.dense": (inter, H), "output.dense": (H, inter),
        }.items():
            shapes[f"{p}{name}.weight"] = (rows, cols)
            shapes[f"{p}{name}.bias"] = (rows,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{p}{ln}.weight"] = (H,)
            shapes[f"{p}{ln}.bias"] = (H,)
    return shapes


_OPTIONAL_KEYS = {"bert.embeddings.position_ids", *_ALIASES}


def check_state_dict(source: Path, state: dict[str, Any], checkpoint: OriginalCheckpoint) -> dict[str, int]:
    """Refuse missing or unexpected keys and wrong shapes; return the knowledge tables' widths."""
    dims = {}
    for name in checkpoint.knowledge:
        key = f"bert.embeddings.{name}_knowledge"
        if key not in state or state[key].ndim != 2:
            raise FormatError(f"{source}: {key} is missing or not a [vocab, dim] table, but the config sets "
                              f"{_USE_FLAG[name]}")
        dims[name] = int(state[key].shape[1])
    expected = expected_shapes(checkpoint.config, dims)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - _OPTIONAL_KEYS)
    if missing:
        raise FormatError(f"{source}: missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        raise FormatError(f"{source}: unexpected {len(unexpected)} key(s), e.g. {', '.join(unexpected[:3])}; "
                          "gc imports the pre-training checkpoint (BertForMaskedLM)")
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise FormatError(f"{source}: {key} has shape {tuple(state[key].shape)}, expected {shape}")
    for alias, target in _ALIASES.items():
        if alias in state and not state[alias].is_meta and not bool((state[alias] == state[target]).all()):
            raise FormatError(f"{source}: {alias} differs from {target}; they are tied in GeneCompass")
    return dims


def load_state_dict(weights: Path) -> dict[str, Any]:
    """Weights only: safetensors, or ``torch.load(weights_only=True)`` (no code runs from the file)."""
    import torch

    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(weights)
        return torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FormatError(f"{weights}: cannot read the weights safely ({str(exc).splitlines()[0]})") from exc


# --------------------------------------------------------------------------------------------------------
# The run's gene reference: gc's gene tables, the checkpoint's tokens


def write_reference(token_dict: dict[str, int], out: Path, source: str) -> Any:
    """A gene reference bundle at ``out`` whose vocabulary is ``token_dict`` plus <human>, <mouse>."""
    import pandas as pd

    from .reference import (
        DATA_FILES,
        FORMAT,
        FORMAT_VERSION,
        NAME_FILES,
        _default_root,
        bundle_hash,
        gzip_bytes,
        load_reference,
        names_hash,
        tsv_bytes,
    )

    base = load_reference()
    V = len(token_dict)
    by_token = sorted(token_dict.items(), key=lambda item: item[1])
    vocab = pd.DataFrame({
        "token_id": np.arange(V + 2),
        "token": [k for k, _ in by_token] + ["<human>", "<mouse>"],
        "kind": ["special" if k.startswith("<") else "gene" for k, _ in by_token] + ["species"] * 2,
        "human_gene_id": [k if k.startswith("ENSG") else "" for k, _ in by_token] + ["", ""],
        "mouse_gene_id": [k if k.startswith("ENSMUSG") else "" for k, _ in by_token] + ["", ""],
    })
    contents = {"vocab.tsv.gz": tsv_bytes(vocab)}
    for species, prefix in (("human", "ENSG"), ("mouse", "ENSMUSG")):
        genes = base.genes(species)
        genes["token_id"] = [token_dict.get(gid, -1) for gid in genes.index]
        ours = [k for k in token_dict if k.startswith(prefix) and k.split(".")[0] not in genes.index]
        if ours:  # tokens of genes gc's GENCODE release lacks: reachable by Ensembl ID
            extra = pd.DataFrame(index=pd.Index(ours, name=genes.index.name), columns=genes.columns)
            extra["symbol"] = ours
            extra["biotype"], extra["chrom"], extra["is_mito"], extra["symbol_primary"] = "", "", 0, 0
            extra["token_id"] = [token_dict[k] for k in ours]
            genes = pd.concat([genes, extra])
        if species == "mouse":
            genes["human_gene_id"] = ""  # no mouse gene shares a human token in this vocabulary
        for col in ("is_mito", "symbol_primary"):
            genes[col] = genes[col].astype(int)
        contents[f"genes_{species}.tsv.gz"] = tsv_bytes(genes.fillna("").reset_index())
    root = _default_root()
    # gc's aliases, orthologs and name tables (previous symbols) are keyed by Ensembl ID: they hold as is
    for name in ("aliases_human.tsv.gz", "aliases_mouse.tsv.gz", "orthologs.tsv.gz", *NAME_FILES):
        contents[name] = gzip.decompress(root.joinpath(name).read_bytes())
    files = {name: gzip_bytes(contents[name]) for name in (*DATA_FILES, *NAME_FILES)}
    manifest = {
        **{k: v for k, v in base.manifest.items() if k not in ("files", "hash", "counts", "special_tokens")},
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "hash": bundle_hash(contents),
        "name_files": list(NAME_FILES),
        "names_hash": names_hash(contents),
        "files": {name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
                  for name, data in files.items()},
        "counts": {"vocab_size": V + 2, "n_special_tokens": 4,
                   "n_human_genes": sum(k.startswith("ENSG") for k in token_dict),
                   "n_mouse_genes": sum(k.startswith("ENSMUSG") for k in token_dict)},
        "special_tokens": {"<pad>": token_dict["<pad>"], "<mask>": token_dict["<mask>"], "<human>": V,
                           "<mouse>": V + 1},
        "rules": {**base.manifest.get("rules", {}),
                  "vocabulary": f"the token dictionary of a published GeneCompass checkpoint ({source}), "
                                "human and mouse genes with separate tokens, then <human> and <mouse>",
                  "shared_tokens": "none: mouse cells read prior knowledge through the model's "
                                   "homologous_index"},
        "derived_from": base.hash,
    }
    out.mkdir(parents=True)
    for name, data in files.items():
        (out / name).write_bytes(data)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return load_reference(out)


# --------------------------------------------------------------------------------------------------------
# Import


def gc_config_kwargs(checkpoint: OriginalCheckpoint, dims: dict[str, int], alpha: float) -> dict[str, Any]:
    """gc config fields that reproduce the original architecture of ``checkpoint``."""
    c, V = checkpoint.config, checkpoint.vocab_size
    return dict(
        vocab_size=V + 2,
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        num_attention_heads=c["num_attention_heads"],
        intermediate_size=c["intermediate_size"],
        max_position_embeddings=c["max_position_embeddings"],
        hidden_dropout_prob=float(c.get("hidden_dropout_prob", 0.1)),
        attention_probs_dropout_prob=float(c.get("attention_probs_dropout_prob", 0.1)),
        layer_norm_eps=float(c.get("layer_norm_eps", 1e-12)),
        initializer_range=float(c.get("initializer_range", 0.02)),
        value_encoding="scalar",
        species_embedding="prepended",
        fusion_activation="quick_gelu",
        fusion_layer_norm_eps=FUSION_LAYER_NORM_EPS,
        type_vocab_size=int(c.get("type_vocab_size", 2)),
        knowledge_scale=alpha,
        knowledge_lookup="homologous" if dims else "token",
        knowledge_tables=[ORIGINAL_KNOWLEDGE[name] for name in dims],
        knowledge_dims={ORIGINAL_KNOWLEDGE[name]: dim for name, dim in dims.items()},
        id_loss_weight=0.2,
        value_loss_weight=0.8,
        pad_token_id=checkpoint.token_dict["<pad>"],
        mask_token_id=checkpoint.token_dict["<mask>"],
        species_token_ids={"human": V, "mouse": V + 1},
        cell_embedding="mean",  # the original's own scripts pool gene outputs; its CLS gets no direct loss
    )


def convert_state_dict(state: dict[str, Any], checkpoint: OriginalCheckpoint, dims: dict[str, int]) -> dict:
    """Original tensors → gc's ``GeneCompassForPretraining`` state dict (knowledge tables excluded)."""
    import torch

    n_layers = checkpoint.config["num_hidden_layers"]
    out = {dst: state[src] for src, dst in _direct_map(n_layers, list(dims)).items()}
    for dst, (q, k, v) in _qkv_keys(n_layers).items():
        out[dst] = torch.cat([state[q], state[k], state[v]], dim=0)
    words = state["bert.embeddings.word_embeddings.weight"]
    out["genecompass.embeddings.gene_embeddings.weight"] = torch.cat(
        [words, state["bert.cls_embedding.weight"].to(words.dtype)]
    )
    out["id_decoder.weight"] = out["genecompass.embeddings.gene_embeddings.weight"]
    bias = state["cls.predictions.bias"]
    out["id_decoder.bias"] = torch.cat([bias, bias.new_zeros(2)])  # species logits are masked anyway
    if dims:
        index = state["bert.embeddings.homologous_index"].long()
        V = checkpoint.vocab_size
        species_rows = torch.arange(V, V + 2, device=index.device)  # the species tokens map to themselves
        out["genecompass.embeddings.homologous_index"] = torch.cat([index, species_rows])
    return {k: v.detach().clone().float() if v.is_floating_point() else v.clone() for k, v in out.items()}


def import_genecompass(
    checkpoint_dir: str | Path,
    token_dict_path: str | Path,
    out: str | Path,
    *,
    medians_path: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Turn a published GeneCompass checkpoint into a gc run at ``out`` (see the module docstring).

    Without ``medians_path`` the run holds no medians: embedding raw counts then asks for them (compute
    them on your own data with ``gc corpus medians FILES --model RUN`` and pass them to ``gc model import``).
    Returns a summary. Writes under a temporary name and renames, so a failure leaves nothing behind.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    checkpoint = read_original(checkpoint_dir, token_dict_path, medians_path)

    import torch

    from .knowledge import file_sha256, read_manifest, write_knowledge_table
    from .medians import Medians
    from .model import GeneCompassConfig, GeneCompassForPretraining
    from .run import (
        FORMAT_NAME,
        FORMAT_VERSION,
        KNOWLEDGE_BESIDE_WEIGHTS,
        MEDIANS_FILE,
        REFERENCE_BESIDE_WEIGHTS,
        RUN_INFO,
        quiet_transformers,
        write_json_atomic,
    )

    state = load_state_dict(checkpoint.weights)
    dims = check_state_dict(checkpoint.weights, state, checkpoint)
    position_ids = state.get("bert.embeddings.position_ids")
    if position_ids is not None and not torch.equal(
        position_ids.flatten().long(), torch.arange(position_ids.numel())
    ):
        raise FormatError(f"{checkpoint.weights}: bert.embeddings.position_ids is not 0..N-1")
    alpha = float(state["emb_warmup.alpha"])
    warmup_steps = int(state["emb_warmup.steps"])

    with _atomic_directory(out) as tmp:
        model_dir = tmp / "model"
        reference = write_reference(checkpoint.token_dict, model_dir / REFERENCE_BESIDE_WEIGHTS,
                                    str(checkpoint.directory))
        V = checkpoint.vocab_size
        knowledge_dir = model_dir / KNOWLEDGE_BESIDE_WEIGHTS
        for name in dims:
            table = state[f"bert.embeddings.{name}_knowledge"].float()
            table = torch.cat([table, table.new_zeros(2, table.shape[1])])
            covered = torch.ones(V + 2, dtype=torch.bool)
            covered[[checkpoint.token_dict["<pad>"], checkpoint.token_dict["<mask>"], V, V + 1]] = False
            write_knowledge_table(knowledge_dir, ORIGINAL_KNOWLEDGE[name], table, covered,
                                  source=str(checkpoint.weights), description=_KNOWLEDGE_DESCRIPTION[name],
                                  reference_hash=reference.hash)
        config = GeneCompassConfig(**gc_config_kwargs(checkpoint, dims, alpha), reference_hash=reference.hash)
        if dims:
            manifest = read_manifest(knowledge_dir)
            config.knowledge_sha256 = {t: manifest["tables"][t]["sha256"] for t in config.knowledge_tables}
        with torch.device("meta"):
            model = GeneCompassForPretraining(config)
        converted = convert_state_dict(state, checkpoint, dims)
        missing, unexpected = model.load_state_dict(converted, strict=False, assign=True)
        model.tie_weights()
        missing = [k for k in missing if k != "id_decoder.weight"]
        if missing or unexpected:  # a mapping bug, not the user's file
            raise RuntimeError(f"checkpoint mapping incomplete: missing {missing}, unexpected {unexpected}")
        with quiet_transformers():
            model.save_pretrained(model_dir)

        info = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "reference_hash": reference.hash,
            "medians_hash": None,
            "normalisation": dict(ORIGINAL_NORMALISATION),
            "top_k": min(ORIGINAL_TOP_K, config.max_position_embeddings),
            "max_length": config.max_sequence_length,
            "corpus": None,
            "imported_from": {
                "format": "genecompass",
                "checkpoint": str(checkpoint.directory.resolve()),
                "weights_sha256": file_sha256(checkpoint.weights),
                "token_dict": str(Path(token_dict_path).resolve()),
                "medians": str(Path(medians_path).resolve()) if medians_path else None,
                "original_config": checkpoint.config,
                "emb_warmup_steps": warmup_steps,
                "saved_decoder_aliases": sorted(k for k in _ALIASES if k in state),
                "saved_position_ids": position_ids is not None,
                "knowledge_dtypes": {n: str(state[f"bert.embeddings.{n}_knowledge"].dtype) for n in dims},
            },
        }
        n_missing = 0
        if isinstance(checkpoint.medians, Path):
            medians = Medians.load(checkpoint.medians)
            medians.check_compatible(reference_hash=reference.hash, source=str(checkpoint.medians),
                                     library_size=ORIGINAL_NORMALISATION["library_size"],
                                     target_sum=ORIGINAL_NORMALISATION["target_sum"])
            medians.save(model_dir / MEDIANS_FILE, reference)
            info["medians_hash"] = medians.hash
        elif checkpoint.medians is not None:
            values = np.full(V + 2, np.nan, np.float32)
            for gene, token in checkpoint.token_dict.items():
                if not gene.startswith("<"):
                    median = checkpoint.medians.get(gene)
                    n_missing += median is None
                    values[token] = MISSING_MEDIAN if median is None else median
            medians = Medians(values, np.zeros(V + 2, np.uint64), reference.hash,
                              ORIGINAL_NORMALISATION["library_size"], ORIGINAL_NORMALISATION["target_sum"])
            medians.save(model_dir / MEDIANS_FILE, reference)
            info["medians_hash"] = medians.hash
            info["medians_missing_set_to_1"] = n_missing
        write_json_atomic(model_dir / RUN_INFO, info)
    return {
        "out": str(out),
        "vocab_size": V,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "knowledge_tables": config.knowledge_tables,
        "reference_hash": reference.hash,
        "medians": "none (see `gc corpus medians`)" if checkpoint.medians is None
        else str(checkpoint.medians) if isinstance(checkpoint.medians, Path)
        else f"{len(checkpoint.medians):,} genes; {n_missing:,} vocabulary genes without one use 1",
    }


# --------------------------------------------------------------------------------------------------------
# Export


def export_genecompass(run: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write a run of the original architecture back as the original's folder: ``config.json``,
    ``pytorch_model.bin`` (transformers 4.30 layout, loadable by the original ``BertForMaskedLM``) and
    ``token_dict.pickle``; plus ``medians.pickle`` when the run has medians."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    from .run import model_dir_of, read_run_info

    model_dir = model_dir_of(run)
    info = read_run_info(model_dir)
    config_json = json.loads((model_dir / "config.json").read_text())
    original_architecture = {"species_embedding": "prepended", "value_encoding": "scalar",
                             "fusion_activation": "quick_gelu", "type_vocab_size": 2}
    if any(config_json.get(key) != value for key, value in original_architecture.items()):
        raise FormatError(f"{model_dir}: not of the original GeneCompass architecture; only runs made by "
                          "`gc model import genecompass` can be exported to it")

    import torch

    from .model import GeneCompassForPretraining
    from .run import REFERENCE_BESIDE_WEIGHTS, quiet_transformers, run_reference

    if not (model_dir / REFERENCE_BESIDE_WEIGHTS).is_dir():
        raise FormatError(f"{model_dir}: no {REFERENCE_BESIDE_WEIGHTS}/ bundle (the checkpoint vocabulary); "
                          "only imported runs can be exported")
    reference = run_reference(model_dir)
    with quiet_transformers():  # the knowledge tables are found beside the weights
        model = GeneCompassForPretraining.from_pretrained(model_dir)
    config = model.config
    vocab = reference.vocab()
    V = config.vocab_size - 2
    if config.species_token_ids != {"human": V, "mouse": V + 1}:
        raise FormatError(f"{model_dir}: the species tokens are not the last two of the vocabulary")
    token_dict = {str(token): int(i) for i, token in vocab["token"].items() if i < V}
    state = model.state_dict()
    g, e = "genecompass.embeddings.", "bert.embeddings."
    original: dict[str, torch.Tensor] = {}
    tables = {gc: name for name, gc in ORIGINAL_KNOWLEDGE.items()}
    dims = {tables[t]: config.knowledge_dims[t] for t in config.knowledge_tables}
    for src, dst in _direct_map(config.num_hidden_layers, list(dims)).items():
        original[src] = state[dst]
    for dst, (q, k, v) in _qkv_keys(config.num_hidden_layers).items():
        original[q], original[k], original[v] = state[dst].chunk(3, dim=0)
    words = state[f"{g}gene_embeddings.weight"]
    original[f"{e}word_embeddings.weight"] = words[:V]
    original["bert.cls_embedding.weight"] = words[V:]
    original["cls.predictions.bias"] = state["id_decoder.bias"][:V]
    imported = info.get("imported_from", {})
    knowledge_dtypes = imported.get("knowledge_dtypes", {})
    for gc_name in config.knowledge_tables:
        name = tables[gc_name]
        table = model.genecompass.embeddings.knowledge(gc_name)[:V]
        dtype = getattr(torch, knowledge_dtypes.get(name, "torch.float32").removeprefix("torch."))
        original[f"{e}{name}_knowledge"] = table.to(dtype)
    if dims:
        original[f"{e}homologous_index"] = state[f"{g}homologous_index"][:V]
    original["emb_warmup.alpha"] = torch.tensor(float(config.knowledge_scale))
    original["emb_warmup.steps"] = torch.tensor(int(imported.get("emb_warmup_steps", 0)))
    original[f"{e}position_ids"] = torch.arange(config.max_position_embeddings).expand((1, -1))
    # transformers 4.30 writes the tied decoder and its bias alias too
    original["cls.predictions.decoder.weight"] = original[f"{e}word_embeddings.weight"]
    original["cls.predictions.decoder.bias"] = original["cls.predictions.bias"]
    original["cls4value.predictions.decoder.bias"] = original["cls4value.predictions.bias"]

    original_config = dict(imported.get("original_config") or {})
    original_config.update(
        model_type="bert", architectures=["BertForMaskedLM"], vocab_size=V,
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, hidden_act="gelu",
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        layer_norm_eps=config.layer_norm_eps, type_vocab_size=config.type_vocab_size,
        initializer_range=config.initializer_range, pad_token_id=config.pad_token_id,
        position_embedding_type="absolute", use_values=True, use_cls_token=True,
        **{_USE_FLAG[name]: name in dims for name in ORIGINAL_KNOWLEDGE},
    )
    original_config.setdefault("warmup_steps", 0)
    original_config.setdefault("emb_warmup_steps", 1)

    with _atomic_directory(out) as tmp:
        tmp.mkdir(parents=True)
        torch.save({k: v.contiguous().clone() for k, v in original.items()}, tmp / "pytorch_model.bin")
        (tmp / "config.json").write_text(json.dumps(original_config, indent=2, sort_keys=True) + "\n")
        with open(tmp / "token_dict.pickle", "wb") as handle:
            pickle.dump(token_dict, handle, protocol=4)
        if info.get("medians_hash"):
            from .medians import Medians

            medians = Medians.load(model_dir / "medians.tsv")
            by_gene = {gene: float(medians.values[token]) for gene, token in token_dict.items()
                       if not gene.startswith("<") and np.isfinite(medians.values[token])}
            with open(tmp / "medians.pickle", "wb") as handle:
                pickle.dump(by_gene, handle, protocol=4)
    return {"out": str(out), "vocab_size": V, "keys": len(original)}
