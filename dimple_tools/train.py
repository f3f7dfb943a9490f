"""Train Dimple: autoregressive stages (`align`, `instruct`), then the diffusion stage (`diffusion`).

Built on transformers' `Trainer`: this file only turns LLaVA-style conversations into batches, chooses
what trains in each stage and what the attention is, and writes checkpoints that load with
`AutoModel` / `AutoProcessor` and `trust_remote_code`.

    dimple-train --model_name_or_path tiny-dimple --data_path data.jsonl --stage diffusion \\
        --output_dir out --max_steps 200 --learning_rate 1e-3 --per_device_train_batch_size 16

Multi-GPU: `accelerate launch --config_file configs/accelerate_zero1.yaml -m dimple_tools.train ...` (see README).

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
import re
import shutil
import sys
import warnings
from typing import Optional

import torch
import transformers
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments, set_seed

from dimple.configuration_dimple import DimpleConfig  # noqa: E402
from dimple.modeling_dimple import DimpleModel  # noqa: E402
from dimple import processing_dimple  # noqa: E402
from dimple.processing_dimple import DimpleProcessor  # noqa: E402
from dimple_tools.compat import dtype_argument  # noqa: E402


logger = logging.getLogger("train_dimple")

STAGES = ("align", "instruct", "diffusion")
MASKINGS = ("single", "dual")
LORA_SAVES = ("merged", "adapter", "both")
# Modules each stage trains (SPEC §5); everything else is frozen.
STAGE_TRAINABLE = {
    "align": ("img_projector",),
    "instruct": ("model", "lm_head", "img_projector"),
    "diffusion": ("model", "lm_head"),
}
MODULES = ("visual", "img_projector", "model", "lm_head")
IMAGE_PLACEHOLDER = "<image>"
# Qwen2-VL's image processor refuses images more elongated than this.
MAX_ASPECT_RATIO = 200
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
    lora_save: str = dataclasses.field(
        default="merged",
        metadata={"help": f"With --lora_r, the final checkpoint: one of {LORA_SAVES} (merged weights in output_dir; "
                  "the adapter alone, adapter_model.safetensors + adapter_config.json for PeftModel.from_pretrained, "
                  "in output_dir; or merged weights with the adapter in output_dir/adapter)."},
    )
    eval_data_path: Optional[str] = dataclasses.field(
        default=None,
        metadata={"help": "Held-out samples (same formats as --data_path): the stage's loss on them is evaluated at "
                  "the end (and per --eval_strategy); diffusion masks are drawn from a fixed seed, so evaluations "
                  "compare."},
    )
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
        if self.lora_save not in LORA_SAVES:
            raise ValueError(f"--lora_save must be one of {LORA_SAVES}, got {self.lora_save!r}")
        if self.lora_save != "merged" and not self.lora_r:
            raise ValueError(f"--lora_save {self.lora_save} saves a LoRA adapter: it needs --lora_r")
        if self.eval_data_path is not None and not os.path.isfile(self.eval_data_path):
            raise ValueError(f"--eval_data_path {self.eval_data_path} does not exist")
        if self.lora_r < 0:
            raise ValueError(f"--lora_r must be >= 0 (0: no LoRA), got {self.lora_r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"--max_pixels must be a positive number of pixels, got {self.max_pixels}")
        if self.max_seq_length < 2:
            raise ValueError(f"--max_seq_length must be >= 2, got {self.max_seq_length}")
        self.remove_unused_columns = False  # the collator builds exactly the model's inputs
        if self.eval_data_path is not None:
            self.prediction_loss_only = True  # the eval loss only: gathering 152k-vocabulary logits would not fit
        if self.label_names is None:
            self.label_names = ["labels"]  # also through peft's wrapper, whose forward does not name them
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


class DataProblems(ValueError):
    """Every problem found in the training data, one per line as `file:line: sample id: what`."""

    def __init__(self, data_path: str, problems: list, limit: int = 200, flag: str = "--data_path"):
        self.problems = problems
        shown = problems[:limit]
        more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
        super().__init__(
            f"{flag} {data_path}: {len(problems)} problem(s), nothing trained:\n  " + "\n  ".join(shown) + more
        )


def read_records(path: pathlib.Path, flag: str = "--data_path") -> tuple:
    """(records, line numbers, problems) of a JSON list or a JSONL file; a JSONL line that does not parse is a
    problem naming its line, the others are still read."""
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"{flag} {path} holds no samples")
    records, lines, problems = [], [], []
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                    lines.append(number)
                except json.JSONDecodeError as error:
                    problems.append(f"{path.name}:{number}: not valid JSON: {error.msg} (column {error.colno})")
        return records, lines, problems
    try:
        start = len(text) - len(text.lstrip())
        if not text.startswith("[", start):
            records = json.loads(text)  # not a list: named below
            return records, None, problems
        # A list, read record by record to know the line each starts on.
        decoder, position, line, counted = json.JSONDecoder(), start + 1, 1, 0
        separators = re.compile(r"\s*(,\s*)?")
        while True:
            position = separators.match(text, position).end()
            if text.startswith("]", position):
                break
            line += text.count("\n", counted, position)
            counted = position
            record, position = decoder.raw_decode(text, position)
            records.append(record)
            lines.append(line)
        if text[position + 1:].strip():
            json.loads(text)  # raises "Extra data" at the right place
    except json.JSONDecodeError as error:
        hint = " (one record per line is a .jsonl file)" if "Extra data" in str(error) else ""
        raise ValueError(f"{flag} {path}: not valid {path.suffix[1:].upper() or 'JSON'}{hint}: {error}") from None
    return records, lines, problems


def load_conversations(data_path: str, image_folder: Optional[str] = None, processor=None,
                       max_seq_length: Optional[int] = None, flag: str = "--data_path") -> list:
    """Read and check LLaVA-style samples, {"id", "image" or "images", "messages" (or "conversations")}, or TRL's
    vision SFT records ({"messages": [{"role", "content": [{"type": "image"}, {"type": "text", "text"}]}],
    "images": [...]}).

    Every sample is checked before training: its structure, its images' headers (files that are missing, are no
    image or do not decode), and with `processor` its text (special tokens typed in a message, a prompt longer
    than `max_seq_length`). All problems are raised together as one `DataProblems` (a ValueError), each naming
    the file, line and sample."""
    path = pathlib.Path(data_path)
    if not path.exists():
        raise ValueError(f"{flag} {data_path} does not exist")
    records, lines, problems = read_records(path, flag)
    if not isinstance(records, list):
        raise ValueError(f"{flag} {data_path}: expected a list of samples, got {type(records).__name__}")
    if not records and not problems:
        raise ValueError(f"{flag} {data_path} holds no samples")
    root = pathlib.Path(image_folder) if image_folder else path.parent
    samples = []
    for index, record in enumerate(records):
        where = f"{path.name}:{lines[index]}" if lines else f"{path.name} sample #{index}"
        sample, problem = _check_record(record, index, root)
        if problem is not None:
            problems.append(f"{where}: {problem}")
        else:
            sample["where"] = where
            samples.append(sample)
    readable = []
    for sample in samples:
        image_problems = _image_problems(sample)
        problems += [f"{sample['where']}: sample {sample['id']}: {problem}" for problem in image_problems]
        if not image_problems:
            readable.append(sample)
    if processor is not None:
        problems += check_texts(readable, processor, max_seq_length)
    if problems:
        line = re.compile(r"^[^:]*:(\d+): ")
        problems.sort(key=lambda problem: int(line.match(problem).group(1)) if line.match(problem) else 0)
        raise DataProblems(data_path, problems, flag=flag)
    return samples


def _check_record(record, index: int, root: pathlib.Path) -> tuple:
    """(sample, None) or (None, the problem) for one record."""
    if not isinstance(record, dict):
        return None, f"sample #{index}: expected an object with `messages`, got {type(record).__name__}"
    name = record.get("id", f"#{index}")
    messages = record.get("messages") or record.get("conversations")
    if not messages:
        return None, f"sample {name}: no `messages`"
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return None, f"sample {name}: `messages` must be a list of {{role, content}} objects"
    messages = [_normalise_message(m) for m in messages]
    for message in messages:
        if message["role"] not in ROLES:
            return None, f"sample {name}: role {message['role']!r} is not one of {', '.join(ROLES)} (or LLaVA's human, gpt)"
        if not isinstance(message["content"], str):
            return None, (
                f"sample {name}: a message's `content` must be a string, images as `{IMAGE_PLACEHOLDER}` placeholders "
                "(or TRL's list of {\"type\": \"image\"} / {\"type\": \"text\", \"text\": ...} entries), got "
                f"{_describe_content(message['content'])}"
            )
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        return None, f"sample {name}: the conversation must end with a non-empty assistant answer"
    if IMAGE_PLACEHOLDER in messages[-1]["content"]:
        return None, f"sample {name}: the answer (the last message) holds `{IMAGE_PLACEHOLDER}`; images go in the prompt"
    images = record.get("images", record.get("image", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
        return None, f"sample {name}: `image` / `images` must be a file path or a list of file paths"
    images = [str(root / image) for image in images]
    placeholders = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders != len(images):
        return None, f"sample {name}: {placeholders} `{IMAGE_PLACEHOLDER}` placeholders but {len(images)} images"
    return {"id": name, "messages": messages, "images": images}, None


def _image_problems(sample: dict) -> list:
    """Opens each image's header (the pixels are decoded in training): missing, not an image, unreadable."""
    from PIL import Image

    problems, sample["image_sizes"] = [], []
    for image in sample["images"]:
        if not os.path.isfile(image):
            problems.append(f"image file {image} not found")
            continue
        try:
            with Image.open(image) as opened:
                width, height = opened.size
        except Image.UnidentifiedImageError:
            problems.append(f"image file {image} is not an image PIL can read")
            continue
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            problems.append(f"image file {image} does not decode: {error}")
            continue
        if min(width, height) < 1 or max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
            problems.append(f"image file {image} is {width}x{height}: an aspect ratio above {MAX_ASPECT_RATIO} is refused")
            continue
        sample["image_sizes"].append((height, width))
    return problems


