# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch from pip's index; set TORCH= to keep whatever torch the venv already has (a CPU-only or
# another CUDA build).
TORCH ?= torch==2.13.0

.PHONY: install test test-all demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e '.[dev,triton,plot,hf]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

demo: install
	rm -rf runs/demo
	$(VENV)/bin/attnlm train --out runs/demo
	$(VENV)/bin/attnlm generate runs/demo --prompt "The " --max-new-tokens 300

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache build dist
