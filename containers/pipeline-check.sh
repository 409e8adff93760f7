#!/usr/bin/env bash
# The pipeline inside the gc image: tokenise -> pre-train (10 steps, tiny model) -> embed, then check that the
# outputs exist and are sane. One script for both image checks:
#   - containers/check.sh (`make container-check`): podman run, host directories bound at /in (read-only
#     input) and /data (outputs);
#   - containers/gc.def's %test (`apptainer build` / `apptainer test gc.sif`): the bundled PBMC3k, a temporary
#     output directory.
#
#   bash pipeline-check.sh INPUT.h5ad OUT_DIR [CELLS]    # CELLS: the first N cells of INPUT (default 300)
#
# Writes OUT_DIR/{subset.h5ad, corpus.zarr, pretrain.yaml, run/, embedded.h5ad}; exits non-zero with one line
# on stderr naming the first check that failed.
set -euo pipefail

input="${1:?usage: pipeline-check.sh INPUT.h5ad OUT_DIR [CELLS]}"
out="${2:?usage: pipeline-check.sh INPUT.h5ad OUT_DIR [CELLS]}"
cells="${3:-300}"
steps=10
start=$(date +%s)
log() { printf '==> %s (%ds)\n' "$*" "$(($(date +%s) - start))"; }

[[ -f "${input}" ]] || { echo "pipeline-check: input ${input} not found" >&2; exit 1; }
mkdir -p "${out}"
# DeepSpeed JIT-compiles its CPU communication op on first use: a writable cache (the image is read-only
# under Apptainer); an existing TORCH_EXTENSIONS_DIR (a bound host cache) is kept.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${out}/torch_extensions}"
export MPLBACKEND=Agg

gc --version
log "subset: the first ${cells} cells of ${input}"
python - "${input}" "${out}/subset.h5ad" "${cells}" <<'EOF'
import sys

import anndata as ad

src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
adata = ad.read_h5ad(src)
adata[: min(n, adata.n_obs)].copy().write_h5ad(dst)
EOF

log "gc tokenize"
gc tokenize "${out}/subset.h5ad" --out "${out}/corpus.zarr" --obs-keys cell_type --overwrite
gc corpus validate "${out}/corpus.zarr"

log "gc pretrain (${steps} steps, tiny model)"
cat >"${out}/pretrain.yaml" <<EOF
model: tiny
max_length: 129
max_tokens: 1024
warmup_steps: 2
log_every: 1
max_steps: ${steps}
save_every: ${steps}
EOF
gc pretrain "${out}/corpus.zarr" --config "${out}/pretrain.yaml" --out "${out}/run" --overwrite

log "gc embed"
gc embed --model "${out}/run" "${out}/subset.h5ad" --out "${out}/embedded.h5ad" --overwrite

log "checking the outputs"
python - "${out}" "${steps}" <<'EOF'
import csv
import json
import math
import sys
from pathlib import Path

import anndata as ad
import numpy as np

out, steps = Path(sys.argv[1]), int(sys.argv[2])


def fail(message: str) -> None:
    sys.exit(f"pipeline-check: {message}")


rows = list(csv.DictReader((out / "run" / "train_log.csv").open()))
if [int(r["step"]) for r in rows] != list(range(1, steps + 1)):
    fail(f"train_log.csv has steps {[r['step'] for r in rows]}, expected 1..{steps}")
losses = [float(r["loss"]) for r in rows]
if not all(math.isfinite(x) and x > 0 for x in losses):
    fail(f"non-finite or non-positive loss in train_log.csv: {losses}")
if not (out / "run" / "model" / "model.safetensors").is_file():
    fail("run/model/model.safetensors is missing")
hidden = json.loads((out / "run" / "model" / "config.json").read_text())["hidden_size"]
subset = ad.read_h5ad(out / "subset.h5ad", backed="r")
embedded = ad.read_h5ad(out / "embedded.h5ad")
emb = np.asarray(embedded.obsm["X_genecompass"])
if emb.shape != (subset.n_obs, hidden):
    fail(f"embedding shape {emb.shape}, expected ({subset.n_obs}, {hidden})")
if list(embedded.obs_names) != list(subset.obs_names):
    fail("the embedded cells are not the input's cells in input order")
if not np.isfinite(emb).all() or float(emb.std(axis=0).max()) == 0.0:
    fail("the embeddings are non-finite or identical for every cell")
print(
    f"pipeline-check OK: {steps} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
    f"embedding {emb.shape[0]} x {emb.shape[1]}"
)
EOF
log "done"
