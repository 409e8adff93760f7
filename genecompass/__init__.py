"""gc — the GeneCompass toolkit.

A knowledge-informed, cross-species (human + mouse) BERT-style model of single cells: tokenise raw counts
into a Zarr corpus (Rust), pre-train with DeepSpeed, embed, fine-tune, perturb in silico and infer GRNs.
Heavy submodules (torch) are imported lazily so that ``import genecompass`` stays fast.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("genecompass-gc")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0+unknown"

from .errors import FormatError, GcError, InputError, OutputExistsError, ReferenceMismatchError

__all__ = [
    "__version__",
    "GcError",
    "InputError",
    "FormatError",
    "OutputExistsError",
    "ReferenceMismatchError",
]
