"""Tests of `modeling_dimple.py` on a tiny random model (CPU, fp32).

Oracles: transformers' Qwen2.5-VL vision transformer (same parameter names) for `visual`; an
independent float64 re-implementation of the Qwen2 decoder math with M-RoPE and Dimple's bidirectional
padding mask (SPEC §1) for the language model; transformers' `Qwen2ForCausalLM` for the causal mode;
hand-written M-RoPE positions for `get_rope_index`.
"""

import contextlib
import json
import math
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dimple.modeling_dimple import DimpleModel, DimplePrefixCache
from dimple_tools.tiny.configs import (
    BOS_ID,
    IMAGE_ID,
    PAD_ID,
    TINY_VISION,
    VISION_END_ID,
    VISION_START_ID,
    tiny_config,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
ATOL = 1e-5


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace the default init (std 0.02, zero biases, unit norms) by O(1)-activation random weights, so
    that biases and norm weights matter and a wrong one shows up in the comparisons."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(param[0].numel()))
            elif name.endswith("bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
            else:  # RMSNorm weights
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
    return model


def make_model(seed: int = 0, **overrides) -> DimpleModel:
    torch.manual_seed(seed)
    return randomize_(DimpleModel(tiny_config(**overrides)), seed).eval()


def left_pad(rows: list, pad_id: int = PAD_ID) -> tuple:
    """Left-pad token lists into (input_ids, attention_mask)."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    return ids, mask


def random_text(gen: torch.Generator, n: int) -> list:
    return torch.randint(10, 300, (n,), generator=gen).tolist()


def text_batch(seed: int = 0, lengths=(12, 9, 5)) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    return left_pad([[BOS_ID] + random_text(gen, n - 1) for n in lengths])


def image_prompt(gen: torch.Generator, grid, before: int, after: int) -> list:
    t, h, w = grid
    return [BOS_ID] + random_text(gen, before) + [VISION_START_ID] + [IMAGE_ID] * (t * h * w // 4) + [
        VISION_END_ID
    ] + random_text(gen, after)


def image_batch(seed: int = 0) -> dict:
    """Two rows, one image each (different grids); the second row is left-padded."""
    gen = torch.Generator().manual_seed(seed)
    grids = [[1, 8, 8], [1, 4, 12]]
    ids, mask = left_pad([image_prompt(gen, grids[0], 3, 4), image_prompt(gen, grids[1], 2, 3)])
    grid = torch.tensor(grids)
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 1176, generator=gen)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid)


def text_positions(mask: torch.Tensor) -> torch.Tensor:
    """Ordinary 1-D positions of left-padded text: 0, 1, … over real tokens, padded slots 1."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def reference_logits(model, inputs_embeds, position_ids, padding_mask=None, causal=False) -> torch.Tensor:
    """Float64 re-implementation of the language model from its state dict: Qwen2 layers (RMSNorm,
    q/k/v with bias, M-RoPE, GQA, softmax attention, o_proj, gated SiLU MLP), final norm, lm_head.

    Mask (SPEC §1): a query attends to the real keys of its row and always to itself; `causal` also
    hides later keys. `position_ids` is (batch, seq) for 1-D RoPE or (3, batch, seq) for M-RoPE."""
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    x = inputs_embeds.detach().double()
    batch, length, hidden = x.shape
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = hidden // heads
    half = head_dim // 2

    # Rotary angles: frequency i uses position component comp[i] (t, h or w).
    if position_ids.dim() == 2:
        position_ids = torch.stack([position_ids] * 3)
    comp = [c for c, n in enumerate(cfg.mrope_section) for _ in range(n)]
    inv_freq = [cfg.rope_theta ** (-(2.0 * i) / head_dim) for i in range(half)]
    angle = torch.stack([position_ids[comp[i]].double() * inv_freq[i] for i in range(half)], dim=-1)
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]  # (batch, 1, seq, half)

    def rope(t):
        a, b = t[..., :half], t[..., half:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def rms(t, weight):
        return weight * t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def linear(t, prefix, bias=True):
        out = t @ sd[prefix + ".weight"].T
        return out + sd[prefix + ".bias"] if bias else out

    real = torch.ones(batch, length, dtype=torch.bool) if padding_mask is None else padding_mask.bool()
    allowed = real[:, None, :] | torch.eye(length, dtype=torch.bool)  # (batch, q, k)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    kv_of_head = [h // (heads // kv_heads) for h in range(heads)]

    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}."
        h = rms(x, sd[p + "input_layernorm.weight"])
        q = linear(h, p + "self_attn.q_proj").view(batch, length, heads, head_dim).transpose(1, 2)
        k = linear(h, p + "self_attn.k_proj").view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = linear(h, p + "self_attn.v_proj").view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k[:, kv_of_head], v[:, kv_of_head]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, hidden)
        x = x + linear(attn, p + "self_attn.o_proj", bias=False)
        h = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = linear(h, p + "mlp.gate_proj", bias=False)
        up = linear(h, p + "mlp.up_proj", bias=False)
        x = x + linear(F.silu(gate) * up, p + "mlp.down_proj", bias=False)
    x = rms(x, sd["model.norm.weight"])
    return x @ sd["lm_head.weight"].T


def assert_close_on(actual, expected, mask, atol=ATOL):
    """Max abs difference over the positions where `mask` is 1."""
    keep = mask.bool()
    diff = (actual.double() - expected.double())[keep].abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


def forbid_language_model(model, monkeypatch):
    """Make any run of the vision tower or the language model fail the test."""

    def boom(*args, **kwargs):
        raise AssertionError("the model ran before the input was rejected")

    monkeypatch.setattr(model.model, "forward", boom)
    monkeypatch.setattr(model.visual, "forward", boom)


