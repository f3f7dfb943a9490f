"""Dimple's decoding benchmark: random weights against the memory-bandwidth floor and an autoregressive baseline.

The Dimple-7B shape with random bf16 weights, built on the meta device and materialised on the GPU (no download);
`--device cpu --tiny` runs the same code on `dimple_tools.tiny.configs` (the CPU dry run). The prompt: one image of
256 visual tokens (grid 1x32x32) between 20 + 20 random text tokens = 298 tokens; greedy `maskgit_plus`.

Settings, in order (`--settings`):
  floor     weight bytes / measured device-to-device copy bandwidth: the time to read every weight once
  pass      one prefilled pass (last prompt token + 64 masks against the prefix cache, head on the 64): eager,
            CUDA graph, compiled (regional: one compiled decoder layer for all), compiled in a CUDA graph
  answer64  a 64-token answer in 64 and in 22 passes, and in 22 passes compiled: passes, ms/pass, tokens/s
  batch     batch 1 / 4 / 16, 64 tokens in 64 passes, prefilling without and with the dual cache (block 32)
  long256   a 256-token answer in 256 passes: prefilling, and prefilling + the dual cache
  baseline  transformers' Qwen2.5-VL of the same shape, same prompt, greedy 64 tokens: dynamic, static cache
  compile   the first compiled 22-pass answer from cold (torch.compile caches reset and disabled): regional
  vision / quant  the vision tower eager and block-compiled / 22-pass answers of TorchAo and bitsandbytes weights
  compile_whole  as compile, tracing the whole decoder pass (the comparison; minutes on the 7B shape)
Each setting has a budget (its deadline); one that does not fit what `--deadline` leaves is skipped, named. The
JSON is rewritten after every setting; `summary` holds issue 26's ratios. Timing: CUDA events (perf_counter on
the CPU), median of `--repeats` after a first call timed alone (`first_call_ms`); peak memory per measurement.

    python -m dimple_tools.bench.benchmark --out bench.json   # CUDA, 7B; --device cpu --tiny: the dry run; device check:
    bash scripts/device_check.sh                    # CUDA tests, then this, in 8 minutes (docs/performance.md)
`dimple-bench quality-speed` is the tiny model's accuracy against passes and time instead (bench/quality_speed.py).
"""

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
import traceback
import warnings

import torch

from dimple.configuration_dimple import DimpleConfig
from dimple.modeling_dimple import DimpleModel
from dimple_tools.compat import dtype_argument
from dimple_tools.tiny.configs import TINY_VISION, tiny_config

GIB = 1024**3
GRID_THW, TEXT_TOKENS, NEW_TOKENS, BLOCK = (1, 32, 32), 20, 64, 32  # 20 text, image (256), 20 text = 298
SETTINGS = {}  # name -> (function, budget in seconds on CUDA (7B), on the CPU (tiny))


class Skip(Exception):
    """The setting cannot run here (its reason is recorded)."""


class Timeout(Exception):
    """The setting ran past its deadline."""


