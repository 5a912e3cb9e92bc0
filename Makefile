# Every target builds its own virtual environment when it is missing, so a fresh clone needs only python3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Real users get whatever torch pip picks for their machine; CI pins the local CPU build (make TORCH=torch==2.13.0).
TORCH ?= torch
# Where pip gets torch from (and only torch). Empty: the package index's default build, on Linux the CUDA one.
# CPU=1 is short for PyTorch's own index of CPU-only builds.
CPU ?=
TORCH_INDEX ?= $(if $(CPU),https://download.pytorch.org/whl/cpu)
STAMP := $(VENV)/.installed

.PHONY: install test lint format demo bench bench-contention clean cross-tools

$(STAMP): pyproject.toml
	@echo "Installing into $(VENV): $(TORCH)$(if $(TORCH_INDEX), from $(TORCH_INDEX)), tokenizers, safetensors, typer, rich, test tools."
	$(if $(TORCH_INDEX),,@echo "pip picks the torch build: on Linux the CUDA one (~16 NVIDIA packages, a 5.6 GB venv). For the")
	$(if $(TORCH_INDEX),,@echo "CPU-only build (1.1 GB) instead: Ctrl-C, then make $(or $(MAKECMDGOALS),install) CPU=1")
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check gen_cli tests
	$(BIN)/ruff format --check gen_cli tests

format: $(STAMP)
	$(BIN)/ruff format gen_cli tests
	$(BIN)/ruff check --fix gen_cli tests

# One pytest-xdist worker per core: most tests are single-threaded (conftest sets one torch thread), and
# worksteal evens out the few long ones (kernel builds, subprocess runs) at the end.
test: lint cross-tools
	$(BIN)/python -m pytest -n auto --dist worksteal

# The aarch64 cross compiler and qemu-user the kernel's port test runs under (Debian packages, as root);
# elsewhere that one test is skipped and says what to install.
CROSS_PACKAGES := gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
cross-tools:
	@if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "Installing $(CROSS_PACKAGES) for the aarch64 kernel test"; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(CROSS_PACKAGES) >/dev/null \
			|| (apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(CROSS_PACKAGES) >/dev/null) \
			|| echo "could not install $(CROSS_PACKAGES): the aarch64 kernel test will be skipped"; \
	else echo "no aarch64 cross compiler or qemu-user ($(CROSS_PACKAGES)): the aarch64 kernel test will be skipped"; fi

demo: $(STAMP)
	$(BIN)/gen demo

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,bench]"
	$(BIN)/gen bench decode

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# Decode tok/s idle and beside a competing busy process it starts itself, libgomp's spin waits vs gen's passive ones.
bench-contention: $(STAMP)
	$(BIN)/gen bench contention
