"""Multi-turn decoding with `past_key_values` (issue 36): the output's cache of prompt + answer, and a next turn that
runs only its own tokens over it.

Oracles: the cache of turn 1 equals a fresh prefill of turn 1 (one bidirectional pass over its prompt and answer);
the first pass of turn 2 over the cache equals one forward over the whole conversation in which turn 1's positions
see only turn 1 (what the cache holds); images of turn 1 are not encoded again; rows of a batch continue as alone.
"""

import pytest
import torch

from dimple.generation_utils import DimpleConversationCache
from dimple.modeling_dimple import DimplePrefixCache
from dimple_tools.tiny.configs import BOS_ID, MASK_ID
from test_generation import image_inputs, run, tiny_model

SETTINGS = dict(max_new_tokens=8, steps=8, alg="maskgit_plus", alg_p_threshold=0.3, use_cache=True)
TURN_2 = [BOS_ID, 30, 31, 32]


def capture_first_logits(store):
    def hook(step, x, logits):
        if step == 0:
            store.append(logits.clone())
        return logits

    return hook


def test_the_cache_of_turn_1_is_a_fresh_prefill_of_turn_1():
    model, inputs = tiny_model(0.2), image_inputs()
    out = run(model, inputs, stop_at_eos=True, **SETTINGS)
    cache = out.past_key_values
    assert isinstance(cache, DimpleConversationCache)
    sequence = cache.token_ids
    assert torch.equal(sequence, out.sequences[:, : sequence.shape[1]])
    fresh = DimplePrefixCache(sequence.shape[1])
    with torch.no_grad():
        model(input_ids=sequence, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
              past_key_values=fresh, attention_mask=cache.attention_mask)
    kept = cache.key_values(model)
    assert kept.length == sequence.shape[1] == cache.length
    for ours, reference in zip(kept.key_values, fresh.key_values):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_turn_2_over_the_cache_is_the_conversation_with_turn_1_seeing_only_itself(use_cache, monkeypatch):
    model, inputs = tiny_model(0.2), image_inputs()
    first = run(model, inputs, stop_at_eos=True, **SETTINGS)
    turn_1 = first.past_key_values.token_ids
    encoded = []
    visual = model.visual.forward
    monkeypatch.setattr(model.visual, "forward", lambda *a, **k: encoded.append(1) or visual(*a, **k))
    logits = []
    second = run(model, torch.tensor([TURN_2]), past_key_values=first.past_key_values,
                 generation_logits_hook_func=capture_first_logits(logits), **{**SETTINGS, "use_cache": use_cache})
    assert encoded == []  # turn 1's image is not encoded again
    assert torch.equal(second.sequences[:, : len(TURN_2)], torch.tensor([TURN_2]))

    # Oracle: one forward over turn 1 + turn 2 + the masked canvas, turn 1's queries attending to turn 1 only.
    conversation = torch.cat([turn_1, torch.tensor([TURN_2]), torch.full((1, 8), MASK_ID)], 1)
    n, total = turn_1.shape[1], conversation.shape[1]
    mask = torch.ones(1, 1, total, total, dtype=torch.bool)
    mask[:, :, :n, n:] = False
    keys_of_turn_1 = first.past_key_values.attention_mask.bool()
    mask[:, :, :, :n] &= keys_of_turn_1[:, None, None, :]
    mask[:, :, torch.arange(total), torch.arange(total)] = True
    positions, _ = model.get_rope_index(conversation, inputs["image_grid_thw"])
    with torch.no_grad():
        reference = model(input_ids=conversation, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                          attention_mask=mask, position_ids=positions).logits
    canvas = slice(n + len(TURN_2) - 1, total - 1)
    torch.testing.assert_close(logits[0][0], reference[0, canvas], rtol=1e-4, atol=1e-4)


def test_a_batch_of_conversations_continues_as_each_alone():
    """Two rows whose turn-1 answers end at different lengths (padding between answer and turn 2 in the shorter
    row): each row's turn 2 equals continuing that row's conversation alone."""
    model = tiny_model(0.2)
    inputs = image_inputs(batch=2)
    inputs["pixel_values"][16:] *= -1  # another image in row 1
    settings = dict(SETTINGS, stop_at_eos=True)
    first = run(model, inputs, **settings)
    second = run(model, torch.tensor([TURN_2] * 2), past_key_values=first.past_key_values, **settings)
    for row in range(2):
        alone_inputs = {k: v[row : row + 1] for k, v in inputs.items() if k != "pixel_values"}
        alone_inputs["pixel_values"] = inputs["pixel_values"][16 * row : 16 * (row + 1)]
        alone_first = run(model, alone_inputs, **settings)
        assert torch.equal(alone_first.sequences[0], first.sequences[row])
        alone_second = run(model, torch.tensor([TURN_2]), past_key_values=alone_first.past_key_values, **settings)
        assert torch.equal(alone_second.sequences[0], second.sequences[row]), row


def test_open_ended_turns_chain():
    model = tiny_model(0.2)
    first = run(model, image_inputs(), open_ended=True, block_length=4, max_new_tokens=16, steps=16,
                alg="maskgit_plus", alg_p_threshold=0.3)
    second = run(model, torch.tensor([TURN_2]), past_key_values=first.past_key_values, open_ended=True,
                 block_length=4, max_new_tokens=16, steps=16, alg="maskgit_plus", alg_p_threshold=0.3)
    third = run(model, torch.tensor([TURN_2]), past_key_values=second.past_key_values, max_new_tokens=4, steps=4)
    assert third.past_key_values.length == (second.past_key_values.length + third.past_key_values.token_ids.shape[1])
    assert not bool((third.sequences == MASK_ID).any())


@pytest.mark.parametrize(
    "past, kwargs, message",
    [
        ("a dict", {}, r"`past_key_values` must be the `past_key_values` of an earlier"),
        ("two rows", {}, r"`past_key_values` holds 2 conversations: continue them with as many rows"),
        ("one row", dict(num_return_sequences=2), r"num_return_sequences 1, got 1 rows and num_return_sequences 2"),
    ],
)
def test_a_bad_cache_is_refused_before_the_first_pass(past, kwargs, message):
    model = tiny_model(0.2)
    if past == "a dict":
        cache = {"key_values": []}
    else:
        cache = run(model, image_inputs(batch=2 if past == "two rows" else 1), **SETTINGS).past_key_values
    with pytest.raises(ValueError, match=message):
        run(model, torch.tensor([TURN_2]), past_key_values=cache, **{**SETTINGS, **kwargs})
