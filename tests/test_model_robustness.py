"""Issue 22: a tampered config, pickle weights and malformed visual inputs are refused with a `ValueError` that
names the field or argument, before any heavy work (not a model with no layers, NaN logits or a TypeError
deep inside)."""

import json

import pytest
import torch

from dimple.configuration_dimple import DimpleConfig, DimpleVisionConfig
from dimple.modeling_dimple import DimpleModel
from dimple_tools.tiny.configs import IMAGE_ID, TINY_TEXT, TINY_VISION, tiny_config

# --------------------------------------------------------------------------------------------------
# Item 7: the config is checked when it is built
# --------------------------------------------------------------------------------------------------


BAD_TEXT_VALUES = [
    ("num_hidden_layers", -1, r"`num_hidden_layers` must be an integer >= 1, got -1"),
    ("num_hidden_layers", 0, r"`num_hidden_layers` must be an integer >= 1, got 0"),
    ("num_hidden_layers", 2.5, r"`num_hidden_layers` must be an integer >= 1, got 2.5"),
    ("vocab_size", 0, r"`vocab_size` must be an integer >= 1"),
    ("hidden_size", -64, r"`hidden_size` must be an integer >= 1"),
    ("intermediate_size", 0, r"`intermediate_size` must be an integer >= 1"),
    ("max_position_embeddings", 0, r"`max_position_embeddings` must be an integer >= 1"),
    # special ids beyond the embedding: an IndexError (a device-side assert on CUDA) in the first forward
    ("vocab_size", 8, r"`mask_token_id` must be a token id in \[0, vocab_size = 8\)"),
    ("mask_token_id", 300, r"`mask_token_id` must be a token id in \[0, vocab_size = 300\)"),
    ("pad_token_id", -1, r"`pad_token_id` must be a token id in \[0, vocab_size = 300\)"),
    ("image_token_id", 300, r"`image_token_id` must be a token id in \[0, vocab_size = 300\)"),
    ("video_token_id", 1000, r"`video_token_id` must be a token id in \[0, vocab_size = 300\)"),
    ("eos_token_id", [2, -1], r"`eos_token_id` must be a token id \(an integer >= 0, or a list of them\) or null"),
    ("bos_token_id", "<s>", r"`bos_token_id` must be a token id \(an integer >= 0\) or null, got '<s>'"),
    ("vision_token_id", 1.5, r"`vision_token_id` must be a token id \(an integer >= 0\) or null"),
    ("hidden_act", "swishy", r"`hidden_act` must be one of transformers' activations \[.*'silu'.*\], got 'swishy'"),
    ("rms_norm_eps", 0, r"`rms_norm_eps` must be a finite number > 0, got 0"),
    ("rms_norm_eps", -1e-6, r"`rms_norm_eps` must be a finite number > 0"),
    ("rope_theta", 0.0, r"`rope_theta` must be a finite number > 0, got 0.0"),
    ("rope_theta", -10000.0, r"`rope_theta` must be a finite number > 0"),
    ("rope_theta", float("nan"), r"`rope_theta` must be a finite number > 0"),
    ("attention_dropout", 1.5, r"`attention_dropout` must be a number in \[0, 1\)"),
    ("initializer_range", -0.02, r"`initializer_range` must be a number >= 0"),
    ("mrope_section", [2, 3, 4], r"mrope_section \[2, 3, 4\] must sum to head_dim / 2 = 8"),
    ("mrope_section", [4, 4], r"mrope_section \[4, 4\] must sum to head_dim / 2 = 8, as 3 integers"),
    ("mrope_section", [8, -3, 3], r"mrope_section \[8, -3, 3\] must sum to head_dim / 2 = 8, as 3 integers >= 0"),
    ("mrope_section", 8, r"mrope_section 8 must sum to head_dim / 2 = 8"),
]

