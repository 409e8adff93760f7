"""`gc grn infer` (gene-embedding cosine → edges), `gc grn eval` (AUPRC, early precision vs a reference)."""

from __future__ import annotations

from pathlib import Path

import typer

from . import checks
from .console import (
    JsonOption,
    console,
    existing_paths,
    one_of,
    positional,
    print_json,
    progress_bar,
    warn_unknown,
)

grn_app = typer.Typer(help="Gene regulatory networks from gene embeddings.", no_args_is_help=True)


@grn_app.command("infer")
def infer(
    model: Path = typer.Option(
        ..., "--model", help="A `gc pretrain` run directory (or its model/ directory)."
    ),
    corpus: Path = typer.Argument(..., help="Tokenised corpus (.zarr) from `gc tokenize`."),
    out: Path = typer.Option(
        ..., "--out", help="Edge list (TSV: tf, target, tf_token, target_token, score)."
    ),
    threshold: float | None = typer.Option(
        None, "--threshold", help="Keep pairs with cosine ≥ this (default 0.4)."
    ),
    neighbours: int | None = typer.Option(
        None, "--neighbours", min=1, help="Keep each gene's N most similar genes."
    ),
    top_k: int | None = typer.Option(None, "--top-k", min=1, hidden=True, help="Old name of --neighbours."),
    all_pairs: bool = typer.Option(
        False, "--all-pairs", help="Write every pair (small gene sets; for eval)."
    ),
    genes: Path | None = typer.Option(None, "--genes", help="Restrict to these genes (one per line)."),
    tfs: Path | None = typer.Option(
        None, "--tfs", help="Keep only pairs involving these TFs (one per line)."
    ),
    max_cells: int | None = typer.Option(
        1000, "--max-cells", min=1, help="Cells averaged over (seeded sample)."
    ),
    min_cells: int = typer.Option(10, "--min-cells", min=1, help="Genes must be present in this many cells."),
    seed: int = typer.Option(0, "--seed", min=0),
    max_tokens: int = typer.Option(16384, "--max-tokens", min=64, help="Padded tokens per forward pass."),
    max_length: int | None = typer.Option(
        None,
        "--max-length",
        min=2,
        help="Tokens per cell incl. the species token (default: the model's maximum).",
    ),
    knowledge: Path | None = typer.Option(
        None, "--knowledge", help="Knowledge directory (default: recorded)."
    ),
    as_json: bool = JsonOption,
) -> None:
    """Infer a GRN: cosine between gene embeddings averaged by gene across cells.

    Example: gc grn infer --model runs/tiny pbmc3k.zarr --out edges.tsv --threshold 0.4

    Example (each gene's 10 nearest genes): gc grn infer --model runs/tiny pbmc3k.zarr --out knn.tsv
    --neighbours 10
    """
    from genecompass.errors import InputError
    from genecompass.grn import gene_embeddings, infer_edges, write_edges
    from genecompass.perturb import load_model, read_gene_file, resolve_gene_list

    # Everything a user can get wrong is checked before the model stack (torch) is imported.
    top_k = one_of(neighbours, top_k, "--neighbours", "--top-k")
    if sum([threshold is not None, top_k is not None, all_pairs]) > 1:
        raise InputError("give at most one of --threshold, --neighbours, --all-pairs")
    reference = checks.model(model)  # the gene reference the model's token ids belong to
    gene_tokens = tf_tokens = None
    if genes:
        gene_tokens, unknown = resolve_gene_list(read_gene_file(genes), reference, source=str(genes))
        warn_unknown(unknown, genes)
    if tfs:
        tf_tokens, unknown = resolve_gene_list(read_gene_file(tfs), reference, source=str(tfs))
        warn_unknown(unknown, tfs)
    checks.knowledge(knowledge, reference=reference)
    checks.corpus(corpus)
    encoder = load_model(model, knowledge_dir=knowledge)
    with progress_bar("gene embeddings") as update:
        tokens, embeddings, _ = gene_embeddings(
            encoder,
            corpus,
            max_cells=max_cells,
            min_cells=min_cells,
            genes=gene_tokens,
            seed=seed,
            max_tokens=max_tokens,
            max_length=max_length,
            progress=update,
        )
    if len(tokens) < 2:
        raise InputError(
            f"{corpus}: fewer than two genes pass --min-cells {min_cells}; lower it or add cells"
        )
    cut = None if all_pairs or top_k is not None else (0.4 if threshold is None else threshold)
    edges = infer_edges(
        tokens, embeddings, threshold=cut, top_k=top_k, tf_tokens=tf_tokens, reference=reference
    )
    write_edges(edges, out, tokens)
    summary = {
        "edges": int(len(edges)),
        "genes": int(len(tokens)),
        "out": str(out),
        "genes_file": f"{out}.genes.txt",
    }
    if as_json:
        print_json(summary)
        return
    console.print(f"{len(edges):,} edges among {len(tokens):,} genes → {out}")


@grn_app.command("eval")
def evaluate(
    edges: Path | None = typer.Argument(
        None, metavar="EDGES", help="Edge list from `gc grn infer`. Required."
    ),
    edges_option: Path | None = typer.Option(None, "--edges", hidden=True, help="Old spelling of EDGES."),
    reference: Path = typer.Option(
        ..., "--reference", help="Reference edges (TSV with tf_token, target_token), e.g. grn_holdout.tsv."
    ),
    exclude: Path | None = typer.Option(
        None, "--exclude", help="Edges to leave out of the candidates, e.g. the prior's grn_train.tsv."
    ),
    out: Path | None = typer.Option(None, "--out", help="Also write the metrics to this JSON file."),
    as_json: bool = JsonOption,
) -> None:
    """Score inferred edges against held-out reference edges: AUPRC and early precision vs random.

    Example: gc grn eval edges.tsv --reference knowledge/grn_holdout.tsv --exclude knowledge/grn_train.tsv
    --json
    """
    import json

    from genecompass.grn import evaluate as run_eval

    edges = positional(edges, edges_option, "EDGES", "--edges")
    existing_paths([edges, reference] + ([exclude] if exclude else []))
    metrics = run_eval(edges, reference, exclude)
    if out is not None:
        out.write_text(json.dumps(metrics, indent=2))
    if as_json:
        print_json(metrics)
        return
    console.print(
        f"AUPRC {metrics['auprc']:.4f} (random {metrics['auprc_random']:.4f}, "
        f"×{metrics['auprc_ratio']:.2f}) · "
        f"early precision {metrics['early_precision']:.4f} · {metrics['reference_edges']} reference "
        f"edges among "
        f"{metrics['genes']} genes"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(grn_app, name="grn")