@pytest.fixture(scope="module")
def model():
    return make_model(seed=0)


# --------------------------------------------------------------------------------------------------
# 1. Vision tower vs transformers' Qwen2.5-VL vision transformer
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_oracle(model):
    try:  # transformers >= 4.49 (the compat environment's 4.46.2 predates Qwen2.5-VL)
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    except ImportError:
        pytest.skip("this transformers has no Qwen2.5-VL vision transformer to compare with")

    config = Qwen2_5_VLVisionConfig(**TINY_VISION)
    config._attn_implementation = "eager"
    oracle = Qwen2_5_VisionTransformerPretrainedModel._from_config(config, attn_implementation="eager")
    oracle.load_state_dict(model.visual.state_dict(), strict=True)
    return oracle.eval()


@pytest.mark.parametrize(
    "grids",
    [
        pytest.param([[1, 16, 16]], id="square-4-windows"),
        pytest.param([[1, 12, 20]], id="non-square-padded-windows"),
        pytest.param([[1, 16, 16], [1, 8, 12]], id="two-images"),
        pytest.param([[1, 6, 10], [2, 8, 4], [1, 4, 4]], id="three-items-one-with-2-frames"),
    ],
)
def test_vision_tower_matches_qwen2_5_vl(model, vision_oracle, grids):
    grid = torch.tensor(grids)
    gen = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(int(grid.prod(-1).sum()), 1176, generator=gen)
    with torch.no_grad():
        ours = model.visual(pixel_values, grid)
        out = vision_oracle(pixel_values, grid_thw=grid)
    expected = out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 4.x returns a tensor
    assert ours.shape == (int(grid.prod(-1).sum()) // 4, TINY_VISION["out_hidden_size"])
    assert expected.shape == ours.shape
    assert expected.abs().max() > 0.1  # a meaningful signal, not near-zero activations
    assert (ours - expected).abs().max().item() <= ATOL


def test_image_features_are_projected_vision_output(model):
    batch = image_batch()
    with torch.no_grad():
        features = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        merged = model.visual(batch["pixel_values"], batch["image_grid_thw"])
        p = model.img_projector
        expected = F.linear(F.silu(F.linear(merged, p.linear_1.weight, p.linear_1.bias)), p.linear_2.weight, p.linear_2.bias)
    assert features.shape == (int((batch["input_ids"] == IMAGE_ID).sum()), model.config.hidden_size)
    assert torch.allclose(features, expected, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 2. Language model vs an independent computation (text-only: M-RoPE = ordinary RoPE)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rope_theta", [1e6, 1e4])
@pytest.mark.parametrize("full_attn_mask", [True, False], ids=["bidirectional", "causal"])
def test_language_model_matches_reference(rope_theta, full_attn_mask):
    model = make_model(seed=2, rope_theta=rope_theta, full_attn_mask=full_attn_mask)
    ids, mask = text_batch(seed=2)
    assert not mask.all()  # left padding present
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    embeds = model.model.embed_tokens.weight[ids]
    expected = reference_logits(model, embeds, text_positions(mask), mask, causal=not full_attn_mask)
    assert logits.shape == (3, ids.shape[1], 300)
    assert_close_on(logits, expected, mask)


def test_language_model_without_padding_matches_reference(model):
    ids, mask = text_batch(seed=3, lengths=(10, 10))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    expected = reference_logits(model, model.model.embed_tokens.weight[ids], text_positions(mask))
    assert_close_on(logits, expected, mask)


def test_causal_mode_matches_transformers_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = make_model(seed=4, full_attn_mask=False, rope_theta=1e4)
    cfg = model.config
    qwen_config = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=False,
    )
    qwen = Qwen2ForCausalLM._from_config(qwen_config, attn_implementation="eager").eval()
    state = {k: v for k, v in model.state_dict().items() if k.startswith(("model.", "lm_head."))}
    qwen.load_state_dict(state, strict=True)
    ids, mask = text_batch(seed=4, lengths=(11, 11))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = qwen(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= ATOL


# --------------------------------------------------------------------------------------------------
# 3. get_rope_index against hand-written positions
# --------------------------------------------------------------------------------------------------


def test_get_rope_index_text_image_text_with_left_padding(model):
    P, I, S, E = PAD_ID, IMAGE_ID, VISION_START_ID, VISION_END_ID
    # Row 0: 2 pads, 3 text, <vs>, image grid (1, 4, 6) -> 2x3 merged tokens, <ve>, 2 text.
    # Row 1: 1 pad, 1 text, <vs>, image (1, 2, 4) -> 1x2, <ve>, 1 text, <vs>, image (1, 4, 2) -> 2x1, <ve>, 4 text.
    input_ids = torch.tensor(
        [
            [P, P, 1, 10, 11, S, I, I, I, I, I, I, E, 12, 13],
            [P, 1, S, I, I, E, 20, S, I, I, E, 21, 22, 23, 24],
        ]
    )
    attention_mask = (torch.arange(15) >= torch.tensor([[2], [1]])).long()
    grid = torch.tensor([[1, 4, 6], [1, 2, 4], [1, 4, 2]])
    expected = torch.tensor(
        [
            [  # t
                [1, 1, 0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9],
                [1, 0, 1, 2, 2, 4, 5, 6, 7, 7, 9, 10, 11, 12, 13],
            ],
            [  # h
                [1, 1, 0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9],
                [1, 0, 1, 2, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
            ],
            [  # w
                [1, 1, 0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9],
                [1, 0, 1, 2, 3, 4, 5, 6, 7, 7, 9, 10, 11, 12, 13],
            ],
        ]
    )
    position_ids, rope_deltas = model.get_rope_index(input_ids, grid, None, attention_mask)
    assert position_ids.shape == (3, 2, 15)
    assert torch.equal(position_ids, expected)
    # rope_deltas = max position + 1 - real length: 10 - 13 and 14 - 14.
    assert rope_deltas.tolist() == [[-3], [0]]


def test_get_rope_index_text_only_is_ordinary_positions(model):
    ids, mask = text_batch(seed=5)
    position_ids, rope_deltas = model.get_rope_index(ids, None, None, mask)
    assert torch.equal(position_ids, torch.stack([text_positions(mask)] * 3))
    assert rope_deltas.tolist() == [[0]] * 3


# --------------------------------------------------------------------------------------------------
# 4. Bidirectional vs causal attention
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "left-padding"])
def test_bidirectional_sees_later_tokens_and_causal_does_not(padded):
    ids, mask = text_batch(seed=6, lengths=(10, 7) if padded else (10, 10))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 300 + 10 * (changed[:, -1] < 9)  # a different ordinary token
    assert not torch.equal(changed[:, -1], ids[:, -1])
    for full_attn_mask in (True, False):
        model = make_model(seed=6, full_attn_mask=full_attn_mask)
        with torch.no_grad():
            before = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            after = model(input_ids=changed, attention_mask=mask).logits[:, :-1]
        real = mask[:, :-1].bool()
        if full_attn_mask:
            # every real earlier position (the first one included) feels the change
            assert (before - after).abs().amax(-1)[real].min() > 1e-4
        else:
            assert torch.equal(before, after)


# --------------------------------------------------------------------------------------------------
# 5. Image path
# --------------------------------------------------------------------------------------------------


def test_image_forward_equals_manual_embedding_and_reference(model):
    batch = image_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        logits = model(**batch).logits
        features = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        embeds = model.model.embed_tokens(ids).clone()
        embeds[ids == IMAGE_ID] = features
        position_ids, _ = model.get_rope_index(ids, batch["image_grid_thw"], None, mask)
        manual = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).logits
    assert (logits - manual).abs().max().item() <= 1e-6
    # And against the float64 reference with M-RoPE sections (independent of the model's rotary code).
    expected = reference_logits(model, embeds, position_ids, mask)
    assert_close_on(logits, expected, mask)


