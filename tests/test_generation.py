"""Tests of `generation_utils.py` (diffusion decoding, SPEC §4) on a tiny random Dimple (CPU, fp32).

Oracles: hand-computed schedule counts (plain Python floats, SPEC §4's formula); invariants of the
decode (prompt kept, fixed tokens never change, masks filled, left-to-right for `autoregressive`);
a row decoded alone vs. inside a padded mixed batch; the same decode with and without prefilling.
"""

import contextlib
import linecache
import math
import os
import threading
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BatchFeature, GenerationConfig
from transformers.generation.streamers import BaseStreamer

from dimple.generation_utils import (
    ALGORITHMS,
    DimPipeline,
    DimpleGenerationConfig,
    fill_after_end_of_text,
)
from dimple.modeling_dimple import DimpleModel
from dimple_tools.tiny.configs import (
    BOS_ID,
    EOS_ID,
    IMAGE_ID,
    MASK_ID,
    PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    tiny_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("dim", "dream")
IMAGE_PROMPT = [BOS_ID, 10, 11, VISION_START_ID, IMAGE_ID, IMAGE_ID, IMAGE_ID, IMAGE_ID, VISION_END_ID, 12, 13]
TEXT_PROMPT = [BOS_ID, 20, 21, 22, 23, 24]


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

_MODELS = {}


def tiny_model(init: float = 0.02) -> DimpleModel:
    """A tiny random model, built once per `initializer_range`. A larger range gives peaked (far from
    uniform) distributions, so greedy choices and confidence rankings have no near-ties."""
    if init not in _MODELS:
        torch.manual_seed(0)
        _MODELS[init] = DimpleModel(tiny_config(initializer_range=init)).eval()
    return _MODELS[init]


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def peaked():
    return tiny_model(0.2)


def image_inputs(batch: int = 1, seed: int = 0) -> dict:
    """`batch` rows of the image prompt, each with its own random 4x4-patch image (4 merged tokens)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        input_ids=torch.tensor([IMAGE_PROMPT] * batch),
        pixel_values=torch.randn(16 * batch, 1176, generator=g),
        image_grid_thw=torch.tensor([[1, 4, 4]] * batch),
    )


def text_inputs(batch: int = 1) -> torch.Tensor:
    return torch.tensor([TEXT_PROMPT] * batch)


def run(model, inputs, **kwargs):
    """diffusion_generate with a dict of processor outputs or an id tensor; returns the output object."""
    kwargs.setdefault("return_dict_in_generate", True)
    if isinstance(inputs, dict):
        return model.diffusion_generate(inputs["input_ids"], **{k: v for k, v in inputs.items() if k != "input_ids"}, **kwargs)
    return model.diffusion_generate(inputs, **kwargs)


def force_token_logits(token: int, positions=None, step=None, value: float = 50.0):
    """A logits hook that makes `token` (almost) certain at the given canvas positions (all by default),
    at the given step (every step by default)."""

    def hook(s, x, logits):
        if step is not None and s != step:
            return logits
        logits = logits.clone()
        where = slice(None) if positions is None else positions
        logits[:, where, :] = -value
        logits[:, where, token] = value
        return logits

    return hook


def hand_schedule(step: int, left: int, start: int, steps: int, eps: float):
    """SPEC §4 with plain Python floats: (count, ratio)."""
    taus = [1 + (eps - 1) * i / steps for i in range(steps + 1)]
    r = left / start
    if r <= eps:
        return left, 1.0
    for s in range(step + 1, steps + 1):
        if s == steps:
            return left, 1.0
        if taus[s] < r and math.floor(left * (1 - taus[s] / r)) >= 1:
            return math.floor(left * (1 - taus[s] / r)), 1 - taus[s] / r
    raise AssertionError("unreachable")


class FakeTokenizer:
    """Whitespace tokenizer over a fixed vocabulary (what `response_prior=str` needs of a tokenizer)."""

    vocab = {"{": 20, '"a"': 21, ":": 22, "}": 23, ",": 24, "<|mask|>": MASK_ID, "<|endoftext|>": PAD_ID}

    def __init__(self):
        self.calls = []

    def __call__(self, text, add_special_tokens=True):
        self.calls.append((text, add_special_tokens))
        return {"input_ids": [self.vocab[piece] for piece in text.split()]}


class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.puts, self.ends = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ends += 1


# --------------------------------------------------------------------------------------------------
# 1. Every algorithm x pipeline x cache setting
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("alg", ALGORITHMS)
def test_every_algorithm_pipeline_and_cache(model, alg, pipeline, use_cache):
    torch.manual_seed(1)
    inputs = image_inputs(batch=2)
    prompt_len, new, steps = inputs["input_ids"].shape[1], 6, 4
    token_calls, logits_calls = [], []

    def tokens_hook(step, x, logits):
        token_calls.append((step, tuple(x.shape), None if logits is None else tuple(logits.shape)))
        return x

    def logits_hook(step, x, logits):
        logits_calls.append((step, tuple(logits.shape)))
        return logits

    out = run(
        model,
        inputs,
        max_new_tokens=new,
        steps=steps,
        alg=alg,
        decoding_pipeline=pipeline,
        use_cache=use_cache,
        temperature=0.5 if alg.startswith("origin") else 0.0,
        generation_tokens_hook_func=tokens_hook,
        generation_logits_hook_func=logits_hook,
    )
    seq = out.sequences
    assert seq.shape == (2, prompt_len + new)
    assert torch.equal(seq[:, :prompt_len], inputs["input_ids"])
    # autoregressive commits one position per step (the original's rule): 4 steps leave 2 of 6 masks
    masks_left = new - steps if alg == "autoregressive" else 0
    assert (seq[:, prompt_len:] == MASK_ID).sum(-1).tolist() == [masks_left] * 2
    n = out.num_forward_passes
    assert 1 <= n <= steps
    if pipeline == "dream":
        assert n == steps
    vocab = model.config.vocab_size
    assert [c[0] for c in token_calls] == [None] + list(range(n))
    assert token_calls[0][2] is None
    assert all(c[1] == (2, prompt_len + new) for c in token_calls)
    assert all(c[2] == (2, new, vocab) for c in token_calls[1:])
    assert logits_calls == [(i, (2, new, vocab)) for i in range(n)]


# --------------------------------------------------------------------------------------------------
# 2. The schedule, by hand
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, step, left, start, expected",
    [
        # steps 4, eps 1e-3: tau = 1, 0.75025, 0.5005, 0.25075, 0.001
        (4, 0, 8, 8, 1),  # r = 1: tau_1 -> floor(8 * 0.24975) = 1
        (4, 1, 8, 8, 3),  # tau_2 -> floor(8 * 0.4995) = 3
        (4, 0, 4, 8, 1),  # r = 0.5: tau_1, tau_2 >= r are skipped; tau_3 -> floor(4 * 0.4985) = 1
        (4, 2, 6, 8, 3),  # r = 0.75: tau_3 -> floor(6 * 0.66567) = 3
        (4, 3, 5, 8, 5),  # the last step commits everything left
        # steps 8: tau_i = 1 - 0.124875 i. r = 0.375: tau_6 gives floor(0.994) = 0 (skipped), tau_7 gives 1
        (8, 0, 3, 8, 1),
        (10, 0, 2, 4000, 2),  # r <= eps: everything left
        (64, 0, 64, 64, 1),  # tau_1 gives floor(0.999) = 0 (skipped), tau_2 gives 1
        (64, 10, 40, 64, 1),  # r = 0.625: tau_25 gives floor(0.975) = 0, tau_26 gives 1
        (16, 5, 40, 64, 3),  # r = 0.625: tau_6 = 0.625375 >= r, tau_7 -> floor(40 * 0.0993) = 3
    ],
)
def test_schedule_matches_hand_computation(steps, step, left, start, expected):
    eps = 1e-3
    count, ratio = hand_schedule(step, left, start, steps, eps)
    assert count == expected  # the Python-float helper against the numbers worked out on paper above
    config = DimpleGenerationConfig(steps=steps, eps=eps)
    got_count, got_ratio = DimPipeline(config, steps).schedule(step, torch.tensor([left]), torch.tensor([start]))
    assert got_count.tolist() == [expected]
    assert got_ratio.item() == pytest.approx(ratio, rel=1e-6)


def test_schedule_per_row():
    steps, eps, step = 8, 1e-3, 1
    lefts, starts = [16, 9, 3, 1, 16, 2], [16, 16, 8, 16, 20, 3000]
    config = DimpleGenerationConfig(steps=steps, eps=eps)
    count, ratio = DimPipeline(config, steps).schedule(step, torch.tensor(lefts), torch.tensor(starts))
    expected = [hand_schedule(step, l, s, steps, eps) for l, s in zip(lefts, starts)]
    assert count.tolist() == [c for c, _ in expected]
    assert ratio.tolist() == pytest.approx([r for _, r in expected], rel=1e-6)
    # Rows are independent: each row alone gives the same count as inside the batch.
    for i, (l, s) in enumerate(zip(lefts, starts)):
        alone, _ = DimPipeline(config, steps).schedule(step, torch.tensor([l]), torch.tensor([s]))
        assert alone.item() == count[i].item()


# --------------------------------------------------------------------------------------------------
# 3. Confident decoding
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("alg", ["maskgit_plus", "origin", "entropy"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_mask_token_is_never_generated(model, pipeline, alg, temperature):
    # Even where the model's top choice is <|mask|>, a committed position gets a real token (a committed
    # mask would be re-opened, and `dim` could end with masks in the answer).
    def hook(step, x, logits):
        logits = logits.clone()
        logits[..., MASK_ID] = 30.0
        logits[..., 42] = 29.0
        return logits

    torch.manual_seed(0)
    out = run(model, image_inputs(), max_new_tokens=8, steps=4, alg=alg, decoding_pipeline=pipeline,
              temperature=temperature, top_k=2 if temperature else None, generation_logits_hook_func=hook,
              output_history=True)
    canvas = out.sequences[:, len(IMAGE_PROMPT) :]
    assert (canvas == 42).all()
    for before, after in zip(out.history, out.history[1:]):
        committed = before != MASK_ID
        assert torch.equal(after[committed], before[committed])  # committed tokens stay


def test_threshold_zero_is_the_schedule(model):
    inputs = image_inputs()
    common = dict(max_new_tokens=10, steps=10, alg="maskgit_plus", output_history=True)
    a = run(model, inputs, alg_p_threshold=0.0, **common)
    b = run(model, inputs, alg_p_threshold=None, **common)
    assert torch.equal(a.sequences, b.sequences)
    assert a.num_forward_passes == b.num_forward_passes
    assert all(torch.equal(x, y) for x, y in zip(a.history, b.history))


def test_threshold_everything_passes_finishes_in_one_pass(model):
    inputs = image_inputs()
    out = run(
        model,
        inputs,
        max_new_tokens=10,
        steps=10,
        alg="maskgit_plus",
        alg_p_threshold=0.5,
        generation_logits_hook_func=force_token_logits(42),
    )
    assert out.num_forward_passes == 1
    assert (out.sequences[:, inputs["input_ids"].shape[1] :] == 42).all()


@pytest.mark.parametrize("alg", ALGORITHMS)
@pytest.mark.parametrize("threshold", [None, 0.9])
def test_one_step_commits_everything(model, alg, threshold):
    torch.manual_seed(0)
    out = run(model, image_inputs(), max_new_tokens=9, steps=1, alg=alg, alg_p_threshold=threshold)
    assert out.num_forward_passes == 1
    # autoregressive without a threshold commits one position per step, the last one too (the original's rule)
    masks_left = 8 if alg == "autoregressive" and threshold is None else 0
    assert int((out.sequences == MASK_ID).sum()) == masks_left


def test_threshold_commits_the_confident_positions(model):
    # A threshold that only two positions pass: exactly those are committed at step 0.
    inputs = image_inputs()
    out = run(
        model,
        inputs,
        max_new_tokens=8,
        steps=8,
        alg="maskgit_plus",
        alg_p_threshold=0.5,
        output_history=True,
        generation_logits_hook_func=force_token_logits(42, positions=[2, 5], step=0),
    )
    first = out.history[0][0, inputs["input_ids"].shape[1] :]
    assert (first != MASK_ID).nonzero().flatten().tolist() == [2, 5]
    assert first[[2, 5]].tolist() == [42, 42]


# --------------------------------------------------------------------------------------------------
# 4. autoregressive is left to right
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline, steps", [("dim", 8), ("dim", 3), ("dream", 5)])
@pytest.mark.parametrize("use_cache", [False, True])
def test_autoregressive_is_left_to_right(model, pipeline, steps, use_cache):
    # One position per step, the leftmost mask, in both pipelines (tests/test_decoding_oracles.py has the
    # traces by hand); with fewer steps than masks the rest stays masked.
    inputs = image_inputs(batch=2)
    prompt_len = inputs["input_ids"].shape[1]
    out = run(
        model, inputs, max_new_tokens=8, steps=steps, alg="autoregressive", decoding_pipeline=pipeline,
        use_cache=use_cache, output_history=True,
    )
    assert out.num_forward_passes == len(out.history) == min(steps, 8)
    for step, x in enumerate(out.history):
        committed = x[:, prompt_len:] != MASK_ID
        assert committed.tolist() == [[j <= step for j in range(8)]] * 2


# --------------------------------------------------------------------------------------------------
# 5. Determinism and seeds
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_greedy_is_deterministic(model, pipeline):
    inputs = image_inputs()
    common = dict(max_new_tokens=8, steps=4, alg="maskgit_plus", decoding_pipeline=pipeline, output_history=True)
    torch.manual_seed(0)
    a = run(model, inputs, **common)
    torch.manual_seed(123)
    b = run(model, inputs, **common)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.history, b.history))


@pytest.mark.parametrize("alg", ["maskgit_plus", "origin", "topk_margin"])
@pytest.mark.parametrize("pipeline", PIPELINES)
def test_sampling_is_reproducible(model, alg, pipeline):
    inputs = image_inputs()
    common = dict(
        max_new_tokens=8, steps=4, alg=alg, decoding_pipeline=pipeline, temperature=1.0, top_p=0.9, top_k=20,
        output_history=True,
    )
    torch.manual_seed(7)
    a = run(model, inputs, **common)
    torch.manual_seed(7)
    b = run(model, inputs, **common)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.history, b.history))
    # An explicit generator: the global seed does not matter.
    torch.manual_seed(1)
    c = run(model, inputs, generator=torch.Generator().manual_seed(11), **common)
    torch.manual_seed(2)
    d = run(model, inputs, generator=torch.Generator().manual_seed(11), **common)
    assert torch.equal(c.sequences, d.sequences)
    # Different seeds (almost surely) give different answers on a near-uniform 300-token model.
    answers = set()
    for seed in range(4):
        torch.manual_seed(seed)
        answers.add(tuple(run(model, inputs, **common).sequences[0].tolist()))
    assert len(answers) > 1


def test_top_k_one_is_greedy(model):
    # top_k=1 leaves only the argmax: sampling at any temperature gives the greedy tokens.
    inputs = image_inputs()
    common = dict(max_new_tokens=8, steps=8, alg="maskgit_plus")
    greedy = run(model, inputs, **common).sequences
    torch.manual_seed(3)
    sampled = run(model, inputs, temperature=1.0, top_k=1, **common).sequences
    assert torch.equal(greedy, sampled)


SCORING_SETTINGS = [
    dict(alg="maskgit_plus", alg_p_threshold=0.3, use_cache=True),
    dict(alg="origin", temperature=1.0, top_p=0.9),
    dict(alg="topk_margin", temperature=0.7, top_k=20, alg_temp=0.5),
    dict(alg="entropy", temperature=1.0, decoding_pipeline="dream", use_cache=True),
    dict(alg="origin", temperature=1.0, decoding_pipeline="dream"),
    dict(alg="maskgit_plus", temperature=1.0, block_length=4, dual_cache=True),
]


@pytest.mark.parametrize("settings", SCORING_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_the_head_and_scoring_run_on_masked_positions_only(peaked, settings):
    """Without hooks the head runs on the masked positions of the canvas only (those a step scores). A hook
    gets the logits of every position; the tokens are the same, sampled ones included: scoring (and so the
    random draws) covers the masked positions in both cases, as the reference's `logits[mask_index]`."""
    inputs = image_inputs(batch=2)
    prompt_len, new = inputs["input_ids"].shape[1], 8
    common = dict(max_new_tokens=new, steps=8, output_history=True, **settings)
    head_rows = []
    handle = peaked.lm_head.register_forward_pre_hook(lambda m, args: head_rows.append(args[0].shape[:-1].numel()))
    try:
        plain = run(peaked, inputs, generator=torch.Generator().manual_seed(5), **common)
        rows_without_hooks = list(head_rows)
        head_rows.clear()
        hooked = run(peaked, inputs, generator=torch.Generator().manual_seed(5), **common,
                     generation_logits_hook_func=lambda step, x, logits: logits,
                     generation_tokens_hook_func=lambda step, x, logits: x)
    finally:
        handle.remove()
    assert torch.equal(plain.sequences, hooked.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.history, hooked.history))
    block = settings.get("block_length", new)
    assert head_rows == [2 * block] * hooked.num_forward_passes  # with hooks: every position of the block
    canvases = [torch.full((2, new), MASK_ID)] + [x[:, prompt_len:] for x in plain.history[:-1]]
    masked_per_pass = []
    for canvas in canvases:
        masks = canvas == MASK_ID
        first_block = next(i for i in range(0, new, block) if masks[:, i : i + block].any() or i + block == new)
        masked_per_pass.append(int(masks[:, first_block : first_block + block].sum()))
    assert rows_without_hooks == masked_per_pass
    assert sum(rows_without_hooks) < 2 * new * plain.num_forward_passes


