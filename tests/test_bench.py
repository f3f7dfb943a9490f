"""The benchmark's CPU smoke run (`dimple_tools/bench.py --device cpu --tiny`): every decoding setting runs, the
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
        [sys.executable, "-m", "dimple_tools.bench", "--device", "cpu", "--tiny", "--settings",
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


def _bench_module():
    from dimple_tools import bench

    return bench


@pytest.mark.parametrize("name,kind", [
    # CUDA kernel names (their template arguments name cutlass types), and CPU operators
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 64, 64, 4, false, false, cutlass::bfloat16_t>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("nvjet_tst_128x64_64x8_1x1_v_bz_TNT", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>", "gemm"),
    ("aten::addmm", "gemm"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>", "other"),
])
def test_kernels_are_sorted_by_kind(name, kind):
    assert _bench_module().kernel_kind(name) == kind


def test_flop_count_includes_grouped_query_attention():
    import torch
    import torch.nn.functional as F

    batch, heads, kv_heads, q_len, k_len, dim = 2, 8, 2, 5, 7, 16
    q = torch.randn(batch, heads, q_len, dim)
    k, v = torch.randn(batch, kv_heads, k_len, dim), torch.randn(batch, kv_heads, k_len, dim)
    flops = _bench_module().count_flops(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    assert flops == 2 * (2 * batch * heads * q_len * k_len * dim)  # q·kᵀ and p·v