BAD_VISION_VALUES = [
    ("depth", 0, r"`vision_config.depth` must be an integer >= 1, got 0"),
    ("depth", -1, r"`vision_config.depth` must be an integer >= 1, got -1"),
    ("hidden_size", 0, r"`vision_config.hidden_size` must be an integer >= 1"),
    ("num_heads", 3, r"`vision_config.hidden_size` \(32\) must be divisible by `vision_config.num_heads` \(3\)"),
    ("num_heads", 16, r"`vision_config.hidden_size` \(32\) .* heads whose size is a multiple of 4"),
    ("intermediate_size", -64, r"`vision_config.intermediate_size` must be an integer >= 1"),
    ("patch_size", 0, r"`vision_config.patch_size` must be an integer >= 1"),
    ("spatial_merge_size", 0, r"`vision_config.spatial_merge_size` must be an integer >= 1"),
    ("temporal_patch_size", 0, r"`vision_config.temporal_patch_size` must be an integer >= 1"),
    ("in_channels", 0, r"`vision_config.in_channels` must be an integer >= 1"),
    ("out_hidden_size", 0, r"`vision_config.out_hidden_size` must be an integer >= 1"),
    ("window_size", 0, r"`vision_config.window_size` must be an integer >= 1"),
    ("window_size", 100, r"`vision_config.window_size` \(100\) must be a multiple of patch_size × spatial_merge_size = 28"),
    ("fullatt_block_indexes", [2], r"`vision_config.fullatt_block_indexes` must be distinct block indexes in \[0, depth = 2\), got \[2\]"),
    ("fullatt_block_indexes", [-1], r"`vision_config.fullatt_block_indexes` must be distinct block indexes"),
    ("fullatt_block_indexes", 1, r"`vision_config.fullatt_block_indexes` must be distinct block indexes"),
    ("tokens_per_second", 0, r"`vision_config.tokens_per_second` must be a finite number > 0"),
    ("hidden_act", "nope", r"`vision_config.hidden_act` must be one of transformers' activations"),
]


