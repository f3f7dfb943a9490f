"""Answer length for the tools (server, demos, evaluation): open-ended decoding up to a bound.

A request or a question without an answer length is decoded open-ended (`diffusion_generate(open_ended=True)`):
the canvas grows block by block until the answer's end-of-text, up to `bound` positions. `steps` keeps the
checkpoint's steps per canvas position (its generation config's `steps / max_new_tokens`, 1 for the release and
the tiny model), so that a larger bound gives each block the passes a fixed canvas would.
"""

import math

from dimple.generation_utils import MAX_STEPS

#: The longest open-ended answer when the caller names no bound.
DEFAULT_BOUND = 256


def open_ended_settings(generation_config, bound: int = DEFAULT_BOUND) -> dict:
    """`diffusion_generate` keyword arguments for an open-ended answer of at most `bound` tokens."""
    canvas = getattr(generation_config, "max_new_tokens", None)
    steps = getattr(generation_config, "steps", None)
    settings = {"open_ended": True, "max_new_tokens": bound}
    if canvas and steps:
        settings["steps"] = max(1, min(MAX_STEPS, math.ceil(bound * steps / canvas)))
    return settings
