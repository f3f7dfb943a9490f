"""Dimple: a discrete-diffusion multimodal LLM.

A Qwen2.5-VL vision tower (`visual`), a two-layer projector (`img_projector`), the Dream-7B language
model (`model`, a Qwen2.5 derivative with bidirectional attention) and an untied `lm_head`. The module
and parameter names are those of the released Dimple-7B checkpoint.

Attention goes through `torch.nn.functional.scaled_dot_product_attention`; the eager path (matrix products,
softmax in fp32) runs for `output_attentions` or when the model is loaded with `attn_implementation="eager"`,
and any other `attn_implementation` ("flash_attention_2", "flash_attention_3", "flex_attention", a hub kernel)
runs through transformers' `AttentionInterface` (transformers >= 5; see `attention_implementation`)
(the top-level config's choice applies to the language model and the vision tower alike). Rotary tables are
computed per forward from the config (no buffers), so a model built on the meta device and materialised with
`to_empty` needs no extra step.
"""

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_dimple import DimpleConfig, DimpleVisionConfig
from .generation_utils import DimpleGenerationMixin

try:  # transformers' registry of attention kernels (flash-attention, flex attention, hub kernels, user ones)
    from transformers import AttentionInterface
except ImportError:  # transformers 4.46: eager and SDPA only, chosen here
    AttentionInterface = None
ALL_ATTENTION_FUNCTIONS = AttentionInterface() if AttentionInterface is not None else None
ATTENTION_INTERFACE = ALL_ATTENTION_FUNCTIONS  # feature flag: None where transformers has no interface


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------


# F.rms_norm normalises half-precision input in fp32 from torch 2.6 on; torch 2.5 computes it in bf16 / fp16.
RMS_NORM_UPCASTS = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 6)


class DimpleRMSNorm(nn.Module):
    """RMSNorm with the reduction in fp32, as Qwen2 does."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Normalised in fp32 and rounded once to the activation dtype, then scaled (Qwen2's order): F.rms_norm
        # upcasts half-precision input itself, in one fused kernel on CUDA (no separate casts to fp32 and back).
        if RMS_NORM_UPCASTS:
            normed = F.rms_norm(hidden_states, (hidden_states.shape[-1],), eps=self.variance_epsilon)
        else:
            upcast = hidden_states.float()
            variance = upcast.pow(2).mean(-1, keepdim=True)
            normed = (upcast * torch.rsqrt(variance + self.variance_epsilon)).to(hidden_states.dtype)
        return self.weight * normed


class DimpleMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def rotary_inv_freq(dim: int, theta: float, device=None) -> torch.Tensor:
    """The `dim / 2` inverse frequencies of rotary embeddings over `dim` channels."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def is_plain_float_tensor(tensor) -> bool:
    """A `torch.Tensor` or `nn.Parameter` of floating dtype, not a tensor subclass (torchao's quantised weights,
    bitsandbytes' `Int8Params` / `Params4bit`, DTensor, ...)."""
    return type(tensor) in (torch.Tensor, nn.Parameter) and tensor.dtype.is_floating_point


def attention_implementation(config) -> str:
    """The attention kernel the model was loaded with (`attn_implementation`, held in `config._attn_implementation`):
    "sdpa" (the default, also when unset) and "eager" are Dimple's own paths; any other name is looked up in
    transformers' `AttentionInterface` ("flash_attention_2", "flash_attention_3", "flex_attention", a hub kernel,
    a function registered by the user). Where transformers has no such interface (4.x), SDPA."""
    name = getattr(config, "_attn_implementation", None) or "sdpa"
    if name not in ("sdpa", "eager") and ALL_ATTENTION_FUNCTIONS is None:
        return "sdpa"
    return name


def attention_mask_kind(implementation: str) -> str:
    """The mask format an attention kernel takes: "padding" for flash-attention (a (batch, keys) padding mask, 1 =
    real; causality by its flag), "block" for flex attention (a `BlockMask`), "dense" otherwise (a boolean
    (batch, 1, queries, keys) mask, True = may attend, or None for full attention: SDPA's, eager's and the format
    a user-registered function gets)."""
    if "flash" in implementation:
        return "padding"
    if "flex" in implementation:
        return "block"
    return "dense"


def attention_function(implementation: str) -> Callable:
    """transformers' function for `implementation` (an `AttentionInterface` name): called as
    `fn(module, query, key, value, attention_mask, dropout=, scaling=, is_causal=, **kwargs)` with (batch, heads,
    seq, head_dim) tensors, it returns `(output (batch, seq, heads, head_dim), weights or None)`."""
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, None)
    return ALL_ATTENTION_FUNCTIONS[implementation]


def flex_block_mask(mask: torch.Tensor):
    """A flex-attention `BlockMask` of a boolean (batch or 1, 1, queries, keys) mask (True = may attend); blocks
    with nothing to attend are skipped by the kernel."""
    from torch.nn.attention.flex_attention import create_block_mask

    dense = mask[:, 0]
    if dense.shape[0] == 1:  # one mask for every row: the kernel's batch index must not reach it
        single = dense[0]

        def mask_mod(batch, head, query, key):
            return single[query, key]

        return create_block_mask(mask_mod, None, None, dense.shape[1], dense.shape[2], device=dense.device)

    def mask_mod(batch, head, query, key):
        return dense[batch, query, key]

    return create_block_mask(mask_mod, dense.shape[0], None, dense.shape[1], dense.shape[2], device=dense.device)


def key_padding_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """The (batch, keys) padding mask (1 = real) of a boolean (batch or 1, 1, queries, keys) mask made by
    `build_attention_mask` from left-padded rows: its last query is a real token, whose row is the padding of the
    keys (and, for a causal mask of the whole sequence, of every key up to it: all of them)."""
    return mask[:, 0, -1, :].expand(batch, -1).long()


