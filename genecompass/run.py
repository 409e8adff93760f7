"""A trained run = model + the normaliser it was trained with.

``gc pretrain`` exports ``RUN/model/`` (``save_pretrained``) and, beside the weights, ``medians.tsv`` (the
corpus's per-gene medians) and ``gc_run.json`` (reference hash, medians hash, normalisation, top-k, the
training ``max_length``). ``load_run`` reads all of it back so that ``gc embed``, ``gc finetune`` and
``gc predict`` tokenise new cells exactly as the training corpus was tokenised.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, ReferenceMismatchError
from .medians import Medians

logger = logging.getLogger(__name__)

RUN_INFO = "gc_run.json"
MEDIANS_FILE = "medians.tsv"
# An imported run keeps its own gene reference bundle (its checkpoint's vocabulary) and knowledge tables
# beside its weights; fine-tuned copies carry them along (GeneCompassPreTrainedModel.save_pretrained).
REFERENCE_BESIDE_WEIGHTS = "reference"
KNOWLEDGE_BESIDE_WEIGHTS = "knowledge"
FORMAT_NAME = "gc-run"
FORMAT_VERSION = 1


def write_run_info(
    model_dir: str | Path, corpus, reference, *, max_length: int | None, extra: dict | None = None
) -> bool:
    """Write ``medians.tsv`` and ``gc_run.json`` for a model trained on ``corpus`` (a ``Corpus``).

    Returns False (and writes nothing) when the corpus stores no medians (a corpus from an older gc, or a
    synthetic test corpus): such a model can be loaded with ``from_pretrained`` but not embedded from raw
    counts."""
    model_dir = Path(model_dir)
    values = corpus.gene_medians()
    if values is None or not hasattr(reference, "vocab"):
        logger.warning("%s stores no gene medians: %s not written", corpus.path, RUN_INFO)
        return False
    norm = dict(corpus.attrs.get("normalisation", {}))
    medians = Medians(
        np.asarray(values, np.float32),
        np.zeros(len(values), np.uint64),  # counts are not stored in the corpus
        corpus.reference_hash,
        bool(norm.get("library_size", True)),
        float(norm.get("target_sum", 1e4)),
    )
    medians.save(model_dir / MEDIANS_FILE, reference)
    info = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "reference_hash": corpus.reference_hash,
        "medians_hash": medians.hash,
        "normalisation": norm,
        "top_k": corpus.top_k,
        "max_length": max_length,
        "corpus": str(corpus.path),
        **(extra or {}),
    }
    write_json_atomic(model_dir / RUN_INFO, info)
    return True


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@dataclass
class LoadedRun:
    """A model with its normaliser. ``model`` is a ``GeneCompassModel`` (encoder only) unless ``load_run``
    was given another class; ``max_length`` counts the species token."""

    reference: Any  # the GeneReference whose token ids the model speaks
    model: Any
    medians: Medians
    top_k: int
    normalisation: dict
    reference_hash: str
    path: Path
    max_length: int
    info: dict

    @property
    def medians_hash(self) -> str:
        return self.medians.hash


def model_dir_of(path: str | Path) -> Path:
    """``RUN`` or ``RUN/model`` → the directory holding the weights and ``gc_run.json``."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such run directory; pass the --out of `gc pretrain` (or its model/)")
    for candidate in (path, path / "model"):
        if (candidate / RUN_INFO).is_file():
            return candidate
    if (path / "config.json").is_file() or (path / "model" / "config.json").is_file():
        raise FormatError(
            f"{path}: the model has no {RUN_INFO}/{MEDIANS_FILE} (exported by an older gc?); re-export it "
            "with this gc's `gc pretrain` so embedding normalises cells as the training corpus did"
        )
    raise FormatError(f"{path}: not a gc run (no model/config.json); pass the --out of `gc pretrain`")


def read_run_info(model_dir: Path) -> dict:
    try:
        info = json.loads((model_dir / RUN_INFO).read_text())
    except (OSError, ValueError) as exc:
        raise FormatError(f"{model_dir / RUN_INFO}: unreadable ({exc})") from exc
    if info.get("format") != FORMAT_NAME or info.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{model_dir / RUN_INFO}: format {info.get('format')!r} version {info.get('format_version')!r} "
            f"is not {FORMAT_NAME} version {FORMAT_VERSION}"
        )
    return info


