"""Cell quality control: the paper's filters (and the original code's z-score variant) as a streaming pass.

QC never copies data: it records which cells pass (one parquet table per input, plus a JSON report and a
PNG of the distributions), and ``tokenize`` applies those flags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .corpus import check_output_path, remove_path
from .errors import FormatError, InputError

REPORT_FORMAT = "gc-qc"
REPORT_VERSION = 1


@dataclass(frozen=True)
class QcParams:
    """Thresholds; defaults are the paper's. ``mode="original"`` reproduces the original code's filters
    (|z| < 3 on total counts and on mitochondrial fraction, more than 6 coding/miRNA genes)."""

    mode: str = "paper"
    min_genes: int = 200  # expressed genes per cell (all genes of the file)
    min_coding_genes: int = 7  # expressed protein-coding or miRNA genes per cell
    max_mito_fraction: float = 0.15
    gene_count_sd: float = 3.0  # expressed-gene count within mean ± k·SD of the file's cells
    min_cells_per_file: int = 4  # a file with fewer passing cells is dropped whole
    zscore: float = 3.0  # original mode: |z| limit on total counts and mitochondrial fraction

    def __post_init__(self) -> None:
        if self.mode not in ("paper", "original"):
            raise InputError(f"QC mode must be 'paper' or 'original', not {self.mode!r}")


@dataclass
class FileQc:
    path: str
    n_cells: int
    metrics: (
        pd.DataFrame
    )  # per cell: total_counts, n_genes, n_coding_genes, mito_fraction, passed, failed_filter
    removed: dict[str, int] = field(default_factory=dict)  # filter -> cells it removed (applied in order)

    @property
    def passed(self) -> np.ndarray:
        return self.metrics["passed"].to_numpy(bool)


def cell_metrics(
    source,
    gene_map,
    *,
    chunk_size: int = 4096,
    allow_non_integer: bool = False,
    progress: Callable[[int, int], None] | None = None,
    done_before: int = 0,
    total: int = 0,
) -> pd.DataFrame:
    """Per-cell QC metrics from a streaming pass over ``source`` (a ``genecompass.io.CountSource``)."""
    from .io import validate_counts

    parts = []
    is_mito = gene_map.is_mito
    is_coding = gene_map.is_coding_or_mirna
    for chunk in source.iter_chunks(chunk_size):
        validate_counts(chunk, source.path, allow_non_integer=allow_non_integer)
        n = chunk.stop - chunk.start
        rows = np.repeat(np.arange(n), np.diff(chunk.indptr))
        expressed = chunk.data > 0
        data = chunk.data.astype(np.float64)
        total_counts = np.bincount(rows, weights=data, minlength=n)
        mito_counts = np.bincount(rows, weights=data * is_mito[chunk.indices], minlength=n)
        parts.append(
            pd.DataFrame(
                {
                    "total_counts": total_counts,
                    "n_genes": np.bincount(rows, weights=expressed, minlength=n).astype(np.int64),
                    "n_coding_genes": np.bincount(
                        rows, weights=expressed & is_coding[chunk.indices], minlength=n
                    ).astype(np.int64),
                    "mito_fraction": np.divide(
                        mito_counts, total_counts, out=np.zeros(n), where=total_counts > 0
                    ),
                }
            )
        )
        if progress:
            progress(done_before + chunk.stop, total)
    metrics = (
        pd.concat(parts, ignore_index=True)
        if parts
        else pd.DataFrame(columns=["total_counts", "n_genes", "n_coding_genes", "mito_fraction"])
    )
    metrics.index = pd.Index(source.obs_names(), name="cell")
    return metrics


def _zscore(values: np.ndarray) -> np.ndarray:
    sd = values.std()
    return np.zeros_like(values) if sd == 0 else (values - values.mean()) / sd


def apply_filters(metrics: pd.DataFrame, params: QcParams) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Apply the filters in order: (passed mask, first failed filter per cell, cells removed per filter)."""
    n_genes = metrics["n_genes"].to_numpy(float)
    if params.mode == "paper":
        mean, sd = n_genes.mean() if len(n_genes) else 0.0, n_genes.std() if len(n_genes) else 0.0
        filters = [
            (f"n_genes < {params.min_genes}", n_genes < params.min_genes),
            (
                f"n_coding_genes < {params.min_coding_genes}",
                metrics["n_coding_genes"].to_numpy() < params.min_coding_genes,
            ),
            (
                f"mito_fraction > {params.max_mito_fraction}",
                metrics["mito_fraction"].to_numpy() > params.max_mito_fraction,
            ),
            (
                f"n_genes beyond mean ± {params.gene_count_sd} SD",
                np.abs(n_genes - mean) > params.gene_count_sd * sd
                if sd > 0
                else np.zeros(len(n_genes), bool),
            ),
        ]
    else:
        total = metrics["total_counts"].to_numpy(float)
        nonzero = total > 0
        z_total = np.zeros_like(total)
        z_mito = np.zeros_like(total)
        z_total[nonzero] = _zscore(total[nonzero])
        z_mito[nonzero] = _zscore(metrics["mito_fraction"].to_numpy(float)[nonzero])
        filters = [
            ("total_counts == 0", ~nonzero),
            (f"|z(total_counts)| >= {params.zscore}", np.abs(z_total) >= params.zscore),
            (f"|z(mito_fraction)| >= {params.zscore}", np.abs(z_mito) >= params.zscore),
            ("n_coding_genes <= 6", metrics["n_coding_genes"].to_numpy() <= 6),
        ]
    passed = np.ones(len(metrics), bool)
    failed = np.full(len(metrics), "", dtype=object)
    removed = {}
    for name, fails in filters:
        newly = passed & fails
        failed[newly] = name
        removed[name] = int(newly.sum())
        passed &= ~fails
    name = f"file has < {params.min_cells_per_file} passing cells"
    removed[name] = 0
    if passed.sum() < params.min_cells_per_file:
        removed[name] = int(passed.sum())
        failed[passed] = name
        passed[:] = False
    return passed, failed, removed


