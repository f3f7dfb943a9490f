"""Build an initial Dimple checkpoint, as the release was initialised: the vision tower from a local
Qwen2.5-VL checkpoint, the language model and head from a local Dream checkpoint, a freshly initialised
projector.

    python -m dimple_tools.checkpoint.initialize --qwen2_5_vl path/to/Qwen2.5-VL-7B-Instruct --dream path/to/Dream-v0-Instruct-7B \\
        --output init

Reads safetensors only. Qwen2.5-VL checkpoints name the vision tower `visual.*` (transformers < 4.52) or
`model.visual.*` (later); both are accepted. The output folder loads with AutoModel/AutoProcessor
(trust_remote_code): weights, config, generation config, the code modules, the tokenizer files of Dream
and this repository's processor configuration.
"""

import argparse
import json
import pathlib
import shutil

import torch
from safetensors import safe_open

from dimple_tools.paths import REPOSITORY_ROOT  # noqa: E402
ROOT = REPOSITORY_ROOT

from dimple.configuration_dimple import DimpleConfig, DimpleVisionConfig  # noqa: E402
from dimple.modeling_dimple import DimpleModel  # noqa: E402

TEXT_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rope_theta", "rms_norm_eps",
    "tie_word_embeddings",
)
VISION_FIELDS = (
    "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size", "temporal_patch_size",
    "spatial_merge_size", "window_size", "fullatt_block_indexes", "out_hidden_size", "tokens_per_second", "hidden_act",
)
QWEN_VL_TOKEN_FIELDS = (
    "image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id",
)
DREAM_TOKEN_FIELDS = ("pad_token_id", "mask_token_id")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def read_safetensors(folder: pathlib.Path) -> dict:
    tensors = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no .safetensors files (pickle checkpoints are not read)")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def rope_value(config: dict, key: str):
    """`key` of the rotary settings: `rope_scaling` (transformers < 5) or `rope_parameters` (5+), at the
    top level or in `text_config`."""
    for scope in (config, config.get("text_config") or {}):
        for field in ("rope_scaling", "rope_parameters"):
            value = (scope.get(field) or {}).get(key)
            if value is not None:
                return value
    return None


def dimple_config(qwen_vl_config: dict, dream_config: dict) -> DimpleConfig:
    vision = qwen_vl_config["vision_config"]
    text = {k: dream_config[k] for k in TEXT_FIELDS if k in dream_config}
    if "rope_theta" not in text and rope_value(dream_config, "rope_theta") is not None:
        text["rope_theta"] = rope_value(dream_config, "rope_theta")
    if rope_value(qwen_vl_config, "mrope_section") is not None:  # the multimodal rotary layout is Qwen2.5-VL's
        text["mrope_section"] = list(rope_value(qwen_vl_config, "mrope_section"))
    # Special-token ids of the sources' vocabulary (else DimpleConfig's, those of Qwen2's vocabulary).
    ids = {k: qwen_vl_config[k] for k in QWEN_VL_TOKEN_FIELDS if qwen_vl_config.get(k) is not None}
    ids.update({k: dream_config[k] for k in DREAM_TOKEN_FIELDS if dream_config.get(k) is not None})
    vision_kwargs = {k: vision[k] for k in VISION_FIELDS if k in vision}
    vision_kwargs.setdefault("out_hidden_size", text["hidden_size"])
    return DimpleConfig(vision_config=DimpleVisionConfig(**vision_kwargs), **text, **ids)


def init_dimple(qwen2_5_vl: str, dream: str, output: str, seed: int = 0) -> DimpleModel:
    qwen_dir, dream_dir, out = pathlib.Path(qwen2_5_vl), pathlib.Path(dream), pathlib.Path(output)
    config = dimple_config(json.loads((qwen_dir / "config.json").read_text()), json.loads((dream_dir / "config.json").read_text()))
    torch.manual_seed(seed)
    model = DimpleModel(config)

    state = {}
    for key, tensor in read_safetensors(qwen_dir).items():
        for prefix in ("model.visual.", "visual."):
            if key.startswith(prefix):
                state["visual." + key[len(prefix):]] = tensor
    for key, tensor in read_safetensors(dream_dir).items():
        if key.startswith("model.") or key == "lm_head.weight":
            state[key] = tensor
    expected = {k for k in model.state_dict() if not k.startswith("img_projector.")}
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"the source checkpoints do not fit Dimple: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=False)  # img_projector keeps its fresh initialisation

    type(model).register_for_auto_class("AutoModel")
    type(config).register_for_auto_class("AutoConfig")
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (dream_dir / name).exists():
            shutil.copy(dream_dir / name, out / name)
    shutil.copy(ROOT / "preprocessor_config.json", out / "preprocessor_config.json")
    shutil.copy(ROOT / "processing_dimple.py", out / "processing_dimple.py")
    if not (out / "tokenizer_config.json").exists():
        shutil.copy(ROOT / "tokenizer_config.json", out / "tokenizer_config.json")
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qwen2_5_vl", required=True, help="local Qwen2.5-VL checkpoint folder")
    parser.add_argument("--dream", required=True, help="local Dream checkpoint folder")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    init_dimple(args.qwen2_5_vl, args.dream, args.output, args.seed)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
