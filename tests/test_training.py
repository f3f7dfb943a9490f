"""`dimple-train`: objectives, collators, stage freezing, checkpoints, resume, LoRA and bad input.

Everything runs on the CPU with a tiny Dimple (hidden 64, 2 layers, vision depth 1) built from the tiny
tokenizer and 64 generated 56x56 shapes-task samples; every training run is bounded by steps.
"""

import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

from dimple_tools.training import train as train_dimple  # noqa: E402
from dimple_tools.training import arguments as training_arguments, checkpoints, data as training_data  # noqa: E402
from dimple_tools.tiny.build import GENERATION, build_processor  # noqa: E402
from dimple_tools.tiny.tokenizer import build_tiny_tokenizer  # noqa: E402
from dimple_tools.tiny.task import sample_image, write_dataset  # noqa: E402
from dimple_tools.training.data import (
    ConversationDataset,
    DimpleCollator,
    load_conversations,
    padded_answer_length,
)
from transformers import GenerationConfig, HfArgumentParser  # noqa: E402

from dimple.configuration_dimple import DimpleConfig, DimpleVisionConfig  # noqa: E402
from dimple.modeling_dimple import DimpleModel  # noqa: E402
from dimple.processing_dimple import DimpleProcessor  # noqa: E402

N_SAMPLES = 64
IMAGE_SIZE = 56
MODULES = ("visual", "img_projector", "model", "lm_head")


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


