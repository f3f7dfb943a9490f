"""Decoding results recorded before a refactoring, checked after it: the answers and forward-pass counts of
the shipped tiny model and of a tiny random model for every `alg` x pipeline x prefilling x block / dual-cache
setting (greedy tokens; the random position choices of `origin` from a seeded generator).

`tests/data/decoding_fixture.json` is written by `DIMPLE_RECORD_DECODING_FIXTURE=1 pytest
tests/test_decoding_fixture.py` with the code as it stands; record it again only for an intended change of
results, and say so in the commit.
"""

import itertools
import json
import os
import pathlib

import pytest
import torch
from transformers import AutoProcessor

from dimple.generation_utils import ALGORITHMS, PIPELINES
from dimple.modeling_dimple import DimpleModel
from test_generation import image_inputs, tiny_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "decoding_fixture.json"
RECORD = os.environ.get("DIMPLE_RECORD_DECODING_FIXTURE") == "1"

CACHES = {
    "none": {},
    "prefilling": dict(use_cache=True),
    "blocks": dict(block_length=4),
    "blocks+dual": dict(block_length=4, dual_cache=True),
    "blocks+dual+prefilling": dict(block_length=4, dual_cache=True, use_cache=True),
}


def settings_grid(threshold: float) -> dict:
    grid = {}
    for alg, pipeline, cache in itertools.product(ALGORITHMS, PIPELINES, CACHES):
        thresholds = (None, threshold) if pipeline == "dim" else (None,)
        for alg_p_threshold in thresholds:
            name = f"{alg}/{pipeline}/{cache}/threshold={alg_p_threshold}"
            grid[name] = dict(alg=alg, decoding_pipeline=pipeline, alg_p_threshold=alg_p_threshold,
                              max_new_tokens=8, steps=6, temperature=0.0, **CACHES[cache])
    return grid


def tiny_dimple_inputs():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (56, 56), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 48, 48), fill="red")
    processor = AutoProcessor.from_pretrained(ROOT / "tiny-dimple", trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the shape?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    return dict(processor(images=[image], text=prompt, return_tensors="pt"))


def padded_text_inputs():
    return dict(input_ids=torch.tensor([[0, 0, 1, 20, 21], [1, 30, 31, 32, 33]]),
                attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]))


CASES = {
    "tiny-dimple": (lambda: DimpleModel.from_pretrained(ROOT / "tiny-dimple").eval(), tiny_dimple_inputs, 0.9),
    "random-image": (lambda: tiny_model(0.2), lambda: image_inputs(batch=2), 0.3),
    "random-padded-text": (lambda: tiny_model(0.2), padded_text_inputs, 0.3),
}


def decode_all(case: str) -> dict:
    make_model, make_inputs, threshold = CASES[case]
    model, inputs = make_model(), make_inputs()
    prompt_len = inputs["input_ids"].shape[1]
    results = {}
    for name, settings in settings_grid(threshold).items():
        out = model.diffusion_generate(**inputs, **settings, return_dict_in_generate=True,
                                       generator=torch.Generator().manual_seed(0))
        results[name] = dict(answers=out.sequences[:, prompt_len:].tolist(), passes=out.num_forward_passes)
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_decoding_results_are_the_recorded_ones(case):
    results = decode_all(case)
    if RECORD:
        recorded = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
        recorded[case] = results
        FIXTURE.write_text(json.dumps(recorded, indent=0, sort_keys=True) + "\n")
        pytest.skip(f"recorded {len(results)} decodes of {case} into {FIXTURE.name}")
    expected = json.loads(FIXTURE.read_text())[case]
    assert sorted(results) == sorted(expected)
    different = [name for name in expected if results[name] != expected[name]]
    assert not different, f"{len(different)} of {len(expected)} settings decode differently, e.g. {different[:5]}"
