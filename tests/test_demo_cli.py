"""demo.py's command line: bad values stop with a usage error naming the flag (exit code 2) before the
model is loaded, and decoding settings that are not given stay the checkpoint's."""

import pathlib
import types

import pytest
from PIL import Image

import demo


@pytest.fixture
def no_loading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(demo, "load", fail)
    monkeypatch.setattr(demo, "sample_image", fail)


@pytest.fixture
def fake_model(monkeypatch):
    """A stand-in for `load` and `answer` that records the generation keyword arguments."""
    calls = []
    model = types.SimpleNamespace(parameters=lambda: [], device="cpu")
    monkeypatch.setattr(demo, "load", lambda path: (model, None))
    monkeypatch.setattr(demo, "sample_image", lambda: "sample")

    def answer(model, processor, image, question, **generate_kwargs):
        calls.append((image, question, generate_kwargs))
        return "red", 1, 0.001

    monkeypatch.setattr(demo, "answer", answer)
    return calls


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
    assert [call[2] for call in fake_model] == [expected]
    assert "A: red" in capsys.readouterr().out


def test_good_values_reach_the_decoder(tmp_path, fake_model):
    Image.new("RGB", (56, 56), "red").save(tmp_path / "red.png")
    demo.main(["--image", str(tmp_path / "red.png"), "--steps", "4", "--max-new-tokens", "8",
               "--alg-p-threshold", "0", "--question", "What color?"])
    (image, question, kwargs), = fake_model
    assert isinstance(image, Image.Image) and image.size == (56, 56)
    assert question == "What color?"
    assert kwargs == {"steps": 4, "max_new_tokens": 8, "alg_p_threshold": 0.0}