def tiny_dimple_config(ids: dict) -> DimpleConfig:
    vision = DimpleVisionConfig(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        fullatt_block_indexes=[0], window_size=112,
    )
    return DimpleConfig(
        vocab_size=ids["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, mrope_section=[2, 3, 3], max_position_embeddings=512,
        vision_config=vision, full_attn_mask=False,
        **{k: v for k, v in ids.items() if k.endswith("_token_id")},
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Dimple checkpoint folder written by `save_checkpoint`, and a 64-sample dataset."""
    root = tmp_path_factory.mktemp("tiny-training")
    ids = build_tiny_tokenizer(str(root / "tokenizer"))
    processor = build_processor(root / "tokenizer")
    torch.manual_seed(0)
    model = DimpleModel(tiny_dimple_config(ids))
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"],
        mask_token_id=ids["mask_token_id"], **GENERATION,
    )
    checkpoints.save_checkpoint(model, processor, str(root / "init"))
    data = write_dataset(str(root / "data"), n=N_SAMPLES, seed=0, image_size=IMAGE_SIZE)
    return {"root": root, "init": root / "init", "data": Path(data), "ids": ids}


@pytest.fixture(scope="module")
def processor(tiny):
    return DimpleProcessor.from_pretrained(str(tiny["init"]))


@pytest.fixture(scope="module")
def model(tiny):
    return DimpleModel.from_pretrained(str(tiny["init"])).eval()


@pytest.fixture(scope="module")
def dataset(tiny, processor):
    return ConversationDataset(load_conversations(str(tiny["data"])), processor, max_seq_length=1024, seed=0)


def run(tiny, out: Path, *extra, stage="diffusion", steps=30, lr=3e-3, model_dir=None, data=None):
    """One `train_dimple.main` call; returns the loss entries of trainer_state.json's log history."""
    argv = [
        "--model_name_or_path", str(model_dir or tiny["init"]), "--data_path", str(data or tiny["data"]),
        "--stage", stage, "--output_dir", str(out), "--max_steps", str(steps), "--learning_rate", str(lr),
        "--lr_scheduler_type", "constant", "--weight_decay", "0.0", "--per_device_train_batch_size", "8",
        "--logging_steps", "5", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--seed", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
        *extra,
    ]
    train_dimple.main(argv)
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def module_of(key: str) -> str:
    return key.split(".", 1)[0]


def changed_modules(before: dict, after: dict) -> dict:
    """module -> whether any of its tensors differs (bit-wise)."""
    assert set(before) == set(after)
    changed = {name: False for name in MODULES}
    for key, tensor in before.items():
        if not torch.equal(tensor, after[key]):
            changed[module_of(key)] = True
    return changed


# --------------------------------------------------------------------------------------------------
# 1-2. Each objective lowers its loss in a short CPU run
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage,extra",
    [
        ("instruct", ("--trainable", "visual,img_projector,model,lm_head")),
        ("diffusion", ("--masking", "single")),
        ("diffusion", ("--masking", "dual")),
    ],
    ids=["instruct-ar", "diffusion-single", "diffusion-dual"],
)
def test_objective_lowers_loss(tiny, tmp_path, stage, extra):
    history = run(tiny, tmp_path / "out", *extra, stage=stage, steps=30)
    losses = [h["loss"] for h in history]
    assert [h["step"] for h in history] == [5, 10, 15, 20, 25, 30]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.6 * losses[0], losses
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["full_attn_mask"] is (stage == "diffusion")


# --------------------------------------------------------------------------------------------------
# 3. Diffusion collator: masks only answer/padding tokens, scores only masked ones
# --------------------------------------------------------------------------------------------------


def test_padded_answer_length_buckets():
    cases = {1: (2, 2), 3: (4, 4), 4: (5, 8), 7: (8, 8), 15: (16, 16), 16: (17, 32), 20: (21, 32), 33: (34, 48)}
    for n, (lo, hi) in cases.items():
        values = [padded_answer_length(n, random.Random(seed)) for seed in range(600)]
        assert min(values) == lo and max(values) == hi, (n, min(values), max(values))
        if hi - lo >= 3:  # uniform: every length in between is drawn too
            assert set(values) == set(range(lo, hi + 1)), n


def test_dataset_items_are_prompt_then_answer_and_padding(tiny, dataset, processor):
    tokenizer = processor.tokenizer
    samples = load_conversations(str(tiny["data"]))
    for index in range(8):
        item = dataset[index]
        answer = tokenizer(samples[index]["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
        target = item["target_ids"].tolist()
        assert target[: len(answer)] == answer
        assert set(target[len(answer):]) == {tokenizer.pad_token_id}
        assert len(answer) + 1 <= len(target) <= max(2, 1 << (len(answer)).bit_length())
        prompt = tokenizer.decode(item["prompt_ids"])
        assert prompt.endswith("<|im_start|>assistant\n"), prompt
        assert (item["prompt_ids"] == tiny["ids"]["image_token_id"]).sum() == 9  # 84x84 -> 3x3 merged patches
        assert item["pixel_values"].shape[0] == 36


def _collator(model, processor, **kwargs):
    return DimpleCollator(
        model=model, pad_token_id=processor.tokenizer.pad_token_id, mask_token_id=model.config.mask_token_id,
        **kwargs,
    )


def test_diffusion_collator_masks_and_scores_only_targets(dataset, model, processor):
    mask_id = model.config.mask_token_id
    collator = _collator(model, processor, diffusion=True, seed=0)
    items = [dataset[i] for i in range(8)]
    batch = collator(items)
    assert batch["input_ids"].shape[0] == len(items)  # single masking: one row per sample
    assert batch["position_ids"].shape == (3, *batch["input_ids"].shape)
    for row, item in enumerate(items):
        prompt, target = item["prompt_ids"], item["target_ids"]
        p, t = len(prompt), len(target)
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        # The prompt is kept and never scored.
        assert torch.equal(ids[:p], prompt)
        assert (ids[:p] != mask_id).all()
        assert (labels[:p] == -100).all()
        # Target region: each position is either masked (and scored against the original token) or kept.
        region, region_labels = ids[p : p + t], labels[p : p + t]
        masked = region == mask_id
        assert masked.any()
        assert torch.equal(region_labels[masked], target[masked])
        assert (region_labels[~masked] == -100).all()
        assert torch.equal(region[~masked], target[~masked])
        # Batch padding: not attended, not scored.
        assert (labels[p + t :] == -100).all()
        assert batch["attention_mask"][row, : p + t].all() and not batch["attention_mask"][row, p + t :].any()
        # Whole row: scored <=> masked.
        assert torch.equal(labels != -100, ids == mask_id)

    # The loss is the mean cross-entropy over the masked positions only (logits at j-1 predict token j).
    model.config.full_attn_mask = True
    try:
        with torch.no_grad():
            out = model(**batch)
    finally:
        model.config.full_attn_mask = False
    log_probs = out.logits.float().log_softmax(-1)
    terms = []
    for row in range(batch["input_ids"].shape[0]):
        for j in range(1, batch["input_ids"].shape[1]):
            if batch["input_ids"][row, j] == mask_id:
                terms.append(-log_probs[row, j - 1, batch["labels"][row, j]])
    assert len(terms) == int((batch["labels"] != -100).sum())
    assert torch.allclose(out.loss, torch.stack(terms).mean(), atol=1e-5)


def test_dual_masking_is_complementary(dataset, model, processor):
    mask_id = model.config.mask_token_id
    collator = _collator(model, processor, diffusion=True, dual=True, seed=1)
    pairs = 0
    for draw in range(30):
        item = dataset[draw % 16]
        collator.epoch = draw // 16  # a sample's second draw is in another epoch
        batch = collator([item])
        p, target = len(item["prompt_ids"]), item["target_ids"]
        region = batch["input_ids"][:, p : p + len(target)] == mask_id
        labels = batch["labels"][:, p : p + len(target)]
        assert torch.equal(labels != -100, region)
        for row in range(region.shape[0]):
            assert torch.equal(labels[row][region[row]], target[region[row]])
            assert torch.equal(batch["input_ids"][row, :p], item["prompt_ids"])
        if region.shape[0] == 2:
            pairs += 1
            assert torch.equal(region[0] | region[1], torch.ones_like(region[0]))
            assert not (region[0] & region[1]).any()
        else:  # the complement is empty: the single copy masks every target token
            assert region.shape[0] == 1 and region[0].all()
    assert pairs >= 15

    # Several samples in one batch: each gives its pair of rows, in order.
    items = [dataset[i] for i in range(4)]
    batch = collator(items)
    row = 0
    for item in items:
        p, t = len(item["prompt_ids"]), len(item["target_ids"])
        first = batch["input_ids"][row, p : p + t] == mask_id
        if first.all():
            row += 1
            continue
        second = batch["input_ids"][row + 1, p : p + t] == mask_id
        assert torch.equal(batch["input_ids"][row + 1, :p], item["prompt_ids"])
        assert torch.equal(first ^ second, torch.ones_like(first)), row
        row += 2
    assert row == batch["input_ids"].shape[0]

    # A one-token target: t masks it, the complement is empty and not added.
    one = {"index": 0, "prompt_ids": torch.tensor([10, 11, 12]), "target_ids": torch.tensor([20])}
    batch = collator([one])
    assert batch["input_ids"].tolist() == [[10, 11, 12, mask_id]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 20]]


def test_masking_ratio_is_drawn_per_sample(model, processor):
    """t ~ U(eps, 1) per sample: the masked fraction differs across the samples of a batch."""
    collator = _collator(model, processor, diffusion=True, seed=2)
    length = 400
    item = {"prompt_ids": torch.tensor([10, 11, 12]), "target_ids": torch.full((length,), 20)}
    fractions = []
    for draw in range(12):
        batch = collator([dict(item, index=8 * draw + i) for i in range(8)])
        rows = (batch["labels"][:, 3:] != -100).float().mean(1)
        assert rows.max() - rows.min() > 0.15, rows  # one t per batch would give ~equal fractions
        fractions += rows.tolist()
    assert min(fractions) < 0.1 and max(fractions) > 0.9
    assert 0.35 < sum(fractions) / len(fractions) < 0.65


def test_a_samples_masks_depend_on_seed_epoch_and_index_only(dataset, model, processor):
    """Whatever the batch, its order, the worker or the process that collates it; new masks each epoch."""
    collator = _collator(model, processor, diffusion=True, seed=3)
    items = [dataset[i] for i in range(6)]

    def masks(batch, items):
        return {item["index"]: batch["labels"][row, len(item["prompt_ids"]) :] != -100 for row, item in enumerate(items)}

    together = masks(collator(items), items)
    reordered = list(reversed(items[2:]))
    apart = masks(collator(reordered), reordered)
    for index in apart:
        n = len(dataset[index]["target_ids"])
        assert torch.equal(apart[index][:n], together[index][:n]), index
    collator.epoch = 1
    next_epoch = masks(collator(items), items)
    assert any(not torch.equal(next_epoch[i], together[i]) for i in together)
    with pytest.raises(ValueError, match="dataset `index`"):
        collator([{k: v for k, v in items[0].items() if k != "index"}])


# --------------------------------------------------------------------------------------------------
# 4. Autoregressive collator and loss
# --------------------------------------------------------------------------------------------------


def test_autoregressive_collator_and_loss(dataset, model, processor):
    collator = _collator(model, processor, diffusion=False)
    items = [dataset[i] for i in range(6)]
    batch = collator(items)
    assert batch["input_ids"].shape[0] == len(items)
    mask_id = model.config.mask_token_id
    assert not (batch["input_ids"] == mask_id).any()
    for row, item in enumerate(items):
        p, t = len(item["prompt_ids"]), len(item["target_ids"])
        assert torch.equal(batch["input_ids"][row, : p + t], torch.cat([item["prompt_ids"], item["target_ids"]]))
        assert (batch["labels"][row, :p] == -100).all()
        assert torch.equal(batch["labels"][row, p : p + t], item["target_ids"])
        assert (batch["labels"][row, p + t :] == -100).all()
        assert batch["attention_mask"][row].sum() == p + t
    assert batch["pixel_values"].shape[0] == 36 * len(items)

    assert model.config.full_attn_mask is False
    with torch.no_grad():
        out = model(**batch)
    log_probs = out.logits.double().log_softmax(-1)
    total, count = 0.0, 0
    for row, item in enumerate(items):
        p, t = len(item["prompt_ids"]), len(item["target_ids"])
        for j in range(p, p + t):  # logits at j - 1 predict the target token at j
            total -= log_probs[row, j - 1, item["target_ids"][j - p]].item()
            count += 1
    assert out.loss.item() == pytest.approx(total / count, abs=1e-5)


# --------------------------------------------------------------------------------------------------
# 5. Stage freezing
# --------------------------------------------------------------------------------------------------


def test_stage_freezing_leaves_frozen_parameters_bit_identical(tiny, tmp_path):
    init = weights(tiny["init"])

    run(tiny, tmp_path / "align", stage="align", steps=3, lr=1e-3)
    align = weights(tmp_path / "align")
    assert changed_modules(init, align) == {"visual": False, "img_projector": True, "model": False, "lm_head": False}

    run(tiny, tmp_path / "diffusion", stage="diffusion", steps=3, lr=1e-3)
    diffusion = weights(tmp_path / "diffusion")
    assert changed_modules(init, diffusion) == {"visual": False, "img_projector": False, "model": True, "lm_head": True}
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(init[key], diffusion[key])

    # instruct from the diffusion checkpoint (bidirectional): back to causal, the vision tower frozen.
    run(tiny, tmp_path / "instruct", stage="instruct", steps=3, lr=1e-3, model_dir=tmp_path / "diffusion")
    instruct = weights(tmp_path / "instruct")
    assert changed_modules(diffusion, instruct) == {"visual": False, "img_projector": True, "model": True, "lm_head": True}

    attention = {
        stage: json.loads((tmp_path / stage / "config.json").read_text())["full_attn_mask"]
        for stage in ("align", "diffusion", "instruct")
    }
    assert attention == {"align": False, "diffusion": True, "instruct": False}


# --------------------------------------------------------------------------------------------------
# 6. A checkpoint written by the entry point reloads in a fresh process and answers identically
# --------------------------------------------------------------------------------------------------

_ANSWER_SCRIPT = r"""
import json, sys
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

folder, image_path, question, out_path = sys.argv[1:5]
torch.set_num_threads(1)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
prompt = processor.apply_chat_template(
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True
)
inputs = processor(images=[Image.open(image_path)], text=prompt, return_tensors="pt")
with torch.no_grad():
    sequences = model.diffusion_generate(**inputs, temperature=0.0)
json.dump({"sequences": sequences.tolist(), "model": type(model).__module__,
           "processor": type(processor).__name__}, open(out_path, "w"))
"""


def test_checkpoint_reloads_in_fresh_process_and_answers_identically(tiny, tmp_path):
    out = tmp_path / "ckpt"
    run(tiny, out, "--masking", "dual", stage="diffusion", steps=10)

    files = {p.name for p in out.iterdir()}
    assert "model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle"))], files
    for name in ("config.json", "generation_config.json", "configuration_dimple.py", "modeling_dimple.py",
                 "generation_utils.py", "processing_dimple.py", "tokenizer.json", "tokenizer_config.json"):
        assert name in files, name
    assert files & {"preprocessor_config.json", "processor_config.json"}, files
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_dimple.DimpleConfig", "AutoModel": "modeling_dimple.DimpleModel",
        "AutoModelForImageTextToText": "modeling_dimple.DimpleModel",
    }
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {k.split(".", 1)[0] for k in f.keys()} == set(MODULES)

    image_path, question = tmp_path / "image.png", "What color is the shape?"
    sample_image(IMAGE_SIZE).save(image_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _ANSWER_SCRIPT, str(out), str(image_path), question, str(tmp_path / "answer.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    fresh = json.loads((tmp_path / "answer.json").read_text())
    assert fresh["model"].startswith("transformers_modules.")  # the checkpoint's code, not this checkout
    assert fresh["processor"] == "DimpleProcessor"

    # In this process, the same checkpoint loaded the same way (the checkpoint's own code).
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(str(out), trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(str(out), trust_remote_code=True)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True
    )
    from PIL import Image

    inputs = processor(images=[Image.open(image_path)], text=prompt, return_tensors="pt")
    with torch.no_grad():
        sequences = model.diffusion_generate(**inputs, temperature=0.0).tolist()
    prompt_length = inputs["input_ids"].shape[1]
    assert len(sequences[0]) == prompt_length + GENERATION["max_new_tokens"]
    assert sequences[0][:prompt_length] == inputs["input_ids"][0].tolist()
    assert mask_free(sequences, prompt_length, tiny["ids"]["mask_token_id"])
    assert fresh["sequences"] == sequences
    # ... and the local class on the same weights agrees.
    local = DimpleModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert local.diffusion_generate(**inputs, temperature=0.0).tolist() == sequences


def mask_free(sequences, prompt_length, mask_id) -> bool:
    return all(mask_id not in seq[prompt_length:] for seq in sequences)


# --------------------------------------------------------------------------------------------------
# 7. Resume from a checkpoint
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x's Trainer resumes with torch.load of pickled RNG state, which torch >= 2.6 refuses",
)
def test_resume_continues_from_saved_step(tiny, tmp_path, monkeypatch):
    out = tmp_path / "resume"
    run(tiny, out, "--save_strategy", "steps", "--save_steps", "10", steps=10)
    checkpoint = out / "checkpoint-10"
    assert (checkpoint / "model.safetensors").is_file()
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["global_step"] == 10

    executed = []

    class CountingTrainer(train_dimple.Trainer):
        def training_step(self, *args, **kwargs):
            executed.append(self.state.global_step)
            return super().training_step(*args, **kwargs)

    monkeypatch.setattr(train_dimple, "Trainer", CountingTrainer)
    history = run(tiny, out, "--resume_from_checkpoint", str(checkpoint), steps=20)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 20
    # Only the 10 remaining steps ran, starting at step 10.
    assert executed == list(range(10, 20))
    # The history is the checkpoint's (steps 5, 10) followed by the new entries (after step 10).
    assert [h["step"] for h in history] == [5, 10, 15, 20]
    saved_losses = [h for h in saved["log_history"] if "loss" in h]
    assert history[:2] == saved_losses
    assert not torch.equal(
        weights(out)["lm_head.weight"], weights(checkpoint)["lm_head.weight"]
    )
    # ... and it continues as the uninterrupted run does: same diffusion masks (drawn per sample and epoch,
    # the run crosses two epoch boundaries), same losses and weights.
    full = run(tiny, tmp_path / "uninterrupted", steps=20)
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in full], rel=1e-5)
    assert torch.allclose(weights(out)["lm_head.weight"], weights(tmp_path / "uninterrupted")["lm_head.weight"], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# 8. LoRA
# --------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("error:`gradient_checkpointing` is deprecated:FutureWarning")  # 5.23's new spelling is used
@pytest.mark.filterwarnings("error:`is_gradient_checkpointing` is deprecated:FutureWarning")  # read by peft
def test_lora_with_gradient_checkpointing_trains_the_adapters_and_follows_the_seed(tiny, tmp_path):
    """Reentrant checkpointing (4.x's default) needs the embeddings' output to require grad, or the adapters
    get none; the adapters are initialised after `--seed` is set, so identical runs are identical."""
    pytest.importorskip("peft")
    args = ("--lora_r", "4", "--gradient_checkpointing", "true")
    first, second = (run(tiny, tmp_path / name, *args, stage="diffusion", steps=3) for name in ("a", "b"))
    assert first == second
    init, trained = weights(tiny["init"]), weights(tmp_path / "a")
    assert not torch.equal(init["model.layers.0.self_attn.q_proj.weight"], trained["model.layers.0.self_attn.q_proj.weight"])
    assert all(torch.equal(tensor, weights(tmp_path / "b")[name]) for name, tensor in trained.items())


def test_a_bf16_checkpoint_trains_in_fp32(tiny, tmp_path):
    """The release is bf16: optimiser updates on bf16 weights would round most small steps away."""
    folder = tmp_path / "bf16"
    model = DimpleModel.from_pretrained(str(tiny["init"])).to(torch.bfloat16)
    checkpoints.save_checkpoint(model, DimpleProcessor.from_pretrained(str(tiny["init"])), str(folder))
    run(tiny, tmp_path / "out", model_dir=folder, steps=2, lr=1e-5)
    trained = weights(tmp_path / "out")
    assert {t.dtype for t in trained.values()} == {torch.float32}
    before = weights(folder)["model.layers.0.mlp.up_proj.weight"].float()
    changed = (trained["model.layers.0.mlp.up_proj.weight"] != before).float().mean()
    assert changed > 0.99  # Adam's first steps move every weight by ~lr: all visible in fp32


def test_intermediate_checkpoints_carry_the_portable_processor_files(tiny, tmp_path):
    out = tmp_path / "ckpts"
    run(tiny, out, "--save_strategy", "steps", "--save_steps", "2", steps=2)
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "preprocessor_config.json").is_file()
    if (checkpoint / "processor_config.json").is_file():
        assert "image_processor" not in json.loads((checkpoint / "processor_config.json").read_text())


