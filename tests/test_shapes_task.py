"""Tests of the generated shapes VQA task (dimple_tools/tiny/task.py: scenes of 1-5 shapes on an invisible
3 x 3 grid) and of the tiny tokenizer (dimple_tools/tiny/tokenizer.py) the tiny Dimple is trained with."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dimple_tools.tiny import tokenizer as btt  # noqa: E402
from dimple_tools.tiny import task as st  # noqa: E402


# --------------------------------------------------------------------------------------------
# Image analysis (independent of the generator: it only looks at pixels; cell_box is the grid's definition)
# --------------------------------------------------------------------------------------------

# Every task colour has a channel below ~70, every background channel is >= 232.
FOREGROUND_MAX_MIN_CHANNEL = 150
# A light background: every channel of every background pixel at least this.
LIGHT_MIN_CHANNEL = 230
# Fill ratio of a shape's pixels in their own bounding box, measured over thousands of shapes of 5 to 71 px:
# circle 0.667-0.840 (0.75-0.80 from 14 px up), square 1.0, triangle 0.500-0.583.
FILL_RATIO_RANGES = {"circle": (0.65, 0.87), "square": (0.97, 1.0), "triangle": (0.45, 0.62)}
EXAMPLE = "a red circle at the top left, a blue square at the center and a yellow triangle at the bottom right."
EXAMPLE_SHAPES = [{"color": "red", "shape": "circle", "cell": 0}, {"color": "blue", "shape": "square", "cell": 4},
                  {"color": "yellow", "shape": "triangle", "cell": 8}]


def foreground_mask(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).min(axis=2) < FOREGROUND_MAX_MIN_CHANNEL


def label_components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean mask: each foreground pixel gets the smallest flat index of
    its component, background pixels -1 (min-propagation to the 4 neighbours plus pointer jumping)."""
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), none)
    fg = np.flatnonzero(mask)
    while True:
        new = labels.copy()
        new[1:] = np.minimum(new[1:], labels[:-1])
        new[:-1] = np.minimum(new[:-1], labels[1:])
        new[:, 1:] = np.minimum(new[:, 1:], labels[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], labels[:, 1:])
        new = np.where(mask, new, none).ravel()
        new[fg] = new[new[fg]]
        new = new.reshape(h, w)
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


def nearest_color(rgb) -> str:
    return min(st.COLORS, key=lambda name: sum((int(a) - int(b)) ** 2 for a, b in zip(rgb, st.COLORS[name])))


def classify_shape(fill_ratio: float) -> str | None:
    for shape, (lo, hi) in FILL_RATIO_RANGES.items():
        if lo <= fill_ratio <= hi:
            return shape
    return None


def inside(inner, outer) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and inner[2] <= outer[2] and inner[3] <= outer[3]


def analyse_scene(image) -> dict:
    """Per 4-connected foreground component: its bbox, the grid cells containing that bbox, its pixel colours
    (nearest nominal names and distinct RGB values) and fill ratio; plus the background's distinct colours."""
    pixels = np.asarray(image.convert("RGB"))
    mask = foreground_mask(image)
    labels = label_components(mask)
    size = pixels.shape[0]
    components = []
    for label in np.unique(labels[mask]):
        ys, xs = np.nonzero(labels == label)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
        rgbs = {tuple(int(v) for v in p) for p in np.unique(pixels[ys, xs], axis=0)}
        components.append({
            "bbox": bbox,
            "cells": [k for k in range(len(st.POSITIONS)) if inside(bbox, st.cell_box(k, size))],
            "colors": {nearest_color(p) for p in rgbs},
            "rgbs": rgbs,
            "fill_ratio": len(xs) / ((bbox[2] - bbox[0] + 1) * (bbox[3] - bbox[1] + 1)),
        })
    background = {tuple(int(v) for v in p) for p in np.unique(pixels[~mask], axis=0)}
    return {"components": components, "background": background}


def scene_by_cell(image) -> dict[int, dict]:
    """The components of ``image`` keyed by the one grid cell each lies in (asserts that there is one)."""
    by_cell = {}
    for component in analyse_scene(image)["components"]:
        assert len(component["cells"]) == 1, component  # inside exactly one grid cell
        (cell,) = component["cells"]
        assert cell not in by_cell, (cell, component)  # one shape per cell
        by_cell[cell] = component
    return by_cell


