#!/usr/bin/env bash
# Build the CPU variant of containers/Dockerfile on this machine, without a Docker daemon or a container
# registry, and run the pipeline in it with podman: tokenise -> pre-train (10 steps, tiny) -> embed
# (containers/pipeline-check.sh) on a data directory bound from the host, then one SLURM job that runs gc
# inside the image through podman (tests/test_slurm.py::test_recipe_under_slurm_runs_gc_in_the_image_with_podman,
# under the test's localhost SLURM).
#
#   bash containers/check.sh            # build + pipeline + SLURM job (idempotent; reuses cache/container/)
#   bash containers/check.sh --no-slurm # without the SLURM job (e.g. where slurm-wlm is not installed)
#   bash containers/check.sh --export   # also write cache/container/gc-cpu.oci.tar (for `apptainer build`)
#   bash containers/check.sh --from-source  # compile the wheel in the image's own wheel-build stage, with
#                                           # the host's Rust toolchain copied into a local build image
#   bash containers/check.sh --clean    # remove cache/container/ (base rootfs, image storage, wheels)
#
# How (see docs/guide.md, "Containers", and docs/hpc.md):
#   - buildah, podman, runc + debootstrap from Debian's packages (installed if missing; needs root);
#   - base image: a debootstrap'ed minbase Debian trixie rootfs with Debian's CPU build of torch
#     (python3-torch 2.6), g++ and the headers DeepSpeed's JIT-compiled CPU op needs, imported as
#     localhost/debian-torch:trixie-<id of the package list>. It plays the NGC image's part: the Dockerfile pins pip to the base's torch.
#     PyPI's Linux torch wheels are CUDA builds (about 4 GB with their nvidia-* wheels) and no CPU wheel index
#     is reachable from here;
#   - buildah bud --isolation chroot with vfs storage under cache/container/ and a permissive signature policy;
#   - the gc wheel is built on the HOST (`maturin build --release`) and handed to the Dockerfile with
#     WHEEL_SOURCE=context: Debian bookworm's rustc (1.63) is older than the crate's rust-version (1.85) and no
#     other toolchain source is reachable from inside the build, so the image's own wheel-build stage is
#     only exercised on hosts that can pull rust:1-bookworm;
#   - no --layers: with vfs storage every cached layer is a full copy of the image, which made a re-run
#     slower (about 330 s) than building from scratch in one commit;
#   - gc[train] (the default GC_EXTRAS), so the image pre-trains and embeds on CPU;
#   - podman run with the same vfs storage; PODMAN_ARGS default to what this kind of machine needs: runc
#     (crun refuses the hybrid cgroup v1/v2 layout) and explicit, lowered nofile/nproc limits (the sandbox
#     lacks CAP_SYS_RESOURCE, so podman's default limits cannot be set). A normal host needs none of them.
# Environment: VENV (default .venv, for maturin, hadolint and pytest), DEBIAN_MIRROR, GC_CHECK_TAG,
# PODMAN_ARGS, CELLS (cells of PBMC3k for the pipeline, default 300).
set -euo pipefail

start=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ROOT}/cache/container"
VENV="${VENV:-${ROOT}/.venv}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Debian's CPU torch; g++, ninja, python3-dev, libtorch-dev and pybind11-dev (the headers torch/extension.h
# includes) for the CPU op DeepSpeed JIT-compiles on first use.
BASE_PACKAGES="python3-venv,python3-torch,libtorch-dev,pybind11-dev,python3-dev,g++,ninja-build,ca-certificates"
# Debian's torch is built without libuv, which torch.distributed's TCPStore asks for by default since 2.4.
BASE_ENV="USE_LIBUV=0"
BASE_ID="$(printf '%s' "${BASE_PACKAGES} ${BASE_ENV}" | cksum | cut -d' ' -f1)"   # a new package list, a new base
BASE_TAG="localhost/debian-torch:trixie-${BASE_ID}"
CELLS="${CELLS:-300}"
PODMAN_ARGS="${PODMAN_ARGS:---runtime runc --ulimit nofile=16384:16384 --ulimit nproc=16384:16384}"
IMAGE_TAG="${GC_CHECK_TAG:-localhost/gc:cpu}"
HOST_CA=/etc/ssl/certs/ca-certificates.crt

