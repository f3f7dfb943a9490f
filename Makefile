# Development tasks. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python

.PHONY: demo test test-compat test-transformers venv demo-deps web-demo trajectory tiny-dimple rl-tiny bench bench-cpu device-check check-layout serve serve-load clean

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

test: venv demo-deps eval-deps
	$(PY) -m pytest -q tests

web-demo: demo-deps
	$(VENV)/bin/dimple-web-demo

trajectory: venv
	$(PY) -m dimple_tools.demos.trajectory --model tiny-dimple --alg-p-threshold 0 --out assets/trajectory.png

# The suite on transformers 4.46.2, the version of the original model card, in a second environment.
$(COMPAT_VENV)/.installed: requirements-compat.txt pyproject.toml
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

# Retrain the shipped tiny model (about 30 minutes of training and 4 of evaluation on two CPU cores, tiny-dimple/build_log.txt).
tiny-dimple: venv
	$(PY) -m dimple_tools.tiny.build

# GRPO on the tiny build's undertrained checkpoint (about 15 minutes): build/rl-tiny/{start,final},
# benchmarks/rl_tiny.{json,png}. Needs the checkpoint `make tiny-dimple` keeps in .cache/tiny-dimple-build.
rl-tiny: venv
	$(PY) -m dimple_tools.tiny.rl

check-layout: venv
	$(PY) -m dimple_tools.checkpoint.layout

# The OpenAI-compatible server on the tiny model (http://127.0.0.1:8000/v1, docs/serving.md).
serve: venv
	$(VENV)/bin/dimple-serve --model tiny-dimple --device cpu

# Throughput of 64 requests at concurrency 16, batched against sequential (CPU, tiny model; docs/serving.md):
# the checkpoint's decoding (about one forward pass per answer), then one token per step.
serve-load: venv
	$(PY) -m dimple_tools.serving.load --model tiny-dimple --device cpu --threads 1 --batch-timeout 0.02
	$(PY) -m dimple_tools.serving.load --model tiny-dimple --device cpu --threads 1 --batch-timeout 0.02 --extra-body '{"alg_p_threshold": 0}'

bench: venv
	$(PY) -m dimple_tools.bench.benchmark

bench-cpu: venv
	$(PY) -m dimple_tools.bench.benchmark --device cpu --tiny

# Issue 26's device check (CUDA tests, then the 7B-shape benchmark, 8 minutes): docs/performance.md
device-check: venv
	bash scripts/device_check.sh benchmarks/device_check

# lmms-eval (requirements-eval.txt) in .venv-eval, which reads .venv's packages through a .pth file as
# test-transformers does: the packages the model runs on stay at .venv's versions (constraints), so torch is not
# installed twice; lmms-eval's other dependencies go into .venv-eval.
.PHONY: eval-deps eval-tiny
EVAL_VENV := .venv-eval
EVAL_PY := $(EVAL_VENV)/bin/python
EVAL_SHARED := torch torchvision transformers tokenizers huggingface-hub accelerate safetensors numpy pillow

$(EVAL_VENV)/.installed: $(VENV)/.installed requirements-eval.txt pyproject.toml
	test -x $(EVAL_PY) || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_PY) -c "import site, sys; open(site.getsitepackages()[0] + '/zz_dimple_venv.pth', 'w').write(sys.argv[1])" \
		"$$($(PY) -c 'import site; print(site.getsitepackages()[0])')"
	$(PY) -c "import sys; from importlib.metadata import version; print('\n'.join(f'{n}=={version(n)}' for n in sys.argv[1:]))" \
		$(EVAL_SHARED) > $(EVAL_VENV)/constraints.txt
	$(EVAL_PY) -m pip install -q --upgrade pip
	$(EVAL_PY) -m pip install -q -r requirements-eval.txt -c $(EVAL_VENV)/constraints.txt
	$(EVAL_PY) -m pip install -q --no-deps -e .
	touch $@

# For tests/test_lmms_eval.py under `make test`: never fails the build (those tests then skip, saying why).
eval-deps: venv
	@$(MAKE) --no-print-directory $(EVAL_VENV)/.installed || \
		echo "eval-deps: could not install requirements-eval.txt into $(EVAL_VENV) (tests/test_lmms_eval.py skips)"

# lmms-eval's command line on the shipped tiny model and the local task `dimple_shapes` (200 generated questions,
# exact match; dimple_tools/evaluation/shapes.py), with the task's settings (the tiny model's: a 48-token canvas,
# confident decoding at 0.9). `EVAL_PROCESSES=2`: two processes on the CPU through `accelerate launch`
# (its `--cpu` launcher starts one process unless through mpirun; `--multi_gpu` with ACCELERATE_USE_CPU=true
# starts N CPU processes). Offline: the task is read from local files and nothing is downloaded.
EVAL_TASKS_DIR ?= .cache/lmms-eval-tasks
EVAL_OUT ?= .cache/lmms-eval-results
EVAL_PROCESSES ?= 1
EVAL_BATCH ?= 8
EVAL_PORT ?= 29517
EVAL_ENV := HF_HOME=$(CURDIR)/.cache/lmms-eval-hf HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1
EVAL_ARGS := --model dimple --model_args pretrained=tiny-dimple,device=cpu --include_path $(EVAL_TASKS_DIR) \
	--tasks dimple_shapes --batch_size $(EVAL_BATCH) --output_path $(EVAL_OUT) --log_samples

eval-tiny: $(EVAL_VENV)/.installed
	$(EVAL_PY) -m dimple_tools.evaluation.shapes --out $(EVAL_TASKS_DIR)
	if [ "$(EVAL_PROCESSES)" = 1 ]; then $(EVAL_ENV) $(EVAL_PY) -m lmms_eval $(EVAL_ARGS); \
	else $(EVAL_ENV) ACCELERATE_USE_CPU=true $(EVAL_PY) -m accelerate.commands.launch --multi_gpu \
		--num_processes $(EVAL_PROCESSES) --main_process_port $(EVAL_PORT) -m lmms_eval $(EVAL_ARGS); fi

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .venv-transformers-* .cache