# --------------------------------------------------------------------------------------------------
# 6. Prefilling
# --------------------------------------------------------------------------------------------------


def capture_logits(store):
    def hook(step, x, logits):
        store.append(logits.clone())
        return logits

    return hook


@pytest.mark.parametrize("inputs_kind", ["image", "text"])
def test_prefilling_first_step_equals_no_cache(model, inputs_kind):
    inputs = image_inputs() if inputs_kind == "image" else {"input_ids": text_inputs(2)}
    prompt_len = inputs["input_ids"].shape[1]
    results = {}
    for use_cache in (False, True):
        logits = []
        out = run(
            model, inputs, max_new_tokens=8, steps=8, alg="maskgit_plus", use_cache=use_cache, output_history=True,
            generation_logits_hook_func=capture_logits(logits),
        )
        results[use_cache] = (out, logits)
    (plain, plain_logits), (cached, cached_logits) = results[False], results[True]
    assert (plain_logits[0] - cached_logits[0]).abs().max().item() <= 1e-6
    # One token committed per step: the first step's commit is the same.
    assert torch.equal(plain.history[0], cached.history[0])
    assert int((plain.history[0][:, prompt_len:] != MASK_ID).sum(-1).max()) == 1
    assert plain.num_forward_passes == cached.num_forward_passes
    # Later steps reuse the prompt's first-step keys/values (an approximation): report the agreement.
    agree = (plain.sequences[:, prompt_len:] == cached.sequences[:, prompt_len:]).float().mean().item()
    print(f"prefilling vs. no cache, tiny random model ({inputs_kind}): {agree:.0%} of answer tokens agree")


