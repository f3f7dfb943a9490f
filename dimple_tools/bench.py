#!/usr/bin/env python
"""Decoding benchmark of Dimple (random weights) against its memory-bandwidth floor and an autoregressive
Qwen2.5-VL of the same shape.

Default (`--device cuda`): the Dimple-7B shape (`DimpleConfig()`) with random bf16 weights, built on the
meta device, materialised with `to_empty` and initialised in place on the GPU (no checkpoint needed).
`--device cpu --tiny` runs the same code paths with a tiny configuration on the CPU in seconds (CI-safe).

The prompt: one image of 256 visual tokens (image_grid_thw [[1, 32, 32]], 1024 random patch rows of 1176
values) wrapped by vision_start / vision_end, plus 40 random text tokens: 298 tokens per row.

Settings (`--settings`, comma list; default all but `compile`, in this order):

  floor     weight bytes ÷ measured device-to-device copy bandwidth (a 2 GiB bf16 `dst.copy_(src)` reads
            and writes, so bandwidth = 2·bytes / time) → the time to read every weight once (memory floor);
            and the rate of one large bf16 matmul (8192³) → with each decode's FLOPs (counted by torch's
            FlopCounterMode in an extra untimed run; attention on the CPU has no FLOP formula and is not
            counted), its compute floor per pass. Every decode reports
            ms per pass ÷ max(memory floor, compute floor) ("x bound"): near 1 it is bound by memory or
            compute, far above by what is neither (launches, small kernels, host work).
  forward   one forward over the prompt + 64 masks: (i) input_ids + pixel_values (vision tower included,
            logits everywhere), (ii) language model only from inputs_embeds with the canvas logits (a decoding
            pass without prefilling), (iii) a prefilled pass (last prompt token + 64 masks against the
            prefix cache). (ii) and (iii) with q/k/v stacked, as decoding runs them; (iii) also with the three
            separate projections. ms and peak memory.
  vision    the vision tower alone, and with the projector. ms.
  generate  `diffusion_generate`, 64 new tokens, alg maskgit_plus, temperature 0, pipeline dim, steps 64,
            with alg_p_threshold 0.95 (confident decoding) and without, each with use_cache True / False;
            plus a run with steps 22 (a forced 22-pass answer, measured). Random weights are never 95 %
            confident, so the threshold runs take the 64-pass schedule too; the tokens/s of a ≤ 22-pass
            confident answer is also given as the estimate 64 / (22 × ms per pass) (marked "derived").
  batch     batch 1 / 4 / 16 (the prompt repeated), use_cache True, 64 tokens: tokens/s over the batch;
            the same with the dual cache (block_length `--block-length`).
  length    answers of 64 and 256 tokens (steps = length), use_cache True: ms per pass, total time.
  dual      the same answers decoded block-wise with Fast-dLLM's dual cache (block_length `--block-length`,
            with and without use_cache), against prefilling alone (the length runs, reused): same steps, so
            the ratio is the per-pass saving of recomputing only the block.
  profile   where a decoding pass's time goes: the steady-state pass (the difference between decodes of 8 and
            24 steps, so the vision tower and the first pass cancel) of prefilling and of the dual cache, eager
            without the CUDA graph (the whole decoding step: forward, scoring, committing): wall ms
            (unprofiled), kernels per pass and their device time by kind
            (GEMM, attention, other); wall − kernel time is launch/host overhead (what the graph removes),
            "other" kernels are what fusion (torch.compile) removes. On the CPU: operators, not kernels.
  compile   (not in the default list) the prefilled 64-token decode and the dual-cache 64 / 256-token decodes
            with `use_torch_compile=True` (compiled during the untimed warm-up), against the same decodes eager
            (reused). Give it its own call: `--settings floor,compile --setting-timeout 540 --run-timeout 300
            --deadline 570` (inside a 600 s device command).
  baseline  transformers' Qwen2_5_VLForConditionalGeneration of the same shape, greedy, 64 tokens
            (min_new_tokens 64), static cache (falls back to a dynamic cache; the JSON says which), plus a
            dynamic-cache run. The Dimple model is freed first so both fit on an 80 GB card.

Every setting is guarded: a failure (or a time-out: `--setting-timeout`, `--run-timeout`, and `--deadline`,
by which every setting must have ended) is recorded in the JSON and the run goes on. The JSON is rewritten
after every setting, so a killed run still leaves its finished settings. Timing: wall clock between device
synchronisations, median of `--repeats` after a warm-up (for decoding, a warm-up of `--warmup-steps` steps
on the same shapes; use `--warmup-steps 0` to warm up with the full decode, e.g. for CUDA graphs captured
per step). The last line printed is the JSON summary.

Run time: the JSON records the run's wall time (`meta.elapsed_s`, repeated as `summary.elapsed_s`) and each
setting's (`settings.<name>.seconds`). On one H100, `benchmarks/h100_bench_before_fused_norm_with_baseline.json`
(floor, forward, vision, generate, batch, length, baseline: the default list before dual and profile were
added) took 154 s, of which the baseline 77 s; `benchmarks/h100_bench.json` (floor to length, no baseline)
took 61 s. No H100 run of today's default list (which adds dual and profile) is recorded; on CUDA `--deadline`
(520 s) bounds it.

Usage:
    python -m dimple_tools.bench                                  # CUDA, 7B shape, all settings but compile (see Run time)
    python -m dimple_tools.bench --settings floor,forward,generate --repeats 5
    python -m dimple_tools.bench --device cpu --tiny              # CPU smoke run (seconds)
    python -m dimple_tools.bench --gen-kwargs '{"use_cuda_graph": false}'   # passed to every diffusion_generate
"""

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import sys
import time
import traceback
import warnings
from contextlib import contextmanager

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from dimple.configuration_dimple import DimpleConfig  # noqa: E402
from dimple.modeling_dimple import DimpleModel  # noqa: E402

SETTINGS = ("floor", "forward", "vision", "generate", "batch", "length", "dual", "profile", "compile", "baseline")
DEFAULT_SETTINGS = tuple(s for s in SETTINGS if s != "compile")  # compiling the 7B shape takes minutes
GIB = 1024**3

# Prompt layout: 20 text tokens, vision_start, 256 image tokens, vision_end, 20 text tokens = 298.
GRID_THW = (1, 32, 32)  # 1024 patches -> 32·32/4 = 256 merged features / image tokens
TEXT_BEFORE, TEXT_AFTER = 20, 20
NEW_TOKENS = 64

# A tiny shape (same structure as tests/tiny_configs.py) whose special ids are small numbers.
TINY_IDS = dict(
    pad_token_id=0, bos_token_id=1, eos_token_id=2, image_token_id=3, video_token_id=4,
    vision_start_token_id=5, vision_end_token_id=6, vision_token_id=7, mask_token_id=8,
)
TINY_VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=14,
    temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1],
    out_hidden_size=64, tokens_per_second=2, hidden_act="silu",
)
TINY_TEXT = dict(
    vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, mrope_section=[2, 3, 3],
)


# --------------------------------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------------------------------


class SettingTimeout(Exception):
    """A whole setting ran past its limit (or past the run's deadline)."""


class RunTimeout(Exception):
    """One decode / generate call inside a setting ran past `--run-timeout` (recorded, the setting goes on)."""