@pytest.mark.parametrize("field, value, pattern", BAD_TEXT_VALUES, ids=lambda v: str(v)[:30])
def test_bad_text_config_value_is_named(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_config(**{field: value})


def test_vision_config_of_another_type_is_named():
    with pytest.raises(ValueError, match=r"`vision_config` must be a dict of DimpleVisionConfig fields or a DimpleVisionConfig, got str"):
        DimpleConfig(vision_config="tiny", **TINY_TEXT)


@pytest.mark.parametrize("field, value, pattern", BAD_VISION_VALUES, ids=lambda v: str(v)[:30])
def test_bad_vision_config_value_is_named(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        DimpleVisionConfig(**{**TINY_VISION, field: value})
    with pytest.raises(ValueError, match=pattern):  # as part of a DimpleConfig (config.json holds a dict)
        tiny_config(vision_config={field: value})


@pytest.mark.parametrize(
    "field, value, pattern",
    [
        ("num_hidden_layers", -1, r"`num_hidden_layers` must be an integer >= 1, got -1"),
        ("vocab_size", 100000, None),  # larger than the tiny vocabulary: allowed (the weights then mismatch)
        ("vocab_size", 5, r"token id in \[0, vocab_size = 5\)"),
        ("hidden_act", "gelu_fancy", r"`hidden_act` must be one of"),
        ("rms_norm_eps", 0.0, r"`rms_norm_eps` must be a finite number > 0"),
        ("rope_theta", -1, r"`rope_theta` must be a finite number > 0"),
        ("mrope_section", [4, 4, 4], r"mrope_section \[4, 4, 4\] must sum to head_dim / 2 = 8"),
        ("vision_config.depth", -1, r"`vision_config.depth` must be an integer >= 1, got -1"),
        ("vision_config.num_heads", 5, r"`vision_config.num_heads` \(5\)"),
    ],
)
def test_tampered_config_json_fails_on_loading(tmp_path, field, value, pattern):
    tiny_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    if field.startswith("vision_config."):
        saved["vision_config"][field.split(".", 1)[1]] = value
    else:
        saved[field] = value
    (tmp_path / "config.json").write_text(json.dumps(saved))
    if pattern is None:
        assert DimpleConfig.from_pretrained(tmp_path).vocab_size == value
        return
    with pytest.raises(ValueError, match=pattern):
        DimpleConfig.from_pretrained(tmp_path)


def test_default_and_released_configs_still_build(tmp_path):
    from pathlib import Path

    released = DimpleConfig.from_pretrained(Path(__file__).resolve().parents[1])
    assert released.num_hidden_layers == 28 and released.vision_config.depth == 32
    assert DimpleConfig().to_dict() == DimpleConfig(**DimpleConfig().to_dict()).to_dict()
    assert DimpleVisionConfig().fullatt_block_indexes == [7, 15, 23, 31]
    # ids only the tokenizer reads may lie outside a small vocabulary (dimple_tools/checkpoint/initialize.py keeps the defaults)
    assert tiny_config(bos_token_id=151644, vision_token_id=151654).bos_token_id == 151644
    # a round trip through save_pretrained (transformers builds default configs to diff against)
    config = tiny_config(eos_token_id=[2, 1], rope_theta=10000)
    config.save_pretrained(tmp_path)
    loaded = DimpleConfig.from_pretrained(tmp_path)
    assert loaded.eos_token_id == [2, 1] and loaded.rope_theta == 10000
    assert loaded.vision_config.to_dict() == config.vision_config.to_dict()


def test_model_checks_values_set_after_the_config_was_built():
    """`from_pretrained(folder, num_hidden_layers=-1)` sets the value on the built config: the model checks
    it again rather than building no layers."""
    config = tiny_config()
    config.num_hidden_layers = -1
    with pytest.raises(ValueError, match=r"`num_hidden_layers` must be an integer >= 1, got -1"):
        DimpleModel(config)
    config = tiny_config()
    config.vision_config.depth = 0
    with pytest.raises(ValueError, match=r"`vision_config.depth` must be an integer >= 1, got 0"):
        DimpleModel(config)


# --------------------------------------------------------------------------------------------------
# Item 8: safetensors weights only (a pickle-based checkpoint is never unpickled)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DimpleModel(tiny_config(initializer_range=0.2)).eval()


def no_torch_load(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("torch.load (pickle) was called")

    monkeypatch.setattr(torch, "load", boom)


@pytest.fixture
def pickle_folder(tmp_path, tiny_model, monkeypatch):
    """A saved tiny model whose weights are a `pytorch_model.bin` (transformers 5 always writes safetensors,
    so the test writes the pickle file itself)."""
    monkeypatch.setattr(DimpleModel, "_auto_class", "AutoModel")  # what a trust_remote_code model has
    folder = tmp_path / "pickled"
    tiny_model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_pickle_checkpoint_folder_is_refused_with_a_conversion_note(pickle_folder, monkeypatch):
    no_torch_load(monkeypatch)
    with pytest.raises(ValueError, match=r"holds no \.safetensors weights, only pickle-based ones \(pytorch_model\.bin\)") as info:
        DimpleModel.from_pretrained(pickle_folder)
    assert "from safetensors.torch import save_file" in str(info.value)
    assert "weights_only=True" in str(info.value)
    for kwargs in ({"use_safetensors": None}, {"subfolder": ""}):
        with pytest.raises(ValueError, match=r"only pickle-based ones"):
            DimpleModel.from_pretrained(str(pickle_folder), **kwargs)


def test_pickle_weights_file_and_use_safetensors_false_are_refused(pickle_folder, tmp_path, monkeypatch):
    no_torch_load(monkeypatch)
    with pytest.raises(ValueError, match=r"`pretrained_model_name_or_path` is the weights file .*pytorch_model\.bin"):
        DimpleModel.from_pretrained(pickle_folder / "pytorch_model.bin", config=tiny_config())
    with pytest.raises(ValueError, match=r"`use_safetensors` must be True or None"):
        DimpleModel.from_pretrained(pickle_folder, use_safetensors=False)
    # the pickle file next to safetensors weights: safetensors are read, the pickle is ignored
    folder = tmp_path / "both"
    DimpleModel(tiny_config()).save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes((pickle_folder / "pytorch_model.bin").read_bytes())
    DimpleModel.from_pretrained(folder)


def test_safetensors_checkpoint_still_loads(tmp_path, tiny_model, monkeypatch):
    tiny_model.save_pretrained(tmp_path / "safe")
    no_torch_load(monkeypatch)
    loaded = DimpleModel.from_pretrained(tmp_path / "safe")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tiny_model.state_dict().items())


_AUTOMODEL_SCRIPT = r"""
import sys, torch
from transformers import AutoModel

def boom(*args, **kwargs):
    raise AssertionError("torch.load (pickle) was called")

torch.load = boom
try:
    AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
except ValueError as error:
    print("REFUSED:", str(error).splitlines()[0])
else:
    print("LOADED")
"""


def test_automodel_trust_remote_code_refuses_pickle_weights(pickle_folder, tmp_path):
    """The issue's case: AutoModel (remote code, the folder's own modeling_dimple.py) on a folder holding only
    pytorch_model.bin."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", _AUTOMODEL_SCRIPT, str(pickle_folder)], capture_output=True, text=True, env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED:" in result.stdout and "pytorch_model.bin" in result.stdout, result.stdout + result.stderr[-3000:]


# --------------------------------------------------------------------------------------------------
# Items 5 and 11: image grids and attention masks the model cannot honour
# --------------------------------------------------------------------------------------------------


def image_inputs(grid=(1, 8, 8), before: int = 3, after: int = 4, rows: int = 1) -> dict:
    t, h, w = grid
    gen = torch.Generator().manual_seed(0)
    prompt = [1] + torch.randint(10, 300, (before,), generator=gen).tolist() + [5] + [IMAGE_ID] * (t * h * w // 4) + [
        6
    ] + torch.randint(10, 300, (after,), generator=gen).tolist()
    ids = torch.tensor([prompt] * rows)
    return dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=torch.randn(rows * t * h * w, 1176, generator=gen),
        image_grid_thw=torch.tensor([list(grid)] * rows),
    )


def forbid_running(model, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the model ran before the input was rejected")

    monkeypatch.setattr(model.model, "forward", boom)
    monkeypatch.setattr(model.visual, "forward", boom)


def masked_image_tokens():
    inputs = image_inputs()
    positions = (inputs["input_ids"][0] == IMAGE_ID).nonzero().flatten()
    inputs["attention_mask"][0, positions[:5]] = 0  # part of the image hidden
    return inputs


def left_padding_over_image_tokens():
    """Zeros before the row's tokens, as left padding, but over the image's first placeholders."""
    inputs = image_inputs()
    start = int((inputs["input_ids"][0] == IMAGE_ID).nonzero()[0, 0])
    inputs["input_ids"], inputs["attention_mask"] = inputs["input_ids"][:, start:], inputs["attention_mask"][:, start:]
    inputs["attention_mask"][0, :4] = 0
    return inputs


BAD_VISUAL = {
    # item 5: an image is one frame; t = 2 was accepted (and changed the answer)
    "image-with-2-frames": (
        dict(image_inputs(grid=(2, 8, 8))), r"`image_grid_thw` must have t = 1 for every image .*got \[\[2, 8, 8\]\]"
    ),
    "attention-mask-over-image-tokens": (
        masked_image_tokens(),
        r"`attention_mask` is 0 at 5 image placeholder tokens \(id 3\) of `input_ids` rows \[0\]",
    ),
    "left-padding-over-image-tokens": (
        left_padding_over_image_tokens(),
        r"`attention_mask` is 0 at 4 image placeholder tokens \(id 3\) of `input_ids` rows \[0\]",
    ),
    # item 11: malformed grids
    "grid-floats": (
        dict(image_inputs(), image_grid_thw=torch.tensor([[1.0, 8.0, 8.0]])), r"`image_grid_thw` must hold integers .*float"
    ),
    "grid-bool": (dict(image_inputs(), image_grid_thw=torch.ones(1, 3, dtype=torch.bool)), r"`image_grid_thw` must hold integers"),
    "grid-list": (dict(image_inputs(), image_grid_thw=[[1, 8, 8]]), r"`image_grid_thw` must be a tensor of shape \(items, 3\) .*got list"),
    "grid-tuple": (dict(image_inputs(), image_grid_thw=(1, 8, 8)), r"`image_grid_thw` must be a tensor .*got tuple"),
    "grid-1d": (dict(image_inputs(), image_grid_thw=torch.tensor([1, 8, 8])), r"`image_grid_thw` must have shape \(items, 3\) of \(t, h, w\), got \(3,\)"),
    "grid-negative": (
        dict(image_inputs(), image_grid_thw=torch.tensor([[-1, -8, 8]])), r"`image_grid_thw` values \(t, h, w\) must be >= 1"
    ),
    "grid-zero": (dict(image_inputs(), image_grid_thw=torch.tensor([[1, 0, 8]])), r"`image_grid_thw` values \(t, h, w\) must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_VISUAL))
def test_bad_visual_input_raises_before_running(tiny_model, monkeypatch, case):
    kwargs, pattern = BAD_VISUAL[case]
    forbid_running(tiny_model, monkeypatch)
    with pytest.raises(ValueError, match=pattern):
        tiny_model(**kwargs)


@pytest.mark.parametrize("case", list(BAD_VISUAL))
def test_bad_visual_input_is_refused_by_get_rope_index(tiny_model, case):
    """Decoding and the training collator compute positions first, with get_rope_index."""
    kwargs, pattern = BAD_VISUAL[case]
    with pytest.raises(ValueError, match=pattern):
        tiny_model.get_rope_index(kwargs["input_ids"], kwargs["image_grid_thw"], attention_mask=kwargs["attention_mask"])


@pytest.mark.parametrize("case", ["image-with-2-frames", "left-padding-over-image-tokens", "grid-floats", "grid-list", "grid-1d", "grid-negative"])
def test_bad_visual_input_is_refused_by_diffusion_generate(tiny_model, monkeypatch, case):
    kwargs, pattern = BAD_VISUAL[case]
    forbid_running(tiny_model, monkeypatch)
    with pytest.raises(ValueError, match=pattern):
        tiny_model.diffusion_generate(**kwargs, max_new_tokens=4, steps=2)


def test_video_grids_are_checked_too(tiny_model):
    inputs = image_inputs()
    with pytest.raises(ValueError, match=r"`video_grid_thw` must hold integers"):
        tiny_model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], torch.tensor([[2.0, 8.0, 8.0]]))
    with pytest.raises(ValueError, match=r"`video_grid_thw` must be a tensor"):
        tiny_model.get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], [[2, 8, 8]])


def test_well_formed_visual_input_and_padding_still_work(tiny_model):
    """Left padding over pad tokens (not image tokens) is fine, and a padded row gives the unpadded row's logits."""
    inputs = image_inputs(rows=2)
    ids = torch.cat([torch.zeros(2, 3, dtype=torch.long), inputs["input_ids"]], dim=1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), inputs["attention_mask"]], dim=1)
    ids[0, :3], mask[0, :3] = torch.tensor([1, 20, 21]), 1  # row 0 has 3 more real tokens, row 1 is padded
    with torch.no_grad():
        padded = tiny_model(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                            image_grid_thw=inputs["image_grid_thw"]).logits
        alone = tiny_model(input_ids=ids[1:, 3:], pixel_values=inputs["pixel_values"][64:],
                           image_grid_thw=inputs["image_grid_thw"][1:]).logits
        out = tiny_model.diffusion_generate(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                                            image_grid_thw=inputs["image_grid_thw"], max_new_tokens=4, steps=2)
    assert torch.allclose(padded[1, 3:], alone[0], atol=1e-4)
    sequences = out.sequences if hasattr(out, "sequences") else out
    assert sequences.shape == (2, ids.shape[1] + 4)
