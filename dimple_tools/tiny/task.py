#!/usr/bin/env python
"""A generated visual question-answering task for the tiny Dimple.

Every image shows ONE filled shape (circle, square or triangle) in ONE saturated colour (red, green,
blue or yellow) on a light, near-white background, at a random position and size (the shape's
bounding box spans 30-80 % of the image side and lies fully inside the image). Each sample pairs
the image with one question and its exact answer:

=================  ==============================  ================
question type      phrasings (one drawn)           answer
=================  ==============================  ================
``color``          "What color is the shape?" ...  ``"red"``
``shape``          "What shape is this?" ...       ``"circle"``
``describe``       "Describe the image." ...       ``"a red circle"``
=================  ==============================  ================

Generation is deterministic: sample ``i`` of seed ``s`` depends only on ``(s, i)`` (its own
``numpy`` generator is seeded with ``[s, i]``), so ``generate_samples(10, s)[:5]`` equals
``generate_samples(5, s)``.

Library use::

    from dimple_tools.tiny.task import generate_samples, answer_is_correct
    for image, question, answer, meta in generate_samples(100, seed=0):
        ...

Command line::

    python -m dimple_tools.tiny.task --out data/shapes_train --n 2000 --seed 0
    python -m dimple_tools.tiny.task --sample sample.png          # the fixed demo image (a red circle)

The CLI writes ``DIR/images/NNNNNN.png`` and ``DIR/data.jsonl`` with one LLaVA-style conversation per
line (see ``to_record``)::

    {"id": "shapes-s0-000000", "image": "images/000000.png",
     "messages": [{"role": "user", "content": "<image>\\nWhat color is the shape?"},
                  {"role": "assistant", "content": "red"}],
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

#: Question phrasings per question type; answers never depend on the phrasing.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "color": ("What color is the shape?", "What colour is the shape?", "Which color is it?"),
    "shape": ("What shape is this?", "Which shape is shown?", "What is the shape?"),
    "describe": ("Describe the image.", "Describe this picture.", "What is in the image?"),
}

#: Placeholder for the image in LLaVA-style conversation text (SPEC section 5).
IMAGE_PLACEHOLDER = "<image>"

DEFAULT_IMAGE_SIZE = 56
#: Patch size (14) times spatial merge size (2) of the Qwen2-VL image processor.
IMAGE_SIZE_MULTIPLE = 28
#: Range of the shape's bounding-box side, as a fraction of the image side.
MIN_SIZE_FRACTION = 0.3
MAX_SIZE_FRACTION = 0.8
#: Each background channel is drawn in this range (one flat, light tint per image).
BACKGROUND_RANGE = (232, 255)
#: Maximum per-channel deviation of the shape's colour from its nominal value.
COLOR_JITTER = 12
#: Triangle orientations (direction of the apex).
ORIENTATIONS = ("up", "down", "left", "right")


def answer_for(question_type: str, shape: str, color: str) -> str:
    """The exact answer to a question of ``question_type`` about a ``color`` ``shape``."""
    if question_type == "color":
        return color
    if question_type == "shape":
        return shape
    if question_type == "describe":
        return f"a {color} {shape}"
    raise ValueError(f"unknown question type {question_type!r}; expected one of {sorted(QUESTIONS)}")


def all_questions() -> list[str]:
    """Every question phrasing of the task, in a fixed order."""
    return [q for phrasings in QUESTIONS.values() for q in phrasings]


def all_answers() -> list[str]:
    """Every possible answer of the task, in a fixed order (colours, shapes, descriptions)."""
    descriptions = [answer_for("describe", s, c) for c in COLORS for s in SHAPES]
    return list(COLORS) + list(SHAPES) + descriptions


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


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0 or image_size % IMAGE_SIZE_MULTIPLE:
        raise ValueError(f"image_size must be a positive multiple of {IMAGE_SIZE_MULTIPLE}, got {image_size!r}")


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


def render_image(
    shape: str,
    rgb: Sequence[int],
    bbox: Sequence[int],
    background: Sequence[int] = (255, 255, 255),
    image_size: int = DEFAULT_IMAGE_SIZE,
    orientation: str = "up",
) -> Image.Image:
    """Draw one filled ``shape`` of colour ``rgb`` inside ``bbox`` on a flat ``background``.

    Drawing is aliased (no anti-aliasing) so that every pixel is either exactly the background or
    exactly the shape's colour.
    """
    _check_image_size(image_size)
    x0, y0, x1, y1 = (int(v) for v in bbox)
    if not (0 <= x0 < x1 < image_size and 0 <= y0 < y1 < image_size):
        raise ValueError(f"bbox {tuple(bbox)} is not inside a {image_size}x{image_size} image")
    image = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in background))
    draw = ImageDraw.Draw(image)
    fill = tuple(int(v) for v in rgb)
    polygon = shape_polygon(shape, (x0, y0, x1, y1), orientation)
    if polygon is None:
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon(polygon, fill=fill)
    return image


def _sample_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def generate_sample(seed: int, index: int, image_size: int = DEFAULT_IMAGE_SIZE) -> tuple[Image.Image, str, str, dict]:
    """Sample number ``index`` of seed ``seed``: ``(image, question, answer, meta)``.

    ``meta`` holds everything the sample was drawn from (``id``, ``seed``, ``index``, ``shape``,
    ``color``, ``question_type``, ``rgb``, ``background``, ``bbox`` (inclusive x0, y0, x1, y1),
    ``orientation``, ``image_size``).
    """
    _check_image_size(image_size)
    rng = _sample_rng(seed, index)
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    question_type = list(QUESTIONS)[rng.integers(len(QUESTIONS))]
    question = QUESTIONS[question_type][rng.integers(len(QUESTIONS[question_type]))]

    rgb = [int(np.clip(v + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1), 0, 255)) for v in COLORS[color]]
    background = [int(v) for v in rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1, size=3)]
    # Bounding-box side in pixels (inclusive coordinates span `side` pixels), then a position that
    # keeps the whole box inside the image.
    lo = int(np.ceil(MIN_SIZE_FRACTION * image_size))
    hi = int(np.floor(MAX_SIZE_FRACTION * image_size))
    side = int(rng.integers(lo, hi + 1))
    x0 = int(rng.integers(0, image_size - side + 1))
    y0 = int(rng.integers(0, image_size - side + 1))
    bbox = [x0, y0, x0 + side - 1, y0 + side - 1]
    orientation = ORIENTATIONS[rng.integers(len(ORIENTATIONS))] if shape == "triangle" else "up"

    image = render_image(shape, rgb, bbox, background, image_size, orientation)
    meta = {
        "id": f"shapes-s{seed}-{index:06d}",
        "seed": int(seed),
        "index": int(index),
        "shape": shape,
        "color": color,
        "question_type": question_type,
        "rgb": rgb,
        "background": background,
        "bbox": bbox,
        "orientation": orientation,
        "image_size": int(image_size),
    }
    return image, question, answer_for(question_type, shape, color), meta


def generate_samples(n: int, seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> list[tuple[Image.Image, str, str, dict]]:
    """``n`` samples ``(PIL.Image, question, answer, meta)``, deterministic in ``seed``.

    Use different seeds for training and held-out evaluation data.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [generate_sample(seed, i, image_size) for i in range(n)]


