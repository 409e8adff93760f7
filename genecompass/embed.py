"""Cell (and gene) embeddings from a trained run (``gc embed``).

Cells are tokenised on the fly exactly as the run's training corpus was: the run's gene reference (checked by
hash), its per-gene medians and normalisation, through the same Rust ``tokenize_chunk`` call that
``gc tokenize`` makes, truncated to the run's training length. The input is read in chunks; within a chunk the
cells are sorted by length, cut into batches (``batch_size`` cells, and at most ``max_tokens`` padded tokens),
padded per batch, embedded in eval mode without gradients, and put back in input order. Padding is masked
out of attention, so a cell's embedding does not depend on its batch (batch 1 and batch 64 agree to ~1e-6).

Every cell is embedded, including cells with no vocabulary gene (they are the species token alone; counted
in ``uns["genecompass"]["n_empty_cells"]``). Nothing is subsampled.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

Progress = Callable[[int, int], None]
POOLS = ("species", "mean")
EMBEDDING_KEY = "X_genecompass"
GENES_KEY = "genecompass_genes"
# Zarr format of AnnData stores written by gc embed: 2 is what anndata 0.12 writes by default and what every
# anndata version reads (anndata's v3 writer warns that its sharding defaults are about to change).
ZARR_FORMAT = 2


@dataclass
class CellTokens:
    """Tokenised cells in CSR form: cell i's genes (rank order) are ``genes[offsets[i]:offsets[i + 1]]``.
    ``species_token`` is the species token id (one per cell); the model input is the species token followed
    by the genes."""

    offsets: np.ndarray  # int64 (n + 1,)
    genes: np.ndarray  # uint32 (n_tokens,)
    values: np.ndarray  # float32 (n_tokens,)
    species_token: np.ndarray  # int64 (n,)

    @property
    def n_cells(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Model sequence lengths (species token included)."""
        return np.diff(self.offsets) + 1

    def subset(self, rows: np.ndarray) -> CellTokens:
        rows = np.asarray(rows, np.int64)
        starts, stops = self.offsets[rows], self.offsets[rows + 1]
        take = (
            np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)])
            if len(rows)
            else np.empty(0, int)
        )
        offsets = np.concatenate([[0], np.cumsum(stops - starts)]).astype(np.int64)
        return CellTokens(offsets, self.genes[take], self.values[take], self.species_token[rows])

    @classmethod
    def concatenate(cls, parts: list[CellTokens]) -> CellTokens:
        lengths = np.concatenate([np.diff(p.offsets) for p in parts])
        return cls(
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            np.concatenate([p.genes for p in parts]),
            np.concatenate([p.values for p in parts]),
            np.concatenate([p.species_token for p in parts]),
        )


