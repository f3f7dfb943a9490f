"""The benchmark's CPU smoke run (`scripts/bench.py --device cpu --tiny`): every decoding setting runs, the
JSON holds its numbers and bounds, and the dual cache does less work per pass than prefilling alone."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_cpu_smoke_run_reports_every_setting(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--device", "cpu", "--tiny", "--settings",
         "floor,generate,dual,profile", "--lengths", "64", "--out", str(out), "--plot", "none"],
        capture_output=True, text=True, cwd=str(ROOT), timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])  # the last line is the JSON summary
    assert summary["errors"] == []
    report = json.loads(out.read_text())
    assert report["settings"]["floor"]["matmul_tflop_s"] > 0
    runs = report["settings"]["dual"]["runs"]
    prefill, dual = runs["len64_prefill"], runs["len64_dual_prefill"]
    for run in (prefill, dual, runs["len64_dual"]):
        assert run["masks_left_at_end"] == 0
        assert run["ms_per_pass"] > 0 and run["compute_floor_ms_per_pass"] > 0 and run["ms_per_pass_vs_bound"] > 0
        assert run["first_warmup_ms"] > 0 and run["warmup_steps"] >= 1  # what a first request pays
    # Per pass, the dual cache recomputes a 33-token window instead of the 65-token canvas (plus a refresh per
    # block): fewer FLOPs per pass, counted by torch's FLOP counter.
    assert dual["tflop_per_pass"] < 0.75 * prefill["tflop_per_pass"]
    for mode in report["settings"]["profile"]["modes"].values():  # the steady-state step, by kind of operator
        assert mode["steady_state_passes"] == 16 and mode["kernels_per_pass"] > 0
        assert mode["kernel_ms_per_pass"] == pytest.approx(sum(kind["ms"] for kind in mode["by_kind"].values()), rel=1e-3)
        assert mode["by_kind"]["gemm"]["count"] > 0
    speedups = summary["dual_speedups"]
    assert set(speedups) == {"speedup_len64_dual_vs_prefill", "speedup_len64_dual_prefill_vs_prefill"}