def test_forward_without_position_ids_uses_multimodal_positions(model):
    batch = image_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    position_ids, _ = model.get_rope_index(ids, batch["image_grid_thw"], None, mask)
    assert not torch.equal(position_ids[0], position_ids[1])  # the image really has 2-D positions
    with torch.no_grad():
        implicit = model(**batch).logits
        explicit = model(**batch, position_ids=position_ids).logits
        flat = model(**batch, position_ids=text_positions(mask)).logits
    assert torch.equal(implicit, explicit)
    assert (implicit - flat)[mask.bool()].abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# 6. Masks: the no-padding fast path, the eager path
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("full_attn_mask", [True, False], ids=["bidirectional", "causal"])
def test_all_ones_mask_equals_no_mask(full_attn_mask, monkeypatch):
    model = make_model(seed=7, full_attn_mask=full_attn_mask)
    ids, mask = text_batch(seed=7, lengths=(9, 9))
    sdpa = F.scaled_dot_product_attention
    calls = []

    def spy(*args, **kwargs):
        calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal", False)))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        with_mask = model(input_ids=ids, attention_mask=mask).logits
        without = model(input_ids=ids).logits
    assert torch.equal(with_mask, without)
    # No padding: the language model's SDPA calls get no mask (fastest kernel), causal via the flag.
    assert len(calls) == 2 * model.config.num_hidden_layers
    assert all(m is None and c == (not full_attn_mask) for m, c in calls)
    calls.clear()
    padded_ids, padded_mask = text_batch(seed=7, lengths=(9, 6))
    with torch.no_grad():
        model(input_ids=padded_ids, attention_mask=padded_mask)
    assert calls and all(m is not None and m.dtype == torch.bool and not c for m, c in calls)


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("full_attn_mask", [True, False], ids=["bidirectional", "causal"])
def test_eager_attention_matches_sdpa(full_attn_mask, padded):
    # Unpadded causal is the case where SDPA gets no mask, only `is_causal`: eager must build the causal mask.
    model = make_model(seed=8, full_attn_mask=full_attn_mask)
    ids, mask = text_batch(seed=8) if padded else text_batch(seed=8, lengths=(9, 9, 9))
    with torch.no_grad():
        sdpa = model(input_ids=ids, attention_mask=mask)
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert sdpa.attentions is None
    assert_close_on(eager.logits, sdpa.logits, mask)
    assert len(eager.attentions) == model.config.num_hidden_layers
    length = ids.shape[1]
    later = torch.ones(length, length, dtype=torch.bool).triu(1)
    for probs in eager.attentions:
        assert probs.shape == (3, model.config.num_attention_heads, length, length)
        assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
        for row in range(3):
            real = mask[row].bool()
            # real queries put exactly zero weight on padded keys
            assert torch.all(probs[row][:, real][:, :, ~real] == 0)
            # a padded query attends to itself
            pads = (~real).nonzero().flatten()
            assert torch.all(probs[row][:, pads, pads] > 0)
            if not full_attn_mask:
                assert torch.all(probs[row][:, later] == 0)
            else:
                assert torch.all(probs[row][:, real][:, :, real] > 0)


