"""`dimple-train --stage grpo`: reinforcement learning with verifiable rewards for Dimple, on TRL's `GRPOTrainer`.

    dimple-train --stage grpo --model_name_or_path tiny-dimple --data_path prompts.jsonl --output_dir out \\
        --reward_funcs shapes_partial_credit --num_generations 8 --max_completion_length 48 --max_steps 100

TRL's trainer does the group sampling, the rewards, the group-relative advantages, the clipped objective, the
logging, LoRA, accelerate and checkpoints; a diffusion model changes two of its steps, which this subclass
replaces:

- sampling: completions come from `diffusion_generate` (the checkpoint's decoding, with `--temperature` /
  `--top_p`), a canvas of `--max_completion_length` tokens; a completion is the canvas up to its first
  end-of-text (included).
- log-probabilities: diffu-GRPO's one-step estimator (d1, Zhao et al. 2025): one bidirectional forward pass over
  the prompt with each text token masked with probability `--p_mask_prompt` and a fully masked canvas; the
  log-probability of completion token j is read from the logits that predict canvas position j (Dimple's logits
  are shifted: position j - 1 predicts j). Each completion's prompt-masking pattern is drawn from a seed fixed
  when it is sampled (run seed, step, process, row), so the old, current and reference log-probabilities of a
  completion are computed under the same pattern, and a resumed run draws the same ones.

Data: the same files as the other stages (LLaVA-style or TRL records); the last assistant message of a sample is
its reference `answer`, passed to the reward functions with the sample's other fields, as in TRL.
"""

import dataclasses
import functools
import importlib
import inspect
import logging
import math
import sys
import warnings
from typing import Callable, Optional

import torch
from transformers import HfArgumentParser

from dimple.modeling_dimple import DimpleModel
from dimple.processing_dimple import DimpleProcessor
from dimple_tools.compat import dtype_argument
from dimple_tools.training import rewards as builtin_rewards
from dimple_tools.training.data import load_conversations, to_chat

logger = logging.getLogger("train_dimple")

try:
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # the `train` extra; the message says what to install
    GRPOConfig = GRPOTrainer = None
    TRL_MISSING = f"--stage grpo needs trl, the `train` extra: pip install -e '.[train]' (or pip install trl); {error}"
else:
    TRL_MISSING = None

# A row's prompt-masking seed: the run's seed, the step it was sampled at, its process and its row.
SEED_STRIDE = 1_000_003


def _require_trl() -> None:
    if TRL_MISSING is not None:
        from dimple_tools.training.train import MissingExtra

        raise MissingExtra(TRL_MISSING)


# ----------------------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------------------

def checked_reward(func: Callable) -> Callable:
    """`func` with its output checked on every call: one finite number (or None: unscorable, as in TRL) per
    completion; anything else raises a ValueError naming the function, before the rewards are used."""
    if inspect.iscoroutinefunction(func):
        return func  # TRL awaits these itself

    @functools.wraps(func)
    def checked(prompts, completions, **kwargs):
        values = func(prompts=prompts, completions=completions, **kwargs)
        name = getattr(func, "__name__", repr(func))
        try:
            values = list(values)
        except TypeError:
            raise ValueError(f"reward function {name} returned {type(values).__name__}, not a list of floats "
                             f"(one per completion)") from None
        if len(values) != len(completions):
            raise ValueError(f"reward function {name} returned {len(values)} rewards for {len(completions)} "
                             f"completions (one per completion)")
        for index, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
                    isinstance(value, torch.Tensor) and value.numel() == 1):
                raise ValueError(f"reward function {name}: reward #{index} is {value!r}, not a number (or None)")
            if not math.isfinite(float(value)):
                raise ValueError(f"reward function {name}: reward #{index} is {float(value)}, not finite; return "
                                 f"None for a completion it cannot score")
        return [None if value is None else float(value) for value in values]

    return checked