def _describe_content(content) -> str:
    if isinstance(content, list):
        return "a list with entries other than {\"type\": \"image\"} / {\"type\": \"text\", \"text\": str}"
    return type(content).__name__


def special_tokens(tokenizer) -> list:
    """The tokenizer's control tokens (`<|im_start|>`, `<|image_pad|>`, `<|mask|>`, `<|endoftext|>`, ...)."""
    tokens = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    return sorted(tokens | set(tokenizer.all_special_tokens), key=len, reverse=True)


def image_tokens(image_processor, height: int, width: int) -> int:
    """The number of `<|image_pad|>` tokens an image of this size becomes (from its size alone): the size
    processing_dimple resizes it to (`fit_size`, where it has one), else Qwen2-VL's rule."""
    patch, merge = image_processor.patch_size, image_processor.merge_size
    size = getattr(image_processor, "size", None) or {}

    def bound(key, size_key):
        value = size.get(size_key) if isinstance(size, dict) else getattr(size, size_key, None)
        return value if value is not None else getattr(image_processor, key, None)

    min_pixels, max_pixels = bound("min_pixels", "shortest_edge"), bound("max_pixels", "longest_edge")
    fit_size = getattr(processing_dimple, "fit_size", None)
    if fit_size is not None and min_pixels and max_pixels:
        resized_height, resized_width = fit_size(height, width, patch * merge, min_pixels, max_pixels)
    elif hasattr(image_processor, "get_number_of_image_patches"):  # transformers >= 4.50
        return image_processor.get_number_of_image_patches(height, width, {}) // merge**2
    else:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        resized_height, resized_width = smart_resize(
            height, width, factor=patch * merge, min_pixels=min_pixels, max_pixels=max_pixels
        )
    return (resized_height // patch) * (resized_width // patch) // merge**2


def check_texts(samples: list, processor, max_seq_length: Optional[int], chunk: int = 1024) -> list:
    """Problems in the samples' text: special tokens typed in a message (the tokenizer would read them as control
    tokens: `<|image_pad|>` in a prompt breaks the image alignment, `<|mask|>` or `<|endoftext|>` in an answer
    corrupts the targets), and prompts (with their image tokens) longer than `max_seq_length`. Stores each
    sample's prompt text and length."""
    tokenizer = processor.tokenizer
    pattern = re.compile("|".join(re.escape(token) for token in special_tokens(tokenizer)))
    problems = []
    for sample in samples:
        for number, message in enumerate(sample["messages"]):
            found = sorted(set(pattern.findall(message["content"])))
            if found:
                part = "the answer" if number == len(sample["messages"]) - 1 else f"message {number + 1} ({message['role']})"
                problems.append(
                    f"{sample['where']}: sample {sample['id']}: {part} holds the special token(s) {', '.join(found)}, which "
                    "the tokenizer reads as control tokens; remove them (images are `<image>` placeholders)"
                )
    if max_seq_length is None:
        return problems
    for first in range(0, len(samples), chunk):
        batch = samples[first: first + chunk]
        prompts = [prompt_text(processor, s["messages"]) for s in batch]
        ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
        for sample, prompt, prompt_ids in zip(batch, prompts, ids):
            length = len(prompt_ids) + sum(
                image_tokens(processor.image_processor, h, w) - 1 for h, w in sample.get("image_sizes", ())
            )
            sample["prompt_length"] = length
            if length >= max_seq_length:
                problems.append(
                    f"{sample['where']}: sample {sample['id']}: the prompt alone has {length} tokens (images included), "
                    f"leaving no room for the answer within --max_seq_length {max_seq_length}"
                )
    return problems


def prompt_text(processor, messages: list) -> str:
    """The prompt: every turn before the last answer, in the chat template, with the generation prompt."""
    return processor.apply_chat_template(to_chat(messages[:-1]), add_generation_prompt=True, tokenize=False)


def _normalise_message(message: dict) -> dict:
    # LLaVA's original files use {"from": "human"/"gpt", "value": ...}; TRL's vision SFT records a list of
    # {"type": "image"} / {"type": "text", "text": ...} entries as the content (the images in the record's `images`).
    role = message.get("role") or {"human": "user", "gpt": "assistant"}.get(message.get("from"), message.get("from"))
    content = message.get("content", message.get("value", ""))
    if isinstance(content, list) and content and all(_is_trl_entry(entry) for entry in content):
        content = "".join(IMAGE_PLACEHOLDER if entry["type"] == "image" else entry["text"] for entry in content)
    return {"role": role, "content": content}


def _is_trl_entry(entry) -> bool:
    if not isinstance(entry, dict):
        return False
    return entry.get("type") == "image" or (entry.get("type") == "text" and isinstance(entry.get("text"), str))


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

    def __init__(self, samples: list, processor, max_seq_length: int, seed: int = 0, fixed_masks: bool = False):
        self.samples, self.processor, self.max_seq_length, self.seed = samples, processor, max_seq_length, seed
        self.fixed_masks = fixed_masks  # evaluation: the same diffusion masks at every evaluation
        self.truncated_indices = set()  # distinct samples (an item is fetched again every epoch)
        self.prompts = [prompt_text(processor, s["messages"]) for s in samples]

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
        if self.fixed_masks:
            item["fixed_masks"] = True
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
            # evaluation items: masks of a fixed draw (-1 is no training epoch), the same at every evaluation
            masked = self.diffusion_mask(len(target), item["index"], epoch=-1 if item.get("fixed_masks") else None)
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

    def diffusion_mask(self, length: int, index: int, epoch: Optional[int] = None) -> torch.Tensor:
        """Each target position masked with probability t ~ U(eps, 1); at least one is masked."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_033 + index)
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


TRAINING_CARD_MARK = "<!-- model card written by dimple-train -->"


def card_path(args) -> str:
    """The name the card's usage snippet loads: the hub id when pushing, else the output folder's name."""
    return args.hub_model_id or pathlib.Path(args.output_dir).resolve().name


def training_card(model, args, state, metrics: dict, n_samples: int):
    """The final checkpoint's README.md (a `huggingface_hub.ModelCard`): Dimple's card (metadata, usage,
    decoding settings) plus the training arguments and the losses."""
    from dimple.modeling_dimple import dimple_model_card

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA: the wrapped Dimple
    steps = args.max_steps if args.max_steps and args.max_steps > 0 else None
    rows = {
        "stage": args.stage,
        "objective": (f"masked diffusion ({args.masking} masking, t ~ U({args.diffusion_eps}, 1))"
                      if args.stage == "diffusion" else "next-token (causal attention)"),
        "trained modules": ", ".join(args.trainable_modules),
        "LoRA": f"r {args.lora_r}, alpha {args.lora_alpha} (saved: {args.lora_save})" if args.lora_r else None,
        "training samples": n_samples,
        "max_seq_length": args.max_seq_length,
        "max_pixels": args.max_pixels,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type),
        "warmup": args.warmup_steps or getattr(args, "warmup_ratio", None) or None,
        "weight_decay": args.weight_decay,
        "max_grad_norm": args.max_grad_norm,
        "optim": getattr(args.optim, "value", args.optim),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "processes": args.world_size,
        "total batch size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "max_steps" if steps else "num_train_epochs": steps or args.num_train_epochs,
        "optimizer steps done": state.global_step,
        "precision": "bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else "fp32",
        "activation checkpointing": checkpointing(args) or None,
        "seed": args.seed,
    }
    table = "\n".join(f"| {key} | {value} |" for key, value in rows.items() if value is not None)
    logged = [entry for entry in state.log_history if "loss" in entry]
    losses = []
    if logged:
        losses.append(f"final training loss (step {logged[-1]['step']}): {logged[-1]['loss']:.4f}")
    if "train_loss" in metrics:
        losses.append(f"mean training loss over the run: {metrics['train_loss']:.4f}")
    evaluated = [entry for entry in state.log_history if "eval_loss" in entry]
    if "eval_loss" in metrics or evaluated:
        loss = metrics.get("eval_loss", evaluated[-1]["eval_loss"] if evaluated else None)
        losses.append(f"evaluation loss (`--eval_data_path`, the stage's objective): {loss:.4f}")
    source = args.model_name_or_path
    source = source if not os.path.exists(source) else pathlib.Path(source).resolve().name  # no local paths
    section = (
        f"## Training\n\nTrained from `{source}` with `dimple-train` on "
        f"`{pathlib.Path(args.data_path).name}` (transformers {transformers.__version__}, torch "
        f"{torch.__version__.split('+')[0]}).\n\n| argument | value |\n| --- | --- |\n{table}\n\n"
        + "".join(f"- {line}\n" for line in losses)
    )
    sections = [section]
    if args.lora_r and args.lora_save == "adapter":
        sections.insert(0, (
            "## This folder is a LoRA adapter\n\n`adapter_model.safetensors` + `adapter_config.json` (peft) on the base "
            f"checkpoint, trained with {'bidirectional' if args.stage == 'diffusion' else 'causal'} attention: load the "
            "base with that attention; the usage above applies to the adapted model.\n\n```python\n"
            "from peft import PeftModel\nfrom transformers import AutoModel\n\nbase = AutoModel.from_pretrained(BASE_CHECKPOINT, "
            f"trust_remote_code=True, full_attn_mask={args.stage == 'diffusion'})\n"
            "model = PeftModel.from_pretrained(base, path).eval()  # or .merge_and_unload()\n```\n"
        ))
    return dimple_model_card(
        base, path=card_path(args), extra_tags=(f"dimple-{args.stage}",) + (("lora", "peft") if args.lora_r else ()),
        sections=sections, mark=TRAINING_CARD_MARK, library_name="peft" if args.lora_save == "adapter" else "transformers",
    )


def save_checkpoint(model, processor, output_dir: str, lora_save: str = "merged") -> None:
    """A folder that loads with AutoModel / AutoProcessor (trust_remote_code): weights (safetensors), config,
    generation config, processor files and the code modules. A LoRA model is saved merged (plain weights), as
    its adapter alone (`lora_save="adapter"`: adapter_model.safetensors + adapter_config.json, for
    `PeftModel.from_pretrained` on the base checkpoint, with the processor files), or both (the adapter in
    `output_dir/adapter`)."""
    if hasattr(model, "merge_and_unload"):
        if lora_save in ("adapter", "both"):
            adapter_dir = output_dir if lora_save == "adapter" else os.path.join(output_dir, "adapter")
            model.save_pretrained(adapter_dir, safe_serialization=True)
            if lora_save == "adapter":
                processor.save_pretrained(output_dir)
                return
        model = model.merge_and_unload()  # publish plain weights
    model.save_pretrained(output_dir, safe_serialization=True)
    processor.save_pretrained(output_dir)  # also writes the files transformers 4.x reads


# What a final checkpoint folder holds; a previous checkpoint's files of these kinds are replaced, not kept.
CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".py", ".jinja", ".md", ".txt", ".model", ".tiktoken", ".bin", ".pt",
                       ".pth")


def _save_paths(output_dir) -> tuple:
    out = pathlib.Path(os.path.abspath(output_dir))
    return out, out.with_name(f".{out.name}.saving"), out.with_name(f".{out.name}.previous")


def save_final_checkpoint(model, processor, output_dir: str, card=None, lora_save: str = "merged") -> None:
    """`save_checkpoint` into a folder beside `output_dir`, then renamed into place: the previous checkpoint
    stays whole (and loads) until the new one is complete. The previous folder is kept as
    `.NAME.previous` until the rename succeeded; what the run keeps in `output_dir` besides the checkpoint
    (the Trainer's `checkpoint-*` folders, logs) moves into the new folder."""
    out, staging, backup = _save_paths(output_dir)
    recover_interrupted_save(out)
    shutil.rmtree(staging, ignore_errors=True)  # a save that crashed before its rename
    save_checkpoint(model, processor, str(staging), lora_save)
    if card is not None:
        card.save(str(staging / "README.md"))
    _sync_folder(staging)
    if out.exists():
        os.rename(out, backup)
    os.rename(staging, out)
    _sync_folder(out.parent, files=False)
    recover_interrupted_save(out)  # moves the run's files over and removes the backup


def recover_interrupted_save(output_dir) -> None:
    """Finish or undo a final save that stopped between its renames: without `output_dir`, the backup becomes
    it again; with both, the run's files move from the backup into `output_dir` and the backup goes."""
    out, _, backup = _save_paths(output_dir)
    if not backup.exists():
        return
    if not out.exists():
        logger.warning("restoring %s from %s (a save was interrupted)", out, backup)
        os.rename(backup, out)
        return
    for entry in backup.iterdir():
        run_file = entry.name != "adapter" and (entry.is_dir() or entry.suffix not in CHECKPOINT_SUFFIXES)
        if run_file and not (out / entry.name).exists():
            os.rename(entry, out / entry.name)
    shutil.rmtree(backup)


def _sync_folder(folder: pathlib.Path, files: bool = True) -> None:
    """Written data reach the disk before the rename publishes them (where the OS lets us open for fsync)."""
    paths = [p for p in folder.rglob("*") if p.is_file()] if files else []
    for path in paths + [folder]:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(descriptor)
        except OSError:
            pass
        finally:
            os.close(descriptor)


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


def train(args: DimpleTrainingArguments) -> dict:
    """Run one stage; returns the training metrics. The final checkpoint is written to `output_dir`."""
    if args.model_name_or_path is None or args.data_path is None:
        raise ValueError("--model_name_or_path and --data_path are required")
    if int(os.environ.get("RANK", "0")) == 0:
        recover_interrupted_save(args.output_dir)  # a final save that crashed between its renames
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
    dataset = ConversationDataset(samples, processor, args.max_seq_length, seed=args.seed + args.data_seed_offset)
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
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if dataset.truncated:
        logger.warning("%d sample(s) were truncated to --max_seq_length %d", dataset.truncated, args.max_seq_length)
    metrics = dict(result.metrics)
    if eval_dataset is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        card = training_card(trainer.model, args, trainer.state, metrics, len(samples))
        save_final_checkpoint(trainer.model, processor, args.output_dir, card, args.lora_save)
    trainer.save_state()
    if push_to_hub and trainer.is_world_process_zero():
        push_checkpoint(args.output_dir, args)
    return metrics


# Never uploaded: the Trainer's intermediate checkpoints, logs, and anything pickled.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", "runs/*", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt"]


def synchronise_every_backward_on_4_46_2(trainer: Trainer) -> None:
    """transformers 4.46.2's `Trainer` runs the last micro-batch of every optimizer step under
    `accelerator.no_sync` (an inverted condition, fixed in 4.46.3), so with several processes the gradients
    are never averaged: each rank trains alone and rank 0's weights are saved. There, every backward
    synchronises instead (the same result as syncing once per step; more communication only with gradient
    accumulation)."""
    if transformers.__version__ == "4.46.2" and trainer.accelerator.num_processes > 1:  # fixed in 4.46.3
        trainer.accelerator.no_sync = lambda model: contextlib.nullcontext()
        logger.warning("transformers 4.46.2: gradients are synchronised after every backward (its Trainer skips it)")


def push_checkpoint(output_dir: str, args):
    """Upload the final checkpoint written by `save_checkpoint` (safetensors weights, configs, processor files,
    code modules) to `--hub_model_id` (default: the output folder's name), creating the repository if needed."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = args.hub_model_id or pathlib.Path(output_dir).resolve().name
    repo_id = api.create_repo(repo_id, private=bool(args.hub_private_repo), exist_ok=True).repo_id
    readme, guess = pathlib.Path(output_dir) / "README.md", card_path(args)
    if readme.is_file() and guess != repo_id:  # the card's usage snippet loads the repository
        from huggingface_hub import ModelCard

        card = ModelCard.load(readme)
        card.text = card.text.replace(f'path = "{guess}"', f'path = "{repo_id}"').replace(f"# {guess}\n", f"# {repo_id}\n", 1)
        card.save(str(readme))
    logger.info("pushing %s to %s", output_dir, repo_id)
    return api.upload_folder(
        repo_id=repo_id, folder_path=output_dir, commit_message="Dimple checkpoint (dimple-train)",
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