def test_attn_implementation_eager_runs_the_eager_path_in_both_towers(tmp_path, monkeypatch):
    model = make_model(seed=9)
    model.save_pretrained(tmp_path)
    eager = DimpleModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"
    batch = image_batch(seed=9)
    with torch.no_grad():
        expected = model(**batch).logits

        def no_sdpa(*args, **kwargs):
            raise AssertionError("SDPA ran although the model was loaded with attn_implementation='eager'")

        monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
        logits = eager(**batch).logits  # the vision tower (windows and full blocks) and the language model
    assert_close_on(logits, expected, batch["attention_mask"])


# --------------------------------------------------------------------------------------------------
# 7. Prefix cache (prefilling)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_image", [False, True], ids=["text", "image"])
def test_prefix_cache_tail_forward_matches_full_forward(model, with_image):
    if with_image:
        batch = image_batch(seed=9)
    else:
        ids, mask = text_batch(seed=9)
        batch = dict(input_ids=ids, attention_mask=mask)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    k, seq = 4, ids.shape[1]
    cache = DimplePrefixCache(seq)
    tail_positions = torch.arange(seq - k, seq)
    with torch.no_grad():
        full = model(**batch, past_key_values=cache, use_cache=True).logits
        assert len(cache.key_values) == 2 and cache.key_values[0].shape[1] == seq
        positions, _ = model.get_rope_index(ids, batch.get("image_grid_thw"), None, mask)
        tail_inputs = dict(attention_mask=mask, past_key_values=cache, cache_position=tail_positions,
                           position_ids=positions[..., -k:])
        tail = model(input_ids=ids[:, -k:], **tail_inputs).logits
        assert tail.shape == (ids.shape[0], k, 300)
        assert (tail - full[:, -k:]).abs().max().item() <= ATOL

        # A changed tail gives other logits; writing the original tail back restores them (the prefix
        # stays as computed at the first step, the tail is overwritten in place).
        changed = ids[:, -k:].clone()
        changed[:, -2:] = 42
        other = model(input_ids=changed, **tail_inputs).logits
        assert (other - tail).abs().max() > 1e-4
        again = model(input_ids=ids[:, -k:], **tail_inputs).logits
        assert (again - full[:, -k:]).abs().max().item() <= ATOL
        # Part of a cached sequence without its positions: a clear error, not a guess.
        with pytest.raises(ValueError, match="`cache_position`"):
            model(input_ids=ids[:, -k:], attention_mask=mask, past_key_values=cache)
    assert cache.key_values[0].shape[1] == seq


def test_prefix_cache_with_new_tail_is_exact_for_causal_attention():
    """With causal attention the prefix does not depend on the tail, so a cached forward over a *changed*
    tail must equal a full forward of the changed sequence (tail keys and values really replaced, the
    non-square causal mask offset right)."""
    model = make_model(seed=16, full_attn_mask=False)
    ids, mask = text_batch(seed=16)
    k = 4
    changed = ids.clone()
    changed[:, -k:] = torch.tensor([42, 43, 44, 45])
    seq = ids.shape[1]
    cache = DimplePrefixCache(seq)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        positions, _ = model.get_rope_index(ids, None, None, mask)
        tail = model(input_ids=changed[:, -k:], attention_mask=mask, past_key_values=cache,
                     cache_position=torch.arange(seq - k, seq), position_ids=positions[..., -k:]).logits
        full = model(input_ids=changed, attention_mask=mask).logits
    assert (tail - full[:, -k:]).abs().max().item() <= ATOL


def test_cache_window_in_the_middle_is_exact_for_causal_attention():
    """A window in the middle of the cached sequence (`cache_position`, as the dual cache of block decoding
    uses): with causal attention its queries see the unchanged prefix and the fresh window only, so a changed
    window must give the logits of a full forward of the changed sequence, with the padding mask, positions
    and causal offsets of the window's own places."""
    model = make_model(seed=17, full_attn_mask=False)
    ids, mask = text_batch(seed=17)
    start, k = ids.shape[1] - 6, 3  # three positions, with three after them
    changed = ids.clone()
    changed[:, start : start + k] = torch.tensor([42, 43, 44])
    cache = DimplePrefixCache(ids.shape[1])
    window_positions = torch.arange(start, start + k)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        positions, _ = model.get_rope_index(ids, None, None, mask)
        window = model(input_ids=changed[:, start : start + k], attention_mask=mask, past_key_values=cache,
                       cache_position=window_positions, position_ids=positions[..., start : start + k]).logits
        with pytest.raises(ValueError, match=r"`cache_position` must be a \(4,\) tensor"):
            model(input_ids=changed[:, start : start + k + 1], attention_mask=mask, past_key_values=cache,
                  cache_position=window_positions)
        full = model(input_ids=changed, attention_mask=mask).logits
    assert (window - full[:, start : start + k]).abs().max().item() <= ATOL


