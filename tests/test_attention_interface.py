"""Attention kernels through transformers' `AttentionInterface` (issue 25).

`attn_implementation` "sdpa" (the default) and "eager" are Dimple's own paths; every other name (flash-attention,
flex attention, hub kernels, user-registered functions) is called through transformers' interface, with the mask
in the kernel's format: flash-attention gets the keys' padding (and the vision tower's windows as variable-length
sequences), flex attention a `BlockMask`. Eager, SDPA and flex attention give the same logits in fp32 (1e-5), with
and without left padding, in the language model and the vision tower. flash-attention cannot run on the CPU: a
reference function with flash-attention's contract (registered under a name with "flash" in it) checks the masks
Dimple hands it. transformers 4.46 has no interface: there eager and SDPA are chosen as before.
"""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from dimple import modeling_dimple
from dimple.modeling_dimple import DimpleModel, DimplePrefixCache
from dimple_tools.tiny.configs import tiny_config

from test_modeling import ATOL, assert_close_on, image_batch, make_model, text_batch

HAS_INTERFACE = modeling_dimple.ALL_ATTENTION_FUNCTIONS is not None
needs_interface = pytest.mark.skipif(
    not HAS_INTERFACE, reason="this transformers has no AttentionInterface (4.x): only eager and SDPA exist there"
)
REFERENCE_FLASH = "reference_flash_attention"


def with_attention(model: DimpleModel, implementation: str) -> DimpleModel:
    """A copy of `model` running `implementation` (transformers' `set_attn_implementation` where it exists)."""
    other = copy.deepcopy(model)
    if hasattr(other, "set_attn_implementation") and implementation != REFERENCE_FLASH:
        other.set_attn_implementation(implementation)
    else:  # 4.x, or a name transformers would try to import flash-attn for: the config is what Dimple reads
        other.config._attn_implementation = implementation
    assert other.config._attn_implementation == implementation
    return other


def kernel_context(implementation: str):
    # torch 2.14's CPU code generation for flex attention fails once dynamo turns shapes dynamic (a C++ compile
    # error on `cur_kvSplitSize`): compile each shape statically, as a model serving fixed shapes would.
    if implementation == "flex_attention":
        import torch._dynamo

        return torch._dynamo.config.patch(automatic_dynamic_shapes=False)
    return contextlib.nullcontext()


