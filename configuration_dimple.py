"""Configuration of Dimple, a discrete-diffusion multimodal LLM (Qwen2.5-VL vision tower + Dream-7B).

The defaults are the values of the released Dimple-7B checkpoint, so `DimpleConfig()` describes it.
"""

import math

from transformers import PretrainedConfig
from transformers.activations import ACT2FN


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value, minimum: int = 1) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")


def _check_positive(name: str, value) -> None:
    """A finite number > 0 (a JSON int such as 10000 is fine)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")


def _check_activation(name: str, value) -> None:
    if not isinstance(value, str) or value not in ACT2FN:
        raise ValueError(f"`{name}` must be one of transformers' activations {sorted(ACT2FN)}, got {value!r}")


# Special token ids the model itself uses (the embedding's padding row, the placeholders images and videos are
# written over, decoding's mask): each must be a row of the embedding.
MODEL_TOKEN_ID_FIELDS = ("pad_token_id", "image_token_id", "video_token_id", "mask_token_id")
# Ids only the tokenizer and decoding's stop rule read: token ids (eos may be a list), not checked against
# vocab_size (transformers itself only warns there: released configs hold some out-of-vocabulary ones).
OTHER_TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id")


class DimpleVisionConfig(PretrainedConfig):
    r"""Configuration of Dimple's vision tower, the Qwen2.5-VL vision transformer.

    Args:
        depth (`int`, defaults to 32): number of transformer blocks.
        hidden_size (`int`, defaults to 1280): width of the blocks.
        intermediate_size (`int`, defaults to 3420): width of the gated MLP.
        num_heads (`int`, defaults to 16): attention heads per block.
        in_channels (`int`, defaults to 3): image channels.
        patch_size (`int`, defaults to 14): spatial patch size in pixels.
        temporal_patch_size (`int`, defaults to 2): frames per patch (a still image is repeated).
        spatial_merge_size (`int`, defaults to 2): side of the patch group the merger concatenates.
        window_size (`int`, defaults to 112): side in pixels of the attention windows.
        fullatt_block_indexes (`list[int]`, defaults to `[7, 15, 23, 31]`): blocks that attend over
            the whole image instead of windows.
        out_hidden_size (`int`, defaults to 3584): width of the merger's output (the LLM width).
        tokens_per_second (`int`, defaults to 2): temporal position scale for video.
        hidden_act (`str`, defaults to `"silu"`): MLP activation.
        initializer_range (`float`, defaults to 0.02): std of the normal weight initialisation.
    """

    model_type = "dimple_vision"
    base_config_key = "vision_config"

    def __init__(
        self,
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        in_channels=3,
        patch_size=14,
        temporal_patch_size=2,
        spatial_merge_size=2,
        window_size=112,
        fullatt_block_indexes=(7, 15, 23, 31),
        out_hidden_size=3584,
        tokens_per_second=2,
        hidden_act="silu",
        initializer_range=0.02,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.depth = depth
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_heads = num_heads
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.spatial_merge_size = spatial_merge_size
        self.window_size = window_size
        self.fullatt_block_indexes = (
            list(fullatt_block_indexes) if isinstance(fullatt_block_indexes, (list, tuple)) else fullatt_block_indexes
        )
        self.out_hidden_size = out_hidden_size
        self.tokens_per_second = tokens_per_second
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.check_values()

    def check_values(self) -> None:
        """Raise a `ValueError` naming the first field whose value cannot describe a vision tower (called when
        the config is built, so a tampered config.json fails on loading, not deep inside a forward)."""
        for name in (
            "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
            "temporal_patch_size", "spatial_merge_size", "window_size", "out_hidden_size",
        ):
            _check_int(f"vision_config.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError(
                f"`vision_config.hidden_size` ({self.hidden_size}) must be divisible by `vision_config.num_heads` "
                f"({self.num_heads}) into heads whose size is a multiple of 4 (the 2-D rotary embedding's row and "
                "column halves)"
            )
        unit = self.patch_size * self.spatial_merge_size
        if self.window_size % unit:
            raise ValueError(
                f"`vision_config.window_size` ({self.window_size}) must be a multiple of patch_size × "
                f"spatial_merge_size = {unit} pixels (whole merged tokens per window side)"
            )
        indexes = self.fullatt_block_indexes
        if not isinstance(indexes, list) or not all(_is_int(i) and 0 <= i < self.depth for i in indexes) or len(
            set(indexes)
        ) != len(indexes):
            raise ValueError(
                f"`vision_config.fullatt_block_indexes` must be distinct block indexes in [0, depth = {self.depth}), "
                f"got {indexes}"
            )
        _check_positive("vision_config.tokens_per_second", self.tokens_per_second)
        _check_activation("vision_config.hidden_act", self.hidden_act)
        if isinstance(self.initializer_range, bool) or not isinstance(self.initializer_range, (int, float)) or not (
            self.initializer_range >= 0
        ):
            raise ValueError(f"`vision_config.initializer_range` must be a number >= 0, got {self.initializer_range!r}")


class DimpleConfig(PretrainedConfig):
    r"""Configuration of a Dimple model: the language model fields of Dream-7B, a `vision_config`
    and the special token ids. The defaults reproduce Dimple-7B.

    Args:
        vocab_size (`int`, defaults to 152064): rows of `embed_tokens` and `lm_head`.
        hidden_size (`int`, defaults to 3584), intermediate_size (`int`, defaults to 18944),
        num_hidden_layers (`int`, defaults to 28), num_attention_heads (`int`, defaults to 28),
        num_key_value_heads (`int`, defaults to 4): language model shape (grouped-query attention).
        hidden_act (`str`, defaults to `"silu"`): activation of the MLP and of `img_projector`.
        max_position_embeddings (`int`, defaults to 131072): longest supported sequence.
        rope_theta (`float`, defaults to 1e6): rotary base.
        rms_norm_eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        rope_scaling (`dict`, *optional*): unused by the release (null); kept for compatibility.
        mrope_section (`list[int]`, defaults to `[16, 24, 24]`): how many rotary frequencies use the
            temporal, height and width position components; sums to head_dim / 2.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities (training).
        full_attn_mask (`bool`, defaults to `True`): bidirectional attention (diffusion); `False`
            gives causal attention (autoregressive training stages).
        use_cache (`bool`, defaults to `False`): generation turns prefilling on per call.
        vision_config (`dict` or `DimpleVisionConfig`, *optional*): the vision tower.
        image_token_id, video_token_id, vision_start_token_id, vision_end_token_id,
        vision_token_id, mask_token_id (`int`): special token ids of the Qwen2 vocabulary.
    """

    model_type = "dimple"
    sub_configs = {"vision_config": DimpleVisionConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=131072,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=False,
        tie_word_embeddings=False,
        rope_theta=1000000.0,
        rope_scaling=None,
        mrope_section=(16, 24, 24),
        attention_dropout=0.0,
        full_attn_mask=True,
        vision_config=None,
        pad_token_id=151643,
        bos_token_id=151644,
        eos_token_id=151645,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        vision_token_id=151654,
        mask_token_id=151666,
        **kwargs,
    ):
        if isinstance(vision_config, dict):
            vision_config = DimpleVisionConfig(**vision_config)
        elif vision_config is None:
            vision_config = DimpleVisionConfig()
        elif not isinstance(vision_config, PretrainedConfig):
            raise ValueError(
                "`vision_config` must be a dict of DimpleVisionConfig fields or a DimpleVisionConfig, got "
                f"{type(vision_config).__name__}"
            )
        self.vision_config = vision_config

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        # M-RoPE does not use it. transformers 5 makes `rope_scaling` an alias of `rope_parameters`, which holds
        # rope_theta there (as for Qwen2Config: reading `rope_scaling` gives {"rope_theta": ..., "rope_type":
        # "default"}, not an AttributeError; given here, 5.0 would fill in its default theta); 4.x keeps the
        # plain attribute.
        if isinstance(getattr(PretrainedConfig, "rope_scaling", None), property):
            self.rope_parameters = {"rope_theta": rope_theta, **(rope_scaling or {})}
        else:
            self.rope_scaling = rope_scaling
        self.mrope_section = list(mrope_section) if isinstance(mrope_section, (list, tuple)) else mrope_section
        self.attention_dropout = attention_dropout
        self.full_attn_mask = full_attn_mask
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.vision_token_id = vision_token_id
        self.mask_token_id = mask_token_id

        # Also transformers' image-text-to-text model class, so `pipeline("image-text-to-text", model=folder,
        # trust_remote_code=True)` loads it (save_pretrained adds the AutoConfig / AutoModel entries).
        kwargs["auto_map"] = {"AutoModelForImageTextToText": "modeling_dimple.DimpleModel", **kwargs.get("auto_map", {})}
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.check_values()

    def check_values(self) -> None:
        """Raise a `ValueError` naming the first field whose value cannot describe a Dimple model. Called when
        the config is built (so a tampered config.json fails on loading, not deep inside a forward or with NaN
        logits) and again by the model (for values set after that, e.g. `from_pretrained(..., field=value)`)."""
        if not isinstance(self.full_attn_mask, bool):  # a truthy string such as "false" would mean bidirectional
            raise ValueError(
                f"`full_attn_mask` must be True (bidirectional, diffusion) or False (causal), got {self.full_attn_mask!r}"
            )
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings",
        ):
            _check_int(name, getattr(self, name))
        hidden_size, heads, kv_heads = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if hidden_size % heads or heads % kv_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({heads}), "
                f"and num_attention_heads by num_key_value_heads ({kv_heads})"
            )
        head_dim = hidden_size // heads
        if head_dim % 2:
            raise ValueError(
                f"hidden_size / num_attention_heads = {head_dim} (the head size) must be even for rotary embeddings"
            )
        section = self.mrope_section
        if (
            not isinstance(section, list) or len(section) != 3 or not all(_is_int(n) and n >= 0 for n in section)
            or sum(section) != head_dim // 2
        ):
            raise ValueError(
                f"mrope_section {section} must sum to head_dim / 2 = {head_dim // 2}, as 3 integers >= 0 (the "
                "rotary frequencies of the t, h and w positions)"
            )
        _check_activation("hidden_act", self.hidden_act)
        _check_positive("rms_norm_eps", self.rms_norm_eps)
        _check_positive("rope_theta", self.rope_theta)
        dropout = self.attention_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"`attention_dropout` must be a number in [0, 1), got {dropout!r}")
        init = self.initializer_range
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not init >= 0:
            raise ValueError(f"`initializer_range` must be a number >= 0, got {init!r}")
        for name in MODEL_TOKEN_ID_FIELDS:
            value = getattr(self, name, None)
            if not (value is None or _is_int(value) and 0 <= value < self.vocab_size):
                raise ValueError(
                    f"`{name}` must be a token id in [0, vocab_size = {self.vocab_size}) (or null), got {value!r}: "
                    "`vocab_size` is smaller than the special token ids, or the id is wrong"
                )
        for name in OTHER_TOKEN_ID_FIELDS:
            value = getattr(self, name, None)
            values = value if isinstance(value, (list, tuple)) and name == "eos_token_id" else [value]
            if not all(v is None or _is_int(v) and v >= 0 for v in values):
                raise ValueError(
                    f"`{name}` must be a token id (an integer >= 0"
                    + (", or a list of them" if name == "eos_token_id" else "") + f") or null, got {value!r}"
                )
        check_vision = getattr(self.vision_config, "check_values", None)  # also another module's copy of the class
        if check_vision is None:
            raise ValueError(
                "`vision_config` must be a dict of DimpleVisionConfig fields or a DimpleVisionConfig, got "
                f"{type(self.vision_config).__name__}"
            )
        check_vision()


DimpleConfig.register_for_auto_class("AutoConfig")

__all__ = ["DimpleConfig", "DimpleVisionConfig"]
