# Entry points: `make demo`, `make test` (everything: lint, import contract, types, the whole suite),
# `make test-fast` (the inner loop: tests not marked slow) and `make test-full-size` (the all-torchvision test with
# GPTQ on every reduced twin and ConvNeXt-T/ViT-B/16 at full size: an hour or more on 2 cores, so `make test` runs
# their reduced twins and skips these unless CBDNET_SLOW=1). Each creates .venv when missing and installs the
# package there at the exact versions of constraints.txt (pyproject.toml itself declares compatible ranges).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_INSTALL := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test test-fast test-full-size lint typecheck bench clean

# setuptools >= 77 reads the SPDX licence fields; tests/project/test_packaging.py builds the wheel with this venv's setuptools
$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP_INSTALL) -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cbdnet demo
	@echo
	@echo "cbdnet is installed in $(VENV): run '$(BIN)/cbdnet --help', or '. $(BIN)/activate' to put cbdnet on PATH."

test: lint typecheck
	$(BIN)/python -m pytest -q

test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow" -n auto --dist loadfile

test-full-size: $(STAMP)
	CBDNET_SLOW=1 $(BIN)/python -m pytest -q tests/zoo/test_torchvision_all.py

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info

# The documentation site (mkdocs.yml, pages in docs/): built into site/ with every warning an error.
DOCS_STAMP := $(VENV)/.installed-docs

$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[dev,docs]'
	touch $(DOCS_STAMP)

.PHONY: docs
docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
