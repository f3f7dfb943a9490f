"""The pieces of diffusion decoding (SPEC §4) against independent references.

Each test computes what the decoder must give without going through the code it checks: confidences and
sampling filters from probabilities written out by hand (plain Python floats), random position choices
against the distribution they must follow (frequencies over many rows, with tolerances of several
binomial standard deviations, fixed seeds), and the cached passes (prefilling, dual cache, CUDA graphs)
against a full forward of the model in which the positions a cached pass does not run keep the layer
inputs they had when they last ran — what a key/value cache holds, recomputed by the plain forward.
`scripts/mutate_decoding.py` checks that these tests catch one-line bugs in `generation_utils.py`.
"""

import math

import pytest
import torch

from dimple import generation_utils
from dimple.generation_utils import (
    DimPipeline,
    DimpleGenerationConfig,
    DreamPipeline,
    choose_positions,
    filter_logits,
    score_positions,
)
from dimple.modeling_dimple import DimpleModel
from test_generation import IMAGE_PROMPT, force_token_logits, hand_schedule, image_inputs, run, tiny_model
from dimple_tools.tiny.configs import MASK_ID, tiny_config

# Five tokens with known probabilities; token 4 stands for `<|mask|>` (probability 0).
PROBS = [0.5, 0.3, 0.15, 0.05, 0.0]
OTHER = [0.1, 0.6, 0.1, 0.2, 0.0]
SIGMAS = 5  # tolerance of the statistical tests, in standard deviations of the estimate


def logits_of(*rows) -> torch.Tensor:
    return torch.tensor([[math.log(p) if p > 0 else float("-inf") for p in row] for row in rows])


def config(**kwargs) -> DimpleGenerationConfig:
    kwargs.setdefault("mask_token_id", 4)
    return DimpleGenerationConfig(**kwargs)


def normalised(weights) -> list:
    total = sum(weights)
    return [w / total for w in weights]


def binomial_tolerance(p: float, n: int) -> float:
    return SIGMAS * math.sqrt(max(p * (1 - p), 1e-4) / n)


# --------------------------------------------------------------------------------------------------
# Confidence (SPEC §4: probability, margin p1 - p2, negative entropy; original or filtered distribution)
# --------------------------------------------------------------------------------------------------


def hand_confidence(alg: str, probs: list, token: int) -> float:
    if alg == "topk_margin":
        top = sorted(probs, reverse=True)
        return top[0] - top[1]
    if alg == "entropy":
        return sum(p * math.log(p) for p in probs if p > 0)
    return probs[token]


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus", "topk_margin", "entropy"])
def test_greedy_confidence_by_hand(alg):
    tokens, confidence = score_positions(logits_of(PROBS, OTHER), config(alg=alg), original_confidence=True)
    assert tokens.tolist() == [0, 1]
    expected = [hand_confidence(alg, PROBS, 0), hand_confidence(alg, OTHER, 1)]
    assert confidence.tolist() == pytest.approx(expected, abs=1e-6)


def test_the_hand_values_are_what_spec_names():
    # The numbers the test above compares with, written out: a sign or a dropped term would show here.
    assert hand_confidence("topk_margin", PROBS, 0) == pytest.approx(0.2)
    assert hand_confidence("entropy", PROBS, 0) == pytest.approx(-1.14212, abs=1e-4)  # -0.34657 - 0.36119 - 0.28457 - 0.14979
    assert hand_confidence("maskgit_plus", OTHER, 1) == pytest.approx(0.6)


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
def test_confidence_from_the_filtered_distribution(alg):
    # top_p 0.7 keeps tokens 0 and 1 of PROBS (0.5, then 0.8 crosses 0.7): renormalised 0.625 / 0.375.
    filtered = [0.625, 0.375, 0.0, 0.0, 0.0]
    settings = config(alg=alg, top_p=0.7)
    _, from_filtered = score_positions(logits_of(PROBS), settings, original_confidence=False)
    _, from_original = score_positions(logits_of(PROBS), settings, original_confidence=True)
    assert from_filtered.item() == pytest.approx(hand_confidence(alg, filtered, 0), abs=1e-6)
    assert from_original.item() == pytest.approx(hand_confidence(alg, PROBS, 0), abs=1e-6)


