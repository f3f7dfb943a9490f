"""Train Dimple: autoregressive stages (`align`, `instruct`), then the diffusion stage (`diffusion`).

Built on transformers' `Trainer`: this file only turns LLaVA-style conversations into batches, chooses
what trains in each stage and what the attention is, and writes checkpoints that load with
`AutoModel` / `AutoProcessor` and `trust_remote_code`.

    python train_dimple.py --model_name_or_path tiny-dimple --data_path data.jsonl --stage diffusion \\
        --output_dir out --max_steps 200 --learning_rate 1e-3 --per_device_train_batch_size 16

Multi-GPU: `accelerate launch --config_file configs/accelerate_zero1.yaml train_dimple.py ...` (see README).

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
import math
import os
import pathlib
import random
import sys
import warnings
from typing import Optional

import torch
import transformers
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dimple_package  # noqa: E402,F401  (the repository's modules as the package `dimple`)
from dimple.configuration_dimple import DimpleConfig  # noqa: E402
from dimple.modeling_dimple import DimpleModel  # noqa: E402
from dimple.processing_dimple import DimpleProcessor  # noqa: E402


logger = logging.getLogger("train_dimple")

STAGES = ("align", "instruct", "diffusion")
MASKINGS = ("single", "dual")
# Modules each stage trains (SPEC §5); everything else is frozen.
STAGE_TRAINABLE = {
    "align": ("img_projector",),
    "instruct": ("model", "lm_head", "img_projector"),
    "diffusion": ("model", "lm_head"),
}
MODULES = ("visual", "img_projector", "model", "lm_head")
IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class DimpleTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus Dimple's data and stage options."""

    model_name_or_path: str = dataclasses.field(default=None, metadata={"help": "Dimple checkpoint folder or hub id."})
    data_path: str = dataclasses.field(default=None, metadata={"help": "LLaVA-style JSON or JSONL conversations."})
    image_folder: Optional[str] = dataclasses.field(
        default=None, metadata={"help": "Folder image paths are relative to (default: the data file's folder)."}
    )
    stage: str = dataclasses.field(default="diffusion", metadata={"help": f"One of {STAGES}."})
    masking: str = dataclasses.field(default="single", metadata={"help": f"Diffusion masking, one of {MASKINGS}."})
    diffusion_eps: float = dataclasses.field(default=1e-3, metadata={"help": "t ~ U(eps, 1) for the diffusion loss."})
    trainable: Optional[str] = dataclasses.field(
        default=None,
        metadata={"help": f"Comma list of modules to train instead of the stage's default, from {MODULES}."},
    )
    max_seq_length: int = dataclasses.field(default=1024, metadata={"help": "Longer samples are truncated."})
    max_pixels: Optional[int] = dataclasses.field(default=None, metadata={"help": "Image processor max_pixels."})
    lora_r: int = dataclasses.field(default=0, metadata={"help": "LoRA rank on the language model (0: off)."})
    lora_alpha: int = dataclasses.field(default=16, metadata={"help": "LoRA alpha."})
    data_seed_offset: int = dataclasses.field(default=0, metadata={"help": "Offset of the answer-padding RNG."})
    # transformers 5's default, also on 4.x: a step's loss is the mean over the labelled tokens of every
    # micro-batch on every device, so N devices × batch b train as one device with batch N·b.
    average_tokens_across_devices: Optional[bool] = dataclasses.field(
        default=True,
        metadata={"help": "Normalise the loss by the labelled tokens of all devices (default: true)."},
    )

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"--stage must be one of {STAGES}, got {self.stage!r}")
        if self.masking not in MASKINGS:
            raise ValueError(f"--masking must be one of {MASKINGS}, got {self.masking!r}")
        if self.masking == "dual" and self.stage != "diffusion":
            raise ValueError(f"--masking dual applies to --stage diffusion only (--stage {self.stage} masks nothing)")
        if self.trainable is not None:
            unknown = set(self.trainable_modules) - set(MODULES)
            if unknown:
                raise ValueError(f"--trainable names unknown modules {sorted(unknown)}; allowed: {MODULES}")
        if not 0 < self.diffusion_eps < 1:
            raise ValueError(f"--diffusion_eps must be in (0, 1), got {self.diffusion_eps}")
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0 (0: no LoRA), got {self.lora_r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"--max_pixels must be a positive number of pixels, got {self.max_pixels}")
        if self.max_seq_length < 2:
            raise ValueError(f"--max_seq_length must be >= 2, got {self.max_seq_length}")
        self.remove_unused_columns = False  # the collator builds exactly the model's inputs
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            self.average_tokens_across_devices = False  # one process: nothing to average (4.x warns otherwise)
        super().__post_init__()

    @property
    def trainable_modules(self):
        if self.trainable:
            return tuple(name.strip() for name in self.trainable.split(",") if name.strip())
        return STAGE_TRAINABLE[self.stage]


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def padded_answer_length(n: int, rng: random.Random) -> int:
    """Answer + padding length, drawn uniformly in [n + 1, next bucket]: below 16 tokens the next power of
    two, else the next multiple of 16 (at least one `<|endoftext|>` always follows the answer)."""
    if n + 1 <= 16:
        bucket = 1 << math.ceil(math.log2(n + 1))
    else:
        bucket = 16 * math.ceil((n + 1) / 16)
    return rng.randint(n + 1, bucket)


