#!/usr/bin/env python
"""A generated visual question-answering task for the tiny Dimple: scenes of shapes on a 3 x 3 grid.

Every image (square, 84-168 px) shows 1 to 5 filled shapes (circle, square or triangle) in saturated colours
(red, green, blue, yellow), each in its own cell of an invisible 3 x 3 grid: a shape lies inside its cell, its
bounding box 50-85 % of the cell side, at a jittered place, on a light background (one flat tint per image).
Each sample pairs the image with one question and its exact answer:

=============  =====================================  ==================================================
question type  phrasings (one drawn)                  answer
=============  =====================================  ==================================================
``describe``   "Describe the image." ...              every shape in reading order (top row first, left to
                                                      right) as ``a {colour} {shape} at the {position}``,
                                                      joined by ", " with " and " before the last, and "."
``count``      "How many shapes are there?" ...       ``one`` ... ``five``
``position``   "What is at the {position}?"           ``a {colour} {shape}`` or ``nothing``
``color``      "What color is the shape?" ...         ``red`` (one-shape images)
``shape``      "What shape is this?" ...              ``circle`` (one-shape images)
=============  =====================================  ==================================================

Positions: top left, top, top right, left, center, right, bottom left, bottom, bottom right. Example::

    a red circle at the top left, a blue square at the center and a yellow triangle at the bottom right.

Generation is deterministic: sample ``i`` of seed ``s`` depends only on ``(s, i)`` (its own ``numpy``
generator is seeded with ``[s, i]``), so ``generate_samples(10, s)[:5]`` equals ``generate_samples(5, s)``.
``parse_description`` reads a description back into its shapes (the grammar's inverse).

Library use::

    from dimple_tools.tiny.task import generate_samples, answer_is_correct
    for image, question, answer, meta in generate_samples(100, seed=0):
        ...

Command line::

    python -m dimple_tools.tiny.task --out data/shapes_train --n 2000 --seed 0
    python -m dimple_tools.tiny.task --sample sample.png          # the fixed demo scene

The CLI writes ``DIR/images/NNNNNN.png`` and ``DIR/data.jsonl`` with one LLaVA-style conversation per
line (see ``to_record``)::

    {"id": "shapes-s0-000000", "image": "images/000000.png",
     "messages": [{"role": "user", "content": "<image>\\nHow many shapes are there?"},
                  {"role": "assistant", "content": "three"}],
     "meta": {...}}
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


# --------------------------------------------------------------------------------------------
# Task vocabulary
# --------------------------------------------------------------------------------------------

#: Shape words (also the answers of the ``shape`` questions).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Colour words and their nominal RGB values: saturated and far apart from each other and from the
#: near-white background (yellow keeps a low blue channel so that it stands out against white).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 220),
    "yellow": (240, 200, 20),
}

#: The grid's cells in reading order (row-major): cell ``k`` is row ``k // 3``, column ``k % 3``.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
GRID = 3
NUMBER_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five")
MAX_SHAPES = len(NUMBER_WORDS)
NOTHING = "nothing"

#: Question phrasings per question type; answers never depend on the phrasing. ``position`` phrasings
#: have a ``{position}`` slot.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "describe": ("Describe the image.", "Describe this picture.", "What is in the image?"),
    "count": ("How many shapes are there?", "How many shapes are in the image?", "Count the shapes."),
    "position": ("What is at the {position}?",),
    "color": ("What color is the shape?", "What colour is the shape?", "Which color is it?"),
    "shape": ("What shape is this?", "Which shape is shown?", "What is the shape?"),
}
#: How often each question type is drawn (training and held-out data alike): descriptions, the long answers, are
#: the most frequent. (With 0.3 descriptions and 0.4 position questions the tiny build never got past the plateau
#: of its descriptions within 2600 diffusion steps: loss 0.056, 5 % of held-out descriptions; docs/training.md.)
QUESTION_WEIGHTS: dict[str, float] = {"describe": 0.4, "count": 0.15, "position": 0.25, "color": 0.1, "shape": 0.1}
#: Question types asked about one-shape images only (the original task's questions).
SINGLE_SHAPE_TYPES = ("color", "shape")

#: Placeholder for the image in LLaVA-style conversation text (SPEC section 5).
IMAGE_PLACEHOLDER = "<image>"

#: Image sides (square images): drawn uniformly in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE] unless one is given.
MIN_IMAGE_SIZE = 84
MAX_IMAGE_SIZE = 168
#: Smallest side a caller may ask for (cells of 9 px: small, fast images for tests).
MIN_GIVEN_IMAGE_SIZE = 28
#: ``None``: each sample draws its own side.
DEFAULT_IMAGE_SIZE = None
#: Range of a shape's bounding-box side, as a fraction of its cell's side.
MIN_SIZE_FRACTION = 0.5
MAX_SIZE_FRACTION = 0.85
#: Background pixels kept between a shape's bounding box and each edge of its cell (shapes of neighbouring
#: cells never touch; floor(0.85 * side) <= side - 2 for every cell side >= 9).
CELL_MARGIN = 1
#: Each background channel is drawn in this range (one flat, light tint per image).
BACKGROUND_RANGE = (232, 255)
#: Maximum per-channel deviation of a shape's colour from its nominal value.
COLOR_JITTER = 12
#: Triangle orientations (direction of the apex).
ORIENTATIONS = ("up", "down", "left", "right")


def shape_phrase(color: str, shape: str) -> str:
    return f"a {color} {shape}"


def describe(shapes: Sequence[dict]) -> str:
    """The description of a scene: ``shapes`` (dicts with ``color``, ``shape``, ``cell``) in reading order."""
    if not shapes:
        raise ValueError("a scene has at least one shape")
    parts = [f"{shape_phrase(s['color'], s['shape'])} at the {POSITIONS[s['cell']]}"
             for s in sorted(shapes, key=lambda s: s["cell"])]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


_PART = re.compile(rf"a ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) at the ({'|'.join(sorted(POSITIONS, key=len, reverse=True))})")


def parse_description(text: str) -> list[dict] | None:
    """The shapes a description names (``color``, ``shape``, ``cell``), or ``None`` when ``text`` is not a
    description in the task's grammar (parts in reading order, ", " and " and " separators, final ".")."""
    text = " ".join(str(text).split())
    if not text.endswith("."):
        return None
    body = text[:-1]
    head, sep, last = body.rpartition(" and ")
    pieces = (head.split(", ") + [last]) if sep else [body]
    shapes = []
    for piece in pieces:
        match = _PART.fullmatch(piece)
        if match is None:
            return None
        shapes.append({"color": match[1], "shape": match[2], "cell": POSITIONS.index(match[3])})
    cells = [s["cell"] for s in shapes]
    if cells != sorted(set(cells)) or len(shapes) > MAX_SHAPES:
        return None
    return shapes