class TokenStream:
    """An opened input tokenised with a run's normaliser: ``n_cells``, ``obs`` (all obs columns, indexed by
    cell name), ``tokens`` (the vocabulary tokens its genes map to) and ``chunks()`` → ``(start,
    CellTokens)``. Use as a context manager."""

    def __init__(self, data, run, *, reference=None, chunk_size: int = 4096, threads: int = 0, layer=None):
        from .reference import load_reference
        from .tokenize import TokenizeOptions, _open_inputs

        self._tmpdir = None
        if not isinstance(data, (str, Path)):  # an in-memory AnnData: stream it from a temporary h5ad
            self._tmpdir = tempfile.TemporaryDirectory(prefix="gc-embed-")
            path = Path(self._tmpdir.name) / "input.h5ad"
            data.write_h5ad(path)
            data = path
        self.reference = reference or getattr(run, "reference", None) or load_reference()
        check_run_reference(run, self.reference)
        norm = run.normalisation
        self.options = TokenizeOptions(
            top_k=max(1, min(run.top_k, run.max_length - 1)),
            library_size=bool(norm.get("library_size", True)),
            target_sum=float(norm.get("target_sum", 1e4)),
            chunk_size=chunk_size,
            threads=threads,
            layer=layer,
        )
        run.medians.check_compatible(
            reference_hash=self.reference.hash,
            library_size=self.options.library_size,
            target_sum=self.options.target_sum,
            source=f"{run.path}/medians.tsv",
        )
        self.medians = run.medians
        try:
            (self.item,) = _open_inputs([data], self.options, self.reference, None, None)
        except Exception:
            self.close()
            raise
        self.path = Path(data)
        self.n_cells = self.item.source.n_cells
        self.species = self.item.gene_map.species
        self.species_token = int(self.reference.species_token_ids[self.species])
        col_token = self.item.gene_map.col_token
        self.tokens = np.unique(col_token[col_token != np.iinfo(np.uint32).max]).astype(np.int64)

    @property
    def obs(self):
        source = self.item.source
        frame = source.read_obs(source.obs_columns())
        frame.index = frame.index.astype(str)
        return frame

    def chunks(self) -> Iterator[tuple[int, CellTokens]]:
        from .tokenize import iter_tokenized

        for chunk, offsets, genes, values, _ in iter_tokenized(self.item, self.medians, self.options):
            n = chunk.stop - chunk.start
            yield (
                chunk.start,
                CellTokens(
                    np.asarray(offsets, np.int64),
                    np.asarray(genes, np.uint32),
                    np.asarray(values, np.float32),
                    np.full(n, self.species_token, np.int64),
                ),
            )

    def read_all(self) -> CellTokens:
        return CellTokens.concatenate([tokens for _, tokens in self.chunks()])

    def close(self) -> None:
        item = getattr(self, "item", None)
        if item is not None:
            item.source.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_run_reference(run, reference) -> None:
    from .errors import ReferenceMismatchError

    if run.reference_hash != reference.hash:
        raise ReferenceMismatchError(
            f"{run.path}: the model was trained on gene reference {run.reference_hash}, but the installed "
            f"reference is {reference.hash}; token ids would not mean the same genes. Use the gc version the "
            "model was trained with, or re-train on a corpus tokenised with this one"
        )


