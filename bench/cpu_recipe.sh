#!/usr/bin/env bash
# The CPU pre-training recipe of issue 14, end to end, from data that ship in pinned packages:
#   data      PBMC3k (bundled) + Kang 2018 control cells -> pretrain.zarr; knowledge tables; Kang stimulated
#             cells (never pre-trained on) kept aside for evaluation
#   pretrain  the untrained copy (`gc model init`, same config and seed = step 0) and `gc pretrain` with
#             bench/configs/cpu_pretrain.yaml (about 55 min on 2 quiet cores)
#   evaluate  zero-shot embeddings (`gc bench embed`), GRN held-out recovery, TF gene classification and
#             Kang cell-type fine-tuning, each for the pre-trained run and its untrained copy
# Usage: bench/cpu_recipe.sh WORKDIR [data|pretrain|evaluate ...]   (default: all three, in order)
# Results land in WORKDIR/results/; bench/RESULTS.md ("The CPU recipe") reports them.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
work=$(realpath -m "$1")
shift
stages=("$@")
[[ ${#stages[@]} -gt 0 ]] || stages=(data pretrain evaluate)
repo=$(cd "$(dirname "$0")/.." && pwd)
config=$repo/bench/configs/cpu_pretrain.yaml
python=${PYTHON:-python}
mkdir -p "$work/results"
cd "$work"

stage_data() {
    local kang
    kang=$("$python" "$repo/scripts/fetch_kang.py")
    "$python" - "$kang" <<'EOF'
import sys
import anndata as ad
kang = ad.read_h5ad(sys.argv[1])
for condition, name in (("control", "kang_control.h5ad"), ("stimulated", "kang_stim.h5ad")):
    kang[kang.obs.condition == condition].copy().write_h5ad(name)
EOF
    gc tokenize "$repo/data/pbmc3k.h5ad" kang_control.h5ad --out pretrain.zarr --obs-keys cell_type --overwrite
    gc knowledge build --corpus pretrain.zarr --out knowledge --overwrite
}

stage_pretrain() {
    gc model init pretrain.zarr --config "$config" --knowledge knowledge --out untrained --overwrite
    gc pretrain pretrain.zarr --config "$config" --knowledge knowledge --out run --overwrite 2>&1 |
        tee results/pretrain.log
}

stage_evaluate() {
    local kang tfs
    kang=$("$python" "$repo/scripts/fetch_kang.py")
    tfs=$("$python" "$repo/scripts/fetch_tf_list.py")
    # Zero-shot: 2,000 Kang cells, k-NN scored on the stimulated ones (never pre-trained on).
    gc bench embed "$kang" --model run --untrained untrained --rows pretrained,untrained,pca \
        --score-key condition --score-value stimulated --batch-key condition --max-cells 2000 \
        --out results/embed --overwrite
    for model in run untrained; do
        rm -f "results/grn_$model.tsv"  # this script's own output; gc never overwrites silently
        gc grn infer pretrain.zarr --model "$model" --tfs "$tfs" --neighbours 200 --max-cells 1000 \
            --out "results/grn_$model.tsv"
        gc grn eval "results/grn_$model.tsv" --reference knowledge/grn_holdout.tsv \
            --exclude knowledge/grn_train.tsv --json > "results/grn_eval_$model.json"
        gc finetune gene-class pretrain.zarr --model "$model" --labels "$tfs" --negatives rest-expressed \
            --folds 5 --max-cells 200 --epochs 1 --out "results/geneclass_$model" --overwrite
    done
    # Fine-tuning: train on Kang control cells, test on stimulated ones; pre-trained vs the same
    # architecture from scratch, same budget.
    gc bench annotate "$kang" --model run --rows pretrained,scratch,hvg-lr --test-key condition \
        --test-value stimulated --epochs 2 --max-length 129 --out results/annotate --overwrite
}

for stage in "${stages[@]}"; do
    case $stage in
        data | pretrain | evaluate) "stage_$stage" ;;
        *) echo "cpu_recipe.sh: unknown stage '$stage' (data, pretrain or evaluate)" >&2; exit 2 ;;
    esac
done