@pytest.mark.parametrize("alg", ["maskgit_plus", "entropy"])
def test_sampled_token_confidence_under_temperature(alg):
    # temperature 2 (sampling): the filtered distribution is proportional to sqrt(p).
    tempered = normalised([math.sqrt(p) for p in PROBS])
    logits = logits_of(*[PROBS] * 64)
    generator = torch.Generator().manual_seed(0)
    tokens, confidence = score_positions(logits, config(alg=alg, temperature=2.0), False, generator)
    for token, value in zip(tokens.tolist(), confidence.tolist()):
        assert value == pytest.approx(hand_confidence(alg, tempered, token), abs=1e-6)
    tokens, confidence = score_positions(logits, config(alg=alg, temperature=2.0), True, generator)
    for token, value in zip(tokens.tolist(), confidence.tolist()):
        assert value == pytest.approx(hand_confidence(alg, PROBS, token), abs=1e-6)


def test_the_mask_token_is_never_chosen_but_counts_in_the_original_confidence():
    probs = [0.2, 0.1, 0.1, 0.0, 0.6]  # `<|mask|>` (id 4) is the most likely
    tokens, confidence = score_positions(logits_of(probs), config(alg="maskgit_plus"), original_confidence=True)
    assert tokens.item() == 0
    assert confidence.item() == pytest.approx(0.2)


# --------------------------------------------------------------------------------------------------
# Sampling filters: temperature, then top-p (keeping the token that crosses it), then top-k
# --------------------------------------------------------------------------------------------------


def kept(logits: torch.Tensor) -> list:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


