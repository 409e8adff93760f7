"""Checks a command runs on its arguments before the model stack loads.

Every function here is torch-free (numpy, pandas, zarr, h5py and the gene reference only) and reads no more
than metadata: a wrong path, a file of the wrong kind, an unknown gene or a missing obs column fails in about
a second, before torch, transformers or DeepSpeed is imported and before a model is loaded. The library
functions the commands then call repeat these checks; these only make the failure early. Each raises the
project's own errors (one line naming the file and the problem).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from genecompass.errors import FormatError, InputError, OutputExistsError, ReferenceMismatchError

from .console import existing_paths


def _reference():
    from genecompass.reference import load_reference

    return load_reference()


def trained_run(path: Path) -> Path:
    """A run (``RUN`` or ``RUN/model``) that can tokenise and embed new cells, as ``load_run`` wants it: its
    ``gc_run.json`` readable and of this format, its token ids those of its gene reference (the installed one,
    or an imported checkpoint's own bundle), its medians present. Returns the model directory."""
    from genecompass.run import MEDIANS_FILE, model_dir_of, read_run_info, run_reference

    existing_paths([path])
    directory = model_dir_of(path)
    info = read_run_info(directory)
    reference = run_reference(directory)
    if info.get("reference_hash") != reference.hash:
        raise ReferenceMismatchError(
            f"{directory}: the model was trained on gene reference {info.get('reference_hash')}, but its "
            f"reference is {reference.hash}; token ids would not mean the same genes"
        )
    if info.get("medians_hash") is None:
        raise FormatError(
            f"{directory}: the run has no gene medians (imported without --medians); compute them with "
            f"`gc corpus medians FILES --out medians.tsv` and import again with --medians medians.tsv"
        )
    for name in (MEDIANS_FILE, "config.json"):
        if not (directory / name).is_file():
            raise FormatError(f"{directory}: missing {name}")
    return directory


def classifier(path: Path) -> Path:
    """The ``--out`` of `gc finetune celltype`: a trained run with its ``labels.json``."""
    from genecompass.finetune import LABELS_FILE

    directory = trained_run(path)
    if not (directory / LABELS_FILE).is_file():
        raise InputError(
            f"{path}: not a fine-tuned classifier (no {LABELS_FILE}); pass the --out of "
            "`gc finetune celltype`"
        )
    return directory


def model(path: Path):
    """A model directory as `gc perturb` and `gc grn` load it (``RUN/model`` or the directory itself).
    Returns the gene reference its token ids belong to (the installed one unless the run carries its own)."""
    from genecompass.perturb import model_directory
    from genecompass.run import RUN_INFO, run_reference

    existing_paths([path])
    directory = model_directory(path)
    return run_reference(directory) if (directory / RUN_INFO).is_file() else _reference()


def knowledge(path: Path | None, tables: Sequence[str] | None = None, reference=None) -> dict | None:
    """A knowledge directory of this format, built for ``reference`` (default: the installed one), holding
    ``tables`` (default: any). Returns its manifest."""
    if path is None:
        return None
    from genecompass.knowledge import MANIFEST_NAME, read_manifest

    existing_paths([path])
    manifest = read_manifest(path)
    reference = reference or _reference()
    if manifest["reference_hash"] != reference.hash:
        raise ReferenceMismatchError(
            f"{path / MANIFEST_NAME}: knowledge built for reference {manifest['reference_hash']}, but the "
            f"model's is {reference.hash}; rebuild it with `gc knowledge build`"
        )
    missing = [name for name in tables or () if name not in manifest["tables"]]
    if missing:
        raise FormatError(
            f"{path / MANIFEST_NAME}: no table {', '.join(map(repr, missing))} "
            f"(has: {', '.join(manifest['tables']) or 'none'})"
        )
    return manifest


def corpus(
    path: Path,
    *,
    cells_key: str | None = None,
    states: Sequence[str] = (),
    same_reference: bool = False,
    model: Path | None = None,
):
    """A complete gc corpus (``Corpus``), optionally holding obs ``cells_key`` with cells in every state of
    ``states``, and (``same_reference``) built with the gene reference of run ``model`` (default: the
    installed one)."""
    from genecompass.corpus import Corpus

    existing_paths([path])
    opened = Corpus(path)
    if same_reference:
        if model is not None:
            from genecompass.run import run_reference

            reference = run_reference(model)
        else:
            reference = _reference()
        if opened.reference_hash != reference.hash:
            raise ReferenceMismatchError(
                f"{path}: corpus built for reference {opened.reference_hash}, but the gene reference in "
                f"use is {reference.hash}; re-tokenise the data with this gc"
            )
    if cells_key is not None:
        labels = opened.obs_labels(cells_key)
        present = {str(v) for v in labels if v is not None}
        for state in states:
            if state not in present:
                raise InputError(
                    f"{path}: no cells with {cells_key} = {state!r}; values present: "
                    f"{', '.join(sorted(present))}"
                )
    return opened


def count_file(
    path: Path, *, obs_keys: Sequence[str | None] = (), species: str | None = None, layer: str | None = None
) -> None:
    """A count file gc can read whose genes map onto the reference and whose obs holds ``obs_keys``."""
    from genecompass.io import open_counts

    existing_paths([path])
    with open_counts(path, layer=layer) as source:
        source.gene_map(_reference(), species=species)
        available = source.obs_columns()
        for key in obs_keys:
            if key is not None and key not in available:
                raise InputError(
                    f"{path}: no obs column {key!r}; available: {', '.join(available) or 'none'}"
                )


def genes(spec: str, option: str, reference=None) -> None:
    """Every gene of a ``A,B+C`` perturbation spec is a known gene with a token of ``reference``."""
    from genecompass.perturb import parse_gene_groups, resolve_genes

    reference = reference or _reference()
    try:
        for group in parse_gene_groups(spec):
            resolve_genes(group, reference)
    except InputError as exc:
        raise InputError(f"{option} {spec}: {exc}") from exc


def gene_file(path: Path | None, reference=None) -> list[str] | None:
    """A gene list file (one per line) of which at least one gene has a token; returns its names."""
    if path is None:
        return None
    from genecompass.perturb import read_gene_file, resolve_gene_list

    names = read_gene_file(path)
    resolve_gene_list(names, reference or _reference(), source=str(path))
    return names


def output(path: Path, overwrite: bool) -> None:
    """An output that does not exist yet (or ``--overwrite``)."""
    from genecompass.corpus import check_output_path

    check_output_path(path, overwrite)


def training_output(path: Path, *, resume: bool, overwrite: bool) -> None:
    """A `gc pretrain` run directory that holds no run yet (or ``--resume`` / ``--overwrite``)."""
    has_run = (path / "train_log.csv").exists() or (path / "checkpoints").exists()
    if has_run and not resume and not overwrite:
        raise OutputExistsError(
            f"{path} already holds a training run; pass --resume to continue it or --overwrite to replace it"
        )
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: exists and is not a directory")


def fraction(value: float, option: str) -> None:
    """A fraction strictly between 0 and 1."""
    if not 0.0 < value < 1.0:
        raise InputError(f"{option} must be between 0 and 1 (exclusive), not {value}")