def load_conversations(data_path: str, image_folder: Optional[str] = None) -> list:
    """Read and check LLaVA-style samples: {"id", "image" or "images", "messages" (or "conversations")}.

    Every problem is a ValueError naming the sample, raised before training starts."""
    path = pathlib.Path(data_path)
    if not path.exists():
        raise ValueError(f"--data_path {data_path} does not exist")
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"--data_path {data_path} holds no samples")
    try:
        records = [json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (one record per line is a .jsonl file)" if path.suffix != ".jsonl" and "Extra data" in str(error) else ""
        raise ValueError(f"--data_path {data_path}: not valid {path.suffix[1:].upper() or 'JSON'}{hint}: {error}") from None
    if not isinstance(records, list):
        raise ValueError(f"--data_path {data_path}: expected a list of samples, got {type(records).__name__}")
    root = pathlib.Path(image_folder) if image_folder else path.parent
    if not records:
        raise ValueError(f"--data_path {data_path} holds no samples")
    samples = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(f"sample #{index}: expected an object with `messages`, got {type(record).__name__}")
        name = record.get("id", f"#{index}")
        messages = record.get("messages") or record.get("conversations")
        if not messages:
            raise ValueError(f"sample {name}: no `messages`")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"sample {name}: `messages` must be a list of {{role, content}} objects")
        messages = [_normalise_message(m) for m in messages]
        for message in messages:
            if message["role"] not in ROLES:
                raise ValueError(
                    f"sample {name}: role {message['role']!r} is not one of {', '.join(ROLES)} (or LLaVA's human, gpt)"
                )
            if not isinstance(message["content"], str):
                raise ValueError(
                    f"sample {name}: a message's `content` must be a string, images as `{IMAGE_PLACEHOLDER}` "
                    f"placeholders, got {type(message['content']).__name__}"
                )
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise ValueError(f"sample {name}: the conversation must end with a non-empty assistant answer")
        if IMAGE_PLACEHOLDER in messages[-1]["content"]:
            raise ValueError(f"sample {name}: the answer (the last message) holds `{IMAGE_PLACEHOLDER}`; images go in the prompt")
        images = record.get("images", record.get("image", []))
        images = [images] if isinstance(images, str) else list(images)
        images = [str(root / image) for image in images]
        placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
        if placeholders != len(images):
            raise ValueError(f"sample {name}: {placeholders} `{IMAGE_PLACEHOLDER}` placeholders but {len(images)} images")
        for image in images:
            if not os.path.isfile(image):
                raise ValueError(f"sample {name}: image file {image} not found")
        samples.append({"id": name, "messages": messages, "images": images})
    return samples


