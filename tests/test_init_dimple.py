"""`dimple_tools/checkpoint/initialize.py` on tiny fake source checkpoints.

A tiny transformers `Qwen2_5_VLForConditionalGeneration` stands in for Qwen2.5-VL (the vision tower) and a
tiny `Qwen2ForCausalLM` for Dream (same parameter names as Dream: `model.*`, `lm_head.weight`); the built
Dimple must carry exactly their tensors, a fresh projector of the right shape, and load with `AutoModel`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

from dimple_tools.checkpoint.initialize import init_dimple
import transformers  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

if not hasattr(transformers, "Qwen2_5_VLConfig"):  # transformers < 4.49 has no Qwen2.5-VL to build a source from
    pytest.skip("this transformers version has no Qwen2.5-VL", allow_module_level=True)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

# Dimple's language model is Dream's: these sizes define it (head_dim 16 -> mrope_section sums to 8).
TEXT = dict(
    vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=512,
)
MROPE_SECTION = [2, 3, 3]
# Special-token ids inside the tiny vocabulary: the vision ones are Qwen2.5-VL's, pad and mask Dream's.
QWEN_IDS = dict(image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)
DREAM_IDS = dict(pad_token_id=294, mask_token_id=295)
VISION = dict(
    depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1],
    window_size=112, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, tokens_per_second=2,
)


def _save_qwen2_5_vl(folder: Path) -> Path:
    torch.manual_seed(1)
    text = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": MROPE_SECTION}, rope_theta=1e6)
    # Before 4.52 the text fields sat at the top level of the config (as in the released Qwen2.5-VL-7B config.json).
    nested = "text_config" in getattr(Qwen2_5_VLConfig, "sub_configs", {})
    text_fields = {"text_config": text} if nested else text
    config = Qwen2_5_VLConfig(vision_config=VISION, tie_word_embeddings=False, **text_fields, **QWEN_IDS)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _save_dream(folder: Path, **overrides) -> Path:
    torch.manual_seed(2)
    config = Qwen2Config(**{**TEXT, "tie_word_embeddings": False, "rope_theta": 1e6, **DREAM_IDS, **overrides})
    Qwen2ForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def _read(folder: Path) -> dict:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("init-sources")
    return _save_qwen2_5_vl(root / "qwen2_5_vl"), _save_dream(root / "dream")


def _vision_tensors(qwen_state: dict) -> dict:
    """The vision tower of a Qwen2.5-VL checkpoint, keyed `visual.*` whatever the transformers version."""
    vision = {}
    for key, tensor in qwen_state.items():
        for prefix in ("model.visual.", "visual."):
            if key.startswith(prefix):
                vision["visual." + key[len(prefix):]] = tensor
    return vision


def test_init_dimple_copies_vision_tower_and_language_model(sources, tmp_path):
    qwen_dir, dream_dir = sources
    out = tmp_path / "init"
    init_dimple(str(qwen_dir), str(dream_dir), str(out))

    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin"))
    for name in ("configuration_dimple.py", "modeling_dimple.py", "processing_dimple.py"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_dimple.DimpleModel"
    assert config["num_hidden_layers"] == TEXT["num_hidden_layers"]
    assert config["hidden_size"] == TEXT["hidden_size"]
    assert config["mrope_section"] == MROPE_SECTION
    assert config["vision_config"]["depth"] == VISION["depth"]
    for key, value in {**QWEN_IDS, **DREAM_IDS}.items():
        assert config[key] == value, key
    assert config["vision_config"]["out_hidden_size"] == VISION["out_hidden_size"]

    built = _read(out)
    vision = _vision_tensors(_read(qwen_dir))
    dream = _read(dream_dir)
    assert vision, "the fake Qwen2.5-VL checkpoint has no vision tensors"

    built_vision = {k: v for k, v in built.items() if k.startswith("visual.")}
    assert set(built_vision) == set(vision)
    for key, tensor in vision.items():
        assert torch.equal(built[key], tensor), key

    built_text = {k: v for k, v in built.items() if k.startswith("model.") or k == "lm_head.weight"}
    assert set(built_text) == set(dream)
    for key, tensor in dream.items():
        assert torch.equal(built[key], tensor), key
    # Dream's head is its own (untied), not the embedding.
    assert not torch.equal(built["lm_head.weight"], built["model.embed_tokens.weight"])

    projector = {k: v for k, v in built.items() if k.startswith("img_projector.")}
    assert projector["img_projector.linear_1.weight"].shape == (TEXT["hidden_size"], VISION["out_hidden_size"])
    assert projector["img_projector.linear_1.bias"].shape == (TEXT["hidden_size"],)
    assert projector["img_projector.linear_2.weight"].shape == (TEXT["hidden_size"], TEXT["hidden_size"])
    assert projector["img_projector.linear_2.bias"].shape == (TEXT["hidden_size"],)
    assert set(built) == set(vision) | set(dream) | set(projector)

    # The folder loads with AutoModel + trust_remote_code, in a fresh process, with those weights.
    script = (
        "import sys, torch\n"
        "from transformers import AutoModel\n"
        "model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
        "sd = model.state_dict()\n"
        "print(type(model).__name__, len(sd), float(sd['visual.patch_embed.proj.weight'].double().sum()),"
        " float(sd['lm_head.weight'].double().sum()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", script, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    name, count, patch_sum, head_sum = result.stdout.split()[-4:]
    assert name == "DimpleModel"
    assert int(count) == len(built)
    assert float(patch_sum) == pytest.approx(float(vision["visual.patch_embed.proj.weight"].double().sum()), abs=1e-9)
    assert float(head_sum) == pytest.approx(float(dream["lm_head.weight"].double().sum()), abs=1e-9)


def test_init_dimple_rejects_a_mismatching_dream(sources, tmp_path):
    qwen_dir, _ = sources
    # The weights of a 3-layer Dream under the config of a 2-layer one: the layer counts disagree.
    dream = _save_dream(tmp_path / "dream3", num_hidden_layers=3)
    config = json.loads((dream / "config.json").read_text())
    config["num_hidden_layers"] = 2
    config.pop("layer_types", None)
    (dream / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not fit Dimple"):
        init_dimple(str(qwen_dir), str(dream), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_init_dimple_rejects_pickle_only_sources(sources, tmp_path):
    qwen_dir, dream_dir = sources
    pickled = tmp_path / "dream-bin"
    pickled.mkdir()
    (pickled / "config.json").write_text((dream_dir / "config.json").read_text())
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors"):
        init_dimple(str(qwen_dir), str(pickled), str(tmp_path / "out"))