@pytest.mark.parametrize("top_p, expected", [(0.4, [0]), (0.7, [0, 1]), (0.9, [0, 1, 2]), (0.99, [0, 1, 2, 3]),
                                             (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_token_that_crosses_it(top_p, expected):
    # cumulative probabilities 0.5, 0.8, 0.95, 1.0: the first token whose cumulative sum exceeds top_p stays.
    out = filter_logits(logits_of(PROBS), temperature=0.0, top_p=top_p, top_k=None)
    assert kept(out) == expected
    assert out[0, expected].tolist() == pytest.approx([math.log(PROBS[i]) for i in expected])


@pytest.mark.parametrize("top_k, expected", [(1, [1]), (2, [1, 3]), (3, [0, 1, 2, 3])])
def test_top_k_keeps_the_k_most_likely(top_k, expected):
    # OTHER: 0.6 (token 1), 0.2 (token 3), then 0.1 twice (tokens 0 and 2 tie: both stay at k = 3).
    assert kept(filter_logits(logits_of(OTHER), temperature=0.0, top_p=None, top_k=top_k)) == expected


def test_temperature_divides_the_logits_before_top_p():
    # Tempered by 2 the probabilities are 0.379, 0.294, 0.208, 0.120: top_p 0.7 then keeps three tokens
    # (0.379, 0.673, 0.880 crosses), where the untempered distribution keeps two.
    logits = logits_of(PROBS)
    out = filter_logits(logits, temperature=2.0, top_p=0.7, top_k=None)
    assert kept(out) == [0, 1, 2]
    assert out[0, :3].tolist() == pytest.approx([math.log(p) / 2 for p in PROBS[:3]])


def token_frequencies(settings, rows: int = 20000, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    tokens, _ = score_positions(logits_of(*[PROBS] * rows), settings, True, generator)
    counts = torch.bincount(tokens, minlength=len(PROBS)).tolist()
    return [c / rows for c in counts]


@pytest.mark.parametrize(
    "settings, distribution",
    [
        (dict(temperature=1.0), PROBS),
        (dict(temperature=2.0), normalised([math.sqrt(p) for p in PROBS])),
        (dict(temperature=0.5), normalised([p * p for p in PROBS])),
        (dict(temperature=1.0, top_p=0.7), [0.625, 0.375, 0, 0, 0]),
        (dict(temperature=1.0, top_k=3), normalised(PROBS[:3] + [0, 0])),
    ],
)
def test_sampled_tokens_follow_the_filtered_distribution(settings, distribution):
    rows = 20000
    frequencies = token_frequencies(config(**settings), rows)
    for freq, p in zip(frequencies, distribution):
        assert abs(freq - p) <= binomial_tolerance(p, rows), (frequencies, distribution)


# --------------------------------------------------------------------------------------------------
# Which positions: random, leftmost, most confident, sampled by confidence
# --------------------------------------------------------------------------------------------------


def inclusion_frequencies(chosen: torch.Tensor) -> list:
    return chosen.float().mean(0).tolist()


def plackett_luce_inclusion(weights: list, k: int) -> list:
    """P(position i is among k drawn without replacement with probabilities proportional to `weights`),
    by enumerating the draws (k <= 2 here)."""
    p = normalised(weights)
    if k == 1:
        return p
    assert k == 2
    return [p[i] + sum(p[j] * p[i] / (1 - p[j]) for j in range(len(p)) if j != i) for i in range(len(p))]


@pytest.mark.parametrize("count", [1, 2])
def test_alg_temp_samples_positions_from_softmax_of_confidence(count):
    rows, alg_temp = 20000, 0.5
    confidence = torch.tensor([0.9, 0.8, 0.5, 0.99, 0.2])
    is_mask = torch.tensor([True, True, True, False, True]).expand(rows, -1)
    generator = torch.Generator().manual_seed(0)
    chosen = choose_positions("maskgit_plus", is_mask, torch.full((rows,), count), None,
                              confidence.expand(rows, -1), alg_temp, generator)
    assert (chosen.sum(-1) == count).all()
    assert not chosen[:, 3].any()  # not a mask: never chosen, however confident
    weights = [math.exp(c / alg_temp) if m else 0.0 for c, m in zip(confidence.tolist(), is_mask[0].tolist())]
    expected = plackett_luce_inclusion(weights, count)
    for freq, p in zip(inclusion_frequencies(chosen), expected):
        assert abs(freq - p) <= binomial_tolerance(p, rows), (inclusion_frequencies(chosen), expected)


def test_without_alg_temp_the_most_confident_are_chosen_per_row():
    confidence = torch.tensor([[0.9, 0.8, 0.5, 0.99, 0.2], [0.1, 0.2, 0.3, 0.4, 0.5]])
    is_mask = torch.tensor([[True, True, True, False, True], [True] * 5])
    chosen = choose_positions("topk_margin", is_mask, torch.tensor([2, 3]), None, confidence, None)
    assert chosen.tolist() == [[True, True, False, False, False], [False, False, True, True, True]]


def test_origin_chooses_k_masked_positions_uniformly():
    rows, count = 20000, 2
    is_mask = torch.tensor([True, False, True, True, True, False]).expand(rows, -1)
    generator = torch.Generator().manual_seed(0)
    chosen = choose_positions("origin", is_mask, torch.full((rows,), count), None, None, None, generator)
    assert (chosen.sum(-1) == count).all() and not (chosen & ~is_mask).any()
    for freq, m in zip(inclusion_frequencies(chosen), is_mask[0].tolist()):
        p = count / 4 if m else 0.0
        assert abs(freq - p) <= binomial_tolerance(p, rows)


def test_autoregressive_chooses_exactly_the_leftmost_mask():
    # Whatever the schedule's count: one position, the leftmost mask of each row.
    is_mask = torch.tensor([[False, True, True, True], [True, True, False, True], [False, False, False, True]])
    chosen = choose_positions("autoregressive", is_mask, torch.tensor([3, 1, 2]), None, None, None)
    assert chosen.tolist() == [[False, True, False, False], [True, False, False, False], [False, False, False, True]]


def independent_draw_statistics(chosen: torch.Tensor):
    """Per-position frequency and the variance of the per-row count."""
    counts = chosen.sum(-1).double()
    return inclusion_frequencies(chosen), counts.var().item(), counts.mean().item()


def test_dream_origin_commits_each_mask_independently_with_probability_one_minus_s_over_t():
    rows, masks, steps, step = 20000, 10, 4, 1
    settings = config(alg="origin", decoding_pipeline="dream", steps=steps)
    taus = [1 + (1e-3 - 1) * i / steps for i in range(steps + 1)]
    p = 1 - taus[step + 1] / taus[step]  # 0.3329
    is_mask = torch.ones(rows, masks, dtype=torch.bool)
    torch.manual_seed(0)
    chosen = DreamPipeline(settings, steps).commit(step, is_mask, is_mask.sum(-1), None, torch.Generator().manual_seed(0))
    frequencies, variance, mean = independent_draw_statistics(chosen)
    for freq in frequencies:
        assert abs(freq - p) <= binomial_tolerance(p, rows)
    # Independent draws: the count per row is Binomial(masks, p), not a fixed number.
    assert mean == pytest.approx(masks * p, abs=SIGMAS * math.sqrt(masks * p * (1 - p) / rows))
    assert variance == pytest.approx(masks * p * (1 - p), rel=0.1)


@pytest.mark.parametrize("alg", ["origin", "origin-ratio", "maskgit_plus", "autoregressive"])
def test_dream_last_step_commits_every_mask(alg):
    # s = eps on the last step would give 1 - s/t = 0.996: without the rule a few of 4000 masks would stay
    rows, masks, steps = 1000, 4, 4
    is_mask = torch.ones(rows, masks, dtype=torch.bool)
    chosen = DreamPipeline(config(alg=alg, steps=steps), steps).commit(
        steps - 1, is_mask, None, torch.rand(rows, masks), torch.Generator().manual_seed(0))
    expected = is_mask if alg != "autoregressive" else torch.tensor([True, False, False, False]).expand(rows, -1)
    assert torch.equal(chosen, expected)


def test_dim_origin_ratio_commits_each_mask_with_the_schedule_ratio():
    rows, masks, steps = 20000, 8, 8
    settings = config(alg="origin-ratio", steps=steps)
    is_mask = torch.ones(rows, masks, dtype=torch.bool)
    is_mask[:, :2] = False  # 6 of 8 masks left: r = 0.75
    torch.manual_seed(0)
    chosen = DimPipeline(settings, steps).commit(2, is_mask, torch.full((rows,), masks), None, torch.Generator().manual_seed(0))
    # r = 0.75; tau_3 = 0.625375 gives floor(6 * 0.166) = 0 (skipped), tau_4 = 0.5005 gives ratio 0.33267
    _, p = hand_schedule(2, 6, masks, steps, 1e-3)
    assert p == pytest.approx(1 - 0.5005 / 0.75)
    frequencies, variance, _ = independent_draw_statistics(chosen)
    assert frequencies[:2] == [0.0, 0.0]
    for freq in frequencies[2:]:
        assert abs(freq - p) <= binomial_tolerance(p, rows)
    assert variance == pytest.approx(6 * p * (1 - p), rel=0.1)


@pytest.mark.parametrize("step, masks, expected", [(0, 8, 1), (1, 6, 1), (1, 9, 2), (2, 4, 1), (3, 2, 2), (0, 3, 0)])
def test_dream_confidence_count_by_hand(step, masks, expected):
    # floor(masks * (1 - s/t)), all on the last step; steps 4: tau = 1, 0.75025, 0.5005, 0.25075, 0.001, so
    # 1 - s/t = 0.24975, 0.33289, 0.49900: 8 masks give floor(1.998) = 1, 6 give 1, 9 give 2, 4 give 1.
    steps = 4
    taus = [1 + (1e-3 - 1) * i / steps for i in range(steps + 1)]
    hand = masks if step == steps - 1 else math.floor(masks * (1 - taus[step + 1] / taus[step]))
    assert hand == expected
    is_mask = torch.zeros(1, 10, dtype=torch.bool)
    is_mask[0, :masks] = True
    confidence = torch.linspace(0.1, 0.9, 10)[None]
    chosen = DreamPipeline(config(alg="maskgit_plus", steps=steps), steps).commit(step, is_mask, None, confidence, None)
    # the most confident masked positions: the highest indices among the masks
    assert chosen[0].nonzero().flatten().tolist() == list(range(masks - expected, masks))


def dream_passes_by_hand(masks: int, steps: int, eps: float = 1e-3) -> int:
    """Passes of a greedy Dream decode that runs only the steps committing something: floor(m (1 - s/t)) >= 1,
    and the last step while masks are left."""
    taus = [1 + (eps - 1) * i / steps for i in range(steps + 1)]
    passes = 0
    for step in range(steps):
        if masks == 0:
            break
        count = masks if step == steps - 1 else math.floor(masks * (1 - taus[step + 1] / taus[step]))
        if count >= 1:
            passes += 1
            masks -= count
    return passes


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("settings", [dict(), dict(use_cache=True), dict(block_length=2, dual_cache=True)],
                         ids=["plain", "prefilling", "dual-cache"])
def test_dream_skips_the_passes_that_commit_nothing(alg, settings):
    """4 masks over 16 steps: most steps' floor(4 (1 - s/t)) is 0. Those passes are skipped (the count by hand),
    and the tokens equal a decode that runs every pass (an identity logits hook turns skipping off)."""
    model = tiny_model(0.2)
    common = dict(alg=alg, decoding_pipeline="dream", max_new_tokens=4, steps=16, temperature=0.0, **settings)
    skipped = run(model, image_inputs(batch=2), **common)
    every_pass = run(model, image_inputs(batch=2), generation_logits_hook_func=lambda step, x, logits: logits,
                     **common)
    assert torch.equal(skipped.sequences, every_pass.sequences)
    blocks = generation_utils.plan_blocks(4, settings.get("block_length"), 16)
    assert skipped.num_forward_passes == sum(dream_passes_by_hand(hi - lo, n) for lo, hi, n in blocks)
    assert every_pass.num_forward_passes == 16
    assert skipped.num_forward_passes < every_pass.num_forward_passes


def test_dream_does_not_skip_sampled_decodes():
    settings = config(alg="maskgit_plus", decoding_pipeline="dream", steps=16, temperature=1.0)
    pipeline = DreamPipeline(settings, 16)
    assert not pipeline.commits_nothing(1, torch.ones(1, 4, dtype=torch.bool))
    greedy = DreamPipeline(config(alg="maskgit_plus", decoding_pipeline="dream", steps=16), 16)
    assert greedy.commits_nothing(1, torch.ones(1, 4, dtype=torch.bool))  # floor(4 * 0.0666) = 0
    assert not greedy.commits_nothing(15, torch.ones(1, 4, dtype=torch.bool))  # the last step takes every mask


# --------------------------------------------------------------------------------------------------
# Confident decoding (dim): positions above the threshold, all of them on the last step
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["maskgit_plus", "origin", "autoregressive"])
def test_threshold_commits_the_confident_and_the_last_step_everything(alg):
    steps = 4
    confidence = torch.tensor([[0.9, 0.2, 0.95, 0.1]])
    is_mask = torch.tensor([[True, True, True, True]])
    pipeline = DimPipeline(config(alg=alg, steps=steps, alg_p_threshold=0.5), steps)
    start = torch.tensor([4])
    assert pipeline.commit(0, is_mask, start, confidence, None).tolist() == [[True, False, True, False]]
    assert pipeline.commit(steps - 1, is_mask, start, confidence, None).tolist() == [[True] * 4]
    # no position above the threshold: the schedule (or the leftmost mask) decides
    low = torch.full((1, 4), 0.3)
    assert pipeline.commit(0, is_mask, start, low, None).sum().item() >= 1


@pytest.mark.parametrize("alg", ["maskgit_plus", "origin", "autoregressive"])
def test_one_step_decode_with_some_confident_positions_leaves_no_mask(alg):
    model = tiny_model()
    out = run(model, image_inputs(), max_new_tokens=6, steps=1, alg=alg, alg_p_threshold=0.9,
              generation_logits_hook_func=force_token_logits(42, positions=[1, 4]))
    answer = out.sequences[0, len(IMAGE_PROMPT):]
    assert out.num_forward_passes == 1
    assert not (answer == MASK_ID).any()
    assert answer[[1, 4]].tolist() == [42, 42]


# --------------------------------------------------------------------------------------------------
# autoregressive: one leftmost mask per pass, in both pipelines (the original decoder)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pipeline", ["dim", "dream"])
@pytest.mark.parametrize("use_cache", [False, True])
def test_autoregressive_trace_one_commit_per_pass(pipeline, use_cache):
    model, inputs, new = tiny_model(), image_inputs(batch=2), 6
    prompt_len = inputs["input_ids"].shape[1]
    out = run(model, inputs, max_new_tokens=new, steps=new, alg="autoregressive", decoding_pipeline=pipeline,
              use_cache=use_cache, output_history=True)
    assert out.num_forward_passes == new
    for step, x in enumerate(out.history):  # after pass i, exactly the first i + 1 positions are committed
        committed = x[:, prompt_len:] != MASK_ID
        assert committed.tolist() == [[j <= step for j in range(new)]] * 2


@pytest.mark.parametrize("pipeline", ["dim", "dream"])
def test_autoregressive_with_fewer_steps_than_masks_leaves_the_rest_masked(pipeline):
    # As the original: one position per step even on the last step (no threshold): 3 passes, 3 tokens.
    model, inputs = tiny_model(), image_inputs()
    out = run(model, inputs, max_new_tokens=8, steps=3, alg="autoregressive", decoding_pipeline=pipeline)
    answer = out.sequences[0, len(IMAGE_PROMPT):]
    assert out.num_forward_passes == 3
    assert (answer[:3] != MASK_ID).all() and (answer[3:] == MASK_ID).all()


def test_autoregressive_dim_with_a_threshold_commits_the_confident_then_one():
    model, inputs = tiny_model(), image_inputs()
    # step 0: positions 2 and 5 are confident (committed both); later steps: nothing passes, one leftmost each
    out = run(model, inputs, max_new_tokens=6, steps=6, alg="autoregressive", alg_p_threshold=0.9,
              output_history=True, generation_logits_hook_func=force_token_logits(42, positions=[2, 5], step=0))
    committed = [(x[0, len(IMAGE_PROMPT):] != MASK_ID).nonzero().flatten().tolist() for x in out.history]
    assert committed[:3] == [[2, 5], [0, 2, 5], [0, 1, 2, 5]]
    assert out.num_forward_passes == 5  # 2 at once, then 0, 1, 3, 4 one per pass


# --------------------------------------------------------------------------------------------------
# Cached passes against a recomputation
# --------------------------------------------------------------------------------------------------


class FrozenLayerInputs:
    """What a key/value cache computes, recomputed by the model's plain forward: every decoder layer's input
    hidden states are recorded per position; a pass that runs only some positions is a full forward in which
    the other positions' layer inputs are replaced by their recorded ones (so their keys and values are those
    of when they last ran), and then the positions run are recorded."""

    def __init__(self, model: DimpleModel, inputs: dict):
        self.model, self.inputs, self.records = model, inputs, None

    def logits(self, x: torch.Tensor, run_positions: torch.Tensor) -> torch.Tensor:
        layers = self.model.model.layers
        if self.records is None:
            assert run_positions.all(), "the first pass runs every position"
            self.records = [None] * len(layers)

        def pre_hook(index):
            def hook(module, args):
                hidden = args[0]
                if self.records[index] is not None:
                    hidden = torch.where(run_positions.to(hidden.device)[None, :, None], hidden, self.records[index])
                self.records[index] = hidden.clone()
                return (hidden, *args[1:])

            return hook

        handles = [layer.register_forward_pre_hook(pre_hook(i)) for i, layer in enumerate(layers)]
        try:
            mask = self.inputs.get("attention_mask")
            if mask is not None:
                mask = torch.nn.functional.pad(mask, (0, x.shape[1] - mask.shape[1]), value=1)
            return self.model(
                input_ids=x, attention_mask=mask, pixel_values=self.inputs.get("pixel_values"),
                image_grid_thw=self.inputs.get("image_grid_thw"),
            ).logits
        finally:
            for handle in handles:
                handle.remove()


def check_every_step_against_recomputation(model, inputs, new, block_length=None, **settings):
    """Decode with a logits hook that compares each pass's logits with `FrozenLayerInputs`; the positions a
    pass runs follow SPEC §4 and the dual cache's definition. Returns (output, steps checked)."""
    prompt_len = inputs["input_ids"].shape[1]
    total = prompt_len + new
    block = block_length or new
    reference = FrozenLayerInputs(model, inputs)
    state = {"block": None, "passes": 0}
    checked = []

    def positions(lo, hi):
        run_positions = torch.zeros(total, dtype=torch.bool)
        run_positions[lo:hi] = True
        return run_positions

    def hook(step, x, logits):
        canvas_masks = (x[0, prompt_len:] == MASK_ID).view(-1, block).any(-1)
        current = int(canvas_masks.int().argmax())  # the leftmost block with a mask is the one decoded
        first_of_block = current != state["block"]
        state["block"] = current
        lo, hi = current * block, (current + 1) * block
        if state["passes"] == 0 or not (settings.get("use_cache") or settings.get("dual_cache")):
            run_positions = positions(0, total)  # full pass
        elif settings.get("dual_cache") and first_of_block and not settings.get("use_cache"):
            run_positions = positions(0, total)  # the dual cache's refresh
        elif settings.get("dual_cache") and not first_of_block:
            run_positions = positions(prompt_len - 1 + lo, prompt_len + hi)  # the window
        else:
            run_positions = positions(prompt_len - 1, total)  # prefilling's tail
        state["passes"] += 1
        expected = reference.logits(x, run_positions)[:, prompt_len - 1 + lo : prompt_len - 1 + hi]
        torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4, msg=lambda m: f"pass {step}: {m}")
        checked.append(step)
        return logits

    out = run(model, inputs, max_new_tokens=new, block_length=block_length, generation_logits_hook_func=hook,
              **settings)
    return out, checked


CACHED_SETTINGS = {
    "prefilling": dict(use_cache=True),
    "dual": dict(dual_cache=True, block_length=4),
    "dual+prefilling": dict(dual_cache=True, use_cache=True, block_length=4),
}


@pytest.mark.parametrize("pipeline, alg", [("dim", "maskgit_plus"), ("dim", "origin"), ("dream", "entropy")])
@pytest.mark.parametrize("cache", list(CACHED_SETTINGS))
def test_every_cached_pass_equals_its_recomputation(cache, pipeline, alg):
    torch.manual_seed(0)
    out, checked = check_every_step_against_recomputation(
        tiny_model(), image_inputs(batch=2), new=8, steps=8, alg=alg, decoding_pipeline=pipeline,
        **CACHED_SETTINGS[cache],
    )
    assert len(checked) == out.num_forward_passes >= 4  # every pass, and several of them cached


def test_recomputation_with_a_padded_text_batch():
    inputs = {"input_ids": torch.tensor([[0, 0, 1, 20, 21], [1, 30, 31, 32, 33]]),
              "attention_mask": torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])}
    out, checked = check_every_step_against_recomputation(
        tiny_model(), inputs, new=8, steps=8, alg="maskgit_plus", use_cache=True, pad_token_id=0,
    )
    assert len(checked) == out.num_forward_passes >= 4


