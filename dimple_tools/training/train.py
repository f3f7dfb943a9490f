"""Train Dimple: autoregressive stages (`align`, `instruct`), then the diffusion stage (`diffusion`).

Built on transformers' `Trainer`: this file only turns LLaVA-style conversations into batches, chooses
what trains in each stage and what the attention is, and writes checkpoints that load with
`AutoModel` / `AutoProcessor` and `trust_remote_code`.

    dimple-train --model_name_or_path tiny-dimple --data_path data.jsonl --stage diffusion \\
        --output_dir out --max_steps 200 --learning_rate 1e-3 --per_device_train_batch_size 16

Multi-GPU: `accelerate launch --config_file configs/accelerate_zero1.yaml -m dimple_tools.training.train ...` (see README).

Objectives (SPEC §5). The answer is followed by `<|endoftext|>` padding up to a length drawn between
n + 1 and the next bucket; only answer and padding tokens are targets. Autoregressive stages: causal
attention, next-token loss. Diffusion: bidirectional attention; per sample t ~ U(eps, 1), each target
token is replaced by `<|mask|>` with probability t, the loss is the mean cross-entropy over masked
positions (logits at j − 1 predict token j); `dual` masking adds the complementary mask of each sample.
"""

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import warnings
from typing import Optional

import torch
import transformers
from transformers import HfArgumentParser, Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dimple.modeling_dimple import DimpleModel  # noqa: E402
from dimple.processing_dimple import DimpleProcessor  # noqa: E402
from dimple_tools.compat import dtype_argument  # noqa: E402


from dimple_tools.training.data import ConversationDataset, DimpleCollator, MaskingEpochCallback, load_conversations
from dimple_tools.training.arguments import MODULES, DimpleTrainingArguments, checkpointing, respell_checkpointing_flags
from dimple_tools.training.checkpoints import push_checkpoint, recover_interrupted_save, save_final_checkpoint, training_card

logger = logging.getLogger("train_dimple")

TRAINER_STATE = "trainer_state.json"  # the Trainer writes it last into a checkpoint-N folder
CHECKPOINT_FOLDER = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
RESUME_LATEST, RESUME_NONE = ("true", "yes", "1"), ("false", "no", "0", "none", "")


class MissingExtra(ImportError):
    """An optional package a flag needs is not installed; the message says what to install."""


def checkpoint_problem(folder) -> Optional[str]:
    """What keeps a Trainer checkpoint folder from being resumed (None: nothing). A run killed while saving
    leaves a checkpoint-N folder without its trainer_state.json, which the Trainer writes last."""
    state = os.path.join(folder, TRAINER_STATE)
    if not os.path.isfile(state):
        return f"it has no {TRAINER_STATE} (written last by the Trainer: the save was interrupted)"
    try:
        with open(state, encoding="utf-8") as handle:
            json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"its {TRAINER_STATE} does not parse ({error})"
    return None


