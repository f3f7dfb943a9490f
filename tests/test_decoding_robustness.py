"""Bad inputs and runaway settings in `diffusion_generate` (issue 22): each gets a clear error naming the argument,
the row or the forward pass, before the work it would spoil; stopping criteria and settled-token streamers.
"""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from dimple.modeling_dimple import DimpleModel
from dimple_tools.tiny.configs import EOS_ID, MASK_ID, PAD_ID, tiny_config
from test_generation import IMAGE_PROMPT, image_inputs, run, text_inputs, tiny_model


@pytest.fixture
def model():
    return tiny_model()


def count_passes(model, monkeypatch) -> list:
    calls = []
    forward = model.decoder_forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "decoder_forward", counting)
    return calls


# --------------------------------------------------------------------------------------------------
# Inputs that would decode silently wrong
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask, row", [([[0, 0, 0, 0, 0, 0]], 0), ([[1] * 6, [0] * 6], 1)])
def test_a_row_of_padding_only_is_named(model, monkeypatch, mask, row):
    passes = count_passes(model, monkeypatch)
    ids = text_inputs(len(mask))
    with pytest.raises(ValueError, match=rf"`attention_mask`: row {row} is all padding"):
        model.diffusion_generate(ids, attention_mask=torch.tensor(mask), max_new_tokens=4, steps=4)
    assert passes == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixel_values_are_refused(model, monkeypatch, bad):
    passes = count_passes(model, monkeypatch)
    inputs = image_inputs()
    inputs["pixel_values"][3, 7] = bad
    with pytest.raises(ValueError, match="`pixel_values` holds NaN or infinite values"):
        run(model, inputs, max_new_tokens=4, steps=4)
    assert passes == []


def test_a_nan_weight_is_named_at_its_forward_pass():
    torch.manual_seed(0)
    model = DimpleModel(tiny_config()).eval()
    with torch.no_grad():
        model.lm_head.weight[5, 0] = float("nan")
    with pytest.raises(ValueError, match="logits at forward pass 1 are not finite"):
        run(model, image_inputs(), max_new_tokens=4, steps=4, alg="maskgit_plus")


@pytest.mark.parametrize("use_cache", [False, True])
def test_a_logits_hook_returning_nan_is_named(model, use_cache):
    def hook(step, x, logits):
        if step == 2:
            logits = logits.clone()
            logits[0, :, 3] = float("nan")  # at every position, so at the masked ones too
        return logits

    with pytest.raises(ValueError, match="logits at forward pass 3 are not finite"):
        run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus", use_cache=use_cache,
            generation_logits_hook_func=hook)


def test_a_hook_may_forbid_tokens_with_minus_infinity(model):
    def ban_low_ids(step, x, logits):
        logits = logits.clone()
        logits[..., :100] = float("-inf")
        return logits

    out = run(model, image_inputs(), max_new_tokens=6, steps=6, alg="maskgit_plus", generation_logits_hook_func=ban_low_ids)
    assert (out.sequences[0, len(IMAGE_PROMPT):] >= 100).all()


@pytest.mark.parametrize("bad_id", [-1, 300, 1_000_000])
@pytest.mark.parametrize("at_step", [None, 0])
def test_a_tokens_hook_writing_ids_outside_the_vocabulary_is_named(model, bad_id, at_step):
    def hook(step, x, logits):
        if step == at_step:
            x = x.clone()
            x[0, -1] = bad_id
        return x

    passes = "0" if at_step is None else "1"
    with pytest.raises(ValueError, match=rf"wrote token ids outside the vocabulary \[0, 300\) \(after forward pass {passes}\)"):
        run(model, image_inputs(), max_new_tokens=6, steps=6, generation_tokens_hook_func=hook)


@pytest.mark.parametrize("name", ["pad_token_id", "eos_token_id", "mask_token_id"])
def test_special_ids_outside_the_vocabulary_are_refused(model, monkeypatch, name):
    passes = count_passes(model, monkeypatch)
    with pytest.raises(ValueError, match=rf"`{name}` must be a token id < the vocabulary size 300, got 1000000"):
        run(model, image_inputs(), max_new_tokens=4, steps=4, **{name: 1_000_000})
    assert passes == []


# --------------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------------


def test_the_canvas_must_fit_the_models_positions(monkeypatch):
    model = DimpleModel(tiny_config(max_position_embeddings=64)).eval()
    passes = count_passes(model, monkeypatch)
    prompt = text_inputs()  # 6 tokens
    with pytest.raises(ValueError, match=r"`max_new_tokens` must be at most 58: .*max_position_embeddings \(64\)"):
        model.diffusion_generate(prompt, max_new_tokens=59, steps=4)
    assert passes == []
    assert model.diffusion_generate(prompt, max_new_tokens=58, steps=2).shape == (1, 64)