def resolve_reward_funcs(spec: str) -> list:
    """`--reward_funcs`: a comma list of built-in names (dimple_tools/training/rewards.py) or `module:function`."""
    funcs = []
    for name in (part.strip() for part in spec.split(",")):
        if not name:
            continue
        if ":" in name:
            module, _, attribute = name.partition(":")
            try:
                func = getattr(importlib.import_module(module), attribute)
            except (ImportError, AttributeError) as error:
                raise ValueError(f"--reward_funcs {name}: cannot import it ({error})") from None
        elif name in builtin_rewards.BUILTIN:
            func = builtin_rewards.BUILTIN[name]
        else:
            raise ValueError(f"--reward_funcs {name}: not a built-in reward ({', '.join(builtin_rewards.BUILTIN)}) "
                             f"and not module:function")
        if not callable(func):
            raise ValueError(f"--reward_funcs {name}: not callable")
        funcs.append(func)
    if not funcs:
        raise ValueError("--reward_funcs names no reward function")
    return funcs


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------

def load_prompts(data_path: str, image_folder: Optional[str], processor, max_seq_length: Optional[int]):
    """The samples of `data_path` (checked as for the other stages) as a `datasets.Dataset` of TRL's
    conversational prompts: `prompt` (the turns before the last answer), `images` (PIL images), `answer` (the
    last assistant message) and `id`."""
    import datasets
    from PIL import Image

    samples = load_conversations(data_path, image_folder, processor, max_seq_length)
    rows = {"id": [], "prompt": [], "images": [], "answer": []}
    for sample in samples:
        rows["id"].append(sample["id"])
        rows["prompt"].append(to_chat(sample["messages"][:-1]))
        images = []
        for path in sample["images"]:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        rows["images"].append(images)
        rows["answer"].append(sample["messages"][-1]["content"])
    if not any(rows["images"]):
        del rows["images"]
    return datasets.Dataset.from_dict(rows)


# ----------------------------------------------------------------------------------------------------------
# The estimator and the trainer
# ----------------------------------------------------------------------------------------------------------

def mask_prompt(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, seeds: torch.Tensor, probability: float,
                mask_token_id: int, keep_ids) -> torch.Tensor:
    """The prompts with each maskable token (a real token, not in `keep_ids`: image and special tokens) replaced
    by the mask token with `probability`, row r's draws from `torch.Generator().manual_seed(seeds[r])`."""
    if probability <= 0:
        return prompt_ids
    keep = torch.isin(prompt_ids, torch.as_tensor(list(keep_ids), device=prompt_ids.device)) | (prompt_mask == 0)
    draws = torch.stack([torch.rand(prompt_ids.shape[1], generator=torch.Generator().manual_seed(int(seed)))
                         for seed in seeds.tolist()]).to(prompt_ids.device)
    return prompt_ids.masked_fill((draws < probability) & ~keep, mask_token_id)


COMPLETION_MASKINGS = ("full", "coupled", "trajectory")


def commit_groups(history: torch.Tensor, mask_token_id: int, groups: int) -> torch.Tensor:
    """Which part of its decoding trajectory each canvas token was committed in, `(batch, canvas)` in
    [0, groups): `history` `(steps, batch, canvas)` holds the canvases after every step; a row's distinct commit
    steps, in order, are split into `groups` runs of consecutive steps (TraceRL's trajectory shrinkage: one
    scoring pass per run instead of per step). A position never committed counts as committed last."""
    steps = history.shape[0]
    committed = history != mask_token_id
    commit_step = steps - committed.sum(0)  # a committed token stays committed (no remasking)
    result = torch.zeros_like(commit_step)
    for row in range(commit_step.shape[0]):
        distinct, rank = torch.unique(commit_step[row], sorted=True, return_inverse=True)
        result[row] = rank * min(groups, len(distinct)) // len(distinct)
    return result


