"""Weight memory of Dimple in each loading mode, computed on the meta device (no weights, no GPU).

    python -m dimple_tools.bench.quantization_memory            # the Dimple-7B shape (the repository's config.json)
    python -m dimple_tools.bench.quantization_memory --config tiny-dimple

Modes: bf16, int8 weight-only (torchao `Int8WeightOnlyConfig`, bitsandbytes 8-bit), 4-bit (bitsandbytes nf4,
torchao `Int4WeightOnlyConfig`). Every `nn.Linear` outside `DimpleModel.quantization_skip_modules` (the vision
tower, the projector and the head stay bf16 by default) is stored as its library stores it; the embeddings,
norms and biases stay bf16. tests/test_quantization.py checks these formulas against the bytes of the tiny model
quantized for real on the CPU.
"""

import argparse

import torch
from torch import nn
from dimple_tools.paths import REPOSITORY_ROOT

ROOT = REPOSITORY_ROOT
GB = 1e9


def quantized_linear_bytes(mode: str, out_features: int, in_features: int, dtype_bytes: int = 2) -> int:
    """Bytes of one quantized `nn.Linear` weight (the bias is kept in `dtype_bytes` elsewhere):

    * torchao-int8: int8 values + one scale per output row (in the model's dtype);
    * bnb-int8: int8 values + one fp32 scale per row (`SCB`);
    * bnb-nf4: two 4-bit values per byte + one fp32 absmax per block of 64 (no double quantization);
    * torchao-int4: two 4-bit values per byte + a scale and a zero point per group of 128 (in the model's dtype).
    """
    n = out_features * in_features
    if mode == "torchao-int8":
        return n + out_features * dtype_bytes
    if mode == "bnb-int8":
        return n + out_features * 4
    if mode == "bnb-nf4":
        return n // 2 + -(-n // 64) * 4
    if mode == "torchao-int4":
        return n // 2 + 2 * -(-n // 128) * dtype_bytes
    raise ValueError(f"unknown mode {mode!r}")


MODES = ("bf16", "torchao-int8", "bnb-int8", "bnb-nf4", "torchao-int4")


def weight_bytes(model: nn.Module, mode: str, dtype_bytes: int = 2, skip_modules=None) -> int:
    """Parameter bytes of `model` (any device, meta included) loaded in `mode`."""
    if skip_modules is None:
        skip_modules = type(model).quantization_skip_modules
    total = 0
    quantized = set()
    if mode != "bf16":
        for name, module in model.named_modules():
            if type(module) is nn.Linear and not any(name == s or name.startswith(s + ".") for s in skip_modules):
                total += quantized_linear_bytes(mode, module.out_features, module.in_features, dtype_bytes)
                quantized.add(name + ".weight")
    for name, param in model.named_parameters():
        if name not in quantized:
            total += param.numel() * dtype_bytes
    return total


def meta_model(config_path):
    from dimple.configuration_dimple import DimpleConfig
    from dimple.modeling_dimple import DimpleModel

    config = DimpleConfig.from_pretrained(config_path)
    with torch.device("meta"):
        return DimpleModel(config)


def table(model) -> str:
    parameters = sum(p.numel() for p in model.parameters())
    rows = ["| mode | weights (GB) | of bf16 |", "| --- | ---: | ---: |"]
    bf16 = weight_bytes(model, "bf16")
    for mode in MODES:
        size = weight_bytes(model, mode)
        rows.append(f"| {mode} | {size / GB:.2f} | {size / bf16:.0%} |")
    return f"{parameters / 1e9:.2f} B parameters\n\n" + "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT), help="a folder with config.json (default: the Dimple-7B one)")
    args = parser.parse_args(argv)
    print(table(meta_model(args.config)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