@dataclass
class QcReport:
    params: QcParams
    reference_hash: str
    files: list[FileQc]

    def summary(self) -> dict:
        return {
            "format": REPORT_FORMAT,
            "format_version": REPORT_VERSION,
            "params": asdict(self.params),
            "reference_hash": self.reference_hash,
            "files": [
                {
                    "path": f.path,
                    "table": f"cells-{i:04d}.parquet",
                    "n_cells": f.n_cells,
                    "n_passed": int(f.passed.sum()),
                    "removed": f.removed,
                }
                for i, f in enumerate(self.files)
            ],
            "n_cells": sum(f.n_cells for f in self.files),
            "n_passed": sum(int(f.passed.sum()) for f in self.files),
        }

    def save(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write ``qc.json``, one parquet table of per-cell metrics per input, and ``qc.png``."""
        out = Path(out)
        check_output_path(out, overwrite)
        tmp = out.with_name(f".{out.name}.partial")
        remove_path(tmp)
        tmp.mkdir(parents=True)
        for i, file_qc in enumerate(self.files):
            file_qc.metrics.to_parquet(tmp / f"cells-{i:04d}.parquet")
        (tmp / "qc.json").write_text(json.dumps(self.summary(), indent=2))
        plot_qc(self, tmp / "qc.png")
        remove_path(out)
        os.replace(tmp, out)
        return out


def run_qc(
    inputs: Sequence[str | Path],
    *,
    params: QcParams = QcParams(),
    species: str | None = None,
    layer: str | None = None,
    allow_non_integer: bool = False,
    reference=None,
    chunk_size: int = 4096,
    progress: Callable[[int, int], None] | None = None,
) -> QcReport:
    """Compute QC metrics for every input and apply the filters (nothing is copied)."""
    from .io import open_counts
    from .reference import load_reference

    reference = reference or load_reference()
    sources = [open_counts(path, layer=layer) for path in inputs]
    total = sum(s.n_cells for s in sources)
    files, done = [], 0
    for path, source in zip(inputs, sources):
        with source:
            gene_map = source.gene_map(reference, species)
            metrics = cell_metrics(
                source,
                gene_map,
                chunk_size=chunk_size,
                allow_non_integer=allow_non_integer,
                progress=progress,
                done_before=done,
                total=total,
            )
        passed, failed, removed = apply_filters(metrics, params)
        metrics["passed"] = passed
        metrics["failed_filter"] = failed.astype(str)
        files.append(FileQc(str(path), source.n_cells, metrics, removed))
        done += source.n_cells
    return QcReport(params, reference.hash, files)


def load_qc_masks(
    qc_dir: str | Path, inputs: Sequence[str | Path], n_cells: Sequence[int]
) -> list[np.ndarray]:
    """Pass flags per input from a ``gc qc`` output, checked against the inputs being tokenised."""
    qc_dir = Path(qc_dir)
    try:
        summary = json.loads((qc_dir / "qc.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{qc_dir}: not a gc qc output (qc.json unreadable: {exc})") from exc
    by_name = {Path(f["path"]).resolve(): f for f in summary["files"]}
    masks = []
    for path, n in zip(inputs, n_cells):
        entry = by_name.get(Path(path).resolve())
        if entry is None:
            raise FormatError(f"{qc_dir}: has no QC for input {path}; run `gc qc` on the same inputs")
        if entry["n_cells"] != n:
            raise FormatError(f"{qc_dir}: QC of {path} covers {entry['n_cells']} cells, the file has {n}")
        masks.append(pd.read_parquet(qc_dir / entry["table"], columns=["passed"])["passed"].to_numpy(bool))
    return masks


def cutoffs(metrics: pd.DataFrame, params: QcParams) -> dict[str, list[tuple[float, str]]]:
    """Every threshold ``apply_filters`` uses on one file's cells, as (value, label) per metric column,
    the mean ± k·SD (paper) and |z| (original) cut-offs included, in the metric's own units."""
    lines: dict[str, list[tuple[float, str]]] = {c: [] for c in PLOT_COLUMNS}

    def around(column: str, values: np.ndarray, k: float, label: str) -> None:
        if len(values) and values.std() > 0:
            mean, sd = float(values.mean()), float(values.std())
            lines[column] += [(mean - k * sd, f"{label} − {k:g} SD"), (mean + k * sd, f"{label} + {k:g} SD")]

    if params.mode == "paper":
        lines["n_genes"].append((params.min_genes, f"min {params.min_genes} genes"))
        lines["n_coding_genes"].append((params.min_coding_genes, f"min {params.min_coding_genes}"))
        lines["mito_fraction"].append((params.max_mito_fraction, f"max {params.max_mito_fraction:g}"))
        around("n_genes", metrics["n_genes"].to_numpy(float), params.gene_count_sd, "mean")
    else:
        total = metrics["total_counts"].to_numpy(float)
        nonzero = total > 0
        lines["n_coding_genes"].append((6.5, "more than 6"))
        around("total_counts", total[nonzero], params.zscore, "mean")
        around("mito_fraction", metrics["mito_fraction"].to_numpy(float)[nonzero], params.zscore, "mean")
    return lines


PLOT_COLUMNS = ("n_genes", "n_coding_genes", "total_counts", "mito_fraction")


def plot_qc(report: QcReport, path: Path) -> None:
    """Histograms of the QC metrics (passed and removed cells stacked, log y) with every threshold drawn:
    fixed limits dashed, per-file mean ± k·SD (or |z|) cut-offs dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = pd.concat([f.metrics for f in report.files], ignore_index=True)
    p = report.params
    fig, axes = plt.subplots(1, len(PLOT_COLUMNS), figsize=(4.2 * len(PLOT_COLUMNS), 3.6))
    per_file = [cutoffs(f.metrics, p) for f in report.files]
    for ax, column in zip(axes, PLOT_COLUMNS, strict=True):
        values = metrics[column].to_numpy(float)
        ax.hist(
            [values[metrics["passed"]], values[~metrics["passed"]]],
            bins=60,
            stacked=True,
            label=["passed", "removed"],
            color=["#4c72b0", "#dd8452"],
        )
        ax.set_yscale("log")
        drawn: set[str] = set()
        for lines in per_file:
            for value, label in lines[column]:
                style = ":" if "SD" in label else "--"
                ax.axvline(
                    value,
                    color="black",
                    linestyle=style,
                    linewidth=1,
                    label=None if label in drawn else label,
                )
                drawn.add(label)
        ax.set_xlabel(column)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("cells (log scale)")
    files = f" · {len(report.files)} files (SD cut-offs per file)" if len(report.files) > 1 else ""
    fig.suptitle(f"gc qc ({p.mode} filters): {int(metrics['passed'].sum())}/{len(metrics)} cells pass{files}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
