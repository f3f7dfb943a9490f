"""Training-free parallel decoding strategies of the `dim` pipeline (issue 33): Fast-dLLM's factor rule
(`parallel_factor`), CreditDecoding's trace credit (`credit_decoding`) and an early commit once the draft is
stable (`commit_when_stable`).

Oracles: each strategy on hand-computed cases (which positions it commits, what confidence the credit gives);
a batch row decodes as alone with each; bad values and combinations raise before the first pass.
"""

import pytest
import torch

from dimple.generation_utils import CreditTrace, FactorRule, StableCommit, ThresholdRule
from test_generation import image_inputs, mixed_batch, run, tiny_model


def test_the_factor_rule_commits_the_passing_prefix_of_the_ranking():
    """factor 1: the k-th most confident mask needs 1 - 1/(k+1): 0.5, 0.667, 0.75, 0.8, ...
    Row 0 ranks 0.9 (pos 1), 0.8 (pos 3), 0.6 (pos 0), 0.3: 0.6 < 0.75, so positions 1 and 3. Row 1: nothing passes
    past the first, so its most confident mask alone. Row 2: position 1 (0.99) is not a mask; 0.7 >= 0.5, 0.68 >= 0.667."""
    confidence = torch.tensor([[0.6, 0.9, 0.3, 0.8], [0.2, 0.1, 0.15, 0.05], [0.7, 0.99, 0.68, 0.1]])
    is_mask = torch.tensor([[True] * 4, [True] * 4, [True, False, True, True]])
    committed = FactorRule(1.0)(is_mask, confidence)
    assert committed.tolist() == [[False, True, False, True], [True, False, False, False], [True, False, True, False]]
    # a larger factor lowers every bound: 0.6 passes 1 - 2/4 = 0.5, 0.3 fails 1 - 2/5 = 0.6
    assert FactorRule(2.0)(is_mask, confidence)[0].tolist() == [True, True, False, True]
    assert ThresholdRule(0.75)(is_mask, confidence).tolist() == [[False, True, False, True], [False] * 4,
                                                                 [False, False, False, False]]


def credit_confidence(p: float, credit: float) -> float:
    boost = (1 + credit) ** 0.7
    return max(p, p * boost / (1 - p + p * boost))


def test_the_credit_grows_while_the_top_token_stays_and_restarts_when_it_changes():
    trace = CreditTrace(rows=1, canvas_len=2, device="cpu")
    mask = torch.tensor([[True, True]])
    first = trace(torch.tensor([[5, 9]]), torch.tensor([[0.5, 0.2]]), mask, 0, 2)
    c1 = 0.5 ** 0.5  # 0.7071
    assert first[0, 0].item() == pytest.approx(credit_confidence(0.5, c1), abs=1e-6)  # 0.5925
    assert first[0, 0].item() == pytest.approx(0.5925, abs=1e-4)
    second = trace(torch.tensor([[5, 4]]), torch.tensor([[0.5, 0.2]]), mask, 0, 2)
    c2 = 0.65 * c1 + c1  # same token: 1.1667
    assert second[0, 0].item() == pytest.approx(credit_confidence(0.5, c2), abs=1e-6)  # 0.6321
    assert second[0, 0].item() == pytest.approx(0.6321, abs=1e-4)
    # position 1's top token changed (9 -> 4): its credit starts again
    assert second[0, 1].item() == pytest.approx(credit_confidence(0.2, 0.2 ** 0.5), abs=1e-6)
    # a position that is no mask keeps its confidence and its credit
    third = trace(torch.tensor([[5, 4]]), torch.tensor([[0.5, float("-inf")]]), torch.tensor([[True, False]]), 0, 2)
    assert third[0, 1].item() == float("-inf")
    assert trace.credit[0, 1].item() == pytest.approx(0.2 ** 0.5, abs=1e-6)