def test_prefilling_reuses_the_prefix_cache(model, monkeypatch):
    # The first step runs the whole sequence; later steps only the last prompt token and the canvas;
    # images are encoded once.
    inputs = image_inputs()
    prompt_len, new = inputs["input_ids"].shape[1], 6
    lengths, visual_calls = [], []
    forward = model.decoder_forward
    visual_forward = model.visual.forward

    def counting_forward(*args, **kwargs):
        lengths.append(kwargs["inputs_embeds"].shape[1])
        return forward(*args, **kwargs)

    def counting_visual(*args, **kwargs):
        visual_calls.append(1)
        return visual_forward(*args, **kwargs)

    monkeypatch.setattr(model, "decoder_forward", counting_forward)
    monkeypatch.setattr(model.visual, "forward", counting_visual)
    out = run(model, inputs, max_new_tokens=new, steps=new, alg="maskgit_plus", use_cache=True)
    assert lengths == [prompt_len + new] + [new + 1] * (out.num_forward_passes - 1)
    assert len(visual_calls) == 1
    lengths.clear()
    visual_calls.clear()
    out = run(model, inputs, max_new_tokens=new, steps=new, alg="maskgit_plus", use_cache=False)
    assert lengths == [prompt_len + new] * out.num_forward_passes
    assert len(visual_calls) == 1


@pytest.mark.parametrize("use_cache", [False, True])
def test_decoding_stacks_qkv_and_gives_the_tokens_of_separate_projections(model, use_cache):
    """Decoding runs q/k/v as one product over stacked weights (only while it runs): the same tokens as the
    separate projections, which a hooked q_proj keeps (its hook then sees every pass)."""
    stacked_during_steps = []

    def record_stacking(step, x, logits):
        stacked_during_steps.append([layer.self_attn.qkv_weight is not None for layer in model.model.layers])
        return x

    settings = dict(max_new_tokens=8, steps=8, alg="maskgit_plus", use_cache=use_cache,
                    generation_tokens_hook_func=record_stacking)
    stacked = run(model, image_inputs(), **settings)
    assert stacked_during_steps == [[True, True]] * (stacked.num_forward_passes + 1)  # + the hook's step None
    assert all(layer.self_attn.qkv_weight is None for layer in model.model.layers)  # freed after decoding

    stacked_during_steps.clear()
    hook_calls = []
    handles = [layer.self_attn.q_proj.register_forward_hook(lambda *args: hook_calls.append(1))
               for layer in model.model.layers]
    try:
        separate = run(model, image_inputs(), **settings)
    finally:
        for handle in handles:
            handle.remove()
    assert stacked_during_steps == [[False, False]] * (separate.num_forward_passes + 1)
    assert len(hook_calls) == 2 * separate.num_forward_passes
    assert torch.equal(stacked.sequences, separate.sequences)


