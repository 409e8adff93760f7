# The two commands of the README: `make demo` and `make test`. Each sets itself up (virtualenv, Rust
# extension, torch) on a fresh machine of this kind; later runs reuse what is already there.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
GC := $(VENV)/bin/gc
DEMO ?= demo_out
RUST_SOURCES := $(shell find gc_tokenizer_rs -name '*.rs' -o -name Cargo.toml) Cargo.toml
export DS_ACCELERATOR := cpu
# DeepSpeed JIT-compiles its CPU communication op on first use (minutes): cache it per user, not per clone.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/gc/torch_extensions

.PHONY: setup system-deps demo test lint rust-test py-test bench-tokenize container-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(RUST_SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[train,dev]'
	touch $@

demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO)
	$(GC) reference info
	$(GC) reference lookup TP53 Trp53 NR5A1
	$(GC) inspect data/pbmc3k.h5ad
	$(GC) qc data/pbmc3k.h5ad --out $(DEMO)/qc
	$(GC) tokenize data/pbmc3k.h5ad --out $(DEMO)/pbmc3k.zarr --qc-from $(DEMO)/qc --obs-keys cell_type
	$(GC) corpus validate $(DEMO)/pbmc3k.zarr
	$(GC) corpus info $(DEMO)/pbmc3k.zarr
	$(GC) knowledge build --corpus $(DEMO)/pbmc3k.zarr --out $(DEMO)/knowledge
	$(GC) knowledge info $(DEMO)/knowledge
	$(GC) model info --config tiny --knowledge $(DEMO)/knowledge
	$(GC) pretrain $(DEMO)/pbmc3k.zarr --config tiny --knowledge $(DEMO)/knowledge \
		--max-steps 100 --out $(DEMO)/run
	$(GC) embed --model $(DEMO)/run data/pbmc3k.h5ad --out $(DEMO)/pbmc3k_embedded.h5ad --plot cell_type
	$(GC) bench annotate data/pbmc3k.h5ad --model $(DEMO)/run --rows pretrained,hvg-lr --epochs 3 \
		--max-length 129 --out $(DEMO)/annotate
	$(GC) perturb --model $(DEMO)/run $(DEMO)/pbmc3k.zarr --overexpress FCGR3A --level cell-max \
		--cells-key cell_type --source 'CD14 Monocytes' --target 'FCGR3A Monocytes' --max-cells 100 \
		--out $(DEMO)/perturb
	$(GC) perturb screen --model $(DEMO)/run $(DEMO)/pbmc3k.zarr --cells-key cell_type \
		--source 'CD14 Monocytes' --target 'FCGR3A Monocytes' --genes data/demo_screen_genes.txt \
		--max-cells 50 --n-random 5 --out $(DEMO)/screen
	@echo "plots: $(DEMO)/qc/qc.png $(DEMO)/run/loss_curve.png $(DEMO)/pbmc3k_embedded.png" \
		"$(DEMO)/perturb/shifts.png; screen ranking: $(DEMO)/screen/screen.csv"
	@for f in $(DEMO)/qc/qc.png $(DEMO)/run/loss_curve.png $(DEMO)/pbmc3k_embedded.png \
		$(DEMO)/perturb/shifts.png; do test -s $$f || { echo "missing plot: $$f"; exit 1; }; done

# Debian's packages, installed once (as root): shellcheck lints the container scripts (tests/test_containers.py);
# slurm-wlm and munge give tests/test_slurm.py a real localhost SLURM (its fixture starts and stops the daemons).
SYSTEM_PACKAGES := shellcheck slurm-wlm munge
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

lint: setup
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	$(VENV)/bin/ruff check genecompass cli tests scripts bench

rust-test:
	cargo test --all

py-test: setup
	$(PY) -m pytest -q --durations=25   # the slowest tests, for keeping CI under 20 minutes

test: setup system-deps lint rust-test py-test

bench-tokenize: setup
	$(PY) bench/bench_tokenize.py

# Builds the CPU image with buildah (no Docker daemon), runs tokenise -> pre-train -> embed inside it with podman,
# and one SLURM job that runs gc in it through podman (tests/test_slurm.py's localhost SLURM, hence
# system-deps); about 20 minutes, not part of `make test` (docs/hpc.md, section 1).
container-check: setup system-deps
	bash containers/check.sh

clean:
	rm -rf $(VENV) target $(DEMO) cache
