"""Block-wise decoding and Fast-dLLM's dual cache (`block_length`, `dual_cache`) on a tiny random Dimple.

Oracles: the block plan by hand; block decoding with one block == plain decoding; the order of commits
(blocks strictly left to right); the cached passes against full passes where the cache is exact (the
canvas unchanged since the refresh, or one pass per block); the length of every forward pass; a row
decoded alone vs. inside a padded mixed batch.
"""

import copy
import functools

import pytest
import torch

from dimple.generation_utils import plan_blocks
from dimple.modeling_dimple import DimpleModel
from test_generation import capture_logits, image_inputs, mixed_batch, run, tiny_model
from dimple_tools.tiny.configs import EOS_ID, MASK_ID, PAD_ID, tiny_config


CACHES = {
    "no-cache": dict(use_cache=False),
    "prefilling": dict(use_cache=True),
    "dual": dict(dual_cache=True),
    "dual+prefilling": dict(dual_cache=True, use_cache=True),
}


def test_block_plan_by_hand():
    assert plan_blocks(64, None, 10) == [(0, 64, 10)]
    assert plan_blocks(64, 16, 10) == [(0, 16, 3), (16, 32, 3), (32, 48, 2), (48, 64, 2)]
    assert plan_blocks(8, 4, 8) == [(0, 4, 4), (4, 8, 4)]
    assert plan_blocks(6, 1, 6) == [(i, i + 1, 1) for i in range(6)]


@pytest.mark.parametrize("alg", ["maskgit_plus", "autoregressive", "entropy"])
@pytest.mark.parametrize("cache", ["no-cache", "prefilling"])
def test_one_block_is_plain_decoding(alg, cache):
    model, inputs = tiny_model(0.2), image_inputs(batch=2)
    common = dict(max_new_tokens=8, steps=8, alg=alg, alg_p_threshold=0.3, output_history=True, **CACHES[cache])
    plain, one_block = run(model, inputs, **common), run(model, inputs, block_length=8, **common)
    assert torch.equal(plain.sequences, one_block.sequences)
    assert len(plain.history) == len(one_block.history) == plain.num_forward_passes


def block_states(canvas: torch.Tensor, block_length: int) -> list:
    """Per block of one row's canvas: 'done' (no mask), 'open' (some), 'masked' (all masks)."""
    states = []
    for block in canvas.split(block_length):
        masks = int((block == MASK_ID).sum())
        states.append("done" if masks == 0 else "masked" if masks == len(block) else "open")
    return states


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("pipeline, alg", [("dim", "maskgit_plus"), ("dim", "origin"), ("dream", "topk_margin")])
def test_blocks_are_decoded_left_to_right(cache, pipeline, alg):
    model, inputs = tiny_model(), image_inputs(batch=2)
    prompt_len, new, block, steps = inputs["input_ids"].shape[1], 12, 4, 9
    shapes = []
    out = run(
        model, inputs, max_new_tokens=new, steps=steps, block_length=block, alg=alg, decoding_pipeline=pipeline,
        temperature=0.7 if alg == "origin" else 0.0, output_history=True,
        generation_logits_hook_func=lambda step, x, logits: shapes.append(tuple(logits.shape)) or logits,
        **CACHES[cache],
    )
    assert not (out.sequences[:, prompt_len:] == MASK_ID).any()
    assert shapes == [(2, block, model.config.vocab_size)] * out.num_forward_passes  # the block's logits only
    if pipeline == "dream":
        assert out.num_forward_passes == steps  # every block runs its share: 3 steps each
    for x in out.history:
        for row in range(2):
            states = block_states(x[row, prompt_len:], block)
            current = next((i for i, s in enumerate(states) if s != "done"), len(states))
            # Blocks before the current one are complete; the ones after it are untouched masks.
            assert all(s == "masked" for s in states[current + 1 :]), states


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("cache", ["prefilling", "dual", "dual+prefilling"])
def test_cached_passes_are_exact_while_the_canvas_is_unchanged(causal, cache, padded):
    # A tokens hook puts the canvas back after every step, so every step sees the sequence of the refresh: the
    # cached passes (tail, window) must then give the logits of full passes over the whole sequence.
    torch.manual_seed(0)
    model = DimpleModel(tiny_config(initializer_range=0.2, full_attn_mask=not causal)).eval()
    batch = mixed_batch()[0] if padded else image_inputs(batch=2)  # a padded text row and an image row
    prompt_len = batch["input_ids"].shape[1]
    start = {}

    def keep_canvas(step, x, logits):
        if step is None:
            start["canvas"] = x[:, prompt_len:].clone()
        else:
            x[:, prompt_len:] = start["canvas"]
        return x

    results = {}
    for setting in ("no-cache", cache):
        logits = []
        run(model, batch, max_new_tokens=8, steps=8, block_length=4, alg="maskgit_plus",
            generation_tokens_hook_func=keep_canvas, generation_logits_hook_func=capture_logits(logits),
            **CACHES[setting])
        results[setting] = logits
    plain, cached = results["no-cache"], results[cache]
    assert len(plain) == len(cached) == 8
    for step, (a, b) in enumerate(zip(plain, cached)):
        assert (a - b).abs().max().item() <= 1e-5, step


