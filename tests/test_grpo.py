"""`dimple-train --stage grpo`: diffu-GRPO's estimator, GRPO's advantage and loss, rewards, a learned step,
bad reward functions, resume. A tiny random Dimple on the CPU (the fixture of test_training)."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("trl", reason="--stage grpo needs trl (requirements-dev.txt; not on transformers < 4.56)")

from test_training import tiny  # noqa: F401  (fixture)

from dimple.modeling_dimple import DimpleModel
from dimple.processing_dimple import DimpleProcessor
from dimple_tools.tiny.task import write_dataset
from dimple_tools.training import grpo, rewards
from dimple_tools.training import train as train_dimple
from transformers import HfArgumentParser


def config(tiny, out, *extra, data=None, steps=2):  # noqa: F811
    argv = ["--model_name_or_path", str(tiny["init"]), "--data_path", str(data or tiny["data"]),
            "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "8",
            "--num_generations", "4", "--max_completion_length", "12", "--learning_rate", "1e-3",
            "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no", "--seed", "0",
            "--logging_steps", "1", "--disable_tqdm", "true", "--gradient_checkpointing", "false",
            "--dataloader_num_workers", "0", *extra]
    argv = train_dimple.respell_checkpointing_flags(argv)
    (args,) = HfArgumentParser(grpo.DimpleGRPOConfig).parse_args_into_dataclasses(args=argv)
    return args


@pytest.fixture(scope="module")
def small_data(tiny, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("grpo-data")
    return Path(write_dataset(str(folder), n=8, seed=3, image_size=56))


@pytest.fixture(scope="module")
def batch(tiny):  # noqa: F811
    """Two left-padded image prompts (processor output) and a model in eval mode with bidirectional attention."""
    processor = DimpleProcessor.from_pretrained(str(tiny["init"]))
    model = DimpleModel.from_pretrained(str(tiny["init"])).eval()
    model.config.full_attn_mask = True
    from dimple_tools.tiny.task import sample_image

    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
             for text in ("Describe the image.", "How many shapes are there in this picture?")]
    prompts = [processor.apply_chat_template(chat, add_generation_prompt=True) for chat in chats]
    inputs = processor(images=[sample_image(56)] * 2, text=prompts, return_tensors="pt")
    return model, processor, inputs


# ---------------------------------------------------------------------------------------------------------
# The estimator
# ---------------------------------------------------------------------------------------------------------

def test_prompt_masking_follows_each_rows_seed_and_spares_image_and_padding():
    ids = torch.tensor([[0, 0, 5, 9, 7, 7, 7, 8], [1, 5, 9, 9, 7, 6, 6, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    seeds = torch.tensor([11, 12])
    out = grpo.mask_prompt(ids, mask, seeds, 0.5, mask_token_id=99, keep_ids={7, 8})
    for row in range(2):
        draws = torch.rand(8, generator=torch.Generator().manual_seed(int(seeds[row])))
        expected = ids[row].clone()
        for j in range(8):
            if draws[j] < 0.5 and mask[row, j] == 1 and int(ids[row, j]) not in (7, 8):
                expected[j] = 99
        assert torch.equal(out[row], expected)
    assert (out != ids).any(), "seeds 11/12 mask something at p 0.5"
    assert torch.equal(grpo.mask_prompt(ids, mask, seeds, 0.0, 99, {7}), ids)


def test_estimator_is_one_bidirectional_pass_over_masked_prompt_and_masked_canvas(batch):
    model, processor, inputs = batch
    mask_id = model.config.mask_token_id
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    completion = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    keep = {model.config.image_token_id, model.config.vision_start_token_id, model.config.vision_end_token_id,
            *processor.tokenizer.all_special_ids} - {mask_id}
    seeds = torch.tensor([3, 4])
    masked = grpo.mask_prompt(ids, attention, seeds, 0.3, mask_id, keep)
    assert (masked == mask_id).any() and not (masked[ids == model.config.image_token_id] == mask_id).any()
    with torch.no_grad():
        got, entropy = grpo.completion_log_probs(model, masked, attention, completion, 8, mask_token_id=mask_id,
                                                 pixel_values=inputs["pixel_values"],
                                                 image_grid_thw=inputs["image_grid_thw"], with_entropy=True)
        # by hand: prompt + 8 masks, logits at P + j - 1 predict canvas position j
        P = ids.shape[1]
        full = torch.cat([masked, torch.full((2, 8), mask_id)], 1)
        logits = model(input_ids=full, attention_mask=torch.cat([attention, torch.ones(2, 8, dtype=torch.long)], 1),
                       pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
        for row in range(2):
            for j in range(5):
                log_p = torch.log_softmax(logits[row, P + j - 1].double(), -1)
                assert math.isclose(got[row, j].item(), log_p[completion[row, j]].item(), abs_tol=1e-5)
                assert math.isclose(entropy[row, j].item(), -(log_p.exp() * log_p).sum().item(), abs_tol=1e-4)


def test_unmasked_prompt_estimator_equals_the_first_pass_of_diffusion_generate(batch):
    """An independent oracle: with nothing masked in the prompt, the estimator's logits are those of the
    decoder's first pass over the canvas (no prefilling: the prompt sees the canvas, as in the estimator)."""
    model, processor, inputs = batch
    with torch.no_grad():
        out = model.diffusion_generate(**inputs, max_new_tokens=8, steps=8, use_cache=False, alg_p_threshold=0.0,
                                       output_logits=True, return_dict_in_generate=True)
        first = torch.log_softmax(out.logits[0].double(), -1)
        tokens = out.sequences[:, inputs["input_ids"].shape[1]:][:, :6]
        got, _ = grpo.completion_log_probs(model, inputs["input_ids"], inputs["attention_mask"], tokens, 8,
                                           mask_token_id=model.config.mask_token_id,
                                           pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    expected = first[:, :6].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_commit_groups_split_each_rows_decoding_steps_into_runs():
    M = 9  # mask id; canvases after each of 4 steps
    history = torch.tensor([
        [[1, M, M, M], [M, M, 2, M]],
        [[1, 3, M, M], [M, M, 2, M]],
        [[1, 3, M, M], [4, 4, 2, M]],
        [[1, 3, 5, 5], [4, 4, 2, M]],  # row 1's last position is never committed: counted as last
    ])
    # row 0 commits at steps 0, 1, 3 (three distinct), row 1 at 0, 2 and "4"
    assert grpo.commit_groups(history, M, groups=8).tolist() == [[0, 1, 2, 2], [1, 1, 0, 2]]
    assert grpo.commit_groups(history, M, groups=2).tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    assert grpo.commit_groups(history, M, groups=1).tolist() == [[0] * 4, [0] * 4]
    groups = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2]])
    passes = grpo.canvas_masks(torch.tensor([0, 1]), 4, "trajectory", groups)
    assert [(m.tolist(), s.tolist()) for m, s in passes] == [
        ([[True] * 4, [True] * 4], [[True, False, False, False], [False, False, True, False]]),
        ([[False, True, True, True], [True, True, False, True]], [[False, True, False, False], [True, True, False, False]]),
        ([[False, False, True, True], [False, False, False, True]], [[False, False, True, True], [False, False, False, True]]),
    ]
    with pytest.raises(ValueError, match="trajectory.*commit groups"):
        grpo.canvas_masks(torch.tensor([0]), 4, "trajectory")