export_oci=0
from_source=0
slurm=1
for arg in "$@"; do
    case "${arg}" in
        --export) export_oci=1 ;;
        --no-slurm) slurm=0 ;;
        --from-source) from_source=1 ;;
        --clean)
            rm -rf "${CACHE}"
            echo "removed ${CACHE}"
            exit 0
            ;;
        *)
            echo "usage: $0 [--export] [--from-source] [--no-slurm] | --clean" >&2
            exit 2
            ;;
    esac
done

log() { printf '\n==> %s (%ds)\n' "$*" "$(($(date +%s) - start))"; }

mkdir -p "${CACHE}/conf" "${CACHE}/wheels"
# One check at a time on this machine (the build is heavy on 2 cores).
exec 9>"${CACHE}/.lock"
if ! flock -n 9; then
    echo "another containers/check.sh is running (lock ${CACHE}/.lock); waiting for it" >&2
    flock 9
fi

# ---- tools -------------------------------------------------------------------------------------------
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then
        echo "need root to apt-get install ${missing[*]} (or install them yourself)" >&2
        exit 1
    fi
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

# ---- lint (cheap; fails before the slow part) ------------------------------------------------------------
hadolint="${VENV}/bin/hadolint"
[[ -x "${hadolint}" ]] || hadolint="$(command -v hadolint || true)"
if [[ -n "${hadolint}" ]]; then
    log "hadolint containers/Dockerfile"
    "${hadolint}" "${ROOT}/containers/Dockerfile"