def test_concurrent_decodes_share_the_stacked_copies(model):
    """A decode in another thread that ends first must not free the stacked q/k/v copies a running decode (and
    its captured CUDA graph) still uses: they live until the last decode ends."""
    settings = dict(max_new_tokens=8, steps=8, alg="maskgit_plus", use_cache=True)
    alone = run(model, image_inputs(), **settings).sequences
    other_done, results, stacked_after_other = threading.Event(), {}, []

    def other_decode():
        try:
            results["other"] = run(model, image_inputs(), **settings).sequences
        finally:
            other_done.set()

    other = threading.Thread(target=other_decode)

    def run_the_other_decode_at_step_1(step, x, logits):
        if step == 1:
            other.start()
            assert other_done.wait(120)
            stacked_after_other.append([layer.self_attn.qkv_weight is not None for layer in model.model.layers])
        return x

    first = run(model, image_inputs(), generation_tokens_hook_func=run_the_other_decode_at_step_1, **settings)
    other.join()
    assert stacked_after_other == [[True, True]]
    assert torch.equal(first.sequences, alone) and torch.equal(results["other"], alone)
    assert all(layer.self_attn.qkv_weight is None for layer in model.model.layers)


def test_nested_stacking_contexts_share_one_copy(model):
    attn = model.model.layers[0].self_attn
    with model.stacked_qkv_projections():
        outer = attn.qkv_weight
        with model.stacked_qkv_projections():
            assert attn.qkv_weight is outer
        assert attn.qkv_weight is outer
    assert attn.qkv_weight is None


# --------------------------------------------------------------------------------------------------
# 7. Decisions per row
# --------------------------------------------------------------------------------------------------


def mixed_batch():
    """Row 0: the image prompt (11 tokens); row 1: a text prompt (6 tokens), left-padded."""
    image = image_inputs()
    pad = len(IMAGE_PROMPT) - len(TEXT_PROMPT)
    ids = torch.tensor([IMAGE_PROMPT, [PAD_ID] * pad + TEXT_PROMPT])
    mask = torch.tensor([[1] * len(IMAGE_PROMPT), [0] * pad + [1] * len(TEXT_PROMPT)])
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=image["pixel_values"], image_grid_thw=image["image_grid_thw"])
    return batch, image, {"input_ids": text_inputs()}


