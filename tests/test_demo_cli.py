"""demo.py's command line: bad values stop with a usage error naming the flag (exit code 2) before the
model is loaded, and decoding settings that are not given stay the checkpoint's."""

import pathlib
import types

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from dimple_tools.demos import cli as demo

TINY = pathlib.Path(__file__).resolve().parents[1] / "tiny-dimple"


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(demo, "load", fail)
    monkeypatch.setattr(demo, "sample_image", fail)


class RecordingModel(torch.nn.Module):
    """A stand-in model: `diffusion_generate` records what reaches it and answers "red" after the prompt."""

    def __init__(self, processor):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answer_ids = processor.tokenizer("red", add_special_tokens=False)["input_ids"]
        self.calls = []

    @property
    def device(self):
        return self.weight.device

    @property
    def dtype(self):
        return self.weight.dtype

    def diffusion_generate(self, input_ids, **kwargs):
        self.calls.append(dict(input_ids=input_ids, **kwargs))
        answer = torch.tensor([self.answer_ids] * input_ids.shape[0])
        return types.SimpleNamespace(sequences=torch.cat([input_ids, answer], dim=1), num_forward_passes=3)


@pytest.fixture
def fake_model(monkeypatch):
    """`load` gives the shipped tiny model's processor and a `RecordingModel`; returns its recorded calls."""
    processor = AutoProcessor.from_pretrained(str(TINY), trust_remote_code=True)
    model = RecordingModel(processor)
    monkeypatch.setattr(demo, "load", lambda path: (model, processor))
    return model.calls


def settings(call: dict) -> dict:
    """The decoding settings of a recorded call: what is not a processor output."""
    return {k: v for k, v in call.items() if k not in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


def bad_image_args(tmp: pathlib.Path):
    (tmp / "notes.png").write_text("not an image")
    Image.new("RGB", (1000, 2)).save(tmp / "thin.png")
    return [
        (["--image", str(tmp / "missing.png")], "--image"),
        (["--image", str(tmp / "notes.png")], "--image"),
        (["--image", str(tmp)], "--image"),
        (["--image", str(tmp / "thin.png")], "--image"),
    ]


BAD_ARGS = [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--alg-p-threshold", "nan"], "--alg-p-threshold"),
    (["--alg-p-threshold", "inf"], "--alg-p-threshold"),
    (["--alg-p-threshold", "1.5"], "--alg-p-threshold"),
    (["--alg-p-threshold", "-0.1"], "--alg-p-threshold"),
    (["--question", "   "], "--question"),
    (["--question", "What color?", "--question", ""], "--question"),
    (["--steps", "two"], "--steps"),
]


@pytest.mark.parametrize("args, flag", BAD_ARGS + [("image", i) for i in range(4)])
def test_bad_values_stop_before_loading_and_name_the_flag(args, flag, tmp_path, capsys, no_loading):
    if args == "image":
        args, flag = bad_image_args(tmp_path)[flag]
    with pytest.raises(SystemExit) as exit_info:
        demo.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:")
    assert f"error: {flag}" in err or f"argument {flag}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, expected", [([], {}), (["--use-cache"], {"use_cache": True}),
                                            (["--no-use-cache"], {"use_cache": False})])
def test_use_cache_is_passed_only_when_given(args, expected, fake_model, capsys):
    demo.main(args + ["--question", "What color is the shape?"])
    assert [settings(call) for call in fake_model] == [{"return_dict_in_generate": True, **OPEN_ENDED, **expected}]
    assert "A: red    [3 forward passes" in capsys.readouterr().out


# What the demo passes by default: open-ended answers up to 256 tokens, a progress line (the stand-in model has no
# generation config, so no steps are derived from it).
OPEN_ENDED = {"open_ended": True, "max_new_tokens": 256, "show_progress": True}


def test_no_open_ended_and_no_progress_decode_the_checkpoints_canvas(fake_model):
    demo.main(["--no-open-ended", "--no-progress", "--max-new-tokens", "8", "--question", "What color?"])
    assert [settings(call) for call in fake_model] == [
        {"return_dict_in_generate": True, "show_progress": False, "max_new_tokens": 8}]


def test_good_values_reach_the_decoder(tmp_path, fake_model, capsys):
    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    demo.main(["--image", str(tmp_path / "red.png"), "--steps", "4", "--max-new-tokens", "8",
               "--alg-p-threshold", "0", "--question", "What color?"])
    (call,) = fake_model
    assert settings(call) == {"return_dict_in_generate": True, **OPEN_ENDED, "steps": 4, "max_new_tokens": 8,
                              "alg_p_threshold": 0.0}
    # the processor's outputs for the 56x56 image and the question reach the decoder
    processor = AutoProcessor.from_pretrained(str(TINY), trust_remote_code=True)
    prompt = processor.tokenizer.decode(call["input_ids"][0])
    assert "What color?" in prompt
    assert call["image_grid_thw"].tolist() == processor(images=[Image.new("RGB", (56, 56))], text="<|image_pad|>",
                                                        return_tensors="pt")["image_grid_thw"].tolist()
    assert call["pixel_values"].dtype == torch.float32
    assert "A: red" in capsys.readouterr().out