def sample_image(image_size: int = DEFAULT_IMAGE_SIZE) -> Image.Image:
    """The fixed demo image: a red circle in the middle of a white image (60 % of the side)."""
    _check_image_size(image_size)
    side = round(0.6 * image_size)
    x0 = (image_size - side) // 2
    bbox = (x0, x0, x0 + side - 1, x0 + side - 1)
    return render_image("circle", COLORS["red"], bbox, (255, 255, 255), image_size)


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


def write_dataset(out_dir: str, n: int, seed: int, image_size: int = DEFAULT_IMAGE_SIZE) -> str:
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
    """Every text the task can produce (questions and answers), in a fixed order."""
    yield from all_questions()
    yield from all_answers()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


#: Largest ``--image-size`` the CLI accepts: the largest multiple of 28 whose square fits the Qwen2-VL image
#: processor's default ``max_pixels`` (28·28·1280); a larger image is scaled down before the model sees it.
MAX_CLI_IMAGE_SIZE = 980


def _cli_int(low: int, high: int | None = None, multiple: int = 1):
    """An argparse type: an integer in ``[low, high]`` (and a multiple of ``multiple``); a bad value is refused
    with the flag's name and the allowed values (exit code 2)."""
    allowed = f"an integer >= {low}" if high is None else f"a multiple of {multiple} from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if value < low or (high is not None and value > high) or value % multiple:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder for images/ and data.jsonl")
    parser.add_argument("--n", type=_cli_int(1), default=1000, help="number of samples, >= 1 (default 1000)")
    parser.add_argument("--seed", type=_cli_int(0), default=0, help="random seed, >= 0 (default 0)")
    parser.add_argument("--image-size", "--image_size", type=_cli_int(IMAGE_SIZE_MULTIPLE, MAX_CLI_IMAGE_SIZE, IMAGE_SIZE_MULTIPLE),
                        default=DEFAULT_IMAGE_SIZE,
                        help=f"image side in pixels, a multiple of {IMAGE_SIZE_MULTIPLE} from {IMAGE_SIZE_MULTIPLE} to "
                        f"{MAX_CLI_IMAGE_SIZE} (default {DEFAULT_IMAGE_SIZE})")
    parser.add_argument("--sample", metavar="PATH", help="also write the fixed demo image (a red circle) to PATH")
    args = parser.parse_args(argv)
    if args.out is None and args.sample is None:
        parser.error("give --out DIR and/or --sample PATH")
    if args.sample:
        os.makedirs(os.path.dirname(os.path.abspath(args.sample)), exist_ok=True)
        sample_image(args.image_size).save(args.sample)
        print(f"wrote {args.sample}")
    if args.out:
        path = write_dataset(args.out, args.n, args.seed, args.image_size)
        print(f"wrote {args.n} samples to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
