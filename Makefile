# Quick start: `make demo` and `make test` on a fresh machine with python3 and pip.
# Everything is installed into .venv/ at the repository root.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.onepromptseg-installed
# A CPU build of torch: an unpinned torch would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: demo test bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/onepromptseg demo --out demo_output --device cpu

test: $(STAMP)
	$(BIN)/python -m pytest -q Testing

# The project's benchmark on the shared evaluation data (not part of `make test`).
bench: $(STAMP)
	$(BIN)/onepromptseg-dev bench ../shared/data/eval --transfer --ends --one-step --clicks 5 --json docs/results/bench_eval.json

clean:
	rm -rf $(VENV) demo_output .pytest_cache