@pytest.mark.parametrize(
    "settings",
    [
        dict(alg="maskgit_plus", use_cache=False),
        dict(alg="maskgit_plus", use_cache=True),
        dict(alg="maskgit_plus", use_cache=False, alg_p_threshold=0.05),
        dict(alg="maskgit_plus", use_cache=True, alg_p_threshold=0.05),
        dict(alg="autoregressive", use_cache=False),
        dict(alg="autoregressive", use_cache=True),
        dict(alg="topk_margin", use_cache=False, decoding_pipeline="dream"),
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_each_row_decodes_as_alone(peaked, settings):
    batch, image_alone, text_alone = mixed_batch()
    common = dict(max_new_tokens=10, steps=10, output_history=True, **settings)
    together = run(peaked, batch, **common)
    alone = [run(peaked, image_alone, **common), run(peaked, text_alone, **common)]
    prompt_len = batch["input_ids"].shape[1]
    assert torch.equal(together.sequences[:, :prompt_len], batch["input_ids"])
    for row, single in enumerate(alone):
        single_prompt = single.sequences.shape[1] - 10
        assert torch.equal(together.sequences[row, prompt_len:], single.sequences[0, single_prompt:]), row
        # The trajectory too: step by step, as long as the row was still decoding.
        for step, x in enumerate(single.history):
            assert torch.equal(together.history[step][row, prompt_len:], x[0, single_prompt:]), (row, step)
    if settings.get("alg_p_threshold"):
        # Confident decoding lets the rows finish at different steps; the batch runs until both are done.
        assert together.num_forward_passes == max(s.num_forward_passes for s in alone)


# --------------------------------------------------------------------------------------------------
# 8. num_return_sequences
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_cache", [False, True])
def test_num_return_sequences_with_image(model, use_cache):
    inputs = image_inputs()
    out = run(model, inputs, max_new_tokens=8, steps=4, alg="maskgit_plus", num_return_sequences=3, use_cache=use_cache)
    assert out.sequences.shape == (3, len(IMAGE_PROMPT) + 8)
    assert torch.equal(out.sequences[0], out.sequences[1]) and torch.equal(out.sequences[0], out.sequences[2])
    single = run(model, inputs, max_new_tokens=8, steps=4, alg="maskgit_plus", use_cache=use_cache)
    assert torch.equal(out.sequences[:1], single.sequences)


def test_num_return_sequences_batch_order_and_sampling(model):
    # Two prompts (different images), 2 answers each: rows are prompt-major, as in transformers.
    inputs = image_inputs(batch=2)
    common = dict(max_new_tokens=8, steps=4)
    greedy = run(model, inputs, alg="maskgit_plus", num_return_sequences=2, **common).sequences
    assert greedy.shape == (4, len(IMAGE_PROMPT) + 8)
    for i in range(2):
        alone = dict(input_ids=inputs["input_ids"][i : i + 1], pixel_values=inputs["pixel_values"][16 * i : 16 * (i + 1)],
                     image_grid_thw=inputs["image_grid_thw"][i : i + 1])
        expected = run(model, alone, alg="maskgit_plus", **common).sequences[0]
        assert torch.equal(greedy[2 * i], expected) and torch.equal(greedy[2 * i + 1], expected)
    torch.manual_seed(0)
    sampled = run(model, inputs, alg="origin", temperature=1.0, num_return_sequences=2, **common).sequences
    assert sampled.shape == (4, len(IMAGE_PROMPT) + 8)
    assert not (sampled == MASK_ID).any()
    assert not torch.equal(sampled[0], sampled[1])  # independent samples of one prompt


@pytest.mark.parametrize(
    "settings",
    [dict(use_cache=False), dict(use_cache=True), dict(use_cache=True, block_length=4, dual_cache=True)],
    ids=["no-prefilling", "prefilling", "dual-cache"],
)
def test_num_return_sequences_of_two_different_prompts(peaked, settings):
    """Two different prompts (an image prompt and a shorter, left-padded text prompt), 2 answers each, greedy:
    rows are prompt-major and every row, its prompt tokens included, equals that prompt decoded alone."""
    batch, image_alone, text_alone = mixed_batch()
    common = dict(max_new_tokens=8, steps=8, alg="maskgit_plus", **settings)
    out = run(peaked, batch, num_return_sequences=2, **common).sequences
    prompt_len = batch["input_ids"].shape[1]
    assert out.shape == (4, prompt_len + 8)
    for prompt, alone in enumerate((image_alone, text_alone)):
        single = run(peaked, alone, **common).sequences[0]
        for row in (2 * prompt, 2 * prompt + 1):
            assert torch.equal(out[row, :prompt_len], batch["input_ids"][prompt]), (prompt, row)
            assert torch.equal(out[row, prompt_len - (single.shape[0] - 8):], single), (prompt, row)
    assert not torch.equal(out[0, prompt_len:], out[2, prompt_len:])  # the prompts' answers differ: a real check


def test_num_return_sequences_sampling_keeps_each_rows_prompt(peaked):
    batch, _, _ = mixed_batch()
    torch.manual_seed(0)
    out = run(peaked, batch, max_new_tokens=8, steps=8, alg="origin", temperature=1.0, num_return_sequences=3).sequences
    prompt_len = batch["input_ids"].shape[1]
    for row in range(6):
        assert torch.equal(out[row, :prompt_len], batch["input_ids"][row // 3]), row
    assert not (out[:, prompt_len:] == MASK_ID).any()


def test_num_return_sequences_with_a_shared_prior(model):
    # A one-row prior with a batch of 2 prompts and 3 samples each.
    prior = [20, MASK_ID, 23]
    out = run(model, text_inputs(2), max_new_tokens=6, steps=6, alg="maskgit_plus", num_return_sequences=3, response_prior=prior)
    canvas = out.sequences[:, len(TEXT_PROMPT) :]
    assert canvas.shape == (6, 6)
    assert (canvas[:, 0] == 20).all() and (canvas[:, 2] == 23).all()


# --------------------------------------------------------------------------------------------------
# 9. Structure priors
# --------------------------------------------------------------------------------------------------

JSON_FRAME = [20, 21, 22, MASK_ID, MASK_ID, 23]  # { "a" : <mask> <mask> }


def check_prior(out, prompt_len, prior_rows):
    """Non-mask prior tokens are identical in the output and in every history step."""
    prior_rows = torch.as_tensor(prior_rows)
    fixed = prior_rows != MASK_ID
    width = prior_rows.shape[1]
    for x in (*out.history, out.sequences):
        canvas = x[:, prompt_len : prompt_len + width]
        assert torch.equal(canvas[fixed.expand_as(canvas)], prior_rows.expand_as(canvas)[fixed.expand_as(canvas)])
    assert not (out.sequences == MASK_ID).any()


@pytest.mark.parametrize("alg", ALGORITHMS)
@pytest.mark.parametrize("use_cache", [False, True])
def test_prior_as_list_of_ids(model, alg, use_cache):
    torch.manual_seed(0)
    inputs = image_inputs()
    out = run(model, inputs, max_new_tokens=8, steps=8, alg=alg, use_cache=use_cache, output_history=True,
              temperature=0.5 if alg.startswith("origin") else 0.0, response_prior=JSON_FRAME)
    check_prior(out, len(IMAGE_PROMPT), [JSON_FRAME])
    # Only the 4 masks of the canvas were generated: the frame's masks and the 2 after it.
    assert len(out.history) <= 4


def test_prior_as_batch_tensor(model):
    inputs = image_inputs(batch=2)
    prior = torch.tensor([JSON_FRAME, [20, 21, 22, MASK_ID, 24, MASK_ID]])
    out = run(model, inputs, max_new_tokens=8, steps=8, alg="maskgit_plus", output_history=True, response_prior=prior)
    check_prior(out, len(IMAGE_PROMPT), prior)


def test_prior_as_string_with_tokenizer(model):
    tokenizer = FakeTokenizer()
    text = '{ "a" : <|mask|> <|mask|> }'
    out = run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus", output_history=True,
              response_prior=text, tokenizer=tokenizer)
    assert tokenizer.calls == [(text, False)]
    check_prior(out, len(IMAGE_PROMPT), [JSON_FRAME])

    class Processor:  # a processor holding the tokenizer works as well
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

    again = run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus", response_prior=text,
                tokenizer=Processor(FakeTokenizer()))
    assert torch.equal(again.sequences, out.sequences)


@pytest.mark.parametrize("frame", [JSON_FRAME, [20, MASK_ID, MASK_ID, EOS_ID]], ids=["json", "with-end-of-text"])
def test_prior_matches_a_tokens_hook(model, frame):
    # The prior argument is the hook the release used for priors, made an argument; an end-of-text written
    # either way ends the answer there (the masks after it become padding before the first step).
    prompt_len = len(IMAGE_PROMPT)

    def hook(step, x, logits):
        if step is None:
            x = x.clone()
            x[:, prompt_len : prompt_len + len(frame)] = torch.tensor(frame)
        return x

    common = dict(max_new_tokens=8, steps=8, alg="maskgit_plus", output_history=True)
    a = run(model, image_inputs(), response_prior=frame, **common)
    b = run(model, image_inputs(), generation_tokens_hook_func=hook, **common)
    assert torch.equal(a.sequences, b.sequences)
    assert a.num_forward_passes == b.num_forward_passes
    if EOS_ID in frame:
        assert (b.history[0][0, prompt_len + len(frame) :] == PAD_ID).all() and b.num_forward_passes <= 2


@pytest.mark.parametrize("end_id", [PAD_ID, EOS_ID])
@pytest.mark.parametrize("use_cache", [False, True])
def test_end_of_text_in_prior_fixes_the_length(model, end_id, use_cache):
    prompt_len = len(IMAGE_PROMPT)
    prior = [20, MASK_ID, MASK_ID, end_id]
    out = run(model, image_inputs(), max_new_tokens=10, steps=10, alg="maskgit_plus", output_history=True,
              use_cache=use_cache, response_prior=prior)
    for x in out.history:
        assert x[0, prompt_len + 3] == end_id
        assert (x[0, prompt_len + 4 :] == PAD_ID).all()
    assert out.sequences[0, prompt_len] == 20
    assert not (out.sequences == MASK_ID).any()
    assert out.num_forward_passes <= 2  # only two masks to fill


# --------------------------------------------------------------------------------------------------
# 10. stop_at_eos
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("end_id", [EOS_ID, PAD_ID])
def test_stop_at_eos(model, end_id):
    prompt_len, new = len(IMAGE_PROMPT), 10
    hook = force_token_logits(end_id, positions=[2], step=0)
    common = dict(max_new_tokens=new, steps=new, alg="maskgit_plus", output_history=True, generation_logits_hook_func=hook)
    stop = run(model, image_inputs(), stop_at_eos=True, **common)
    plain = run(model, image_inputs(), stop_at_eos=False, **common)
    first = stop.history[0][0, prompt_len:]
    assert first[2] == end_id
    assert (first[3:] == PAD_ID).all()
    assert (first[:2] == MASK_ID).all()
    assert stop.num_forward_passes < plain.num_forward_passes
    assert stop.num_forward_passes <= 3
    assert not (stop.sequences == MASK_ID).any()
    # Without it, the answer after the end-of-text is generated (the release's behaviour).
    assert (plain.history[0][0, prompt_len + 3 :] == MASK_ID).all()


def test_fill_after_end_of_text():
    canvas = torch.tensor([[8, 5, 2, 8, 7, 8], [8, 8, 8, 8, 8, 8], [0, 8, 8, 8, 8, 8]])
    out = fill_after_end_of_text(canvas, MASK_ID, torch.tensor([0, 2]), PAD_ID)
    assert out.tolist() == [[8, 5, 2, 0, 7, 0], [8, 8, 8, 8, 8, 8], [0, 0, 0, 0, 0, 0]]


# --------------------------------------------------------------------------------------------------
# 11. streamer
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_streamer_receives_the_canvas_after_every_step(model, pipeline):
    streamer = RecordingStreamer()
    inputs = image_inputs(batch=2)
    out = run(model, inputs, max_new_tokens=6, steps=4, alg="maskgit_plus", decoding_pipeline=pipeline,
              streamer=streamer, output_history=True)
    assert streamer.ends == 1
    assert len(streamer.puts) == out.num_forward_passes == len(out.history)
    prompt_len = inputs["input_ids"].shape[1]
    for put, x in zip(streamer.puts, out.history):
        assert put.shape == (2, 6)
        assert torch.equal(put, x[:, prompt_len:])
    assert torch.equal(streamer.puts[-1], out.sequences[:, prompt_len:])


class WordTokenizer:
    """What transformers' text streamers need of a tokenizer: `decode`, here one word per id."""

    def decode(self, ids, **kwargs):
        return "".join(f"{int(i)} " for i in ids)


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus"])
def test_transformers_text_streamers_get_the_answer_once_in_order(model, alg):
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(WordTokenizer(), skip_prompt=True, timeout=10)
    out = run(model, image_inputs(), max_new_tokens=8, steps=8, alg=alg, response_prior=[MASK_ID] * 5 + [EOS_ID],
              streamer=streamer, generator=torch.Generator().manual_seed(0))
    prompt_len = len(IMAGE_PROMPT)
    assert out.sequences[0, prompt_len + 5] == EOS_ID
    answer = out.sequences[0, prompt_len:].tolist()
    end = min(answer.index(i) for i in (EOS_ID, PAD_ID) if i in answer)
    expected = "".join(f"{i} " for i in answer[:end])  # up to the first end-of-text
    assert end > 0
    assert "".join(streamer) == expected


def test_a_streamer_is_ended_when_decoding_fails(model):
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(WordTokenizer(), timeout=10)

    def failing_hook(step, x, logits):
        if step == 1:
            raise RuntimeError("hook failed")
        return x

    with pytest.raises(RuntimeError, match="hook failed"):
        run(model, text_inputs(), max_new_tokens=8, steps=8, streamer=streamer, generation_tokens_hook_func=failing_hook)
    list(streamer)  # ends (the stop signal was sent) instead of waiting for the timeout


def test_a_text_streamer_needs_a_single_answer(model):
    from transformers import TextStreamer

    with pytest.raises(ValueError, match=r"`streamer`: transformers' text streamers follow one answer .*got 2"):
        model.diffusion_generate(text_inputs(), num_return_sequences=2, streamer=TextStreamer(WordTokenizer()))


# --------------------------------------------------------------------------------------------------
# 12. generate and processor outputs
# --------------------------------------------------------------------------------------------------


def test_generate_ends_each_answer_at_its_first_end_of_text(model):
    """Generic callers decode `generate`'s output with `batch_decode(skip_special_tokens=True)`: tokens committed
    after the end-of-text (a diffusion canvas has them) become padding, as transformers pads finished rows."""
    prompt_len = len(TEXT_PROMPT)
    prior = [20, EOS_ID, 21, MASK_ID, 22, PAD_ID, 23, MASK_ID]
    hook = lambda step, x, logits: x if step is not None else torch.cat(  # noqa: E731  (tokens after the end)
        [x[:, :prompt_len], torch.tensor([prior])], dim=1)
    raw = model.diffusion_generate(text_inputs(), max_new_tokens=8, steps=8, generation_tokens_hook_func=hook)
    assert raw[0, prompt_len:].tolist()[:3] == [20, EOS_ID, 21]  # the raw canvas keeps what was committed
    ended = model.generate(text_inputs(), max_new_tokens=8, steps=8, generation_tokens_hook_func=hook,
                           return_dict_in_generate=True)
    assert ended.sequences[0, prompt_len:].tolist() == [20, EOS_ID] + [PAD_ID] * 6
    assert torch.equal(ended.sequences[:, :prompt_len], raw[:, :prompt_len])


def test_generate_routes_to_diffusion_generate(model):
    inputs = image_inputs()
    common = dict(max_new_tokens=8, steps=4, alg="maskgit_plus")
    expected = model.diffusion_generate(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                        image_grid_thw=inputs["image_grid_thw"], **common)
    assert isinstance(expected, torch.Tensor)
    got = model.generate(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                         image_grid_thw=inputs["image_grid_thw"], **common)
    assert torch.equal(got, expected)
    got = model.generate(**inputs, **common)
    assert torch.equal(got, expected)
    assert torch.equal(model.diffusion_generate(dict(inputs), **common), expected)
    assert torch.equal(model.generate(BatchFeature(dict(inputs)), **common), expected)
    with_mask = dict(inputs, attention_mask=torch.ones_like(inputs["input_ids"]))
    assert torch.equal(model.diffusion_generate(with_mask, **common), expected)


# --------------------------------------------------------------------------------------------------
# 13. Generation config
# --------------------------------------------------------------------------------------------------


def test_generation_config_defaults_and_overrides(model, monkeypatch):
    config = model._dimple_generation_config(None, {})
    assert config.top_p is None and config.top_k is None
    assert config.temperature == 0.0
    assert config.mask_token_id == MASK_ID
    assert config.pad_token_id == PAD_ID

    monkeypatch.setattr(model, "generation_config", GenerationConfig(max_new_tokens=7, steps=7, alg="maskgit_plus"))
    config = model._dimple_generation_config(None, {})
    assert (config.max_new_tokens, config.steps, config.alg) == (7, 7, "maskgit_plus")
    assert config.top_p is None and config.top_k is None
    out = model.diffusion_generate(text_inputs())
    assert out.shape == (1, len(TEXT_PROMPT) + 7)
    assert not (out == MASK_ID).any()
    # kwargs override the model's generation config.
    kwargs = {"steps": 3, "top_k": 5}
    config = model._dimple_generation_config(None, kwargs)
    assert (config.max_new_tokens, config.steps, config.top_k, config.alg) == (7, 3, 5, "maskgit_plus")
    assert kwargs == {}
    out = model.diffusion_generate(text_inputs(), max_new_tokens=5, return_dict_in_generate=True)
    assert out.sequences.shape == (1, len(TEXT_PROMPT) + 5)
    assert out.num_forward_passes <= 5
    # max_length instead of max_new_tokens.
    out = model.diffusion_generate(text_inputs(), max_length=len(TEXT_PROMPT) + 4)
    assert out.shape == (1, len(TEXT_PROMPT) + 4)
    # An explicit generation_config overlays the model's with the fields it sets.
    out = model.diffusion_generate(text_inputs(), generation_config=GenerationConfig(max_new_tokens=3, steps=3))
    assert out.shape == (1, len(TEXT_PROMPT) + 3)


def test_checkpoint_generation_config_file(model, monkeypatch):
    # The release's generation_config.json: its fields (and only those) are the defaults.
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent
    release = GenerationConfig.from_pretrained(path)
    monkeypatch.setattr(model, "generation_config", release)
    config = model._dimple_generation_config(None, {})
    assert (config.max_new_tokens, config.steps, config.alg, config.alg_p_threshold) == (64, 64, "origin", 0.95)
    assert config.use_cache is True and config.use_original_confidence is True
    assert config.top_p is None and config.top_k is None and config.temperature == 0.0
    # A partial generation config changes its fields only; the checkpoint's others stay (as transformers 5 does).
    for partial in (GenerationConfig(max_new_tokens=16), DimpleGenerationConfig(max_new_tokens=16), {"max_new_tokens": 16}):
        config = model._dimple_generation_config(partial, {})
        assert (config.max_new_tokens, config.steps, config.alg_p_threshold, config.use_cache) == (16, 64, 0.95, True)


def test_a_saved_generation_config_reloads_without_warnings(model, tmp_path, monkeypatch):
    """`from_pretrained` reads generation_config.json as transformers' `GenerationConfig`. Greedy decoding (the
    default) is not written: 4.46–4.5x warn about `temperature=0.0` without `do_sample`. Sampling is written with
    `do_sample: true`: without it 4.x dropped temperature 1.0 (its default; the model reloaded greedy) and 5.x
    warns. 4.x's default top_k=50 does not come back as a filter."""
    import json

    for temperature, top_k in ((0.0, None), (0.7, None), (1.0, None), (0.7, 20)):
        folder = tmp_path / f"{temperature}-{top_k}"
        monkeypatch.setattr(model, "generation_config", DimpleGenerationConfig(steps=5, temperature=temperature, top_k=top_k))
        model.save_pretrained(folder)
        written = json.loads((folder / "generation_config.json").read_text())
        assert written.get("temperature") == (temperature or None) and written["steps"] == 5
        assert written.get("do_sample", False) == (temperature > 0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            reloaded = DimpleModel.from_pretrained(folder)
        config = reloaded._dimple_generation_config(None, {})
        assert (config.steps, config.temperature, config.top_k, config.top_p) == (5, temperature, top_k, None)


def test_without_a_padding_token_ended_answers_are_filled_with_end_of_text(model, monkeypatch):
    monkeypatch.setattr(model.config, "pad_token_id", None)
    monkeypatch.setattr(model, "generation_config", GenerationConfig(max_new_tokens=6, steps=6))
    assert model._dimple_generation_config(None, {}).pad_token_id == EOS_ID
    prompt_len = len(TEXT_PROMPT)
    out = model.diffusion_generate(text_inputs(), response_prior=[20, EOS_ID], alg="maskgit_plus")
    assert out[0, prompt_len:].tolist() == [20, EOS_ID] + [EOS_ID] * 4


def test_sampling_settings_equal_to_transformers_defaults_are_kept(model):
    """transformers 4.x's GenerationConfig cannot tell `temperature=1.0` from its default: a
    `DimpleGenerationConfig` keeps every field, a plain one its sampling fields when `do_sample` is set;
    `do_sample` as a keyword switches between greedy and sampling."""
    settings = model._dimple_generation_config
    assert settings(DimpleGenerationConfig(temperature=1.0), {}).temperature == 1.0
    sampled = settings(GenerationConfig(do_sample=True, temperature=1.0, top_p=0.9), {})
    assert (sampled.temperature, sampled.top_p) == (1.0, 0.9)
    assert settings(GenerationConfig(do_sample=True), {}).temperature == 1.0
    assert settings({"temperature": 1.0, "steps": 5}, {}).temperature == 1.0  # a dict of fields
    assert settings(None, {"do_sample": True}).temperature == 1.0
    assert settings(GenerationConfig(temperature=0.5, do_sample=True), {"do_sample": False}).temperature == 0.0
    assert settings(None, {"do_sample": True, "temperature": 0.7}).temperature == 0.7
    # wherever `do_sample=True` is set: a dict, a DimpleGenerationConfig
    assert settings({"do_sample": True}, {}).temperature == 1.0
    assert settings(DimpleGenerationConfig(do_sample=True), {}).temperature == 1.0
    # ... and the decode samples: different generators, different answers.
    answers = {
        tuple(model.diffusion_generate(text_inputs(), generation_config=GenerationConfig(do_sample=True, temperature=1.0),
                                       max_new_tokens=8, steps=8, generator=torch.Generator().manual_seed(seed))[0].tolist())
        for seed in range(4)
    }
    assert len(answers) > 1


# --------------------------------------------------------------------------------------------------
# 14. Bad input: ValueError naming the argument, before any forward pass
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(alg="greedy"), "`alg`"),
        (dict(decoding_pipeline="llada"), "`decoding_pipeline`"),
        (dict(steps=0), "`steps`"),
        (dict(max_new_tokens=0), "`max_new_tokens`"),
        (dict(max_length=len(TEXT_PROMPT)), "`max_length`"),
        (dict(max_length=3), "`max_length`"),
        (dict(alg_p_threshold=1.5), "`alg_p_threshold`"),
        (dict(alg_p_threshold=-0.1), "`alg_p_threshold`"),
        (dict(top_p=0.0), "`top_p`"),
        (dict(top_p=1.5), "`top_p`"),
        (dict(top_k=0), "`top_k`"),
        (dict(temperature=-1.0), "`temperature`"),
        (dict(eps=0.0), "`eps`"),
        (dict(eps=1.0), "`eps`"),
        (dict(response_prior=[20] * 9, max_new_tokens=8), "`response_prior`"),
        (dict(response_prior="{ }"), "tokenizer"),
        (dict(num_return_sequences=0), "`num_return_sequences`"),
        (dict(block_length=0), "`block_length`"),
        (dict(block_length=3, max_new_tokens=8), "`block_length` must be a divisor of max_new_tokens"),
        (dict(block_length=2, max_new_tokens=8, steps=3), "`steps` must be >= the number of blocks"),
        (dict(dual_cache=True), "`dual_cache`"),
        # A string flag would be truthy: "false" must not switch prefilling on.
        (dict(use_cache="false"), "`use_cache` must be True or False, got 'false'"),
        (dict(use_torch_compile="yes"), "`use_torch_compile` must be True or False"),
        (dict(block_length=4, dual_cache=1), "`dual_cache` must be True or False"),
        (dict(stop_at_eos=None), "`stop_at_eos` must be True or False"),
        # Wrong types: named, not a bare TypeError; a bool is not a count; nan is not a temperature.
        (dict(eps="0.01"), "`eps` must be a number in \\(0, 1\\), got '0.01'"),
        (dict(eps=None), "`eps`"),
        (dict(alg_p_threshold="0.9"), "`alg_p_threshold`"),
        (dict(temperature=float("nan")), "`temperature` must be 0 \\(greedy\\) or a number >= 1e-06"),
        # greedy in effect, and the scaled logits would overflow to inf (NaN probabilities)
        (dict(temperature=1e-39), "`temperature` must be 0 \\(greedy\\) or a number >= 1e-06, got 1e-39"),
        (dict(temperature="0.5"), "`temperature`"),
        (dict(top_p="0.9"), "`top_p`"),
        (dict(alg_temp="1"), "`alg_temp`"),
        (dict(steps=True), "`steps` must be an integer from 1 to 16384, got True"),
        (dict(max_new_tokens=True), "`max_new_tokens`"),
        (dict(num_return_sequences=True), "`num_return_sequences`"),
        (dict(max_length=10.5), "`max_length` must be an integer, got 10.5"),
        (dict(eos_token_id="2"), "`eos_token_id` must be a token id, a list of token ids, or None"),
        (dict(mask_token_id=-1), "`mask_token_id`"),
        (dict(mask_token_id=300), "`mask_token_id` must be a token id < the vocabulary size 300"),
        (dict(response_prior=[20, 300]), "`response_prior` holds ids outside the vocabulary \\[0, 300\\)"),
        (dict(generation_config=42), "`generation_config` must be a GenerationConfig, a dict"),
        # Autoregressive options would be ignored: refused, naming the settings there are.
        (dict(num_beams=4), "unknown arguments to diffusion_generate: \\['num_beams'\\]; its settings are"),
        (dict(repetition_penalty=5.0), "unknown arguments.*repetition_penalty"),
        (dict(do_sample="yes"), "`do_sample` must be True or False"),
        (dict(do_sample=False, temperature=0.5), "`do_sample=False` contradicts `temperature=0.5`"),
        (dict(do_sample=True, temperature=0.0), "`do_sample=True` contradicts `temperature=0.0`"),
    ],
)
def test_bad_arguments_raise_before_any_forward(model, monkeypatch, kwargs, match):
    calls = []
    monkeypatch.setattr(model, "decoder_forward", lambda *a, **k: calls.append("forward"))
    monkeypatch.setattr(model.visual, "forward", lambda *a, **k: calls.append("visual"))
    inputs = text_inputs()
    with pytest.raises(ValueError, match=match):
        model.diffusion_generate(inputs, **kwargs)
    assert calls == []