@pytest.mark.parametrize("fused", [True, False], ids=["F.rms_norm", "explicit-casts"])
def test_rms_norm_is_qwen2s_bit_for_bit_in_half_precision(fused, monkeypatch):
    """F.rms_norm on bf16/fp16 input normalises in fp32 and rounds once, as Qwen2RMSNorm's explicit casts do;
    torch 2.5's computes in the input dtype (1678 of these 4896 bf16 values differed), so there the norm casts
    explicitly (both paths are checked on every torch: the fused one only where torch upcasts)."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from dimple import modeling_dimple
    from dimple.modeling_dimple import DimpleRMSNorm

    if fused and not modeling_dimple.RMS_NORM_UPCASTS:
        pytest.skip(f"torch {torch.__version__}'s F.rms_norm computes half precision in half precision")
    monkeypatch.setattr(modeling_dimple, "RMS_NORM_UPCASTS", fused)
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        ours, qwen = DimpleRMSNorm(96, eps=1e-6).to(dtype), Qwen2RMSNorm(96, eps=1e-6).to(dtype)
        weight = 1.0 + 0.2 * torch.randn(96, generator=gen)
        ours.weight.data.copy_(weight)
        qwen.weight.data.copy_(weight)
        x = (5 * torch.randn(3, 17, 96, generator=gen)).to(dtype)
        assert torch.equal(ours(x), qwen(x)), dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stacked_qkv_projections_compute_the_separate_layers(dtype):
    model = make_model(seed=6).to(dtype)
    batch = image_batch(seed=6)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    attn = model.model.layers[0].self_attn
    separate_products = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
    with torch.no_grad():
        separate = model(**batch).logits
        with model.stacked_qkv_projections():
            assert attn.qkv_weight.shape == (128, 64)  # 4 + 2 + 2 heads of 16, over the hidden size
            assert torch.equal(attn.qkv_weight, torch.cat(separate_products))
            assert model.state_dict().keys() == state.keys()  # the stacked copies are not in the state dict
            stacked = model(**batch).logits
    if dtype == torch.float32:
        assert (stacked - separate).abs().max().item() <= 1e-6
    else:
        torch.testing.assert_close(stacked, separate)
    assert all(layer.self_attn.qkv_weight is None and layer.self_attn.qkv_bias is None for layer in model.model.layers)
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())


def test_stacked_qkv_projections_leave_training_on_the_separate_layers():
    """With gradients enabled the forward uses q_proj/k_proj/v_proj themselves, so they get their gradients."""
    ids, mask = text_batch(seed=7)
    grads = []
    for stacked in (False, True):
        model = make_model(seed=7)
        with model.stacked_qkv_projections() if stacked else contextlib.nullcontext():
            model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(model.model.layers[1].self_attn.k_proj.weight.grad)
    assert grads[0].abs().max() > 0
    assert torch.equal(grads[0], grads[1])


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft reads it (5.23)
def test_stacked_qkv_projections_keep_peft_adapters_and_hooks():
    """A LoRA-wrapped or hooked projection computes something the stacked weights do not: such layers are not
    stacked, and the adapters change the decode's logits exactly as merging them into the weights does."""
    peft = pytest.importorskip("peft")
    model = make_model(seed=8)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op (B = 0); make it count
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    attention = [layer.self_attn for layer in model.model.layers]
    assert not any(attn.can_stack_qkv() for attn in attention)
    ids, mask = text_batch(seed=8)
    with torch.no_grad():
        with model.stacked_qkv_projections():
            assert all(attn.qkv_weight is None for attn in attention)
            adapted = model(input_ids=ids, attention_mask=mask).logits
        merged = lora.merge_and_unload()
        assert all(attn.can_stack_qkv() for attn in attention)
        with merged.stacked_qkv_projections():
            assert all(attn.qkv_weight is not None for attn in attention)
            stacked = merged(input_ids=ids, attention_mask=mask).logits
        handle = merged.model.layers[1].self_attn.k_proj.register_forward_hook(lambda *args: None)
        assert not merged.model.layers[1].self_attn.can_stack_qkv() and merged.model.layers[0].self_attn.can_stack_qkv()
        handle.remove()
    assert (adapted - stacked).abs().max().item() <= ATOL


def test_a_prefilled_decoding_pass_dispatches_18_operators_per_layer():
    """Each operator is at least one CUDA kernel, and launches dominate the 7B step beyond its matrix products
    (README, Performance): this keeps the decoding pass's operator count from creeping back up."""
    from dimple import modeling_dimple

    if not (modeling_dimple.RMS_NORM_UPCASTS and hasattr(torch.ops.aten, "_fused_rms_norm")):
        pytest.skip(f"torch {torch.__version__} has no fused RMSNorm kernel: the norms decompose on every device")
    from dimple_tools.bench.layer_ops import prefilled_pass_operators

    per_layer = prefilled_pass_operators(2) - prefilled_pass_operators(1)
    assert per_layer["aten.addmm"] == 1  # q, k and v in one product (o_proj and the MLP have no bias: mm)
    assert per_layer["aten.mm"] == 4
    assert per_layer["aten.roll"] == per_layer["aten.addcmul"] == 1  # q and k rotated together
    assert per_layer["aten.index_copy_"] == 1  # the keys and values written to the cache together, by position
    assert per_layer["rms_norm"] == 2 and "aten._to_copy" not in per_layer  # no casts around the norms
    assert sum(per_layer.values()) == 18, dict(per_layer)


# --------------------------------------------------------------------------------------------------
# 8. save_pretrained / AutoModel.from_pretrained(trust_remote_code=True) in a fresh process
# --------------------------------------------------------------------------------------------------

_LOAD_SCRIPT = r"""
import json, sys
import torch, transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModel

folder, io_dir = sys.argv[1], sys.argv[2]
inputs = load_file(io_dir + "/inputs.safetensors")
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(**inputs).logits
major = int(transformers.__version__.split(".")[0])
dtype_kw = {"dtype": torch.bfloat16} if major >= 5 else {"torch_dtype": torch.bfloat16}
bf16 = AutoModel.from_pretrained(folder, trust_remote_code=True, **dtype_kw).eval()
with torch.no_grad():
    logits_bf16 = bf16(**inputs).logits
save_file({"logits": logits.contiguous(), "logits_bf16": logits_bf16.float().contiguous()}, io_dir + "/outputs.safetensors")
print(json.dumps({
    "class": type(model).__name__,
    "module": type(model).__module__,
    "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
    "bf16_dtypes": sorted({str(p.dtype) for p in bf16.parameters()}),
    "bf16_logits_dtype": str(logits_bf16.dtype),
}))
"""


