#!/usr/bin/env python
"""The decoding trajectory of one Dimple answer: which token was committed at which step.

Dimple decodes by iterative parallel unmasking: the answer starts as a canvas of `<|mask|>` tokens and
every step (one forward pass) commits some of them; a committed token never changes. The trajectory
lists, for every answer position that got a token, the step that committed it; the picture draws the
answer positions (x) against the steps (y, step 1 at the top), each position's cells coloured by the
step at which it was committed and the token written into the cell of that step.

Steps are counted from 1: step s is the canvas after s forward passes, i.e. `history[s - 1]` of
`diffusion_generate(..., output_history=True, return_dict_in_generate=True)`, or the s-th canvas a
streamer's `put` received (those are answer canvases only: use `prompt_length=0`).

Library use::

    out = model.diffusion_generate(**inputs, output_history=True, return_dict_in_generate=True)
    prompt_length = inputs["input_ids"].shape[1]
    decoding_trajectory(out.history, prompt_length, model.config.mask_token_id)  # [(position, step, id)]
    plot_trajectory(out.history, prompt_length, model.config.mask_token_id, processor, "trajectory.png")

Command line (the PNG in assets/ was made this way; threshold 0 decodes by the schedule, so the tiny model
commits its answer over several steps instead of all at once)::

    python -m dimple_tools.demos.trajectory --model tiny-dimple --alg-p-threshold 0 --out assets/trajectory.png
    python -m dimple_tools.demos.trajectory --model path/or/hub-id --image photo.jpg --question "Describe the image."
"""

from __future__ import annotations

import argparse
import pathlib

from transformers.generation.streamers import BaseStreamer
from dimple_tools.paths import REPOSITORY_ROOT

ROOT = REPOSITORY_ROOT
DEFAULT_QUESTION = "Describe the image."
MASK_COLOUR = (0.93, 0.93, 0.93, 1.0)  # cells still masked
FIXED_ALPHA = 0.3  # cells after the commit step: the token stays, drawn faded


def _rows(history, row: int):
    """Each canvas of `history` as a list of ids (row `row` of a batch)."""
    rows = []
    for canvas in history:
        canvas = canvas.tolist() if hasattr(canvas, "tolist") else list(canvas)
        if canvas and isinstance(canvas[0], (list, tuple)):  # (batch, length)
            canvas = list(canvas[row])
        rows.append([int(token) for token in canvas])
    return rows


def decoding_trajectory(history, prompt_length: int, mask_token_id: int, row: int = 0) -> list[tuple[int, int, int]]:
    """`(position, step, token_id)` for every answer position that holds a token at the end, by position.

    Args:
        history: the sequences after every step (tensors `(batch, length)` or `(length,)`, or lists of ids).
        prompt_length: width of the prompt in each sequence (0 for a streamer's answer canvases).
        mask_token_id: the `<|mask|>` id.
        row: which row of a batch.

    `position` counts from the start of the answer, `step` from 1 (the step whose canvas first shows the
    token), `token_id` is the token committed at that step. Positions still masked after the last step
    are left out.
    """
    rows = [canvas[prompt_length:] for canvas in _rows(history, row)]
    trajectory = []
    for position in range(len(rows[0]) if rows else 0):
        for step, canvas in enumerate(rows, start=1):
            if canvas[position] != mask_token_id:
                trajectory.append((position, step, canvas[position]))
                break
    return trajectory


