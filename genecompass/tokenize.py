"""Raw count files → tokenised Zarr corpus (``gc tokenize``).

Python opens the inputs and reads CSR chunks; the Rust core (``genecompass._rust``) normalises, ranks and
truncates each chunk in parallel with the GIL released; ``CorpusWriter`` streams the result to Zarr.
Memory is bounded by the chunk size. Each input becomes a part store (temporary name, renamed when
complete) in a hidden work directory beside the output, so a killed run resumes where it stopped and gives
the same bytes as an uninterrupted one; the parts are then merged into the corpus.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .corpus import Corpus, CorpusWriter, check_output_path, merge_corpora, remove_path
from .errors import FormatError, GcError, InputError
from .medians import Medians

NO_TOKEN = np.iinfo(np.uint32).max
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class TokenizeOptions:
    top_k: int = 2048  # genes kept per cell (the paper's context length)
    library_size: bool = True  # scale each cell to target_sum; False reproduces the original code
    target_sum: float = 1e4
    chunk_size: int = 4096  # cells per chunk handed to Rust: bounds memory (6 reused buffer sets)
    threads: int = 0  # Rust worker threads; 0 = all cores
    allow_non_integer: bool = False
    species: str | None = None  # None = detect from the gene IDs
    layer: str | None = None
    obs_keys: tuple[str, ...] = ()
    min_vocab_fraction: float = 0.25  # refuse inputs whose genes mostly fall outside the vocabulary

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise InputError(f"--top-k must be at least 1, not {self.top_k}")
        if self.chunk_size < 1:
            raise InputError(f"--chunk-size must be at least 1, not {self.chunk_size}")
        if self.species not in (None, "human", "mouse"):
            raise InputError(f"--species must be human or mouse, not {self.species!r}")

    def normalisation(self) -> dict:
        return {"library_size": self.library_size, "target_sum": self.target_sum, "log_base": 2}


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"i/n"`` → (i, n), 0 ≤ i < n."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/n (e.g. 0/8), not {text!r}") from None
    if not 0 <= index < count:
        raise InputError(f"--shard {text}: need 0 <= i < n")
    return index, count


@dataclass
class _Input:
    """One opened input and the slice of it this run tokenises."""

    index: int
    path: Path
    source: object  # genecompass.io.CountSource
    gene_map: object  # genecompass.io.GeneMap
    start: int
    stop: int
    passed: np.ndarray | None  # QC flags over the whole file, or None

    def entry(self) -> dict:
        """How the corpus records this input (also the identity a resumed run checks)."""
        return {
            "path": str(self.path),
            "size": _size_of(self.path),
            "format": self.source.format,
            "species": self.gene_map.species,
            "n_cells_file": self.source.n_cells,
            "cells": [self.start, self.stop],
        }


def _size_of(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file())
    return path.stat().st_size


def _open_inputs(inputs, options, reference, shard, qc) -> list[_Input]:
    from .io import open_counts
    from .qc import QcParams, apply_filters, cell_metrics, load_qc_masks

    if not inputs:
        raise InputError("no input files given")
    paths = [Path(p) for p in inputs]
    sources = [open_counts(path, layer=options.layer) for path in paths]
    n_cells = [s.n_cells for s in sources]
    if isinstance(qc, (str, Path)):
        masks = load_qc_masks(qc, paths, n_cells)
    elif isinstance(qc, QcParams):
        masks = []
        for source in sources:
            metrics = cell_metrics(
                source,
                source.gene_map(reference, options.species),
                chunk_size=options.chunk_size,
                allow_non_integer=options.allow_non_integer,
            )
            masks.append(apply_filters(metrics, qc)[0])
    else:
        masks = [None] * len(sources)
    total = sum(n_cells)
    lo, hi = (
        (0, total) if shard is None else (total * shard[0] // shard[1], total * (shard[0] + 1) // shard[1])
    )
    opened, offset = [], 0
    for index, (path, source, mask) in enumerate(zip(paths, sources, masks)):
        gene_map = source.gene_map(reference, options.species)
        fraction = gene_map.n_in_vocab / max(source.n_genes, 1)
        if fraction < options.min_vocab_fraction:
            raise InputError(
                f"{path}: only {gene_map.n_in_vocab} of {source.n_genes} genes ({fraction:.1%}) are in the "
                f"gene vocabulary (need {options.min_vocab_fraction:.0%}); check --species and that var "
                f"holds gene symbols or Ensembl IDs"
            )
        start, stop = max(lo - offset, 0), min(hi - offset, source.n_cells)
        if start < stop:
            opened.append(_Input(index, path, source, gene_map, start, stop, mask))
        else:
            source.close()
        offset += source.n_cells
    return opened


def _prefetched(iterable, depth: int = 1):
    """Yield the items of ``iterable``, produced by a background thread up to ``depth`` items ahead.

    Reading the next chunk (h5py, decompression) thus overlaps the Rust work on the current one, which
    runs without the GIL. Exceptions reach the consumer in order; leaving the loop early stops the thread
    before returning, so the caller may close the source afterwards. Memory: ``depth`` extra chunks.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterable:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as exc:  # handed to the consumer, re-raised there
            put((done, exc))

    thread = threading.Thread(target=produce, name="gc-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = items.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        thread.join()


def _read_obs(item: _Input, keys: Sequence[str]) -> dict[str, np.ndarray]:
    if not keys:
        return {}
    frame = item.source.read_obs(list(keys))
    return {key: frame[key].to_numpy(object)[item.start : item.stop] for key in keys}


def compute_medians(
    inputs: Sequence[str | Path],
    *,
    options: TokenizeOptions = TokenizeOptions(),
    qc=None,
    reference=None,
    progress: Progress | None = None,
) -> Medians:
    """Per-gene non-zero medians of normalised expression over all (QC-passing) cells of ``inputs``."""
    from .reference import load_reference

    reference = reference or load_reference()
    items = _open_inputs(inputs, options, reference, None, qc)
    try:
        return _medians_of(items, options, reference, progress)
    finally:
        for item in items:
            item.source.close()


def _medians_of(items: list[_Input], options, reference, progress) -> Medians:
    from . import _rust

    accumulator = _rust.MedianAccumulator(reference.vocab_size, options.library_size, options.target_sum)
    total, done = sum(item.stop - item.start for item in items), 0
    for item in items:
        chunks = item.source.iter_chunks(options.chunk_size, item.start, item.stop, reuse=_BUFFER_SETS)
        for chunk in _prefetched(chunks):
            indptr, indices, data = chunk.indptr, chunk.indices, chunk.data
            if item.passed is not None:
                indptr, indices, data = _select_rows(chunk, item.passed[chunk.start : chunk.stop])
            _call_rust(
                item.path,
                chunk,
                accumulator.add_chunk,
                indptr,
                indices,
                data,
                item.gene_map.col_token,
                options.allow_non_integer,
                options.threads,
            )
            done += chunk.stop - chunk.start
            if progress:
                progress(done, total)
    return Medians(
        np.asarray(accumulator.medians(), np.float32),
        np.asarray(accumulator.n_nonzero()),
        reference.hash,
        options.library_size,
        options.target_sum,
    )


def _select_rows(chunk, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a CSR chunk where ``keep`` is true, as (indptr, indices, data)."""
    row_lengths = np.diff(chunk.indptr)
    entries = np.repeat(keep, row_lengths)
    indptr = np.concatenate([[0], np.cumsum(row_lengths[keep])]).astype(np.int64)
    return indptr, chunk.indices[entries], chunk.data[entries]


def _call_rust(path: Path, chunk, function, *args):
    from . import _rust

    try:
        return function(*args)
    except (_rust.InvalidCountError, _rust.MalformedMatrixError) as exc:
        raise InputError(
            f"{path}: {exc} (in the chunk of cells starting at row {chunk.start}); "
            + ("pass --allow-non-integer for normalised data" if "integer" in str(exc) else "fix the input")
        ) from None


#: Buffer sets a streaming pass cycles through. Input chunks: the one being tokenised, the one waiting in
#: the prefetch queue (depth 1) and the one being read. Tokens: the chunk being tokenised and the one the
#: writer may still be compressing (at most one waits, see ``_tokenize_part``).
_BUFFER_SETS = 3


def iter_tokenized(item: _Input, medians: Medians, options: TokenizeOptions, *, reuse_buffers: bool = False):
    """Tokenise the cells of ``item`` in Rust, one chunk at a time.

    Yields (chunk, offsets, genes, values, n_expressed) per chunk. The next chunk is read in a background
    thread while Rust works on the current one. ``reuse_buffers``: input chunks and token arrays live in
    a few buffers used in turn (no fresh memory per chunk), so a chunk's arrays are valid only until the
    generator has advanced :data:`_BUFFER_SETS` - 1 more times; a consumer that keeps them must copy.
    """
    from . import _rust

    chunks = item.source.iter_chunks(
        options.chunk_size, item.start, item.stop, reuse=_BUFFER_SETS if reuse_buffers else 0
    )
    token_buffers: list[tuple[np.ndarray | None, np.ndarray | None]] = [(None, None)] * _BUFFER_SETS
    for k, chunk in enumerate(_prefetched(chunks)):
        genes_out, values_out = token_buffers[k % _BUFFER_SETS]
        n_entries = len(chunk.indices)
        if reuse_buffers and (genes_out is None or len(genes_out) < n_entries):
            # with headroom, so that the slightly larger chunks that follow fit too
            genes_out = np.empty(n_entries + n_entries // 4, np.uint32)
            values_out = np.empty(n_entries + n_entries // 4, np.float32)
        offsets, token_slots, value_slots, n_expressed, _ = _call_rust(
            item.path,
            chunk,
            _rust.tokenize_chunk,
            chunk.indptr,
            chunk.indices,
            chunk.data,
            item.gene_map.col_token,
            medians.values,
            options.top_k,
            options.library_size,
            options.target_sum,
            options.allow_non_integer,
            options.threads,
            genes_out,
            values_out,
        )
        if reuse_buffers:
            token_buffers[k % _BUFFER_SETS] = (token_slots, value_slots)
        n_tokens = int(offsets[-1])  # the slots hold one token per stored entry, the first n_tokens used
        genes, values = token_slots[:n_tokens], value_slots[:n_tokens]
        if not reuse_buffers and n_tokens < len(token_slots) // 2:  # mostly genes outside the vocabulary
            genes, values = genes.copy(), values.copy()
        yield chunk, offsets, genes, values, n_expressed


def _tokenize_part(
    item: _Input, part: Path, attrs: dict, medians: Medians, options, on_cells: Callable[[int], None]
) -> None:
    """Tokenise one input's slice into its own store; ``on_cells(n)`` is told of every chunk read."""
    obs = _read_obs(item, options.obs_keys)
    species_code = 0 if item.gene_map.species == "human" else 1
    written = 0
    # Writing (compression) runs in one background thread, overlapping the next chunk's read and
    # tokenisation; at most one chunk waits, so memory stays bounded. One writer thread keeps the order.
    with (
        CorpusWriter(
            part, attrs=attrs, obs_keys=options.obs_keys, gene_medians=medians.values, overwrite=True
        ) as writer,
        ThreadPoolExecutor(max_workers=1) as background,
    ):
        pending: deque = deque()
        chunks = iter_tokenized(item, medians, options, reuse_buffers=True)
        for chunk, offsets, genes, values, n_expressed in chunks:
            lengths = np.diff(offsets)
            rows = slice(chunk.start - item.start, chunk.stop - item.start)
            keep = (
                np.ones(len(lengths), bool) if item.passed is None else item.passed[chunk.start : chunk.stop]
            )
            keep = keep & (lengths > 0)  # a cell with no vocabulary gene carries no information
            if not keep.all():
                token_keep = np.repeat(keep, lengths)
                lengths, genes, values, n_expressed = (
                    lengths[keep],
                    genes[token_keep],
                    values[token_keep],
                    n_expressed[keep],
                )
            n = int(keep.sum())
            pending.append(
                background.submit(
                    writer.append,
                    lengths=lengths,
                    genes=genes,
                    values=values,
                    species=np.full(n, species_code, np.uint8),
                    source=np.zeros(n, np.uint16),
                    n_expressed=n_expressed,
                    obs_codes={
                        key: writer.encode_labels(key, labels[rows][keep]) for key, labels in obs.items()
                    },
                )
            )
            while len(pending) > 1:
                pending.popleft().result()
            written += n
            on_cells(chunk.stop - chunk.start)
        while pending:
            pending.popleft().result()
        writer.attrs["inputs"][0]["n_cells"] = written


def _part_is_complete(part: Path, attrs: dict) -> bool:
    """A part from an earlier run is reused only if it is whole and was made with the same settings."""
    try:
        stored = Corpus(part).attrs
    except FormatError:
        return False
    for key, value in attrs.items():
        if key == "inputs":
            value = [{k: v for k, v in value[0].items() if k != "n_cells"}]
            stored_value = [{k: v for k, v in e.items() if k != "n_cells"} for e in stored.get("inputs", [])]
            if stored_value != value:
                return False
        elif stored.get(key) != value:
            return False
    return True


def tokenize(
    inputs: Sequence[str | Path],
    out: str | Path,
    *,
    options: TokenizeOptions = TokenizeOptions(),
    medians: Medians | str | Path | None = None,
    qc=None,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    reference=None,
    progress: Progress | None = None,
) -> dict:
    """Tokenise count files into a corpus at ``out``.

    ``medians``: a ``Medians``, a medians file, or None to compute them over the inputs first (not allowed
    with ``shard``: every shard must use the same medians). ``qc``: None, a ``QcParams`` (run QC on the fly)
    or a ``gc qc`` output directory. ``shard=(i, n)`` tokenises the i-th of n equal slices of all cells.
    Returns a summary (cells read and written, tokens, seconds, cells/s).
    """
    from .reference import load_reference

    out = Path(out)
    check_output_path(out, overwrite)
    reference = reference or load_reference()
    if shard is not None and medians is None:
        raise InputError(
            "--shard needs --medians: compute them once with `gc corpus medians` so every shard "
            "normalises the same way"
        )
    if options.obs_keys:
        options = replace(options, obs_keys=tuple(dict.fromkeys(options.obs_keys)))
    started = time.perf_counter()
    items = _open_inputs(inputs, options, reference, shard, qc)
    work = out.with_name(f".{out.name}.parts")
    work.mkdir(parents=True, exist_ok=True)
    try:
        for item in items:
            missing = [k for k in options.obs_keys if k not in item.source.obs_columns()]
            if missing:
                raise InputError(
                    f"{item.path}: no obs column(s) {', '.join(missing)}; available: "
                    f"{', '.join(item.source.obs_columns()) or 'none'}"
                )
            if item.passed is not None and not item.passed.any():
                raise InputError(
                    f"{item.path}: every one of its {item.source.n_cells} cells fails QC; see the "
                    f"`gc qc` report, or loosen the thresholds"
                )
        medians = _resolve_medians(medians, items, options, reference, work, progress)
        attrs = {
            "reference_hash": reference.hash,
            "medians_hash": medians.hash,
            "normalisation": options.normalisation(),
            "top_k": options.top_k,
        }
        parts = []
        total = sum(item.stop - item.start for item in items)
        done = 0

        def on_cells(n: int) -> None:
            nonlocal done
            done += n
            if progress:
                progress(done, total)

        for item in items:
            part = work / f"{item.index:05d}.zarr"
            part_attrs = {**attrs, "inputs": [item.entry()]}
            if _part_is_complete(part, part_attrs):
                on_cells(item.stop - item.start)
            else:
                _tokenize_part(item, part, part_attrs, medians, options, on_cells)
            parts.append(part)
        n_written = sum(Corpus(p).n_cells for p in parts)
        if n_written == 0:
            raise InputError(
                f"no cell of {', '.join(map(str, inputs))} has a gene in the vocabulary after QC"
            )
        if len(parts) == 1:
            remove_path(out)
            os.replace(parts[0], out)
        else:
            merge_corpora(parts, out, overwrite=True)
        remove_path(work)
    except GcError:
        remove_path(work)  # bad input: nothing to resume, leave nothing behind
        raise
    finally:
        for item in items:
            item.source.close()
    corpus = Corpus(out)
    seconds = time.perf_counter() - started
    return {
        "out": str(out),
        "n_cells_read": total,
        "n_cells": corpus.n_cells,
        "n_tokens": corpus.n_tokens,
        "seconds": seconds,
        "cells_per_s": total / seconds if seconds > 0 else None,
        "medians_hash": medians.hash,
        "options": asdict(options),
    }


def _resolve_medians(medians, items, options, reference, work: Path, progress) -> Medians:
    """Load given medians, or compute them (cached in the work directory, so a resumed run skips the pass)."""
    if isinstance(medians, (str, Path)):
        source = str(medians)
        medians = Medians.load(medians)
    else:
        source = "medians"
    if medians is None:
        cache, key_file = work / "medians.tsv", work / "medians.inputs.json"
        key = json.dumps([item.entry() for item in items] + [options.normalisation()], sort_keys=True)
        if cache.exists() and key_file.exists() and key_file.read_text() == key:
            medians = Medians.load(cache)
        else:
            medians = _medians_of(items, options, reference, progress)
            medians.save(cache, reference)
            key_file.write_text(key)
    medians.check_compatible(
        reference_hash=reference.hash,
        library_size=options.library_size,
        target_sum=options.target_sum,
        source=source,
    )
    if len(medians.values) != reference.vocab_size:
        raise FormatError(
            f"{source}: holds {len(medians.values)} tokens, the vocabulary has {reference.vocab_size}"
        )
    return medians