def test_trajectory_estimator_gives_each_token_the_decoders_own_log_probability_at_its_step(batch):
    """An independent oracle: a greedy decode of about one token per step without prefilling; with a group
    per step, each token's trajectory log-probability is the log-softmax of the decoder's logits at the step that
    committed it (every earlier token visible, every later one masked)."""
    model, processor, inputs = batch
    mask_id, width = model.config.mask_token_id, inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = model.diffusion_generate(**inputs, max_new_tokens=6, steps=6, use_cache=False, alg_p_threshold=0.0,
                                       output_logits=True, output_history=True, return_dict_in_generate=True)
        history = torch.stack(out.history)[:, :, width:]
        groups = grpo.commit_groups(history, mask_id, groups=6)
        tokens = out.sequences[:, width:]
        got, _ = grpo.completion_log_probs(model, inputs["input_ids"], inputs["attention_mask"], tokens, 6,
                                           mask_token_id=mask_id, pixel_values=inputs["pixel_values"],
                                           image_grid_thw=inputs["image_grid_thw"],
                                           passes=grpo.canvas_masks(torch.tensor([0, 1]), 6, "trajectory", groups))
    assert len(out.logits) == len(history) >= 4 and groups.max() >= 3, "a decode of several steps"
    for row in range(2):
        for j in range(6):
            step = next(k for k in range(len(history)) if history[k, row, j] != mask_id)
            expected = torch.log_softmax(out.logits[step][row, j].double(), -1)[tokens[row, j]]
            assert math.isclose(got[row, j].item(), expected.item(), abs_tol=1e-5), (row, j)