def test_lora_run_saves_a_plain_checkpoint(tiny, tmp_path):
    pytest.importorskip("peft")
    out = tmp_path / "lora"
    history = run(tiny, out, "--lora_r", "4", stage="diffusion", steps=5)
    assert history and all(h["loss"] == h["loss"] for h in history)
    init, trained = weights(tiny["init"]), weights(out)
    assert set(trained) == set(init)
    assert not any("lora" in k or "base_model" in k or "modules_to_save" in k for k in trained)
    # The merged adapters changed the language model's projections; the vision side is untouched.
    assert not torch.equal(init["model.layers.0.self_attn.q_proj.weight"], trained["model.layers.0.self_attn.q_proj.weight"])
    assert changed_modules(init, trained)["visual"] is False
    assert changed_modules(init, trained)["img_projector"] is False
    reloaded, info = DimpleModel.from_pretrained(str(out), output_loading_info=True)
    assert type(reloaded) is DimpleModel
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_gradient_accumulation_gives_the_large_batch_step(tiny, tmp_path):
    """4 micro-batches of 2 give the loss and gradient of one batch of 8 (same samples, same masks): the
    model takes Trainer's `num_items_in_batch` (the labelled positions of the whole step), on 4.46 and 5.x."""
    logs = [
        run(tiny, tmp_path / f"ga{accumulate}", "--per_device_train_batch_size", str(8 // accumulate),
            "--gradient_accumulation_steps", str(accumulate), "--logging_steps", "1", steps=1, lr=0.0)[0]
        for accumulate in (1, 4)
    ]
    assert logs[0]["grad_norm"] == pytest.approx(logs[1]["grad_norm"], rel=1e-5)
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], rel=1e-4)


