"""Configuration of Dimple, a discrete-diffusion multimodal LLM (Qwen2.5-VL vision tower + Dream-7B).

The defaults are the values of the released Dimple-7B checkpoint, so `DimpleConfig()` describes it.
"""

from transformers import PretrainedConfig


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
        self.fullatt_block_indexes = list(fullatt_block_indexes)
        self.out_hidden_size = out_hidden_size
        self.tokens_per_second = tokens_per_second
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range


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
        self.mrope_section = list(mrope_section)
        self.attention_dropout = attention_dropout
        self.full_attn_mask = full_attn_mask
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.vision_start_token_id = vision_start_token_id
        self.vision_end_token_id = vision_end_token_id
        self.vision_token_id = vision_token_id
        self.mask_token_id = mask_token_id

        if not isinstance(full_attn_mask, bool):  # a truthy string such as "false" would mean bidirectional
            raise ValueError(
                f"`full_attn_mask` must be True (bidirectional, diffusion) or False (causal), got {full_attn_mask!r}"
            )
        for name, value in (("num_attention_heads", num_attention_heads), ("num_key_value_heads", num_key_value_heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
        head_dim = hidden_size // num_attention_heads
        if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_attention_heads}), "
                f"and num_attention_heads by num_key_value_heads ({num_key_value_heads})"
            )
        if sum(self.mrope_section) != head_dim // 2:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {head_dim // 2}"
            )
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


DimpleConfig.register_for_auto_class("AutoConfig")

__all__ = ["DimpleConfig", "DimpleVisionConfig"]