def latest_checkpoint(output_dir: str) -> str:
    """The complete checkpoint-N folder of `output_dir` with the largest N; incomplete ones are skipped with a
    warning naming them."""
    found = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = CHECKPOINT_FOLDER.fullmatch(name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                found.append((int(match.group(1)), os.path.join(output_dir, name)))
    skipped = []
    for _, folder in sorted(found, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("--resume_from_checkpoint true: skipping %s, %s", folder, problem)
        skipped.append(os.path.basename(folder))
    raise ValueError(
        f"--resume_from_checkpoint true resumes from the latest {PREFIX_CHECKPOINT_DIR}-N folder in --output_dir "
        f"{output_dir}, but it holds " + (f"only incomplete ones ({', '.join(skipped)})" if skipped else "none")
        + "; leave --resume_from_checkpoint out (or false) to start from --model_name_or_path"
    )


def resume_checkpoint(args) -> Optional[str]:
    """The checkpoint folder `--resume_from_checkpoint` names: a path, `true` (the latest complete checkpoint-N
    in --output_dir, as in transformers' examples) or `false` (none)."""
    value = args.resume_from_checkpoint
    if value is None:
        return None
    text = str(value).strip()
    if not os.path.isdir(text):
        if text.lower() in RESUME_NONE:
            return None
        if text.lower() in RESUME_LATEST:
            return latest_checkpoint(args.output_dir)
        raise ValueError(
            f"--resume_from_checkpoint {text}: no such folder; give a checkpoint-N folder of a run, true (the "
            f"latest complete one in --output_dir) or false"
        )
    problem = checkpoint_problem(text)
    if problem is not None:
        raise ValueError(
            f"--resume_from_checkpoint {text} is an incomplete checkpoint: {problem}; resume from an earlier "
            f"checkpoint-N, or give true (the latest complete one in --output_dir)"
        )
    return text


def nothing_left_to_train(checkpoint: str, args) -> Optional[str]:
    """The message to stop with when the checkpoint already reached the run's end (`--max_steps`, or
    `--num_train_epochs` without it); None when there are steps left. (The Trainer would train one more step
    and save over the finished model.)"""
    with open(os.path.join(checkpoint, TRAINER_STATE), encoding="utf-8") as handle:
        state = json.load(handle)
    step = state.get("global_step") or 0
    if args.max_steps and args.max_steps > 0:
        if step < args.max_steps:
            return None
        where = f"step {step} of max_steps {args.max_steps}"
    else:
        epoch = state.get("epoch") or 0
        if epoch < args.num_train_epochs - 1e-6:
            return None
        where = f"epoch {epoch:g} (step {step}) of num_train_epochs {args.num_train_epochs:g}"
    name = os.path.basename(os.path.normpath(checkpoint))
    finals = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
    if any(os.path.isfile(os.path.join(args.output_dir, final)) for final in finals):
        after = f"the final model in {args.output_dir} is left as it is"
    else:
        after = f"{args.output_dir} holds no final model: {checkpoint} is the trained model"
    return f"{name} is already at {where}: nothing to train; {after}"


def set_stage(model: DimpleModel, args: DimpleTrainingArguments) -> None:
    """Attention type and trainable modules of the stage (bidirectional for the diffusion model's stages)."""
    model.config.full_attn_mask = args.stage in ("diffusion", "grpo")
    trainable = set(args.trainable_modules)
    for name in MODULES:
        getattr(model, name).requires_grad_(name in trainable)


def lora_config(args):
    """peft's LoraConfig of `--lora_r`: adapters on the language model's linear layers; the stage's other
    trainable modules are saved whole."""
    from peft import LoraConfig

    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules=r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        modules_to_save=[name for name in args.trainable_modules if name in ("img_projector", "lm_head", "visual")],
    )


def apply_lora(model: DimpleModel, args: DimpleTrainingArguments):
    """LoRA adapters on the language model's linear layers (peft); the stage's other modules still train."""
    from peft import get_peft_model

    config = lora_config(args)
    with warnings.catch_warnings():
        # peft (0.21) reads `model.is_gradient_checkpointing`, which transformers 5.23 deprecates.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def set_max_pixels(processor, max_pixels: int) -> None:
    """Images are resized to at most `max_pixels` pixels (checked against the processor's min_pixels)."""
    size = getattr(processor.image_processor, "size", None)  # a dict on 4.x, a SizeDict on 5.x
    min_pixels = getattr(processor.image_processor, "min_pixels", None) or (
        size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
    )
    if min_pixels and max_pixels < min_pixels:
        raise ValueError(f"--max_pixels must be >= the processor's min_pixels ({min_pixels}), got {max_pixels}")
    processor.image_processor.max_pixels = max_pixels
    if isinstance(size, dict):
        processor.image_processor.size["longest_edge"] = max_pixels
    elif dataclasses.is_dataclass(size) and hasattr(size, "longest_edge"):  # 5.x reads only size.longest_edge
        processor.image_processor.size = dataclasses.replace(size, longest_edge=max_pixels)


def start_or_resume(args):
    """Before any stage trains: repair a final save that crashed between its renames, find the checkpoint to
    resume from (or None), and whether the run already finished (logged; nothing must overwrite its model)."""
    if int(os.environ.get("RANK", "0")) == 0:
        recover_interrupted_save(args.output_dir)
    checkpoint = resume_checkpoint(args)
    done = nothing_left_to_train(checkpoint, args) if checkpoint is not None else None
    if done is not None:
        logger.warning("%s", done)
    return checkpoint, done is not None


def train(args: DimpleTrainingArguments) -> dict:
    """Run one stage; returns the training metrics. The final checkpoint is written to `output_dir`."""
    if args.model_name_or_path is None or args.data_path is None:
        raise ValueError("--model_name_or_path and --data_path are required")
    checkpoint, finished = start_or_resume(args)
    if finished:
        return {}
    if args.lora_r:
        try:
            import peft  # noqa: F401
        except ImportError as error:
            raise MissingExtra(
                f"--lora_r needs peft, the `train` extra: pip install -e '.[train]' (or pip install 'peft>=0.13'); "
                f"{error}"
            ) from None
    set_seed(args.seed)  # before the model exists: LoRA's adapters are initialised from it
    processor = DimpleProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    if args.max_pixels is not None:
        set_max_pixels(processor, args.max_pixels)
    # Every sample is checked (structure, image headers, text) before the model loads.
    samples = load_conversations(args.data_path, args.image_folder, processor, args.max_seq_length)
    eval_samples = None
    if args.eval_data_path is not None:
        eval_samples = load_conversations(
            args.eval_data_path, args.image_folder, processor, args.max_seq_length, flag="--eval_data_path"
        )
    if "img_projector" in args.trainable_modules and set(args.trainable_modules) <= {"img_projector", "visual"}:
        text_only = [s["id"] for s in samples if not s["images"]]
        if text_only:  # nothing that trains would get a gradient from them (a batch of them cannot step)
            raise ValueError(
                f"--stage {args.stage} trains only the image side, but {len(text_only)} sample(s) have no image "
                f"(first: {text_only[:3]}); remove them from --data_path"
            )
    if args.lora_r and "model" not in args.trainable_modules:
        raise ValueError(
            f"--lora_r adapts the language model (`model`), which --stage {args.stage} does not train "
            f"(trainable: {list(args.trainable_modules)}); drop --lora_r or add model to --trainable"
        )
    # fp32 master weights whatever the checkpoint's dtype (the release is bf16; --bf16 trains with autocast);
    # safetensors only, never a pickle
    model = DimpleModel.from_pretrained(args.model_name_or_path, use_safetensors=True, **dtype_argument(torch.float32))
    set_stage(model, args)
    if checkpointing(args):
        model.config.use_cache = False
    tokenizer = processor.tokenizer
    collator = DimpleCollator(
        model=model,
        pad_token_id=tokenizer.pad_token_id,
        mask_token_id=model.config.mask_token_id,
        diffusion=args.stage == "diffusion",
        dual=args.masking == "dual",
        eps=args.diffusion_eps,
        seed=args.seed,
    )
    if args.answer_padding_to < 0:
        raise ValueError(f"--answer_padding_to must be >= 0 (0: the release's buckets), got {args.answer_padding_to}")
    dataset = ConversationDataset(samples, processor, args.max_seq_length, seed=args.seed + args.data_seed_offset,
                                  answer_padding_to=args.answer_padding_to)
    eval_dataset = None
    if eval_samples is not None:
        eval_dataset = ConversationDataset(eval_samples, processor, args.max_seq_length, seed=args.seed, fixed_masks=True)
    if args.lora_r:
        model = apply_lora(model, args)
        if checkpointing(args):
            # With reentrant checkpointing (transformers 4.x's default) the frozen embeddings' output needs
            # requires_grad, or no gradient reaches the adapters.
            model.enable_input_require_grads()
    # The Trainer's own pushes upload its intermediate checkpoints with their pickled states (training_args.bin,
    # optimizer.pt); the final checkpoint is pushed below instead.
    push_to_hub, args.push_to_hub = args.push_to_hub, False
    trainer = Trainer(
        model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset, data_collator=collator,
        processing_class=processor,
        callbacks=[MaskingEpochCallback(collator)],
    )
    synchronise_every_backward_on_4_46_2(trainer)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if dataset.truncated:
        logger.warning("%d sample(s) were truncated to --max_seq_length %d", dataset.truncated, args.max_seq_length)
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        card = training_card(trainer.model, args, trainer.state, metrics, len(samples))
        adapter_card = None
        if args.lora_r and args.lora_save == "both":
            adapter_card = training_card(trainer.model, args, trainer.state, metrics, len(samples), adapter=True)
        save_final_checkpoint(trainer.model, processor, args.output_dir, card, args.lora_save, adapter_card)
    trainer.save_state()
    if push_to_hub and trainer.is_world_process_zero():
        push_checkpoint(args.output_dir, args)
    return metrics


def synchronise_every_backward_on_4_46_2(trainer: Trainer) -> None:
    """transformers 4.46.2's `Trainer` runs the last micro-batch of every optimizer step under
    `accelerator.no_sync` (an inverted condition, fixed in 4.46.3), so with several processes the gradients
    are never averaged: each rank trains alone and rank 0's weights are saved. There, every backward
    synchronises instead (the same result as syncing once per step; more communication only with gradient
    accumulation)."""
    if transformers.__version__ == "4.46.2" and trainer.accelerator.num_processes > 1:  # fixed in 4.46.3
        trainer.accelerator.no_sync = lambda model: contextlib.nullcontext()
        logger.warning("transformers 4.46.2: gradients are synchronised after every backward (its Trainer skips it)")


def stage_of(argv: list) -> Optional[str]:
    """The value of `--stage` on a command line (None when absent)."""
    for index, arg in enumerate(argv):
        if arg == "--stage" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--stage="):
            return arg.split("=", 1)[1]
    return None


def main(argv=None) -> None:
    """`dimple-train`: exits 0 after training (or when the checkpoint resumed has nothing left to train). The
    metrics are logged; `train(args)` returns them."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = respell_checkpointing_flags(sys.argv[1:] if argv is None else list(argv))
    if stage_of(argv) == "grpo":  # TRL's GRPOConfig and trainer (dimple_tools/training/grpo.py)
        from dimple_tools.training import grpo

        grpo.main(argv)
        return None
    (args,) = HfArgumentParser(DimpleTrainingArguments).parse_args_into_dataclasses(args=argv)
    try:
        train(args)
    except MissingExtra as error:
        sys.exit(f"dimple-train: {error}")


if __name__ == "__main__":
    main()
