"""Tests of the generated shapes VQA task (dimple_tools/tiny/task.py) and of the tiny tokenizer
(dimple_tools/tiny/tokenizer.py) the tiny Dimple is trained with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import deque

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dimple_tools.tiny import tokenizer as btt  # noqa: E402
from dimple_tools.tiny import task as st  # noqa: E402


# --------------------------------------------------------------------------------------------
# Image analysis (independent of the generator: it only looks at pixels)
# --------------------------------------------------------------------------------------------

# Every task colour has a channel below ~70, every background channel is >= 232.
FOREGROUND_MAX_MIN_CHANNEL = 150
FILL_RATIO_RANGES = {"circle": (0.70, 0.87), "square": (0.97, 1.0), "triangle": (0.40, 0.62)}


def foreground_mask(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).min(axis=2) < FOREGROUND_MAX_MIN_CHANNEL


def count_components(mask: np.ndarray) -> int:
    """Number of 4-connected components of a boolean mask."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    components = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        components += 1
        seen[y, x] = True
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return components


def nearest_color(rgb) -> str:
    return min(st.COLORS, key=lambda name: sum((int(a) - int(b)) ** 2 for a, b in zip(rgb, st.COLORS[name])))


def analyse(image) -> dict:
    """Colour, fill ratio, bounding box and component count of the non-background pixels."""
    pixels = np.asarray(image.convert("RGB"))
    mask = foreground_mask(image)
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    box_area = (bbox[2] - bbox[0] + 1) * (bbox[3] - bbox[1] + 1)
    fg = pixels[mask]
    return {
        "colors": {nearest_color(p) for p in np.unique(fg, axis=0)},
        "dominant_color": nearest_color(fg.mean(axis=0)),
        "fill_ratio": mask.sum() / box_area,
        "bbox": bbox,
        "components": count_components(mask),
        "background_min": int(pixels[~mask].min()),
    }


def classify_shape(fill_ratio: float) -> str | None:
    for shape, (lo, hi) in FILL_RATIO_RANGES.items():
        if lo <= fill_ratio <= hi:
            return shape
    return None


def as_array(image) -> np.ndarray:
    return np.asarray(image)


# --------------------------------------------------------------------------------------------
# Task generation
# --------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_samples():
    a = st.generate_samples(40, seed=7)
    b = st.generate_samples(40, seed=7)
    for (ia, qa, aa, ma), (ib, qb, ab, mb) in zip(a, b, strict=True):
        assert np.array_equal(as_array(ia), as_array(ib))
        assert (qa, aa, ma) == (qb, ab, mb)


def test_samples_do_not_depend_on_n():
    short, long = st.generate_samples(5, seed=3), st.generate_samples(20, seed=3)
    for (ia, qa, aa, ma), (ib, qb, ab, mb) in zip(short, long[:5], strict=True):
        assert np.array_equal(as_array(ia), as_array(ib)) and (qa, aa, ma) == (qb, ab, mb)


def test_different_seeds_differ():
    a = st.generate_samples(20, seed=0)
    b = st.generate_samples(20, seed=1)
    differing = sum(not np.array_equal(as_array(x[0]), as_array(y[0])) for x, y in zip(a, b))
    assert differing >= 19
    assert [x[1:3] for x in a] != [y[1:3] for y in b]


@pytest.mark.parametrize("image_size", [56, 84])
def test_every_image_shows_one_shape_of_the_stated_colour_and_class(image_size):
    samples = st.generate_samples(150, seed=11, image_size=image_size)
    for image, _question, _answer, meta in samples:
        assert image.mode == "RGB" and image.size == (image_size, image_size)
        info = analyse(image)
        assert info["components"] == 1, meta
        assert info["colors"] == {meta["color"]}, meta  # every shape pixel is of the stated colour
        assert info["dominant_color"] == meta["color"], meta
        assert info["background_min"] >= st.BACKGROUND_RANGE[0], meta  # light background
        assert classify_shape(info["fill_ratio"]) == meta["shape"], (info["fill_ratio"], meta)
        x0, y0, x1, y1 = info["bbox"]
        side = max(x1 - x0, y1 - y0) + 1
        assert 0.3 * image_size - 1 <= side <= 0.8 * image_size + 1, meta
        # the shape lies inside its recorded bounding box, which lies inside the image
        bx0, by0, bx1, by1 = meta["bbox"]
        assert 0 <= bx0 <= x0 and 0 <= by0 <= y0 and x1 <= bx1 < image_size and y1 <= by1 < image_size


