# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
SHARED_BOTTLE ?= ../shared/data/mvtec_ad/bottle
DEMO_ADD := $(if $(wildcard $(SHARED_BOTTLE)/train),--add $(SHARED_BOTTLE),)

.PHONY: demo test install clean

install: $(VENV)/.installed

# torch/torchvision are pinned in pyproject.toml (2.14.1 / 0.29.1): pip takes them from local disk.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test,ray]"
	touch $@

demo: install
	$(BIN)/moleflow demo $(DEMO_ADD)

test: install
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
