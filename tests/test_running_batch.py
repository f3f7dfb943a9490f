"""`RunningDecodeBatch` (`model.running_batch()`): decodes that join and leave one running batch between passes.

Every row must give exactly the answer canvas and the number of forward passes of decoding it alone with
`diffusion_generate` (greedy; a sampled row given its own generator), whatever joins, leaves or widens the batch's
layout around it. On the shipped tiny model (tiny-dimple/), with image questions of the task generator and
text-only prompts of other lengths.
"""

import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FOLDER = ROOT / "tiny-dimple"

from dimple_tools.tiny.task import generate_samples  # noqa: E402

# Text-only prompts: shorter and longer than the image questions' (which are about 34-37 tokens).
SHORT_TEXT = "Describe the image."
LONG_TEXT = "What is at the top left of the picture? Please tell me the colour and the shape of it, exactly."


@pytest.fixture(scope="module")
def tiny():
    if not (FOLDER / "model.safetensors").exists():
        pytest.skip("tiny-dimple/ is not built (`make tiny-dimple`)")
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(FOLDER, trust_remote_code=True)
    return model, processor


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def chat(processor, content) -> dict:
    messages = [{"role": "user", "content": content}]
    return dict(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt"))


def image_prompt(processor, image, question) -> dict:
    return chat(processor, [{"type": "image", "image": image}, {"type": "text", "text": question}])


def text_prompt(processor, text) -> dict:
    return chat(processor, [{"type": "text", "text": text}])


@pytest.fixture(scope="module")
def prompts(tiny):
    """Three image questions (one a description), a short and a long text-only prompt."""
    _, processor = tiny
    samples = generate_samples(6, seed=11)
    describe = next(s for s in generate_samples(10, seed=5) if s[3]["question_type"] == "describe")
    images = [image_prompt(processor, image, question) for image, question, _, _ in samples[:2]]
    images.append(image_prompt(processor, describe[0], describe[1]))
    short, long = text_prompt(processor, SHORT_TEXT), text_prompt(processor, LONG_TEXT)
    widths = [p["input_ids"].shape[1] for p in images]
    assert short["input_ids"].shape[1] < min(widths) and long["input_ids"].shape[1] > max(widths)
    return {"img0": images[0], "img1": images[1], "describe": images[2], "short": short, "long": long}


def fresh(kwargs: dict) -> dict:
    """The settings with a `generator_seed` turned into a fresh generator of that seed."""
    kwargs = dict(kwargs)
    seed = kwargs.pop("generator_seed", None)
    if seed is not None:
        kwargs["generator"] = torch.Generator().manual_seed(seed)
    return kwargs


def alone(model, inputs: dict, kwargs: dict) -> tuple:
    """The answer canvas and the forward passes of decoding `inputs` alone with `diffusion_generate`."""
    out = model.diffusion_generate(**inputs, **fresh(kwargs), return_dict_in_generate=True)
    return out.sequences[0, inputs["input_ids"].shape[1]:], out.num_forward_passes


def run(batch, schedule: list, max_steps: int = 200) -> dict:
    """Add `schedule[i]`'s rows (key, inputs, settings) before step i, then step until the batch is empty.
    Checks every step's updates (one per row in the batch; finished rows gone when it returns); the final
    `RowUpdate` of every key."""
    present, final = set(), {}
    for i in range(max_steps):
        for key, inputs, kwargs in (schedule[i] if i < len(schedule) else []):
            batch.add(key, inputs, **fresh(kwargs))
            present.add(key)
            assert key in batch and len(batch) == len(present)
        if i >= len(schedule) and not len(batch):
            return final
        updates = batch.step()
        assert sorted(map(str, (u.key for u in updates))) == sorted(map(str, present))
        for update in updates:
            assert update.error is None, update.error
            if update.finished:
                assert update.key not in batch
                present.discard(update.key)
                final[update.key] = update
            else:
                assert update.key in batch
        assert len(batch) == len(present)
    raise AssertionError(f"the batch did not empty in {max_steps} steps")


def drain(batch, final: dict, max_steps: int = 100) -> dict:
    """Step until the batch is empty, collecting the finished rows' updates into `final`."""
    for _ in range(max_steps):
        if not len(batch):
            return final
        for update in batch.step():
            assert update.error is None, update.error
            if update.finished:
                assert update.key not in batch
                final[update.key] = update
    raise AssertionError(f"the batch did not empty in {max_steps} steps")


def assert_as_alone(model, final: dict, rows: dict) -> None:
    """Every row's final canvas and passes are those of decoding it alone."""
    assert set(final) == set(rows)
    for key, (inputs, kwargs) in rows.items():
        tokens, passes = alone(model, inputs, kwargs)
        update = final[key]
        assert update.finished
        assert torch.equal(update.canvas, tokens), (key, update.canvas.tolist(), tokens.tolist())
        assert update.passes == passes, (key, update.passes, passes)


def staggered(prompts: dict, kwargs: dict) -> list:
    """Five rows joining at different steps: one, a step, two more, two steps, the short and then the long
    text prompt (which widens the layout)."""
    def row(key):
        return key, prompts[key], kwargs

    return [[row("describe")], [row("img0"), row("img1")], [], [row("short")], [row("long")]]


SETTINGS = {
    "default": dict(),
    "blocks+dual": dict(block_length=8, dual_cache=True),
    "blocks+dual-no-prefill": dict(block_length=8, dual_cache=True, use_cache=False),
    "no-cache": dict(use_cache=False),
    "dream": dict(decoding_pipeline="dream", alg="maskgit_plus", alg_p_threshold=None, steps=16),
    "stop-at-eos": dict(max_new_tokens=24, steps=24, stop_at_eos=True),
    # one token a pass: an end-of-text committed early ends the answer (its masks after it are padding, not passes)
    "stop-at-eos-schedule": dict(max_new_tokens=24, steps=24, stop_at_eos=True, alg_p_threshold=None),
    "schedule": dict(alg_p_threshold=None, steps=12),
}


@pytest.mark.parametrize("settings", list(SETTINGS.values()), ids=list(SETTINGS))
def test_rows_joining_at_different_steps_decode_as_alone(tiny, prompts, settings):
    model, _ = tiny
    schedule = staggered(prompts, settings)
    final = run(model.running_batch(), schedule)
    assert_as_alone(model, final, {key: (inputs, kwargs) for rows in schedule for key, inputs, kwargs in rows})


def test_rows_of_different_settings_share_the_batch(tiny, prompts):
    model, processor = tiny
    prior = processor.tokenizer("a red", add_special_tokens=False)["input_ids"]
    mask, pad = model.generation_config.mask_token_id, model.generation_config.pad_token_id
    short = prompts["short"]  # a prompt with its own left padding
    padded = dict(input_ids=torch.cat([torch.full((1, 4), pad), short["input_ids"]], 1),
                  attention_mask=torch.cat([torch.zeros(1, 4, dtype=torch.long), short["attention_mask"]], 1))
    rows = {
        "default": (prompts["img0"], dict()),
        "short-canvas": (prompts["describe"], dict(max_new_tokens=16, steps=8, alg_p_threshold=None)),
        "blocks+dual": (prompts["short"], dict(max_new_tokens=32, block_length=8, dual_cache=True, steps=16)),
        "blocks-no-cache": (prompts["img1"], dict(max_new_tokens=32, block_length=16, use_cache=False, steps=8,
                                                  alg_p_threshold=None)),
        "dream": (prompts["long"], dict(decoding_pipeline="dream", alg_p_threshold=None, steps=10, max_new_tokens=40)),
        "eos+prior": (prompts["describe"], dict(max_new_tokens=24, steps=12, stop_at_eos=True, alg_p_threshold=None,
                                                response_prior=prior + [mask, mask] + prior)),
        "blocks+dual-no-prefill": (prompts["long"], dict(block_length=12, dual_cache=True, use_cache=False, steps=8)),
        # more steps than masks: the Dream schedule's steps that commit nothing are skipped (no pass)
        "dream-skips": (prompts["img1"], dict(decoding_pipeline="dream", alg_p_threshold=None, steps=16, max_new_tokens=8)),
        "dream-skips-blocks": (prompts["short"], dict(decoding_pipeline="dream", alg_p_threshold=None, steps=16,
                                                      max_new_tokens=8, block_length=4, dual_cache=True)),
        "left-padded": (padded, dict(alg_p_threshold=None, steps=12, max_new_tokens=16)),
        "eos-autoregressive": (prompts["short"], dict(alg="autoregressive", alg_p_threshold=None, stop_at_eos=True,
                                                      max_new_tokens=24, steps=24)),
    }
    keys = list(rows)
    schedule = [[(k, *rows[k]) for k in keys[:3]], [(k, *rows[k]) for k in keys[3:5]], [],
                [(k, *rows[k]) for k in keys[5:8]], [(k, *rows[k]) for k in keys[8:]]]
    final = run(model.running_batch(), schedule)
    assert_as_alone(model, final, rows)
    assert final["dream-skips"].passes < 16 and final["eos-autoregressive"].passes < 24


def test_a_longer_canvas_and_a_longer_prompt_joining_later_widen_the_layout(tiny, prompts):
    model, _ = tiny
    many = dict(alg_p_threshold=None)  # several passes per row: the early rows are still decoding as others join
    rows = {
        "a": (prompts["short"], dict(many, max_new_tokens=8, steps=8)),
        "b": (prompts["img0"], dict(many, max_new_tokens=16, steps=12, block_length=8, dual_cache=True)),
        "c": (prompts["img1"], dict(many, max_new_tokens=48, steps=12)),  # a longer canvas
        "d": (prompts["long"], dict(many, max_new_tokens=32, steps=12, block_length=8, dual_cache=True)),  # longer prompt
        "e": (prompts["short"], dict(many, max_new_tokens=40, steps=10, use_cache=False)),
    }
    batch = model.running_batch()
    final = {}

    def step():
        for update in batch.step():
            assert update.error is None
            if update.finished:
                final[update.key] = update

    for key in ("a", "b"):
        batch.add(key, rows[key][0], **rows[key][1])
    step()
    step()
    widths = (batch.prompt_width, batch.canvas_width)
    batch.add("c", rows["c"][0], **rows["c"][1])
    assert batch.canvas_width > widths[1]
    step()
    assert "a" in batch and "b" in batch and "c" in batch
    batch.add("d", rows["d"][0], **rows["d"][1])
    assert batch.prompt_width > widths[0]
    step()
    batch.add("e", rows["e"][0], **rows["e"][1])
    assert "b" in batch and "c" in batch
    drain(batch, final)
    assert batch.width == 0 and model._qkv_stacking_users == 0  # emptied: the layout starts again
    assert_as_alone(model, final, rows)


def test_removing_a_row_mid_decode(tiny, prompts):
    model, _ = tiny
    settings = dict(alg_p_threshold=None, steps=12)
    rows = {"a": (prompts["img0"], settings), "b": (prompts["describe"], settings), "c": (prompts["short"], settings),
            "d": (prompts["long"], dict(settings, block_length=12, dual_cache=True))}
    batch = model.running_batch()
    for key in ("a", "b", "c"):
        batch.add(key, rows[key][0], **rows[key][1])
    batch.add("d", None, **rows["d"][0], **rows["d"][1])  # the inputs as keyword arguments
    for _ in range(3):
        assert all(not u.finished for u in batch.step())
    batch.remove("b")
    assert "b" not in batch and len(batch) == 3
    updates = batch.step()
    assert sorted(u.key for u in updates) == ["a", "c", "d"]
    final = {u.key: u for u in updates if u.finished}
    drain(batch, final)
    del rows["b"]
    assert_as_alone(model, final, rows)


def test_max_rows_refuses_a_row_until_one_is_removed(tiny, prompts):
    model, _ = tiny
    settings = dict(alg_p_threshold=None, steps=12)
    batch = model.running_batch(max_rows=2)
    batch.add("a", prompts["img0"], **settings)
    batch.add("b", prompts["short"], **settings)
    with pytest.raises(ValueError, match="max_rows"):
        batch.add("c", prompts["img1"], **settings)
    assert "c" not in batch and len(batch) == 2
    batch.step()
    with pytest.raises(ValueError, match="max_rows"):
        batch.add("c", prompts["img1"], **settings)
    batch.remove("a")
    assert len(batch) == 1
    batch.add("c", prompts["img1"], **settings)
    assert "c" in batch and len(batch) == 2
    final = drain(batch, {})
    assert_as_alone(model, final, {"b": (prompts["short"], settings), "c": (prompts["img1"], settings)})


def test_a_finished_row_leaves_at_the_step_it_finishes(tiny, prompts):
    model, _ = tiny
    batch = model.running_batch()
    batch.add("quick", prompts["img0"], max_new_tokens=8, steps=2, alg_p_threshold=None)  # 2 passes
    batch.add("slow", prompts["short"], alg_p_threshold=None, steps=12)
    first = {u.key: u for u in batch.step()}
    assert set(first) == {"quick", "slow"} and not first["quick"].finished and first["quick"].passes == 1
    assert "quick" in batch and len(batch) == 2
    second = {u.key: u for u in batch.step()}
    assert set(second) == {"quick", "slow"}
    assert second["quick"].finished and second["quick"].passes == 2 and not second["slow"].finished
    assert "quick" not in batch and len(batch) == 1
    mask = model.generation_config.mask_token_id
    assert not bool((second["quick"].canvas == mask).any())
    third = batch.step()
    assert [u.key for u in third] == ["slow"]
    batch.remove("slow")
    assert not len(batch)
    tokens, passes = alone(model, prompts["img0"], dict(max_new_tokens=8, steps=2, alg_p_threshold=None))
    assert torch.equal(second["quick"].canvas, tokens) and passes == 2


def test_bad_input_is_refused_before_any_pass(tiny, prompts, monkeypatch):
    model, _ = tiny
    batch = model.running_batch()
    batch.add("a", prompts["short"], alg_p_threshold=None, steps=6, max_new_tokens=12)

    def no_pass(*args, **kwargs):
        raise AssertionError("a refused row ran the model")

    def refused(match, key="b", inputs=prompts["img0"], **kwargs):
        with pytest.raises(ValueError, match=match):
            batch.add(key, inputs, **kwargs)
        assert "b" not in batch and len(batch) == 1

    with monkeypatch.context() as patch:
        for name in ("decoder_forward", "embed_inputs", "forward"):
            patch.setattr(model, name, no_pass)
        refused("`key` 'a' is already decoding", key="a")
        refused("open_ended", open_ended=True)
        refused("num_return_sequences", num_return_sequences=2)
        two = {k: v.repeat(2, 1) for k, v in prompts["short"].items()}
        refused("input_ids batch 1", inputs=two)
        refused("streamer", streamer=object())
        refused("stopping_criteria", stopping_criteria=[lambda sequences, scores: True])
        refused("generation_logits_hook_func", generation_logits_hook_func=lambda step, x, logits: logits)
        refused("generation_tokens_hook_func", generation_tokens_hook_func=lambda step, x, logits: x)
        refused("logits_processor", logits_processor=lambda ids, scores: scores)
        for output in ("output_history", "output_scores", "output_logits"):  # per-call outputs step() never returns
            refused(f"`{output}`: not supported in a running batch", **{output: True})
        refused(r"`steps` must be an integer from 1 to", steps=0)
        refused("block_length", block_length=7)  # not a divisor of the checkpoint's 48
        refused("unknown arguments", frobnicate=1)
        with pytest.raises(ValueError, match="`key` 'zzz' is not decoding"):
            batch.remove("zzz")
    assert len(batch) == 1
    final = drain(batch, {})
    assert_as_alone(model, final, {"a": (prompts["short"], dict(alg_p_threshold=None, steps=6, max_new_tokens=12))})


@pytest.mark.parametrize("max_rows", [0, -1, 1.5, "2"])
def test_max_rows_must_be_a_positive_integer(tiny, max_rows):
    model, _ = tiny
    with pytest.raises(ValueError, match="max_rows"):
        model.running_batch(max_rows=max_rows)


def test_a_seeded_sampled_row_among_greedy_rows(tiny, prompts):
    model, _ = tiny
    rows = {
        "greedy": (prompts["img0"], dict(alg_p_threshold=None, steps=12)),
        "sampled": (prompts["short"], dict(temperature=0.8, alg_p_threshold=None, steps=12, generator_seed=3)),
        "greedy-long": (prompts["long"], dict(alg_p_threshold=None, steps=8)),
        "sampled-dream": (prompts["img1"], dict(temperature=0.8, decoding_pipeline="dream", alg_p_threshold=None,
                                                steps=12, max_new_tokens=24, generator_seed=5)),
    }
    keys = list(rows)
    schedule = [[(keys[0], *rows[keys[0]])], [(k, *rows[k]) for k in keys[1:3]], [(keys[3], *rows[keys[3]])]]
    final = run(model.running_batch(), schedule)
    assert_as_alone(model, final, rows)
    # The draws matter on these prompts (the rows follow their own generators, not a greedy decode): a greedy
    # decode, or another seed, gives other tokens.
    for key in ("sampled", "sampled-dream"):
        inputs, kwargs = rows[key]
        assert not torch.equal(final[key].canvas, alone(model, inputs, dict(kwargs, temperature=0.0, generator_seed=None))[0])
    other = alone(model, rows["sampled"][0], dict(rows["sampled"][1], generator_seed=4))[0]
    assert not torch.equal(final["sampled"].canvas, other)


def test_a_row_whose_canvas_needs_nothing_finishes_at_the_next_step_with_no_pass(tiny, prompts):
    model, processor = tiny
    prior = processor.tokenizer("a red circle.", add_special_tokens=False)["input_ids"]
    prior += [model.generation_config.eos_token_id] * (12 - len(prior))
    full = dict(max_new_tokens=12, response_prior=prior)
    tokens, passes = alone(model, prompts["img0"], full)
    assert passes == 0 and tokens.tolist() == prior
    batch = model.running_batch()
    batch.add("busy", prompts["short"], alg_p_threshold=None, steps=12)
    batch.step()
    batch.add("done", prompts["img0"], **full)
    updates = {u.key: u for u in batch.step()}
    assert set(updates) == {"busy", "done"}
    assert updates["done"].finished and updates["done"].passes == 0 and torch.equal(updates["done"].canvas, tokens)
    assert "done" not in batch and "busy" in batch
    # Alone in the batch, too: a step with no pass to run.
    batch.remove("busy")
    batch.add("done", prompts["img0"], max_new_tokens=12, response_prior=processor.decode(prior),
              tokenizer=processor.tokenizer)
    (update,) = batch.step()
    assert update.finished and update.passes == 0 and torch.equal(update.canvas, tokens)
    assert not len(batch)


def test_a_row_whose_logits_are_not_finite_leaves_with_an_error(tiny, prompts):
    model, _ = tiny
    settings = dict(alg_p_threshold=None, steps=12, max_new_tokens=12)
    handle = model.lm_head.register_forward_hook(lambda module, args, output: output.fill_(float("nan")))
    try:
        with pytest.raises(ValueError, match="not finite"):
            model.diffusion_generate(**prompts["img0"], **settings)
        batch = model.running_batch()
        batch.add("a", prompts["img0"], **settings)
        batch.add("b", prompts["short"], **settings)
        updates = batch.step()
    finally:
        handle.remove()
    assert [u.key for u in updates] == ["a", "b"]
    assert all(u.finished and u.error and "not finite" in u.error and u.passes == 0 for u in updates)
    assert not len(batch)