fi
if command -v shellcheck >/dev/null; then
    log "shellcheck containers/"
    shellcheck "${ROOT}"/containers/*.sh "${ROOT}"/containers/slurm/*.sbatch
fi

# ---- buildah configuration: vfs storage and everything else under cache/container/ -----------------------
cat >"${CACHE}/conf/storage.conf" <<EOF
[storage]
driver = "vfs"
graphroot = "${CACHE}/storage"
runroot = "${CACHE}/run"
EOF
cat >"${CACHE}/conf/registries.conf" <<'EOF'
# Nothing is pulled: the only base image is the local debootstrap import.
unqualified-search-registries = []
short-name-mode = "permissive"
EOF
cat >"${CACHE}/conf/policy.json" <<'EOF'
{"default": [{"type": "insecureAcceptAnything"}]}
EOF
export CONTAINERS_STORAGE_CONF="${CACHE}/conf/storage.conf"
export CONTAINERS_REGISTRIES_CONF="${CACHE}/conf/registries.conf"
export BUILDAH_ISOLATION=chroot
POLICY=(--signature-policy "${CACHE}/conf/policy.json")
bh() { buildah --storage-driver vfs "$@"; }

containers=()
cleanup() {
    local c
    for c in "${containers[@]}"; do
        bh rm "${c}" >/dev/null 2>&1 || true
    done
    # The storage under cache/container/ belongs to this script alone: also drop the working containers
    # buildah bud leaves behind (e.g. for the stage that is only `FROM wheel-${WHEEL_SOURCE}`).
    bh rm --all >/dev/null 2>&1 || true
}
trap cleanup EXIT

# ---- base image: debootstrap minbase trixie + Debian's torch -> localhost/debian-torch:trixie-ID --------
if ! bh inspect --type image "${BASE_TAG}" >/dev/null 2>&1; then
    rootfs="${CACHE}/rootfs-trixie-${BASE_ID}"
    if [[ ! -x "${rootfs}/usr/bin/python3" ]]; then
        log "debootstrap --variant=minbase --include=${BASE_PACKAGES} trixie (${DEBIAN_MIRROR})"
        rm -rf "${rootfs}.tmp"
        debootstrap --variant=minbase --include="${BASE_PACKAGES}" trixie "${rootfs}.tmp" "${DEBIAN_MIRROR}" \
            >"${CACHE}/debootstrap.log" 2>&1 \
            || { tail -20 "${CACHE}/debootstrap.log" >&2; exit 1; }
        mv "${rootfs}.tmp" "${rootfs}"
    fi
    log "importing ${rootfs} as ${BASE_TAG}"
    c=$(bh from "${POLICY[@]}" scratch)
    containers+=("${c}")
    bh copy "${c}" "${rootfs}" / >/dev/null
    bh config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --env "${BASE_ENV}" "${c}"
    bh commit "${POLICY[@]}" --rm "${c}" "${BASE_TAG}" >/dev/null
    containers=()
    # bases of earlier package lists: their rootfs and tags (the images built on them go with the next prune)
    for old in "${CACHE}"/rootfs-*; do
        [[ "${old}" == "${rootfs}" ]] || rm -rf "${old}"
    done
    bh images --format '{{.Name}}:{{.Tag}}' | grep '^localhost/debian-' | grep -vxF "${BASE_TAG}" \
        | xargs -r buildah --storage-driver vfs rmi >/dev/null 2>&1 || true
fi

build_args=(
    --build-arg "BASE_IMAGE=${BASE_TAG}"
)
if ((from_source)); then
    # ---- the wheel-build stage, on a local image holding the host's Rust toolchain ----------------------
    sysroot="$(rustc --print sysroot)"
    rust_tag="localhost/rust-host:$(rustc --version | awk '{print $2}')"
    if ! bh inspect --type image "${rust_tag}" >/dev/null 2>&1; then
        log "making ${rust_tag} from ${sysroot}"
        c=$(bh from "${POLICY[@]}" --pull=never "${BASE_TAG}")
        containers+=("${c}")
        bh copy "${c}" "${sysroot}/bin" /usr/local/rust/bin >/dev/null
        bh copy "${c}" "${sysroot}/lib" /usr/local/rust/lib >/dev/null
        bh config --env PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${c}"
        bh commit "${POLICY[@]}" --rm "${c}" "${rust_tag}" >/dev/null
        containers=()
    fi
    build_args+=(--build-arg "BUILD_IMAGE=${rust_tag}" --build-arg WHEEL_SOURCE=build)
else
    # ---- the gc wheel, built on the host ------------------------------------------------------------
    maturin="${VENV}/bin/maturin"
    if [[ ! -x "${maturin}" ]]; then
        maturin="${CACHE}/maturin-venv/bin/maturin"
        if [[ ! -x "${maturin}" ]]; then
            log "installing maturin into ${CACHE}/maturin-venv"
            python3 -m venv "${CACHE}/maturin-venv"
            "${CACHE}/maturin-venv/bin/pip" install -q "maturin>=1.7,<2"
        fi
    fi
    log "maturin build --release (host; $(rustc --version 2>/dev/null || echo 'rustc not found'))"
    rm -f "${CACHE}"/wheels/*.whl
    (cd "${ROOT}" && "${maturin}" build --release --locked -o "${CACHE}/wheels")
    ls -l "${CACHE}"/wheels/*.whl
    build_args+=(
        --build-arg "BUILD_IMAGE=${BASE_TAG}"   # unused stage; keeps every FROM local
        --build-arg WHEEL_SOURCE=context
        --build-arg WHEEL_DIR=cache/container/wheels
    )
fi

# ---- build the image ---------------------------------------------------------------------------------
volumes=()
if [[ -r "${HOST_CA}" ]]; then
    # Behind a TLS-intercepting proxy pip inside RUN needs the host's CA bundle.
    volumes=(-v "${HOST_CA}:/host-ca.crt:ro")
    build_args+=(--build-arg PIP_CERT=/host-ca.crt)
fi
log "buildah bud -> ${IMAGE_TAG} (CPU variant: BASE_IMAGE=${BASE_TAG}, gc[train], from_source=${from_source})"
bh bud "${POLICY[@]}" --isolation chroot --format docker --layers=false --pull=never \
    -f "${ROOT}/containers/Dockerfile" --ignorefile "${ROOT}/containers/Dockerfile.dockerignore" \
    "${build_args[@]}" "${volumes[@]}" -t "${IMAGE_TAG}" "${ROOT}"

# Without --layers nothing else refers to the previous build's image: drop it (vfs copies are large).
bh rmi --prune >/dev/null 2>&1 || true

# ---- the image's metadata -----------------------------------------------------------------------------
log "image metadata of ${IMAGE_TAG}"
healthcheck=$(bh inspect --type image --format '{{.Docker.Config.Healthcheck.Test}}' "${IMAGE_TAG}")
entrypoint=$(bh inspect --type image --format '{{.Docker.Config.Entrypoint}}' "${IMAGE_TAG}")
user=$(bh inspect --type image --format '{{.Docker.Config.User}}' "${IMAGE_TAG}")
echo "healthcheck: ${healthcheck}; entrypoint: ${entrypoint}; user: ${user}"
[[ "${healthcheck}" == *"gc --version"* || "${healthcheck}" == *"gc"*"--version"* ]] \
    || { echo "image has no HEALTHCHECK running gc --version" >&2; exit 1; }
[[ "${entrypoint}" == "[gc]" ]] || { echo "ENTRYPOINT is not [gc]" >&2; exit 1; }
[[ -n "${user}" && "${user}" != root && "${user}" != 0* ]] || { echo "image runs as root" >&2; exit 1; }

# ---- the pipeline inside the image, with podman and a data directory bound from the host ------------------
read -r -a podman_args <<<"${PODMAN_ARGS}"
pm() { podman --storage-driver vfs "$@"; }
work="${CACHE}/pipeline"
rm -rf "${work}"
mkdir -p "${work}"
log "podman run ${IMAGE_TAG}: containers/pipeline-check.sh on ${CELLS} PBMC3k cells (data/ at /in, ${work} at /data)"
pm run --rm --no-healthcheck --network none --user "$(id -u):$(id -g)" --entrypoint bash "${podman_args[@]}" \
    -v "${ROOT}/data:/in:ro" -v "${ROOT}/containers:/check:ro" -v "${work}:/data" -e DS_ACCELERATOR=cpu \
    "${IMAGE_TAG}" /check/pipeline-check.sh /in/pbmc3k.h5ad /data "${CELLS}"
log "checking the outputs on the host (${work})"
"${VENV}/bin/python" - "${work}" "${CELLS}" <<'EOF'
import csv
import sys
from pathlib import Path

import anndata as ad

work, cells = Path(sys.argv[1]), int(sys.argv[2])
rows = list(csv.DictReader((work / "run" / "train_log.csv").open()))
assert [int(r["step"]) for r in rows] == list(range(1, 11)), rows
emb = ad.read_h5ad(work / "embedded.h5ad").obsm["X_genecompass"]
assert emb.shape == (cells, 64), emb.shape
assert (work / "corpus.zarr").is_dir() and (work / "run" / "model" / "model.safetensors").is_file()
print(f"host sees: {len(rows)} loss rows, embedding {emb.shape[0]} x {emb.shape[1]}")
EOF
owner=$(stat -c %u "${work}/run/train_log.csv")
[[ "${owner}" == "$(id -u)" ]] || { echo "outputs are owned by uid ${owner}, not $(id -u)" >&2; exit 1; }
pipeline_s=$(($(date +%s) - start))

# ---- one SLURM job runs gc inside the image through podman ------------------------------------------------
if ((slurm)); then
    log "SLURM job: pretrain-srun.sbatch with IMAGE=${IMAGE_TAG} (tests/test_slurm.py, localhost SLURM)"
    result="${CACHE}/slurm-podman.log"
    GC_TEST_IMAGE="${IMAGE_TAG}" GC_TEST_PODMAN_ARGS="${PODMAN_ARGS}" \
        "${VENV}/bin/python" -m pytest -q -rs -p no:cacheprovider "${ROOT}/tests/test_slurm.py" \
        -k test_recipe_under_slurm_runs_gc_in_the_image_with_podman 2>&1 | tee "${result}"
    grep -q "1 passed" "${result}" \
        || { echo "the SLURM + podman test did not pass (skipped or failed; see above, --no-slurm to leave it out)" >&2; exit 1; }
fi

if ((export_oci)); then
    log "exporting ${CACHE}/gc-cpu.oci.tar"
    rm -f "${CACHE}/gc-cpu.oci.tar"
    bh push "${POLICY[@]}" "${IMAGE_TAG}" "oci-archive:${CACHE}/gc-cpu.oci.tar"
    echo "apptainer build gc-cpu.sif oci-archive://${CACHE}/gc-cpu.oci.tar  # on a host with Apptainer"
fi

size=$(pm images --format '{{.Size}}' "${IMAGE_TAG}" | head -n1)
bh rmi --prune >/dev/null 2>&1 || true
log "OK: ${IMAGE_TAG} (${size}) built, pipeline run (${pipeline_s} s since the start) and SLURM job in $(($(date +%s) - start)) s"