def eager_attention(query, key, value, attn_mask: Optional[torch.Tensor], dropout: float = 0.0, training=False):
    """Reference attention that also returns the probabilities (softmax in fp32). `attn_mask` is boolean
    (True = may attend) and broadcastable to (batch, heads, q, k); keys may have fewer heads (GQA)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=training)
    return torch.matmul(probs, value), probs


# --------------------------------------------------------------------------------------------------
# Vision tower (Qwen2.5-VL)
# --------------------------------------------------------------------------------------------------


class DimpleVisionPatchEmbed(nn.Module):
    """Conv3d patch embedding with kernel = stride, i.e. one linear map per flattened patch row."""

    def __init__(self, config: DimpleVisionConfig):
        super().__init__()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.embed_dim = config.hidden_size
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # A stride = kernel convolution over one patch is a matrix product; skip the conv machinery.
        weight = self.proj.weight.view(self.embed_dim, -1)
        return F.linear(pixel_values.to(weight.dtype), weight)


class SegmentLayout:
    """Packed sequences split into independent attention segments (images, or windows of an image).

    Attention over all segments is one call: for SDPA (and eager, and the kernels of transformers'
    `AttentionInterface` other than flash-attention), segments of equal length are a reshape; otherwise they are
    padded to the longest and padded keys are masked (flex attention gets that mask as a `BlockMask`).
    flash-attention runs the packed rows as variable-length sequences (their cumulative lengths), as Qwen2.5-VL
    does. Built once per forward, reused by every block; a tower split over devices gets the index tensors
    copied to each block's device once.
    """

    def __init__(self, seqlens: list, device, eager: bool = False, implementation: Optional[str] = None):
        self.implementation = "eager" if eager else (implementation or "sdpa")
        self.eager = self.implementation == "eager"  # attend with `eager_attention` instead of SDPA
        self.kind = "dense" if self.implementation in ("sdpa", "eager") else attention_mask_kind(self.implementation)
        self.total = sum(seqlens)
        self.num_segments = len(seqlens)
        self.max_len = max(seqlens)
        self.uniform = all(n == self.max_len for n in seqlens)
        self.device = torch.device(device)
        self.indices = {}  # device -> index tensors
        if self.kind == "padding":
            lengths = torch.tensor(seqlens, device=device)
            self.indices[self.device] = {"cu_seqlens": F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)}
            return
        if self.uniform:
            return
        lengths = torch.tensor(seqlens, device=device)
        starts = torch.cumsum(lengths, 0) - lengths
        slot = torch.arange(self.max_len, device=device)
        key_valid = slot[None, :] < lengths[:, None]  # (segments, max_len)
        gather = (starts[:, None] + slot[None, :]).clamp(max=self.total - 1)
        self.indices[self.device] = {
            "key_valid": key_valid,
            "gather_index": gather.flatten(),  # padded slot -> packed row (pads read any valid row)
            "scatter_index": key_valid.flatten().nonzero().squeeze(-1),  # packed row -> padded slot
        }

    def on(self, device) -> dict:
        """The index tensors on `device` (copied there at the first block that runs on it)."""
        if device not in self.indices:
            self.indices[device] = {name: t.to(device) for name, t in self.indices[self.device].items()}
        return self.indices[device]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, module=None) -> torch.Tensor:
        """q, k, v: (total, heads, head_dim) -> (total, heads, head_dim). `module` (the attention layer) is what
        transformers' attention functions are given."""
        heads, head_dim = q.shape[1:]
        if self.kind == "padding":  # flash-attention over the packed rows, segment by segment
            cu_seqlens = self.on(q.device)["cu_seqlens"]
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, heads, total, head_dim)
            out, _ = attention_function(self.implementation)(
                module, q, k, v, None, dropout=0.0, scaling=head_dim**-0.5, is_causal=False,
                cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=self.max_len,
                max_length_k=self.max_len,
            )
            return out[0]
        if self.uniform:
            q, k, v = (t.view(self.num_segments, self.max_len, heads, head_dim).transpose(1, 2) for t in (q, k, v))
            out = self.attend(q, k, v, None, module)
            return out.transpose(1, 2).reshape(self.total, heads, head_dim)
        index = self.on(q.device)
        q, k, v = (
            t[index["gather_index"]].view(self.num_segments, self.max_len, heads, head_dim).transpose(1, 2)
            for t in (q, k, v)
        )
        out = self.attend(q, k, v, index["key_valid"][:, None, None, :], module)
        out = out.transpose(1, 2).reshape(self.num_segments * self.max_len, heads, head_dim)
        return out[index["scatter_index"]]

    def attend(self, q, k, v, attn_mask: Optional[torch.Tensor], module=None) -> torch.Tensor:
        """(segments, heads, max_len, head_dim) each -> the same shape; `attn_mask` masks padded keys."""
        if self.eager:
            return eager_attention(q, k, v, attn_mask)[0]
        if self.implementation == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        if attn_mask is not None and self.kind == "block":
            index = self.on(q.device)
            if "block_mask" not in index:  # one BlockMask per layout, shared by its blocks
                index["block_mask"] = flex_block_mask(attn_mask.expand(-1, -1, self.max_len, -1))
            attn_mask = index["block_mask"]
        out, _ = attention_function(self.implementation)(
            module, q, k, v, attn_mask, dropout=0.0, scaling=q.shape[-1] ** -0.5, is_causal=False
        )
        return out.transpose(1, 2)


class DimpleVisionAttention(nn.Module):
    def __init__(self, config: DimpleVisionConfig):
        super().__init__()
        self.config = config  # read by transformers' attention functions (flash-attention's version)
        self.is_causal = False
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, config.hidden_size * 3, bias=True)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states, layout: SegmentLayout, rotary: tuple) -> torch.Tensor:
        seq_len = hidden_states.shape[0]
        qkv = self.qkv(hidden_states).view(seq_len, 3, self.num_heads, -1)
        cos, signed_sin = rotary  # (seq, 1, 1, head_dim) in fp32
        # Rotary in fp32, as in Qwen2.5-VL, for q and k at once: the fp32 copy is contiguous, so roll copies
        # nothing, and x·cos + roll(x)·signed_sin == x·cos + rotate_half(x)·sin (5 kernels instead of 16).
        qk = qkv[:, :2].float()
        qk = torch.addcmul(qk * cos, qk.roll(qk.shape[-1] // 2, dims=-1), signed_sin).to(qkv.dtype)
        out = layout.attention(qk[:, 0], qk[:, 1], qkv[:, 2], self)
        return self.proj(out.reshape(seq_len, -1))


class DimpleVisionBlock(nn.Module):
    def __init__(self, config: DimpleVisionConfig):
        super().__init__()
        self.norm1 = DimpleRMSNorm(config.hidden_size, eps=1e-6)
        self.norm2 = DimpleRMSNorm(config.hidden_size, eps=1e-6)
        self.attn = DimpleVisionAttention(config)
        self.mlp = DimpleMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=True)

    def forward(self, hidden_states, layout: SegmentLayout, rotary: tuple) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), layout, rotary)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class DimplePatchMerger(nn.Module):
    """RMSNorm, then each group of spatial_merge_size² neighbouring patches concatenated -> MLP."""

    def __init__(self, config: DimpleVisionConfig):
        super().__init__()
        self.merged_dim = config.hidden_size * config.spatial_merge_size**2
        self.ln_q = DimpleRMSNorm(config.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.merged_dim, self.merged_dim),
            nn.GELU(),
            nn.Linear(self.merged_dim, config.out_hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merged_dim))