def _normalise_message(message: dict) -> dict:
    # LLaVA's original files use {"from": "human"/"gpt", "value": ...}.
    role = message.get("role") or {"human": "user", "gpt": "assistant"}.get(message.get("from"), message.get("from"))
    return {"role": role, "content": message.get("content", message.get("value", ""))}


def to_chat(messages: list) -> list:
    """Messages with `<image>` placeholders -> the chat-template format (image entries in the content)."""
    chat = []
    for message in messages:
        pieces = message["content"].split(IMAGE_PLACEHOLDER)
        content = []
        for i, piece in enumerate(pieces):
            if i > 0:
                content.append({"type": "image"})
            piece = piece.strip("\n") if i > 0 or len(pieces) > 1 else piece
            if piece:
                content.append({"type": "text", "text": piece})
        chat.append({"role": message["role"], "content": content})
    return chat


class ConversationDataset(torch.utils.data.Dataset):
    """One item per conversation: the prompt (all turns before the last answer, chat template with the
    generation prompt), the answer ids and its padded length, the images."""

    def __init__(self, samples: list, processor, max_seq_length: int, seed: int = 0):
        self.samples, self.processor, self.max_seq_length, self.seed = samples, processor, max_seq_length, seed
        self.truncated_indices = set()  # distinct samples (an item is fetched again every epoch)
        self.prompts = [
            processor.apply_chat_template(to_chat(s["messages"][:-1]), add_generation_prompt=True, tokenize=False)
            for s in samples
        ]

    def __len__(self):
        return len(self.samples)

    @property
    def truncated(self) -> int:
        return len(self.truncated_indices)

    def __getitem__(self, index):
        sample = self.samples[index]
        tokenizer = self.processor.tokenizer
        inputs = self.processor(
            images=sample["images"] or None, text=self.prompts[index], return_tensors="pt", padding=False
        )
        prompt_ids = inputs["input_ids"][0]
        answer = tokenizer(sample["messages"][-1]["content"], add_special_tokens=False)["input_ids"]
        # Padding length is drawn per (epoch-independent) sample so that runs are reproducible.
        length = padded_answer_length(len(answer), random.Random(self.seed * 1_000_003 + index))
        target = answer + [tokenizer.pad_token_id] * (length - len(answer))
        room = self.max_seq_length - len(prompt_ids)
        if room < 1:
            raise ValueError(
                f"sample {sample['id']}: the prompt alone has {len(prompt_ids)} tokens, more than "
                f"--max_seq_length {self.max_seq_length}"
            )
        if len(target) > room:
            if index not in self.truncated_indices:
                self.truncated_indices.add(index)
                if self.truncated in (1, 10, 100) or self.truncated % 1000 == 0:
                    logger.warning(
                        "%d sample(s) truncated to --max_seq_length %d so far", self.truncated, self.max_seq_length
                    )
            target = target[:room]
        item = {"index": index, "prompt_ids": prompt_ids, "target_ids": torch.tensor(target, dtype=torch.long)}
        if "pixel_values" in inputs:
            item["pixel_values"] = inputs["pixel_values"]
            item["image_grid_thw"] = inputs["image_grid_thw"]
        return item


