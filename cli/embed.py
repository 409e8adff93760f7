"""`gc embed`: cell (and gene) embeddings from a trained run."""

from __future__ import annotations

from pathlib import Path

import typer

from . import checks
from .console import JsonOption, OverwriteOption, console, print_json, progress_bar


def embed(
    data: Path = typer.Argument(
        ..., help="Raw counts: .h5ad, 10x .h5 or matrix directory, AnnData .zarr, .loom."
    ),
    model: Path = typer.Option(..., "--model", help="A run directory from `gc pretrain` (or its model/)."),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Output .h5ad, or .zarr (an AnnData zarr store written chunk by chunk as cells are embedded, "
        "so memory stays flat): obs of the input + obsm['X_genecompass'].",
    ),
    pool: str | None = typer.Option(
        None,
        "--pool",
        help="mean: mean of the gene outputs; species: output at the species token (the paper). "
        "Default: the run's own cell_embedding (mean for runs gc pre-trains).",
    ),
    genes: bool = typer.Option(
        False,
        "--genes",
        help="Also per-gene embeddings, averaged by gene ID across cells (uns['genecompass_genes']).",
    ),
    batch_size: int = typer.Option(
        64, "--batch-size", min=1, help="Cells per batch (results do not depend on it)."
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", min=1, help="Also cap padded tokens per batch (bounds memory for long cells)."
    ),
    plot: str | None = typer.Option(
        None,
        "--plot",
        help="Write OUT.png coloured by this obs key: a seeded UMAP (umap-learn), or the first two "
        "principal components without umap-learn or for under 30 cells.",
    ),
    overwrite: bool = OverwriteOption,
    as_json: bool = JsonOption,
) -> None:
    """Embed every cell of a count file with a trained GeneCompass run.

    Cells are tokenised on the fly with the run's own gene reference (checked by hash) and medians, embedded
    in length-sorted batches, and written in input order; no cell is dropped or subsampled.

    Example: gc embed --model runs/tiny data/pbmc3k.h5ad --out pbmc3k_emb.h5ad --plot cell_type

    Example (streamed to an AnnData zarr store; read it with anndata.read_zarr): gc embed --model runs/tiny
    big.h5ad --out big_emb.zarr
    """
    from genecompass.embed import embed as run_embed
    from genecompass.embed import embed_to_zarr, is_zarr_path, plot_embedding
    from genecompass.errors import InputError

    # Everything a user can get wrong is checked before the model stack (torch) is imported.
    if pool is not None and pool not in ("species", "mean"):
        raise InputError(f"--pool must be species or mean, not {pool!r}")
    checks.trained_run(model)
    checks.count_file(data, obs_keys=[plot])
    checks.output(out, overwrite)
    streamed = is_zarr_path(out)
    with progress_bar("embed") as update:
        arguments = dict(
            pool=pool,
            genes=genes,
            batch_size=batch_size,
            max_tokens=max_tokens,
            out=out,
            overwrite=overwrite,
            progress=update,
        )
        if streamed:
            summary = embed_to_zarr(data, model, **arguments)
            result = None
        else:
            result = run_embed(data, model, **arguments)
            summary = {
                "out": str(out),
                "embedding_shape": list(result.obsm["X_genecompass"].shape),
                **result.uns["genecompass"],
            }
            if genes:
                summary["n_genes_embedded"] = int(len(result.uns["genecompass_genes"]["token_id"]))
    if plot is not None:
        png = out.with_suffix(".png")
        summary["plot"] = str(png)
        if result is None:
            import anndata as ad

            result = ad.read_zarr(out)
        summary["plot_method"] = plot_embedding(result, plot, png)
    if as_json:
        print_json(summary)
        return
    console.print(
        f"{summary['n_cells']:,} cells → {out} (obsm['X_genecompass'] {tuple(summary['embedding_shape'])}, "
        f"pool {pool})" + (f"; plot: {summary['plot']} ({summary['plot_method']})" if plot else "")
    )


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