def test_save_pretrained_and_load_in_fresh_process(tmp_path, monkeypatch):
    # What `register_for_auto_class("AutoModel")` does (a class attribute), undone after the test; a model
    # loaded with trust_remote_code has it already.
    monkeypatch.setattr(DimpleModel, "_auto_class", "AutoModel")
    model = make_model(seed=10)
    model.config.auto_map = {
        "AutoConfig": "configuration_dimple.DimpleConfig",
        "AutoModel": "modeling_dimple.DimpleModel",
    }
    folder = tmp_path / "tiny-dimple"
    model.save_pretrained(folder)
    for name in ("config.json", "model.safetensors", "configuration_dimple.py", "modeling_dimple.py", "generation_utils.py"):
        assert (folder / name).is_file(), name
    assert (folder / "modeling_dimple.py").read_text() == (ROOT / "modeling_dimple.py").read_text()
    saved_config = json.loads((folder / "config.json").read_text())
    assert saved_config["model_type"] == "dimple"
    assert saved_config["auto_map"]["AutoModel"] == "modeling_dimple.DimpleModel"
    assert saved_config["auto_map"]["AutoConfig"] == "configuration_dimple.DimpleConfig"
    assert saved_config["vision_config"]["fullatt_block_indexes"] == [1]

    batch = image_batch(seed=10)
    with torch.no_grad():
        logits = model(**batch).logits
    io_dir = tmp_path / "io"
    io_dir.mkdir()
    save_file({k: v.contiguous() for k, v in batch.items()}, str(io_dir / "inputs.safetensors"))

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(folder), str(io_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info["class"] == "DimpleModel"
    assert info["module"].startswith("transformers_modules.")  # the saved folder's code, not this checkout
    assert info["dtypes"] == ["torch.float32"]
    assert info["bf16_dtypes"] == ["torch.bfloat16"]
    assert info["bf16_logits_dtype"] == "torch.bfloat16"

    outputs = load_file(str(io_dir / "outputs.safetensors"))
    assert torch.equal(outputs["logits"], logits)
    bf16 = outputs["logits_bf16"]
    real = batch["attention_mask"].bool()
    assert torch.isfinite(bf16).all()
    diff = (bf16 - logits)[real].abs().max().item()
    assert diff <= 0.05 * logits[real].abs().max().item(), diff


# --------------------------------------------------------------------------------------------------
# 9-10. Training: gradient checkpointing, labels
# --------------------------------------------------------------------------------------------------


def _training_batch(seed: int) -> dict:
    batch = image_batch(seed=seed)
    labels = batch["input_ids"].clone()
    labels[:, :-6] = -100  # only the answer (the last tokens) is scored
    batch["labels"] = labels
    return batch


def test_a_text_only_training_batch_gives_the_trainable_image_side_zero_gradients():
    # Zero gradients, not none: data-parallel ranks with and without images then reduce the same parameters
    # (DDP with gradient checkpointing hung; tests/test_training.py runs two processes).
    model = make_model(seed=12).train()
    model.visual.requires_grad_(False)
    ids, mask = text_batch(seed=12)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.img_projector.parameters())
    assert all(p.grad is None for p in model.visual.parameters())  # frozen: untouched
    assert model.model.embed_tokens.weight.grad.any()
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids, attention_mask=mask, labels=ids).loss, loss.detach())
    model.img_projector.requires_grad_(False)
    assert model.image_side_zero(torch.device("cpu")) is None  # nothing trains there: no extra work


