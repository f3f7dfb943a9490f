"""Open-ended decoding (`open_ended=True`, issue 36): the canvas grows block by block until every row has written
its end-of-text, `max_new_tokens` only bounds it.

Oracles: one block the size of the bound is fixed decoding; the query and key ranges of every pass by hand; a row
of a padded batch decodes as alone and ends on its own; the trained tiny model answers held-out descriptions as
with its 48-token canvas, where a fixed 256 canvas does not; bad combinations raise before the first pass.
"""

import re

import pytest
import torch

from dimple.generation_utils import OPEN_ENDED_BLOCK_LENGTH, plan_blocks
from dimple_tools.tiny.configs import EOS_ID, MASK_ID, PAD_ID
from test_generation import force_token_logits, image_inputs, mixed_batch, run, tiny_model

CACHES = {
    "no-cache": dict(use_cache=False),
    "prefilling": dict(use_cache=True),
    "dual+prefilling": dict(use_cache=True, dual_cache=True),
}


def record_passes(model, monkeypatch) -> list:
    """(first query position, query count, key count) of every forward pass."""
    calls = []
    forward = model.decoder_forward

    def recording(*args, **kwargs):
        embeds, cache, positions = kwargs["inputs_embeds"], kwargs["past_key_values"], kwargs["cache_position"]
        start = 0 if positions is None else int(positions[0])
        calls.append((start, embeds.shape[1], embeds.shape[1] if cache is None else cache.length))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "decoder_forward", recording)
    return calls


def test_block_plan_with_a_shorter_last_block():
    assert plan_blocks(10, 4, 10) == [(0, 4, 4), (4, 8, 3), (8, 10, 3)]
    assert plan_blocks(6, 32, 6) == [(0, 6, 6)]


@pytest.mark.parametrize("cache", list(CACHES))
@pytest.mark.parametrize("alg, threshold", [("maskgit_plus", None), ("maskgit_plus", 0.3), ("entropy", None)])
def test_one_block_the_size_of_the_bound_is_fixed_decoding(cache, alg, threshold):
    model, inputs = tiny_model(0.2), image_inputs(batch=2)
    settings = dict(max_new_tokens=8, steps=8, alg=alg, alg_p_threshold=threshold, stop_at_eos=True,
                    output_history=True, **{k: v for k, v in CACHES[cache].items() if k != "dual_cache"})
    fixed = run(model, inputs, **settings)
    opened = run(model, inputs, open_ended=True, block_length=8, **settings)
    assert torch.equal(opened.sequences, fixed.sequences)
    assert opened.num_forward_passes == fixed.num_forward_passes
    assert all(torch.equal(a, b) for a, b in zip(opened.history, fixed.history))


@pytest.mark.parametrize("cache", list(CACHES))
def test_each_pass_runs_the_block_its_predecessor_and_one_block_in_view(cache, monkeypatch):
    """Bound 10, blocks of 4 (the last one 2), two steps per block (the last block's schedule commits both
positions in one pass: floor(2 x (1 - 0.5005)) = 0 at its first point), nothing ends early. Prompt length P = 11.
    Keys: the prompt and the canvas up to one block past the current one (8, 10, 10). Queries: everything without
    a cache; with prefilling the block's predecessor to the end of the view, the first pass of a block also
    rerunning the previous block (its tokens settled); the dual cache's later passes stop at the block's end."""
    model = tiny_model(0.2)
    calls = record_passes(model, monkeypatch)
    never_end = lambda step, x, logits: logits.index_fill(-1, torch.tensor([EOS_ID, PAD_ID]), -1e4)  # noqa: E731
    out = run(model, image_inputs(), max_new_tokens=10, steps=6, block_length=4, open_ended=True, alg="maskgit_plus",
              generation_logits_hook_func=never_end, **CACHES[cache])
    P = 11
    expected = {
        "no-cache": [(0, P + 8, P + 8)] * 2 + [(0, P + 10, P + 10)] * 3,
        "prefilling": [(0, P + 8, P + 8), (P - 1, 9, P + 8),
                       (P, 10, P + 10), (P + 3, 7, P + 10),
                       (P + 4, 6, P + 10)],
        "dual+prefilling": [(0, P + 8, P + 8), (P - 1, 5, P + 8),
                            (P, 10, P + 10), (P + 3, 5, P + 10),
                            (P + 4, 6, P + 10)],
    }[cache]
    assert calls == expected
    assert out.sequences.shape == (1, P + 10) and not bool((out.sequences == MASK_ID).any())


