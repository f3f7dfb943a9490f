#!/usr/bin/env bash
# Issue 26's device check, one command (at most 8 minutes on an H200; the CPU dry run under 2):
#   1. the CUDA tests: graph / compile / eager give the same tokens, bf16 CUDA answers = CPU fp32 answers;
#   2. dimple_tools.bench.benchmark on the 7B shape with random bf16 weights, every setting with its own deadline, within
#      what is left of DEVICE_CHECK_SECONDS (450; settings that do not fit are skipped, named in the JSON).
# Results in OUT_DIR (default benchmarks/device_check): cuda_tests.log, bench.json, bench.png; extra arguments go to the bench.
#   bash scripts/device_check.sh benchmarks/h200                      # the GPU session's command
#   bash scripts/device_check.sh /tmp/dry --device cpu --tiny          # the CPU dry run (tests/test_bench.py)
set -u
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/device_check}
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$OUT"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if ! "$PY" -c "import dimple.modeling_dimple, dimple_tools" 2>/dev/null; then  # not installed: the package by a link
  LINK=$(mktemp -d) && ln -s "$PWD" "$LINK/dimple" && export PYTHONPATH="$LINK:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
case " $* " in
  *" --device cpu "*) TOTAL=${DEVICE_CHECK_SECONDS:-100}; TESTS=30 ;;
  *) TOTAL=${DEVICE_CHECK_SECONDS:-450}; TESTS=150 ;;
esac
START=$SECONDS
timeout "$TESTS" "$PY" -m pytest -q -p no:cacheprovider -k cuda \
  tests/test_cuda.py tests/test_decoding_oracles.py tests/test_generation.py > "$OUT/cuda_tests.log" 2>&1
echo "CUDA tests: exit $? ($(tail -n 1 "$OUT/cuda_tests.log"))"
LEFT=$(( TOTAL - (SECONDS - START) ))
timeout $(( LEFT + 30 )) "$PY" -m dimple_tools.bench.benchmark --deadline "$LEFT" --tests-log "$OUT/cuda_tests.log" \
  --out "$OUT/bench.json" "$@"