def as_array(image) -> np.ndarray:
    return np.asarray(image)


def key(shape: dict) -> tuple:
    return shape["cell"], shape["color"], shape["shape"]


def test_pixel_analysis_helpers():
    mask = np.zeros((6, 7), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: two 4-components
    mask[2:6, 3] = mask[5, 3:7] = mask[2:6, 6] = True  # a U: one component
    labels = label_components(mask)
    assert len(np.unique(labels[mask])) == 3 and (labels[~mask] == -1).all()
    assert labels[2, 6] == labels[2, 3] == 2 * 7 + 3
    assert classify_shape(np.pi / 4) == "circle" and classify_shape(1.0) == "square"
    assert classify_shape(0.5) == "triangle" and classify_shape(0.9) is None
    assert nearest_color((250, 210, 0)) == "yellow"
    drawn = st.render_scene([{"shape": "square", "rgb": (30, 160, 50), "bbox": (2, 3, 8, 9)}], (240, 240, 240), 30)
    (component,) = analyse_scene(drawn)["components"]
    assert component["bbox"] == (2, 3, 8, 9) and component["cells"] == [0] and component["colors"] == {"green"}


# --------------------------------------------------------------------------------------------
# Task generation: determinism
# --------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_samples():
    a = st.generate_samples(40, seed=7)
    b = st.generate_samples(40, seed=7)
    for (ia, qa, aa, ma), (ib, qb, ab, mb) in zip(a, b, strict=True):
        assert np.array_equal(as_array(ia), as_array(ib))
        assert (qa, aa, ma) == (qb, ab, mb)
    assert [m["id"] for *_, m in a] == [f"shapes-s7-{i:06d}" for i in range(40)]
    one = st.generate_sample(7, 13)
    assert np.array_equal(as_array(one[0]), as_array(a[13][0])) and one[1:] == a[13][1:]


def test_samples_do_not_depend_on_n():
    short, long = st.generate_samples(5, seed=3), st.generate_samples(20, seed=3)
    for (ia, qa, aa, ma), (ib, qb, ab, mb) in zip(short, long[:5], strict=True):
        assert np.array_equal(as_array(ia), as_array(ib)) and (qa, aa, ma) == (qb, ab, mb)
    assert st.generate_samples(0, seed=3) == []


def test_different_seeds_differ():
    a = st.generate_samples(20, seed=0)
    b = st.generate_samples(20, seed=1)
    differing = sum(not np.array_equal(as_array(x[0]), as_array(y[0])) for x, y in zip(a, b))
    assert differing >= 19
    assert [x[1:3] for x in a] != [y[1:3] for y in b]
    assert sum(x[3]["shapes"] != y[3]["shapes"] for x, y in zip(a, b)) >= 19


# --------------------------------------------------------------------------------------------
# Task generation: images (pixels against meta)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [28, 84, 100, 168, None])
def test_every_image_shows_the_meta_scene_cell_by_cell(image_size):
    samples = st.generate_samples(60, seed=11, image_size=image_size)
    sizes = set()
    for image, _question, _answer, meta in samples:
        size = meta["image_size"]
        sizes.add(size)
        assert image.mode == "RGB" and image.size == (size, size)
        if image_size is None:
            assert st.MIN_IMAGE_SIZE <= size <= st.MAX_IMAGE_SIZE
        else:
            assert size == image_size
        shapes = meta["shapes"]
        cells = [s["cell"] for s in shapes]
        assert 1 <= len(shapes) <= st.MAX_SHAPES and cells == sorted(set(cells)), meta  # distinct cells, reading order
        assert [s["position"] for s in shapes] == [st.POSITIONS[c] for c in cells]
        if meta["question_type"] in st.SINGLE_SHAPE_TYPES:
            assert len(shapes) == 1, meta
        scene = analyse_scene(image)
        # one 4-connected component per shape, each inside one cell: exactly the cells meta names
        assert len(scene["components"]) == len(shapes), meta
        by_cell = scene_by_cell(image)
        assert sorted(by_cell) == cells, meta
        # a flat, light background
        assert scene["background"] == {tuple(meta["background"])}, meta
        assert min(meta["background"]) >= max(st.BACKGROUND_RANGE[0], LIGHT_MIN_CHANNEL)
        for s in shapes:
            component = by_cell[s["cell"]]
            cell = st.cell_box(s["cell"], size)
            cell_side = min(cell[2] - cell[0], cell[3] - cell[1]) + 1
            assert inside(component["bbox"], s["bbox"]) and inside(s["bbox"], cell), (s, component)
            assert component["colors"] == {s["color"]}, (s, component)  # every pixel of the stated colour
            assert len(component["rgbs"]) == 1, (s, component)  # aliased: one flat colour per shape
            assert classify_shape(component["fill_ratio"]) == s["shape"], (component["fill_ratio"], s, size)
            bx0, by0, bx1, by1 = component["bbox"]
            sx0, sy0, sx1, sy1 = s["bbox"]
            for side in (bx1 - bx0 + 1, by1 - by0 + 1, sx1 - sx0 + 1, sy1 - sy0 + 1):
                assert st.MIN_SIZE_FRACTION * cell_side - 1 <= side <= st.MAX_SIZE_FRACTION * cell_side + 1, (s, size)
    if image_size is None:
        assert len(sizes) >= 20  # each sample draws its own side


def test_all_classes_question_types_and_cells_occur_with_varied_placements():
    metas = [m for *_, m in st.generate_samples(300, seed=5)]
    shapes = [s for m in metas for s in m["shapes"]]
    assert {s["shape"] for s in shapes} == set(st.SHAPES)
    assert {s["color"] for s in shapes} == set(st.COLORS)
    assert {s["cell"] for s in shapes} == set(range(len(st.POSITIONS)))
    assert {m["question_type"] for m in metas} == set(st.QUESTIONS)
    assert {len(m["shapes"]) for m in metas} == set(range(1, st.MAX_SHAPES + 1))
    assert {s["orientation"] for s in shapes if s["shape"] == "triangle"} == set(st.ORIENTATIONS)
    # jittered inside the cell: many offsets of the bbox from its cell's corner, many sizes, many tints
    offsets = {(s["bbox"][0] - st.cell_box(s["cell"], m["image_size"])[0],
                s["bbox"][1] - st.cell_box(s["cell"], m["image_size"])[1]) for m in metas for s in m["shapes"]}
    assert len(offsets) > 100
    assert len({s["bbox"][2] - s["bbox"][0] for s in shapes}) > 30
    assert len({tuple(m["background"]) for m in metas}) > 200
    assert len({tuple(s["rgb"]) for s in shapes}) > 300
    assert all(max(abs(a - b) for a, b in zip(s["rgb"], st.COLORS[s["color"]])) <= st.COLOR_JITTER for s in shapes)


# --------------------------------------------------------------------------------------------
# Task generation: questions, answers and the description grammar
# --------------------------------------------------------------------------------------------


def test_describe_gives_the_exact_grammar():
    assert st.describe(EXAMPLE_SHAPES) == EXAMPLE
    assert st.describe(EXAMPLE_SHAPES[::-1]) == EXAMPLE  # reading order whatever the input order
    assert st.describe([{"color": "red", "shape": "circle", "cell": 4}]) == "a red circle at the center."
    two = [{"color": "green", "shape": "triangle", "cell": 5}, {"color": "yellow", "shape": "square", "cell": 1}]
    assert st.describe(two) == "a yellow square at the top and a green triangle at the right."
    five = [{"color": c, "shape": s, "cell": k} for (c, s), k in
            zip([("red", "square"), ("green", "circle"), ("blue", "triangle"), ("yellow", "circle"), ("red", "triangle")],
                (0, 2, 3, 7, 8))]
    assert st.describe(five) == ("a red square at the top left, a green circle at the top right, a blue triangle at the "
                                 "left, a yellow circle at the bottom and a red triangle at the bottom right.")
    with pytest.raises(ValueError, match="at least one shape"):
        st.describe([])


def test_parse_description_inverts_describe_and_refuses_malformed_texts():
    assert st.parse_description(EXAMPLE) == EXAMPLE_SHAPES
    assert st.parse_description("a red circle at the center.") == [{"color": "red", "shape": "circle", "cell": 4}]
    for k in range(1, st.MAX_SHAPES + 1):
        shapes = [{"color": "blue", "shape": "circle", "cell": c} for c in range(9 - k, 9)]
        assert st.parse_description(st.describe(shapes)) == shapes
    malformed = [
        EXAMPLE[:-1],  # missing "."
        "a red circle at the top left, a blue square at the center, and a yellow triangle at the bottom right.",
        "a red circle at the top left, a blue square at the center, a yellow triangle at the bottom right.",
        "a red circle at the top left and a blue square at the center and a yellow triangle at the bottom right.",
        "a blue square at the center and a red circle at the top left.",  # out of reading order
        "a red circle at the center and a blue square at the center.",  # the same cell twice
        "a purple circle at the center.",  # unknown colour
        "a red hexagon at the center.",  # unknown shape
        "a red circle at the middle.",  # unknown position
        "red circle at the center.",
        st.describe([{"color": "red", "shape": "circle", "cell": k} for k in range(6)]),  # 6 parts
        "", ".", "nothing", "a red circle",
    ]
    for text in malformed:
        assert st.parse_description(text) is None, text


def test_generated_answers_follow_the_meta_scene():
    samples = st.generate_samples(400, seed=2)
    position_answers = Counter()
    for _image, question, answer, meta in samples:
        qtype, shapes = meta["question_type"], meta["shapes"]
        words = set(question.lower().rstrip("?.").split())
        assert not words & (set(st.COLORS) | set(st.SHAPES)), question  # the question gives nothing away
        if qtype == "position":
            assert meta["position"] in range(len(st.POSITIONS))
            assert question == st.QUESTIONS["position"][0].format(position=st.POSITIONS[meta["position"]])
            at = [s for s in shapes if s["cell"] == meta["position"]]
            assert answer == (f"a {at[0]['color']} {at[0]['shape']}" if at else st.NOTHING), meta
            position_answers["shape" if at else "nothing"] += 1
            continue
        assert meta["position"] is None and question in st.QUESTIONS[qtype], (question, meta)
        if qtype == "describe":
            parsed = st.parse_description(answer)
            assert parsed == [{"color": s["color"], "shape": s["shape"], "cell": s["cell"]} for s in shapes], answer
        elif qtype == "count":
            assert answer == st.NUMBER_WORDS[len(shapes) - 1] == ["one", "two", "three", "four", "five"][len(shapes) - 1]
        else:
            assert len(shapes) == 1 and answer == shapes[0][qtype], meta
    assert position_answers["shape"] >= 20 and position_answers["nothing"] >= 20, position_answers
    for question in st.all_questions():
        assert not set(question.lower().rstrip("?.").split()) & (set(st.COLORS) | set(st.SHAPES)), question
    assert {q.format(position=p) for q in st.QUESTIONS["position"] for p in st.POSITIONS} <= set(st.all_questions())


def test_answer_for():
    assert st.answer_for("describe", EXAMPLE_SHAPES) == EXAMPLE
    assert st.answer_for("count", EXAMPLE_SHAPES) == "three"
    assert st.answer_for("position", EXAMPLE_SHAPES, 8) == "a yellow triangle"
    assert st.answer_for("position", EXAMPLE_SHAPES, 1) == "nothing"
    assert st.answer_for("color", EXAMPLE_SHAPES[2:]) == "yellow"
    assert st.answer_for("shape", EXAMPLE_SHAPES[2:]) == "triangle"
    with pytest.raises(ValueError, match="one-shape images"):
        st.answer_for("color", EXAMPLE_SHAPES)
    with pytest.raises(ValueError, match="unknown question type"):
        st.answer_for("size", EXAMPLE_SHAPES)


def test_question_types_follow_their_weights_and_can_be_fixed():
    types = Counter(m["question_type"] for *_, m in st.generate_samples(2000, seed=8, image_size=28))
    assert sum(types.values()) == 2000 and set(types) == set(st.QUESTION_WEIGHTS)
    assert sum(st.QUESTION_WEIGHTS.values()) == pytest.approx(1.0)
    for qtype, weight in st.QUESTION_WEIGHTS.items():
        assert abs(types[qtype] / 2000 - weight) < 0.04, (qtype, types)
    counts = st.generate_samples(40, seed=8, image_size=28, question_type="count")
    assert {m["question_type"] for *_, m in counts} == {"count"}
    assert all(a == st.NUMBER_WORDS[len(m["shapes"]) - 1] for _, _, a, m in counts)
    assert len({len(m["shapes"]) for *_, m in counts}) >= 4
    colors = st.generate_samples(20, seed=8, image_size=28, question_type="color")
    assert all(len(m["shapes"]) == 1 and a == m["shapes"][0]["color"] for _, _, a, m in colors)


def test_shapes_correct_gives_partial_credit():
    assert st.shapes_correct(EXAMPLE, EXAMPLE) == 1.0
    one_wrong = EXAMPLE.replace("blue square", "green square")
    assert st.shapes_correct(one_wrong, EXAMPLE) == pytest.approx(2 / 3)
    assert st.shapes_correct(EXAMPLE.replace("yellow triangle", "yellow circle"), EXAMPLE) == pytest.approx(2 / 3)
    omitted = "a red circle at the top left and a yellow triangle at the bottom right."
    assert st.shapes_correct(omitted, EXAMPLE) == pytest.approx(2 / 3)
    moved = "a red circle at the top left, a blue square at the right and a yellow triangle at the bottom right."
    assert st.shapes_correct(moved, EXAMPLE) == pytest.approx(1 / 3)  # a miss and an extra shape
    extra = ("a red circle at the top left, a green circle at the top, a blue square at the center and a yellow "
             "triangle at the bottom right.")
    assert st.shapes_correct(extra, EXAMPLE) == pytest.approx(2 / 3)
    two_extra = extra.replace("center and", "center, a red square at the bottom and")
    assert st.parse_description(two_extra) is not None
    assert st.shapes_correct(two_extra, EXAMPLE) == pytest.approx(1 / 3)
    assert st.shapes_correct("a green circle at the top, a red square at the left and a blue circle at the right.",
                             EXAMPLE) == 0.0  # never below 0
    for unparseable in ("", "a red circle", EXAMPLE[:-1], "three"):
        assert st.shapes_correct(unparseable, EXAMPLE) == 0.0, unparseable
    assert st.shapes_correct("a red circle at the center.", "a red circle at the center.") == 1.0
    with pytest.raises(ValueError, match="expected"):
        st.shapes_correct(EXAMPLE, "a red circle")


def test_answer_is_correct():
    assert st.answer_is_correct("red", "red")
    assert st.answer_is_correct(" Red. ", "red")
    assert st.answer_is_correct("A  red\ncircle!", "a red circle")
    assert st.answer_is_correct('"blue"', "blue")
    assert st.answer_is_correct(EXAMPLE.upper(), EXAMPLE)
    assert not st.answer_is_correct("dark red", "red")
    assert not st.answer_is_correct("red circle", "a red circle")
    assert not st.answer_is_correct("", "red")
    assert not st.answer_is_correct("green", "red")
    assert not st.answer_is_correct("a red circle", "nothing")


def test_sample_image_shows_the_sample_scene():
    image = st.sample_image()
    assert image.size == (st.MAX_IMAGE_SIZE, st.MAX_IMAGE_SIZE) == (168, 168)
    scene = analyse_scene(image)
    assert scene["background"] == {(255, 255, 255)}
    by_cell = scene_by_cell(image)
    shown = sorted((cell, next(iter(c["colors"])), classify_shape(c["fill_ratio"])) for cell, c in by_cell.items())
    assert all(len(c["colors"]) == 1 for c in by_cell.values())
    assert shown == sorted((cell, color, shape) for color, shape, cell in st.SAMPLE_SCENE)
    # every colour and every shape, in distinct cells; each shape centred in its cell, 70 % of its side
    assert {c for c, _, _ in st.SAMPLE_SCENE} == set(st.COLORS) and {s for _, s, _ in st.SAMPLE_SCENE} == set(st.SHAPES)
    for cell, component in by_cell.items():
        x0, y0, x1, y1 = st.cell_box(cell, 168)
        bx0, by0, bx1, by1 = component["bbox"]
        assert abs((bx0 + bx1) - (x0 + x1)) <= 2 and abs((by0 + by1) - (y0 + y1)) <= 2, (cell, component)
        assert abs((bx1 - bx0 + 1) - 0.7 * (x1 - x0 + 1)) <= 1 and abs((by1 - by0 + 1) - 0.7 * (y1 - y0 + 1)) <= 1
    assert np.array_equal(as_array(image), as_array(st.sample_image()))
    parsed = st.parse_description(st.sample_description())
    assert [(s["color"], s["shape"], s["cell"]) for s in parsed] == list(st.SAMPLE_SCENE)
    assert st.sample_image(84).size == (84, 84)


def test_invalid_arguments_are_rejected():
    for bad in (st.MIN_GIVEN_IMAGE_SIZE - 1, 0, -84, st.MAX_CLI_IMAGE_SIZE + 1, True, 84.0, "84"):
        with pytest.raises(ValueError, match="image_size must be"):
            st.generate_samples(1, seed=0, image_size=bad)
    with pytest.raises(ValueError, match="image_size must be"):
        st.sample_image(20)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="n must be"):
            st.generate_samples(bad, seed=0)
    with pytest.raises(ValueError, match="question_type must be"):
        st.generate_samples(1, seed=0, question_type="size")
    with pytest.raises(ValueError, match="unknown shape"):
        st.shape_polygon("hexagon", (0, 0, 20, 20))
    with pytest.raises(ValueError, match="unknown orientation"):
        st.shape_polygon("triangle", (0, 0, 20, 20), "sideways")
    with pytest.raises(ValueError, match="not inside"):
        st.render_scene([{"shape": "square", "rgb": (255, 0, 0), "bbox": (40, 40, 60, 60)}], (255, 255, 255), 56)
    with pytest.raises(ValueError, match="not inside"):
        st.render_scene([{"shape": "circle", "rgb": (255, 0, 0), "bbox": (-1, 0, 10, 10)}], (255, 255, 255), 56)
    assert st.generate_samples(1, seed=0, image_size=np.int64(30))[0][0].size == (30, 30)