@pytest.mark.parametrize("cache", list(CACHES))
def test_decoding_ends_when_every_row_has_written_its_end_of_text(cache):
    """Row 0 writes end-of-text at canvas position 5 (block 1), row 1 at position 1 (block 0): blocks 2 and 3 of
    the bound 16 are never run, the sequences stop at the end of block 1, and row 1 took only block 0's passes."""
    model, inputs = tiny_model(0.2), image_inputs(batch=2)

    ends = {0: 5, 1: 1}

    def write_ends(step, x, logits):
        for row, position in ends.items():
            if x[row, 11 + position] == MASK_ID and (position < 4 or not bool((x[row, 11:15] == MASK_ID).any())):
                x[row, 11 + position] = EOS_ID
        return x

    out = run(model, inputs, max_new_tokens=16, steps=16, block_length=4, open_ended=True, alg="maskgit_plus",
              generation_tokens_hook_func=write_ends, **CACHES[cache])
    answer = out.sequences[:, 11:]
    assert answer.shape == (2, 8)
    assert answer[0, 5] == EOS_ID and bool((answer[0, 6:] == PAD_ID).all()) and not bool((answer[0, :5] == MASK_ID).any())
    assert answer[1, 1] == EOS_ID and bool((answer[1, 2:] == PAD_ID).all())
    assert out.num_forward_passes <= 8  # blocks 0 and 1, at most 4 steps each
    tokens = out.tokens_per_forward
    assert tokens.shape == (2,) and float(tokens[1]) <= 1.0 and float(tokens[0]) > 0


@pytest.mark.parametrize("cache", list(CACHES))
def test_each_row_decodes_as_alone(cache):
    model = tiny_model(0.2)
    batch, image_alone, text_alone = mixed_batch()
    settings = dict(max_new_tokens=12, steps=12, block_length=4, open_ended=True, alg="maskgit_plus",
                    alg_p_threshold=0.2, **CACHES[cache])
    together = run(model, batch, **settings).sequences[:, 11:]
    alone = [run(model, image_alone, **settings).sequences[0, 11:], run(model, text_alone, **settings).sequences[0, 6:]]
    for row, answer in enumerate(alone):
        padded = torch.nn.functional.pad(answer, (0, together.shape[1] - answer.shape[0]), value=PAD_ID)
        assert torch.equal(together[row], padded), row


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(open_ended=True, stop_at_eos=False), r"`stop_at_eos=False` cannot hold with `open_ended=True`"),
        (dict(open_ended="yes"), r"`open_ended` must be True or False"),
        (dict(open_ended=True, max_new_tokens=64, steps=1, block_length=16), r"`steps` must be >= the number of blocks \(4"),
        (dict(open_ended=True, max_new_tokens=None), r"`max_new_tokens` must be an integer >= 1 .*open_ended=True"),
    ],
)
def test_bad_combinations_raise_before_the_first_pass(kwargs, message, monkeypatch):
    model = tiny_model()
    calls = record_passes(model, monkeypatch)
    with pytest.raises(ValueError, match=message):
        run(model, image_inputs(), **{"max_new_tokens": 8, "steps": 8, **kwargs})
    assert calls == []


def test_the_default_block_and_a_bound_it_does_not_divide():
    model = tiny_model(0.2)
    never_end = lambda step, x, logits: logits.index_fill(-1, torch.tensor([EOS_ID, PAD_ID]), -1e4)  # noqa: E731
    bound = OPEN_ENDED_BLOCK_LENGTH + 3
    out = run(model, image_inputs(), max_new_tokens=bound, steps=bound, open_ended=True, alg_p_threshold=0.5,
              generation_logits_hook_func=never_end)
    assert out.sequences.shape == (1, 11 + bound) and not bool((out.sequences == MASK_ID).any())


def test_a_forced_end_of_text_ends_the_answer_in_the_first_block():
    model = tiny_model(0.2)
    out = run(model, image_inputs(), max_new_tokens=64, steps=64, block_length=8, open_ended=True, alg="maskgit_plus",
              generation_logits_hook_func=force_token_logits(EOS_ID, positions=[2]))
    assert out.sequences.shape == (1, 11 + 8)
    assert out.sequences[0, 13] == EOS_ID and bool((out.sequences[0, 14:] == PAD_ID).all())


# --------------------------------------------------------------------------------------------------
# transformers' generation conventions: logits processors, stopping criteria lists, drafts, scores, progress
# --------------------------------------------------------------------------------------------------


def test_a_logits_processor_list_applies_to_every_pass():
    from transformers import LogitsProcessorList, SuppressTokensLogitsProcessor

    model = tiny_model(0.2)
    plain = run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus").sequences[0, 11:]
    banned = sorted(set(plain.tolist()))[:3]
    suppress = LogitsProcessorList([SuppressTokensLogitsProcessor(banned, device="cpu")])
    out = run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus", logits_processor=suppress)
    assert not set(out.sequences[0, 11:].tolist()) & set(banned)
    # the same as a logits hook that does it by hand
    hook = lambda step, x, logits: logits.index_fill(-1, torch.tensor(banned), float("-inf"))  # noqa: E731
    by_hand = run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus", generation_logits_hook_func=hook)
    assert torch.equal(out.sequences, by_hand.sequences)