@contextmanager
def time_limit(seconds, exception=SettingTimeout):
    """Raise `exception` in the main thread after `seconds` (0/None = no limit). Nests: an enclosing limit
    keeps running and fires with its own exception if it expires first."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return
    outer_left = signal.setitimer(signal.ITIMER_REAL, 0)[0]  # cancels an enclosing limit, returns its time left
    outer_handler = signal.getsignal(signal.SIGALRM)
    outer_first = bool(outer_left) and outer_left <= seconds
    start = time.monotonic()

    def handler(signum, frame):
        if outer_first and callable(outer_handler):
            outer_handler(signum, frame)
        raise exception(f"ran past its time limit of {seconds:.1f} s")

    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left) if outer_left else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer_left - (time.monotonic() - start)))


class Bench:
    """Device helpers: synchronisation, timing (median of repeats after warm-up), peak memory."""

    def __init__(self, device: torch.device, repeats: int, warmup: int):
        self.device = device
        self.cuda = device.type == "cuda"
        self.repeats = repeats
        self.warmup = warmup

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self):
        if not self.cuda:
            return None
        return torch.cuda.max_memory_allocated(self.device) / GIB

    def allocated_gib(self):
        if not self.cuda:
            return None
        return torch.cuda.memory_allocated(self.device) / GIB

    def time(self, fn, repeats=None, warmup=None, warmup_fn=None):
        """Run `warmup_fn or fn` `warmup` times, then `fn` `repeats` times; wall time per call with a device
        synchronisation before and after (so it covers every kernel the call launched). Returns
        (median seconds, all seconds, last result)."""
        repeats = self.repeats if repeats is None else repeats
        warmup = self.warmup if warmup is None else warmup
        for _ in range(warmup):
            (warmup_fn or fn)()
        self.sync()
        times, out = [], None
        for _ in range(max(1, repeats)):
            self.sync()
            start = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times), times, out


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads visible)"


def round_floats(obj, digits=4):
    if isinstance(obj, float):
        if math.isnan(obj) or math.isinf(obj):
            return None
        return float(f"{obj:.{digits}g}") if abs(obj) < 1e4 else round(obj, 1)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------------
# Model construction (meta device -> to_empty -> in-place init)
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def init_weights_(model: torch.nn.Module, std: float = 0.02):
    """Fast in-place random init on the model's device: normal(0, std) for every ≥ 2-D weight (linear,
    conv, embedding), ones for normalisation weights, zeros for the remaining 1-D parameters (biases)."""
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for _, param in module.named_parameters(recurse=False):
            if is_norm and param.dim() == 1:
                param.fill_(1.0)
            elif param.dim() >= 2:
                param.normal_(0.0, std)
            else:
                param.zero_()


@torch.no_grad()
def rebuild_rotary_buffers_(model: torch.nn.Module, device) -> list:
    """`to_empty` leaves buffers uninitialised. transformers' Qwen2.5-VL keeps rotary `inv_freq` buffers:
    recompute them by building a fresh copy of each rotary module on the CPU and copying its buffers.
    (Dimple has no buffers: its rotary tables are computed in every forward from the config.)"""
    rebuilt = []
    for name, module in model.named_modules():
        if "inv_freq" not in module._buffers:
            continue
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for buffer_name, buffer in fresh._buffers.items():
            if buffer is not None:
                module._buffers[buffer_name] = buffer.to(device)
                rebuilt.append(f"{name}.{buffer_name}")
        for attr in ("attention_scaling",):
            if hasattr(fresh, attr):
                setattr(module, attr, getattr(fresh, attr))
    return rebuilt


def materialise(model: torch.nn.Module, device, dtype):
    """A model built on the meta device -> `dtype` (still meta, free) -> `to_empty(device)` -> init."""
    model = model.to(dtype)
    model = model.to_empty(device=device)
    init_weights_(model)
    return model.eval()


def dimple_config(tiny: bool) -> DimpleConfig:
    if not tiny:
        return DimpleConfig()  # the Dimple-7B shape
    return DimpleConfig(vision_config=dict(TINY_VISION), **TINY_TEXT, **TINY_IDS)


def build_dimple(config: DimpleConfig, device, dtype) -> DimpleModel:
    with torch.device("meta"):
        model = DimpleModel(config)
    model = materialise(model, device, dtype)
    # Dimple registers no buffers (rotary cos/sin are computed per forward), so nothing else to rebuild.
    leftover = [name for name, _ in model.named_buffers()]
    if leftover:
        raise RuntimeError(f"unexpected buffers after to_empty (not initialised): {leftover}")
    return model


def qwen_config(tiny: bool, ids: dict):
    """A transformers Qwen2_5_VLConfig of the same shape as the Dimple model."""
    from transformers import Qwen2_5_VLConfig

    if tiny:
        text = dict(TINY_TEXT)
        mrope = text.pop("mrope_section")
        vision = dict(TINY_VISION)
        special = dict(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    else:
        text = dict(
            vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
        )
        mrope = [16, 24, 24]
        vision = dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, patch_size=14,
            temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
            out_hidden_size=3584, tokens_per_second=2, hidden_act="silu",
        )
        special = dict(bos_token_id=151643, eos_token_id=151645, pad_token_id=151643)
    text.update(
        hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False, use_cache=True,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=mrope), **special,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


# --------------------------------------------------------------------------------------------------
# The prompt
# --------------------------------------------------------------------------------------------------


def make_prompt(ids: dict, vocab_size: int, batch: int, device, pixel_dtype, seed: int = 0):
    """input_ids (batch, 298), pixel_values (batch·1024, 1176) in `pixel_dtype`, image_grid_thw (batch, 3).
    Text ids are random below 151643 (the first special id) on the 7B vocabulary; on the tiny one, random
    ids above the special ids."""
    gen = torch.Generator().manual_seed(seed)
    low, high = (0, 151643) if vocab_size > 151643 else (max(ids.values()) + 1, vocab_size)
    t, h, w = GRID_THW
    n_image = t * h * w // 4
    text = torch.randint(low, high, (TEXT_BEFORE + TEXT_AFTER,), generator=gen)
    row = torch.cat([
        text[:TEXT_BEFORE],
        torch.tensor([ids["vision_start_token_id"]]),
        torch.full((n_image,), ids["image_token_id"]),
        torch.tensor([ids["vision_end_token_id"]]),
        text[TEXT_BEFORE:],
    ])
    pixels = torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=gen)
    input_ids = row.unsqueeze(0).repeat(batch, 1).to(device)
    pixel_values = pixels.repeat(batch, 1).to(device=device, dtype=pixel_dtype)
    image_grid_thw = torch.tensor([GRID_THW] * batch, device=device)
    return input_ids, pixel_values, image_grid_thw


# --------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------


class Context:
    """Everything the settings share: args, bench helpers, the Dimple model (built lazily)."""

    def __init__(self, args, device, dtype):
        self.args = args
        self.device = device
        self.dtype = dtype
        self.bench = Bench(device, args.repeats, args.warmup)
        self.config = dimple_config(args.tiny)
        self.ids = {k: getattr(self.config, k) for k in TINY_IDS}
        self.model = None
        self.build_seconds = None
        extra = args.gen_kwargs  # parse_args gives a dict; a JSON string is accepted too
        self.gen_kwargs = dict(json.loads(extra) if isinstance(extra, str) and extra.strip() else (extra or {}))
        self.partial = {}  # what a setting finished before it failed or timed out
        self.memo = {}  # identical diffusion_generate configurations are timed once per run
        self.current_setting = None
        self.floor_ms = None  # memory floor per pass, set by the floor setting
        self.matmul_flop_s = None  # measured matmul rate, set by the floor setting

    def dimple(self) -> DimpleModel:
        if self.model is None:
            free_memory(self.device)
            start = time.perf_counter()
            self.model = build_dimple(self.config, self.device, self.dtype)
            self.bench.sync()
            self.build_seconds = time.perf_counter() - start
        return self.model

    def free_dimple(self):
        self.model = None
        free_memory(self.device)

    def weight_bytes(self) -> int:
        if self.model is not None:
            return sum(p.numel() * p.element_size() for p in self.model.parameters())
        with torch.device("meta"):
            meta = DimpleModel(self.config).to(self.dtype)
        return sum(p.numel() * p.element_size() for p in meta.parameters())

    def prompt(self, batch=1):
        return make_prompt(self.ids, self.config.vocab_size, batch, self.device, self.dtype)


def run_floor(ctx: Context) -> dict:
    """Weight bytes ÷ device-to-device copy bandwidth."""
    bench = ctx.bench
    weight_bytes = ctx.weight_bytes()
    copy_bytes = ctx.args.copy_gib * GIB if bench.cuda else 16 * 1024**2
    numel = int(copy_bytes // 2)
    src = torch.empty(numel, dtype=torch.bfloat16, device=ctx.device).normal_()
    dst = torch.empty_like(src)
    inner = 10 if bench.cuda else 3

    def copies():
        for _ in range(inner):
            dst.copy_(src)

    seconds, times, _ = bench.time(copies, repeats=max(3, bench.repeats), warmup=1)
    per_copy = seconds / inner
    bandwidth = 2 * numel * 2 / per_copy  # the copy reads and writes every byte
    del src, dst
    free_memory(ctx.device)
    floor_ms = weight_bytes / bandwidth * 1e3
    ctx.floor_ms, ctx.matmul_flop_s = floor_ms, matmul_throughput(ctx)
    return {
        "matmul_tflop_s": ctx.matmul_flop_s / 1e12,
        "weight_bytes": weight_bytes,
        "weight_gib": weight_bytes / GIB,
        "copy_bytes": numel * 2,
        "copy_ms": per_copy * 1e3,
        "copy_bandwidth_tb_s": bandwidth / 1e12,
        "floor_ms": floor_ms,
        "measured": ["copy_ms", "copy_bandwidth_tb_s", "matmul_tflop_s"],
        "derived": {"floor_ms": "weight_bytes / copy_bandwidth (reading every weight once)"},
        "rows": [{"label": "floor: weights ÷ copy BW", "ms_per_pass": floor_ms, "kind": "derived"}],
    }


def matmul_throughput(ctx: Context) -> float:
    """FLOP/s of one large square matmul in the model's dtype: the compute rate a pass can at best reach."""
    n = 8192 if ctx.bench.cuda else 1024
    a = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=ctx.dtype)
    seconds, _, _ = ctx.bench.time(lambda: a @ b, repeats=max(3, ctx.bench.repeats), warmup=2)
    del a, b
    free_memory(ctx.device)
    return 2 * n**3 / seconds