@pytest.mark.parametrize("alg", ["maskgit_plus", "autoregressive"])
def test_dual_cache_with_one_pass_per_block_is_exact(alg):
    # Each block decoded in one pass: every pass is a refresh over the whole sequence, so the dual cache
    # gives exactly the tokens of block decoding without a cache.
    model, inputs = tiny_model(0.2), image_inputs(batch=2)
    common = dict(max_new_tokens=12, steps=4, block_length=3, alg=alg)
    plain, dual = run(model, inputs, **common), run(model, inputs, dual_cache=True, **common)
    assert torch.equal(plain.sequences, dual.sequences)
    assert plain.num_forward_passes == dual.num_forward_passes == 4


@pytest.mark.parametrize("cache", ["dual", "dual+prefilling"])
def test_dual_cache_recomputes_only_the_block(cache, monkeypatch):
    model, inputs = tiny_model(), image_inputs()
    prompt_len, new, block = inputs["input_ids"].shape[1], 8, 4
    lengths, head_rows, visual_calls = [], [], []
    forward, visual_forward = model.decoder_forward, model.visual.forward

    def counting_forward(*args, **kwargs):
        lengths.append(kwargs["inputs_embeds"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "decoder_forward", counting_forward)
    head_hook = model.lm_head.register_forward_pre_hook(lambda m, args: head_rows.append(args[0].shape[:-1].numel()))
    monkeypatch.setattr(model.visual, "forward", lambda *a, **k: visual_calls.append(1) or visual_forward(*a, **k))
    out = run(model, inputs, max_new_tokens=new, steps=8, block_length=block, alg="autoregressive",
              decoding_pipeline="dream", **CACHES[cache])
    head_hook.remove()
    assert out.num_forward_passes == 8  # Dream's pipeline runs every step: 4 per block
    full, canvas_pass, window = prompt_len + new, new + 1, block + 1
    refresh = full if cache == "dual" else canvas_pass  # with prefilling the prompt stays from the first pass
    assert lengths == [full, window, window, window, refresh, window, window, window]
    # The head runs on the block's masked positions only; autoregressive commits one per step.
    assert head_rows == [4, 3, 2, 1] * 2
    assert len(visual_calls) == 1


@pytest.mark.parametrize(
    "settings",
    [
        dict(dual_cache=True, alg="maskgit_plus"),
        dict(dual_cache=True, use_cache=True, alg="maskgit_plus", alg_p_threshold=0.05),
        dict(use_cache=True, alg="autoregressive"),
        dict(dual_cache=True, alg="topk_margin", decoding_pipeline="dream"),
    ],
    ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()),
)
def test_each_row_decodes_as_alone_with_blocks(settings):
    peaked = tiny_model(0.2)
    batch, image_alone, text_alone = mixed_batch()
    common = dict(max_new_tokens=10, steps=10, block_length=5, output_history=True, **settings)
    together = run(peaked, batch, **common)
    alone = [run(peaked, image_alone, **common), run(peaked, text_alone, **common)]
    prompt_len = batch["input_ids"].shape[1]
    for row, single in enumerate(alone):
        single_prompt = single.sequences.shape[1] - 10
        assert torch.equal(together.sequences[row, prompt_len:], single.sequences[0, single_prompt:]), row