class FakeHubApi:
    """Records what `push_checkpoint` would upload, filtered as huggingface_hub filters it."""

    def __init__(self, into: Path):
        self.into, self.calls = into, []

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, private))
        return types.SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        for name in filter_repo_objects(files, ignore_patterns=ignore_patterns):
            (self.into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(folder_path) / name, self.into / name)
        self.calls.append(("upload_folder", repo_id))


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="no gloo")
@pytest.mark.parametrize("stage,extra", [("instruct", ()), ("diffusion", ("--masking", "dual"))], ids=["instruct", "diffusion-dual"])
def test_two_processes_train_as_one_process_with_their_whole_batch(tiny, tmp_path, stage, extra):
    # Data-parallel training (torchrun, gloo on the CPU): 2 processes × batch 1 × 2 accumulated micro-batches
    # take the steps of 1 process with batch 4 (the loss is averaged over the tokens of all devices; a sample's
    # diffusion masks do not depend on the process). Every other sample is text-only, with gradient
    # checkpointing: in instruct, a rank without images hung DDP, which waited for the image projector's
    # gradients; transformers 4.46.2 skipped the gradient sync altogether.
    records = [json.loads(line) for line in Path(tiny["data"]).read_text().splitlines()]
    for record in records[1::2]:
        record.pop("image")
        record["messages"][0]["content"] = record["messages"][0]["content"].replace("<image>\n", "")
    data = Path(tiny["data"]).with_name("mixed.jsonl")
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    # SGD: Adam would turn gradients that are rounding noise (k_proj's bias: softmax ignores it) into full steps.
    common = ("--logging_steps", "1", "--activation_checkpointing", "true", "--optim", "sgd", *extra)

    single = run(tiny, tmp_path / "single", *common, "--per_device_train_batch_size", "4", stage=stage,
                 steps=3, data=data)
    argv = [
        "--model_name_or_path", str(tiny["init"]), "--data_path", str(data), "--stage", stage,
        "--output_dir", str(tmp_path / "ddp"), "--max_steps", "3", "--learning_rate", "3e-3",
        "--lr_scheduler_type", "constant", "--weight_decay", "0.0", "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "2", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--seed", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "true", *common,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dimple_tools.training.train", *argv]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        output, _ = launcher.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, 9)  # the launcher and its workers
        output, _ = launcher.communicate()
        pytest.fail("two-process training did not finish in 300 s (hung?):\n" + output[-3000:])
    assert launcher.returncode == 0, output[-3000:]

    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    parallel = [h for h in state["log_history"] if "loss" in h]
    assert len(parallel) == len(single) == 3
    for a, b in zip(parallel, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    before, after_single, after_parallel = weights(tiny["init"]), weights(tmp_path / "single"), weights(tmp_path / "ddp")
    assert changed_modules(before, after_parallel) == changed_modules(before, after_single)
    for key, tensor in after_single.items():
        torch.testing.assert_close(after_parallel[key], tensor, rtol=1e-4, atol=1e-6, msg=key)


def test_push_to_hub_uploads_the_final_checkpoint_without_pickles(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHubApi(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: hub)
    out = tmp_path / "pushed-run"
    run(tiny, out, "--push_to_hub", "true", "--hub_model_id", "me/dimple-ft", "--save_strategy", "steps",
        "--save_steps", "2", steps=2)
    assert (out / "checkpoint-2" / "training_args.bin").exists()  # the Trainer's pickled state stays local
    assert hub.calls == [("create_repo", "me/dimple-ft", False), ("upload_folder", "me/dimple-ft")]
    pushed = {p.relative_to(hub.into).as_posix() for p in hub.into.rglob("*") if p.is_file()}
    assert not [f for f in pushed if f.endswith((".bin", ".pt", ".pth", ".pkl")) or f.startswith("checkpoint-")]
    assert {"model.safetensors", "config.json", "modeling_dimple.py", "tokenizer.json"} <= pushed, pushed
    assert "image_processor" not in json.loads((hub.into / "processor_config.json").read_text())  # 4.x-loadable
    from transformers import AutoModel, AutoProcessor

    pushed_model = AutoModel.from_pretrained(str(hub.into), trust_remote_code=True)
    assert AutoProcessor.from_pretrained(str(hub.into), trust_remote_code=True).image_processor is not None
    for name, tensor in weights(out).items():
        assert torch.equal(pushed_model.state_dict()[name], tensor), name


# --------------------------------------------------------------------------------------------------
# 9. Bad input: clear errors before training; truncation is counted
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    """Any error must come before the Trainer exists."""

    class NoTrainer:
        def __init__(self, *args, **kwargs):
            raise AssertionError("training started before the bad input was reported")

    monkeypatch.setattr(train_dimple, "Trainer", NoTrainer)


def _write_jsonl(folder: Path, records: list) -> Path:
    path = folder / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _good(tiny, index: int) -> dict:
    record = json.loads(tiny["data"].read_text().splitlines()[index])
    record["image"] = str(tiny["data"].parent / record["image"])
    return record


@pytest.mark.parametrize(
    "problem", ["placeholders", "missing-image", "empty-answer", "image-in-answer", "list-content", "null-content", "role"]
)
def test_bad_samples_are_named_before_training(tiny, tmp_path, no_training, problem):
    bad = _good(tiny, 3)
    bad["id"] = "the-bad-one"
    if problem == "image-in-answer":  # the processor would only fail on it inside the dataloader, mid-training
        bad["messages"][0]["content"] = bad["messages"][0]["content"].replace("<image>\n", "")
        bad["messages"][-1]["content"] = "<image>\n" + bad["messages"][-1]["content"]
        pattern = r"sample the-bad-one: the answer \(the last message\) holds `<image>`"
    elif problem in ("list-content", "null-content"):
        # a list is TRL's format only with {"type": "image"} / {"type": "text", "text": str} entries
        bad["messages"][0]["content"] = [{"type": "text", "value": "hi"}] if problem == "list-content" else None
        pattern = r"sample the-bad-one: a message's `content` must be a string, .*got " + (
            "a list with entries other than" if problem == "list-content" else "NoneType"
        )
    elif problem == "role":
        bad["messages"][0]["role"] = "bot"
        pattern = r"sample the-bad-one: role 'bot' is not one of system, user, assistant"
    elif problem == "placeholders":
        bad["messages"][0]["content"] = "<image>\n<image>\nWhat color is the shape?"
        pattern = r"sample the-bad-one: 2 `<image>` placeholders but 1 images"
    elif problem == "missing-image":
        bad["image"] = str(tmp_path / "nowhere.png")
        pattern = r"sample the-bad-one: image file .*nowhere\.png not found"
    else:
        bad["messages"][-1]["content"] = "  "
        pattern = r"sample the-bad-one: .*non-empty assistant answer"
    data = _write_jsonl(tmp_path, [_good(tiny, 0), _good(tiny, 1), bad, _good(tiny, 2)])
    with pytest.raises(ValueError, match=pattern):
        run(tiny, tmp_path / "out", data=data, steps=2)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("spelling", ["--gradient_checkpointing", "--activation_checkpointing"])
def test_either_spelling_of_the_checkpointing_flags_works_without_a_deprecation_warning(tmp_path, spelling):
    """transformers 5.23 renamed the flags (the old name warns); older releases know only the old one."""
    argv = ["--output_dir", str(tmp_path), f"{spelling}=true", f"{spelling}_kwargs", '{"use_reentrant": false}']
    current = "activation" if training_arguments.HAS_ACTIVATION_CHECKPOINTING else "gradient"
    assert training_arguments.respell_checkpointing_flags(argv)[2:4] == [f"--{current}_checkpointing=true", f"--{current}_checkpointing_kwargs"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        (args,) = HfArgumentParser(training_arguments.DimpleTrainingArguments).parse_args_into_dataclasses(
            args=training_arguments.respell_checkpointing_flags(argv)
        )
    assert training_arguments.checkpointing(args)
    assert getattr(args, f"{current}_checkpointing_kwargs") == {"use_reentrant": False}
    assert training_arguments.respell_checkpointing_flags(["--gradient_checkpointing_other", "1"]) == ["--gradient_checkpointing_other", "1"]


@pytest.mark.parametrize(
    "flag,value,pattern",
    [
        ("--stage", "pretrain", r"--stage must be one of .*'pretrain'"),
        ("--masking", "triple", r"--masking must be one of .*'triple'"),
        ("--trainable", "model,vision_tower", r"--trainable names unknown modules \['vision_tower'\]"),
        ("--lora_r", "-1", r"--lora_r must be >= 0 \(0: no LoRA\), got -1"),
        ("--max_pixels", "0", r"--max_pixels must be a positive number of pixels, got 0"),
        ("--max_pixels", "10", r"--max_pixels must be >= the processor's min_pixels \(\d+\), got 10"),
    ],
)
def test_bad_flags_are_named(tiny, tmp_path, no_training, flag, value, pattern):
    extra = [flag, value] if flag != "--stage" else []
    stage = value if flag == "--stage" else "diffusion"
    with pytest.raises(ValueError, match=pattern):
        run(tiny, tmp_path / "out", *extra, stage=stage, steps=2)


@pytest.mark.parametrize("stage", ["align", "instruct"])
def test_dual_masking_is_refused_in_the_autoregressive_stages(tiny, tmp_path, no_training, stage):
    with pytest.raises(ValueError, match=rf"--masking dual applies to --stage diffusion only \(--stage {stage} masks nothing\)"):
        run(tiny, tmp_path / "out", "--masking", "dual", stage=stage, steps=2)


def test_image_side_stages_refuse_text_only_samples_and_lora(tiny, tmp_path, no_training):
    text_only = _good(tiny, 1)
    text_only.pop("image")
    text_only["id"] = "no-picture"
    text_only["messages"][0]["content"] = text_only["messages"][0]["content"].replace("<image>", "").strip()
    data = _write_jsonl(tmp_path, [_good(tiny, 0), text_only])
    with pytest.raises(ValueError, match=r"--stage align trains only the image side, but 1 sample\(s\) have no image \(first: \['no-picture'\]\)"):
        run(tiny, tmp_path / "out", data=data, stage="align", steps=2)
    with pytest.raises(ValueError, match=r"--lora_r adapts the language model \(`model`\), which --stage align does not train"):
        run(tiny, tmp_path / "out", "--lora_r", "4", stage="align", steps=2)


@pytest.mark.parametrize(
    "content, pattern",
    [
        ("", r"holds no samples"),
        ('{"id": "x"}', r"expected a list of samples, got dict"),
        ('["text"]', r"sample #0: expected an object with `messages`, got str"),
        ('[{"id": "s1", "messages": "hi"}]', r"sample s1: `messages` must be a list of \{role, content\} objects"),
    ],
)
def test_malformed_data_files_are_named(tiny, tmp_path, no_training, content, pattern):
    data = tmp_path / "data.json"
    data.write_text(content)
    with pytest.raises(ValueError, match=pattern):
        run(tiny, tmp_path / "out", data=data, steps=2)


def test_jsonl_records_in_a_json_file_are_named(tiny, tmp_path, no_training):
    data = tmp_path / "records.json"
    data.write_text(json.dumps(_good(tiny, 0)) + "\n" + json.dumps(_good(tiny, 1)) + "\n")
    with pytest.raises(ValueError, match=r"records\.json: not valid JSON \(one record per line is a \.jsonl file\)"):
        run(tiny, tmp_path / "out", data=data, steps=2)


def test_a_pickled_checkpoint_is_refused_before_training(tiny, tmp_path, no_training):
    """Only safetensors weights load (a pickle can run code): a folder with pytorch_model.bin only is refused."""
    folder = tmp_path / "pickled"
    shutil.copytree(tiny["init"], folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises((OSError, ValueError), match=r"safetensors"):  # ValueError since DimpleModel checks it
        run(tiny, tmp_path / "out", model_dir=folder, steps=2)


def test_long_samples_are_truncated_with_a_warning_count(tiny, dataset, processor, tmp_path, caplog):
    prompt_lengths = [len(dataset[i]["prompt_ids"]) for i in range(N_SAMPLES)]
    full_lengths = [p + len(dataset[i]["target_ids"]) for i, p in enumerate(prompt_lengths)]
    max_len = max(prompt_lengths) + 1  # every prompt fits, (nearly) no answer + padding does
    too_long = [i for i in range(N_SAMPLES) if full_lengths[i] > max_len]
    assert len(too_long) >= 12

    short = ConversationDataset(load_conversations(str(tiny["data"])), processor, max_seq_length=max_len, seed=0)
    with caplog.at_level(logging.WARNING, logger="train_dimple"):
        for _epoch in range(2):  # a sample fetched again (next epoch) is counted once
            for i in range(8):
                item = short[i]
                assert len(item["prompt_ids"]) + len(item["target_ids"]) == min(full_lengths[i], max_len)
                assert torch.equal(item["target_ids"], dataset[i]["target_ids"][: max_len - prompt_lengths[i]])
    assert short.truncated == sum(full_lengths[i] > max_len for i in range(8))
    assert any("truncated" in r.getMessage() and str(max_len) in r.getMessage() for r in caplog.records)

    # Through the entry point, on the samples that are too long: a final warning with the count.
    lines = tiny["data"].read_text().splitlines()
    records = []
    for i in too_long[:12]:
        record = json.loads(lines[i])
        record["image"] = str(tiny["data"].parent / record["image"])
        records.append(record)
    data = _write_jsonl(tmp_path, records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="train_dimple"):
        run(tiny, tmp_path / "out", "--max_seq_length", str(max_len), data=data, steps=3)  # 24 fetches of 12
    final = [r.getMessage() for r in caplog.records if "were truncated" in r.getMessage()]
    assert final == [f"12 sample(s) were truncated to --max_seq_length {max_len}"], [
        r.getMessage() for r in caplog.records
    ]
    assert (tmp_path / "out" / "model.safetensors").is_file()

    # A prompt longer than the limit is an error naming the sample.
    too_short = ConversationDataset(load_conversations(str(tiny["data"])), processor, max_seq_length=5, seed=0)
    with pytest.raises(ValueError, match=r"sample shapes-s0-000000: the prompt alone has \d+ tokens"):
        too_short[0]


# --------------------------------------------------------------------------------------------------
# 10. Model cards: every checkpoint folder carries a README.md with the hub metadata
# --------------------------------------------------------------------------------------------------


def card_metadata(readme: Path) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard.load(readme).data.to_dict()


def assert_dimple_card(readme: Path, path: str):
    data = card_metadata(readme)
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "image-text-to-text"
    assert data["license"] == "apache-2.0"
    assert {"diffusion", "custom_code"} <= set(data["tags"])
    text = readme.read_text()
    assert f'path = "{path}"' in text
    assert "AutoModel.from_pretrained(path, trust_remote_code=True)" in text
    assert "AutoProcessor.from_pretrained(path, trust_remote_code=True)" in text
    assert "model.diffusion_generate(**inputs)" in text
    assert "## Decoding settings" in text and f"| `steps` | `{GENERATION['steps']}` |" in text and "| `alg` | `'maskgit_plus'` |" in text
    return data, text


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """transformers' push_to_hub against a recording hub: the repository has no card yet, and the committed
    files are copied to `into` (transformers 5 goes through `HfApi`, 4.x through huggingface_hub's functions)."""
    import huggingface_hub
    import transformers.utils.hub as transformers_hub
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError

    into = tmp_path / "hub"
    into.mkdir()
    record = types.SimpleNamespace(into=into, commits=[])

    def create_repo(repo_id, *args, **kwargs):
        return types.SimpleNamespace(repo_id=repo_id)

    def create_commit(repo_id, operations, *args, **kwargs):
        for operation in operations:
            target = into / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(operation.path_or_fileobj, target)
        record.commits.append((repo_id, sorted(op.path_in_repo for op in operations)))

    load = ModelCard.load.__func__

    def no_card(cls, repo_id_or_path, *args, **kwargs):  # local files still load
        if Path(repo_id_or_path).is_file():
            return load(cls, repo_id_or_path, *args, **kwargs)
        raise EntryNotFoundError("README.md not found")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, *a, **k: create_repo(repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", lambda self, repo_id, operations, *a, **k: create_commit(repo_id, operations))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", lambda self, *a, **k: None)
    monkeypatch.setattr(ModelCard, "load", classmethod(no_card))
    for name, function in (("create_repo", create_repo), ("create_commit", create_commit)):
        if hasattr(transformers_hub, name):  # transformers 4.x imported huggingface_hub's bound functions
            monkeypatch.setattr(transformers_hub, name, function)
    monkeypatch.chdir(tmp_path)  # 4.x pushes from a local folder named like the repository when one exists
    return record


def test_save_pretrained_and_push_to_hub_write_a_model_card(tiny, tmp_path, fake_hub):
    model = DimpleModel.from_pretrained(str(tiny["init"]))
    model.save_pretrained(tmp_path / "saved")
    data, text = assert_dimple_card(tmp_path / "saved" / "README.md", "saved")
    assert "<|mask|>" in text
    # The init folder was written by save_checkpoint from a model built in memory: Dimple's own origins.
    assert data["base_model"] == ["Dream-org/Dream-v0-Instruct-7B", "Qwen/Qwen2.5-VL-7B-Instruct"]

    # A README someone wrote stays; transformers' stub (and an older card of ours) is replaced.
    (tmp_path / "saved" / "README.md").write_text("# my notes\n")
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "README.md").read_text() == "# my notes\n"
    (tmp_path / "saved" / "README.md").write_text(
        "---\nlibrary_name: transformers\n---\nThis is the model card of a 🤗 transformers model that has been pushed "
        "on the Hub. This model card has been automatically generated.\n"
    )
    model.save_pretrained(tmp_path / "saved")
    assert_dimple_card(tmp_path / "saved" / "README.md", "saved")

    # push_to_hub: transformers writes its stub card just before uploading; the card uploaded is Dimple's.
    model.push_to_hub("me/dimple-card")
    assert fake_hub.commits and fake_hub.commits[-1][0] == "me/dimple-card"
    assert "README.md" in fake_hub.commits[-1][1] and "model.safetensors" in fake_hub.commits[-1][1]
    data, text = assert_dimple_card(fake_hub.into / "README.md", "me/dimple-card")
    assert "automatically generated" not in text

    # A model loaded from a hub id names it as its base model.
    model.config._name_or_path = "someone/dimple-base"
    model.save_pretrained(tmp_path / "derived")
    assert card_metadata(tmp_path / "derived" / "README.md")["base_model"] == ["someone/dimple-base"]
    # ... one loaded from a local folder passes on that folder's base models.
    reloaded = DimpleModel.from_pretrained(str(tmp_path / "derived"))
    reloaded.save_pretrained(tmp_path / "derived-again")
    assert card_metadata(tmp_path / "derived-again" / "README.md")["base_model"] == ["someone/dimple-base"]


def test_the_model_card_code_needs_only_huggingface_hub():
    """Remote code: the card is built with huggingface_hub's ModelCard / ModelCardData, which transformers
    requires (>= 0.23 for 4.46.2, which has both, with `pipeline_tag` and `base_model`)."""
    import ast

    tree = ast.parse((ROOT / "modeling_dimple.py").read_text())
    imported = {
        ("" if node.level else node.module.split(".")[0]) if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
        for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    import sys

    assert {name for name in imported if name not in sys.stdlib_module_names} <= {"", "torch", "transformers",
                                                                                  "huggingface_hub"}, imported


def test_training_output_carries_a_card_with_the_arguments_and_losses(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHubApi(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: hub)
    out = tmp_path / "card-run"
    history = run(tiny, out, "--push_to_hub", "true", "--hub_model_id", "me/dimple-card-run", steps=5)
    for readme, path in ((out / "README.md", "me/dimple-card-run"), (hub.into / "README.md", "me/dimple-card-run")):
        data, text = assert_dimple_card(readme, path)
        assert "dimple-diffusion" in data["tags"]
        # tiny["init"] is a local checkpoint of no Hub model: no base_model (not the release's Dream / Qwen)
        assert "base_model" not in data, data
        assert "Trained from the local checkpoint `init`" in text
        assert "| stage | diffusion |" in text and "| learning_rate | 0.003 |" in text
        assert "| per_device_train_batch_size | 8 |" in text and "| max_steps | 5 |" in text
        assert f"final training loss (step 5): {history[-1]['loss']:.4f}" in text
        assert "mean training loss over the run" in text
        assert str(tmp_path) not in text  # no local paths are published
    # A later save_pretrained into the folder keeps the training card.
    DimpleModel.from_pretrained(str(out)).save_pretrained(out)
    assert "## Training" in (out / "README.md").read_text()


# --------------------------------------------------------------------------------------------------
# 11. Every sample is checked before the first step; all problems are reported at once
# --------------------------------------------------------------------------------------------------


def test_all_data_problems_are_reported_at_once_with_their_lines(tiny, tmp_path, no_training):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    (tmp_path / "notes.png").write_text("these are notes, not a picture\n")
    lines = [json.dumps(_good(tiny, i)) for i in range(20)]

    def edit(index, change):
        record = json.loads(lines[index])
        change(record)
        lines[index] = json.dumps(record)

    edit(2, lambda r: r.update(image=str(tmp_path / "broken.png")))
    edit(4, lambda r: r.update(image=str(tmp_path / "notes.png")))
    edit(6, lambda r: r["messages"][0].update(content=r["messages"][0]["content"] + " <|image_pad|>"))
    edit(8, lambda r: r["messages"][-1].update(content="a red <|mask|> circle"))
    edit(10, lambda r: r["messages"][-1].update(content="red<|endoftext|>"))
    edit(12, lambda r: r["messages"][0].update(content=r["messages"][0]["content"] + " word" * 400))
    lines[16] = lines[16][:26] + "}"  # a broken line: line 17
    data = tmp_path / "problems.jsonl"
    data.write_text("\n".join(lines) + "\n")

    with pytest.raises(training_data.DataProblems) as caught:
        run(tiny, tmp_path / "out", "--max_seq_length", "256", data=data, steps=2)
    problems = caught.value.problems
    message = str(caught.value)
    assert "7 problem(s)" in message, message
    expected = [
        r"problems\.jsonl:3: sample \S+: image file .*broken\.png does not decode",
        r"problems\.jsonl:5: sample \S+: image file .*notes\.png is not an image",
        r"problems\.jsonl:7: sample \S+: message 1 \(user\) holds the special token\(s\) <\|image_pad\|>",
        r"problems\.jsonl:9: sample \S+: the answer holds the special token\(s\) <\|mask\|>",
        r"problems\.jsonl:11: sample \S+: the answer holds the special token\(s\) <\|endoftext\|>",
        r"problems\.jsonl:13: sample \S+: the prompt alone has \d+ tokens \(images included\), leaving no room for the "
        r"answer within --max_seq_length 256",
        r"problems\.jsonl:17: not valid JSON: .*\(column 27\)",
    ]
    assert len(problems) == len(expected), problems
    for problem, pattern in zip(problems, expected):
        assert re.search(pattern, problem), (pattern, problem)


def test_prompt_lengths_are_counted_as_the_processor_tokenizes(tiny, processor):
    """The check counts each prompt's tokens from the image's size alone; the processor's count agrees."""
    samples = load_conversations(str(tiny["data"]), processor=processor, max_seq_length=1024)
    dataset = ConversationDataset(samples, processor, max_seq_length=1024, seed=0)
    for index in range(4):
        assert samples[index]["prompt_length"] == len(dataset[index]["prompt_ids"])
    image = tiny["root"] / "wide.png"
    from PIL import Image

    Image.new("RGB", (300, 90), "white").save(image)
    for height, width in ((90, 300), (56, 56), (1000, 700)):
        Image.new("RGB", (width, height), "white").save(image)
        inputs = processor(images=[str(image)], text="<|vision_start|><|image_pad|><|vision_end|>", return_tensors="pt")
        expected = int((inputs["input_ids"] == processor.image_token_id).sum())
        assert training_data.image_tokens(processor.image_processor, height, width) == expected


def test_a_json_list_names_the_line_each_problem_record_starts_on(tiny, tmp_path, no_training):
    records = [_good(tiny, i) for i in range(3)]
    records[1]["messages"][-1]["content"] = "a <|mask|>"
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records, indent=2))
    starts = [number for number, line in enumerate(data.read_text().splitlines(), 1) if line == "  {"]
    assert len(starts) == 3
    with pytest.raises(ValueError, match=rf"data\.json:{starts[1]}: sample \S+: the answer holds the special token"):
        run(tiny, tmp_path / "out", data=data, steps=2)


# --------------------------------------------------------------------------------------------------
# 12. The final save is atomic: a crash inside it leaves the previous checkpoint whole
# --------------------------------------------------------------------------------------------------

_CRASHING_SAVE = r"""
import os, sys
from dimple_tools.training import checkpoints, train as train_dimple

def crash_midway(model, processor, output_dir, *args):
    model.save_pretrained(output_dir, safe_serialization=True)  # the weights are written, the rest is not
    os._exit(17)

checkpoints.save_checkpoint = crash_midway
train_dimple.main(sys.argv[2:])
"""


def test_a_crash_inside_the_final_save_leaves_the_previous_checkpoint(tiny, tmp_path):
    out = tmp_path / "atomic"

    def argv(lr):
        return [
            "--model_name_or_path", str(tiny["init"]), "--data_path", str(tiny["data"]), "--stage", "diffusion",
            "--output_dir", str(out), "--max_steps", "2", "--learning_rate", lr, "--per_device_train_batch_size", "8",
            "--save_strategy", "steps", "--save_steps", "2", "--report_to", "none", "--use_cpu", "true",
            "--seed", "0", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
        ]

    train_dimple.main(argv("3e-3"))
    before = weights(out)
    assert (out / "checkpoint-2").is_dir()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_SAVE, str(ROOT), *argv("1e-1")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert crashed.returncode == 17, crashed.stderr[-3000:]
    # The previous checkpoint is whole and loads; the new one was being written beside it.
    assert (tmp_path / ".atomic.saving" / "model.safetensors").is_file()
    reloaded = DimpleModel.from_pretrained(str(out))
    assert all(torch.equal(reloaded.state_dict()[name], tensor) for name, tensor in before.items())
    DimpleProcessor.from_pretrained(str(out))
    assert (out / "checkpoint-2").is_dir()

    # The next run replaces it, carries the Trainer's checkpoint folders over and leaves nothing beside it.
    train_dimple.main(argv("1e-2"))
    assert not torch.equal(weights(out)["lm_head.weight"], before["lm_head.weight"])
    assert (out / "checkpoint-2").is_dir() and (out / "README.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic"]


def test_a_save_stopped_between_its_renames_is_undone_or_finished(tmp_path):
    out, staging, backup = checkpoints._save_paths(tmp_path / "run")
    # Stopped after the previous checkpoint moved aside: it comes back.
    backup.mkdir()
    (backup / "model.safetensors").write_text("previous")
    checkpoints.recover_interrupted_save(out)
    assert (out / "model.safetensors").read_text() == "previous" and not backup.exists()
    # Stopped after the new one moved in: the run's folders move over, the old checkpoint files go.
    backup.mkdir()
    (backup / "model.safetensors").write_text("previous")
    (backup / "checkpoint-4").mkdir()
    (out / "model.safetensors").write_text("new")
    checkpoints.recover_interrupted_save(out)
    assert (out / "model.safetensors").read_text() == "new" and (out / "checkpoint-4").is_dir()
    assert not backup.exists()


def test_max_pixels_reaches_the_image_processor(tiny, tmp_path):
    """transformers 5's image processor reads size.longest_edge only; 4.x reads max_pixels (and size)."""
    from PIL import Image

    processor = DimpleProcessor.from_pretrained(str(tiny["init"]))
    image = tmp_path / "big.png"
    Image.new("RGB", (200, 200), "white").save(image)

    def tokens():
        inputs = processor(images=[str(image)], text="<|vision_start|><|image_pad|><|vision_end|>", return_tensors="pt")
        return int((inputs["input_ids"] == processor.image_token_id).sum())

    assert tokens() == 9  # the tiny processor's 84x84 pixels at most
    train_dimple.set_max_pixels(processor, 112 * 112)
    assert tokens() == 16 == training_data.image_tokens(processor.image_processor, 200, 200)


# --------------------------------------------------------------------------------------------------
# 13. Training conventions: evaluation loss, adapter-only LoRA checkpoints, TRL's vision SFT records
# --------------------------------------------------------------------------------------------------


def test_eval_loss_is_the_same_at_every_evaluation(tiny, tmp_path):
    """With the learning rate at 0 the model does not change: its eval loss must not either, although the
    training epoch (which the training masks depend on) changes at every step."""
    eight = _write_jsonl(tmp_path, [_good(tiny, i) for i in range(8)])  # batch 8: one epoch per step
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(_good(tiny, i)) + "\n" for i in range(40, 52)))
    run(tiny, tmp_path / "out", "--eval_data_path", str(held_out), "--eval_strategy", "steps", "--eval_steps", "1",
        "--per_device_eval_batch_size", "4", data=eight, steps=3, lr=0.0)
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    evals = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(evals) == 4 and all(math.isfinite(loss) for loss in evals)  # steps 1, 2, 3 and the end
    assert evals == [evals[0]] * 4, evals
    assert f"evaluation loss (`--eval_data_path`, the stage's objective): {evals[-1]:.4f}" in (
        tmp_path / "out" / "README.md").read_text()
    # Training moves it.
    run(tiny, tmp_path / "trained", "--eval_data_path", str(held_out), data=eight, steps=5, lr=3e-3)
    state = json.loads((tmp_path / "trained" / "trainer_state.json").read_text())
    assert [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry][-1] != evals[0]


def test_a_lora_adapter_saved_alone_reloads_and_answers_like_the_merged_model(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    out = tmp_path / "lora"
    run(tiny, out, "--lora_r", "4", "--lora_save", "both", steps=5)
    adapter = out / "adapter"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in adapter.iterdir()}
    assert not list(adapter.glob("*.bin"))
    merged = DimpleModel.from_pretrained(str(out)).eval()
    # The adapter was trained in the diffusion stage: on the base loaded with its bidirectional attention.
    base = DimpleModel.from_pretrained(str(tiny["init"]), full_attn_mask=True)
    adapted = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
    processor = DimpleProcessor.from_pretrained(str(out))
    samples = load_conversations(str(tiny["data"]))[:6]
    dataset = ConversationDataset(samples, processor, max_seq_length=1024, seed=0)
    from PIL import Image

    same = 0
    for index, sample in enumerate(samples):
        prompt = dataset.prompts[index]
        inputs = processor(images=[Image.open(sample["images"][0])], text=prompt, return_tensors="pt")
        with torch.no_grad():
            torch.testing.assert_close(adapted(**inputs).logits, merged(**inputs).logits, rtol=1e-4, atol=1e-4)
            same += adapted.diffusion_generate(**inputs).tolist() == merged.diffusion_generate(**inputs).tolist()
    # merging rounds the weights: a 48-token confident decode may break a near-tie differently (4 of 6 equal measured)
    assert same >= len(samples) - 2

    # --lora_save adapter: the output folder is the adapter (with the processor files), no merged weights.
    run(tiny, tmp_path / "adapter-only", "--lora_r", "4", "--lora_save", "adapter", steps=1)
    names = {p.name for p in (tmp_path / "adapter-only").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= names
    assert "model.safetensors" not in names
    assert card_metadata(tmp_path / "adapter-only" / "README.md")["library_name"] == "peft"
    assert "full_attn_mask=True)" in (tmp_path / "adapter-only" / "README.md").read_text()
    peft.PeftModel.from_pretrained(DimpleModel.from_pretrained(str(tiny["init"])), str(tmp_path / "adapter-only"))


def test_lora_save_needs_lora(tiny, tmp_path, no_training):
    with pytest.raises(ValueError, match=r"--lora_save adapter saves a LoRA adapter: it needs --lora_r"):
        run(tiny, tmp_path / "out", "--lora_save", "adapter", steps=1)
    with pytest.raises(ValueError, match=r"--lora_save must be one of .*'both'.*, got 'all'"):
        run(tiny, tmp_path / "out", "--lora_r", "4", "--lora_save", "all", steps=1)


def test_trl_vision_sft_records_train(tiny, tmp_path):
    """TRL's format: content lists of {"type": "image"} / {"type": "text", "text"} and a top-level `images`."""
    records = []
    for i in range(16):
        good = _good(tiny, i)
        question = good["messages"][0]["content"].replace("<image>\n", "")
        records.append({
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": good["messages"][1]["content"]}]},
            ],
            "images": [good["image"]],
        })
    data = tmp_path / "trl.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    processor = DimpleProcessor.from_pretrained(str(tiny["init"]))
    trl, llava = (ConversationDataset(load_conversations(str(path)), processor, 1024, seed=0)
                  for path in (data, _write_jsonl(tmp_path, [_good(tiny, i) for i in range(16)])))
    for index in range(16):  # the same items as the LLaVA-style records
        assert torch.equal(trl[index]["prompt_ids"], llava[index]["prompt_ids"])
        assert torch.equal(trl[index]["target_ids"], llava[index]["target_ids"])
    history = run(tiny, tmp_path / "out", data=data, steps=10)
    assert history[-1]["loss"] < history[0]["loss"]
    assert (tmp_path / "out" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# 12. Reliability (issue 37): finished runs, exit status, resuming, undecodable data, cards and adapters
# --------------------------------------------------------------------------------------------------


def _stamp(path: Path) -> tuple:
    """What a rewrite changes: the bytes, the inode (a save renames a new folder into place), the mtime."""
    info = path.stat()
    return path.read_bytes(), info.st_ino, info.st_mtime_ns


@pytest.mark.parametrize("bound", ["max_steps", "num_train_epochs"])
def test_resuming_a_finished_run_trains_nothing_and_keeps_the_final_model(tiny, tmp_path, caplog, bound):
    """The Trainer resumed from a checkpoint at max_steps trains one step more, saves checkpoint-N+1 and replaces
    the finished model; dimple-train stops instead, saying so."""
    data = _write_jsonl(tmp_path, [_good(tiny, i) for i in range(16)])  # 2 steps of 8 per epoch
    extra = ("--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1")
    if bound == "num_train_epochs":
        extra += ("--num_train_epochs", "1")
    steps = 2 if bound == "max_steps" else -1
    out = tmp_path / "done"
    run(tiny, out, *extra, data=data, steps=steps)
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    final, state = _stamp(out / "model.safetensors"), _stamp(out / "trainer_state.json")
    for resume in (str(out / "checkpoint-2"), "true"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="train_dimple"):
            train_dimple.main([
                "--model_name_or_path", str(tiny["init"]), "--data_path", str(data), "--output_dir", str(out),
                "--max_steps", str(steps), *extra, "--resume_from_checkpoint", resume, "--learning_rate", "3e-3",
                "--lr_scheduler_type", "constant", "--per_device_train_batch_size", "8", "--report_to", "none",
                "--use_cpu", "true", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
            ])
        where = "step 2 of max_steps 2" if bound == "max_steps" else "epoch 1 (step 2) of num_train_epochs 1"
        assert f"checkpoint-2 is already at {where}: nothing to train; the final model in {out} is left as it is" \
            in caplog.text, caplog.text
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
        assert _stamp(out / "model.safetensors") == final and _stamp(out / "trainer_state.json") == state


def test_train_returns_the_metrics_and_main_returns_none(tiny, tmp_path):
    """A console script passes main()'s value to sys.exit: a dict there is exit status 1 after a success."""
    out = tmp_path / "status"
    argv = ["--model_name_or_path", str(tiny["init"]), "--data_path", str(tiny["data"]), "--output_dir", str(out),
            "--max_steps", "1", "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none",
            "--use_cpu", "true", "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
    assert train_dimple.main(argv) is None
    (args,) = HfArgumentParser(training_arguments.DimpleTrainingArguments).parse_args_into_dataclasses(
        args=argv[:5] + [str(tmp_path / "library")] + argv[6:])
    metrics = train_dimple.train(args)
    assert metrics["train_loss"] > 0 and (tmp_path / "library" / "model.safetensors").is_file()


def _installed(script: str) -> str:
    path = Path(sys.executable).parent / script
    if not path.is_file():
        pytest.skip(f"{script} is not installed in this environment (pip install -e .)")
    return str(path)


def test_the_dimple_train_console_script_exits_0_after_training_and_1_on_bad_input(tiny, tmp_path):
    script = _installed("dimple-train")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    common = ["--model_name_or_path", str(tiny["init"]), "--stage", "diffusion", "--max_steps", "1",
              "--per_device_train_batch_size", "8", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
              "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
    done = subprocess.run([script, *common, "--data_path", str(tiny["data"]), "--output_dir", str(tmp_path / "ok")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ok" / "model.safetensors").is_file()
    missing = subprocess.run([script, *common, "--data_path", str(tmp_path / "nowhere.jsonl"),
                              "--output_dir", str(tmp_path / "bad")], env=env, capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "--data_path" in missing.stderr and "does not exist" in missing.stderr
    assert not (tmp_path / "bad" / "model.safetensors").exists()


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x's Trainer resumes with torch.load of pickled RNG state, which torch >= 2.6 refuses",
)
def test_resume_from_checkpoint_true_takes_the_latest_complete_checkpoint(tiny, tmp_path, monkeypatch, caplog):
    """`true` is the latest checkpoint-N of output_dir (not a folder named "true"), a half-written one (killed
    before its trainer_state.json) is skipped with a warning naming it; `false` is no resume."""
    out = tmp_path / "resume"
    run(tiny, out, "--save_strategy", "steps", "--save_steps", "1", steps=2)
    intact = tmp_path / "intact"
    shutil.copytree(out, intact)
    executed = []

    class CountingTrainer(train_dimple.Trainer):
        def training_step(self, *args, **kwargs):
            executed.append(self.state.global_step)
            return super().training_step(*args, **kwargs)

    monkeypatch.setattr(train_dimple, "Trainer", CountingTrainer)
    run(tiny, intact, "--resume_from_checkpoint", "true", steps=3)
    assert executed == [2]  # from checkpoint-2
    assert json.loads((intact / "trainer_state.json").read_text())["global_step"] == 3

    (out / "checkpoint-2" / "trainer_state.json").unlink()  # as a kill in the middle of the save leaves it
    executed.clear()
    with caplog.at_level(logging.WARNING, logger="train_dimple"):
        run(tiny, out, "--resume_from_checkpoint", "True", steps=3)
    assert executed == [1, 2]  # from checkpoint-1
    assert re.search(r"skipping \S*checkpoint-2, it has no trainer_state\.json", caplog.text), caplog.text

    executed.clear()
    run(tiny, tmp_path / "fresh", "--resume_from_checkpoint", "false", steps=1)
    assert executed == [0]


def test_an_incomplete_or_missing_checkpoint_is_refused_by_name(tiny, tmp_path, no_training):
    out = tmp_path / "run"
    (out / "checkpoint-4").mkdir(parents=True)
    (out / "checkpoint-4" / "model.safetensors").write_bytes(b"")  # the weights are written first
    with pytest.raises(ValueError, match=rf"--resume_from_checkpoint {re.escape(str(out / 'checkpoint-4'))} is an "
                                         r"incomplete checkpoint: it has no trainer_state\.json"):
        run(tiny, out, "--resume_from_checkpoint", str(out / "checkpoint-4"), steps=8)
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint true resumes from the latest checkpoint-N folder in "
                                         r"--output_dir .*, but it holds only incomplete ones \(checkpoint-4\)"):
        run(tiny, out, "--resume_from_checkpoint", "true", steps=8)
    with pytest.raises(ValueError, match=r"--resume_from_checkpoint .*elsewhere: no such folder; give a checkpoint-N "
                                         r"folder of a run, true .* or false"):
        run(tiny, out, "--resume_from_checkpoint", str(tmp_path / "elsewhere"), steps=8)


def test_a_line_that_is_not_utf8_is_one_problem_among_the_others(tiny, tmp_path, no_training):
    records = [_good(tiny, i) for i in range(6)]
    records[4]["image"] = str(tmp_path / "nowhere.png")
    lines = [json.dumps(record).encode() for record in records]
    lines[2] = lines[2].replace(b'"content": "', b'"content": "\xff\xfe', 1)  # e.g. a UTF-16 fragment pasted in
    data = tmp_path / "mixed.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(training_data.DataProblems) as caught:
        run(tiny, tmp_path / "out", data=data, steps=2)
    problems = caught.value.problems
    assert len(problems) == 2, problems
    assert re.fullmatch(rf"mixed\.jsonl:3: sample {records[2]['id']}: not UTF-8 text: byte 0xff at byte \d+ of the "
                        r"line \(invalid start byte\); the file must be UTF-8", problems[0]), problems[0]
    assert re.fullmatch(rf"mixed\.jsonl:5: sample {records[4]['id']}: image file .*nowhere\.png not found", problems[1])
    # ... in a JSON list too (the record it falls in is named), and a UTF-16 file is named as such
    listing = tmp_path / "mixed.json"
    listing.write_bytes(b"[\n" + b",\n".join(lines) + b"\n]\n")
    with pytest.raises(training_data.DataProblems) as caught:
        run(tiny, tmp_path / "out", data=listing, steps=2)
    assert [p.split(": ")[0:2] for p in caught.value.problems] == [
        ["mixed.json:4", f"sample {records[2]['id']}"], ["mixed.json:6", f"sample {records[4]['id']}"]]
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes("\n".join(json.dumps(r) for r in records[:2]).encode("utf-16"))
    with pytest.raises(ValueError, match=r"utf16\.jsonl is UTF-16 text .*save it as UTF-8"):
        run(tiny, tmp_path / "out", data=utf16, steps=2)


def test_the_lora_flag_without_peft_says_what_to_install(tiny, tmp_path):
    code = ("import sys; sys.modules['peft'] = None\n"  # peft unimportable, as where the train extra is missing
            "from dimple_tools.training.train import main\nsys.exit(main())\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, "--model_name_or_path", str(tiny["init"]), "--data_path", str(tiny["data"]),
         "--output_dir", str(tmp_path / "out"), "--lora_r", "4", "--max_steps", "1", "--use_cpu", "true",
         "--report_to", "none"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "--lora_r needs peft, the `train` extra: pip install -e '.[train]'" in result.stderr
    assert "Traceback" not in result.stderr and "ModuleNotFoundError" not in result.stderr


def test_the_card_names_the_checkpoint_trained_from(tiny, tmp_path, model):
    """Not the release's Dream-7B / Qwen2.5-VL-7B whatever the run started from: a Hub id is the base model; a local
    folder passes on what its card or config names (the release's bases only for a model of their shape)."""
    state = transformers.TrainerState()

    def card_for(name_or_path):
        (args,) = HfArgumentParser(training_arguments.DimpleTrainingArguments).parse_args_into_dataclasses(args=[
            "--model_name_or_path", str(name_or_path), "--data_path", str(tiny["data"]),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--use_cpu", "true"])
        card = checkpoints.training_card(model, args, state, {}, 1)
        card.save(str(tmp_path / "README.md"))
        return card_metadata(tmp_path / "README.md").get("base_model"), card.text

    # The shipped tiny model is trained from scratch: its card names no base model, nor does a model trained from it.
    assert "base_model" not in card_metadata(ROOT / "tiny-dimple" / "README.md")
    base, text = card_for(ROOT / "tiny-dimple")
    assert base is None and "Trained from the local checkpoint `tiny-dimple`, of no known Hub base model" in text
    assert card_for("someone/dimple-base")[0] == ["someone/dimple-base"]
    derived = tmp_path / "derived"
    shutil.copytree(tiny["init"], derived)
    (derived / "README.md").write_text("---\nbase_model: someone/dimple-base\nlicense: apache-2.0\n---\n# notes\n")
    assert card_for(derived) == (["someone/dimple-base"], card_for(derived)[1])
    assert "derived from `someone/dimple-base`" in card_for(derived)[1]
    (derived / "README.md").unlink()
    config = json.loads((derived / "config.json").read_text())
    (derived / "config.json").write_text(json.dumps({**config, "_name_or_path": "someone/else"}))
    assert card_for(derived)[0] == ["someone/else"]
    cached = tmp_path / "hub" / "models--owner--dimple-ft" / "snapshots" / "0123abc"
    shutil.copytree(tiny["init"], cached)
    assert card_for(cached)[0] == ["owner/dimple-ft"]


def test_a_lora_adapter_carries_a_card_and_loads_with_auto_peft_model(tiny, tmp_path, monkeypatch):
    """--lora_save both: the adapter folder gets a filled card (not peft's empty template), and
    `AutoPeftModel.from_pretrained(adapter)` loads it (peft imports only allowlisted packages: the config names
    transformers' AutoModel, which the base's auto_map leads to Dimple), from any directory."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModel, AutoProcessor

    monkeypatch.chdir(tiny["root"])
    out = tmp_path / "lora"
    run(tiny, out, "--lora_r", "4", "--lora_save", "both", steps=1, model_dir="init")  # a relative base path
    adapter = out / "adapter"
    text = (adapter / "README.md").read_text()
    assert "Provide a quick summary" not in text and "## This folder is a LoRA adapter" in text
    data = card_metadata(adapter / "README.md")
    assert data["library_name"] == "peft" and "base_model" not in data and {"lora", "peft"} <= set(data["tags"])
    assert 'path = "lora/adapter"' in text and "AutoPeftModel.from_pretrained(path, trust_remote_code=True, " \
        "full_attn_mask=True)" in text
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny["init"].resolve())
    monkeypatch.chdir(tmp_path)
    merged = DimpleModel.from_pretrained(str(out)).eval()
    inputs = {"input_ids": torch.tensor([[5, 6, 7, tiny["ids"]["mask_token_id"]]])}
    loaded = peft.AutoPeftModel.from_pretrained(str(adapter), trust_remote_code=True, full_attn_mask=True).eval()
    # the line docs/training.md gives for a base of one's choosing
    documented = peft.PeftModel.from_pretrained(
        AutoModel.from_pretrained(str(tiny["init"]), trust_remote_code=True, full_attn_mask=True), str(adapter)).eval()
    with torch.no_grad():
        for model in (loaded, documented):
            torch.testing.assert_close(model(**inputs).logits, merged(**inputs).logits, rtol=1e-4, atol=1e-4)
    assert type(AutoProcessor.from_pretrained(str(adapter), trust_remote_code=True)).__name__ == "DimpleProcessor"