def length_sorted_batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None) -> list[np.ndarray]:
    """Cell indices sorted by length (longest first, stable) and cut into batches of at most ``batch_size``
    cells and ``max_tokens`` padded tokens (a longer single cell still gets its own batch)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, i = [], 0
    while i < len(order):
        size = batch_size
        if max_tokens is not None:
            size = max(1, min(size, max_tokens // int(lengths[order[i]])))
        batches.append(order[i : i + size])
        i += size
    return batches


def pad_batch(tokens: CellTokens, rows: np.ndarray):
    """Model inputs for ``rows``: (input_ids (B, T) long, values (B, T) float, attention_mask (B, T) bool),
    padded to the longest of these cells."""
    import torch

    lengths = tokens.lengths[rows]
    width = int(lengths.max())
    input_ids = np.zeros((len(rows), width), np.int64)  # 0 = <pad>
    values = np.zeros((len(rows), width), np.float32)
    input_ids[:, 0] = tokens.species_token[rows]
    for b, row in enumerate(rows):
        lo, hi = tokens.offsets[row], tokens.offsets[row + 1]
        input_ids[b, 1 : 1 + hi - lo] = tokens.genes[lo:hi]
        values[b, 1 : 1 + hi - lo] = tokens.values[lo:hi]
    mask = np.arange(width)[None, :] < lengths[:, None]
    return torch.from_numpy(input_ids), torch.from_numpy(values), torch.from_numpy(mask)


class GeneAccumulator:
    """Sums of gene outputs by gene token id (never by position) over all cells, in float64."""

    def __init__(self, tokens: np.ndarray, hidden: int):
        import torch

        self.tokens = np.asarray(tokens, np.int64)
        self.lookup = torch.full(
            (int(self.tokens.max()) + 1 if len(self.tokens) else 1,), -1, dtype=torch.long
        )
        self.lookup[torch.from_numpy(self.tokens)] = torch.arange(len(self.tokens))
        self.sums = torch.zeros(len(self.tokens), hidden, dtype=torch.float64)
        self.counts = torch.zeros(len(self.tokens), dtype=torch.long)

    def add(self, hidden, input_ids, mask) -> None:
        import torch

        genes = hidden[:, 1:][mask[:, 1:]]  # (N, H): real gene positions only
        slots = self.lookup[input_ids[:, 1:][mask[:, 1:]]]  # (N,)
        self.sums.index_add_(0, slots, genes.double())
        self.counts.index_add_(0, slots, torch.ones_like(slots))

    def result(self) -> dict[str, np.ndarray]:
        seen = (self.counts > 0).numpy()
        means = (self.sums[seen] / self.counts[seen].unsqueeze(1).double()).float().numpy()
        return {
            "token_id": self.tokens[seen],
            "embedding": means,
            "n_cells": self.counts.numpy()[seen].astype(np.int64),
        }


def species_outputs(encoder, input_ids, values, mask):
    """The species token's final output (B, H), equal to ``encoder(...).last_hidden_state[:, 0]`` but without
    the last layer's work at the gene positions.

    In the last (post-LayerNorm) block, position 0's output depends on the other positions only through
    their keys and values, so that block computes keys and values for every position and the query,
    attention, output projection and feed-forward for position 0 alone: one layer's cost nearly saved
    (~1/L of the encoder for an L-layer model)."""
    import torch.nn.functional as F

    key_mask = mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    x = encoder.embeddings(input_ids, values)  # (B, T, H)
    for layer in encoder.layers[:-1]:
        x = layer(x, key_mask)
    last = encoder.layers[-1]
    attention = last.attention
    batch, length, hidden = x.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    weight, bias = attention.qkv.weight, attention.qkv.bias  # rows: [query; key; value], each H
    kv = F.linear(x, weight[hidden:], bias[hidden:]).view(batch, length, 2, heads, head_dim)
    k, v = kv.permute(2, 0, 3, 1, 4)  # each (B, heads, T, head_dim)
    first = x[:, :1]  # (B, 1, H)
    q = F.linear(first, weight[:hidden], bias[:hidden]).view(batch, 1, heads, head_dim).transpose(1, 2)
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, heads, 1, head_dim)
    y = last.attention_norm(first + attention.out(attended.transpose(1, 2).reshape(batch, 1, hidden)))
    y = last.feed_forward_norm(y + last.feed_forward(y))  # (B, 1, H)
    return y[:, 0]


def embed_tokens(
    model,
    tokens: CellTokens,
    *,
    pool: str | None = None,
    batch_size: int = 64,
    max_tokens: int | None = None,
    genes: GeneAccumulator | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Cell embeddings (n, H) float32 in input order (``pool``: default the model's ``cell_embedding``),
    computed in length-sorted batches on the model's device, in inference mode. The species pool without
    gene outputs skips the last layer's work at the gene positions (``species_outputs``)."""
    import torch

    from .model import pool_cells

    encoder = model.genecompass if hasattr(model, "genecompass") else model
    pool = pool or encoder.config.cell_embedding
    if pool not in POOLS:
        raise InputError(f"--pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, not {batch_size}")
    device = next(encoder.parameters()).device
    out = np.zeros((tokens.n_cells, encoder.config.hidden_size), np.float32)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            for rows in length_sorted_batches(tokens.lengths, batch_size, max_tokens):
                input_ids, values, mask = (t.to(device) for t in pad_batch(tokens, rows))
                if pool == "species" and genes is None:
                    cells = species_outputs(encoder, input_ids, values, mask)  # (B, H)
                else:
                    hidden = encoder(input_ids, values, mask).last_hidden_state  # (B, T, H)
                    cells = pool_cells(hidden, mask, pool)
                    if genes is not None:
                        genes.add(hidden.cpu(), input_ids.cpu(), mask.cpu())
                out[rows] = cells.float().cpu().numpy()
                if on_batch is not None:
                    on_batch(len(rows))
    finally:
        encoder.train(was_training)
    return out