def canvas_masks(seeds: torch.Tensor, canvas_length: int, masking: str, groups: Optional[torch.Tensor] = None) -> list:
    """The log-probability passes over the canvas: a list of `(masked, scored)` pairs of `(batch, canvas)` bool
    tensors, the positions a pass masks and those whose log-probability it gives (every token is scored by
    exactly one pass). `full` (diffu-GRPO): one pass, everything masked and scored. `coupled` (DiffuCoder's
    coupled-GRPO): two complementary passes, row r masking each position with probability t_r ~ U(0, 1) in the
    first and the others in the second, so every token is scored in a partly decoded context. `trajectory`
    (TraceRL): the decoder's own states, from `groups` (`commit_groups`): pass g masks the tokens committed in
    run g or later and scores those of run g, so each token is scored in the context it was decoded in."""
    if masking == "full":
        everything = torch.ones(len(seeds), canvas_length, dtype=torch.bool)
        return [(everything, everything)]
    if masking == "trajectory":
        if groups is None:
            raise ValueError("completion_masking='trajectory' needs the completions' commit groups")
        groups = groups[:, :canvas_length].cpu()
        return [(groups >= g, groups == g) for g in range(int(groups.max()) + 1)]
    rows = []
    for seed in seeds.tolist():
        generator = torch.Generator().manual_seed(int(seed) + 1)  # a stream apart from the prompt's draws
        t = torch.rand(1, generator=generator)
        rows.append(torch.rand(canvas_length, generator=generator) < t)
    first = torch.stack(rows)
    return [(first, first), (~first, ~first)]