def test_coupled_estimator_scores_each_token_once_under_complementary_masks(batch):
    model, processor, inputs = batch
    mask_id, pad = model.config.mask_token_id, processor.tokenizer.pad_token_id
    seeds = torch.tensor([5, 6])
    passes = grpo.canvas_masks(seeds, 8, "coupled")
    assert len(passes) == 2 and torch.equal(passes[0][0], ~passes[1][0])
    assert all(torch.equal(masked, scored) for masked, scored in passes)
    for row, seed in enumerate(seeds.tolist()):  # t_r then the draws, from the row's own stream
        generator = torch.Generator().manual_seed(seed + 1)
        t = torch.rand(1, generator=generator)
        assert torch.equal(passes[0][0][row], torch.rand(8, generator=generator) < t)
    completion = torch.randint(0, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    ids, attention = inputs["input_ids"], inputs["attention_mask"]
    kwargs = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    with torch.no_grad():
        got, _ = grpo.completion_log_probs(model, ids, attention, completion, 8, mask_token_id=mask_id,
                                           pad_token_id=pad, passes=passes, **kwargs)
        P = ids.shape[1]
        canvas = torch.cat([completion, torch.full((2, 3), pad)], 1)
        for masked, _ in passes:
            x = torch.cat([ids, canvas.masked_fill(masked, mask_id)], 1)
            logits = model(input_ids=x, attention_mask=torch.cat([attention, torch.ones(2, 8, dtype=torch.long)], 1),
                           **kwargs).logits
            for row in range(2):
                for j in range(5):
                    if masked[row, j]:
                        log_p = torch.log_softmax(logits[row, P + j - 1].double(), -1)[completion[row, j]]
                        assert math.isclose(got[row, j].item(), log_p.item(), abs_tol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Advantage and loss
# ---------------------------------------------------------------------------------------------------------

def test_group_advantages_by_hand():
    rewards_ = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std().item()  # 0.5774 (unbiased)
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
    assert torch.allclose(grpo.group_advantages(rewards_, 4), torch.tensor(expected), atol=1e-6)
    assert torch.allclose(grpo.group_advantages(rewards_, 4, scale=False), torch.tensor([.5, -.5, -.5, .5, 0, 0, 0, 0]))


def test_grpo_loss_and_advantages_of_a_step_match_a_hand_computation(tiny, tmp_path, small_data):  # noqa: F811
    """TRL's loss on one generated batch (loss_type grpo, epsilon 0.2) from the estimator's log-probabilities
    by hand: per token -min(r A, clip(r, 0.8, 1.2) A), r = exp(logp - old logp), mean over each completion's
    tokens, then over completions; the advantages are group_advantages of the rewards."""
    pad = tiny["ids"]["pad_token_id"]

    def answer_length(ids):
        return ids.index(pad) if pad in ids else len(ids)

    def reward(prompts, completions, completion_ids, **_):
        return [float(answer_length(list(ids)) % 3) for ids in completion_ids]

    args = config(tiny, tmp_path / "out", "--loss_type", "grpo", "--num_iterations", "2", data=small_data)
    trainer, _, _ = grpo.build_trainer(args, reward_funcs=[reward])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    rows = [trainer.train_dataset[i] for i in (0, 0, 0, 0, 1, 1, 1, 1)]
    inputs = trainer._generate_and_score_completions(rows)
    # --score_canvas (default): each completion is the whole 12-token canvas, padding after its first end-of-text
    assert inputs["completion_ids"].shape[1] == 12 and bool(inputs["completion_mask"].all())
    for row in inputs["completion_ids"].tolist():
        if pad in row:
            assert set(row[row.index(pad):]) == {pad}
    hand_rewards = torch.tensor([float(answer_length(row) % 3) for row in inputs["completion_ids"].tolist()])
    assert torch.allclose(inputs["advantages"], grpo.group_advantages(hand_rewards, 4), atol=1e-5)
    assert (inputs["advantages"] != 0).any()
    assert inputs["old_per_token_logps"] is not None  # num_iterations 2: the sampling policy's log-probs are kept
    old = inputs["old_per_token_logps"] - 0.3 * inputs["completion_mask"]  # a policy that has moved: r = e^0.3 > 1.2
    inputs["old_per_token_logps"] = old
    loss = trainer._compute_loss(trainer.model, inputs)
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), inputs["completion_ids"].shape[1],
            pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
            num_images=inputs.get("num_images"))
    ratio = torch.exp(logp - old)
    A = inputs["advantages"].unsqueeze(1)
    per_token = -torch.min(ratio * A, ratio.clamp(0.8, 1.2) * A)
    mask = inputs["completion_mask"].float()
    expected = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-4, abs_tol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------------------