@pytest.mark.filterwarnings("ignore:.*gradient_checkpointing_enable.*:FutureWarning")  # renamed in transformers 5
def test_gradient_checkpointing_gives_same_loss_and_gradients():
    model = make_model(seed=11).train()
    batch = _training_batch(seed=11)

    loss = model(**batch).loss
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert reference["visual.blocks.0.attn.qkv.weight"].abs().max() > 0
    model.zero_grad(set_to_none=True)

    model.gradient_checkpointing_enable()
    assert model.model.gradient_checkpointing and model.visual.gradient_checkpointing
    calls = {"text": 0, "vision": 0}
    for key, module in (("text", model.model), ("vision", model.visual)):
        inner = module._gradient_checkpointing_func

        def counted(*args, _inner=inner, _key=key, **kwargs):
            calls[_key] += 1
            return _inner(*args, **kwargs)

        module._gradient_checkpointing_func = counted
    loss_ckpt = model(**batch).loss
    loss_ckpt.backward()
    assert calls == {"text": model.config.num_hidden_layers, "vision": model.config.vision_config.depth}
    assert abs(loss_ckpt.item() - loss.item()) <= 1e-6
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert (param.grad - reference[name]).abs().max().item() <= 1e-6, name

    # A frozen vision tower (the align and instruct stages) is not checkpointed: it records nothing, and 4.x's
    # reentrant checkpoint warned "None of the inputs have requires_grad=True. Gradients will be None".
    model.zero_grad(set_to_none=True)
    model.visual.requires_grad_(False)
    calls.update(text=0, vision=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*requires_grad.*")
        loss_frozen = model(**batch).loss
        loss_frozen.backward()
    assert calls == {"text": model.config.num_hidden_layers, "vision": 0}
    assert abs(loss_frozen.item() - loss.item()) <= 1e-6
    for name, param in model.named_parameters():
        if name.startswith("visual."):
            assert param.grad is None, name
        else:
            assert (param.grad - reference[name]).abs().max().item() <= 1e-6, name


def test_loss_is_shifted_cross_entropy_ignoring_minus_100(model):
    batch = _training_batch(seed=12)
    labels = batch["labels"]
    labels[0, -3] = -100  # a hole inside the answer too
    with torch.no_grad():
        out = model(**batch)
    logits = out.logits[:, :-1].double()
    targets = labels[:, 1:]
    valid = targets != -100
    log_probs = logits.log_softmax(-1)
    nll = -log_probs[valid].gather(-1, targets[valid][:, None]).squeeze(-1)
    assert valid.sum() == 2 * 6 - 1
    assert out.loss.shape == ()
    assert abs(out.loss.item() - nll.mean().item()) <= 1e-6


def test_loss_with_num_items_in_batch_is_the_sum_over_that_count(model):
    """Trainer passes the labelled positions of all micro-batches of an optimizer step: the micro-batch's
    summed cross-entropy ÷ that count (hand-computed), so accumulated losses add up to the large batch's mean."""
    batch = _training_batch(seed=12)
    with torch.no_grad():
        mean = model(**batch).loss
        scaled = model(**batch, num_items_in_batch=torch.tensor(40))
    valid = int((batch["labels"][:, 1:] != -100).sum())
    assert valid == 12
    assert torch.allclose(scaled.loss, mean * valid / 40, rtol=1e-6)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['pixel_value'\]"):
        model(**batch, pixel_value=None)  # a misspelt input is not silently ignored


def test_return_dict_false_and_logits_to_keep(model):
    ids, mask = text_batch(seed=13)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
        as_tuple = model(input_ids=ids, attention_mask=mask, return_dict=False)
    assert last.shape == (3, 1, 300)
    assert torch.allclose(last, full[:, -1:], atol=1e-6)
    assert torch.equal(as_tuple[0], full)


# --------------------------------------------------------------------------------------------------
# 11. Bad input: a ValueError naming the argument, before the model runs
# --------------------------------------------------------------------------------------------------


def _bad_inputs():
    batch = image_batch(seed=14)
    ids, mask, pixels, grid = (batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"))
    fewer_tokens = ids.clone()
    fewer_tokens[0, (ids[0] == IMAGE_ID).nonzero()[0, 0]] = 50
    wrong_grid = grid.clone()
    wrong_grid[1] = torch.tensor([1, 4, 8])
    text_ids, text_mask = text_batch(seed=14, lengths=(8, 6))
    return {
        "image-tokens-vs-features": (dict(batch, input_ids=fewer_tokens), r"image tokens.*input_ids"),
        "pixel-values-width": (dict(batch, pixel_values=pixels[:, :1000]), r"`pixel_values`.*1176"),
        "pixel-values-1d": (dict(batch, pixel_values=pixels.flatten()), r"`pixel_values`"),
        "grid-vs-pixel-values": (dict(batch, image_grid_thw=wrong_grid), r"`image_grid_thw`"),
        # equal totals (16 + 12 tokens), but each row's placeholders are the other image's
        "grids-swapped-between-rows": (
            dict(batch, image_grid_thw=grid.flip(0)), r"`input_ids` row 0 has a run of 16 .*`image_grid_thw` rows it takes in order \(\[0, 1\]\) give 28"
        ),
        "grid-not-mergeable": (
            dict(batch, image_grid_thw=torch.tensor([[1, 8, 8], [1, 3, 16]])),
            r"`image_grid_thw`",
        ),
        # placeholders with nothing to fill them (the grid or position ids alone give the positions)
        "image-tokens-without-pixel-values": (
            {k: v for k, v in batch.items() if k != "pixel_values"},
            r"`input_ids` has 28 placeholder tokens \(id \d+\) but no `pixel_values` were given",
        ),
        "image-tokens-with-position-ids-only": (
            dict(input_ids=ids, attention_mask=mask, position_ids=torch.zeros(3, *ids.shape, dtype=torch.long)),
            r"no `pixel_values`",
        ),
        "pixel-values-without-grid": (
            {k: v for k, v in batch.items() if k != "image_grid_thw"},
            r"`image_grid_thw`",
        ),
        "position-ids-shape": (
            dict(input_ids=text_ids, attention_mask=text_mask, position_ids=torch.zeros(3, 3, 8, dtype=torch.long)),
            r"`position_ids`",
        ),
        "position-ids-2-components": (
            dict(input_ids=text_ids, attention_mask=text_mask, position_ids=torch.zeros(2, 2, 8, dtype=torch.long)),
            r"`position_ids`",
        ),
        "attention-mask-shape": (dict(input_ids=text_ids, attention_mask=text_mask[:, 1:]), r"`attention_mask`"),
        "attention-mask-shape-with-positions": (
            dict(input_ids=text_ids, attention_mask=text_mask[:, 1:], position_ids=text_positions(text_mask)),
            r"`attention_mask`",
        ),
        # a float 0/1 mask would be added to the attention scores by SDPA, not read as "may attend"
        "attention-mask-4d-float": (
            dict(input_ids=text_ids, attention_mask=torch.ones(2, 1, 8, 8)),
            r"`attention_mask` must be .* boolean \(batch, 1, q_len, seq\) = \(2, 1, 8, 8\) .*got torch.float32",
        ),
        "attention-mask-3d": (
            dict(input_ids=text_ids, attention_mask=torch.ones(2, 8, 8, dtype=torch.bool)),
            r"`attention_mask` must be .* of shape \(2, 8, 8\)",
        ),
        "labels-shape": (
            dict(input_ids=text_ids, labels=text_ids[:, 1:]),
            r"`labels` must have the inputs' shape \(batch, seq\) = \(2, 8\), got \(2, 7\)",
        ),
        "labels-with-logits-to-keep": (
            dict(input_ids=text_ids, labels=text_ids, logits_to_keep=3),
            r"`labels` need the logits of every position: leave `logits_to_keep` at 0, got 3",
        ),
        "both-ids-and-embeds": (
            dict(input_ids=text_ids, inputs_embeds=torch.zeros(2, 8, 64)),
            r"input_ids.*inputs_embeds",
        ),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_before_running(model, monkeypatch, case):
    kwargs, pattern = _bad_inputs()[case]
    forbid_language_model(model, monkeypatch)
    with pytest.raises(ValueError, match=pattern):
        model(**kwargs)


@pytest.mark.parametrize(
    "values, pattern",
    [
        (dict(num_attention_heads=0), r"`num_attention_heads` must be an integer >= 1, got 0"),
        (dict(num_key_value_heads=0), r"`num_key_value_heads` must be an integer >= 1, got 0"),
        (dict(num_key_value_heads=3), r"num_attention_heads by num_key_value_heads \(3\)"),
        (dict(hidden_size=100), r"hidden_size \(100\) must be divisible by num_attention_heads \(28\)"),
        (dict(mrope_section=(16, 24, 16)), r"mrope_section \[16, 24, 16\] must sum to head_dim / 2 = 64"),
        (dict(full_attn_mask="false"), r"`full_attn_mask` must be True \(bidirectional, diffusion\) or False \(causal\), got 'false'"),
    ],
)
def test_bad_config_values_are_named(values, pattern):
    from dimple.configuration_dimple import DimpleConfig

    with pytest.raises(ValueError, match=pattern):
        DimpleConfig(**values)


def test_every_config_maps_the_image_text_to_text_class():
    from dimple.configuration_dimple import DimpleConfig

    entry = {"AutoModelForImageTextToText": "modeling_dimple.DimpleModel"}
    assert DimpleConfig().auto_map == entry
    released = {"AutoConfig": "configuration_dimple.DimpleConfig", "AutoModel": "modeling_dimple.DimpleModel"}
    assert DimpleConfig(auto_map=released).auto_map == {**released, **entry}  # a config.json without it
    assert json.loads((ROOT / "config.json").read_text())["auto_map"].items() >= entry.items()


def test_rope_scaling_reads_as_on_qwen2_config(tmp_path):
    """config.json's `"rope_scaling": null` reads back as Qwen2Config's does on the installed transformers: the
    null itself on 4.x (saved again), and on 5.x, where `rope_scaling` is an alias of `rope_parameters`, the
    standard rotary parameters (reading it once raised AttributeError). M-RoPE uses neither; a save and load
    keeps it, without the deprecation warning of the old setter."""
    from transformers import PretrainedConfig, Qwen2Config

    from dimple.configuration_dimple import DimpleConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        config = DimpleConfig.from_pretrained(str(ROOT))
        config.save_pretrained(tmp_path)
        reloaded = DimpleConfig.from_pretrained(tmp_path)
    expected = Qwen2Config(rope_theta=config.rope_theta, rope_scaling=None).rope_scaling
    assert config.rope_scaling == reloaded.rope_scaling == expected
    if isinstance(getattr(PretrainedConfig, "rope_scaling", None), property):
        assert expected == {"rope_theta": 1e6, "rope_type": "default"}
    else:
        assert expected is None and "rope_scaling" in json.loads((tmp_path / "config.json").read_text())
    assert reloaded.rope_theta == 1e6 and reloaded.mrope_section == [16, 24, 24]


def test_forbid_guard_is_effective(model, monkeypatch):
    """The guard used above does stop a valid forward (so the bad-input tests can fail)."""
    ids, mask = text_batch(seed=15)
    forbid_language_model(model, monkeypatch)
    with pytest.raises(AssertionError, match="ran before"):
        model(input_ids=ids, attention_mask=mask)


# --------------------------------------------------------------------------------------------------
# 12. The released checkpoint's layout
# --------------------------------------------------------------------------------------------------


def test_state_dict_layout_matches_release():
    """The 7B config's model, built as users load it, has the release's 733 names and shapes (the reference is
    shipped in tests/data; `make check-layout`)."""
    result = subprocess.run(
        [sys.executable, "-m", "dimple_tools.checkpoint.layout"], cwd=ROOT, capture_output=True, text=True,
        timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "733/733 tensors match, 0 unexpected" in result.stdout


def test_layout_checker_reports_a_wrong_reference(tmp_path):
    reference = json.loads((ROOT / "tests" / "data" / "dimple7b_state_dict.json").read_text())
    reference["lm_head.weight"] = [1, 1]
    reference["visual.extra.weight"] = [3]
    del reference["model.norm.weight"]
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(reference))
    result = subprocess.run(
        [sys.executable, "-m", "dimple_tools.checkpoint.layout", "--reference", str(path)], cwd=ROOT,
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert "missing: visual.extra.weight [3]" in result.stdout
    assert "unexpected: model.norm.weight [3584]" in result.stdout
    assert "shape: lm_head.weight expected [1, 1] got [152064, 3584]" in result.stdout


def test_the_shipped_reference_is_the_release_layout():
    shared = ROOT.parent / "shared" / "dimple7b_state_dict.json"
    if not shared.is_file():
        pytest.skip("../shared/dimple7b_state_dict.json is only in the development workspace")
    assert json.loads((ROOT / "tests" / "data" / "dimple7b_state_dict.json").read_text()) == json.loads(shared.read_text())