@dataclasses.dataclass
class DimpleCollator:
    """Pads a batch (right padding), applies the stage's objective and computes M-RoPE positions.

    Autoregressive: labels are the target tokens. Diffusion: each target token is masked with the sample's
    probability t; labels keep only the masked ones (`dual` appends the complementary copy). A sample's masks
    are drawn from (seed, epoch, its dataset index) alone: a resumed run, every dataloader worker and every
    GPU process draw what one uninterrupted run draws, and a sample gets new masks each epoch."""

    model: DimpleModel
    pad_token_id: int
    mask_token_id: int
    diffusion: bool
    dual: bool = False
    eps: float = 1e-3
    seed: int = 0
    epoch: int = 0  # set at each epoch's start by `MaskingEpochCallback`

    def __call__(self, items: list) -> dict:
        rows = []  # (item, input ids, labels): one row per item, two per item with dual masking
        for item in items:
            prompt, target = item["prompt_ids"], item["target_ids"]
            ignore = torch.full_like(prompt, -100)
            if not self.diffusion:
                rows.append((item, torch.cat([prompt, target]), torch.cat([ignore, target])))
                continue
            if "index" not in item:
                raise ValueError("diffusion masking draws from each item's dataset `index`; the item has none")
            masked = self.diffusion_mask(len(target), item["index"])
            for mask in (masked, ~masked) if self.dual else (masked,):
                if mask.any():  # the complement is empty when t masked every token
                    masked_ids = torch.where(mask, self.mask_token_id, target)
                    rows.append((item, torch.cat([prompt, masked_ids]), torch.cat([ignore, torch.where(mask, target, -100)])))
        width = max(len(ids) for _, ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (_, ids, row_labels) in enumerate(rows):
            input_ids[row, : len(ids)] = ids
            labels[row, : len(ids)] = row_labels
            attention_mask[row, : len(ids)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        with_images = [item for item, _, _ in rows if "pixel_values" in item]
        if with_images:
            batch["pixel_values"] = torch.cat([item["pixel_values"] for item in with_images])
            batch["image_grid_thw"] = torch.cat([item["image_grid_thw"] for item in with_images])
        batch["position_ids"], _ = self.model.get_rope_index(
            input_ids, batch.get("image_grid_thw"), attention_mask=attention_mask
        )
        return batch

    def diffusion_mask(self, length: int, index: int) -> torch.Tensor:
        """Each target position masked with probability t ~ U(eps, 1); at least one is masked."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + index)
        t = self.eps + (1 - self.eps) * torch.rand((), generator=generator)
        mask = torch.rand(length, generator=generator) < t
        if not mask.any():
            mask[torch.randint(length, (), generator=generator)] = True
        return mask


class MaskingEpochCallback(TrainerCallback):
    """Tells the collator the epoch at each epoch's start, before the dataloader's workers are created."""

    def __init__(self, collator: DimpleCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is fractional (1.25 when resuming a quarter into the second epoch); float sums may fall
        # just short of a whole number at an epoch boundary
        self.collator.epoch = math.floor((state.epoch or 0) + 1e-6)


# --------------------------------------------------------------------------------------------------
# Model set-up and the run
# --------------------------------------------------------------------------------------------------


def set_stage(model: DimpleModel, args: DimpleTrainingArguments) -> None:
    """Attention type and trainable modules of the stage."""
    model.config.full_attn_mask = args.stage == "diffusion"
    trainable = set(args.trainable_modules)
    for name in MODULES:
        getattr(model, name).requires_grad_(name in trainable)


def apply_lora(model: DimpleModel, args: DimpleTrainingArguments):
    """LoRA adapters on the language model's linear layers (peft); the stage's other modules still train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        target_modules=r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
        modules_to_save=[name for name in args.trainable_modules if name in ("img_projector", "lm_head", "visual")],
    )
    with warnings.catch_warnings():
        # peft (0.21) reads `model.is_gradient_checkpointing`, which transformers 5.23 deprecates.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def save_checkpoint(model, processor, output_dir: str) -> None:
    """A folder that loads with AutoModel / AutoProcessor (trust_remote_code): weights (safetensors), config,
    generation config, processor files and the code modules."""
    if hasattr(model, "merge_and_unload"):  # LoRA: publish plain weights
        model = model.merge_and_unload()
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)  # also writes the files transformers 4.x reads