def answer_for(question_type: str, shapes: Sequence[dict], position: int | None = None) -> str:
    """The exact answer to a question of ``question_type`` about a scene of ``shapes`` (``position``: the
    asked cell of a ``position`` question)."""
    if question_type == "describe":
        return describe(shapes)
    if question_type == "count":
        return NUMBER_WORDS[len(shapes) - 1]
    if question_type == "position":
        at = [s for s in shapes if s["cell"] == position]
        return shape_phrase(at[0]["color"], at[0]["shape"]) if at else NOTHING
    if question_type in SINGLE_SHAPE_TYPES:
        if len(shapes) != 1:
            raise ValueError(f"{question_type} questions are asked about one-shape images, got {len(shapes)} shapes")
        return shapes[0]["color"] if question_type == "color" else shapes[0]["shape"]
    raise ValueError(f"unknown question type {question_type!r}; expected one of {sorted(QUESTIONS)}")


def question_text(question_type: str, phrasing: int, position: int | None = None) -> str:
    text = QUESTIONS[question_type][phrasing]
    return text.format(position=POSITIONS[position]) if question_type == "position" else text


def all_questions() -> list[str]:
    """Every question the task asks, in a fixed order."""
    return [q.format(position=p) if "{position}" in q else q
            for phrasings in QUESTIONS.values() for q in phrasings
            for p in (POSITIONS if "{position}" in q else POSITIONS[:1])]


def all_answers() -> list[str]:
    """Every short answer (colours, shapes, counts, "nothing", shape phrases) and, for the tokenizer, one
    description per shape and position and the separators, in a fixed order."""
    phrases = [shape_phrase(c, s) for c in COLORS for s in SHAPES]
    placed = [describe([{"color": c, "shape": s, "cell": k}]) for k in range(len(POSITIONS))
              for c in COLORS for s in SHAPES]
    joined = [describe([{"color": "red", "shape": "circle", "cell": 0}, {"color": "blue", "shape": "square", "cell": 4},
                        {"color": "yellow", "shape": "triangle", "cell": 8}])]
    return list(COLORS) + list(SHAPES) + list(NUMBER_WORDS) + [NOTHING] + phrases + placed + joined