def _embed_stream(
    stream: TokenStream, run, write: Callable, *, pool, genes, batch_size, max_tokens, progress
):
    """Embed every cell of ``stream`` one input chunk at a time, handing each chunk's embeddings (n, H)
    float32 to ``write(start, block)`` in input order. Returns the uns entries: ``genecompass``
    (provenance) and, with ``genes``, ``genecompass_genes``."""
    accumulator = GeneAccumulator(stream.tokens, run.model.config.hidden_size) if genes else None
    total, done, n_empty = stream.n_cells, 0, 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    for start, tokens in stream.chunks():
        n_empty += int((np.diff(tokens.offsets) == 0).sum())
        write(
            start,
            embed_tokens(
                run.model,
                tokens,
                pool=pool,
                batch_size=batch_size,
                max_tokens=max_tokens,
                genes=accumulator,
                on_batch=on_batch,
            ),
        )
    uns = {"genecompass": _provenance(run, pool=pool, batch_size=batch_size, n_cells=total, n_empty=n_empty)}
    if accumulator is not None:
        uns[GENES_KEY] = _gene_table(accumulator, stream.reference)
    return uns


def _provenance(run, *, pool: str, batch_size: int, n_cells: int, n_empty: int) -> dict:
    return {
        "run": str(run.path),
        "reference_hash": run.reference_hash,
        "medians_hash": run.medians_hash,
        "pool": pool,
        "max_length": int(run.max_length),
        "batch_size": int(batch_size),
        "n_cells": int(n_cells),
        "n_empty_cells": int(n_empty),
    }


def _gene_table(accumulator: GeneAccumulator, reference) -> dict[str, np.ndarray]:
    table = accumulator.result()
    table["gene_id"] = np.array(
        [reference.gene_id_of_token(t, None) or "" for t in table["token_id"]], dtype=str
    )
    table["symbol"] = np.array([reference.symbol_of_token(t) or "" for t in table["token_id"]], dtype=str)
    return table


def _prepare(out, overwrite: bool, run, pool: str | None):
    """The output path (checked), the loaded run and the pooling (``None``: the run's ``cell_embedding``)."""
    from .corpus import check_output_path
    from .run import LoadedRun, load_run

    if pool is not None and pool not in POOLS:
        raise InputError(f"--pool must be one of {', '.join(POOLS)}, not {pool!r}")
    if out is not None:
        out = Path(out)
        check_output_path(out, overwrite)
    if not isinstance(run, LoadedRun):
        run = load_run(run)
    return out, run, pool or run.model.config.cell_embedding


def is_zarr_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".zarr"


def embed(
    data,
    run,
    *,
    pool: str | None = None,
    genes: bool = False,
    batch_size: int = 64,
    max_tokens: int | None = None,
    chunk_size: int = 4096,
    layer: str | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
):
    """Embed every cell of ``data`` (an AnnData with raw counts, or a path gc can read) with ``run`` (a
    ``LoadedRun`` or a run directory).

    Returns an AnnData: the input AnnData itself (keys added in place) when one is given; for a path, a new
    AnnData holding the input's obs (all columns) and no genes (``X`` is empty: embeddings only). Keys:

    - ``obsm["X_genecompass"]``: float32 (n_cells, hidden): the mean of the gene outputs (``pool="mean"``)
      or the species-token output (``pool="species"``, the paper's cell embedding); ``None``: the run's
      ``cell_embedding`` (``mean`` for runs made by gc, see bench/RESULTS.md).
    - ``uns["genecompass"]``: provenance: run path, reference hash, medians hash, pool, max_length,
      batch size, n_cells, n_empty_cells (cells with no vocabulary gene: embedded from the species token
      alone).
    - with ``genes=True``, ``uns["genecompass_genes"]``: per-gene embeddings averaged by gene token id over
      every cell expressing the gene among its top genes: ``token_id`` int64 (G,), ``gene_id`` and
      ``symbol`` str (G,), ``embedding`` float32 (G, hidden), ``n_cells`` int64 (G,).

    With ``out``, also writes the result atomically (temporary name, then rename), refusing an existing
    output unless ``overwrite``: h5ad, or an AnnData zarr store when ``out`` ends in ``.zarr``. For a path
    input and a ``.zarr`` output the embeddings are streamed to the store chunk by chunk (see
    ``embed_to_zarr``, which returns only the provenance and keeps memory flat) and the store is read back.
    """
    import anndata as ad
    import pandas as pd

    out, run, pool = _prepare(out, overwrite, run, pool)
    if out is not None and is_zarr_path(out) and isinstance(data, (str, Path)):
        embed_to_zarr(
            data,
            run,
            out=out,
            pool=pool,
            genes=genes,
            batch_size=batch_size,
            max_tokens=max_tokens,
            chunk_size=chunk_size,
            layer=layer,
            overwrite=overwrite,
            progress=progress,
        )
        return ad.read_zarr(out)
    hidden = run.model.config.hidden_size
    with TokenStream(data, run, chunk_size=chunk_size, layer=layer) as stream:
        embeddings = np.zeros((stream.n_cells, hidden), np.float32)

        def write(start: int, block: np.ndarray) -> None:
            embeddings[start : start + len(block)] = block

        uns = _embed_stream(
            stream,
            run,
            write,
            pool=pool,
            genes=genes,
            batch_size=batch_size,
            max_tokens=max_tokens,
            progress=progress,
        )
        if isinstance(data, (str, Path)):
            result = ad.AnnData(obs=stream.obs, var=pd.DataFrame(index=pd.Index([], dtype=str)))
        else:
            result = data
    result.obsm[EMBEDDING_KEY] = embeddings
    result.uns.update(uns)
    if out is not None:
        (write_zarr_atomic if is_zarr_path(out) else write_h5ad_atomic)(result, out)
    return result