def test_the_recomputation_sees_a_stale_prompt():
    # The reference is not the plain forward: after the first step, prefilling's logits differ from a full
    # pass over the current sequence (the prompt's keys/values are those of the all-mask canvas).
    model, inputs = tiny_model(), image_inputs()
    plain = []

    def compare(step, x, logits):
        full = model(input_ids=x, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
        plain.append((logits - full[:, len(IMAGE_PROMPT) - 1 : -1]).abs().max().item())
        return logits

    run(model, inputs, max_new_tokens=8, steps=8, alg="maskgit_plus", use_cache=True, generation_logits_hook_func=compare)
    assert plain[0] < 1e-5 and max(plain[1:]) > 1e-3


_CAUSAL = {}


def causal_model() -> DimpleModel:
    if not _CAUSAL:
        torch.manual_seed(0)
        _CAUSAL["model"] = DimpleModel(tiny_config(initializer_range=0.2, full_attn_mask=False)).eval()
    return _CAUSAL["model"]


@pytest.mark.parametrize("pipeline, alg", [("dim", "maskgit_plus"), ("dim", "topk_margin"), ("dream", "entropy")])
@pytest.mark.parametrize("cache", list(CACHED_SETTINGS))
def test_on_a_causal_model_cached_decoding_is_exact(cache, pipeline, alg):
    # Causal attention: a position's keys/values do not depend on later positions, so every cache is exact.
    model, inputs = causal_model(), image_inputs(batch=2)
    common = dict(max_new_tokens=8, steps=8, alg=alg, decoding_pipeline=pipeline, output_history=True,
                  block_length=CACHED_SETTINGS[cache].get("block_length"))
    plain = run(model, inputs, **common)
    cached = run(model, inputs, **common, **{k: v for k, v in CACHED_SETTINGS[cache].items() if k != "block_length"})
    assert torch.equal(plain.sequences, cached.sequences)
    assert plain.num_forward_passes == cached.num_forward_passes
    assert all(torch.equal(a, b) for a, b in zip(plain.history, cached.history))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("cache", list(CACHED_SETTINGS))
def test_cuda_graph_passes_equal_their_recomputation(cache, monkeypatch):
    created = []

    class Recording(generation_utils.DenoisingForward):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(generation_utils, "DenoisingForward", Recording)
    torch.manual_seed(0)
    model = DimpleModel(tiny_config(initializer_range=0.02)).eval().cuda()
    inputs = {k: v.cuda() for k, v in image_inputs(batch=2).items()}
    out, checked = check_every_step_against_recomputation(
        model, inputs, new=8, steps=8, alg="maskgit_plus", use_cuda_graph=True, **CACHED_SETTINGS[cache],
    )
    assert created and created[-1].graphs, "no CUDA graph was captured: the comparison would not cover them"
    assert len(checked) == out.num_forward_passes