def token_label(tokenizer, token_id: int) -> str:
    """Short text for one token: the word without its leading space, `<eot>`-style names for special tokens."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor or its tokenizer
    if tokenizer is None:
        return str(token_id)
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if token_id in set(getattr(tokenizer, "all_special_ids", ())) or (text.startswith("<|") and text.endswith("|>")):
        names = {"endoftext": "eot", "im_end": "end", "im_start": "start", "mask": "mask"}
        name = text.strip("<|>")
        return f"<{names.get(name, name[:6])}>"
    if text == "\n" or text.strip() == "" and "\n" in text:
        return "⏎"
    label = text.strip() or "␣"
    return label if len(label) <= 8 else label[:7] + "…"


def plot_trajectory(history, prompt_length: int, mask_token_id: int, tokenizer=None, path=None, row: int = 0, title=None):
    """Draw the trajectory (see the module docstring) and save it as a PNG at `path`.

    Args:
        history, prompt_length, mask_token_id, row: as for `decoding_trajectory`.
        tokenizer: a tokenizer or processor for the token texts (None: the ids are written).
        path: where to save the PNG; None returns the open matplotlib `Figure` instead (for inspection).
        title: figure title (default: "Decoding trajectory").

    Returns:
        `path` (after saving) or the `Figure`. Each committed position's token is
        written exactly once, in the cell (position, step) of its commit step.
    """
    # The object-oriented API (no pyplot): no global state, safe in a server's worker threads.
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import BoundaryNorm
    from matplotlib.figure import Figure

    rows = [canvas[prompt_length:] for canvas in _rows(history, row)]
    steps = len(rows)
    positions = len(rows[0]) if rows else 0
    trajectory = decoding_trajectory(history, prompt_length, mask_token_id, row)

    cmap = colormaps["viridis"]
    if steps > cmap.N:  # one colour per step (BoundaryNorm needs as many colours as steps)
        cmap = cmap.resampled(steps)
    norm = BoundaryNorm(np.arange(0.5, max(steps, 1) + 1.5), cmap.N)
    cells = np.tile(np.array(MASK_COLOUR), (max(steps, 1), max(positions, 1), 1))
    for position, step, _ in trajectory:
        colour = np.array(cmap(norm(step)))
        cells[step - 1, position] = colour
        cells[step:, position] = colour * [1, 1, 1, 0] + [0, 0, 0, FIXED_ALPHA]

    width = min(40.0, max(4.0, 0.62 * positions + 2.2))
    height = min(40.0, max(2.4, 0.42 * steps + 1.4))
    fig = Figure(figsize=(width, height), dpi=110)
    ax = fig.add_subplot()
    extent = (-0.5, max(positions, 1) - 0.5, max(steps, 1) + 0.5, 0.5)  # step 1 at the top
    ax.imshow(cells, extent=extent, aspect="auto", interpolation="nearest")
    fontsize = 8 if positions <= 40 else 6
    for position, step, token_id in trajectory:
        r, g, b, _ = cmap(norm(step))
        ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(position, step, token_label(tokenizer, token_id), ha="center", va="center", fontsize=fontsize, color=ink)
    ax.set_xticks(range(positions)[:: max(1, positions // 32)])
    ax.set_yticks(range(1, steps + 1)[:: max(1, steps // 32)])
    ax.set_xticks(np.arange(-0.5, positions, 1), minor=True)
    ax.set_yticks(np.arange(0.5, steps + 1, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("answer position")
    ax.set_ylabel("step (forward pass)")
    left = positions - len(trajectory)
    subtitle = f"{len(trajectory)} of {positions} positions committed in {steps} step{'s' if steps != 1 else ''}"
    subtitle += f", {left} still masked" if left else ""
    ax.set_title(f"{title or 'Decoding trajectory'}\n{subtitle}", fontsize=9, parse_math=False)  # "$5" is text
    if steps:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, fraction=0.04, pad=0.02)
        bar.set_label("commit step")
        bar.set_ticks(range(1, steps + 1)[:: max(1, steps // 16)])
    fig.tight_layout()
    if path is None:
        return fig
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")  # Figure.savefig uses the Agg canvas
    return path


class CanvasRecorder(BaseStreamer):
    """A `diffusion_generate` streamer that keeps every answer canvas it receives (`canvases`, row 0),
    i.e. a history with `prompt_length=0`."""

    def __init__(self):
        self.canvases = []
        self.finished = False

    def put(self, value):
        value = value.tolist() if hasattr(value, "tolist") else list(value)
        self.canvases.append(list(value[0]) if value and isinstance(value[0], (list, tuple)) else value)

    def end(self):
        self.finished = True


def load(model_path):
    """(model, processor) loaded as users do; see demo.load."""
    from dimple_tools.demos import cli as demo

    return demo.load(model_path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "tiny-dimple"), help="checkpoint folder or hub id")
    parser.add_argument("--image", default=None, help="image file (default: the generated sample scene of four shapes)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--out", default="trajectory.png", help="PNG to write")
    parser.add_argument("--alg", default=None)
    parser.add_argument("--alg-p-threshold", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--use-cache", action="store_true", help="prefilling")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401  (the picture; checked before the model loads)
    except ImportError as error:
        raise SystemExit(f"dimple-trajectory needs matplotlib, the `demo` extra: pip install -e '.[demo]' "
                         f"(or pip install matplotlib); {error}") from None

    from dimple_tools.demos import cli as demo

    model, processor = load(args.model)
    image = args.image or demo.sample_image()
    kwargs = {name: getattr(args, name) for name in ("alg", "alg_p_threshold", "steps", "max_new_tokens")}
    kwargs = {name: value for name, value in kwargs.items() if value is not None}
    recorder = CanvasRecorder()
    text, passes, seconds = demo.answer(model, processor, image, args.question, streamer=recorder, use_cache=args.use_cache, **kwargs)
    settings = ", ".join(f"{name}={value}" for name, value in kwargs.items())
    title = f"Q: {args.question}   A: {text}" + (f"   ({settings})" if settings else "")
    path = plot_trajectory(recorder.canvases, 0, model.config.mask_token_id, processor, args.out, title=title)
    print(f"Q: {args.question}\nA: {text}    [{passes} forward passes, {seconds * 1000:.0f} ms]\nwrote {path}")


if __name__ == "__main__":
    main()
