"""The shipped tiny model answers held-out questions, with and without prefilling, through the public API.

`tiny-dimple/` is trained by scripts/build_tiny_dimple.py (its full evaluation, 300 questions per setting,
is tiny-dimple/eval_results.json); these tests re-check a fresh held-out sample through AutoModel /
AutoProcessor with trust_remote_code, as a user loads it.
"""

import pathlib
import subprocess
import sys

import pytest
from transformers import AutoModel, AutoProcessor

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDER = ROOT / "tiny-dimple"
sys.path.insert(0, str(ROOT / "scripts"))

from build_tiny_dimple import IMAGE_SIZE, ask  # noqa: E402
from shapes_task import answer_is_correct, generate_samples  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)
    model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True).eval()
    return model, processor


def test_the_shipped_folder_is_complete_and_small():
    names = {p.name for p in FOLDER.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "modeling_dimple.py", "configuration_dimple.py", "generation_utils.py",
            "processing_dimple.py", "training_log.json", "loss_curves.png"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)  # safetensors only
    assert (FOLDER / "model.safetensors").stat().st_size <= 20 * 2**20
    for module in ("modeling_dimple.py", "configuration_dimple.py", "generation_utils.py", "processing_dimple.py"):
        assert (FOLDER / module).read_text() == (ROOT / module).read_text(), f"{module} is stale: rebuild or copy"


def test_held_out_accuracy_with_confident_decoding(tiny):
    model, processor = tiny
    samples = generate_samples(80, seed=123, image_size=IMAGE_SIZE)
    correct, passes = 0, []
    for image, question, expected, _ in samples:
        answer, n = ask(model, processor, image, question)
        correct += answer_is_correct(answer, expected)
        passes.append(n)
    assert correct / len(samples) >= 0.95
    assert max(passes) <= model.generation_config.steps
    assert sum(passes) / len(passes) < 2  # confident decoding: about one pass for these short answers


def test_prefilling_gives_the_same_answers(tiny):
    model, processor = tiny
    for image, question, _, _ in generate_samples(40, seed=321, image_size=IMAGE_SIZE):
        assert ask(model, processor, image, question, use_cache=True)[0] == ask(
            model, processor, image, question, use_cache=False
        )[0]


@pytest.mark.parametrize("settings", [dict(block_length=4, dual_cache=True),
                                      dict(block_length=2, dual_cache=True, use_cache=True)])
def test_block_decoding_with_the_dual_cache_keeps_the_accuracy(tiny, settings):
    model, processor = tiny
    samples = generate_samples(60, seed=99, image_size=IMAGE_SIZE)
    correct = same = 0
    for image, question, expected, _ in samples:
        answer, _ = ask(model, processor, image, question, **settings)
        correct += answer_is_correct(answer, expected)
        same += answer == ask(model, processor, image, question)[0]
    assert correct / len(samples) >= 0.95
    assert same >= 0.95 * len(samples)


def test_batched_answers_equal_single_answers(tiny):
    model, processor = tiny
    samples = generate_samples(6, seed=5, image_size=IMAGE_SIZE)
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for _, q, _, _ in samples
    ]
    inputs = processor(images=[s[0] for s in samples], text=prompts, return_tensors="pt")
    out = model.diffusion_generate(**inputs)
    batched = processor.decode_answers(out, prompt_length=inputs["input_ids"].shape[1])
    assert batched == [ask(model, processor, image, q)[0] for image, q, _, _ in samples]


def test_demo_command_answers_the_sample_image():
    result = subprocess.run(
        [sys.executable, str(ROOT / "demo.py")], capture_output=True, text=True, check=True, cwd=str(ROOT)
    )
    answers = [line for line in result.stdout.splitlines() if line.startswith("A: ")]
    assert [a.split("    ")[0] for a in answers] == ["A: red", "A: circle", "A: a red circle"]
    assert all("forward passes" in a for a in answers)