def setting(cuda_s: float, cpu_s: float):
    def register(fn):
        SETTINGS[fn.__name__.rstrip("_")] = (fn, cuda_s, cpu_s)
        return fn

    return register


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise `Timeout` in the main thread after `seconds` (where SIGALRM exists)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def fire(*_):
        raise Timeout(f"past its deadline of {seconds:.1f} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Harness: device, timing, models, prompt


class Harness:
    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.config = tiny_config(**args.layers) if args.tiny else DimpleConfig(**args.layers)
        self._model, self.floor_ms = None, None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak_gib(self):
        return torch.cuda.max_memory_allocated(self.device) / GIB if self.cuda else None

    def time(self, fn, repeats=None, warmup=1) -> dict:
        """Median milliseconds of `fn` over `repeats` calls after `warmup` calls; the peak memory; the last result."""
        for _ in range(warmup):
            fn()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeats or self.args.repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                result = fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                result = fn()
                times.append((time.perf_counter() - start) * 1e3)
        return {"ms": statistics.median(times), "all_ms": times, "peak_gib": self.peak_gib(), "result": result}

    def first_call_ms(self, fn):
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3, result

    def model(self) -> DimpleModel:
        if self._model is None:
            with torch.device("meta"):
                model = DimpleModel(self.config)
            self._model = materialise(model, self.device, self.dtype)
        return self._model

    def free(self):
        self._model = None
        free_memory(self.device)

    def prompt(self, batch: int = 1):
        """input_ids (batch, 298), pixel_values (batch·1024, 1176), image_grid_thw (batch, 3): random text ids
        below the special ids, one image between vision_start and vision_end."""
        config, gen = self.config, torch.Generator().manual_seed(0)
        ids = [config.vision_start_token_id, config.vision_end_token_id, config.image_token_id, config.mask_token_id]
        low, high = (0, 151643) if config.vocab_size > 151643 else (max(ids) + 1, config.vocab_size)
        text = torch.randint(low, high, (2 * TEXT_TOKENS,), generator=gen)
        image = torch.full((math.prod(GRID_THW) // 4,), config.image_token_id)
        row = torch.cat([text[:TEXT_TOKENS], torch.tensor(ids[:1]), image, torch.tensor(ids[1:2]), text[TEXT_TOKENS:]])
        pixels = torch.randn(math.prod(GRID_THW), 1176, generator=gen)
        return (row.repeat(batch, 1).to(self.device), pixels.repeat(batch, 1).to(self.device, self.dtype),
                torch.tensor([GRID_THW] * batch, device=self.device))


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def materialise(model: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """A model built on the meta device -> `dtype` -> `to_empty(device)` -> random weights in place: normal(0,
    0.02) for matrices, ones for norm weights, zeros for biases. Rotary `inv_freq` buffers (transformers'
    Qwen2.5-VL; Dimple has none) are rebuilt from a fresh CPU copy of their module."""
    model = model.to(dtype).to_empty(device=device)
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for param in module.parameters(recurse=False):
            if param.dim() > 1:
                param.normal_(0.0, 0.02)
            elif is_norm:
                param.fill_(1.0)
            else:
                param.zero_()
        if "inv_freq" in module._buffers:
            with torch.device("cpu"):
                fresh = type(module)(module.config)
            for name, buffer in fresh._buffers.items():
                module._buffers[name] = buffer.to(device)
            module.__dict__.update({k: v for k, v in fresh.__dict__.items() if k == "attention_scaling"})
    return model.eval()


def cuda_graph(fn):
    """`fn` captured as a CUDA graph (after two warm-up calls on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(), fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measured(timing: dict, **extra) -> dict:
    return {k: v for k, v in {**timing, **extra}.items() if k != "result"}


def decode(h: Harness, batch=1, new_tokens=NEW_TOKENS, steps=NEW_TOKENS, model=None, **settings) -> dict:
    """Time `diffusion_generate` (the whole call: vision tower, every pass, sampling). The first call is the
    warm-up, timed on its own (`first_call_ms`)."""
    model = model or h.model()
    input_ids, pixel_values, grid = h.prompt(batch)
    kwargs = dict(pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=new_tokens, steps=steps,
                  alg="maskgit_plus", temperature=0.0, return_dict_in_generate=True)
    kwargs.update(**settings, **h.args.gen_kwargs)
    call = functools.partial(model.diffusion_generate, input_ids, **kwargs)
    first_ms, _ = h.first_call_ms(call)
    timing = h.time(call, warmup=0)
    out, seconds = timing["result"], timing["ms"] / 1e3
    passes = out.num_forward_passes
    return measured(timing, first_call_ms=first_ms, passes=passes, ms_per_pass=timing["ms"] / passes,
                    tokens_per_s=batch * new_tokens / seconds, sequences=out.sequences[:, input_ids.shape[1]:].tolist(),
                    masks_left=int((out.sequences == h.config.mask_token_id).sum()), batch=batch, **settings)


# Settings: each fills `out` as it measures (a cut-off setting keeps what it finished)


@setting(cuda_s=20, cpu_s=5)
def floor(h: Harness, out: dict):
    numel = (2 * GIB if h.cuda else 32 * 2**20) // 2
    src = torch.randn(numel, dtype=torch.bfloat16, device=h.device)
    dst = torch.empty_like(src)
    copy_ms = h.time(functools.partial(dst.copy_, src), repeats=10)["ms"]
    del src, dst
    bandwidth = 2 * numel * 2 / (copy_ms / 1e3)  # a copy reads and writes every byte
    weight_bytes = sum(p.numel() * p.element_size() for p in h.model().parameters())
    h.floor_ms = weight_bytes / bandwidth * 1e3
    out.update(copy_ms=copy_ms, copy_gib=numel * 2 / GIB, copy_bandwidth_tb_s=bandwidth / 1e12,
               weight_bytes=weight_bytes, floor_ms=h.floor_ms)


@setting(cuda_s=90, cpu_s=40)
@torch.no_grad()
def pass_(h: Harness, out: dict):
    from dimple.generation_utils import compiled_decoder

    model = h.model()
    input_ids, pixel_values, grid = h.prompt(1)
    canvas = torch.full((1, NEW_TOKENS), h.config.mask_token_id, device=h.device)
    ids = torch.cat([input_ids, canvas], dim=1)
    embeds = torch.cat([model.embed_inputs(input_ids, pixel_values, grid), model.get_input_embeddings()(canvas)], 1)
    positions, _ = model.get_rope_index(ids, grid)
    tail = torch.arange(input_ids.shape[1] - 1, ids.shape[1], device=h.device)
    tail_embeds, tail_positions = embeds[:, tail].contiguous(), positions[..., tail].contiguous()
    cache = model.new_prefix_cache(ids.shape[1])
    model.decoder_forward(inputs_embeds=embeds, position_ids=positions, past_key_values=cache)  # fills the cache

    def step(forward):
        hidden = forward(inputs_embeds=tail_embeds, position_ids=tail_positions, past_key_values=cache,
                         cache_position=tail)[0]
        return model.lm_head(hidden[:, :NEW_TOKENS])

    with model.stacked_qkv_projections():  # as decoding runs it
        eager = functools.partial(step, model.decoder_forward)
        out["eager"] = measured(h.time(eager, repeats=max(h.args.repeats, 10)))
        if h.cuda:
            out["cuda_graph"] = measured(h.time(cuda_graph(eager), repeats=max(h.args.repeats, 10)))
        compiled = functools.partial(step, compiled_decoder(model))
        cold_ms, _ = h.first_call_ms(compiled)
        out["compiled"] = measured(h.time(compiled, repeats=max(h.args.repeats, 10)), first_call_ms=cold_ms)
        if h.cuda:
            out["compiled_cuda_graph"] = measured(h.time(cuda_graph(compiled), repeats=max(h.args.repeats, 10)))
    if h.floor_ms:
        out["vs_floor"] = {k: v["ms"] / h.floor_ms for k, v in out.items() if isinstance(v, dict)}


@setting(cuda_s=40, cpu_s=15)
def answer64(h: Harness, out: dict):
    out["steps64"] = decode(h, steps=64, use_cache=True)
    out["steps22"] = decode(h, steps=22, use_cache=True)
    out["steps22_compiled"] = decode(h, steps=22, use_cache=True, use_torch_compile=True)


@setting(cuda_s=70, cpu_s=25)
def batch(h: Harness, out: dict):
    for size in h.args.batches:
        for name, extra in (("prefill", {}), ("dual", dict(block_length=BLOCK, dual_cache=True))):
            out[f"batch{size}_{name}"] = decode(h, batch=size, use_cache=True, **extra)
    for name in ("prefill", "dual"):
        first, last = (out.get(f"batch{b}_{name}", {}).get("tokens_per_s") for b in (h.args.batches[0], h.args.batches[-1]))
        if first and last:
            out[f"throughput_ratio_{name}"] = last / first


@setting(cuda_s=50, cpu_s=30)
def long256(h: Harness, out: dict):
    out["prefill"] = decode(h, new_tokens=256, steps=256, use_cache=True)
    out["dual_prefill"] = decode(h, new_tokens=256, steps=256, use_cache=True, block_length=BLOCK, dual_cache=True)
    out["dual_speedup"] = out["prefill"]["ms"] / out["dual_prefill"]["ms"]


@setting(cuda_s=120, cpu_s=30)
@torch.no_grad()
def baseline(h: Harness, out: dict):
    try:  # transformers >= 4.49
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    except ImportError as error:
        raise Skip(f"no Qwen2.5-VL in this transformers: {error}") from None

    c = h.config
    text = {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                       "num_attention_heads", "num_key_value_heads", "rms_norm_eps")}
    rope = dict(rope_type="default", rope_theta=c.rope_theta, mrope_section=list(c.mrope_section))
    text.update(hidden_act="silu", tie_word_embeddings=False, rope_parameters=rope,
                bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
    vision = {k: getattr(c.vision_config, k) for k in TINY_VISION}  # the fields Qwen2.5-VL's vision config takes
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=c.image_token_id,
                              video_token_id=c.video_token_id, vision_start_token_id=c.vision_start_token_id,
                              vision_end_token_id=c.vision_end_token_id, attn_implementation="sdpa")
    with torch.device("meta"):
        model = materialise(Qwen2_5_VLForConditionalGeneration(config), h.device, h.dtype)
    input_ids, pixel_values, grid = h.prompt(1)
    for cache in ("dynamic", "static"):  # static: transformers compiles the decoding step on CUDA
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                      image_grid_thw=grid, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                      eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id, cache_implementation=cache)
        call = functools.partial(model.generate, **kwargs)
        try:
            first_ms, _ = h.first_call_ms(call)
            timing = h.time(call, warmup=1 if cache == "static" and h.cuda else 0)  # a recompile is not timed
            new = timing["result"].shape[1] - input_ids.shape[1]
            out[cache] = measured(timing, first_call_ms=first_ms, new_tokens=new, tokens_per_s=new / (timing["ms"] / 1e3),
                                  ms_per_token=timing["ms"] / new)
        except (Timeout, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - the dynamic run stands alone
            out[cache] = {"error": f"{type(error).__name__}: {error}"}
    best = [out[k]["tokens_per_s"] for k in ("static", "dynamic") if "tokens_per_s" in out.get(k, {})]
    out["tokens_per_s"] = best[0] if best else None
    del model
    free_memory(h.device)


def cold_compiled_answer(h: Harness, out: dict, regional: bool):
    """The first compiled 22-pass answer with every torch.compile cache reset and disabled, then warm; its tokens
    against the eager answer's."""
    import torch._inductor.config as inductor_config

    from dimple import generation_utils

    compiled_decoder = generation_utils.compiled_decoder
    torch._dynamo.reset()
    generation_utils._COMPILED_DECODERS.clear()
    generation_utils.compiled_decoder = functools.partial(compiled_decoder, regional=regional)
    try:
        with inductor_config.patch(force_disable_caches=True):
            out["compiled"] = decode(h, steps=22, use_cache=True, use_torch_compile=True)
    finally:
        generation_utils.compiled_decoder = compiled_decoder
        generation_utils._COMPILED_DECODERS.clear()
    out["cold_first_answer_s"] = out["compiled"]["first_call_ms"] / 1e3
    out["eager"] = decode(h, steps=22, use_cache=True)
    same = [a == b for x, y in zip(out["compiled"]["sequences"], out["eager"]["sequences"]) for a, b in zip(x, y)]
    out["tokens_equal_eager"], out["token_agreement"] = all(same), sum(same) / len(same)


@setting(cuda_s=90, cpu_s=40)
def compile_(h: Harness, out: dict):
    cold_compiled_answer(h, out, regional=True)


@setting(cuda_s=60, cpu_s=25)
@torch.no_grad()
def vision(h: Harness, out: dict):
    model = h.model()
    _, pixel_values, grid = h.prompt(1)
    tower = functools.partial(model.visual, pixel_values, grid)
    out["eager"] = measured(h.time(tower))
    for block in model.visual.blocks:  # one torch.compile per block, the same code: one graph per layout
        block.compile()
    try:
        cold_ms, _ = h.first_call_ms(tower)
        out["compiled_blocks"] = measured(h.time(tower), first_call_ms=cold_ms)
    finally:
        for block in model.visual.blocks:
            block._compiled_call_impl = None


@setting(cuda_s=150, cpu_s=30)
def quant(h: Harness, out: dict):
    try:
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import BitsAndBytesConfig, TorchAoConfig
    except ImportError as error:
        raise Skip(f"the quantization packages or configs are unavailable: {error}") from None
    modes = {
        "torchao_int8_weight_only": lambda: TorchAoConfig(Int8WeightOnlyConfig()),
        "bnb_int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
        "bnb_nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=h.dtype),
    }
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes warns at every product
        h.model().save_pretrained(folder)
        h.free()
        for name, make in modes.items():
            try:
                model = DimpleModel.from_pretrained(folder, quantization_config=make(), device_map=str(h.device),
                                                    **dtype_argument(h.dtype))
                out[name] = decode(h, steps=22, use_cache=True, model=model)
                del model
            except (Timeout, KeyboardInterrupt):
                raise
            except Exception as error:  # noqa: BLE001 - a mode that cannot load here is skipped, named
                out[name] = {"skipped": f"{type(error).__name__}: {str(error)[:300]}"}
            free_memory(h.device)
    runs = {k: v for k, v in out.items() if isinstance(v, dict)}
    if all("skipped" in run for run in runs.values()):
        raise Skip("no quantized mode loads here: " + "; ".join(f"{k}: {v['skipped']}" for k, v in runs.items()))


@setting(cuda_s=150, cpu_s=40)
def compile_whole(h: Harness, out: dict):
    cold_compiled_answer(h, out, regional=False)


# Summary (issue 26's targets), plot, main


def dig(node, *path):
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


def summarise(report: dict) -> dict:
    s = report["settings"]
    floor_ms = dig(s, "floor", "floor_ms")
    passes = {k: dig(s, "pass", k, "ms") for k in ("eager", "cuda_graph", "compiled", "compiled_cuda_graph")}
    best_pass = min((v for v in passes.values() if v), default=None)
    answer, base = dig(s, "answer64", "steps22", "tokens_per_s"), dig(s, "baseline", "tokens_per_s")
    best_batch = {b: max((dig(s, "batch", f"batch{b}_{m}", "tokens_per_s") or 0 for m in ("prefill", "dual")), default=0)
                  for b in (1, 16)}

    def ratio(a, b):
        return a / b if a and b else None

    summary = {
        "floor_ms": floor_ms, "prefilled_pass_ms": passes, "pass_vs_floor": ratio(best_pass, floor_ms),  # <= 1.3
        "answer64_22_passes": {k: dig(s, "answer64", "steps22", k) for k in ("passes", "ms_per_pass", "tokens_per_s")},
        "baseline_tokens_per_s": base, "answer64_vs_baseline": ratio(answer, base),  # >= 3
        "batch16_vs_batch1": ratio(best_batch[16], best_batch[1]),  # >= 10
        "long256_dual_speedup": dig(s, "long256", "dual_speedup"),  # >= 2
        "first_compiled_answer_s": dig(s, "compile", "cold_first_answer_s"),  # <= 60
        "first_compiled_answer_whole_s": dig(s, "compile_whole", "cold_first_answer_s"),
        "vision_ms": {k: dig(s, "vision", k, "ms") for k in ("eager", "compiled_blocks")},
        "skipped": {k: v.get("reason") for k, v in s.items() if v.get("status") == "skipped"},
        "errors": {k: v.get("error") for k, v in s.items() if v.get("status") in ("error", "timeout")},
        "elapsed_s": report["meta"].get("elapsed_s")}
    return summary


def rows(report: dict):
    """(label, ms per pass, tokens/s) of every measurement that has one."""
    for name, entry in report["settings"].items():
        for key, run in entry.items():
            if isinstance(run, dict) and ("ms_per_pass" in run or (name in ("pass", "vision") and "ms" in run)):
                yield f"{name} {key}", run.get("ms_per_pass", run.get("ms")), run.get("tokens_per_s")


def plot(report: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = list(rows(report))
    fig, axes = plt.subplots(1, 2, figsize=(14, 1.5 + 0.3 * max(len(data), 1)))
    for ax, column, title in ((axes[0], 1, "ms per pass (pass, vision: ms per call)"), (axes[1], 2, "tokens / s")):
        shown = [(r[0], r[column]) for r in data if r[column]]
        ax.barh(range(len(shown)), [v for _, v in shown], color="tab:blue")
        ax.set_yticks(range(len(shown)), [label for label, _ in shown], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
    if dig(report, "settings", "floor", "floor_ms"):
        axes[0].axvline(report["settings"]["floor"]["floor_ms"], color="tab:red", linestyle="--", label="floor")
        axes[0].legend(fontsize=7)
    meta = report["meta"]
    fig.suptitle(f"Dimple {meta['shape']} random weights, {meta['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    def number(kind, low, text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'} >= {low}, got {text!r}")
        return value

    def int_list(text):
        values = [number(int, 1, item) for item in text.split(",") if item.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"must be a comma list of integers >= 1, got {text!r}")
        return values

    def json_object(text):
        try:
            value = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"must be a JSON object of diffusion_generate arguments, got {text!r}")
        return value

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--tiny", action="store_true", help="dimple_tools.tiny.configs' shape (the CPU dry run)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma list out of {','.join(SETTINGS)}")
    parser.add_argument("--repeats", type=functools.partial(number, int, 1), default=None, help="timed calls (median); default 3 on CUDA, 1 on the CPU")
    parser.add_argument("--layers", type=functools.partial(number, int, 1), default=None, help="decoder layers (default: the shape's)")
    parser.add_argument("--batches", type=int_list, default=[1, 4, 16], help="batch sizes of the batch setting")
    parser.add_argument("--gen-kwargs", type=json_object, default={}, help="JSON object added to every diffusion_generate call")
    parser.add_argument("--deadline", type=functools.partial(number, float, 0), default=0,
                        help="seconds for the whole run (0: none): a setting whose budget does not fit what is left is skipped")
    parser.add_argument("--budget-scale", type=functools.partial(number, float, 0.01), default=1.0, help="multiplies every setting's budget")
    parser.add_argument("--tests-log", default=None, help="a pytest log whose last line is recorded in the JSON (scripts/device_check.sh)")
    parser.add_argument("--out", default="bench_results.json", help="JSON output")
    parser.add_argument("--plot", default=None, help="PNG output (default: --out with .png; 'none': no plot)")
    args = parser.parse_args(argv)
    args.selected = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.selected if s not in SETTINGS]
    if unknown or not args.selected:
        parser.error(f"argument --settings: must be a comma list out of {','.join(SETTINGS)}, got {args.settings!r}")
    if args.device != "cpu" and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        parser.error(f"argument --device: {args.device!r} is not available here (cpu, cuda, cuda:N where CUDA is)")
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.access(folder, os.W_OK):
        parser.error(f"argument --out: {args.out!r} must be a file in an existing, writable folder")
    args.layers = {"num_hidden_layers": args.layers} if args.layers else {}
    args.repeats = args.repeats or (3 if args.device != "cpu" else 1)
    args.plot = None if (args.plot or "").lower() == "none" else args.plot or os.path.splitext(args.out)[0] + ".png"
    return args


def main(argv=None) -> None:
    args, started = parse_args(argv), time.perf_counter()
    if args.device == "cpu" and args.tiny:
        torch.set_num_threads(1)  # the tiny shape only loses to thread contention
    h = Harness(args)
    import transformers

    name = torch.cuda.get_device_name(h.device) if h.cuda else f"cpu ({os.cpu_count()} cores)"
    meta = {"command": shlex.join(["python", "-m", "dimple_tools.bench.benchmark", *(sys.argv[1:] if argv is None else argv)]),
            "device_name": name, "shape": "tiny" if args.tiny else "7B", "dtype": str(h.dtype), "torch": torch.__version__,
            "transformers": transformers.__version__, "repeats": args.repeats, "deadline_s": args.deadline,
            "prompt": "20 text, vision_start, 256 image_pad (grid 1x32x32), vision_end, 20 text = 298 tokens"}
    if args.tests_log and os.path.exists(args.tests_log):
        meta["tests"] = (open(args.tests_log).read().strip().splitlines() or [""])[-1]
    report = {"meta": meta, "settings": {}}

    def save():
        meta["elapsed_s"] = time.perf_counter() - started
        report["summary"] = summarise(report)
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(args.out + ".tmp", args.out)

    for setting_name in args.selected:
        function, cuda_s, cpu_s = SETTINGS[setting_name]
        budget = (cuda_s if h.cuda and not args.tiny else cpu_s) * args.budget_scale
        left = args.deadline - (time.perf_counter() - started) if args.deadline else math.inf
        entry = report["settings"][setting_name] = {"budget_s": budget}
        start = time.perf_counter()
        if budget > left:
            entry.update(status="skipped", reason=f"needs {budget:.0f} s, {max(left, 0):.0f} s left of the deadline")
        else:
            print(f"[bench] {setting_name} (budget {budget:.0f} s) ...", flush=True)
            try:
                with deadline(min(budget, left)):
                    function(h, entry)
                entry["status"] = "ok"
            except Skip as reason:
                entry.update(status="skipped", reason=str(reason))
            except (Timeout, Exception) as error:  # noqa: BLE001 - a failing setting must not end the run
                timeout = isinstance(error, Timeout) or "past its deadline" in str(error)  # also when wrapped
                entry.update(status="timeout" if timeout else "error",
                             error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-2000:])
            free_memory(h.device)
        entry["seconds"] = time.perf_counter() - start
        print(f"[bench] {setting_name}: {entry['status']} in {entry['seconds']:.1f} s {entry.get('reason', entry.get('error', ''))}", flush=True)
        save()
    if args.plot:
        try:
            plot(report, args.plot)
        except Exception as error:  # noqa: BLE001 - matplotlib missing: the JSON stands
            meta["plot_error"] = f"{type(error).__name__}: {error}"
    save()
    print(json.dumps(report["summary"], separators=(",", ":")))  # exit status 0: the report is --out's JSON


if __name__ == "__main__":
    main()