# --------------------------------------------------------------------------------------------
# Answers
# --------------------------------------------------------------------------------------------

_TRAILING_PUNCTUATION = ".,;:!?\"'`"


def normalize_answer(text: str) -> str:
    """Lower-case, collapse whitespace and strip surrounding quotes/trailing punctuation."""
    text = " ".join(str(text).split()).lower()
    text = text.strip(_TRAILING_PUNCTUATION + " ")
    return text


def answer_is_correct(predicted: str, expected: str) -> bool:
    """Whether ``predicted`` is exactly ``expected`` up to case, whitespace and final punctuation.

    ``"Red."`` and ``" red "`` match ``"red"``; ``"dark red"`` or ``"red circle"`` do not.
    """
    return normalize_answer(predicted) == normalize_answer(expected)


def shapes_correct(predicted: str, expected: str) -> float:
    """Partial credit of a description: the fraction of the scene's shapes that ``predicted`` names with
    their colour, shape and position, less one share per extra shape it names (a shape at a cell the scene
    leaves empty; a wrong colour or shape at an occupied cell only misses that shape), at least 0; 0 for an
    unparseable text."""
    truth = parse_description(expected)
    if truth is None:
        raise ValueError(f"expected: not a description of the task's grammar: {expected!r}")
    named = parse_description(predicted) or []
    key = lambda s: (s["cell"], s["color"], s["shape"])  # noqa: E731
    hits = len({key(s) for s in named} & {key(s) for s in truth})
    extra = sum(s["cell"] not in {t["cell"] for t in truth} for s in named)
    return max(0.0, (hits - extra) / len(truth))


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _check_image_size(image_size) -> None:
    if image_size is None:
        return
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < MIN_GIVEN_IMAGE_SIZE \
            or image_size > MAX_CLI_IMAGE_SIZE:
        raise ValueError(f"image_size must be None or an integer from {MIN_GIVEN_IMAGE_SIZE} to {MAX_CLI_IMAGE_SIZE}, "
                         f"got {image_size!r}")


def cell_box(cell: int, image_size: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of grid cell ``cell`` in an ``image_size`` square."""
    row, col = divmod(cell, GRID)
    edges = [round(i * image_size / GRID) for i in range(GRID + 1)]
    return edges[col], edges[row], edges[col + 1] - 1, edges[row + 1] - 1


def shape_polygon(shape: str, bbox: Sequence[int], orientation: str = "up") -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` inscribed in ``bbox`` = (x0, y0, x1, y1), inclusive pixel coordinates.

    Returns ``None`` for a circle (drawn as an ellipse over the bbox). The triangle's apex is at the
    middle of the side named by ``orientation``; its base is the opposite side of the bbox.
    """
    x0, y0, x1, y1 = bbox
    if shape == "circle":
        return None
    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        apex_and_base = {
            "up": [(cx, y0), (x1, y1), (x0, y1)],
            "down": [(cx, y1), (x0, y0), (x1, y0)],
            "left": [(x0, cy), (x1, y0), (x1, y1)],
            "right": [(x1, cy), (x0, y1), (x0, y0)],
        }
        if orientation not in apex_and_base:
            raise ValueError(f"unknown orientation {orientation!r}; expected one of {ORIENTATIONS}")
        return apex_and_base[orientation]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(shapes: Sequence[dict], background: Sequence[int], image_size: int) -> Image.Image:
    """Draw every shape (``shape``, ``rgb``, ``bbox``, ``orientation``) on a flat ``background``.

    Drawing is aliased (no anti-aliasing) so that every pixel is either exactly the background or exactly
    one shape's colour.
    """
    image = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)
    for s in shapes:
        x0, y0, x1, y1 = (int(v) for v in s["bbox"])
        if not (0 <= x0 < x1 < image_size and 0 <= y0 < y1 < image_size):
            raise ValueError(f"bbox {tuple(s['bbox'])} is not inside a {image_size}x{image_size} image")
        fill = tuple(int(v) for v in s["rgb"])
        polygon = shape_polygon(s["shape"], (x0, y0, x1, y1), s.get("orientation", "up"))
        if polygon is None:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon(polygon, fill=fill)
    return image


