# Development tasks. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python

.PHONY: demo test test-compat venv demo-deps web-demo trajectory tiny-dimple bench bench-cpu check-layout clean

# The pinned development set (requirements-dev.txt) in .venv; reinstalled when the pins change.
$(VENV)/.installed: requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) demo.py

# The web demo's packages (gradio, selenium) and Debian's chromium + chromedriver for its browser test;
# idempotent, and it never fails the build (the browser test then skips, saying why).
demo-deps: venv
	bash scripts/install_browser.sh

test: venv demo-deps
	$(PY) -m pytest -q tests

web-demo: demo-deps
	$(PY) app.py

trajectory: venv
	$(PY) scripts/trajectory.py --model tiny-dimple --alg-p-threshold 0 --out assets/trajectory.png

# The suite on transformers 4.46.2, the version of the original model card, in a second environment.
$(COMPAT_VENV)/.installed: requirements-compat.txt
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q -r requirements-compat.txt
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_PY) -m pytest -q tests

# Retrain the shipped tiny model (6.3 minutes on two CPU cores, tiny-dimple/build_log.txt).
tiny-dimple: venv
	$(PY) scripts/build_tiny_dimple.py

check-layout: venv
	$(PY) scripts/check_layout.py

bench: venv
	$(PY) scripts/bench.py

bench-cpu: venv
	$(PY) scripts/bench.py --device cpu --tiny

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .cache