def run_reference(path: str | Path):
    """The gene reference a run's token ids belong to: its own bundle (an imported checkpoint's
    vocabulary) or, for runs gc pre-trained, the installed one. Torch-free."""
    from .reference import load_reference

    model_dir = model_dir_of(path)
    own = model_dir / REFERENCE_BESIDE_WEIGHTS
    return load_reference(own) if (own / "manifest.json").is_file() else load_reference()


@dataclass
class RunTokenisation:
    """How a run tokenises cells: its gene reference, medians (None: the run has none yet), normalisation
    and top-k. Read without torch, for `gc tokenize --model` and `gc corpus medians --model`."""

    reference: Any
    medians: Path | None
    library_size: bool
    target_sum: float
    top_k: int


def run_tokenisation(path: str | Path) -> RunTokenisation:
    model_dir = model_dir_of(path)
    info = read_run_info(model_dir)
    norm = info.get("normalisation", {})
    return RunTokenisation(
        reference=run_reference(model_dir),
        medians=model_dir / MEDIANS_FILE if info.get("medians_hash") else None,
        library_size=bool(norm.get("library_size", True)),
        target_sum=float(norm.get("target_sum", 1e4)),
        top_k=int(info["top_k"]),
    )


def model_reference(model):
    """The gene reference of a loaded model: the installed one, or the bundle saved beside its weights."""
    from .reference import load_reference

    installed = load_reference()
    wanted = model.config.reference_hash
    if wanted in ("", installed.hash):
        return installed
    own = Path(getattr(model, "name_or_path", "") or ".") / REFERENCE_BESIDE_WEIGHTS
    if (own / "manifest.json").is_file():
        reference = load_reference(own)
        if reference.hash == wanted:
            return reference
    raise ReferenceMismatchError(
        f"{getattr(model, 'name_or_path', 'the model')}: the model speaks gene reference {wanted}, which is "
        f"neither the installed one ({installed.hash}) nor a bundle beside its weights"
    )


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load report (e.g. pre-training heads unused by an encoder) and progress bars."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_run(
    path: str | Path,
    *,
    model_class=None,
    reference=None,
    knowledge_dir: str | Path | None = None,
    check_reference: bool = True,
) -> LoadedRun:
    """Load a run (``RUN`` or ``RUN/model``): model in eval mode, medians, tokenisation settings.

    Refuses (ReferenceMismatchError) a run built for another gene reference than ``reference`` (default: the
    installed one), and medians that do not match the hash recorded at export.
    """
    from .model import GeneCompassModel

    model_dir = model_dir_of(path)
    info = read_run_info(model_dir)
    if reference is None:
        reference = run_reference(model_dir)
    if check_reference:
        if info["reference_hash"] != reference.hash:
            raise ReferenceMismatchError(
                f"{model_dir}: the model was trained on gene reference {info['reference_hash']}, but the "
                f"installed reference is {reference.hash}; token ids would not mean the same genes. Use the "
                "gc version the model was trained with, or re-train on a corpus tokenised with this one"
            )
    if info.get("medians_hash") is None:
        raise FormatError(
            f"{model_dir}: the run has no gene medians (imported without --medians); compute them on your "
            f"data with `gc corpus medians FILES --model {path} --out medians.tsv` and import again with "
            "--medians medians.tsv"
        )
    if not (model_dir / MEDIANS_FILE).is_file():
        raise FormatError(f"{model_dir}: missing {MEDIANS_FILE} (the medians the training corpus used)")
    medians = Medians.load(model_dir / MEDIANS_FILE)
    if medians.hash != info["medians_hash"]:
        raise FormatError(
            f"{model_dir / MEDIANS_FILE}: medians hash {medians.hash} does not match {RUN_INFO} "
            f"({info['medians_hash']}); the file was changed after export"
        )
    cls = model_class or GeneCompassModel
    with quiet_transformers():  # loading an encoder from a pre-training checkpoint drops its heads: expected
        model = cls.from_pretrained(
            model_dir,
            knowledge_dir=knowledge_dir,
            reference_hash=info["reference_hash"] if check_reference else None,
        )
    model.eval()
    limit = model.config.max_sequence_length
    max_length = min(int(info.get("max_length") or limit), limit)
    return LoadedRun(
        reference=reference,
        model=model,
        medians=medians,
        top_k=int(info["top_k"]),
        normalisation=dict(info["normalisation"]),
        reference_hash=info["reference_hash"],
        path=model_dir,
        max_length=max_length,
        info=info,
    )