def _sample_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def _draw_shape(rng: np.random.Generator, cell: int, image_size: int) -> dict:
    color = list(COLORS)[rng.integers(len(COLORS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    x0, y0, x1, y1 = cell_box(cell, image_size)
    cell_side = min(x1 - x0, y1 - y0) + 1
    side = int(rng.integers(int(np.ceil(MIN_SIZE_FRACTION * cell_side)), int(np.floor(MAX_SIZE_FRACTION * cell_side)) + 1))
    # one background pixel between the bbox and the cell's edges, so shapes of neighbouring cells never touch
    left = x0 + CELL_MARGIN + int(rng.integers(0, x1 - x0 + 1 - 2 * CELL_MARGIN - side + 1))
    top = y0 + CELL_MARGIN + int(rng.integers(0, y1 - y0 + 1 - 2 * CELL_MARGIN - side + 1))
    return {
        "cell": cell, "position": POSITIONS[cell], "color": color, "shape": shape,
        "rgb": [int(np.clip(v + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1), 0, 255)) for v in COLORS[color]],
        "bbox": [left, top, left + side - 1, top + side - 1],
        "orientation": ORIENTATIONS[rng.integers(len(ORIENTATIONS))] if shape == "triangle" else "up",
    }


def generate_sample(seed: int, index: int, image_size: int | None = DEFAULT_IMAGE_SIZE,
                    question_type: str | None = None) -> tuple[Image.Image, str, str, dict]:
    """Sample number ``index`` of seed ``seed``: ``(image, question, answer, meta)``.

    ``meta`` holds everything the sample was drawn from (``id``, ``seed``, ``index``, ``question_type``,
    ``position`` (the asked cell of a position question, else None), ``image_size``, ``background`` and
    ``shapes``: per shape ``cell``, ``position``, ``color``, ``shape``, ``rgb``, ``bbox`` (inclusive x0, y0,
    x1, y1) and ``orientation``). ``image_size`` fixes the side (else drawn in 84-168); ``question_type``
    fixes the type (else drawn with QUESTION_WEIGHTS).
    """
    _check_image_size(image_size)
    if question_type is not None and question_type not in QUESTIONS:
        raise ValueError(f"question_type must be one of {sorted(QUESTIONS)} or None, got {question_type!r}")
    rng = _sample_rng(seed, index)
    types = list(QUESTION_WEIGHTS)
    drawn_type = types[rng.choice(len(types), p=list(QUESTION_WEIGHTS.values()))]
    question_type = question_type or drawn_type
    size = int(rng.integers(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE + 1))
    image_size = size if image_size is None else int(image_size)
    n = 1 if question_type in SINGLE_SHAPE_TYPES else int(rng.integers(1, MAX_SHAPES + 1))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=n, replace=False))
    shapes = [_draw_shape(rng, cell, image_size) for cell in cells]
    background = [int(v) for v in rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, size=3)]
    position = None
    if question_type == "position":  # half the time an occupied cell, else an empty one (when there is one)
        empty = [c for c in range(len(POSITIONS)) if c not in cells]
        pool = cells if (rng.random() < 0.5 or not empty) else empty
        position = int(pool[rng.integers(len(pool))])
    phrasing = int(rng.integers(len(QUESTIONS[question_type])))
    meta = {
        "id": f"shapes-s{seed}-{index:06d}", "seed": int(seed), "index": int(index),
        "question_type": question_type, "position": position, "image_size": image_size,
        "background": background, "shapes": shapes,
    }
    image = render_scene(shapes, background, image_size)
    return image, question_text(question_type, phrasing, position), answer_for(question_type, shapes, position), meta


def generate_samples(n: int, seed: int, image_size: int | None = DEFAULT_IMAGE_SIZE,
                     question_type: str | None = None) -> list[tuple[Image.Image, str, str, dict]]:
    """``n`` samples ``(PIL.Image, question, answer, meta)``, deterministic in ``seed``.

    Use different seeds for training and held-out evaluation data.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    return [generate_sample(seed, i, image_size, question_type) for i in range(n)]


#: The fixed demo scene: three shapes on the diagonal and one more (its description is 4 parts long).
SAMPLE_SCENE = (("red", "circle", 0), ("green", "triangle", 2), ("blue", "square", 4), ("yellow", "circle", 8))


def sample_image(image_size: int = MAX_IMAGE_SIZE) -> Image.Image:
    """The fixed demo image (SAMPLE_SCENE) on white: each shape centred in its cell, 70 % of the cell side."""
    _check_image_size(image_size)
    shapes = []
    for color, shape, cell in SAMPLE_SCENE:
        x0, y0, x1, y1 = cell_box(cell, image_size)
        side = round(0.7 * (x1 - x0 + 1))
        left, top = x0 + (x1 - x0 + 1 - side) // 2, y0 + (y1 - y0 + 1 - side) // 2
        shapes.append({"shape": shape, "rgb": COLORS[color], "bbox": (left, top, left + side - 1, top + side - 1)})
    return render_scene(shapes, (255, 255, 255), image_size)


def sample_description() -> str:
    """What the demo image shows, in the task's words."""
    return describe([{"color": c, "shape": s, "cell": k} for c, s, k in SAMPLE_SCENE])