def embed_to_zarr(
    data,
    run,
    *,
    out: str | Path,
    pool: str | None = None,
    genes: bool = False,
    batch_size: int = 64,
    max_tokens: int | None = None,
    chunk_size: int = 4096,
    layer: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict:
    """Embed every cell of ``data`` straight into an AnnData zarr store at ``out``, one input chunk at a time:
    memory holds one chunk's embeddings, never the whole matrix.

    The store holds what ``embed(data, run, out="x.h5ad")`` writes for a path input: the input's obs, no
    genes, ``obsm["X_genecompass"]`` (zarr chunks of ``chunk_size`` cells), ``uns["genecompass"]`` and, with
    ``genes``, ``uns["genecompass_genes"]``; ``anndata.read_zarr(out)`` opens it. It is written under a
    temporary name and renamed when whole; an existing ``out`` needs ``overwrite``. Returns
    ``uns["genecompass"]`` plus ``out``, ``embedding_shape`` and (with ``genes``) ``n_genes_embedded``."""
    out, run, pool = _prepare(out, overwrite, run, pool)
    hidden = run.model.config.hidden_size
    with TokenStream(data, run, chunk_size=chunk_size, layer=layer) as stream:
        writer = ZarrEmbeddingWriter(out, stream.obs, stream.n_cells, hidden, chunk_rows=chunk_size)
        try:
            uns = _embed_stream(
                stream,
                run,
                writer.write,
                pool=pool,
                genes=genes,
                batch_size=batch_size,
                max_tokens=max_tokens,
                progress=progress,
            )
            writer.finish(uns)
        except BaseException:
            writer.abort()
            raise
    summary = {"out": str(out), "embedding_shape": [stream.n_cells, hidden], **uns["genecompass"]}
    if genes:
        summary["n_genes_embedded"] = int(len(uns[GENES_KEY]["token_id"]))
    return summary


class ZarrEmbeddingWriter:
    """An AnnData zarr store filled incrementally: obs (and an empty var) first, then
    ``obsm["X_genecompass"]`` rows as they come, uns at the end; written under a temporary sibling name and
    renamed onto ``out`` by ``finish`` (after re-consolidating the metadata anndata reads)."""

    def __init__(self, out: Path, obs, n_cells: int, hidden: int, *, chunk_rows: int):
        import anndata as ad
        import pandas as pd
        import zarr

        from .corpus import remove_path

        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.partial")
        remove_path(self.tmp)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        skeleton = ad.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index([], dtype=str)))
        with _zarr_v2_writes():
            skeleton.write_zarr(self.tmp)  # obs, var and the empty groups, with anndata's encodings
        self.root = zarr.open_group(self.tmp, mode="r+", use_consolidated=False)
        self.array = self.root["obsm"].create_array(
            EMBEDDING_KEY,
            shape=(n_cells, hidden),
            chunks=(max(1, min(chunk_rows, n_cells)), hidden),
            dtype="float32",
        )
        self.array.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})

    def write(self, start: int, block: np.ndarray) -> None:
        self.array[start : start + len(block)] = block

    def finish(self, uns: dict) -> Path:
        import zarr
        from anndata.io import write_elem

        from .corpus import remove_path

        with _zarr_v2_writes():
            for key, value in uns.items():
                write_elem(self.root["uns"], key, value)
        zarr.consolidate_metadata(str(self.tmp))
        remove_path(self.out)  # the caller checked --overwrite
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        from .corpus import remove_path

        remove_path(self.tmp)