def count_flops(fn) -> int:
    """FLOPs of the matmuls and attention that `fn` dispatches (torch's FlopCounterMode). Attention runs on
    SDPA's math backend here, as plain matrix products: counted the same on every device and torch version
    (older FLOP formulas for the fused kernels reject grouped-query heads; the CPU's has none)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def run_forward(ctx: Context) -> dict:
    model, bench = ctx.dimple(), ctx.bench
    input_ids, pixel_values, grid = ctx.prompt(1)
    prompt_len = input_ids.shape[1]
    mask_id = ctx.config.mask_token_id
    full_ids = torch.cat([input_ids, torch.full((1, NEW_TOKENS), mask_id, device=ctx.device)], dim=1)
    total_len = full_ids.shape[1]
    results, rows = {"prompt_tokens": prompt_len, "sequence_tokens": total_len}, []

    # (i) the plain forward: input_ids + pixel_values (vision tower, M-RoPE positions, all logits).
    bench.reset_peak()
    seconds, times, out = bench.time(lambda: model(input_ids=full_ids, pixel_values=pixel_values, image_grid_thw=grid))
    results["full_with_vision"] = {
        "ms": seconds * 1e3, "all_ms": [t * 1e3 for t in times], "peak_gib": bench.peak_gib(),
        "logits_shape": list(out.logits.shape), "logits_finite": bool(torch.isfinite(out.logits).all()),
    }
    rows.append({"label": "forward: ids+image, all logits", "ms_per_pass": seconds * 1e3, "peak_gib": bench.peak_gib(), "kind": "measured"})
    del out

    # (ii) the language model alone from inputs_embeds, canvas logits only (a decoding pass without prefilling).
    embeds = model.embed_inputs(full_ids[:, :prompt_len], pixel_values, grid)
    embeds = torch.cat([embeds, model.get_input_embeddings()(full_ids[:, prompt_len:])], dim=1)
    position_ids, _ = model.get_rope_index(full_ids, grid)
    keep = slice(prompt_len - 1, total_len - 1)
    bench.reset_peak()
    with model.stacked_qkv_projections():  # as decoding runs it
        seconds, times, _ = bench.time(lambda: model(inputs_embeds=embeds, position_ids=position_ids, logits_to_keep=keep))
    results["lm_only_canvas_logits"] = {"ms": seconds * 1e3, "all_ms": [t * 1e3 for t in times], "peak_gib": bench.peak_gib()}
    rows.append({"label": "forward: LM only (no cache)", "ms_per_pass": seconds * 1e3, "peak_gib": bench.peak_gib(), "kind": "measured"})

    # (iii) a prefilled pass: the last prompt token + the canvas against the prefix cache (what every
    # decoding step after the first runs with use_cache=True). Uses the model's own cache API.
    try:
        cache = model.new_prefix_cache(total_len)
        model(inputs_embeds=embeds, position_ids=position_ids, past_key_values=cache, logits_to_keep=keep)
        tail = prompt_len - 1
        tail_positions = torch.arange(tail, total_len, device=embeds.device)

        def step():
            return model(
                inputs_embeds=embeds[:, tail:], position_ids=position_ids[..., tail:], past_key_values=cache,
                cache_position=tail_positions, logits_to_keep=slice(0, NEW_TOKENS),
            )

        # As decoding runs it (q/k/v stacked), and with the three separate projections, side by side.
        for key, label, stacking in (
            ("prefilled_pass", "forward: prefilled pass (65 q)", model.stacked_qkv_projections),
            ("prefilled_pass_separate_qkv", "forward: prefilled pass, q/k/v unstacked", contextlib.nullcontext),
        ):
            bench.reset_peak()
            with stacking():
                seconds, times, out = bench.time(step)
            results[key] = {
                "ms": seconds * 1e3, "all_ms": [t * 1e3 for t in times], "peak_gib": bench.peak_gib(),
                "query_tokens": total_len - tail, "logits_shape": list(out.logits.shape),
            }
            rows.append({"label": label, "ms_per_pass": seconds * 1e3, "peak_gib": bench.peak_gib(), "kind": "measured"})
            del out
        del cache
    except Exception as error:  # the cache API may change while it is optimised
        results["prefilled_pass"] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    results["rows"] = rows
    return results


@torch.no_grad()
def run_vision(ctx: Context) -> dict:
    model, bench = ctx.dimple(), ctx.bench
    _, pixel_values, grid = ctx.prompt(1)
    bench.reset_peak()
    seconds, times, out = bench.time(lambda: model.visual(pixel_values, grid))
    tower = {"ms": seconds * 1e3, "all_ms": [t * 1e3 for t in times], "peak_gib": bench.peak_gib(), "features": list(out.shape)}
    seconds2, times2, _ = bench.time(lambda: model.get_image_features(pixel_values, grid))
    return {
        "patches": pixel_values.shape[0],
        "vision_tower": tower,
        "vision_tower_plus_projector": {"ms": seconds2 * 1e3, "all_ms": [t * 1e3 for t in times2]},
        "rows": [
            {"label": "vision tower (256 feats)", "ms_per_pass": seconds * 1e3, "peak_gib": tower["peak_gib"], "kind": "measured"},
        ],
    }


def generate_once(ctx: Context, batch: int, new_tokens: int, steps: int, threshold, use_cache: bool, label: str,
                  **decoding) -> dict:
    """Time `diffusion_generate` (median of repeats, after a short warm-up of the same shapes); `decoding`:
    further keyword arguments (block_length, dual_cache)."""
    model, bench = ctx.dimple(), ctx.bench
    input_ids, pixel_values, grid = ctx.prompt(batch)
    kwargs = dict(
        pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=new_tokens, steps=steps,
        alg="maskgit_plus", temperature=0.0, alg_p_threshold=threshold, decoding_pipeline="dim",
        use_cache=use_cache, return_dict_in_generate=True, **decoding,
    )
    kwargs.update(ctx.gen_kwargs)

    def call(**override):
        return model.diffusion_generate(input_ids, **{**kwargs, **override})

    warm_steps = min(steps, ctx.args.warmup_steps) if ctx.args.warmup_steps else steps
    if decoding.get("block_length"):  # two steps per block: a refresh and a window pass (captured on CUDA)
        warm_steps = min(steps, max(warm_steps, 2 * new_tokens // decoding["block_length"]))
    bench.reset_peak()
    # Warnings are kept in the result: a failed CUDA graph capture only warns, and its numbers are then eager.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # The first warm-up is timed alone: what a first request pays (compilation, graph capture).
        first_warmup, _, _ = bench.time(lambda: call(steps=warm_steps), repeats=1, warmup=0)
        seconds, times, out = bench.time(call, warmup=max(0, bench.warmup - 1), warmup_fn=lambda: call(steps=warm_steps))
    passes = getattr(out, "num_forward_passes", None)
    passes_known = passes is not None
    passes = passes if passes_known else steps
    sequences = out.sequences if hasattr(out, "sequences") else out
    masks_left = int((sequences[:, input_ids.shape[1]:] == ctx.config.mask_token_id).sum())
    total_new = batch * new_tokens
    result = {
        "batch": batch, "new_tokens": new_tokens, "steps": steps, "alg_p_threshold": threshold, "use_cache": use_cache,
        **decoding,
        "total_ms": seconds * 1e3, "all_total_ms": [t * 1e3 for t in times],
        "forward_passes": passes, "forward_passes_reported_by_model": passes_known,
        "ms_per_pass": seconds * 1e3 / max(passes, 1),
        "tokens_per_s": total_new / seconds,
        "masks_left_at_end": masks_left,
        "peak_gib": bench.peak_gib(),
        "warmup_steps": warm_steps, "first_warmup_ms": first_warmup * 1e3,
        "kind": "measured (whole diffusion_generate call, vision + every pass + sampling; ms_per_pass = total / passes)",
    }
    if caught:
        result["warnings"] = sorted({str(warning.message)[:300] for warning in caught})
    # The bounds of this decode: reading every weight once per pass (memory floor) and its FLOPs at the
    # measured matmul rate (compute floor), counted in an untimed run without CUDA graphs (a graph replay
    # dispatches no operators to count).
    try:
        flops = count_flops(lambda: call(use_cuda_graph=False, use_torch_compile=False))
    except Exception as error:  # e.g. an older torch without a FLOP formula for this attention kernel
        flops, result["flop_count_error"] = None, f"{type(error).__name__}: {error}"
    if flops:
        result["tflop_per_pass"] = flops / max(passes, 1) / 1e12
    if flops and ctx.matmul_flop_s:
        result["compute_floor_ms_per_pass"] = flops / max(passes, 1) / ctx.matmul_flop_s * 1e3
    if ctx.floor_ms:
        result["memory_floor_ms_per_pass"] = ctx.floor_ms
    bound = max(result.get("compute_floor_ms_per_pass") or 0, ctx.floor_ms or 0)
    if bound:
        result["ms_per_pass_vs_bound"] = result["ms_per_pass"] / bound
    result["row"] = {
        "label": label, "ms_per_pass": result["ms_per_pass"], "passes": passes, "total_ms": result["total_ms"],
        "tokens_per_s": result["tokens_per_s"], "peak_gib": result["peak_gib"], "kind": "measured",
        "vs_bound": result.get("ms_per_pass_vs_bound"),
    }
    return result


def collect_runs(ctx: Context, plans: list) -> dict:
    """Run every (key, kwargs) plan guarded on its own: one failure does not lose the others."""
    runs, rows = {}, []
    ctx.partial.setdefault("runs", runs)  # kept in the JSON if the setting is cut off
    for key, kwargs in plans:
        memo_key = tuple(sorted((k, v) for k, v in kwargs.items() if k != "label"))
        if memo_key in ctx.memo:  # the same decode was already timed in this run (e.g. batch 1 = generate's)
            source, result = ctx.memo[memo_key]
            result = {k: (dict(v) if isinstance(v, dict) else v) for k, v in result.items()}
            result["reused_from"] = source
            result["row"].update(label=kwargs["label"], kind="measured (reused)")
            rows.append(result.pop("row"))
            runs[key] = result
            continue
        try:
            with time_limit(ctx.args.run_timeout, RunTimeout):
                result = generate_once(ctx, **kwargs)
            ctx.memo[memo_key] = (f"{ctx.current_setting}.runs.{key}", {k: (dict(v) if isinstance(v, dict) else v) for k, v in result.items()})
            rows.append(result.pop("row"))
            runs[key] = result
        except SettingTimeout:
            raise
        except Exception as error:
            runs[key] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            free_memory(ctx.device)
    return runs, rows


def run_generate(ctx: Context) -> dict:
    plans = []
    for threshold in (0.95, None):
        for use_cache in (True, False):
            key = f"thr{threshold if threshold else 'none'}_cache{'on' if use_cache else 'off'}"
            label = f"gen64 {'thr.95' if threshold else 'sched'} cache {'on' if use_cache else 'off'}"
            plans.append((key, dict(batch=1, new_tokens=NEW_TOKENS, steps=NEW_TOKENS, threshold=threshold, use_cache=use_cache, label=label)))
    plans.append(("steps22_cache_on", dict(batch=1, new_tokens=NEW_TOKENS, steps=22, threshold=None, use_cache=True, label="gen64 in 22 passes cache on")))
    runs, rows = collect_runs(ctx, plans)
    results = {"runs": runs, "rows": rows}
    schedule = runs.get("thrnone_cacheon", {})
    if "ms_per_pass" in schedule:
        ms = schedule["ms_per_pass"]
        est = NEW_TOKENS / (22 * ms / 1e3)
        results["derived"] = {
            "tokens_per_s_at_22_passes_est": est,
            "formula": "64 / (22 × ms_per_pass of the 64-pass schedule run with use_cache=True)",
            "ms_per_pass_source": "runs.thrnone_cacheon.ms_per_pass (measured)",
            "note": "random weights are never 95% confident, so the threshold runs also take 64 passes; "
            "runs.steps22_cache_on is the measured time of a 22-pass answer",
        }
        rows.append({"label": "gen64 est. at 22 passes", "ms_per_pass": ms, "passes": 22, "tokens_per_s": est, "kind": "derived"})
    return results


def run_batch(ctx: Context) -> dict:
    """Batches with prefilling, then with the dual cache too (a row recomputes its block, not its canvas)."""
    block = ctx.args.block_length
    dual = dict(block_length=block, dual_cache=True)
    plans = []
    for suffix, extra, name in (("", {}, "cache on"), ("_dual", dual, f"dual b{block}")):
        plans += [
            (f"batch{b}{suffix}", dict(batch=b, new_tokens=NEW_TOKENS, steps=NEW_TOKENS, threshold=None, use_cache=True,
                                       label=f"batch {b} gen64 {name}", **extra))
            for b in ctx.args.batches
        ]
    runs, rows = collect_runs(ctx, plans)
    results = {"runs": runs, "rows": rows, "derived": {}}
    for suffix in ("", "_dual"):
        base = runs.get(f"batch1{suffix}", {}).get("tokens_per_s")
        for b in ctx.args.batches:
            if base and "tokens_per_s" in runs.get(f"batch{b}{suffix}", {}):
                results["derived"][f"throughput_ratio_batch{b}{suffix}_vs_1{suffix}"] = runs[f"batch{b}{suffix}"]["tokens_per_s"] / base
    return results


def run_length(ctx: Context) -> dict:
    plans = [
        (f"len{n}", dict(batch=1, new_tokens=n, steps=n, threshold=None, use_cache=True, label=f"answer {n} tok, {n} passes cache on"))
        for n in ctx.args.lengths
    ]
    runs, rows = collect_runs(ctx, plans)
    return {"runs": runs, "rows": rows}


def run_dual(ctx: Context) -> dict:
    block = ctx.args.block_length
    plans = []
    for n in ctx.args.lengths:
        common = dict(batch=1, new_tokens=n, steps=n, threshold=None)
        plans += [
            (f"len{n}_prefill", dict(**common, use_cache=True, label=f"answer {n} tok, {n} passes cache on")),
            (f"len{n}_dual", dict(**common, use_cache=False, block_length=block, dual_cache=True,
                                  label=f"answer {n} tok, dual cache b{block}")),
            (f"len{n}_dual_prefill", dict(**common, use_cache=True, block_length=block, dual_cache=True,
                                          label=f"answer {n} tok, dual cache b{block} + prefill")),
        ]
    runs, rows = collect_runs(ctx, plans)
    derived = {}
    for n in ctx.args.lengths:
        base = runs.get(f"len{n}_prefill", {}).get("total_ms")
        for key in (f"len{n}_dual", f"len{n}_dual_prefill"):
            if base and "total_ms" in runs.get(key, {}):
                derived[f"speedup_{key}_vs_prefill"] = base / runs[key]["total_ms"]
    return {"runs": runs, "rows": rows, "derived": derived}


# Attention first: CUDA's flash-attention kernel names carry `cutlass::bfloat16_t` template arguments.
KERNEL_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("gemm", ("gemm", "cutlass", "cublas", "nvjet", "sm90_xmma", "matmul", "addmm", "aten::mm", "aten::bmm", "linear")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(key in lowered for key in keys):
            return kind
    return "other"


def profile_kernels(ctx: Context, fn) -> dict:
    """Kernels (CUDA) or operators (CPU) that `fn` runs: count and self time in ms, by kind."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if ctx.bench.cuda else [ProfilerActivity.CPU]
    ctx.bench.sync()
    with profile(activities=activities) as prof:
        fn()
        ctx.bench.sync()
    totals = {}
    for event in prof.key_averages():
        on_device = str(getattr(event, "device_type", "")).endswith("CUDA")
        if ctx.bench.cuda != on_device:
            continue
        self_us = (getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)) \
            if ctx.bench.cuda else event.self_cpu_time_total
        kind = totals.setdefault(kernel_kind(event.key), {"count": 0, "ms": 0.0})
        kind["count"] += event.count
        kind["ms"] += self_us / 1e3
    return totals