def train(args: DimpleTrainingArguments) -> dict:
    """Run one stage; returns the training metrics. The final checkpoint is written to `output_dir`."""
    if args.model_name_or_path is None or args.data_path is None:
        raise ValueError("--model_name_or_path and --data_path are required")
    samples = load_conversations(args.data_path, args.image_folder)
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
    set_seed(args.seed)  # before the model exists: LoRA's adapters are initialised from it
    processor = DimpleProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    if args.max_pixels is not None:
        size = getattr(processor.image_processor, "size", None)  # a dict on 4.x, a SizeDict on 5.x
        min_pixels = getattr(processor.image_processor, "min_pixels", None) or (
            size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        )
        if min_pixels and args.max_pixels < min_pixels:
            raise ValueError(f"--max_pixels must be >= the processor's min_pixels ({min_pixels}), got {args.max_pixels}")
        processor.image_processor.max_pixels = args.max_pixels
        if isinstance(getattr(processor.image_processor, "size", None), dict):
            processor.image_processor.size["longest_edge"] = args.max_pixels
    # fp32 master weights whatever the checkpoint's dtype (the release is bf16; --bf16 trains with autocast);
    # safetensors only, never a pickle
    dtype_argument = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = DimpleModel.from_pretrained(
        args.model_name_or_path, use_safetensors=True, **{dtype_argument: torch.float32}
    )
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
    dataset = ConversationDataset(samples, processor, args.max_seq_length, seed=args.seed + args.data_seed_offset)
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
        model=model, args=args, train_dataset=dataset, data_collator=collator, processing_class=processor,
        callbacks=[MaskingEpochCallback(collator)],
    )
    synchronise_every_backward_on_4_46_2(trainer)
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if dataset.truncated:
        logger.warning("%d sample(s) were truncated to --max_seq_length %d", dataset.truncated, args.max_seq_length)
    if trainer.is_world_process_zero():
        save_checkpoint(trainer.model, processor, args.output_dir)
    trainer.save_state()
    if push_to_hub and trainer.is_world_process_zero():
        push_checkpoint(args.output_dir, args)
    return result.metrics


# Never uploaded: the Trainer's intermediate checkpoints, logs, and anything pickled.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]


def synchronise_every_backward_on_4_46_2(trainer: Trainer) -> None:
    """transformers 4.46.2's `Trainer` runs the last micro-batch of every optimizer step under
    `accelerator.no_sync` (an inverted condition, fixed in 4.46.3), so with several processes the gradients
    are never averaged: each rank trains alone and rank 0's weights are saved. There, every backward
    synchronises instead (the same result as syncing once per step; more communication only with gradient
    accumulation)."""
    if transformers.__version__ == "4.46.2" and trainer.accelerator.num_processes > 1:
        trainer.accelerator.no_sync = lambda model: contextlib.nullcontext()
        logger.warning("transformers 4.46.2: gradients are synchronised after every backward (its Trainer skips it)")


def push_checkpoint(output_dir: str, args):
    """Upload the final checkpoint written by `save_checkpoint` (safetensors weights, configs, processor files,
    code modules) to `--hub_model_id` (default: the output folder's name), creating the repository if needed."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or pathlib.Path(output_dir).resolve().name
    repo_id = api.create_repo(repo_id, private=bool(args.hub_private_repo), exist_ok=True).repo_id
    logger.info("pushing %s to %s", output_dir, repo_id)
    return api.upload_folder(
        repo_id=repo_id, folder_path=output_dir, commit_message="Dimple checkpoint (train_dimple.py)",
        ignore_patterns=PUSH_IGNORE_PATTERNS,
    )


# transformers 5.23 renamed `--gradient_checkpointing[_kwargs]` to `--activation_checkpointing[_kwargs]` (the old
# name warns that it goes in v6; older releases know only it): either spelling works on every version.
HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
CHECKPOINTING_FLAGS = ("--gradient_checkpointing", "--activation_checkpointing")


def respell_checkpointing_flags(argv: list) -> list:
    """The command line with the checkpointing flags in the spelling this transformers release uses."""
    old, new = CHECKPOINTING_FLAGS if HAS_ACTIVATION_CHECKPOINTING else CHECKPOINTING_FLAGS[::-1]
    return [new + arg[len(old):] if arg.startswith(old) and arg[len(old):].split("=")[0] in ("", "_kwargs") else arg
            for arg in argv]


def checkpointing(args) -> bool:
    return bool(args.activation_checkpointing if HAS_ACTIVATION_CHECKPOINTING else args.gradient_checkpointing)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = respell_checkpointing_flags(sys.argv[1:] if argv is None else list(argv))
    (args,) = HfArgumentParser(DimpleTrainingArguments).parse_args_into_dataclasses(args=argv)
    return train(args)


if __name__ == "__main__":
    main()