def completion_log_probs(model, prompt_ids, prompt_mask, completion_ids, canvas_length: int, *, mask_token_id: int,
                         pad_token_id: Optional[int] = None, passes: Optional[list] = None, temperature: float = 1.0,
                         pixel_values=None, image_grid_thw=None, with_entropy=False):
    """Log-probabilities of the completion tokens from bidirectional passes over `prompt_ids` (already masked)
    followed by a canvas of `canvas_length`: the completion (right-padded with `pad_token_id`) with the positions
    of the pass masked (`passes`, `(masked, scored)` pairs from `canvas_masks`; default one fully masked canvas,
    diffu-GRPO's one-step estimator). Token j's log-probability comes from the pass that scores it; logits at position P + j - 1
    predict canvas token j (P the padded prompt length). Returns (log-probs, entropies or None), both
    `(batch, completion_length)`."""
    batch, prompt_length = prompt_ids.shape
    length = completion_ids.shape[1]
    if length > canvas_length:
        raise ValueError(f"completions of {length} tokens do not fit the canvas of {canvas_length}")
    device = prompt_ids.device
    canvas = torch.full((batch, canvas_length), mask_token_id if pad_token_id is None else pad_token_id,
                        dtype=prompt_ids.dtype, device=device)
    canvas[:, :length] = completion_ids
    if not passes:
        everything = torch.ones(batch, canvas_length, dtype=torch.bool)
        passes = [(everything, everything)]
    attention_mask = torch.cat([prompt_mask, torch.ones_like(canvas)], dim=1)
    token_log_probs = entropy = 0
    for masked, scored in passes:
        masked, scored = masked.to(device), scored.to(device)
        input_ids = torch.cat([prompt_ids, canvas.masked_fill(masked, mask_token_id)], dim=1)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                       image_grid_thw=image_grid_thw).logits
        logits = logits[:, prompt_length - 1: prompt_length - 1 + length].float() / temperature  # fp32 softmax
        log_probs = torch.log_softmax(logits, dim=-1)
        scored = scored[:, :length]
        token_log_probs = token_log_probs + log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) * scored
        if with_entropy:
            entropy = entropy - (log_probs.exp() * log_probs).sum(-1) * scored
    return token_log_probs, entropy if with_entropy else None


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO's advantage of each completion: its reward less its group's mean, over the group's standard
    deviation (unbiased, + 1e-4) when `scale`; rows are groups of `group_size` consecutive completions (what
    TRL computes with scale_rewards="group"; here for its tests and users' checks)."""
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


if GRPOTrainer is not None:

    @dataclasses.dataclass
    class DimpleGRPOConfig(GRPOConfig):
        """TRL's `GRPOConfig` plus Dimple's data, decoding and estimator options."""

        model_name_or_path: str = dataclasses.field(default=None, metadata={"help": "Dimple checkpoint folder or hub id."})
        data_path: str = dataclasses.field(default=None, metadata={"help": "Prompts with reference answers (the other "
                                           "stages' formats); the last assistant message is `answer`."})
        image_folder: Optional[str] = dataclasses.field(default=None, metadata={"help": "Folder image paths are "
                                                        "relative to (default: the data file's folder)."})
        stage: str = dataclasses.field(default="grpo", metadata={"help": "grpo"})
        reward_funcs: str = dataclasses.field(
            default="shapes_partial_credit",
            metadata={"help": f"Comma list of built-in rewards ({', '.join(builtin_rewards.BUILTIN)}) or "
                      "module:function, each (prompts, completions, **sample) -> list[float]."})
        completion_masking: str = dataclasses.field(
            default="full", metadata={"help": "Log-probability estimator: full (diffu-GRPO: one pass, the canvas "
                                      "masked), coupled (coupled-GRPO: two passes with complementary random "
                                      "canvas masks) or trajectory (TraceRL: each token in the context the "
                                      "sampling decoded it in, --trajectory_groups passes)."})
        trajectory_groups: int = dataclasses.field(
            default=4, metadata={"help": "completion_masking=trajectory: scoring passes per completion (its "
                                 "decoding steps in that many runs of consecutive steps)."})
        score_canvas: bool = dataclasses.field(
            default=True, metadata={"help": "Score the whole canvas: the answer, its end-of-text and the padding "
                                    "after it (every canvas position has a target in Dimple's training, and the "
                                    "decoder commits the padding too); false: up to the first end-of-text (d1)."})
        p_mask_prompt: float = dataclasses.field(default=0.15, metadata={"help": "diffu-GRPO: probability of masking "
                                                 "each prompt text token in the log-probability pass, in [0, 1)."})
        diffusion_steps: Optional[int] = dataclasses.field(default=None, metadata={"help": "Denoising steps of the "
                                                           "sampling (default: the checkpoint's steps per token x "
                                                           "max_completion_length)."})
        alg_p_threshold: Optional[float] = dataclasses.field(default=None, metadata={"help": "Confident decoding "
                                                             "threshold of the sampling (default: the checkpoint's)."})
        max_seq_length: int = dataclasses.field(default=1024, metadata={"help": "Longest prompt."})
        max_pixels: Optional[int] = dataclasses.field(default=None, metadata={"help": "Image processor max_pixels."})
        trainable: Optional[str] = dataclasses.field(default=None, metadata={"help": "Comma list of modules to train "
                                                     "(default: model, lm_head, as the diffusion stage)."})
        lora_r: int = dataclasses.field(default=0, metadata={"help": "LoRA rank on the language model (0: off)."})
        lora_alpha: int = dataclasses.field(default=16, metadata={"help": "LoRA alpha."})
        lora_save: str = dataclasses.field(default="merged", metadata={"help": "merged, adapter or both."})

        def __post_init__(self):
            if self.bf16 is None:  # TRL's default is bf16 everywhere; Dimple trains in bf16 on CUDA, fp32 on a CPU
                self.bf16 = torch.cuda.is_available() and not self.use_cpu
            super().__post_init__()
            if self.completion_masking not in COMPLETION_MASKINGS:
                raise ValueError(f"--completion_masking must be one of {COMPLETION_MASKINGS}, got "
                                 f"{self.completion_masking!r}")
            if self.trajectory_groups < 1:
                raise ValueError(f"--trajectory_groups must be >= 1, got {self.trajectory_groups}")
            if not 0 <= self.p_mask_prompt < 1:
                raise ValueError(f"--p_mask_prompt must be in [0, 1), got {self.p_mask_prompt}")
            if self.diffusion_steps is not None and self.diffusion_steps < 1:
                raise ValueError(f"--diffusion_steps must be >= 1, got {self.diffusion_steps}")
            if self.alg_p_threshold is not None and not 0 <= self.alg_p_threshold <= 1:
                raise ValueError(f"--alg_p_threshold must be in [0, 1], got {self.alg_p_threshold}")
            if self.use_vllm or self.use_transformers_continuous_batching:
                raise ValueError("--stage grpo samples with diffusion_generate: --use_vllm and "
                                 "--use_transformers_continuous_batching do not apply")

        @property
        def trainable_modules(self):
            from dimple_tools.training.arguments import MODULES, STAGE_TRAINABLE

            names = tuple(n.strip() for n in self.trainable.split(",") if n.strip()) if self.trainable else None
            names = names or STAGE_TRAINABLE["diffusion"]
            unknown = [n for n in names if n not in MODULES]
            if unknown:
                raise ValueError(f"--trainable {unknown}: modules are {MODULES}")
            return names

    class DimpleGRPOTrainer(GRPOTrainer):
        """TRL's `GRPOTrainer` with diffusion sampling and diffu-GRPO's log-probability estimator (module doc)."""

        def __init__(self, *args, **kwargs):
            # With --beta, TRL would load the reference model through the checkpoint's remote code (and refuse
            # without --trust_remote_code); it is this package's DimpleModel, loaded here instead. (With LoRA the
            # reference is the model with its adapters off, as in TRL.)
            config = kwargs["args"]
            beta, config.beta = config.beta, 0.0
            try:
                super().__init__(*args, **kwargs)
            finally:
                config.beta = beta
            self.beta = beta
            self._groups = None  # the completions' commit groups (completion_masking=trajectory)
            if beta != 0.0 and not hasattr(self.model, "peft_config"):
                reference = DimpleModel.from_pretrained(config.model_name_or_path, use_safetensors=True,
                                                        **dtype_argument(torch.float32))
                reference.config.full_attn_mask = True
                reference.requires_grad_(False).eval()
                self.ref_model = self.accelerator.prepare_model(reference, evaluation_mode=True)

        def _dimple(self):
            model = self.accelerator.unwrap_model(self.model)
            return model.get_base_model() if hasattr(model, "get_base_model") else model

        def _row_seeds(self, rows: int) -> torch.Tensor:
            base = (self.args.seed * SEED_STRIDE + self.state.global_step) * SEED_STRIDE
            offset = self.accelerator.process_index * rows
            return torch.arange(rows, dtype=torch.long) + offset + base % (2**62)

        def _tokenize_prompts(self, prompts: list):
            # Dimple's processor left-pads a batch (its canvas goes on the right); TRL wants each prompt's own
            # tokens (it pads them itself), so the leading padding goes. A chat-template prompt starts with a
            # real token (<|im_start|> or the tokenizer's bos), never with the pad token.
            prompt_ids, images, multimodal_fields = super()._tokenize_prompts(prompts)
            pad = self._tokenizer.pad_token_id
            trimmed = []
            for ids in prompt_ids:
                ids = list(ids)
                start = next((i for i, token in enumerate(ids) if token != pad), len(ids))
                trimmed.append(ids[start:])
            return trimmed, images, multimodal_fields

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
            device = self.accelerator.device
            pad = self._tokenizer.pad_token_id
            width = max(len(ids) for ids in prompt_ids)
            input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, ids in enumerate(prompt_ids):  # left padding, as diffusion_generate expects
                input_ids[row, width - len(ids):] = torch.as_tensor(ids)
                attention_mask[row, width - len(ids):] = 1
            inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
            for key in ("pixel_values", "image_grid_thw"):
                if isinstance(multimodal_fields.get(key), torch.Tensor):
                    inputs[key] = multimodal_fields[key].to(device)
            model = self._dimple()
            config = model.generation_config
            canvas = self.args.max_completion_length
            steps = self.args.diffusion_steps or max(1, round(canvas * config.steps / config.max_new_tokens))
            threshold = config.alg_p_threshold if self.args.alg_p_threshold is None else self.args.alg_p_threshold
            generator = torch.Generator(device=device).manual_seed(int(self._row_seeds(1)[0]))
            was_training = model.training
            model.eval()
            trajectory = self.args.completion_masking == "trajectory"
            with torch.no_grad():
                output = model.diffusion_generate(
                    **inputs, max_new_tokens=canvas, steps=steps, alg_p_threshold=threshold,
                    temperature=self.args.temperature, top_p=self.args.top_p, top_k=self.args.top_k or None,
                    generator=generator, output_history=trajectory, return_dict_in_generate=True)
            model.train(was_training)
            sequences = output.sequences
            if trajectory:
                history = torch.stack(output.history)[:, :, width:]
                self._commit_groups.append(commit_groups(history, model.config.mask_token_id,
                                                         self.args.trajectory_groups))
                self._groups = torch.cat(self._commit_groups)  # for the old/reference passes that follow
            # An answer ends at its first end-of-text: the pad token (trained answers end in padding) or eos.
            eos = {*self.eos_token_ids, pad}
            completions = []
            for row in sequences[:, width:].tolist():
                end = next((i for i, token in enumerate(row) if token in eos), len(row) - 1)
                if self.args.score_canvas:  # what follows the end is padding, as in training
                    completions.append(row[: end + 1] + [pad] * (len(row) - end - 1))
                else:
                    completions.append(row[: end + 1])
            return completions, None

        def _generate_and_score_completions(self, inputs):
            self._mask_seeds = self._row_seeds(len(inputs))
            self._commit_groups = []
            output = super()._generate_and_score_completions(inputs)
            device = self.accelerator.device
            output["prompt_mask_seeds"] = self._mask_seeds.to(device)
            if self._commit_groups:  # kept with the completions through TRL's shuffling and splitting
                output["commit_groups"] = torch.cat(self._commit_groups).to(device)
            return output

        def _compute_loss(self, model, inputs):
            self._mask_seeds = inputs["prompt_mask_seeds"]
            self._groups = inputs.get("commit_groups")
            return super()._compute_loss(model, inputs)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                               compute_entropy=False, compute_aux_loss=False, pixel_values=None,
                                               image_grid_thw=None, num_images=None, **unused):
            config = self._dimple().config
            keep_ids = {config.image_token_id, config.vision_start_token_id, config.vision_end_token_id,
                        *self._tokenizer.all_special_ids} - {config.mask_token_id}
            prompt_ids, prompt_mask = input_ids[:, :-logits_to_keep], attention_mask[:, :-logits_to_keep]
            completion_ids = input_ids[:, -logits_to_keep:]
            seeds = self._mask_seeds
            batch_size = batch_size or input_ids.shape[0]
            if pixel_values is not None:
                rows_per_image = image_grid_thw.prod(dim=-1)
                counts = num_images if num_images is not None else [1] * input_ids.shape[0]
                image_starts = torch.tensor([0, *counts]).cumsum(0)
                row_starts = torch.cat([rows_per_image.new_zeros(1), rows_per_image.cumsum(0)])
            all_log_probs, all_entropies = [], []
            for start in range(0, input_ids.shape[0], batch_size):
                end = min(start + batch_size, input_ids.shape[0])
                pixels = grid = None
                if pixel_values is not None:
                    first, last = int(image_starts[start]), int(image_starts[end])
                    pixels = pixel_values[int(row_starts[first]): int(row_starts[last])]
                    grid = image_grid_thw[first:last]
                masked = mask_prompt(prompt_ids[start:end], prompt_mask[start:end], seeds[start:end],
                                     self.args.p_mask_prompt, config.mask_token_id, keep_ids)
                with self.accelerator.autocast():
                    log_probs, entropy = completion_log_probs(
                        model, masked, prompt_mask[start:end], completion_ids[start:end],
                        self.args.max_completion_length, mask_token_id=config.mask_token_id,
                        pad_token_id=self._tokenizer.pad_token_id,
                        passes=canvas_masks(seeds[start:end], self.args.max_completion_length,
                                            self.args.completion_masking,
                                            None if self._groups is None else self._groups[start:end]),
                        temperature=self.temperature, pixel_values=pixels, image_grid_thw=grid,
                        with_entropy=compute_entropy)
                all_log_probs.append(log_probs)
                all_entropies.append(entropy)
            entropies = torch.cat(all_entropies) if compute_entropy else None
            return torch.cat(all_log_probs), entropies, None


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------

