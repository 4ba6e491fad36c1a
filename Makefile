# The targets CI and the README use. PIP_FLAGS picks up the local torch CPU wheel where it exists.
PYTHON ?= python
# the GPU machines' python with torch is python3; gpu-check installs nothing
PYTHON3 ?= python3
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
TORCH ?= torch==2.13.0

.PHONY: install-test install-bench test lint wheel-check bench check format gpu-check kernels \
	test-integrations

install-test:
	$(PYTHON) -m pip install -q $(PIP_FLAGS) "$(TORCH)"
	$(PYTHON) -m pip install -q $(PIP_FLAGS) -e ".[test]"

install-bench:
	$(PYTHON) -m pip install -q $(PIP_FLAGS) "$(TORCH)"
	$(PYTHON) -m pip install -q $(PIP_FLAGS) -e ".[bench]"

lint:
	$(PYTHON) -m ruff check fused_dft tests bench examples
	$(PYTHON) -m ruff format --check fused_dft tests bench examples

test: install-test lint wheel-check
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q

# the wheel and sdist built, the wheel installed alone in a fresh venv outside the checkout and
# run there (import, loss vs reference, a patched training step, the fused-dft commands)
wheel-check:
	$(PYTHON) bench/wheel_check.py

# each trainer's own 3-step SFT with its DFT flag against its adapter, one venv per trainer
# (torch 2.13.0 kept, the trainers pinned in tests/integrations/run_trainers.py; FUSED_DFT_VENVS
# says where, .venvs/ by default). Not in `make test` / .ci/run: installs ~GBs; results in
# docs/integrations.md
test-integrations:
	$(PYTHON) tests/integrations/run_trainers.py

bench: install-bench
	fused-dft bench

check: install-bench
	fused-dft check

# on a machine with a GPU, in order of value (<= 8 min): kernel tests on CUDA, the headline bench
# row, check, the other tests, the rest of the bench (measured / expected), config sweep
gpu-check:
	$(PYTHON3) bench/gpu_check.py

# GPU resources of every kernel (registers, spills, shared memory, tensor cores), no GPU needed
kernels:
	$(PYTHON) -m fused_dft kernels

format:
	$(PYTHON) -m ruff format fused_dft tests bench examples
	$(PYTHON) -m ruff check --fix fused_dft tests bench examples
