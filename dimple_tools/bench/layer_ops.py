#!/usr/bin/env python
"""Operators that one decoder layer dispatches in a prefilled decoding pass (views excluded), on the CPU, and
those of a decoding step outside the forward pass (scoring and committing, which run uncaptured on CUDA).

Each non-view operator is at least one kernel launch on CUDA, so this counts what a pass costs in kernels
besides its matrix products, without a GPU. The pass runs as decoding runs it, with q/k/v stacked
(`stacked_qkv_projections`). `F.rms_norm` counts as one operator: the CPU decomposes it into 7 (casts to fp32
and back, pow, mean, add, rsqrt, mul), which CUDA runs as one fused kernel. The count is the difference
between a 2-layer and a 1-layer tiny model.

Usage: python -m dimple_tools.bench.layer_ops  (no arguments; --help prints this)
"""

import argparse
from collections import Counter

from dimple_tools.paths import REPOSITORY_ROOT  # noqa: E402
ROOT = str(REPOSITORY_ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from dimple.generation_utils import DenoisingForward  # noqa: E402
from dimple.modeling_dimple import DimpleModel  # noqa: E402
from dimple_tools.tiny.configs import tiny_config  # noqa: E402

VIEWS = {
    "aten.view", "aten.t", "aten.slice", "aten._unsafe_view", "aten.transpose", "aten.select", "aten.unsqueeze",
    "aten.split", "aten.split_with_sizes", "aten.expand", "aten.alias", "aten.detach", "aten.permute",
}


class OperatorCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.inside_fused = False  # inside an operator that CUDA runs as one kernel: its parts are not counted

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.inside_fused:
            self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class FusedOnCuda(TorchFunctionMode):
    """Counts `F.rms_norm` as the one operator it is on CUDA, not as the CPU's decomposition."""

    def __init__(self, counter: OperatorCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.rms_norm or self.counter.inside_fused:
            return func(*args, **(kwargs or {}))
        self.counter.counts["rms_norm"] += 1
        self.counter.inside_fused = True
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.counter.inside_fused = False


@torch.no_grad()
def prefilled_pass_operators(layers: int, prompt: int = 20, canvas: int = 9) -> Counter:
    torch.manual_seed(0)
    config = tiny_config()
    config.num_hidden_layers = layers
    model = DimpleModel(config).eval().to(torch.bfloat16)
    total = prompt + canvas + 1
    embeds = torch.randn(1, total, config.hidden_size, dtype=torch.bfloat16)
    positions = torch.arange(total).expand(3, 1, total)
    cache = model.new_prefix_cache(total)
    model(inputs_embeds=embeds, position_ids=positions, past_key_values=cache)  # fills the cache
    counter = OperatorCounter()
    with model.stacked_qkv_projections(), counter, FusedOnCuda(counter):
        model(inputs_embeds=embeds[:, prompt:], position_ids=positions[..., prompt:], past_key_values=cache,
              cache_position=torch.arange(prompt, total), logits_to_keep=slice(0, canvas))
    return Counter({op: n for op, n in counter.counts.items() if op not in VIEWS})


class OutsidePassCounter(OperatorCounter):
    """Counts only the operators dispatched outside the denoising pass (`DenoisingForward.__call__`: embedding
    the canvas and the decoder without the head, what a CUDA graph captures). The head, applied to the masked
    positions after the pass, is counted: it runs uncaptured."""

    def __init__(self):
        super().__init__()
        self.inside_pass = False
        self.original_call = DenoisingForward.__call__

    def __enter__(self):
        counter, original_call = self, self.original_call

        def call(denoise, *args, **kwargs):
            counter.inside_pass = True
            try:
                return original_call(denoise, *args, **kwargs)
            finally:
                counter.inside_pass = False

        DenoisingForward.__call__ = call
        return super().__enter__()

    def __exit__(self, *exc):
        DenoisingForward.__call__ = self.original_call
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.inside_pass:
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)


@torch.no_grad()
def decoding_step_operators(steps: int, **settings) -> tuple:
    """(operators outside the denoising passes, forward passes) of a prefilled greedy decode."""
    torch.manual_seed(0)
    model = DimpleModel(tiny_config()).eval()
    prompt = torch.randint(10, 60, (1, 9))
    with OutsidePassCounter() as counter:
        out = model.diffusion_generate(prompt, max_new_tokens=32, steps=steps, alg="maskgit_plus", use_cache=True,
                                       return_dict_in_generate=True, **settings)
    return sum(n for op, n in counter.counts.items() if op not in VIEWS), out.num_forward_passes


def parse_args(argv=None) -> argparse.Namespace:
    """The script takes no arguments: `--help` prints the docstring, anything else is refused (exit code 2)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.parse_args(argv)


def main(argv=None):
    parse_args(argv)
    one, two = prefilled_pass_operators(1), prefilled_pass_operators(2)
    per_layer = two - one
    print(f"per layer: {sum(per_layer.values())} operators: {dict(per_layer.most_common())}")
    print(f"outside the layers (rotary tables, final norm, head): {sum(one.values()) - sum(per_layer.values())}")
    # Per step: the difference of two decodes, so the set-up (prompt, positions, masks) cancels.
    for name, settings in (("greedy", {}), ("confident decoding, alg_p_threshold=0.9", dict(alg_p_threshold=0.9))):
        (ops_long, passes_long), (ops_short, passes_short) = (decoding_step_operators(n, **settings) for n in (16, 8))
        per_step = (ops_long - ops_short) / (passes_long - passes_short)
        print(f"per decoding step outside the pass (head, scoring, choosing, committing; {name}): {per_step:.0f}")


if __name__ == "__main__":
    main()