def test_cli_writes_a_llava_jsonl_that_round_trips(tmp_path):
    out = tmp_path / "data"
    sample = tmp_path / "sample.png"
    subprocess.run(
        [sys.executable, "-m", "dimple_tools.tiny.task", "--out", str(out), "--n", "12", "--seed", "3",
         "--sample", str(sample)],
        check=True, capture_output=True, text=True, cwd=REPO_ROOT,
    )
    lines = (out / st.JSONL_NAME).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 12
    expected = st.generate_samples(12, seed=3)
    ids = set()
    for line, (image, question, answer, meta) in zip(lines, expected, strict=True):
        record = json.loads(line)
        ids.add(record["id"])
        assert not os.path.isabs(record["image"])
        assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
        user = record["messages"][0]["content"]
        assert user.count(st.IMAGE_PLACEHOLDER) == 1 and user == f"{st.IMAGE_PLACEHOLDER}\n{question}"
        assert record["messages"][1]["content"] == answer
        assert record["meta"] == meta
        with Image.open(out / record["image"]) as written:
            assert np.array_equal(np.asarray(written.convert("RGB")), as_array(image))
    assert len(ids) == 12
    for (ia, qa, aa, ma), (ib, qb, ab, mb) in zip(st.read_dataset(str(out / st.JSONL_NAME)), expected, strict=True):
        assert np.array_equal(as_array(ia), as_array(ib)) and (qa, aa, ma) == (qb, ab, mb)
    with Image.open(sample) as written:
        assert np.array_equal(np.asarray(written.convert("RGB")), as_array(st.sample_image()))