def run_profile(ctx: Context) -> dict:
    model, bench = ctx.dimple(), ctx.bench
    input_ids, pixel_values, grid = ctx.prompt(1)
    block = ctx.args.block_length
    modes = {"prefill": dict(use_cache=True), "dual_prefill": dict(use_cache=True, block_length=block, dual_cache=True)}
    short, long = 8, 24  # steps of the two decodes whose difference is the steady state (a multiple of the blocks)
    results, rows = {}, []
    for name, mode in modes.items():
        kwargs = dict(pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=NEW_TOKENS, alg="maskgit_plus",
                      temperature=0.0, use_cuda_graph=False, return_dict_in_generate=True, **mode)

        def decode(steps):
            return model.diffusion_generate(input_ids, steps=steps, **kwargs)

        passes = {steps: decode(steps).num_forward_passes for steps in (short, long)}
        extra = passes[long] - passes[short]
        wall = {steps: bench.time(lambda: decode(steps))[0] for steps in (short, long)}
        kernels = {steps: profile_kernels(ctx, lambda: decode(steps)) for steps in (short, long)}
        per_pass = {}
        for kind in sorted(set(kernels[short]) | set(kernels[long])):
            a, b = kernels[short].get(kind, {"count": 0, "ms": 0.0}), kernels[long].get(kind, {"count": 0, "ms": 0.0})
            per_pass[kind] = {"count": (b["count"] - a["count"]) / extra, "ms": (b["ms"] - a["ms"]) / extra}
        wall_ms = (wall[long] - wall[short]) * 1e3 / extra
        kernel_ms = sum(k["ms"] for k in per_pass.values())
        results[name] = {
            "steady_state_passes": extra, "wall_ms_per_pass": wall_ms, "kernel_ms_per_pass": kernel_ms,
            "kernels_per_pass": sum(k["count"] for k in per_pass.values()), "by_kind": per_pass,
            "overhead_ms_per_pass": wall_ms - kernel_ms, "unit": "CUDA kernels" if bench.cuda else "CPU operators",
        }
        rows.append({"label": f"profile {name}: wall (no graph)", "ms_per_pass": wall_ms, "kind": "measured"})
        rows.append({"label": f"profile {name}: kernel time", "ms_per_pass": kernel_ms, "kind": "measured"})
    return {"modes": results, "rows": rows}