def test_a_stable_draft_commits_the_rows_masks():
    stable = StableCommit(2, rows=2, canvas_len=3, device="cpu")
    mask = torch.tensor([[True, True, True], [True, True, True]])
    nothing = torch.zeros(2, 3, dtype=torch.bool)
    draft = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert not stable(nothing, draft, mask, 0, 3, first_pass_of_block=True).any()  # no previous draft
    assert not stable(nothing, draft, mask, 0, 3, first_pass_of_block=False).any()  # stable once
    changed = torch.tensor([[5, 6, 7], [5, 8, 7]])
    out = stable(nothing, changed, mask, 0, 3, first_pass_of_block=False)  # row 0 stable twice, row 1 changed
    assert out.tolist() == [[True, True, True], [False, False, False]]
    # only the masks count: a committed position's prediction may change
    partly = torch.tensor([[True, True, True], [False, True, True]])
    out = stable(nothing, torch.tensor([[5, 6, 7], [0, 8, 7]]), partly, 0, 3, first_pass_of_block=False)
    assert out[1].tolist() == [False, False, False]  # row 1 stable once since its change
    out = stable(nothing, torch.tensor([[5, 6, 7], [1, 8, 7]]), partly, 0, 3, first_pass_of_block=False)
    assert out[1].tolist() == [False, True, True]


STRATEGIES = {
    "factor": dict(parallel_factor=1.0, alg_p_threshold=None),
    "credit": dict(credit_decoding=True, alg_p_threshold=0.3),
    "credit+factor": dict(credit_decoding=True, parallel_factor=1.0, alg_p_threshold=None),
    "stable": dict(commit_when_stable=1, alg_p_threshold=0.3),
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("use_cache", [False, True])
def test_each_row_decodes_as_alone(strategy, use_cache):
    model = tiny_model(0.2)
    batch, image_alone, text_alone = mixed_batch()
    settings = dict(max_new_tokens=10, steps=10, alg="maskgit_plus", use_cache=use_cache, **STRATEGIES[strategy])
    together = run(model, batch, **settings).sequences
    assert torch.equal(together[0], run(model, image_alone, **settings).sequences[0])
    assert torch.equal(together[1, 5:], run(model, text_alone, **settings).sequences[0])


def test_the_strategies_commit_more_per_pass_than_the_schedule():
    model, inputs = tiny_model(0.2), image_inputs()
    base = run(model, inputs, max_new_tokens=16, steps=16, alg="maskgit_plus")
    factor = run(model, inputs, max_new_tokens=16, steps=16, alg="maskgit_plus", parallel_factor=4.0)
    assert factor.num_forward_passes < base.num_forward_passes / 2
    credit = run(model, inputs, max_new_tokens=16, steps=16, alg="maskgit_plus", alg_p_threshold=0.5,
                 credit_decoding=True)
    threshold = run(model, inputs, max_new_tokens=16, steps=16, alg="maskgit_plus", alg_p_threshold=0.5)
    assert credit.num_forward_passes <= threshold.num_forward_passes  # credit only raises confidences


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(parallel_factor=1.0, alg_p_threshold=0.9), r"`parallel_factor` must be None when `alg_p_threshold`"),
        (dict(parallel_factor=0), r"`parallel_factor` must be a number > 0"),
        (dict(parallel_factor=1.0, decoding_pipeline="dream"), r"`parallel_factor` must be left unset with decoding_pipeline='dream'"),
        (dict(credit_decoding=True, alg="entropy"), r"`credit_decoding` must be False unless alg='maskgit_plus'"),
        (dict(credit_decoding="yes"), r"`credit_decoding` must be True or False"),
        (dict(commit_when_stable=0), r"`commit_when_stable` must be an integer >= 1"),
    ],
)
def test_bad_values_raise_before_the_first_pass(kwargs, message, monkeypatch):
    model = tiny_model()
    calls = []
    forward = model.decoder_forward
    monkeypatch.setattr(model, "decoder_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    settings = {"max_new_tokens": 8, "steps": 8, "alg": "maskgit_plus", **kwargs}
    with pytest.raises(ValueError, match=message):
        run(model, image_inputs(), **settings)
    assert calls == []