# --------------------------------------------------------------------------------------------
# LLaVA-style records and files
# --------------------------------------------------------------------------------------------

JSONL_NAME = "data.jsonl"
IMAGE_DIR = "images"


def to_record(question: str, answer: str, meta: dict, image_path: str) -> dict[str, Any]:
    """One LLaVA-style conversation (SPEC section 5) for a sample whose image is at ``image_path``
    (relative to the JSONL file's folder)."""
    return {
        "id": meta["id"],
        "image": image_path,
        "messages": [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
            {"role": "assistant", "content": answer},
        ],
        "meta": meta,
    }


def write_dataset(out_dir: str, n: int, seed: int, image_size: int | None = DEFAULT_IMAGE_SIZE) -> str:
    """Write ``n`` samples as ``out_dir/images/NNNNNN.png`` plus ``out_dir/data.jsonl``.

    Returns the path of the JSONL file. Existing files of the same names are overwritten.
    """
    os.makedirs(os.path.join(out_dir, IMAGE_DIR), exist_ok=True)
    jsonl_path = os.path.join(out_dir, JSONL_NAME)
    with open(jsonl_path, "w", encoding="utf-8") as f:
        for image, question, answer, meta in generate_samples(n, seed, image_size):
            rel_path = f"{IMAGE_DIR}/{meta['index']:06d}.png"
            image.save(os.path.join(out_dir, rel_path))
            f.write(json.dumps(to_record(question, answer, meta, rel_path)) + "\n")
    return jsonl_path


def read_dataset(jsonl_path: str) -> list[tuple[Image.Image, str, str, dict]]:
    """Read a JSONL file written by ``write_dataset`` back into ``(image, question, answer, meta)``."""
    root = os.path.dirname(os.path.abspath(jsonl_path))
    samples = []
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            user, assistant = record["messages"]
            question = re.sub(rf"^{re.escape(IMAGE_PLACEHOLDER)}\n", "", user["content"])
            with Image.open(os.path.join(root, record["image"])) as im:
                image = im.convert("RGB")
            samples.append((image, question, assistant["content"], record.get("meta", {})))
    return samples


def iter_task_texts() -> Iterable[str]:
    """Every text the task can produce (questions and answers; descriptions by their parts), in a fixed order."""
    yield from all_questions()
    yield from all_answers()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


#: Largest ``--image-size`` the CLI accepts: the largest multiple of 28 whose square fits the Qwen2-VL image
#: processor's default ``max_pixels`` (28·28·1280); a larger image is scaled down before the model sees it.
MAX_CLI_IMAGE_SIZE = 980


def _cli_int(low: int, high: int | None = None):
    """An argparse type: an integer in ``[low, high]``; a bad value is refused with the flag's name and the
    allowed values (exit code 2)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dimple-shapes", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder for images/ and data.jsonl")
    parser.add_argument("--n", type=_cli_int(1), default=1000, help="number of samples, >= 1 (default 1000)")
    parser.add_argument("--seed", type=_cli_int(0), default=0, help="random seed, >= 0 (default 0)")
    parser.add_argument("--image-size", "--image_size", type=_cli_int(MIN_GIVEN_IMAGE_SIZE, MAX_CLI_IMAGE_SIZE), default=None,
                        help=f"image side in pixels, from {MIN_GIVEN_IMAGE_SIZE} to {MAX_CLI_IMAGE_SIZE} (default: each "
                        f"sample draws one from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE})")
    parser.add_argument("--sample", metavar="PATH", help="also write the fixed demo scene to PATH")
    args = parser.parse_args(argv)
    if args.out is None and args.sample is None:
        parser.error("give --out DIR and/or --sample PATH")
    if args.sample:
        os.makedirs(os.path.dirname(os.path.abspath(args.sample)), exist_ok=True)
        sample_image(args.image_size or MAX_IMAGE_SIZE).save(args.sample)
        print(f"wrote {args.sample}")
    if args.out:
        path = write_dataset(args.out, args.n, args.seed, args.image_size)
        print(f"wrote {args.n} samples to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