def run_compile(ctx: Context) -> dict:
    block = ctx.args.block_length
    dual = dict(block_length=block, dual_cache=True, use_cache=True)
    plans = []
    for suffix, extra in (("", {}), ("_compiled", dict(use_torch_compile=True))):
        name = " compiled" if extra else ""
        plans += [
            (f"gen64_prefill{suffix}", dict(batch=1, new_tokens=NEW_TOKENS, steps=NEW_TOKENS, threshold=None,
                                            use_cache=True, label=f"gen64 cache on{name}", **extra)),
        ] + [
            (f"len{n}_dual_prefill{suffix}", dict(batch=1, new_tokens=n, steps=n, threshold=None, **dual,
                                                  label=f"answer {n} tok, dual b{block} + prefill{name}", **extra))
            for n in ctx.args.lengths
        ]
    runs, rows = collect_runs(ctx, plans)
    derived = {}
    for key in [p[0] for p in plans if not p[0].endswith("_compiled")]:
        eager, compiled = runs.get(key, {}).get("ms_per_pass"), runs.get(f"{key}_compiled", {}).get("ms_per_pass")
        if eager and compiled:
            derived[f"speedup_{key}_compiled_vs_eager"] = eager / compiled
        # The one-time cost of compiling: the first (warm-up) decode, compiled vs eager.
        first = {mode: runs.get(k, {}).get("first_warmup_ms") for mode, k in (("eager", key), ("compiled", f"{key}_compiled"))}
        if first["compiled"] is not None:
            derived[f"first_warmup_seconds_{key}"] = {mode: ms and ms / 1e3 for mode, ms in first.items()}
    return {"runs": runs, "rows": rows, "derived": derived}


