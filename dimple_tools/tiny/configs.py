"""A tiny Dimple configuration shared by the tests (random weights, CPU-fast).

Language model: vocab 300, hidden 64, 2 layers, 4 heads / 2 key-value heads (head_dim 16, so
`mrope_section` [2, 3, 3] covers its 8 rotary frequencies). Vision tower: depth 2, hidden 32, 2 heads
(head_dim 16), merger output 64, window attention in block 0 and full attention in block 1. Special
token ids are small numbers inside the vocabulary (see the constants below).
"""

from dimple.configuration_dimple import DimpleConfig

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
IMAGE_ID = 3
VIDEO_ID = 4
VISION_START_ID = 5
VISION_END_ID = 6
VISION_TOKEN_ID = 7
MASK_ID = 8

TINY_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    in_channels=3,
    patch_size=14,
    temporal_patch_size=2,
    spatial_merge_size=2,
    window_size=112,
    fullatt_block_indexes=[1],
    out_hidden_size=64,
    tokens_per_second=2,
    hidden_act="silu",
)

TINY_TEXT = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    mrope_section=[2, 3, 3],
    pad_token_id=PAD_ID,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    image_token_id=IMAGE_ID,
    video_token_id=VIDEO_ID,
    vision_start_token_id=VISION_START_ID,
    vision_end_token_id=VISION_END_ID,
    vision_token_id=VISION_TOKEN_ID,
    mask_token_id=MASK_ID,
)


def tiny_config(**overrides) -> DimpleConfig:
    """A small `DimpleConfig`. Keyword arguments override `DimpleConfig` fields; a `vision_config`
    dict is merged into the tiny vision settings (e.g. `tiny_config(vision_config={"depth": 3})`)."""
    vision = dict(TINY_VISION)
    vision.update(overrides.pop("vision_config", None) or {})
    kwargs = dict(TINY_TEXT)
    kwargs.update(overrides)
    return DimpleConfig(vision_config=vision, **kwargs)