def test_max_new_tokens_none_says_what_it_must_be(model, monkeypatch):
    """A new user's `max_new_tokens=None` ("as long as it needs") was refused with "already at `max_length`
    (None)"; it now says what the argument is."""
    passes = count_passes(model, monkeypatch)
    with pytest.raises(ValueError, match=r"^`max_new_tokens` must be an integer >= 1 \(the answer canvas.*got None and no `max_length`$"):
        model.diffusion_generate(text_inputs(), max_new_tokens=None, steps=4)
    with pytest.raises(ValueError, match=r"already at `max_length` \(6\)"):
        model.diffusion_generate(text_inputs(), max_new_tokens=None, max_length=6, steps=4)
    assert passes == []


@pytest.mark.parametrize("settings, match", [
    (dict(steps=10**6), r"`steps` must be an integer from 1 to 16384, got 1000000"),
    (dict(num_return_sequences=5000), r"`num_return_sequences` must be an integer from 1 to 1024, got 5000"),
])
def test_runaway_settings_are_refused_with_the_limit(model, monkeypatch, settings, match):
    passes = count_passes(model, monkeypatch)
    with pytest.raises(ValueError, match=match):
        run(model, image_inputs(), max_new_tokens=4, **settings)
    assert passes == []


def test_rows_times_return_sequences_are_bounded(model):
    with pytest.raises(ValueError, match=r"`num_return_sequences` x batch must be at most 1024 rows, got 600 x 2"):
        run(model, text_inputs(2), max_new_tokens=4, steps=4, num_return_sequences=600)


def test_dream_stops_once_nothing_is_masked(model):
    # A tokens hook that fills the canvas after the first step: no later step could change anything.
    def fill(step, x, logits):
        if step == 0:
            x = x.clone()
            x[:, len(IMAGE_PROMPT):] = torch.where(x[:, len(IMAGE_PROMPT):] == MASK_ID, 42, x[:, len(IMAGE_PROMPT):])
        return x

    out = run(model, image_inputs(), max_new_tokens=8, steps=2000, decoding_pipeline="dream", alg="entropy",
              generation_tokens_hook_func=fill)
    assert out.num_forward_passes == 1
    assert not (out.sequences == MASK_ID).any()


# --------------------------------------------------------------------------------------------------
# Stopping criteria and settled-token streamers
# --------------------------------------------------------------------------------------------------


def test_a_stopping_criterion_stops_its_row_and_the_others_decode_as_alone(model):
    inputs = image_inputs(batch=2)
    settings = dict(max_new_tokens=8, steps=8, alg="maskgit_plus")
    alone = run(model, {k: v[:1] if k != "pixel_values" else v[:16] for k, v in inputs.items()}, **settings)
    calls = []

    def stop_row_1_after_two_steps(sequences, scores):
        calls.append(1)
        return torch.tensor([False, len(calls) >= 2])

    out = run(model, inputs, stopping_criteria=[stop_row_1_after_two_steps], output_history=True, **settings)
    assert torch.equal(out.sequences[0], alone.sequences[0])
    masks_of_row_1 = [int((x[1, len(IMAGE_PROMPT):] == MASK_ID).sum()) for x in out.history]
    assert masks_of_row_1[1:] == [masks_of_row_1[1]] * (len(masks_of_row_1) - 1)  # frozen after step 2
    assert masks_of_row_1[-1] > 0


def test_decoding_ends_when_every_row_is_stopped(model):
    out = run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus",
              stopping_criteria=lambda sequences, scores: True)
    assert out.num_forward_passes == 1


def test_a_stopping_criteria_list_of_non_callables_is_refused(model):
    with pytest.raises(ValueError, match="`stopping_criteria` must be a callable"):
        run(model, image_inputs(), max_new_tokens=4, steps=4, stopping_criteria=["stop"])


class SettledRecorder(BaseStreamer):
    settled_tokens = True

    def __init__(self):
        self.prompt, self.pieces, self.ended = None, [], False

    def put(self, value):
        if self.prompt is None:
            self.prompt = value
        else:
            self.pieces.append(value)

    def end(self):
        self.ended = True


@pytest.mark.parametrize("alg", ["origin", "maskgit_plus"])
def test_a_settled_tokens_streamer_gets_each_rows_answer_once_in_order(model, alg):
    streamer = SettledRecorder()
    prior = [MASK_ID] * 5 + [EOS_ID]
    out = run(model, image_inputs(batch=2), max_new_tokens=8, steps=8, alg=alg, response_prior=prior,
              streamer=streamer, generator=torch.Generator().manual_seed(0))
    assert streamer.ended and torch.equal(streamer.prompt, image_inputs(batch=2)["input_ids"])
    for row in range(2):
        answer = out.sequences[row, len(IMAGE_PROMPT):].tolist()
        end = min(answer.index(i) for i in (EOS_ID, PAD_ID) if i in answer)
        streamed = [int(t) for piece in streamer.pieces for t in piece[row]]
        assert streamed == answer[:end]