def test_a_stopping_criteria_list_stops_the_decode():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class AfterPasses(StoppingCriteria):
        def __init__(self, n):
            self.calls = 0
            self.n = n

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            return torch.full((input_ids.shape[0],), self.calls >= self.n, dtype=torch.bool)

    model = tiny_model(0.2)
    out = run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus",
              stopping_criteria=StoppingCriteriaList([AfterPasses(3)]))
    assert out.num_forward_passes == 3 and int((out.sequences[0, 11:] == MASK_ID).sum()) == 5


def test_scores_and_logits_per_pass():
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    model = tiny_model(0.2)
    out = run(model, image_inputs(), max_new_tokens=8, steps=8, block_length=4, alg="maskgit_plus",
              output_scores=True, output_logits=True, logits_processor=LogitsProcessorList([TemperatureLogitsWarper(0.5)]))
    assert len(out.scores) == len(out.logits) == out.num_forward_passes
    assert all(s.shape == (1, 4, model.config.vocab_size) for s in out.scores)
    assert torch.allclose(out.scores[0], out.logits[0] / 0.5)
    # the first pass's raw logits are the model's at the first block's positions
    with torch.no_grad():
        inputs = image_inputs()
        x = torch.cat([inputs["input_ids"], torch.full((1, 8), MASK_ID)], 1)
        reference = model(input_ids=x, pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
    assert torch.allclose(out.logits[0][0], reference[0, 10:14], atol=1e-5)


def test_drafts_and_settled_tokens_are_consistent():
    """A streamer with `put_draft` and `settled_tokens = True`: every pass, the settled tokens so far followed by the
    draft are the canvas with the pass's predictions; the settled tokens at the end are the answer."""

    class Recorder:
        settled_tokens = True

        def __init__(self):
            self.settled, self.drafts, self.ended = [], [], False

        def put(self, value):
            if not self.settled and not self.drafts and torch.is_tensor(value):  # the prompt
                return
            self.settled.extend(value[0].tolist())

        def put_draft(self, value, canvas):
            self.drafts.append((list(self.settled), value[0].tolist(), canvas[0].tolist()))

        def end(self):
            self.ended = True

    model = tiny_model(0.2)
    recorder = Recorder()
    out = run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus", stop_at_eos=True, streamer=recorder)
    assert recorder.ended and len(recorder.drafts) == out.num_forward_passes
    for settled, tail, canvas in recorder.drafts:
        assert canvas[: len(settled) + len(tail)] == settled + tail
        assert MASK_ID not in tail and EOS_ID not in tail
    answer = out.sequences[0, 11:].tolist()
    end = next((i for i, t in enumerate(answer) if t in (EOS_ID, PAD_ID)), len(answer))
    assert recorder.settled == answer[:end]


def test_transformers_text_diffusion_streamer_runs_where_it_exists(capsys):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "TextDiffusionStreamer"):
        pytest.skip("this transformers has no TextDiffusionStreamer")

    class Tokenizer:  # decode ids as numbers: the random model's tokens have no text
        def decode(self, ids, **kwargs):
            return " ".join(str(int(i)) for i in ids) + " "

    model = tiny_model(0.2)
    streamer = transformers.TextDiffusionStreamer(Tokenizer(), skip_prompt=True)
    out = run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus", stop_at_eos=True, streamer=streamer)
    printed = capsys.readouterr().out
    drafts = re.findall("\0337\033\\[33m(.*?)\033\\[0m", printed)
    settled = re.sub("\0337\033\\[33m.*?\033\\[0m(\0338\033\\[J)?", "", printed)  # what stays on screen
    assert len(drafts) == out.num_forward_passes
    answer = out.sequences[0, 11:].tolist()
    end = next((i for i, t in enumerate(answer) if t in (EOS_ID, PAD_ID)), len(answer))
    assert settled.split() == [str(t) for t in answer[:end]]


def test_progress_is_shown_on_request_only(capsys):
    model = tiny_model(0.2)
    run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus")
    assert capsys.readouterr().err == ""
    out = run(model, image_inputs(), max_new_tokens=8, steps=8, alg="maskgit_plus", show_progress=True)
    lines = capsys.readouterr().err.split("\r")
    assert f"{out.num_forward_passes} forward passes, 0 masks left" in lines[-1]
    assert "1 forward passes, 7 masks left" in lines[1]