def test_all_classes_and_question_types_occur_with_varied_positions():
    metas = [m for *_, m in st.generate_samples(300, seed=5)]
    assert {m["shape"] for m in metas} == set(st.SHAPES)
    assert {m["color"] for m in metas} == set(st.COLORS)
    assert {m["question_type"] for m in metas} == set(st.QUESTIONS)
    assert {m["orientation"] for m in metas if m["shape"] == "triangle"} == set(st.ORIENTATIONS)
    assert len({tuple(m["bbox"]) for m in metas}) > 200
    assert len({tuple(m["background"]) for m in metas}) > 200


def test_answers_contain_exactly_the_colour_and_shape_words():
    for _image, question, answer, meta in st.generate_samples(200, seed=2):
        assert question in st.QUESTIONS[meta["question_type"]]
        words = set(question.lower().rstrip("?.").split())
        assert not words & (set(st.COLORS) | set(st.SHAPES)), question  # the question gives nothing away
        expected = {
            "color": meta["color"],
            "shape": meta["shape"],
            "describe": f"a {meta['color']} {meta['shape']}",
        }[meta["question_type"]]
        assert answer == expected
    assert st.answer_for("describe", "triangle", "yellow") == "a yellow triangle"
    with pytest.raises(ValueError, match="unknown question type"):
        st.answer_for("size", "circle", "red")


def test_answer_is_correct():
    assert st.answer_is_correct("red", "red")
    assert st.answer_is_correct(" Red. ", "red")
    assert st.answer_is_correct("A  red\ncircle!", "a red circle")
    assert st.answer_is_correct('"blue"', "blue")
    assert not st.answer_is_correct("dark red", "red")
    assert not st.answer_is_correct("red circle", "a red circle")
    assert not st.answer_is_correct("", "red")
    assert not st.answer_is_correct("green", "red")


def test_sample_image_is_a_red_circle():
    image = st.sample_image()
    info = analyse(image)
    assert image.size == (56, 56)
    assert info["components"] == 1 and info["colors"] == {"red"}
    assert classify_shape(info["fill_ratio"]) == "circle"
    assert np.array_equal(as_array(image), as_array(st.sample_image()))


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="multiple of 28"):
        st.generate_samples(1, seed=0, image_size=50)
    with pytest.raises(ValueError, match="n must be"):
        st.generate_samples(-1, seed=0)
    with pytest.raises(ValueError, match="unknown shape"):
        st.render_image("hexagon", (255, 0, 0), (0, 0, 20, 20))
    with pytest.raises(ValueError, match="not inside"):
        st.render_image("square", (255, 0, 0), (40, 40, 60, 60))


def test_cli_writes_a_llava_jsonl_that_round_trips(tmp_path):
    out = tmp_path / "data"
    sample = tmp_path / "sample.png"
    subprocess.run(
        [sys.executable, "-m", "dimple_tools.tiny.task", "--out", str(out), "--n", "12", "--seed", "3",
         "--sample", str(sample)],
        check=True, capture_output=True, text=True,
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
    texts = list(st.iter_task_texts()) + [chat_text(q, a) for _, q, a, _ in st.generate_samples(60, seed=1)]
    texts += btt.chat_texts() + ["<image>\nWhat color is the shape?", "Hello, wörld! 123 ✓"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text, text
        assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


def test_answer_words_are_few_tokens(tokenizer):
    for word in list(st.COLORS) + list(st.SHAPES):
        assert len(tokenizer.encode(word, add_special_tokens=False)) <= 2, word
        assert len(tokenizer.encode(" " + word, add_special_tokens=False)) <= 2, word
    for answer in st.all_answers():
        assert len(tokenizer.encode(answer, add_special_tokens=False)) <= 4, answer
    for question in st.all_questions():
        assert len(tokenizer.encode(question, add_special_tokens=False)) <= 8, question


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