def test_builtin_rewards_by_hand():
    truth = "a red circle at the top left and a blue square at the center."
    completions = [[{"role": "assistant", "content": truth}],
                   "a red circle at the top left and a green square at the center.",
                   "a red circle at the top left, a blue square at the center and a red circle at the bottom.",
                   "nothing"]
    assert rewards.shapes_partial_credit(None, completions, [truth] * 4) == [1.0, 0.5, 0.5, 0.0]
    assert rewards.shapes_exact_match(None, completions, [truth] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert rewards.shapes_partial_credit(None, ["Red.", "blue"], ["red", "red"]) == [1.0, 0.0]


@pytest.mark.parametrize("bad,pattern", [
    (lambda prompts, completions, **_: [1.0] * (len(completions) - 1), r"returned 3 rewards for 4 completions"),
    (lambda prompts, completions, **_: [float("nan")] * len(completions), r"reward #0 is nan, not finite"),
    (lambda prompts, completions, **_: ["1"] * len(completions), r"reward #0 is '1', not a number"),
    (lambda prompts, completions, **_: 1.0, r"returned float, not a list"),
], ids=["wrong-length", "nan", "string", "scalar"])
def test_bad_reward_outputs_are_refused_naming_the_function(bad, pattern):
    bad.__name__ = "my_reward"
    with pytest.raises(ValueError, match=r"reward function my_reward.*" if "returned" in pattern else "my_reward"):
        grpo.checked_reward(bad)(prompts=[None] * 4, completions=["a"] * 4)
    with pytest.raises(ValueError, match=pattern):
        grpo.checked_reward(bad)(prompts=[None] * 4, completions=["a"] * 4)


def test_a_nan_reward_stops_training_before_the_first_update(tiny, tmp_path, small_data):  # noqa: F811
    def nan_reward(prompts, completions, **_):
        return [float("nan")] * len(completions)

    args = config(tiny, tmp_path / "out", data=small_data)
    trainer, _, _ = grpo.build_trainer(args, reward_funcs=[nan_reward])
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(ValueError, match="reward function nan_reward: reward #0 is nan"):
        trainer.train()
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("flag,value,pattern", [
    ("--reward_funcs", "no_such_reward", r"--reward_funcs no_such_reward: not a built-in reward \(shapes_exact_match"),
    ("--reward_funcs", "json:no_such_function", r"--reward_funcs json:no_such_function: cannot import it"),
    ("--p_mask_prompt", "1.5", r"--p_mask_prompt must be in \[0, 1\), got 1.5"),
    ("--diffusion_steps", "0", r"--diffusion_steps must be >= 1, got 0"),
])
def test_bad_grpo_flags_are_named(tiny, tmp_path, flag, value, pattern):  # noqa: F811
    with pytest.raises(ValueError, match=pattern):
        args = config(tiny, tmp_path / "out", flag, value)
        grpo.build_trainer(args)


# ---------------------------------------------------------------------------------------------------------
# Learning and resuming
# ---------------------------------------------------------------------------------------------------------

def test_two_steps_move_the_weights_towards_the_higher_reward_completions(tiny, tmp_path, small_data):  # noqa: F811
    """Two GRPO steps on one batch of completions (num_iterations 2: the second step reuses the first's
    samples). Reward: the share of a completion's tokens with an even id. Afterwards the estimator's
    log-probability of each completion (same masking seeds) has risen for those with a positive advantage
    and fallen for those with a negative one: sum_r A_r * change_r > 0, and the best completion of each group
    gained on the worst."""
    args = config(tiny, tmp_path / "out", "--num_iterations", "2", "--learning_rate", "1e-3", data=small_data)
    trainer, _, _ = grpo.build_trainer(args, reward_funcs=[share_of_even])
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    (batch_,) = trainer._buffered_inputs

    def sequence_log_probs():
        trainer._mask_seeds = batch_["prompt_mask_seeds"]
        with torch.no_grad():
            logp, _, _ = trainer._get_per_token_logps_and_entropies(
                trainer.model, torch.cat([batch_["prompt_ids"], batch_["completion_ids"]], 1),
                torch.cat([batch_["prompt_mask"], batch_["completion_mask"]], 1), batch_["completion_ids"].shape[1],
                pixel_values=batch_.get("pixel_values"), image_grid_thw=batch_.get("image_grid_thw"),
                num_images=batch_.get("num_images"))
        mask = batch_["completion_mask"].float()
        return (logp * mask).sum(1) / mask.sum(1)

    after = sequence_log_probs()
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.model.load_state_dict(start)
    before = sequence_log_probs()
    trainer.model.load_state_dict(trained)
    advantages, change = batch_["advantages"], after - before
    assert (advantages != 0).any()
    assert (advantages * change).sum() > 0
    # rows are shuffled within the batch: regroup them by prompt
    groups = {}
    for row, prompt in enumerate(batch_["prompt_ids"].tolist()):
        groups.setdefault(tuple(prompt), []).append(row)
    for rows in groups.values():
        best = max(rows, key=lambda r: advantages[r])
        worst = min(rows, key=lambda r: advantages[r])
        if advantages[best] > advantages[worst]:
            assert change[best] > change[worst]


def grpo_prompt(row):
    from trl.data_utils import prepare_multimodal_messages

    return prepare_multimodal_messages(row["prompt"], images=row["images"])


def share_of_even(prompts, completions, completion_ids, **_):
    """A reward that differs between completions of a random model (the shapes rewards are all 0 there)."""
    return [sum(t % 2 == 0 for t in ids) / len(ids) for ids in completion_ids]


def test_resume_gives_the_step_of_an_uninterrupted_run(tiny, tmp_path, small_data):  # noqa: F811
    whole = tmp_path / "whole"
    grpo.train_grpo(config(tiny, whole, "--save_strategy", "steps", "--save_steps", "1", data=small_data),
                    reward_funcs=[share_of_even])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-1", resumed / "checkpoint-1")
    grpo.train_grpo(config(tiny, resumed, "--save_strategy", "steps", "--save_steps", "1",
                           "--resume_from_checkpoint", "true", data=small_data), reward_funcs=[share_of_even])
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    before = load_file(str(whole / "checkpoint-1" / "model.safetensors"))
    assert any(not torch.equal(before[k], a[k]) for k in a), "step 2 changed the weights"
    history = json.loads((resumed / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "reward" in h] == [1, 2]


def test_dimple_train_stage_grpo_writes_a_checkpoint_that_loads_with_automodel(tiny, tmp_path, small_data):  # noqa: F811
    from transformers import AutoModel

    out = tmp_path / "cli"
    argv = ["--stage", "grpo", "--model_name_or_path", str(tiny["init"]), "--data_path", str(small_data),
            "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "8",
            "--num_generations", "4", "--max_completion_length", "12", "--report_to", "none", "--use_cpu", "true",
            "--save_strategy", "no", "--gradient_checkpointing", "false", "--disable_tqdm", "true",
            "--reward_funcs", "shapes_exact_match,shapes_partial_credit"]
    train_dimple.main(argv)
    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert model.config.full_attn_mask is True
    card = (out / "README.md").read_text()
    assert "GRPO" in card and "shapes_partial_credit" in card
