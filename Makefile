# Development tasks. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python

.PHONY: demo test test-compat test-transformers venv demo-deps web-demo trajectory tiny-dimple bench bench-cpu device-check check-layout serve serve-load clean

# The pinned development set (requirements-dev.txt) in .venv, and this repository as an editable package
# (`dimple`: the remote-code modules; `dimple_tools`: everything else, with its console scripts).
$(VENV)/.installed: requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/dimple-demo

# The web demo's packages (gradio, selenium) and Debian's chromium + chromedriver for its browser test;
# idempotent, and it never fails the build (the browser test then skips, saying why).
demo-deps: venv
	bash scripts/install_browser.sh

test: venv demo-deps
	$(PY) -m pytest -q tests

web-demo: demo-deps
	$(VENV)/bin/dimple-web-demo

trajectory: venv
	$(PY) -m dimple_tools.trajectory --model tiny-dimple --alg-p-threshold 0 --out assets/trajectory.png

# The suite on transformers 4.46.2, the version of the original model card, in a second environment.
$(COMPAT_VENV)/.installed: requirements-compat.txt
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	$(COMPAT_PY) -m pip install -q -r requirements-compat.txt
	$(COMPAT_PY) -m pip install -q --no-deps -e .
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_PY) -m pytest -q tests

# The suite on other transformers releases: `make test-transformers TRANSFORMERS=4.57.6` (the last 4.x),
# `TRANSFORMERS=5.0.0` (the first 5.x), or 4.49.0 / 4.51.3 / 4.53.3 between them. The venv holds that
# transformers and the tokenizers / huggingface-hub it requires, and reads everything else from .venv
# (a .pth file), so torch is not installed twice.
TRANSFORMERS ?= 4.57.6
TRANSFORMERS_PINS_4.49.0 := transformers==4.49.0 tokenizers==0.21.4 huggingface-hub==0.36.2
TRANSFORMERS_PINS_4.51.3 := transformers==4.51.3 tokenizers==0.21.4 huggingface-hub==0.36.2
TRANSFORMERS_PINS_4.53.3 := transformers==4.53.3 tokenizers==0.21.4 huggingface-hub==0.36.2
TRANSFORMERS_PINS_4.57.6 := transformers==4.57.6 tokenizers==0.22.2 huggingface-hub==0.36.0
TRANSFORMERS_PINS_5.0.0 := transformers==5.0.0 tokenizers==0.22.2 huggingface-hub==1.3.0
OVERLAY_VENV := .venv-transformers-$(TRANSFORMERS)

test-transformers: venv
	@test -n "$(TRANSFORMERS_PINS_$(TRANSFORMERS))" || { echo "TRANSFORMERS must be 4.49.0, 4.51.3, 4.53.3, 4.57.6 or 5.0.0"; exit 2; }
	test -x $(OVERLAY_VENV)/bin/python || $(PYTHON) -m venv $(OVERLAY_VENV)
	$(OVERLAY_VENV)/bin/python -c "import site, sys; open(site.getsitepackages()[0] + '/zz_dimple_venv.pth', 'w').write(sys.argv[1])" \
		"$$($(PY) -c 'import site; print(site.getsitepackages()[0])')"
	$(OVERLAY_VENV)/bin/python -m pip install -q --no-deps $(TRANSFORMERS_PINS_$(TRANSFORMERS))
	$(OVERLAY_VENV)/bin/python -m pip install -q --no-deps -e .
	$(OVERLAY_VENV)/bin/python -m pytest -q tests

# Retrain the shipped tiny model (6.3 minutes on two CPU cores, tiny-dimple/build_log.txt).
tiny-dimple: venv
	$(PY) -m dimple_tools.build_tiny_dimple

check-layout: venv
	$(PY) -m dimple_tools.check_layout

# The OpenAI-compatible server on the tiny model (http://127.0.0.1:8000/v1, docs/serving.md).
serve: venv
	$(VENV)/bin/dimple-serve --model tiny-dimple --device cpu

# Throughput of 64 requests at concurrency 16, batched against sequential (CPU, tiny model; docs/serving.md):
# the checkpoint's decoding (about one forward pass per answer), then one token per step.
serve-load: venv
	$(PY) -m dimple_tools.serve_load --model tiny-dimple --device cpu --threads 1 --batch-timeout 0.02
	$(PY) -m dimple_tools.serve_load --model tiny-dimple --device cpu --threads 1 --batch-timeout 0.02 --extra-body '{"alg_p_threshold": 0}'

bench: venv
	$(PY) -m dimple_tools.bench

bench-cpu: venv
	$(PY) -m dimple_tools.bench --device cpu --tiny

# Issue 26's device check (CUDA tests, then the 7B-shape benchmark, 8 minutes): docs/performance.md
device-check: venv
	bash scripts/device_check.sh benchmarks/device_check

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .venv-transformers-* .cache