@torch.no_grad()
def run_baseline(ctx: Context) -> dict:
    """Autoregressive Qwen2.5-VL of the same shape, greedy, 64 new tokens."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    bench = ctx.bench
    ctx.free_dimple()  # both 16.6 GB models would fit, but activations and compile workspaces need room
    config = qwen_config(ctx.args.tiny, ctx.ids)
    start = time.perf_counter()
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    model = materialise(model, ctx.device, ctx.dtype)
    rebuilt = rebuild_rotary_buffers_(model, ctx.device)
    bench.sync()
    build_seconds = time.perf_counter() - start
    input_ids, pixel_values, grid = make_prompt(ctx.ids, config.text_config.vocab_size, 1, ctx.device, ctx.dtype)
    attention_mask = torch.ones_like(input_ids)
    eos = config.text_config.eos_token_id
    pad = config.text_config.pad_token_id

    def generate(cache_implementation, new_tokens=NEW_TOKENS, **extra):
        kwargs = dict(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=grid,
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
            eos_token_id=eos, pad_token_id=pad, **extra,
        )
        if cache_implementation == "static":
            kwargs["cache_implementation"] = "static"
        return model.generate(**kwargs)

    results = {
        "model": "transformers Qwen2_5_VLForConditionalGeneration (sdpa), random weights, same shape",
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_s": build_seconds,
        "rotary_buffers_rebuilt": rebuilt,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "runs": {},
    }
    ctx.partial["baseline"] = results  # kept in the JSON if the setting is cut off
    rows = results["rows"] = []
    # dynamic (eager) first: quick and reliable; then static, which on CUDA makes transformers compile the
    # decoding step; a static cache without compile is only a fallback for a failing compiled one.
    attempts = [("dynamic", "dynamic", {}), ("static", "static", {}), ("static_nocompile", "static", {"disable_compile": True})]
    for name, impl, extra in attempts:
        if name == "static_nocompile" and "tokens_per_s" in results["runs"].get("static", {}):
            continue
        run = results["runs"][name] = {"cache_implementation": impl, **({"generate_kwargs": extra} if extra else {})}
        try:
            with time_limit(ctx.args.run_timeout, RunTimeout):
                bench.reset_peak()
                warm_start = time.perf_counter()
                # Warm-up: with a static cache on CUDA the first call pays the compile; two warm-ups so that a
                # recompile on the second call is not timed either.
                warmups = 2 if (impl == "static" and bench.cuda and not extra) else 1
                for _ in range(warmups):
                    generate(impl, **extra)
                bench.sync()
                run["warmup_s"] = time.perf_counter() - warm_start
                seconds, times, out = bench.time(lambda: generate(impl, **extra), warmup=0)
                new_tokens = out.shape[1] - input_ids.shape[1]
                run.update({
                    "total_ms": seconds * 1e3, "all_total_ms": [t * 1e3 for t in times], "new_tokens": new_tokens,
                    "tokens_per_s": new_tokens / seconds, "ms_per_token": seconds * 1e3 / max(new_tokens, 1),
                    "peak_gib": bench.peak_gib(),
                    "compiled_decode_step": bool(impl == "static" and not extra and hasattr(model, "_compiled_call")),
                    "kind": "measured (whole generate call incl. the prefill with the vision tower)",
                })
                rows.append({
                    "label": f"AR Qwen2.5-VL {name} cache", "ms_per_pass": run["ms_per_token"], "passes": new_tokens,
                    "total_ms": run["total_ms"], "tokens_per_s": run["tokens_per_s"], "peak_gib": run["peak_gib"],
                    "kind": "measured",
                })
                try:  # prefill-only time (1 new token) -> per-token decode time
                    one, _, _ = bench.time(lambda: generate(impl, new_tokens=1, **extra), warmup=1)
                    run["prefill_ms"] = one * 1e3
                    run["decode_ms_per_token"] = (seconds - one) * 1e3 / max(new_tokens - 1, 1)
                except RunTimeout:
                    raise
                except Exception as error:  # noqa: BLE001
                    run["prefill_error"] = f"{type(error).__name__}: {error}"
        except SettingTimeout:
            raise
        except Exception as error:  # noqa: BLE001 - includes RunTimeout
            run["error"] = f"{type(error).__name__}: {error}"
            run["traceback"] = traceback.format_exc()
            free_memory(ctx.device)
    for name in ("static", "static_nocompile", "dynamic"):
        if "tokens_per_s" in results["runs"].get(name, {}):
            results["headline"] = {"cache_used": name, "tokens_per_s": results["runs"][name]["tokens_per_s"]}
            break
    del model
    free_memory(ctx.device)
    return results


RUNNERS = {
    "floor": run_floor, "forward": run_forward, "vision": run_vision, "generate": run_generate,
    "batch": run_batch, "length": run_length, "dual": run_dual, "profile": run_profile, "compile": run_compile, "baseline": run_baseline,
}


# --------------------------------------------------------------------------------------------------
# Summary, table, plot
# --------------------------------------------------------------------------------------------------


def get(report, *path):
    node = report
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def summarise(report: dict) -> dict:
    s = report["settings"]
    summary = {
        "device": report["meta"]["device_name"],
        "torch": report["meta"]["torch"],
        "transformers": report["meta"]["transformers"],
        "shape": "tiny" if report["meta"]["tiny"] else "7B",
        "floor_ms": get(s, "floor", "floor_ms"),
        "copy_bandwidth_tb_s": get(s, "floor", "copy_bandwidth_tb_s"),
        "forward_ms": get(s, "forward", "full_with_vision", "ms"),
        "forward_peak_gib": get(s, "forward", "full_with_vision", "peak_gib"),
        "prefilled_pass_ms": get(s, "forward", "prefilled_pass", "ms"),
        "prefilled_pass_separate_qkv_ms": get(s, "forward", "prefilled_pass_separate_qkv", "ms"),
        "vision_ms": get(s, "vision", "vision_tower", "ms"),
        "gen_ms_per_pass_cache_on": get(s, "generate", "runs", "thrnone_cacheon", "ms_per_pass"),
        "gen_ms_per_pass_cache_off": get(s, "generate", "runs", "thrnone_cacheoff", "ms_per_pass"),
        "gen_passes_thr095_cache_on": get(s, "generate", "runs", "thr0.95_cacheon", "forward_passes"),
        "gen_tokens_per_s_64_passes": get(s, "generate", "runs", "thrnone_cacheon", "tokens_per_s"),
        "gen_tokens_per_s_22_passes_measured": get(s, "generate", "runs", "steps22_cache_on", "tokens_per_s"),
        "gen_tokens_per_s_22_passes_derived": get(s, "generate", "derived", "tokens_per_s_at_22_passes_est"),
        "batch_tokens_per_s": {k: v.get("tokens_per_s") for k, v in (get(s, "batch", "runs") or {}).items()},
        "batch16_vs_1": get(s, "batch", "derived", "throughput_ratio_batch16_vs_1"),
        "batch16_dual_vs_1_dual": get(s, "batch", "derived", "throughput_ratio_batch16_dual_vs_1_dual"),
        "length_ms_per_pass": {k: v.get("ms_per_pass") for k, v in (get(s, "length", "runs") or {}).items()},
        "length_total_ms": {k: v.get("total_ms") for k, v in (get(s, "length", "runs") or {}).items()},
        "dual_total_ms": {k: v.get("total_ms") for k, v in (get(s, "dual", "runs") or {}).items()},
        "dual_speedups": get(s, "dual", "derived"),
        "compile_speedups": get(s, "compile", "derived"),
        "profile": {
            name: {k: mode.get(k) for k in ("wall_ms_per_pass", "kernel_ms_per_pass", "kernels_per_pass", "overhead_ms_per_pass")}
            | {f"{kind}_ms": v["ms"] for kind, v in mode.get("by_kind", {}).items()}
            for name, mode in (get(s, "profile", "modes") or {}).items()
        },
        "ms_per_pass_vs_bound": {
            f"{name}.{key}": run.get("ms_per_pass_vs_bound")
            for name in ("generate", "batch", "length", "dual", "compile")
            for key, run in (get(s, name, "runs") or {}).items()
            if isinstance(run, dict) and run.get("ms_per_pass_vs_bound") and "reused_from" not in run
        },
        "compute_floor_ms_per_pass": {
            f"{name}.{key}": run.get("compute_floor_ms_per_pass")
            for name in ("generate", "batch", "length", "dual", "compile")
            for key, run in (get(s, name, "runs") or {}).items()
            if isinstance(run, dict) and run.get("compute_floor_ms_per_pass") and "reused_from" not in run
        },
        "baseline_tokens_per_s": get(s, "baseline", "headline", "tokens_per_s"),
        "baseline_cache": get(s, "baseline", "headline", "cache_used"),
    }
    floor, prefilled = summary["floor_ms"], summary["gen_ms_per_pass_cache_on"]
    if floor and prefilled:
        summary["gen_ms_per_pass_cache_on_vs_floor"] = prefilled / floor
    if floor and summary["prefilled_pass_ms"]:
        summary["prefilled_pass_vs_floor"] = summary["prefilled_pass_ms"] / floor
    base = summary["baseline_tokens_per_s"]
    for key in ("gen_tokens_per_s_22_passes_measured", "gen_tokens_per_s_22_passes_derived"):
        if base and summary[key]:
            summary[key.replace("gen_tokens_per_s", "vs_baseline")] = summary[key] / base
    errors = []
    for name, entry in s.items():
        if entry.get("status") != "ok":
            errors.append(f"{name}: {entry.get('status')}: {entry.get('error', '')}"[:300])
        for key, run in (entry.get("runs") or {}).items():
            if isinstance(run, dict) and "error" in run:
                errors.append(f"{name}.{key}: {run['error']}"[:300])
        if isinstance(entry.get("prefilled_pass"), dict) and "error" in entry["prefilled_pass"]:
            errors.append(f"{name}.prefilled_pass: {entry['prefilled_pass']['error']}"[:300])
    summary["errors"] = errors
    summary["elapsed_s"] = report["meta"].get("elapsed_s")
    return round_floats(summary)


def all_rows(report: dict) -> list:
    rows = []
    for name in SETTINGS:
        entry = report["settings"].get(name)
        if entry and entry.get("status") == "ok":
            rows.extend(entry.get("rows", []))
    return rows


def format_table(report: dict) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    header = (f"{'setting':<38} {'ms/pass':>9} {'passes':>6} {'total ms':>10} {'tok/s':>9} {'peak GiB':>9} "
              f"{'x bound':>8}  kind")
    lines = [header, "-" * len(header)]
    for row in all_rows(report):
        lines.append(
            f"{row['label'][:38]:<38} {fmt(row.get('ms_per_pass'), '9.3f')} {fmt(row.get('passes'), '6d')} "
            f"{fmt(row.get('total_ms'), '10.1f')} {fmt(row.get('tokens_per_s'), '9.1f')} {fmt(row.get('peak_gib'), '9.2f')} "
            f"{fmt(row.get('vs_bound'), '8.2f')}  {row.get('kind', '')}"
        )
    for name, entry in report["settings"].items():
        if entry.get("status") != "ok":
            lines.append(f"{name:<38} {entry.get('status')}: {str(entry.get('error', ''))[:100]}")
    return "\n".join(lines)


def plot(report: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = all_rows(report)
    ms_rows = [r for r in rows if r.get("ms_per_pass") is not None]
    tps_rows = [r for r in rows if r.get("tokens_per_s") is not None]
    height = max(4.0, 0.35 * max(len(ms_rows), len(tps_rows), 1) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(16, height))
    colour = {"measured": "tab:blue", "derived": "tab:orange"}
    for ax, data, key, title in (
        (axes[0], ms_rows, "ms_per_pass", "ms per forward pass (AR: per token)"),
        (axes[1], tps_rows, "tokens_per_s", "whole-answer tokens / s"),
    ):
        labels = [r["label"] for r in data]
        values = [r[key] for r in data]
        colours = ["tab:green" if r["label"].startswith("AR ") else colour.get(str(r.get("kind")).split()[0], "tab:gray") for r in data]
        ax.barh(range(len(values)), values, color=colours)
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    floor = get(report, "settings", "floor", "floor_ms")
    if floor:
        axes[0].axvline(floor, color="tab:red", linestyle="--", linewidth=1, label=f"floor {floor:.2f} ms")
        axes[0].legend(fontsize=8)
    meta = report["meta"]
    fig.suptitle(f"Dimple {'tiny' if meta['tiny'] else '7B'} random weights, {meta['dtype']}, {meta['device_name']} "
                 "(blue measured, orange derived, green autoregressive baseline)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def _int_at_least(low: int, meaning: str = ""):
    """An argparse type: an integer >= `low` (a bad value is refused with the flag's name and the range)."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{meaning}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{meaning}, got {value}")
        return value

    return parse


def _finite_number(low: float, *, strict: bool, unit: str = "", note: str = ""):
    """An argparse type: a finite number >= `low` (> `low` when `strict`)."""
    allowed = f"must be a number{unit} {'>' if strict else '>='} {low:g}{note}"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}")
        return value

    return parse