@pytest.mark.parametrize("value", ["20", "981", "big"])
def test_cli_refuses_a_bad_image_size(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        st.main(["--out", str(tmp_path / "data"), "--n", "2", "--image-size", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--image-size" in err and f"{st.MIN_GIVEN_IMAGE_SIZE} to {st.MAX_CLI_IMAGE_SIZE}" in err, err
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------------------------
# Tiny tokenizer
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    ids = btt.build_tiny_tokenizer(str(out))
    return str(out), ids


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir[0])


def chat_text(question: str, answer: str) -> str:
    """A training conversation as the chat template renders it (SPEC sections 3 and 5)."""
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>\n{question}<|im_end|>\n"
        f"<|im_start|>assistant\n{answer}<|endoftext|><|endoftext|>"
    )


def test_tokenizer_class_special_tokens_and_ids(tokenizer, tokenizer_dir):
    _, ids = tokenizer_dir
    assert type(tokenizer).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    assert tokenizer.is_fast
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tokenizer.mask_token == "<|mask|>"
    assert tokenizer.padding_side == "left"
    assert ids == btt.special_token_ids(tokenizer)
    assert ids["vocab_size"] == len(tokenizer)
    assert 300 <= ids["vocab_size"] <= 600
    special_ids = [tokenizer.convert_tokens_to_ids(t) for t in btt.SPECIAL_TOKENS]
    assert len(set(special_ids)) == len(btt.SPECIAL_TOKENS)
    assert all(0 <= i < ids["vocab_size"] for i in special_ids)
    assert special_ids == sorted(special_ids)  # Qwen2's relative order
    for token, token_id in zip(btt.SPECIAL_TOKENS, special_ids):
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
        assert token in tokenizer.all_special_tokens
    for field, token in btt.TOKEN_ID_FIELDS.items():
        assert tokenizer.convert_ids_to_tokens(ids[field]) == token, field


def test_special_tokens_are_atomic_inside_text(tokenizer):
    tokens = list(btt.SPECIAL_TOKENS)
    text = "red" + "".join(f"x{t}y" for t in tokens) + "<|mask|><|mask|> circle"
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
    assert [p for p in pieces if p in tokens] == tokens + ["<|mask|>", "<|mask|>"]
    # no piece is a fragment of a special token
    assert not [p for p in pieces if p not in tokens and ("<|" in p or "|>" in p)]
    # a partial special token is ordinary text
    assert "<|mask" not in tokenizer.convert_ids_to_tokens(tokenizer.encode("<|mask", add_special_tokens=False))


def test_round_trip_of_every_task_text(tokenizer):
    assert set(st.iter_task_texts()) >= set(st.all_questions()) | set(st.all_answers())  # what the BPE trains on
    texts = list(st.iter_task_texts()) + [chat_text(q, a) for _, q, a, _ in st.generate_samples(60, seed=1)]
    texts += [st.describe([{"color": c, "shape": s, "cell": k} for k, (c, s) in
                           zip(cells, itertools.cycle(itertools.product(st.COLORS, st.SHAPES)))])
              for cells in itertools.combinations(range(len(st.POSITIONS)), 4)]
    texts += [st.sample_description(), "a red circle at the top left, a blue square at the centre."]
    texts += btt.chat_texts() + ["<image>\nWhat color is the shape?", "<image>\nWhat is at the bottom right?",
                                 "Hello, wörld! 123 ✓"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text, text
        assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_answer_words_are_few_tokens(tokenizer):
    for word in list(st.COLORS) + list(st.SHAPES) + list(st.NUMBER_WORDS) + [st.NOTHING]:  # whole answers
        assert len(tokenizer.encode(word, add_special_tokens=False)) <= 2, word
        assert len(tokenizer.encode(" " + word, add_special_tokens=False)) <= 2, word
    for word in sorted({w for p in st.POSITIONS for w in p.split()}):  # always after "the "
        assert len(tokenizer.encode(" " + word, add_special_tokens=False)) <= 2, word
    short = [a for a in st.all_answers() if st.parse_description(a) is None]
    assert set(short) >= set(st.COLORS) | set(st.SHAPES) | set(st.NUMBER_WORDS) | {st.NOTHING, "a yellow triangle"}
    for answer in short:
        assert len(tokenizer.encode(answer, add_special_tokens=False)) <= 4, answer
    for answer in st.all_answers():
        if st.parse_description(answer) is not None and answer.count(" at the ") == 1:
            assert len(tokenizer.encode(answer, add_special_tokens=False)) <= 9, answer  # one described shape
    for question in st.all_questions():
        assert len(tokenizer.encode(question, add_special_tokens=False)) <= 8, question


#: Length of the model's answer canvas, in tokens (a description and its end-of-text must fit).
ANSWER_CANVAS = 48


def test_answer_lengths_span_one_token_to_long_descriptions_within_the_canvas(tokenizer):
    samples = st.generate_samples(500, seed=9, image_size=28)
    lengths = {}
    for _image, _question, answer, meta in samples:
        lengths.setdefault(meta["question_type"], []).append(len(tokenizer.encode(answer, add_special_tokens=False)))
    described = Counter(len(m["shapes"]) for *_, m in samples if m["question_type"] == "describe")
    assert set(described) == set(range(1, st.MAX_SHAPES + 1)), described
    every = [n for ns in lengths.values() for n in ns]
    assert min(every) == 1 and max(every) >= 30, lengths
    assert max(lengths["count"] + lengths["color"] + lengths["shape"] + lengths["position"]) <= 4
    assert min(lengths["describe"]) >= 7
    # the longest possible description: every set of five cells (so the four two-word corners and one more),
    # each colour-shape pair (words are tokenized on their own, so one pair per text reaches the maximum)
    texts = [st.describe([{"color": c, "shape": s, "cell": k} for k in cells])
             for cells in itertools.combinations(range(len(st.POSITIONS)), st.MAX_SHAPES)
             for c in st.COLORS for s in st.SHAPES]
    longest = max(texts, key=lambda t: len(tokenizer.encode(t, add_special_tokens=False)))
    assert all(p in longest for p in ("top left", "top right", "bottom left", "bottom right")), longest
    assert 30 <= len(tokenizer.encode(longest, add_special_tokens=False)) <= ANSWER_CANVAS - 1, longest


def test_chat_template_and_left_padding(tokenizer):
    assert tokenizer.chat_template == btt.load_chat_template()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is this?"}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert "<|vision_start|><|image_pad|><|vision_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    batch = tokenizer(["red", "a red circle"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0
    assert batch["attention_mask"][1] == [1] * len(batch["input_ids"][1])


def test_tokenizer_build_is_deterministic(tokenizer_dir, tmp_path):
    first, ids = tokenizer_dir
    assert btt.build_tiny_tokenizer(str(tmp_path)) == ids
    names = sorted(os.listdir(first))
    assert names == sorted(os.listdir(tmp_path)) and "tokenizer.json" in names
    for name in names:
        with open(os.path.join(first, name), "rb") as a, open(tmp_path / name, "rb") as b:
            assert a.read() == b.read(), name


def test_trained_backend_and_reloaded_tokenizer_encode_alike(tokenizer):
    backend = btt.train_backend(btt.training_corpus())
    texts = [chat_text(q, a) for _, q, a, _ in st.generate_samples(30, seed=4)] + ["Hello, wörld! 123"]
    for text in texts:
        assert backend.encode(text).ids == tokenizer.encode(text, add_special_tokens=False), text


def test_load_chat_template_fallback(tmp_path):
    assert btt.load_chat_template(str(tmp_path)) == btt.QWEN2_VL_CHAT_TEMPLATE
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'x' }}"}))
    assert btt.load_chat_template(str(tmp_path)) == "{{ 'x' }}"


def test_autotokenizer_loads_in_a_fresh_process(tokenizer_dir, tokenizer):
    path, ids = tokenizer_dir
    text = chat_text("What colour is the shape?", "a blue square")
    code = (
        "import json, sys\n"
        "from transformers import AutoTokenizer\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "print(json.dumps({'cls': type(tok).__name__, 'ids': tok.encode(sys.argv[2], add_special_tokens=False),\n"
        "                  'len': len(tok), 'side': tok.padding_side, 'bos': tok.bos_token_id,\n"
        "                  'eos': tok.eos_token_id, 'pad': tok.pad_token_id, 'mask': tok.mask_token_id}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code, path, text], check=True, capture_output=True, text=True,
                            env=env, cwd=str(os.path.dirname(path)))
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["cls"] in ("Qwen2Tokenizer", "Qwen2TokenizerFast")  # the fast class is named so in 4.x
    assert loaded["ids"] == tokenizer.encode(text, add_special_tokens=False)
    assert loaded["len"] == ids["vocab_size"] and loaded["side"] == "left"
    assert (loaded["bos"], loaded["eos"], loaded["pad"], loaded["mask"]) == (
        ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"], ids["mask_token_id"])
