"""Differences between transformers releases, in one place for the tools.

The remote-code modules at the repository root cannot import this package (they travel alone to the Hub); the
one difference they handle themselves is in `processing_dimple.py`. docs/compatibility.md lists the releases
tested.
"""

import re

import transformers

TRANSFORMERS_VERSION = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
TRANSFORMERS_5 = TRANSFORMERS_VERSION >= (5, 0)
# 4.46.2's Trainer skips the gradient all-reduce of data-parallel training (see dimple_tools/training/train.py).
TRANSFORMERS_4_46 = TRANSFORMERS_VERSION == (4, 46)


def dtype_argument(dtype) -> dict:
    """The `from_pretrained` keyword for the weights' dtype: `dtype` from 4.56 on, `torch_dtype` before."""
    return {"dtype": dtype} if TRANSFORMERS_VERSION >= (4, 56) else {"torch_dtype": dtype}