class DimpleVisionTransformer(nn.Module):
    """The Qwen2.5-VL vision transformer: window attention in most blocks, full attention in
    `fullatt_block_indexes`. Input: patch rows of `pixel_values` (as the image processor orders them,
    merge groups contiguous) and `grid_thw`; output: one feature per merged group, in input order. `eager`
    attends with `eager_attention` instead of SDPA (same math); `attn_implementation` names any other kernel
    (see `attention_implementation`; DimpleModel passes its own)."""

    def __init__(self, config: DimpleVisionConfig):
        super().__init__()
        self.config = config
        self.merge = config.spatial_merge_size
        self.patch_embed = DimpleVisionPatchEmbed(config)
        self.blocks = nn.ModuleList([DimpleVisionBlock(config) for _ in range(config.depth)])
        self.merger = DimplePatchMerger(config)
        self.gradient_checkpointing = False

    def rotary(self, grid_thw: list, device) -> tuple:
        """cos and signed sin (sin with its first half negated; see `DimpleVisionAttention`), each (patches,
        head_dim), of the 2-D rotary embedding, patch rows in merge-group order."""
        merge = self.merge
        positions = []
        for t, h, w in grid_thw:
            rows = torch.arange(h, device=device)[:, None].expand(h, w)
            cols = torch.arange(w, device=device)[None, :].expand(h, w)
            hw = torch.stack([rows, cols], dim=-1).view(h // merge, merge, w // merge, merge, 2)
            positions.append(hw.transpose(1, 2).reshape(-1, 2).repeat(t, 1))
        positions = torch.cat(positions)  # (patches, 2)
        head_dim = self.config.hidden_size // self.config.num_heads
        inv_freq = rotary_inv_freq(head_dim // 2, 10000.0, device=device)
        freqs = (positions[..., None].float() * inv_freq).flatten(1)  # (patches, head_dim / 2): rows | cols
        sin = freqs.sin()
        return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-sin, sin], dim=-1)

    def window_index(self, grid_thw: list, device) -> tuple:
        """Permutation of merge groups into window order, and the window lengths (in patches)."""
        merge = self.merge
        window = self.config.window_size // merge // self.config.patch_size  # merged tokens per window side
        index, seqlens, offset = [], [], 0
        for t, h, w in grid_thw:
            gh, gw = h // merge, w // merge
            ids = torch.arange(t * gh * gw, device=device).view(t, gh, gw)
            pad_h, pad_w = -gh % window, -gw % window
            ids = F.pad(ids, (0, pad_w, 0, pad_h), value=-1)
            nh, nw = (gh + pad_h) // window, (gw + pad_w) // window
            ids = ids.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4).reshape(-1, window * window)
            counts = (ids >= 0).sum(-1)
            index.append(ids[ids >= 0] + offset)
            seqlens.extend(n * merge * merge for n in counts.tolist() if n > 0)
            offset += t * gh * gw
        return torch.cat(index), seqlens

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, eager: bool = False,
        attn_implementation: Optional[str] = None,
    ) -> torch.Tensor:
        grid = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        device = pixel_values.device
        unit = self.merge**2
        hidden_states = self.patch_embed(pixel_values)
        seq_len = hidden_states.shape[0]

        window_index, window_seqlens = self.window_index(grid, device)
        cos, signed_sin = self.rotary(grid, device)

        def to_window_order(x):
            return x.view(seq_len // unit, unit, -1)[window_index].view(seq_len, -1)

        hidden_states = to_window_order(hidden_states)
        rotary = tuple(to_window_order(table)[:, None, None, :] for table in (cos, signed_sin))  # (seq, 1, 1, dim)
        window_layout = SegmentLayout(window_seqlens, device, eager, attn_implementation)
        # Full-attention blocks attend within each frame of each image.
        full_layout = SegmentLayout([h * w for t, h, w in grid for _ in range(t)], device, eager, attn_implementation)
        full_blocks = set(self.config.fullatt_block_indexes)
        # A frozen tower records no graph to checkpoint (4.x's reentrant checkpoint would warn that gradients
        # will be None, as if something were lost).
        checkpoint = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and (
            hidden_states.requires_grad or any(param.requires_grad for param in self.blocks.parameters())
        )
        for index, block in enumerate(self.blocks):
            layout = full_layout if index in full_blocks else window_layout
            if checkpoint:
                hidden_states = self._gradient_checkpointing_func(block.__call__, hidden_states, layout, rotary)
            else:
                hidden_states = block(hidden_states, layout, rotary)
        merged = self.merger(hidden_states)
        return merged[torch.argsort(window_index)]


class DimpleImageProjector(nn.Module):
    def __init__(self, config: DimpleConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.out_hidden_size, config.hidden_size, bias=True)
        self.act = ACT2FN[config.hidden_act]
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


# --------------------------------------------------------------------------------------------------
# Language model (Dream / Qwen2 with multimodal rotary positions)
# --------------------------------------------------------------------------------------------------


class DimplePrefixCache:
    """Keys and values kept across the steps of one diffusion decode (prefilling, block-wise dual cache,
    open-ended decoding).

    One `(batch, capacity, 2 * kv_heads, head_dim)` tensor per layer (the keys then the values of each position),
    allocated at the first write. A forward writes the keys and values of the positions it runs, given
    explicitly as `cache_position` (a 1-D tensor of positions in the sequence, as transformers and gpt-fast
    pass query positions), then attends over the first `length` cached positions: no step allocates, and a
    device tensor of positions lets one captured CUDA graph serve every window. `length` may grow up to
    `capacity` (`set_length`): open-ended decoding appends its canvas block by block and attends over what
    exists so far. The cache holds no other state: which positions a pass runs is the caller's decision.
    """

    def __init__(self, length: int, capacity: Optional[int] = None):
        self.capacity = max(length, capacity or length)
        self.length = length
        # A flag rather than `length < capacity` in `update`: torch.compile then guards on a bool that stays
        # False for a fixed-length decode, not on the lengths, which change with every prompt.
        self.partial = length < self.capacity
        self.key_values: list = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def set_length(self, length: int) -> None:
        """Attend over the first `length` positions from now on (at most `capacity`)."""
        if not 1 <= length <= self.capacity:
            raise ValueError(f"`length` must be from 1 to the cache's capacity {self.capacity}, got {length}")
        self.length = length
        self.partial = length < self.capacity

    def extended(self, length: int, capacity: Optional[int] = None) -> "DimplePrefixCache":
        """A new cache of `length` positions (room for `capacity`) whose first positions hold this one's keys and
        values (a copy: this cache is left as it is, e.g. for another continuation of the same conversation)."""
        if length < self.length:
            raise ValueError(f"`length` must be at least this cache's length {self.length}, got {length}")
        cache = DimplePrefixCache(length, capacity)
        for cached in self.key_values:
            storage = cached.new_zeros(cached.shape[0], cache.capacity, *cached.shape[2:])
            storage[:, : self.length] = cached[:, : self.length]
            cache.key_values.append(storage)
        return cache

    def update(self, layer_idx: int, key_value: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Write the `(batch, q_len, 2 * kv_heads, head_dim)` keys and values of `positions` (a `(q_len,)`
        tensor) into layer `layer_idx`'s cache and return the layer's cached sequence (its first `length`)."""
        if len(self.key_values) <= layer_idx:
            batch, _, heads, head_dim = key_value.shape
            self.key_values.append(key_value.new_zeros(batch, self.capacity, heads, head_dim))
        cached = self.key_values[layer_idx].index_copy_(1, positions, key_value)
        return cached[:, : self.length] if self.partial else cached


class DimpleAttention(nn.Module):
    def __init__(self, config: DimpleConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # Set only inside `DimpleModel.stacked_qkv_projections` (decoding): q/k/v weights stacked for one product.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)
        # What transformers' attention functions read from the module they are given.
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5

    @property
    def is_causal(self) -> bool:
        return not self.config.full_attn_mask

    @property
    def qkv_projections(self) -> tuple:
        return self.q_proj, self.k_proj, self.v_proj

    def can_stack_qkv(self) -> bool:
        """Whether one product over stacked weights computes what q_proj, k_proj and v_proj do: plain
        `nn.Linear` layers (not PEFT adapters or quantised layers) without hooks, with real weights that are
        plain floating-point tensors. torchao's weight-only quantisation keeps `nn.Linear` and swaps the weight
        for a tensor subclass (`Int8Tensor`, ...), which `torch.cat` cannot stack: such layers stay separate."""
        weight = self.q_proj.weight
        return weight.device.type != "meta" and all(
            type(proj) is nn.Linear and proj.bias is not None and not proj._forward_hooks
            and not proj._forward_pre_hooks and "forward" not in proj.__dict__  # accelerate's hooks
            and all(is_plain_float_tensor(tensor) for tensor in (proj.weight, proj.bias))
            and proj.weight.device == weight.device and proj.weight.dtype == proj.bias.dtype == weight.dtype
            for proj in self.qkv_projections
        )

    @torch.no_grad()
    def stack_qkv(self) -> None:
        """Build the stacked copy `project_qkv` uses (where `can_stack_qkv()`); `unstack_qkv` frees it."""
        if self.can_stack_qkv():
            self.qkv_weight = torch.cat([proj.weight for proj in self.qkv_projections])
            self.qkv_bias = torch.cat([proj.bias for proj in self.qkv_projections])

    def unstack_qkv(self) -> None:
        self.qkv_weight = self.qkv_bias = None

    def project_qkv(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Queries, keys and values stacked along heads: (batch, q_len, heads + 2 * kv_heads, head_dim)."""
        batch, q_len, _ = hidden_states.shape
        if self.qkv_weight is not None and not torch.is_grad_enabled():
            qkv = F.linear(hidden_states, self.qkv_weight, self.qkv_bias)
        else:
            qkv = torch.cat([proj(hidden_states) for proj in self.qkv_projections], dim=-1)
        return qkv.view(batch, q_len, -1, self.head_dim)

    def forward(self, hidden_states, rotary, attn_mask, is_causal, cache=None, cache_position=None,
                output_attentions=False):
        batch, q_len, _ = hidden_states.shape
        heads, kv_heads, head_dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.project_qkv(hidden_states)
        # x·cos + rotate_half(x)·sin over the whole contiguous q/k/v tensor, in groups of kv_heads heads:
        # (batch, q_len, heads / kv_heads + 2, 1, head_dim) tables, already in the activation dtype, rotate the
        # query and key groups and leave the value group as it is (cos 1, sin 0: exact). 3 kernels, no copy (a
        # slice would be copied by roll), and the keys and values come out side by side: one cache write.
        cos, signed_sin = rotary
        grouped = qkv.view(batch, q_len, -1, kv_heads, head_dim)
        rotated = torch.addcmul(grouped * cos, grouped.roll(head_dim // 2, dims=-1), signed_sin)
        rotated = rotated.view(batch, q_len, -1, head_dim)
        q = rotated[:, :, :heads].transpose(1, 2)  # (batch, heads, q_len, head_dim)
        key_value = rotated[:, :, heads:]  # (batch, q_len, 2 * kv_heads, head_dim)
        if cache is not None:
            key_value = cache.update(self.layer_idx, key_value, cache_position)
        k, v = key_value.transpose(1, 2).split(kv_heads, dim=1)  # (batch, kv_heads, keys, head_dim) each
        dropout = self.attention_dropout if self.training else 0.0
        implementation = attention_implementation(self.config)
        if output_attentions or implementation == "eager":
            if is_causal:  # SDPA's `is_causal` flag has no eager counterpart: the mask is built whole
                attn_mask = build_attention_mask(None, q_len, k.shape[-2], True, q.device, explicit=True)
            out, probs = eager_attention(q, k, v, attn_mask, dropout, self.training)
            out = out.transpose(1, 2)
        elif implementation == "sdpa":
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=is_causal, enable_gqa=True
            ).transpose(1, 2)
            probs = None
        else:  # transformers' AttentionInterface; `attn_mask` is in the kernel's format (see `attention_mask_kind`)
            if attention_mask_kind(implementation) == "padding":
                is_causal = self.is_causal  # flash-attention takes the padding only: causality is its flag
            out, _ = attention_function(implementation)(
                self, q, k, v, attn_mask, dropout=dropout, scaling=self.scaling, is_causal=is_causal
            )
            probs = None
        out = out.reshape(batch, q_len, -1)  # (batch, q_len, heads, head_dim) -> (batch, q_len, hidden)
        return self.o_proj(out), probs


def build_attention_mask(
    padding_mask: Optional[torch.Tensor], q_len: int, k_len: int, is_causal: bool, device=None,
    query_positions: Optional[torch.Tensor] = None, explicit: bool = False,
) -> Optional[torch.Tensor]:
    """Boolean (batch, 1, q_len, k_len) mask, True = may attend; the queries are the last q_len of the
    k_len positions, or `query_positions` (a window of a cached sequence). Padding (0 in the (batch, k_len)
    `padding_mask`) is excluded as key and every query may attend to itself, so a padded query row is never
    empty; causal masking is folded in. Returns None when SDPA needs no mask (no padding, and not causal or
    square causal, which SDPA's `is_causal` covers), unless `explicit` (eager attention) asks for one."""
    if padding_mask is None and not explicit and (not is_causal or q_len == k_len):
        return None
    device = padding_mask.device if padding_mask is not None else device
    if query_positions is None:
        query_positions = torch.arange(k_len - q_len, k_len, device=device)
    q_pos = query_positions.to(device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    if padding_mask is None:
        mask = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
    else:
        mask = padding_mask.bool()[:, None, None, :] | (q_pos == k_pos)
    if is_causal:
        mask = mask & (k_pos <= q_pos)
    return mask


class DimpleDecoderLayer(nn.Module):
    def __init__(self, config: DimpleConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DimpleAttention(config, layer_idx)
        self.mlp = DimpleMLP(config.hidden_size, config.intermediate_size, config.hidden_act, bias=False)
        self.input_layernorm = DimpleRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DimpleRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, rotary, attn_mask, is_causal, cache=None, cache_position=None,
                output_attentions=False):
        attn_out, probs = self.self_attn(
            self.input_layernorm(hidden_states), rotary, attn_mask, is_causal, cache, cache_position, output_attentions
        )
        hidden_states = hidden_states + attn_out
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, probs


class DimpleTextModel(nn.Module):
    """Dream's transformer: embeddings, decoder layers and the final norm (the checkpoint's `model.*`)."""

    def __init__(self, config: DimpleConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([DimpleDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = DimpleRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False

    def rotary(self, position_ids: torch.Tensor, dtype) -> tuple:
        """M-RoPE (cos, signed sin) from positions (3, batch, seq): the first `mrope_section[0]` frequencies
        rotate with t, the next with h, the last with w. Each table is (batch, seq, heads / kv_heads + 2, 1,
        head_dim), one row per group of kv_heads heads of the stacked q/k/v (see `DimpleAttention`): the
        query and key groups are rotated, the value group's angles are 0 (cos 1, sin 0)."""
        config = self.config
        head_dim = config.hidden_size // config.num_attention_heads
        inv_freq = rotary_inv_freq(head_dim, config.rope_theta, device=position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (3, batch, seq, head_dim / 2), fp32
        # Section i of the frequencies takes position component i (split/cat: no host-device copy).
        sections = freqs.split(list(config.mrope_section), dim=-1)
        freqs = torch.cat([section[i] for i, section in enumerate(sections)], dim=-1)
        batch, seq, half_dim = freqs.shape
        rotated_groups = config.num_attention_heads // config.num_key_value_heads + 1  # the queries', the keys'
        value_group = freqs.new_zeros(()).expand(batch, seq, 1, half_dim)
        freqs = torch.cat([freqs[:, :, None].expand(-1, -1, rotated_groups, -1), value_group], dim=2)[:, :, :, None]
        half = freqs.sin()
        # sin with its first half negated: rotate_half(x) * sin == x.roll(head_dim / 2) * signed_sin, which
        # lets every layer rotate q and k in 3 kernels (mul, roll, addcmul), see `DimpleAttention`.
        signed_sin = torch.cat([-half, half], dim=-1)
        cos = torch.cat([freqs, freqs], dim=-1).cos()
        return cos.to(dtype), signed_sin.to(dtype)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
        is_causal: bool,
        cache: Optional[DimplePrefixCache] = None,
        cache_position: Optional[torch.Tensor] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        layer_forward: Optional[Callable] = None,
    ):
        hidden_states = inputs_embeds
        rotary = self.rotary(position_ids, hidden_states.dtype)
        # `layer_forward(layer, *arguments)` runs a layer instead of `layer(*arguments)` (decoding passes the one
        # torch.compile of the layer's forward that every layer shares: regional compilation).
        run_layer = layer_forward or nn.Module.__call__
        all_hidden, all_attn = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            if self.gradient_checkpointing and self.training:
                hidden_states, probs = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, rotary, attn_mask, is_causal, None, None, False
                )
            else:
                hidden_states, probs = run_layer(
                    layer, hidden_states, rotary, attn_mask, is_causal, cache, cache_position, output_attentions
                )
            if output_attentions:
                all_attn.append(probs)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return hidden_states, tuple(all_hidden) or None, tuple(all_attn) or None


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------

PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
SAFETENSORS_ONLY = (
    "Dimple loads safetensors weights only (a pickle-based checkpoint can run code when it is loaded). If you trust "
    "the file, convert it once, e.g. in the model folder:\n"
    "    python -c \"import torch; from safetensors.torch import save_file; "
    "sd = torch.load('pytorch_model.bin', map_location='cpu', weights_only=True); "
    "save_file({k: v.contiguous() for k, v in sd.items()}, 'model.safetensors', metadata={'format': 'pt'})\"\n"
    "(a sharded checkpoint: convert every shard, or load it once and `save_pretrained` it, which writes safetensors)"
)


def check_safetensors_checkpoint(path, subfolder: str = "") -> None:
    """A local checkpoint (folder or file) must hold safetensors weights: a `ValueError` saying how to convert
    a pickle-based one, raised before transformers would unpickle it. Hub names are left to `from_pretrained`
    (asked for safetensors only)."""
    import os

    path = os.fspath(path)
    if os.path.isfile(path):
        if not path.endswith((".safetensors", ".safetensors.index.json")):
            raise ValueError(
                f"`pretrained_model_name_or_path` is the weights file {path!r}, which is not a .safetensors file. "
                + SAFETENSORS_ONLY
            )
        return
    folder = os.path.join(path, subfolder)
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    if any(name.endswith(".safetensors") or ".safetensors.index" in name for name in names):
        return
    pickled = sorted(name for name in names if name.endswith(PICKLE_WEIGHT_SUFFIXES) or name.endswith(".bin.index.json"))
    if pickled:
        raise ValueError(
            f"`pretrained_model_name_or_path` {path!r} holds no .safetensors weights, only pickle-based ones "
            f"({', '.join(pickled)}). " + SAFETENSORS_ONLY
        )


def with_quantization_skips(quantization_config, skip_modules):
    """`quantization_config` (a transformers quantization config or its dict) with `skip_modules` as the modules
    left unquantised, where it names none: bitsandbytes' `llm_int8_skip_modules`, else `modules_to_not_convert`
    (torchao, quanto, fbgemm, ...). The caller's object is not changed (a copy is returned when one is set)."""
    import copy

    skip = list(skip_modules)
    if isinstance(quantization_config, dict):
        method = str(quantization_config.get("quant_method", ""))
        key = "llm_int8_skip_modules" if method == "bitsandbytes" else "modules_to_not_convert"
        if quantization_config.get(key) is None:
            return {**quantization_config, key: skip}
        return quantization_config
    for key in ("llm_int8_skip_modules", "modules_to_not_convert"):
        if hasattr(quantization_config, key):
            if getattr(quantization_config, key) is None:
                quantization_config = copy.deepcopy(quantization_config)
                setattr(quantization_config, key, skip)
            break
    return quantization_config


# Guards the count of decodes using a model's stacked q/k/v copies (see `DimpleModel.stacked_qkv_projections`);
# module-level, so that a model stays deep-copyable (a lock object is not).
_QKV_STACKING_LOCK = threading.Lock()


class DimplePreTrainedModel(PreTrainedModel):
    config_class = DimpleConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    # accelerate's device_map keeps each of these whole on one device (their residual adds and the cache write
    # stay on the layer's device); the inputs of a module are moved to its device by accelerate's hooks.
    _no_split_modules = ["DimpleDecoderLayer", "DimpleVisionBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    # Attention kernels reached through transformers' `AttentionInterface` (transformers >= 5; 4.x has no such
    # interface, and refuses these names at load with its own message).
    _supports_flash_attn = _supports_flash_attn_2 = _supports_flex_attn = ATTENTION_INTERFACE is not None
    # Left unquantised when a `quantization_config` names no modules to skip (bitsandbytes' `llm_int8_skip_modules`,
    # torchao's and most others' `modules_to_not_convert`): the vision tower and projector (8 % of the weights,
    # and the image features every answer depends on) and the head (the scores the decoding ranks tokens by).
    quantization_skip_modules = ("visual", "img_projector", "lm_head")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, reading safetensors weights only: a pickle-based checkpoint
        (`pytorch_model.bin`, ...) can run code when it is loaded, so it is refused with a note on how to convert
        it, never unpickled. Without `state_dict`, the weights must be a `.safetensors` file (or an index of them).
        A `quantization_config` that names no modules to skip skips `quantization_skip_modules`."""
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = with_quantization_skips(
                kwargs["quantization_config"], cls.quantization_skip_modules
            )
        if kwargs.get("use_safetensors") is False:
            raise ValueError(
                "`use_safetensors` must be True or None: Dimple loads safetensors weights only (pickle-based "
                "checkpoints can run code when loaded)"
            )
        if kwargs.get("state_dict") is None and pretrained_model_name_or_path is not None:
            kwargs["use_safetensors"] = True
            check_safetensors_checkpoint(pretrained_model_name_or_path, kwargs.get("subfolder") or "")
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except OSError as error:  # a Hub repository (or cache) without safetensors weights
            if "safetensors" not in str(error):
                raise
            raise OSError(f"{error}\n{SAFETENSORS_ONLY}") from error

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv3d)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DimpleRMSNorm):
            nn.init.ones_(module.weight)


@dataclass
class _ImageInputs:
    """Validated visual inputs of one forward."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    token_id: int
    name: str


def check_grid_thw(grid_thw, grid_name: str, merge: int) -> None:
    """`image_grid_thw` / `video_grid_thw` must be an integer tensor (items, 3) of (t, h, w) >= 1, h and w
    multiples of `merge`; an image is one frame (t = 1: the processor repeats a still image over the temporal
    patch), more frames are a video's. A `ValueError` naming the argument, not a TypeError or wrong positions."""
    if not torch.is_tensor(grid_thw):
        raise ValueError(
            f"`{grid_name}` must be a tensor of shape (items, 3) holding integer (t, h, w), got "
            f"{type(grid_thw).__name__} (e.g. torch.tensor([[1, 16, 16]]))"
        )
    if grid_thw.dtype.is_floating_point or grid_thw.dtype.is_complex or grid_thw.dtype == torch.bool:
        raise ValueError(f"`{grid_name}` must hold integers (torch.long) (t, h, w), got {grid_thw.dtype}")
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3:
        raise ValueError(f"`{grid_name}` must have shape (items, 3) of (t, h, w), got {tuple(grid_thw.shape)}")
    if bool((grid_thw < 1).any()):
        raise ValueError(f"`{grid_name}` values (t, h, w) must be >= 1, got {grid_thw.tolist()}")
    if bool((grid_thw[:, 1:] % merge).any()):
        raise ValueError(f"`{grid_name}` heights and widths must be multiples of {merge}, got {grid_thw.tolist()}")
    if grid_name == "image_grid_thw" and bool((grid_thw[:, 0] != 1).any()):
        raise ValueError(
            f"`image_grid_thw` must have t = 1 for every image (one frame; frames are a video's, in "
            f"`video_grid_thw`), got {grid_thw.tolist()}"
        )


def check_placeholders_attended(input_ids, attention_mask, token_ids: dict) -> None:
    """An image's placeholder tokens must all be attended: a padding mask over some of them would drop part of
    the image from attention (and from the positions), silently changing the answer."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape != input_ids.shape:
        return
    for token_id, name in token_ids.items():
        hidden = (input_ids == token_id) & ~attention_mask.bool()
        if bool(hidden.any()):
            rows = hidden.any(-1).nonzero().flatten().tolist()
            raise ValueError(
                f"`attention_mask` is 0 at {int(hidden.sum())} {name} placeholder tokens (id {token_id}) of "
                f"`input_ids` rows {rows}: every placeholder must be attended (1); padding goes on pad tokens"
            )


def check_placeholder_runs(input_ids, token_id: int, grid_thw, merge: int, grid_name: str) -> None:
    """Each run of placeholder tokens (rows in order, left to right) must hold whole items of `grid_thw`, in
    order: equal totals are not enough, since features are written over the placeholders in that order and
    the positions of a row are built from its own items (a swap between rows would mix up two images)."""
    is_token = F.pad((input_ids == token_id).int(), (1, 1))
    edges = is_token.diff(dim=-1)
    starts, ends = (edges == 1).nonzero().tolist(), (edges == -1).nonzero().tolist()  # row-major order
    features = iter(enumerate((grid_thw.prod(-1) // merge**2).tolist()))
    for (row, start), (_, end) in zip(starts, ends):
        covered, items = 0, []
        while covered < end - start:  # adjacent items without a separator form one run
            item, count = next(features)  # the totals match, so items remain while tokens do
            covered, items = covered + count, items + [item]
        if covered != end - start:
            raise ValueError(
                f"`input_ids` row {row} has a run of {end - start} placeholder tokens (id {token_id}) at position "
                f"{start}, but the `{grid_name}` rows it takes in order ({items}) give {covered} features: "
                "every image's placeholders must match its own grid, in order"
            )


class DimpleModel(DimpleGenerationMixin, DimplePreTrainedModel):
    """Dimple: vision tower + projector + bidirectional language model + head.

    `forward` returns logits for every position (or the ones selected by `logits_to_keep`); position j's
    logits predict token j + 1, the autoregressive shift the language model was initialised with.
    Decoding is `diffusion_generate` (also reachable as `generate`).
    """

    def __init__(self, config: DimpleConfig):
        # Again here: values set on a built config (`from_pretrained(folder, num_hidden_layers=-1)` does) skip
        # the check of DimpleConfig.__init__.
        config.check_values()
        super().__init__(config)
        self.visual = DimpleVisionTransformer(config.vision_config)
        self.img_projector = DimpleImageProjector(config)
        self.model = DimpleTextModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._qkv_stacking_users = 0  # open `stacked_qkv_projections` contexts
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def new_prefix_cache(self, length: int, capacity: Optional[int] = None) -> DimplePrefixCache:
        """An empty key/value cache for sequences of `length` positions, room for `capacity` (see
        `DimplePrefixCache`)."""
        return DimplePrefixCache(length, capacity)

    def is_split_across_devices(self) -> bool:
        """Whether the weights are spread over more than one device: an accelerate `device_map` over several GPUs,
        or with CPU / disk offload (offloaded weights are moved to the GPU by hooks as their layer runs). The prefix
        cache then holds each layer's keys and values on that layer's device, and a pass runs on several devices
        (or copies weights in): a CUDA graph, which records one device's kernels on fixed memory, cannot capture
        it, so decoding should run without CUDA graphs for such a model."""
        device_map = getattr(self, "hf_device_map", None)
        if device_map:
            return len({str(device) for device in device_map.values()}) > 1
        return len({tensor.device for tensor in (*self.parameters(), *self.buffers())}) > 1

    @contextlib.contextmanager
    def stacked_qkv_projections(self):
        """Inside this context (decoding uses it), each attention layer computes its queries, keys and values
        with one matrix product over a stacked copy of the three weights, instead of three products: fewer
        kernels per pass. The copies take one more q/k/v's worth of memory (0.9 GB on the 7B shape, 5.6 % of
        the weights) and are freed when the last context using them exits (contexts nest, and concurrent
        decodes in several threads share one copy); parameters and `state_dict()` are untouched. Only no-grad
        forwards use them (training keeps the separate layers), and only layers where `can_stack_qkv()` holds."""
        attention = [layer.self_attn for layer in self.model.layers]
        with _QKV_STACKING_LOCK:
            if self._qkv_stacking_users == 0:
                try:
                    for attn in attention:
                        attn.stack_qkv()
                except BaseException:  # e.g. out of memory half-way: free what was stacked
                    for attn in attention:
                        attn.unstack_qkv()
                    raise
            self._qkv_stacking_users += 1
        try:
            yield
        finally:
            with _QKV_STACKING_LOCK:
                self._qkv_stacking_users -= 1
                if self._qkv_stacking_users == 0:
                    for attn in attention:
                        attn.unstack_qkv()

    def prepare_attention_mask(self, padding_mask: Optional[torch.Tensor], q_len: int, k_len: int,
                               query_positions: Optional[torch.Tensor] = None):
        """The boolean attention mask of this model's attention type (see `build_attention_mask`); the queries
        are the last `q_len` positions, or `query_positions`."""
        return build_attention_mask(
            padding_mask, q_len, k_len, not self.config.full_attn_mask, self.lm_head.weight.device, query_positions
        )

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # ---------------------------------------------------------------- positions

    def placeholder_names(self) -> dict:
        return {self.config.image_token_id: "image", self.config.video_token_id: "video"}

    def get_rope_index(
        self,
        input_ids: torch.LongTensor,
        image_grid_thw: Optional[torch.LongTensor] = None,
        video_grid_thw: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        second_per_grid_ts: Optional[torch.Tensor] = None,
    ) -> tuple:
        """Multimodal rotary positions (M-RoPE).

        Text tokens get (p, p, p) with p counting up over the real (unpadded) tokens. An image whose
        first token would be at position p gets t = p, h = p + row, w = p + col on its merged grid; the
        text after it resumes at max(image positions) + 1. Video frames advance t by
        `tokens_per_second * second_per_grid_t`. Padded slots get position 1.

        Returns:
            `position_ids` (3, batch, seq) and `rope_deltas` (batch, 1): max position + 1 − real length.
        """
        merge = self.config.vision_config.spatial_merge_size
        batch, seq_len = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        for grid, grid_name in ((image_grid_thw, "image_grid_thw"), (video_grid_thw, "video_grid_thw")):
            if grid is not None:
                check_grid_thw(grid, grid_name, merge)
        check_placeholders_attended(input_ids, attention_mask, self.placeholder_names())
        position_ids = torch.ones(3, batch, seq_len, dtype=torch.long, device=input_ids.device)
        grids = {
            self.config.image_token_id: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
            self.config.video_token_id: iter(video_grid_thw.tolist() if video_grid_thw is not None else []),
        }
        video_seconds = iter(second_per_grid_ts.tolist() if second_per_grid_ts is not None else [])
        deltas = []
        for row in range(batch):
            keep = attention_mask[row].bool()
            tokens = input_ids[row][keep].tolist()
            pieces, start, next_pos = [], 0, 0
            i = 0
            while i < len(tokens):
                token = tokens[i]
                if token not in grids:
                    i += 1
                    continue
                if i > start:  # text before the visual tokens
                    pieces.append(torch.arange(i - start).expand(3, -1) + next_pos)
                    next_pos += i - start
                try:
                    t, h, w = next(grids[token])
                except StopIteration:
                    kind = "image_grid_thw" if token == self.config.image_token_id else "video_grid_thw"
                    raise ValueError(f"the prompt has more visual placeholders than `{kind}` has rows") from None
                gh, gw = h // merge, w // merge
                step = 1.0
                if token == self.config.video_token_id:
                    step = self.config.vision_config.tokens_per_second * next(video_seconds, 1.0)
                t_pos = (torch.arange(t) * step).long()[:, None, None].expand(t, gh, gw)
                h_pos = torch.arange(gh)[None, :, None].expand(t, gh, gw)
                w_pos = torch.arange(gw)[None, None, :].expand(t, gh, gw)
                pieces.append(torch.stack([t_pos, h_pos, w_pos]).reshape(3, -1) + next_pos)
                next_pos = int(pieces[-1].max()) + 1
                i += t * gh * gw
                start = i
            if start < len(tokens):
                pieces.append(torch.arange(len(tokens) - start).expand(3, -1) + next_pos)
            positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
            position_ids[:, row, keep] = positions.to(position_ids.device)
            deltas.append((int(positions.max()) + 1 if len(tokens) else 0) - len(tokens))
        return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)

    # ---------------------------------------------------------------- inputs

    def _visual_inputs(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """Check the visual inputs against each other and against the prompt, before any heavy work."""
        vision = self.config.vision_config
        row_width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        found = []
        for pixels, grid, token_id, name, grid_name in (
            (pixel_values, image_grid_thw, self.config.image_token_id, "pixel_values", "image_grid_thw"),
            (pixel_values_videos, video_grid_thw, self.config.video_token_id, "pixel_values_videos", "video_grid_thw"),
        ):
            if pixels is None:
                if input_ids is not None and bool((input_ids == token_id).any()):
                    raise ValueError(
                        f"image tokens and image features do not match: `input_ids` has "
                        f"{int((input_ids == token_id).sum())} placeholder tokens (id {token_id}) but no `{name}` "
                        f"were given"
                    )
                continue
            if grid is None:
                raise ValueError(f"`{name}` was given without `{grid_name}`")
            if pixels.dim() != 2 or pixels.shape[-1] != row_width:
                raise ValueError(
                    f"`{name}` must have shape (patches, {row_width}) (channels·temporal_patch·patch²), "
                    f"got {tuple(pixels.shape)}"
                )
            check_grid_thw(grid, grid_name, vision.spatial_merge_size)
            if int(grid.prod(-1).sum()) != pixels.shape[0]:
                raise ValueError(
                    f"`{grid_name}` describes {int(grid.prod(-1).sum())} patches but `{name}` has "
                    f"{pixels.shape[0]} rows"
                )
            if input_ids is not None:
                n_tokens = int((input_ids == token_id).sum())
                n_features = int(grid.prod(-1).sum()) // vision.spatial_merge_size**2
                if n_tokens != n_features:
                    raise ValueError(
                        f"image tokens and image features do not match: `input_ids` has {n_tokens} placeholder "
                        f"tokens (id {token_id}) but `{name}` gives {n_features} features"
                    )
                check_placeholder_runs(input_ids, token_id, grid, vision.spatial_merge_size, grid_name)
            found.append(_ImageInputs(pixels, grid, token_id, name))
        return found

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector: one row per merged patch group, in prompt order."""
        pixel_values = pixel_values.to(self.visual.patch_embed.proj.weight.dtype)
        features = self.visual(pixel_values, image_grid_thw, attn_implementation=attention_implementation(self.config))
        return self.img_projector(features)

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
    ) -> torch.Tensor:
        """Token embeddings with image/video features written over their placeholder tokens."""
        vocab_size = self.model.embed_tokens.num_embeddings
        outside = (input_ids < 0) | (input_ids >= vocab_size)
        if bool(outside.any()):  # else an IndexError deep in the embedding (a device-side assert on CUDA)
            raise ValueError(
                f"`input_ids` must be token ids in [0, {vocab_size}), got {input_ids[outside].unique()[:5].tolist()}"
            )
        visual = self._visual_inputs(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        embeds = self.model.embed_tokens(input_ids)
        for item in visual:
            features = self.get_image_features(item.pixel_values, item.grid_thw).to(embeds.dtype)
            slots = (input_ids == item.token_id).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(slots, features)
        if not visual and self.training and torch.is_grad_enabled():
            zero = self.image_side_zero(embeds.device)
            if zero is not None:
                embeds = embeds + zero.to(embeds.dtype)
        return embeds

    def image_side_zero(self, device) -> Optional[torch.Tensor]:
        """0 × the sum of every trainable parameter of the vision tower and projector (None if none trains).

        A text-only training batch adds it to its embeddings, so that those parameters get zero gradients
        instead of none: DDP without `find_unused_parameters` (the Trainer's setting with gradient
        checkpointing) waits for every trainable parameter's gradient, and hung when one rank's batch had
        images and another's had none. The forward's values are unchanged (it adds exact zeros)."""
        params = [p for p in (*self.visual.parameters(), *self.img_projector.parameters()) if p.requires_grad]
        if not params:
            return None
        return torch.stack([p.sum(dtype=torch.float32).to(device) for p in params]).sum() * 0.0

    # ---------------------------------------------------------------- forward

    def decoder_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[DimplePrefixCache] = None,
        cache_position: Optional[torch.LongTensor] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        layer_forward: Optional[Callable] = None,
    ) -> tuple:
        """The language model on embedded inputs, without the head: `(hidden_states, all_hidden, all_attn)`,
        the final normalised hidden states `(batch, q_len, hidden)` and, when asked, those of every layer and the
        attention probabilities. `forward` applies `lm_head` to it; decoding calls it directly, to apply the
        head only at the positions it scores (the masked ones). Arguments as in `forward`: the inputs are the
        positions `cache_position` of the sequence (0, 1, 2, … without it); without `position_ids` their rotary
        positions are those (text only). `layer_forward(layer, *arguments)`, when given, runs each decoder layer
        instead of `layer(*arguments)` (regional compilation: one compiled layer forward shared by every layer)."""
        batch, q_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        cache = past_key_values
        if cache_position is None:
            if cache is not None and cache.length != q_len:
                raise ValueError(
                    f"`cache_position` (the positions of the {q_len} inputs in the cached sequence of {cache.length}) "
                    "is required to run part of a cached sequence"
                )
            cache_position = torch.arange(q_len, device=device)
        elif cache_position.shape != (q_len,) or cache_position.dtype != torch.long:
            raise ValueError(
                f"`cache_position` must be a ({q_len},) tensor of positions (torch.long), got "
                f"{cache_position.dtype} of shape {tuple(cache_position.shape)}"
            )
        if position_ids is None:
            position_ids = cache_position.expand(3, batch, -1)
        elif position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if position_ids.shape != (3, batch, q_len):
            raise ValueError(
                f"`position_ids` must have shape (3, batch, seq) = (3, {batch}, {q_len}) or (batch, seq), "
                f"got {tuple(position_ids.shape)}"
            )

        is_causal = not self.config.full_attn_mask
        k_len = cache.length if cache is not None else q_len
        # The mask format of the attention kernel: eager's and SDPA's boolean mask, flash-attention's padding mask,
        # flex attention's BlockMask (`attention_mask_kind`); output_attentions runs the eager path.
        kind = "dense" if output_attentions else attention_mask_kind(attention_implementation(self.config))
        padding = None
        if attention_mask is not None and attention_mask.dim() == 2:
            if tuple(attention_mask.shape) != (batch, k_len):
                raise ValueError(
                    f"`attention_mask` must have shape (batch, seq) = ({batch}, {k_len}), got {tuple(attention_mask.shape)}"
                )
            # Without padding SDPA runs mask-free (one host sync; the decoding loop decides this once).
            padding = None if bool(attention_mask.all()) else attention_mask
            attention_mask = build_attention_mask(padding, q_len, k_len, is_causal, device, cache_position)
        elif attention_mask is None:
            attention_mask = build_attention_mask(None, q_len, k_len, is_causal, device, cache_position)
        elif (
            attention_mask.dtype != torch.bool or attention_mask.dim() != 4
            or attention_mask.shape[0] not in (1, batch) or tuple(attention_mask.shape[2:]) != (q_len, k_len)
        ):  # a float 0/1 mask would be added to the scores by SDPA, not read as "may attend"
            raise ValueError(
                f"`attention_mask` must be a (batch, seq) padding mask or a boolean (batch, 1, q_len, seq) = "
                f"({batch}, 1, {q_len}, {k_len}) mask (True = may attend), got {attention_mask.dtype} of shape "
                f"{tuple(attention_mask.shape)}"
            )
        if kind == "padding":  # the keys' padding (None: none); the kernel masks causally by its own flag
            attention_mask = padding if padding is not None or attention_mask is None else key_padding_mask(
                attention_mask, batch
            )
        elif kind == "block":  # flex attention: None is full attention
            if attention_mask is None and is_causal:
                attention_mask = build_attention_mask(None, q_len, k_len, True, device, cache_position, explicit=True)
            attention_mask = None if attention_mask is None else flex_block_mask(attention_mask)
        # A prepared 4-D mask already holds the causal part; SDPA's own flag is for the mask-free case.
        is_causal = is_causal and attention_mask is None
        return self.model(
            inputs_embeds,
            position_ids,
            attention_mask,
            is_causal,
            cache=cache,
            cache_position=cache_position,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            layer_forward=layer_forward,
        )

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        past_key_values: Optional[DimplePrefixCache] = None,
        use_cache: Optional[bool] = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: Optional[bool] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.LongTensor] = None,
        second_per_grid_ts: Optional[torch.Tensor] = None,
        logits_to_keep: Union[int, slice, torch.Tensor] = 0,
        cache_position: Optional[torch.LongTensor] = None,
        **loss_kwargs,  # the name makes every Trainer (4.46 included) pass `num_items_in_batch`
    ) -> Union[tuple, CausalLMOutputWithPast]:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, seq)`): tokens, with one `<|image_pad|>` per
                image feature.
            attention_mask (`torch.Tensor`, *optional*): `(batch, seq)` padding mask (1 = real token), or a
                prepared boolean `(batch, 1, q_len, seq)` mask (True = may attend).
            position_ids (`torch.LongTensor`, *optional*): `(3, batch, seq)` M-RoPE positions (a
                `(batch, seq)` tensor is taken as text positions). Computed with `get_rope_index` when absent.
            pixel_values (`torch.Tensor`, *optional*): `(patches, 1176)` patch rows from the processor.
            image_grid_thw (`torch.LongTensor`, *optional*): `(images, 3)` patch grid (1, h, w) of every image.
            labels (`torch.LongTensor`, *optional*): targets aligned with `input_ids`; the loss is the mean
                cross-entropy of logits at j − 1 against labels at j, ignoring -100.
            past_key_values (`DimplePrefixCache`, *optional*): the key/value cache of a diffusion decode: the
                pass writes the keys/values of its inputs at `cache_position` and attends over the whole cache.
            cache_position (`torch.LongTensor` of shape `(seq,)`, *optional*): the positions of the inputs in
                the (cached) sequence; required to run part of a cached sequence. With it, `position_ids` are
                not computed from `input_ids`: pass the M-RoPE positions of those inputs (text positions equal
                `cache_position` by default).
            logits_to_keep (`int`, `slice` or `torch.Tensor`): positions whose logits are computed; an int
                keeps the last n (0 keeps all).
            num_items_in_batch (`int` or `torch.Tensor`, *optional*): passed by `Trainer` (transformers ≥ 4.46
                with `**kwargs`): the labelled positions of every micro-batch of one optimizer step. The loss is
                then their summed cross-entropy ÷ this count, so gradient accumulation (and averaging over
                devices) gives the gradient of one large batch's mean, not a multiple of it.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        num_items_in_batch = loss_kwargs.pop("num_items_in_batch", None)
        if loss_kwargs:
            raise TypeError(f"DimpleModel.forward() got unexpected keyword arguments {sorted(loss_kwargs)}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of `input_ids` and `inputs_embeds`")
        if labels is not None:
            inputs_shape = tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])
            if tuple(labels.shape) != inputs_shape:
                raise ValueError(f"`labels` must have the inputs' shape (batch, seq) = {inputs_shape}, got {tuple(labels.shape)}")
            if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
                raise ValueError(f"`labels` need the logits of every position: leave `logits_to_keep` at 0, got {logits_to_keep!r}")
        if inputs_embeds is None:
            if pixel_values is not None or pixel_values_videos is not None:  # text only: no check, no host sync
                check_placeholders_attended(input_ids, attention_mask, self.placeholder_names())
            inputs_embeds = self.embed_inputs(
                input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw
            )
        elif pixel_values is not None or pixel_values_videos is not None:
            raise ValueError("`pixel_values` needs `input_ids` (to find the image tokens), not `inputs_embeds`")
        whole_sequence = past_key_values is None or past_key_values.length == inputs_embeds.shape[1]
        if position_ids is None and input_ids is not None and cache_position is None and whole_sequence:
            mask_2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            position_ids, _ = self.get_rope_index(
                input_ids, image_grid_thw, video_grid_thw, mask_2d, second_per_grid_ts
            )
        hidden_states, all_hidden, all_attn = self.decoder_forward(
            inputs_embeds, attention_mask, position_ids, past_key_values, cache_position, output_attentions,
            output_hidden_states,
        )
        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.lm_head(hidden_states[:, logits_to_keep])

        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(),
                labels[:, 1:].flatten().to(logits.device),
                ignore_index=-100,
                reduction="mean" if num_items_in_batch is None else "sum",
            )
            if num_items_in_batch is not None:
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        if not return_dict:
            out = (logits, past_key_values, all_hidden, all_attn)
            return ((loss,) + out) if loss is not None else out
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=past_key_values, hidden_states=all_hidden, attentions=all_attn
        )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus a README.md model card (metadata, usage, decoding settings);
        an existing README.md is kept unless transformers generated it."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", args[0] if args else True):
            _write_model_card(self, save_directory)
        return result

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # push_to_hub (and save_pretrained(push_to_hub=True)) write transformers' stub card, or the repository's
        # card, over README.md just before uploading: a stub becomes Dimple's card, naming the repository.
        _write_model_card(self, working_dir, path=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)


# --------------------------------------------------------------------------------------------------
# Model card: every folder `save_pretrained` / `push_to_hub` writes carries a README.md
# --------------------------------------------------------------------------------------------------

# The architecture's origins, the base models of a checkpoint that names no hub model it came from.
DIMPLE_BASE_MODELS = ("Dream-org/Dream-v0-Instruct-7B", "Qwen/Qwen2.5-VL-7B-Instruct")
DIMPLE_LICENSE = "apache-2.0"
DIMPLE_CARD_TAGS = ("diffusion", "discrete-diffusion", "multimodal", "vision-language", "dimple", "custom_code")
# The card `save_pretrained` writes ends with this comment: a later save may refresh it (other cards are kept).
MODEL_CARD_MARK = "<!-- model card written by DimpleModel.save_pretrained -->"
# Cards transformers writes when it knows nothing of the model (push_to_hub's stub, the Trainer's summary)
# and huggingface_hub's empty template: replaced by Dimple's card.
_GENERATED_CARD_MARKS = (
    MODEL_CARD_MARK,
    "This model card has been automatically generated.",
    "This model card has been generated automatically according to the information the Trainer had access to",
    "<!-- Provide a quick summary of what the model is/does. -->",
)
# generation_config.json keys that shape the output or the kernels, not the answer
_NOT_DECODING_SETTINGS = (
    "transformers_version", "_from_model_config", "output_history", "return_dict_in_generate",
    "num_return_sequences", "use_cuda_graph", "use_torch_compile",
)
_HUB_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"


def card_lineage(name_or_path) -> tuple:
    """(base_model list, license) of a checkpoint loaded from `name_or_path`: a hub id is the base model; a
    local folder passes on the base models and license its own README.md declares; otherwise Dimple's."""
    import os
    import re

    name = os.fspath(name_or_path) if name_or_path else ""
    if name and not os.path.exists(name) and re.fullmatch(_HUB_ID, name):
        return [name], DIMPLE_LICENSE
    readme = os.path.join(name, "README.md") if name else ""
    if readme and os.path.isfile(readme):
        from huggingface_hub import ModelCard

        try:
            data = ModelCard.load(readme, ignore_metadata_errors=True).data
        except Exception:  # an unreadable card: fall back to Dimple's lineage
            data = None
        if data is not None and data.get("base_model"):
            base = data.get("base_model")
            return ([base] if isinstance(base, str) else list(base)), data.get("license") or DIMPLE_LICENSE
    return list(DIMPLE_BASE_MODELS), DIMPLE_LICENSE


def model_card_usage(path: str) -> str:
    """The card's "Use" section: loading with trust_remote_code and `diffusion_generate`."""
    return f"""## Use

```python
import torch
from transformers import AutoModel, AutoProcessor

path = "{path}"
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
model = AutoModel.from_pretrained(path, trust_remote_code=True).eval()

messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe this image."}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=["photo.jpg"], text=prompt, return_tensors="pt")
with torch.no_grad():
    sequences = model.diffusion_generate(**inputs)  # the decoding settings below; each can be passed here
print(processor.decode_answers(sequences, prompt_length=inputs["input_ids"].shape[1]))
```
"""


def model_card_decoding(generation_config) -> str:
    """The card's decoding settings: what generation_config.json holds (token ids aside)."""
    settings = {} if generation_config is None else generation_config.to_diff_dict()
    rows = [
        f"| `{key}` | `{value!r}` |"
        for key, value in sorted(settings.items())
        if value is not None and not key.endswith("_token_id") and key not in _NOT_DECODING_SETTINGS
    ]
    if "temperature" not in settings:
        temperature = getattr(generation_config, "temperature", None)
        rows.append(f"| `temperature` | `{temperature!r}` (the default, left out of the file) |")
    return "## Decoding settings (`generation_config.json`)\n\n| setting | value |\n| --- | --- |\n" + "\n".join(rows) + "\n"


def dimple_model_card(model, path: str = "path/to/this/checkpoint", base_model=None, license=None,
                      extra_tags=(), sections=(), library_name="transformers", mark=MODEL_CARD_MARK):
    """A `huggingface_hub.ModelCard` for `model`: YAML metadata (library, pipeline, base models, tags, license),
    the usage snippet, the decoding settings and any further `sections` (markdown)."""
    from huggingface_hub import ModelCard, ModelCardData

    lineage, inherited_license = card_lineage(getattr(model.config, "_name_or_path", None))
    tags = list(DIMPLE_CARD_TAGS) + [tag for tag in extra_tags if tag not in DIMPLE_CARD_TAGS]
    data = ModelCardData(
        library_name=library_name, pipeline_tag="image-text-to-text", base_model=base_model or lineage,
        license=license or inherited_license, tags=tags,
    )
    config = model.config
    body = [
        f"# {path.rstrip('/').split('/')[-1]}",
        "A [Dimple](https://arxiv.org/abs/2505.16990) checkpoint: a discrete-diffusion multimodal LLM that writes its "
        "answer by iterative parallel unmasking of a canvas of `<|mask|>` tokens. The code is in this folder: load it "
        f"with `trust_remote_code=True`. {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
        f"vocabulary {config.vocab_size}; {'bidirectional' if config.full_attn_mask else 'causal'} attention.",
        model_card_usage(path).rstrip(),
        model_card_decoding(getattr(model, "generation_config", None)).rstrip(),
        *[section.rstrip() for section in sections],
        mark,
    ]
    return ModelCard("---\n" + data.to_yaml() + "\n---\n\n" + "\n\n".join(body) + "\n")


def is_replaceable_model_card(path) -> bool:
    """No README.md yet, or one transformers / huggingface_hub generated, or the one `save_pretrained` wrote."""
    import os

    if not os.path.isfile(path):
        return True
    with open(path, encoding="utf-8", errors="replace") as handle:
        text = handle.read()
    return any(mark in text for mark in _GENERATED_CARD_MARKS)


def _write_model_card(model, folder, path=None) -> None:
    import os

    readme = os.path.join(folder, "README.md")
    if is_replaceable_model_card(readme):
        dimple_model_card(model, path=path or os.path.basename(os.path.abspath(folder))).save(readme)


# save_pretrained / push_to_hub then copy the code modules next to the weights on every transformers version
# (4.x's AutoModel does not record remote classes), so a saved model loads with trust_remote_code.
DimpleModel.register_for_auto_class("AutoModel")

__all__ = ["DimpleModel", "DimplePreTrainedModel", "DimplePrefixCache", "DimpleVisionTransformer"]