def build_trainer(args, reward_funcs=None):
    """The `DimpleGRPOTrainer` of `args` (a `DimpleGRPOConfig`), its processor and dataset; `reward_funcs`
    (callables) replace `--reward_funcs`. Everything is checked (rewards, data) before the model loads."""
    from dimple_tools.training.train import lora_config, set_max_pixels, set_stage

    if args.model_name_or_path is None or args.data_path is None:
        raise ValueError("--model_name_or_path and --data_path are required")
    funcs = resolve_reward_funcs(args.reward_funcs) if reward_funcs is None else list(reward_funcs)
    if args.lora_r and "model" not in args.trainable_modules:
        raise ValueError(f"--lora_r adapts the language model (`model`), which --trainable {args.trainable} leaves "
                         f"out; drop --lora_r or add model to --trainable")
    processor = DimpleProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    if args.max_pixels is not None:
        set_max_pixels(processor, args.max_pixels)
    dataset = load_prompts(args.data_path, args.image_folder, processor, args.max_seq_length)
    model = DimpleModel.from_pretrained(args.model_name_or_path, use_safetensors=True, **dtype_argument(torch.float32))
    set_stage(model, args)  # bidirectional attention; the diffusion stage's modules train
    peft_config = lora_config(args) if args.lora_r else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        trainer = DimpleGRPOTrainer(model=model, reward_funcs=[checked_reward(f) for f in funcs], args=args,
                                    train_dataset=dataset, processing_class=processor, peft_config=peft_config)
    return trainer, processor, dataset