@contextlib.contextmanager
def _zarr_v2_writes():
    """anndata writes zarr format ``ZARR_FORMAT`` inside, without its notice that v3 becomes the default."""
    import anndata as ad

    with warnings.catch_warnings(), ad.settings.override(zarr_write_format=ZARR_FORMAT):
        warnings.filterwarnings("ignore", message="Writing zarr v2 data", category=UserWarning)
        yield


def write_h5ad_atomic(adata, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial.h5ad")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def write_zarr_atomic(adata, out: Path) -> Path:
    from .corpus import remove_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    remove_path(tmp)
    try:
        with _zarr_v2_writes():
            adata.write_zarr(tmp)
        remove_path(out)
        os.replace(tmp, out)
    finally:
        remove_path(tmp)
    return out


UMAP_MIN_CELLS = 30  # below this a 15-neighbour graph says little; the plot falls back to PCA


def provenance_caption(provenance: dict | None) -> str:
    """One line naming the model an embedding came from (``uns["genecompass"]``), for a plot's footer."""
    if not provenance:
        return "model: unknown (no uns['genecompass'] provenance)"

    def short(value) -> str:
        return str(value)[:12] if value else "?"

    return (
        f"model: {provenance.get('run', '?')} · reference {short(provenance.get('reference_hash'))} · "
        f"medians {short(provenance.get('medians_hash'))} · pool {provenance.get('pool', '?')} · "
        f"max_length {provenance.get('max_length', '?')}"
    )


def plot_embedding(adata, key: str | None, path: str | Path, *, basis: str = EMBEDDING_KEY) -> str:
    """Scatter plot of the embedding coloured by ``obs[key]``: UMAP (umap-learn, seeded, 15 neighbours) when
    umap-learn is installed (the ``train`` extra) and there are enough cells, else the first two principal
    components (NumPy SVD). The legend is titled with ``key``; the footer names the model (provenance in
    ``uns["genecompass"]``). Returns the method used ("umap" or "pca")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.asarray(adata.obsm[basis], np.float64)
    if key is not None and key not in adata.obs:
        raise InputError(
            f"--plot {key}: no such obs column; available: {', '.join(adata.obs.columns) or 'none'}"
        )
    try:
        if len(x) < UMAP_MIN_CELLS:
            raise ImportError  # too few cells for a neighbour graph: PCA
        import warnings

        import umap

        with warnings.catch_warnings():  # "n_jobs overridden by setting random_state": intended
            warnings.simplefilter("ignore", UserWarning)
            xy = umap.UMAP(n_neighbors=15, random_state=0).fit_transform(x)
        method = "umap"
    except ImportError:
        centred = x - x.mean(0)
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
        xy, method = u[:, :2] * s[:2], "pca"
    fig, ax = plt.subplots(figsize=(7, 6))
    if key is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=3)
    else:
        labels = adata.obs[key].astype(str).to_numpy()
        for label in sorted(set(labels)):
            chosen = labels == label
            ax.scatter(xy[chosen, 0], xy[chosen, 1], s=3, label=f"{label} ({chosen.sum()})")
        ax.legend(markerscale=4, fontsize=7, loc="best", title=f"{key} (cells)", title_fontsize=8)
    ax.set_xlabel(f"{method.upper()} 1")
    ax.set_ylabel(f"{method.upper()} 2")
    ax.set_title(f"GeneCompass cell embeddings ({method.upper()}, {len(x):,} cells)", fontsize=10)
    fig.text(0.01, 0.005, provenance_caption(adata.uns.get("genecompass")), fontsize=6.5, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return method
