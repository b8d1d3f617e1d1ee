# Two commands do everything: `make demo` and `make test`.
# Both create or reuse .venv and install what they need, idempotently: the stamp file
# records that the install ran against the current pyproject.toml / setup.py / native sources.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.sparseferry-installed
NATIVE := $(wildcard csrc/*.c csrc/*.h)

.PHONY: demo test install clean bench

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(NATIVE)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: the local CPU wheel. An open range would pull a multi-GB CUDA build.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sparseferry demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/sparseferry bench --params 1B --budget 30%

clean:
	rm -rf build *.egg-info sparseferry/*.so