_seconds = _finite_number(0, strict=False, unit=" of seconds", note=" (0 = no limit)")
_positive_float = _finite_number(0, strict=True)


def _positive_int_list(text):
    """An argparse type: a comma list of positive integers, e.g. 1,4,16."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = [int(item) for item in items]
    except ValueError:
        values = None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be a comma list of integers >= 1 (e.g. 1,4,16), got {text!r}")
    return values


def _json_object(text):
    """An argparse type: a JSON object (dict) of keyword arguments; '' = none."""
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(
            f"must be a JSON object of keyword arguments, e.g. '{{\"use_cuda_graph\": false}}' ({error}), got {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object of keyword arguments, e.g. '{{\"use_cuda_graph\": false}}', got {type(value).__name__} {text!r}")
    return value


def _check_output_path(parser, flag: str, path: str):
    """Refuse an output file whose folder does not exist or is not writable (before any setting runs)."""
    if os.path.isdir(path):
        parser.error(f"argument {flag}: {path!r} is a folder; give a file path in an existing, writable folder")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        parser.error(f"argument {flag}: the folder {folder!r} does not exist; give a file path in an existing, writable folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        parser.error(f"argument {flag}: {path!r} is not writable; give a file path in an existing, writable folder")


def _check_device(parser, device: str):
    """cpu, cuda or cuda:N, where CUDA (and device N) exists."""
    allowed = "cpu, cuda, cuda:N"
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        parser.error(f"argument --device: must be one of {allowed}, got {device!r}")
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        parser.error(f"argument --device: {device} but CUDA is not available here (allowed here: cpu; "
                     "use --device cpu --tiny)")
    index, count = int(device.partition(":")[2] or 0), torch.cuda.device_count()
    if index >= count:
        parser.error(f"argument --device: {device} but this machine has {count} CUDA device(s) "
                     f"(allowed: cpu, cuda, cuda:0..cuda:{count - 1})")


def _check_block_length(parser, args, selected):
    """--block-length must divide every answer length it is used with (generation refuses it otherwise, which
    would only show up as a failed setting after the model was built)."""
    block = args.block_length
    lengths = set()
    if {"batch", "profile", "compile"} & set(selected):
        lengths.add(NEW_TOKENS)
    if {"dual", "compile"} & set(selected):
        lengths.update(args.lengths)
    bad = sorted(n for n in lengths if n % block)
    if bad:
        parser.error(f"argument --block-length: must divide every answer length it decodes block-wise "
                     f"({', '.join(map(str, sorted(lengths)))}: {NEW_TOKENS} for batch/profile/compile, --lengths for "
                     f"dual/compile), got {block}, which does not divide {', '.join(map(str, bad))}")
    if "profile" in selected and NEW_TOKENS // block > 8:
        parser.error(f"argument --block-length: the profile setting's shorter decode is {NEW_TOKENS} tokens in 8 steps, so it needs "
                     f"at most 8 blocks (block length >= {NEW_TOKENS // 8}), got {block}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--tiny", action="store_true", help="tiny configuration (CPU smoke run)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"], help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"comma list out of {','.join(SETTINGS)} (default: all but compile)")
    parser.add_argument("--repeats", type=_int_at_least(1), default=None,
                        help="timed repeats per measurement (median), >= 1; default 5 on CUDA, 1 on CPU")
    parser.add_argument("--warmup", type=_int_at_least(0), default=1, help="warm-up calls before timing, >= 0")
    parser.add_argument("--warmup-steps", type=_int_at_least(0, " (0 = the full run)"), default=4,
                        help="steps of the warm-up diffusion_generate, >= 0 (0 = the full run)")
    parser.add_argument("--batches", type=_positive_int_list, default=[1, 4, 16],
                        help="batch sizes of the batch setting: comma list of integers >= 1 (default 1,4,16)")
    parser.add_argument("--lengths", type=_positive_int_list, default=[64, 256],
                        help="answer lengths of the length and dual settings: comma list of integers >= 1 (default 64,256)")
    parser.add_argument("--block-length", type=_int_at_least(1), default=32,
                        help="block length of the dual setting, >= 1, dividing 64 and every --lengths (default 32)")
    parser.add_argument("--copy-gib", type=_positive_float, default=2.0, help="size of the bandwidth copy (CUDA), > 0")
    parser.add_argument("--gen-kwargs", type=_json_object, default={},
                        help="JSON object of extra diffusion_generate keyword arguments")
    parser.add_argument("--setting-timeout", type=_seconds, default=None, help="seconds per setting, >= 0 (0 = none); default 240 on CUDA, 0 on CPU")
    parser.add_argument("--run-timeout", type=_seconds, default=None, help="seconds per decode/generate measurement inside a setting, >= 0 "
                        "(0 = none); default 150 on CUDA, 0 on CPU")
    parser.add_argument("--deadline", type=_seconds, default=None, help="seconds after start by which every setting must end, >= 0: later ones are "
                        "skipped, a running one is cut off (0 = none); default 520 on CUDA (the whole run fits a 10-minute device call), 0 on CPU")
    parser.add_argument("--threads", type=_int_at_least(1), default=None, help="CPU threads for torch, >= 1 (default: 1 with --device cpu --tiny, "
                        "where more threads only add contention; else torch's default)")
    parser.add_argument("--out", default="bench_results.json", help="JSON output (its folder must exist and be writable)")
    parser.add_argument("--plot", default=None, help="PNG output (default: --out with .png); 'none' to skip")
    args = parser.parse_args(argv)
    _check_device(parser, args.device)
    selected = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = sorted(set(selected) - set(SETTINGS))
    if unknown or not selected:
        parser.error(f"argument --settings: must be a comma list out of {','.join(SETTINGS)}, got {args.settings!r}"
                     + (f" (unknown: {','.join(unknown)})" if unknown else ""))
    args.selected = [s for s in SETTINGS if s in selected]  # fixed order: the baseline (which frees Dimple) last
    _check_block_length(parser, args, args.selected)
    _check_output_path(parser, "--out", args.out)
    if (args.plot or "").lower() != "none":
        _check_output_path(parser, "--plot", args.plot or os.path.splitext(args.out)[0] + ".png")
    return args


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda and not args.tiny:
        print("warning: the 7B shape on the CPU needs ~35 GB of RAM and is very slow; use --tiny", file=sys.stderr)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    args.repeats = args.repeats if args.repeats is not None else (5 if cuda else 1)
    if args.threads is None and not cuda and args.tiny:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    args.setting_timeout = args.setting_timeout if args.setting_timeout is not None else (240 if cuda else 0)
    args.run_timeout = args.run_timeout if args.run_timeout is not None else (150 if cuda else 0)
    args.deadline = args.deadline if args.deadline is not None else (520 if cuda else 0)
    selected = args.selected  # validated by parse_args, in SETTINGS order (the baseline, which frees Dimple, last)
    plot_path = None if (args.plot or "").lower() == "none" else (args.plot or os.path.splitext(args.out)[0] + ".png")
    torch.manual_seed(0)

    import transformers

    command = shlex.join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), os.getcwd())] + sys.argv[1:]) if argv is None else shlex.join(["python", "dimple_tools/bench.py", *argv])
    base_command = ["python", "dimple_tools/bench.py", "--device", args.device] + (["--tiny"] if args.tiny else []) + ["--repeats", str(args.repeats)]
    name = device_name(device)
    ctx = Context(args, device, dtype)
    report = {
        "meta": {
            "command": command,
            "device": str(device),
            "device_name": name,
            "tiny": args.tiny,
            "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "repeats": args.repeats,
            "cpu_threads": torch.get_num_threads(),
            "warmup": args.warmup,
            "timing": "wall clock between device synchronisations, median of repeats after warm-up",
            "prompt": {"tokens": TEXT_BEFORE + TEXT_AFTER + 2 + GRID_THW[0] * GRID_THW[1] * GRID_THW[2] // 4,
                       "image_grid_thw": list(GRID_THW), "text_tokens": TEXT_BEFORE + TEXT_AFTER,
                       "layout": "20 text, vision_start, 256 image_pad, vision_end, 20 text"},
            "new_tokens": NEW_TOKENS,
            "gen_kwargs_extra": ctx.gen_kwargs,
            "config": {k: getattr(ctx.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                            "num_key_value_heads", "intermediate_size", "vocab_size")},
            "settings_run": selected,
        },
        "settings": {},
    }

    def save():
        report["meta"]["elapsed_s"] = time.perf_counter() - started
        if ctx.build_seconds is not None:
            report["meta"]["dimple_build_s"] = ctx.build_seconds
        report["summary"] = summarise(report)
        with open(args.out, "w") as f:
            json.dump(round_floats(report, 6), f, indent=1)

    for setting in selected:
        entry = {
            "command": shlex.join(base_command + ["--settings", setting]),
            "run_command": command,
            "device_name": name,
        }
        report["settings"][setting] = entry
        limit = args.setting_timeout
        if args.deadline:
            left = args.deadline - (time.perf_counter() - started)
            if left < 15:
                entry.update(status="skipped", error=f"the run's deadline of {args.deadline:.0f} s is (nearly) reached")
                print(f"[bench] {setting}: skipped (deadline)", flush=True)
                save()
                continue
            limit = min(limit, left) if limit else left
        print(f"[bench] {setting} ...", flush=True)
        ctx.current_setting = setting
        ctx.partial = {}
        start = time.perf_counter()
        try:
            with time_limit(limit):
                entry.update(RUNNERS[setting](ctx))
            entry["status"] = "ok"
        except (SettingTimeout, Exception) as error:  # noqa: BLE001 - a failing setting must not end the run
            timeout = isinstance(error, SettingTimeout)
            entry.update(
                status="timeout" if timeout else "error",
                error=f"{type(error).__name__}: {error}" + (f" (limit {limit:.0f} s)" if timeout else ""),
                traceback=traceback.format_exc(),
            )
            if ctx.partial:
                entry["partial"] = ctx.partial
            print(traceback.format_exc(), file=sys.stderr)
        entry["seconds"] = time.perf_counter() - start
        if cuda:
            entry["memory_allocated_after_gib"] = torch.cuda.memory_allocated(device) / GIB
        free_memory(device)
        print(f"[bench] {setting}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
        save()

    ctx.free_dimple()
    if plot_path:
        try:
            plot(report, plot_path)
            report["meta"]["plot"] = plot_path
        except Exception as error:  # noqa: BLE001
            report["meta"]["plot_error"] = f"{type(error).__name__}: {error}"
    save()
    print()
    print(format_table(report))
    print(f"\nJSON: {args.out}" + (f"   plot: {plot_path}" if plot_path and "plot" in report["meta"] else ""))
    print(json.dumps(report["summary"], separators=(",", ":")))
    return report


if __name__ == "__main__":
    main()