def reference_flash_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                              cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers' flash-attention contract, in plain torch: `attention_mask` is a (batch, keys) padding mask
    (1 = real) or None, the queries are the last of the keys (bottom-right alignment, also for `is_causal`), padded
    query rows give zeros; `cu_seq_lens_*` pack variable-length sequences into one row. Returns (batch, q, heads,
    head_dim)."""
    is_causal = module.is_causal if is_causal is None else is_causal
    batch, heads, q_len, head_dim = query.shape
    k_len = key.shape[2]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    allowed = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=query.device)
    if cu_seq_lens_q is not None:
        assert attention_mask is None and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
        segment = torch.repeat_interleave(torch.arange(len(cu_seq_lens_q) - 1), cu_seq_lens_q.diff().long())
        assert max_length_q == max_length_k == int(cu_seq_lens_q.diff().max())
        allowed = allowed & (segment[:, None] == segment[None, :])
    if attention_mask is not None:
        assert attention_mask.shape == (batch, k_len), attention_mask.shape
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    if is_causal:
        q_pos = torch.arange(q_len)[:, None] + (k_len - q_len)
        allowed = allowed & (torch.arange(k_len)[None, :] <= q_pos)
    scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else head_dim**-0.5)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    out = probs @ value
    if attention_mask is not None:
        out = out * attention_mask[:, -q_len:].to(out.dtype)[:, None, :, None]
    return out.transpose(1, 2), None


@pytest.fixture(scope="module", autouse=True)
def registered_reference_flash():
    if HAS_INTERFACE:
        modeling_dimple.AttentionInterface.register(REFERENCE_FLASH, reference_flash_attention)
    yield


def logits_with(model, implementation, batch):
    with torch.no_grad(), kernel_context(implementation):
        return with_attention(model, implementation)(**batch).logits


KERNELS = [
    "eager",
    pytest.param("flex_attention", marks=needs_interface),
    pytest.param(REFERENCE_FLASH, marks=needs_interface),
]


@pytest.mark.parametrize("implementation", KERNELS)
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("full_attn_mask", [True, False], ids=["bidirectional", "causal"])
def test_language_model_kernels_give_sdpa_logits(implementation, padded, full_attn_mask):
    model = make_model(seed=21, full_attn_mask=full_attn_mask)
    ids, mask = text_batch(seed=21) if padded else text_batch(seed=21, lengths=(10, 10))
    batch = dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        expected = model(**batch).logits
    assert_close_on(logits_with(model, implementation, batch), expected, mask)


@pytest.mark.parametrize("implementation", KERNELS)
def test_vision_tower_kernels_give_sdpa_features(implementation):
    """Two images whose windows have different lengths (padded segments) and one image alone (equal windows)."""
    model = make_model(seed=22)
    batch = image_batch(seed=22)
    one_grid = batch["image_grid_thw"][:1]
    one_image = batch["pixel_values"][: int(one_grid.prod())]
    other = with_attention(model, implementation)
    with torch.no_grad(), kernel_context(implementation):
        for pixels, grid in ((batch["pixel_values"], batch["image_grid_thw"]), (one_image, one_grid)):
            expected = model.get_image_features(pixels, grid)
            assert (other.get_image_features(pixels, grid) - expected).abs().max().item() <= ATOL
        expected = model(**batch).logits
        assert_close_on(other(**batch).logits, expected, batch["attention_mask"])


@pytest.mark.parametrize("implementation", KERNELS)
def test_cached_passes_give_sdpa_logits(implementation):
    """A tail pass over a prefix cache (queries a window of the cached keys), padded rows, a prepared 4-D mask
    as decoding passes it."""
    model = make_model(seed=23)
    ids, mask = text_batch(seed=23)
    seq, k = ids.shape[1], 4
    positions = torch.arange(seq - k, seq)
    prepared = model.prepare_attention_mask(mask, seq, seq).index_select(2, positions)
    other = with_attention(model, implementation)
    with torch.no_grad(), kernel_context(implementation):
        results = []
        for candidate in (model, other):
            cache = DimplePrefixCache(seq)
            candidate(input_ids=ids, attention_mask=mask, past_key_values=cache)
            tail = candidate(input_ids=ids[:, -k:], attention_mask=prepared, past_key_values=cache,
                             cache_position=positions).logits
            results.append(tail)
    assert_close_on(results[1], results[0], mask[:, -k:])


@needs_interface
def test_decoding_with_a_flash_attention_contract_gives_sdpa_answers():
    """diffusion_generate on a left-padded batch, with prefilling and the dual cache: the prepared masks reach a
    flash-attention kernel as the keys' padding."""
    model = make_model(seed=24)
    ids, mask = text_batch(seed=24, lengths=(9, 6))
    other = with_attention(model, REFERENCE_FLASH)
    for settings in ({}, {"use_cache": True}, {"use_cache": True, "dual_cache": True, "block_length": 2}):
        kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, steps=4, alg="maskgit_plus", temperature=0.0,
                      **settings)
        assert torch.equal(other.diffusion_generate(**kwargs), model.diffusion_generate(**kwargs)), settings


@needs_interface
def test_flash_attention_is_accepted_and_fails_only_for_want_of_the_package():
    """Dimple declares flash-attention support: without the flash-attn package, transformers' own ImportError."""
    for version in (2, 3):
        try:
            model = DimpleModel._from_config(tiny_config(), attn_implementation=f"flash_attention_{version}",
                                             dtype=torch.bfloat16)
        except ImportError as error:
            assert "FlashAttention" in str(error) and "install" in str(error), error
        else:  # flash-attn installed
            assert model.config._attn_implementation == f"flash_attention_{version}"


@needs_interface
def test_set_attn_implementation_switches_the_kernel_at_run_time(monkeypatch):
    model = make_model(seed=25)
    batch = image_batch(seed=25)
    with torch.no_grad():
        expected = model(**batch).logits
    model.set_attn_implementation("eager")
    assert model.config._attn_implementation == "eager"

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA ran after set_attn_implementation('eager')")

    monkeypatch.setattr(F, "scaled_dot_product_attention", no_sdpa)
    with torch.no_grad():
        assert_close_on(model(**batch).logits, expected, batch["attention_mask"])


def test_without_the_interface_other_names_run_sdpa(monkeypatch):
    """transformers 4.x (no AttentionInterface): a name other than eager runs Dimple's SDPA path."""
    model = make_model(seed=26)
    batch = image_batch(seed=26)
    with torch.no_grad():
        expected = model(**batch).logits
    monkeypatch.setattr(modeling_dimple, "ALL_ATTENTION_FUNCTIONS", None)
    model.config._attn_implementation = "flash_attention_2"
    assert modeling_dimple.attention_implementation(model.config) == "sdpa"
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)
