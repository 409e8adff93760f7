#!/usr/bin/env bash
# Build the CPU variant of containers/Dockerfile on this machine, without a Docker daemon or a container
# registry, and smoke-test it: `gc --version`, `gc tokenize` of the bundled PBMC3k, `gc corpus validate`.
#
#   bash containers/check.sh            # build + smoke test (idempotent; reuses cache/container/)
#   bash containers/check.sh --export   # also write cache/container/gc-cpu.oci.tar (for `apptainer build`)
#   bash containers/check.sh --from-source  # compile the wheel in the image's own wheel-build stage, with
#                                           # the host's Rust toolchain copied into a local build image
#   bash containers/check.sh --clean    # remove cache/container/ (base rootfs, image storage, wheels)
#
# How (see docs/guide.md, "Containers"):
#   - buildah + debootstrap from Debian's packages (installed if missing; needs root);
#   - base image: a debootstrap'ed minbase bookworm rootfs, imported as localhost/debian-min:bookworm;
#   - buildah bud --isolation chroot with vfs storage under cache/container/ and a permissive signature policy;
#   - the gc wheel is built on the HOST (`maturin build --release`) and handed to the Dockerfile with
#     WHEEL_SOURCE=context: Debian bookworm's rustc (1.63) is older than the crate's rust-version (1.85) and no
#     other toolchain source is reachable from inside the build, so the image's own wheel-build stage is
#     only exercised on hosts that can pull rust:1-bookworm;
#   - no --layers: with vfs storage every cached layer is a full copy of the image, which made a re-run
#     slower (about 330 s) than building from scratch in one commit;
#   - GC_EXTRAS="" (no [train] extra): torch from PyPI is a multi-GB CUDA wheel, so the CPU check image holds
#     the tokeniser/QC/corpus commands only; the GPU image (default BASE_IMAGE) installs gc[train].
# Environment: VENV (default .venv, for maturin and hadolint), DEBIAN_MIRROR, GC_CHECK_TAG.
set -euo pipefail

start=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${ROOT}/cache/container"
VENV="${VENV:-${ROOT}/.venv}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
BASE_TAG="localhost/debian-min:bookworm"
IMAGE_TAG="${GC_CHECK_TAG:-localhost/gc:cpu}"
HOST_CA=/etc/ssl/certs/ca-certificates.crt

export_oci=0
from_source=0
for arg in "$@"; do
    case "${arg}" in
        --export) export_oci=1 ;;
        --from-source) from_source=1 ;;
        --clean)
            rm -rf "${CACHE}"
            echo "removed ${CACHE}"
            exit 0
            ;;
        *)
            echo "usage: $0 [--export] [--from-source] | --clean" >&2
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

# ---- base image: debootstrap minbase bookworm -> localhost/debian-min:bookworm ---------------------------
if ! bh inspect --type image "${BASE_TAG}" >/dev/null 2>&1; then
    rootfs="${CACHE}/rootfs-bookworm"
    if [[ ! -x "${rootfs}/bin/bash" ]]; then
        log "debootstrap --variant=minbase bookworm (${DEBIAN_MIRROR})"
        rm -rf "${rootfs}.tmp"
        debootstrap --variant=minbase bookworm "${rootfs}.tmp" "${DEBIAN_MIRROR}" >"${CACHE}/debootstrap.log" 2>&1 \
            || { tail -20 "${CACHE}/debootstrap.log" >&2; exit 1; }
        mv "${rootfs}.tmp" "${rootfs}"
    fi
    log "importing ${rootfs} as ${BASE_TAG}"
    c=$(bh from "${POLICY[@]}" scratch)
    containers+=("${c}")
    bh copy "${c}" "${rootfs}" / >/dev/null
    bh config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${c}"
    bh commit "${POLICY[@]}" --rm "${c}" "${BASE_TAG}" >/dev/null
    containers=()
fi

build_args=(
    --build-arg "BASE_IMAGE=${BASE_TAG}"
    --build-arg GC_EXTRAS=
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
log "buildah bud -> ${IMAGE_TAG} (CPU variant: BASE_IMAGE=${BASE_TAG}, GC_EXTRAS='', from_source=${from_source})"
bh bud "${POLICY[@]}" --isolation chroot --format docker --layers=false --pull=never \
    -f "${ROOT}/containers/Dockerfile" --ignorefile "${ROOT}/containers/Dockerfile.dockerignore" \
    "${build_args[@]}" "${volumes[@]}" -t "${IMAGE_TAG}" "${ROOT}"

# Without --layers nothing else refers to the previous build's image: drop it (vfs copies are large).
bh rmi --prune >/dev/null 2>&1 || true

# ---- smoke test inside the image --------------------------------------------------------------------
log "smoke test in ${IMAGE_TAG}"
c=$(bh from "${POLICY[@]}" --pull=never "${IMAGE_TAG}")
containers+=("${c}")
run() { bh run --isolation chroot "${c}" -- "$@"; }
run id
run gc --version
run gc inspect /opt/gc/data/pbmc3k.h5ad
run gc tokenize /opt/gc/data/pbmc3k.h5ad --out /tmp/pbmc3k.zarr --obs-keys cell_type
run gc corpus validate /tmp/pbmc3k.zarr
healthcheck=$(bh inspect --type image --format '{{.Docker.Config.Healthcheck.Test}}' "${IMAGE_TAG}")
entrypoint=$(bh inspect --type image --format '{{.Docker.Config.Entrypoint}}' "${IMAGE_TAG}")
user=$(bh inspect --type image --format '{{.Docker.Config.User}}' "${IMAGE_TAG}")
echo "healthcheck: ${healthcheck}; entrypoint: ${entrypoint}; user: ${user}"
[[ "${healthcheck}" == *"gc --version"* || "${healthcheck}" == *"gc"*"--version"* ]] \
    || { echo "image has no HEALTHCHECK running gc --version" >&2; exit 1; }
[[ "${entrypoint}" == "[gc]" ]] || { echo "ENTRYPOINT is not [gc]" >&2; exit 1; }
[[ -n "${user}" && "${user}" != root && "${user}" != 0* ]] || { echo "image runs as root" >&2; exit 1; }

if ((export_oci)); then
    log "exporting ${CACHE}/gc-cpu.oci.tar"
    rm -f "${CACHE}/gc-cpu.oci.tar"
    bh push "${POLICY[@]}" "${IMAGE_TAG}" "oci-archive:${CACHE}/gc-cpu.oci.tar"
    echo "apptainer build gc-cpu.sif oci-archive://${CACHE}/gc-cpu.oci.tar  # on a host with Apptainer"
fi

size=$(bh images --format '{{.Size}}' "${IMAGE_TAG}" | head -n1)
log "OK: ${IMAGE_TAG} (${size}) built and smoke-tested in $(($(date +%s) - start)) s"