def test_stop_at_eos_skips_the_later_blocks():
    model, inputs = tiny_model(), image_inputs()
    prompt_len = inputs["input_ids"].shape[1]

    def end_at_second_position(step, x, logits):  # block 0's position 1 is certain to be end-of-text
        if step == 0:
            logits = logits.clone()
            logits[:, 1] = -50.0
            logits[:, 1, EOS_ID] = 50.0
        return logits

    out = run(model, inputs, max_new_tokens=12, steps=12, block_length=4, alg="maskgit_plus", alg_p_threshold=0.9,
              dual_cache=True, stop_at_eos=True, generation_logits_hook_func=end_at_second_position)
    answer = out.sequences[0, prompt_len:]
    assert answer[1].item() == EOS_ID and (answer[2:] == PAD_ID).all()
    assert out.num_forward_passes <= 2  # at most one more pass for position 0; blocks 2 and 3 need none


def test_torch_compile_gives_the_eager_tokens():
    # The compiled forward runs the cached passes (prefilled tail and dual-cache windows); fp32 on the CPU it
    # gives the eager tokens. (Compiling takes ~20 s here, once per shape.)
    model, inputs = tiny_model(0.2), image_inputs(batch=2)
    common = dict(max_new_tokens=12, steps=12, block_length=4, dual_cache=True, use_cache=True, alg="maskgit_plus",
                  output_history=True)
    compiled = run(model, inputs, use_torch_compile=True, **common)
    eager = run(model, inputs, **common)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert all(torch.equal(a, b) for a, b in zip(compiled.history, eager.history))
    # A copy of the model (other weights) runs its own weights through the same compiled code.
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(-1)
    assert not torch.equal(run(other, inputs, use_torch_compile=True, **common).sequences, compiled.sequences)
    assert torch.equal(run(other, inputs, use_torch_compile=True, **common).sequences, run(other, inputs, **common).sequences)


@pytest.mark.parametrize("regional", [True, False], ids=["regional", "whole"])
def test_torch_compile_compiles_each_kind_of_pass_once_across_prompts_and_batches(regional, monkeypatch):
    # The batch and the prompt's length change from one request to the next. Were each shape compiled anew,
    # torch.compile would hit its recompile limit (8) after a few prompts and fall back to eager. Regional
    # compilation (the default) compiles the decoder layer once for every layer and both kinds of cached pass
    # (the block's tail pass and the dual-cache window); the whole pass compiles once per kind. Either compiles
    # at most once more for batches > 1; other prompt lengths and batch sizes reuse them.
    from torch._dynamo.utils import counters

    from dimple import generation_utils

    torch._dynamo.reset()
    monkeypatch.setattr(generation_utils, "_COMPILED_DECODERS", {})
    monkeypatch.setattr(generation_utils, "compiled_decoder",
                        functools.partial(generation_utils.compiled_decoder, regional=regional))
    model = tiny_model(0.2)
    common = dict(max_new_tokens=8, steps=8, block_length=4, dual_cache=True, use_cache=True, alg="maskgit_plus")
    generator = torch.Generator().manual_seed(0)

    def graphs_compiled_by(batch, prompt_len):
        before = counters["stats"]["unique_graphs"]
        prompt = torch.randint(10, 60, (batch, prompt_len), generator=generator)
        compiled = model.diffusion_generate(prompt, use_torch_compile=True, **common)
        assert torch.equal(compiled, model.diffusion_generate(prompt, **common))
        return counters["stats"]["unique_graphs"] - before

    kinds = 1 if regional else 2  # regional: one graph serves the tail and the window passes
    assert graphs_compiled_by(batch=1, prompt_len=7) == kinds
    assert graphs_compiled_by(batch=2, prompt_len=7) <= kinds
    assert [graphs_compiled_by(batch, n) for batch, n in [(1, 11), (3, 9), (2, 14), (4, 5)]] == [0, 0, 0, 0]
