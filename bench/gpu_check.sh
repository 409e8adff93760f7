#!/usr/bin/env bash
# GPU check of gc on one GPU, from a clean checkout after `make setup` (about 8 minutes on one H100):
#   1. torch sees CUDA (device, bf16, fast SDPA kernels with a padding mask and dropout, NCCL, nvcc);
#   2. `gc pretrain` at the `base` size for STEPS steps in bf16 with SDPA's math fallback forbidden
#      (only flash / memory-efficient / cuDNN attention can run): real tokens/s, peak GPU memory;
#   3. a Geneformer-style step at the same sizes (every cell padded, full-vocabulary logits) for the ratio;
#   4. `gc embed` of PBMC3k with the run from step 2: cells/s;
#   5. `gc pretrain` with ZeRO-2 on the one GPU.
# Writes OUT/gpu_check.json and OUT/gpu_check.md (a table); each step also writes OUT/<step>.json.
#
#   bash bench/gpu_check.sh [--out DIR] [--steps N]
#   bash bench/gpu_check.sh --dry-run [--out DIR]   # CPU, tiny sizes: every code path up to the CUDA calls,
#                                                   # all steps in one process
#
# Environment: VENV (default .venv), STEPS (default 40), ZERO2_STEPS (default 15), GEN_STEPS (default 15).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-${ROOT}/.venv}"
PY="${VENV}/bin/python"
OUT="${ROOT}/bench/gpu_check_out"
STEPS="${STEPS:-40}"
ZERO2_STEPS="${ZERO2_STEPS:-15}"
GEN_STEPS="${GEN_STEPS:-15}"
dry=()

while (($#)); do
    case "$1" in
        --dry-run) dry=(--dry-run) ;;
        --out) OUT="$2"; shift ;;
        --steps) STEPS="$2"; shift ;;
        -h | --help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [[ ! -x "${PY}" ]]; then
    echo "gpu_check: ${PY} not found; run \`make setup\` first" >&2
    exit 1
fi
start=$(date +%s)
log() { printf '\n==> %s (%ds)\n' "$*" "$(($(date +%s) - start))"; }
step() { "${PY}" "${ROOT}/bench/gpu_check.py" "$@" --out "${OUT}" "${dry[@]}"; }

warmup=5
embed_cells=0                                         # 0: all 2,700 PBMC3k cells
if ((${#dry[@]})); then
    # CPU, tiny model: a minute or so. DeepSpeed stays on its CPU accelerator.
    export DS_ACCELERATOR=cpu
    STEPS=4 ZERO2_STEPS=3 GEN_STEPS=3 warmup=1 embed_cells=40
else
    unset DS_ACCELERATOR                              # the Makefile exports cpu for the tests
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    fi
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${HOME}/.cache/gc/torch_extensions}"
mkdir -p "${OUT}"
rm -f "${OUT}"/*.json "${OUT}/gpu_check.md"

if ((${#dry[@]})); then
    log "dry run: tokenise and steps 1-5 in one process"
    step dry-run --steps "${STEPS}" --gen-steps "${GEN_STEPS}" --zero2-steps "${ZERO2_STEPS}" \
        --warmup "${warmup}" --cells "${embed_cells}"
    rm -rf "${OUT}/run_pretrain/checkpoints" "${OUT}/run_zero2/checkpoints"
    log "done: ${OUT}/gpu_check.json, ${OUT}/gpu_check.md"
    exit 0
fi

log "1/5 device"
step device

log "tokenise PBMC3k (not timed)"
"${VENV}/bin/gc" tokenize "${ROOT}/data/pbmc3k.h5ad" --out "${OUT}/pbmc3k.zarr" --overwrite >/dev/null
corpus="${OUT}/pbmc3k.zarr"

log "2/5 gc pretrain (${STEPS} steps, bf16, fast SDPA)"
step pretrain --name pretrain --corpus "${corpus}" --steps "${STEPS}" --warmup "${warmup}" --zero-stage 0

log "3/5 Geneformer-style step (${GEN_STEPS} steps)"
step geneformer --corpus "${corpus}" --steps "${GEN_STEPS}" --warmup "${warmup}"

log "4/5 gc embed"
step embed --run "${OUT}/run_pretrain" --cells "${embed_cells}"

log "5/5 gc pretrain with ZeRO-2 on one GPU (${ZERO2_STEPS} steps)"
step pretrain --name zero2 --corpus "${corpus}" --steps "${ZERO2_STEPS}" --warmup "${warmup}" --zero-stage 2

log "report"
step report
rm -rf "${OUT}/run_pretrain/checkpoints" "${OUT}/run_zero2/checkpoints"   # GiBs at base size
log "done: ${OUT}/gpu_check.json, ${OUT}/gpu_check.md"
