#!/usr/bin/env bash
# %post of containers/gc.def: runs as root inside the image during `apptainer build`, on top of the OCI
# image from containers/Dockerfile (gc is already installed in /opt/gc/venv).
set -euo pipefail

GC_VENV=/opt/gc/venv
GC_BIN="${GC_VENV}/bin/gc"

# The image is read-only at run time and runs as the calling user: everything must be world-readable.
if [[ ! -x "${GC_BIN}" ]]; then
    echo "apptainer-post: ${GC_BIN} is missing; build the image from containers/Dockerfile first" >&2
    exit 1
fi
chmod -R a+rX /opt/gc

# Bind-mount points used by the SLURM recipes (containers/slurm/): inputs/outputs at /data, the job's
# shared directory (DeepSpeed hostfile) at /job, node-local scratch at /scratch.
mkdir -p /data /job /scratch
chmod 0777 /data /job /scratch

# Record what was built, and fail the build early if the gc entry point does not start.
"${GC_BIN}" --version | tee /opt/gc/VERSION
if "${GC_VENV}/bin/python" -c 'import torch' 2>/dev/null; then
    "${GC_VENV}/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' \
        | tee -a /opt/gc/VERSION
else
    echo "torch: not installed (CPU image without the [train] extra)" | tee -a /opt/gc/VERSION
fi