def train_grpo(args, reward_funcs=None) -> dict:
    """Run the GRPO stage; returns the training metrics. The final checkpoint is written to `output_dir`.
    `reward_funcs` (callables, as TRL takes them) replaces `args.reward_funcs` when given."""
    from dimple_tools.training.checkpoints import save_final_checkpoint, training_card
    from dimple_tools.training.train import start_or_resume

    checkpoint, finished = start_or_resume(args)
    if finished:
        return {}
    push_to_hub, args.push_to_hub = args.push_to_hub, False
    trainer, processor, dataset = build_trainer(args, reward_funcs=reward_funcs)
    with warnings.catch_warnings():
        # TRL switches activation checkpointing off and on around its no-grad passes by the old names, which
        # transformers 5.23 deprecates (every step would warn)
        for old in ("is_gradient_checkpointing", "gradient_checkpointing_enable", "gradient_checkpointing_disable"):
            warnings.filterwarnings("ignore", message=f"`{old}` is deprecated", category=FutureWarning)
        result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    if trainer.is_world_process_zero():
        card = training_card(trainer.model, args, trainer.state, metrics, len(dataset))
        save_final_checkpoint(trainer.model, processor, args.output_dir, card, args.lora_save)
    trainer.save_state()
    if push_to_hub and trainer.is_world_process_zero():
        from dimple_tools.training.checkpoints import push_checkpoint

        push_checkpoint(args.output_dir, args)
    return metrics


def main(argv) -> None:
    from dimple_tools.training.train import MissingExtra

    try:
        _require_trl()
        (args,) = HfArgumentParser(DimpleGRPOConfig).parse_args_into_dataclasses(args=argv)
        train_grpo(args)
    except MissingExtra as error:
        sys.exit(f"dimple-train: {error}")