@pytest.mark.parametrize("hook", ["generation_tokens_hook_func", "generation_logits_hook_func"])
def test_a_hook_that_returns_nothing_is_named(model, hook):
    shape = r"\(1, 10\)" if hook == "generation_tokens_hook_func" else r"\(1, 4, 300\)"
    with pytest.raises(ValueError, match=rf"`{hook}` must return a torch\.\w+ tensor of shape {shape}, got NoneType"):
        model.diffusion_generate(text_inputs(), max_new_tokens=4, steps=4, **{hook: lambda step, x, logits: None})


def test_bad_prompts_raise_before_any_forward(model, monkeypatch):
    calls = []
    monkeypatch.setattr(model, "decoder_forward", lambda *a, **k: calls.append("forward"))
    monkeypatch.setattr(model.visual, "forward", lambda *a, **k: calls.append("visual"))
    with_mask = torch.tensor([[BOS_ID, 20, MASK_ID, 21]])
    with pytest.raises(ValueError, match="use_cache"):
        model.diffusion_generate(with_mask, use_cache=True)
    padded = torch.tensor([[BOS_ID, 20, 21, 22], [PAD_ID, PAD_ID, BOS_ID, 20]])
    with pytest.raises(ValueError, match="attention_mask"):
        model.diffusion_generate(padded)
    image = image_inputs()
    with pytest.raises(ValueError, match="image"):  # 4 image tokens, 8 features
        model.diffusion_generate(image["input_ids"], pixel_values=torch.randn(32, 1176),
                                 image_grid_thw=torch.tensor([[1, 4, 8]]))
    with pytest.raises(ValueError, match="unknown"):
        model.diffusion_generate(text_inputs(), not_an_argument=1)
    right_padded = torch.tensor([[BOS_ID, 20, 21, 22], [BOS_ID, 20, PAD_ID, PAD_ID]])
    with pytest.raises(ValueError, match="`attention_mask` must be left-padded"):
        model.diffusion_generate(right_padded, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    with pytest.raises(ValueError, match=r"`attention_mask` must be a tensor of the prompt's shape \(2, 4\), got shape \(2, 3\)"):
        model.diffusion_generate(padded, attention_mask=torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`attention_mask` must be a tensor of the prompt's shape \(2, 4\), got list"):
        model.diffusion_generate(padded, attention_mask=[[1] * 4] * 2)
    with pytest.raises(ValueError, match=r"`input_ids` must be token ids in \[0, 300\), got \[-1, 300\]"):
        model.diffusion_generate(torch.tensor([[BOS_ID, 300, 20, -1]]))
    with pytest.raises(ValueError, match=r"`inputs` must be a tensor of token ids \(torch.long\), got list"):
        model.diffusion_generate([[BOS_ID, 20]])
    with pytest.raises(ValueError, match="got Tensor of torch.float32"):
        model.diffusion_generate(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"prompt >= 1, got shape \(1, 0\)"):
        model.diffusion_generate(torch.zeros(1, 0, dtype=torch.long))
    assert calls == []


def test_mask_in_prompt_without_cache_is_allowed(model):
    # Without prefilling, masks in the prompt are simply generated with the canvas (the release allowed it).
    ids = torch.tensor([[BOS_ID, 20, MASK_ID, 21]])
    out = model.diffusion_generate(ids, max_new_tokens=4, steps=4, alg="maskgit_plus")
    assert out.shape == (1, 8)
    assert torch.equal(out[:, :4], ids)


# --------------------------------------------------------------------------------------------------
# 15. No host synchronisation inside a step except the "any mask left?" check
# --------------------------------------------------------------------------------------------------


class HostSyncRecorder(TorchDispatchMode):
    """Records the operators that would make the host wait for a GPU: those reading a value back (`item()`,
    `bool()`, `int()`) and those whose output shape depends on the data (`nonzero`, boolean indexing and
    `x[mask] = v`, `masked_select`, `unique`, `equal`, `repeat_interleave` by a tensor), each as
    "file:line: code" of the innermost repository frame. So the CPU runs catch what would stall a CUDA step.
    `tolist()` of a CPU tensor bypasses the dispatcher and is not seen (on CUDA it copies to the host, which
    `torch.cuda.set_sync_debug_mode` reports)."""

    # multinomial reads two validity checks back inside its kernel, below the dispatcher: named here
    DATA_DEPENDENT = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "is_nonzero", "_unique2",
                      "unique_dim", "unique_consecutive", "multinomial"}

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if (
            name in self.DATA_DEPENDENT
            or name in ("index", "index_put", "index_put_", "_index_put_impl_")
            and any(i is not None and i.dtype == torch.bool for i in args[1])
            or name == "repeat_interleave" and torch.is_tensor(args[1] if len(args) > 1 else args[0])
            and kwargs.get("output_size") is None
        ):
            self.syncs.append(repository_frame(traceback.extract_stack()))
        return func(*args, **kwargs)


def repository_frame(stack) -> str:
    """ "file:line: code" of the innermost frame in the repository's modules (not tests, not a venv)."""
    def inside(frame):  # the real path: the package may be reached through a link
        path = os.path.realpath(frame.filename)
        return path.startswith(str(REPO_ROOT)) and "/tests/" not in path and "/." not in path[len(str(REPO_ROOT)):]

    ours = [f for f in stack if inside(f)]
    frame = ours[-1] if ours else stack[-2]
    return f"{frame.filename}:{frame.lineno}: {(frame.line or linecache.getline(frame.filename, frame.lineno)).strip()}"


@contextlib.contextmanager
def recording_host_syncs(device: str):
    """Yields a function returning the host synchronisations so far ("file:line: code" each): on CUDA those
    `torch.cuda.set_sync_debug_mode` reports, on the CPU those `HostSyncRecorder` sees."""
    if device != "cuda":
        with HostSyncRecorder() as recorder:
            yield lambda: list(recorder.syncs)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield lambda: [
                f"{w.filename}:{w.lineno}: {linecache.getline(w.filename, w.lineno).strip()}"
                for w in caught if "synchroniz" in str(w.message)
            ]
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("use_cache", [False, True])
@pytest.mark.parametrize(
    "settings",
    [
        dict(alg="maskgit_plus", alg_p_threshold=0.05),
        dict(alg="origin", temperature=1.0, top_p=0.9, top_k=20),
        dict(alg="entropy", decoding_pipeline="dream"),
        dict(alg="maskgit_plus", alg_p_threshold=0.05, block_length=4, dual_cache=True),
        dict(alg="entropy", decoding_pipeline="dream", block_length=6),
    ],
)
def test_no_host_sync_inside_a_step(device, use_cache, settings):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("host-device synchronisation on CUDA needs a GPU")
    torch.manual_seed(0)
    model = DimpleModel(tiny_config(initializer_range=0.2)).eval().to(device)
    batch, _, _ = mixed_batch()
    batch = {k: v.to(device) for k, v in batch.items()}
    with recording_host_syncs(device) as host_syncs:
        at_hook = []  # how many syncs were recorded when the tokens hook ran: before the first step, then after each

        def tokens_hook(step, x, logits):
            at_hook.append(len(host_syncs()))
            return x

        out = run(model, batch, max_new_tokens=12, steps=12, use_cache=use_cache,
                  generation_tokens_hook_func=tokens_hook, **settings)
        syncs = host_syncs()
    assert len(at_hook) == out.num_forward_passes + 1
    boundaries = at_hook + [len(syncs)]
    for step in range(len(at_hook)):
        where = syncs[boundaries[step] : boundaries[step + 1]]
        if step == len(at_hook) - 1:  # after the last step, once per decode: that step's logits checked
            final = [line for line in where if "if bool(problem)" in line]
            assert len(final) == 1, where
            where = [line for line in where if line not in final]
        # One check per step; with blocks, a finished block's last check is followed by the next block's.
        assert len(where) <= (2 if "block_length" in settings else 1), f"step {step}: host syncs at {where}"
        # the one sync: reading the masked positions (with the previous step's checks riding along)
        assert all("torch.cat([flat, problem" in line and ".nonzero()" in line for line in where), where
